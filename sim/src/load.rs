//! The load generator: ramps to a target number of courier sockets (spread over several
//! 127.0.0.x source addresses) and a target GPS update rate, watches the stream through
//! console sockets (and optionally tracking sockets), and reports throughput, update → watcher
//! latency (hdrhistogram; the send time travels as `ts`), errors, disconnects and the server's
//! resident memory per connection. Optionally writes the same update stream to Redis with
//! pipelined `GEOADD` for comparison.
//!
//! Shape: one reader task per socket (idle most of the time), and a few sender shards, each
//! owning the write halves of many sockets and pacing its share of the rate on a 1 ms tick.
//! Everything is bounded: connect attempts by count and timeout, the run by `duration`, the
//! teardown by fixed grace periods.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::geomath::{offset, BBox, LatLng};
use crate::movement::{random_point, Vehicle};
use crate::net::{connect_ws, lean_ws_config, post_json, Server, Ws};
use crate::protocol::{ConsoleMsg, CourierMsg, CourierStatus, ServerMsg};
use crate::token::TokenMint;

/// What to load the server with.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub base_url: String,
    /// Where courier sockets connect (`ws://host:port`, the server's `--ingest-listen`);
    /// `None`: `base_url`, the HTTP port.
    pub courier_url: Option<String>,
    pub jwt_secret: String,
    pub tenant: String,
    /// Courier sockets to open.
    pub couriers: usize,
    /// Target GPS updates per second, all couriers together.
    pub rate: f64,
    /// Measured run time after all sockets are connected.
    pub duration: Duration,
    /// The rate climbs linearly from 0 to `rate` over this part of `duration`.
    pub ramp: Duration,
    /// Console watchers (`/v1/ws/console`), each subscribed to `watch_bbox`.
    pub watchers: usize,
    /// Tracking watchers: that many couriers go available, get an order each, and a customer
    /// watches it on `/v1/ws/track/{id}` (live, unbatched `courier` messages).
    pub track: usize,
    pub bbox: [f64; 4],
    /// The console view; `None` watches the whole `bbox`.
    pub watch_bbox: Option<[f64; 4]>,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N.
    pub source_addrs: u8,
    /// Handshakes in flight at once while ramping up connections.
    pub connect_concurrency: usize,
    /// Sender tasks (each drives `couriers / shards` sockets).
    pub shards: usize,
    pub connect_timeout: Duration,
    /// Server process to read `VmRSS` of (from `/proc/PID/status`).
    pub server_pid: Option<u32>,
    /// `redis://127.0.0.1:6379`: also write the stream to Redis with pipelined `GEOADD`.
    pub redis_url: Option<String>,
    /// `GEOADD`s per pipeline.
    pub redis_pipeline: usize,
    pub seed: u64,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Create every courier over HTTP (`PUT /v1/couriers/{id}`) before connecting, and read
    /// the server's memory in between, so the connection figure counts sockets alone.
    pub preregister: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080".to_owned(),
            courier_url: None,
            jwt_secret: crate::DEFAULT_JWT_SECRET.to_owned(),
            tenant: "demo".to_owned(),
            couriers: 1000,
            rate: 1000.0,
            duration: Duration::from_secs(30),
            ramp: Duration::from_secs(5),
            watchers: 4,
            track: 0,
            bbox: crate::DEFAULT_BBOX,
            watch_bbox: None,
            source_addrs: 8,
            connect_concurrency: 256,
            shards: 4,
            connect_timeout: Duration::from_secs(15),
            server_pid: None,
            redis_url: None,
            redis_pipeline: 64,
            seed: 1,
            progress: true,
            preregister: false,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// Redis `GEOADD` comparison figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RedisReport {
    pub updates: u64,
    pub pipeline: usize,
    pub connections: usize,
    pub seconds: f64,
    pub updates_per_s: f64,
    pub error: Option<String>,
}

/// Server memory (`VmRSS`, KiB) at the steps of the run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MemoryReport {
    pub pid: u32,
    pub rss_before_kib: u64,
    /// With `--preregister`: after every courier was created over HTTP, before any socket.
    pub rss_registered_kib: Option<u64>,
    pub rss_connected_kib: u64,
    pub rss_after_updates_kib: u64,
    /// (connected − before) / open sockets (couriers + watchers); with `--preregister`,
    /// (connected − registered) / open sockets: the sockets alone.
    pub kib_per_connection: f64,
    /// With `--preregister`: (registered − before) / couriers: a courier's actor, record and
    /// maps before its first position.
    pub kib_per_courier_registered: Option<f64>,
    /// (after updates − before) / couriers: socket plus live state of one courier.
    pub kib_per_courier: f64,
    /// (after updates − connected) / couriers: what sending positions added.
    pub kib_per_courier_state: f64,
}

/// The outcome of a load run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LoadReport {
    pub couriers_target: usize,
    pub couriers_connected: u64,
    pub watchers_connected: u64,
    pub trackers_connected: u64,
    pub source_addrs: u8,
    pub connect_seconds: f64,
    pub connect_errors: u64,
    pub target_rate: f64,
    pub duration_s: f64,
    /// `loc` frames written.
    pub sent: u64,
    pub sent_per_s: f64,
    /// Sent in the part of the run after the ramp, per second.
    pub sent_per_s_steady: f64,
    pub send_errors: u64,
    /// Sockets the server closed or that broke during the run.
    pub disconnects: u64,
    /// `error` frames the server sent to couriers.
    pub server_error_frames: u64,
    /// Frames received by console and tracking watchers.
    pub watcher_frames: u64,
    /// Courier positions delivered to watchers (items in console batches + tracking `courier`).
    pub watcher_deliveries: u64,
    pub watcher_deliveries_per_s: f64,
    /// Deliveries of positions sent after the ramp, per second of sending after the ramp.
    pub watcher_deliveries_per_s_steady: f64,
    /// Positions a watcher never got because the server conflated them (a newer one of the
    /// same courier replaced them); each counts in the latency up to the delivery that
    /// replaced it.
    pub superseded: u64,
    /// Updates the senders did not send because they were more than 100 ms behind schedule
    /// (the generator short of CPU, or a socket the server stopped reading). They are in no
    /// latency figure: a stall shows here and in `behind_max_ms`, not in the percentiles.
    pub behind_schedule: u64,
    /// The furthest behind schedule a sender was when it skipped updates (ms).
    pub behind_max_ms: u64,
    /// Update → console watcher latency (includes the console's batching interval), from each
    /// update's scheduled send time to the delivery that showed it or a newer position of its
    /// courier, for updates scheduled after the ramp.
    pub console_latency: Latency,
    /// Update → tracking watcher latency (live stream).
    pub track_latency: Latency,
    pub memory: Option<MemoryReport>,
    /// CPU seconds this load generator used during the measured run (user + system).
    pub generator_cpu_s: Option<f64>,
    /// CPU seconds the server (`--server-pid`) used during the measured run.
    pub server_cpu_s: Option<f64>,
    pub redis: Option<RedisReport>,
    /// Updates/s written to hexfleet divided by Redis `GEOADD` updates/s.
    pub ratio_vs_redis: Option<f64>,
}

