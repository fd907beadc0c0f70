//! Command line and configuration of the `hexfleet` binary (clap; every flag is also an
//! environment variable, and `--config FILE` may name a TOML file whose keys are the long flag
//! names, e.g. `listen = "0.0.0.0:8080"`; flags and environment win over the file).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use std::time::Duration;

use clap::{Args, CommandFactory as _, Parser, Subcommand};

use crate::auth::Role;

/// The secret used when none is configured: fine on a laptop, refused on a public address.
pub const DEV_JWT_SECRET: &str = "hexfleet-dev-secret";
/// The shortest JWT secret accepted off loopback: 256 bits, the size of HS256's hash (RFC 7518, 3.2).
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, Parser)]
#[command(name = "hexfleet", version, about = "Real-time courier tracking and dispatch")]
pub struct Cli {
    /// TOML file with defaults for the flags (keys are the long flag names).
    #[arg(long, env = "HEXFLEET_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "HEXFLEET_LOG_FORMAT", default_value = "text", global = true, value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
    /// Run the server and a simulated fleet in one process; prints the console URL.
    Demo(DemoArgs),
    /// Print a signed token.
    Token(TokenArgs),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HEXFLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// `postgres://…` for PostgreSQL; otherwise a SQLite file (default `./data/hexfleet.db`).
    #[arg(long, env = "DATABASE_URL", default_value = hexfleet_persistence::DEFAULT_SQLITE_PATH)]
    pub database_url: String,
    /// Redis for fan-out between nodes (optional).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel (separates deployments sharing a Redis).
    #[arg(long, env = "HEXFLEET_REDIS_PREFIX", default_value = "hexfleet:")]
    pub redis_prefix: String,
    /// HS256 secret for tokens (shared with `hexfleet token`): at least 32 bytes (e.g.
    /// `openssl rand -hex 32`) to serve on an address other than loopback.
    #[arg(long, env = "HEXFLEET_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Without a secret, use the built-in development one, which everyone knows, and say so
    /// quietly: for local runs and benchmarks. Only on loopback addresses, where it is used
    /// without this flag too (with a louder warning). `demo` implies it.
    #[arg(long, env = "HEXFLEET_DEV_SECRET", default_value_t = false)]
    pub dev_secret: bool,
    /// Dispatch round period in milliseconds.
    #[arg(long, env = "HEXFLEET_DISPATCH_TICK_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub dispatch_tick_ms: u64,
    /// How long a courier has to answer an offer, in milliseconds.
    #[arg(long, env = "HEXFLEET_OFFER_TIMEOUT_MS", default_value_t = 20_000, value_parser = clap::value_parser!(i64).range(100..=3_600_000))]
    pub offer_timeout_ms: i64,
    /// Couriers whose last GPS fix reached the server more than this many seconds ago get no
    /// offers or assignments (an app that died without going offline), whatever their status.
    #[arg(long, env = "HEXFLEET_COURIER_STALE_S", default_value_t = 120, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub courier_stale_s: u32,
    /// Take orders not yet picked up back from a courier silent (no GPS fix) for this many
    /// seconds and dispatch them again. 0 (the default): never; dispatchers are told with a
    /// `courier.silent` event and decide. GPS often drops indoors at a pickup, so keep it well
    /// above `--courier-stale-s`.
    #[arg(long, env = "HEXFLEET_RELEASE_SILENT_AFTER_S", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub release_silent_after_s: u32,
    /// Assign orders without asking couriers.
    #[arg(long, env = "HEXFLEET_AUTO_ACCEPT", default_value_t = false)]
    pub auto_accept: bool,
    /// Fleets (tenants) whose orders are assigned without asking their couriers (comma
    /// separated), when `--auto-accept` is off.
    #[arg(long, env = "HEXFLEET_AUTO_ACCEPT_TENANTS", value_delimiter = ',')]
    pub auto_accept_tenants: Vec<String>,
    /// Matching policy of the dispatcher: `optimal` (minimum total cost) or `greedy` (baseline).
    #[arg(long, env = "HEXFLEET_DISPATCH_POLICY", default_value = "optimal", value_parser = ["optimal", "greedy"])]
    pub dispatch_policy: String,
    /// Batching: the most a new order may delay an order a courier already holds, in seconds.
    #[arg(long, env = "HEXFLEET_BATCH_MAX_DELAY_S", default_value_t = 600.0, value_parser = parse_batch_delay)]
    pub batch_max_delay_s: f64,
    /// This node's name in logs and in cross-node fan-out (default: random).
    #[arg(long, env = "HEXFLEET_NODE_ID")]
    pub node_id: Option<String>,
    /// Lease markets (tenants) between nodes sharing the database: one node at a time runs a
    /// market's actors and dispatch, other nodes forward its requests there, and a market
    /// whose owner dies is taken over when its lease lapses. Default: on when `REDIS_URL` is
    /// set (several nodes), off otherwise (one node owns everything).
    #[arg(long, env = "HEXFLEET_MARKET_LEASES", action = clap::ArgAction::Set)]
    pub market_leases: Option<bool>,
    /// Base URL other nodes reach this one at, e.g. `http://node-a:8080` (default:
    /// `http://<listen address>`, which must then not be 0.0.0.0).
    #[arg(long, env = "HEXFLEET_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Market lease length in milliseconds: how long a dead node's markets wait before another
    /// node takes them over. Leases are renewed every third of it.
    #[arg(long, env = "HEXFLEET_MARKET_LEASE_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(300..=600_000))]
    pub market_lease_ms: u64,
    /// A second port for courier sockets only (`/v1/ws/courier`, same protocol and tokens),
    /// served by tokio-tungstenite on the raw stream instead of through the HTTP stack: less
    /// CPU per GPS fix (BENCHMARKS.md). Off by default; the main port serves couriers either way.
    #[arg(long, env = "HEXFLEET_INGEST_LISTEN")]
    pub ingest_listen: Option<String>,
    /// Connections the ingest port holds at most; more are answered 503 `over_capacity` with
    /// `Retry-After`. Default: the process's open-file limit less 256, kept for the database,
    /// Redis and the HTTP port.
    #[arg(long, env = "HEXFLEET_INGEST_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub ingest_max_connections: Option<u64>,
    /// Connections the ingest port holds at most per client IP address (an IPv6 client counts
    /// by its /64); more are answered 429
    /// `too_many_connections`. Default: no such cap (couriers behind a carrier's NAT share
    /// addresses).
    #[arg(long, env = "HEXFLEET_INGEST_MAX_PER_IP", value_parser = clap::value_parser!(u64).range(1..))]
    pub ingest_max_per_ip: Option<u64>,
    /// Requests per second each client address may send to the HTTP port (REST, `/osmand`,
    /// WebSocket upgrades; an IPv6 client counted by its /64); more are answered 429
    /// `rate_limited` with `Retry-After`. 0 (the default): no limit. Behind a proxy, set
    /// `--trust-forwarded-for` too, or every client shares the proxy's budget. Requests another
    /// node forwards to a market's owner are counted on the node they reached, not again.
    /// Trackers behind a carrier's NAT share an address: allow for them.
    #[arg(long, env = "HEXFLEET_HTTP_LIMIT_PER_IP", default_value_t = 0)]
    pub http_limit_per_ip: u32,
    /// Requests an address may send at once after a quiet spell (default: twice the rate).
    #[arg(long, env = "HEXFLEET_HTTP_LIMIT_BURST", default_value_t = 0)]
    pub http_limit_burst: u32,
    /// Addresses or networks never limited, comma-separated (`10.0.0.0/8,192.0.2.7`): monitors,
    /// internal services.
    #[arg(long, env = "HEXFLEET_HTTP_LIMIT_EXEMPT", value_delimiter = ',', value_parser = parse_net)]
    pub http_limit_exempt: Vec<ipnet::IpNet>,
    /// Count a request against the last address in its `X-Forwarded-For` (the client as the
    /// proxy in front saw it) rather than the connection's. Only behind a proxy that appends
    /// to that header, since a client reaching the server directly can write it.
    #[arg(long, env = "HEXFLEET_TRUST_FORWARDED_FOR", default_value_t = false)]
    pub trust_forwarded_for: bool,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "HEXFLEET_WORKERS", value_parser = parse_workers)]
    pub workers: Option<usize>,
    /// Days of location history kept; older samples are purged (privacy).
    #[arg(long, env = "HEXFLEET_HISTORY_RETENTION_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub history_retention_days: u32,
    /// How often the retention purge runs (e.g. `1h`, `15m`); it also runs once at start.
    #[arg(long, env = "HEXFLEET_HISTORY_PURGE_INTERVAL", default_value = "1h", value_parser = parse_purge_interval)]
    pub history_purge_interval: Duration,
    /// Console batch window in milliseconds: positions for a console are conflated (latest per
    /// courier) and sent at most this often. It bounds update → console latency (p99 is about
    /// the window plus queueing) and the frames per second each console receives. 10 keeps
    /// p99 under the 25 ms target up to about 50k updates/s on two cores; raise it (e.g. 250)
    /// to send fewer, larger frames.
    #[arg(long, env = "HEXFLEET_CONSOLE_BATCH_MS", default_value_t = crate::ws::CONSOLE_BATCH.as_millis() as u64, value_parser = clap::value_parser!(u64).range(5..=5_000))]
    pub console_batch_ms: u64,
    /// Fleet index (R-tree) freshness in milliseconds: the most `nearby`, dispatch and console
    /// snapshots lag behind live positions. A tenant's index is rebuilt from live positions
    /// (a bulk load: about 8 ms for 20k couriers, 46 ms for 100k, on a blocking thread) when a
    /// read finds it older than this, and every period while it is being read; a tenant
    /// nobody reads is not rebuilt.
    #[arg(long, env = "HEXFLEET_INDEX_REBUILD_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub index_rebuild_ms: u64,
    /// Recent fixes each courier keeps in memory (`GET /v1/couriers/{id}/trail`, the console's
    /// breadcrumbs): 24 bytes each per courier. Older positions are in the location history.
    #[arg(long, env = "HEXFLEET_TRAIL_LEN", default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub trail_len: u64,
    /// Learn travel speeds per H3 cell and hour of week from the fleet's movement and use them
    /// for ETAs and dispatch (`--learn-speeds false`: every vehicle at its prior speed).
    #[arg(long, env = "HEXFLEET_LEARN_SPEEDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub learn_speeds: bool,
    /// Webhook request timeout in milliseconds (connect, send, and wait for the status).
    #[arg(long, env = "HEXFLEET_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=120_000))]
    pub webhook_timeout_ms: u64,
    /// Attempts per webhook delivery before it is given up (dead). With the default backoff,
    /// 15 attempts span about 3 hours.
    #[arg(long, env = "HEXFLEET_WEBHOOK_MAX_ATTEMPTS", default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub webhook_max_attempts: u32,
    /// Wait before the second attempt in milliseconds; it doubles per attempt, up to an hour.
    #[arg(long, env = "HEXFLEET_WEBHOOK_BACKOFF_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub webhook_backoff_ms: u64,
    /// Consecutive failed attempts after which a webhook's endpoint is paused (its circuit
    /// opens): its deliveries wait, attempts uncounted, so one dead endpoint neither burns its
    /// own retries nor holds up other webhooks.
    #[arg(long, env = "HEXFLEET_WEBHOOK_BREAKER_AFTER", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub webhook_breaker_after: u32,
    /// First pause of a failing endpoint in milliseconds; it doubles each time the probe after
    /// a pause fails, up to 10 minutes.
    #[arg(long, env = "HEXFLEET_WEBHOOK_BREAKER_COOLDOWN_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub webhook_breaker_cooldown_ms: u64,
    /// Webhook deliveries in flight at once, over all webhooks.
    #[arg(long, env = "HEXFLEET_WEBHOOK_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    pub webhook_concurrency: u32,
    /// Webhook deliveries in flight at once to one webhook: a slow endpoint holds no more of
    /// the concurrency than this, and the other webhooks' deliveries go on around it.
    #[arg(long, env = "HEXFLEET_WEBHOOK_PER_ENDPOINT", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    pub webhook_per_endpoint: u32,
    /// Webhook deliveries in flight at once for one tenant, over its webhooks: a tenant with
    /// many slow endpoints leaves the rest of the concurrency to the others. Free slots go to
    /// the tenants with the fewest deliveries in flight.
    #[arg(long, env = "HEXFLEET_WEBHOOK_PER_TENANT", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    pub webhook_per_tenant: u32,
    /// Hours after which a webhook delivery not attempted since is given up (dead; a
    /// redelivery sends it again): an endpoint that stays down does not grow the outbox for
    /// ever. At least 2 (the longest wait between attempts is 1 h, plus jitter).
    #[arg(long, env = "HEXFLEET_WEBHOOK_GIVE_UP_HOURS", default_value_t = 72, value_parser = clap::value_parser!(u32).range(2..=8_760))]
    pub webhook_give_up_hours: u32,
    /// Let webhooks reach loopback, private and link-local addresses (on-premises receivers).
    /// Unset: only on a server listening on loopback alone (a laptop, a test harness with its
    /// receiver beside it); off on any other, where a tenant's dispatcher must not be able to
    /// probe the internal network.
    #[arg(long, env = "HEXFLEET_WEBHOOK_ALLOW_PRIVATE", action = clap::ArgAction::Set)]
    pub webhook_allow_private: Option<bool>,
    /// Take OsmAnd/Traccar reports that carry no device key (`key=`), as Traccar does: then a
    /// device id is the only credential, and anyone who learns one can move its courier. Unset:
    /// only on a server listening on loopback alone (a laptop, a test harness sending Traccar
    /// Client's exact requests); off on any other. A report with a key is checked either way.
    /// Each device's key is `GET /v1/couriers/{id}/device-key`.
    #[arg(long, env = "HEXFLEET_OSMAND_KEYLESS", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub osmand_keyless: Option<bool>,
}

