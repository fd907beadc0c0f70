//! The fleet: the supervision tree, the shared context every actor sees, and [`Fleet`], the
//! handle the gateway calls.
//!
//! ```text
//! FleetSupervisor ─┬─ CourierActor × couriers     (restarted from their last published state)
//!                  ├─ OrderActor × open orders    (restarted from their last durable snapshot)
//!                  ├─ Dispatcher × markets        (restarted; rebuilds its view from the orders)
//!                  └─ AreaActor × zones and dispatch cells (restarted from their counts; zone.rs)
//! ```

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use hexfleet_geo::LatLng;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::clock::SharedClock;
use crate::courier::{CourierActor, CourierArgs, CourierMsg, CourierShared, FixInbox};
use crate::dispatch::{DispatchMsg, Dispatcher, DispatcherArgs};
use crate::domain::{
    Actor as Who, CourierId, CourierRecord, CourierStatus, DomainEvent, EntityKind, Fix, Ms, Order, OrderId,
    OrderState, TenantId, Vehicle, ZoneId, ZoneRecord,
};
use crate::error::FleetError;
use crate::order::{Command, OrderActor, OrderArgs, OrderMsg};
use crate::positions::Positions;
use crate::routing::RoutePlanner;
use crate::publish::Publisher;
use crate::store::{Store, Write};

/// An order id reserved in [`FleetCtx::creating`] while its creation runs.
struct Creating<'a> {
    set: &'a dashmap::DashSet<(TenantId, OrderId)>,
    key: (TenantId, OrderId),
}

impl<'a> Creating<'a> {
    fn reserve(set: &'a dashmap::DashSet<(TenantId, OrderId)>, key: (TenantId, OrderId)) -> Option<Self> {
        set.insert(key.clone()).then_some(Creating { set, key })
    }
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.set.remove(&self.key);
    }
}

/// How far from now an order's `ready_at` or `deliver_by` may lie (30 days).
pub const MAX_ORDER_TIME_SKEW_MS: u64 = 30 * 24 * 3600 * 1000;

/// Tunables of the fleet.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// A fix implying more than this speed from the last one is suspect.
    pub max_speed_mps: f64,
    /// Consecutive mutually consistent suspect fixes that re-anchor the position.
    pub reanchor_after: usize,
    /// Fixes kept in the in-memory trail (`Fleet::trail`, `GET /v1/couriers/{id}/trail`): 24
    /// bytes each, per courier.
    pub trail_len: usize,
    /// Pending fixes per courier before the oldest is conflated away.
    pub inbox_capacity: usize,
    /// How often a moving courier's snapshot is queued for storage: what a crash may lose of
    /// a courier's live position (orders are durable through the event log, not this). At
    /// 1 s the SQLite writer took 17 % of server CPU at 20k updates/s; see BENCHMARKS.md.
    pub snapshot_every_ms: Ms,
    /// Minimum spacing of location-history samples (or 100 m).
    pub history_every_ms: Ms,
    /// Road distance ÷ great-circle distance.
    pub detour_factor: f64,
    /// Entering this radius around a pickup or drop-off counts as arrival.
    pub arrival_radius_m: f64,
    /// Dispatch tick.
    pub dispatch_tick: Duration,
    /// How long a courier has to answer an offer.
    pub offer_timeout_ms: Ms,
    /// A courier whose last fix reached the server longer ago than this is not offered or
    /// assigned orders, whatever its status says. An app that died, or lost signal, without
    /// going offline would otherwise keep taking orders at its last position (and, with
    /// auto-accept, hold them with no one driving).
    pub courier_stale_ms: Ms,
    /// Orders not yet picked up are taken back from a courier silent (no fix reaching the
    /// server) for this long and dispatched again; `None`: never, dispatchers decide (they
    /// are told with `courier.silent`).
    pub release_silent_after_ms: Option<Ms>,
    /// Orders nobody took within this time expire.
    pub order_expiry_ms: Ms,
    /// Assign without asking the courier, for every fleet (tenant) on this node.
    pub auto_accept: bool,
    /// Fleets (tenants) whose couriers are assigned without being asked, when `auto_accept`
    /// is off for the node.
    pub auto_accept_tenants: Vec<String>,
    /// Candidate couriers considered per order.
    pub candidates_per_order: usize,
    /// Couriers farther than this from a pickup are not candidates.
    pub max_pickup_distance_m: f64,
    /// How the dispatcher matches orders to couriers.
    pub dispatch_policy: DispatchPolicy,
    /// Seconds a courier spends at a pickup (route planning).
    pub pickup_service_s: f64,
    /// Seconds a courier spends at a drop-off (route planning).
    pub dropoff_service_s: f64,
    /// Cost of one second of lateness against `deliver_by`, in seconds of route time.
    pub lateness_weight: f64,
    /// Cost of leaving an order unassigned for a tick: a pair costing more waits.
    pub unassigned_cost_s: f64,
    /// Batching: the most a new order may delay the drop-off of an order already held.
    pub batch_max_delay_s: f64,
    /// Fleet index rebuild period: the most a read of the index may lag the live positions
    /// (plus one rebuild). Rebuilds follow reads; see `positions.rs`.
    pub index_rebuild: Duration,
    /// How long callers wait for an actor's answer; for an order command, how long it may
    /// wait to start (it is not applied after that).
    pub call_timeout: Duration,
    /// How long a caller waits, beyond `call_timeout`, for an order command the actor has
    /// started: at least the store's bound on a commit. The SQL store's is its queue wait (a
    /// commit not started by then is not written, 4 s) plus three statement timeouts (the
    /// group's attempt, the request's own when the group was refused, the resolution of an
    /// unanswered COMMIT): 19 s by default.
    pub commit_wait: Duration,
    /// H3 resolution of the dispatch cells that count supply and demand (7: ~5 km²).
    pub dispatch_res: u8,
    /// Geofence hysteresis and dwell.
    pub fence_tracker: hexfleet_geo::fence::TrackerConfig,
    /// Learn travel speeds from the fleet's movement and use them for ETAs and dispatch
    /// (`speeds.rs`); off, every vehicle travels at its prior speed.
    pub learn_speeds: bool,
    /// How often newly learned speeds become visible to ETAs and dispatch.
    pub speed_publish: Duration,
    /// With several nodes: how often this node compares its zones with the store and syncs
    /// any that another node changed without this one hearing of it (Redis notifications are
    /// best effort). `None` (the default, for a single node): never.
    pub zone_resync: Option<Duration>,
    /// How often learned speeds that changed are saved (and at shutdown): what a crash may
    /// lose of them.
    pub speed_save_every: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            max_speed_mps: 70.0,
            reanchor_after: 3,
            trail_len: 32,
            inbox_capacity: 256,
            snapshot_every_ms: 5_000,
            history_every_ms: 10_000,
            detour_factor: 1.3,
            arrival_radius_m: 50.0,
            dispatch_tick: Duration::from_millis(2_000),
            offer_timeout_ms: 20_000,
            courier_stale_ms: 120_000,
            release_silent_after_ms: None,
            order_expiry_ms: 30 * 60_000,
            auto_accept: false,
            auto_accept_tenants: Vec::new(),
            candidates_per_order: 10,
            max_pickup_distance_m: 15_000.0,
            dispatch_policy: DispatchPolicy::Optimal,
            pickup_service_s: 60.0,
            dropoff_service_s: 60.0,
            lateness_weight: 2.0,
            unassigned_cost_s: 3_600.0,
            batch_max_delay_s: 600.0,
            index_rebuild: Duration::from_millis(100),
            call_timeout: Duration::from_secs(5),
            commit_wait: Duration::from_secs(20),
            dispatch_res: 7,
            fence_tracker: hexfleet_geo::fence::TrackerConfig::default(),
            learn_speeds: true,
            speed_publish: Duration::from_secs(10),
            speed_save_every: Duration::from_secs(300),
            zone_resync: None,
        }
    }
}

impl FleetConfig {
    /// Whether the fleet (tenant) assigns without asking its couriers.
    pub fn auto_accepts(&self, tenant: &TenantId) -> bool {
        self.auto_accept || self.auto_accept_tenants.iter().any(|t| t == tenant.as_str())
    }

    /// The route planner for a vehicle under this configuration, at the vehicle's prior speed
    /// (`FleetCtx::planner` adds the learned speeds).
    pub fn planner(&self, vehicle: Vehicle) -> RoutePlanner {
        RoutePlanner {
            detour: self.detour_factor,
            speed_mps: vehicle.prior_speed_mps(),
            speeds: None,
            at_ms: 0,
            memo: None,
            pickup_service_s: self.pickup_service_s,
            dropoff_service_s: self.dropoff_service_s,
            lateness_weight: self.lateness_weight,
        }
    }
}

/// How a dispatch round matches orders to couriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DispatchPolicy {
    /// Minimum total cost over the round (`hexfleet_geo::assign::solve_optimal`).
    #[default]
    Optimal,
    /// Cheapest pair first: the baseline kept for comparison.
    Greedy,
}

