//! Criterion benchmarks of the `hexfleet-geo` hot paths, on the fixtures of `hexfleet_benches`.
//!
//! Run: `cargo bench -p hexfleet-benches --bench geo` (a few minutes on 2 cores). Figures and
//! targets are recorded in `BENCHMARKS.md`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use hexfleet_benches::{Rng, assignment, city_point, fences, fleet, route, travel_matrix};
use hexfleet_geo::assign::{solve_greedy, solve_optimal};
use hexfleet_geo::cells::{CourierCells, Resolution, cell_at};
use hexfleet_geo::eta::{HaversineRouter, RouteProvider, SpeedConfig, SpeedModel};
use hexfleet_geo::stops::{plan_exact, plan_heuristic};
use hexfleet_geo::{CourierEntry, FleetIndex};

fn index(c: &mut Criterion) {
    let entries = fleet(100_000, 1);
    let mut idx = FleetIndex::bulk_load(entries.clone());
    let mut rng = Rng::new(2);
    let queries: Vec<_> = (0..4096).map(|_| city_point(&mut rng, 30_000.0)).collect();
    let mut g = c.benchmark_group("index_100k");
    g.bench_function("nearest10", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(idx.nearest(queries[i], 10, None, |_| true))
        })
    });
    g.bench_function("nearest10_available_2km", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(idx.nearest(queries[i], 10, Some(2_000.0), |e| e.available && e.spare_capacity > 0))
        })
    });
    g.bench_function("move", |b| {
        let mut k = 0u64;
        let mut i = 0;
        b.iter(|| {
            k = (k + 7919) % 100_000;
            i = (i + 1) & 4095;
            idx.upsert(CourierEntry { pos: queries[i], ..entries[k as usize] });
        })
    });
    g.bench_function("bulk_load", |b| b.iter(|| black_box(FleetIndex::bulk_load(entries.clone()))));
    g.finish();

    let mut cells = CourierCells::new(Resolution::Nine);
    for e in &entries {
        cells.update(e.key, e.pos);
    }
    let mut g = c.benchmark_group("cells");
    g.bench_function("cell_at_res9", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(cell_at(queries[i], Resolution::Nine))
        })
    });
    g.bench_function("courier_cells_update_100k", |b| {
        let mut k = 0u64;
        let mut i = 0;
        b.iter(|| {
            k = (k + 7919) % 100_000;
            i = (i + 1) & 4095;
            black_box(cells.update(k, queries[i]))
        })
    });
    g.finish();
}

fn fence(c: &mut Criterion) {
    let set = fences(10_000, 3);
    let mut rng = Rng::new(4);
    let queries: Vec<_> = (0..4096).map(|_| city_point(&mut rng, 40_000.0)).collect();
    let hits: usize = queries.iter().map(|q| set.containing(*q).len()).sum();
    eprintln!(
        "fences: 10k, {} cover cells, {:.2} fences per query point on average, fences per resolution {:?}",
        set.cover_cells(),
        hits as f64 / queries.len() as f64,
        set.resolutions_in_use()
    );
    let mut g = c.benchmark_group("fence_10k");
    g.bench_function("point_query", |b| {
        let mut out = Vec::with_capacity(16);
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            out.clear();
            set.containing_into(queries[i], &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn assign(c: &mut Criterion) {
    let p = assignment(1_000, 5_000, 15, 5);
    let mut g = c.benchmark_group("assign_1000x5000_k15");
    g.sample_size(20);
    g.bench_function("optimal", |b| b.iter(|| black_box(solve_optimal(&p))));
    g.bench_function("greedy", |b| b.iter(|| black_box(solve_greedy(&p))));
    g.finish();
}

fn stops(c: &mut Criterion) {
    let mut g = c.benchmark_group("stops");
    let (p8, pts8) = route(3, 2, 6);
    let m8 = travel_matrix(&pts8);
    g.bench_function("exact_8", |b| b.iter(|| black_box(plan_exact(&p8, |a, b| m8[a][b]))));
    g.bench_function("heuristic_8", |b| b.iter(|| black_box(plan_heuristic(&p8, |a, b| m8[a][b]))));
    let (p20, pts20) = route(8, 4, 7);
    let m20 = travel_matrix(&pts20);
    g.bench_function("heuristic_20", |b| b.iter(|| black_box(plan_heuristic(&p20, |a, b| m20[a][b]))));
    g.finish();
}

fn eta(c: &mut Criterion) {
    let mut model = SpeedModel::new(SpeedConfig::default());
    let mut rng = Rng::new(8);
    for i in 0..50_000i64 {
        let a = city_point(&mut rng, 30_000.0);
        let b = hexfleet_geo::LatLng::new(a.lat + 0.001, a.lng).unwrap();
        model.observe(a, i * 60_000, b, i * 60_000 + 15_000);
    }
    let r = HaversineRouter::new(model, 1.3);
    let pts: Vec<_> = (0..4096).map(|_| city_point(&mut rng, 30_000.0)).collect();
    c.bench_function("eta_route", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(r.route(pts[i], pts[(i + 1) & 4095], 1_704_096_000_000))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = index, fence, assign, stops, eta
}
criterion_main!(benches);
