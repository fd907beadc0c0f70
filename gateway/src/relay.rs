//! The broker's link between nodes: Redis pub/sub, one channel per market (tenant), listened to
//! only by nodes that need it.
//!
//! - Zone changes are state every node must follow (its geofences), so they go on the global
//!   channel `{prefix}fanout`, which every node listens to.
//! - Everything else of tenant `T` goes on `{prefix}fanout:t:{T}`. A node listens to it while
//!   it has a session of `T` (a courier, a customer or a console) and does not run `T`'s actors
//!   itself ([`Relay::set_serves`]: with market leases, the owner delivers its own updates
//!   locally and never hears them back).
//!
//! Before, every node listened to one channel with every update of every market, decoded each
//! (its own too) and fell behind at about 50k updates/s per node. redis-rs queues what a
//! subscriber has not read yet without bound, so that backlog grew by 16 MB/s until the process
//! ran out of memory (BENCHMARKS.md, "Two nodes, 20k courier sockets").
//!
//! A tenant nobody listens to is not published to at all, for positions and statuses (the
//! bulk): `PUBLISH` answers how many nodes heard it, and after an answer of 0 the tenant's
//! conflatable updates are skipped ([`Relay::is_quiet`]) for a probe interval ([`PROBE_EVERY`]), after which one
//! goes out again to ask. A node that starts listening says so on `{prefix}fanout:listen`, which
//! every node hears, so the tenant's owner resumes at once instead of at the next probe.
//! Discrete updates (orders, offers, events) are always published.
//!
//! A node that falls behind what it hears (a busy market with a session here) would queue it
//! without bound inside redis-rs. When the subscription's queue has not been empty for
//! [`MAX_BACKLOG`], the relay drops the connection, and with it the backlog, and subscribes
//! again: those messages are lost for this node's sessions (counted in
//! `hexfleet_redis_lag_resets_total`, logged), as they are while Redis is down.
//!
//! A session registers with the broker first and then waits for [`Relay::listen`] (bounded), so
//! nothing published after its snapshot is missed. A reconciler drops channels of tenants with
//! no session left (or that this node now serves) and retries the ones that failed, every
//! [`RECONCILE_EVERY`]; after a reconnect every channel listened to is subscribed again. This
//! node's own messages (one tenant's sessions on several nodes without market leases) are
//! recognised by their first bytes and skipped without being decoded.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::{FutureExt as _, StreamExt as _};
use parking_lot::Mutex;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often channels nobody here needs any more are dropped and failed ones retried.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// The longest a session waits for its tenant's channel before it goes on without it (the
/// reconciler keeps trying).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages waiting to be published; beyond it they are dropped (counted).
const PUBLISH_QUEUE: usize = 65_536;
/// How long the subscription's queue may stay non-empty before its backlog is dropped.
pub const MAX_BACKLOG: Duration = Duration::from_secs(5);
/// How long a tenant's positions are not published after a `PUBLISH` no node heard (the
/// default of `ServeConfig::fanout_probe`).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Whether this node runs a tenant's actors (then it needs no copy of its updates).
pub type Serves = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// One message to publish: `None` is the global channel.
type Outgoing = (Option<Arc<str>>, Vec<u8>);

