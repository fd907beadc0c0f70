//! Assembling and running the server: store → fleet (actors) → broker → HTTP/WebSocket app, and
//! the one shutdown path (stop accepting → stop dispatch and actors → flush storage).
//!
//! The actors run on the caller's multi-threaded tokio runtime; actix-web runs its workers on
//! their own threads. Handlers reach the actors through [`AppState::fleet`], and anything that
//! spawns actors is sent to the main runtime ([`AppState::on_main`]) so actors never live on an
//! HTTP worker's single-threaded runtime.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use hexfleet_actors::clock::TokioClock;
use hexfleet_actors::{Fleet, FleetConfig, FleetDeps};
use hexfleet_persistence::{SqlStore, StoreOptions};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::auth::Keys;
use crate::broker::Broker;

/// Everything `serve` needs, already parsed.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub database_url: String,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    /// With Redis: how long a market's positions are not published after no other node heard
    /// one ([`crate::relay::PROBE_EVERY`]).
    pub fanout_probe: Duration,
    pub jwt_secret: String,
    pub node_id: String,
    pub fleet: FleetConfig,
    pub workers: Option<usize>,
    pub store: StoreOptions,
    /// Location history older than this is purged.
    pub history_retention: Duration,
    /// How often the retention purge runs (and once at start).
    pub history_purge_every: Duration,
    /// Console batch window (see `--console-batch-ms`).
    pub console_batch: Duration,
    /// WebSocket pings, idle and write timeouts.
    pub sockets: crate::ws::SocketTimes,
    /// Webhook delivery.
    pub webhooks: crate::webhooks::WebhookConfig,
    /// Market leases between nodes (`markets.rs`); `None`: this node owns every market.
    pub markets: Option<crate::markets::MarketConfig>,
    /// The courier ingest port (`ingest.rs`), if any.
    pub ingest_listen: Option<String>,
    /// Its connection caps.
    pub ingest_limits: crate::ingest::Limits,
    /// OsmAnd/Traccar reports without a device key are taken (`--osmand-keyless`).
    pub osmand_keyless: bool,
    /// The request limit per client address (`--http-limit-per-ip`).
    pub http_limit: crate::http_limit::HttpLimitConfig,
}

impl ServeConfig {
    /// A configuration for tests and tools: SQLite at `database_url`, no Redis.
    pub fn new(database_url: impl Into<String>, jwt_secret: impl Into<String>) -> Self {
        ServeConfig {
            database_url: database_url.into(),
            redis_url: None,
            redis_prefix: "hexfleet:".into(),
            fanout_probe: crate::relay::PROBE_EVERY,
            jwt_secret: jwt_secret.into(),
            node_id: format!("node-{}", uuid::Uuid::new_v4().simple()),
            fleet: FleetConfig::default(),
            workers: None,
            store: StoreOptions::default(),
            history_retention: Duration::from_secs(30 * 24 * 3600),
            history_purge_every: Duration::from_secs(3600),
            console_batch: crate::ws::CONSOLE_BATCH,
            sockets: crate::ws::SocketTimes::default(),
            webhooks: crate::webhooks::WebhookConfig::default(),
            markets: None,
            ingest_listen: None,
            ingest_limits: crate::ingest::Limits::default(),
            osmand_keyless: false,
            http_limit: crate::http_limit::HttpLimitConfig::default(),
        }
    }
}

/// Shared by every handler.
pub struct AppState {
    pub fleet: Fleet,
    pub broker: Broker,
    pub store: Arc<SqlStore>,
    pub keys: Keys,
    pub metrics: PrometheusHandle,
    pub main: tokio::runtime::Handle,
    pub shutdown: CancellationToken,
    pub started: std::time::Instant,
    /// Console batch window.
    pub console_batch: Duration,
    /// WebSocket pings, idle and write timeouts.
    pub sockets: crate::ws::SocketTimes,
    /// Webhooks may target loopback and private addresses (`--webhook-allow-private`).
    pub webhooks_allow_private: bool,
    /// Market leases, when several nodes share the store.
    pub markets: Option<Arc<crate::markets::Markets>>,
    /// OsmAnd/Traccar reports without a device key are taken (`--osmand-keyless`).
    pub osmand_keyless: bool,
    /// The request limit per client address, when on.
    pub http_limit: Option<Arc<crate::http_limit::HttpLimit>>,
}

impl AppState {
    /// Runs `fut` on the main runtime (where the actors live) and waits for it.
    pub async fn on_main<F, T>(&self, fut: F) -> Result<T, crate::error::ApiError>
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.main.spawn(fut).await.map_err(|e| crate::error::ApiError::internal(format!("task failed: {e}")))
    }
}

