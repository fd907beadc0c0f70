//! Zones at the actor level: geofence events (enter, exit, dwell, hysteresis, silent initial
//! state, closing exit), supply/demand/surge in zone and cell actors, supervised restart of a
//! zone actor, and service-area refusal. In-memory store, recording publisher, a manual clock
//! and fix times chosen by the test; every wait has a deadline.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use geo::{LineString, MultiPolygon, Polygon};
use hexfleet_actors::clock::ManualClock;
use hexfleet_actors::domain::{
    Actor as Who, CourierId, CourierStatus, DomainEvent, Fix, LatLng, OrderId, TenantId, ZoneId, ZoneRecord,
};
use hexfleet_actors::fleet::NewOrder;
use hexfleet_actors::order::Command;
use hexfleet_actors::publish::{Publisher, RecordingPublisher, Update};
use hexfleet_actors::store::MemoryStore;
use hexfleet_actors::zone::AreaStats;
use hexfleet_actors::{Fleet, FleetConfig, FleetDeps, FleetError};

const DEADLINE: Duration = Duration::from_secs(5);
const T0: i64 = 1_700_000_000_000;
/// Inside the square, far from its border.
const IN: (f64, f64) = (45.50, -73.60);
/// Outside, ~1.1 km north of the square.
const OUT: (f64, f64) = (45.52, -73.60);

struct Env {
    f: Fleet,
    p: Arc<RecordingPublisher>,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    t: TenantId,
}

async fn env_with(store: Arc<MemoryStore>) -> Env {
    env_configured(store, FleetConfig::default()).await
}

async fn env_configured(store: Arc<MemoryStore>, config: FleetConfig) -> Env {
    let p = Arc::new(RecordingPublisher::default());
    let clock = Arc::new(ManualClock::new(T0));
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), index_rebuild: Duration::from_millis(10), ..config };
    let f = Fleet::start(FleetDeps { store: store.clone(), publisher: p.clone(), clock: clock.clone(), config }).await.unwrap();
    Env { f, p, store, clock, t: TenantId::new("t") }
}

async fn env() -> Env {
    env_with(Arc::new(MemoryStore::new())).await
}

type Gate = (CourierId, tokio::sync::oneshot::Sender<()>, std::sync::mpsc::Receiver<()>);

/// Records like [`RecordingPublisher`]; once armed, the next status update of one courier parks
/// the actor that publishes it (that courier's) until released: a courier with a backlog, held
/// at a known point while the test changes the world around it.
struct GatedPublisher {
    inner: Arc<RecordingPublisher>,
    gate: parking_lot::Mutex<Option<Gate>>,
}

impl Publisher for GatedPublisher {
    fn publish(&self, u: Update) {
        let park = match &u {
            Update::CourierStatus { courier, .. } => {
                let mut g = self.gate.lock();
                if g.as_ref().is_some_and(|(c, _, _)| c == courier) { g.take() } else { None }
            }
            _ => None,
        };
        self.inner.publish(u);
        if let Some((_, arrived, release)) = park {
            let _ = arrived.send(());
            release.recv_timeout(DEADLINE).expect("the test releases the parked actor");
        }
    }
}

impl GatedPublisher {
    /// Arms the gate for `c`; returns (parked, release).
    fn arm(&self, c: &CourierId) -> (tokio::sync::oneshot::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        *self.gate.lock() = Some((c.clone(), arrived_tx, release_rx));
        (arrived, release)
    }
}

/// A ~1.5 km × 2.2 km square around (45.50, -73.60): lng -73.61..-73.59, lat 45.49..45.51.
fn square() -> MultiPolygon<f64> {
    let ring = LineString::from(vec![(-73.61, 45.49), (-73.59, 45.49), (-73.59, 45.51), (-73.61, 45.51), (-73.61, 45.49)]);
    MultiPolygon::new(vec![Polygon::new(ring, vec![])])
}

