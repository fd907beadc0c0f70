//! The broker's link between nodes: Redis pub/sub, with channels per market (tenant) and per
//! tracked order, listened to only by the nodes that need them.
//!
//! Channels (all under the deployment's `{prefix}`):
//! - `fanout`: zone changes, state every node must follow (its geofences); every node listens.
//! - `fanout:t:{T}`: everything of market `T` (positions, statuses, orders, offers, events),
//!   for consoles and courier sessions of `T` ([`Topic::Market`]).
//! - `fanout:o:{T}:{O}`: order `O`'s updates and the positions of the courier carrying it, for
//!   customers tracking `O` ([`Topic::Order`]). A node with one tracking page open hears one
//!   courier, not the whole market.
//! - `fanout:listen`: notices that a node started listening to a channel (below).
//!
//! A node listens to a channel while it has a session that needs it and does not run the
//! market's actors itself ([`Relay::set_serves`]: with market leases, the owner delivers its own
//! updates locally and never hears them back). A session registers with the broker first and
//! then waits for [`Relay::listen`] (bounded), so nothing published after its snapshot is
//! missed. A reconciler drops channels no session needs any more (or of markets this node now
//! runs) and retries the ones that failed, every [`RECONCILE_EVERY`]; after a reconnect every
//! channel listened to is subscribed again. This node's own messages (a market's sessions on
//! several nodes without market leases) are recognised by their first bytes and skipped
//! without being decoded.
//!
//! A channel nobody listens to is not published to, for positions and statuses (the bulk):
//! `PUBLISH` answers how many nodes heard it, and after an answer of 0 the channel's conflatable
//! updates are skipped ([`Relay::is_quiet`]) for a probe interval ([`PROBE_EVERY`]), after
//! which one goes out again to ask. A node that starts listening says so on `fanout:listen`,
//! which every node hears, so the owner resumes at once instead of at the next probe.
//! Discrete updates (orders, offers, events) are always published.
//!
//! A node that falls behind what it hears would queue it without bound inside redis-rs. When
//! the subscription's queue has not been empty for [`MAX_BACKLOG`], the relay drops the
//! connection, and with it the backlog, and subscribes again: those messages are lost for this
//! node's sessions (counted in `hexfleet_redis_lag_resets_total`, logged), as they are while
//! Redis is down.
//!
//! Before, every node listened to one channel with every update of every market and decoded
//! each (its own too). At 50k updates/s per node it fell behind, and the backlog grew by
//! 16 MB/s until the process ran out of memory (BENCHMARKS.md, "Two nodes, 20k courier
//! sockets").

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// The longest a session waits for its channel before it goes on without it (the reconciler
/// keeps trying).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages waiting to be published; beyond it they are dropped (counted).
const PUBLISH_QUEUE: usize = 65_536;

/// How long after the server's shutdown began the publisher ends by itself if the server
/// does not call [`Relay::finish`] (its flush and release take seconds).
const FINISH_AFTER_SHUTDOWN: Duration = Duration::from_secs(60);
/// How long the subscription may hear nothing before it asks Redis whether the connection is
/// still there (a `PING` on it, answered within [`LISTEN_TIMEOUT`], or it is opened again).
/// A connection can vanish without closing (a NAT or load balancer forgetting an idle flow,
/// a failover that strands the old address): without the check, every tracking page on this
/// node fed from other nodes would get nothing, for good.
pub const SUBSCRIPTION_CHECK: Duration = Duration::from_secs(5);
/// How long the subscription's queue may stay non-empty before its backlog is dropped.
pub const MAX_BACKLOG: Duration = Duration::from_secs(5);
/// How long a channel's positions are not published after a `PUBLISH` no node heard (the
/// default of `ServeConfig::fanout_probe`).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Whether this node runs a tenant's actors (then it needs no copy of its updates).
pub type Serves = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What a channel carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic<'a> {
    /// Every update of a market.
    Market(&'a str),
    /// One order of a market: its updates and its courier's positions.
    Order(&'a str, &'a str),
}

impl Topic<'_> {
    fn tenant(&self) -> &str {
        match self {
            Topic::Market(t) | Topic::Order(t, _) => t,
        }
    }
}