#[derive(Debug, Default)]
struct Counters {
    connected: AtomicU64,
    watchers: AtomicU64,
    trackers: AtomicU64,
    connect_errors: AtomicU64,
    sent: AtomicU64,
    send_errors: AtomicU64,
    disconnects: AtomicU64,
    server_errors: AtomicU64,
    watcher_frames: AtomicU64,
    watcher_deliveries: AtomicU64,
    /// Watchers record latency only for updates scheduled in `[measure_from_ms,
    /// measure_to_ms]` (wall ms): after the ramp, before the senders stop.
    measure_from_ms: AtomicI64,
    measure_to_ms: AtomicI64,
    deliveries_steady: AtomicU64,
    superseded: AtomicU64,
    behind_schedule: AtomicU64,
    behind_max_ms: AtomicU64,
    /// Send times of each courier's last fixes.
    sends: std::sync::OnceLock<SendLog>,
    /// Sockets closing is expected after this is set.
    closing: AtomicBool,
}

/// How many of a courier's last send times the [`SendLog`] keeps.
const SEND_LOG: usize = 64;

/// The send times of each courier's last [`SEND_LOG`] fixes, written by the senders and read
/// by the watchers. A watcher that gets a courier's position learns which earlier fixes it
/// never got (the server conflated them: positions are latest-wins) and records their latency
/// up to this delivery, which is when its view caught up with them. Without this, latency
/// would be measured on the survivors only, and conflation would hide delays.
struct SendLog {
    rings: Vec<([AtomicI64; SEND_LOG], AtomicUsize)>,
}

impl std::fmt::Debug for SendLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendLog").field("couriers", &self.rings.len()).finish()
    }
}

impl SendLog {
    fn new(couriers: usize) -> Self {
        SendLog { rings: (0..couriers).map(|_| (std::array::from_fn(|_| AtomicI64::new(i64::MIN)), AtomicUsize::new(0))).collect() }
    }

    fn push(&self, courier: usize, ts: i64) {
        if let Some((ring, next)) = self.rings.get(courier) {
            ring[next.fetch_add(1, Ordering::Relaxed) % SEND_LOG].store(ts, Ordering::Relaxed);
        }
    }

    /// Calls `f` on each logged send time of `courier` in `(after, before)`.
    fn between(&self, courier: usize, after: i64, before: i64, mut f: impl FnMut(i64)) {
        if let Some((ring, _)) = self.rings.get(courier) {
            for t in ring.iter().map(|t| t.load(Ordering::Relaxed)).filter(|t| *t > after && *t < before) {
                f(t);
            }
        }
    }
}

/// The run index of a load courier from its id ([`load_courier_id`]).
fn courier_index(id: &str) -> Option<usize> {
    if let Some(n) = id.strip_prefix("load-c") {
        return n.parse::<usize>().ok()?.checked_sub(1);
    }
    id.strip_prefix("load-t")?.rsplit_once('-')?.1.parse().ok()
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 10 min, 3 significant figures.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// Raises the open-file limit as far as allowed; returns the new soft limit.
pub fn raise_fd_limit(want: u64) -> u64 {
    use rlimit::Resource;
    if rlimit::setrlimit(Resource::NOFILE, want, want).is_err() {
        let _ = rlimit::increase_nofile_limit(want);
    }
    rlimit::getrlimit(Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(0)
}

/// CPU time (user + system) `pid` has used, in seconds, from `/proc/PID/stat`.
pub fn read_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name (which may contain spaces): utime is the
    // 14th field of the line, stime the 15th, in clock ticks (100 per second on Linux).
    let rest = s.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).context("malformed /proc stat");
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// Resident set size of `pid` in KiB, from `/proc/PID/status`.
pub fn read_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc status")
}

/// One simulated courier in the load run: cheap straight-line motion, bouncing off the box.
#[derive(Debug, Clone)]
struct LoadCourier {
    pos: LatLng,
    heading: f64,
    speed: f64,
    last: Instant,
}

impl LoadCourier {
    /// The run's `n` couriers, their start and speed drawn from `seed` (the Redis comparison
    /// draws the same fleet).
    fn fleet(n: usize, bbox: &BBox, seed: u64, now: Instant) -> Vec<LoadCourier> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_f1ee7);
        (0..n)
            .map(|_| {
                let vehicle = if rng.random_bool(0.7) { Vehicle::Bike } else { Vehicle::Car };
                let (lo, hi) = vehicle.speed_range();
                LoadCourier {
                    pos: random_point(&mut rng, bbox),
                    heading: [0.0, 90.0, 180.0, 270.0][rng.random_range(0..4)],
                    speed: rng.random_range(lo..=hi),
                    last: now,
                }
            })
            .collect()
    }

    fn advance(&mut self, now: Instant, bbox: &BBox, rng: &mut StdRng) {
        let dt = now.duration_since(self.last).as_secs_f64().min(60.0);
        self.last = now;
        self.advance_by(dt, bbox, rng);
    }

    /// Straight ahead for `dt` seconds, turning at random "corners", bouncing off the box.
    fn advance_by(&mut self, dt: f64, bbox: &BBox, rng: &mut StdRng) {
        if rng.random_bool(0.02) {
            // Turn at a corner.
            self.heading = (self.heading + if rng.random_bool(0.5) { 90.0 } else { 270.0 }) % 360.0;
        }
        let mut next = offset(self.pos, self.heading, self.speed * dt);
        if !bbox.contains(next) {
            self.heading = (self.heading + 180.0) % 360.0;
            next = bbox.clamp(next);
        }
        self.pos = next;
    }

    fn write_loc(&self, buf: &mut String, ts: i64) {
        buf.clear();
        let _ = write!(
            buf,
            r#"{{"t":"loc","lat":{:.7},"lng":{:.7},"ts":{ts},"speed":{:.1},"heading":{:.0}}}"#,
            self.pos.lat, self.pos.lng, self.speed, self.heading
        );
    }
}

type WsSink = SplitSink<Ws, Message>;
type WsRead = SplitStream<Ws>;

struct Slot {
    sink: WsSink,
    state: LoadCourier,
    alive: bool,
    /// The courier's index in the run (`0..couriers`).
    idx: usize,
}

/// The id of the run's `i`-th courier (from 0). The first `track` couriers get ids of their
/// own run (`load-t{run_ms}-{i}`): they take orders, and a courier left holding orders by an
/// earlier run would not be offered new ones. The rest keep stable ids (`load-c00001`, …) so
/// repeated runs do not grow the server's fleet.
pub fn load_courier_id(i: usize, track: usize, run_ms: i64) -> String {
    if i < track { format!("load-t{run_ms}-{i}") } else { format!("load-c{:05}", i + 1) }
}

/// Replies a reader task asks its shard to send (offer replies and statuses).
type Control = (usize, String);