impl DispatchPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DispatchPolicy::Optimal => "optimal",
            DispatchPolicy::Greedy => "greedy",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "optimal" => Some(DispatchPolicy::Optimal),
            "greedy" => Some(DispatchPolicy::Greedy),
            _ => None,
        }
    }
}

/// Which entity a supervised actor stands for.
#[derive(Clone, Debug)]
pub(crate) enum Child {
    Courier(TenantId, CourierId),
    Order(TenantId, OrderId),
    Dispatcher(TenantId),
    Area(crate::zone::AreaKey),
}

/// A courier's actor and what outlives it.
#[derive(Clone)]
pub struct CourierHandle {
    pub actor: ActorRef<CourierMsg>,
    pub shared: Arc<CourierShared>,
}

/// A courier's cached [`CourierHandle`] ([`Fleet::courier_tap`]), the one way fixes reach a
/// courier: a socket keeps one for its life, [`Fleet::ingest`] makes one per call. The courier
/// is looked up again only when a wake-up fails: when the cached actor has stopped (a
/// supervised restart), the tap finds its successor and wakes it; it drains the same inbox.
pub struct CourierTap {
    ctx: Arc<FleetCtx>,
    key: (TenantId, CourierId),
    handle: CourierHandle,
}

impl CourierTap {
    /// Hands validated fixes to the courier (hot path; never waits on the actor).
    pub fn ingest(&mut self, fixes: impl IntoIterator<Item = Fix>) -> Result<(), FleetError> {
        if !self.handle.shared.inbox.push(fixes) || self.handle.actor.cast(CourierMsg::Drain).is_ok() {
            return Ok(());
        }
        // The actor stopped. A courier keeps its `CourierShared` (and so its inbox) for the
        // fleet's life: a restart reuses it and `install_courier` never replaces it, so the
        // successor in the map drains the fixes just pushed.
        match self.ctx.couriers.get(&self.key).map(|h| h.clone()) {
            Some(h) if h.actor.cast(CourierMsg::Drain).is_ok() => {
                self.handle = h;
                Ok(())
            }
            // Restarting, and its successor not in the map yet: the next push wakes it.
            _ => {
                self.handle.shared.inbox.unschedule();
                Err(FleetError::ActorGone("courier"))
            }
        }
    }
}

/// The context shared by every actor of the fleet.
pub struct FleetCtx {
    pub store: Arc<dyn Store>,
    pub publisher: Arc<dyn Publisher>,
    pub clock: SharedClock,
    pub config: FleetConfig,
    pub positions: Arc<Positions>,
    pub(crate) couriers: DashMap<(TenantId, CourierId), CourierHandle>,
    pub(crate) orders: DashMap<(TenantId, OrderId), ActorRef<OrderMsg>>,
    /// Latest durable snapshot of every open order (reads and supervised restarts).
    pub(crate) last_orders: DashMap<(TenantId, OrderId), Arc<Order>>,
    /// Order ids being created right now (checked, not yet committed and spawned): a retry
    /// racing its first attempt gets a conflict instead of a second order.
    pub(crate) creating: dashmap::DashSet<(TenantId, OrderId)>,
    pub(crate) devices: DashMap<String, (TenantId, CourierId)>,
    /// Held by a profile change that sets a device id, from the check that the device is free
    /// until the device map is updated: two couriers given the same device at once would both
    /// pass the check otherwise.
    pub(crate) registering_device: tokio::sync::Mutex<()>,
    /// One gate per courier being registered or changed ([`FleetCtx::courier_gate`]).
    courier_gates: DashMap<(TenantId, CourierId), Arc<tokio::sync::Mutex<()>>>,
    /// Capacity units each courier is committed to (orders offered to it or held by it). The
    /// order actors reserve here before an offer or assignment is made durable, so no courier
    /// is ever committed beyond its capacity, whatever the interleaving.
    pub(crate) loads: DashMap<(TenantId, CourierId), u16>,
    pub(crate) dispatchers: DashMap<TenantId, ActorRef<DispatchMsg>>,
    /// Zones, fence sets and area actors (`zone.rs`).
    pub zones: crate::zone::ZoneRegistry,
    pub(crate) children: DashMap<ActorId, Child>,
    supervisor: parking_lot::RwLock<Option<ActorCell>>,
    /// `hexfleet_fixes_total`, registered once: the `counter!` macro looks the key up in the
    /// recorder on every call, which cost 2 % of server CPU per GPS fix.
    pub(crate) fixes_total: metrics::Counter,
    /// Learned travel speeds (`speeds.rs`).
    pub speeds: Arc<crate::speeds::Speeds>,
    /// Markets are taken over one at a time ([`Fleet::adopt_market`]).
    adopting: tokio::sync::Mutex<()>,
    /// Courier actors are spawned one at a time ([`Fleet::install_courier`]).
    installing: tokio::sync::Mutex<()>,
    /// Dispatchers are started one at a time: two first orders of a market at once would
    /// otherwise start two (the orphan ticking on with a frozen view of the orders) as soon as
    /// the dispatcher's `pre_start` awaits anything. Today it does not, so ractor's spawn runs
    /// it without yielding and the race cannot happen yet (a test of it passed without the
    /// lock); the lock keeps it that way.
    starting_dispatchers: tokio::sync::Mutex<()>,
}

impl FleetCtx {
    /// The route planner of a tenant's vehicle type departing at `at_ms`: learned speeds when
    /// there are any (and learning is on), the vehicle's prior speed otherwise.
    pub fn planner(&self, tenant: &TenantId, vehicle: Vehicle, at_ms: Ms) -> RoutePlanner {
        let mut p = self.config.planner(vehicle);
        if self.config.learn_speeds {
            p.speeds = self.speeds.model(tenant, vehicle);
        }
        p.at_ms = at_ms;
        p
    }

    pub(crate) fn supervisor(&self) -> Result<ActorCell, FleetError> {
        self.supervisor.read().clone().ok_or(FleetError::ActorGone("supervisor"))
    }

    /// Casts a command to an order actor without waiting (actors never wait on each other).
    pub(crate) fn order_command(&self, tenant: &TenantId, id: &OrderId, cmd: Command, who: Who) {
        if let Some(a) = self.orders.get(&(tenant.clone(), id.clone())) {
            let _ = a.cast(OrderMsg::Apply { cmd, who, reply: None, start_by: None });
        }
    }

    /// Keeps each courier's open offers ([`CourierShared::offers`]) as an order goes from
    /// `before` (if it changed) to `after`.
    pub(crate) fn note_offer(&self, before: Option<&Order>, after: &Arc<Order>) {
        let offered = |o: &Order| o.offer.as_ref().filter(|_| o.state == OrderState::Offered).map(|x| x.courier.clone());
        let (was, now) = (before.and_then(offered), offered(after));
        for (c, open) in [(was, false), (now, true)] {
            let Some(c) = c else { continue };
            if let Some(h) = self.couriers.get(&(after.tenant.clone(), c)) {
                let mut offers = h.shared.offers.lock();
                offers.retain(|o| o.id != after.id);
                if open {
                    offers.push(after.clone());
                }
            }
        }
    }

    pub(crate) fn courier_order_changed(&self, courier: &CourierId, order: &Arc<Order>) {
        if let Some(h) = self.couriers.get(&(order.tenant.clone(), courier.clone())) {
            let _ = h.actor.cast(CourierMsg::OrderChanged(order.clone()));
        }
    }

    pub(crate) fn dispatch_order_changed(&self, order: &Arc<Order>) {
        if let Some(d) = self.dispatchers.get(&order.tenant) {
            let _ = d.cast(DispatchMsg::OrderChanged(order.clone()));
        }
        self.zones.order_changed(order);
    }

    pub(crate) fn order_closed(&self, order: &Order) {
        let k = (order.tenant.clone(), order.id.clone());
        self.orders.remove(&k);
        self.last_orders.remove(&k);
    }

    /// Commits `size` units of `courier`'s capacity, or says why not.
    pub(crate) fn reserve(&self, tenant: &TenantId, courier: &CourierId, size: u16) -> Result<(), FleetError> {
        let cap = self.courier_record(tenant, courier).ok_or(FleetError::NotFound { what: "courier" })?.capacity;
        let mut load = self.loads.entry((tenant.clone(), courier.clone())).or_insert(0);
        if u32::from(*load) + u32::from(size) > u32::from(cap) {
            return Err(FleetError::Conflict(format!("courier {courier} has no spare capacity ({} of {cap} units committed)", *load)));
        }
        *load += size;
        Ok(())
    }

    /// Releases what [`FleetCtx::reserve`] committed.
    pub(crate) fn release(&self, tenant: &TenantId, courier: &CourierId, size: u16) {
        if let Some(mut load) = self.loads.get_mut(&(tenant.clone(), courier.clone())) {
            *load = load.saturating_sub(size);
        }
    }

    /// Capacity units committed to a courier.
    pub fn load(&self, tenant: &TenantId, courier: &CourierId) -> u16 {
        self.loads.get(&(tenant.clone(), courier.clone())).map_or(0, |l| *l)
    }

