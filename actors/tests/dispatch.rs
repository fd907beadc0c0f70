//! Dispatch tests with injected time: the wall clock is a `ManualClock` the test advances, and
//! dispatch rounds run when the test asks (`dispatch_now`; the periodic tick is an hour). Every
//! wait is on an observable event with a deadline.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use hexfleet_actors::clock::ManualClock;
use hexfleet_actors::domain::{Actor as Who, CourierId, CourierStatus, Fix, LatLng, Order, OrderId, OrderState, TenantId};
use hexfleet_actors::fleet::{CourierPatch, DispatchPolicy, NewOrder};
use hexfleet_actors::order::Command;
use hexfleet_actors::publish::{CourierNotice, RecordingPublisher, Update};
use hexfleet_actors::store::MemoryStore;
use hexfleet_actors::{Fleet, FleetConfig, FleetDeps, FleetError};

const DEADLINE: Duration = Duration::from_secs(5);
const T0: i64 = 1_764_000_000_000;
/// Metres per degree of latitude.
const M: f64 = 111_195.0;
const BASE: (f64, f64) = (45.50, -73.57);

struct World {
    f: Fleet,
    p: Arc<RecordingPublisher>,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    t: TenantId,
}

async fn world(config: FleetConfig) -> World {
    let p = Arc::new(RecordingPublisher::default());
    let clock = Arc::new(ManualClock::new(T0));
    let store = Arc::new(MemoryStore::new());
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), index_rebuild: Duration::from_millis(5), ..config };
    let f = Fleet::start(FleetDeps { store: store.clone(), publisher: p.clone(), clock: clock.clone(), config }).await.unwrap();
    World { f, p, clock, store, t: TenantId::new("t") }
}

/// A point `north_m` metres north and `east_m` metres east of [`BASE`].
fn at(north_m: f64, east_m: f64) -> LatLng {
    LatLng::new(BASE.0 + north_m / M, BASE.1 + east_m / (M * BASE.0.to_radians().cos())).unwrap()
}

impl World {
    /// An available courier of `capacity` at `pos`, visible in the index.
    async fn courier(&self, id: &str, pos: LatLng, capacity: u16) -> CourierId {
        let c = CourierId::new(id);
        let patch = CourierPatch { capacity: Some(capacity), ..Default::default() };
        self.f.upsert_courier(&self.t, &c, patch, &Who::System).await.unwrap();
        self.f.set_status(&self.t, &c, CourierStatus::Available).unwrap();
        let ts = self.clock.now();
        self.f.ingest(&self.t, &c, vec![Fix { pos, ts, speed: None, heading: None, acc: None }]).unwrap();
        self.wait_indexed(&c, pos, true).await;
        c
    }

    /// `c` reports a fix at `pos` now; waits until its actor has taken it.
    async fn fix_now(&self, c: &CourierId, pos: LatLng) {
        let ts = self.clock.now();
        self.f.ingest(&self.t, c, vec![Fix { pos, ts, speed: None, heading: None, acc: None }]).unwrap();
        assert!(eventually(|| self.f.courier(&self.t, c).is_ok_and(|r| r.last_fix.is_some_and(|f| f.ts == ts))).await, "{c}'s fix never taken");
    }

