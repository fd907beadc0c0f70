//! WebSocket sessions: `/v1/ws/courier` (a courier's app), `/v1/ws/track/{order_id}` (a
//! customer or dispatcher watching one order) and `/v1/ws/console` (a dispatcher's live map).
//!
//! Each session is one task on an HTTP worker: it reads frames, validates them and calls the
//! fleet (never waiting on an actor on the GPS path), and writes what the broker queued in its
//! [`Outbox`]. A bad message gets an `error` frame and the connection stays open; a session
//! that keeps sending garbage, floods past its rate limit, sends an oversized frame or cannot
//! keep up with its discrete messages is closed with a reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use futures_util::StreamExt as _;
use hexfleet_actors::domain::{CourierId, CourierStatus, OrderId, TenantId, valid_id};
use hexfleet_actors::fleet::CourierTap;
use hexfleet_actors::order::Command;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Auth, Role};
use crate::broker::{ConsoleView, OUTBOX_CAPACITY, Outbox, Replay};
use crate::dto::{CourierIn, LocDto, MAX_BATCH, OrderDto, error_json};
use crate::error::ApiError;
use crate::relay::Topic;
use crate::server::AppState;

/// Largest frame (and aggregated message) a client may send.
pub const MAX_FRAME: usize = 64 * 1024;
/// Messages per second a session may send on average, and the burst it may save up.
pub const RATE_PER_S: f64 = 50.0;
pub const RATE_BURST: f64 = 200.0;
/// Consecutive invalid messages after which the session is closed.
pub const MAX_BAD_IN_A_ROW: u32 = 20;
/// Messages refused by the rate limit (in one burst) after which the session is closed.
pub const MAX_LIMITED: u32 = 200;
/// Default console batch window (`--console-batch-ms`).
pub const CONSOLE_BATCH: Duration = Duration::from_millis(10);
/// How often the server pings a tracking page or a console: browsers answer pings but cannot
/// send them, so without these a page watching a quiet order would be dropped as idle. A
/// courier socket is pinged only once it has been quiet this long ([`SocketTimes::courier_idle`]).
pub const PING_EVERY: Duration = Duration::from_secs(30);
/// A client that has not taken a frame for this long has stopped reading (an app suspended in
/// the background, a hostile peer): its session is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest time between two snapshots to one console. Subscribes in a burst (a map
/// panned fast, a hostile client) are coalesced: the last box's snapshot follows once the gap
/// has passed. A snapshot is built whole on the session's HTTP worker, with every zone's
/// geometry, so one per subscribe (50 a second within the rate limit) let one console stall
/// every other session on its worker.
pub const SNAPSHOT_GAP: Duration = Duration::from_millis(250);

/// How often a console gets a `stats` message.
const CONSOLE_STATS_EVERY: Duration = Duration::from_secs(1);
/// A client that sends nothing (not even a pong) for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Socket timing ([`crate::server::ServeConfig::sockets`]; tests shorten it).
#[derive(Clone, Copy, Debug)]
pub struct SocketTimes {
    /// Server pings to tracking pages and consoles ([`PING_EVERY`]); also how long a courier
    /// socket may be quiet before it is pinged ([`SocketTimes::courier_idle`]).
    pub ping_every: Duration,
    /// Nothing heard for this long closes a session ([`IDLE_TIMEOUT`]).
    pub idle: Duration,
    /// The longest one write may wait for the client ([`WRITE_TIMEOUT`]).
    pub write: Duration,
}

impl SocketTimes {
    /// A courier socket's idle deadline: pinged once quiet for `ping_every` (an app may send a
    /// fix less often than the idle time), closed when nothing answers for `idle`.
    pub(crate) fn courier_idle(&self) -> IdleDeadline {
        IdleDeadline::with_ping(self.idle, self.ping_every)
    }
}

impl Default for SocketTimes {
    fn default() -> Self {
        SocketTimes { ping_every: PING_EVERY, idle: IDLE_TIMEOUT, write: WRITE_TIMEOUT }
    }
}

type State = web::Data<AppState>;

pub fn configure(cfg: &mut web::ServiceConfig) {
    use crate::api::{get, resource};
    cfg.service(resource("/v1/ws/courier", vec![get(courier_ws)]))
        .service(resource("/v1/ws/track/{order_id}", vec![get(track_ws)]))
        .service(resource("/v1/ws/console", vec![get(console_ws)]));
}

/// Token bucket plus a count of consecutive bad messages.
struct Guard {
    tokens: f64,
    last: Instant,
    bad_in_a_row: u32,
    limited: u32,
}

enum Verdict {
    Ok,
    Limited,
    Close(&'static str),
}

impl Guard {
    fn new() -> Self {
        Guard { tokens: RATE_BURST, last: Instant::now(), bad_in_a_row: 0, limited: 0 }
    }

    fn admit(&mut self) -> Verdict {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * RATE_PER_S).min(RATE_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.limited = 0;
            return Verdict::Ok;
        }
        self.limited += 1;
        metrics::counter!("hexfleet_ws_rate_limited_total").increment(1);
        if self.limited >= MAX_LIMITED { Verdict::Close("rate limit exceeded") } else { Verdict::Limited }
    }

    fn bad(&mut self) -> bool {
        self.bad_in_a_row += 1;
        metrics::counter!("hexfleet_ws_bad_messages_total").increment(1);
        self.bad_in_a_row >= MAX_BAD_IN_A_ROW
    }

    fn good(&mut self) {
        self.bad_in_a_row = 0;
    }
}

fn policy(reason: &str) -> Option<CloseReason> {
    Some(CloseReason { code: CloseCode::Policy, description: Some(reason.to_owned()) })
}