    /// The largest capacity of the tenant's couriers (`None` without any). Scans every
    /// courier: called when orders expire, not per round.
    pub(crate) fn largest_capacity(&self, tenant: &TenantId) -> Option<u16> {
        self.couriers.iter().filter(|e| e.key().0 == *tenant).map(|e| e.value().shared.record.lock().capacity).max()
    }

    /// The current snapshot of a courier's record.
    pub fn courier_record(&self, tenant: &TenantId, id: &CourierId) -> Option<CourierRecord> {
        self.couriers.get(&(tenant.clone(), id.clone())).map(|h| h.shared.record.lock().clone())
    }

    /// A courier's record if dispatch may give it work at `now`: its last fix reached this
    /// server within `courier_stale_ms` (status and shift are the caller's to check).
    pub(crate) fn heard_courier(&self, tenant: &TenantId, id: &CourierId, now: Ms) -> Option<CourierRecord> {
        let h = self.couriers.get(&(tenant.clone(), id.clone()))?;
        self.heard_lately(&h.shared, now).then(|| h.shared.record.lock().clone())
    }

    /// Whether a courier's last fix reached this server within `courier_stale_ms` of `now`.
    pub(crate) fn heard(&self, tenant: &TenantId, id: &CourierId, now: Ms) -> bool {
        self.recent(self.heard_at(tenant, id), now)
    }

    /// Whether a last fix read by [`Self::heard_at`] is within `courier_stale_ms` of `now` (a
    /// courier not running here is not heard). One read serves both questions.
    pub(crate) fn recent(&self, heard_at: Option<Ms>, now: Ms) -> bool {
        heard_at.is_some_and(|at| now.saturating_sub(at) <= self.config.courier_stale_ms)
    }

    /// Waits for, then holds, a courier's gate: first registrations and profile changes of one
    /// courier go one at a time. Two first connections would both log `courier.registered`,
    /// two profile changes would each write the record as it was before the other, and a
    /// profile written just before a registration with a later clock reading was refused by the
    /// store (`updated_at`) and replaced by the default one. Gates exist only while used.
    pub(crate) async fn courier_gate(&self, tenant: &TenantId, id: &CourierId) -> CourierGate<'_> {
        let key = (tenant.clone(), id.clone());
        let gate = self.courier_gates.entry(key.clone()).or_default().clone();
        let held = gate.clone().lock_owned().await;
        CourierGate { ctx: self, key, gate, _held: held }
    }

    /// When a courier's last fix reached this server (server clock), if the courier runs here.
    pub(crate) fn heard_at(&self, tenant: &TenantId, id: &CourierId) -> Option<Ms> {
        self.couriers.get(&(tenant.clone(), id.clone())).map(|h| h.shared.heard_at.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn heard_lately(&self, shared: &CourierShared, now: Ms) -> bool {
        self.recent(Some(shared.heard_at.load(std::sync::atomic::Ordering::Relaxed)), now)
    }

    async fn spawn_courier(self: &Arc<Self>, shared: Arc<CourierShared>) -> Result<CourierHandle, FleetError> {
        let (tenant, id) = {
            let r = shared.record.lock();
            (r.tenant.clone(), r.id.clone())
        };
        let sup = self.supervisor()?;
        let (actor, _) = Actor::spawn_linked(None, CourierActor, CourierArgs { ctx: self.clone(), shared: shared.clone() }, sup)
            .await
            .map_err(|_| FleetError::ActorGone("courier"))?;
        self.children.insert(actor.get_id(), Child::Courier(tenant.clone(), id.clone()));
        let h = CourierHandle { actor, shared };
        self.couriers.insert((tenant, id), h.clone());
        Ok(h)
    }

    async fn spawn_order(self: &Arc<Self>, order: Arc<Order>) -> Result<ActorRef<OrderMsg>, FleetError> {
        let sup = self.supervisor()?;
        let k = (order.tenant.clone(), order.id.clone());
        let (actor, _) =
            Actor::spawn_linked(None, OrderActor, OrderArgs { ctx: self.clone(), order: (*order).clone() }, sup)
                .await
                .map_err(|_| FleetError::ActorGone("order"))?;
        self.children.insert(actor.get_id(), Child::Order(k.0.clone(), k.1.clone()));
        self.last_orders.insert(k.clone(), order);
        self.orders.insert(k, actor.clone());
        Ok(actor)
    }

    async fn dispatcher(self: &Arc<Self>, tenant: &TenantId) -> Result<ActorRef<DispatchMsg>, FleetError> {
        if let Some(d) = self.dispatchers.get(tenant) {
            return Ok(d.clone());
        }
        let _one_at_a_time = self.starting_dispatchers.lock().await;
        if let Some(d) = self.dispatchers.get(tenant) {
            return Ok(d.clone());
        }
        self.spawn_dispatcher(tenant.clone()).await
    }

    async fn spawn_dispatcher(self: &Arc<Self>, tenant: TenantId) -> Result<ActorRef<DispatchMsg>, FleetError> {
        let sup = self.supervisor()?;
        let (actor, _) =
            Actor::spawn_linked(None, Dispatcher, DispatcherArgs { ctx: self.clone(), tenant: tenant.clone() }, sup)
                .await
                .map_err(|_| FleetError::ActorGone("dispatcher"))?;
        self.children.insert(actor.get_id(), Child::Dispatcher(tenant.clone()));
        self.dispatchers.insert(tenant, actor.clone());
        Ok(actor)
    }

    /// Open orders of a tenant as last made durable.
    pub(crate) fn open_orders(&self, tenant: &TenantId) -> Vec<Arc<Order>> {
        self.last_orders.iter().filter(|e| e.key().0 == *tenant).map(|e| e.value().clone()).collect()
    }
}

/// A tenant's figures on one node ([`Fleet::tenant_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantStats {
    /// Couriers heard from (a GPS fix received) within `courier_stale_ms`: the ones dispatch
    /// may give work to, if available and on shift.
    pub couriers_online: usize,
    /// Orders not yet closed.
    pub orders_open: usize,
    /// GPS fixes received from the tenant's couriers since the node started.
    pub fixes_received: u64,
}

/// The root of the supervision tree: restarts failed actors from their last state.
struct FleetSupervisor;

impl Actor for FleetSupervisor {
    type Msg = ();
    type State = Arc<FleetCtx>;
    type Arguments = Arc<FleetCtx>;

    async fn pre_start(&self, _me: ActorRef<()>, ctx: Arc<FleetCtx>) -> Result<Arc<FleetCtx>, ActorProcessingErr> {
        Ok(ctx)
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<()>,
        evt: SupervisionEvent,
        ctx: &mut Arc<FleetCtx>,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some((_, child)) = ctx.children.remove(&cell.get_id()) else { return Ok(()) };
                metrics::counter!("hexfleet_actor_restarts_total").increment(1);
                tracing::error!(?child, error = %err, "actor failed; restarting from its last state");
                let res = match &child {
                    Child::Courier(t, id) => match ctx.couriers.get(&(t.clone(), id.clone())).map(|h| h.shared.clone()) {
                        Some(shared) => ctx.spawn_courier(shared).await.map(|_| ()),
                        None => Ok(()),
                    },
                    Child::Order(t, id) => match ctx.last_orders.get(&(t.clone(), id.clone())).map(|o| o.clone()) {
                        Some(o) => ctx.spawn_order(o).await.map(|_| ()),
                        None => Ok(()),
                    },
                    Child::Dispatcher(t) => {
                        let _one_at_a_time = ctx.starting_dispatchers.lock().await;
                        ctx.dispatchers.remove_if(t, |_, d| d.get_id() == cell.get_id());
                        if ctx.dispatchers.contains_key(t) { Ok(()) } else { ctx.spawn_dispatcher(t.clone()).await.map(|_| ()) }
                    }
                    Child::Area(k) => crate::zone::restart_area(ctx, k.clone()).await,
                };
                if let Err(e) = res {
                    tracing::error!(?child, error = %e, "restart failed");
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                ctx.children.remove(&cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }
}

/// A new order as asked for by a client, validated by the edge.
#[derive(Clone, Debug)]
pub struct NewOrder {
    pub id: Option<OrderId>,
    pub pickup: LatLng,
    pub dropoff: LatLng,
    pub size: u16,
    pub ready_at: Option<Ms>,
    pub deliver_by: Option<Ms>,
}

/// Changes to a courier's profile (`None` leaves a field as it is).
#[derive(Clone, Debug, Default)]
pub struct CourierPatch {
    pub name: Option<String>,
    pub vehicle: Option<crate::domain::Vehicle>,
    pub capacity: Option<u16>,
    pub device_id: Option<String>,
    pub on_shift: Option<bool>,
}

/// What a dispatch round would do ([`Fleet::dispatch_preview`]).
#[derive(Clone, Debug)]
pub struct DispatchPreview {
    /// Orders waiting for a courier.
    pub orders: usize,
    /// Distinct candidate couriers.
    pub couriers: usize,
    /// Candidate (order, courier) pairs priced.
    pub pairs: usize,
    pub matched: usize,
    /// Total cost of the matching, seconds.
    pub cost_s: f64,
    /// Proven lower bound on the optimal cost (optimal policy).
    pub lower_bound_s: f64,
    /// Time to build and solve the round.
    pub elapsed: Duration,
}

/// A courier near a point.
#[derive(Clone, Debug)]
pub struct Nearby {
    pub courier: CourierRecord,
    pub distance_m: f64,
}

/// What the fleet needs from the outside.
pub struct FleetDeps {
    pub store: Arc<dyn Store>,
    pub publisher: Arc<dyn Publisher>,
    pub clock: SharedClock,
    pub config: FleetConfig,
}

/// The handle the gateway calls. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    ctx: Arc<FleetCtx>,
    tasks: Arc<Vec<tokio::task::JoinHandle<()>>>,
}

impl Fleet {
    /// Starts the supervision tree and rebuilds every actor from the store.
    pub async fn start(deps: FleetDeps) -> Result<Fleet, FleetError> {
        Self::start_owning(deps, |_| true).await
    }