/// An address (`192.0.2.7`, `2001:db8::1`) or a network (`10.0.0.0/8`).
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an address nor a network (10.0.0.0/8)"))
}

fn parse_purge_interval(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600), "1s", "30 days")
}

/// A token lives at most a year: a socket's session deadline and `exp` stay far from overflow.
fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_secs(1), Duration::from_secs(366 * 24 * 3600), "1s", "366 days")
}

/// A `humantime` duration within `[min, max]`: a value past what a timer can hold panicked at
/// start (an `Instant` overflow) instead of being refused.
fn duration_within(s: &str, min: Duration, max: Duration, min_text: &str, max_text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < min || d > max {
        return Err(format!("must be between {min_text} and {max_text}"));
    }
    Ok(d)
}

/// Seconds, finite, 0 to a day (NaN compared false with everything and disabled the check).
fn parse_batch_delay(s: &str) -> Result<f64, String> {
    finite_within(s, 0.0, 86_400.0)
}

fn parse_orders_per_min(s: &str) -> Result<f64, String> {
    finite_within(s, 0.0, 1_000_000.0)
}

fn finite_within(s: &str, min: f64, max: f64) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() || v < min || v > max {
        return Err(format!("must be a number from {min} to {max}"));
    }
    Ok(v)
}

/// 1 to 1,024 (actix panics on 0 workers).
fn parse_workers(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=1_024) => Ok(n),
        _ => Err("must be a whole number from 1 to 1024".into()),
    }
}

