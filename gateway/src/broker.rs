//! The fan-out broker: turns the actors' [`Update`]s into wire messages and delivers them to the
//! WebSocket sessions that watch them, on this node and, through Redis pub/sub, on the others.
//!
//! Delivery never blocks the publisher (the courier actor on the GPS hot path):
//! - every session has an [`Outbox`]: a bounded queue of discrete messages plus a conflation
//!   slot (or map) for positions, and a `Notify` that wakes the session's writer;
//! - positions are conflated: a watcher that is slow sees the latest position, never a backlog;
//! - discrete messages (order updates, offers, events) are never dropped silently: when a
//!   session's queue is full it is marked overflowed, and its writer tells the client
//!   (`{"t":"error","code":"too_slow"}`) and closes the socket.
//!
//! Streams and `seq`: a track stream (one order) numbers its messages per node; its discrete
//! messages are kept in a bounded replay buffer so a watcher reconnecting with `?since=SEQ`
//! gets what it missed, or a `resync` and a fresh snapshot. A tenant's consoles on a node share
//! a console stream the same way (its events and zone changes replayed, its batches and
//! snapshots numbered by the writers from the same count, [`Broker::console_numbers`]).
//! Courier sockets number their messages per connection, as the session's writer sends them
//! ([`Outbox::per_connection`]): numbered by the threads that queue them, two messages queued
//! at once could go out in the other order. Either way a socket's `seq` only grows.
//!
//! Between nodes, each update is rendered as JSON and published through Redis
//! ([`crate::relay`]): on its market's channel and, for an order's updates and its courier's
//! positions, on the order's channel, each heard by the nodes with a session that needs it and
//! that do not run the market; zone changes go on the global channel every node hears. Each
//! node delivers what it hears to its local sessions. Publishing goes through a bounded queue
//! to one task that pipelines; if Redis is down, positions are dropped (counted) and discrete
//! messages are dropped with an error log and a counter: cross-node fan-out is best effort by
//! design, while local delivery and durability are not affected.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use hexfleet_actors::domain::Order;
use hexfleet_actors::publish::{Publisher, Update};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::dto::{LatLngDto, OrderDto, courier_notice_value};
use crate::relay::{Heard, Relay, Topic};

/// Discrete messages a session may have queued before it counts as too slow.
pub const OUTBOX_CAPACITY: usize = 1024;
/// The same for a console. Its discrete messages are its tenant's events, one per order
/// transition, and one dispatch round commits an offer per free courier at once: with 1,024 a
/// round of a fleet that size closed every console that was reading as fast as it could. A
/// console that stops reading is still dropped when a write stalls (`ws::WRITE_TIMEOUT`);
/// this bounds what it holds meanwhile (events are about 300 bytes: at most about 5 MB).
pub const CONSOLE_OUTBOX_CAPACITY: usize = 16_384;
/// Discrete messages a track stream keeps for `?since=` replays.
pub const REPLAY_CAPACITY: usize = 256;

/// A message as it travels between nodes: rendered once, tenant-scoped, no live objects.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Fanout {
    /// A courier moved (conflatable).
    ///
    /// The hot path: built for every accepted fix, so its ids share the actors' `Arc<str>`s
    /// and the status is a static name (no allocation on this node; Redis copies decode owned).
    Position {
        tenant: Arc<str>,
        courier: Arc<str>,
        lat: f64,
        lng: f64,
        ts: i64,
        speed: Option<f32>,
        heading: Option<f32>,
        status: Cow<'static, str>,
        /// Orders the courier holds, with the ETA in seconds to that order's next stop.
        tracking: Vec<(Arc<str>, Option<f64>)>,
    },
    /// A courier's status changed (conflatable, merged into the console's courier item), with
    /// its last position, if any. `at` is absent in messages of nodes before it was added.
    Status {
        tenant: String,
        courier: String,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<StatusAt>,
    },
    /// An order changed state (discrete).
    Order { tenant: String, order_id: String, order: Value, pickup: LatLngDto },
    /// A message for one courier's device (discrete); `msg` lacks its `seq`.
    ToCourier { tenant: String, courier: String, msg: Value },
    /// An audit event for the console feed (discrete).
    Event { tenant: String, event: Value },
    /// A zone was created or changed (`feature` set) or deleted (discrete).
    Zone { tenant: String, id: String, feature: Option<Value> },
}

/// Where a courier whose status changed was last seen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusAt {
    pub lat: f64,
    pub lng: f64,
    pub ts: i64,
    pub speed: Option<f32>,
    pub heading: Option<f32>,
}

impl Fanout {
    fn tenant(&self) -> &str {
        match self {
            Fanout::Position { tenant, .. } => tenant,
            Fanout::Status { tenant, .. }
            | Fanout::Order { tenant, .. }
            | Fanout::ToCourier { tenant, .. }
            | Fanout::Event { tenant, .. }
            | Fanout::Zone { tenant, .. } => tenant,
        }
    }

    /// Renders an actor update; `None` for updates nobody on the wire watches yet.
    pub fn from_update(u: &Update) -> Option<Fanout> {
        Some(match u {
            Update::CourierMoved { tenant, courier, fix, status, tracking } => Fanout::Position {
                tenant: tenant.as_arc().clone(),
                courier: courier.as_arc().clone(),
                lat: fix.pos.lat,
                lng: fix.pos.lng,
                ts: fix.ts,
                speed: fix.speed,
                heading: fix.heading,
                status: Cow::Borrowed(status.as_str()),
                tracking: tracking.iter().map(|(o, eta)| (o.as_arc().clone(), eta.map(|e| e.round()))).collect(),
            },
            Update::CourierStatus { tenant, courier, status, last_fix } => Fanout::Status {
                tenant: tenant.to_string(),
                courier: courier.to_string(),
                status: status.as_str().to_owned(),
                at: last_fix.map(|f| StatusAt { lat: f.pos.lat, lng: f.pos.lng, ts: f.ts, speed: f.speed, heading: f.heading }),
            },
            Update::Order(o) => Fanout::Order {
                tenant: o.tenant.to_string(),
                order_id: o.id.to_string(),
                order: order_body(o),
                pickup: o.pickup.into(),
            },
            Update::ToCourier { tenant, courier, notice } => {
                let msg = courier_notice_value(notice);
                Fanout::ToCourier { tenant: tenant.to_string(), courier: courier.to_string(), msg }
            }
            Update::Event(e) => Fanout::Event {
                tenant: e.tenant.to_string(),
                event: json!({
                    "entity": e.entity.as_str(), "entity_id": e.entity_id, "kind": e.kind, "actor": e.actor,
                    "reason": e.reason, "ts": e.ts,
                    "attrs": e.attrs.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
                }),
            },
            Update::Zone(z) => Fanout::Zone { tenant: z.tenant.to_string(), id: z.id.to_string(), feature: Some(crate::zones::console_feature(z)) },
            Update::ZoneDeleted { tenant, id } => Fanout::Zone { tenant: tenant.to_string(), id: id.to_string(), feature: None },
        })
    }
}

fn order_body(o: &Order) -> Value {
    json!({ "t": "order_update", "order_id": o.id.as_str(), "state": o.state.as_str(),
        "courier_id": o.courier.as_ref().map(|c| c.as_str()), "ts": o.updated_at, "order": OrderDto::from(o) })
}

/// Takes what only staff may see (the dispatch record, the open offer: see
/// [`OrderDto::for_watchers`]) out of an `order_update` body, for the track stream: its
/// watchers are customers. Consoles take the whole order from the same update.
fn for_watchers(mut m: Value) -> Value {
    if let Some(order) = m.get_mut("order") {
        OrderDto::strip_for_watchers(order);
    }
    m
}