    /// Like [`Fleet::start`], but rebuilds only the couriers and open orders of the markets
    /// (tenants) `owns` accepts: with several nodes, the markets whose lease this node holds.
    /// Zones of every tenant are loaded (any node may serve their API and they stay in sync
    /// through the store). Other markets are taken over later with [`Fleet::adopt_market`].
    pub async fn start_owning(deps: FleetDeps, owns: impl Fn(&TenantId) -> bool) -> Result<Fleet, FleetError> {
        // Learned speeds of the previous run; without them ETAs start from the priors.
        let saved_speeds = match deps.store.load_speeds().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "learned speeds not loaded; starting from the priors");
                Vec::new()
            }
        };
        let speeds = crate::speeds::Speeds::start(
            crate::speeds::LearnerConfig {
                publish_every: deps.config.speed_publish,
                save_every: deps.config.speed_save_every,
                store: deps.store.clone(),
                clock: deps.clock.clone(),
            },
            saved_speeds,
        );
        let ctx = Arc::new(FleetCtx {
            store: deps.store,
            publisher: deps.publisher,
            clock: deps.clock,
            positions: Arc::new(Positions::default()),
            fixes_total: metrics::counter!("hexfleet_fixes_total"),
            speeds,
            couriers: DashMap::new(),
            orders: DashMap::new(),
            last_orders: DashMap::new(),
            creating: dashmap::DashSet::new(),
            devices: DashMap::new(),
            registering_device: tokio::sync::Mutex::new(()),
            courier_gates: DashMap::new(),
            loads: DashMap::new(),
            dispatchers: DashMap::new(),
            zones: crate::zone::ZoneRegistry::new(deps.config.dispatch_res),
            children: DashMap::new(),
            supervisor: parking_lot::RwLock::new(None),
            adopting: tokio::sync::Mutex::new(()),
            installing: tokio::sync::Mutex::new(()),
            starting_dispatchers: tokio::sync::Mutex::new(()),
            config: deps.config,
        });
        let (sup, _) = Actor::spawn(None, FleetSupervisor, ctx.clone()).await.map_err(|_| FleetError::ActorGone("supervisor"))?;
        *ctx.supervisor.write() = Some(sup.get_cell());
        let started = std::time::Instant::now();
        ctx.zones.bind(&ctx);
        let mut rec = ctx.store.load().await?;
        crate::zone::recover(&ctx, std::mem::take(&mut rec.zones)).await?;
        rec.couriers.retain(|c| owns(&c.tenant));
        rec.open_orders.retain(|o| owns(&o.tenant));
        let (nc, no) = (rec.couriers.len(), rec.open_orders.len());
        Self::install_recovered(&ctx, rec).await?;
        tracing::info!(couriers = nc, open_orders = no, elapsed_ms = started.elapsed().as_millis() as u64, "fleet recovered");
        let mut tasks = vec![ctx.positions.spawn_rebuilder(ctx.config.index_rebuild)];
        if let Some(every) = ctx.config.zone_resync {
            let weak = Arc::downgrade(&ctx);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(ctx) = weak.upgrade() else { break };
                    match crate::zone::resync_zones(&ctx).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(zones = n, "zones changed elsewhere were synced by the periodic check"),
                        Err(e) => tracing::warn!(error = %e, "periodic zone check failed"),
                    }
                }
            }));
        }
        Ok(Fleet { ctx, tasks: Arc::new(tasks) })
    }

    /// Spawns the actors of recovered couriers and open orders that this node does not run
    /// yet (the zones are installed separately): at start, and when a market is taken over.
    async fn install_recovered(ctx: &Arc<FleetCtx>, rec: crate::store::Recovered) -> Result<(), FleetError> {
        for c in rec.couriers {
            if !ctx.couriers.contains_key(&(c.tenant.clone(), c.id.clone())) {
                Self::install_courier(ctx, c).await?;
            }
        }
        ctx.positions.rebuild_all_blocking();
        let mut tenants: Vec<TenantId> = Vec::new();
        for o in rec.open_orders {
            if !tenants.contains(&o.tenant) {
                tenants.push(o.tenant.clone());
            }
            if ctx.orders.contains_key(&(o.tenant.clone(), o.id.clone())) {
                continue;
            }
            if let Some(c) = o.commitment() {
                // Restored as it was, even if a capacity change since then overfills it.
                *ctx.loads.entry((o.tenant.clone(), c.clone())).or_insert(0) += o.size;
            }
            let o = Arc::new(o);
            ctx.spawn_order(o.clone()).await?;
            ctx.zones.order_changed(&o);
            if let Some(c) = o.courier.as_ref().filter(|_| o.state.is_held())
                && let Some(h) = ctx.couriers.get(&(o.tenant.clone(), c.clone()))
            {
                h.shared.held.lock().push(o.clone());
                let _ = h.actor.cast(CourierMsg::OrderChanged(o.clone()));
            }
            ctx.note_offer(None, &o);
        }
        for t in tenants {
            ctx.dispatcher(&t).await?;
        }
        Ok(())
    }

    /// Takes over a market (tenant) from the store: spawns the actors of its couriers and open
    /// orders as the previous owner last made them durable, its dispatcher, and its learned
    /// speeds as last saved. Couriers and
    /// orders this node already runs are left alone. Call it only once this node holds the
    /// market's lease, before serving any request of that market. Returns (couriers, open
    /// orders) loaded.
    ///
    /// Safe to call again, concurrently, or from a caller that gives up waiting: take-overs
    /// run one at a time, each in a task of its own that runs to the end even if the caller is
    /// dropped (so no order's capacity reservation is counted twice and no actor is spawned
    /// twice), and a later call completes what an earlier failed one left out.
    pub async fn adopt_market(&self, tenant: &TenantId) -> Result<(usize, usize), FleetError> {
        let (ctx, tenant) = (self.ctx.clone(), tenant.clone());
        let task = tokio::spawn(async move {
            let _one_at_a_time = ctx.adopting.lock().await;
            let started = std::time::Instant::now();
            let mut rec = ctx.store.load_tenant(&tenant).await?;
            rec.zones.clear();
            let counts = (rec.couriers.len(), rec.open_orders.len());
            // Learned speeds as the previous owner last saved them (none: this node's copy).
            match ctx.store.load_speeds().await {
                Ok(mut tables) => {
                    tables.retain(|t| t.tenant == tenant);
                    ctx.speeds.reload(tables).await;
                }
                Err(e) => tracing::warn!(%tenant, error = %e, "learned speeds of a market taken over not loaded"),
            }
            Self::install_recovered(&ctx, rec).await?;
            tracing::info!(%tenant, couriers = counts.0, open_orders = counts.1, elapsed_ms = started.elapsed().as_millis() as u64, "market taken over");
            Ok(counts)
        });
        task.await.map_err(|_| FleetError::ActorGone("market take-over"))?
    }

    /// Spawns a courier's actor unless one runs already (two first connections of a new
    /// courier, or one racing a `PUT`, would otherwise spawn two, and the fleet would keep
    /// only the second). Returns the handle, and whether it was spawned now.
    async fn install_courier(ctx: &Arc<FleetCtx>, rec: CourierRecord) -> Result<(CourierHandle, bool), FleetError> {
        let _one_at_a_time = ctx.installing.lock().await;
        if let Some(h) = ctx.couriers.get(&(rec.tenant.clone(), rec.id.clone())).map(|h| h.clone()) {
            return Ok((h, false));
        }
        let index = ctx.positions.tenant(&rec.tenant);
        let key = index.key(&rec.id);
        if let Some(d) = &rec.device_id {
            ctx.devices.insert(d.clone(), (rec.tenant.clone(), rec.id.clone()));
        }
        let shared = Arc::new(CourierShared {
            zones: parking_lot::Mutex::new(crate::zone::CourierZones::new(ctx, &rec)),
            // Recovered: its last fix reached a server no later than its record's last change,
            // and about when it was taken (the time is the device's, which the ingest keeps
            // from running ahead). Not the record's change alone: a status or profile change
            // without a fix moves it, and a courier silent for hours would be offered orders
            // at its old position for `courier_stale_ms` after a restart.
            heard_at: std::sync::atomic::AtomicI64::new(rec.last_fix.as_ref().map_or(Ms::MIN, |f| f.ts.min(rec.updated_at))),
            inbox: FixInbox::new(ctx.config.inbox_capacity),
            record: parking_lot::Mutex::new(rec),
            held: parking_lot::Mutex::new(Vec::new()),
            offers: parking_lot::Mutex::new(Vec::new()),
            key,
        });
        Ok((ctx.spawn_courier(shared).await?, true))
    }

    /// Seconds from the courier's last position straight to the order's next stop (its pickup,
    /// or its drop-off once on board), rounded: a tracking snapshot's `eta_s`. The courier's
    /// next fix brings the ETA along its route (stops before this one count there).
    pub fn direct_eta_s(&self, tenant: &TenantId, courier: &CourierRecord, order: &Order) -> Option<f64> {
        let f = courier.last_fix?;
        let target = if order.state.is_on_board() { order.dropoff } else { order.pickup };
        Some(self.ctx.planner(tenant, courier.vehicle, self.ctx.clock.now_ms()).travel_s(f.pos, target).round())
    }

    /// The shared context (for tests and tools).
    pub fn ctx(&self) -> &Arc<FleetCtx> {
        &self.ctx
    }

    pub fn now_ms(&self) -> Ms {
        self.ctx.clock.now_ms()
    }

    /// Returns the courier, registering it with defaults (durably) if it is unknown.
    pub async fn ensure_courier(&self, tenant: &TenantId, id: &CourierId) -> Result<CourierRecord, FleetError> {
        if let Some(r) = self.ctx.courier_record(tenant, id) {
            return Ok(r);
        }
        let _gate = self.ctx.courier_gate(tenant, id).await;
        self.register_gated(tenant, id).await
    }

    /// [`Self::ensure_courier`] with the courier's gate held.
    async fn register_gated(&self, tenant: &TenantId, id: &CourierId) -> Result<CourierRecord, FleetError> {
        if let Some(r) = self.ctx.courier_record(tenant, id) {
            return Ok(r); // registered while this waited for the gate
        }
        let rec = CourierRecord::new(tenant.clone(), id.clone(), self.now_ms());
        // Insert-if-absent: a profile written by another node meanwhile (a market changing
        // hands) is not replaced by the default one.
        self.ctx.store.commit(vec![Write::RegisterCourier(rec.clone()), Write::Event(courier_event(&rec, "courier.registered", &Who::System))]).await?;
        let (h, new) = Self::install_courier(&self.ctx, rec.clone()).await?;
        Ok(if new { rec } else { h.shared.record.lock().clone() })
    }

    /// Creates or updates a courier's profile, durably.
    pub async fn upsert_courier(&self, tenant: &TenantId, id: &CourierId, patch: CourierPatch, who: &Who) -> Result<CourierRecord, FleetError> {
        // The device lock before the courier's gate, always in this order.
        let _device = match patch.device_id {
            Some(_) => Some(self.ctx.registering_device.lock().await),
            None => None,
        };
        let _gate = self.ctx.courier_gate(tenant, id).await;
        // A new courier is registered first, so the profile's `updated_at` follows the
        // registration's (the store keeps the newer row).
        let mut rec = match self.ctx.courier_record(tenant, id) {
            Some(r) => r,
            None => self.register_gated(tenant, id).await?,
        };
        if let Some(d) = &patch.device_id
            && let Some(owner) = self.ctx.devices.get(d)
            && (owner.0 != *tenant || owner.1 != *id)
        {
            return Err(FleetError::Conflict(format!("device {d} belongs to another courier")));
        }
        let old_device = rec.device_id.clone();
        if let Some(v) = patch.name { rec.name = Some(v) }
        if let Some(v) = patch.vehicle { rec.vehicle = v }
        if let Some(v) = patch.capacity { rec.capacity = v }
        if let Some(v) = patch.device_id { rec.device_id = Some(v) }
        if let Some(v) = patch.on_shift { rec.on_shift = v }
        // Past the row it replaces, whatever this node's clock says: the store keeps the newer
        // `updated_at`, and a node whose clock is behind the previous owner's would answer 200
        // for a profile it did not write.
        rec.updated_at = self.now_ms().max(rec.updated_at + 1);
        self.ctx.store.commit(vec![Write::Courier(rec.clone()), Write::Event(courier_event(&rec, "courier.updated", who))]).await?;
        if let Some(d) = old_device.filter(|d| Some(d) != rec.device_id.as_ref()) {
            // Only if still this courier's: the map may have it for another courier already.
            self.ctx.devices.remove_if(&d, |_, owner| owner.0 == *tenant && owner.1 == *id);
        }
        if let Some(d) = &rec.device_id {
            self.ctx.devices.insert(d.clone(), (tenant.clone(), id.clone()));
        }
        let h = match self.ctx.couriers.get(&(tenant.clone(), id.clone())).map(|h| h.clone()) {
            Some(h) => Some(h),
            None => match Self::install_courier(&self.ctx, rec.clone()).await? {
                (_, true) => None,
                // Someone else installed it meanwhile: apply the profile to that actor.
                (h, false) => Some(h),
            },
        };
        if let Some(h) = h {
            // The profile at once (its readers see it now); the live part (status, position)
            // stays the actor's, which may have moved on since `rec` was read.
            h.shared.record.lock().set_profile(&rec);
            let _ = h.actor.cast(CourierMsg::SetProfile(rec.clone()));
        }
        Ok(rec)
    }

    /// Courier actors running under the supervisor (one per courier).
    pub fn courier_actors(&self) -> usize {
        self.ctx.children.iter().filter(|c| matches!(c.value(), Child::Courier(..))).count()
    }

    /// The courier's current state.
    pub fn courier(&self, tenant: &TenantId, id: &CourierId) -> Result<CourierRecord, FleetError> {
        self.ctx.courier_record(tenant, id).ok_or(FleetError::NotFound { what: "courier" })
    }

    /// Orders a courier holds.
    pub fn courier_orders(&self, tenant: &TenantId, id: &CourierId) -> Vec<Arc<Order>> {
        self.ctx.couriers.get(&(tenant.clone(), id.clone())).map(|h| h.shared.held.lock().clone()).unwrap_or_default()
    }

    /// Orders offered to a courier whose offer has not expired: an app that reconnects gets
    /// them again (an offer sent while it was away would otherwise lapse unseen, and the
    /// courier count as having declined).
    pub fn courier_offers(&self, tenant: &TenantId, id: &CourierId) -> Vec<Arc<Order>> {
        let now = self.now_ms();
        let Some(h) = self.ctx.couriers.get(&(tenant.clone(), id.clone())) else { return Vec::new() };
        let offers = h.shared.offers.lock();
        offers.iter().filter(|o| o.offer.as_ref().is_some_and(|x| x.courier == *id && x.expires_at > now)).cloned().collect()
    }

    /// The courier a tracker device id belongs to.
    pub fn device(&self, device_id: &str) -> Option<(TenantId, CourierId)> {
        self.ctx.devices.get(device_id).map(|e| e.clone())
    }

    /// Hands validated fixes to the courier (hot path; never waits on the actor).
    pub fn ingest(&self, tenant: &TenantId, id: &CourierId, fixes: impl IntoIterator<Item = Fix>) -> Result<(), FleetError> {
        self.courier_tap(tenant, id)?.ingest(fixes)
    }

    /// A direct line to one courier's inbox for a connection that streams its fixes: the
    /// courier is looked up once instead of once per fix.
    pub fn courier_tap(&self, tenant: &TenantId, id: &CourierId) -> Result<CourierTap, FleetError> {
        let handle = self.ctx.couriers.get(&(tenant.clone(), id.clone())).ok_or(FleetError::NotFound { what: "courier" })?.clone();
        Ok(CourierTap { ctx: self.ctx.clone(), key: (tenant.clone(), id.clone()), handle })
    }

    /// Sets a courier's status.
    pub fn set_status(&self, tenant: &TenantId, id: &CourierId, status: CourierStatus) -> Result<(), FleetError> {
        let h = self.ctx.couriers.get(&(tenant.clone(), id.clone())).ok_or(FleetError::NotFound { what: "courier" })?;
        h.shared.record.lock().status = status;
        h.actor.cast(CourierMsg::SetStatus(status)).map_err(|_| FleetError::ActorGone("courier"))
    }

    /// The courier's recent trail, oldest first.
    pub async fn trail(&self, tenant: &TenantId, id: &CourierId) -> Result<Vec<Fix>, FleetError> {
        let h = self.ctx.couriers.get(&(tenant.clone(), id.clone())).map(|h| h.actor.clone()).ok_or(FleetError::NotFound { what: "courier" })?;
        call(&h, CourierMsg::Trail, self.ctx.config.call_timeout, "courier").await
    }

    /// The `k` couriers nearest to `at` (within `radius_m` if given), from an index snapshot at
    /// most one rebuild period old.
    pub async fn nearby(&self, tenant: &TenantId, at: LatLng, k: usize, radius_m: Option<f64>) -> Vec<Nearby> {
        let t = self.ctx.positions.tenant(tenant);
        t.fresh(self.ctx.config.index_rebuild)
            .await
            .nearest(at, k, radius_m, |_| true)
            .into_iter()
            .filter_map(|(e, d)| {
                let id = t.id(e.key)?;
                Some(Nearby { courier: self.ctx.courier_record(tenant, &id)?, distance_m: d })
            })
            .collect()
    }

    /// Couriers with a position inside the box, from an index snapshot at most one rebuild
    /// period old.
    pub async fn couriers_in_bbox(&self, tenant: &TenantId, min: LatLng, max: LatLng) -> Vec<CourierRecord> {
        let t = self.ctx.positions.tenant(tenant);
        let snap = t.fresh(self.ctx.config.index_rebuild).await;
        snap.in_bbox(min, max).filter_map(|e| t.id(e.key)).filter_map(|id| self.ctx.courier_record(tenant, &id)).collect()
    }

    /// Creates an order; returns once it is durable. `ready_at` and `deliver_by` must lie
    /// within 30 days of now.
    pub async fn create_order(&self, tenant: &TenantId, new: NewOrder, who: &Who) -> Result<Arc<Order>, FleetError> {
        if new.size == 0 {
            return Err(FleetError::Invalid("size must be at least 1".into()));
        }
        let now = self.now_ms();
        // Times far from now are mistakes (seconds for milliseconds, a year off), and would
        // overflow the dispatcher's arithmetic.
        for (name, t) in [("ready_at", new.ready_at), ("deliver_by", new.deliver_by)] {
            if t.is_some_and(|t| t.abs_diff(now) > MAX_ORDER_TIME_SKEW_MS) {
                return Err(FleetError::Invalid(format!("{name} must be within 30 days of now (milliseconds since the epoch)")));
            }
        }
        if let (Some(r), Some(d)) = (new.ready_at, new.deliver_by)
            && d < r
        {
            return Err(FleetError::Invalid("deliver_by is before ready_at".into()));
        }
        let zones = self.ctx.zones.snapshot(tenant);
        if !zones.in_service(new.pickup) || !zones.in_service(new.dropoff) {
            return Err(FleetError::OutsideServiceArea);
        }
        // A client-chosen id may clash with a closed order in the store; a generated UUIDv7
        // cannot, so it skips the read (one less database round trip per create under load).
        let chosen = new.id.is_some();
        let id = new.id.clone().unwrap_or_else(|| OrderId::new(uuid::Uuid::now_v7().to_string()));
        let key = (tenant.clone(), id.clone());
        // Held until the order's actor is in `orders` (or the creation failed). A retry while
        // the first attempt still commits is told so, not "exists": that attempt may yet fail.
        let Some(_creating) = Creating::reserve(&self.ctx.creating, key.clone()) else {
            return Err(FleetError::InProgress(format!("an earlier request is creating order {id}; retry")));
        };
        let existing = match self.ctx.last_orders.get(&key).map(|o| o.clone()) {
            Some(o) => Some(o),
            None if self.ctx.orders.contains_key(&key) => {
                return Err(FleetError::InProgress(format!("order {id} is starting; retry")));
            }
            None if chosen => self.ctx.store.order(tenant, &id).await?.map(Arc::new),
            None => None,
        };
        if let Some(o) = existing {
            // The same request again (a client retrying after a timeout, or after a 503 whose
            // commit did happen): answered with the order as it is now, not refused, so the
            // client can tell "my order exists" from "that id is another order's".
            let same = o.pickup == new.pickup
                && o.dropoff == new.dropoff
                && o.size == new.size
                && o.ready_at == new.ready_at
                && o.deliver_by == new.deliver_by;
            return if same { Ok(o) } else { Err(FleetError::Conflict(format!("order {id} already exists, with other details"))) };
        }
        let order = Order {
            tenant: tenant.clone(),
            id: id.clone(),
            pickup: new.pickup,
            dropoff: new.dropoff,
            size: new.size,
            ready_at: new.ready_at,
            deliver_by: new.deliver_by,
            state: OrderState::Created,
            courier: None,
            offer: None,
            declined: Vec::new(),
            assignment: None,
            created_at: now,
            updated_at: now,
            version: 0,
            released_at: None,
        };
        let event = DomainEvent {
            tenant: tenant.clone(),
            entity: EntityKind::Order,
            entity_id: id.to_string(),
            kind: "order.created".into(),
            actor: who.to_string(),
            reason: None,
            ts: now,
            attrs: vec![("to".into(), "created".into())],
        };
        // Started before the commit: nothing after it may fail, or a client told "failed"
        // would retry and create the order twice.
        let d = self.ctx.dispatcher(tenant).await?;
        self.ctx.store.commit(vec![Write::Order(order.clone()), Write::Event(event.clone())]).await?;
        metrics::counter!("hexfleet_orders_created_total").increment(1);
        let order = Arc::new(order);
        // The creation's notices go out before the actor can be reached: a command arriving at
        // once (a cancel) then notifies after them, and the dispatcher, the zones and watchers
        // do not see the order come back as created after it closed. A round in between
        // finds no actor for its offer and offers again at the next.
        self.ctx.zones.order_changed(&order);
        self.ctx.publisher.publish(crate::publish::Update::Order(order.clone()));
        self.ctx.publisher.publish(crate::publish::Update::Event(Arc::new(event)));
        let _ = d.cast(DispatchMsg::OrderChanged(order.clone()));
        if let Err(e) = self.ctx.spawn_order(order.clone()).await {
            // Only when the fleet is stopping. The order is durable and is loaded at the next
            // start; the creation stands.
            tracing::error!(%tenant, order = %order.id, error = %e, "order created but its actor did not start");
        }
        Ok(order)
    }

    /// Reads an order: live if open, else from the store.
    pub async fn order(&self, tenant: &TenantId, id: &OrderId) -> Result<Arc<Order>, FleetError> {
        if let Some(o) = self.ctx.last_orders.get(&(tenant.clone(), id.clone())) {
            return Ok(o.clone());
        }
        self.ctx.store.order(tenant, id).await?.map(Arc::new).ok_or(FleetError::NotFound { what: "order" })
    }

    /// Applies a command to an open order and waits until it is durable.
    ///
    /// A courier is told about the orders offered to it or held by it only: a command it may
    /// not give on another order is answered "order not found", not with the order's state (a
    /// courier trying ids, often sequential, learned which existed and which were being
    /// offered to someone else).
    pub async fn command(&self, tenant: &TenantId, id: &OrderId, cmd: Command, who: Who) -> Result<Arc<Order>, FleetError> {
        let courier = match &who {
            Who::Courier(c) => Some(c.clone()),
            _ => None,
        };
        let res = self.command_as(tenant, id, cmd, who).await;
        match (res, courier) {
            (Err(e @ (FleetError::InvalidTransition { .. } | FleetError::Conflict(_))), Some(c)) => {
                // Its own: offered to it, held by it, or once (it declined, or its offer
                // lapsed, or the order was taken back from it): it knew of it already.
                let mine = self.order(tenant, id).await.is_ok_and(|o| {
                    o.courier.as_ref() == Some(&c) || o.offer.as_ref().is_some_and(|x| x.courier == c) || o.declined.contains(&c)
                });
                Err(if mine { e } else { FleetError::NotFound { what: "order" } })
            }
            (res, _) => res,
        }
    }

    async fn command_as(&self, tenant: &TenantId, id: &OrderId, cmd: Command, who: Who) -> Result<Arc<Order>, FleetError> {
        let actor = match self.ctx.orders.get(&(tenant.clone(), id.clone())) {
            Some(a) => a.clone(),
            None => {
                // Closed or unknown: say which.
                let o = self.order(tenant, id).await?;
                return Err(FleetError::transition(cmd.name(), o.state));
            }
        };
        // A command not started within `call_timeout` is not applied; one started is waited
        // for until the store has settled its commit, so that a command reported failed did
        // not happen (and one that happened is not reported failed).
        let cfg = &self.ctx.config;
        let start_by = std::time::Instant::now() + cfg.call_timeout;
        let msg = |reply| OrderMsg::Apply { cmd, who, reply: Some(reply), start_by: Some(start_by) };
        call(&actor, msg, cfg.call_timeout + cfg.commit_wait, "order").await?
    }

    /// Dispatcher override: assign to a courier now.
    pub async fn assign(&self, tenant: &TenantId, id: &OrderId, courier: &CourierId, who: Who) -> Result<Arc<Order>, FleetError> {
        let rec = self.courier(tenant, courier)?;
        let order = self.order(tenant, id).await?;
        let planner = self.ctx.planner(tenant, rec.vehicle, self.now_ms());
        let cost_s = rec.last_fix.map_or(0.0, |f| planner.travel_s(f.pos, order.pickup));
        let record = crate::domain::AssignmentRecord {
            at: self.now_ms(),
            policy: "override".into(),
            courier: courier.clone(),
            cost_s,
            candidates: vec![(courier.clone(), cost_s)],
        };
        self.command(tenant, id, Command::Assign { courier: courier.clone(), record }, who).await
    }

    /// Runs the periodic zone check once now (tests, tools): how many zones changed here.
    pub async fn resync_zones(&self) -> Result<usize, FleetError> {
        crate::zone::resync_zones(&self.ctx).await
    }

    /// Runs one dispatch round for the tenant now (tests, tools).
    pub async fn dispatch_now(&self, tenant: &TenantId) -> Result<(), FleetError> {
        let d = self.ctx.dispatcher(tenant).await?;
        call(&d, DispatchMsg::TickNow, self.ctx.config.call_timeout, "dispatcher").await
    }

    /// Plans a dispatch round for the tenant's waiting orders without applying it: what the
    /// next tick would decide, and how long building and solving it took (benchmarks, tools).
    pub async fn dispatch_preview(&self, tenant: &TenantId) -> DispatchPreview {
        let now = self.now_ms();
        let all = self.ctx.open_orders(tenant);
        let committed = crate::matching::commitments(all.iter());
        let open: Vec<Arc<Order>> = all.into_iter().filter(|o| o.state == OrderState::Created).collect();
        let (ctx, t) = (self.ctx.clone(), tenant.clone());
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let r = crate::matching::plan_round(&ctx, &t, &open, &committed, now);
            DispatchPreview {
                orders: open.len(),
                couriers: r.couriers,
                pairs: r.pairs,
                matched: r.picks.len(),
                cost_s: r.cost,
                lower_bound_s: r.lower_bound,
                elapsed: started.elapsed(),
            }
        })
        .await
        .expect("dispatch preview panicked")
    }

    /// Open orders of a tenant.
    pub fn open_orders(&self, tenant: &TenantId) -> Vec<Arc<Order>> {
        self.ctx.open_orders(tenant)
    }

    /// Number of couriers and open orders known (all tenants).
    pub fn counts(&self) -> (usize, usize) {
        (self.ctx.couriers.len(), self.ctx.orders.len())
    }

    /// One tenant's figures on this node, for its dispatchers' console. Walks the node's
    /// couriers and open orders: for a console's once-a-second stats, not for hot paths.
    pub fn tenant_stats(&self, tenant: &TenantId) -> TenantStats {
        let now = self.now_ms();
        let couriers_online = self
            .ctx
            .couriers
            .iter()
            .filter(|e| e.key().0 == *tenant && self.ctx.heard_lately(&e.value().shared, now))
            .count();
        let orders_open = self.ctx.last_orders.iter().filter(|e| e.key().0 == *tenant).count();
        let fixes_received = self.ctx.positions.get(tenant).map_or(0, |t| t.fixes());
        TenantStats { couriers_online, orders_open, fixes_received }
    }

    /// Lets every order actor, then every courier actor, work through what is already in its
    /// mailbox, and checks the fleet's cross-actor invariants. Returns the violations (empty
    /// when consistent):
    /// * a courier's committed load equals the sizes of the open orders offered to or held by
    ///   it, and never exceeds its capacity;
    /// * an order is in the held list of exactly the courier holding it, and of no other.
    ///
    /// For tests and operators' consistency checks; it walks every actor, so not for hot paths.
    pub async fn check_invariants(&self) -> Vec<String> {
        let timeout = self.ctx.config.call_timeout;
        let orders: Vec<ActorRef<OrderMsg>> = self.ctx.orders.iter().map(|e| e.value().clone()).collect();
        for a in orders {
            let _ = call(&a, OrderMsg::Get, timeout, "order").await;
        }
        let couriers: Vec<CourierHandle> = self.ctx.couriers.iter().map(|e| e.value().clone()).collect();
        for h in &couriers {
            let _ = call(&h.actor, CourierMsg::Trail, timeout, "courier").await;
        }
        let mut bad = Vec::new();
        let mut expected: std::collections::HashMap<(TenantId, CourierId), u32> = Default::default();
        let open: Vec<Arc<Order>> = self.ctx.last_orders.iter().map(|e| e.value().clone()).collect();
        for o in &open {
            if let Some(c) = o.commitment() {
                *expected.entry((o.tenant.clone(), c.clone())).or_default() += u32::from(o.size);
            }
        }
        for h in &couriers {
            let rec = h.shared.record.lock().clone();
            let k = (rec.tenant.clone(), rec.id.clone());
            let load = u32::from(self.ctx.load(&rec.tenant, &rec.id));
            let want = expected.get(&k).copied().unwrap_or(0);
            if load != want {
                bad.push(format!("courier {}: load {load} but open orders commit {want}", rec.id));
            }
            if load > u32::from(rec.capacity) {
                bad.push(format!("courier {}: load {load} over capacity {}", rec.id, rec.capacity));
            }
            for o in h.shared.held.lock().iter() {
                let live = self.ctx.last_orders.get(&(o.tenant.clone(), o.id.clone())).map(|e| e.value().clone());
                if !live.is_some_and(|l| l.state.is_held() && l.courier.as_ref() == Some(&rec.id)) {
                    bad.push(format!("courier {} lists order {} it does not hold", rec.id, o.id));
                }
            }
        }
        for o in open.iter().filter(|o| o.state.is_held()) {
            let Some(c) = &o.courier else {
                bad.push(format!("order {} is {} without a courier", o.id, o.state.as_str()));
                continue;
            };
            let listed = couriers.iter().filter(|h| h.shared.held.lock().iter().any(|x| x.id == o.id && x.tenant == o.tenant)).count();
            let by_holder = self.ctx.couriers.get(&(o.tenant.clone(), c.clone())).is_some_and(|h| h.shared.held.lock().iter().any(|x| x.id == o.id));
            if listed != 1 || !by_holder {
                bad.push(format!("order {} held by {c} is listed by {listed} couriers", o.id));
            }
        }
        bad
    }

    /// Creates or replaces a zone; returns once it is durable (audit event `zone.created` or
    /// `zone.updated`). The geometry is validated here (rings, coordinates).
    pub async fn put_zone(&self, tenant: &TenantId, zone: ZoneRecord, who: &Who) -> Result<Arc<ZoneRecord>, FleetError> {
        crate::zone::put_zone(&self.ctx, tenant, zone, who).await
    }

    /// Brings this node's copy of a zone up to date with the store after another node changed
    /// it (created, replaced or deleted); writes and publishes nothing. Returns whether the
    /// local copy changed.
    pub async fn sync_zone(&self, tenant: &TenantId, id: &ZoneId) -> Result<bool, FleetError> {
        crate::zone::sync_zone(&self.ctx, tenant, id).await
    }

    /// Deletes a zone; returns once it is durable. Couriers inside get a closing `zone.exit`.
    pub async fn delete_zone(&self, tenant: &TenantId, id: &ZoneId, who: &Who) -> Result<(), FleetError> {
        crate::zone::delete_zone(&self.ctx, tenant, id, who).await
    }

    /// The tenant's zones, by id.
    pub fn zones(&self, tenant: &TenantId) -> Vec<Arc<ZoneRecord>> {
        let mut v: Vec<_> = self.ctx.zones.snapshot(tenant).zones().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// One zone.
    pub fn zone(&self, tenant: &TenantId, id: &ZoneId) -> Result<Arc<ZoneRecord>, FleetError> {
        self.ctx.zones.snapshot(tenant).zones().find(|z| z.id == *id).cloned().ok_or(FleetError::NotFound { what: "zone" })
    }

    /// Supply, demand and surge of a zone. Supply counts only couriers heard from within
    /// `courier_stale_ms`, as dispatch does.
    pub fn zone_stats(&self, tenant: &TenantId, id: &ZoneId) -> Option<crate::zone::AreaStats> {
        let now = self.now_ms();
        self.ctx.zones.stats(&crate::zone::AreaKey::Zone(tenant.clone(), id.clone()), |c| self.ctx.heard(tenant, c, now))
    }

    /// Supply, demand and surge of the dispatch cell (`FleetConfig::dispatch_res`) around `at`;
    /// zero when nothing ever happened there. Supply as in [`Fleet::zone_stats`].
    pub fn cell_stats(&self, tenant: &TenantId, at: LatLng) -> crate::zone::AreaStats {
        let cell = hexfleet_geo::cells::cell_at(at, self.ctx.zones.resolution());
        let now = self.now_ms();
        self.ctx.zones.stats(&crate::zone::AreaKey::Cell(tenant.clone(), cell), |c| self.ctx.heard(tenant, c, now)).unwrap_or_default()
    }

    /// Test hook: makes a zone's area actor panic.
    pub fn crash_zone_actor(&self, tenant: &TenantId, id: &ZoneId) {
        if let Some(a) = self.ctx.zones.area_actor(&crate::zone::AreaKey::Zone(tenant.clone(), id.clone())) {
            let _ = a.cast(crate::zone::AreaMsg::Crash);
        }
    }

    /// Test hook: makes a courier or order actor panic.
    pub fn crash_courier(&self, tenant: &TenantId, id: &CourierId) {
        if let Some(h) = self.ctx.couriers.get(&(tenant.clone(), id.clone())) {
            let _ = h.actor.cast(CourierMsg::Crash);
        }
    }

    pub fn crash_order(&self, tenant: &TenantId, id: &OrderId) {
        if let Some(a) = self.ctx.orders.get(&(tenant.clone(), id.clone())) {
            let _ = a.cast(OrderMsg::Crash);
        }
    }

    /// Stops dispatch and the actors, then flushes storage.
    pub async fn shutdown(&self) -> Result<(), FleetError> {
        for t in self.tasks.iter() {
            t.abort();
        }
        for d in self.ctx.dispatchers.iter() {
            d.stop(None);
        }
        self.ctx.zones.drain_events(Duration::from_secs(2)).await;
        if tokio::time::timeout(Duration::from_secs(5), self.ctx.speeds.save_now()).await.is_err() {
            tracing::warn!("learned speeds not saved at shutdown in time");
        }
        // Write every courier's latest state before stopping.
        let all: Vec<CourierRecord> = self.ctx.couriers.iter().map(|h| h.shared.record.lock().clone()).collect();
        for chunk in all.chunks(1000) {
            if self.ctx.store.snapshot_couriers(chunk.to_vec()).is_err() {
                // The buffer is full (a backlog from an outage): write it out, then queue again.
                let _ = self.ctx.store.flush().await;
                if let Err(e) = self.ctx.store.snapshot_couriers(chunk.to_vec()) {
                    tracing::warn!(couriers = chunk.len(), error = %e, "couriers' last state not queued at shutdown");
                }
            }
        }
        let res = self.ctx.store.flush().await;
        if let Some(sup) = self.ctx.supervisor.write().take() {
            sup.stop(None);
        }
        res.map_err(FleetError::from)
    }
}

