//! Market ownership between nodes: who runs a market's actors and dispatch, and how a request
//! that reaches another node gets to them.
//!
//! A market is a tenant. With several nodes (`--market-leases`, on by default with `REDIS_URL`)
//! exactly one node at a time *owns* a market: it runs that market's courier and order actors
//! and its dispatcher, and every durable write of them carries a fencing token. Ownership is a
//! lease in the shared database (`persistence::leases`: holder, advertised address, epoch,
//! expiry on the database clock):
//!
//! - **Taking a market.** At start a node takes every market no one holds and loads only those
//!   ([`hexfleet_actors::Fleet::start_owning`]). Later, the first request for a market no one
//!   holds takes it on the node it reaches, and every [`MarketConfig::renew_every`] each node
//!   takes over markets whose lease lapsed (their owner died or was cut off), loading their
//!   couriers and open orders from the store ([`hexfleet_actors::Fleet::adopt_market`]).
//! - **Keeping it.** The same tick renews the node's leases. If a renewal shows that a lease
//!   was taken by another node (this node was paused or cut off for longer than the TTL), the
//!   node stops: its actors may hold state the new owner has moved past, and a supervisor
//!   restarts it clean. A renewal that fails because the database is unreachable changes
//!   nothing: no other node can take the market without the database either, and live
//!   tracking goes on in memory.
//! - **Fencing.** [`FencedStore`] adds a `Write::Fence` (market, holder, epoch) to every batch
//!   that writes an order or a courier; the store checks it inside the transaction, so a node
//!   that lost a market can never make a write of it durable after the new owner took over.
//! - **Routing.** [`route_market`] (middleware) sends a request for a market owned elsewhere to
//!   its owner's advertised address: HTTP requests by reqwest, WebSockets (courier apps and
//!   consoles) by a tokio-tungstenite connection piped frame by frame. Customer tracking
//!   sockets (`/v1/ws/track/…`) and the webhook API stay on the node they reach: tracking is
//!   fed by the Redis fan-out and webhooks live in the store. A forwarded request carries
//!   `X-Hexfleet-Forwarded`; a node never forwards such a request again (503 `market_moving`
//!   instead), so two nodes with different views cannot bounce a request between them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{HttpMessage as _, HttpResponse, web};
use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::StreamExt as _;
use hexfleet_actors::Fleet;
use hexfleet_actors::domain::{CourierId, CourierRecord, LocationSample, Ms, Order, OrderId, TenantId, ZoneId, ZoneRecord};
use hexfleet_actors::store::{EventQuery, Recovered, SpeedTable, Store, StoreError, StoredEvent, Write};
use hexfleet_persistence::SqlStore;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::server::AppState;
use crate::ws::{Beat, Liveness};

/// Header set on a request one node forwards to another.
pub const FORWARDED: &str = "x-hexfleet-forwarded";
/// Header with [`crate::auth::Keys::node_key`] on the requests and upgrades a node forwards:
/// their owner does not count them against `--http-limit-per-ip`. Never passed on from a
/// client's request.
pub const NODE_KEY: &str = "x-hexfleet-node-key";

/// Device → market entries cached at most.
const MAX_DEVICES_CACHED: usize = 100_000;
/// How long a device's owner read from the store is kept ([`Markets::device_owner`]).
const DEVICE_CACHE_FOR: Duration = Duration::from_secs(60);

/// The longest a forwarded HTTP request may wait for its answer to start, and then for each
/// read of its body ([`MarketConfig::forward_timeout`]'s default).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request body forwarded to a market's owner.
const MAX_FORWARD_BODY: usize = 1024 * 1024;

/// How markets are leased.
#[derive(Clone, Debug)]
pub struct MarketConfig {
    /// Lease length: how long a market stays without dispatch after its owner dies.
    pub ttl: Duration,
    /// How often leases are renewed and lapsed markets taken over (`ttl / 3` by the CLI).
    pub renew_every: Duration,
    /// Base URL other nodes reach this one at (`http://host:port`).
    pub advertise_url: String,
    /// How long a request forwarded to a market's owner waits for the answer to start, and
    /// then for each read of its body (a paused owner still accepts connections). Not the
    /// whole body: a long history export to a slow client takes as long as it takes.
    pub forward_timeout: Duration,
}

/// Where a request for a market is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node owns the market.
    Local,
    /// Another node owns it, at this base URL.
    Remote(String),
}

/// This node's market leases.
pub struct Markets {
    store: Arc<SqlStore>,
    /// `<node id>#<random>`: a restarted node with the same id is another holder, so it cannot
    /// inherit the leases of a previous process that may still be running somewhere.
    holder: String,
    node_id: String,
    /// [`crate::auth::Keys::node_key`], sent with what this node forwards.
    node_key: String,
    config: MarketConfig,
    /// Markets whose lease this node holds, with its epoch (the fencing token).
    epochs: DashMap<TenantId, i64>,
    /// Markets whose actors run here: held and loaded. Requests are served locally only then.
    ready: DashMap<TenantId, ()>,
    /// Markets loaded here, at the epoch held when the load finished. A step-down empties
    /// `ready` but not this: a renewal serves again only what was loaded at the epoch still
    /// held (a market taken whose load failed is not, and is loaded by the take-over pass).
    loaded: DashMap<TenantId, i64>,
    /// Owners of other markets as last read, until the `Instant`.
    owners: DashMap<TenantId, (String, Instant)>,
    /// Markets of devices (OsmAnd) this node does not know (`None`: no courier has it), until
    /// the `Instant`.
    devices: DashMap<String, (Option<(TenantId, CourierId)>, Instant)>,
    /// One take-over at a time per market.
    taking: DashMap<TenantId, Arc<tokio::sync::Mutex<()>>>,
    fleet: OnceLock<Fleet>,
    /// The runtime the actors live on (take-overs may start on an HTTP worker).
    main: tokio::runtime::Handle,
    /// Why this node stopped, when it lost a market.
    lost: parking_lot::Mutex<Option<String>>,
    /// The node's shutdown, cancelled when it loses a market ([`Markets::spawn_renewer`]).
    shutdown: OnceLock<CancellationToken>,
    /// When the last successful renewal started: every lease this node holds runs at least
    /// until this plus the TTL (the local deadline).
    renewed_at: parking_lot::Mutex<tokio::time::Instant>,
    /// Renewals failed past the local deadline: the markets are not served until one succeeds.
    stepped_down: AtomicBool,
    /// Courier sessions to close when stepping down.
    broker: crate::broker::Broker,
    http: reqwest::Client,
}