    /// Waits until the index snapshot shows `c` at `pos` with the given availability.
    async fn wait_indexed(&self, c: &CourierId, pos: LatLng, available: bool) {
        let ok = tokio::time::timeout(DEADLINE, async {
            while !self.f.nearby(&self.t, pos, 50, Some(1.0)).await.iter().any(|n| n.courier.id == *c && (n.courier.status == CourierStatus::Available) == available) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .is_ok();
        assert!(ok, "courier {c} never showed up in the index");
    }

    async fn order(&self, id: &str, pickup: LatLng, dropoff: LatLng) -> OrderId {
        let new = NewOrder { id: Some(OrderId::new(id)), pickup, dropoff, size: 1, ready_at: None, deliver_by: None };
        self.f.create_order(&self.t, new, &Who::Dispatcher("d".into())).await.unwrap().id.clone()
    }

    async fn get(&self, id: &OrderId) -> Arc<Order> {
        self.f.order(&self.t, id).await.unwrap()
    }

    /// Waits until the order satisfies `pred`.
    async fn wait_order(&self, id: &OrderId, what: &str, pred: impl Fn(&Order) -> bool) -> Arc<Order> {
        let res = tokio::time::timeout(DEADLINE, async {
            loop {
                let o = self.get(id).await;
                if pred(&o) {
                    return o;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        match res {
            Ok(o) => o,
            Err(_) => panic!("order {id} never became {what}; it is {:?}", self.get(id).await),
        }
    }

    async fn offered_to(&self, id: &OrderId, c: &CourierId) -> Arc<Order> {
        self.wait_order(id, &format!("offered to {c}"), |o| o.state == OrderState::Offered && o.offer.as_ref().is_some_and(|x| x.courier == *c)).await
    }

    async fn tick(&self) {
        self.f.dispatch_now(&self.t).await.unwrap();
    }

    /// Ticks, lets the order actors apply what the round decided, and checks the invariants.
    async fn settle(&self) {
        self.tick().await;
        let bad = self.f.check_invariants().await;
        assert!(bad.is_empty(), "invariants broken: {bad:?}");
    }

    /// The last `route` sent to a courier.
    fn last_route(&self, c: &CourierId) -> Option<Vec<(String, bool)>> {
        self.p.updates.lock().iter().rev().find_map(|u| match u {
            Update::ToCourier { courier, notice: CourierNotice::Route { stops }, .. } if courier == c => {
                Some(stops.iter().map(|s| (s.order.to_string(), s.pickup)).collect())
            }
            _ => None,
        })
    }
}

trait Now {
    fn now(&self) -> i64;
}
impl Now for ManualClock {
    fn now(&self) -> i64 {
        use hexfleet_actors::clock::Clock;
        self.now_ms()
    }
}


#[tokio::test]
async fn the_nearest_courier_gets_the_offer_and_the_record_says_why() {
    let w = world(FleetConfig::default()).await;
    let near = w.courier("near", at(100.0, 0.0), 1).await;
    let far = w.courier("far", at(-1500.0, 0.0), 1).await;
    let o = w.order("o1", at(0.0, 0.0), at(2000.0, 0.0)).await;
    w.settle().await;
    let got = w.offered_to(&o, &near).await;
    let rec = got.assignment.as_ref().expect("assignment record");
    assert_eq!(rec.policy, "optimal");
    let ids: Vec<&CourierId> = rec.candidates.iter().map(|c| &c.0).collect();
    assert_eq!(ids, vec![&near, &far], "both candidates, cheapest first");
    assert!(rec.candidates[0].1 < rec.candidates[1].1);
    // ETA to a pickup 100 m away on a bike: 100 × 1.3 / 4.5 ≈ 29 s.
    assert!((rec.cost_s - 100.0 * 1.3 / 4.5).abs() < 2.0, "cost {}", rec.cost_s);
}

/// Couriers `a` (50 m from the pickup) and `b` (800 m), one order offered to `a`; offers last
/// 20 s, orders expire after 10 min.
async fn offered_to_the_nearer_of_two() -> (World, CourierId, CourierId, OrderId) {
    let w = world(FleetConfig { offer_timeout_ms: 20_000, order_expiry_ms: 10 * 60_000, ..Default::default() }).await;
    let a = w.courier("a", at(50.0, 0.0), 1).await;
    let b = w.courier("b", at(-800.0, 0.0), 1).await;
    let o = w.order("o1", at(0.0, 0.0), at(1000.0, 0.0)).await;
    w.settle().await;
    w.offered_to(&o, &a).await;
    (w, a, b, o)
}

#[tokio::test]
async fn a_lapsed_offer_is_redispatched_without_that_courier_and_unwanted_orders_expire() {
    let (w, a, b, o) = offered_to_the_nearer_of_two().await;

    // Not yet lapsed: nothing changes.
    w.clock.advance(19_000);
    w.settle().await;
    assert_eq!(w.get(&o).await.offer.as_ref().unwrap().courier, a);

    // Lapsed: too late to accept, even before the tick says so; back to created with `a`
    // excluded, then offered to `b`.
    w.clock.advance(1_001);
    let late = w.f.command(&w.t, &o, Command::Accept { courier: a.clone() }, Who::Courier(a.clone())).await;
    assert!(matches!(late, Err(FleetError::Conflict(_))), "a late accept: {late:?}");
    w.tick().await;
    let back = w.wait_order(&o, "created again", |o| o.state == OrderState::Created).await;
    assert_eq!(back.declined, vec![a.clone()]);
    w.settle().await;
    let again = w.offered_to(&o, &b).await;
    assert!(again.assignment.as_ref().unwrap().candidates.iter().all(|c| c.0 != a), "a is not a candidate any more");

    // `b` declines: nobody is left, the order waits...
    w.f.command(&w.t, &o, Command::Decline { courier: b.clone() }, Who::Courier(b.clone())).await.unwrap();
    w.settle().await;
    w.settle().await;
    let waiting = w.get(&o).await;
    assert_eq!((waiting.state, waiting.declined.len()), (OrderState::Created, 2));
    // Back to `created` twice, but one order: the log says what happened, not `order.created`
    // again (webhooks on new orders fired for every decline and lapse).
    let kinds: Vec<(String, Option<String>)> = w.store.all_events().into_iter().filter(|e| e.entity_id == o.as_str()).map(|e| (e.kind, e.reason)).collect();
    let of = |k: &str| kinds.iter().filter(|(kind, _)| kind == k).map(|(_, r)| r.clone().unwrap_or_default()).collect::<Vec<_>>();
    assert_eq!(of("order.created").len(), 1, "{kinds:?}");
    assert_eq!(of("order.offer_lapsed"), [format!("offer to {a} lapsed")], "{kinds:?}");
    assert_eq!(of("order.declined"), [format!("declined by {b}")], "{kinds:?}");
    // ...and expires once nobody took it in time.
    w.clock.advance(10 * 60_000);
    w.tick().await;
    let expired = w.wait_order(&o, "expired", |o| o.state == OrderState::Expired).await;
    assert!(expired.courier.is_none());
    assert!(w.f.check_invariants().await.is_empty());
}

/// An order no courier of the tenant can carry is accepted (a bigger vehicle may join) and
/// expires like any other, its event saying why; one that merely found nobody says that.
#[tokio::test]
async fn an_order_too_big_for_every_courier_expires_saying_why() {
    let w = world(FleetConfig { order_expiry_ms: 10 * 60_000, ..Default::default() }).await;
    w.courier("a", at(50.0, 0.0), 2).await;
    w.courier("b", at(80.0, 0.0), 3).await;
    let big = NewOrder { id: Some(OrderId::new("big")), pickup: at(0.0, 0.0), dropoff: at(900.0, 0.0), size: 4, ready_at: None, deliver_by: None };
    let big = w.f.create_order(&w.t, big, &Who::Dispatcher("d".into())).await.unwrap().id.clone();
    let declined = w.order("declined", at(0.0, 0.0), at(900.0, 0.0)).await;
    // `declined` is offered to each courier in turn and declined: it waits, as `big` does.
    for _ in 0..2 {
        w.settle().await;
        let o = w.wait_order(&declined, "offered", |o| o.offer.is_some()).await;
        let to = o.offer.as_ref().unwrap().courier.clone();
        w.f.command(&w.t, &declined, Command::Decline { courier: to.clone() }, Who::Courier(to)).await.unwrap();
    }
    w.settle().await;
    assert_eq!(w.get(&big).await.state, OrderState::Created, "never offered");
    w.clock.advance(10 * 60_000);
    w.tick().await;
    for o in [&big, &declined] {
        w.wait_order(o, "expired", |o| o.state == OrderState::Expired).await;
    }
    let reason = |id: &OrderId| w.store.all_events().into_iter().rfind(|e| e.entity_id == id.as_str()).and_then(|e| e.reason);
    assert_eq!(reason(&big).as_deref(), Some("no courier can carry it: size 4 is over the largest capacity, 3"));
    assert_eq!(reason(&declined).as_deref(), Some("no courier took the order in time"));
}

/// A courier that cannot make it hands an order back before pickup (or a dispatcher takes it
/// back): the order goes back to `created` without that courier, is offered to someone else,
/// and its wait restarts, so an order handed back late is not expired before dispatch could
/// place it. Once the goods are on board it can no longer be handed back.
#[tokio::test]
async fn an_order_handed_back_before_pickup_goes_to_another_courier() {
    let (w, a, b, o) = offered_to_the_nearer_of_two().await;
    w.f.command(&w.t, &o, Command::Accept { courier: a.clone() }, Who::Courier(a.clone())).await.unwrap();

    // Nine minutes on, `a` hands it back. Only the holder may, and only before pickup.
    w.clock.advance(9 * 60_000);
    let not_b = w.f.command(&w.t, &o, Command::Release { courier: Some(b.clone()) }, Who::Courier(b.clone())).await;
    assert!(matches!(not_b, Err(FleetError::NotFound { .. })), "b does not hold it (and is not told its state): {not_b:?}");
    let back = w.f.command(&w.t, &o, Command::Release { courier: Some(a.clone()) }, Who::Courier(a.clone())).await.unwrap();
    assert_eq!((back.state, back.courier.as_ref(), back.offer.as_ref()), (OrderState::Created, None, None));
    assert_eq!((back.declined.clone(), back.released_at), (vec![a.clone()], Some(w.clock.now())));
    assert!(back.assignment.is_none());
    let told = w.p.updates.lock().iter().any(|u| {
        matches!(u, Update::ToCourier { courier, notice: CourierNotice::OrderUpdate(x), .. } if *courier == a && x.id == o && x.state == OrderState::Created)
    });
    assert!(told, "a is told the order left it");
    let ev = w.store.all_events().into_iter().rfind(|e| e.entity_id == o.as_str()).unwrap();
    assert_eq!((ev.kind.as_str(), ev.reason.as_deref()), ("order.released", Some("handed back by a")), "{ev:?}");
    assert!(ev.attrs.contains(&("courier".into(), "a".into())), "{ev:?}");
    assert!(w.f.check_invariants().await.is_empty(), "a's capacity is free again");

    // Eleven minutes after creation, two after the hand-back: not expired, offered to `b`.
    w.clock.advance(2 * 60_000);
    w.fix_now(&b, at(-800.0, 0.0)).await;
    w.fix_now(&a, at(50.0, 0.0)).await;
    w.settle().await;
    w.offered_to(&o, &b).await;
    w.f.command(&w.t, &o, Command::Accept { courier: b.clone() }, Who::Courier(b.clone())).await.unwrap();
    w.f.command(&w.t, &o, Command::PickedUp { courier: b.clone() }, Who::Courier(b.clone())).await.unwrap();
    for (cmd, who) in [(Command::Release { courier: Some(b.clone()) }, Who::Courier(b.clone())), (Command::Release { courier: None }, Who::Dispatcher("d".into()))] {
        let on_board = w.f.command(&w.t, &o, cmd, who).await;
        assert!(matches!(on_board, Err(FleetError::InvalidTransition { .. })), "picked up: {on_board:?}");
    }

    // A dispatcher takes back an offer too.
    let o2 = w.order("o2", at(0.0, 10.0), at(1000.0, 0.0)).await;
    w.settle().await;
    w.offered_to(&o2, &a).await;
    let back = w.f.command(&w.t, &o2, Command::Release { courier: None }, Who::Dispatcher("d".into())).await.unwrap();
    assert_eq!((back.state, back.declined.clone()), (OrderState::Created, vec![a.clone()]));
    let ev = w.store.all_events().into_iter().rfind(|e| e.entity_id == o2.as_str()).unwrap();
    assert_eq!((ev.kind.as_str(), ev.reason.as_deref()), ("order.released", Some("taken back from a")), "{ev:?}");
    assert!(w.f.check_invariants().await.is_empty());
}

/// A courier that goes silent while holding orders is reported once (`courier.silent`, with
/// its orders), and cleared once when it is heard again or holds nothing any more; one that
/// holds nothing is not reported. Nobody is reported in the dispatcher's first
/// `courier_stale_ms` (a restart: apps have not reconnected yet), and a courier that never
/// sent a fix is reported without a made-up duration.
#[tokio::test]
async fn a_courier_gone_silent_with_orders_is_reported_to_dispatchers_once() {
    let w = world(FleetConfig { courier_stale_ms: 120_000, ..Default::default() }).await;
    let a = w.courier("a", at(50.0, 0.0), 2).await;
    let idle = w.courier("idle", at(-3000.0, 0.0), 1).await;
    // `mute` never sent a fix; a dispatcher assigns it an order all the same.
    let mute = CourierId::new("mute");
    w.f.upsert_courier(&w.t, &mute, CourierPatch { capacity: Some(1), ..Default::default() }, &Who::System).await.unwrap();
    let m = w.order("m1", at(0.0, 500.0), at(1000.0, 500.0)).await;
    w.f.assign(&w.t, &m, &mute, Who::Dispatcher("d".into())).await.unwrap();
    let o = w.order("o1", at(0.0, 0.0), at(1000.0, 0.0)).await;
    w.settle().await;
    w.offered_to(&o, &a).await;
    w.f.command(&w.t, &o, Command::Accept { courier: a.clone() }, Who::Courier(a.clone())).await.unwrap();
    let events = |kind: &str| -> Vec<Arc<hexfleet_actors::domain::DomainEvent>> {
        w.p.updates
            .lock()
            .iter()
            .filter_map(|u| match u {
                Update::Event(e) if e.kind == kind => Some(e.clone()),
                _ => None,
            })
            .collect()
    };
    let wait_for = |kind: &'static str, n: usize| {
        let events = &events;
        async move {
            assert!(eventually(|| events(kind).len() >= n).await, "{n} {kind}: {:?}", events(kind));
            events(kind)
        }
    };
    // The dispatcher's first two minutes: `mute` is silent already, but not reported yet.
    w.settle().await;
    w.clock.advance(120_000);
    w.settle().await;
    let first = wait_for("courier.silent", 1).await;
    assert_eq!(first.len(), 1, "only mute, at the end of the grace period: {first:?}");
    assert_eq!(first[0].ts, T0 + 120_000, "not flagged before the grace period ended");
    assert_eq!((first[0].entity_id.as_str(), first[0].reason.as_deref()), ("mute", Some("no position yet while holding 1 order(s)")));
    assert!(!first[0].attrs.iter().any(|(k, _)| k == "silent_s"), "{first:?}");
    // Past the limit for `a`: reported once, with its order; `idle` (silent too) holds nothing.
    w.clock.advance(1_000);
    w.settle().await;
    w.settle().await;
    let silent = wait_for("courier.silent", 2).await;
    let of_a: Vec<_> = silent.iter().filter(|e| e.entity_id == a.as_str()).collect();
    assert_eq!(of_a.len(), 1, "{silent:?}");
    assert_eq!(of_a[0].reason.as_deref(), Some("no position for 121 s while holding 1 order(s)"));
    assert!(of_a[0].attrs.contains(&("orders".into(), "o1".into())), "{silent:?}");
    assert!(silent.iter().all(|e| e.entity_id != idle.as_str()));
    assert!(
        eventually(|| w.store.all_events().iter().any(|e| e.kind == "courier.silent" && e.entity_id == "a")).await,
        "logged in the event log"
    );
    // Heard again: cleared, once.
    w.fix_now(&a, at(40.0, 0.0)).await;
    w.settle().await;
    w.settle().await;
    let cleared = wait_for("courier.silent_cleared", 1).await;
    assert_eq!((cleared.len(), cleared[0].entity_id.as_str(), cleared[0].reason.as_deref()), (1, "a", Some("heard from again")));
    // Silent again, then it hands its order back: cleared, as it holds nothing any more.
    w.clock.advance(121_000);
    w.settle().await;
    wait_for("courier.silent", 3).await;
    w.f.command(&w.t, &o, Command::Release { courier: Some(a.clone()) }, Who::Courier(a.clone())).await.unwrap();
    w.settle().await;
    let cleared = wait_for("courier.silent_cleared", 2).await;
    assert_eq!(cleared[1].reason.as_deref(), Some("holds no orders any more"), "{cleared:?}");
    w.clock.advance(200_000);
    w.settle().await;
    w.settle().await;
    // Then `mute` is heard: its `silent_cleared` goes through the same ordered queue, so once
    // it is out every event of the rounds before it is too.
    w.fix_now(&mute, at(0.0, 500.0)).await;
    w.settle().await;
    let cleared = wait_for("courier.silent_cleared", 3).await;
    assert_eq!(cleared[2].entity_id, "mute");
    assert_eq!(events("courier.silent").len(), 3, "nothing more: a holds nothing");
}

/// `release_silent_after_ms`: an order not yet picked up is taken back from a courier silent
/// that long and offered to another; goods on board stay with their courier.
#[tokio::test]
async fn orders_not_picked_up_are_taken_back_from_a_courier_silent_too_long() {
    let w = world(FleetConfig { courier_stale_ms: 120_000, release_silent_after_ms: Some(300_000), ..Default::default() }).await;
    let a = w.courier("a", at(50.0, 0.0), 2).await;
    let o1 = w.order("o1", at(0.0, 0.0), at(1000.0, 0.0)).await;
    let o2 = w.order("o2", at(0.0, 20.0), at(1000.0, 20.0)).await;
    for o in [&o1, &o2] {
        w.settle().await;
        w.offered_to(o, &a).await;
        w.f.command(&w.t, o, Command::Accept { courier: a.clone() }, Who::Courier(a.clone())).await.unwrap();
    }
    w.f.command(&w.t, &o2, Command::PickedUp { courier: a.clone() }, Who::Courier(a.clone())).await.unwrap();
    let b = w.courier("b", at(-800.0, 0.0), 1).await;
    // 200 s on, a dispatcher gives an order to `mute`, whose app has not sent a fix yet.
    w.clock.advance(200_000);
    let mute = CourierId::new("mute");
    w.f.upsert_courier(&w.t, &mute, CourierPatch { capacity: Some(1), ..Default::default() }, &Who::System).await.unwrap();
    let m = w.order("m1", at(0.0, 500.0), at(1000.0, 500.0)).await;
    w.f.assign(&w.t, &m, &mute, Who::Dispatcher("d".into())).await.unwrap();
    // Silent for 299 s: flagged, but the orders stay.
    w.clock.advance(99_000);
    w.fix_now(&b, at(-800.0, 0.0)).await;
    w.settle().await;
    w.settle().await;
    assert_eq!(w.get(&o1).await.courier.as_ref(), Some(&a));
    // 300 s: o1 goes back to dispatch and on to `b`; o2, on board, stays with `a`.
    w.clock.advance(1_000);
    w.settle().await;
    let back = w.wait_order(&o1, "taken back", |o| o.state == OrderState::Created || o.offer.as_ref().is_some_and(|f| f.courier == b)).await;
    assert_eq!(back.declined, vec![a.clone()]);
    w.settle().await;
    w.offered_to(&o1, &b).await;
    let kept = w.get(&o2).await;
    assert_eq!((kept.state, kept.courier.as_ref()), (OrderState::PickedUp, Some(&a)));
    // `mute` has had its order for 100 s only: it keeps it, silent or not.
    assert_eq!(w.get(&m).await.courier.as_ref(), Some(&mute));
    let ev = w.store.all_events().into_iter().find(|e| e.entity_id == o1.as_str() && e.kind == "order.released").expect("order.released logged");
    assert_eq!((ev.actor.as_str(), ev.reason.as_deref()), ("system", Some("taken back from a: no position from it for too long")), "{ev:?}");
    assert!(w.f.check_invariants().await.is_empty());
}

#[tokio::test]
async fn two_orders_batch_onto_one_courier_and_the_route_keeps_pickups_before_dropoffs() {
    let w = world(FleetConfig::default()).await;
    let c = w.courier("c", at(0.0, 0.0), 2).await;
    // An idle courier 2 km south of the second pickup: worse than the detour.
    let idle = w.courier("idle", at(-2000.0, 0.0), 1).await;
    let o1 = w.order("o1", at(200.0, 0.0), at(3000.0, 0.0)).await;
    w.f.assign(&w.t, &o1, &c, Who::Dispatcher("d".into())).await.unwrap();
    w.wait_order(&o1, "assigned", |o| o.state == OrderState::Assigned).await;
    // Along the way: picked up 300 m north, dropped 2.5 km north.
    let o2 = w.order("o2", at(300.0, 20.0), at(2500.0, 20.0)).await;
    w.settle().await;
    let offered = w.offered_to(&o2, &c).await;
    let rec = offered.assignment.as_ref().unwrap();
    let idle_cost = rec.candidates.iter().find(|x| x.0 == idle).expect("idle courier was a candidate").1;
    assert!(rec.cost_s < idle_cost, "batching ({:.0} s) beats the idle courier ({idle_cost:.0} s)", rec.cost_s);
    w.f.command(&w.t, &o2, Command::Accept { courier: c.clone() }, Who::Courier(c.clone())).await.unwrap();
    let want = vec![("o1".to_string(), true), ("o2".to_string(), true), ("o2".to_string(), false), ("o1".to_string(), false)];
    assert!(eventually(|| w.last_route(&c).as_ref() == Some(&want)).await, "route {:?}", w.last_route(&c));
    assert_eq!(w.f.ctx().load(&w.t, &c), 2);
    assert!(w.f.check_invariants().await.is_empty());

    // Full now: a third order nearby goes to the idle courier, not over capacity.
    let o3 = w.order("o3", at(250.0, 0.0), at(900.0, 0.0)).await;
    w.settle().await;
    w.offered_to(&o3, &idle).await;
}

#[tokio::test]
async fn batching_is_refused_when_it_delays_the_held_order_too_much() {
    let w = world(FleetConfig { batch_max_delay_s: 300.0, ..Default::default() }).await;
    let c = w.courier("c", at(0.0, 0.0), 3).await;
    let o1 = w.order("o1", at(100.0, 0.0), at(3000.0, 0.0)).await;
    w.f.assign(&w.t, &o1, &c, Who::Dispatcher("d".into())).await.unwrap();
    w.wait_order(&o1, "assigned", |o| o.state == OrderState::Assigned).await;
    // The opposite way: a 2 km detour each way before o1 could be delivered.
    let o2 = w.order("o2", at(-1000.0, 0.0), at(-2500.0, 0.0)).await;
    w.settle().await;
    w.settle().await;
    assert_eq!(w.get(&o2).await.state, OrderState::Created, "not batched against the held order");
    // Once o1 is delivered the courier is free and the order goes to it.
    w.f.command(&w.t, &o1, Command::PickedUp { courier: c.clone() }, Who::Courier(c.clone())).await.unwrap();
    w.f.command(&w.t, &o1, Command::Delivered { courier: c.clone() }, Who::Courier(c.clone())).await.unwrap();
    w.settle().await;
    w.offered_to(&o2, &c).await;
}

#[tokio::test]
async fn off_shift_and_offline_couriers_get_nothing_and_an_override_respects_capacity() {
    let w = world(FleetConfig::default()).await;
    let off = w.courier("off", at(10.0, 0.0), 1).await;
    let away = w.courier("away", at(20.0, 0.0), 1).await;
    let on = w.courier("on", at(-900.0, 0.0), 1).await;
    w.f.upsert_courier(&w.t, &off, CourierPatch { on_shift: Some(false), ..Default::default() }, &Who::System).await.unwrap();
    w.f.set_status(&w.t, &away, CourierStatus::Offline).unwrap();
    w.wait_indexed(&away, at(20.0, 0.0), false).await;
    assert!(eventually(|| w.f.courier(&w.t, &off).is_ok_and(|r| !r.on_shift)).await);
    let o1 = w.order("o1", at(0.0, 0.0), at(500.0, 0.0)).await;
    // The off-shift courier's index entry follows its profile change.
    let mut offered = None;
    for _ in 0..50 {
        w.settle().await;
        let o = w.get(&o1).await;
        if let Some(x) = &o.offer {
            offered = Some(x.courier.clone());
            break;
        }
    }
    assert_eq!(offered.as_ref(), Some(&on), "only the on-shift, available courier is offered");

    // Override onto a full courier is refused and changes nothing.
    w.f.command(&w.t, &o1, Command::Accept { courier: on.clone() }, Who::Courier(on.clone())).await.unwrap();
    let o2 = w.order("o2", at(0.0, 10.0), at(500.0, 10.0)).await;
    let err = w.f.assign(&w.t, &o2, &on, Who::Dispatcher("d".into())).await.unwrap_err();
    assert!(matches!(err, FleetError::Conflict(_)), "{err:?}");
    assert_eq!(w.get(&o2).await.state, OrderState::Created);
    assert_eq!(w.f.ctx().load(&w.t, &on), 1);
}

#[tokio::test]
async fn an_override_racing_the_couriers_accept_ends_consistently() {
    let w = world(FleetConfig::default()).await;
    let a = w.courier("a", at(0.0, 0.0), 5).await;
    let b = w.courier("b", at(-3000.0, 0.0), 5).await;
    for i in 0..20 {
        let o = w.order(&format!("o{i}"), at(10.0, i as f64), at(600.0, 0.0)).await;
        w.settle().await;
        w.offered_to(&o, &a).await;
        let accept = w.f.command(&w.t, &o, Command::Accept { courier: a.clone() }, Who::Courier(a.clone()));
        let assign = w.f.assign(&w.t, &o, &b, Who::Dispatcher("d".into()));
        let (acc, ovr) = tokio::join!(accept, assign);
        ovr.expect("the override wins either way");
        // The accept either came first (then the override took the order away) or was refused.
        if let Err(e) = &acc {
            assert!(matches!(e, FleetError::InvalidTransition { .. }), "{e:?}");
        }
        let got = w.get(&o).await;
        assert_eq!((got.state, got.courier.as_ref()), (OrderState::Assigned, Some(&b)));
        let bad = w.f.check_invariants().await;
        assert!(bad.is_empty(), "{bad:?}");
        assert!(w.f.courier_orders(&w.t, &a).iter().all(|x| x.id != o));
        // Free b again for the next round.
        w.f.command(&w.t, &o, Command::Cancel, Who::Dispatcher("d".into())).await.unwrap();
    }
    assert_eq!(w.f.ctx().load(&w.t, &a) + w.f.ctx().load(&w.t, &b), 0);
}

#[tokio::test]
async fn greedy_policy_is_kept_as_a_baseline_and_optimal_beats_it_on_a_crossing() {
    // Two orders, two couriers. Greedy takes the cheapest pair first (a→o1, 10 m) and leaves
    // o2 to b far away; optimal gives o1 to b and o2 to a for less in total.
    async fn run(policy: DispatchPolicy) -> (f64, String) {
        let w = world(FleetConfig { dispatch_policy: policy, ..Default::default() }).await;
        let a = w.courier("a", at(0.0, 0.0), 1).await;
        let _b = w.courier("b", at(0.0, 1200.0), 1).await;
        let o1 = w.order("o1", at(0.0, 10.0), at(0.0, 3000.0)).await;
        let o2 = w.order("o2", at(0.0, -400.0), at(0.0, -3000.0)).await;
        w.settle().await;
        let (x1, x2) = (w.wait_order(&o1, "offered", |o| o.offer.is_some()).await, w.wait_order(&o2, "offered", |o| o.offer.is_some()).await);
        let (r1, r2) = (x1.assignment.clone().unwrap(), x2.assignment.clone().unwrap());
        assert_eq!(r1.policy, policy.as_str());
        let who = if x1.offer.as_ref().unwrap().courier == a { "a-o1" } else { "b-o1" };
        (r1.cost_s + r2.cost_s, who.to_string())
    }
    let (greedy, gw) = run(DispatchPolicy::Greedy).await;
    let (optimal, ow) = run(DispatchPolicy::Optimal).await;
    assert_eq!(gw, "a-o1");
    assert_eq!(ow, "b-o1");
    assert!(optimal < greedy, "optimal {optimal:.0} s vs greedy {greedy:.0} s");
}

mod interleavings {
    //! Random interleavings of dispatch rounds, courier replies, overrides, cancels, progress
    //! and time, some issued concurrently: after every step no order is held by two couriers
    //! and no courier is committed beyond its capacity.
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Create { north: i16, east: i16, size: u16 },
        Tick,
        Reply { order: u8, accept: bool },
        Override { order: u8, courier: u8 },
        Cancel { order: u8 },
        Progress { order: u8 },
        Advance { ms: u32 },
        Status { courier: u8, available: bool },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (-20i16..20, -20i16..20, 1u16..=2).prop_map(|(north, east, size)| Op::Create { north, east, size }),
            3 => Just(Op::Tick),
            4 => (any::<u8>(), proptest::bool::weighted(0.7)).prop_map(|(order, accept)| Op::Reply { order, accept }),
            2 => (any::<u8>(), any::<u8>()).prop_map(|(order, courier)| Op::Override { order, courier }),
            1 => any::<u8>().prop_map(|order| Op::Cancel { order }),
            3 => any::<u8>().prop_map(|order| Op::Progress { order }),
            1 => (1_000u32..30_000).prop_map(|ms| Op::Advance { ms }),
            1 => (any::<u8>(), any::<bool>()).prop_map(|(courier, available)| Op::Status { courier, available }),
        ]
    }

    async fn apply(w: &World, couriers: &[CourierId], orders: &parking_lot::Mutex<Vec<OrderId>>, n: &std::sync::atomic::AtomicUsize, op: Op) {
        let pick = |i: u8| {
            let o = orders.lock();
            (!o.is_empty()).then(|| o[i as usize % o.len()].clone())
        };
        let who = Who::Dispatcher("d".into());
        match op {
            Op::Create { north, east, size } => {
                let id = format!("o{}", n.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
                let p = at(f64::from(north) * 50.0, f64::from(east) * 50.0);
                let new = NewOrder { id: Some(OrderId::new(&id)), pickup: p, dropoff: at(f64::from(north) * 50.0 + 800.0, 0.0), size, ready_at: None, deliver_by: None };
                let o = w.f.create_order(&w.t, new, &who).await.unwrap();
                orders.lock().push(o.id.clone());
            }
            Op::Tick => w.tick().await,
            Op::Reply { order, accept } => {
                let Some(id) = pick(order) else { return };
                let o = w.get(&id).await;
                if let Some(offer) = &o.offer {
                    let c = offer.courier.clone();
                    let cmd = if accept { Command::Accept { courier: c.clone() } } else { Command::Decline { courier: c.clone() } };
                    let _ = w.f.command(&w.t, &id, cmd, Who::Courier(c)).await;
                }
            }
            Op::Override { order, courier } => {
                let Some(id) = pick(order) else { return };
                let _ = w.f.assign(&w.t, &id, &couriers[courier as usize % couriers.len()], who).await;
            }
            Op::Cancel { order } => {
                let Some(id) = pick(order) else { return };
                let _ = w.f.command(&w.t, &id, Command::Cancel, who).await;
            }
            Op::Progress { order } => {
                let Some(id) = pick(order) else { return };
                let o = w.get(&id).await;
                let Some(c) = o.courier.clone() else { return };
                let cmd = match o.state {
                    OrderState::Assigned | OrderState::AtPickup => Command::PickedUp { courier: c.clone() },
                    OrderState::PickedUp | OrderState::AtDropoff => Command::Delivered { courier: c.clone() },
                    _ => return,
                };
                let _ = w.f.command(&w.t, &id, cmd, Who::Courier(c)).await;
            }
            Op::Advance { ms } => w.clock.advance(i64::from(ms)),
            Op::Status { courier, available } => {
                let s = if available { CourierStatus::Available } else { CourierStatus::Offline };
                let _ = w.f.set_status(&w.t, &couriers[courier as usize % couriers.len()], s);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn no_order_is_held_twice_and_no_courier_is_overfilled(steps in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 5..30)) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
                let w = world(FleetConfig { offer_timeout_ms: 20_000, ..Default::default() }).await;
                let mut couriers = Vec::new();
                for (i, cap) in [1u16, 2, 3].into_iter().enumerate() {
                    couriers.push(w.courier(&format!("c{i}"), at(i as f64 * 300.0, 0.0), cap).await);
                }
                let orders = parking_lot::Mutex::new(Vec::new());
                let n = std::sync::atomic::AtomicUsize::new(0);
                for group in steps {
                    // The ops of a group run concurrently: their messages interleave freely.
                    futures_util::future::join_all(group.into_iter().map(|op| apply(&w, &couriers, &orders, &n, op))).await;
                    let bad = w.f.check_invariants().await;
                    assert!(bad.is_empty(), "after a step: {bad:?}");
                }
                w.f.shutdown().await.unwrap();
            });
        }
    }
}

#[tokio::test]
async fn auto_accept_can_be_set_per_fleet() {
    let w = world(FleetConfig { auto_accept_tenants: vec!["t".into()], ..Default::default() }).await;
    let c = w.courier("c", at(0.0, 0.0), 1).await;
    // 300 m away: outside the arrival radius, so the order stays `assigned`.
    let o = w.order("o1", at(300.0, 0.0), at(900.0, 0.0)).await;
    w.settle().await;
    let got = w.wait_order(&o, "assigned", |o| o.state == OrderState::Assigned).await;
    assert_eq!(got.version, 1, "created → assigned in one step, no offer");
    assert_eq!(got.courier.as_ref(), Some(&c), "assigned without an offer");
    // Another fleet on the same node still gets offers.
    let w2 = World { t: TenantId::new("other"), ..w };
    let c2 = w2.courier("c2", at(0.0, 50.0), 1).await;
    let o2 = w2.order("o2", at(300.0, 50.0), at(900.0, 50.0)).await;
    w2.settle().await;
    w2.offered_to(&o2, &c2).await;
}

#[tokio::test]
async fn offers_that_expired_while_the_server_was_down_are_redispatched_at_start() {
    use hexfleet_actors::domain::{CourierRecord, Offer};
    use hexfleet_actors::store::{Store, Write};
    let store = Arc::new(MemoryStore::new());
    let t = TenantId::new("t");
    let courier = |id: &str, pos: LatLng| {
        let mut r = CourierRecord::new(t.clone(), CourierId::new(id), T0 - 60_000);
        r.status = CourierStatus::Available;
        r.last_fix = Some(Fix { pos, ts: T0 - 60_000, speed: None, heading: None, acc: None });
        r
    };
    // Before the "crash": an order offered to `a`, the offer due 30 s ago.
    let order = Order {
        tenant: t.clone(),
        id: OrderId::new("o1"),
        pickup: at(0.0, 0.0),
        dropoff: at(900.0, 0.0),
        size: 1,
        ready_at: None,
        deliver_by: None,
        state: OrderState::Offered,
        courier: None,
        offer: Some(Offer { courier: CourierId::new("a"), expires_at: T0 - 30_000 }),
        declined: vec![],
        assignment: None,
        created_at: T0 - 120_000,
        updated_at: T0 - 50_000,
        version: 1,
        released_at: None,
    };
    store
        .commit(vec![Write::Courier(courier("a", at(20.0, 0.0))), Write::Courier(courier("b", at(-600.0, 0.0))), Write::Order(order)])
        .await
        .unwrap();
    let p = Arc::new(RecordingPublisher::default());
    let clock = Arc::new(ManualClock::new(T0));
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), index_rebuild: Duration::from_millis(5), ..Default::default() };
    let f = Fleet::start(FleetDeps { store: store.clone(), publisher: p.clone(), clock: clock.clone(), config }).await.unwrap();
    let w = World { f, p, clock, store, t };
    assert_eq!(w.f.ctx().load(&w.t, &CourierId::new("a")), 1, "the recovered offer holds a's capacity");
    w.tick().await;
    let back = w.wait_order(&OrderId::new("o1"), "created again", |o| o.state == OrderState::Created).await;
    assert_eq!(back.declined, vec![CourierId::new("a")]);
    w.settle().await;
    w.offered_to(&OrderId::new("o1"), &CourierId::new("b")).await;
}

