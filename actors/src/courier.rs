//! The courier actor: one per courier. Owns the courier's live state (position, speed, heading,
//! status, bounded trail, orders it holds), filters impossible jumps, keeps late fixes out of
//! the live position, updates the fleet index, detects arrival at its next stop and tells
//! watchers where it is.
//!
//! GPS fixes do not travel through the actor's mailbox one by one. The connection pushes them
//! into the courier's [`FixInbox`] (bounded; when full the oldest pending fix is dropped and
//! counted: positions may be conflated) and the actor is woken by at most one `Drain` message
//! at a time. Control messages (status, orders) use the mailbox and are never dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hexfleet_geo::{CourierEntry, CourierKey, haversine_m};
use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::domain::{Actor as Who, CourierRecord, CourierStatus, Fix, LatLng, Ms, Order, OrderId, OrderState};
use crate::fleet::FleetCtx;
use crate::order::Command;
use crate::positions::TenantIndex;
use crate::publish::{CourierNotice, Update};

/// Fixes waiting for the actor. Two fit inline: a steady stream (one fix per wake-up) then
/// never allocates. A `Vec` here was allocated by the connection's thread and freed by the
/// actor's for every fix, which cost about 10 % of server CPU at 60k updates/s; two reused
/// buffers instead cost 1.3 KiB per courier (BENCHMARKS.md).
type Pending = smallvec::SmallVec<[Fix; 2]>;

/// Pending fixes of one courier, shared by its connections and its actor; survives restarts.
pub struct FixInbox {
    pending: Mutex<Pending>,
    scheduled: AtomicBool,
    capacity: usize,
}

impl FixInbox {
    pub fn new(capacity: usize) -> Self {
        FixInbox { pending: Mutex::new(Pending::new()), scheduled: AtomicBool::new(false), capacity }
    }

    /// Adds fixes; returns true when the caller must wake the actor with `Drain`.
    pub fn push(&self, fixes: impl IntoIterator<Item = Fix>) -> bool {
        let mut p = self.pending.lock();
        for f in fixes {
            if p.len() >= self.capacity {
                p.remove(0);
                metrics::counter!("hexfleet_fixes_conflated_total").increment(1);
            }
            p.push(f);
        }
        drop(p);
        !self.scheduled.swap(true, Ordering::AcqRel)
    }

    fn take(&self) -> Pending {
        let mut p = self.pending.lock();
        self.scheduled.store(false, Ordering::Release);
        std::mem::take(&mut *p)
    }

    /// The wake-up could not be sent (the actor had stopped): the next push must try again,
    /// or a successor that started before this push would never be woken.
    pub(crate) fn unschedule(&self) {
        self.scheduled.store(false, Ordering::Release);
    }

    /// After a restart the pending wake-up died with the old mailbox.
    pub(crate) fn reset_schedule(&self) -> bool {
        self.scheduled.store(false, Ordering::Release);
        !self.pending.lock().is_empty() && !self.scheduled.swap(true, Ordering::AcqRel)
    }
}

/// What outlives a courier actor: its inbox and the latest state it published (reads and
/// supervised restarts use it without calling the actor).
pub struct CourierShared {
    pub inbox: FixInbox,
    pub record: Mutex<CourierRecord>,
    pub held: Mutex<Vec<Arc<Order>>>,
    /// Orders offered to it and not answered yet (kept by the order actors), sent again to an
    /// app that reconnects ([`crate::Fleet::courier_offers`]).
    pub offers: Mutex<Vec<Arc<Order>>>,
    pub key: CourierKey,
    /// When its last fix reached the server (server clock, ms): dispatch passes over a courier
    /// not heard from for `FleetConfig::courier_stale_ms`.
    pub heard_at: std::sync::atomic::AtomicI64,
    /// Geofence tracker and supply bookkeeping (`zone.rs`); only the actor locks it.
    pub zones: Mutex<crate::zone::CourierZones>,
}

/// How long an arrival reported to an order that has not moved on since is left before it is
/// reported again (on the next fix inside the radius).
pub const ARRIVAL_RESEND_MS: Ms = 10_000;

/// A courier inside a held order's pickup or drop-off for this long (fix time) has arrived
/// there even when it is not the next stop of its route (it chose another order first). The
/// next stop needs no wait.
pub const ARRIVAL_DWELL_MS: Ms = 60_000;