impl Markets {
    /// A node's market leases; takes nothing yet. Call it on the runtime the actors run on.
    /// `node_key`: [`crate::auth::Keys::node_key`], sent with every forwarded request.
    pub fn new(store: Arc<SqlStore>, node_id: &str, node_key: &str, config: MarketConfig, broker: crate::broker::Broker) -> anyhow::Result<Markets> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(NODE_KEY, reqwest::header::HeaderValue::from_str(node_key)?);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            // A paused owner still accepts connections: do not wait on it for ever, but bound
            // each read of an answer, not the whole of it (reqwest's `timeout` covers the body:
            // a forwarded history export to a slow client was cut off after 30 s).
            .read_timeout(config.forward_timeout)
            .build()?;
        Ok(Markets {
            store,
            holder: format!("{node_id}#{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            node_id: node_id.to_owned(),
            node_key: node_key.to_owned(),
            config,
            epochs: DashMap::new(),
            ready: DashMap::new(),
            loaded: DashMap::new(),
            owners: DashMap::new(),
            taking: DashMap::new(),
            devices: DashMap::new(),
            fleet: OnceLock::new(),
            main: tokio::runtime::Handle::current(),
            lost: parking_lot::Mutex::new(None),
            shutdown: OnceLock::new(),
            // Before any lease is taken, so the deadline is never later than a lease's expiry.
            renewed_at: parking_lot::Mutex::new(tokio::time::Instant::now()),
            stepped_down: AtomicBool::new(false),
            broker,
            http,
        })
    }

    /// Whether `addr` is this node's advertised address.
    pub fn is_self(&self, addr: &str) -> bool {
        addr == self.config.advertise_url
    }

    /// This process's lease holder name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether this node holds `tenant`'s lease.
    pub fn holds(&self, tenant: &TenantId) -> bool {
        self.epochs.contains_key(tenant)
    }