/// Messages per second the server takes from one socket on average (its `ws::RATE_PER_S`; a
/// gateway test keeps the two equal).
pub const SERVER_RATE_PER_SOCKET: f64 = 50.0;

/// Runs the load test. Stops by itself after connecting + `duration` (+ bounded teardown), or
/// early on `shutdown`.
pub async fn run_load(cfg: LoadConfig, shutdown: CancellationToken) -> anyhow::Result<LoadReport> {
    let server = Server::parse(&cfg.base_url)?;
    let courier_server = match &cfg.courier_url {
        Some(u) => Server::parse(u)?,
        None => server.clone(),
    };
    let bbox = BBox::from_array(cfg.bbox);
    anyhow::ensure!(bbox.is_valid(), "invalid bbox {:?}", cfg.bbox);
    anyhow::ensure!(cfg.rate >= 0.0 && cfg.rate.is_finite(), "rate must be a finite number >= 0");
    anyhow::ensure!(cfg.track <= cfg.couriers, "--track cannot exceed --couriers");
    // One `loc` frame per update: past the server's per-socket limit the excess is dropped
    // (one `rate_limited` error per burst), and `sent/s` and the Redis ratio would count it.
    anyhow::ensure!(
        cfg.couriers == 0 || cfg.rate / cfg.couriers as f64 <= SERVER_RATE_PER_SOCKET,
        "--rate {} over {} couriers is {:.0} updates/s per socket; the server takes at most {SERVER_RATE_PER_SOCKET} (add couriers)",
        cfg.rate,
        cfg.couriers,
        cfg.rate / cfg.couriers as f64
    );
    let watch_bbox = cfg.watch_bbox.unwrap_or(cfg.bbox);
    let mint = TokenMint::new(&cfg.jwt_secret, &cfg.tenant, 24 * 3600);
    let counters = Arc::new(Counters::default());
    counters.measure_from_ms.store(i64::MAX, Ordering::Relaxed);
    counters.measure_to_ms.store(i64::MAX, Ordering::Relaxed);
    let _ = counters.sends.set(SendLog::new(cfg.couriers));
    let console_hist = Arc::new(Mutex::new(new_hist()));
    let track_hist = Arc::new(Mutex::new(new_hist()));
    let stop = shutdown.child_token();
    // Stops the watchers once the run is measured (before the teardown closes the rest).
    let watch_stop = stop.child_token();
    let mut report = LoadReport {
        couriers_target: cfg.couriers,
        source_addrs: cfg.source_addrs.max(1),
        target_rate: cfg.rate,
        ..Default::default()
    };
    let run_started_ms = crate::unix_ms();

    let mem_before = cfg.server_pid.map(read_rss_kib).transpose()?;
    let mem_registered = match (cfg.preregister, cfg.server_pid) {
        (true, Some(pid)) => {
            preregister(&cfg, &server, &mint, run_started_ms).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some(read_rss_kib(pid)?)
        }
        _ => None,
    };

    // Watchers first, so they see the first updates.
    let mut readers = JoinSet::new();
    let mut watcher_tasks = JoinSet::new();
    for w in 0..cfg.watchers {
        let token = mint.dispatcher()?;
        let path = format!("/v1/ws/console?token={token}");
        let src = source_addr(w, report.source_addrs);
        let mut ws = connect_ws(&server, &path, Some(src), None, cfg.connect_timeout)
            .await
            .with_context(|| format!("console watcher {w}"))?;
        let sub = serde_json::to_string(&ConsoleMsg::Subscribe { bbox: watch_bbox })?;
        ws.send(Message::Text(sub.into())).await?;
        add(&counters.watchers, 1);
        let (c, h, stop) = (counters.clone(), console_hist.clone(), watch_stop.clone());
        // A console watching part of the area is sent nothing of the couriers outside it: the
        // fixes such a courier sent there were filtered, not conflated, and counting them as
        // superseded on its return (their latency running until then) inflated p99 and max.
        let conflation = watch_bbox == cfg.bbox;
        watcher_tasks.spawn(watch(ws, c, h, stop, WatchKind::Console, conflation));
    }

    // Courier sockets, `connect_concurrency` handshakes at a time, round-robin over sources.
    let connect_started = Instant::now();
    let progress_stop = stop.child_token();
    let progress = cfg.progress.then(|| {
        let (c, ch, th, stop) = (counters.clone(), console_hist.clone(), track_hist.clone(), progress_stop.clone());
        let couriers = cfg.couriers;
        tokio::spawn(progress_loop(c, ch, th, stop, couriers))
    });
    let tokens: Vec<String> =
        (0..cfg.couriers).map(|i| mint.courier(&load_courier_id(i, cfg.track, run_started_ms))).collect::<anyhow::Result<_>>()?;
    let mut conns: Vec<Option<Ws>> = Vec::with_capacity(cfg.couriers);
    {
        let server = &courier_server;
        let counters = &counters;
        let timeout = cfg.connect_timeout;
        let srcs = report.source_addrs;
        let mut results = futures_util::stream::iter(tokens.iter().enumerate().map(|(i, token)| async move {
            let path = format!("/v1/ws/courier?token={token}");
            // Two tries per socket: a busy accept queue drops a few handshakes at high ramp rates.
            for attempt in 0..2 {
                match connect_ws(server, &path, Some(source_addr(i, srcs)), Some(lean_ws_config()), timeout).await {
                    Ok(ws) => {
                        add(&counters.connected, 1);
                        return (i, Some(ws));
                    }
                    Err(e) => {
                        add(&counters.connect_errors, 1);
                        if attempt == 1 {
                            tracing::debug!(courier = i, error = %format!("{e:#}"), "connect failed");
                        }
                    }
                }
            }
            (i, None)
        }))
        .buffer_unordered(cfg.connect_concurrency.max(1));
        conns.resize_with(cfg.couriers, || None);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = results.next() => match r {
                    Some((i, ws)) => conns[i] = ws,
                    None => break,
                }
            }
        }
    }
    report.connect_seconds = connect_started.elapsed().as_secs_f64();
    report.couriers_connected = get(&counters.connected);
    report.connect_errors = get(&counters.connect_errors);
    drop(tokens);

    // Split each socket: the read half gets its own small task, the write half goes to a shard.
    let shards = cfg.shards.clamp(1, 256);
    let mut shard_slots: Vec<Vec<Slot>> = (0..shards).map(|_| Vec::new()).collect();
    let mut controls_tx = Vec::with_capacity(shards);
    let mut controls_rx = Vec::with_capacity(shards);
    for _ in 0..shards {
        // Bounded: offer replies are few (one per tracked courier); a full queue means the
        // shard is stuck, and the reader waits rather than drop a reply.
        let (tx, rx) = mpsc::channel::<Control>(1024);
        controls_tx.push(tx);
        controls_rx.push(rx);
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let fleet = LoadCourier::fleet(cfg.couriers, &bbox, cfg.seed, Instant::now());
    for (i, (ws, state)) in conns.into_iter().zip(fleet).enumerate() {
        let Some(ws) = ws else { continue };
        let (sink, stream) = ws.split();
        let shard = i % shards;
        let local = shard_slots[shard].len();
        shard_slots[shard].push(Slot { sink, state, alive: true, idx: i });
        let (c, ctl) = (counters.clone(), controls_tx[shard].clone());
        readers.spawn(read_courier(stream, c, ctl, local, stop.clone()));
    }
    drop(controls_tx);

    if let (Some(pid), Some(_)) = (cfg.server_pid, mem_before) {
        // Let the server settle (allocations of the handshakes, lazily created state).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let connected = read_rss_kib(pid)?;
        report.memory = Some(MemoryReport { pid, rss_connected_kib: connected, rss_registered_kib: mem_registered, ..Default::default() });
    }

    // Tracking: a few couriers go available, get an order each, and a customer watches it.
    let mut tracked_orders = Vec::new();
    if cfg.track > 0 && report.couriers_connected > 0 {
        tracked_orders = setup_tracking(&cfg, &server, &mint, &mut shard_slots, &bbox, &counters, &mut rng).await?;
        for (w, order_id) in tracked_orders.iter().enumerate() {
            let token = mint.customer(order_id)?;
            let path = format!("/v1/ws/track/{order_id}?token={token}");
            match connect_ws(&server, &path, Some(source_addr(w, report.source_addrs)), None, cfg.connect_timeout).await {
                Ok(ws) => {
                    add(&counters.trackers, 1);
                    let (c, h, stop) = (counters.clone(), track_hist.clone(), watch_stop.clone());
                    watcher_tasks.spawn(watch(ws, c, h, stop, WatchKind::Track, true));
                }
                Err(e) => tracing::warn!(order = %order_id, error = %format!("{e:#}"), "tracking watcher failed"),
            }
        }
    }

    // The measured run: latency and steady deliveries count updates scheduled after the ramp.
    let run_started = Instant::now();
    if cfg.ramp.is_zero() {
        counters.measure_from_ms.store(crate::unix_ms(), Ordering::Relaxed);
    }
    let cpu_before = (read_cpu_s(std::process::id()).ok(), cfg.server_pid.and_then(|p| read_cpu_s(p).ok()));
    let sent_before = get(&counters.sent);
    let mut senders = JoinSet::new();
    let total = report.couriers_connected.max(1) as f64;
    for (slots, rx) in shard_slots.into_iter().zip(controls_rx) {
        let share = cfg.rate * slots.len() as f64 / total;
        let (c, stop) = (counters.clone(), stop.clone());
        let (duration, ramp, seed) = (cfg.duration, cfg.ramp.min(cfg.duration), rng.random());
        senders.spawn(send_shard(slots, rx, share, duration, ramp, bbox, c, stop, seed));
    }
    let ramp_end = run_started + cfg.ramp.min(cfg.duration);
    let mut sent_at_ramp_end = None;
    let mut returned_slots: Vec<Vec<Slot>> = Vec::new();
    let hard_deadline = run_started + cfg.duration + Duration::from_secs(10);
    loop {
        tokio::select! {
            r = senders.join_next() => match r {
                Some(Ok(slots)) => returned_slots.push(slots),
                Some(Err(e)) => tracing::warn!(error = %e, "sender shard failed"),
                None => break,
            },
            _ = tokio::time::sleep_until(ramp_end), if sent_at_ramp_end.is_none() => {
                sent_at_ramp_end = Some((Instant::now(), get(&counters.sent)));
                counters.measure_from_ms.store(crate::unix_ms(), Ordering::Relaxed);
            }
            _ = tokio::time::sleep_until(hard_deadline) => {
                tracing::warn!("sender shards overran the run by 10 s; aborting them");
                senders.abort_all();
            }
        }
    }
    let run_elapsed = run_started.elapsed().as_secs_f64();
    counters.measure_to_ms.store(crate::unix_ms(), Ordering::Relaxed);
    let cpu_after = (read_cpu_s(std::process::id()).ok(), cfg.server_pid.and_then(|p| read_cpu_s(p).ok()));
    report.generator_cpu_s = cpu_before.0.zip(cpu_after.0).map(|(a, b)| b - a);
    report.server_cpu_s = cpu_before.1.zip(cpu_after.1).map(|(a, b)| b - a);
    // Let the last updates reach the watchers, then stop them so that every sample they hold
    // is in the histograms before they are read. Twice the slowest delivery seen (600 ms to
    // 10 s): a fixed 600 ms left out the slowest updates of the run's end under overload.
    let slowest_us = console_hist.lock().await.max().max(track_hist.lock().await.max());
    let drain = Duration::from_micros(slowest_us.saturating_mul(2)).clamp(Duration::from_millis(600), Duration::from_secs(10));
    tokio::time::sleep(drain).await;
    let run_end = Instant::now();
    watch_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while watcher_tasks.join_next().await.is_some() {} }).await;

    report.duration_s = run_elapsed;
    report.sent = get(&counters.sent) - sent_before;
    report.sent_per_s = report.sent as f64 / run_elapsed.max(1e-9);
    report.sent_per_s_steady = match sent_at_ramp_end {
        Some((t, n)) if cfg.ramp < cfg.duration => {
            let secs = (run_started + Duration::from_secs_f64(run_elapsed)).saturating_duration_since(t).as_secs_f64();
            (get(&counters.sent) - n) as f64 / secs.max(1e-9)
        }
        _ => report.sent_per_s,
    };
    report.send_errors = get(&counters.send_errors);
    report.server_error_frames = get(&counters.server_errors);
    report.watcher_frames = get(&counters.watcher_frames);
    report.watcher_deliveries = get(&counters.watcher_deliveries);
    report.watcher_deliveries_per_s =
        report.watcher_deliveries as f64 / run_end.duration_since(run_started).as_secs_f64().max(1e-9);
    let window_ms = counters.measure_to_ms.load(Ordering::Relaxed) - counters.measure_from_ms.load(Ordering::Relaxed);
    report.watcher_deliveries_per_s_steady = get(&counters.deliveries_steady) as f64 * 1000.0 / (window_ms.max(1) as f64);
    report.superseded = get(&counters.superseded);
    report.behind_schedule = get(&counters.behind_schedule);
    report.behind_max_ms = get(&counters.behind_max_ms);
    report.watchers_connected = get(&counters.watchers);
    report.trackers_connected = get(&counters.trackers);
    report.console_latency = Latency::from_hist(&*console_hist.lock().await);
    report.track_latency = Latency::from_hist(&*track_hist.lock().await);

    if let (Some(pid), Some(before), Some(mem)) = (cfg.server_pid, mem_before, report.memory.as_mut()) {
        let after = read_rss_kib(pid)?;
        let conns = (report.couriers_connected + report.watchers_connected + report.trackers_connected).max(1) as f64;
        let couriers = report.couriers_connected.max(1) as f64;
        mem.rss_before_kib = before;
        mem.rss_after_updates_kib = after;
        let base = mem.rss_registered_kib.unwrap_or(before);
        mem.kib_per_connection = (mem.rss_connected_kib as f64 - base as f64) / conns;
        mem.kib_per_courier_registered = mem.rss_registered_kib.map(|r| (r as f64 - before as f64) / couriers);
        mem.kib_per_courier = (after as f64 - before as f64) / couriers;
        mem.kib_per_courier_state = (after as f64 - mem.rss_connected_kib as f64) / couriers;
    }
    report.disconnects = get(&counters.disconnects);

    // Teardown: close politely within a bounded time, then drop whatever is left.
    counters.closing.store(true, Ordering::Relaxed);
    progress_stop.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        for slots in &mut returned_slots {
            for s in slots.iter_mut().filter(|s| s.alive) {
                let _ = s.sink.send(Message::Close(None)).await;
            }
        }
    })
    .await;
    stop.cancel();
    drop(returned_slots);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while readers.join_next().await.is_some() {}
        while watcher_tasks.join_next().await.is_some() {}
    })
    .await;
    readers.abort_all();
    watcher_tasks.abort_all();
    // The tracked orders were only there to be watched: cancel them (bounded, best effort).
    if !tracked_orders.is_empty() {
        let dispatcher = mint.dispatcher()?;
        let cancel = async {
            for id in &tracked_orders {
                let path = format!("/v1/orders/{id}/cancel");
                match post_json(&server, &path, &dispatcher, &serde_json::json!({}), Duration::from_secs(5)).await {
                    Ok(r) if r.status < 300 || r.status == 409 => {}
                    Ok(r) => tracing::warn!(order = %id, status = r.status, body = %String::from_utf8_lossy(&r.body), "cancelling a tracked order failed"),
                    Err(e) => tracing::warn!(order = %id, error = %format!("{e:#}"), "cancelling a tracked order failed"),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(15), cancel).await.is_err() {
            tracing::warn!("cancelling the tracked orders took over 15 s; some stay open");
        }
    }

    if let Some(url) = &cfg.redis_url
        && !shutdown.is_cancelled()
    {
        // The same stream: the same fleet, as many updates as were sent to hexfleet, but at
        // least 200k so the Redis side runs long enough (about a second) to be measured.
        let n = report.sent.clamp(200_000, 5_000_000);
        let spacing_s = if cfg.rate > 0.0 { cfg.couriers.max(1) as f64 / cfg.rate } else { 1.0 };
        let r = redis_compare(url, cfg.couriers.max(1), n, cfg.redis_pipeline.max(1), &bbox, cfg.seed, spacing_s, &shutdown).await;
        let r = r.unwrap_or_else(|e| RedisReport { error: Some(format!("{e:#}")), ..Default::default() });
        if r.updates_per_s > 0.0 {
            report.ratio_vs_redis = Some(report.sent_per_s_steady / r.updates_per_s);
        }
        report.redis = Some(r);
    }
    Ok(report)
}

/// The `i`-th source address: 127.0.0.1 ..= 127.0.0.n.
pub fn source_addr(i: usize, n: u8) -> Ipv4Addr {
    let n = n.max(1) as usize;
    Ipv4Addr::new(127, 0, 0, 1 + (i % n) as u8)
}

async fn progress_loop(
    c: Arc<Counters>,
    console: Arc<Mutex<Histogram<u64>>>,
    track: Arc<Mutex<Histogram<u64>>>,
    stop: CancellationToken,
    couriers: usize,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_sent, mut last_del) = (get(&c.sent), get(&c.watcher_deliveries));
    // Bounded by the run: the caller cancels `stop`; a day is the hard cap.
    for _ in 0..86_400 {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (sent, del) = (get(&c.sent), get(&c.watcher_deliveries));
        let (cp99, tp99) = {
            let (h1, h2) = (console.lock().await, track.lock().await);
            let q = |h: &Histogram<u64>| if h.is_empty() { f64::NAN } else { h.value_at_quantile(0.99) as f64 / 1000.0 };
            (q(&h1), q(&h2))
        };
        eprintln!(
            "[{:>4}s] conns {}/{} (+{} watchers, {} trackers) | sent {}/s (total {}) | watcher deliveries {}/s | p99 console {:.1} ms track {:.1} ms | conn errs {} send errs {} disconnects {} server errs {}",
            started.elapsed().as_secs(),
            get(&c.connected),
            couriers,
            get(&c.watchers),
            get(&c.trackers),
            sent - last_sent,
            sent,
            del - last_del,
            cp99,
            tp99,
            get(&c.connect_errors),
            get(&c.send_errors),
            get(&c.disconnects),
            get(&c.server_errors),
        );
        last_sent = sent;
        last_del = del;
    }
}