/// Try again later (1013): the session's market is moving to another node
/// ([`crate::broker::Broker::close_sessions`]).
fn moved_away() -> Option<CloseReason> {
    Some(CloseReason { code: CloseCode::Again, description: Some("reconnect: this node stopped serving the market, or its feed from the others".into()) })
}

/// Going away (1001): the server is shutting down. Apps and pages reconnect at once, to a node
/// that stays.
fn going_away() -> Option<CloseReason> {
    Some(CloseReason { code: CloseCode::Away, description: Some("server shutting down".into()) })
}

/// Policy violation (1008): the session's token expired. The app reconnects with a new one.
fn token_expired() -> Option<CloseReason> {
    Some(CloseReason { code: CloseCode::Policy, description: Some("token expired".into()) })
}

/// Authenticates before the upgrade, so a bad token gets a plain HTTP 401/403.
fn auth_ws(req: &HttpRequest, roles: &[Role]) -> Result<Auth, ApiError> {
    let auth = crate::auth::authenticate(req)?;
    auth.require(roles)?;
    Ok(auth)
}

/// An actix-ws client whose every write waits at most [`SocketTimes::write`]. actix-ws queues
/// 32 frames per session, so a client that stops reading would otherwise hold its session
/// (and its place in the broker) in a write for good. Also the client side of a socket
/// forwarded to a market's owner (`markets.rs`).
pub(crate) struct Peer {
    session: Session,
    write: Duration,
    stalled: bool,
}

impl Peer {
    pub(crate) fn new(session: Session, times: SocketTimes) -> Self {
        Peer { session, write: times.write, stalled: false }
    }

    /// Sends one text frame; `false` when the socket is gone or the client stopped reading.
    pub(crate) async fn text(&mut self, text: impl Into<bytestring::ByteString>) -> bool {
        if self.stalled {
            return false;
        }
        let sent = tokio::time::timeout(self.write, self.session.text(text)).await;
        self.settle(sent)
    }

    /// Sends text frames in order; `false` at the first that does not go out.
    pub(crate) async fn texts(&mut self, texts: impl IntoIterator<Item = String>) -> bool {
        for t in texts {
            if !self.text(t).await {
                return false;
            }
        }
        true
    }

    /// Sends one binary frame, as [`Peer::text`].
    pub(crate) async fn binary(&mut self, data: impl Into<web::Bytes>) -> bool {
        if self.stalled {
            return false;
        }
        let sent = tokio::time::timeout(self.write, self.session.binary(data)).await;
        self.settle(sent)
    }

    async fn ping(&mut self) -> bool {
        self.ping_with(b"").await
    }

    pub(crate) async fn ping_with(&mut self, payload: &[u8]) -> bool {
        let sent = tokio::time::timeout(self.write, self.session.ping(payload)).await;
        self.settle(sent)
    }

    pub(crate) async fn pong(&mut self, payload: &[u8]) {
        let sent = tokio::time::timeout(self.write, self.session.pong(payload)).await;
        self.settle(sent);
    }

    /// What a write within the write timeout came to: `true` when it went out; a write that
    /// timed out marks the client as stalled (it stopped reading).
    fn settle(&mut self, sent: Result<Result<(), actix_ws::Closed>, tokio::time::error::Elapsed>) -> bool {
        match sent {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                if !self.stalled {
                    self.stalled = true;
                    metrics::counter!("hexfleet_ws_write_timeouts_total").increment(1);
                }
                false
            }
        }
    }

    /// Closes with `reason`; a client that stopped reading is not waited for.
    pub(crate) async fn close(self, reason: Option<CloseReason>) {
        if !self.stalled {
            let _ = tokio::time::timeout(self.write, self.session.close(reason)).await;
        }
    }
}

/// Writes whatever the outbox holds; `false` when the socket is gone.
async fn flush(peer: &mut Peer, outbox: &Outbox) -> bool {
    peer.texts(outbox.drain()).await
}

/// What one read of the socket gave.
enum Input {
    /// A text frame, as received (no copy).
    Text(bytestring::ByteString),
    Closed,
    /// Nothing from the client (a ping of ours went out).
    Other,
    /// A ping or pong from the client (a ping answered already): counted against the rate
    /// limit like a message, or a client could flood pings, each answered, never limited.
    Control,
    Fatal(CloseReason),
}

/// The one error a socket gets when it goes over its rate limit ([`Guard`]).
fn rate_limited() -> String {
    error_json("rate_limited", "too many messages; slow down")
}

pub(crate) fn idle_timeout() -> CloseReason {
    CloseReason { code: CloseCode::Normal, description: Some("idle timeout".into()) }
}

/// A socket's idle timeout without a timer per read. A `timeout` around each read put a timer
/// into tokio's wheel and took it out again on every frame (and on every other wake-up of the
/// session, which drops the pending read). Here one `Sleep` stays armed: a frame only notes the
/// time, and the sleep is moved on when it fires before the socket has been idle long enough.
///
/// With [`IdleDeadline::with_ping`] (courier sockets) a client quiet for `ping_after` is pinged
/// once, so an app that sends a fix less often than the idle time (a parked courier may wait up
/// to `--courier-stale-s`, 120 s) stays connected as long as its WebSocket answers pings, as
/// every RFC 6455 client does by itself; a busy client is never pinged.
pub(crate) struct IdleDeadline {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    last: tokio::time::Instant,
    idle: Duration,
    ping_after: Option<Duration>,
    pinged: bool,
}

/// What an [`IdleDeadline`] woke for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The client has been quiet for `ping_after`: ping it (once per silence).
    Ping,
    /// Nothing heard for the idle time.
    Lapsed,
}

