//! One simulated courier over a real WebSocket: it moves, reports `loc`, goes `available`,
//! answers offers, follows `assigned`/`route`, and reports `picked_up` and `delivered`.
//!
//! The courier is a single task with one `select!` loop over the socket, a movement tick and
//! the shutdown token; every wait is bounded and the loop ends on shutdown or after a bounded
//! number of failed reconnects.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::geomath::{distance_m, BBox, LatLng};
use crate::movement::{random_point_near, Mover, Vehicle};
use crate::net::{connect_ws, Server, Ws};
use crate::protocol::{is_terminal_state, CourierMsg, CourierStatus, OrderEventKind, ServerMsg, StopKind};
use crate::token::TokenMint;

/// Counters shared by all simulated clients of a demo run.
#[derive(Debug, Default)]
pub struct SimStats {
    pub connected: AtomicU64,
    pub locs_sent: AtomicU64,
    pub offers: AtomicU64,
    pub accepted: AtomicU64,
    pub declined: AtomicU64,
    pub assigned: AtomicU64,
    pub picked_up: AtomicU64,
    pub delivered: AtomicU64,
    pub server_errors: AtomicU64,
    pub disconnects: AtomicU64,
    pub orders_created: AtomicU64,
    pub order_errors: AtomicU64,
    /// Order creations sent again after a 503, a 504 or no answer.
    pub order_retries: AtomicU64,
    pub watcher_msgs: AtomicU64,
    pub watchers_open: AtomicU64,
    /// Tracking sockets opened again after they closed before their order ended.
    pub watcher_reconnects: AtomicU64,
    /// Demo consoles' sockets opened again after closing.
    pub console_reconnects: AtomicU64,
}

impl SimStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a simulated courier behaves.
#[derive(Debug, Clone)]
pub struct CourierOptions {
    /// `loc` is sent every `loc_every.0..=loc_every.1` (uniform).
    pub loc_every: (Duration, Duration),
    /// Movement is integrated at this step.
    pub tick: Duration,
    /// Probability of accepting an offer.
    pub accept_prob: f64,
    /// Think time before answering an offer (capped below its expiry).
    pub reply_delay: (Duration, Duration),
    /// Time spent at a pickup or drop-off before reporting the event.
    pub dwell: (Duration, Duration),
    /// A stop counts as reached within this many metres.
    pub arrive_radius_m: f64,
    /// Failed (re)connects in a row before the courier gives up.
    pub max_reconnects: u32,
    pub connect_timeout: Duration,
}