fn courier_event(rec: &CourierRecord, kind: &str, who: &Who) -> DomainEvent {
    DomainEvent {
        tenant: rec.tenant.clone(),
        entity: EntityKind::Courier,
        entity_id: rec.id.to_string(),
        kind: kind.into(),
        actor: who.to_string(),
        reason: None,
        ts: rec.updated_at,
        attrs: vec![("vehicle".into(), rec.vehicle.as_str().into()), ("capacity".into(), rec.capacity.to_string())],
    }
}

/// Calls an actor with a timeout, mapping failures to [`FleetError`].
pub(crate) async fn call<M, R>(
    actor: &ActorRef<M>,
    build: impl FnOnce(ractor::RpcReplyPort<R>) -> M,
    timeout: Duration,
    what: &'static str,
) -> Result<R, FleetError>
where
    M: ractor::Message,
    R: Send + 'static,
{
    match actor.call(build, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
        Ok(ractor::rpc::CallResult::Timeout) => Err(FleetError::Timeout(what)),
        _ => Err(FleetError::ActorGone(what)),
    }
}

/// A courier's gate, held ([`FleetCtx::courier_gate`]); the gate is dropped from the map by its
/// last user.
pub(crate) struct CourierGate<'a> {
    ctx: &'a FleetCtx,
    key: (TenantId, CourierId),
    gate: Arc<tokio::sync::Mutex<()>>,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for CourierGate<'_> {
    fn drop(&mut self) {
        // Three references: the map's, `gate` and the guard's. More: someone waits for it (and
        // will remove it). Checked under the map's shard lock, so nobody takes a new one
        // meanwhile; a caller arriving after the removal finds the courier in memory, or
        // registers it itself if this one failed.
        self.ctx.courier_gates.remove_if(&self.key, |_, g| Arc::ptr_eq(g, &self.gate) && Arc::strong_count(g) == 3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use crate::domain::{Fix, LatLng};
    use crate::publish::{RecordingPublisher, Update};
    use crate::store::MemoryStore;

    /// Holds the publisher of the first `Created` notice of an order until released.
    struct HoldCreated {
        inner: Arc<RecordingPublisher>,
        gate: parking_lot::Mutex<Option<(tokio::sync::oneshot::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    }

    impl crate::publish::Publisher for HoldCreated {
        fn publish(&self, u: Update) {
            let park = matches!(&u, Update::Order(o) if o.state == OrderState::Created).then(|| self.gate.lock().take()).flatten();
            self.inner.publish(u);
            if let Some((arrived, release)) = park {
                let _ = arrived.send(());
                release.recv_timeout(Duration::from_secs(15)).expect("the test releases the creation");
            }
        }
    }

    fn new_order(id: &str) -> NewOrder {
        let p = LatLng::new(52.52, 13.40).unwrap();
        NewOrder { id: Some(OrderId::new(id)), pickup: p, dropoff: p, size: 1, ready_at: None, deliver_by: None }
    }

    /// A command that reaches an order right after its creation (a client's compensating
    /// cancel) notifies after the creation's notices: watchers, zones and the dispatcher never
    /// see the order come back as created after it closed. While the creation's notices are
    /// going out, the order's actor cannot be reached yet.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_order_is_reachable_only_after_its_creation_is_announced() {
        let inner = Arc::new(RecordingPublisher::default());
        let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let publisher = Arc::new(HoldCreated { inner: inner.clone(), gate: parking_lot::Mutex::new(Some((arrived_tx, release_rx))) });
        let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), ..Default::default() };
        let deps = FleetDeps { store: Arc::new(MemoryStore::new()), publisher, clock: Arc::new(TokioClock::new()), config };
        let f = Arc::new(Fleet::start(deps).await.unwrap());
        let t = TenantId::new("t");
        let creating = tokio::spawn({
            let (f, t) = (f.clone(), t.clone());
            async move { f.create_order(&t, new_order("o1"), &Who::System).await }
        });
        tokio::time::timeout(Duration::from_secs(15), arrived).await.expect("the creation is announced").unwrap();
        let o1 = OrderId::new("o1");
        let early = f.command(&t, &o1, Command::Cancel, Who::System).await;
        assert!(early.is_err(), "the order was reachable before its creation was announced: {early:?}");
        release.send(()).unwrap();
        creating.await.unwrap().expect("created");
        let cancelled = f.command(&t, &o1, Command::Cancel, Who::System).await.expect("cancelled");
        assert_eq!(cancelled.state, OrderState::Cancelled);
        let states: Vec<OrderState> = inner
            .updates
            .lock()
            .iter()
            .filter_map(|u| match u {
                Update::Order(o) if o.id == o1 => Some(o.state),
                _ => None,
            })
            .collect();
        assert_eq!(states, [OrderState::Created, OrderState::Cancelled]);
    }

    /// The race `FixInbox::unschedule` closes: a tap's actor has stopped, and its successor has
    /// started (resetting the inbox's schedule) but is not in the fleet's map yet. The push that
    /// finds no live actor must leave the inbox unscheduled; otherwise every later push would
    /// take a wake-up to be on its way, and the successor would never drain the inbox.
    #[tokio::test]
    async fn a_push_that_finds_no_live_actor_leaves_the_wake_up_to_the_next_push() {
        let publisher = Arc::new(RecordingPublisher::default());
        let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), ..Default::default() };
        let deps = FleetDeps { store: Arc::new(MemoryStore::new()), publisher: publisher.clone(), clock: Arc::new(TokioClock::new()), config };
        let f = Fleet::start(deps).await.unwrap();
        let (t, c) = (TenantId::new("t"), CourierId::new("c1"));
        f.ensure_courier(&t, &c).await.unwrap();
        let mut tap = f.courier_tap(&t, &c).unwrap();
        let key = (t.clone(), c.clone());
        let old = f.ctx.couriers.get(&key).unwrap().clone();
        // The successor starts while the map still names the old actor, which then stops.
        let successor = f.ctx.spawn_courier(old.shared.clone()).await.unwrap();
        f.ctx.couriers.insert(key.clone(), old.clone());
        old.actor.stop_and_wait(None, Some(Duration::from_secs(5))).await.unwrap();
        let fix = |ts| Fix { pos: LatLng::new(52.5, 13.4).unwrap(), ts, speed: None, heading: None, acc: None };
        assert!(matches!(tap.ingest([fix(1_000)]), Err(FleetError::ActorGone(_))), "no live actor to wake");
        // The successor is in the map now: the next push wakes it, and it drains both fixes.
        f.ctx.couriers.insert(key, successor);
        tap.ingest([fix(2_000)]).expect("the successor is woken");
        let moved = |ts: i64| move |u: &Update| matches!(u, Update::CourierMoved { fix, .. } if fix.ts == ts);
        assert!(publisher.wait_for(Duration::from_secs(5), moved(2_000)).await, "the fixes waited in the inbox with no one to drain them");
    }
}