/// What [`IdleDeadline::next`] gave.
pub(crate) enum Next<T> {
    /// The stream's next item (`None`: it ended).
    Item(Option<T>),
    /// Ping the client ([`Wake::Ping`]).
    Ping,
    /// Nothing heard for the idle time.
    Lapsed,
}

impl IdleDeadline {
    pub(crate) fn new(idle: Duration) -> Self {
        Self::build(idle, None)
    }

    /// An idle deadline that also asks for a ping once the client has been quiet for
    /// `ping_after` (shorter than `idle`, or never).
    pub(crate) fn with_ping(idle: Duration, ping_after: Duration) -> Self {
        Self::build(idle, Some(ping_after).filter(|p| *p < idle))
    }

    fn build(idle: Duration, ping_after: Option<Duration>) -> Self {
        let now = tokio::time::Instant::now();
        let first = ping_after.unwrap_or(idle);
        IdleDeadline { sleep: Box::pin(tokio::time::sleep_until(now + first)), last: now, idle, ping_after, pinged: false }
    }

    /// Notes that the client sent something.
    pub(crate) fn heard(&mut self) {
        self.last = tokio::time::Instant::now();
        self.pinged = false;
    }

    /// Completes when the client is to be pinged, or once nothing has been heard for the idle
    /// time. Cancel-safe.
    pub(crate) async fn wake(&mut self) -> Wake {
        loop {
            self.sleep.as_mut().await;
            let now = tokio::time::Instant::now();
            if self.last + self.idle <= now {
                return Wake::Lapsed;
            }
            if let Some(p) = self.ping_after.filter(|_| !self.pinged) {
                if self.last + p <= now {
                    self.pinged = true;
                    self.sleep.as_mut().reset(self.last + self.idle);
                    return Wake::Ping;
                }
                self.sleep.as_mut().reset(self.last + p);
                continue;
            }
            self.sleep.as_mut().reset(self.last + self.idle);
        }
    }

    /// Completes once nothing has been heard for the idle time (pings not asked for are
    /// skipped). Cancel-safe.
    pub(crate) async fn lapsed(&mut self) {
        while self.wake().await != Wake::Lapsed {}
    }

    /// The next item of `stream`, a ping to send, or the end of the idle time.
    pub(crate) async fn next<S: futures_util::Stream + Unpin>(&mut self, stream: &mut S) -> Next<S::Item> {
        tokio::select! {
            biased;
            m = stream.next() => {
                self.heard();
                Next::Item(m)
            }
            w = self.wake() => match w {
                Wake::Ping => Next::Ping,
                Wake::Lapsed => Next::Lapsed,
            },
        }
    }
}

/// The next message, answering pings on the way; nothing for the idle time is fatal.
async fn read(stream: &mut actix_ws::AggregatedMessageStream, peer: &mut Peer, idle: &mut IdleDeadline) -> Input {
    let m = match idle.next(stream).await {
        Next::Lapsed => return Input::Fatal(idle_timeout()),
        Next::Ping => return if peer.ping().await { Input::Other } else { Input::Closed },
        Next::Item(m) => m,
    };
    match m {
        None | Some(Ok(AggregatedMessage::Close(_))) => Input::Closed,
        Some(Ok(AggregatedMessage::Text(t))) => Input::Text(t),
        Some(Ok(AggregatedMessage::Ping(p))) => {
            peer.pong(&p).await;
            Input::Control
        }
        Some(Ok(AggregatedMessage::Pong(_))) => Input::Control,
        Some(Ok(AggregatedMessage::Binary(_))) => Input::Text(bytestring::ByteString::new()),
        Some(Err(e)) => {
            metrics::counter!("hexfleet_ws_protocol_errors_total").increment(1);
            let (code, why) = match e {
                actix_ws::ProtocolError::Overflow => (CloseCode::Size, format!("frame larger than {MAX_FRAME} bytes")),
                other => (CloseCode::Protocol, other.to_string()),
            };
            Input::Fatal(CloseReason { code, description: Some(why) })
        }
    }
}

// ---- courier ----

/// What one read of a courier socket gave.
pub(crate) enum Read<T> {
    Text(T),
    Closed,
    /// Nothing from the client (a ping of ours went out).
    Other,
    /// A ping or pong from the client, counted against the rate limit.
    Control,
    Fatal(CloseReason),
}

/// One courier app's socket, whichever server reads it: actix-ws on the HTTP port
/// ([`courier_ws`]) or tokio-tungstenite on the ingest port (`ingest.rs`). The session logic
/// ([`courier_session`]) is the same for both.
pub(crate) trait CourierSocket {
    type Text: std::ops::Deref<Target = str>;
    /// Sends one text frame; `false` when the socket is gone.
    async fn send(&mut self, text: String) -> bool;
    /// The next message (answering pings on the way); [`IDLE_TIMEOUT`] without one is fatal.
    async fn recv(&mut self) -> Read<Self::Text>;
    /// Closes with `reason` (`None`: a plain close, the peer went away).
    async fn close(self, reason: Option<CloseReason>);
}

/// The actix-ws side of a courier socket.
struct ActixSocket {
    peer: Peer,
    stream: actix_ws::AggregatedMessageStream,
    idle: IdleDeadline,
}

impl CourierSocket for ActixSocket {
    type Text = bytestring::ByteString;

    async fn send(&mut self, text: String) -> bool {
        self.peer.text(text).await
    }

    async fn recv(&mut self) -> Read<Self::Text> {
        match read(&mut self.stream, &mut self.peer, &mut self.idle).await {
            Input::Text(t) => Read::Text(t),
            Input::Closed => Read::Closed,
            Input::Other => Read::Other,
            Input::Control => Read::Control,
            Input::Fatal(r) => Read::Fatal(r),
        }
    }