/// Messages of the courier actor.
pub enum CourierMsg {
    /// Process the fixes waiting in the inbox.
    Drain,
    /// Change status (available/offline).
    SetStatus(CourierStatus),
    /// Replace the profile (name, vehicle, capacity, device, shift).
    SetProfile(CourierRecord),
    /// An order this courier holds (or held) changed.
    OrderChanged(Arc<Order>),
    /// Read the trail (oldest first).
    Trail(RpcReplyPort<Vec<Fix>>),
    /// A zone was deleted: close the courier's stay in it.
    FenceRemoved { fence: hexfleet_geo::fence::FenceId, at: Ms },
    /// Test hook: make the actor panic (supervision tests).
    Crash,
}

/// The courier actor.
pub struct CourierActor;

pub struct CourierArgs {
    pub ctx: Arc<FleetCtx>,
    pub shared: Arc<CourierShared>,
}

pub struct CourierState {
    ctx: Arc<FleetCtx>,
    shared: Arc<CourierShared>,
    index: Arc<TenantIndex>,
    rec: CourierRecord,
    trail: VecDeque<TrailFix>,
    held: HashMap<OrderId, Arc<Order>>,
    /// Arrival commands sent, by order and the state it was in, with when (server clock): one
    /// arrival is reported once, and again after [`ARRIVAL_RESEND_MS`] while the order has not
    /// moved on and the courier is still there (the command failed: a store outage, the order's
    /// actor restarting). Forgotten when the order changes state.
    arrivals_sent: HashMap<(OrderId, OrderState), Ms>,
    /// Since when (fix time) the courier has been inside a held order's next fence (pickup or
    /// drop-off, by the state it was in) without interruption ([`ARRIVAL_DWELL_MS`]).
    inside_since: HashMap<(OrderId, OrderState), Ms>,
    /// Consecutive fixes rejected as impossible jumps; re-anchors after a consistent run.
    suspects: Vec<Fix>,
    last_snapshot: Ms,
    last_history: Option<Fix>,
    /// The stop order last sent to the app ([`CourierState::send_route`]): tracking ETAs
    /// follow it.
    route: Vec<crate::publish::RouteStop>,
}

impl Actor for CourierActor {
    type Msg = CourierMsg;
    type State = CourierState;
    type Arguments = CourierArgs;

    async fn pre_start(&self, me: ActorRef<CourierMsg>, args: CourierArgs) -> Result<CourierState, ActorProcessingErr> {
        let rec = args.shared.record.lock().clone();
        let held: HashMap<OrderId, Arc<Order>> =
            args.shared.held.lock().iter().map(|o| (o.id.clone(), o.clone())).collect();
        let index = args.ctx.positions.tenant(&rec.tenant);
        let st = CourierState {
            ctx: args.ctx,
            index,
            trail: rec.last_fix.map(TrailFix::from).into_iter().collect(),
            rec,
            held,
            arrivals_sent: HashMap::new(),
            inside_since: HashMap::new(),
            suspects: Vec::new(),
            last_snapshot: 0,
            last_history: None,
            route: Vec::new(),
            shared: args.shared,
        };
        st.update_index();
        st.shared.zones.lock().sync(&st.ctx, &st.rec);
        if st.shared.inbox.reset_schedule() {
            let _ = me.cast(CourierMsg::Drain);
        }
        Ok(st)
    }