/// 0 to 100,000 simulated couriers.
fn parse_demo_couriers(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 0..=100_000) => Ok(n),
        _ => Err("must be a whole number from 0 to 100000".into()),
    }
}

/// Whether `addr` (`host:port`) resolves, and only to loopback addresses.
fn resolves_to_loopback(addr: &str) -> bool {
    use std::net::ToSocketAddrs as _;
    addr.to_socket_addrs().is_ok_and(|a| {
        let all: Vec<std::net::SocketAddr> = a.collect();
        !all.is_empty() && all.iter().all(|s| s.ip().is_loopback())
    })
}

impl ServeArgs {
    /// The secret to use. On an address other than loopback (the HTTP port's or the ingest
    /// port's: both check tokens) it must be configured, with at least [`MIN_SECRET_LEN`] bytes
    /// (an HS256 key shorter than its 256-bit hash can be guessed offline from any token).
    /// On loopback a short one, or none (the public development secret), is taken with a
    /// warning: the design brief's `hexfleet serve --listen ADDR` must start as it is, and a
    /// test harness or a laptop rarely sets a long secret. The risk left is a loopback server
    /// published by a reverse proxy; the warning names it.
    pub fn secret(&self) -> anyhow::Result<String> {
        match (&self.jwt_secret, self.public_address()) {
            (Some(s), _) if s.len() >= MIN_SECRET_LEN => Ok(s.clone()),
            (Some(_), Some(addr)) => {
                anyhow::bail!("HEXFLEET_JWT_SECRET must be at least {MIN_SECRET_LEN} bytes to serve on {addr} (e.g. `openssl rand -hex 32`)")
            }
            (None, Some(addr)) => anyhow::bail!(
                "set HEXFLEET_JWT_SECRET (at least {MIN_SECRET_LEN} bytes, e.g. `openssl rand -hex 32`) to serve on {addr}: the development secret is public, and taken on loopback only"
            ),
            (Some(s), None) => {
                tracing::warn!(bytes = s.len(), "HEXFLEET_JWT_SECRET is shorter than {MIN_SECRET_LEN} bytes: its tokens can be guessed offline; taken on loopback only (do not publish this server through a proxy)");
                Ok(s.clone())
            }
            (None, None) if self.dev_secret => {
                tracing::warn!("HEXFLEET_JWT_SECRET is not set: using the development secret (loopback only)");
                Ok(DEV_JWT_SECRET.to_owned())
            }
            (None, None) => {
                tracing::warn!("HEXFLEET_JWT_SECRET is not set: using the public development secret, with which anyone can sign any token; taken on loopback only (do not publish this server through a proxy; set a secret of at least {MIN_SECRET_LEN} bytes)");
                Ok(DEV_JWT_SECRET.to_owned())
            }
        }
    }