    /// The market this node lost, if it lost one (the reason it stopped).
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().clone()
    }

    /// Takes every market no one holds, before the fleet starts (it then loads only those).
    pub async fn claim_unowned(&self) -> anyhow::Result<usize> {
        // Renewals start after this: the leases taken first must not lapse before the first
        // one. So the deadline counts from the first claim, and claiming stops after a third
        // of a lease; what is left is taken by the take-over pass, renewals running by then.
        let started = tokio::time::Instant::now();
        *self.renewed_at.lock() = started;
        let mut n = 0;
        for t in self.store.unowned_markets().await? {
            if started.elapsed() >= self.config.ttl / 3 {
                tracing::info!(taken = n, "claiming at start stopped after a third of a lease; the take-over pass takes the rest");
                break;
            }
            if let Some(l) = self.store.acquire_lease(&t, &self.holder, &self.config.advertise_url, self.config.ttl).await? {
                self.epochs.insert(t.clone(), l.epoch);
                // The fleet starts on these (or the node does not start).
                self.loaded.insert(t.clone(), l.epoch);
                self.ready.insert(t, ());
                n += 1;
            }
        }
        Ok(n)
    }

    /// Hands over the fleet (after it started on the claimed markets).
    pub fn bind(&self, fleet: Fleet) {
        let _ = self.fleet.set(fleet);
    }

    /// Where `tenant`'s requests are served, taking the market if no one holds it.
    pub async fn route(self: &Arc<Self>, tenant: &TenantId) -> Result<Route, ApiError> {
        if self.ready.contains_key(tenant) {
            return Ok(Route::Local);
        }
        if let Some(o) = self.owners.get(tenant)
            && o.1 > Instant::now()
        {
            return Ok(Route::Remote(o.0.clone()));
        }
        // On the main runtime: a database connection the pool opens here would otherwise belong
        // to the HTTP worker's runtime, and die with it at shutdown, before the final flush.
        let (me, t) = (self.clone(), tenant.clone());
        self.main.spawn(async move { me.take_or_find(&t).await }).await.map_err(|e| ApiError::internal(format!("market routing failed: {e}")))?
    }

    /// [`Markets::route`] for a request about to be forwarded: 503 `market_moving` instead of
    /// a remote route when the request was `forwarded` once already, or when the lease still
    /// names this node's address (a previous process of this node, restarted before its lease
    /// lapsed), until the lease changes hands.
    pub async fn route_request(self: &Arc<Self>, tenant: &TenantId, forwarded: bool) -> Result<Route, ApiError> {
        match self.route(tenant).await? {
            Route::Remote(owner) if forwarded || self.is_self(&owner) => Err(changing_owner(tenant)),
            r => Ok(r),
        }
    }

    /// Takes `tenant` if no one holds it (and loads it), else finds its owner.
    async fn take_or_find(&self, tenant: &TenantId) -> Result<Route, ApiError> {
        let lock = self.taking.entry(tenant.clone()).or_default().clone();
        let _g = lock.lock().await;
        if self.ready.contains_key(tenant) {
            return Ok(Route::Local);
        }
        if self.lost.lock().is_some() {
            // Stopping after a lost market: take nothing more.
            return Err(changing_owner(tenant));
        }
        if self.stepped_down() {
            // Only a renewal brings a stepped-down node back (it revives the leases still its
            // own, at their epochs). A take here would serve a market again while the watchdog,
            // which steps down only a serving node, stays off: if the link dropped again, this
            // node would serve on beside the next owner.
            return Err(changing_owner(tenant));
        }
        for _ in 0..2 {
            let taken = self
                .store
                .acquire_lease(tenant, &self.holder, &self.config.advertise_url, self.config.ttl)
                .await
                .map_err(store_down)?;
            if let Some(l) = taken {
                if let Some(held) = self.epochs.get(tenant).map(|e| *e)
                    && l.epoch > held + 1
                {
                    // Held here at `held` (kept through a step-down), and by another node
                    // between that and this epoch: the actors here missed its changes.
                    self.lose(tenant, &format!("market {tenant} was owned by another node while this one was stepped down (epoch {held} → {})", l.epoch));
                    return Err(changing_owner(tenant));
                }
                self.adopt(tenant, l.epoch).await?;
                return Ok(Route::Local);
            }
            if let Some(l) = self.store.lease(tenant).await.map_err(store_down)?
                && l.live
                && l.holder != self.holder
            {
                // Cached for a third of the TTL: after a take-over, requests follow the new
                // owner within that (or at once, if the old owner is gone and refuses).
                self.owners.insert(tenant.clone(), (l.addr.clone(), Instant::now() + self.config.ttl / 3));
                return Ok(Route::Remote(l.addr));
            }
            // The lease lapsed between the two statements: try to take it once more.
        }
        Err(changing_owner(tenant))
    }

    /// Loads a market this node just took and starts serving it.
    async fn adopt(&self, tenant: &TenantId, epoch: i64) -> Result<(), ApiError> {
        self.epochs.insert(tenant.clone(), epoch);
        self.owners.remove(tenant);
        let fleet = self.fleet.get().ok_or_else(|| ApiError::internal("fleet not started"))?.clone();
        let t = tenant.clone();
        // On the main runtime, where the actors live (this may run on an HTTP worker).
        let res = self.main.spawn(async move { fleet.adopt_market(&t).await }).await;
        match res {
            Ok(Ok(_)) => {
                self.loaded.insert(tenant.clone(), epoch);
                // Served only while the node is up and still holds the market at this epoch. A
                // step-down during the load (a slow database) sets its flag and then empties
                // `ready`: checked again after the insert, whichever came first, the market is
                // not served until a renewal revives it.
                if self.epochs.get(tenant).is_some_and(|e| *e == epoch) && !self.stepped_down() {
                    self.ready.insert(tenant.clone(), ());
                    if self.stepped_down() {
                        self.ready.remove(tenant);
                    }
                }
                metrics::counter!("hexfleet_market_takeovers_total").increment(1);
                Ok(())
            }
            // The lease stays ours and is renewed; the next request or tick loads it again
            // (adoption skips what is already running).
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(ApiError::internal(format!("market take-over failed: {e}"))),
        }
    }

    /// `(holder, epoch)` of this node's lease on `tenant`, if it holds one.
    pub fn lease_of(&self, tenant: &TenantId) -> Option<(String, i64)> {
        self.epochs.get(tenant).map(|e| (self.holder.clone(), *e))
    }

    /// The fencing write for `tenant`, if this node holds it.
    pub fn fence(&self, tenant: &TenantId) -> Option<Write> {
        self.epochs.get(tenant).map(|e| Write::Fence { tenant: tenant.clone(), holder: self.holder.clone(), epoch: *e })
    }

    /// One renewal: extends this node's leases and returns the markets it lost (another node
    /// took them; all of them: one a renewal used to leave held and served during the drain).
    /// A market taken while the renewal ran is judged at the next one.
    ///
    /// When renewals have failed up to the local deadline, the leases may lapse and be taken:
    /// the watchdog ([`Markets::watch_deadline`]) steps the node down ([`Markets::step_down`]),
    /// and the next renewal that succeeds serves again what is still this node's.
    pub async fn renew(&self) -> Vec<TenantId> {
        let before: Vec<(TenantId, i64)> = self.epochs.iter().map(|e| (e.key().clone(), *e.value())).collect();
        let started = tokio::time::Instant::now();
        // Bounded: a connection that hangs instead of failing must not hold off the deadline.
        let renewed = match tokio::time::timeout(self.config.ttl / 2, self.store.renew_leases(&self.holder, self.config.ttl)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.config.ttl / 2)),
        };
        match renewed {
            Ok(still) => {
                *self.renewed_at.lock() = started;
                let still: HashMap<TenantId, i64> = still.into_iter().collect();
                metrics::gauge!("hexfleet_markets_owned").set(still.len() as f64);
                let lost: Vec<TenantId> = before
                    .into_iter()
                    .filter(|(t, epoch)| {
                        // Lost: held at this epoch before and after the renewal, and not renewed.
                        still.get(t) != Some(epoch) && self.epochs.get(t).is_some_and(|e| *e == *epoch)
                    })
                    .map(|(t, _)| t)
                    .collect();
                if self.stepped_down.swap(false, Ordering::AcqRel) {
                    // Serve again what is still ours at the same epoch and was loaded at it (a lost
                    // market is not: its renewed epoch, if any, is not the one held; one whose
                    // load had failed is left to the take-over pass, which loads it).
                    let mut n = 0;
                    for (t, epoch) in &still {
                        if self.epochs.get(t).is_some_and(|e| *e == *epoch) && self.loaded.get(t).is_some_and(|e| *e == *epoch) {
                            self.ready.insert(t.clone(), ());
                            n += 1;
                        }
                    }
                    tracing::warn!(markets = n, node = %self.node_id, "market leases renewed again: serving them again");
                }
                lost
            }
            Err(e) => {
                metrics::counter!("hexfleet_market_renewal_failures_total").increment(1);
                // The step-down at the local deadline is the watchdog's ([`Markets::watch_deadline`]).
                tracing::warn!(error = %e, stepped_down = self.stepped_down(),
                    "market leases not renewed (database unreachable?); serving on until the local deadline");
                Vec::new()
            }
        }
    }

    /// Stops serving every market this node holds, keeping the leases' epochs: its courier,
    /// tracking and console sessions close (1013) so their apps reconnect, possibly to another
    /// node, and requests for these markets no longer count as local (they answer 503 while the
    /// store is out of reach). The next successful renewal serves again what is still this node's; a market
    /// taken meanwhile is lost, and the node stops.
    fn step_down(&self, why: &str) {
        if self.stepped_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let held: Vec<TenantId> = self.ready.iter().map(|e| e.key().clone()).collect();
        self.ready.clear();
        let sessions: usize = held.iter().map(|t| self.broker.close_sessions(t.as_str())).sum();
        metrics::counter!("hexfleet_market_step_downs_total").increment(1);
        tracing::error!(error = %why, markets = held.len(), sessions, node = %self.node_id, ttl = ?self.config.ttl,
            "no lease renewal for a whole lease: another node may own these markets now; not serving them until a renewal succeeds");
    }

    /// Gives up a market another node owned or owns: nothing of it is written from here on
    /// (fences, snapshots, speeds), what waits in the snapshot buffer is dropped, and the node
    /// stops, so that only the market's owner acts on it (its actors here may be stale).
    fn lose(&self, t: &TenantId, why: &str) {
        self.epochs.remove(t);
        self.ready.remove(t);
        self.loaded.remove(t);
        let (couriers, samples) = self.store.discard_buffered(t);
        tracing::error!(tenant = %t, node = %self.node_id, couriers, samples, "{why}; stopping so that only its owner acts on it");
        metrics::counter!("hexfleet_market_leases_lost_total").increment(1);
        *self.lost.lock() = Some(why.to_owned());
        if let Some(s) = self.shutdown.get() {
            s.cancel();
        }
    }

    /// Whether this node stepped down for want of renewals ([`Markets::renew`]).
    pub fn stepped_down(&self) -> bool {
        self.stepped_down.load(Ordering::Acquire)
    }

    /// One take-over pass: loads markets this node holds but has not loaded (a take-over
    /// whose load failed), then takes over every market whose lease lapsed.
    pub async fn take_over(&self) {
        if self.stepped_down() {
            return;
        }
        let pending: Vec<TenantId> =
            self.epochs.iter().filter(|e| !self.ready.contains_key(e.key())).map(|e| e.key().clone()).collect();
        for t in pending {
            if let Err(e) = self.take_or_find(&t).await {
                tracing::warn!(tenant = %t, error = %e.message, "cannot load a market this node holds; retrying");
            }
        }
        match self.store.unowned_markets().await {
            Ok(free) => {
                for t in free {
                    match self.take_or_find(&t).await {
                        Ok(Route::Local) => tracing::info!(tenant = %t, node = %self.node_id, "took over a market whose lease lapsed"),
                        Ok(Route::Remote(_)) => {}
                        Err(e) => tracing::warn!(tenant = %t, error = %e.message, "market take-over failed"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list unowned markets"),
        }
    }

    /// Renews this node's leases every `renew_every` until `stop`; cancels `shutdown` (and
    /// records why) when this node lost a market. Started before the fleet loads the markets
    /// taken at start, and stopped only after they are released, so no lease lapses while the
    /// node loads or drains. Take-overs run in another task ([`Markets::spawn_taker`]), so a
    /// slow load never delays a renewal. Beside it a watchdog steps the node down at the local
    /// deadline ([`Markets::step_down`]).
    pub fn spawn_renewer(self: &Arc<Self>, stop: CancellationToken, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let _ = self.shutdown.set(shutdown);
        let me = self.clone();
        tokio::spawn(async move {
            let watchdog = me.watch_deadline(stop.clone());
            let renewer = me.renew_until(stop);
            tokio::join!(watchdog, renewer);
        })
    }

    /// The local deadline: the start of the last successful renewal plus the lease, less a
    /// tenth of it for the drift between this node's clock and the database's (by which the
    /// leases expire) and for the moment it takes to step down.
    fn deadline(&self) -> tokio::time::Instant {
        *self.renewed_at.lock() + self.config.ttl - self.config.ttl / 10
    }

    /// Steps down at the local deadline when no renewal has succeeded by then, without waiting
    /// for a renewal to fail: one that hangs (a half-open connection) takes up to half a lease,
    /// which would put the step-down after the lease could be taken by another node.
    async fn watch_deadline(&self, stop: CancellationToken) {
        loop {
            let wake = if self.stepped_down() {
                // Until a renewal succeeds again (it resets the deadline).
                tokio::time::Instant::now() + self.config.renew_every.max(Duration::from_millis(50))
            } else {
                self.deadline()
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(wake) => {}
            }
            if !self.stepped_down() && tokio::time::Instant::now() >= self.deadline() {
                self.step_down(&format!("no successful lease renewal since {:?} ago", self.renewed_at.lock().elapsed()));
            }
        }
    }

    /// Renews every `renew_every` until `stop`; a lost market stops the node ([`Markets::lose`]).
    async fn renew_until(&self, stop: CancellationToken) {
        let mut tick = self.ticker();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for t in self.renew().await {
                self.lose(&t, &format!("lost the lease of market {t} to another node"));
                // Keep renewing the other markets while the node drains.
            }
        }
    }

    /// Ticks every `renew_every`, the first one period from now.
    fn ticker(&self) -> tokio::time::Interval {
        let every = self.config.renew_every.max(Duration::from_millis(50));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    }

    /// Takes over lapsed markets every `renew_every` until `stop`.
    pub fn spawn_taker(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = me.ticker();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => me.take_over().await,
                }
            }
        })
    }

    /// Gives up this node's leases (clean shutdown, after the fleet flushed): other nodes take
    /// the markets over at their next tick instead of waiting for the leases to lapse.
    pub async fn release(&self) {
        // From here on this node writes nothing of any market.
        self.epochs.clear();
        self.ready.clear();
        self.loaded.clear();
        match self.store.release_leases(&self.holder).await {
            Ok(n) => tracing::info!(markets = n, "market leases released"),
            Err(e) => tracing::warn!(error = %e, "market leases not released; they lapse on their own"),
        }
    }
}