/// Dispatch prices couriers with the speeds the fleet has shown: a courier in a district where
/// bikes crawl loses to a farther one on open roads, and wins when learning is off.
#[tokio::test]
async fn learned_speeds_decide_who_reaches_the_pickup_first() {
    use hexfleet_actors::domain::Vehicle;
    for learn in [false, true] {
        let w = world(FleetConfig { learn_speeds: learn, speed_publish: Duration::from_millis(10), ..FleetConfig::default() }).await;
        let slow_spot = at(0.0, -3000.0);
        // The fleet's history there: a bike at 1.5 m/s, one fix every 10 s (each one a history
        // sample, so each consecutive pair is a speed sample), through the courier actor.
        let teacher = CourierId::new("teacher");
        w.f.upsert_courier(&w.t, &teacher, CourierPatch::default(), &Who::System).await.unwrap();
        let fixes: Vec<Fix> = (0..120)
            .map(|i| Fix { pos: at(0.0, -3600.0 + 15.0 * i as f64), ts: T0 - (120 - i) * 10_000, speed: None, heading: None, acc: None })
            .collect();
        w.f.ingest(&w.t, &teacher, fixes).unwrap();
        if learn {
            let ok = eventually(|| {
                w.f.ctx().speeds.model(&w.t, Vehicle::Bike).is_some_and(|m| m.speed_mps(slow_spot, T0) < 2.0)
            })
            .await;
            assert!(ok, "the model never learned the slow district");
        } else {
            // Nothing to wait for: learning off means no samples are even sent. Make sure the
            // teacher's fixes were processed before dispatching.
            let last = at(0.0, -3600.0 + 15.0 * 119.0);
            w.wait_indexed(&teacher, last, false).await;
            assert!(w.f.ctx().speeds.model(&w.t, Vehicle::Bike).is_none());
        }
        let in_the_slow_district = w.courier("slow", slow_spot, 1).await;
        let on_open_roads = w.courier("open", at(0.0, 3500.0), 1).await;
        let o = w.order("o", at(0.0, 0.0), at(500.0, 0.0)).await;
        w.settle().await;
        let want = if learn { &on_open_roads } else { &in_the_slow_district };
        let got = w.offered_to(&o, want).await;
        let rec = got.assignment.as_ref().expect("assignment record");
        // The open-roads courier is priced at the prior speed either way: 3,500 m × 1.3 / 4.5.
        let open_cost = rec.candidates.iter().find(|c| c.0 == on_open_roads).expect("candidate").1;
        assert!((open_cost - 3500.0 * 1.3 / 4.5).abs() < 20.0, "learn={learn}: open-roads cost {open_cost}");
        w.f.shutdown().await.unwrap();
    }
}

