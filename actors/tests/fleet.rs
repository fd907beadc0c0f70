//! Actor-level tests with the in-memory store and a recording publisher: late and impossible
//! fixes, and supervised restarts after an injected panic.

use std::sync::Arc;
use std::time::Duration;

use hexfleet_actors::clock::TokioClock;
use hexfleet_actors::domain::{Actor as Who, CourierId, CourierStatus, Fix, LatLng, OrderState, TenantId};
use hexfleet_actors::fleet::NewOrder;
use hexfleet_actors::order::Command;
use hexfleet_actors::publish::{RecordingPublisher, Update};
use hexfleet_actors::store::MemoryStore;
use hexfleet_actors::{Fleet, FleetConfig, FleetDeps};

const DEADLINE: Duration = Duration::from_secs(5);

async fn fleet() -> (Fleet, Arc<RecordingPublisher>) {
    let publisher = Arc::new(RecordingPublisher::default());
    let store = Arc::new(MemoryStore::new());
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), index_rebuild: Duration::from_millis(10), ..Default::default() };
    let f = Fleet::start(FleetDeps { store, publisher: publisher.clone(), clock: Arc::new(TokioClock::new()), config }).await.unwrap();
    (f, publisher)
}

/// A fleet on `store` (the test keeps it to slow or inspect it), on the system clock.
async fn fleet_on(store: &Arc<MemoryStore>, config: FleetConfig) -> Fleet {
    Fleet::start(FleetDeps { store: store.clone(), publisher: Arc::new(RecordingPublisher::default()), clock: Arc::new(TokioClock::new()), config }).await.unwrap()
}

fn fix(lat: f64, lng: f64, ts: i64) -> Fix {
    Fix { pos: LatLng::new(lat, lng).unwrap(), ts, speed: None, heading: None, acc: None }
}

async fn moved_to(p: &RecordingPublisher, ts: i64) -> bool {
    p.wait_for(DEADLINE, |u| matches!(u, Update::CourierMoved { fix, .. } if fix.ts == ts)).await
}