/// See the module documentation.
pub struct Relay {
    prefix: String,
    tx: mpsc::Sender<Outgoing>,
    /// The command half of the pub/sub connection; `None` while it reconnects.
    sink: Mutex<Option<PubSubSink>>,
    /// Tenants whose channel is subscribed; changed only under this lock, so a reconcile and a
    /// session's [`Relay::listen`] never undo each other.
    listening: tokio::sync::Mutex<HashSet<String>>,
    serves: OnceLock<Serves>,
    /// How this node's own envelopes begin (`{"node":"<id>",`).
    own: Vec<u8>,
    /// Tenants whose last `PUBLISH` no node heard, until when their positions are skipped.
    quiet: DashMap<Arc<str>, Instant>,
    probe: Duration,
    max_backlog: Duration,
    lag_resets: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl Relay {
    /// Connects (fails if Redis cannot be reached now; later outages are survived) and starts
    /// the publisher, the subscriber (delivering what other nodes publish through `deliver`)
    /// and the reconciler (`wanted`: the tenants with a session on this node). `probe`: see
    /// [`PROBE_EVERY`]; `max_backlog`: see [`MAX_BACKLOG`].
    pub async fn start(
        node: &str,
        url: &str,
        prefix: &str,
        (probe, max_backlog): (Duration, Duration),
        deliver: impl Fn(&[u8]) + Send + Sync + 'static,
        wanted: impl Fn() -> HashSet<String> + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Relay>> {
        let (relay, pending) = Self::connect(node, url, prefix, (probe, max_backlog), &shutdown).await?;
        relay.run(pending, deliver, wanted, shutdown);
        Ok(relay)
    }

    async fn connect(node: &str, url: &str, prefix: &str, (probe, max_backlog): (Duration, Duration), shutdown: &CancellationToken) -> anyhow::Result<(Arc<Relay>, Pending)> {
        let client = redis::Client::open(url)?;
        let conn = redis::aio::ConnectionManager::new(client.clone()).await?;
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let (mut sink, stream) = client.get_async_pubsub().await?.split();
        // Subscribed before returning, so no zone change published after start is missed.
        sink.subscribe(&[global(prefix), listen_notices(prefix)]).await?;
        let relay = Arc::new(Relay {
            prefix: prefix.to_owned(),
            tx,
            sink: Mutex::new(Some(sink)),
            listening: tokio::sync::Mutex::default(),
            serves: OnceLock::new(),
            own: format!(r#"{{"node":{},"#, serde_json::to_string(node)?).into_bytes(),
            quiet: DashMap::new(),
            probe,
            max_backlog,
            lag_resets: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(publisher(conn, relay.clone(), rx, shutdown.clone()));
        Ok((relay.clone(), Pending { client, stream }))
    }

    /// Backlogs dropped because this node fell behind what it hears ([`MAX_BACKLOG`]).
    pub fn lag_resets(&self) -> u64 {
        self.lag_resets.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells the relay which tenants this node runs (at most once; later calls are ignored).
    pub fn set_serves(&self, serves: Serves) {
        let _ = self.serves.set(serves);
    }

    fn serves(&self, tenant: &str) -> bool {
        self.serves.get().is_some_and(|s| s(tenant))
    }

    fn channel(&self, tenant: &str) -> String {
        format!("{}fanout:t:{tenant}", self.prefix)
    }

    /// Queues a message for other nodes (`tenant` `None`: every node). `false` when the queue
    /// is full and it was dropped.
    pub(crate) fn publish(&self, tenant: Option<Arc<str>>, bytes: Vec<u8>) -> bool {
        self.tx.try_send((tenant, bytes)).is_ok()
    }

    /// Whether no other node listened to `tenant` a moment ago: its conflatable updates need
    /// not be rendered or published until the next probe.
    pub fn is_quiet(&self, tenant: &str) -> bool {
        self.quiet.get(tenant).is_some_and(|until| Instant::now() < *until)
    }

    /// Whether a message is one this node sent.
    pub(crate) fn is_own(&self, payload: &[u8]) -> bool {
        payload.starts_with(&self.own)
    }

    /// Makes sure this node hears `tenant`'s updates from the others, unless it runs the
    /// tenant itself. Call it after registering the session that needs them: waits for the
    /// subscription (up to [`LISTEN_TIMEOUT`]; on failure the reconciler retries).
    pub async fn listen(&self, tenant: &str) {
        if self.serves(tenant) {
            return;
        }
        let mut listening = self.listening.lock().await;
        if listening.contains(tenant) {
            return;
        }
        if self.subscribe(tenant).await {
            listening.insert(tenant.to_owned());
        }
    }

    async fn subscribe(&self, tenant: &str) -> bool {
        let Some(mut sink) = self.sink.lock().clone() else { return false };
        match tokio::time::timeout(LISTEN_TIMEOUT, sink.subscribe(self.channel(tenant))).await {
            Ok(Ok(())) => {
                metrics::counter!("hexfleet_redis_subscriptions_total").increment(1);
                // The tenant's owner may have gone quiet on it: tell it to publish again.
                let _ = self.tx.try_send((Some(LISTEN.into()), tenant.as_bytes().to_vec()));
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(%tenant, error = %e, "cannot listen to a market's fan-out channel; retrying");
                false
            }
            Err(_) => {
                tracing::warn!(%tenant, "no answer to a fan-out subscription; retrying");
                false
            }
        }
    }

    /// One reconcile pass: `wanted` are the tenants with a session on this node.
    async fn reconcile(&self, wanted: HashSet<String>) {
        let wanted: HashSet<String> = wanted.into_iter().filter(|t| !self.serves(t)).collect();
        let mut listening = self.listening.lock().await;
        let Some(mut sink) = self.sink.lock().clone() else { return };
        let unneeded: Vec<String> = listening.difference(&wanted).cloned().collect();
        for t in unneeded {
            match tokio::time::timeout(LISTEN_TIMEOUT, sink.unsubscribe(self.channel(&t))).await {
                Ok(Ok(())) => {
                    listening.remove(&t);
                }
                _ => tracing::debug!(tenant = %t, "fan-out unsubscribe failed; retrying"),
            }
        }
        for t in wanted.difference(&listening.clone()) {
            if self.subscribe(t).await {
                listening.insert(t.clone());
            }
        }
        metrics::gauge!("hexfleet_redis_channels").set(listening.len() as f64);
    }

    /// Starts the subscriber (delivering through `deliver`) and the reconciler (`wanted`: the
    /// tenants with a session here).
    fn run(
        self: &Arc<Self>,
        pending: Pending,
        deliver: impl Fn(&[u8]) + Send + Sync + 'static,
        wanted: impl Fn() -> HashSet<String> + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) {
        tokio::spawn(subscriber(self.clone(), pending, deliver, shutdown.clone()));
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RECONCILE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => me.reconcile(wanted()).await,
                }
            }
        });
    }
}

/// The pub/sub connection made at start, until [`Relay::run`] reads it.
struct Pending {
    client: redis::Client,
    stream: PubSubStream,
}

fn global(prefix: &str) -> String {
    format!("{prefix}fanout")
}

/// Where a node says it started listening to a tenant (payload: the tenant id).
fn listen_notices(prefix: &str) -> String {
    format!("{prefix}fanout:listen")
}

/// The pseudo-tenant under which the publisher sends a listen notice.
const LISTEN: &str = "\u{0}listen";

async fn publisher(mut conn: redis::aio::ConnectionManager, relay: Arc<Relay>, mut rx: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(256);
    let (global, notices) = (global(&relay.prefix), listen_notices(&relay.prefix));
    let mut channels: std::collections::HashMap<Arc<str>, String> = std::collections::HashMap::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            () = shutdown.cancelled() => 0,
        };
        if n == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        let mut tenants = Vec::with_capacity(batch.len());
        for (tenant, m) in batch.drain(..) {
            let channel = match &tenant {
                None => &global,
                Some(t) if &**t == LISTEN => &notices,
                Some(t) => {
                    if !channels.contains_key(t) {
                        if channels.len() >= 100_000 {
                            channels.clear();
                        }
                        channels.insert(t.clone(), relay.channel(t));
                    }
                    &channels[t]
                }
            };
            pipe.cmd("PUBLISH").arg(channel).arg(m);
            tenants.push(tenant);
        }
        match pipe.query_async::<Vec<i64>>(&mut conn).await {
            Ok(heard) => {
                let now = Instant::now();
                for (tenant, heard) in tenants.into_iter().zip(heard) {
                    match tenant {
                        Some(t) if &*t == LISTEN => {}
                        Some(t) if heard == 0 => {
                            relay.quiet.insert(t, now + relay.probe);
                        }
                        Some(t) => {
                            relay.quiet.remove(&t);
                        }
                        None => {}
                    }
                }
            }
            Err(e) => {
                metrics::counter!("hexfleet_redis_errors_total").increment(1);
                tracing::warn!(error = %e, messages = n, "redis publish failed; messages lost for other nodes");
            }
        }
    }
}

