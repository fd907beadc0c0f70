//! Benchmark reports that are not micro-benchmarks (those are the criterion suites in
//! `benches/benches/`). Each subcommand prints a table with the figures recorded in
//! `BENCHMARKS.md`; run in release mode:
//!
//! ```text
//! cargo run --release -p hexfleet-benches --bin hexfleet-bench -- assign
//! cargo run --release -p hexfleet-benches --bin hexfleet-bench -- redis
//! cargo run --release -p hexfleet-benches --bin hexfleet-bench -- dispatch
//! cargo run --release -p hexfleet-benches --bin hexfleet-bench -- orders
//! cargo run --release -p hexfleet-benches --bin hexfleet-bench -- restart --database-url postgres://postgres@127.0.0.1:5432/test
//! cargo run --release -p hexfleet-benches --bin hexfleet-bench -- memory
//! cargo run --release -p hexfleet-benches --bin hexfleet-bench -- lilim
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use hexfleet_actors::clock::TokioClock;
use hexfleet_actors::domain::{Actor as Who, CourierId, CourierStatus, Fix, OrderId, TenantId};
use hexfleet_actors::fleet::{CourierPatch, DispatchPolicy, NewOrder};
use hexfleet_actors::publish::NullPublisher;
use hexfleet_actors::store::{MemoryStore, Store};
use hexfleet_actors::{Fleet, FleetConfig, FleetDeps};
use hexfleet_benches::{Rng, assignment, city_point, fleet};
use hexfleet_geo::assign::{solve_greedy, solve_optimal};