    async fn handle(&self, _me: ActorRef<CourierMsg>, msg: CourierMsg, st: &mut CourierState) -> Result<(), ActorProcessingErr> {
        match msg {
            CourierMsg::Drain => {
                let mut fixes = st.shared.inbox.take();
                if !fixes.is_empty() {
                    // Heard, even if every fix is late or suspect: the app is alive.
                    st.shared.heard_at.store(st.ctx.clock.now_ms(), std::sync::atomic::Ordering::Relaxed);
                    st.index.count_fixes(fixes.len() as u64);
                }
                fixes.sort_by_key(|f| f.ts);
                st.on_fixes(&fixes);
            }
            CourierMsg::SetStatus(s) => {
                st.rec.status = s;
                // Never behind the stored row, whatever this node's clock says (a node whose
                // clock is behind the previous owner's would have its writes ignored).
                st.rec.updated_at = st.rec.updated_at.max(st.ctx.clock.now_ms());
                st.publish_record();
                st.update_index();
                st.shared.zones.lock().sync(&st.ctx, &st.rec);
                st.ctx.publisher.publish(Update::CourierStatus {
                    tenant: st.rec.tenant.clone(),
                    courier: st.rec.id.clone(),
                    status: s,
                    last_fix: st.rec.last_fix,
                });
            }
            CourierMsg::SetProfile(p) => {
                st.rec.set_profile(&p);
                // Newer than both its own last snapshot and the profile's row: the store keeps
                // the newest. A snapshot stamped after the profile (a fix during its commit)
                // may have replaced that row; going back to the profile's time would have this
                // one refused too, and the profile would not be stored until the next fix.
                st.rec.updated_at = st.ctx.clock.now_ms().max(st.rec.updated_at.max(p.updated_at) + 1);
                st.publish_record();
                st.update_index();
                st.shared.zones.lock().sync(&st.ctx, &st.rec);
            }
            CourierMsg::OrderChanged(o) => st.on_order(o),
            CourierMsg::Trail(reply) => {
                let _ = reply.send(st.trail.iter().map(|f| f.fix()).collect());
            }
            CourierMsg::FenceRemoved { fence, at } => st.shared.zones.lock().on_fence_removed(&st.ctx, &st.rec, fence, at),
            CourierMsg::Crash => panic!("injected crash in courier actor {}", st.rec.id),
        }
        Ok(())
    }
}

impl CourierState {
    fn on_fixes(&mut self, fixes: &[Fix]) {
        let ctx = self.ctx.clone();
        let cfg = &ctx.config;
        let mut moved = false;
        for &fix in fixes {
            ctx.fixes_total.increment(1);
            let Some(last) = self.rec.last_fix else {
                self.accept(fix);
                moved = true;
                continue;
            };
            if fix.ts <= last.ts {
                // Late fix: into the trail in time order, the live position stays.
                metrics::counter!("hexfleet_fixes_late_total").increment(1);
                let at = self.trail.partition_point(|f| f.ts <= fix.ts);
                self.trail.insert(at, TrailFix::from(fix));
                self.trim_trail();
                continue;
            }
            let dt_s = (fix.ts - last.ts) as f64 / 1000.0;
            let speed = haversine_m(last.pos, fix.pos) / dt_s;
            if speed > cfg.max_speed_mps {
                metrics::counter!("hexfleet_fixes_suspect_total").increment(1);
                tracing::debug!(courier = %self.rec.id, speed, "impossible jump flagged as suspect");
                // A run of fixes that agree with each other but not with the old anchor means the
                // anchor was wrong (or the device was off while moving): re-anchor.
                let consistent = self.suspects.last().is_none_or(|p| {
                    let dt = ((fix.ts - p.ts) as f64 / 1000.0).max(0.001);
                    haversine_m(p.pos, fix.pos) / dt <= cfg.max_speed_mps
                });
                if !consistent {
                    self.suspects.clear();
                }
                self.suspects.push(fix);
                if self.suspects.len() >= cfg.reanchor_after {
                    for f in std::mem::take(&mut self.suspects) {
                        self.accept(f);
                    }
                    moved = true;
                }
                continue;
            }
            self.suspects.clear();
            self.accept(fix);
            moved = true;
        }
        if moved {
            self.after_move();
        }
    }