    async fn close(self, reason: Option<CloseReason>) {
        self.peer.close(reason).await;
    }
}

async fn courier_ws(req: HttpRequest, body: web::Payload, st: State) -> Result<HttpResponse, ApiError> {
    let auth = auth_ws(&req, &[Role::Courier])?;
    // The handshake is checked first: a plain GET must not register the courier (a durable
    // write, a `courier.registered` event, webhooks). Nothing is sent before `resp` is returned.
    let (resp, session, stream) = actix_ws::handle(&req, body).map_err(|e| ApiError::bad_request("not_websocket", e.to_string()))?;
    let tap = courier_tap(&st, &auth).await?;
    let stream = stream.max_frame_size(MAX_FRAME).aggregate_continuations().max_continuation_size(MAX_FRAME);
    let id = CourierId::new(&auth.claims.sub);
    let socket = ActixSocket { peer: Peer::new(session, st.sockets), stream, idle: st.sockets.courier_idle() };
    let expires = auth.claims.session_deadline();
    actix_web::rt::spawn(courier_session(st, auth.tenant, id, tap, socket, expires));
    Ok(resp)
}

/// Registers the courier on first contact and looks its actor up once: the GPS path then skips
/// the fleet's courier map. Runs before the upgrade, so a failure is a plain HTTP error.
pub(crate) async fn courier_tap(st: &AppState, auth: &Auth) -> Result<CourierTap, ApiError> {
    let id = CourierId::new(&auth.claims.sub);
    let (fleet, tenant, cid) = (st.fleet.clone(), auth.tenant.clone(), id.clone());
    st.on_main(async move { fleet.ensure_courier(&tenant, &cid).await }).await??;
    Ok(st.fleet.courier_tap(&auth.tenant, &id)?)
}

pub(crate) async fn courier_session<S: CourierSocket>(
    st: State,
    tenant: TenantId,
    id: CourierId,
    mut tap: CourierTap,
    mut socket: S,
    expires: tokio::time::Instant,
) {
    let outbox = Outbox::per_connection(OUTBOX_CAPACITY);
    let sid = st.broker.add_courier(tenant.as_str(), id.as_str(), outbox.clone());
    st.broker.listen_remote(Topic::Market(tenant.as_str())).await;
    metrics::gauge!("hexfleet_ws_connections", "kind" => "courier").increment(1.0);
    let mut guard = Guard::new();
    // Orders it already holds (reconnect): tell the app again.
    for o in st.fleet.courier_orders(&tenant, &id) {
        outbox.push(crate::dto::order_update_value(&o).to_string());
    }
    // And offers still open (sent while it was away, they would lapse unseen).
    for o in st.fleet.courier_offers(&tenant, &id) {
        let Some(offer) = &o.offer else { continue };
        let notice = hexfleet_actors::publish::CourierNotice::Offer {
            order: o.id.clone(),
            pickup: o.pickup,
            dropoff: o.dropoff,
            expires_at: offer.expires_at,
        };
        outbox.push(crate::dto::courier_notice_value(&notice).to_string());
    }
    let expiry = tokio::time::sleep_until(expires);
    // The waits live across turns of the loop: made afresh on each turn, the outbox's and the
    // shutdown's would register with (and leave) their waiter lists, under a lock, on every GPS
    // frame. A `Notify` permit given while no one waits is kept, so nothing is missed.
    let cancelled = st.shutdown.cancelled();
    let notified = outbox.notified();
    tokio::pin!(expiry, cancelled, notified);
    let close = loop {
        if outbox.overflowed() {
            let _ = socket.send(error_json("too_slow", "the client did not read its messages in time")).await;
            break policy("too slow");
        }
        if outbox.closed() {
            break moved_away();
        }
        // Also here: the select's expiry arm comes last, and a client that always has a frame
        // waiting (one sending as fast as it is read) would keep it from ever being polled.
        if expiry.is_elapsed() {
            break token_expired();
        }
        tokio::select! {
            biased;
            () = &mut notified => {
                notified.set(outbox.notified());
                let mut gone = false;
                for m in outbox.drain() {
                    if !socket.send(m).await { gone = true; break; }
                }
                if gone { break None; }
            }
            () = &mut cancelled => break going_away(),
            input = socket.recv() => match input {
                Read::Closed => break None,
                Read::Fatal(c) => break Some(c),
                Read::Other => {}
                // Pings and pongs the client sends count against the limit as messages do.
                input @ (Read::Control | Read::Text(_)) => match guard.admit() {
                    Verdict::Close(why) => break policy(why),
                    Verdict::Limited => {
                        if guard.limited == 1 {
                            let _ = socket.send(rate_limited()).await;
                        }
                    }
                    Verdict::Ok => if let Read::Text(text) = input {
                        match courier_message(&st, &tenant, &id, &mut tap, &text).await {
                            Ok(()) => guard.good(),
                            Err(e) => {
                                if !socket.send(error_json(e.code, &e.message)).await { break None; }
                                if guard.bad() { break policy("too many invalid messages"); }
                            }
                        }
                    },
                },
            },
            // Last: polled only when nothing else is ready (off the GPS hot path).
            () = &mut expiry => break token_expired(),
        }
    };
    st.broker.drop_courier(tenant.as_str(), id.as_str(), sid);
    metrics::gauge!("hexfleet_ws_connections", "kind" => "courier").decrement(1.0);
    socket.close(close).await;
}

/// The shape of a `loc` frame (`{"t":"loc",...}`), for the fast path of [`courier_message`].
#[derive(serde::Deserialize)]
struct FastLoc<'a> {
    t: &'a str,
    lat: f64,
    lng: f64,
    ts: hexfleet_actors::domain::Ms,
    #[serde(default)]
    speed: Option<f32>,
    #[serde(default)]
    heading: Option<f32>,
    #[serde(default)]
    acc: Option<f32>,
}