/// Where a message was heard, which decides who it is delivered to on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard {
    /// The global channel (zone changes).
    Global,
    /// A market's channel: for its consoles and courier sessions.
    Market,
    /// An order's channel: for its tracking sessions.
    Order,
}

/// A channel this node listens to: (tenant, channel name).
type Channel = (String, String);

/// One message to publish: channel and payload (shared by the channels of one update).
type Outgoing = (String, Arc<Vec<u8>>);

/// See the module documentation.
pub struct Relay {
    prefix: String,
    tx: mpsc::Sender<Outgoing>,
    /// For listen notices, which must not wait behind the publish queue.
    notice_conn: redis::aio::ConnectionManager,
    /// The command half of the pub/sub connection; `None` while it reconnects.
    sink: Mutex<Option<PubSubSink>>,
    /// The channels this node means to hear, with their tenants. A reconnect subscribes
    /// exactly these, so when a (un)subscribe gets no answer the relay records its intent here
    /// and reconnects ([`Relay::reset`]) rather than guess what Redis applied. Changed only
    /// under this lock, so a reconcile and a session's [`Relay::listen`] never undo each other.
    listening: tokio::sync::Mutex<HashSet<Channel>>,
    /// Asks the subscriber to drop the connection and make it again.
    reset: tokio::sync::Notify,
    serves: OnceLock<Serves>,
    /// How this node's own envelopes begin (`{"node":"<id>",`).
    own: Vec<u8>,
    /// Channels whose last `PUBLISH` no node heard, until when their positions are skipped.
    quiet: DashMap<String, Instant>,
    /// When a listen notice last arrived per channel: a `PUBLISH` sent before it that no node
    /// heard must not mark the channel quiet again.
    resumed: DashMap<String, Instant>,
    probe: Duration,
    max_backlog: Duration,
    lag_resets: AtomicU64,
    /// When a subscription last failed: for a moment after, sessions do not wait for theirs
    /// (one at a time, each up to [`LISTEN_TIMEOUT`], would queue every new session behind a
    /// hanging Redis); the reconnect subscribes them.
    failed_at: Mutex<Option<Instant>>,
    /// Cancelled by [`Relay::finish`]: the publisher sends what is queued and ends.
    finish: CancellationToken,
    /// The publisher, awaited by [`Relay::finish`].
    publisher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

thread_local! {
    /// Channel names are built here to look them up without allocating (hot path).
    static NAME: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Relay {
    /// Connects (fails if Redis cannot be reached now; later outages are survived) and starts
    /// the publisher, the subscriber (delivering what other nodes publish through `deliver`)
    /// and the reconciler (`wanted`: the channels the sessions on this node need). `probe`:
    /// see [`PROBE_EVERY`]; `max_backlog`: see [`MAX_BACKLOG`]. `gap` runs once the
    /// subscription is back after it was lost or its backlog dropped: what other nodes
    /// published meanwhile is gone, and the sessions fed from them must start again.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        node: &str,
        url: &str,
        prefix: &str,
        (probe, max_backlog): (Duration, Duration),
        deliver: impl Fn(Heard, &[u8]) + Send + Sync + 'static,
        gap: impl Fn(&Relay) + Send + Sync + 'static,
        wanted: impl Fn(&Relay) -> HashSet<Channel> + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Relay>> {
        let client = redis::Client::open(url)?;
        let conn = redis::aio::ConnectionManager::new(client.clone()).await?;
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        // Subscribed before returning, so no zone change published after start is missed.
        let (sink, stream) = pubsub(&client, prefix).await?;
        let relay = Arc::new(Relay {
            prefix: prefix.to_owned(),
            tx,
            notice_conn: conn.clone(),
            sink: Mutex::new(Some(sink)),
            listening: tokio::sync::Mutex::default(),
            reset: tokio::sync::Notify::new(),
            serves: OnceLock::new(),
            own: format!(r#"{{"node":{},"#, serde_json::to_string(node)?).into_bytes(),
            quiet: DashMap::new(),
            resumed: DashMap::new(),
            probe,
            max_backlog,
            lag_resets: AtomicU64::new(0),
            failed_at: Mutex::new(None),
            finish: CancellationToken::new(),
            publisher: Mutex::new(None),
        });
        // The publisher outlives `shutdown`: what the node does while it winds down (requests
        // in flight, the fleet's last changes) still reaches the other nodes, until the server
        // calls `finish`. Before, it stopped at `shutdown`, and every update of a node's
        // graceful stop was dropped (logged as a full queue). Ended anyway a while after
        // `shutdown` if no one calls `finish`.
        *relay.publisher.lock() = Some(tokio::spawn(publisher(conn, relay.clone(), rx, relay.finish.clone())));
        {
            let (finish, shutdown) = (relay.finish.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::select! {
                    () = finish.cancelled() => {}
                    () = tokio::time::sleep(FINISH_AFTER_SHUTDOWN) => finish.cancel(),
                }
            });
        }
        tokio::spawn(subscriber(relay.clone(), client, stream, deliver, gap, shutdown.clone()));
        let me = relay.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RECONCILE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        // Marks of channels no longer published to (finished orders).
                        let now = Instant::now();
                        me.quiet.retain(|_, until| *until > now);
                        me.resumed.retain(|_, at| now.duration_since(*at) < 4 * me.probe.max(RECONCILE_EVERY));
                        me.reconcile(&wanted).await;
                    }
                }
            }
        });
        Ok(relay)
    }

    /// Backlogs dropped because this node fell behind what it hears ([`MAX_BACKLOG`]).
    pub fn lag_resets(&self) -> u64 {
        self.lag_resets.load(Ordering::Relaxed)
    }

    /// Tells the relay which tenants this node runs (at most once; later calls are ignored).
    pub fn set_serves(&self, serves: Serves) {
        let _ = self.serves.set(serves);
    }

    /// Whether this node runs `tenant`'s actors (then it needs none of its channels).
    pub fn serves(&self, tenant: &str) -> bool {
        self.serves.get().is_some_and(|s| s(tenant))
    }

    fn write_name(&self, out: &mut String, topic: Topic<'_>) {
        out.clear();
        // Ids may hold ':', so the order channel carries the tenant's length: `a` + `b:c` and
        // `a:b` + `c` must not share a channel.
        let _ = match topic {
            Topic::Market(t) => write!(out, "{}fanout:t:{t}", self.prefix),
            Topic::Order(t, o) => write!(out, "{}fanout:o:{}:{t}:{o}", self.prefix, t.len()),
        };
    }

    /// The channel of a topic.
    pub fn channel(&self, topic: Topic<'_>) -> String {
        let mut s = String::new();
        self.write_name(&mut s, topic);
        s
    }

    /// Whether a `PUBLISH` on this topic's channel was heard by no node a moment ago: its
    /// positions need not be rendered or published until the next probe.
    pub fn is_quiet(&self, topic: Topic<'_>) -> bool {
        self.unless_quiet(topic, |_| ()).is_none()
    }

    /// The topic's channel, unless it is quiet ([`Relay::is_quiet`]): the name is built once,
    /// and allocated only when it is to be published to.
    pub(crate) fn channel_unless_quiet(&self, topic: Topic<'_>) -> Option<String> {
        self.unless_quiet(topic, |name| name.to_owned())
    }

    fn unless_quiet<T>(&self, topic: Topic<'_>, then: impl FnOnce(&str) -> T) -> Option<T> {
        NAME.with_borrow_mut(|name| {
            self.write_name(name, topic);
            let quiet = self.quiet.get(name.as_str()).is_some_and(|until| Instant::now() < *until);
            (!quiet).then(|| then(name))
        })
    }

    /// Queues a message for other nodes on `channel` (see [`Relay::channel`]; `None`: the
    /// global channel). `false` when it was dropped: the queue is full, or publishing has
    /// finished ([`Relay::finished`]).
    pub(crate) fn publish(&self, channel: Option<String>, bytes: Arc<Vec<u8>>) -> bool {
        self.tx.try_send((channel.unwrap_or_else(|| global(&self.prefix)), bytes)).is_ok()
    }

    /// Whether publishing has finished (the node is stopping): nothing more goes out.
    pub(crate) fn finished(&self) -> bool {
        self.tx.is_closed()
    }

    /// Ends publishing, for a node's shutdown once its fleet has stopped: what is queued is
    /// sent (for up to `within`), and later messages are refused. Idempotent.
    pub async fn finish(&self, within: Duration) {
        self.finish.cancel();
        let publisher = self.publisher.lock().take();
        if let Some(p) = publisher
            && tokio::time::timeout(within, p).await.is_err()
        {
            tracing::warn!(?within, "the last fan-out messages were not all sent to redis in time");
        }
    }

    fn recently_failed(&self) -> bool {
        self.failed_at.lock().is_some_and(|at| at.elapsed() < RECONCILE_EVERY)
    }

    /// Makes sure this node hears `topic` from the others, unless it runs the topic's market
    /// itself. Call it after registering the session that needs it: waits for the subscription
    /// (up to [`LISTEN_TIMEOUT`]; if Redis does not answer, the reconnect subscribes it).
    pub async fn listen(&self, topic: Topic<'_>) {
        if self.serves(topic.tenant()) {
            return;
        }
        let channel = (topic.tenant().to_owned(), self.channel(topic));
        let Ok(mut listening) = tokio::time::timeout(LISTEN_TIMEOUT, self.listening.lock()).await else {
            return; // a reconnect holds it; the reconciler adds this channel after
        };
        if listening.contains(&channel) {
            return;
        }
        let name = channel.1.clone();
        listening.insert(channel);
        if !self.recently_failed() {
            self.subscribe(&name).await;
        }
    }

    /// Whether the subscription's connection answers a `PING` within [`LISTEN_TIMEOUT`]
    /// (`true` while it is being opened again: nothing to check).
    async fn subscription_answers(&self) -> bool {
        let Some(mut sink) = self.sink.lock().clone() else { return true };
        matches!(tokio::time::timeout(LISTEN_TIMEOUT, sink.ping::<redis::Value>()).await, Ok(Ok(_)))
    }

    /// Sends a SUBSCRIBE for a channel already recorded in `listening`; without an answer, the
    /// connection is made again (which subscribes everything recorded).
    async fn subscribe(&self, channel: &str) {
        let Some(mut sink) = self.sink.lock().clone() else { return }; // reconnecting: it will
        match tokio::time::timeout(LISTEN_TIMEOUT, sink.subscribe(channel)).await {
            Ok(Ok(())) => {
                *self.failed_at.lock() = None;
                metrics::counter!("hexfleet_redis_subscriptions_total").increment(1);
                self.notify_listening(vec![channel.to_owned()]);
            }
            Ok(Err(e)) => self.failed(&format!("cannot listen to {channel}: {e}")),
            Err(_) => self.failed(&format!("no answer to a subscription to {channel}")),
        }
    }

    fn failed(&self, why: &str) {
        *self.failed_at.lock() = Some(Instant::now());
        tracing::warn!(error = %why, "fan-out subscription failed; reconnecting");
        self.reset.notify_one();
    }

    /// Tells the other nodes this node now listens to `channels` (a publisher that went quiet
    /// on one resumes at once). Off the publish queue, so it never waits behind it.
    fn notify_listening(&self, channels: Vec<String>) {
        let (mut conn, to) = (self.notice_conn.clone(), notices(&self.prefix));
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            for c in channels {
                pipe.cmd("PUBLISH").arg(&to).arg(c).ignore();
            }
            let _ = tokio::time::timeout(LISTEN_TIMEOUT, pipe.query_async::<()>(&mut conn)).await;
        });
    }

    /// One reconcile pass: drops channels no session needs any more (or of markets this node
    /// now runs) and subscribes the missing ones. `wanted` (the channels the sessions on this
    /// node need) is read under the lock, so a session registered meanwhile is counted.
    async fn reconcile(&self, wanted: &(impl Fn(&Relay) -> HashSet<Channel> + ?Sized)) {
        let Ok(mut listening) = tokio::time::timeout(LISTEN_TIMEOUT, self.listening.lock()).await else { return };
        let Some(mut sink) = self.sink.lock().clone() else { return };
        let wanted: HashSet<Channel> = wanted(self).into_iter().filter(|(t, _)| !self.serves(t)).collect();
        let unneeded: Vec<Channel> = listening.difference(&wanted).cloned().collect();
        for c in unneeded {
            listening.remove(&c);
            if !matches!(tokio::time::timeout(LISTEN_TIMEOUT, sink.unsubscribe(&c.1)).await, Ok(Ok(()))) {
                // Redis may still apply it, or not: make the connection again from `listening`.
                self.failed(&format!("no answer to an unsubscribe from {}", c.1));
                return;
            }
        }
        if self.recently_failed() {
            return;
        }
        let missing: Vec<Channel> = wanted.difference(&listening).cloned().collect();
        for c in missing {
            let name = c.1.clone();
            listening.insert(c);
            self.subscribe(&name).await;
            if self.recently_failed() {
                break;
            }
        }
        metrics::gauge!("hexfleet_redis_channels").set(listening.len() as f64);
    }

    /// Whether a message is one this node sent.
    fn is_own(&self, payload: &[u8]) -> bool {
        payload.starts_with(&self.own)
    }

    fn heard(&self, channel: &str) -> Option<Heard> {
        let rest = channel.strip_prefix(self.prefix.as_str())?.strip_prefix("fanout")?;
        match rest {
            "" => Some(Heard::Global),
            _ if rest.starts_with(":t:") => Some(Heard::Market),
            _ if rest.starts_with(":o:") => Some(Heard::Order),
            _ => None,
        }
    }
}

