//! The `hexfleet` binary: parses the command line and runs `serve`, `demo`, `token` or
//! `migrate`. Everything else lives in the library.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use hexfleet_gateway::auth::{Keys, Role};
use hexfleet_gateway::config::{Cli, Cmd, ServeArgs, argv_with_config};
use hexfleet_gateway::server::{ServeConfig, cancel_on_signals};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(argv_with_config(std::env::args_os().collect())?);
    init_tracing(&cli.log_format);
    // Every socket is a file descriptor: take the hard limit, not the (often 1024) soft one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(open_files = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("hexfleet").build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Demo(a) => demo(a).await,
            Cmd::Token(a) => {
                // The server takes the development secret, or one under 32 bytes, on loopback
                // only: say so here, not with the server's refusal or 401 later.
                if a.jwt_secret == hexfleet_gateway::config::DEV_JWT_SECRET {
                    eprintln!("note: signed with the public development secret (HEXFLEET_JWT_SECRET is not set): only a server on loopback without a secret takes it");
                } else if a.jwt_secret.len() < hexfleet_gateway::config::MIN_SECRET_LEN {
                    eprintln!(
                        "note: the JWT secret has {} bytes: a server on an address other than loopback needs at least {}",
                        a.jwt_secret.len(),
                        hexfleet_gateway::config::MIN_SECRET_LEN
                    );
                }
                let keys = Keys::new(&a.jwt_secret);
                println!("{}", keys.mint(a.role, &a.sub, &a.tenant, a.order.as_deref(), a.ttl));
                Ok(())
            }
            Cmd::Migrate(a) => {
                let backend = hexfleet_persistence::migrate(&a.database_url).await?;
                println!("migrations applied ({backend})");
                Ok(())
            }
        }
    })
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,actix_server=warn"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" { b.json().init() } else { b.init() }
}

fn serve_config(a: &ServeArgs) -> anyhow::Result<ServeConfig> {
    let mut cfg = ServeConfig::new(a.database_url.clone(), a.secret()?);
    cfg.redis_url = a.redis_url.clone();
    cfg.redis_prefix = a.redis_prefix.clone();
    if let Some(n) = &a.node_id {
        cfg.node_id = n.clone();
    }
    cfg.fleet = a.fleet_config();
    cfg.workers = a.workers;
    cfg.ingest_listen = a.ingest_listen.clone();
    cfg.ingest_limits = hexfleet_gateway::ingest::Limits {
        max_connections: a.ingest_max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        max_per_ip: a.ingest_max_per_ip.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
    };
    cfg.history_retention = a.history_retention();
    cfg.history_purge_every = a.history_purge_interval;
    cfg.console_batch = Duration::from_millis(a.console_batch_ms);
    cfg.webhooks.timeout = Duration::from_millis(a.webhook_timeout_ms);
    cfg.webhooks.max_attempts = a.webhook_max_attempts;
    cfg.webhooks.backoff = Duration::from_millis(a.webhook_backoff_ms);
    cfg.webhooks.breaker_after = a.webhook_breaker_after;
    cfg.webhooks.breaker_cooldown = Duration::from_millis(a.webhook_breaker_cooldown_ms);
    cfg.webhooks.allow_private = a.webhooks_allow_private();
    cfg.osmand_keyless = a.takes_keyless_osmand();
    cfg.http_limit = hexfleet_gateway::http_limit::HttpLimitConfig {
        per_s: a.http_limit_per_ip,
        burst: a.http_limit_burst,
        trust_forwarded_for: a.trust_forwarded_for,
        exempt: a.http_limit_exempt.clone(),
    };
    for d in a.loopback_defaults() {
        tracing::warn!("listening on loopback alone: {d}");
    }
    cfg.webhooks.concurrency = a.webhook_concurrency as usize;
    cfg.webhooks.per_webhook = a.webhook_per_endpoint as usize;
    cfg.webhooks.per_tenant = a.webhook_per_tenant as usize;
    cfg.webhooks.give_up_after = Duration::from_secs(u64::from(a.webhook_give_up_hours) * 3600);
    if a.market_leases.unwrap_or(a.redis_url.is_some()) {
        let advertise_url = match &a.advertise_url {
            Some(u) => {
                let parsed = url::Url::parse(u).with_context(|| format!("--advertise-url {u} is not a URL"))?;
                // Nodes talk plain HTTP and WebSocket to each other (TLS ends at the edge).
                anyhow::ensure!(parsed.scheme() == "http" && parsed.host().is_some(), "--advertise-url must be an http:// URL with a host");
                u.trim_end_matches('/').to_owned()
            }
            None => String::new(), // `http://<bound address>`, checked when the listener is bound
        };
        // Leases are shared through one database: on SQLite (the default when DATABASE_URL is
        // not set), each node would hold every market in a file of its own.
        anyhow::ensure!(
            hexfleet_persistence::is_postgres(&a.database_url),
            "market leases (on by default with REDIS_URL) need the nodes' shared PostgreSQL: set DATABASE_URL=postgres://…, \
             or --market-leases false for a single node"
        );
        cfg.markets = Some(hexfleet_gateway::markets::MarketConfig {
            ttl: Duration::from_millis(a.market_lease_ms),
            renew_every: Duration::from_millis(a.market_lease_ms / 3),
            advertise_url,
            forward_timeout: hexfleet_gateway::markets::FORWARD_TIMEOUT,
        });
    }
    Ok(cfg)
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let cfg = serve_config(&a)?;
    let listener = TcpListener::bind(&a.listen).with_context(|| format!("cannot listen on {}", a.listen))?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let running = hexfleet_gateway::start(cfg, listener, shutdown).await?;
    eprintln!("hexfleet listening on http://{}", running.addr);
    if let Some(at) = running.ingest_addr {
        eprintln!("courier ingest on ws://{at}{}", hexfleet_gateway::ingest::PATH);
    }
    running.wait().await
}