/// 503 `market_moving`: the market is between owners.
fn changing_owner(tenant: &TenantId) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "market_moving", format!("market {tenant} is changing owner; retry"))
}

/// What a client is told when a request forwarded to the owner got no answer. Not sent at
/// all (no connection), or a read: 503 `market_moving`, retry. A write that went out may have
/// been applied by the owner: 504 `outcome_unknown`, so that the client reads before it
/// retries (a retried creation would get 409, a retried override could move an order twice).
fn forward_failed(method: &actix_web::http::Method, connect: bool, e: &dyn std::fmt::Display) -> ApiError {
    let safe = matches!(*method, actix_web::http::Method::GET | actix_web::http::Method::HEAD | actix_web::http::Method::OPTIONS);
    if connect || safe {
        return owner_unreachable(e);
    }
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "outcome_unknown",
        format!("the node owning this market did not answer ({e}); the change may have been applied: read it before retrying"),
    )
}

/// 503 `market_moving`: the market's owner cannot be reached (`why`).
fn owner_unreachable(why: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "market_moving", format!("the node owning this market cannot be reached ({why}); retry"))
}

fn store_down(e: hexfleet_persistence::PersistenceError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", format!("cannot read market ownership: {e}"))
}

/// The store the fleet writes through when markets are leased: every batch that writes an
/// order, a courier or an event carries the fencing token of its market, and a batch of a market this
/// node does not hold fails at once with `StoreError::Fenced`.
pub struct FencedStore {
    inner: Arc<SqlStore>,
    markets: Arc<Markets>,
}