/// Reads a courier socket: counts server errors and unexpected closes; accepts offers (only
/// tracked couriers are available, so only they get offers).
async fn read_courier(mut stream: WsRead, c: Arc<Counters>, ctl: mpsc::Sender<Control>, slot: usize, stop: CancellationToken) {
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => return,
            m = stream.next() => m,
        };
        match m {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if t.contains(r#""t":"error""#) {
                    add(&c.server_errors, 1);
                    tracing::debug!(frame = t, "server error frame");
                } else if !t.contains(r#""t":"loc""#) && tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::debug!(slot, frame = t, "courier got");
                }
                if t.contains(r#""t":"offer""#)
                    && let Ok(ServerMsg::Offer { order_id, .. }) = serde_json::from_str::<ServerMsg>(t)
                {
                    let reply = serde_json::to_string(&CourierMsg::OfferReply { order_id, accept: true }).unwrap_or_default();
                    let _ = ctl.send((slot, reply)).await;
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                if !c.closing.load(Ordering::Relaxed) {
                    add(&c.disconnects, 1);
                }
                return;
            }
            Some(Ok(_)) => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchKind {
    Console,
    Track,
}

/// Creates the run's couriers over HTTP, `connect_concurrency` requests at a time.
async fn preregister(cfg: &LoadConfig, server: &Server, mint: &TokenMint, run_started_ms: i64) -> anyhow::Result<()> {
    let admin = mint.dispatcher()?;
    let started = Instant::now();
    let mut results = futures_util::stream::iter((0..cfg.couriers).map(|i| {
        let path = format!("/v1/couriers/{}", load_courier_id(i, cfg.track, run_started_ms));
        let admin = &admin;
        async move { crate::net::request_json(server, "PUT", &path, admin, &serde_json::json!({}), cfg.connect_timeout).await }
    }))
    .buffer_unordered(cfg.connect_concurrency.clamp(1, 64));
    while let Some(r) = results.next().await {
        let r = r.context("registering a courier")?;
        anyhow::ensure!(r.status == 200, "registering a courier: HTTP {} {}", r.status, String::from_utf8_lossy(&r.body));
    }
    tracing::info!(couriers = cfg.couriers, seconds = started.elapsed().as_secs_f64(), "couriers registered");
    Ok(())
}

/// A console `couriers` batch, reduced to what latency needs (other fields are skipped).
#[derive(serde::Deserialize)]
struct BatchTimes<'a> {
    t: &'a str,
    #[serde(borrow)]
    items: Vec<ItemTime<'a>>,
}

#[derive(serde::Deserialize)]
struct ItemTime<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    ts: i64,
}