#[tokio::test]
async fn late_fixes_go_to_the_trail_but_do_not_move_the_courier() {
    let (f, p) = fleet().await;
    let (t, c) = (TenantId::new("t"), CourierId::new("c1"));
    f.ensure_courier(&t, &c).await.unwrap();
    f.ingest(&t, &c, vec![fix(52.5, 13.4, 100_000)]).unwrap();
    assert!(moved_to(&p, 100_000).await);
    f.ingest(&t, &c, vec![fix(52.5001, 13.4, 110_000)]).unwrap();
    assert!(moved_to(&p, 110_000).await);
    // Buffered offline and sent late: older than the latest.
    f.ingest(&t, &c, vec![fix(52.5009, 13.4, 105_000)]).unwrap();
    let trail = tokio::time::timeout(DEADLINE, async {
        loop {
            let tr = f.trail(&t, &c).await.unwrap();
            if tr.len() == 3 {
                return tr;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("late fix reaches the trail");
    let ts: Vec<i64> = trail.iter().map(|f| f.ts).collect();
    assert_eq!(ts, vec![100_000, 105_000, 110_000], "trail in fix-time order");
    assert_eq!(f.courier(&t, &c).unwrap().last_fix.unwrap().ts, 110_000, "live position stays at the newest fix");
}

#[tokio::test]
async fn an_impossible_jump_is_held_back() {
    let (f, p) = fleet().await;
    let (t, c) = (TenantId::new("t"), CourierId::new("c1"));
    f.ensure_courier(&t, &c).await.unwrap();
    f.ingest(&t, &c, vec![fix(52.5, 13.4, 0)]).unwrap();
    assert!(moved_to(&p, 0).await);
    // 100 km in one second.
    f.ingest(&t, &c, vec![fix(53.4, 13.4, 1_000)]).unwrap();
    // A plausible fix after it is accepted, so the jump was processed (actor order) and refused.
    f.ingest(&t, &c, vec![fix(52.5001, 13.4, 2_000)]).unwrap();
    assert!(moved_to(&p, 2_000).await);
    assert!(!p.updates.lock().iter().any(|u| matches!(u, Update::CourierMoved { fix, .. } if fix.ts == 1_000)));
    assert_eq!(f.courier(&t, &c).unwrap().last_fix.unwrap().ts, 2_000);
}

#[tokio::test]
async fn a_connection_tap_follows_its_courier_across_a_restart() {
    let (f, p) = fleet().await;
    let (t, c) = (TenantId::new("t"), CourierId::new("c1"));
    f.ensure_courier(&t, &c).await.unwrap();
    let mut tap = f.courier_tap(&t, &c).unwrap();
    tap.ingest([fix(52.5, 13.4, 1_000)]).unwrap();
    assert!(moved_to(&p, 1_000).await);
    f.crash_courier(&t, &c);
    // Wait for the restart through the fleet's map.
    let restarted = tokio::time::timeout(DEADLINE, async {
        let mut ts = 2_000;
        loop {
            if f.ingest(&t, &c, [fix(52.5, 13.4001, ts)]).is_ok()
                && p.wait_for(Duration::from_millis(200), |u| matches!(u, Update::CourierMoved { fix, .. } if fix.ts == ts)).await
            {
                return ts;
            }
            ts += 1;
        }
    })
    .await
    .expect("courier restarted");
    // The tap still holds the dead actor: it must find the restarted one and wake it, or the
    // fix would wait in the inbox with nobody to drain it.
    let ts = restarted + 1_000;
    tap.ingest([fix(52.5, 13.4002, ts)]).expect("the tap reaches the restarted courier");
    assert!(moved_to(&p, ts).await, "the fix sent through the stale tap was processed");
    tap.ingest([fix(52.5, 13.4003, ts + 1_000)]).unwrap();
    assert!(moved_to(&p, ts + 1_000).await);
    assert!(f.courier_tap(&t, &CourierId::new("nobody")).is_err(), "an unknown courier has no tap");
}

/// Two first connections of a new courier, racing each other and a profile `PUT`, must not
/// spawn two actors (the fleet would keep one, and a connection could feed the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_courier_registered_concurrently_gets_one_actor() {
    let (f, _p) = fleet().await;
    let t = TenantId::new("t");
    for n in 0..20 {
        let c = CourierId::new(format!("c{n}"));
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let (f, t, c) = (f.clone(), t.clone(), c.clone());
            calls.spawn(async move { f.ensure_courier(&t, &c).await.map(|_| ()) });
        }
        let (f2, t2, c2) = (f.clone(), t.clone(), c.clone());
        calls.spawn(async move {
            let patch = hexfleet_actors::fleet::CourierPatch { name: Some("Named".into()), ..Default::default() };
            f2.upsert_courier(&t2, &c2, patch, &Who::System).await.map(|_| ())
        });
        while let Some(r) = calls.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(f.courier(&t, &c).unwrap().name.as_deref(), Some("Named"), "the profile survives the race");
    }
    assert_eq!(f.courier_actors(), 20, "one actor per courier");
}

#[tokio::test]
async fn a_panicking_actor_is_restarted_from_its_last_state() {
    let (f, p) = fleet().await;
    let (t, c) = (TenantId::new("t"), CourierId::new("c1"));
    f.ensure_courier(&t, &c).await.unwrap();
    f.set_status(&t, &c, CourierStatus::Available).unwrap();
    f.ingest(&t, &c, vec![fix(52.5, 13.4, 1_000)]).unwrap();
    assert!(moved_to(&p, 1_000).await);
    f.crash_courier(&t, &c);
    // The courier keeps working after the restart, with its state intact.
    let restarted = tokio::time::timeout(DEADLINE, async {
        let mut ts = 2_000;
        loop {
            if f.ingest(&t, &c, vec![fix(52.5, 13.4001, ts)]).is_ok()
                && p.wait_for(Duration::from_millis(200), |u| matches!(u, Update::CourierMoved { fix, .. } if fix.ts == ts)).await
            {
                return;
            }
            ts += 1;
        }
    })
    .await;
    assert!(restarted.is_ok(), "courier restarted");
    assert_eq!(f.courier(&t, &c).unwrap().status, CourierStatus::Available);

    // An order actor too; the order keeps its state and accepts commands afterwards.
    let new = NewOrder {
        id: None,
        pickup: LatLng::new(52.5, 13.4).unwrap(),
        dropoff: LatLng::new(52.51, 13.41).unwrap(),
        size: 1,
        ready_at: None,
        deliver_by: None,
    };
    let o = f.create_order(&t, new, &Who::System).await.unwrap();
    f.crash_order(&t, &o.id);
    let res = tokio::time::timeout(DEADLINE, async {
        loop {
            match f.command(&t, &o.id, Command::Cancel, Who::System).await {
                Ok(o) => return o,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("order actor restarted");
    assert_eq!(res.state, OrderState::Cancelled);
}

/// A market taken over from the store (`Fleet::adopt_market`) while the caller gives up
/// waiting and others ask again at the same time: every courier and open order gets exactly
/// one actor, capacity reservations are counted once, held orders are listed by their courier,
/// and the dispatcher runs. Couriers and orders of other markets stay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_market_taken_over_concurrently_is_loaded_once() {
    use hexfleet_actors::domain::{CourierRecord, Order, OrderId};
    use hexfleet_actors::store::{Store as _, Write};
    let store = Arc::new(MemoryStore::new());
    let (t, other) = (TenantId::new("lille"), TenantId::new("elsewhere"));
    let mut writes = Vec::new();
    for i in 0..300 {
        let mut c = CourierRecord::new(t.clone(), CourierId::new(format!("c{i}")), 1_000);
        c.capacity = 3;
        c.last_fix = Some(fix(50.6 + i as f64 * 1e-4, 3.06, 1_000));
        writes.push(Write::Courier(c));
    }
    writes.push(Write::Courier(CourierRecord::new(other.clone(), CourierId::new("x"), 1_000)));
    for i in 0..300 {
        writes.push(Write::Order(Order {
            tenant: t.clone(),
            id: OrderId::new(format!("o{i}")),
            pickup: LatLng::new(50.6, 3.06).unwrap(),
            dropoff: LatLng::new(50.61, 3.07).unwrap(),
            size: 1,
            ready_at: None,
            deliver_by: None,
            state: if i % 2 == 0 { OrderState::Assigned } else { OrderState::Created },
            courier: (i % 2 == 0).then(|| CourierId::new(format!("c{i}"))),
            offer: None,
            declined: Vec::new(),
            assignment: None,
            created_at: 1_000,
            updated_at: 1_000,
            version: 1,
            released_at: None,
        }));
    }
    store.commit(writes).await.unwrap();
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), index_rebuild: Duration::from_millis(10), ..Default::default() };
    let deps = FleetDeps { store, publisher: Arc::new(RecordingPublisher::default()), clock: Arc::new(TokioClock::new()), config };
    let f = Fleet::start_owning(deps, |_| false).await.unwrap();
    assert_eq!(f.counts(), (0, 0), "nothing loaded before the take-over");

    // The first caller gives up at once; two more ask at the same time.
    let _ = tokio::time::timeout(Duration::from_millis(1), f.adopt_market(&t)).await;
    let (a, b) = tokio::join!(f.adopt_market(&t), f.adopt_market(&t));
    assert_eq!(a.unwrap(), (300, 300));
    assert_eq!(b.unwrap(), (300, 300));
    assert_eq!(f.open_orders(&t).len(), 300);
    assert!(f.courier(&t, &CourierId::new("c299")).is_ok());
    assert!(f.courier(&other, &CourierId::new("x")).is_err(), "other markets stay out");
    let bad = f.check_invariants().await;
    assert!(bad.is_empty(), "{bad:?}");
    for i in (0..300).step_by(2) {
        assert_eq!(f.ctx().load(&t, &CourierId::new(format!("c{i}"))), 1, "c{i} reserved once");
    }
    // A dispatch round runs for the market.
    f.dispatch_now(&t).await.expect("the market's dispatcher runs");
}

/// A client that retries an order creation while the first attempt is still committing (a
/// slow database, a timeout on its side) is told to retry (`InProgress`), not given a second
/// order with the same id, nor told the order exists (the first attempt may yet fail). Once
/// it exists, the same request again gets the order (idempotent: a retry after a timeout or a
/// 503 whose commit happened), and another order under that id a conflict. Before, both were
/// the same conflict, and a client could not tell its order from someone else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_first_creation_gets_a_conflict() {
    let store = Arc::new(MemoryStore::new());
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), ..Default::default() };
    let f = fleet_on(&store, config).await;
    store.set_commit_delay(Some(Duration::from_millis(100)));
    let t = TenantId::new("t");
    let new = |lat: f64| NewOrder {
        id: Some(hexfleet_actors::domain::OrderId::new("o1")),
        pickup: LatLng::new(lat, -73.57).unwrap(),
        dropoff: LatLng::new(45.51, -73.57).unwrap(),
        size: 1,
        ready_at: None,
        deliver_by: None,
    };
    let who = Who::Dispatcher("d".into());
    let (a, b) = tokio::join!(f.create_order(&t, new(45.50), &who), f.create_order(&t, new(45.49), &who));
    let oks = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!(oks, 1, "exactly one creation wins: {a:?} / {b:?}");
    let (won, lost) = if a.is_ok() { (a, b) } else { (b, a) };
    assert!(matches!(lost, Err(hexfleet_actors::FleetError::InProgress(_))), "{lost:?}");
    let won = won.unwrap();
    let created = store.all_events().iter().filter(|e| e.kind == "order.created").count();
    assert_eq!(created, 1, "one order.created in the log");
    store.set_commit_delay(None);
    // The winner's request again: its order, not a second one.
    let again = f.create_order(&t, new(won.pickup.lat), &who).await.expect("the same request again");
    assert_eq!((again.id.as_str(), again.created_at), ("o1", won.created_at));
    // Another order under that id: a conflict.
    let other = if won.pickup.lat == 45.50 { 45.49 } else { 45.50 };
    assert!(matches!(f.create_order(&t, new(other), &who).await, Err(hexfleet_actors::FleetError::Conflict(_))));
    // Also once it is closed (read from the store).
    f.command(&t, &won.id, hexfleet_actors::order::Command::Cancel, who.clone()).await.unwrap();
    let closed = f.create_order(&t, new(won.pickup.lat), &who).await.expect("the same request after the order closed");
    assert_eq!(closed.state, hexfleet_actors::domain::OrderState::Cancelled);
    assert!(matches!(f.create_order(&t, new(other), &who).await, Err(hexfleet_actors::FleetError::Conflict(_))));
    let created = store.all_events().iter().filter(|e| e.kind == "order.created").count();
    assert_eq!(created, 1, "still one order.created in the log");
}