impl FencedStore {
    /// Also fences the snapshot flushes of `inner`: a market lost after its rows were buffered
    /// loses them at the flush, in the flush's transaction.
    pub fn new(inner: Arc<SqlStore>, markets: Arc<Markets>) -> Self {
        let weak = Arc::downgrade(&markets);
        inner.fence_snapshots(Box::new(move |t| weak.upgrade()?.lease_of(t)));
        FencedStore { inner, markets }
    }
}

#[async_trait]
impl Store for FencedStore {
    async fn commit(&self, mut batch: Vec<Write>) -> Result<(), StoreError> {
        let mut tenants: Vec<&TenantId> = Vec::new();
        for w in &batch {
            let t = match w {
                Write::Order(o) => &o.tenant,
                Write::Courier(c) | Write::RegisterCourier(c) => &c.tenant,
                // Events fill the webhook outbox: a node that lost the market must not add any.
                Write::Event(e) => &e.tenant,
                _ => continue,
            };
            if !tenants.contains(&t) {
                tenants.push(t);
            }
        }
        let mut fences = Vec::with_capacity(tenants.len());
        for t in tenants {
            fences.push(self.markets.fence(t).ok_or_else(|| StoreError::Fenced(t.clone()))?);
        }
        batch.extend(fences);
        self.inner.commit(batch).await
    }
    // The periodic, not-durable writes are dropped here for markets this node does not hold,
    // and the snapshot flush checks the lease again in its transaction
    // (`SqlStore::fence_snapshots`, set in `new`): a node that lost a market cannot overwrite
    // what the new owner wrote.
    fn snapshot_couriers(&self, mut couriers: Vec<CourierRecord>) -> Result<(), StoreError> {
        couriers.retain(|c| self.markets.holds(&c.tenant));
        self.inner.snapshot_couriers(couriers)
    }
    fn record_locations(&self, tenant: &TenantId, courier: &CourierId, samples: Vec<LocationSample>) -> Result<(), StoreError> {
        if !self.markets.holds(tenant) {
            return Ok(());
        }
        self.inner.record_locations(tenant, courier, samples)
    }
    async fn load(&self) -> Result<Recovered, StoreError> {
        self.inner.load().await
    }
    async fn load_tenant(&self, tenant: &TenantId) -> Result<Recovered, StoreError> {
        self.inner.load_tenant(tenant).await
    }
    async fn order(&self, tenant: &TenantId, id: &OrderId) -> Result<Option<Order>, StoreError> {
        self.inner.order(tenant, id).await
    }
    async fn zone_versions(&self) -> Result<Vec<(TenantId, ZoneId, Ms)>, StoreError> {
        self.inner.zone_versions().await
    }
    async fn zone(&self, tenant: &TenantId, id: &ZoneId) -> Result<Option<ZoneRecord>, StoreError> {
        self.inner.zone(tenant, id).await
    }
    async fn events(&self, query: EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.events(query).await
    }
    async fn export_locations(&self, tenant: &TenantId, courier: &CourierId, from: Ms, to: Ms, limit: usize) -> Result<Vec<LocationSample>, StoreError> {
        self.inner.export_locations(tenant, courier, from, to, limit).await
    }
    async fn erase_locations(&self, tenant: &TenantId, courier: &CourierId) -> Result<u64, StoreError> {
        self.inner.erase_locations(tenant, courier).await
    }
    async fn purge_locations(&self, before: Ms) -> Result<u64, StoreError> {
        self.inner.purge_locations(before).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
    async fn save_speeds(&self, mut tables: Vec<SpeedTable>) -> Result<(), StoreError> {
        tables.retain(|t| self.markets.holds(&t.tenant));
        if tables.is_empty() {
            return Ok(());
        }
        self.inner.save_speeds(tables).await
    }
    async fn load_speeds(&self) -> Result<Vec<SpeedTable>, StoreError> {
        self.inner.load_speeds().await
    }
}

/// Whether a request is about a market's live state, so that its owner must serve it.
fn owner_serves(path: &str) -> bool {
    path.starts_with("/v1/")
        && !matches!(path, "/v1/openapi.json" | "/v1/healthz" | "/v1/readyz" | "/v1/metrics" | "/v1/osmand")
        && path != "/v1/market"
        && !path.starts_with("/v1/webhooks")
        && !path.starts_with("/v1/ws/track/")
}

/// Middleware: serves a request here when this node owns its market (or markets are not
/// leased), else forwards it to the owner. Requests without a valid token pass through, and
/// their handler answers 401.
pub async fn route_market(req: ServiceRequest, next: Next<impl MessageBody + 'static>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let markets = req.app_data::<web::Data<AppState>>().and_then(|s| s.markets.clone());
    let Some(markets) = markets.filter(|_| owner_serves(req.path())) else {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    };
    let Ok(auth) = crate::auth::authenticate(req.request()) else {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    };
    let owner = match markets.route_request(&auth.tenant, req.headers().contains_key(FORWARDED)).await {
        Ok(Route::Local) => return next.call(req).await.map(ServiceResponse::map_into_boxed_body),
        Ok(Route::Remote(addr)) => addr,
        Err(e) => return Ok(req.error_response(e)),
    };
    metrics::counter!("hexfleet_market_forwarded_total").increment(1);
    let websocket = req.headers().get("upgrade").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if websocket { forward_ws(req, &owner, &markets).await } else { forward_http(req, &owner, &markets).await }
}

/// Headers that describe one hop, not the message: never forwarded.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-authenticate" | "proxy-authorization" | "te" | "trailer" | "transfer-encoding"
            | "upgrade" | "host" | "content-length"
    ) || name.starts_with("sec-websocket-")
        || name == NODE_KEY
}

async fn forward_http(mut req: ServiceRequest, owner: &str, markets: &Markets) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let mut payload = req.take_payload();
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > MAX_FORWARD_BODY {
            let e = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("body larger than {MAX_FORWARD_BODY} bytes"));
            return Ok(req.error_response(e));
        }
        body.extend_from_slice(&chunk);
    }
    let resp = markets.forward(owner, req.request(), body.freeze()).await;
    Ok(req.into_response(resp))
}

