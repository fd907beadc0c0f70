//! Shared fixtures for the benchmarks: deterministic synthetic fleets, fences, assignment
//! instances and routes, so the criterion benches and the report binary measure the same data.
//!
//! Everything is seeded (xorshift), so numbers are comparable run to run.

pub mod lilim;

use hexfleet_geo::assign::{AssignmentProblem, Candidate};
use hexfleet_geo::fence::{Fence, FenceSet};
use hexfleet_geo::stops::{RouteProblem, Stop, StopKind};
use hexfleet_geo::{CourierEntry, FleetIndex, LatLng, haversine_m};

/// Centre of the synthetic city (Montreal).
pub const CENTER: (f64, f64) = (45.5017, -73.5673);
/// Metres per degree of latitude.
const M_PER_DEG: f64 = 111_195.0;

/// A small deterministic PRNG (xorshift64*), enough for fixtures.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [0, 1).
    pub fn f(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f()
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.f() * n as f64) as usize).min(n - 1)
    }
}

/// A uniformly random point in a square of `side_m` metres around [`CENTER`].
pub fn city_point(rng: &mut Rng, side_m: f64) -> LatLng {
    let h = side_m / 2.0 / M_PER_DEG;
    let hl = h / CENTER.0.to_radians().cos();
    LatLng::new(CENTER.0 + rng.range(-h, h), CENTER.1 + rng.range(-hl, hl)).unwrap()
}

/// `n` couriers in a 30 km × 30 km city, 80 % available.
pub fn fleet(n: usize, seed: u64) -> Vec<CourierEntry> {
    let mut rng = Rng::new(seed);
    (0..n as u64).map(|key| CourierEntry { key, pos: city_point(&mut rng, 30_000.0), available: rng.f() < 0.8, spare_capacity: (rng.f() * 3.0) as u16, vehicle: 1 }).collect()
}

/// `n` fences over a 40 km square: 70 % star-shaped polygons (8–32 vertices, 100–1,500 m),
/// 30 % circles (50–500 m, the pickup/drop-off arrival zones).
pub fn fences(n: usize, seed: u64) -> FenceSet {
    let mut rng = Rng::new(seed);
    let mut set = FenceSet::new();
    for id in 0..n as u64 {
        let c = city_point(&mut rng, 40_000.0);
        if rng.f() < 0.3 {
            set.insert(id, Fence::circle(c, rng.range(50.0, 500.0)).unwrap(), 0);
            continue;
        }
        let k = 8 + (rng.f() * 24.0) as usize;
        let r = rng.range(100.0, 1_500.0);
        let kx = M_PER_DEG * c.lat.to_radians().cos();
        let mut ring: Vec<(f64, f64)> = (0..k)
            .map(|i| {
                let a = i as f64 / k as f64 * std::f64::consts::TAU;
                let rr = r * rng.range(0.5, 1.0);
                (c.lng + rr * a.cos() / kx, c.lat + rr * a.sin() / M_PER_DEG)
            })
            .collect();
        ring.push(ring[0]);
        set.insert(id, Fence::polygon(geo::Polygon::new(geo::LineString::from(ring), vec![])).unwrap(), 0);
    }
    set
}

/// A dispatch tick: `n_orders` pickups and `n_couriers` available couriers in the 30 km city;
/// each order's candidates are its `k` nearest couriers, cost = ETA to pickup in seconds
/// (haversine × 1.3 at 6 m/s) plus a small per-pair preference; waiting costs 1,800 s.
pub fn assignment(n_orders: usize, n_couriers: usize, k: usize, seed: u64) -> AssignmentProblem {
    let mut rng = Rng::new(seed);
    let couriers: Vec<CourierEntry> = (0..n_couriers as u64).map(|key| CourierEntry { key, pos: city_point(&mut rng, 30_000.0), available: true, spare_capacity: 1, vehicle: 1 }).collect();
    let idx = FleetIndex::bulk_load(couriers);
    let mut candidates = Vec::with_capacity(n_orders * k);
    for o in 0..n_orders as u32 {
        let at = city_point(&mut rng, 30_000.0);
        for (e, d) in idx.nearest(at, k, None, |e| e.available) {
            candidates.push(Candidate { order: o, courier: e.key as u32, cost: d * 1.3 / 6.0 + rng.range(0.0, 60.0) });
        }
    }
    AssignmentProblem { n_orders, n_couriers, candidates, unassigned_cost: vec![1_800.0; n_orders], courier_slots: vec![] }
}

/// One courier's route: `pairs` pickup/drop-off pairs plus `onboard` lone drop-offs in a 10 km
/// square, with travel times at 6 m/s × 1.3 detour. Returns the problem and node positions
/// (0 = courier).
pub fn route(pairs: usize, onboard: usize, seed: u64) -> (RouteProblem, Vec<LatLng>) {
    let mut rng = Rng::new(seed);
    let mut pts = vec![city_point(&mut rng, 10_000.0)];
    let mut stops = Vec::new();
    for o in 0..(pairs + onboard) as u32 {
        if (o as usize) < pairs {
            pts.push(city_point(&mut rng, 10_000.0));
            stops.push(Stop { order: o, kind: StopKind::Pickup, size: 1, ready_at_s: rng.range(0.0, 600.0), deliver_by_s: None, service_s: 120.0, latest_s: None });
        }
        pts.push(city_point(&mut rng, 10_000.0));
        stops.push(Stop { order: o, kind: StopKind::Dropoff, size: 1, ready_at_s: 0.0, deliver_by_s: Some(rng.range(900.0, 3_600.0)), service_s: 60.0, latest_s: None });
    }
    (RouteProblem { start_s: 0.0, capacity: 4, stops, lateness_weight: 5.0, end: None }, pts)
}

/// Travel-time matrix (seconds) for [`route`]'s points.
pub fn travel_matrix(pts: &[LatLng]) -> Vec<Vec<f64>> {
    pts.iter().map(|a| pts.iter().map(|b| haversine_m(*a, *b) * 1.3 / 6.0).collect()).collect()
}