/// Reads a watcher socket and records update → watcher latency from each position's `ts`.
/// With `conflation`, the fixes a delivery replaced (sent since the courier's previous one
/// shown here) count too, their latency running until it; without it (a console watching part
/// of the area) they are not known to have been conflated.
async fn watch(ws: Ws, c: Arc<Counters>, hist: Arc<Mutex<Histogram<u64>>>, stop: CancellationToken, kind: WatchKind, conflation: bool) {
    let (_sink, mut stream) = ws.split();
    let mut local = new_hist();
    // The newest position of each courier this watcher has shown.
    let mut shown: HashMap<usize, i64> = HashMap::new();
    let mut last_flush = Instant::now();
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => break,
            m = stream.next() => m,
        };
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            _ => {
                if !c.closing.load(Ordering::Relaxed) {
                    add(&c.disconnects, 1);
                }
                break;
            }
        };
        add(&c.watcher_frames, 1);
        if kind == WatchKind::Track {
            tracing::trace!(frame = text.as_str(), "tracking watcher got");
        }
        let now_us = crate::unix_ms() * 1000;
        let (from, to) = (c.measure_from_ms.load(Ordering::Relaxed), c.measure_to_ms.load(Ordering::Relaxed));
        let sends = c.sends.get();
        let mut record = |id: &str, ts: i64| {
            add(&c.watcher_deliveries, 1);
            let in_window = |t: i64| t >= from && t <= to;
            if in_window(ts) {
                add(&c.deliveries_steady, 1);
                local.saturating_record((now_us - ts * 1000).max(1) as u64);
            }
            // The fixes of this courier sent since the last one shown here, which the server
            // replaced by this one: their latency runs until now too.
            if conflation
                && let (Some(i), Some(log)) = (courier_index(id), sends)
                && let Some(prev) = shown.insert(i, ts)
            {
                log.between(i, prev, ts, |t| {
                    if in_window(t) {
                        add(&c.superseded, 1);
                        local.saturating_record((now_us - t * 1000).max(1) as u64);
                    }
                });
            }
        };
        // Fast path for console batches: only `id` and `ts` of each item, no tagged-enum
        // buffering (which copied every item into a tree first and made the generator the
        // bottleneck).
        match serde_json::from_str::<BatchTimes<'_>>(text.as_str()) {
            Ok(b) if b.t == "couriers" => b.items.iter().for_each(|i| record(&i.id, i.ts)),
            _ => match serde_json::from_str::<ServerMsg>(text.as_str()) {
                Ok(ServerMsg::Couriers { items, .. }) => items.iter().for_each(|i| record(&i.id, i.ts)),
                Ok(ServerMsg::Courier { courier_id, ts, .. }) => record(&courier_id, ts),
                Ok(ServerMsg::Error { code, message }) => {
                    add(&c.server_errors, 1);
                    tracing::debug!(?kind, %code, %message, "watcher got an error frame");
                }
                _ => {}
            },
        }
        if last_flush.elapsed() >= Duration::from_millis(250) && !local.is_empty() {
            let _ = hist.lock().await.add(&local);
            local.reset();
            last_flush = Instant::now();
        }
    }
    let _ = hist.lock().await.add(&local);
}

