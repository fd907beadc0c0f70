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