/// A node whose clock is behind the one that last wrote a courier (a take-over, a restart on
/// another machine) still writes its profile changes: the store keeps the newer `updated_at`,
/// so the change is stamped past the stored row, not with the node's own clock.
#[tokio::test]
async fn a_node_with_a_clock_behind_still_writes_a_couriers_profile() {
    use hexfleet_actors::clock::ManualClock;
    use hexfleet_actors::fleet::CourierPatch;
    use hexfleet_actors::store::Store as _;
    let store = Arc::new(MemoryStore::new());
    let config = || FleetConfig { dispatch_tick: Duration::from_secs(3600), ..Default::default() };
    let start = |at: i64| {
        let store = store.clone();
        async move {
            let deps = FleetDeps { store, publisher: Arc::new(RecordingPublisher::default()), clock: Arc::new(ManualClock::new(at)), config: config() };
            Fleet::start(deps).await.unwrap()
        }
    };
    let (t, c) = (TenantId::new("t"), CourierId::new("c1"));
    let ahead = start(1_800_000_000_000).await;
    ahead.upsert_courier(&t, &c, CourierPatch { capacity: Some(2), ..Default::default() }, &Who::System).await.unwrap();
    ahead.shutdown().await.unwrap();
    // A minute behind.
    let behind = start(1_800_000_000_000 - 60_000).await;
    behind.upsert_courier(&t, &c, CourierPatch { capacity: Some(5), ..Default::default() }, &Who::System).await.unwrap();
    behind.set_status(&t, &c, CourierStatus::Available).unwrap();
    let stored = || async { store.load().await.unwrap().couriers.into_iter().find(|r| r.id == c).unwrap() };
    assert_eq!(stored().await.capacity, 5, "the profile change was dropped by the store");
    // Shutdown writes every courier's last state.
    behind.shutdown().await.unwrap();
    assert_eq!(stored().await.status, CourierStatus::Available, "the status change was dropped by the store");
}

