//! Zones and geofences in the actors: the per-tenant fence set read lock-free by the courier hot
//! path, the per-courier fence tracker that turns fixes into `zone.enter` / `zone.exit` /
//! `zone.dwell` events, and the area actors (one per zone, one per H3 cell at the dispatch
//! resolution) that count supply and demand.
//!
//! # Fence sets
//! Each tenant's zones live in an immutable [`ZoneSnapshot`] (records + a
//! [`hexfleet_geo::fence::FenceSet`] with its H3 cover) behind an `ArcSwap`. Courier actors
//! `load()` it per fix without taking a lock. Zone writes (rare) are serialised by one async
//! mutex, made durable first, then the snapshot is cloned, changed and swapped (copy-on-write).
//! A zone keeps its fence id across updates, so trackers keep their state; a deleted zone's
//! fence id is never reused.
//!
//! # Geofence events
//! Each courier owns a [`CourierZones`] (kept in its `CourierShared`, so it survives actor
//! restarts). Every accepted fix, in fix-time order, goes through the tracker (hysteresis,
//! dwell, silent initial state, closing exit: see `geo/src/fence.rs`). Events are published at
//! once (`Update::Event`) and appended to the event log by a spawned task: the actor never
//! waits on the database for a fix. When more than [`MAX_EVENT_WRITES_IN_FLIGHT`] appends are
//! pending (database slow or down) further geofence events are published but not logged, and
//! counted in `hexfleet_zone_events_unlogged_total`.
//!
//! # Supply, demand, surge
//! An area actor ([`AreaActor`]) exists per zone (spawned with the zone, stopped when it is
//! deleted) and per H3 cell at `FleetConfig::dispatch_res` (spawned lazily on first use, kept).
//! - *supply*: couriers that are available (status `available` and on shift) and inside the
//!   area (for a zone: confirmed inside by the tracker, so hysteresis applies; for a cell: the
//!   cell of the courier's latest position);
//! - *demand*: open orders still waiting for a courier (`created` or `offered`) whose pickup is
//!   inside the area;
//! - *surge* = demand / max(supply, 1).
//!
//! Couriers send `Courier { inside }` when the set of areas they count in changes; the fleet
//! sends `Order { open }` on every order change. Both are idempotent (sets of ids), so a
//! repeated message does not double-count. The counts live in an `Arc` that outlives the actor
//! (as a courier's `CourierShared` does). A panicking area actor is restarted by the fleet
//! supervisor with its counts rebuilt from the truth (each courier's list of areas it counts in,
//! the open orders), so messages that died in its mailbox are recovered; messages sent while it
//! restarts are queued and delivered to the new actor in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use hexfleet_geo::cells::{CellIndex, KeyMap, Resolution, cell_at};
use hexfleet_geo::fence::{Fence, FenceEvent, FenceEventKind, FenceId, FenceSet, FenceTracker};
use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::domain::{
    Actor as Who, CourierId, CourierRecord, CourierStatus, DomainEvent, EntityKind, Fix, LatLng, Ms, Order, OrderId,
    OrderState, TenantId, ZoneId, ZoneRecord,
};
use crate::error::FleetError;
use crate::fleet::{Child, FleetCtx};
use crate::publish::Update;
use crate::store::Write;

/// Deleted fences a tenant's snapshot remembers (the latest; fence ids only grow). A courier
/// that learns of a deletion after this many more gets no closing exit for it.
pub const MAX_RETIRED: usize = 4096;

/// Geofence event appends that may be pending at once before events go unlogged.
pub const MAX_EVENT_WRITES_IN_FLIGHT: usize = 1024;

/// One tenant's zones as the hot path reads them (immutable; replaced on change).
#[derive(Debug, Clone, Default)]
pub struct ZoneSnapshot {
    /// The fences, keyed by fence id.
    pub fences: FenceSet,
    zones: HashMap<ZoneId, (FenceId, Arc<ZoneRecord>)>,
    by_fence: KeyMap<FenceId, Arc<ZoneRecord>>,
    /// Ids of deleted fences (for the closing exit of a courier that learns it late), the
    /// latest [`MAX_RETIRED`] of them: the snapshot is copied on every zone change.
    retired: BTreeMap<FenceId, (ZoneId, String)>,
    service_areas: Vec<FenceId>,
}

impl ZoneSnapshot {
    /// Remembers a deleted fence's zone, forgetting the oldest past [`MAX_RETIRED`].
    fn retire(&mut self, fence: FenceId, zone: ZoneId, kind: String) {
        self.retired.insert(fence, (zone, kind));
        while self.retired.len() > MAX_RETIRED {
            self.retired.pop_first();
        }
    }