fn global(prefix: &str) -> String {
    format!("{prefix}fanout")
}

/// Where a node says it started listening to a channel (payload: the channel).
fn notices(prefix: &str) -> String {
    format!("{prefix}fanout:listen")
}

/// A pub/sub connection that hears the channels every node hears.
async fn pubsub(client: &redis::Client, prefix: &str) -> redis::RedisResult<(PubSubSink, PubSubStream)> {
    let (mut sink, stream) = client.get_async_pubsub().await?.split();
    sink.subscribe(&[global(prefix), notices(prefix)]).await?;
    Ok((sink, stream))
}

async fn publisher(mut conn: redis::aio::ConnectionManager, relay: Arc<Relay>, mut rx: mpsc::Receiver<Outgoing>, finish: CancellationToken) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(256);
    let mut finishing = false;
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            // Closed: no more messages are taken; those queued are still received, then 0.
            () = finish.cancelled(), if !finishing => {
                finishing = true;
                rx.close();
                continue;
            }
        };
        if n == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for (channel, m) in &batch {
            pipe.cmd("PUBLISH").arg(channel).arg(m.as_slice());
        }
        let sent = Instant::now();
        match pipe.query_async::<Vec<i64>>(&mut conn).await {
            Ok(heard) => {
                let now = Instant::now();
                for ((channel, _), heard) in batch.drain(..).zip(heard) {
                    if heard == 0 {
                        // Not if a node said it listens after this was sent (it missed it).
                        if relay.resumed.get(&channel).is_none_or(|at| *at < sent) {
                            relay.quiet.insert(channel, now + relay.probe);
                        }
                    } else if relay.quiet.contains_key(&channel) {
                        relay.quiet.remove(&channel);
                    }
                }
            }
            Err(e) => {
                batch.clear();
                metrics::counter!("hexfleet_redis_errors_total").increment(1);
                tracing::warn!(error = %e, messages = n, "redis publish failed; messages lost for other nodes");
            }
        }
    }
}