impl Markets {
    /// Sends a request (its method, path, query, end-to-end headers and `body`) to the node at
    /// `owner` and answers with that node's response, or 503 `market_moving` when it cannot be
    /// reached.
    pub async fn forward(&self, owner: &str, req: &actix_web::HttpRequest, body: web::Bytes) -> HttpResponse {
        let url = format!("{owner}{}", req.uri().path_and_query().map_or("/", |p| p.as_str()));
        let Ok(method) = reqwest::Method::from_bytes(req.method().as_str().as_bytes()) else {
            return actix_web::ResponseError::error_response(&ApiError::bad_request("bad_method", "unsupported method"));
        };
        let mut out = self.http.request(method, &url).header(FORWARDED, &self.node_id).body(body);
        for (k, v) in req.headers() {
            if !hop_by_hop(k.as_str()) {
                out = out.header(k.as_str(), v.as_bytes());
            }
        }
        if let Some(peer) = req.peer_addr() {
            out = out.header("x-forwarded-for", peer.ip().to_string());
        }
        let resp = match tokio::time::timeout(self.config.forward_timeout, out.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.forget_owner(owner);
                return actix_web::ResponseError::error_response(&forward_failed(req.method(), e.is_connect(), &e));
            }
            Err(_) => {
                self.forget_owner(owner);
                let why = format!("no answer within {:?}", self.config.forward_timeout);
                return actix_web::ResponseError::error_response(&forward_failed(req.method(), false, &why));
            }
        };
        if resp.status().as_u16() == 503 {
            // Perhaps the owner is no longer the owner: look it up again next time.
            self.forget_owner(owner);
        }
        let mut b = HttpResponse::build(StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY));
        for (k, v) in resp.headers() {
            if !hop_by_hop(k.as_str()) {
                b.insert_header((k.as_str(), v.as_bytes()));
            }
        }
        // Streamed through, not buffered: a long history export would otherwise be held whole
        // in this node's memory. A failure mid-body cuts the response short (the client sees a
        // truncated body against the Content-Length, or an unfinished chunked one).
        let len = resp.content_length();
        let body = futures_util::TryStreamExt::map_err(resp.bytes_stream(), |e| {
            tracing::warn!(error = %e, "forwarded response broke off");
            actix_web::error::ErrorBadGateway(e)
        });
        match len {
            Some(n) => b.body(actix_web::body::SizedStream::new(n, body)),
            None => b.streaming(body),
        }
    }

    /// Drops `owner` from the cache of owners, so the next request reads the lease again.
    fn forget_owner(&self, owner: &str) {
        self.owners.retain(|_, (a, _)| a != owner);
    }

    /// Where an OsmAnd / Traccar report for `device_id`, a device this node does not know,
    /// must go: `None` to answer here (this node owns the device's market now, or no courier
    /// has the device), else the owner's address. Device → market lookups are cached for a
    /// minute.
    pub async fn route_device(self: &Arc<Self>, device_id: &str) -> Result<Option<String>, ApiError> {
        let Some((tenant, _)) = self.device_owner(device_id).await? else { return Ok(None) };
        Ok(match self.route(&tenant).await? {
            Route::Local => None,
            Route::Remote(addr) => Some(addr),
        })
    }

    /// Forgets the cached owner of a device if it was read more than 5 s ago (the device may
    /// have gone to another courier since); whether it did. At most one more read of the store
    /// per device every 5 s, however many refused reports come.
    pub fn forget_stale_device(&self, device_id: &str) -> bool {
        let read_before = Instant::now() + DEVICE_CACHE_FOR - Duration::from_secs(5);
        self.devices.remove_if(device_id, |_, d| d.0.is_some() && d.1 < read_before).is_some()
    }

    /// The courier (and its tenant) a device is registered to, from the store (cached for a
    /// minute, unknown devices too).
    pub async fn device_owner(&self, device_id: &str) -> Result<Option<(TenantId, CourierId)>, ApiError> {
        let cached = self.devices.get(device_id).filter(|d| d.1 > Instant::now()).map(|d| d.0.clone());
        Ok(match cached {
            Some(owner) => owner,
            None => {
                let found = self.store.device_courier(device_id).await.map_err(ApiError::from)?;
                // Unknown devices are remembered too, so a flood of them costs one query each
                // per minute, not one per report. When full, the expired entries go, then the
                // unknown ones: a flood of made-up ids does not evict the real devices.
                if self.devices.len() >= MAX_DEVICES_CACHED {
                    let now = Instant::now();
                    self.devices.retain(|_, d| d.1 > now);
                    if self.devices.len() >= MAX_DEVICES_CACHED {
                        self.devices.retain(|_, d| d.0.is_some());
                    }
                }
                if self.devices.len() < MAX_DEVICES_CACHED {
                    self.devices.insert(device_id.to_owned(), (found.clone(), Instant::now() + DEVICE_CACHE_FOR));
                }
                found
            }
        })
    }
}

/// Why the owner did not take a relayed WebSocket.
pub(crate) enum OwnerRefused {
    /// The owner answered the handshake with this status and body (401, 403, 404 …).
    Http(StatusCode, Vec<u8>),
    /// It could not be reached.
    Error(ApiError),
}

/// Opens the relayed WebSocket to the market's owner, before the client's own upgrade, so a
/// refusal reaches the client as the owner's HTTP answer instead of an upgrade that closes at once.
pub(crate) async fn connect_owner_ws(
    owner: &str,
    path_and_query: &str,
    authorization: Option<&str>,
    markets: &Markets,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, OwnerRefused> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::{self as tg};

    let bad = |e: &dyn std::fmt::Display| OwnerRefused::Error(ApiError::bad_request("bad_request", e.to_string()));
    let ws_base = owner.replacen("http", "ws", 1);
    let mut up = format!("{ws_base}{path_and_query}").into_client_request().map_err(|e| bad(&e))?;
    if let Some(a) = authorization {
        up.headers_mut().insert("authorization", tg::http::HeaderValue::from_str(a).map_err(|e| bad(&e))?);
    }
    up.headers_mut().insert(FORWARDED, tg::http::HeaderValue::from_str(&markets.node_id).map_err(|e| OwnerRefused::Error(ApiError::internal(e.to_string())))?);
    up.headers_mut().insert(NODE_KEY, tg::http::HeaderValue::from_str(&markets.node_key).map_err(|e| OwnerRefused::Error(ApiError::internal(e.to_string())))?);
    let mut cfg = tg::protocol::WebSocketConfig::default();
    cfg.max_message_size = Some(16 * 1024 * 1024);
    match tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async_with_config(up, Some(cfg), true)).await {
        Ok(Ok((s, _))) => Ok(s),
        Ok(Err(tg::Error::Http(resp))) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                markets.forget_owner(owner);
            }
            Err(OwnerRefused::Http(status, resp.into_body().unwrap_or_default()))
        }
        Ok(Err(e)) => {
            markets.forget_owner(owner);
            Err(OwnerRefused::Error(owner_unreachable(&e)))
        }
        Err(_) => {
            markets.forget_owner(owner);
            Err(OwnerRefused::Error(owner_unreachable(&"it did not answer in time")))
        }
    }
}