/// A profile change whose commit is overtaken by a position snapshot stamped later (a fix that
/// arrives while the commit is under way) is still stored. The store keeps the newer row, so it
/// refuses the profile's; the actor then stamps the profile past both rows. It went back to the
/// profile's own time, so its snapshots were refused too, and a parked courier's change was
/// not stored until its next fix (nor at shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_change_overtaken_by_a_position_snapshot_is_still_stored() {
    use hexfleet_actors::clock::ManualClock;
    use hexfleet_actors::fleet::CourierPatch;
    use hexfleet_actors::store::Store as _;
    const T0: i64 = 1_800_000_000_000;
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(T0));
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), ..Default::default() };
    let deps = FleetDeps { store: store.clone(), publisher: Arc::new(RecordingPublisher::default()), clock: clock.clone(), config };
    let f = Fleet::start(deps).await.unwrap();
    let (t, c) = (TenantId::new("t"), CourierId::new("c1"));
    let stored = || async { store.load().await.unwrap().couriers.into_iter().find(|r| r.id == c) };
    let wait_stored = |what: &'static str, pred: fn(&hexfleet_actors::domain::CourierRecord) -> bool| async move {
        let ok = tokio::time::timeout(DEADLINE, async {
            while !stored().await.is_some_and(|r| pred(&r)) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "never stored: {what}; the row is {:?}", stored().await);
    };
    f.upsert_courier(&t, &c, CourierPatch { capacity: Some(2), ..Default::default() }, &Who::System).await.unwrap();
    f.ingest(&t, &c, vec![fix(52.5, 13.4, T0)]).unwrap();
    wait_stored("the first position", |r| r.last_fix.is_some()).await;

    store.set_commit_delay(Some(Duration::from_millis(500)));
    let change = f.upsert_courier(&t, &c, CourierPatch { capacity: Some(5), ..Default::default() }, &Who::System);
    let overtake = async {
        // While the profile's commit waits: a fix 6 s later, and its snapshot, stored first.
        clock.advance(6_000);
        f.ingest(&t, &c, vec![fix(52.5001, 13.4, T0 + 6_000)]).unwrap();
        wait_stored("the later snapshot", |r| r.updated_at >= T0 + 6_000).await;
    };
    let (changed, ()) = tokio::join!(change, overtake);
    store.set_commit_delay(None);
    assert_eq!(changed.unwrap().capacity, 5);
    wait_stored("the profile change", |r| r.capacity == 5).await;
    assert_eq!(f.courier(&t, &c).unwrap().capacity, 5);
    f.shutdown().await.unwrap();
    assert_eq!(stored().await.unwrap().capacity, 5);
}