    /// The first address this server is reached at that is not loopback: the HTTP port's, the
    /// ingest port's, or the URL other nodes use (`--advertise-url`); `None` for a server on
    /// loopback alone. An address is loopback when everything it resolves to is (a name such as
    /// `localhost.example.com` may resolve anywhere; one that does not resolve is not).
    fn public_address(&self) -> Option<String> {
        let advertised = self.advertise_url.as_deref().map(|u| match url::Url::parse(u) {
            Ok(p) => format!("{}:{}", p.host_str().unwrap_or_default(), p.port_or_known_default().unwrap_or(80)),
            Err(_) => u.to_owned(),
        });
        std::iter::once(self.listen.clone()).chain(self.ingest_listen.clone()).chain(advertised).find(|a| !resolves_to_loopback(a))
    }

    /// Whether webhooks may reach private addresses: as set, or, unset, on a server on loopback
    /// alone (`--webhook-allow-private`).
    pub fn webhooks_allow_private(&self) -> bool {
        self.webhook_allow_private.unwrap_or_else(|| self.public_address().is_none())
    }

    /// Whether OsmAnd/Traccar reports without a device key are taken: as set, or, unset, on a
    /// server on loopback alone (`--osmand-keyless`).
    pub fn takes_keyless_osmand(&self) -> bool {
        self.osmand_keyless.unwrap_or_else(|| self.public_address().is_none())
    }

    /// The development defaults a server on loopback alone takes where its flags are unset,
    /// for the log: a loopback server published by a reverse proxy should set them.
    pub fn loopback_defaults(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.public_address().is_none() {
            if self.webhook_allow_private.is_none() {
                out.push("webhooks may reach private addresses (--webhook-allow-private false to refuse)");
            }
            if self.osmand_keyless.is_none() {
                out.push("OsmAnd reports without a device key are taken (--osmand-keyless false to refuse)");
            }
        }
        out
    }