/// What a session's writer finds when it wakes.
#[derive(Debug, Default)]
struct OutboxInner {
    /// Shared: an event goes to every console of its tenant as one allocation.
    discrete: VecDeque<Arc<str>>,
    /// Conflated messages by key (latest wins), e.g. one slot per courier.
    latest: HashMap<String, String>,
    /// The last conflated message moved into `discrete` (a discrete one queued after it), until
    /// drained: what [`Outbox::forget_queued`] gives back when `latest` is empty.
    moved: Option<String>,
    /// Console batches: courier items and order items by id (latest wins), flushed by a ticker.
    /// Keyed with foldhash: one insert per position per console is on the GPS hot path, and
    /// the ids come from verified tokens, so SipHash's flood resistance buys nothing here.
    batch_couriers: HashMap<Arc<str>, Arc<ConsoleItem>, foldhash::fast::RandomState>,
    batch_orders: HashMap<String, Value>,
}

/// The outgoing side of one WebSocket session.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    notify: Notify,
    overflowed: AtomicBool,
    /// The server asked the session to end (e.g. its market moved away).
    closed: AtomicBool,
    seq: AtomicU64,
    capacity: usize,
    /// Discrete messages are queued without `seq` and numbered as they are drained.
    numbered: bool,
}

impl Outbox {
    /// A tracking page's or console's outbox: its messages come numbered by their stream (the
    /// order's track stream, the tenant's console stream), under the stream's lock, so they
    /// are queued in the order of their numbers.
    pub fn new(capacity: usize) -> Arc<Self> {
        Self::build(capacity, false)
    }

    /// A courier session's outbox: discrete messages are queued without `seq` and
    /// numbered by [`Outbox::drain`], so the session's writer (the only caller of `drain` and
    /// of [`Outbox::next_seq`]) numbers everything in the order it goes out.
    pub fn per_connection(capacity: usize) -> Arc<Self> {
        Self::build(capacity, true)
    }

    fn build(capacity: usize, numbered: bool) -> Arc<Self> {
        Arc::new(Outbox {
            inner: Mutex::default(),
            notify: Notify::new(),
            overflowed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            capacity,
            numbered,
        })
    }

    /// Asks the session to end; it closes its socket at its next turn.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether [`Outbox::close`] was called.
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The next per-connection sequence number; for the session's writer only (see
    /// [`Outbox::per_connection`]).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Queues a discrete message (a JSON object, without `seq` in a [`Outbox::per_connection`]
    /// outbox); on overflow marks the session too slow (never drops silently).
    pub fn push(&self, msg: impl Into<Arc<str>>) {
        let msg = msg.into();
        let mut g = self.inner.lock();
        if g.discrete.len() >= self.capacity {
            if !self.overflowed.swap(true, Ordering::AcqRel) {
                metrics::counter!("hexfleet_ws_slow_disconnects_total").increment(1);
            }
        } else {
            // A position waiting in its slot was numbered before this message (a track
            // stream numbers and queues under its lock): it goes out first, or the page would
            // see its numbers go back.
            let OutboxInner { discrete, latest, moved, .. } = &mut *g;
            for (_, v) in latest.drain() {
                discrete.push_back(Arc::from(v.as_str()));
                *moved = Some(v);
            }
            discrete.push_back(msg);
        }
        drop(g);
        self.notify.notify_one();
    }

    /// Replaces the conflated message under `key`.
    pub fn set_latest(&self, key: &str, msg: String) {
        let replaced = self.inner.lock().latest.insert(key.to_owned(), msg).is_some();
        if replaced {
            metrics::counter!("hexfleet_ws_conflated_total").increment(1);
        }
        self.notify.notify_one();
    }

    /// Queues a courier's latest position for the next console batch (latest wins).
    fn batch_courier(&self, item: &Arc<ConsoleItem>) {
        self.inner.lock().batch_couriers.insert(item.courier.id.clone(), item.clone());
    }

    /// A status change merges into the pending item, if any; otherwise `item` (the courier at
    /// its last position, with the new status) is queued, when there is one.
    fn batch_status(&self, id: &str, status: &'static str, item: Option<&Arc<ConsoleItem>>) {
        let mut g = self.inner.lock();
        match g.batch_couriers.get_mut(id) {
            Some(prev) => {
                if prev.courier.status != status {
                    *prev = ConsoleItem::new(ConsoleCourier { status, ..prev.courier.clone() });
                }
            }
            None => {
                if let Some(item) = item {
                    g.batch_couriers.insert(item.courier.id.clone(), item.clone());
                }
            }
        }
    }

    fn batch_order(&self, id: &str, item: Value) {
        self.inner.lock().batch_orders.insert(id.to_owned(), item);
    }

    /// Whether the session fell too far behind on discrete messages.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Waits until something is queued.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Takes everything queued: discrete messages first (in order, numbered now in a
    /// [`Outbox::per_connection`] outbox), then conflated ones.
    pub fn drain(&self) -> Vec<String> {
        let mut g = self.inner.lock();
        let mut out: Vec<String> = if self.numbered {
            g.discrete.drain(..).map(|m| with_seq(&m, self.next_seq())).collect()
        } else {
            g.discrete.drain(..).map(|m| m.to_string()).collect()
        };
        g.moved = None;
        out.extend(g.latest.drain().map(|(_, v)| v));
        out
    }

    /// Takes the discrete messages queued (numbered already: a console's, a tracking page's).
    fn take_discrete(&self) -> Vec<Arc<str>> {
        let mut g = self.inner.lock();
        g.moved = None;
        g.discrete.drain(..).collect()
    }

    /// Drops what is queued, which a snapshot numbered after it holds (see
    /// [`Broker::track_snapshot_seq`]); returns the position that waited in its slot.
    fn forget_queued(&self) -> Option<String> {
        let mut g = self.inner.lock();
        g.discrete.clear();
        let moved = g.moved.take();
        g.latest.drain().map(|(_, v)| v).next().or(moved)
    }

    /// Takes the console batches.
    pub fn take_batches(&self) -> (Vec<Arc<ConsoleItem>>, Vec<Value>) {
        let mut g = self.inner.lock();
        (g.batch_couriers.drain().map(|(_, v)| v).collect(), g.batch_orders.drain().map(|(_, v)| v).collect())
    }
}

