//! Throughput figures, run on demand (`#[ignore]`): snapshot rows per second batched vs one by
//! one, and durable commits per second with latency percentiles under concurrent callers, on
//! both backends. Prints the figures; asserts only that batching is not slower.
//!
//! `cargo test --release -p hexfleet-persistence --test bench -- --ignored --nocapture --test-threads=1`

mod common;

use std::time::{Duration, Instant};

use common::{Ctx, Kind, courier, new_order};
use hexfleet_actors::store::{Store, Write};

const ROWS: usize = 20_000;
const ONE_BY_ONE_ROWS: usize = 2_000;
const COMMITS: usize = 5_000;
const CALLERS: usize = 64;

async fn figures(ctx: Ctx) {
    let store = ctx.open().await;
    // Batched: the snapshot buffer and one flush (multi-row statements in one transaction).
    let batch: Vec<_> = (0..ROWS).map(|i| courier("t1", &format!("c{i}"), 1, 50.0 + (i % 1000) as f64 * 1e-3)).collect();
    let started = Instant::now();
    store.snapshot_couriers(batch).unwrap();
    store.flush().await.unwrap();
    let batched = ROWS as f64 / started.elapsed().as_secs_f64();
    // One by one: one autocommitted upsert per row.
    let rows: Vec<_> = (0..ONE_BY_ONE_ROWS).map(|i| courier("t1", &format!("c{i}"), 2, 51.0)).collect();
    let started = Instant::now();
    store.upsert_couriers_one_by_one(&rows).await.unwrap();
    let single = ONE_BY_ONE_ROWS as f64 / started.elapsed().as_secs_f64();
    println!(
        "{:?}: courier snapshot upserts: batched {batched:.0} rows/s ({ROWS} rows), one by one {single:.0} rows/s ({ONE_BY_ONE_ROWS} rows), x{:.1}",
        ctx.kind,
        batched / single
    );

    // Durable commits (one order + one event each) from concurrent callers.
    let before = store.stats();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(COMMITS / CALLERS);
            for n in 0..COMMITS / CALLERS {
                let id = format!("o{caller}-{n}");
                let t = Instant::now();
                s.commit(vec![
                    Write::Order(new_order("t1", &id, 1)),
                    Write::Event(common::event("t1", hexfleet_actors::domain::EntityKind::Order, &id, "order.created", 1)),
                ])
                .await
                .unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let after = store.stats();
    println!(
        "{:?}: durable commits: {:.0}/s with {CALLERS} callers, p50 {:?}, p99 {:?}, {} commits in {} transactions",
        ctx.kind,
        lat.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        after.commits - before.commits,
        after.commit_transactions - before.commit_transactions
    );
    store.close().await.unwrap();
    assert!(batched > single, "batching should beat one-by-one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn bench_sqlite() {
    common::run(Kind::Sqlite, figures).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn bench_postgres() {
    common::run(Kind::Postgres, figures).await;
}