/// Paces `share` updates/s over `slots`, ramping up linearly for `ramp`, for `duration`.
#[allow(clippy::too_many_arguments)]
async fn send_shard(
    mut slots: Vec<Slot>,
    mut ctl: mpsc::Receiver<Control>,
    share: f64,
    duration: Duration,
    ramp: Duration,
    bbox: BBox,
    c: Arc<Counters>,
    stop: CancellationToken,
    seed: u64,
) -> Vec<Slot> {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let start_ms = crate::unix_ms();
    let end = start + duration;
    let ramp_s = ramp.as_secs_f64();
    // A 1 ms tick (the timer's resolution): each update goes out within about a millisecond
    // of the time it carries. On a 10 ms tick the updates due during a tick waited for it, and
    // that wait (5 ms on average, up to 10) was measured as the server's latency.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent: u64 = 0;
    let mut cursor = 0usize;
    let mut buf = String::with_capacity(160);
    if slots.is_empty() {
        return slots;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        while let Ok((i, reply)) = ctl.try_recv() {
            if let Some(s) = slots.get_mut(i).filter(|s| s.alive)
                && s.sink.send(Message::Text(reply.into())).await.is_err()
            {
                s.alive = false;
            }
        }
        // Updates due by now: the integral of the (ramping) rate.
        let t = now.duration_since(start).as_secs_f64();
        let due_total = if ramp_s > 0.0 && t < ramp_s {
            share * t * t / (2.0 * ramp_s)
        } else {
            share * (t - ramp_s / 2.0)
        };
        let mut due = (due_total as u64).saturating_sub(sent);
        // Each update carries the time it was due, not the time it went out: a sender up to
        // 100 ms behind shows it as latency instead of hiding it (coordinated omission).
        let due_at_ms = |k: u64| {
            let k = k as f64;
            let t = if ramp_s > 0.0 && k < share * ramp_s / 2.0 { (2.0 * ramp_s * k / share).sqrt() } else { k / share + ramp_s / 2.0 };
            start_ms + (t * 1000.0) as i64
        };
        // Never burst more than 100 ms worth when further behind: the oldest are skipped and
        // counted, with how far behind (they are in no latency figure).
        let cap = (share * 0.1).ceil().max(1.0) as u64;
        if due > cap {
            add(&c.behind_schedule, due - cap);
            let behind = crate::unix_ms().saturating_sub(due_at_ms(sent + 1)).max(0) as u64;
            c.behind_max_ms.fetch_max(behind, Ordering::Relaxed);
            sent += due - cap;
            due = cap;
        }
        let sends = c.sends.get();
        let n = slots.len();
        let mut tries = 0;
        while due > 0 && tries < n {
            let s = &mut slots[cursor];
            cursor = (cursor + 1) % n;
            tries += 1;
            if !s.alive {
                continue;
            }
            tries = 0;
            s.state.advance(now, &bbox, &mut rng);
            let ts = due_at_ms(sent + 1);
            s.state.write_loc(&mut buf, ts);
            if let Some(log) = sends {
                log.push(s.idx, ts);
            }
            match s.sink.send(Message::Text(buf.as_str().into())).await {
                Ok(()) => add(&c.sent, 1),
                Err(_) => {
                    add(&c.send_errors, 1);
                    s.alive = false;
                }
            }
            sent += 1;
            due -= 1;
        }
    }
    slots
}