#[derive(Parser)]
#[command(about = "hexfleet benchmark reports")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Optimal vs greedy assignment, 1,000 orders × 5,000 couriers, several seeds: time, cost,
    /// certified gap.
    Assign {
        #[arg(long, default_value_t = 5)]
        seeds: u64,
    },
    /// Redis GEOADD and GEOSEARCH … COUNT 10 on the same 100k points as the index benches.
    Redis {
        #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        url: String,
        #[arg(long, default_value_t = 64)]
        pipeline: usize,
    },
    /// Dispatch round time with 5,000 waiting orders and 20,000 couriers (in-process actors).
    Dispatch {
        #[arg(long, default_value_t = 20_000)]
        couriers: usize,
        #[arg(long, default_value_t = 5_000)]
        orders: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Durable order creation rate on one node while GPS ingest and dispatch run.
    Orders {
        /// `sqlite:…` file or `postgres://…`; default a fresh SQLite file in a temp dir.
        #[arg(long)]
        database_url: Option<String>,
        #[arg(long, default_value_t = 5_000)]
        couriers: usize,
        /// GPS fixes per second fed to the couriers meanwhile.
        #[arg(long, default_value_t = 20_000.0)]
        ingest_rate: f64,
        /// Concurrent order creators.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Resident memory per courier of the in-memory state (actor, trail, index, maps), without
    /// sockets: `couriers` couriers each fed `fixes` fixes (enough to fill the trail).
    Memory {
        #[arg(long, default_value_t = 50_000)]
        couriers: usize,
        #[arg(long, default_value_t = 150)]
        fixes: usize,
    },
    /// Restart time: seed a database with couriers and open orders, then time `Fleet::start`
    /// (load the snapshots, spawn every actor, rebuild the index) on it.
    Restart {
        /// `postgres://…` (a fresh database is created and dropped) or empty for a temp SQLite file.
        #[arg(long)]
        database_url: Option<String>,
        #[arg(long, default_value_t = 100_000)]
        couriers: usize,
        #[arg(long, default_value_t = 50_000)]
        orders: usize,
    },
    /// Li & Lim pickup-and-delivery instances (100 customers): insertion construction and
    /// large-neighbourhood search over the stop planner with hard windows; vehicles and
    /// distance against the best known, every solution validated independently.
    Lilim {
        /// Instance files (Li & Lim format). Default: lc101, lr101 and lrc101 from
        /// `../shared/data/pdptw/` beside the clone.
        files: Vec<PathBuf>,
        /// Best-known table (CSV with instance, routes, distance). Default:
        /// `best_known_lilim100.csv` beside each instance file.
        #[arg(long)]
        best_known: Option<PathBuf>,
        /// Search iterations per instance (vehicle reduction may use up to half).
        #[arg(long, default_value_t = 4_000)]
        iterations: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also print each solution's routes (node ids, depot omitted).
        #[arg(long)]
        routes: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.cmd {
        Cmd::Assign { seeds } => assign_report(seeds),
        Cmd::Redis { url, pipeline } => rt.block_on(redis_report(&url, pipeline)),
        Cmd::Dispatch { couriers, orders, reps } => rt.block_on(dispatch_report(couriers, orders, reps)),
        Cmd::Orders { database_url, couriers, ingest_rate, concurrency, seconds } => {
            rt.block_on(orders_report(database_url, couriers, ingest_rate, concurrency, seconds))
        }
        Cmd::Restart { database_url, couriers, orders } => rt.block_on(restart_report(database_url, couriers, orders)),
        Cmd::Memory { couriers, fixes } => rt.block_on(memory_report(couriers, fixes)),
        Cmd::Lilim { files, best_known, iterations, seed, routes } => lilim_report(files, best_known, iterations, seed, routes),
    }
}

fn lilim_report(files: Vec<PathBuf>, best_known: Option<PathBuf>, iterations: usize, seed: u64, print_routes: bool) -> anyhow::Result<()> {
    use hexfleet_benches::lilim::{self, Instance, Params};
    let files = if files.is_empty() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/pdptw");
        ["lc101", "lr101", "lrc101"].iter().map(|n| dir.join(format!("{n}.txt"))).collect()
    } else {
        files
    };
    println!("Li & Lim PDPTW: insertion construction + LNS ({iterations} iterations, seed {seed}); vehicles / distance; gap = distance vs best known");
    println!(
        "{:<8} {:>16} {:>16} {:>16} {:>16} {:>8} {:>7}  stop planner re-plan of the final routes",
        "instance", "best known", "construction", "after veh. red.", "final", "gap", "time s"
    );
    for file in &files {
        let name = file.file_stem().and_then(|s| s.to_str()).context("instance file name")?;
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {} (the Li & Lim data is expected in ../shared/data/pdptw/ beside the clone)", file.display()))?;
        let inst = Instance::parse(name, &text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let csv_path = best_known.clone().unwrap_or_else(|| file.with_file_name("best_known_lilim100.csv"));
        let bk = std::fs::read_to_string(&csv_path).ok().and_then(|csv| lilim::best_known(&csv, name));
        let started = Instant::now();
        let out = lilim::solve(&inst, Params { iterations, seed }).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let secs = started.elapsed().as_secs_f64();
        // The figures count only if an independent check accepts the routes.
        let dist = lilim::validate(&inst, &out.routes).map_err(|e| anyhow::anyhow!("{name}: INVALID solution: {e}"))?;
        anyhow::ensure!((dist - out.distance).abs() < 1e-6, "{name}: validator distance {dist} differs from the search's {}", out.distance);
        anyhow::ensure!(out.refused == 0, "{name}: stops::evaluate refused {} insertions the screening allowed", out.refused);
        let vd = |v: usize, d: f64| format!("{v} / {d:.2}");
        let r = out.replan;
        println!(
            "{name:<8} {:>16} {:>16} {:>16} {:>16} {:>8} {secs:>7.2}  {:.0} ms; heuristic feasible on {}/{} routes > {} stops, no later on {}/{}, shorter on {}{}",
            bk.map_or("?".into(), |b| vd(b.vehicles, b.distance)),
            vd(out.construction.0, out.construction.1),
            vd(out.reduced.0, out.reduced.1),
            vd(out.routes.len(), dist),
            bk.map_or("?".into(), |b| {
                // The table has 4 decimals: a rounding difference is no gap.
                let gap = if (dist - b.distance).abs() < 1e-3 { 0.0 } else { (dist - b.distance) / b.distance * 100.0 };
                format!("{gap:+.2}%")
            }),
            r.seconds * 1e3,
            r.heuristic_found,
            r.heuristic_routes,
            hexfleet_geo::stops::EXACT_MAX_STOPS,
            r.no_later,
            r.routes,
            r.shorter,
            if r.shorter > 0 { format!(" (-{:.2})", r.saved) } else { String::new() },
        );
        if print_routes {
            for (k, route) in out.routes.iter().enumerate() {
                println!("  route {:>2}: {}", k + 1, route.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "));
            }
        }
    }
    Ok(())
}

fn assign_report(seeds: u64) -> anyhow::Result<()> {
    println!("assignment 1000 orders x 5000 couriers, 15 nearest candidates per order");
    println!("{:>4} {:>10} {:>10} {:>14} {:>14} {:>12} {:>10} {:>10}", "seed", "opt ms", "greedy ms", "optimal cost", "lower bound", "greedy cost", "greedy gap", "opt gap");
    for seed in 1..=seeds {
        let p = assignment(1_000, 5_000, 15, seed);
        let t = Instant::now();
        let opt = solve_optimal(&p);
        let opt_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let gr = solve_greedy(&p);
        let gr_ms = t.elapsed().as_secs_f64() * 1e3;
        // Both answers re-priced independently of the solvers.
        let oc = p.evaluate(&opt.courier_of).context("optimal answer infeasible")?;
        let gc = p.evaluate(&gr.courier_of).context("greedy answer infeasible")?;
        println!(
            "{seed:>4} {opt_ms:>10.2} {gr_ms:>10.2} {oc:>14.1} {:>14.1} {gc:>12.1} {:>9.3}% {:>9.4}%",
            opt.lower_bound,
            (gc - oc) / oc * 100.0,
            (oc - opt.lower_bound) / oc * 100.0
        );
    }
    Ok(())
}

async fn redis_report(url: &str, pipeline: usize) -> anyhow::Result<()> {
    let client = redis::Client::open(url).context("redis url")?;
    let mut con = tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection()).await.context("redis connect timed out")??;
    // A wide GEOSEARCH on 100k points takes milliseconds each; a pipeline of them is longer
    // than the client's default response timeout.
    con.set_response_timeout(Duration::from_secs(60));
    let key = format!("hexfleet:bench:{}:{}", std::process::id(), hexfleet_benches::Rng::new(7).f().to_bits());
    let entries = fleet(100_000, 1);
    let mut rng = Rng::new(2);
    let queries: Vec<_> = (0..20_000).map(|_| city_point(&mut rng, 30_000.0)).collect();
    let run = async {
        // GEOADD: the 100k points, pipelined, then moved again (the update path).
        let t = Instant::now();
        for chunk in entries.chunks(pipeline) {
            let mut p = redis::pipe();
            for e in chunk {
                p.cmd("GEOADD").arg(&key).arg(e.pos.lng).arg(e.pos.lat).arg(e.key).ignore();
            }
            p.query_async::<()>(&mut con).await?;
        }
        let add = t.elapsed();
        let t = Instant::now();
        for (chunk, qs) in entries.chunks(pipeline).zip(queries.chunks(pipeline).cycle()) {
            let mut p = redis::pipe();
            for (e, q) in chunk.iter().zip(qs) {
                p.cmd("GEOADD").arg(&key).arg(q.lng).arg(q.lat).arg(e.key).ignore();
            }
            p.query_async::<()>(&mut con).await?;
        }
        let mv = t.elapsed();
        // GEOSEARCH … ASC COUNT 10 (nearest 10): a 2 km radius (what a dispatcher would ask;
        // ~1,400 points inside) one round trip each and pipelined, and a 30 km radius (the whole
        // city: the same question as the unbounded nearest-10 of the index benches).
        let mut searches = Vec::new();
        for (radius, n, pipe) in [(2_000, 5_000, 1), (2_000, 20_000, pipeline), (30_000, 300, 1)] {
            let t = Instant::now();
            for qs in queries[..n].chunks(pipe) {
                let mut p = redis::pipe();
                for q in qs {
                    p.cmd("GEOSEARCH").arg(&key).arg("FROMLONLAT").arg(q.lng).arg(q.lat).arg("BYRADIUS").arg(radius).arg("m").arg("ASC").arg("COUNT").arg(10);
                }
                let r: Vec<Vec<String>> = p.query_async(&mut con).await?;
                assert!(r.iter().all(|x| x.len() == 10), "10 results each");
            }
            searches.push((radius, n, pipe, t.elapsed()));
        }
        anyhow::Ok((add, mv, searches))
    };
    let res = run.await;
    let _: Result<i64, _> = redis::cmd("DEL").arg(&key).query_async(&mut con).await;
    let (add, mv, searches) = res?;
    let per = |d: Duration, n: usize| d.as_secs_f64() * 1e6 / n as f64;
    println!("redis {url}: 100k points, pipeline {pipeline}");
    println!("GEOADD insert          {:>8.2} us/op  ({:.0} ops/s)", per(add, entries.len()), entries.len() as f64 / add.as_secs_f64());
    println!("GEOADD move            {:>8.2} us/op  ({:.0} ops/s)", per(mv, entries.len()), entries.len() as f64 / mv.as_secs_f64());
    for (radius, n, pipe, d) in searches {
        println!("GEOSEARCH {radius:>5} m COUNT 10 {:>8.2} us/op  ({n} queries, pipeline {pipe})", per(d, n));
    }
    Ok(())
}

/// A fleet on the in-memory store with `couriers` available couriers spread over the city.
async fn fleet_with(store: Arc<dyn Store>, couriers: usize, config: FleetConfig) -> anyhow::Result<(Fleet, TenantId, Vec<CourierId>)> {
    let f = Fleet::start(FleetDeps { store, publisher: Arc::new(NullPublisher), clock: Arc::new(TokioClock::new()), config }).await?;
    let t = TenantId::new("bench");
    let mut rng = Rng::new(11);
    let now = f.now_ms();
    let mut ids = Vec::with_capacity(couriers);
    for i in 0..couriers {
        let c = CourierId::new(format!("c{i}"));
        f.upsert_courier(&t, &c, CourierPatch { capacity: Some(1 + (i % 3) as u16), ..Default::default() }, &Who::System).await?;
        f.set_status(&t, &c, CourierStatus::Available)?;
        f.ingest(&t, &c, vec![Fix { pos: city_point(&mut rng, 30_000.0), ts: now, speed: None, heading: None, acc: None }])?;
        ids.push(c);
    }
    // Wait until the index snapshot has them all.
    let probe = city_point(&mut Rng::new(1), 1.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while f.nearby(&t, probe, couriers, None).await.len() < couriers {
        anyhow::ensure!(Instant::now() < deadline, "couriers never all reached the index");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((f, t, ids))
}

async fn dispatch_report(couriers: usize, orders: usize, reps: usize) -> anyhow::Result<()> {
    // The second row prices with learned speeds: a model covering the city, so every route
    // problem looks its points up in it.
    for (policy, learned) in [(DispatchPolicy::Optimal, false), (DispatchPolicy::Optimal, true), (DispatchPolicy::Greedy, false)] {
        let config = FleetConfig {
            dispatch_tick: Duration::from_secs(3600),
            dispatch_policy: policy,
            speed_publish: Duration::from_millis(50),
            ..Default::default()
        };
        let t0 = Instant::now();
        let (f, t, _) = fleet_with(Arc::new(MemoryStore::new()), couriers, config).await?;
        let mut rng = Rng::new(12);
        for i in 0..orders {
            let new = NewOrder { id: Some(OrderId::new(format!("o{i}"))), pickup: city_point(&mut rng, 30_000.0), dropoff: city_point(&mut rng, 30_000.0), size: 1, ready_at: None, deliver_by: None };
            f.create_order(&t, new, &Who::System).await?;
        }
        if learned {
            teach_speeds(&f, &t, &mut rng).await?;
        }
        let setup = t0.elapsed();
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..reps {
            let p = f.dispatch_preview(&t).await;
            times.push(p.elapsed.as_secs_f64() * 1e3);
            last = Some(p);
        }
        let p = last.context("no reps")?;
        times.sort_by(f64::total_cmp);
        println!(
            "dispatch round {:>7}{}: {} waiting orders x {} couriers: {} candidate couriers, {} pairs priced, {} matched, cost {:.0} s (lower bound {:.0}); round time median {:.1} ms, min {:.1} ms, max {:.1} ms over {reps} (setup {:.1} s)",
            policy.as_str(),
            if learned { " (learned speeds)" } else { "" },
            p.orders,
            couriers,
            p.couriers,
            p.pairs,
            p.matched,
            p.cost_s,
            p.lower_bound_s,
            times[times.len() / 2],
            times[0],
            times[times.len() - 1],
            setup.as_secs_f64()
        );
        f.shutdown().await?;
    }
    Ok(())
}

/// Feeds the fleet's speed learner 100k movements spread over the city and all hours (each
/// 10 s at 2–12 m/s), and waits until the model is published.
async fn teach_speeds(f: &Fleet, t: &TenantId, rng: &mut Rng) -> anyhow::Result<()> {
    use hexfleet_actors::domain::Vehicle;
    use hexfleet_actors::speeds::SpeedSample;
    let t0: i64 = 1_764_000_000_000;
    for chunk in 0..20 {
        for i in 0..5_000i64 {
            let from = city_point(rng, 30_000.0);
            let v = rng.range(2.0, 12.0);
            let to = hexfleet_geo::LatLng::new(from.lat + v * 10.0 / 111_195.0, from.lng)?;
            let ts = t0 + (chunk * 5_000 + i) * 7_919 % (7 * 24 * 3_600_000);
            f.ctx().speeds.observe(SpeedSample { tenant: t.clone(), vehicle: Vehicle::Bike, from, from_ms: ts, to, to_ms: ts + 10_000 });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.ctx().speeds.model(t, Vehicle::Bike).is_none_or(|m| m.len() < 1_000) {
        anyhow::ensure!(Instant::now() < deadline, "the speed model was not published");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn orders_report(database_url: Option<String>, couriers: usize, ingest_rate: f64, concurrency: usize, seconds: u64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("hexfleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (url, admin) = fresh_database(database_url, &dir.join("bench.db")).await?;
    let store = hexfleet_persistence::SqlStore::open(&url, Default::default()).await.context("opening the store")?;
    let config = FleetConfig { auto_accept: true, ..Default::default() };
    let (f, t, ids) = fleet_with(Arc::new(store), couriers, config).await?;
    let stop = Arc::new(AtomicBool::new(false));
    // GPS ingest at `ingest_rate`: each courier steps ~5 m per fix.
    let fixes = Arc::new(AtomicU64::new(0));
    let ingest = {
        let (f, t, ids, stop, fixes) = (f.clone(), t.clone(), ids.clone(), stop.clone(), fixes.clone());
        tokio::spawn(async move {
            let mut rng = Rng::new(13);
            let mut pos: Vec<_> = ids.iter().map(|_| city_point(&mut rng, 30_000.0)).collect();
            let started = Instant::now();
            let mut sent = 0u64;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * ingest_rate) as u64;
                while sent < due {
                    let k = i % ids.len();
                    i += 1;
                    let p = pos[k];
                    let np = hexfleet_geo::LatLng::new(p.lat + 0.00004, p.lng).unwrap_or(p);
                    pos[k] = np;
                    let _ = f.ingest(&t, &ids[k], vec![Fix { pos: np, ts: f.now_ms(), speed: Some(5.0), heading: None, acc: None }]);
                    sent += 1;
                }
                fixes.store(sent, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let hist = Arc::new(parking_lot::Mutex::new(Histogram::<u64>::new(3)?));
    let created = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (f, t, hist, created, errors) = (f.clone(), t.clone(), hist.clone(), created.clone(), errors.clone());
        tasks.spawn(async move {
            let mut rng = Rng::new(100 + w as u64);
            while Instant::now() < deadline {
                let new = NewOrder { id: None, pickup: city_point(&mut rng, 30_000.0), dropoff: city_point(&mut rng, 30_000.0), size: 1, ready_at: None, deliver_by: None };
                let t0 = Instant::now();
                match f.create_order(&t, new, &Who::System).await {
                    Ok(_) => {
                        hist.lock().record(t0.elapsed().as_micros() as u64).ok();
                        created.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("order create failed: {e:?}");
                        }
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = ingest.await;
    let h = hist.lock().clone();
    let n = created.load(Ordering::Relaxed);
    println!(
        "orders on {}: {n} durable creates in {elapsed:.1} s = {:.0} orders/s with {concurrency} concurrent clients, {} errors; create latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; meanwhile {} GPS fixes ingested ({:.0}/s) and dispatch (auto-accept) ran every 2 s over {couriers} couriers",
        if url.starts_with("postgres") { "PostgreSQL" } else { "SQLite" },
        n as f64 / elapsed,
        errors.load(Ordering::Relaxed),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.max() as f64 / 1e3,
        fixes.load(Ordering::Relaxed),
        fixes.load(Ordering::Relaxed) as f64 / elapsed,
    );
    f.shutdown().await?;
    drop(f);
    drop_database(admin).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A fresh PostgreSQL database next to `url` (dropped by [`drop_database`]), or the SQLite
/// file `sqlite` when no PostgreSQL URL is given.
async fn fresh_database(url: Option<String>, sqlite: &std::path::Path) -> anyhow::Result<(String, Option<(sqlx::PgPool, String)>)> {
    Ok(match url {
        Some(u) if u.starts_with("postgres") => {
            let name = format!("hexfleet_bench_{}", std::process::id());
            let admin = sqlx::PgPool::connect(&u).await.context("connecting to PostgreSQL")?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await?;
            let base = u.rsplit_once('/').map_or(u.as_str(), |(b, _)| b).to_owned();
            (format!("{base}/{name}"), Some((admin, name)))
        }
        Some(u) => (u, None),
        None => (format!("sqlite:{}", sqlite.display()), None),
    })
}

async fn drop_database(admin: Option<(sqlx::PgPool, String)>) {
    if let Some((admin, name)) = admin {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&admin).await;
    }
}

async fn restart_report(database_url: Option<String>, couriers: usize, orders: usize) -> anyhow::Result<()> {
    use hexfleet_actors::domain::{CourierRecord, Order, OrderState, Vehicle};
    use hexfleet_actors::store::Write;
    let dir = std::env::temp_dir().join(format!("hexfleet-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (url, admin) = fresh_database(database_url, &dir.join("restart.db")).await?;
    let t = TenantId::new("bench");
    let now = hexfleet_actors::clock::Clock::now_ms(&TokioClock::new());
    let seed_started = Instant::now();
    {
        let store = hexfleet_persistence::SqlStore::open(&url, Default::default()).await?;
        let mut rng = Rng::new(21);
        let recs: Vec<CourierRecord> = (0..couriers)
            .map(|i| {
                let mut r = CourierRecord::new(t.clone(), CourierId::new(format!("c{i}")), now);
                r.vehicle = Vehicle::Bike;
                r.capacity = 3;
                r.status = CourierStatus::Available;
                r.last_fix = Some(Fix { pos: city_point(&mut rng, 30_000.0), ts: now, speed: Some(4.0), heading: None, acc: None });
                r
            })
            .collect();
        for chunk in recs.chunks(5_000) {
            loop {
                match store.snapshot_couriers(chunk.to_vec()) {
                    Ok(()) => break,
                    Err(_) => store.flush().await?,
                }
            }
        }
        store.flush().await?;
        let mut batch = Vec::new();
        for i in 0..orders {
            // A third assigned to a courier, the rest waiting.
            let assigned = i % 3 == 0;
            let o = Order {
                tenant: t.clone(),
                id: OrderId::new(format!("o{i}")),
                pickup: city_point(&mut rng, 30_000.0),
                dropoff: city_point(&mut rng, 30_000.0),
                size: 1,
                ready_at: None,
                deliver_by: None,
                state: if assigned { OrderState::Assigned } else { OrderState::Created },
                courier: assigned.then(|| CourierId::new(format!("c{}", i % couriers))),
                offer: None,
                declined: Vec::new(),
                assignment: None,
                created_at: now,
                updated_at: now,
                version: u32::from(assigned),
                released_at: None,
            };
            batch.push(Write::Order(o));
            if batch.len() == 1_000 {
                store.commit(std::mem::take(&mut batch)).await?;
            }
        }
        if !batch.is_empty() {
            store.commit(batch).await?;
        }
        store.close().await?;
    }
    let seeded = seed_started.elapsed();
    // The restart: open the store, rebuild the fleet.
    let started = Instant::now();
    let store = hexfleet_persistence::SqlStore::open(&url, Default::default()).await?;
    let opened = started.elapsed();
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), ..Default::default() };
    let f = Fleet::start(FleetDeps { store: Arc::new(store), publisher: Arc::new(NullPublisher), clock: Arc::new(TokioClock::new()), config }).await?;
    let total = started.elapsed();
    let (nc, no) = f.counts();
    let probe = city_point(&mut Rng::new(1), 1.0);
    let indexed = f.nearby(&t, probe, couriers, None).await.len();
    println!(
        "restart on {}: {nc} couriers and {no} open orders back in {:.2} s (store open + migrations {:.2} s, load + actors + index {:.2} s); {indexed} couriers in the index; seeding took {:.1} s",
        if url.starts_with("postgres") { "PostgreSQL" } else { "SQLite" },
        total.as_secs_f64(),
        opened.as_secs_f64(),
        (total - opened).as_secs_f64(),
        seeded.as_secs_f64()
    );
    anyhow::ensure!(nc == couriers && no == orders, "not everything came back");
    f.shutdown().await?;
    drop(f);
    drop_database(admin).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Resident set size of this process in KiB.
fn rss_kib() -> anyhow::Result<u64> {
    hexfleet_sim::load::read_rss_kib(std::process::id())
}

async fn memory_report(couriers: usize, fixes: usize) -> anyhow::Result<()> {
    // The SQLite store, as in production: its memory is a bounded page cache, not per courier
    // (the in-memory test store keeps every snapshot and history row, which would count here).
    let dir = std::env::temp_dir().join(format!("hexfleet-bench-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let url = format!("sqlite:{}", dir.join("mem.db").display());
    let store = hexfleet_persistence::SqlStore::open(&url, Default::default()).await.context("opening the store")?;
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), ..Default::default() };
    let trail_len = config.trail_len;
    let f = Fleet::start(FleetDeps { store: Arc::new(store), publisher: Arc::new(NullPublisher), clock: Arc::new(TokioClock::new()), config }).await?;
    let t = TenantId::new("bench");
    let mut rng = Rng::new(21);
    let now = f.now_ms();
    // Warm up the runtime, the store and the allocator with a few couriers before the baseline.
    for i in 0..200 {
        let c = CourierId::new(format!("warm{i}"));
        f.upsert_courier(&t, &c, CourierPatch::default(), &Who::System).await?;
        f.ingest(&t, &c, vec![Fix { pos: city_point(&mut rng, 30_000.0), ts: now, speed: None, heading: None, acc: None }])?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib()?;
    let t0 = Instant::now();
    let mut ids = Vec::with_capacity(couriers);
    let mut starts = Vec::with_capacity(couriers);
    for i in 0..couriers {
        let c = CourierId::new(format!("c{i}"));
        f.upsert_courier(&t, &c, CourierPatch { capacity: Some(2), ..Default::default() }, &Who::System).await?;
        f.set_status(&t, &c, CourierStatus::Available)?;
        starts.push(city_point(&mut rng, 30_000.0));
        ids.push(c);
    }
    let created = rss_kib()?;
    // Fixes in batches of 10 (as a `locs` frame), 1 s and ~5 m apart, heading north-east.
    let step = 5.0 / 111_195.0;
    for b in 0..fixes.div_ceil(10) {
        for (i, c) in ids.iter().enumerate() {
            let batch: Vec<Fix> = (b * 10..((b + 1) * 10).min(fixes))
                .map(|k| {
                    let p = starts[i];
                    let pos = hexfleet_geo::LatLng::new(p.lat + step * k as f64, p.lng + step * k as f64).expect("inside the city");
                    Fix { pos, ts: now + k as i64 * 1_000, speed: Some(5.0), heading: Some(45.0), acc: Some(5.0) }
                })
                .collect();
            f.ingest(&t, c, batch)?;
        }
        // Let the actors drain before the next round so mailboxes do not count as state.
        let last = ids.last().context("no couriers")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while f.trail(&t, last).await?.len() < ((b + 1) * 10).min(fixes).min(trail_len) {
            anyhow::ensure!(Instant::now() < deadline, "fixes were not applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Every courier's trail is full: the state is in steady shape.
    for c in &ids {
        let n = f.trail(&t, c).await?.len();
        anyhow::ensure!(n == fixes.min(trail_len), "courier {c} has {n} fixes in its trail");
    }
    let after = rss_kib()?;
    // The floor: what an idle ractor actor costs (task, mailbox and signal channels),
    // measured after the fleet so freed memory cannot flatter the fleet's figure.
    let idle_kib = {
        struct Idle;
        impl ractor::Actor for Idle {
            type Msg = ();
            type State = ();
            type Arguments = ();
            async fn pre_start(&self, _: ractor::ActorRef<()>, (): ()) -> Result<(), ractor::ActorProcessingErr> {
                Ok(())
            }
        }
        let n = couriers.min(20_000);
        let r0 = rss_kib()?;
        let mut refs = Vec::with_capacity(n);
        for _ in 0..n {
            refs.push(ractor::Actor::spawn(None, Idle, ()).await.context("spawning an idle actor")?);
        }
        let r1 = rss_kib()?;
        for (a, h) in refs {
            a.stop(None);
            let _ = h.await;
        }
        (r1 - r0) as f64 / n as f64
    };
    let n = couriers as f64;
    println!("memory: {couriers} couriers, {fixes} fixes each (trail {trail_len}), {:.1} s", t0.elapsed().as_secs_f64());
    println!("  rss before {before} KiB, couriers created {created} KiB, trails full {after} KiB");
    println!("  per courier: {:.2} KiB created (actor, record, maps), {:.2} KiB after fixes (with trail, index, cells)", (created - before) as f64 / n, (after - before) as f64 / n);
    println!("  an idle ractor actor alone: {idle_kib:.2} KiB");
    println!("  size_of::<Fix>() = {} bytes (the trail packs it in 24)", std::mem::size_of::<Fix>());
    f.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