/// An order command reported failed did not happen, and one that happened is not reported
/// failed: a command the actor has started is waited for until its commit settles (here a
/// commit slower than `call_timeout`), and one still waiting in the mailbox past
/// `call_timeout` is not applied (a timeout, not a refusal by the state machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_commit_is_waited_for_and_a_command_that_waited_too_long_is_not_applied() {
    let store = Arc::new(MemoryStore::new());
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), call_timeout: Duration::from_millis(300), commit_wait: Duration::from_secs(10), ..Default::default() };
    let f = fleet_on(&store, config).await;
    let t = TenantId::new("t");
    let new = NewOrder { id: None, pickup: LatLng::new(45.50, -73.57).unwrap(), dropoff: LatLng::new(45.51, -73.57).unwrap(), size: 1, ready_at: None, deliver_by: None };
    let o = f.create_order(&t, new, &Who::System).await.unwrap().id.clone();
    let c = CourierId::new("c1");
    f.ensure_courier(&t, &c).await.unwrap();
    let record = hexfleet_actors::domain::AssignmentRecord { at: 0, policy: "override".into(), courier: c.clone(), cost_s: 60.0, candidates: vec![] };
    let offer = Command::Offer { courier: c.clone(), lasts_ms: i64::MAX / 4, record };
    // Each commit takes a second, more than the 300 ms a command may wait to start. The offer
    // is sent first (`join!` polls in order, and a call sends on its first poll).
    store.set_commit_delay(Some(Duration::from_secs(1)));
    let (a, b) = tokio::join!(f.command(&t, &o, offer, Who::System), f.command(&t, &o, Command::Cancel, Who::System));
    store.set_commit_delay(None);
    assert_eq!(a.expect("the offer that ran is reported done").state, OrderState::Offered);
    assert!(matches!(b, Err(hexfleet_actors::FleetError::Timeout(_))), "the cancel was not started: {b:?}");
    assert_eq!(store.all_events().iter().filter(|e| e.kind == "order.cancelled").count(), 0, "nor applied later");
    assert_eq!(f.order(&t, &o).await.unwrap().state, OrderState::Offered);
}