async fn demo(mut a: hexfleet_gateway::config::DemoArgs) -> anyhow::Result<()> {
    // A demo may use the development secret (on loopback; elsewhere it needs a real one).
    a.serve.dev_secret = true;
    let cfg = serve_config(&a.serve)?;
    let secret = cfg.jwt_secret.clone();
    let listener = TcpListener::bind(&a.serve.listen).with_context(|| format!("cannot listen on {}", a.serve.listen))?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let running = hexfleet_gateway::start(cfg, listener, shutdown.clone()).await?;
    let base = format!("http://{}", reachable(running.addr));
    let keys = Keys::new(&secret);
    let tenant = "demo";
    let token = keys.mint(Role::Dispatcher, "demo-dispatcher", tenant, None, Duration::from_secs(7 * 24 * 3600));
    println!("\nhexfleet demo: {} simulated couriers, ~{} orders/min", a.couriers, a.orders_per_min);
    println!("open the live console:  {base}/?token={token}\n");
    if let Some(d) = a.duration {
        let sd = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            sd.cancel();
        });
    }
    let sim = hexfleet_sim::DemoConfig {
        base_url: base,
        jwt_secret: secret,
        tenant: tenant.into(),
        couriers: a.couriers,
        orders_per_min: a.orders_per_min,
        ..Default::default()
    };
    let sim_stop = shutdown.child_token();
    let sim_task = tokio::spawn(async move {
        let res = hexfleet_sim::run_demo(sim, sim_stop).await;
        // Said at once, not at shutdown: a demo whose fleet did not start shows an empty city.
        if let Err(e) = &res {
            tracing::error!(error = %e, "simulated fleet stopped");
        }
        res
    });
    let res = running.wait().await;
    if tokio::time::timeout(Duration::from_secs(10), sim_task).await.is_err() {
        tracing::warn!("simulated fleet did not stop in time");
    }
    res
}

/// The address the in-process fleet connects to: a server listening on every interface
/// (`0.0.0.0`, as in the container image) is reached on loopback.
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => (std::net::Ipv4Addr::LOCALHOST, addr.port()).into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => (std::net::Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::reachable;

    #[test]
    fn a_server_on_every_interface_is_reached_on_loopback() {
        let on = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(on("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(on("[::]:8080"), "[::1]:8080");
        assert_eq!(on("127.0.0.1:9"), "127.0.0.1:9");
        assert_eq!(on("10.1.2.3:80"), "10.1.2.3:80");
    }
}