/// The payload of the pings a relay sends the owner; their pongs are not passed to the client.
pub(crate) const RELAY_PING: &[u8] = b"hexfleet-relay";

// A relay keeps its owner connection honest with a [`crate::ws::Liveness`]: an owner whose host
// or network died without closing its connections (no FIN, no reset) would otherwise hold the
// relay until TCP gave up retransmitting, about 15 minutes, with the courier's GPS going
// nowhere. The relay pings the owner every `ping_every`, notes what it hears from it, and
// gives up (1013, reconnect) when nothing came back for `idle`.

/// Sends one message on a relay's socket, waiting at most `write`; `false` if it did not go out.
pub(crate) async fn send_within<S>(to: &mut S, m: tokio_tungstenite::tungstenite::Message, write: Duration) -> bool
where
    S: futures_util::Sink<tokio_tungstenite::tungstenite::Message> + Unpin,
{
    matches!(tokio::time::timeout(write, futures_util::SinkExt::send(to, m)).await, Ok(Ok(())))
}

/// Pings the owner from a relay ([`RELAY_PING`]); `false` if the ping did not go out.
pub(crate) async fn ping_owner<S>(up: &mut S, write: Duration) -> bool
where
    S: futures_util::Sink<tokio_tungstenite::tungstenite::Message> + Unpin,
{
    send_within(up, tokio_tungstenite::tungstenite::Message::Ping(RELAY_PING.to_vec().into()), write).await
}

/// The close a relayed client gets when the owner went away: try again (1013).
pub(crate) const OWNER_GONE: &str = "the node owning this market went away; reconnect";

async fn forward_ws(req: ServiceRequest, owner: &str, markets: &Markets) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    use tokio_tungstenite::tungstenite::{self as tg, Message};

    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let authorization = req.headers().get("authorization").map(|a| a.to_str().map(str::to_owned)).transpose()
        .map_err(|_| ApiError::unauthorized("the authorization header is not visible ASCII"))?;
    let upstream = match connect_owner_ws(owner, &path_and_query, authorization.as_deref(), markets).await {
        Ok(s) => s,
        Err(OwnerRefused::Http(status, body)) => {
            return Ok(req.into_response(HttpResponse::build(status).content_type("application/json").body(body)));
        }
        Err(OwnerRefused::Error(e)) => return Ok(req.error_response(e)),
    };
    let (http_req, mut payload) = req.into_parts();
    let body = <web::Payload as actix_web::FromRequest>::from_request(&http_req, &mut payload).await?;
    let (response, session, stream) = actix_ws::handle(&http_req, body)?;
    // A client that stopped reading is not waited for (as on the owner): the owner then stops
    // waiting on this node too.
    let state = http_req.app_data::<web::Data<AppState>>();
    let times = state.map_or_else(crate::ws::SocketTimes::default, |s| s.sockets);
    let shutdown = state.map_or_else(CancellationToken::new, |s| s.shutdown.clone());
    let mut peer = crate::ws::Peer::new(session, times);
    let mut stream = stream
        .max_frame_size(crate::ws::MAX_FRAME)
        .aggregate_continuations()
        .max_continuation_size(crate::ws::MAX_FRAME);
    actix_web::rt::spawn(async move {
        let (mut up_tx, mut up_rx) = upstream.split();
        let mut alive = Liveness::new(times);
        // The client's own idle time. The owner cannot see it: this relay's pings (and the
        // pongs to the owner's) reach it whether the client is there or not, so a client gone
        // without closing (a phone off the network) would be held on both nodes until its
        // token expired.
        // It is pinged when quiet, as on the owner (a parked app may send less often).
        let mut client = times.courier_idle();
        let gone = || actix_ws::CloseReason { code: actix_ws::CloseCode::Again, description: Some(OWNER_GONE.into()) };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    send_within(&mut up_tx, Message::Close(None), times.write).await;
                    peer.close(Some(actix_ws::CloseReason { code: actix_ws::CloseCode::Away, description: Some("server shutting down".into()) })).await;
                    return;
                }
                beat = alive.beat() => match beat {
                    Beat::Dead => {
                        tracing::warn!(?times.idle, "no answer from the market's owner; closing the relayed socket");
                        peer.close(Some(gone())).await;
                        return;
                    }
                    Beat::Ping => {
                        if !ping_owner(&mut up_tx, times.write).await {
                            peer.close(Some(gone())).await;
                            return;
                        }
                    }
                },
                wake = client.wake() => match wake {
                    crate::ws::Wake::Lapsed => {
                        send_within(&mut up_tx, Message::Close(None), times.write).await;
                        peer.close(Some(crate::ws::idle_timeout())).await;
                        return;
                    }
                    crate::ws::Wake::Ping => {
                        if !peer.ping_with(b"").await { break; }
                    }
                },
                m = stream.next() => {
                    if matches!(m, Some(Ok(_))) {
                        client.heard();
                    }
                    match m {
                        Some(Ok(actix_ws::AggregatedMessage::Text(t))) => {
                            if !send_within(&mut up_tx, Message::text(t.to_string()), times.write).await { break; }
                        }
                        Some(Ok(actix_ws::AggregatedMessage::Binary(b))) => {
                            if !send_within(&mut up_tx, Message::binary(b), times.write).await { break; }
                        }
                        // Pings travel to the owner (they keep the session alive there too),
                        // and its pongs come back. Every write to the owner is bounded: an
                        // owner that stopped reading (paused, overloaded, its host gone) must
                        // not hold this task, and with it the idle, liveness and shutdown
                        // checks, until TCP gives up.
                        Some(Ok(actix_ws::AggregatedMessage::Ping(p))) => {
                            if !send_within(&mut up_tx, Message::Ping(p), times.write).await { break; }
                        }
                        Some(Ok(actix_ws::AggregatedMessage::Pong(p))) => {
                            if !send_within(&mut up_tx, Message::Pong(p), times.write).await { break; }
                        }
                        Some(Ok(actix_ws::AggregatedMessage::Close(reason))) => {
                            let frame = reason.map(|r| tg::protocol::CloseFrame {
                                code: u16::from(r.code).into(),
                                reason: r.description.unwrap_or_default().into(),
                            });
                            send_within(&mut up_tx, Message::Close(frame), times.write).await;
                            break;
                        }
                        Some(Err(e)) => {
                            send_within(&mut up_tx, Message::Close(None), times.write).await;
                            peer.close(Some(actix_ws::CloseReason { code: actix_ws::CloseCode::Protocol, description: Some(e.to_string()) })).await;
                            return;
                        }
                        None => {
                            send_within(&mut up_tx, Message::Close(None), times.write).await;
                            return;
                        }
                    }
                }
                m = up_rx.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        alive.heard();
                        if !peer.text(t.as_str().to_owned()).await { break; }
                    }
                    Some(Ok(Message::Binary(b))) => {
                        alive.heard();
                        if !peer.binary(b).await { break; }
                    }
                    Some(Ok(Message::Pong(p))) => {
                        alive.heard();
                        if *p != *RELAY_PING {
                            peer.pong(&p).await;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map(|f| actix_ws::CloseReason { code: u16::from(f.code).into(), description: Some(f.reason.as_str().to_owned()) });
                        peer.close(reason).await;
                        return;
                    }
                    // The owner's pings go on to the client (tungstenite has answered them
                    // already), so that a page that only answers pings is heard here.
                    Some(Ok(Message::Ping(p))) => {
                        alive.heard();
                        if !peer.ping_with(&p).await { break; }
                    }
                    Some(Ok(_)) => alive.heard(),
                    Some(Err(_)) | None => {
                        peer.close(Some(gone())).await;
                        return;
                    }
                },
            }
        }
        peer.close(None).await;
    });
    Ok(ServiceResponse::new(http_req, response).map_into_boxed_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forwarded write that went out and got no answer is "outcome unknown" (504), not
    /// "retry" (503): the owner may have applied it. One that never went out (no connection),
    /// or a read, is 503.
    #[tokio::test]
    async fn a_forwarded_write_without_an_answer_is_an_unknown_outcome() {
        use actix_web::http::Method;
        let client = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c);
            }
        });
        let timed_out = client.post(format!("http://{silent_addr}/v1/orders")).body("{}").send().await.unwrap_err();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let refused = client.post(format!("http://{closed}/v1/orders")).body("{}").send().await.unwrap_err();
        let code = |m: Method, e: &reqwest::Error| {
            let e = forward_failed(&m, e.is_connect(), e);
            (e.status.as_u16(), e.code)
        };
        assert_eq!(code(Method::POST, &timed_out), (504, "outcome_unknown"));
        assert_eq!(code(Method::PUT, &timed_out), (504, "outcome_unknown"));
        assert_eq!(code(Method::GET, &timed_out), (503, "market_moving"));
        assert_eq!(code(Method::POST, &refused), (503, "market_moving"), "never sent: {refused}");
    }

    #[test]
    fn owner_serves_live_state_and_not_tracking_or_webhooks() {
        assert!(owner_serves("/v1/orders"));
        assert!(owner_serves("/v1/ws/courier"));
        assert!(owner_serves("/v1/ws/console"));
        assert!(owner_serves("/v1/zones/z1"));
        assert!(!owner_serves("/v1/ws/track/o1"));
        assert!(!owner_serves("/v1/webhooks/w1"));
        assert!(!owner_serves("/v1/openapi.json"));
        assert!(!owner_serves("/v1/market"));
        assert!(!owner_serves("/healthz"));
        assert!(!owner_serves("/osmand"));
        for p in ["/v1/osmand", "/v1/healthz", "/v1/readyz", "/v1/metrics"] {
            assert!(!owner_serves(p), "{p}: this node's, or a report's own routing (osmand)");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        for h in ["connection", "upgrade", "host", "content-length", "sec-websocket-key", "transfer-encoding", NODE_KEY] {
            assert!(hop_by_hop(h), "{h}");
        }
        for h in ["authorization", "content-type", "accept", "x-request-id"] {
            assert!(!hop_by_hop(h), "{h}");
        }
    }
}