/// `msg`, a JSON object, with `"seq":seq` as its first member.
fn with_seq(msg: &str, seq: u64) -> String {
    debug_assert!(msg.starts_with('{'), "not a JSON object: {msg}");
    let rest = msg.strip_prefix('{').unwrap_or(msg);
    let mut out = String::with_capacity(msg.len() + 28);
    out.push_str(r#"{"seq":"#);
    out.push_str(&seq.to_string());
    if !rest.starts_with('}') {
        out.push(',');
    }
    out.push_str(rest);
    out
}

/// A courier item of a console `couriers` batch, typed.
#[derive(Clone, Debug, Serialize)]
pub struct ConsoleCourier {
    #[serde(serialize_with = "ser_arc_str")]
    pub id: Arc<str>,
    pub lat: f64,
    pub lng: f64,
    pub ts: i64,
    pub status: &'static str,
    pub speed: Option<f32>,
    pub heading: Option<f32>,
}

/// A console item as queued: built and rendered to JSON once per position update, then shared
/// (one `Arc` bump) by every console that sees it. A batch is the rendered items joined, so an
/// update is serialised once however many consoles watch. (It was a `serde_json::Value` map
/// per console, later a typed item serialised per console; see BENCHMARKS.md.)
#[derive(Debug)]
pub struct ConsoleItem {
    pub courier: ConsoleCourier,
    json: String,
}

impl ConsoleItem {
    pub fn new(courier: ConsoleCourier) -> Arc<Self> {
        let json = serde_json::to_string(&courier).unwrap_or_default();
        Arc::new(ConsoleItem { courier, json })
    }
}

/// A console `couriers` message holding `items`.
pub fn couriers_batch_json(seq: u64, items: &[Arc<ConsoleItem>]) -> String {
    let len: usize = items.iter().map(|i| i.json.len() + 1).sum();
    let mut out = String::with_capacity(len + 48);
    out.push_str(r#"{"t":"couriers","seq":"#);
    out.push_str(&seq.to_string());
    out.push_str(r#","items":["#);
    for (n, i) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(&i.json);
    }
    out.push_str("]}");
    out
}

fn ser_arc_str<S: serde::Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

/// A tracking page's `courier` message (without its `seq`): live, and in a snapshot.
pub(crate) fn track_courier_value(order: &str, courier: &str, at: StatusAt, eta_s: Option<f64>) -> Value {
    json!({ "t": "courier", "order_id": order, "courier_id": courier, "lat": at.lat, "lng": at.lng, "ts": at.ts,
        "speed": at.speed, "heading": at.heading, "eta_s": eta_s })
}

/// The wire name of a status string from a fan-out message (`unknown` if it is not one).
fn status_name(s: &str) -> &'static str {
    hexfleet_actors::domain::CourierStatus::parse(s).map_or("unknown", |s| s.as_str())
}

/// A track stream: one order's watchers on this node, its sequence and replay buffer.
#[derive(Debug)]
struct TrackStream {
    /// The last `seq` given. A stream's numbers start at a random multiple of 2^32 (below
    /// 2^53, so JavaScript reads them exactly): a `since` from another stream of the same
    /// order (another node's, or this node's before it restarted or dropped the stream) falls
    /// outside this one's numbers and gets a resync, instead of passing for a point in it
    /// and skipping what the client missed.
    seq: u64,
    replay: VecDeque<(u64, String)>,
    sessions: Vec<(u64, Arc<Outbox>)>,
    /// The order is closed: the stream ends with its last watcher.
    ended: bool,
}

impl Default for TrackStream {
    fn default() -> Self {
        TrackStream { seq: stream_base(), replay: VecDeque::new(), sessions: Vec::new(), ended: false }
    }
}

/// Where a stream's numbers start: a random multiple of 2^32 below 2^53 (see [`TrackStream`]).
fn stream_base() -> u64 {
    let epoch = u64::from(rand::random::<u32>() % ((1 << 21) - 1)) + 1;
    epoch << 32
}

/// A tenant's console stream on this node: the one count its consoles' messages are numbered
/// from, and its discrete messages (events, zone changes) kept for `?since=`. Batches and
/// snapshots take numbers too but are not kept (a reconnecting console subscribes again).
#[derive(Debug)]
struct ConsoleStream {
    seq: u64,
    replay: VecDeque<(u64, Arc<str>)>,
    /// The highest number that left `replay`: a `since` below it missed what was dropped.
    evicted: u64,
}

impl Default for ConsoleStream {
    fn default() -> Self {
        let base = stream_base();
        ConsoleStream { seq: base, replay: VecDeque::new(), evicted: base }
    }
}

impl ConsoleStream {
    /// What a console reconnecting with `since` missed.
    fn replay(&self, since: u64) -> Replay {
        if since < self.evicted || since > self.seq {
            // Before what is kept, or another stream's number (another node, a restart).
            return Replay::Gone;
        }
        Replay::Missed(self.replay.iter().filter(|(q, _)| *q > since).map(|(_, m)| m.to_string()).collect())
    }

    /// After a gap this stream did not see (its market moved away, the Redis link was lost):
    /// numbering goes on, but every `since` it gave gets a resync from now on.
    fn invalidate(&mut self) {
        self.replay.clear();
        self.evicted = self.seq + 1;
    }

    /// Numbers a discrete message (a JSON object without `seq`) and keeps it for replays.
    fn number(&mut self, msg: &str) -> Arc<str> {
        self.seq += 1;
        let m: Arc<str> = with_seq(msg, self.seq).into();
        self.replay.push_back((self.seq, m.clone()));
        while self.replay.len() > REPLAY_CAPACITY {
            if let Some((q, _)) = self.replay.pop_front() {
                self.evicted = q;
            }
        }
        m
    }
}

/// A console session's view.
#[derive(Debug)]
pub struct ConsoleView {
    pub outbox: Arc<Outbox>,
    /// `[min_lng, min_lat, max_lng, max_lat]`; `None` until the client subscribes.
    bbox: ViewBox,
}

/// A console's box, read on every position update by every thread: four atomics, so a read
/// writes nothing shared. (A mutex here bounced its cache line between threads, and an
/// `ArcSwapOption` still cost 2.5 % of server CPU.) A read racing with a re-subscribe may mix
/// the old and new box for that one update, which at worst sends or skips one position.
#[derive(Debug)]
struct ViewBox {
    set: AtomicBool,
    b: [AtomicU64; 4],
}

impl ConsoleView {
    pub fn new(outbox: Arc<Outbox>, bbox: Option<[f64; 4]>) -> Self {
        let v = ConsoleView { outbox, bbox: ViewBox { set: AtomicBool::new(false), b: Default::default() } };
        if let Some(b) = bbox {
            v.set_bbox(b);
        }
        v
    }

    /// Subscribes the view to a new box.
    pub fn set_bbox(&self, b: [f64; 4]) {
        for (slot, v) in self.bbox.b.iter().zip(b) {
            slot.store(v.to_bits(), Ordering::Relaxed);
        }
        self.bbox.set.store(true, Ordering::Release);
    }

    fn subscribed(&self) -> bool {
        self.bbox.set.load(Ordering::Acquire)
    }

    fn sees(&self, lat: f64, lng: f64) -> bool {
        if !self.subscribed() {
            return false;
        }
        let b = self.bbox.b.each_ref().map(|a| f64::from_bits(a.load(Ordering::Relaxed)));
        let lng_ok = if b[0] <= b[2] { lng >= b[0] && lng <= b[2] } else { lng >= b[0] || lng <= b[2] };
        lng_ok && lat >= b[1] && lat <= b[3]
    }
}

/// What a `?since=` reconnect gets.
#[derive(Debug)]
pub enum Replay {
    /// The missed messages, in order.
    Missed(Vec<String>),
    /// They are gone: resync from a snapshot.
    Gone,
}

/// Local sessions by what they watch.
/// Sessions subscribed to one key, with their subscription ids.
type Subscribers<T> = Vec<(u64, Arc<T>)>;

#[derive(Debug, Default)]
struct Local {
    next_id: AtomicU64,
    couriers: DashMap<(String, String), Subscribers<Outbox>>,
    tracks: DashMap<(String, String), TrackStream>,
    consoles: DashMap<String, Subscribers<ConsoleView>>,
    /// Taken before `consoles` when both are (never the other way round).
    console_streams: DashMap<String, ConsoleStream>,
}

/// Called with (tenant, zone id) when another node changed a zone.
pub type ZoneHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    node: Arc<str>,
    local: Arc<Local>,
    /// Redis between nodes (`None`: this node alone).
    relay: Option<Arc<Relay>>,
    /// Set once the fleet runs (`server::start`): zone changes of other nodes are applied here.
    zone_hook: Arc<std::sync::OnceLock<ZoneHook>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("node", &self.node).field("redis", &self.relay.is_some()).finish_non_exhaustive()
    }
}

/// A message between nodes, as it is read: the update (the sender's `node` goes first, so a
/// node skips its own by the first bytes without reading further).
#[derive(Deserialize)]
struct Envelope {
    f: Fanout,
}

/// [`Envelope`] as it is written.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    node: &'a str,
    f: &'a Fanout,
}