/// A square far away (Berlin).
fn elsewhere() -> MultiPolygon<f64> {
    let ring = LineString::from(vec![(13.3, 52.4), (13.5, 52.4), (13.5, 52.6), (13.3, 52.6), (13.3, 52.4)]);
    MultiPolygon::new(vec![Polygon::new(ring, vec![])])
}

fn zone(t: &TenantId, id: &str, kind: &str, geometry: MultiPolygon<f64>) -> ZoneRecord {
    ZoneRecord { tenant: t.clone(), id: ZoneId::new(id), kind: kind.into(), name: None, geometry, updated_at: 0 }
}

fn fix(p: (f64, f64), ts: i64) -> Fix {
    Fix { pos: LatLng::new(p.0, p.1).unwrap(), ts, speed: None, heading: None, acc: None }
}

fn attr<'a>(e: &'a DomainEvent, k: &str) -> Option<&'a str> {
    e.attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

fn is_event(u: &Update, kind: &str, courier: &str) -> bool {
    matches!(u, Update::Event(e) if e.kind == kind && attr(e, "courier_id") == Some(courier))
}

fn events(p: &RecordingPublisher, kind: &str, courier: &str) -> Vec<DomainEvent> {
    p.updates
        .lock()
        .iter()
        .filter_map(|u| match u {
            Update::Event(e) if e.kind == kind && attr(e, "courier_id") == Some(courier) => Some((**e).clone()),
            _ => None,
        })
        .collect()
}

impl Env {
    async fn courier(&self, id: &str, available: bool) -> CourierId {
        let c = CourierId::new(id);
        self.f.ensure_courier(&self.t, &c).await.unwrap();
        if available {
            self.f.set_status(&self.t, &c, CourierStatus::Available).unwrap();
        }
        c
    }

    /// Sends one fix and waits until the courier actor has processed it (its move is published
    /// after its geofence events).
    async fn drive(&self, c: &CourierId, p: (f64, f64), ts: i64) {
        self.f.ingest(&self.t, c, vec![fix(p, ts)]).unwrap();
        let ok = self.p.wait_for(DEADLINE, |u| matches!(u, Update::CourierMoved { courier, fix, .. } if courier == c && fix.ts == ts)).await;
        assert!(ok, "fix {ts} of {c} was not processed in time");
    }

    async fn wait_event(&self, kind: &str, courier: &str) -> DomainEvent {
        assert!(self.p.wait_for(DEADLINE, |u| is_event(u, kind, courier)).await, "no {kind} for {courier} within {DEADLINE:?}");
        events(&self.p, kind, courier).remove(0)
    }

    async fn put(&self, z: ZoneRecord) {
        self.f.put_zone(&self.t, z, &Who::Dispatcher("d".into())).await.unwrap();
    }

    async fn order(&self, id: &str, pickup: (f64, f64), dropoff: (f64, f64)) -> Result<(), FleetError> {
        let new = NewOrder {
            id: Some(OrderId::new(id)),
            pickup: LatLng::new(pickup.0, pickup.1).unwrap(),
            dropoff: LatLng::new(dropoff.0, dropoff.1).unwrap(),
            size: 1,
            ready_at: None,
            deliver_by: None,
        };
        self.f.create_order(&self.t, new, &Who::Dispatcher("d".into())).await.map(|_| ())
    }

