//! The `hexfleet-sim` command line: parses flags (each also an environment variable where that
//! makes sense), sets up logging and Ctrl-C, and calls the library: [`hexfleet_sim::run_demo`],
//! [`hexfleet_sim::load::run_load`], [`hexfleet_sim::replay::replay`] or the token mint.
//!
//! Every subcommand ends by itself (`load` after its run, `replay` after the trace, `demo`
//! after `--duration` if given) or on Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hexfleet_sim::load::{LoadConfig, raise_fd_limit, run_load};
use hexfleet_sim::net::Server;
use hexfleet_sim::token::{Role, TokenMint};
use hexfleet_sim::trace::{self, Trace};
use hexfleet_sim::{CancellationToken, DemoConfig, run_demo};

/// Simulated hexfleet clients over real sockets: a demo fleet, a load generator, GPS trace
/// replay, and tokens.
#[derive(Debug, Parser)]
#[command(name = "hexfleet-sim", version, about)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `hexfleet_sim=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Couriers moving through a city, Poisson order demand and customers watching, against a
    /// running server, until Ctrl-C or `--duration`.
    Demo(DemoArgs),
    /// The load generator: ramp to a GPS update rate over many courier sockets, measure
    /// update → watcher latency, server memory, and compare with Redis `GEOADD`.
    Load(LoadArgs),
    /// Replay recorded GPS traces (GPX, CSV `id,ts,lat,lng`, CSV `latitude,longitude` at an
    /// assumed fixed period) as couriers over the courier socket.
    Replay(ReplayArgs),
    /// Print a JWT for the given role (HS256, the same claims the server checks).
    Token(TokenArgs),
}