impl Broker {
    /// A broker for this node only.
    pub fn local(node: &str) -> Broker {
        Broker { node: node.into(), local: Arc::default(), relay: None, zone_hook: Arc::default() }
    }

    /// Registers what to do when another node changes a zone (at most once; later calls are
    /// ignored). Zones are state, not just a stream: every node's geofences must follow them.
    pub fn on_remote_zone(&self, hook: ZoneHook) {
        let _ = self.zone_hook.set(hook);
    }

    /// A fan-out message from another node, heard on `heard`'s kind of channel.
    fn deliver_remote(&self, heard: Heard, f: &Fanout) {
        if let Fanout::Zone { tenant, id, .. } = f
            && let Some(hook) = self.zone_hook.get()
        {
            hook(tenant, id);
        }
        self.deliver(f, Some(heard));
    }

    /// A broker that also fans out through Redis (`prefix` separates deployments and tests;
    /// `probe`: see [`crate::relay::PROBE_EVERY`]; see [`crate::relay`]). Fails if Redis cannot be reached at start; later outages are
    /// survived (reconnect).
    pub async fn with_redis(node: &str, url: &str, prefix: &str, probe: std::time::Duration, shutdown: CancellationToken) -> anyhow::Result<Broker> {
        let mut b = Broker::local(node);
        let (deliver, gap, wanted) = (b.clone(), b.clone(), b.clone());
        let relay = Relay::start(
            node,
            url,
            prefix,
            (probe, crate::relay::MAX_BACKLOG),
            move |heard, payload| match serde_json::from_slice::<Envelope>(payload) {
                Ok(env) => deliver.deliver_remote(heard, &env.f),
                Err(e) => tracing::warn!(error = %e, "undecodable fan-out message from redis"),
            },
            move |relay| {
                let n = gap.restart_remote_sessions(relay);
                tracing::warn!(sessions = n, "fan-out from other nodes was interrupted: their sessions here restart");
            },
            move |relay| wanted.session_channels(relay),
            shutdown,
        )
        .await?;
        b.relay = Some(relay);
        Ok(b)
    }

    /// Ends the fan-out to other nodes, for the node's shutdown once its fleet has stopped and
    /// its markets are released: what is queued is sent (for up to `within`). A no-op without
    /// Redis.
    pub async fn finish_fanout(&self, within: std::time::Duration) {
        if let Some(r) = &self.relay {
            r.finish(within).await;
        }
    }