    /// The zone behind a live fence id.
    pub fn zone_of(&self, fence: FenceId) -> Option<&Arc<ZoneRecord>> {
        self.by_fence.get(&fence)
    }

    /// All zones, by id.
    pub fn zones(&self) -> impl Iterator<Item = &Arc<ZoneRecord>> {
        self.zones.values().map(|(_, z)| z)
    }

    /// The zones containing `p` (border included).
    pub fn containing(&self, p: LatLng) -> Vec<ZoneId> {
        let mut out = Vec::new();
        self.fences.for_each_containing(p, |f| {
            if let Some(z) = self.by_fence.get(&f) {
                out.push(z.id.clone());
            }
        });
        out
    }

    /// Whether the tenant restricts orders to service areas, and if so whether `p` is in one.
    pub fn in_service(&self, p: LatLng) -> bool {
        self.service_areas.is_empty() || self.service_areas.iter().any(|f| self.fences.contains(*f, p))
    }

    fn name_of(&self, fence: FenceId) -> Option<(ZoneId, String)> {
        self.by_fence.get(&fence).map(|z| (z.id.clone(), z.kind.clone())).or_else(|| self.retired.get(&fence).cloned())
    }
}

/// Which area an [`AreaActor`] counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AreaKey {
    Zone(TenantId, ZoneId),
    Cell(TenantId, CellIndex),
}

/// Supply, demand and surge of an area.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AreaStats {
    /// Available couriers inside.
    pub supply: usize,
    /// Open orders waiting for a courier whose pickup is inside.
    pub demand: usize,
    /// `demand / max(supply, 1)`.
    pub surge: f64,
}

/// Messages of an area actor.
#[derive(Debug)]
pub enum AreaMsg {
    /// An available courier is inside (`true`) or no longer counts here (`false`).
    Courier { id: CourierId, inside: bool },
    /// An order waiting for a courier has its pickup here (`true`) or no longer waits (`false`).
    Order { id: OrderId, open: bool },
    /// Replace the demand (a zone's geometry was set).
    ResetDemand(HashSet<OrderId>),
    /// Read the counts through the actor.
    Stats(RpcReplyPort<AreaStats>),
    /// Test hook: panic.
    Crash,
}

#[derive(Debug, Default)]
struct Counts {
    supply: HashSet<CourierId>,
    demand: HashSet<OrderId>,
}

impl Counts {
    /// The area's figures, counting as supply only the couriers `counts` keeps (those heard
    /// from lately: a courier whose app died stays in the set, since nothing moves it out).
    fn stats(&self, counts: impl Fn(&CourierId) -> bool) -> AreaStats {
        let (supply, demand) = (self.supply.iter().filter(|c| counts(c)).count(), self.demand.len());
        AreaStats { supply, demand, surge: demand as f64 / supply.max(1) as f64 }
    }
}

#[derive(Default)]
struct Routing {
    actor: Option<ActorRef<AreaMsg>>,
    /// Messages sent while the actor is (re)starting, delivered in order once it runs.
    pending: Vec<AreaMsg>,
    closed: bool,
}

/// What outlives an area actor: its counts and the way to reach it.
#[derive(Default)]
pub struct AreaShared {
    routing: Mutex<Routing>,
    counts: Mutex<Counts>,
}

/// The area actor (zone or cell).
pub struct AreaActor;

impl Actor for AreaActor {
    type Msg = AreaMsg;
    type State = Arc<AreaShared>;
    type Arguments = Arc<AreaShared>;

    async fn pre_start(&self, _me: ActorRef<AreaMsg>, shared: Arc<AreaShared>) -> Result<Arc<AreaShared>, ActorProcessingErr> {
        Ok(shared)
    }

    async fn handle(&self, _me: ActorRef<AreaMsg>, msg: AreaMsg, st: &mut Arc<AreaShared>) -> Result<(), ActorProcessingErr> {
        match msg {
            AreaMsg::Courier { id, inside } => {
                let mut c = st.counts.lock();
                if inside { c.supply.insert(id) } else { c.supply.remove(&id) };
            }
            AreaMsg::Order { id, open } => {
                let mut c = st.counts.lock();
                if open { c.demand.insert(id) } else { c.demand.remove(&id) };
            }
            AreaMsg::ResetDemand(d) => st.counts.lock().demand = d,
            AreaMsg::Stats(reply) => {
                let _ = reply.send(st.counts.lock().stats(|_| true));
            }
            AreaMsg::Crash => panic!("injected crash in area actor"),
        }
        Ok(())
    }
}