    /// Waits until the zone's counts are `want`.
    async fn zone_stats_become(&self, z: &str, want: (usize, usize)) -> AreaStats {
        let id = ZoneId::new(z);
        let start = tokio::time::Instant::now();
        loop {
            let s = self.f.zone_stats(&self.t, &id);
            if let Some(s) = s.filter(|s| (s.supply, s.demand) == want) {
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "zone {z} stats {s:?}, want supply/demand {want:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn cell_stats_become(&self, at: (f64, f64), want: (usize, usize)) -> AreaStats {
        let p = LatLng::new(at.0, at.1).unwrap();
        let start = tokio::time::Instant::now();
        loop {
            let s = self.f.cell_stats(&self.t, p);
            if (s.supply, s.demand) == want {
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "cell stats {s:?}, want supply/demand {want:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn enter_dwell_and_exit_are_published_and_logged_in_fix_time() {
    let e = env().await;
    let c = e.courier("c1", true).await;
    e.put(zone(&e.t, "z1", "hub", square())).await;
    e.drive(&c, OUT, T0).await;
    e.drive(&c, IN, T0 + 60_000).await;
    let enter = e.wait_event("zone.enter", "c1").await;
    assert_eq!((enter.entity_id.as_str(), enter.ts), ("z1", T0 + 60_000));
    assert_eq!(enter.actor, "courier:c1");
    // Not yet two minutes inside: no dwell.
    e.drive(&c, (45.5001, -73.60), T0 + 120_000).await;
    assert!(events(&e.p, "zone.dwell", "c1").is_empty());
    e.drive(&c, (45.5002, -73.60), T0 + 200_000).await;
    let dwell = e.wait_event("zone.dwell", "c1").await;
    assert_eq!(attr(&dwell, "dwell_ms"), Some("140000"));
    e.drive(&c, OUT, T0 + 260_000).await;
    let exit = e.wait_event("zone.exit", "c1").await;
    assert_eq!(exit.ts, T0 + 260_000);
    assert_eq!(attr(&exit, "dwell_ms"), Some("200000"));
    assert_eq!(exit.reason, None);
    assert_eq!(events(&e.p, "zone.enter", "c1").len(), 1, "one stay, one enter");
    // The event log gets them too (written in the background).
    let start = tokio::time::Instant::now();
    loop {
        let kinds: Vec<String> = e.store.all_events().into_iter().filter(|x| x.kind.starts_with("zone.")).map(|x| x.kind).collect();
        if kinds == ["zone.created", "zone.enter", "zone.dwell", "zone.exit"] {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "event log has {kinds:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn jitter_at_the_border_does_not_flap() {
    let e = env().await;
    let c = e.courier("c1", true).await;
    e.put(zone(&e.t, "z1", "hub", square())).await;
    // The north border is at lat 45.51; ±0.0001° is ±11 m, under the 25 m margin.
    e.drive(&c, (45.5103, -73.60), T0).await;
    for i in 1..=20 {
        let lat = if i % 2 == 0 { 45.5101 } else { 45.5099 };
        e.drive(&c, (lat, -73.60), T0 + i * 5_000).await;
    }
    assert!(events(&e.p, "zone.enter", "c1").is_empty(), "jitter entered the zone");
    // A real crossing enters once: three fixes in a row inside confirm it.
    for i in 21..=23 {
        e.drive(&c, (45.5095, -73.60), T0 + i * 5_000).await;
    }
    let enter = e.wait_event("zone.enter", "c1").await;
    assert_eq!(enter.ts, T0 + 21 * 5_000, "the event is timed by the first fix inside");
    // Jitter from inside does not exit.
    for i in 24..=40 {
        let lat = if i % 2 == 0 { 45.5101 } else { 45.5099 };
        e.drive(&c, (lat, -73.60), T0 + i * 5_000).await;
    }
    assert!(events(&e.p, "zone.exit", "c1").is_empty(), "jitter left the zone");
    assert_eq!(events(&e.p, "zone.enter", "c1").len(), 1);
}

#[tokio::test]
async fn a_fence_drawn_around_a_parked_courier_gives_no_enter_but_counts_it() {
    let e = env().await;
    let c = e.courier("c1", true).await;
    e.drive(&c, IN, T0).await;
    e.drive(&c, IN, T0 + 5_000).await;
    e.clock.set(T0 + 7_000);
    e.put(zone(&e.t, "z1", "hub", square())).await;
    for i in 2..6 {
        e.drive(&c, IN, T0 + i * 5_000).await;
    }
    assert!(events(&e.p, "zone.enter", "c1").is_empty(), "spurious enter for a parked courier");
    e.zone_stats_become("z1", (1, 0)).await;
    // Its dwell counts from the fence's creation.
    e.drive(&c, IN, T0 + 130_000).await;
    let dwell = e.wait_event("zone.dwell", "c1").await;
    assert_eq!(attr(&dwell, "dwell_ms"), Some("123000"));
}

#[tokio::test]
async fn deleting_a_zone_closes_the_stay_of_couriers_inside() {
    let e = env().await;
    let c = e.courier("c1", true).await;
    let out = e.courier("c2", true).await;
    e.put(zone(&e.t, "z1", "hub", square())).await;
    e.drive(&c, OUT, T0).await;
    e.drive(&out, OUT, T0).await;
    e.drive(&c, IN, T0 + 60_000).await;
    e.wait_event("zone.enter", "c1").await;
    e.zone_stats_become("z1", (1, 0)).await;
    e.clock.set(T0 + 90_000);
    e.f.delete_zone(&e.t, &ZoneId::new("z1"), &Who::Dispatcher("d".into())).await.unwrap();
    let exit = e.wait_event("zone.exit", "c1").await;
    assert_eq!(exit.reason.as_deref(), Some("zone deleted"));
    assert_eq!((exit.ts, attr(&exit, "dwell_ms")), (T0 + 90_000, Some("30000")));
    assert!(e.f.zones(&e.t).is_empty());
    assert!(e.f.zone_stats(&e.t, &ZoneId::new("z1")).is_none());
    assert!(matches!(e.f.delete_zone(&e.t, &ZoneId::new("z1"), &Who::System).await, Err(FleetError::NotFound { .. })));
    // The courier outside gets nothing; moving on after the deletion gives no second exit.
    e.drive(&c, OUT, T0 + 150_000).await;
    e.drive(&out, OUT, T0 + 150_000).await;
    assert!(events(&e.p, "zone.exit", "c2").is_empty());
    assert_eq!(events(&e.p, "zone.exit", "c1").len(), 1);
    assert!(e.store.all_events().iter().any(|x| x.kind == "zone.deleted" && x.entity_id == "z1"));
}

/// A zone deleted and created again under the same id while a courier inside has a backlog:
/// the courier hears of the new zone (at its next fix) before the deletion, and still counts
/// as the new zone's supply. It used to see the zone's key already counted and never tell the
/// new zone's actor, so the zone showed no supply while the courier stood in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_recreated_while_a_courier_inside_is_busy_counts_it() {
    let inner = Arc::new(RecordingPublisher::default());
    let gated = Arc::new(GatedPublisher { inner: inner.clone(), gate: parking_lot::Mutex::new(None) });
    let clock = Arc::new(ManualClock::new(T0));
    let store = Arc::new(MemoryStore::new());
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), index_rebuild: Duration::from_millis(10), ..FleetConfig::default() };
    let f = Fleet::start(FleetDeps { store: store.clone(), publisher: gated.clone(), clock: clock.clone(), config }).await.unwrap();
    let e = Env { f, p: inner, store, clock, t: TenantId::new("t") };
    let c = e.courier("c1", true).await;
    e.put(zone(&e.t, "z1", "hub", square())).await;
    e.drive(&c, OUT, T0).await;
    e.drive(&c, IN, T0 + 60_000).await;
    e.wait_event("zone.enter", "c1").await;
    e.zone_stats_become("z1", (1, 0)).await;
    // Park the courier's actor, then queue a fix, delete the zone and create it again.
    let (parked, release) = gated.arm(&c);
    e.f.set_status(&e.t, &c, CourierStatus::Available).unwrap();
    tokio::time::timeout(DEADLINE, parked).await.expect("the courier's actor parked").unwrap();
    e.f.ingest(&e.t, &c, vec![fix(IN, T0 + 120_000)]).unwrap();
    e.f.delete_zone(&e.t, &ZoneId::new("z1"), &Who::Dispatcher("d".into())).await.unwrap();
    e.put(zone(&e.t, "z1", "hub", square())).await;
    release.send(()).unwrap();
    // The fix (which sees the new zone), then the deletion's closing exit.
    assert!(e.p.wait_for(DEADLINE, |u| matches!(u, Update::CourierMoved { fix, .. } if fix.ts == T0 + 120_000)).await);
    let exit = e.wait_event("zone.exit", "c1").await;
    assert_eq!(exit.reason.as_deref(), Some("zone deleted"));
    e.f.trail(&e.t, &c).await.unwrap(); // queued behind the deletion notice: it was handled
    e.zone_stats_become("z1", (1, 0)).await;
    e.drive(&c, IN, T0 + 125_000).await;
    e.zone_stats_become("z1", (1, 0)).await;
    // And leaving the new zone leaves its supply.
    e.drive(&c, OUT, T0 + 180_000).await;
    e.zone_stats_become("z1", (0, 0)).await;
}

#[tokio::test]
async fn supply_demand_and_surge_per_zone_and_cell_and_a_zone_actor_restart() {
    let e = env().await;
    e.put(zone(&e.t, "z1", "hub", square())).await;
    let c1 = e.courier("c1", true).await;
    let c2 = e.courier("c2", true).await;
    let c3 = e.courier("c3", false).await; // offline: not supply
    for c in [&c1, &c2, &c3] {
        e.drive(c, OUT, T0).await;
        e.drive(c, IN, T0 + 60_000).await;
    }
    for o in ["o1", "o2", "o3"] {
        e.order(o, IN, OUT).await.unwrap();
    }
    e.order("o4", OUT, IN).await.unwrap(); // pickup outside the zone
    let s = e.zone_stats_become("z1", (2, 3)).await;
    assert_eq!(s.surge, 1.5);
    let cell = e.cell_stats_become(IN, (2, 3)).await;
    assert_eq!(cell.surge, 1.5);
    e.cell_stats_become(OUT, (0, 1)).await;
    // Going offline leaves supply; a cancelled order leaves demand.
    e.f.set_status(&e.t, &c1, CourierStatus::Offline).unwrap();
    let s = e.zone_stats_become("z1", (1, 3)).await;
    assert_eq!(s.surge, 3.0);
    e.f.command(&e.t, &OrderId::new("o1"), Command::Cancel, Who::Dispatcher("d".into())).await.unwrap();
    e.zone_stats_become("z1", (1, 2)).await;
    e.cell_stats_become(IN, (1, 2)).await;

    // A zone created around waiting orders starts with them as demand.
    e.put(zone(&e.t, "z2", "hub", square())).await;
    e.zone_stats_become("z2", (0, 2)).await;

    // The zone actor panics: it is restarted and keeps counting from where it was.
    let key = hexfleet_actors::zone::AreaKey::Zone(e.t.clone(), ZoneId::new("z1"));
    let before = e.f.ctx().zones.area_actor(&key).unwrap().get_id();
    e.f.crash_zone_actor(&e.t, &ZoneId::new("z1"));
    let start = tokio::time::Instant::now();
    while e.f.ctx().zones.area_actor(&key).is_none_or(|a| a.get_id() == before) {
        assert!(start.elapsed() < DEADLINE, "zone actor was not restarted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    e.f.set_status(&e.t, &c3, CourierStatus::Available).unwrap();
    e.zone_stats_become("z1", (2, 2)).await;
    e.order("o5", IN, OUT).await.unwrap();
    e.zone_stats_become("z1", (2, 3)).await;
    // Leaving the zone leaves its supply.
    e.drive(&c2, OUT, T0 + 120_000).await;
    e.zone_stats_become("z1", (1, 3)).await;
    e.cell_stats_become(OUT, (1, 1)).await;
    // A courier not heard from for `courier_stale_ms` (server clock) is no supply, as it gets
    // no orders (an app that died stays "available"); it is again once it sends a fix.
    e.clock.set(T0 + FleetConfig::default().courier_stale_ms + 1);
    e.zone_stats_become("z1", (0, 3)).await;
    e.cell_stats_become(OUT, (0, 1)).await;
    e.drive(&c3, IN, T0 + 200_000).await;
    e.zone_stats_become("z1", (1, 3)).await;
}

#[tokio::test]
async fn orders_outside_every_service_area_are_refused() {
    let e = env().await;
    // No service area: anything goes; other kinds of zone do not restrict.
    e.order("free", OUT, (40.0, -70.0)).await.unwrap();
    e.put(zone(&e.t, "hub", "hub", square())).await;
    e.order("free2", OUT, (40.0, -70.0)).await.unwrap();
    e.put(zone(&e.t, "mtl", "service_area", square())).await;
    e.put(zone(&e.t, "ber", "service_area", elsewhere())).await;
    e.order("inside", IN, (45.495, -73.605)).await.unwrap();
    e.order("across", IN, (52.5, 13.4)).await.unwrap();
    assert!(matches!(e.order("bad_pickup", OUT, IN).await, Err(FleetError::OutsideServiceArea)));
    assert!(matches!(e.order("bad_dropoff", IN, OUT).await, Err(FleetError::OutsideServiceArea)));
    assert!(e.f.order(&e.t, &OrderId::new("bad_pickup")).await.is_err(), "a refused order is not stored");
    // Another tenant is not restricted by this one's areas.
    let other = TenantId::new("other");
    let new = NewOrder { id: None, pickup: LatLng::new(OUT.0, OUT.1).unwrap(), dropoff: LatLng::new(OUT.0, OUT.1).unwrap(), size: 1, ready_at: None, deliver_by: None };
    e.f.create_order(&other, new, &Who::System).await.unwrap();
    // Deleting the last service areas lifts the restriction.
    e.f.delete_zone(&e.t, &ZoneId::new("mtl"), &Who::System).await.unwrap();
    e.f.delete_zone(&e.t, &ZoneId::new("ber"), &Who::System).await.unwrap();
    e.order("free3", OUT, OUT).await.unwrap();
}

#[tokio::test]
async fn zones_are_durable_and_recovered_at_start() {
    let store = Arc::new(MemoryStore::new());
    let e = env_with(store.clone()).await;
    e.put(zone(&e.t, "z1", "service_area", square())).await;
    e.put(zone(&e.t, "z2", "hub", elsewhere())).await;
    let mut z = zone(&e.t, "z2", "restricted", elsewhere());
    z.name = Some("Mitte".into());
    e.put(z).await;
    let kinds: Vec<String> = store.all_events().into_iter().map(|x| x.kind).collect();
    assert_eq!(kinds, ["zone.created", "zone.created", "zone.updated"]);
    e.f.shutdown().await.unwrap();
    let e2 = env_with(store).await;
    let zs = e2.f.zones(&e2.t);
    assert_eq!(zs.iter().map(|z| z.id.as_str()).collect::<Vec<_>>(), ["z1", "z2"]);
    assert_eq!((zs[1].kind.as_str(), zs[1].name.as_deref()), ("restricted", Some("Mitte")));
    assert!(matches!(e2.order("x", OUT, IN).await, Err(FleetError::OutsideServiceArea)), "service area recovered");
    e2.zone_stats_become("z1", (0, 0)).await;
    // A store outage refuses the write and changes nothing.
    e2.store.set_down(true);
    let r = e2.f.put_zone(&e2.t, zone(&e2.t, "z3", "hub", square()), &Who::System).await;
    assert!(matches!(r, Err(FleetError::Store(_))));
    assert_eq!(e2.f.zones(&e2.t).len(), 2);
    e2.store.set_down(false);
    // Invalid geometry is refused before anything is written.
    let bad = MultiPolygon::new(vec![Polygon::new(LineString::from(vec![(0.0, 0.0), (1.0, 1.0)]), vec![])]);
    assert!(matches!(e2.f.put_zone(&e2.t, zone(&e2.t, "z4", "hub", bad), &Who::System).await, Err(FleetError::Invalid(_))));
}

#[tokio::test]
async fn fixes_are_evaluated_in_fix_time_order_and_late_fixes_do_not_move_fences() {
    let e = env().await;
    let c = e.courier("c1", true).await;
    e.put(zone(&e.t, "z1", "hub", square())).await;
    e.drive(&c, OUT, T0).await;
    // One buffered batch, out of order: sorted by fix time, the courier entered at T0+60s and
    // left at T0+180s.
    e.f.ingest(&e.t, &c, vec![fix(OUT, T0 + 180_000), fix(IN, T0 + 60_000), fix((45.5001, -73.60), T0 + 120_000)]).unwrap();
    let exit = e.wait_event("zone.exit", "c1").await;
    let enter = e.wait_event("zone.enter", "c1").await;
    assert_eq!((enter.ts, exit.ts), (T0 + 60_000, T0 + 180_000));
    assert_eq!(attr(&exit, "dwell_ms"), Some("120000"));
    // A late fix inside (older than the latest) goes to the trail only: no second enter.
    e.f.ingest(&e.t, &c, vec![fix(IN, T0 + 150_000)]).unwrap();
    e.drive(&c, OUT, T0 + 240_000).await;
    assert_eq!(events(&e.p, "zone.enter", "c1").len(), 1);
    assert_eq!(events(&e.p, "zone.exit", "c1").len(), 1);
    e.zone_stats_become("z1", (0, 0)).await;
}

/// Two nodes on one store and no notifications at all: the periodic check alone brings the
/// second node's zones in line with what the first one wrote (create, replace, delete).
#[tokio::test]
async fn the_periodic_check_syncs_zones_changed_by_another_node() {
    let store = Arc::new(MemoryStore::new());
    let a = env_with(store.clone()).await;
    let b = env_configured(store, FleetConfig { zone_resync: Some(Duration::from_millis(20)), ..Default::default() }).await;
    let has = |e: &Env, kind: &'static str| {
        let zs = e.f.zones(&e.t);
        zs.len() == 1 && zs[0].kind == kind
    };
    a.put(zone(&a.t, "z1", "hub", square())).await;
    assert!(eventually(|| has(&b, "hub")).await, "created elsewhere");
    // Replaced within the same millisecond: still a new version.
    a.put(zone(&a.t, "z1", "restricted", square())).await;
    assert!(eventually(|| has(&b, "restricted")).await, "replaced elsewhere");
    a.f.delete_zone(&a.t, &ZoneId::new("z1"), &Who::System).await.unwrap();
    assert!(eventually(|| b.f.zones(&b.t).is_empty()).await, "deleted elsewhere");
    // The node that learned it this way refuses orders outside it like the writer does.
    a.put(zone(&a.t, "sa", "service_area", square())).await;
    assert!(eventually(|| has(&b, "service_area")).await);
    assert!(matches!(b.order("x", OUT, IN).await, Err(FleetError::OutsideServiceArea)));
}

/// A stored zone this build refuses (an older build's: beyond 85° of latitude) is skipped by
/// the periodic check, which still syncs the others: it used to end every pass with an error,
/// leaving the zones after it (in random order) unsynced.
#[tokio::test]
async fn the_periodic_check_skips_a_stored_zone_it_cannot_install() {
    use hexfleet_actors::store::{Store as _, Write};
    let store = Arc::new(MemoryStore::new());
    let b = env_with(store.clone()).await;
    let polar = MultiPolygon::new(vec![Polygon::new(LineString::from(vec![(10.0, 88.0), (11.0, 88.0), (11.0, 89.0), (10.0, 88.0)]), vec![])]);
    store.commit(vec![Write::Zone(zone(&b.t, "z-polar", "hub", polar)), Write::Zone(zone(&b.t, "z-ok", "hub", square()))]).await.unwrap();
    for pass in 0..3 {
        let changed = b.f.resync_zones().await;
        assert!(changed.is_ok(), "pass {pass}: {changed:?}");
        let ids: Vec<String> = b.f.zones(&b.t).iter().map(|z| z.id.to_string()).collect();
        assert_eq!(ids, vec!["z-ok".to_owned()], "pass {pass}");
    }
}