/// Tracked couriers (the first `track`) send a position and go available; one order is
/// created 50 m from each. Their readers accept the offers (sent once the shards run).
/// Returns the order ids.
async fn setup_tracking(
    cfg: &LoadConfig,
    server: &Server,
    mint: &TokenMint,
    shard_slots: &mut [Vec<Slot>],
    bbox: &BBox,
    counters: &Counters,
    rng: &mut StdRng,
) -> anyhow::Result<Vec<String>> {
    let dispatcher = mint.dispatcher()?;
    let mut picked = Vec::new();
    for slots in shard_slots.iter_mut() {
        for s in slots.iter_mut().filter(|s| s.alive && s.idx < cfg.track) {
            let ts = crate::unix_ms();
            let mut buf = String::new();
            s.state.write_loc(&mut buf, ts);
            let avail = serde_json::to_string(&CourierMsg::Status { status: CourierStatus::Available })?;
            if s.sink.send(Message::Text(buf.into())).await.is_err() || s.sink.send(Message::Text(avail.into())).await.is_err() {
                s.alive = false;
                add(&counters.send_errors, 1);
                continue;
            }
            picked.push(s.state.pos);
        }
    }
    let mut orders = Vec::new();
    for pos in picked {
        let pickup = bbox.clamp(offset(pos, rng.random_range(0.0..360.0), 50.0));
        let dropoff = bbox.clamp(offset(pos, rng.random_range(0.0..360.0), 2_000.0));
        let body = serde_json::json!({"pickup": {"lat": pickup.lat, "lng": pickup.lng}, "dropoff": {"lat": dropoff.lat, "lng": dropoff.lng}});
        let r = post_json(server, "/v1/orders", &dispatcher, &body, Duration::from_secs(10)).await?;
        anyhow::ensure!(r.status == 201 || r.status == 200, "POST /v1/orders: {} {}", r.status, String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&r.body).context("order response is not json")?;
        orders.push(v.get("id").and_then(|i| i.as_str()).context("order response without id")?.to_owned());
    }
    Ok(orders)
}

/// Writes `n` position updates of the run's fleet (`couriers` couriers drawn from `seed`, each
/// moving `spacing_s` seconds between its updates) to Redis with pipelined `GEOADD`, over a few
/// multiplexed connections, as fast as Redis takes them, and measures the rate.
///
/// The sorted set lives under a per-run key (`hexfleet-sim:{pid}:{ms}:geo`) that is deleted
/// afterwards, also when the writes fail or the run is cancelled. Only loopback Redis.
#[allow(clippy::too_many_arguments)]
pub async fn redis_compare(
    url: &str,
    couriers: usize,
    n: u64,
    pipeline: usize,
    bbox: &BBox,
    seed: u64,
    spacing_s: f64,
    shutdown: &CancellationToken,
) -> anyhow::Result<RedisReport> {
    let client = redis::Client::open(url).context("redis url")?;
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, _) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let ok = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            anyhow::ensure!(ok, "redis host {host} is not loopback; the simulator only connects to loopback");
        }
        redis::ConnectionAddr::Unix(_) => {}
        other => anyhow::bail!("unsupported redis address {other:?} (plain tcp or unix socket only)"),
    }
    let key = redis_key(std::process::id(), crate::unix_ms());
    let connections = 4usize;
    let pipeline = pipeline.max(1);
    let mut cons = Vec::with_capacity(connections);
    for _ in 0..connections {
        let con = tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
            .await
            .context("redis connect timed out")?
            .context("redis connect")?;
        cons.push(con);
    }
    let mut cleanup = cons[0].clone();
    // The stream, generated before the clock starts: at most 1M distinct updates (24 B each),
    // replayed cyclically when `n` is larger. Building each pipeline stays in the timed part,
    // as it would in a user's service.
    let mut fleet = LoadCourier::fleet(couriers.max(1), bbox, seed, Instant::now());
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1));
    let distinct = n.min(1_000_000) as usize;
    let stream: Vec<(u32, f64, f64)> = (0..distinct)
        .map(|i| {
            let k = i % fleet.len();
            fleet[k].advance_by(spacing_s, bbox, &mut rng);
            (k as u32, fleet[k].pos.lng, fleet[k].pos.lat)
        })
        .collect();
    drop(fleet);
    let stream = Arc::new(stream);
    let ids: Arc<Vec<String>> = Arc::new((0..couriers.max(1)).map(|i| load_courier_id(i, 0, 0)).collect());
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (c, mut con) in cons.into_iter().enumerate() {
        let (stop, stream, ids, key) = (shutdown.clone(), stream.clone(), ids.clone(), key.clone());
        // Connection `c` writes updates c, c + connections, c + 2 * connections, ...
        let quota = n / connections as u64 + u64::from((c as u64) < n % connections as u64);
        tasks.spawn(async move {
            let mut done = 0u64;
            let mut idx = c;
            while done < quota && !stop.is_cancelled() {
                let size = (pipeline as u64).min(quota - done);
                let mut p = redis::pipe();
                for _ in 0..size {
                    let (k, lng, lat) = stream[idx % stream.len()];
                    p.cmd("GEOADD").arg(&key).arg(lng).arg(lat).arg(&ids[k as usize]).ignore();
                    idx += connections;
                }
                p.query_async::<()>(&mut con).await.context("GEOADD pipeline")?;
                done += size;
            }
            anyhow::Ok(done)
        });
    }
    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        let mut total = 0u64;
        while let Some(r) = tasks.join_next().await {
            total += r.context("redis task panicked")??;
        }
        anyhow::Ok(total)
    })
    .await
    .context("redis comparison took over 120 s")
    .and_then(|r| r);
    let seconds = started.elapsed().as_secs_f64();
    tasks.abort_all();
    // Always remove the run's key, whatever happened above.
    let deleted: anyhow::Result<i64> = tokio::time::timeout(Duration::from_secs(5), redis::cmd("DEL").arg(&key).query_async(&mut cleanup))
        .await
        .context("redis DEL timed out")
        .and_then(|r| r.context("redis DEL"));
    if let Err(e) = &deleted {
        tracing::warn!(%key, error = %format!("{e:#}"), "could not delete the comparison key");
    }
    let total = outcome?;
    Ok(RedisReport {
        updates: total,
        pipeline,
        connections,
        seconds,
        updates_per_s: total as f64 / seconds.max(1e-9),
        error: None,
    })
}

/// The per-run Redis key of the `GEOADD` comparison.
pub fn redis_key(pid: u32, started_ms: i64) -> String {
    format!("hexfleet-sim:{pid}:{started_ms}:geo")
}