    fn accept(&mut self, fix: Fix) {
        self.rec.last_fix = Some(fix);
        // The record's version time is the server's clock, not the device's: a phone whose clock
        // is behind must not make its snapshot look older than the stored one.
        self.rec.updated_at = self.rec.updated_at.max(self.ctx.clock.now_ms());
        // Location history: every accepted fix is a candidate (batches and replays included),
        // downsampled to one per `history_every_ms` or per 100 m.
        let keep = self.last_history.is_none_or(|h| {
            fix.ts - h.ts >= self.ctx.config.history_every_ms || haversine_m(h.pos, fix.pos) >= 100.0
        });
        if keep {
            if let Some(h) = self.last_history
                && self.ctx.config.learn_speeds
            {
                // Consecutive history samples (about 10 s or 100 m apart) are what the speed
                // model learns from; the model drops pairs that are too short, long or fast.
                self.ctx.speeds.observe(crate::speeds::SpeedSample {
                    tenant: self.rec.tenant.clone(),
                    vehicle: self.rec.vehicle,
                    from: h.pos,
                    from_ms: h.ts,
                    to: fix.pos,
                    to_ms: fix.ts,
                });
            }
            self.last_history = Some(fix);
            let sample = crate::domain::LocationSample { pos: fix.pos, ts: fix.ts, speed: fix.speed };
            if let Err(e) = self.ctx.store.record_locations(&self.rec.tenant, &self.rec.id, vec![sample]) {
                tracing::debug!(courier = %self.rec.id, error = %e, "location history not queued");
            }
        }
        self.shared.zones.lock().on_fix(&self.ctx, &self.rec, fix);
        // Every accepted fix, not the last of a batch only: an app back online flushes minutes
        // spent at a pickup and the drive away in one `locs` message.
        self.check_arrivals(fix);
        self.trail.push_back(TrailFix::from(fix));
        self.trim_trail();
    }

    fn trim_trail(&mut self) {
        while self.trail.len() > self.ctx.config.trail_len {
            self.trail.pop_front();
        }
    }

    fn after_move(&mut self) {
        let Some(fix) = self.rec.last_fix else { return };
        self.update_index();
        self.shared.zones.lock().sync(&self.ctx, &self.rec);
        let tracking = self.tracking_etas(fix.pos);
        // The record first: a tracking snapshot numbered after this position was queued reads
        // the record, and drops the queued copy (`Broker::track_snapshot_seq`).
        *self.shared.record.lock() = self.rec.clone();
        self.ctx.publisher.publish(Update::CourierMoved {
            tenant: self.rec.tenant.clone(),
            courier: self.rec.id.clone(),
            fix,
            status: self.rec.status,
            tracking,
        });
        let now = self.ctx.clock.now_ms();
        if now - self.last_snapshot >= self.ctx.config.snapshot_every_ms {
            self.last_snapshot = now;
            if let Err(e) = self.ctx.store.snapshot_couriers(vec![self.rec.clone()]) {
                tracing::debug!(courier = %self.rec.id, error = %e, "courier snapshot not queued");
            }
        }
    }

    /// Seconds until each held order's next stop (its pickup, or its drop-off once on board),
    /// along the stop order last sent to the app: the stops before it, and their service
    /// times, count. A customer whose drop-off comes after another's sees the wait for both.
    fn tracking_etas(&self, from: LatLng) -> Vec<(OrderId, Option<f64>)> {
        if self.held.is_empty() {
            return Vec::new();
        }
        let planner = self.ctx.planner(&self.rec.tenant, self.rec.vehicle, self.ctx.clock.now_ms());
        let cfg = &self.ctx.config;
        let mut out: Vec<(OrderId, Option<f64>)> = Vec::with_capacity(self.held.len());
        let (mut at, mut t) = (from, 0.0);
        for stop in &self.route {
            let Some(o) = self.held.get(&stop.order) else { continue };
            if stop.pickup && o.state.is_on_board() {
                continue;
            }
            t += planner.travel_s(at, stop.pos);
            if !out.iter().any(|(id, _)| *id == stop.order) {
                out.push((stop.order.clone(), Some(t)));
            }
            t += if stop.pickup { cfg.pickup_service_s } else { cfg.dropoff_service_s };
            at = stop.pos;
        }
        // Not on the route (it is re-planned on every change of what is held): direct.
        let off_route: Vec<&Arc<Order>> = self.held.values().filter(|o| !out.iter().any(|(id, _)| *id == o.id)).collect();
        for o in off_route {
            let target = if o.state.is_on_board() { o.dropoff } else { o.pickup };
            out.push((o.id.clone(), Some(planner.travel_s(from, target))));
        }
        out
    }