async fn courier_message(st: &AppState, tenant: &TenantId, id: &CourierId, tap: &mut CourierTap, text: &str) -> Result<(), ApiError> {
    if text.is_empty() {
        return Err(ApiError::bad_request("bad_message", "expected a JSON text frame"));
    }
    let now = st.fleet.now_ms();
    // Hot path: a `loc` frame parsed as a plain struct. The tagged enum below buffers every
    // field before it can pick the variant, which costs allocations on each GPS fix.
    if let Ok(f) = serde_json::from_str::<FastLoc<'_>>(text)
        && f.t == "loc"
    {
        let l = LocDto { lat: f.lat, lng: f.lng, ts: f.ts, speed: f.speed, heading: f.heading, acc: f.acc };
        tap.ingest([l.to_fix(now)?])?;
        return Ok(());
    }
    let msg: CourierIn = serde_json::from_str(text).map_err(|e| ApiError::bad_request("malformed_json", e.to_string()))?;
    match msg {
        CourierIn::Loc(l) => {
            let fix = l.to_fix(now)?;
            tap.ingest([fix])?;
        }
        CourierIn::Locs { items } => {
            if items.is_empty() || items.len() > MAX_BATCH {
                return Err(ApiError::bad_request("bad_batch", format!("locs must hold 1..={MAX_BATCH} items")));
            }
            // All or nothing: one bad fix refuses the batch so the app can tell which it sent.
            let fixes = items.into_iter().map(|l: LocDto| l.to_fix(now)).collect::<Result<Vec<_>, _>>()?;
            tap.ingest(fixes)?;
        }
        CourierIn::Status { status } => {
            let s = CourierStatus::parse(&status).ok_or_else(|| ApiError::bad_request("bad_status", "status must be available or offline"))?;
            st.fleet.set_status(tenant, id, s)?;
        }
        CourierIn::OfferReply { order_id, accept } => {
            let oid = order_ref(&order_id)?;
            let cmd = if accept { Command::Accept { courier: id.clone() } } else { Command::Decline { courier: id.clone() } };
            st.fleet.command(tenant, &oid, cmd, hexfleet_actors::domain::Actor::Courier(id.clone())).await?;
        }
        CourierIn::OrderEvent { order_id, event } => {
            let oid = order_ref(&order_id)?;
            let c = id.clone();
            let cmd = match event.as_str() {
                "picked_up" => Command::PickedUp { courier: c },
                "delivered" => Command::Delivered { courier: c },
                "failed" => Command::Failed { courier: c },
                "released" => Command::Release { courier: Some(c) },
                _ => return Err(ApiError::bad_request("bad_event", "event must be picked_up, delivered, failed or released")),
            };
            st.fleet.command(tenant, &oid, cmd, hexfleet_actors::domain::Actor::Courier(id.clone())).await?;
        }
    }
    metrics::counter!("hexfleet_ws_messages_total", "kind" => "courier").increment(1);
    Ok(())
}

fn order_ref(raw: &str) -> Result<OrderId, ApiError> {
    if valid_id(raw) { Ok(OrderId::new(raw)) } else { Err(ApiError::bad_request("bad_id", "invalid order id")) }
}

// ---- track ----

#[derive(Debug, Deserialize)]
struct SinceQuery {
    since: Option<u64>,
}

/// `?since=SEQ` of a watcher's socket: a number or nothing (400 `bad_since` otherwise, before
/// the upgrade; it was ignored, and a page with a bug in it silently got no replay).
fn since_of(req: &HttpRequest) -> Result<Option<u64>, ApiError> {
    web::Query::<SinceQuery>::from_query(req.query_string())
        .map(|q| q.since)
        .map_err(|_| ApiError::bad_request("bad_since", "since must be the seq (a whole number) of the last message received"))
}

async fn track_ws(req: HttpRequest, body: web::Payload, st: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let auth = auth_ws(&req, &[Role::Customer, Role::Dispatcher, Role::Admin])?;
    let oid = order_ref(&path)?;
    if auth.claims.role == Role::Customer && auth.claims.order_id.as_deref() != Some(oid.as_str()) {
        return Err(ApiError::forbidden("this token may only watch its own order"));
    }
    let since = since_of(&req)?;
    // The order must exist in this tenant (404 otherwise, before the upgrade).
    st.fleet.order(&auth.tenant, &oid).await?;
    let (resp, session, stream) = actix_ws::handle(&req, body).map_err(|e| ApiError::bad_request("not_websocket", e.to_string()))?;
    let stream = stream.max_frame_size(MAX_FRAME).aggregate_continuations().max_continuation_size(MAX_FRAME);
    let expires = auth.claims.session_deadline();
    actix_web::rt::spawn(track_session(st, auth.tenant, oid, since, session, stream, expires));
    Ok(resp)
}