/// Who runs a market (`GET /v1/market`).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MarketDto {
    pub tenant: String,
    /// Whether this deployment leases markets between nodes (`false`: one node runs them all).
    pub leased: bool,
    /// The node id part of the lease holder (`<node id>#<process>`).
    pub node: Option<String>,
    pub holder: Option<String>,
    /// Where other nodes forward the market's requests.
    pub addr: Option<String>,
    /// The fencing token: one more every time the market changes hands.
    pub epoch: Option<i64>,
    /// Unix ms, database clock.
    pub expires_at: Option<i64>,
    /// Whether the lease is held now; `false` with a holder: lapsed or released, taken over at
    /// the next request or renewal period.
    pub live: bool,
    /// Whether the node answering runs the market.
    pub here: bool,
}

/// The lease of the caller's market, read from the store by whichever node the request
/// reaches (it takes nothing).
#[utoipa::path(get, path = "/v1/market", responses((status = 200, body = MarketDto)), security(("bearer" = [])))]
pub(crate) async fn get_market(st: web::Data<AppState>, auth: crate::auth::Auth) -> Result<HttpResponse, ApiError> {
    auth.require(&[crate::auth::Role::Dispatcher, crate::auth::Role::Admin])?;
    let Some(m) = &st.markets else {
        let dto = MarketDto { tenant: auth.tenant.to_string(), leased: false, node: None, holder: None, addr: None, epoch: None, expires_at: None, live: true, here: true };
        return Ok(HttpResponse::Ok().json(dto));
    };
    let lease = st.store.lease(&auth.tenant).await.map_err(store_down)?;
    let here = m.holds(&auth.tenant);
    let dto = match lease {
        Some(l) => MarketDto {
            tenant: auth.tenant.to_string(),
            leased: true,
            node: l.holder.split('#').next().map(str::to_owned),
            holder: Some(l.holder),
            addr: Some(l.addr),
            epoch: Some(l.epoch),
            expires_at: Some(l.expires_at),
            live: l.live,
            here,
        },
        None => MarketDto { tenant: auth.tenant.to_string(), leased: true, node: None, holder: None, addr: None, epoch: None, expires_at: None, live: false, here },
    };
    Ok(HttpResponse::Ok().json(dto))
}