/// What the fleet learned survives a restart: saved at shutdown, loaded and in use at start.
#[tokio::test]
async fn learned_speeds_survive_a_restart() {
    use hexfleet_actors::domain::Vehicle;
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(T0));
    let config = FleetConfig { speed_publish: Duration::from_millis(10), ..FleetConfig::default() };
    let start = || Fleet::start(FleetDeps { store: store.clone(), publisher: Arc::new(RecordingPublisher::default()), clock: clock.clone(), config: config.clone() });
    let f = start().await.unwrap();
    let t = TenantId::new("t");
    let c = CourierId::new("teacher");
    f.upsert_courier(&t, &c, CourierPatch::default(), &Who::System).await.unwrap();
    let fixes: Vec<Fix> = (0..60).map(|i| Fix { pos: at(0.0, 15.0 * i as f64), ts: T0 - (60 - i) * 10_000, speed: None, heading: None, acc: None }).collect();
    f.ingest(&t, &c, fixes).unwrap();
    assert!(eventually(|| f.ctx().speeds.model(&t, Vehicle::Bike).is_some_and(|m| m.speed_mps(at(0.0, 450.0), T0) < 2.5)).await, "learned");
    f.shutdown().await.unwrap();

    let g = start().await.unwrap();
    let m = g.ctx().speeds.model(&t, Vehicle::Bike).expect("loaded at start, before any new sample");
    let v = m.speed_mps(at(0.0, 450.0), T0);
    assert!(v < 2.5, "the slow street is still slow after the restart: {v}");
    g.shutdown().await.unwrap();
}