    /// How long location history is kept.
    pub fn history_retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.history_retention_days) * 24 * 3600)
    }

    pub fn fleet_config(&self) -> hexfleet_actors::FleetConfig {
        hexfleet_actors::FleetConfig {
            dispatch_tick: Duration::from_millis(self.dispatch_tick_ms.max(10)),
            offer_timeout_ms: self.offer_timeout_ms.max(100),
            courier_stale_ms: i64::from(self.courier_stale_s.max(1)) * 1_000,
            release_silent_after_ms: (self.release_silent_after_s > 0).then(|| i64::from(self.release_silent_after_s) * 1_000),
            auto_accept: self.auto_accept,
            auto_accept_tenants: self.auto_accept_tenants.clone(),
            dispatch_policy: hexfleet_actors::fleet::DispatchPolicy::parse(&self.dispatch_policy).unwrap_or_default(),
            batch_max_delay_s: self.batch_max_delay_s.max(0.0),
            index_rebuild: Duration::from_millis(self.index_rebuild_ms),
            learn_speeds: self.learn_speeds,
            trail_len: usize::try_from(self.trail_len).unwrap_or(1_000),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Simulated couriers.
    #[arg(long, env = "HEXFLEET_DEMO_COURIERS", default_value_t = 200, value_parser = parse_demo_couriers)]
    pub couriers: usize,
    /// Mean new orders per minute.
    #[arg(long, env = "HEXFLEET_DEMO_ORDERS_PER_MIN", default_value_t = 40.0, value_parser = parse_orders_per_min)]
    pub orders_per_min: f64,
    /// Stop after this long (e.g. `10m`); runs until Ctrl-C when absent.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    #[arg(long, value_enum)]
    pub role: Role,
    #[arg(long)]
    pub sub: String,
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    /// The order a customer token may watch.
    #[arg(long)]
    pub order: Option<String>,
    #[arg(long, default_value = "1h", value_parser = parse_token_ttl)]
    pub ttl: Duration,
    #[arg(long, env = "HEXFLEET_JWT_SECRET", hide_env_values = true, default_value = DEV_JWT_SECRET)]
    pub jwt_secret: String,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[arg(long, env = "DATABASE_URL", default_value = hexfleet_persistence::DEFAULT_SQLITE_PATH)]
    pub database_url: String,
}

/// Merges `--config FILE` (or `HEXFLEET_CONFIG`) into the argument list: every key of the TOML
/// file is a long flag name of the subcommand (`listen`, `database_url`, …). A flag given on the
/// command line or through its environment variable wins over the file. Unknown keys are an
/// error, so a typo does not silently fall back to a default.
pub fn argv_with_config(argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let mut path: Option<PathBuf> = std::env::var_os("HEXFLEET_CONFIG").map(PathBuf::from);
    for (i, a) in argv.iter().enumerate() {
        let a = a.to_string_lossy();
        if a == "--config" {
            path = argv.get(i + 1).map(PathBuf::from);
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        }
    }
    let Some(path) = path else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config {}", path.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("config {} is not valid TOML", path.display()))?;
    let cmd = Cli::command();
    let Some((at, sub)) = argv.iter().enumerate().skip(1).find_map(|(i, a)| cmd.find_subcommand(a).map(|s| (i, s))) else {
        return Ok(argv);
    };
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let named = |a: &clap::Arg| a.get_long() == Some(long.as_str());
        // The subcommand's flags and the global ones (`log_format`; `config` itself is not
        // read from the file).
        let Some(arg) = sub.get_arguments().find(|a| named(a)).or_else(|| cmd.get_arguments().find(|a| named(a) && a.get_id() != "config"))
        else {
            // One file for every subcommand (an init container's `migrate` and the server's
            // `serve`): a key another subcommand takes is not this one's business.
            if cmd.get_subcommands().any(|s| s.get_arguments().any(&named)) {
                continue;
            }
            anyhow::bail!("config {}: unknown key `{key}`", path.display());
        };
        let flag = format!("--{long}");
        let on_cli = argv.iter().any(|a| a.to_string_lossy() == flag || a.to_string_lossy().starts_with(&format!("{flag}=")));
        let in_env = arg.get_env().is_some_and(|e| std::env::var_os(e).is_some());
        if on_cli || in_env {
            continue;
        }
        match value {
            // A flag that takes its value (`--learn-speeds false`) gets it; a switch
            // (`--auto-accept`) is given for true and left out for false.
            toml::Value::Boolean(b) if arg.get_action().takes_values() => extra.push(format!("{flag}={b}").into()),
            toml::Value::Boolean(true) => extra.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => extra.extend([flag.into(), s.into()]),
            // A list (`auto_accept_tenants = ["a", "b"]`): its items, not its TOML text (which
            // made the tenants `["a"` and ` "b"]`).
            toml::Value::Array(items) => {
                let items: Vec<String> = items
                    .into_iter()
                    .map(|v| match v {
                        toml::Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .collect();
                match arg.get_value_delimiter() {
                    Some(d) => extra.extend([flag.into(), items.join(&d.to_string()).into()]),
                    None => {
                        for item in items {
                            extra.extend([OsString::from(&flag), item.into()]);
                        }
                    }
                }
            }
            other => extra.extend([flag.into(), other.to_string().into()]),
        }
    }
    let mut out = argv;
    let tail = out.split_off(at + 1);
    out.extend(extra);
    out.extend(tail);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_limit_exempt_takes_addresses_and_networks_and_refuses_the_rest() {
        assert_eq!(parse_net(" 10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_net("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(parse_net("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        for bad in ["nonsense", "10.0.0.0/33", "", "10.0.0"] {
            let e = parse_net(bad).unwrap_err();
            assert!(e.contains("neither an address nor a network"), "{bad}: {e}");
        }
    }

    #[test]
    fn config_file_fills_flags_and_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hexfleet.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:9999\"\ndispatch_tick_ms = 500\nauto_accept = true\ndatabase_url = \"x.db\"\n").unwrap();
        let argv: Vec<OsString> = ["hexfleet", "--config", f.to_str().unwrap(), "serve", "--database-url", "y.db"].map(Into::into).into();
        let cli = Cli::try_parse_from(argv_with_config(argv).unwrap()).unwrap();
        let Cmd::Serve(s) = cli.cmd else { panic!("not serve") };
        assert_eq!(s.listen, "127.0.0.1:9999");
        assert_eq!(s.dispatch_tick_ms, 500);
        assert!(s.auto_accept);
        assert_eq!(s.database_url, "y.db");
    }

    /// Values past what the server can run with are refused at parse time, with the flag
    /// named: before, a purge interval of 10¹¹ years or 0 workers panicked at start, a huge
    /// offer timeout wrapped the expiry time, and a NaN delay turned the batching check off.
    #[test]
    fn absurd_values_are_refused_with_the_flag_named() {
        for (flag, value) in [
            ("--history-purge-interval", "100000000000years"),
            ("--history-purge-interval", "500ms"),
            ("--dispatch-tick-ms", "18446744073709551615"),
            ("--dispatch-tick-ms", "0"),
            ("--offer-timeout-ms", "9223372036854775807"),
            ("--offer-timeout-ms", "-5"),
            ("--courier-stale-s", "0"),
            ("--batch-max-delay-s", "NaN"),
            ("--batch-max-delay-s", "inf"),
            ("--batch-max-delay-s", "-1"),
            ("--workers", "0"),
            ("--workers", "100000"),
        ] {
            let e = Cli::try_parse_from(["hexfleet".to_string(), "serve".into(), format!("{flag}={value}")]).expect_err(&format!("{flag} {value}")).to_string();
            assert!(e.contains(flag), "{flag} {value}: {e}");
        }
        for (flag, value) in [("--couriers", "1000000000"), ("--orders-per-min", "NaN"), ("--orders-per-min", "-3")] {
            let e = Cli::try_parse_from(["hexfleet".to_string(), "demo".into(), format!("{flag}={value}")]).expect_err(&format!("{flag} {value}")).to_string();
            assert!(e.contains(flag), "{flag} {value}: {e}");
        }
        // 0 (the default) takes nothing back from silent couriers.
        let fleet = |args: &[&str]| {
            let Cmd::Serve(s) = Cli::try_parse_from(["hexfleet", "serve"].iter().chain(args)).unwrap().cmd else { panic!() };
            s.fleet_config().release_silent_after_ms
        };
        assert_eq!((fleet(&[]), fleet(&["--release-silent-after-s", "600"])), (None, Some(600_000)));
        // `--osmand-keyless` alone means true, as the docs write it; unset, a server on
        // loopback alone takes keyless reports and any other refuses them.
        for (args, want) in [
            (&["--osmand-keyless"][..], true),
            (&["--osmand-keyless", "false"][..], false),
            (&[][..], true),
            (&["--listen", "0.0.0.0:8080"][..], false),
            (&["--listen", "0.0.0.0:8080", "--osmand-keyless"][..], true),
        ] {
            let cli = Cli::try_parse_from(["hexfleet", "serve"].iter().chain(args)).unwrap();
            let Cmd::Serve(s) = cli.cmd else { panic!() };
            assert_eq!(s.takes_keyless_osmand(), want, "{args:?}");
            assert_eq!(s.loopback_defaults().len(), if args.is_empty() { 2 } else { usize::from(args[0] == "--osmand-keyless") }, "{args:?}");
        }
        let e = Cli::try_parse_from(["hexfleet", "token", "--role", "admin", "--sub", "a", "--ttl", "1000000years"]).unwrap_err().to_string();
        assert!(e.contains("--ttl"), "{e}");
        // The defaults and ordinary values still parse.
        let ok = Cli::try_parse_from(["hexfleet", "serve", "--history-purge-interval", "15m", "--workers", "4", "--batch-max-delay-s", "0", "--offer-timeout-ms", "30000"]).unwrap();
        let Cmd::Serve(s) = ok.cmd else { panic!() };
        assert_eq!((s.workers, s.batch_max_delay_s, s.offer_timeout_ms), (Some(4), 0.0, 30_000));
    }

    #[test]
    fn unknown_config_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "lisen = \"x\"\n").unwrap();
        let argv: Vec<OsString> = ["hexfleet", "--config", f.to_str().unwrap(), "serve"].map(Into::into).into();
        let e = argv_with_config(argv).unwrap_err().to_string();
        assert!(e.contains("unknown key `lisen`"), "{e}");
    }

    /// One file serves every subcommand (`migrate` in an init container, `serve` beside it):
    /// a key of another subcommand is skipped, a global one (`log_format`) taken, and a list
    /// gives its items. Before, `migrate` refused `listen`, `log_format` was "unknown", and
    /// `auto_accept_tenants = ["a", "b"]` made the tenants `["a"` and ` "b"]`.
    #[test]
    fn one_config_file_serves_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hexfleet.toml");
        let text = "listen = \"127.0.0.1:9999\"\ndatabase_url = \"x.db\"\nlog_format = \"json\"\nauto_accept_tenants = [\"a\", \"b\"]\n";
        std::fs::write(&f, text).unwrap();
        let argv = |sub: &str| -> Vec<OsString> { ["hexfleet", "--config", f.to_str().unwrap(), sub].map(Into::into).into() };
        let cli = Cli::try_parse_from(argv_with_config(argv("serve")).unwrap()).unwrap();
        assert_eq!(cli.log_format, "json");
        let Cmd::Serve(s) = cli.cmd else { panic!("not serve") };
        assert_eq!((s.listen.as_str(), s.auto_accept_tenants.clone()), ("127.0.0.1:9999", vec!["a".to_string(), "b".to_string()]));
        let cli = Cli::try_parse_from(argv_with_config(argv("migrate")).unwrap()).unwrap();
        assert_eq!(cli.log_format, "json");
        let Cmd::Migrate(m) = cli.cmd else { panic!("not migrate") };
        assert_eq!(m.database_url, "x.db");
        assert!(Cli::try_parse_from(["hexfleet", "--log-format", "JSON", "serve"]).is_err(), "only text or json");
    }

    #[test]
    fn console_window_and_index_period_defaults_and_bounds() {
        let cli = Cli::try_parse_from(["hexfleet", "serve"]).unwrap();
        let Cmd::Serve(s) = cli.cmd else { panic!() };
        assert_eq!((s.console_batch_ms, s.index_rebuild_ms), (10, 100));
        assert_eq!(s.fleet_config().index_rebuild, Duration::from_millis(100));
        let cli = Cli::try_parse_from(["hexfleet", "serve", "--console-batch-ms", "250", "--index-rebuild-ms", "200"]).unwrap();
        let Cmd::Serve(s) = cli.cmd else { panic!() };
        assert_eq!((s.console_batch_ms, s.index_rebuild_ms), (250, 200));
        assert_eq!(s.fleet_config().index_rebuild, Duration::from_millis(200));
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--console-batch-ms", "0"]).is_err());
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--index-rebuild-ms", "1"]).is_err());
    }

    #[test]
    fn speed_learning_and_webhook_flags() {
        let cli = Cli::try_parse_from(["hexfleet", "serve"]).unwrap();
        let Cmd::Serve(s) = cli.cmd else { panic!() };
        assert!(s.learn_speeds && s.fleet_config().learn_speeds);
        assert_eq!(s.fleet_config().trail_len, hexfleet_actors::FleetConfig::default().trail_len);
        assert_eq!((s.webhook_timeout_ms, s.webhook_max_attempts, s.webhook_backoff_ms), (10_000, 15, 1_000));
        assert_eq!((s.webhook_breaker_after, s.webhook_breaker_cooldown_ms), (5, 30_000));
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--webhook-breaker-after", "0"]).is_err());
        assert!(s.webhooks_allow_private(), "a server on loopback alone may reach a receiver beside it");
        let public = |extra: &[&str]| {
            let args = ["hexfleet", "serve", "--listen", "0.0.0.0:8080"].iter().chain(extra).copied();
            let Cmd::Serve(s) = Cli::try_parse_from(args).unwrap().cmd else { panic!() };
            s.webhooks_allow_private()
        };
        assert!(!public(&[]), "on a public address private destinations are refused unless asked for");
        assert!(public(&["--webhook-allow-private", "true"]));
        let Cmd::Serve(s) = Cli::try_parse_from(["hexfleet", "serve", "--webhook-allow-private", "false"]).unwrap().cmd else { panic!() };
        assert!(!s.webhooks_allow_private(), "refused on loopback too when asked");
        let Cmd::Serve(s) = Cli::try_parse_from(["hexfleet", "serve", "--ingest-listen", "0.0.0.0:9"]).unwrap().cmd else { panic!() };
        assert!(!s.webhooks_allow_private(), "a public ingest port makes the server public");
        let d = crate::webhooks::WebhookConfig::default();
        assert_eq!(
            (s.webhook_concurrency as usize, s.webhook_per_endpoint as usize, s.webhook_per_tenant as usize),
            (d.concurrency, d.per_webhook, d.per_tenant)
        );
        assert_eq!(
            std::time::Duration::from_secs(u64::from(s.webhook_give_up_hours) * 3600),
            d.give_up_after
        );
        let cli = Cli::try_parse_from(["hexfleet", "serve", "--learn-speeds", "false", "--webhook-max-attempts", "3"]).unwrap();
        let Cmd::Serve(s) = cli.cmd else { panic!() };
        assert!(!s.fleet_config().learn_speeds);
        assert_eq!(s.webhook_max_attempts, 3);
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--webhook-max-attempts", "0"]).is_err());
        // A tenant needs a slot; giving up within the longest retry wait (1 h) would give up
        // retries before their time.
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--webhook-per-tenant", "0"]).is_err());
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--webhook-give-up-hours", "1"]).is_err());
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--webhook-give-up-hours", "2"]).is_ok());
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--webhook-timeout-ms", "5"]).is_err());
    }

    #[test]
    fn history_retention_defaults_and_bounds() {
        let cli = Cli::try_parse_from(["hexfleet", "serve"]).unwrap();
        let Cmd::Serve(s) = cli.cmd else { panic!() };
        assert_eq!(s.history_retention_days, 30);
        assert_eq!(s.history_retention(), Duration::from_secs(30 * 86_400));
        assert_eq!(s.history_purge_interval, Duration::from_secs(3600));
        let cli = Cli::try_parse_from(["hexfleet", "serve", "--history-retention-days", "7", "--history-purge-interval", "15m"]).unwrap();
        let Cmd::Serve(s) = cli.cmd else { panic!() };
        assert_eq!(s.history_retention(), Duration::from_secs(7 * 86_400));
        assert_eq!(s.history_purge_interval, Duration::from_secs(900));
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--history-retention-days", "0"]).is_err());
        assert!(Cli::try_parse_from(["hexfleet", "serve", "--history-purge-interval", "10ms"]).is_err());
    }

    #[test]
    fn dev_secret_is_refused_off_loopback() {
        let cli = Cli::try_parse_from(["hexfleet", "serve", "--listen", "0.0.0.0:8080", "--dev-secret"]).unwrap();
        let Cmd::Serve(mut s) = cli.cmd else { panic!() };
        s.jwt_secret = None;
        assert!(s.secret().is_err());
        s.listen = "127.0.0.1:1".into();
        assert_eq!(s.secret().unwrap(), DEV_JWT_SECRET);
        // On loopback without asking for it too (the brief's `serve --listen ADDR`), warned.
        s.dev_secret = false;
        assert_eq!(s.secret().unwrap(), DEV_JWT_SECRET);
        // The ingest port takes courier tokens too: a public one needs a real secret.
        s.ingest_listen = Some("0.0.0.0:9".into());
        assert!(s.secret().is_err());
        s.ingest_listen = Some("127.0.0.1:9".into());
        assert!(s.secret().is_ok());
    }

    /// Loopback is what an address resolves to, not how it is spelled.
    #[test]
    fn loopback_is_resolved_not_read() {
        for a in ["127.0.0.1:8080", "[::1]:8080", "localhost:8080"] {
            assert!(resolves_to_loopback(a), "{a}");
        }
        for a in ["0.0.0.0:8080", "[::]:8080", "[::ffff:127.0.0.1]:80", "127.0.0.1.invalid:80", "localhost.invalid:80", "10.0.0.1:80", "nonsense"] {
            assert!(!resolves_to_loopback(a), "{a}");
        }
        // Other nodes reaching this one make it public.
        let Cmd::Serve(s) = Cli::try_parse_from(["hexfleet", "serve", "--advertise-url", "http://10.0.0.5:8080"]).unwrap().cmd else { panic!() };
        assert_eq!(s.public_address().as_deref(), Some("10.0.0.5:8080"));
        assert!(!s.webhooks_allow_private() && !s.takes_keyless_osmand());
        let Cmd::Serve(s) = Cli::try_parse_from(["hexfleet", "serve", "--advertise-url", "http://127.0.0.1:8080"]).unwrap().cmd else { panic!() };
        assert_eq!(s.public_address(), None);
    }

    #[test]
    fn a_jwt_secret_shorter_than_256_bits_is_refused_off_loopback() {
        let cli = Cli::try_parse_from(["hexfleet", "serve", "--listen", "0.0.0.0:8080"]).unwrap();
        let Cmd::Serve(mut s) = cli.cmd else { panic!() };
        s.jwt_secret = Some("abcdefgh".into());
        assert!(s.secret().is_err());
        s.jwt_secret = Some("x".repeat(MIN_SECRET_LEN - 1));
        assert!(s.secret().is_err());
        s.jwt_secret = Some("x".repeat(MIN_SECRET_LEN));
        assert_eq!(s.secret().unwrap().len(), MIN_SECRET_LEN);
        // On loopback, taken with a warning; not when the ingest port is public.
        s.listen = "127.0.0.1:8080".into();
        s.jwt_secret = Some("abcdefgh".into());
        assert_eq!(s.secret().unwrap(), "abcdefgh");
        s.ingest_listen = Some("0.0.0.0:9".into());
        assert!(s.secret().is_err());
    }

    #[test]
    fn config_file_booleans_reach_flags_that_take_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hexfleet.toml");
        let parse = |text: &str| {
            std::fs::write(&f, text).unwrap();
            let argv: Vec<OsString> = ["hexfleet", "--config", f.to_str().unwrap(), "serve"].map(Into::into).into();
            let Cmd::Serve(s) = Cli::try_parse_from(argv_with_config(argv).unwrap()).unwrap().cmd else { panic!("not serve") };
            s
        };
        let s = parse("learn_speeds = false\nmarket_leases = true\nwebhook_allow_private = true\nauto_accept = false\n");
        assert!(!s.learn_speeds);
        assert_eq!(s.market_leases, Some(true));
        assert_eq!(s.webhook_allow_private, Some(true));
        assert!(!s.auto_accept);
        let s = parse("market_leases = false\nauto_accept = true\n");
        assert_eq!(s.market_leases, Some(false));
        assert!(s.auto_accept);
    }
}