async fn subscriber(
    relay: Arc<Relay>,
    client: redis::Client,
    first: PubSubStream,
    deliver: impl Fn(Heard, &[u8]),
    gap: impl Fn(&Relay),
    shutdown: CancellationToken,
) {
    let notices = notices(&relay.prefix);
    let mut stream = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                let reconnect = async {
                    let (mut sink, s) = pubsub(&client, &relay.prefix).await?;
                    // Exactly what `listening` records, under its lock: sessions registered
                    // meanwhile wait (bounded) or are added by the reconciler after.
                    let listening = relay.listening.lock().await;
                    let all: Vec<String> = listening.iter().map(|(_, c)| c.clone()).collect();
                    if !all.is_empty() {
                        sink.subscribe(&all).await?;
                    }
                    *relay.sink.lock() = Some(sink);
                    *relay.failed_at.lock() = None;
                    Ok::<_, redis::RedisError>((s, all))
                };
                // Bounded: Redis may accept the connection and then say nothing.
                let reconnect = async {
                    match tokio::time::timeout(2 * LISTEN_TIMEOUT, reconnect).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer within {:?}", 2 * LISTEN_TIMEOUT)),
                    }
                };
                match tokio::select! { r = reconnect => r, () = shutdown.cancelled() => return } {
                    Ok((s, all)) => {
                        tracing::info!(channels = all.len(), "redis subscription restored");
                        // Publishers that went quiet on these meanwhile resume at once.
                        relay.notify_listening(all);
                        // A reset asked for before this reconnect (a SUBSCRIBE that got no
                        // answer on the old connection) is served by it: not a second one.
                        let _ = relay.reset.notified().now_or_never();
                        // What was published while it was down (or dropped with a backlog) is
                        // gone: the sessions it fed start again, on the restored subscription.
                        gap(&relay);
                        backoff = Duration::from_millis(100);
                        s
                    }
                    Err(e) => {
                        *relay.failed_at.lock() = Some(Instant::now());
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
        let mut in_a_row = 0u32;
        // One timer for the quiet check, moved on when it fires early, not one made for every
        // wait (a timer registered and dropped per message on a busy link).
        let mut heard = tokio::time::Instant::now();
        let check = tokio::time::sleep(SUBSCRIPTION_CHECK);
        tokio::pin!(check);
        loop {
            // Outside tokio's cooperative budget: within it, a full queue reads as empty after
            // 128 messages and the backlog would never be seen. So this task yields by itself.
            in_a_row += 1;
            if in_a_row.is_multiple_of(256) {
                tokio::task::yield_now().await;
            }
            let msg = match tokio::task::unconstrained(s.next()).now_or_never() {
                Some(m) => {
                    let since = *behind_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= relay.max_backlog {
                        relay.lag_resets.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("hexfleet_redis_lag_resets_total").increment(1);
                        tracing::error!(behind_for = ?since.elapsed(), "fan-out from other nodes arrives faster than this node delivers it: backlog dropped, subscribing again");
                        break;
                    }
                    m
                }
                None => {
                    behind_since = None;
                    in_a_row = 0;
                    let m = tokio::select! {
                        m = s.next() => m,
                        () = relay.reset.notified() => break,
                        () = shutdown.cancelled() => return,
                        () = &mut check => {
                            let quiet_until = heard + SUBSCRIPTION_CHECK;
                            if tokio::time::Instant::now() < quiet_until {
                                check.as_mut().reset(quiet_until);
                                continue;
                            }
                            if relay.subscription_answers().await {
                                heard = tokio::time::Instant::now();
                                check.as_mut().reset(heard + SUBSCRIPTION_CHECK);
                                continue;
                            }
                            metrics::counter!("hexfleet_redis_errors_total").increment(1);
                            tracing::warn!(quiet_for = ?SUBSCRIPTION_CHECK, "redis subscription does not answer a ping");
                            break;
                        }
                    };
                    heard = tokio::time::Instant::now();
                    m
                }
            };
            let Some(msg) = msg else { break };
            let payload: &[u8] = msg.get_payload_bytes();
            let channel = msg.get_channel_name();
            if channel == notices {
                // Another node listens to this channel now: publish its positions again.
                if let Ok(c) = std::str::from_utf8(payload) {
                    relay.quiet.remove(c);
                    relay.resumed.insert(c.to_owned(), Instant::now());
                }
                continue;
            }
            if relay.is_own(payload) {
                continue;
            }
            let Some(heard) = relay.heard(channel) else { continue };
            metrics::counter!("hexfleet_redis_received_total").increment(1);
            deliver(heard, payload);
        }
        *relay.sink.lock() = None;
        tracing::warn!("redis subscription lost; reconnecting");
    }
}