/// Zones of every tenant and the area actors. Lives in [`FleetCtx`].
pub struct ZoneRegistry {
    tenants: DashMap<TenantId, Arc<ArcSwap<ZoneSnapshot>>>,
    areas: DashMap<AreaKey, Arc<AreaShared>>,
    write: tokio::sync::Mutex<()>,
    next_fence: AtomicU64,
    events_in_flight: Arc<AtomicUsize>,
    ctx: OnceLock<(Weak<FleetCtx>, tokio::runtime::Handle)>,
    res: Resolution,
}

impl ZoneRegistry {
    pub(crate) fn new(dispatch_res: u8) -> Self {
        ZoneRegistry {
            tenants: DashMap::new(),
            areas: DashMap::new(),
            write: tokio::sync::Mutex::new(()),
            next_fence: AtomicU64::new(1),
            events_in_flight: Arc::new(AtomicUsize::new(0)),
            ctx: OnceLock::new(),
            res: Resolution::try_from(dispatch_res.min(15)).unwrap_or(Resolution::Seven),
        }
    }

    /// Called once by `Fleet::start` (lazy cell actors need the context and the main runtime).
    pub(crate) fn bind(&self, ctx: &Arc<FleetCtx>) {
        let _ = self.ctx.set((Arc::downgrade(ctx), tokio::runtime::Handle::current()));
    }

    /// The dispatch resolution of cell areas.
    pub fn resolution(&self) -> Resolution {
        self.res
    }

    /// The tenant's zone snapshot cell (created empty on first use).
    pub fn tenant(&self, tenant: &TenantId) -> Arc<ArcSwap<ZoneSnapshot>> {
        if let Some(t) = self.tenants.get(tenant) {
            return t.clone();
        }
        self.tenants.entry(tenant.clone()).or_insert_with(|| Arc::new(ArcSwap::from_pointee(ZoneSnapshot::default()))).clone()
    }

    /// Every tenant with a zone cell on this node.
    pub(crate) fn tenants(&self) -> Vec<(TenantId, Arc<ArcSwap<ZoneSnapshot>>)> {
        self.tenants.iter().map(|e| (e.key().clone(), e.value().clone())).collect()
    }

    /// The tenant's current zones (lock-free read).
    pub fn snapshot(&self, tenant: &TenantId) -> Arc<ZoneSnapshot> {
        self.tenant(tenant).load_full()
    }

    fn install(&self, snap: &mut ZoneSnapshot, rec: Arc<ZoneRecord>, fence: Fence) -> FenceId {
        let fid = match snap.zones.get(&rec.id) {
            Some((f, _)) => *f,
            None => self.next_fence.fetch_add(1, Ordering::Relaxed),
        };
        snap.fences.insert(fid, fence, rec.updated_at);
        snap.service_areas.retain(|f| *f != fid);
        if rec.is_service_area() {
            snap.service_areas.push(fid);
        }
        snap.by_fence.insert(fid, rec.clone());
        snap.zones.insert(rec.id.clone(), (fid, rec));
        fid
    }

    /// Sends to an area actor; a cell actor is spawned on first use, a deleted zone's message
    /// is dropped. Never waits.
    pub(crate) fn send(&self, key: AreaKey, msg: AreaMsg) {
        let shared = match self.areas.get(&key) {
            Some(s) => s.clone(),
            None => {
                if matches!(key, AreaKey::Zone(..)) {
                    return;
                }
                let mut fresh = false;
                let s = self
                    .areas
                    .entry(key.clone())
                    .or_insert_with(|| {
                        fresh = true;
                        Arc::new(AreaShared::default())
                    })
                    .clone();
                if fresh {
                    self.spawn_later(key.clone(), s.clone());
                }
                s
            }
        };
        let mut r = shared.routing.lock();
        match &r.actor {
            Some(a) => {
                if let Err(e) = a.cast(msg) {
                    tracing::debug!(?key, error = %e, "area actor gone; message dropped");
                }
            }
            None if r.closed => {}
            None => r.pending.push(msg),
        }
    }

    fn spawn_later(&self, key: AreaKey, shared: Arc<AreaShared>) {
        let Some((ctx, rt)) = self.ctx.get() else { return };
        let ctx = ctx.clone();
        rt.spawn(async move {
            if let Some(ctx) = ctx.upgrade()
                && let Err(e) = spawn_area(&ctx, key.clone(), shared).await
            {
                tracing::error!(?key, error = %e, "area actor did not start");
            }
        });
    }