/// The process-wide Prometheus recorder (installed once; tests start many servers).
pub fn metrics_handle() -> PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
            .expect("static buckets are valid")
            .install_recorder()
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
    })
    .clone()
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    /// Where the courier ingest port listens, when it is on.
    pub ingest_addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub state: web::Data<AppState>,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the server has stopped (after `shutdown` is cancelled, or on a fatal error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.join.await?
    }

    /// Stops gracefully and waits.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Starts the server on `listener`; it runs until `shutdown` is cancelled.
pub async fn start(cfg: ServeConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let metrics = metrics_handle();
    let store = Arc::new(SqlStore::open(&cfg.database_url, cfg.store.clone()).await?);
    tracing::info!(backend = store.backend(), "store open");
    let broker = match &cfg.redis_url {
        Some(url) => Broker::with_redis(&cfg.node_id, url, &cfg.redis_prefix, cfg.fanout_probe, shutdown.clone()).await?,
        None => Broker::local(&cfg.node_id),
    };
    let mut fleet_config = cfg.fleet.clone();
    if cfg.redis_url.is_some() && fleet_config.zone_resync.is_none() {
        // Several nodes: a zone change whose Redis notification was lost is caught up here.
        fleet_config.zone_resync = Some(Duration::from_secs(60));
    }
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let keys = Keys::new(&cfg.jwt_secret);
    let markets = match &cfg.markets {
        Some(mc) => {
            let mut mc = mc.clone();
            if mc.advertise_url.is_empty() {
                anyhow::ensure!(!addr.ip().is_unspecified(), "set --advertise-url: other nodes cannot reach {addr}");
                mc.advertise_url = format!("http://{addr}");
            }
            let m = Arc::new(crate::markets::Markets::new(store.clone(), &cfg.node_id, &keys.node_key(), mc, broker.clone())?);
            let n = m.claim_unowned().await?;
            tracing::info!(markets = n, holder = m.holder(), "market leases taken at start");
            Some(m)
        }
        None => None,
    };
    // Renewing starts before the markets taken are loaded, and ends after they are released.
    let renew_stop = CancellationToken::new();
    let renewer = markets.as_ref().map(|m| m.spawn_renewer(renew_stop.clone(), shutdown.clone()));
    let fleet_store: Arc<dyn hexfleet_actors::store::Store> = match &markets {
        Some(m) => Arc::new(crate::markets::FencedStore::new(store.clone(), m.clone())),
        None => store.clone(),
    };
    let deps = FleetDeps { store: fleet_store, publisher: Arc::new(broker.clone()), clock: Arc::new(TokioClock::new()), config: fleet_config };
    let started = match &markets {
        Some(m) => {
            let m = m.clone();
            Fleet::start_owning(deps, move |t| m.holds(t)).await
        }
        None => Fleet::start(deps).await,
    };
    let fleet = match started {
        Ok(f) => f,
        Err(e) => {
            renew_stop.cancel();
            return Err(e.into());
        }
    };
    if let (Some(m), Some(relay)) = (&markets, broker.relay()) {
        // The markets this node runs are delivered here directly, not heard back from Redis.
        let m = m.clone();
        relay.set_serves(Arc::new(move |t: &str| m.holds(&hexfleet_actors::domain::TenantId::new(t))));
    }
    let taker_stop = shutdown.child_token();
    let taker = markets.as_ref().map(|m| {
        m.bind(fleet.clone());
        m.spawn_taker(taker_stop.clone())
    });
    {
        // Zones changed on another node: re-read them from the store, on the main runtime.
        let fleet = fleet.clone();
        let main = tokio::runtime::Handle::current();
        broker.on_remote_zone(Arc::new(move |tenant: &str, id: &str| {
            let (fleet, tenant, id) = (fleet.clone(), hexfleet_actors::domain::TenantId::new(tenant), hexfleet_actors::domain::ZoneId::new(id));
            main.spawn(async move {
                match fleet.sync_zone(&tenant, &id).await {
                    Ok(changed) => tracing::debug!(%tenant, zone = %id, changed, "zone synced from another node"),
                    Err(e) => tracing::warn!(%tenant, zone = %id, error = %e, "cannot sync a zone changed on another node"),
                }
            });
        }));
    }
    let fanout = broker.clone();
    let state = web::Data::new(AppState {
        fleet: fleet.clone(),
        broker,
        store: store.clone(),
        keys,
        metrics,
        main: tokio::runtime::Handle::current(),
        shutdown: shutdown.clone(),
        started: std::time::Instant::now(),
        console_batch: cfg.console_batch,
        sockets: cfg.sockets,
        webhooks_allow_private: cfg.webhooks.allow_private,
        markets: markets.clone(),
        osmand_keyless: cfg.osmand_keyless,
        http_limit: crate::http_limit::HttpLimit::new(&cfg.http_limit),
    });
    if let Some(l) = state.http_limit.clone() {
        let stop = shutdown.child_token();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = every.tick() => l.sweep(),
                }
            }
        });
    }
    let purge_stop = shutdown.child_token();
    let purge = {
        let f = fleet.clone();
        crate::history::spawn_purge(store.clone(), move || f.now_ms(), cfg.history_retention, cfg.history_purge_every, purge_stop.clone())
    };
    let hooks_stop = shutdown.child_token();
    let hooks = {
        let f = fleet.clone();
        crate::webhooks::spawn_delivery(store.clone(), move || f.now_ms(), cfg.webhooks.clone(), cfg.node_id.clone(), hooks_stop.clone())
    };
    let keys = web::Data::new(state.keys.clone());
    let st = state.clone();
    let mut http = HttpServer::new(move || {
        App::new()
            .app_data(st.clone())
            .app_data(keys.clone())
            // Requests for a market another node owns go to that node (`markets.rs`).
            .wrap(actix_web::middleware::from_fn(crate::markets::route_market))
            // Outermost: an address over its limit is refused before anything else is done.
            .wrap(actix_web::middleware::from_fn(crate::http_limit::limit))
            // WebSocket routes first: the `/v1` scope of the API would otherwise claim them.
            .configure(crate::ws::configure)
            .configure(crate::api::configure)
            .default_service(actix_web::web::to(crate::error::no_route))
    })
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listener)?;
    if let Some(w) = cfg.workers {
        http = http.workers(w.max(1));
    }
    let ingest_tasks = tokio_util::task::TaskTracker::new();
    let ingest_addr = match &cfg.ingest_listen {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a).await.map_err(|e| anyhow::anyhow!("cannot listen on {a} (ingest): {e}"))?;
            let at = l.local_addr()?;
            tokio::spawn(crate::ingest::serve(l, state.clone(), cfg.ingest_limits, shutdown.clone(), ingest_tasks.clone()));
            tracing::info!(addr = %at, "courier ingest port");
            Some(at)
        }
        None => None,
    };
    let http = http.run();
    let handle = http.handle();
    let http_task = tokio::spawn(http);
    tracing::info!(%addr, node = %cfg.node_id, "serving");
    let sd = shutdown.clone();
    let st = state.clone();
    let join = tokio::spawn(async move {
        sd.cancelled().await;
        tracing::info!("shutting down: stop accepting");
        handle.stop(true).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), http_task).await;
        // Ingest sessions see the same token and close with 1001.
        ingest_tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), ingest_tasks.wait()).await.is_err() {
            tracing::warn!("courier ingest sessions did not close in time");
        }
        // The purge and the webhook sends wind down meanwhile; the markets are flushed and
        // released first, so that other nodes take them over as soon as possible (their
        // requests answer 503 until then).
        purge_stop.cancel();
        hooks_stop.cancel();
        taker_stop.cancel();
        if let Some(t) = taker {
            let _ = t.await;
        }
        tracing::info!("shutting down: stop dispatch and actors, flush storage");
        let res = fleet.shutdown().await;
        renew_stop.cancel();
        if let Some(r) = renewer {
            let _ = r.await;
        }
        let lost = markets.as_ref().and_then(|m| m.lost());
        if let Some(m) = &markets {
            m.release().await;
        }
        // Updates made while winding down (requests in flight, the fleet's last changes)
        // still reach the other nodes' consoles and tracking pages.
        fanout.finish_fanout(Duration::from_secs(5)).await;
        if tokio::time::timeout(Duration::from_secs(10), purge).await.is_err() {
            tracing::warn!("retention purge did not stop in time");
        }
        if tokio::time::timeout(Duration::from_secs(15), hooks).await.is_err() {
            tracing::warn!("webhook delivery did not stop in time (its leases lapse and another node retries)");
        }
        if let Err(e) = store.close().await {
            tracing::error!(error = %e, "store did not close cleanly");
        }
        drop(st);
        if let Some(why) = lost {
            anyhow::bail!("{why}");
        }
        res.map_err(anyhow::Error::from)
    });
    Ok(Running { addr, ingest_addr, shutdown, state, join })
}

/// Waits for SIGINT or SIGTERM, then cancels `token`.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("signal received");
        token.cancel();
    });
}