async fn track_session(
    st: State,
    tenant: TenantId,
    oid: OrderId,
    since: Option<u64>,
    session: Session,
    mut stream: actix_ws::AggregatedMessageStream,
    expires: tokio::time::Instant,
) {
    let mut peer = Peer::new(session, st.sockets);
    let outbox = Outbox::new(OUTBOX_CAPACITY);
    let (sid, replay) = st.broker.add_track(tenant.as_str(), oid.as_str(), outbox.clone(), since);
    st.broker.listen_remote(Topic::Order(tenant.as_str(), oid.as_str())).await;
    metrics::gauge!("hexfleet_ws_connections", "kind" => "track").increment(1.0);
    let first: Option<Vec<String>> = match replay {
        Some(Replay::Missed(m)) => Some(m),
        Some(Replay::Gone) => {
            let seq = st.broker.track_seq(tenant.as_str(), oid.as_str());
            let resync = json!({ "t": "resync", "seq": seq }).to_string();
            track_snapshot(&st, &tenant, &oid, &outbox).await.map(|snap| std::iter::once(resync).chain(snap).collect())
        }
        None => track_snapshot(&st, &tenant, &oid, &outbox).await,
    };
    // Without its snapshot the page would sit on nothing: it is closed (try again) instead.
    let unread = first.is_none();
    let ok = !unread && peer.texts(first.unwrap_or_default()).await;
    let mut guard = Guard::new();
    let mut alive = Liveness::new(st.sockets);
    let expiry = tokio::time::sleep_until(expires);
    // Without it, a page open at shutdown held the server's graceful stop for its whole
    // timeout, and then lost its connection without a close frame.
    let cancelled = st.shutdown.cancelled();
    tokio::pin!(expiry, cancelled);
    let close = if unread {
        Some(CloseReason { code: CloseCode::Again, description: Some("the order cannot be read now; reconnect".into()) })
    } else if !ok {
        None
    } else {
        loop {
            if outbox.overflowed() {
                let _ = peer.text(error_json("too_slow", "the client did not read its messages in time")).await;
                break policy("too slow");
            }
            if outbox.closed() {
                break moved_away();
            }
            tokio::select! {
                biased;
                () = outbox.notified() => {
                    if !flush(&mut peer, &outbox).await { break None; }
                }
                () = &mut cancelled => break going_away(),
                () = &mut expiry => break token_expired(),
                _ = alive.ping.tick() => {
                    if !peer.ping().await { break None; }
                }
                input = read(&mut stream, &mut peer, &mut alive.idle) => match input {
                    Input::Closed => break None,
                    Input::Fatal(r) => break Some(r),
                    Input::Other => {}
                    // Pings and pongs the client sends count against the limit as messages do.
                    input @ (Input::Control | Input::Text(_)) => match guard.admit() {
                        Verdict::Close(why) => break policy(why),
                        Verdict::Limited => {
                            if guard.limited == 1 {
                                let _ = peer.text(rate_limited()).await;
                            }
                        }
                        Verdict::Ok => if matches!(input, Input::Text(_)) {
                            let _ = peer.text(error_json("read_only", "this stream takes no messages")).await;
                            if guard.bad() { break policy("too many invalid messages"); }
                        },
                    },
                },
            }
        }
    };
    st.broker.drop_track(tenant.as_str(), oid.as_str(), sid);
    metrics::gauge!("hexfleet_ws_connections", "kind" => "track").decrement(1.0);
    peer.close(close).await;
}

/// A connection's liveness: the ticker that pings the other end, and an idle deadline that
/// what is heard from it moves on. Tracking pages and consoles use it (their reads move the
/// deadline, which also catches a busy session whose client went silent), and so do the
/// relays to a market's owner (`markets`, `ingest`), which call [`Liveness::heard`].
pub(crate) struct Liveness {
    ping: tokio::time::Interval,
    idle: IdleDeadline,
}

/// What a [`Liveness`] calls for next.
pub(crate) enum Beat {
    /// Ping the other end.
    Ping,
    /// Nothing heard from it for the idle time: it is gone.
    Dead,
}

impl Liveness {
    pub(crate) fn new(times: SocketTimes) -> Self {
        let every = times.ping_every.max(Duration::from_millis(10));
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Liveness { ping, idle: IdleDeadline::new(times.idle) }
    }

    /// Notes that the other end sent something (anything counts).
    pub(crate) fn heard(&mut self) {
        self.idle.heard();
    }

    /// Waits for the next ping, or for the idle time to pass with nothing heard. Cancel-safe.
    pub(crate) async fn beat(&mut self) -> Beat {
        tokio::select! {
            biased;
            () = self.idle.lapsed() => Beat::Dead,
            _ = self.ping.tick() => Beat::Ping,
        }
    }
}

/// The current state of a tracked order: its `order_update`, and the courier's position;
/// `None` when the order cannot be read now (the store unreachable).
///
/// Its messages are numbered before the state is read, both at once: an update numbered below
/// them happened before the read, so the snapshot holds it (what `outbox` has queued of those
/// is dropped), and one numbered after them comes after them on the wire. Numbered after the
/// read, a snapshot could carry a number above an update it did not hold (one arriving during
/// the read, a database round trip on a node that does not run the market), and a page
/// reconnecting with that number was never sent the update; numbered one at a time, an update
/// numbered between the two would go out after the second.
///
/// The courier's position is its record's last fix, or the position that waited in the page's
/// slot when that is newer or the record is not on this node (a node that does not run the
/// market hears positions through Redis). With no position to send, the order update takes
/// the second number, so a page reconnecting with it is told nothing was missed.
async fn track_snapshot(st: &AppState, tenant: &TenantId, oid: &OrderId, outbox: &Outbox) -> Option<Vec<String>> {
    let (seq, waiting) = st.broker.track_snapshot_seq(tenant.as_str(), oid.as_str(), outbox, 2);
    let Ok(o) = st.fleet.order(tenant, oid).await else {
        // The stream ends with its watchers (an open order's next update starts another): a
        // closed order's stream would otherwise wait for a final update that already went.
        st.broker.end_track(tenant.as_str(), oid.as_str());
        return None;
    };
    if o.state.is_terminal() {
        st.broker.end_track(tenant.as_str(), oid.as_str());
    }
    let position = o.courier.as_ref().filter(|_| o.state.is_held()).and_then(|c| {
        let waiting = waiting.and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok()).filter(|m| m["courier_id"] == c.as_str());
        let recorded = st.fleet.courier(tenant, c).ok().and_then(|rec| Some((rec.last_fix?, rec)));
        match (recorded, waiting) {
            (Some((f, _)), Some(w)) if w["ts"].as_i64().is_some_and(|ts| ts > f.ts) => Some(w),
            (Some((f, rec)), _) => {
                let at = crate::broker::StatusAt { lat: f.pos.lat, lng: f.pos.lng, ts: f.ts, speed: f.speed, heading: f.heading };
                Some(crate::broker::track_courier_value(o.id.as_str(), c.as_str(), at, st.fleet.direct_eta_s(tenant, &rec, &o)))
            }
            (None, w) => w,
        }
    });
    let mut update = crate::dto::order_update_value(&o);
    update["seq"] = json!(if position.is_some() { seq } else { seq + 1 });
    let mut msgs = vec![update.to_string()];
    if let Some(mut p) = position {
        p["seq"] = json!(seq + 1);
        msgs.push(p.to_string());
    }
    Some(msgs)
}