#[tokio::test]
async fn couriers_without_room_do_not_hide_a_free_one_further_away() {
    // As many full couriers at the hub as the round looks at per order (`candidates_per_order`),
    // and one free courier a kilometre away.
    let w = world(FleetConfig { candidates_per_order: 3, ..Default::default() }).await;
    for i in 0..3 {
        let c = w.courier(&format!("busy{i}"), at(0.0, 0.0), 1).await;
        let held = w.order(&format!("held{i}"), at(5.0, 0.0), at(900.0, 0.0)).await;
        w.f.assign(&w.t, &held, &c, Who::Dispatcher("d".into())).await.unwrap();
        assert!(eventually(|| w.f.ctx().load(&w.t, &c) == 1).await);
    }
    let free = w.courier("free", at(1000.0, 0.0), 1).await;
    let o = w.order("o1", at(0.0, 0.0), at(500.0, 0.0)).await;
    w.settle().await;
    w.offered_to(&o, &free).await;
}

/// A courier whose app went silent without going offline (a dead phone) is still "available"
/// and still the nearest, but gets nothing once no fix has reached the server for
/// `courier_stale_ms`; it is back in the running as soon as it sends one.
#[tokio::test]
async fn a_courier_not_heard_from_lately_gets_no_orders_until_it_sends_again() {
    let w = world(FleetConfig { courier_stale_ms: 120_000, auto_accept: true, ..Default::default() }).await;
    let silent = w.courier("silent", at(10.0, 0.0), 1).await;
    let live = w.courier("live", at(-900.0, 0.0), 1).await;

    // At exactly the limit it is still a candidate (and the nearest).
    w.clock.advance(120_000);
    w.fix_now(&live, at(-900.0, 0.0)).await;
    let o1 = w.order("o1", at(0.0, 0.0), at(800.0, 0.0)).await;
    w.settle().await;
    w.wait_order(&o1, "assigned to silent", |o| o.courier.as_ref() == Some(&silent)).await;

    // One millisecond past it, it is passed over for the farther courier it would have beaten.
    let silent2 = w.courier("silent2", at(10.0, 5.0), 1).await;
    w.clock.advance(120_001);
    w.fix_now(&live, at(-900.0, 0.0)).await;
    let o2 = w.order("o2", at(0.0, 0.0), at(800.0, 0.0)).await;
    w.settle().await;
    let got = w.wait_order(&o2, "assigned", |o| o.courier.is_some()).await;
    assert_eq!(got.courier.as_ref(), Some(&live), "the silent courier was given the order");
    let ids: Vec<&CourierId> = got.assignment.as_ref().unwrap().candidates.iter().map(|c| &c.0).collect();
    assert_eq!(ids, vec![&live], "a silent courier is not even a candidate");
    // Dispatchers still see it where it was last heard from.
    assert!(w.f.nearby(&w.t, at(0.0, 0.0), 5, Some(50.0)).await.iter().any(|n| n.courier.id == silent2));

    // Heard again: it takes the next order.
    w.fix_now(&silent2, at(10.0, 5.0)).await;
    let o3 = w.order("o3", at(0.0, 0.0), at(800.0, 0.0)).await;
    w.settle().await;
    w.wait_order(&o3, "assigned to silent2", |o| o.courier.as_ref() == Some(&silent2)).await;
}