impl Default for CourierOptions {
    fn default() -> Self {
        Self {
            loc_every: (Duration::from_secs(1), Duration::from_secs(5)),
            tick: Duration::from_millis(500),
            accept_prob: 0.9,
            reply_delay: (Duration::from_millis(300), Duration::from_millis(2500)),
            dwell: (Duration::from_secs(5), Duration::from_secs(20)),
            arrive_radius_m: 25.0,
            max_reconnects: 20,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Where a courier's token comes from.
#[derive(Debug, Clone)]
pub enum CourierToken {
    /// The same token on every connect (it stops working when it expires).
    Fixed(String),
    /// A fresh token on every connect, as an app does that refreshes its credentials: a
    /// courier the server disconnects at its token's expiry (1008) comes back with a new one.
    Minted(TokenMint),
}

impl CourierToken {
    fn for_connect(&self, courier_id: &str) -> anyhow::Result<String> {
        match self {
            CourierToken::Fixed(t) => Ok(t.clone()),
            CourierToken::Minted(mint) => mint.courier(courier_id),
        }
    }
}

/// Identity and start of one courier.
#[derive(Debug, Clone)]
pub struct CourierSpec {
    pub id: String,
    pub token: CourierToken,
    pub vehicle: Vehicle,
    pub start: LatLng,
    pub seed: u64,
}

/// A stop the courier intends to visit.
#[derive(Debug, Clone, PartialEq)]
struct PlanStop {
    order_id: String,
    kind: StopKind,
    at: LatLng,
}

/// One offer: its order and when it expires. The server sends an open offer again, unchanged,
/// when the app reconnects. The same order offered anew would come with a new expiry and be a
/// new offer to answer (today's server never offers an order again to a courier that declined
/// it, let it lapse or had it taken back; an app should not depend on that).
#[derive(Debug, Clone, PartialEq)]
struct OfferKey {
    order_id: String,
    expires_at: Option<i64>,
}

fn rand_dur(rng: &mut impl Rng, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        return lo;
    }
    rng.random_range(lo..=hi)
}

struct State {
    rng: StdRng,
    mover: Mover,
    plan: VecDeque<PlanStop>,
    /// Stops already reported, so a late `route` does not send us back.
    done: Vec<(String, StopKind)>,
    dwell_until: Option<Instant>,
    /// Offers waiting for their think time: (when, offer, accept).
    replies: Vec<(Instant, OfferKey, bool)>,
    /// Offers answered lately. A copy of one (sent again on reconnect) gets no second answer.
    answered: VecDeque<OfferKey>,
    last_step: Instant,
    next_loc: Instant,
}

impl State {
    fn new(spec: &CourierSpec) -> Self {
        let now = Instant::now();
        State {
            rng: StdRng::seed_from_u64(spec.seed),
            mover: Mover::new(spec.vehicle, spec.start),
            plan: VecDeque::new(),
            done: Vec::new(),
            dwell_until: None,
            replies: Vec::new(),
            answered: VecDeque::new(),
            last_step: now,
            next_loc: now,
        }
    }

    /// The next offer reply whose think time is over, taken off the list and remembered as
    /// answered. One at a time: replies still due when a send fails wait for the reconnect.
    fn next_due_reply(&mut self, now: Instant) -> Option<(String, bool)> {
        let i = self.replies.iter().position(|(when, _, _)| *when <= now)?;
        let (_, offer, accept) = self.replies.swap_remove(i);
        let order_id = offer.order_id.clone();
        self.answered.push_back(offer);
        if self.answered.len() > 64 {
            self.answered.pop_front();
        }
        Some((order_id, accept))
    }

    fn target_changed(&mut self, bbox: &BBox) {
        if let Some(at) = self.plan.front().map(|s| s.at)
            && self.mover.destination() != Some(at)
        {
            self.mover.go_to(&mut self.rng, at, bbox);
        }
    }

    fn add_stop(&mut self, stop: PlanStop) {
        if self.done.iter().any(|(o, k)| *o == stop.order_id && *k == stop.kind) || self.plan.contains(&stop) {
            return;
        }
        // A pickup goes before its order's drop-off: one made again after a refused report
        // (the drop-off still planned) was queued after it, and the courier went to deliver an
        // order the server still had at its pickup (`invalid_transition`).
        if stop.kind == StopKind::Pickup
            && let Some(i) = self.plan.iter().position(|s| s.order_id == stop.order_id && s.kind == StopKind::Dropoff)
        {
            self.plan.insert(i, stop);
            return;
        }
        self.plan.push_back(stop);
    }
}

/// Runs one courier until `shutdown` (or until reconnecting failed `max_reconnects` times).
pub async fn run_courier(
    server: Server,
    spec: CourierSpec,
    bbox: BBox,
    opts: CourierOptions,
    stats: Arc<SimStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut st = State::new(&spec);
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let path = format!("/v1/ws/courier?token={}", spec.token.for_connect(&spec.id)?);
        let ws = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = connect_ws(&server, &path, None, None, opts.connect_timeout) => r,
        };
        match ws {
            Ok(ws) => {
                failures = 0;
                SimStats::inc(&stats.connected);
                let r = drive(ws, &mut st, &spec, &bbox, &opts, &stats, &shutdown).await;
                stats.connected.fetch_sub(1, Ordering::Relaxed);
                if shutdown.is_cancelled() {
                    break;
                }
                SimStats::inc(&stats.disconnects);
                if let Err(e) = r {
                    tracing::debug!(courier = %spec.id, error = %e, "courier socket ended");
                }
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(courier = %spec.id, error = %e, failures, "courier connect failed");
                if failures >= opts.max_reconnects {
                    anyhow::bail!("courier {} gave up after {failures} failed connects: {e:#}", spec.id);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(reconnect_backoff(failures)) => {}
        }
    }
    Ok(())
}

/// How long a simulated app waits before it reconnects after `failures` failures in a row:
/// 0.5–5 s (couriers and customers' tracking pages alike).
pub(crate) fn reconnect_backoff(failures: u32) -> Duration {
    Duration::from_millis(500 * u64::from(failures.clamp(1, 10)))
}

async fn send(ws: &mut Ws, msg: &CourierMsg) -> anyhow::Result<()> {
    ws.send(Message::Text(serde_json::to_string(msg)?.into())).await?;
    Ok(())
}

async fn drive(
    mut ws: Ws,
    st: &mut State,
    spec: &CourierSpec,
    bbox: &BBox,
    opts: &CourierOptions,
    stats: &SimStats,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    tracing::debug!(courier = %spec.id, "courier connected");
    // First a position, then available: the server knows where we are before it offers work.
    let fix = st.mover.step(&mut st.rng, 0.0);
    send(&mut ws, &loc(fix, st.mover.vehicle)).await?;
    SimStats::inc(&stats.locs_sent);
    send(&mut ws, &CourierMsg::Status { status: CourierStatus::Available }).await?;
    // Parked while disconnected: the next step starts from now. Counted from before the outage
    // it moved the courier the whole outage's distance at once, a jump the server holds as
    // suspect (its position frozen on the console, arrivals late) until it re-anchors.
    st.last_step = Instant::now();
    let mut tick = tokio::time::interval(opts.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = send(&mut ws, &CourierMsg::Status { status: CourierStatus::Offline }).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return Ok(());
            }
            msg = ws.next() => {
                let Some(msg) = msg else { anyhow::bail!("server closed the socket") };
                match msg? {
                    Message::Text(t) => on_server_msg(t.as_str(), &spec.id, st, bbox, opts, stats),
                    Message::Close(f) => anyhow::bail!("server closed: {f:?}"),
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                while let Some((order_id, accept)) = st.next_due_reply(now) {
                    send(&mut ws, &CourierMsg::OfferReply { order_id, accept }).await?;
                }
                let dt = now.duration_since(st.last_step).as_secs_f64();
                st.last_step = now;
                let fix = advance(st, bbox, opts, now, dt, &mut ws, stats).await?;
                if now >= st.next_loc {
                    send(&mut ws, &loc(fix, st.mover.vehicle)).await?;
                    SimStats::inc(&stats.locs_sent);
                    st.next_loc = now + rand_dur(&mut st.rng, opts.loc_every);
                }
            }
        }
    }
}

fn loc(fix: crate::movement::Fix, vehicle: Vehicle) -> CourierMsg {
    let acc = match vehicle {
        Vehicle::Bike => 6.0,
        Vehicle::Car => 8.0,
    };
    CourierMsg::Loc {
        lat: round7(fix.pos.lat),
        lng: round7(fix.pos.lng),
        ts: crate::unix_ms(),
        speed: Some((fix.speed * 10.0).round() / 10.0),
        heading: Some(fix.heading.round()),
        acc: Some(acc),
    }
}

/// Seven decimals: ~1 cm, what phones report; keeps frames short.
fn round7(x: f64) -> f64 {
    (x * 1e7).round() / 1e7
}

/// Moves the courier one tick; handles arrival, dwell and the event it then reports.
async fn advance(
    st: &mut State,
    bbox: &BBox,
    opts: &CourierOptions,
    now: Instant,
    dt: f64,
    ws: &mut Ws,
    stats: &SimStats,
) -> anyhow::Result<crate::movement::Fix> {
    if let Some(until) = st.dwell_until {
        if now < until {
            return Ok(st.mover.step(&mut st.rng, 0.0));
        }
        st.dwell_until = None;
        if let Some(stop) = st.plan.front().cloned() {
            let event = match stop.kind {
                StopKind::Pickup => OrderEventKind::PickedUp,
                StopKind::Dropoff => OrderEventKind::Delivered,
            };
            // Off the plan only once reported: a send that fails leaves it for after the
            // reconnect (taken off first, a lost `picked_up` left the order held for good).
            send(ws, &CourierMsg::OrderEvent { order_id: stop.order_id.clone(), event }).await?;
            st.plan.pop_front();
            SimStats::inc(match stop.kind {
                StopKind::Pickup => &stats.picked_up,
                StopKind::Dropoff => &stats.delivered,
            });
            st.done.push((stop.order_id, stop.kind));
            if st.done.len() > 64 {
                st.done.remove(0);
            }
        }
        st.target_changed(bbox);
    }
    if let Some(stop) = st.plan.front() {
        if distance_m(st.mover.pos, stop.at) <= opts.arrive_radius_m {
            st.dwell_until = Some(now + rand_dur(&mut st.rng, opts.dwell));
            return Ok(st.mover.step(&mut st.rng, 0.0));
        }
        if st.mover.arrived() {
            st.target_changed(bbox);
        }
    } else if st.mover.arrived() {
        // Idle: cruise to somewhere nearby, as couriers do between jobs.
        let to = random_point_near(&mut st.rng, st.mover.pos, 300.0, 1500.0, bbox);
        st.mover.go_to(&mut st.rng, to, bbox);
    }
    Ok(st.mover.step(&mut st.rng, dt))
}

fn on_server_msg(text: &str, me: &str, st: &mut State, bbox: &BBox, opts: &CourierOptions, stats: &SimStats) {
    tracing::trace!(courier = me, frame = text, "server frame");
    let Ok(msg) = serde_json::from_str::<ServerMsg>(text) else {
        tracing::debug!(frame = text, "unparsed server frame");
        return;
    };
    match msg {
        // An offer still open is sent again when the app reconnects: one answer per offer,
        // whether it is still being thought about or already went out (its copy can arrive just
        // after). Each copy drew its own answer, so a reconnect could accept and then decline one
        // offer, or accept it twice. An answer lost with the old socket is not sent again: the
        // offer lapses and goes to another courier.
        ServerMsg::Offer { order_id, expires_at, .. } => {
            let offer = OfferKey { order_id, expires_at };
            if st.replies.iter().any(|(_, o, _)| *o == offer) || st.answered.contains(&offer) {
                return;
            }
            SimStats::inc(&stats.offers);
            let accept = st.rng.random_bool(opts.accept_prob.clamp(0.0, 1.0));
            SimStats::inc(if accept { &stats.accepted } else { &stats.declined });
            let mut delay = rand_dur(&mut st.rng, opts.reply_delay);
            if let Some(exp) = expires_at {
                let left = (exp - crate::unix_ms() - 300).max(0) as u64;
                delay = delay.min(Duration::from_millis(left));
            }
            st.replies.push((Instant::now() + delay, offer, accept));
        }
        ServerMsg::Assigned { order_id, pickup, dropoff, .. } => {
            SimStats::inc(&stats.assigned);
            st.add_stop(PlanStop { order_id: order_id.clone(), kind: StopKind::Pickup, at: LatLng::new(pickup.lat, pickup.lng) });
            st.add_stop(PlanStop { order_id, kind: StopKind::Dropoff, at: LatLng::new(dropoff.lat, dropoff.lng) });
            if st.dwell_until.is_none() {
                st.target_changed(bbox);
            }
        }
        ServerMsg::Route { stops, .. } => {
            // The server's order wins; stops we already reported stay done.
            let dwelling_at = if st.dwell_until.is_some() { st.plan.front().cloned() } else { None };
            st.plan.clear();
            if let Some(d) = dwelling_at {
                st.plan.push_back(d);
            }
            for s in stops {
                st.add_stop(PlanStop { order_id: s.order_id, kind: s.kind, at: LatLng::new(s.lat, s.lng) });
            }
            if st.dwell_until.is_none() {
                st.target_changed(bbox);
            }
        }
        // Closed, or taken from this courier (handed back to dispatch, reassigned to another):
        // its stops leave the plan.
        ServerMsg::OrderUpdate { order_id, state, courier_id, .. } if is_terminal_state(&state) || courier_id.as_deref() != Some(me) => {
            let dwelling_on_it = st.dwell_until.is_some() && st.plan.front().is_some_and(|s| s.order_id == order_id);
            if dwelling_on_it {
                st.dwell_until = None;
            }
            st.plan.retain(|s| s.order_id != order_id);
            st.target_changed(bbox);
        }
        // An order this courier holds, as the server tells it again on connect (`assigned` is
        // not sent again): its stops still to do go into the plan. Without it, a courier that
        // reconnected (a restarted demo, a network switch while `assigned` went out) never
        // finished the order, and its capacity stayed taken for good.
        ServerMsg::OrderUpdate { order_id, state, courier_id, order: Some(o), .. } if courier_id.as_deref() == Some(me) => {
            let stops: &[StopKind] = match state.as_str() {
                "assigned" | "at_pickup" => &[StopKind::Pickup, StopKind::Dropoff],
                "picked_up" | "at_dropoff" => &[StopKind::Dropoff],
                _ => &[],
            };
            // The server's state is the truth: a report it did not apply is made again. One
            // answered `store_unavailable` (the market moving: error frames do not say which
            // message they answer) was taken as done, and its order was held for good: the
            // failover drill saw four such answers in one partition.
            st.done.retain(|(o, k)| !(*o == order_id && stops.contains(k)));
            if stops == [StopKind::Dropoff] {
                // Picked up, whatever this app last knew.
                st.plan.retain(|s| !(s.order_id == order_id && s.kind == StopKind::Pickup));
            }
            for &kind in stops {
                let at = match kind {
                    StopKind::Pickup => o.pickup,
                    StopKind::Dropoff => o.dropoff,
                };
                if let Some(p) = at {
                    st.add_stop(PlanStop { order_id: order_id.clone(), kind, at: LatLng::new(p.lat, p.lng) });
                }
            }
            if st.dwell_until.is_none() {
                st.target_changed(bbox);
            }
        }
        ServerMsg::Error { code, message } => {
            SimStats::inc(&stats.server_errors);
            tracing::debug!(courier = me, %code, %message, "server error frame");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server sends an offer still open again when the app reconnects; the courier answers
    /// it once. (Each copy drew its own answer: the failover drill saw one offer accepted and
    /// then declined, and one accepted twice, the second answer refused with
    /// `invalid_transition`.)
    #[test]
    fn an_offer_sent_again_on_reconnect_is_answered_once() {
        let spec = CourierSpec { id: "c1".into(), token: CourierToken::Fixed("t".into()), vehicle: Vehicle::Bike, start: LatLng::new(52.5, 13.4), seed: 1 };
        let mut st = State::new(&spec);
        let bbox = BBox::from_array([13.3, 52.4, 13.5, 52.6]);
        let (opts, stats) = (CourierOptions { accept_prob: 0.5, ..CourierOptions::default() }, SimStats::default());
        let offer_until = |id: &str, expires: i64| {
            format!(r#"{{"t":"offer","seq":1,"order_id":"{id}","pickup":{{"lat":52.5,"lng":13.4}},"dropoff":{{"lat":52.51,"lng":13.41}},"expires_at":{expires}}}"#)
        };
        let far = crate::unix_ms() + 3_600_000;
        let offer = |id: &str| offer_until(id, far);
        for _ in 0..5 {
            on_server_msg(&offer("o1"), "c1", &mut st, &bbox, &opts, &stats);
        }
        on_server_msg(&offer("o2"), "c1", &mut st, &bbox, &opts, &stats);
        let ids: Vec<&str> = st.replies.iter().map(|(_, o, _)| o.order_id.as_str()).collect();
        assert_eq!(ids, ["o1", "o2"]);
        assert_eq!(SimStats::get(&stats.offers), 2);
        // Answered (the reply went out), a copy arriving after the answer gets none either.
        let later = Instant::now() + Duration::from_secs(3600);
        let due: Vec<(String, bool)> = std::iter::from_fn(|| st.next_due_reply(later)).collect();
        assert_eq!(due.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["o1", "o2"]);
        assert!(st.replies.is_empty());
        on_server_msg(&offer("o1"), "c1", &mut st, &bbox, &opts, &stats);
        assert!(st.replies.is_empty());
        on_server_msg(&offer("o3"), "c1", &mut st, &bbox, &opts, &stats);
        assert_eq!(st.replies.len(), 1);
        // The same order offered anew: a new expiry, a new offer, answered again.
        on_server_msg(&offer_until("o1", far + 60_000), "c1", &mut st, &bbox, &opts, &stats);
        let ids: Vec<&str> = st.replies.iter().map(|(_, o, _)| o.order_id.as_str()).collect();
        assert_eq!(ids, ["o3", "o1"]);
        assert_eq!(SimStats::get(&stats.offers), 4);
    }

    /// A report the server did not apply (its answer lost, or an error frame that does not
    /// say which message it answers) is made again when the server says where the order is.
    #[test]
    fn a_report_the_server_did_not_apply_is_made_again() {
        let spec = CourierSpec { id: "c1".into(), token: CourierToken::Fixed("t".into()), vehicle: Vehicle::Bike, start: LatLng::new(52.5, 13.4), seed: 1 };
        let mut st = State::new(&spec);
        let bbox = BBox::from_array([13.3, 52.4, 13.5, 52.6]);
        let (opts, stats) = (CourierOptions::default(), SimStats::default());
        // The app reported the pickup of o1 (so it is done here, and the drop-off is next), but
        // the server still has the order at the pickup.
        st.done.push(("o1".into(), StopKind::Pickup));
        st.plan.push_back(PlanStop { order_id: "o1".into(), kind: StopKind::Dropoff, at: LatLng::new(52.51, 13.41) });
        let update = |state: &str| {
            format!(r#"{{"t":"order_update","seq":3,"order_id":"o1","state":"{state}","courier_id":"c1","order":{{"pickup":{{"lat":52.5,"lng":13.4}},"dropoff":{{"lat":52.51,"lng":13.41}}}}}}"#)
        };
        on_server_msg(&update("at_pickup"), "c1", &mut st, &bbox, &opts, &stats);
        let plan: Vec<(&str, StopKind)> = st.plan.iter().map(|s| (s.order_id.as_str(), s.kind)).collect();
        assert_eq!(plan, [("o1", StopKind::Pickup), ("o1", StopKind::Dropoff)]);
        assert!(st.done.is_empty());
        // Once the server has it picked up, the pickup is not made again.
        on_server_msg(&update("picked_up"), "c1", &mut st, &bbox, &opts, &stats);
        let plan: Vec<(&str, StopKind)> = st.plan.iter().map(|s| (s.order_id.as_str(), s.kind)).collect();
        assert_eq!(plan, [("o1", StopKind::Dropoff)]);
    }
}