// ---- console ----

#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum ConsoleIn {
    Subscribe { bbox: [f64; 4] },
}

async fn console_ws(req: HttpRequest, body: web::Payload, st: State) -> Result<HttpResponse, ApiError> {
    let auth = auth_ws(&req, &[Role::Dispatcher, Role::Admin])?;
    let since = since_of(&req)?;
    let (resp, session, stream) = actix_ws::handle(&req, body).map_err(|e| ApiError::bad_request("not_websocket", e.to_string()))?;
    let stream = stream.max_frame_size(MAX_FRAME).aggregate_continuations().max_continuation_size(MAX_FRAME);
    let expires = auth.claims.session_deadline();
    actix_web::rt::spawn(console_session(st, auth.tenant, since, session, stream, expires));
    Ok(resp)
}

fn valid_bbox(b: &[f64; 4]) -> bool {
    b.iter().all(|v| v.is_finite())
        && (-180.0..=180.0).contains(&b[0])
        && (-180.0..=180.0).contains(&b[2])
        && (-90.0..=90.0).contains(&b[1])
        && (-90.0..=90.0).contains(&b[3])
        && b[1] <= b[3]
}

async fn console_session(
    st: State,
    tenant: TenantId,
    since: Option<u64>,
    session: Session,
    mut stream: actix_ws::AggregatedMessageStream,
    expires: tokio::time::Instant,
) {
    let mut peer = Peer::new(session, st.sockets);
    let mut alive = Liveness::new(st.sockets);
    // Numbered on the tenant's console stream (`Broker::console_numbers`), not per connection.
    let view = Arc::new(ConsoleView::new(Outbox::new(crate::broker::CONSOLE_OUTBOX_CAPACITY), None));
    let (sid, replay) = st.broker.add_console(tenant.as_str(), view.clone(), since);
    // What a reconnect with `since` missed (events, zone changes), or a resync: the console
    // subscribes again for a fresh snapshot either way.
    let first = match replay {
        Some(Replay::Missed(m)) => m,
        Some(Replay::Gone) => match st.broker.console_numbers(tenant.as_str(), &view.outbox, 1) {
            Some((mut queued, seq)) => {
                queued.push(json!({ "t": "resync", "seq": seq }).to_string());
                queued
            }
            None => Vec::new(),
        },
        None => Vec::new(),
    };
    let sent = peer.texts(first).await;
    st.broker.listen_remote(Topic::Market(tenant.as_str())).await;
    metrics::gauge!("hexfleet_ws_connections", "kind" => "console").increment(1.0);
    let mut guard = Guard::new();
    let mut tick = tokio::time::interval(st.console_batch);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_stats = Instant::now();
    let mut last_fixes = (st.fleet.tenant_stats(&tenant).fixes_received, Instant::now());
    // The box whose snapshot is owed, and when the next one may be built (`SNAPSHOT_GAP`).
    let (mut snapshot_due, mut next_snapshot) = (None::<[f64; 4]>, Instant::now());
    let expiry = tokio::time::sleep_until(expires);
    let cancelled = st.shutdown.cancelled();
    tokio::pin!(expiry, cancelled);
    let close = loop {
        if !sent {
            break None;
        }
        if view.outbox.overflowed() {
            let _ = peer.text(error_json("too_slow", "the client did not read its messages in time")).await;
            break policy("too slow");
        }
        if view.outbox.closed() {
            break moved_away();
        }
        if let Some(bbox) = snapshot_due.filter(|_| Instant::now() >= next_snapshot) {
            (snapshot_due, next_snapshot) = (None, Instant::now() + SNAPSHOT_GAP);
            if !console_snapshot(&st, &tenant, &view, bbox, &mut peer).await { break None; }
        }
        tokio::select! {
            biased;
            () = view.outbox.notified() => {
                if !flush(&mut peer, &view.outbox).await { break None; }
            }
            () = &mut cancelled => break going_away(),
            () = &mut expiry => break token_expired(),
            _ = alive.ping.tick() => {
                if !peer.ping().await { break None; }
            }
            _ = tick.tick() => {
                let (couriers, orders) = view.outbox.take_batches();
                let stats_due = Instant::now() >= next_stats;
                let count = u64::from(!couriers.is_empty()) + u64::from(!orders.is_empty()) + u64::from(stats_due);
                if count == 0 { continue; }
                // After what was numbered before them (queued events), on the same count.
                let Some((mut out, mut seq)) = st.broker.console_numbers(tenant.as_str(), &view.outbox, count) else { break moved_away() };
                if !couriers.is_empty() {
                    out.push(crate::broker::couriers_batch_json(seq, &couriers));
                    seq += 1;
                }
                if !orders.is_empty() {
                    out.push(batch_json("orders", seq, &orders));
                    seq += 1;
                }
                if stats_due {
                    next_stats = Instant::now() + CONSOLE_STATS_EVERY;
                    // The tenant's own figures: a console never sees another fleet's.
                    let stats = st.fleet.tenant_stats(&tenant);
                    let now = (stats.fixes_received, Instant::now());
                    let rate = (now.0.saturating_sub(last_fixes.0)) as f64 / now.1.duration_since(last_fixes.1).as_secs_f64().max(0.001);
                    last_fixes = now;
                    out.push(json!({ "t": "stats", "seq": seq, "couriers_online": stats.couriers_online, "orders_open": stats.orders_open, "ingest_per_s": rate.round() }).to_string());
                }
                if !peer.texts(out).await { break None; }
            }
            input = read(&mut stream, &mut peer, &mut alive.idle) => match input {
                Input::Closed => break None,
                Input::Fatal(r) => break Some(r),
                Input::Other => {}
                // Pings and pongs the client sends count against the limit as messages do.
                input @ (Input::Control | Input::Text(_)) => match guard.admit() {
                    Verdict::Close(why) => break policy(why),
                    // Refused, not served: a subscribe builds a whole snapshot.
                    Verdict::Limited => {
                        if guard.limited == 1 {
                            let _ = peer.text(rate_limited()).await;
                        }
                    }
                    Verdict::Ok => if let Input::Text(text) = input {
                        match serde_json::from_str::<ConsoleIn>(&text) {
                            Ok(ConsoleIn::Subscribe { bbox }) if valid_bbox(&bbox) => {
                                guard.good();
                                view.set_bbox(bbox);
                                // Sent at the top of the loop, at once unless one went out less
                                // than `SNAPSHOT_GAP` ago (then by a later batch tick).
                                snapshot_due = Some(bbox);
                            }
                            Ok(ConsoleIn::Subscribe { .. }) => {
                                let _ = peer.text(error_json("bad_bbox", "bbox is [min_lng, min_lat, max_lng, max_lat] in degrees")).await;
                                if guard.bad() { break policy("too many invalid messages"); }
                            }
                            Err(e) => {
                                let _ = peer.text(error_json("malformed_json", &e.to_string())).await;
                                if guard.bad() { break policy("too many invalid messages"); }
                            }
                        }
                    },
                },
            },
        }
    };
    st.broker.drop_console(tenant.as_str(), sid);
    metrics::gauge!("hexfleet_ws_connections", "kind" => "console").decrement(1.0);
    peer.close(close).await;
}