/// An arrival at the pickup whose report failed (the store was down) is reported again while
/// the courier stays there and the order has not moved on; before, it was reported once, and
/// the customer never saw `at_pickup`.
#[tokio::test]
async fn an_arrival_whose_report_failed_is_reported_again() {
    use hexfleet_actors::courier::ARRIVAL_RESEND_MS;
    let w = world(FleetConfig { auto_accept: true, ..Default::default() }).await;
    let c = w.courier("c", at(1000.0, 0.0), 1).await;
    let o = w.order("o1", at(0.0, 0.0), at(900.0, 0.0)).await;
    w.settle().await;
    w.wait_order(&o, "assigned to c", |o| o.state == OrderState::Assigned && o.courier.as_ref() == Some(&c)).await;

    // It reaches the pickup while the store is down: the arrival is not recorded.
    w.store.set_down(true);
    w.clock.advance(60_000);
    w.fix_now(&c, at(5.0, 0.0)).await;
    w.f.check_invariants().await; // the order actor has handled the command
    w.store.set_down(false);
    assert_eq!(w.get(&o).await.state, OrderState::Assigned);
    // Waiting there: reported again once the resend time has passed, not before.
    w.clock.advance(1_000);
    w.fix_now(&c, at(6.0, 0.0)).await;
    w.f.check_invariants().await;
    assert_eq!(w.get(&o).await.state, OrderState::Assigned, "reported again too soon");
    w.clock.advance(ARRIVAL_RESEND_MS);
    w.fix_now(&c, at(5.0, 1.0)).await;
    w.wait_order(&o, "at_pickup", |o| o.state == OrderState::AtPickup).await;
}