    /// The Redis link, if this node has one (to tell it which markets it runs).
    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.relay.as_ref()
    }

    /// Makes sure updates of `topic` made on other nodes reach this node's sessions: call it
    /// after registering a session, before sending its snapshot (a no-op without Redis or
    /// when this node runs the market). Consoles and courier sessions need their market's
    /// topic, a tracking session its order's.
    pub async fn listen_remote(&self, topic: Topic<'_>) {
        if let Some(r) = &self.relay {
            r.listen(topic).await;
        }
    }

    /// (tenant, channel) of every topic a session on this node needs.
    fn session_channels(&self, relay: &Relay) -> HashSet<(String, String)> {
        let market = |t: &str| (t.to_owned(), relay.channel(Topic::Market(t)));
        let mut c: HashSet<(String, String)> = self.local.couriers.iter().map(|e| market(&e.key().0)).collect();
        c.extend(self.local.consoles.iter().map(|e| market(e.key())));
        c.extend(
            self.local
                .tracks
                .iter()
                .filter(|e| !e.value().sessions.is_empty())
                .map(|e| (e.key().0.clone(), relay.channel(Topic::Order(&e.key().0, &e.key().1)))),
        );
        c
    }

    fn new_id(&self) -> u64 {
        self.local.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a courier device session; returns its id for [`Broker::drop_courier`].
    pub fn add_courier(&self, tenant: &str, courier: &str, outbox: Arc<Outbox>) -> u64 {
        let id = self.new_id();
        self.local.couriers.entry((tenant.to_owned(), courier.to_owned())).or_default().push((id, outbox));
        id
    }

    pub fn drop_courier(&self, tenant: &str, courier: &str, id: u64) {
        let key = (tenant.to_owned(), courier.to_owned());
        self.local.couriers.remove_if_mut(&key, |_, v| {
            v.retain(|(i, _)| *i != id);
            v.is_empty()
        });
    }

    /// Ends every session of `tenant` on this node, couriers', customers' and consoles' (they
    /// close with 1013, and the apps reconnect, possibly to another node); returns how many.
    pub fn close_sessions(&self, tenant: &str) -> usize {
        let mut n = 0;
        for e in self.local.couriers.iter().filter(|e| e.key().0 == tenant) {
            for (_, o) in e.value() {
                o.close();
                n += 1;
            }
        }
        for e in self.local.tracks.iter().filter(|e| e.key().0 == tenant) {
            for (_, o) in &e.value().sessions {
                o.close();
                n += 1;
            }
        }
        let mut stream = self.local.console_streams.get_mut(tenant);
        n + self.close_consoles(tenant, stream.as_deref_mut())
    }

    /// Closes `tenant`'s consoles here, which reconnect, here or elsewhere, after a gap their
    /// stream will not see; the stream is invalidated in place (numbering goes on for the
    /// consoles still closing). The caller holds `stream`'s lock, so a console registering
    /// meanwhile is answered after it. Returns how many were closed.
    fn close_consoles(&self, tenant: &str, stream: Option<&mut ConsoleStream>) -> usize {
        if let Some(s) = stream {
            s.invalidate();
        }
        let Some(views) = self.local.consoles.get(tenant) else { return 0 };
        for (_, v) in views.value() {
            v.outbox.close();
        }
        views.len()
    }

    /// After the Redis subscription was lost (and is back) or its backlog dropped: tracking
    /// pages and consoles of markets another node runs may have missed discrete updates (an
    /// order delivered) with nothing to tell them, and a tracking page reconnecting with
    /// `since` would have been answered from a replay buffer missing them. Their track streams
    /// are dropped (a `since` then gets `resync`) and the sessions closed with 1013, so they
    /// reconnect and start from a fresh snapshot. Returns how many were closed.
    fn restart_remote_sessions(&self, relay: &Relay) -> usize {
        let mut n = 0;
        self.local.tracks.retain(|(tenant, _), s| {
            if relay.serves(tenant) {
                return true;
            }
            for (_, o) in &s.sessions {
                o.close();
                n += 1;
            }
            false
        });
        // A tenant with consoles here has a console stream.
        for mut s in self.local.console_streams.iter_mut().filter(|e| !relay.serves(e.key())) {
            let (tenant, stream) = s.pair_mut();
            n += self.close_consoles(tenant, Some(stream));
        }
        n
    }

    /// Registers a tracking session and answers a `since` request from the replay buffer.
    pub fn add_track(&self, tenant: &str, order: &str, outbox: Arc<Outbox>, since: Option<u64>) -> (u64, Option<Replay>) {
        let id = self.new_id();
        let mut s = self.local.tracks.entry((tenant.to_owned(), order.to_owned())).or_default();
        let replay = since.map(|since| {
            let oldest = s.replay.front().map(|(q, _)| *q);
            match oldest {
                // Nothing happened since: nothing missed.
                _ if since == s.seq => Replay::Missed(Vec::new()),
                // Numbered past this stream: another node's numbering, or this node's before
                // it stopped hearing the order (below).
                _ if since > s.seq => Replay::Gone,
                Some(first) if first <= since + 1 => {
                    Replay::Missed(s.replay.iter().filter(|(q, _)| *q > since).map(|(_, m)| m.clone()).collect())
                }
                _ => Replay::Gone,
            }
        });
        s.sessions.push((id, outbox));
        (id, replay)
    }

    pub fn drop_track(&self, tenant: &str, order: &str, id: u64) {
        let key = (tenant.to_owned(), order.to_owned());
        // On a node that does not run the market, the stream ends with its last watcher: the
        // order's channel is dropped, so the stream would stop counting (a watcher coming back
        // with `since` must get a resync, not "nothing missed") and its final update, which
        // removes it on the owner, would never come.
        let keep = self.relay.as_ref().is_none_or(|r| r.serves(tenant));
        self.local.tracks.remove_if_mut(&key, |_, s| {
            s.sessions.retain(|(i, _)| *i != id);
            s.sessions.is_empty() && (!keep || s.ended)
        });
    }

    /// Marks a closed order's stream (a watcher connected after it closed): it ends with its
    /// last watcher instead of staying for good.
    pub fn end_track(&self, tenant: &str, order: &str) {
        if let Some(mut s) = self.local.tracks.get_mut(&(tenant.to_owned(), order.to_owned())) {
            s.ended = true;
        }
    }

    /// Numbers a message on a track stream (a `resync`).
    pub fn track_seq(&self, tenant: &str, order: &str) -> u64 {
        let mut s = self.local.tracks.entry((tenant.to_owned(), order.to_owned())).or_default();
        s.seq += 1;
        s.seq
    }

    /// Numbers a snapshot for `outbox`, a session of the stream, before its state is read:
    /// `count` numbers in a row, the first returned. What the session has queued was numbered
    /// below them, before the read: it is dropped, or it would go out after the snapshot and
    /// take the page back to an older state. Order updates are written where the snapshot
    /// reads them before they are published, so it holds them; the courier's position that
    /// waited in its slot is returned, for a snapshot on a node without the courier's record
    /// (or with an older fix) to send instead.
    pub fn track_snapshot_seq(&self, tenant: &str, order: &str, outbox: &Outbox, count: u64) -> (u64, Option<String>) {
        let mut s = self.local.tracks.entry((tenant.to_owned(), order.to_owned())).or_default();
        let position = outbox.forget_queued();
        let first = s.seq + 1;
        s.seq += count;
        (first, position)
    }

    /// Registers a console session and answers a `since` request from the tenant's console
    /// stream (registered under the stream's lock: nothing is numbered between the two).
    pub fn add_console(&self, tenant: &str, view: Arc<ConsoleView>, since: Option<u64>) -> (u64, Option<Replay>) {
        let id = self.new_id();
        let s = self.local.console_streams.entry(tenant.to_owned()).or_default();
        let replay = since.map(|since| s.replay(since));
        self.local.consoles.entry(tenant.to_owned()).or_default().push((id, view));
        drop(s);
        (id, replay)
    }

    pub fn drop_console(&self, tenant: &str, id: u64) {
        let s = self.local.console_streams.get_mut(tenant);
        let gone = self.local.consoles.remove_if_mut(tenant, |_, v| {
            v.retain(|(i, _)| *i != id);
            v.is_empty()
        });
        drop(s);
        // On a node that does not run the market the stream stops hearing it with its last
        // console (the market's channel may be dropped): a `since` must then get a resync.
        if gone.is_some() && self.relay.as_ref().is_some_and(|r| !r.serves(tenant)) {
            self.local.console_streams.remove_if(tenant, |t, _| !self.local.consoles.contains_key(t));
        }
    }

    /// Numbers what a console's writer is about to send: takes what its outbox has queued
    /// (numbered already) and `count` numbers after it, the first returned, both under the
    /// stream's lock, so the writer's batches go out after every message numbered before them.
    /// `None` once the console was asked to close (its stream may be gone).
    pub fn console_numbers(&self, tenant: &str, outbox: &Outbox, count: u64) -> Option<(Vec<String>, u64)> {
        let mut s = self.local.console_streams.get_mut(tenant).filter(|_| !outbox.closed())?;
        let queued = outbox.take_discrete();
        let first = s.seq + 1;
        s.seq += count;
        drop(s);
        Some((queued.iter().map(|m| m.to_string()).collect(), first))
    }

    /// Number of local sessions (couriers, track, console), for metrics.
    pub fn session_counts(&self) -> (usize, usize, usize) {
        let c = self.local.couriers.iter().map(|e| e.value().len()).sum();
        let t = self.local.tracks.iter().map(|e| e.value().sessions.len()).sum();
        let k = self.local.consoles.iter().map(|e| e.value().len()).sum();
        (c, t, k)
    }

    /// Delivers to the sessions on this node.
    pub fn deliver_local(&self, f: &Fanout) {
        self.deliver(f, None);
    }

    /// Delivers to the sessions on this node: all of them for an update made here (`heard`
    /// `None`); for one heard from another node, tracking sessions only if it came on an
    /// order's channel and the others only if it did not (an update may come on both).
    fn deliver(&self, f: &Fanout, heard: Option<Heard>) {
        let tracks = heard != Some(Heard::Market);
        let others = heard != Some(Heard::Order);
        match f {
            Fanout::Position { tenant, courier, lat, lng, ts, speed, heading, status, tracking } => {
                for (order, eta) in tracking.iter().filter(|_| tracks) {
                    let key = (tenant.to_string(), order.to_string());
                    let Some(mut s) = self.local.tracks.get_mut(&key) else { continue };
                    if s.sessions.is_empty() {
                        continue;
                    }
                    s.seq += 1;
                    let at = StatusAt { lat: *lat, lng: *lng, ts: *ts, speed: *speed, heading: *heading };
                    let mut m = track_courier_value(order, courier, at, *eta);
                    m["seq"] = json!(s.seq);
                    let msg = m.to_string();
                    for (_, o) in &s.sessions {
                        o.set_latest("courier", msg.clone());
                        metrics::counter!("hexfleet_ws_deliveries_total").increment(1);
                    }
                }
                if let Some(cs) = self.local.consoles.get(&**tenant).filter(|_| others) {
                    let mut item = None;
                    for (_, v) in cs.iter().filter(|(_, v)| v.sees(*lat, *lng)) {
                        let item = item.get_or_insert_with(|| {
                            ConsoleItem::new(ConsoleCourier {
                                id: courier.clone(),
                                lat: *lat,
                                lng: *lng,
                                ts: *ts,
                                status: status_name(status),
                                speed: *speed,
                                heading: *heading,
                            })
                        });
                        v.outbox.batch_courier(item);
                    }
                }
            }
            Fanout::Status { tenant, courier, status, at } => {
                if let Some(cs) = self.local.consoles.get(tenant).filter(|_| others) {
                    let status = status_name(status);
                    // A status change with no fix after it (an app that goes offline and
                    // stops sending) must still reach the consoles that show the courier.
                    let item = at.map(|a: StatusAt| {
                        ConsoleItem::new(ConsoleCourier {
                            id: Arc::from(courier.as_str()),
                            lat: a.lat,
                            lng: a.lng,
                            ts: a.ts,
                            status,
                            speed: a.speed,
                            heading: a.heading,
                        })
                    });
                    for (_, v) in cs.iter() {
                        let seen = item.as_ref().filter(|i| v.sees(i.courier.lat, i.courier.lng));
                        v.outbox.batch_status(courier, status, seen);
                    }
                }
            }
            Fanout::Order { tenant, order_id, order, pickup } => {
                let key = (tenant.clone(), order_id.clone());
                if let Some(mut s) = self.local.tracks.get_mut(&key).filter(|_| tracks) {
                    s.seq += 1;
                    let seq = s.seq;
                    let mut m = for_watchers(order.clone());
                    m["seq"] = json!(seq);
                    let msg = m.to_string();
                    s.replay.push_back((seq, msg.clone()));
                    while s.replay.len() > REPLAY_CAPACITY {
                        s.replay.pop_front();
                    }
                    let msg: Arc<str> = msg.into();
                    for (_, o) in &s.sessions {
                        o.push(msg.clone());
                    }
                    // A closed order's stream ends with its last watcher; keep the buffer until then.
                    s.ended |= matches!(order["state"].as_str(), Some("delivered" | "cancelled" | "failed" | "expired"));
                    if s.ended && s.sessions.is_empty() {
                        drop(s);
                        // Checked again under the removal's lock: a watcher that came in between
                        // keeps the stream (it would be orphaned, its `track_seq` on a stream
                        // no longer kept).
                        self.local.tracks.remove_if(&key, |_, s| s.ended && s.sessions.is_empty());
                    }
                }
                if let Some(cs) = self.local.consoles.get(tenant).filter(|_| others) {
                    let item = &order["order"];
                    for (_, v) in cs.iter().filter(|(_, v)| v.sees(pickup.lat, pickup.lng)) {
                        v.outbox.batch_order(order_id, item.clone());
                    }
                }
            }
            Fanout::ToCourier { tenant, courier, msg } => {
                if let Some(ss) = self.local.couriers.get(&(tenant.clone(), courier.clone())).filter(|_| others) {
                    let m: Arc<str> = msg.to_string().into();
                    for (_, o) in ss.iter() {
                        o.push(m.clone());
                    }
                }
            }
            Fanout::Zone { tenant, id, feature } => {
                if others {
                    self.to_consoles(tenant, || {
                        match feature {
                            Some(f) => json!({ "t": "zones", "items": [f] }),
                            None => json!({ "t": "zones", "items": [], "deleted": [id] }),
                        }
                        .to_string()
                    });
                }
            }
            Fanout::Event { tenant, event } => {
                if others {
                    self.to_consoles(tenant, || json!({ "t": "event", "event": event }).to_string());
                }
            }
        }
    }

    /// Numbers a discrete console message on the tenant's console stream, keeps it for
    /// replays, and queues it for every console of the tenant here, subscribed yet or not (one
    /// that reconnected with `since` has been answered up to this stream's count).
    fn to_consoles(&self, tenant: &str, msg: impl FnOnce() -> String) {
        // A stream exists while the tenant has consoles here (from its first one on), and
        // after the last one leaves on a node that runs the market (it hears every update).
        let Some(mut s) = self.local.console_streams.get_mut(tenant) else { return };
        let m = s.number(&msg());
        if let Some(cs) = self.local.consoles.get(tenant) {
            for (_, v) in cs.iter().filter(|(_, v)| !v.outbox.closed()) {
                v.outbox.push(m.clone());
            }
        }
    }

    /// Publishes an update for the other nodes that listen to its topics ([`crate::relay`]).
    fn send_remote(&self, f: &Fanout) {
        let Some(relay) = &self.relay else { return };
        match f {
            // Every node's state.
            Fanout::Zone { .. } => self.publish_remote(relay, f, &[None]),
            Fanout::Position { tenant, tracking, .. } => {
                if let Some(channel) = relay.channel_unless_quiet(Topic::Market(tenant)) {
                    self.publish_remote(relay, f, &[Some(channel)]);
                }
                // Each tracked order's channel gets the position with that order alone, so a
                // node tracking two of the courier's orders delivers it once to each.
                for (order, eta) in tracking {
                    let Some(channel) = relay.channel_unless_quiet(Topic::Order(tenant, order)) else { continue };
                    let mut one = f.clone();
                    if let Fanout::Position { tracking, .. } = &mut one {
                        *tracking = vec![(order.clone(), *eta)];
                    }
                    self.publish_remote(relay, &one, &[Some(channel)]);
                }
            }
            Fanout::Order { tenant, order_id, .. } => {
                let channels = [Some(relay.channel(Topic::Market(tenant))), Some(relay.channel(Topic::Order(tenant, order_id)))];
                self.publish_remote(relay, f, &channels);
            }
            // Statuses are not skipped when quiet: rare, and a console that starts listening
            // later must not keep a stale status.
            Fanout::Status { tenant, .. } | Fanout::ToCourier { tenant, .. } | Fanout::Event { tenant, .. } => {
                self.publish_remote(relay, f, &[Some(relay.channel(Topic::Market(tenant)))]);
            }
        }
    }

    /// Renders `f` once and queues it on `channels` (`None`: the global channel).
    fn publish_remote(&self, relay: &Relay, f: &Fanout, channels: &[Option<String>]) {
        let Ok(bytes) = serde_json::to_vec(&EnvelopeRef { node: &self.node, f }) else { return };
        let bytes = Arc::new(bytes);
        for c in channels {
            if !relay.publish(c.clone(), bytes.clone()) {
                if relay.finished() {
                    // The node's last moments, after its fleet stopped and its markets were
                    // released: the next owner loads the market from the store.
                    tracing::debug!(tenant = f.tenant(), "fan-out to other nodes has finished (shutting down): update not sent");
                    continue;
                }
                metrics::counter!("hexfleet_redis_dropped_total").increment(1);
                if !matches!(f, Fanout::Position { .. } | Fanout::Status { .. }) {
                    tracing::error!(tenant = f.tenant(), "redis fan-out queue full: a discrete update did not reach other nodes");
                }
            }
        }
    }
}