    /// Arrival at a held order's pickup (`assigned`) or drop-off (`picked_up`): within
    /// `arrival_radius_m` of the route's next stop (or a stop at the same place), or of any of
    /// them for [`ARRIVAL_DWELL_MS`]. Any held stop at once used to count: a courier driving
    /// past another order's drop-off on its way marked that order `at_dropoff` for good (the
    /// state does not go back), and its customer was told.
    fn check_arrivals(&mut self, fix: Fix) {
        // Called for every accepted fix: with nothing held (most couriers, most of the time)
        // not even the clock is read.
        if self.held.is_empty() {
            return;
        }
        let radius = self.ctx.config.arrival_radius_m;
        let now = self.ctx.clock.now_ms();
        let heading_to = |o: &Order, pickup: bool| if pickup { o.state == OrderState::Assigned } else { o.state == OrderState::PickedUp };
        // No route yet (or none of its stops pending): every held stop counts as next.
        let next = self.route.iter().find(|s| self.held.get(&s.order).is_some_and(|o| heading_to(o, s.pickup))).map(|s| s.pos);
        for o in self.held.values() {
            let (target, cmd) = match o.state {
                OrderState::Assigned => (o.pickup, Command::ArrivedPickup { courier: self.rec.id.clone() }),
                OrderState::PickedUp => (o.dropoff, Command::ArrivedDropoff { courier: self.rec.id.clone() }),
                _ => continue,
            };
            let key = (o.id.clone(), o.state);
            if haversine_m(fix.pos, target) > radius {
                self.inside_since.remove(&key);
                continue;
            }
            let since = *self.inside_since.entry(key.clone()).or_insert(fix.ts);
            let is_next = next.is_none_or(|p| haversine_m(p, target) <= radius);
            if !is_next && fix.ts.saturating_sub(since) < ARRIVAL_DWELL_MS {
                continue;
            }
            if self.arrivals_sent.get(&key).is_none_or(|&at| now - at >= ARRIVAL_RESEND_MS) {
                self.arrivals_sent.insert(key, now);
                self.ctx.order_command(&o.tenant, &o.id, cmd, Who::System);
            }
        }
    }

    fn on_order(&mut self, o: Arc<Order>) {
        let mine = o.courier.as_ref() == Some(&self.rec.id) && o.state.is_held();
        let changed = if mine {
            // An arrival reported in a state the order has left is reported again if it comes
            // back to it (an override back to `assigned` while the courier waits at the pickup).
            self.arrivals_sent.retain(|(id, state), _| *id != o.id || *state == o.state);
            self.inside_since.retain(|(id, state), _| *id != o.id || *state == o.state);
            self.held.insert(o.id.clone(), o.clone()).is_none_or(|prev| prev.state != o.state)
        } else {
            self.arrivals_sent.retain(|(id, _), _| *id != o.id);
            self.inside_since.retain(|(id, _), _| *id != o.id);
            self.held.remove(&o.id).is_some()
        };
        *self.shared.held.lock() = self.held.values().cloned().collect();
        if o.courier.as_ref() == Some(&self.rec.id) || !mine {
            self.ctx.publisher.publish(Update::ToCourier {
                tenant: self.rec.tenant.clone(),
                courier: self.rec.id.clone(),
                notice: CourierNotice::OrderUpdate(o.clone()),
            });
        }
        if changed {
            self.update_index();
            self.send_route();
            // Already inside the fence when the order arrives or changes state.
            if let Some(f) = self.rec.last_fix {
                self.check_arrivals(f);
            }
        }
    }

    /// Spare capacity in size units.
    fn spare(&self) -> u16 {
        let used: u16 = self.held.values().map(|o| o.size).sum();
        self.rec.capacity.saturating_sub(used)
    }

    fn update_index(&self) {
        let key = self.shared.key;
        let Some(fix) = self.rec.last_fix else { return };
        self.index.upsert(CourierEntry {
            key,
            pos: fix.pos,
            available: self.rec.status == CourierStatus::Available && self.rec.on_shift,
            spare_capacity: self.spare(),
            vehicle: self.rec.vehicle.code(),
        });
    }

    fn publish_record(&self) {
        *self.shared.record.lock() = self.rec.clone();
        if let Err(e) = self.ctx.store.snapshot_couriers(vec![self.rec.clone()]) {
            tracing::debug!(courier = %self.rec.id, error = %e, "courier snapshot not queued");
        }
    }