    /// Counts of an area, as last applied by its actor, with only the couriers `counts` keeps
    /// as supply.
    pub fn stats(&self, key: &AreaKey, counts: impl Fn(&CourierId) -> bool) -> Option<AreaStats> {
        self.areas.get(key).map(|s| s.counts.lock().stats(counts))
    }

    /// The actor of an area (tests, tools).
    pub fn area_actor(&self, key: &AreaKey) -> Option<ActorRef<AreaMsg>> {
        self.areas.get(key).and_then(|s| s.routing.lock().actor.clone())
    }

    /// The fleet calls this on every order change: demand follows `created`/`offered`.
    pub(crate) fn order_changed(&self, o: &Order) {
        let open = matches!(o.state, OrderState::Created | OrderState::Offered);
        let snap = self.snapshot(&o.tenant);
        self.send(AreaKey::Cell(o.tenant.clone(), cell_at(o.pickup, self.res)), AreaMsg::Order { id: o.id.clone(), open });
        for z in snap.containing(o.pickup) {
            self.send(AreaKey::Zone(o.tenant.clone(), z), AreaMsg::Order { id: o.id.clone(), open });
        }
    }

    /// Waits (up to `limit`) for geofence events still being appended (shutdown path).
    pub(crate) async fn drain_events(&self, limit: std::time::Duration) {
        let start = tokio::time::Instant::now();
        while self.events_in_flight.load(Ordering::Relaxed) > 0 && start.elapsed() < limit {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Appends events to the log without waiting (bounded number of writes in flight).
    fn append_events(&self, ctx: &FleetCtx, events: Vec<DomainEvent>) {
        if events.is_empty() {
            return;
        }
        if self.events_in_flight.load(Ordering::Relaxed) >= MAX_EVENT_WRITES_IN_FLIGHT {
            metrics::counter!("hexfleet_zone_events_unlogged_total").increment(events.len() as u64);
            tracing::warn!(n = events.len(), "event log is behind: geofence events published but not logged");
            return;
        }
        let Some((_, rt)) = self.ctx.get() else { return };
        let store = ctx.store.clone();
        let n = self.events_in_flight.clone();
        n.fetch_add(1, Ordering::Relaxed);
        rt.spawn(async move {
            let count = events.len() as u64;
            if let Err(e) = store.commit(events.into_iter().map(Write::Event).collect()).await {
                metrics::counter!("hexfleet_zone_events_unlogged_total").increment(count);
                tracing::warn!(error = %e, "geofence events not logged");
            }
            n.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Spawns (or respawns) an area actor under the fleet supervisor and delivers what was queued.
pub(crate) async fn spawn_area(ctx: &Arc<FleetCtx>, key: AreaKey, shared: Arc<AreaShared>) -> Result<(), FleetError> {
    let sup = ctx.supervisor()?;
    let (actor, _) = Actor::spawn_linked(None, AreaActor, shared.clone(), sup).await.map_err(|_| FleetError::ActorGone("area"))?;
    ctx.children.insert(actor.get_id(), Child::Area(key));
    let mut r = shared.routing.lock();
    if r.closed {
        actor.stop(None);
        return Ok(());
    }
    for m in r.pending.drain(..) {
        let _ = actor.cast(m);
    }
    r.actor = Some(actor);
    Ok(())
}

/// The supervisor restarts a failed area actor. Its counts are rebuilt from the couriers'
/// bookkeeping and the open orders (messages lost in the dead mailbox are thus recovered);
/// messages sent meanwhile are queued and applied after, and they are idempotent.
pub(crate) async fn restart_area(ctx: &Arc<FleetCtx>, key: AreaKey) -> Result<(), FleetError> {
    let Some(shared) = ctx.zones.areas.get(&key).map(|s| s.clone()) else { return Ok(()) };
    {
        let mut r = shared.routing.lock();
        if r.closed {
            return Ok(());
        }
        r.actor = None;
    }
    let (tenant, fence) = match &key {
        AreaKey::Zone(t, z) => (t, ctx.zones.snapshot(t).zones.get(z).map(|(f, _)| *f)),
        AreaKey::Cell(t, _) => (t, None),
    };
    let snap = ctx.zones.snapshot(tenant);
    let supply: HashSet<CourierId> = ctx
        .couriers
        .iter()
        .filter(|e| e.key().0 == *tenant && e.value().shared.zones.lock().counted.contains(&key))
        .map(|e| e.key().1.clone())
        .collect();
    let demand: HashSet<OrderId> = ctx
        .open_orders(tenant)
        .iter()
        .filter(|o| matches!(o.state, OrderState::Created | OrderState::Offered))
        .filter(|o| match (&key, fence) {
            (AreaKey::Cell(_, c), _) => cell_at(o.pickup, ctx.zones.res) == *c,
            (AreaKey::Zone(..), Some(f)) => snap.fences.contains(f, o.pickup),
            (AreaKey::Zone(..), None) => false,
        })
        .map(|o| o.id.clone())
        .collect();
    *shared.counts.lock() = Counts { supply, demand };
    spawn_area(ctx, key, shared).await
}

fn zone_event(rec: &ZoneRecord, kind: &str, who: &Who, ts: Ms) -> DomainEvent {
    DomainEvent {
        tenant: rec.tenant.clone(),
        entity: EntityKind::Zone,
        entity_id: rec.id.to_string(),
        kind: kind.into(),
        actor: who.to_string(),
        reason: None,
        ts,
        attrs: vec![("zone_kind".into(), rec.kind.clone())],
    }
}

/// Creates or replaces a zone; durable before it returns.
pub(crate) async fn put_zone(ctx: &Arc<FleetCtx>, tenant: &TenantId, mut rec: ZoneRecord, who: &Who) -> Result<Arc<ZoneRecord>, FleetError> {
    if rec.tenant != *tenant {
        return Err(FleetError::Invalid("zone belongs to another tenant".into()));
    }
    if rec.kind.is_empty() {
        return Err(FleetError::Invalid("zone kind is empty".into()));
    }
    let fence = Fence::multi_polygon(rec.geometry.clone()).map_err(|e| FleetError::Invalid(e.to_string()))?;
    let reg = &ctx.zones;
    let _w = reg.write.lock().await;
    let cell = reg.tenant(tenant);
    let now = ctx.clock.now_ms();
    // Strictly increasing per zone, so other nodes' periodic check (which compares
    // `updated_at`) sees every change, even two in one millisecond.
    let previous = cell.load().zones.get(&rec.id).map(|(_, z)| z.updated_at);
    rec.updated_at = previous.map_or(now, |p| now.max(p + 1));
    let existed = previous.is_some();
    let event = zone_event(&rec, if existed { "zone.updated" } else { "zone.created" }, who, now);
    ctx.store.commit(vec![Write::Zone(rec.clone()), Write::Event(event.clone())]).await?;
    let rec = Arc::new(rec);
    install_zone(ctx, tenant, rec.clone(), fence).await?;
    ctx.publisher.publish(Update::Zone(rec.clone()));
    ctx.publisher.publish(Update::Event(Arc::new(event)));
    Ok(rec)
}

/// Makes a stored zone live on this node: the fence set, the zone's actor, the demand inside.
/// The caller holds the registry's write lock.
async fn install_zone(ctx: &Arc<FleetCtx>, tenant: &TenantId, rec: Arc<ZoneRecord>, fence: Fence) -> Result<(), FleetError> {
    let reg = &ctx.zones;
    let cell = reg.tenant(tenant);
    // The zone's actor first, then the fence: a courier that finds itself inside the new
    // fence at once (on another thread) counts itself in an area that already takes messages
    // (a message to an area not yet registered would be dropped, and the courier, which
    // believes it counted, would never send it again).
    let key = AreaKey::Zone(tenant.clone(), rec.id.clone());
    if !reg.areas.contains_key(&key) {
        let shared = Arc::new(AreaShared::default());
        reg.areas.insert(key.clone(), shared.clone());
        if let Err(e) = spawn_area(ctx, key.clone(), shared).await {
            // Not left registered without an actor: the next try spawns one.
            reg.areas.remove(&key);
            return Err(e);
        }
    }
    let mut snap = (**cell.load()).clone();
    let fid = reg.install(&mut snap, rec.clone(), fence);
    let snap = Arc::new(snap);
    cell.store(snap.clone());
    // The demand already inside. Orders that change meanwhile send their own notices to the
    // zone (its fence is published), but one sent between this read and the reset would be
    // overwritten by it: so the demand is read again after the reset is sent, and what changed
    // in between goes after it as notices. A change after the second read sends its notice
    // after the reset too.
    let waiting_inside = || -> HashSet<OrderId> {
        ctx.open_orders(tenant)
            .iter()
            .filter(|o| matches!(o.state, OrderState::Created | OrderState::Offered) && snap.fences.contains(fid, o.pickup))
            .map(|o| o.id.clone())
            .collect()
    };
    let demand = waiting_inside();
    reg.send(key.clone(), AreaMsg::ResetDemand(demand.clone()));
    let now = waiting_inside();
    for id in demand.difference(&now) {
        reg.send(key.clone(), AreaMsg::Order { id: id.clone(), open: false });
    }
    for id in now.difference(&demand) {
        reg.send(key.clone(), AreaMsg::Order { id: id.clone(), open: true });
    }
    Ok(())
}

/// Deletes a zone; durable before it returns. Couriers inside get a closing exit.
pub(crate) async fn delete_zone(ctx: &Arc<FleetCtx>, tenant: &TenantId, id: &ZoneId, who: &Who) -> Result<(), FleetError> {
    let reg = &ctx.zones;
    let _w = reg.write.lock().await;
    let cell = reg.tenant(tenant);
    let Some((fid, rec)) = cell.load().zones.get(id).cloned() else { return Err(FleetError::NotFound { what: "zone" }) };
    let now = ctx.clock.now_ms();
    let event = zone_event(&rec, "zone.deleted", who, now);
    ctx.store.commit(vec![Write::DeleteZone { tenant: tenant.clone(), id: id.clone() }, Write::Event(event.clone())]).await?;
    remove_zone(ctx, tenant, id, fid, &rec, now);
    ctx.publisher.publish(Update::ZoneDeleted { tenant: tenant.clone(), id: id.clone() });
    ctx.publisher.publish(Update::Event(Arc::new(event)));
    Ok(())
}

/// Takes a zone out of this node: fence set, actor, and a closing exit for couriers inside.
/// The caller holds the registry's write lock.
fn remove_zone(ctx: &Arc<FleetCtx>, tenant: &TenantId, id: &ZoneId, fid: FenceId, rec: &ZoneRecord, now: Ms) {
    let reg = &ctx.zones;
    let cell = reg.tenant(tenant);
    let mut snap = (**cell.load()).clone();
    snap.fences.remove(fid);
    snap.zones.remove(id);
    snap.by_fence.remove(&fid);
    snap.service_areas.retain(|f| *f != fid);
    snap.retire(fid, id.clone(), rec.kind.clone());
    cell.store(Arc::new(snap));
    if let Some((_, shared)) = reg.areas.remove(&AreaKey::Zone(tenant.clone(), id.clone())) {
        let mut r = shared.routing.lock();
        r.closed = true;
        r.pending.clear();
        if let Some(a) = r.actor.take() {
            a.stop(None);
        }
    }
    for h in ctx.couriers.iter().filter(|e| e.key().0 == *tenant) {
        let _ = h.actor.cast(crate::courier::CourierMsg::FenceRemoved { fence: fid, at: now });
    }
}

/// Compares every zone this node holds with the store and syncs those that differ (created,
/// changed or deleted elsewhere): the safety net under the Redis notifications, which are best
/// effort. Returns how many zones changed here.
pub(crate) async fn resync_zones(ctx: &Arc<FleetCtx>) -> Result<usize, FleetError> {
    let stored: HashMap<(TenantId, ZoneId), Ms> = ctx.store.zone_versions().await?.into_iter().map(|(t, id, at)| ((t, id), at)).collect();
    let mut local: HashMap<(TenantId, ZoneId), Ms> = HashMap::new();
    for (tenant, cell) in ctx.zones.tenants() {
        for z in cell.load().zones() {
            local.insert((tenant.clone(), z.id.clone()), z.updated_at);
        }
    }
    let mut changed = 0;
    let keys: HashSet<&(TenantId, ZoneId)> = stored.keys().chain(local.keys()).collect();
    for key in keys.into_iter().filter(|k| stored.get(k) != local.get(k)) {
        match sync_zone(ctx, &key.0, &key.1).await {
            Ok(true) => changed += 1,
            Ok(false) => {}
            // A stored zone that this build refuses (written by an older one) is skipped, as at
            // start: it ended the whole pass, leaving the other zones that differ, after it in
            // random order, unsynced, every pass.
            Err(FleetError::Invalid(e)) => {
                tracing::warn!(tenant = %key.0, zone = %key.1, error = %e, "stored zone has an invalid geometry; not installed");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

/// Brings this node's copy of a zone up to date with the store, after another node changed it
/// (the gateway calls this for zone changes that arrive through Redis). Nothing is written or
/// published: the node that changed the zone did both. Returns whether anything changed.
pub(crate) async fn sync_zone(ctx: &Arc<FleetCtx>, tenant: &TenantId, id: &ZoneId) -> Result<bool, FleetError> {
    let reg = &ctx.zones;
    let _w = reg.write.lock().await;
    let stored = ctx.store.zone(tenant, id).await?;
    let local = reg.tenant(tenant).load().zones.get(id).cloned();
    match (stored, local) {
        (Some(z), Some((_, l))) if *l == z => Ok(false),
        (Some(z), _) => {
            let fence = Fence::multi_polygon(z.geometry.clone()).map_err(|e| FleetError::Invalid(e.to_string()))?;
            install_zone(ctx, tenant, Arc::new(z), fence).await?;
            Ok(true)
        }
        (None, Some((fid, l))) => {
            remove_zone(ctx, tenant, id, fid, &l, ctx.clock.now_ms());
            Ok(true)
        }
        (None, None) => Ok(false),
    }
}

/// Loads recovered zones (fleet start), before couriers start.
pub(crate) async fn recover(ctx: &Arc<FleetCtx>, zones: Vec<ZoneRecord>) -> Result<(), FleetError> {
    let reg = &ctx.zones;
    for z in zones {
        let fence = match Fence::multi_polygon(z.geometry.clone()) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(tenant = %z.tenant, zone = %z.id, error = %e, "stored zone has an invalid geometry; skipped");
                continue;
            }
        };
        let cell = reg.tenant(&z.tenant);
        let mut snap = (**cell.load()).clone();
        let key = AreaKey::Zone(z.tenant.clone(), z.id.clone());
        reg.install(&mut snap, Arc::new(z), fence);
        cell.store(Arc::new(snap));
        let shared = Arc::new(AreaShared::default());
        reg.areas.insert(key.clone(), shared.clone());
        spawn_area(ctx, key, shared).await?;
    }
    Ok(())
}

/// A courier's geofence state: its tracker, the areas it counts in, events not yet sent.
pub struct CourierZones {
    snap: Arc<ArcSwap<ZoneSnapshot>>,
    tracker: FenceTracker,
    cell: Option<CellIndex>,
    /// Areas this courier is counted in as supply.
    counted: Vec<AreaKey>,
    scratch: Vec<FenceEvent>,
    pending: Vec<DomainEvent>,
    /// Availability at the last `sync`, and whether cell or fences changed since: a fix that
    /// changes neither costs no allocation and no message.
    last_available: Option<bool>,
    dirty: bool,
}

impl CourierZones {
    pub(crate) fn new(ctx: &FleetCtx, rec: &CourierRecord) -> Self {
        CourierZones {
            snap: ctx.zones.tenant(&rec.tenant),
            tracker: FenceTracker::new(ctx.config.fence_tracker),
            cell: rec.last_fix.map(|f| cell_at(f.pos, ctx.zones.res)),
            counted: Vec::new(),
            scratch: Vec::new(),
            pending: Vec::new(),
            last_available: None,
            dirty: true,
        }
    }

    /// Fences the courier is confirmed inside, as zone ids.
    pub fn inside(&self) -> Vec<ZoneId> {
        let snap = self.snap.load();
        self.tracker.inside().filter_map(|f| snap.zone_of(f).map(|z| z.id.clone())).collect()
    }

    /// An accepted fix, in fix-time order: evaluates the fences (events queued until `sync`).
    pub(crate) fn on_fix(&mut self, ctx: &FleetCtx, rec: &CourierRecord, fix: Fix) {
        let cell = Some(cell_at(fix.pos, ctx.zones.res));
        if cell != self.cell {
            self.cell = cell;
            self.dirty = true;
        }
        let snap = self.snap.load();
        let inside_before = self.tracker.inside().count();
        self.scratch.clear();
        self.tracker.on_fix(&snap.fences, fix.pos, fix.ts, &mut self.scratch);
        // Events, or a silent initial stay in a fence drawn around the courier.
        if !self.scratch.is_empty() || self.tracker.inside().count() != inside_before {
            self.dirty = true;
        }
        let mut events = std::mem::take(&mut self.scratch);
        for e in events.drain(..) {
            self.forget_if_removed(&snap, rec, &e);
            self.queue_event(&snap, rec, e);
        }
        self.scratch = events;
    }

    /// A zone was deleted: close the stay if the courier was inside.
    pub(crate) fn on_fence_removed(&mut self, ctx: &FleetCtx, rec: &CourierRecord, fence: FenceId, at: Ms) {
        if let Some(e) = self.tracker.on_fence_removed(fence, at) {
            let snap = self.snap.load();
            self.forget_if_removed(&snap, rec, &e);
            self.queue_event(&snap, rec, e);
            self.dirty = true;
        }
        self.sync(ctx, rec);
    }

    /// A stay closed because its zone was deleted: the zone's area actor went with it, so this
    /// courier no longer counts there. Forgetting it matters when the zone id was created
    /// again before this courier heard of the deletion (a backlog): the new zone is a new area
    /// (and a new fence) under the same key, and `sync` must count the courier there afresh
    /// rather than see the key already counted.
    fn forget_if_removed(&mut self, snap: &ZoneSnapshot, rec: &CourierRecord, e: &FenceEvent) {
        if let FenceEventKind::Exit { removed: true, .. } = e.kind
            && let Some((zone, _)) = snap.name_of(e.fence)
        {
            let key = AreaKey::Zone(rec.tenant.clone(), zone);
            self.counted.retain(|k| *k != key);
        }
    }

    fn queue_event(&mut self, snap: &ZoneSnapshot, rec: &CourierRecord, e: FenceEvent) {
        let Some((zone, kind)) = snap.name_of(e.fence) else { return };
        let (name, dwell, reason) = match e.kind {
            FenceEventKind::Enter => ("zone.enter", None, None),
            FenceEventKind::Exit { dwell_ms, removed } => ("zone.exit", Some(dwell_ms), removed.then(|| "zone deleted".to_owned())),
            FenceEventKind::Dwell { dwell_ms } => ("zone.dwell", Some(dwell_ms), None),
        };
        let mut attrs = vec![("courier_id".to_owned(), rec.id.to_string()), ("zone_kind".to_owned(), kind)];
        if let Some(d) = dwell {
            attrs.push(("dwell_ms".into(), d.to_string()));
        }
        metrics::counter!("hexfleet_zone_events_total", "kind" => name).increment(1);
        self.pending.push(DomainEvent {
            tenant: rec.tenant.clone(),
            entity: EntityKind::Zone,
            entity_id: zone.to_string(),
            kind: name.into(),
            actor: Who::Courier(rec.id.clone()).to_string(),
            reason,
            ts: e.at_ms,
            attrs,
        });
    }

    /// Sends queued events (publish now, log in the background) and tells area actors where
    /// this courier counts as supply. Call after a batch of fixes and on status changes.
    pub(crate) fn sync(&mut self, ctx: &FleetCtx, rec: &CourierRecord) {
        if !self.pending.is_empty() {
            let events = std::mem::take(&mut self.pending);
            for e in &events {
                ctx.publisher.publish(Update::Event(Arc::new(e.clone())));
            }
            ctx.zones.append_events(ctx, events);
        }
        let available = rec.status == CourierStatus::Available && rec.on_shift;
        if !self.dirty && self.last_available == Some(available) {
            return;
        }
        self.dirty = false;
        self.last_available = Some(available);
        let mut want: Vec<AreaKey> = Vec::new();
        if available {
            if let Some(c) = self.cell {
                want.push(AreaKey::Cell(rec.tenant.clone(), c));
            }
            want.extend(self.inside().into_iter().map(|z| AreaKey::Zone(rec.tenant.clone(), z)));
        }
        if want == self.counted {
            return;
        }
        for k in self.counted.iter().filter(|k| !want.contains(k)) {
            ctx.zones.send(k.clone(), AreaMsg::Courier { id: rec.id.clone(), inside: false });
        }
        for k in want.iter().filter(|k| !self.counted.contains(k)) {
            ctx.zones.send(k.clone(), AreaMsg::Courier { id: rec.id.clone(), inside: true });
        }
        self.counted = want;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_remembers_the_latest_deleted_fences_only() {
        let mut snap = ZoneSnapshot::default();
        for f in 0..(MAX_RETIRED as FenceId + 10) {
            snap.retire(f, ZoneId::new(format!("z{f}")), "hub".into());
        }
        assert_eq!(snap.retired.len(), MAX_RETIRED);
        assert_eq!(snap.name_of(9), None, "the oldest are forgotten");
        assert_eq!(snap.name_of(10), Some((ZoneId::new("z10"), "hub".to_owned())));
        let last = MAX_RETIRED as FenceId + 9;
        assert_eq!(snap.name_of(last).map(|(z, _)| z), Some(ZoneId::new(format!("z{last}"))));
    }
}