impl Publisher for Broker {
    fn publish(&self, update: Update) {
        let Some(f) = Fanout::from_update(&update) else { return };
        self.deliver_local(&f);
        self.send_remote(&f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(courier: &str, order: &str, lat: f64) -> Fanout {
        Fanout::Position {
            tenant: "t".into(),
            courier: courier.into(),
            lat,
            lng: 13.4,
            ts: 1,
            speed: None,
            heading: None,
            status: "available".into(),
            tracking: vec![(order.into(), Some(60.0))],
        }
    }

    fn order(id: &str, state: &str) -> Fanout {
        Fanout::Order {
            tenant: "t".into(),
            order_id: id.into(),
            order: json!({"t":"order_update","order_id":id,"state":state,"order":{"id":id}}),
            pickup: LatLngDto { lat: 52.5, lng: 13.4 },
        }
    }

    #[test]
    fn a_slow_watcher_gets_the_latest_position_only() {
        let b = Broker::local("n");
        let ob = Outbox::new(8);
        b.add_track("t", "o1", ob.clone(), None);
        for i in 0..1000 {
            b.deliver_local(&position("c1", "o1", 52.0 + f64::from(i) * 1e-4));
        }
        let got = ob.drain();
        assert_eq!(got.len(), 1, "positions are conflated");
        let v: Value = serde_json::from_str(&got[0]).unwrap();
        assert!((v["lat"].as_f64().unwrap() - (52.0 + 999.0 * 1e-4)).abs() < 1e-9);
        assert!(!ob.overflowed(), "conflation never counts as falling behind");
    }

    /// A courier's or console's messages are queued by the threads that make them (actors,
    /// the Redis listener) and by its writer (console batches): numbered as the writer sends
    /// them, the socket's `seq` grows by one with every message, never going back.
    #[test]
    fn a_sockets_seq_grows_by_one_whoever_queues_its_messages() {
        let ob = Outbox::per_connection(1 << 20);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let ob = ob.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        ob.push(json!({ "t": "event", "from": t, "i": i }).to_string());
                    }
                })
            })
            .collect();
        let (mut seqs, mut got) = (Vec::new(), 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while got < 8_000 {
            assert!(std::time::Instant::now() < deadline, "only {got} of 8000 messages came");
            for m in ob.drain() {
                let v: Value = serde_json::from_str(&m).unwrap();
                assert_eq!(v["t"], "event", "{m}");
                seqs.push(v["seq"].as_u64().unwrap());
                got += 1;
            }
            // The writer's own message (a console batch) between two drains.
            seqs.push(ob.next_seq());
            std::thread::yield_now();
        }
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "numbers out of order or skipped");
        assert_eq!(with_seq("{}", 3), r#"{"seq":3}"#);
    }

    /// A tracking page's position waits in a slot while order updates queue: one numbered
    /// before an update goes out before it; and what was queued before a snapshot was numbered
    /// is dropped (the snapshot holds it), so the page never sees its numbers go back.
    #[test]
    fn a_tracking_pages_numbers_never_go_back() {
        let b = Broker::local("n");
        let ob = Outbox::new(64);
        b.add_track("t", "o1", ob.clone(), None);
        let seqs = |ob: &Outbox| -> Vec<u64> {
            ob.drain().iter().map(|m| serde_json::from_str::<Value>(m).unwrap()["seq"].as_u64().unwrap()).collect()
        };
        b.deliver_local(&position("c1", "o1", 52.5));
        b.deliver_local(&order("o1", "picked_up"));
        b.deliver_local(&position("c1", "o1", 52.6));
        let got = seqs(&ob);
        assert_eq!(got.len(), 3);
        assert!(got.windows(2).all(|w| w[1] > w[0]), "{got:?}");
        // Queued before the snapshot's numbers: dropped; after them: sent, numbered above.
        b.deliver_local(&position("c1", "o1", 52.7));
        b.deliver_local(&order("o1", "at_dropoff"));
        let (snap, waiting) = b.track_snapshot_seq("t", "o1", &ob, 2);
        assert!(snap > got[2]);
        assert!(ob.drain().is_empty(), "the snapshot holds what was queued before it");
        let waiting: Value = serde_json::from_str(&waiting.expect("the waiting position, for the snapshot")).unwrap();
        assert_eq!(waiting["lat"], 52.7);
        b.deliver_local(&order("o1", "delivered"));
        assert_eq!(seqs(&ob), vec![snap + 2], "the snapshot has two numbers of its own");
        // A position still in its slot is given back too.
        b.deliver_local(&position("c1", "o1", 52.8));
        let (_, waiting) = b.track_snapshot_seq("t", "o1", &ob, 1);
        assert_eq!(waiting.map(|p| serde_json::from_str::<Value>(&p).unwrap()["lat"].clone()), Some(json!(52.8)));
        assert!(ob.drain().is_empty());
    }

    /// A dispatch round of a big fleet publishes an event per offer at once: a console reading
    /// as fast as it can holds them all until its writer's next turn.
    #[test]
    fn a_consoles_outbox_holds_a_big_fleets_dispatch_round() {
        let b = Broker::local("n");
        let v = Arc::new(ConsoleView::new(Outbox::new(CONSOLE_OUTBOX_CAPACITY), Some([13.0, 52.0, 14.0, 53.0])));
        b.add_console("t", v.clone(), None);
        let offered = |i: usize| Fanout::Event {
            tenant: "t".into(),
            event: json!({ "entity": "order", "entity_id": format!("o{i}"), "kind": "order.offered", "ts": 1 }),
        };
        for i in 0..10_000 {
            b.deliver_local(&offered(i));
        }
        assert!(!v.outbox.overflowed(), "a round of 10,000 offers");
        assert_eq!(v.outbox.drain().len(), 10_000);
        for i in 0..=CONSOLE_OUTBOX_CAPACITY {
            b.deliver_local(&offered(i));
        }
        assert!(v.outbox.overflowed(), "a console that never reads is still dropped");
    }

    /// A tenant's consoles share a console stream: a console reconnecting with the `seq` of
    /// the last message it got is sent the events it missed, even with no console connected
    /// meanwhile; a `since` from before what is kept, or from another stream, gets a resync.
    /// A writer's batches are numbered after what it had queued.
    #[test]
    fn a_console_reconnecting_with_since_gets_the_events_it_missed() {
        let b = Broker::local("n");
        let event = |i: usize| Fanout::Event { tenant: "t".into(), event: json!({ "kind": "order.created", "entity_id": format!("o{i}") }) };
        let seq_of = |m: &str| serde_json::from_str::<Value>(m).unwrap()["seq"].as_u64().unwrap();
        let first = Arc::new(ConsoleView::new(Outbox::new(1024), None));
        let (id, replay) = b.add_console("t", first.clone(), None);
        assert!(replay.is_none());
        for i in 0..3 {
            b.deliver_local(&event(i));
        }
        let got = first.outbox.drain();
        assert_eq!(got.len(), 3, "events reach a console before it subscribes too");
        let last = seq_of(&got[2]);
        // A batch numbered by the writer comes after an event queued before it.
        b.deliver_local(&event(3));
        let (queued, batch) = b.console_numbers("t", &first.outbox, 1).unwrap();
        assert_eq!(queued.len(), 1);
        assert!(batch > seq_of(&queued[0]));
        b.drop_console("t", id);
        // Gone for a while: two more events.
        for i in 4..6 {
            b.deliver_local(&event(i));
        }
        let again = Arc::new(ConsoleView::new(Outbox::new(1024), None));
        let (_, replay) = b.add_console("t", again, Some(last));
        let Some(Replay::Missed(m)) = replay else { panic!("expected a replay") };
        let ids: Vec<String> = m.iter().map(|m| serde_json::from_str::<Value>(m).unwrap()["event"]["entity_id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(ids, vec!["o3", "o4", "o5"]);
        for since in [0, 5, u64::MAX] {
            let (_, replay) = b.add_console("t", Arc::new(ConsoleView::new(Outbox::new(8), None)), Some(since));
            assert!(matches!(replay, Some(Replay::Gone)), "since={since}");
        }
        for i in 0..REPLAY_CAPACITY + 1 {
            b.deliver_local(&event(i));
        }
        let (_, replay) = b.add_console("t", Arc::new(ConsoleView::new(Outbox::new(8), None)), Some(last));
        assert!(matches!(replay, Some(Replay::Gone)), "past the buffer");
        // After a gap the stream does not see (its market moved away), every `since` it gave
        // gets a resync, and its numbering goes on (consoles still closing never go back).
        let live = Arc::new(ConsoleView::new(Outbox::new(1024), None));
        b.add_console("t", live.clone(), None);
        b.deliver_local(&event(7));
        let before = seq_of(&live.outbox.drain()[0]);
        b.close_sessions("t");
        assert!(live.outbox.closed());
        assert!(b.console_numbers("t", &live.outbox, 1).is_none(), "a closed console gets no numbers");
        let (_, replay) = b.add_console("t", Arc::new(ConsoleView::new(Outbox::new(8), None)), Some(before));
        assert!(matches!(replay, Some(Replay::Gone)), "since from before the gap");
        let fresh = Arc::new(ConsoleView::new(Outbox::new(8), None));
        b.add_console("t", fresh.clone(), None);
        b.deliver_local(&event(8));
        assert!(seq_of(&fresh.outbox.drain()[0]) > before);
    }

    #[test]
    fn discrete_updates_are_never_dropped_silently() {
        let b = Broker::local("n");
        let ob = Outbox::new(4);
        b.add_track("t", "o1", ob.clone(), None);
        for _ in 0..4 {
            b.deliver_local(&order("o1", "assigned"));
        }
        assert!(!ob.overflowed());
        b.deliver_local(&order("o1", "picked_up"));
        assert!(ob.overflowed(), "the fifth update does not fit: the watcher is marked too slow");
        assert_eq!(ob.drain().len(), 4);
    }

    #[test]
    fn since_replays_missed_updates_or_asks_for_a_resync() {
        let b = Broker::local("n");
        let first = Outbox::new(1024);
        let (id, _) = b.add_track("t", "o1", first.clone(), None);
        for s in ["offered", "assigned", "at_pickup"] {
            b.deliver_local(&order("o1", s));
        }
        let seqs: Vec<u64> = first.drain().iter().map(|m| serde_json::from_str::<Value>(m).unwrap()["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![seqs[0], seqs[0] + 1, seqs[0] + 2]);
        assert!(seqs[0] > 1 << 32 && seqs[2] < 1 << 53, "a stream's numbers start at a random base: {seqs:?}");
        b.drop_track("t", "o1", id);
        b.deliver_local(&order("o1", "picked_up"));
        let again = Outbox::new(1024);
        let (_, replay) = b.add_track("t", "o1", again, Some(seqs[1]));
        let Some(Replay::Missed(m)) = replay else { panic!("expected a replay") };
        let states: Vec<String> = m.iter().map(|m| serde_json::from_str::<Value>(m).unwrap()["state"].as_str().unwrap().to_owned()).collect();
        assert_eq!(states, vec!["at_pickup", "picked_up"]);
        // Past the buffer: resync.
        for _ in 0..REPLAY_CAPACITY + 5 {
            b.deliver_local(&order("o1", "picked_up"));
        }
        let (_, replay) = b.add_track("t", "o1", Outbox::new(8), Some(seqs[0]));
        assert!(matches!(replay, Some(Replay::Gone)));
        // Numbered by another stream of the order (another node's, or one that restarted),
        // below this one's or above it, or `since=0`: resync, never "nothing missed".
        let other = Broker::local("m");
        let (w, _) = other.add_track("t", "o1", Outbox::new(8), None);
        other.deliver_local(&order("o1", "offered"));
        let elsewhere = other.track_seq("t", "o1");
        other.drop_track("t", "o1", w);
        for since in [elsewhere, 0, 5, u64::MAX] {
            let (_, replay) = b.add_track("t", "o1", Outbox::new(8), Some(since));
            assert!(matches!(replay, Some(Replay::Gone)), "since={since}");
            let (_, replay) = b.add_track("t", "o2", Outbox::new(8), Some(since));
            assert!(matches!(replay, Some(Replay::Gone)), "a new stream, since={since}");
        }
    }

    /// A track stream ends with its last watcher once its order is closed, whether the close
    /// came while someone watched or before the watcher connected; an open order's stays (a
    /// watcher coming back with `since` replays from it).
    #[test]
    fn a_closed_orders_track_stream_ends_with_its_last_watcher() {
        let b = Broker::local("n");
        let (w, _) = b.add_track("t", "o1", Outbox::new(8), None);
        b.deliver_local(&order("o1", "delivered"));
        b.drop_track("t", "o1", w);
        assert_eq!(b.local.tracks.len(), 0, "delivered while watched");
        // Watched after it closed (the tracking page learns so from its snapshot).
        let (w, _) = b.add_track("t", "o2", Outbox::new(8), None);
        b.end_track("t", "o2");
        b.drop_track("t", "o2", w);
        assert_eq!(b.local.tracks.len(), 0, "watched after it closed");
        let (w, _) = b.add_track("t", "o3", Outbox::new(8), None);
        b.deliver_local(&order("o3", "picked_up"));
        b.drop_track("t", "o3", w);
        assert_eq!(b.local.tracks.len(), 1, "an open order's stream stays for a watcher coming back");
    }

    /// An update heard from another node may come on its market's channel and on an order's
    /// channel: each is delivered to its own sessions only, so nobody gets it twice.
    #[test]
    fn what_is_heard_on_a_channel_goes_to_that_channels_sessions_only() {
        let b = Broker::local("n");
        let track = Outbox::new(8);
        b.add_track("t", "o1", track.clone(), None);
        let console = Arc::new(ConsoleView::new(Outbox::new(8), Some([13.0, 52.0, 14.0, 53.0])));
        b.add_console("t", console.clone(), None);
        let seen = |track: &Outbox, console: &ConsoleView| (track.drain().len(), console.outbox.take_batches().0.len());

        b.deliver(&position("c1", "o1", 52.5), Some(Heard::Market));
        assert_eq!(seen(&track, &console), (0, 1), "a market's channel feeds its consoles");
        b.deliver(&position("c1", "o1", 52.6), Some(Heard::Order));
        assert_eq!(seen(&track, &console), (1, 0), "an order's channel feeds its trackers");
        b.deliver(&order("o1", "assigned"), Some(Heard::Order));
        assert_eq!(track.drain().len(), 1);
        assert!(console.outbox.take_batches().1.is_empty());
        b.deliver(&order("o1", "picked_up"), Some(Heard::Market));
        assert!(track.drain().is_empty());
        assert_eq!(console.outbox.take_batches().1.len(), 1);
        b.deliver_local(&position("c1", "o1", 52.7));
        assert_eq!(seen(&track, &console), (1, 1), "an update made here reaches both");
    }

    #[test]
    fn console_sees_only_its_box_and_its_tenant() {
        let b = Broker::local("n");
        let v = Arc::new(ConsoleView::new(Outbox::new(8), Some([13.0, 52.0, 14.0, 53.0])));
        b.add_console("t", v.clone(), None);
        b.deliver_local(&position("in", "o", 52.5));
        b.deliver_local(&position("out", "o", 54.5));
        let mut other = position("x", "o", 52.5);
        if let Fanout::Position { tenant, .. } = &mut other {
            *tenant = "other".into();
        }
        b.deliver_local(&other);
        let (couriers, _) = v.outbox.take_batches();
        let ids: Vec<&str> = couriers.iter().map(|c| &*c.courier.id).collect();
        assert_eq!(ids, vec!["in"]);
        // The rendered batch is valid JSON with the typed fields.
        let msg: Value = serde_json::from_str(&couriers_batch_json(7, &couriers)).unwrap();
        assert_eq!(msg["t"], "couriers");
        assert_eq!(msg["seq"], 7);
        assert_eq!(msg["items"][0]["id"], "in");
        assert_eq!(msg["items"][0]["lat"], 52.5);
        assert_eq!(serde_json::from_str::<Value>(&couriers_batch_json(8, &[])).unwrap()["items"], json!([]));
        // A status change merges into the pending item and its rendering.
        b.deliver_local(&position("in", "o", 52.6));
        let status = |courier: &str, status: &str, lat: f64| Fanout::Status {
            tenant: "t".into(),
            courier: courier.into(),
            status: status.into(),
            at: Some(StatusAt { lat, lng: 13.4, ts: 1_000, speed: None, heading: None }),
        };
        b.deliver_local(&status("in", "offline", 52.0));
        let (couriers, _) = v.outbox.take_batches();
        let msg: Value = serde_json::from_str(&couriers_batch_json(9, &couriers)).unwrap();
        assert_eq!(msg["items"][0]["status"], "offline");
        assert_eq!(msg["items"][0]["lat"], 52.6, "the pending position is kept");
        // With nothing pending (the app stopped sending fixes), the status still reaches the
        // console, at the courier's last position; not a console that does not see it there.
        b.deliver_local(&status("in", "offline", 52.7));
        b.deliver_local(&status("out", "offline", 54.5));
        let (couriers, _) = v.outbox.take_batches();
        let msg: Value = serde_json::from_str(&couriers_batch_json(10, &couriers)).unwrap();
        assert_eq!(msg["items"].as_array().map(Vec::len), Some(1), "{msg}");
        assert_eq!((msg["items"][0]["id"].as_str(), msg["items"][0]["status"].as_str(), msg["items"][0]["lat"].as_f64()), (Some("in"), Some("offline"), Some(52.7)));
        // A node before `at` existed sends none: still parsed; merged if pending, else dropped.
        let old: Fanout = serde_json::from_str(r#"{"k":"status","tenant":"t","courier":"in","status":"busy"}"#).unwrap();
        b.deliver_local(&old);
        assert!(v.outbox.take_batches().0.is_empty());
    }
}