async fn subscriber(relay: Arc<Relay>, pending: Pending, deliver: impl Fn(&[u8]), shutdown: CancellationToken) {
    let Pending { client, stream } = pending;
    let notices = listen_notices(&relay.prefix);
    let mut stream = Some(stream);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                let reconnect = async {
                    let (mut sink, s) = client.get_async_pubsub().await?.split();
                    sink.subscribe(&[global(&relay.prefix), listen_notices(&relay.prefix)]).await?;
                    // Under the lock: a session's `listen` waits for this, then finds its
                    // tenant subscribed again (or subscribes it).
                    let listening = relay.listening.lock().await;
                    for t in listening.iter() {
                        sink.subscribe(relay.channel(t)).await?;
                    }
                    *relay.sink.lock() = Some(sink);
                    Ok::<_, redis::RedisError>(s)
                };
                match tokio::select! { r = reconnect => r, () = shutdown.cancelled() => return } {
                    Ok(s) => {
                        tracing::info!("redis subscription restored");
                        backoff = Duration::from_millis(100);
                        s
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "redis subscribe failed; retrying");
                        tokio::select! { () = tokio::time::sleep(backoff) => {}, () = shutdown.cancelled() => return }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
        };
        // Since when the queue has not been found empty (`None`: it was, at the last read).
        let mut behind_since: Option<Instant> = None;
        loop {
            let msg = match s.next().now_or_never() {
                Some(m) => {
                    let since = *behind_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= relay.max_backlog {
                        relay.lag_resets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        metrics::counter!("hexfleet_redis_lag_resets_total").increment(1);
                        tracing::error!(behind_for = ?since.elapsed(), "fan-out from other nodes arrives faster than this node delivers it: backlog dropped, subscribing again");
                        break;
                    }
                    m
                }
                None => {
                    behind_since = None;
                    tokio::select! { m = s.next() => m, () = shutdown.cancelled() => return }
                }
            };
            let Some(msg) = msg else { break };
            let payload: &[u8] = msg.get_payload_bytes();
            if msg.get_channel_name() == notices {
                // Another node listens to this tenant now: publish its positions again.
                if let Ok(t) = std::str::from_utf8(payload) {
                    relay.quiet.remove(t);
                }
                continue;
            }
            if relay.is_own(payload) {
                continue;
            }
            metrics::counter!("hexfleet_redis_received_total").increment(1);
            deliver(payload);
        }
        *relay.sink.lock() = None;
        tracing::warn!("redis subscription lost; reconnecting");
    }
}