#[tokio::test]
async fn an_order_scheduled_for_later_waits_for_its_time_instead_of_expiring() {
    let w = world(FleetConfig { order_expiry_ms: 30 * 60_000, ..Default::default() }).await;
    let c = w.courier("c", at(100.0, 0.0), 1).await;
    let ready = T0 + 60 * 60_000;
    let new = NewOrder { id: Some(OrderId::new("later")), pickup: at(0.0, 0.0), dropoff: at(800.0, 0.0), size: 1, ready_at: Some(ready), deliver_by: None };
    let o = w.f.create_order(&w.t, new, &Who::Dispatcher("d".into())).await.unwrap().id.clone();
    // 31 minutes after creation, 29 before it is due: not offered yet, and not expired.
    w.clock.advance(31 * 60_000);
    w.settle().await;
    w.settle().await;
    assert_eq!(w.get(&o).await.state, OrderState::Created);
    // Ten minutes before it is due, it goes out (to a courier still sending its position).
    w.clock.advance(20 * 60_000);
    w.fix_now(&c, at(100.0, 0.0)).await;
    w.settle().await;
    w.offered_to(&o, &c).await;

    // Times far from now are refused, not left to overflow the dispatcher.
    for (ready_at, deliver_by) in [(Some(i64::MAX), None), (None, Some(i64::MIN)), (Some(T0 + 40 * 86_400_000), None)] {
        let new = NewOrder { id: None, pickup: at(0.0, 0.0), dropoff: at(800.0, 0.0), size: 1, ready_at, deliver_by };
        let err = w.f.create_order(&w.t, new, &Who::Dispatcher("d".into())).await.unwrap_err();
        assert!(matches!(err, FleetError::Invalid(_)), "{err:?}");
    }
}

/// A courier is told about the orders offered to it or held by it only: a command on another
/// courier's order, or on a closed one it never held, is "not found", not "cannot accept an
/// order that is offered" (which told a courier trying ids which existed, and that someone
/// else was being asked). Its own orders' refusals still say why.
#[tokio::test]
async fn a_courier_is_told_nothing_about_orders_not_its_own() {
    let (w, a, b, o) = offered_to_the_nearer_of_two().await;
    let as_b = |cmd| w.f.command(&w.t, &o, cmd, Who::Courier(b.clone()));
    let err = as_b(Command::Accept { courier: b.clone() }).await.unwrap_err();
    assert!(matches!(err, FleetError::NotFound { .. }), "{err:?}");
    let err = as_b(Command::PickedUp { courier: b.clone() }).await.unwrap_err();
    assert!(matches!(err, FleetError::NotFound { .. }), "{err:?}");
    let err = w.f.command(&w.t, &o, Command::PickedUp { courier: a.clone() }, Who::Courier(a.clone())).await.unwrap_err();
    assert!(matches!(err, FleetError::InvalidTransition { .. }), "a's own offer: {err:?}");
    // An order it declined (or whose offer to it lapsed) it knew of: it is told why.
    w.f.command(&w.t, &o, Command::Decline { courier: a.clone() }, Who::Courier(a.clone())).await.unwrap();
    let err = w.f.command(&w.t, &o, Command::Accept { courier: a.clone() }, Who::Courier(a.clone())).await.unwrap_err();
    assert!(matches!(err, FleetError::InvalidTransition { .. }), "a declined it: {err:?}");
    // Closed: b never held it; staff still get the state.
    w.f.command(&w.t, &o, Command::Cancel, Who::Dispatcher("d".into())).await.unwrap();
    let err = as_b(Command::Accept { courier: b.clone() }).await.unwrap_err();
    assert!(matches!(err, FleetError::NotFound { .. }), "{err:?}");
    let err = w.f.command(&w.t, &o, Command::Cancel, Who::Dispatcher("d".into())).await.unwrap_err();
    assert!(matches!(err, FleetError::InvalidTransition { .. }), "{err:?}");
}

/// An order already late when it is created (or handed back near its deadline) still goes to
/// the nearest courier. Its pair cost counted the lateness it has whoever takes it: 30 minutes
/// late, twice weighted, is more than leaving it unassigned (an hour), so no courier was ever
/// offered it and it expired.
#[tokio::test]
async fn an_order_already_late_is_still_dispatched_to_the_nearest_courier() {
    let w = world(FleetConfig::default()).await;
    let near = w.courier("near", at(300.0, 0.0), 1).await;
    let far = w.courier("far", at(-3000.0, 0.0), 1).await;
    let deliver_by = Some(T0 - 30 * 60_000);
    let new = NewOrder { id: Some(OrderId::new("late")), pickup: at(0.0, 0.0), dropoff: at(2000.0, 0.0), size: 1, ready_at: None, deliver_by };
    let o = w.f.create_order(&w.t, new, &Who::Dispatcher("d".into())).await.unwrap().id.clone();
    w.settle().await;
    let got = w.offered_to(&o, &near).await;
    let rec = got.assignment.as_ref().expect("assignment record");
    let ids: Vec<&CourierId> = rec.candidates.iter().map(|c| &c.0).collect();
    assert_eq!(ids, vec![&near, &far], "both candidates, cheapest first");
    // The pickup trip (300 m on a bike: 300 × 1.3 / 4.5 ≈ 87 s), counted once as time and
    // twice as lateness it adds; not the 30 minutes the order is late anyway.
    let pickup_s = 300.0 * 1.3 / 4.5;
    assert!((rec.cost_s - 3.0 * pickup_s).abs() < 5.0, "cost {}", rec.cost_s);
}