    /// The stop order for the orders held, sent to the device.
    fn send_route(&mut self) {
        let start = self.rec.last_fix.map(|f| f.pos);
        let orders: Vec<&Order> = self.held.values().map(|o| o.as_ref()).collect();
        let now = self.ctx.clock.now_ms();
        let planner = self.ctx.planner(&self.rec.tenant, self.rec.vehicle, now);
        let plan = || start.and_then(|s| planner.plan(s, now, self.rec.capacity, &orders));
        // Beyond a few orders the heuristic takes milliseconds (up to its budget, about 75 ms
        // at 50 orders on the reference host): off the async worker, whose other tasks (GPS
        // sessions) move to another thread meanwhile.
        let large = orders.len() * 2 > hexfleet_geo::stops::EXACT_MAX_STOPS;
        let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let planned = if large && multi_thread { tokio::task::block_in_place(plan) } else { plan() };
        let stops = match planned {
            Some(p) => p.stops,
            // No position yet, or held beyond capacity by an override: nearest feasible next.
            None => crate::routing::nearest_first(start, orders.into_iter()),
        };
        self.route.clone_from(&stops);
        self.ctx.publisher.publish(Update::ToCourier {
            tenant: self.rec.tenant.clone(),
            courier: self.rec.id.clone(),
            notice: CourierNotice::Route { stops },
        });
    }
}


/// A trail entry: a [`Fix`] in 24 bytes instead of 48 (the trail is most of a courier's memory).
/// Coordinates in 1e-7 degrees (about 1 cm), speed in cm/s (to 655 m/s), heading in
/// centidegrees, accuracy in decimetres (to 6.5 km); `u16::MAX` means absent.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TrailFix {
    ts: Ms,
    lat_e7: i32,
    lng_e7: i32,
    speed_cm_s: u16,
    heading_cdeg: u16,
    acc_dm: u16,
}

const ABSENT: u16 = u16::MAX;

fn pack(v: Option<f32>, scale: f32) -> u16 {
    // Finite and non-negative on entry (validated at the edge); clamp keeps it so anyway.
    v.map_or(ABSENT, |v| (v * scale).round().clamp(0.0, f32::from(ABSENT - 1)) as u16)
}

fn unpack(v: u16, scale: f32) -> Option<f32> {
    (v != ABSENT).then(|| f32::from(v) / scale)
}

impl From<Fix> for TrailFix {
    fn from(f: Fix) -> Self {
        TrailFix {
            ts: f.ts,
            lat_e7: (f.pos.lat * 1e7).round() as i32,
            lng_e7: (f.pos.lng * 1e7).round() as i32,
            speed_cm_s: pack(f.speed, 100.0),
            heading_cdeg: pack(f.heading, 100.0),
            acc_dm: pack(f.acc, 10.0),
        }
    }
}

impl TrailFix {
    fn fix(&self) -> Fix {
        let pos = LatLng::new(f64::from(self.lat_e7) / 1e7, f64::from(self.lng_e7) / 1e7).expect("packed from a valid position");
        Fix { pos, ts: self.ts, speed: unpack(self.speed_cm_s, 100.0), heading: unpack(self.heading_cdeg, 100.0), acc: unpack(self.acc_dm, 10.0) }
    }
}

#[cfg(test)]
mod trail_tests {
    use super::*;

    #[test]
    fn trail_fix_is_small_and_round_trips_within_a_centimetre() {
        assert_eq!(std::mem::size_of::<TrailFix>(), 24);
        for (lat, lng) in [(45.5017, -73.5673), (-89.9999999, 179.9999999), (90.0, -180.0), (0.0, 0.0)] {
            let f = Fix { pos: LatLng::new(lat, lng).unwrap(), ts: 1_700_000_000_123, speed: Some(13.37), heading: Some(359.99), acc: None };
            let g = TrailFix::from(f).fix();
            assert!((g.pos.lat - lat).abs() <= 0.6e-7 && (g.pos.lng - lng).abs() <= 0.6e-7, "{g:?}");
            assert_eq!(g.ts, f.ts);
            assert!((g.speed.unwrap() - 13.37).abs() < 0.006);
            assert!((g.heading.unwrap() - 359.99).abs() < 0.006);
            assert_eq!(g.acc, None);
        }
        // Out of the packed range: clamped, not wrapped.
        let f = Fix { pos: LatLng::new(1.0, 1.0).unwrap(), ts: 0, speed: Some(1e6), heading: None, acc: Some(1e9) };
        let g = TrailFix::from(f).fix();
        assert!(g.speed.unwrap() > 600.0 && g.acc.unwrap() > 6_000.0);
    }
}