/// Where the server is and how to sign tokens for it.
#[derive(Debug, Args)]
struct Target {
    /// The server's base URL (loopback only).
    #[arg(long, env = "HEXFLEET_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// HS256 secret shared with the server.
    #[arg(long, env = "HEXFLEET_JWT_SECRET", default_value = hexfleet_sim::DEFAULT_JWT_SECRET, hide_env_values = true)]
    jwt_secret: String,
    /// Tenant claim of every minted token.
    #[arg(long, env = "HEXFLEET_TENANT")]
    tenant: Option<String>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    #[command(flatten)]
    target: Target,
    /// Courier sockets.
    #[arg(long, env = "HEXFLEET_SIM_COURIERS", default_value_t = 200)]
    couriers: usize,
    /// City box `min_lng,min_lat,max_lng,max_lat` (default: central Berlin).
    #[arg(long, value_parser = parse_bbox)]
    bbox: Option<BBoxArg>,
    /// Mean order arrivals per minute (Poisson).
    #[arg(long, env = "HEXFLEET_SIM_ORDERS_PER_MIN", default_value_t = 30.0)]
    orders_per_min: f64,
    /// Longest pickup → drop-off distance of a generated order, metres.
    #[arg(long, default_value_t = 2_000.0)]
    max_trip_m: f64,
    /// Customers watching their orders at once, at most.
    #[arg(long, default_value_t = 20)]
    watchers: usize,
    /// Dispatcher consoles on the whole box; at the end each logs (debug) the open orders it
    /// shows, for a failover drill to compare with the store.
    #[arg(long, default_value_t = 0)]
    consoles: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop after this long (e.g. `10m`); default: until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[command(flatten)]
    target: Target,
    /// Courier sockets to open.
    #[arg(long, default_value_t = 1000)]
    couriers: usize,
    /// Connect courier sockets to the server's ingest port (`--ingest-listen`), e.g.
    /// `ws://127.0.0.1:8091`, instead of `--url`.
    #[arg(long)]
    courier_url: Option<String>,
    /// Target GPS updates per second, all couriers together. Set it above what the server
    /// can take to measure its maximum.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured run time once all sockets are connected (e.g. `30s`, `2m`).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    duration: Duration,
    /// The rate climbs linearly from 0 over this part of the run.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    ramp: Duration,
    /// Console watchers (`/v1/ws/console`) subscribed to `--watch-bbox`.
    #[arg(long, default_value_t = 4)]
    watchers: usize,
    /// Couriers that get an order each, watched on `/v1/ws/track/{order}` (live latency).
    #[arg(long, default_value_t = 0)]
    track: usize,
    /// Box the couriers move in, `min_lng,min_lat,max_lng,max_lat` (default: central Berlin).
    #[arg(long, value_parser = parse_bbox)]
    bbox: Option<BBoxArg>,
    /// The consoles' view (default: the whole `--bbox`).
    #[arg(long, value_parser = parse_bbox)]
    watch_bbox: Option<BBoxArg>,
    /// Spread sockets over source addresses 127.0.0.1 ..= 127.0.0.N (about 28k sockets each).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=254))]
    source_addrs: u8,
    /// WebSocket handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Sender tasks pacing the updates.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Create every courier over HTTP before connecting (needs --server-pid to matter): the
    /// memory report then splits sockets from couriers' state.
    #[arg(long)]
    preregister: bool,
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    connect_timeout: Duration,
    /// The server's process id: report its resident memory per connection and per courier.
    #[arg(long, env = "HEXFLEET_SERVER_PID")]
    server_pid: Option<u32>,
    /// Also write the same update stream to this Redis with pipelined `GEOADD`, for the ratio.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// `GEOADD`s per Redis pipeline.
    #[arg(long, default_value_t = 64)]
    redis_pipeline: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TraceFormat {
    /// By extension and content.
    Auto,
    Gpx,
    /// `id,ts,lat,lng` (ts in Unix ms or s).
    Csv,
    /// `latitude,longitude` without timestamps, one fix per `--period`.
    LatLng,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    target: Target,
    /// Trace files; each trace in them becomes one courier.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = TraceFormat::Auto)]
    format: TraceFormat,
    /// Fix period assumed for traces without timestamps.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    period: Duration,
    /// Replay this many times faster than recorded (the server then sees faster couriers).
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Courier id prefix; the trace id is appended.
    #[arg(long, default_value = "replay-")]
    courier_prefix: String,
    /// Parse and summarise the traces, connect to nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    Courier,
    Customer,
    Dispatcher,
    Admin,
}

#[derive(Debug, Args)]
struct TokenArgs {
    #[arg(long, value_enum)]
    role: RoleArg,
    #[arg(long)]
    sub: String,
    #[arg(long, env = "HEXFLEET_TENANT", default_value = "demo")]
    tenant: String,
    /// The order a customer token may watch.
    #[arg(long)]
    order: Option<String>,
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    ttl: Duration,
    #[arg(long, env = "HEXFLEET_JWT_SECRET", default_value = hexfleet_sim::DEFAULT_JWT_SECRET, hide_env_values = true)]
    jwt_secret: String,
}

/// A parsed `--bbox`.
#[derive(Debug, Clone, Copy)]
struct BBoxArg([f64; 4]);

fn parse_bbox(s: &str) -> Result<BBoxArg, String> {
    let parts: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let arr: [f64; 4] = parts.try_into().map_err(|_| "expected min_lng,min_lat,max_lng,max_lat".to_owned())?;
    if !hexfleet_sim::geomath::BBox::from_array(arr).is_valid() {
        return Err("bbox must be finite, inside WGS84, with min < max".to_owned());
    }
    Ok(BBoxArg(arr))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log filter")?)
        .with_writer(std::io::stderr)
        .init();
    if let Cmd::Token(t) = &cli.cmd {
        return token(t);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("ctrl-c: stopping");
                    shutdown.cancel();
                }
            });
        }
        match cli.cmd {
            Cmd::Demo(a) => demo(a, shutdown).await,
            Cmd::Load(a) => load(a, shutdown).await,
            Cmd::Replay(a) => replay(a, shutdown).await,
            Cmd::Token(_) => unreachable!("handled above"),
        }
    })
}

fn token(a: &TokenArgs) -> anyhow::Result<()> {
    let role = match a.role {
        RoleArg::Courier => Role::Courier,
        RoleArg::Customer => Role::Customer,
        RoleArg::Dispatcher => Role::Dispatcher,
        RoleArg::Admin => Role::Admin,
    };
    anyhow::ensure!(role != Role::Customer || a.order.is_some(), "a customer token needs --order");
    let mint = TokenMint::new(&a.jwt_secret, &a.tenant, a.ttl.as_secs().max(1));
    println!("{}", mint.mint(role, &a.sub, a.order.as_deref())?);
    Ok(())
}