/// A customer whose drop-off comes second on the courier's route is told the time for both
/// legs (and the first drop-off's service time), not the straight line to their own door.
#[tokio::test]
async fn a_batched_orders_eta_counts_the_stops_before_it() {
    let w = world(FleetConfig::default()).await;
    let c = w.courier("c", at(0.0, 0.0), 2).await;
    let north = w.order("north", at(0.0, 10.0), at(3000.0, 0.0)).await;
    let south = w.order("south", at(0.0, -10.0), at(-3000.0, 0.0)).await;
    for o in [&north, &south] {
        w.f.assign(&w.t, o, &c, Who::Dispatcher("d".into())).await.unwrap();
        w.f.command(&w.t, o, Command::PickedUp { courier: c.clone() }, Who::Courier(c.clone())).await.unwrap();
    }
    // Both on board: the route drops one, then the other.
    assert!(
        w.p.wait_for(DEADLINE, |u| matches!(u, Update::ToCourier { courier, notice: CourierNotice::Route { stops }, .. }
            if *courier == c && stops.len() == 2 && stops.iter().all(|s| !s.pickup)))
            .await,
        "a route of the two drop-offs"
    );
    let ts = w.clock.now() + 1_000;
    w.clock.set(ts);
    w.f.ingest(&w.t, &c, vec![Fix { pos: at(0.0, 0.0), ts, speed: None, heading: None, acc: None }]).unwrap();
    let etas = |u: &Update| match u {
        Update::CourierMoved { fix, tracking, .. } if fix.ts == ts && tracking.len() == 2 => Some(tracking.clone()),
        _ => None,
    };
    assert!(w.p.wait_for(DEADLINE, |u| etas(u).is_some()).await, "a move with both orders' ETAs");
    let tracking = w.p.updates.lock().iter().find_map(etas).unwrap();
    let mut s: Vec<f64> = tracking.iter().map(|(_, e)| e.unwrap()).collect();
    s.sort_by(f64::total_cmp);
    // 3 km at 4.5 m/s with a 1.3 detour factor is about 867 s; the second adds 6 km and the
    // first drop-off's minute.
    assert!((s[0] - 3000.0 * 1.3 / 4.5).abs() < 30.0, "{s:?}");
    assert!(s[1] > s[0] + 60.0 + 6000.0 * 1.3 / 4.5 - 60.0, "the second drop-off's ETA ignores the first: {s:?}");
}

/// After a restart, a courier counts as heard from when its last fix was taken, not from its
/// record's last change: one whose last fix is an hour old but who went `available` just
/// before the restart (a status change, no fix) gets no offer at its old position, while one
/// heard a moment ago does.
#[tokio::test]
async fn after_a_restart_a_courier_without_a_recent_fix_is_not_offered_orders() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(T0));
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), index_rebuild: Duration::from_millis(5), ..Default::default() };
    let start = || Fleet::start(FleetDeps { store: store.clone(), publisher: Arc::new(RecordingPublisher::default()), clock: clock.clone(), config: config.clone() });
    let f = start().await.unwrap();
    let t = TenantId::new("t");
    let old = CourierId::new("old");
    f.upsert_courier(&t, &old, CourierPatch::default(), &Who::System).await.unwrap();
    f.ingest(&t, &old, vec![Fix { pos: at(0.0, 0.0), ts: T0, speed: None, heading: None, acc: None }]).unwrap();
    assert!(eventually(|| f.courier(&t, &old).is_ok_and(|r| r.last_fix.is_some())).await);
    clock.advance(3_600_000);
    f.set_status(&t, &old, CourierStatus::Available).unwrap();
    assert!(eventually(|| f.courier(&t, &old).is_ok_and(|r| r.status == CourierStatus::Available)).await);
    let fresh = CourierId::new("fresh");
    f.upsert_courier(&t, &fresh, CourierPatch::default(), &Who::System).await.unwrap();
    f.set_status(&t, &fresh, CourierStatus::Available).unwrap();
    f.ingest(&t, &fresh, vec![Fix { pos: at(2000.0, 0.0), ts: clock.now(), speed: None, heading: None, acc: None }]).unwrap();
    assert!(eventually(|| f.courier(&t, &fresh).is_ok_and(|r| r.last_fix.is_some() && r.status == CourierStatus::Available)).await);
    f.shutdown().await.unwrap();

    clock.advance(10_000);
    let g = start().await.unwrap();
    let new = NewOrder { id: Some(OrderId::new("o1")), pickup: at(0.0, 0.0), dropoff: at(500.0, 0.0), size: 1, ready_at: None, deliver_by: None };
    let o = g.create_order(&t, new, &Who::Dispatcher("d".into())).await.unwrap().id.clone();
    // Rounds until one makes an offer (the recovered couriers reach the index shortly after
    // the start).
    let offered = tokio::time::timeout(DEADLINE, async {
        loop {
            g.dispatch_now(&t).await.unwrap();
            let got = g.order(&t, &o).await.unwrap();
            if let Some(offer) = got.offer.as_ref() {
                return offer.courier.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("an offer");
    assert_eq!(offered, fresh, "the courier heard from 10 s ago, not the one silent for an hour");
    g.shutdown().await.unwrap();
}

/// Two orders on board, the route to A's drop-off first: driving past B's drop-off does not
/// mark B `at_dropoff` (the state cannot go back, and B's customer would be told); staying
/// there for `ARRIVAL_DWELL_MS` does (the courier chose B first). A's drop-off, the next stop,
/// needs no wait.
#[tokio::test]
async fn passing_another_orders_stop_is_not_an_arrival_unless_the_courier_stays() {
    use hexfleet_actors::courier::ARRIVAL_DWELL_MS;
    let w = world(FleetConfig::default()).await;
    let c = w.courier("c", at(0.0, 900.0), 2).await;
    let a = w.order("a", at(0.0, 910.0), at(0.0, 1_500.0)).await;
    let b = w.order("b", at(0.0, 910.0), at(0.0, -1_000.0)).await;
    for o in [&a, &b] {
        w.f.assign(&w.t, o, &c, Who::Dispatcher("d".into())).await.unwrap();
        w.wait_order(o, "assigned", |o| o.state == OrderState::Assigned || o.state == OrderState::AtPickup).await;
        w.f.command(&w.t, o, Command::PickedUp { courier: c.clone() }, Who::Courier(c.clone())).await.unwrap();
    }
    let route = eventually(|| w.last_route(&c).is_some_and(|r| r.iter().filter(|(_, pickup)| !pickup).count() == 2)).await;
    assert!(route);
    assert_eq!(w.last_route(&c).unwrap().first().map(|s| s.0.as_str()), Some("a"), "A's drop-off first");
    // Past B's drop-off (five minutes on, a plausible drive), then on.
    w.clock.advance(300_000);
    w.fix_now(&c, at(0.0, -1_000.0)).await;
    w.clock.advance(20_000);
    w.fix_now(&c, at(0.0, -800.0)).await;
    w.f.check_invariants().await;
    assert_eq!(w.get(&b).await.state, OrderState::PickedUp, "passed by, not arrived");
    // Back, and staying there.
    w.clock.advance(20_000);
    w.fix_now(&c, at(0.0, -1_000.0)).await;
    w.clock.advance(ARRIVAL_DWELL_MS / 2);
    w.fix_now(&c, at(5.0, -1_000.0)).await;
    w.f.check_invariants().await;
    assert_eq!(w.get(&b).await.state, OrderState::PickedUp, "not there long enough yet");
    w.clock.advance(ARRIVAL_DWELL_MS / 2);
    w.fix_now(&c, at(0.0, -1_005.0)).await;
    w.wait_order(&b, "at_dropoff after staying", |o| o.state == OrderState::AtDropoff).await;
    // The next stop, A's drop-off: at once.
    w.clock.advance(300_000);
    w.fix_now(&c, at(0.0, 1_500.0)).await;
    w.wait_order(&a, "at_dropoff at the next stop", |o| o.state == OrderState::AtDropoff).await;
}

/// An app back online flushes what it buffered in one `locs` batch: a minute at the pickup,
/// then the drive away. The arrival is seen in the batch, not only at its last fix.
#[tokio::test]
async fn an_arrival_inside_a_buffered_batch_is_seen() {
    let w = world(FleetConfig::default()).await;
    let c = w.courier("c", at(1_000.0, 0.0), 1).await;
    let o = w.order("o", at(0.0, 0.0), at(900.0, 300.0)).await;
    w.f.assign(&w.t, &o, &c, Who::Dispatcher("d".into())).await.unwrap();
    w.wait_order(&o, "assigned", |o| o.state == OrderState::Assigned).await;
    let t = w.clock.now();
    let fix = |pos, ts| Fix { pos, ts, speed: None, heading: None, acc: None };
    w.clock.advance(400_000);
    w.f.ingest(&w.t, &c, vec![fix(at(0.0, 0.0), t + 200_000), fix(at(5.0, 0.0), t + 260_000), fix(at(600.0, 0.0), t + 320_000)]).unwrap();
    w.wait_order(&o, "at_pickup from the batch", |o| o.state == OrderState::AtPickup).await;
}