/// First contacts and profile changes of one courier go one at a time: with a slow store, four
/// first connections and a profile `PUT` racing them log `courier.registered` once, and the
/// stored record is the profile (a registration stamped after it no longer wins). Two couriers
/// given one tracker device at once: one is refused, and the device map says the winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_registrations_log_once_keep_the_profile_and_never_share_a_device() {
    use hexfleet_actors::fleet::CourierPatch;
    use hexfleet_actors::store::Store as _;
    let store = Arc::new(MemoryStore::new());
    let config = FleetConfig { dispatch_tick: Duration::from_secs(3600), ..Default::default() };
    let f = fleet_on(&store, config).await;
    store.set_commit_delay(Some(Duration::from_millis(20)));
    let t = TenantId::new("t");
    for n in 0..5 {
        let c = CourierId::new(format!("c{n}"));
        let mut calls = tokio::task::JoinSet::new();
        let (f2, t2, c2) = (f.clone(), t.clone(), c.clone());
        calls.spawn(async move {
            let patch = CourierPatch { name: Some(format!("Named {n}")), device_id: Some(format!("dev-{n}")), ..Default::default() };
            f2.upsert_courier(&t2, &c2, patch, &Who::System).await.map(|_| ())
        });
        for _ in 0..4 {
            let (f, t, c) = (f.clone(), t.clone(), c.clone());
            calls.spawn(async move {
                // Some before the PUT reads the courier, some after.
                tokio::time::sleep(Duration::from_millis(n * 3)).await;
                f.ensure_courier(&t, &c).await.map(|_| ())
            });
        }
        while let Some(r) = calls.join_next().await {
            r.unwrap().unwrap();
        }
        let registered = store.all_events().iter().filter(|e| e.kind == "courier.registered" && e.entity_id == c.as_str()).count();
        assert_eq!(registered, 1, "{c}: one courier.registered");
    }
    let stored = store.load().await.unwrap().couriers;
    for n in 0..5 {
        let rec = stored.iter().find(|r| r.id.as_str() == format!("c{n}")).expect("stored");
        assert_eq!((rec.name.as_deref(), rec.device_id.as_deref()), (Some(format!("Named {n}").as_str()), Some(format!("dev-{n}").as_str())), "c{n}'s profile is stored");
    }
    // Two couriers, one device, at once.
    let claim = |c: &str| {
        let (f, t, c) = (f.clone(), t.clone(), CourierId::new(c));
        async move { f.upsert_courier(&t, &c, CourierPatch { device_id: Some("shared".into()), ..Default::default() }, &Who::System).await }
    };
    let (a, b) = tokio::join!(claim("c0"), claim("c1"));
    assert_eq!([&a, &b].iter().filter(|r| r.is_ok()).count(), 1, "one claim wins: {a:?} / {b:?}");
    let (winner, lost) = if a.is_ok() { ("c0", b) } else { ("c1", a) };
    assert!(matches!(lost, Err(hexfleet_actors::FleetError::Conflict(_))), "{lost:?}");
    assert_eq!(f.device("shared"), Some((t.clone(), CourierId::new(winner))));
    // The winner's old device is free again; the loser's is still its own.
    let (w, l) = if winner == "c0" { ("dev-0", "dev-1") } else { ("dev-1", "dev-0") };
    assert_eq!(f.device(w), None);
    assert_eq!(f.device(l).map(|(_, c)| c), Some(CourierId::new(if winner == "c0" { "c1" } else { "c0" })));
    store.set_commit_delay(None);
}