impl LoadReport {
    /// The summary table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "  {k:<34} {v}");
        };
        row("courier sockets", format!("{} / {} ({} source addrs, {:.1} s to connect, {} connect errors)", self.couriers_connected, self.couriers_target, self.source_addrs, self.connect_seconds, self.connect_errors));
        row("watchers", format!("{} console, {} tracking", self.watchers_connected, self.trackers_connected));
        row("target rate", format!("{:.0} updates/s for {:.1} s", self.target_rate, self.duration_s));
        row("sent", format!("{} ({:.0}/s overall, {:.0}/s after ramp)", self.sent, self.sent_per_s, self.sent_per_s_steady));
        row("watcher deliveries", format!("{} ({:.0}/s overall, {:.0}/s after ramp) in {} frames", self.watcher_deliveries, self.watcher_deliveries_per_s, self.watcher_deliveries_per_s_steady, self.watcher_frames));
        row("conflated by the server", format!("{} positions (counted in latency up to the delivery that replaced them)", self.superseded));
        row("behind schedule (not sent)", format!("{} updates, up to {} ms behind (in no latency figure)", self.behind_schedule, self.behind_max_ms));
        let lat = |l: &Latency| {
            if l.samples == 0 {
                "no samples".to_owned()
            } else {
                format!("p50 {:.1} ms  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={})", l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.samples)
            }
        };
        row("update -> console latency", lat(&self.console_latency));
        row("update -> tracking latency", lat(&self.track_latency));
        if let Some(g) = self.generator_cpu_s {
            let d = self.duration_s.max(1e-9);
            let server = self.server_cpu_s.map_or(String::new(), |c| format!(", server {c:.1} s ({:.2} cores)", c / d));
            row("cpu during the run", format!("generator {g:.1} s ({:.2} cores){server}", g / d));
        }
        row("errors", format!("{} send, {} server error frames, {} disconnects", self.send_errors, self.server_error_frames, self.disconnects));
        if let Some(m) = &self.memory {
            let registered = m.rss_registered_kib.map_or(String::new(), |r| format!("  registered {r}"));
            row("server rss (KiB)", format!("before {}{registered}  connected {}  after updates {}", m.rss_before_kib, m.rss_connected_kib, m.rss_after_updates_kib));
            match m.kib_per_courier_registered {
                Some(r) => {
                    row("server KiB per connection", format!("{:.2} (sockets only: couriers were created before)", m.kib_per_connection));
                    row("server KiB per courier state", format!("{r:.2} created + {:.2} from updates = {:.2}", m.kib_per_courier_state, r + m.kib_per_courier_state));
                }
                None => row("server KiB per connection", format!("{:.2} (socket plus the courier it creates)", m.kib_per_connection)),
            }
            row("server KiB per courier", format!("{:.2} total, {:.2} from updates", m.kib_per_courier, m.kib_per_courier_state));
        }
        if let Some(r) = &self.redis {
            match &r.error {
                Some(e) => row("redis GEOADD", format!("failed: {e}")),
                None => row("redis GEOADD", format!("{} updates in {:.2} s = {:.0}/s (pipeline {}, {} conns)", r.updates, r.seconds, r.updates_per_s, r.pipeline, r.connections)),
            }
        }
        if let Some(x) = self.ratio_vs_redis {
            let capped = self.sent_per_s_steady >= 0.97 * self.target_rate;
            let note = if capped {
                " (hexfleet ran at the --rate cap: a lower bound; raise --rate above capacity for max vs max)"
            } else {
                " (below the --rate target: the most this server and generator did together here; see cpu)"
            };
            row("hexfleet / redis", format!("{x:.2}x{note}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The load generator writes `loc` by hand (no serde on the hot path); it must still be
    /// exactly the contract's message.
    #[test]
    fn hand_written_loc_is_a_contract_loc() {
        let bbox = BBox::from_array(crate::DEFAULT_BBOX);
        let mut fleet = LoadCourier::fleet(50, &bbox, 7, Instant::now());
        let mut rng = StdRng::seed_from_u64(1);
        let mut buf = String::new();
        for c in &mut fleet {
            for _ in 0..20 {
                c.advance_by(2.0, &bbox, &mut rng);
                assert!(bbox.contains(c.pos));
            }
            c.write_loc(&mut buf, 1_700_000_000_123);
            match serde_json::from_str::<CourierMsg>(&buf).unwrap() {
                CourierMsg::Loc { lat, lng, ts, speed: Some(speed), heading: Some(heading), acc: None } => {
                    assert_eq!(ts, 1_700_000_000_123);
                    assert!((lat - c.pos.lat).abs() < 1e-7 && (lng - c.pos.lng).abs() < 1e-7);
                    assert!((0.0..=Vehicle::Car.max_speed()).contains(&speed));
                    assert!((0.0..360.0).contains(&heading));
                }
                other => panic!("{buf} parsed as {other:?}"),
            }
        }
        // The same seed gives the same fleet (the Redis comparison relies on it).
        let again = LoadCourier::fleet(50, &bbox, 7, Instant::now());
        assert_eq!(again[3].pos, LoadCourier::fleet(50, &bbox, 7, Instant::now())[3].pos);
    }

    #[test]
    fn a_delivery_accounts_for_the_positions_it_replaced() {
        for i in [0, 7, 12_345] {
            assert_eq!(courier_index(&load_courier_id(i, 0, 1_700_000_000_000)), Some(i));
            assert_eq!(courier_index(&load_courier_id(i, i + 1, 1_700_000_000_000)), Some(i));
        }
        assert_eq!(courier_index("someone-else"), None);
        let log = SendLog::new(2);
        for ts in [100, 200, 300, 400] {
            log.push(1, ts);
        }
        // Shown 100, now 400: 200 and 300 were replaced.
        let mut replaced = Vec::new();
        log.between(1, 100, 400, |t| replaced.push(t));
        replaced.sort_unstable();
        assert_eq!(replaced, vec![200, 300]);
        // Only the last SEND_LOG are kept.
        for ts in 0..SEND_LOG as i64 + 4 {
            log.push(0, 1_000 + ts);
        }
        let mut n = 0;
        log.between(0, 0, i64::MAX, |_| n += 1);
        assert_eq!(n, SEND_LOG);
    }

    #[test]
    fn source_addresses_cycle_over_loopback() {
        assert_eq!(source_addr(0, 4), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_addr(5, 4), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_addr(253, 254), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(source_addr(9, 0), Ipv4Addr::new(127, 0, 0, 1));
    }

    #[test]
    fn reads_own_rss() {
        assert!(read_rss_kib(std::process::id()).unwrap() > 0);
        assert!(read_rss_kib(u32::MAX).is_err());
        let a = read_cpu_s(std::process::id()).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(read_cpu_s(std::process::id()).unwrap() >= a);
    }

    #[test]
    fn latency_from_histogram() {
        let mut h = new_hist();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let l = Latency::from_hist(&h);
        assert_eq!(l.samples, 1000);
        assert!((l.p50_ms - 500.0).abs() < 1.0 && (l.p99_ms - 990.0).abs() < 1.0, "{l:?}");
        assert_eq!(Latency::from_hist(&new_hist()), Latency::default());
        assert_eq!(redis_key(7, 9), "hexfleet-sim:7:9:geo");
    }
}