/// A console batch message (`orders`) serialised in one pass around its items. Courier
/// batches, the hot ones, join items rendered once per update instead
/// (`broker::couriers_batch_json`).
fn batch_json<T: serde::Serialize>(t: &'static str, seq: u64, items: &[T]) -> String {
    #[derive(serde::Serialize)]
    struct Batch<'a, T> {
        t: &'static str,
        seq: u64,
        items: &'a [T],
    }
    serde_json::to_string(&Batch { t, seq, items }).unwrap_or_else(|e| error_json("internal", &e.to_string()))
}

/// Sends what is in the view now: couriers and open orders inside the box.
async fn console_snapshot(st: &AppState, tenant: &TenantId, view: &ConsoleView, b: [f64; 4], peer: &mut Peer) -> bool {
    let (Ok(min), Ok(max)) = (hexfleet_actors::domain::LatLng::new(b[1], b[0]), hexfleet_actors::domain::LatLng::new(b[3], b[2])) else {
        return true;
    };
    // Numbered before the state is read (see `track_snapshot`): what was queued before is sent
    // first, and the snapshot holds it; what comes after goes out after the snapshot.
    // Closed meanwhile: the loop's next turn ends the session.
    let Some((queued, seq)) = st.broker.console_numbers(tenant.as_str(), &view.outbox, 3) else { return true };
    if !peer.texts(queued).await {
        return false;
    }
    let couriers: Vec<_> = st
        .fleet
        .couriers_in_bbox(tenant, min, max)
        .await
        .iter()
        .filter_map(|c| {
            let f = c.last_fix?;
            Some(json!({ "id": c.id.as_str(), "lat": f.pos.lat, "lng": f.pos.lng, "ts": f.ts, "status": c.status.as_str(), "speed": f.speed, "heading": f.heading }))
        })
        .collect();
    let orders: Vec<_> = st
        .fleet
        .open_orders(tenant)
        .iter()
        .filter(|o| hexfleet_geo::index::in_box(o.pickup, min, max))
        .map(|o| serde_json::to_value(OrderDto::from(o.as_ref())).unwrap_or_default())
        .collect();
    let zones: Vec<_> = st.fleet.zones(tenant).iter().map(|z| crate::zones::console_feature(z)).collect();
    let snapshot = [
        json!({ "t": "couriers", "seq": seq, "items": couriers, "snapshot": true }),
        json!({ "t": "orders", "seq": seq + 1, "items": orders, "snapshot": true }),
        json!({ "t": "zones", "seq": seq + 2, "items": zones, "snapshot": true }),
    ];
    peer.texts(snapshot.iter().map(serde_json::Value::to_string)).await
}

#[cfg(test)]
mod tests {
    /// The load generator refuses rates past this server's per-socket limit, from its own copy
    /// of it (the simulator does not depend on the gateway).
    #[test]
    fn the_load_generator_knows_the_per_socket_rate_limit() {
        assert_eq!(super::RATE_PER_S, hexfleet_sim::load::SERVER_RATE_PER_SOCKET);
    }
}