async fn demo(a: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = DemoConfig {
        base_url: a.target.url,
        jwt_secret: a.target.jwt_secret,
        tenant: a.target.tenant.unwrap_or_else(|| DemoConfig::default().tenant),
        couriers: a.couriers,
        bbox: a.bbox.map_or(hexfleet_sim::DEFAULT_BBOX, |b| b.0),
        orders_per_min: a.orders_per_min,
        watchers: a.watchers,
        consoles: a.consoles,
        max_trip_m: a.max_trip_m,
        seed: a.seed,
    };
    if let Some(d) = a.duration {
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            s.cancel();
        });
    }
    tracing::info!(url = %cfg.base_url, couriers = cfg.couriers, orders_per_min = cfg.orders_per_min, "demo fleet starting");
    run_demo(cfg, shutdown).await
}

async fn load(a: LoadArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let want = (a.couriers + a.watchers + a.track + 256) as u64;
    let limit = raise_fd_limit(want);
    if limit < want {
        tracing::warn!(limit, want, "open-file limit is below the sockets asked for; some connects will fail");
    }
    let defaults = LoadConfig::default();
    let cfg = LoadConfig {
        base_url: a.target.url,
        courier_url: a.courier_url,
        jwt_secret: a.target.jwt_secret,
        tenant: a.target.tenant.unwrap_or(defaults.tenant),
        couriers: a.couriers,
        rate: a.rate,
        duration: a.duration,
        ramp: a.ramp,
        watchers: a.watchers,
        track: a.track,
        bbox: a.bbox.map_or(hexfleet_sim::DEFAULT_BBOX, |b| b.0),
        watch_bbox: a.watch_bbox.map(|b| b.0),
        source_addrs: a.source_addrs,
        connect_concurrency: a.connect_concurrency,
        shards: a.shards,
        connect_timeout: a.connect_timeout,
        server_pid: a.server_pid,
        redis_url: a.redis_url,
        redis_pipeline: a.redis_pipeline,
        seed: a.seed,
        progress: !a.quiet,
        preregister: a.preregister,
    };
    let report = run_load(cfg, shutdown).await?;
    if a.json {
        eprintln!("{}", report.table());
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.table());
    }
    Ok(())
}

fn load_traces(path: &std::path::Path, format: TraceFormat, period: Duration) -> anyhow::Result<Vec<Trace>> {
    let read = || std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("trace");
    let period_ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX).max(1);
    let traces = match format {
        TraceFormat::Auto => trace::load_with_period(path, period_ms)?,
        TraceFormat::Gpx => vec![trace::parse_gpx(stem, &read()?)?],
        TraceFormat::Csv => trace::parse_csv_id_ts(&read()?)?,
        TraceFormat::LatLng => vec![trace::parse_csv_lat_lng(stem, &read()?, period_ms)?],
    };
    Ok(traces)
}

async fn replay(a: ReplayArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut traces = Vec::new();
    for f in &a.files {
        let t = load_traces(f, a.format, a.period).with_context(|| format!("loading {}", f.display()))?;
        traces.extend(t);
    }
    anyhow::ensure!(!traces.is_empty(), "no traces in the given files");
    for t in &traces {
        println!(
            "trace {:<24} {:>6} fixes  {:>8.1} s  max {:>5.1} m/s",
            t.id,
            t.fixes.len(),
            t.duration_ms() as f64 / 1000.0,
            t.max_speed()
        );
    }
    if a.dry_run {
        return Ok(());
    }
    let server = Server::parse(&a.target.url)?;
    let mint = TokenMint::new(&a.target.jwt_secret, a.target.tenant.as_deref().unwrap_or("demo"), 24 * 3600);
    let mut tasks = tokio::task::JoinSet::new();
    for t in traces {
        let id = format!("{}{}", a.courier_prefix, t.id);
        let token = mint.courier(&id)?;
        let (server, shutdown, speedup) = (server.clone(), shutdown.clone(), a.speedup);
        tasks.spawn(async move {
            let r = hexfleet_sim::replay::replay(&server, &token, &t, speedup, &shutdown).await;
            (id, r)
        });
    }
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        let (id, r) = r.context("replay task panicked")?;
        match r {
            Ok(rep) => println!(
                "courier {id}: sent {} fixes, {} frames back, {} error frames",
                rep.sent, rep.server_frames, rep.server_errors
            ),
            Err(e) => {
                failed += 1;
                eprintln!("courier {id}: {e:#}");
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} replays failed");
    Ok(())
}
