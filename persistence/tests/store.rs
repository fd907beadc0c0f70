//! The storage suite: every test body runs against a fresh SQLite file and a fresh PostgreSQL
//! database (see `common`), so both backends are held to the same behaviour.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{Ctx, Kind, Proxy, courier, event, full_order, new_order, zone};
use hexfleet_actors::domain::{
    CourierId, EntityKind, LocationSample, OrderId, OrderState, TenantId, ZoneId,
};
use hexfleet_actors::store::{EventQuery, Store, StoreError, Write};
use hexfleet_persistence::{SqlStore, StoreOptions};

both_backends!(
    speed_tables_round_trip,
    order_round_trip,
    commit_is_atomic,
    group_commit,
    restart_recovers_everything,
    event_log_filters,
    location_history,
    purge_in_batches,
    courier_snapshots_latest_wins,
    zone_geometry_round_trip,
    snapshot_backpressure,
    migrate_is_idempotent,
    reads_from_a_runtime_that_stops_leave_the_store_working,
    a_large_backlog_is_flushed_in_batches,
    a_registration_never_replaces_a_profile,
    shutdown_writes_every_couriers_last_state_past_a_full_buffer,
    a_newer_builds_schema_and_rows_do_not_stop_this_one,
    a_snapshot_never_overwrites_a_profile_change,
);

fn t(s: &str) -> TenantId {
    TenantId::new(s)
}

async fn order_round_trip(ctx: Ctx) {
    let store = ctx.open().await;
    let o = full_order("t1", "o1");
    store.commit(vec![Write::Order(o.clone())]).await.unwrap();
    assert_eq!(store.order(&t("t1"), &OrderId::new("o1")).await.unwrap(), Some(o.clone()));
    // Tenant scoping: same id, other tenant.
    assert_eq!(store.order(&t("t2"), &OrderId::new("o1")).await.unwrap(), None);
    let mut other = new_order("t2", "o1", 5);
    other.state = OrderState::Assigned;
    store.commit(vec![Write::Order(other.clone())]).await.unwrap();
    assert_eq!(store.order(&t("t1"), &OrderId::new("o1")).await.unwrap(), Some(o.clone()));
    assert_eq!(store.order(&t("t2"), &OrderId::new("o1")).await.unwrap(), Some(other));

    // An older version never overwrites a newer one.
    let mut stale = o.clone();
    stale.version = 1;
    stale.state = OrderState::Created;
    store.commit(vec![Write::Order(stale)]).await.unwrap();
    assert_eq!(store.order(&t("t1"), &OrderId::new("o1")).await.unwrap(), Some(o.clone()));

    // Terminal orders are readable but not recovered.
    let mut done = o.clone();
    done.state = OrderState::Delivered;
    done.offer = None;
    done.version = 7;
    store.commit(vec![Write::Order(done.clone())]).await.unwrap();
    assert_eq!(store.order(&t("t1"), &OrderId::new("o1")).await.unwrap(), Some(done));
    let rec = store.load().await.unwrap();
    assert_eq!(rec.open_orders.len(), 1, "{:?}", rec.open_orders);
    assert_eq!(rec.open_orders[0].tenant, t("t2"));
    store.close().await.unwrap();
}

/// PostgreSQL: a COMMIT that outlasts the statement timeout (a slow fsync, a synchronous
/// standby that went away) may still commit. The writer asks how the transaction ended
/// (`txid_status`): one that committed is reported done, not failed (its caller would
/// otherwise retry or give up a write that happened, such as an accepted order that comes back
/// after a restart), and one that failed at its commit is reported failed. A deferred trigger
/// stands in for the slow COMMIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_commit_that_outlasts_the_timeout_is_resolved() {
    common::run(Kind::Postgres, |ctx| async move {
        let opts = hexfleet_persistence::StoreOptions { statement_timeout: Duration::from_secs(1), ..ctx.options() };
        let store = hexfleet_persistence::SqlStore::open(&ctx.url, opts).await.unwrap();
        ctx.exec(
            "CREATE FUNCTION slow_commit() RETURNS trigger AS $$ BEGIN \
               IF NEW.kind LIKE 'test.slow%' THEN PERFORM pg_sleep(1.3); END IF; \
               IF NEW.kind = 'test.slow_fail' THEN RAISE EXCEPTION 'refused at commit'; END IF; \
               RETURN NULL; END $$ LANGUAGE plpgsql; \
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED \
               FOR EACH ROW EXECUTE FUNCTION slow_commit();",
        )
        .await;
        let kinds = async || -> Vec<String> {
            let q = EventQuery { tenant: t("t1"), entity: None, since_seq: None, limit: 100 };
            store.events(q).await.unwrap().into_iter().map(|e| e.event.kind).collect()
        };
        let started = std::time::Instant::now();
        store.commit(vec![Write::Event(event("t1", EntityKind::Order, "o1", "test.slow", 1))]).await.expect("it committed");
        assert!(started.elapsed() >= Duration::from_millis(1_300), "the COMMIT outlasted the timeout: {:?}", started.elapsed());
        assert_eq!(kinds().await, ["test.slow"]);
        let err = store.commit(vec![Write::Event(event("t1", EntityKind::Order, "o2", "test.slow_fail", 2))]).await;
        assert!(matches!(err, Err(StoreError::Unavailable(_))), "{err:?}");
        assert_eq!(kinds().await, ["test.slow"]);
        // And the writer goes on.
        store.commit(vec![Write::Event(event("t1", EntityKind::Order, "o3", "order.created", 3))]).await.unwrap();
        assert_eq!(kinds().await, ["test.slow", "order.created"]);
        store.close().await.unwrap();
    })
    .await;
}

/// A courier's profile and its live state are written by two paths (profile changes, durably;
/// snapshots from its actor): a snapshot taken during a profile change carries the old profile
/// and a later `updated_at`. Flushed after the change, it overwrote the new profile; flushed
/// before, it made the store refuse the change as older. Now a snapshot writes only the live
/// columns (when newer), and a profile change always its profile (the live columns when newer).
async fn a_snapshot_never_overwrites_a_profile_change(ctx: Ctx) {
    let store = ctx.open().await;
    let p0 = courier("t1", "c1", 100, 50.0);
    store.commit(vec![Write::Courier(p0.clone())]).await.unwrap();
    let c1 = async || store.load().await.unwrap().couriers.into_iter().find(|c| c.id.as_str() == "c1").unwrap();
    // The change (at 200), then a snapshot taken meanwhile (at 300, the old profile).
    let mut p1 = p0.clone();
    (p1.name, p1.capacity, p1.updated_at) = (Some("renamed".into()), 5, 200);
    store.commit(vec![Write::Courier(p1.clone())]).await.unwrap();
    let snap = courier("t1", "c1", 300, 50.1);
    store.snapshot_couriers(vec![snap.clone()]).unwrap();
    store.flush().await.unwrap();
    let got = c1().await;
    assert_eq!((got.name.as_deref(), got.capacity), (Some("renamed"), 5), "the profile change stands: {got:?}");
    assert_eq!((got.last_fix, got.updated_at), (snap.last_fix, 300), "the snapshot's live state is taken");
    // The other order: a snapshot (at 400, the old profile) flushed before a change stamped 350.
    let snap = courier("t1", "c1", 400, 50.2);
    store.snapshot_couriers(vec![snap.clone()]).unwrap();
    store.flush().await.unwrap();
    let mut p2 = p1.clone();
    (p2.capacity, p2.updated_at, p2.last_fix) = (7, 350, courier("t1", "c1", 350, 49.0).last_fix);
    store.commit(vec![Write::Courier(p2.clone())]).await.unwrap();
    let got = c1().await;
    assert_eq!((got.name.as_deref(), got.capacity), (Some("renamed"), 7), "the profile change is not refused as older: {got:?}");
    assert_eq!((got.last_fix, got.updated_at), (snap.last_fix, 400), "the newer live state stays");
    store.close().await.unwrap();
}

/// A database a newer build has written (a rollback after a bad release, an older node in a
/// rolling upgrade): a migration this build does not know, and an open order in a state it
/// cannot read. The store opens, and the recovery loads every other row and leaves that one
/// out (logged). Before, sqlx refused to start (`VersionMissing`), and one unreadable row
/// failed the whole load, so no node could start on that database.
async fn a_newer_builds_schema_and_rows_do_not_stop_this_one(ctx: Ctx) {
    let store = ctx.open().await;
    store.commit(vec![Write::Order(full_order("t1", "o1")), Write::Order(full_order("t1", "o2")), Write::Courier(courier("t1", "c1", 5, 50.0))]).await.unwrap();
    store.close().await.unwrap();
    let checksum = if ctx.kind == Kind::Postgres { "decode('00', 'hex')" } else { "X'00'" };
    ctx.exec(&format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99991231000001, 'from a newer build', true, {checksum}, 0); \
         UPDATE orders SET state = 'teleporting' WHERE id = 'o2';"
    ))
    .await;
    let store = ctx.open().await;
    let rec = store.load().await.unwrap();
    let orders: Vec<&str> = rec.open_orders.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(orders, ["o1"], "the readable order is recovered, the other left out");
    assert_eq!(rec.couriers.len(), 1);
    // The store works on.
    store.commit(vec![Write::Order(full_order("t1", "o3"))]).await.unwrap();
    store.close().await.unwrap();
}

/// PostgreSQL: reads holding every connection of the pool (here two event reads stuck behind
/// a lock) do not fail commits. The writer has connections of its own; before, it waited for
/// one of the readers' past `acquire_timeout`, took that for an outage and failed the commit
/// (and everything queued behind it) with the database healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_busy_reads_do_not_fail_commits() {
    use sqlx::Connection as _;
    common::run(Kind::Postgres, |ctx| async move {
        let opts = StoreOptions { max_connections: 2, acquire_timeout: Duration::from_millis(500), ..ctx.options() };
        let store = SqlStore::open(&ctx.url, opts).await.unwrap();
        let mut locker = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        let mut tx = locker.begin().await.unwrap();
        sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();
        let reads: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.events(EventQuery { tenant: t("t1"), entity: None, since_seq: None, limit: 10 }).await })
            })
            .collect();
        // Both read connections wait on the lock.
        let mut watch = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
        let deadline = Instant::now() + Duration::from_secs(5);
        while sqlx::query_scalar::<_, i64>(waiting).fetch_one(&mut watch).await.unwrap() < 2 {
            assert!(Instant::now() < deadline, "the reads never waited on the lock");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.commit(vec![Write::Order(full_order("t1", "o1"))]).await.expect("the commit does not wait for the readers' connections");
        tx.rollback().await.unwrap();
        for r in reads {
            r.await.unwrap().expect("the reads go through once the lock is gone");
        }
        assert!(store.order(&t("t1"), &OrderId::new("o1")).await.unwrap().is_some());
        store.close().await.unwrap();
    })
    .await;
}

/// PostgreSQL: a snapshot flush that fails for now (here one courier's row is locked by another
/// transaction past the database's `lock_timeout`, error 55P03) is written again at once in
/// halves. The rows before the locked one in key order go in while the lock is held, the
/// locked one and those after it are kept, and the next flush writes them once the lock is
/// gone. Without the halving the whole batch waited for the lock (all ten rows kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_flush_that_fails_for_now_is_written_in_halves() {
    use sqlx::Connection as _;
    common::run(Kind::Postgres, |ctx| async move {
        ctx.exec("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET lock_timeout = ''200ms''', current_database()); END $$").await;
        // Flushed only when the test says so.
        let store = SqlStore::open(&ctx.url, StoreOptions { snapshot_flush: Duration::from_secs(3600), ..ctx.options() }).await.unwrap();
        let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        store.snapshot_couriers(ids.iter().map(|id| courier("t1", id, 100, 52.5)).collect()).unwrap();
        store.flush().await.unwrap();
        let mut locker = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        let mut tx = locker.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM couriers WHERE tenant = 't1' AND id = 'c7' FOR UPDATE").execute(&mut *tx).await.unwrap();
        store.snapshot_couriers(ids.iter().map(|id| courier("t1", id, 200, 52.6)).collect()).unwrap();
        let r = store.flush().await;
        assert!(r.is_err(), "the locked row cannot be written: {r:?}");
        let mut read = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        let moved = "SELECT id FROM couriers WHERE tenant = 't1' AND fix_lat > 52.55 ORDER BY id";
        let written: Vec<String> = sqlx::query_scalar(moved).fetch_all(&mut read).await.unwrap();
        let stats = store.stats();
        assert!(!written.contains(&"c7".to_owned()), "{written:?}");
        assert!(ids[..5].iter().all(|id| written.contains(id)), "the first half went in while c7 was locked: {written:?}");
        assert_eq!(written.len() + stats.buffered_couriers, 10, "every row written or kept: {written:?} {stats:?}");
        assert_eq!(stats.courier_rows, 10 + written.len() as u64, "{stats:?}");
        tx.rollback().await.unwrap();
        store.flush().await.unwrap();
        let written: Vec<String> = sqlx::query_scalar(moved).fetch_all(&mut read).await.unwrap();
        assert_eq!(written.len(), 10, "the rest once the lock is gone: {written:?}");
        assert_eq!(store.stats().buffered_couriers, 0);
        store.close().await.unwrap();
    })
    .await;
}

/// PostgreSQL: a commit that waited in the writer's queue longer than `queue_wait` (behind a
/// slow transaction) is answered failed and not written. Before, it was written whenever the
/// writer reached it, after its caller had given up and reported it failed (a 503 for an order
/// command that then happened). A trigger sleeping in one commit stands in for a slow database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_commit_queued_too_long_is_not_written() {
    use sqlx::Connection as _;
    common::run(Kind::Postgres, |ctx| async move {
        let opts = StoreOptions { statement_timeout: Duration::from_secs(5), queue_wait: Duration::from_millis(300), ..ctx.options() };
        let store = SqlStore::open(&ctx.url, opts).await.unwrap();
        ctx.exec(
            "CREATE FUNCTION slow_event() RETURNS trigger AS $$ BEGIN \
               IF NEW.kind = 'test.slow' THEN PERFORM pg_sleep(1.5); END IF; RETURN NULL; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER slow_event AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION slow_event();",
        )
        .await;
        let slow = tokio::spawn({
            let store = store.clone();
            async move { store.commit(vec![Write::Event(event("t1", EntityKind::Order, "o0", "test.slow", 1))]).await }
        });
        // Once the slow commit holds the writer, the next one queues behind it for over a second.
        let mut watch = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'";
        let deadline = Instant::now() + Duration::from_secs(5);
        while sqlx::query_scalar::<_, i64>(sleeping).fetch_one(&mut watch).await.unwrap() == 0 {
            assert!(Instant::now() < deadline, "the slow commit never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let late = store.commit(vec![Write::Order(full_order("t1", "o1"))]).await;
        assert!(matches!(late, Err(StoreError::Unavailable(_))), "{late:?}");
        slow.await.unwrap().expect("the slow commit itself went through");
        assert_eq!(store.order(&t("t1"), &OrderId::new("o1")).await.unwrap(), None, "the late commit was not written");
        // The writer goes on.
        store.commit(vec![Write::Order(full_order("t1", "o2"))]).await.unwrap();
        assert!(store.order(&t("t1"), &OrderId::new("o2")).await.unwrap().is_some());
        store.close().await.unwrap();
    })
    .await;
}

/// Installs a trigger that makes the database refuse any event of kind `test.fail`.
async fn install_failing_trigger(ctx: &Ctx) {
    match ctx.kind {
        Kind::Postgres => {
            ctx.exec(
                "CREATE FUNCTION refuse_test_fail() RETURNS trigger AS $$ BEGIN \
                   IF NEW.kind = 'test.fail' THEN RAISE EXCEPTION 'refused by test trigger'; END IF; \
                   RETURN NEW; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER refuse_test_fail BEFORE INSERT ON events \
                   FOR EACH ROW EXECUTE FUNCTION refuse_test_fail();",
            )
            .await
        }
        Kind::Sqlite => {
            ctx.exec(
                "CREATE TRIGGER refuse_test_fail BEFORE INSERT ON events \
                 WHEN NEW.kind = 'test.fail' BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END;",
            )
            .await
        }
    }
}

async fn commit_is_atomic(ctx: Ctx) {
    let store = ctx.open().await;
    install_failing_trigger(&ctx).await;
    let bad = vec![
        Write::Order(new_order("t1", "o-bad", 1)),
        Write::Courier(courier("t1", "c-bad", 1, 52.5)),
        Write::Zone(zone("t1", "z-bad")),
        Write::Event(event("t1", EntityKind::Order, "o-bad", "order.created", 1)),
        Write::Event(event("t1", EntityKind::Order, "o-bad", "test.fail", 1)),
    ];
    let err = store.commit(bad).await.expect_err("the trigger refuses the batch");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(store.order(&t("t1"), &OrderId::new("o-bad")).await.unwrap(), None);
    let rec = store.load().await.unwrap();
    assert!(rec.couriers.is_empty() && rec.zones.is_empty() && rec.open_orders.is_empty(), "{rec:?}");
    let q = EventQuery { tenant: t("t1"), entity: None, since_seq: None, limit: 100 };
    assert!(store.events(q).await.unwrap().is_empty());

    // A refused batch inside a group fails alone; the others of its group are committed.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let kind = if i == 17 { "test.fail" } else { "order.created" };
            let id = format!("o{i}");
            s.commit(vec![Write::Order(new_order("t1", &id, i)), Write::Event(event("t1", EntityKind::Order, &id, kind, i))])
                .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let res = task.await.unwrap();
        let present = store.order(&t("t1"), &OrderId::new(format!("o{i}"))).await.unwrap().is_some();
        if i == 17 {
            assert!(res.is_err() && !present, "batch 17 must fail alone");
        } else {
            assert!(res.is_ok() && present, "batch {i}: {res:?}");
        }
    }
    store.close().await.unwrap();
}

async fn group_commit(ctx: Ctx) {
    let store = ctx.open().await;
    let n = 300;
    let before = store.stats();
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("g{i}");
            s.commit(vec![
                Write::Order(new_order("t1", &id, i)),
                Write::Event(event("t1", EntityKind::Order, &id, "order.created", i)),
            ])
            .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let after = store.stats();
    let commits = after.commits - before.commits;
    let txs = after.commit_transactions - before.commit_transactions;
    eprintln!("{:?}: {commits} commits in {txs} transactions", ctx.kind);
    assert_eq!(commits, n as u64);
    assert!(txs < commits, "group commit should merge concurrent commits: {txs} transactions for {commits} commits");
    store.close().await.unwrap();

    // Durable: a new store on the same database sees all of them.
    let store = ctx.open().await;
    let rec = store.load().await.unwrap();
    assert_eq!(rec.open_orders.len(), n as usize);
    let q = EventQuery { tenant: t("t1"), entity: None, since_seq: None, limit: 10_000 };
    let evs = store.events(q).await.unwrap();
    assert_eq!(evs.len(), n as usize);
    assert!(evs.windows(2).all(|w| w[0].seq < w[1].seq));
    store.close().await.unwrap();
}

async fn restart_recovers_everything(ctx: Ctx) {
    let store = ctx.open().await;
    let o1 = full_order("t1", "o1");
    let mut o2 = new_order("t2", "o2", 10);
    o2.state = OrderState::PickedUp;
    o2.courier = Some(CourierId::new("c1"));
    let c_committed = courier("t1", "c1", 100, 52.5);
    let z = zone("t1", "z1");
    store
        .commit(vec![
            Write::Order(o1.clone()),
            Write::Order(o2.clone()),
            Write::Courier(c_committed),
            Write::Zone(z.clone()),
            Write::Zone(zone("t1", "z-gone")),
            Write::Event(event("t1", EntityKind::Order, "o1", "order.created", 1)),
        ])
        .await
        .unwrap();
    store.commit(vec![Write::DeleteZone { tenant: t("t1"), id: ZoneId::new("z-gone") }]).await.unwrap();
    // A newer snapshot of c1 and a snapshot-only courier, written by close's flush.
    let c1_new = courier("t1", "c1", 200, 52.6);
    let c2 = courier("t2", "c2", 150, 48.1);
    store.snapshot_couriers(vec![c1_new.clone(), c2.clone()]).unwrap();
    store.close().await.unwrap();
    assert!(store.commit(vec![Write::Order(new_order("t1", "late", 1))]).await.is_err(), "closed store refuses commits");

    let store = ctx.open().await;
    let mut rec = store.load().await.unwrap();
    rec.couriers.sort_by(|a, b| a.id.cmp(&b.id));
    rec.open_orders.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(rec.couriers, vec![c1_new, c2]);
    assert_eq!(rec.open_orders, vec![o1, o2]);
    assert_eq!(rec.zones, vec![z]);
    let q = EventQuery { tenant: t("t1"), entity: None, since_seq: None, limit: 10 };
    assert_eq!(store.events(q).await.unwrap().len(), 1);
    store.close().await.unwrap();
}

async fn event_log_filters(ctx: Ctx) {
    let store = ctx.open().await;
    let e = |tenant, entity, id, kind, ts| Write::Event(event(tenant, entity, id, kind, ts));
    store
        .commit(vec![
            e("t1", EntityKind::Order, "o1", "order.created", 1),
            e("t1", EntityKind::Courier, "o1", "courier.registered", 2),
            e("t2", EntityKind::Order, "o1", "order.created", 3),
            e("t1", EntityKind::Order, "o2", "order.created", 4),
        ])
        .await
        .unwrap();
    store.commit(vec![e("t1", EntityKind::Order, "o1", "order.assigned", 5)]).await.unwrap();
    store.commit(vec![e("t1", EntityKind::Order, "o1", "order.delivered", 6)]).await.unwrap();

    let all = store.events(EventQuery { tenant: t("t1"), entity: None, since_seq: None, limit: 100 }).await.unwrap();
    assert_eq!(all.iter().map(|s| s.event.ts).collect::<Vec<_>>(), vec![1, 2, 4, 5, 6]);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(all[0].event, event("t1", EntityKind::Order, "o1", "order.created", 1), "every field round-trips");

    let o1 = |since, limit| EventQuery {
        tenant: t("t1"),
        entity: Some((EntityKind::Order, "o1".to_owned())),
        since_seq: since,
        limit,
    };
    let kinds = |v: Vec<hexfleet_actors::store::StoredEvent>| v.into_iter().map(|s| s.event.kind).collect::<Vec<_>>();
    let hist = store.events(o1(None, 100)).await.unwrap();
    assert_eq!(kinds(hist.clone()), vec!["order.created", "order.assigned", "order.delivered"]);
    assert_eq!(kinds(store.events(o1(Some(hist[0].seq), 100)).await.unwrap()), vec!["order.assigned", "order.delivered"]);
    assert_eq!(kinds(store.events(o1(None, 2)).await.unwrap()), vec!["order.created", "order.assigned"]);
    assert!(store.events(o1(Some(hist[2].seq), 100)).await.unwrap().is_empty());
    let t2 = store.events(EventQuery { tenant: t("t2"), entity: None, since_seq: None, limit: 100 }).await.unwrap();
    assert_eq!(t2.len(), 1);
    assert_eq!(t2[0].event.tenant, t("t2"));
    store.close().await.unwrap();
}

/// The retention purge deletes a backlog larger than its batch completely, ties included, and
/// nothing at or after the cut-off; a courier's erase deletes all of its samples in batches.
async fn purge_in_batches(ctx: Ctx) {
    let store = SqlStore::open(&ctx.url, StoreOptions { purge_batch: 7, ..ctx.options() }).await.unwrap();
    // Three couriers with the same timestamps (ties across the batch boundary), two tenants.
    for (tenant, courier) in [("t1", "c1"), ("t1", "c2"), ("t2", "c1")] {
        store.record_locations(&t(tenant), &CourierId::new(courier), samples(1_000, 20)).unwrap();
    }
    store.flush().await.unwrap();
    // Samples at 1_000, 2_000, … 20_000: 15 per courier are before 16_000.
    assert_eq!(store.purge_locations(16_000).await.unwrap(), 3 * 15);
    for (tenant, courier) in [("t1", "c1"), ("t1", "c2"), ("t2", "c1")] {
        let left = store.export_locations(&t(tenant), &CourierId::new(courier), 0, i64::MAX, usize::MAX).await.unwrap();
        assert_eq!(left.iter().map(|s| s.ts).collect::<Vec<_>>(), vec![16_000, 17_000, 18_000, 19_000, 20_000]);
    }
    assert_eq!(store.purge_locations(16_000).await.unwrap(), 0);
    // A courier's erase goes in batches too: all of its samples, no one else's.
    store.record_locations(&t("t1"), &CourierId::new("c1"), samples(30_000, 12)).unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.erase_locations(&t("t1"), &CourierId::new("c1")).await.unwrap(), 5 + 12);
    assert!(store.export_locations(&t("t1"), &CourierId::new("c1"), 0, i64::MAX, usize::MAX).await.unwrap().is_empty());
    assert_eq!(store.export_locations(&t("t1"), &CourierId::new("c2"), 0, i64::MAX, usize::MAX).await.unwrap().len(), 5);
    assert_eq!(store.purge_locations(i64::MAX).await.unwrap(), 10);
    store.close().await.unwrap();
}

fn samples(from: i64, n: i64) -> Vec<LocationSample> {
    (0..n)
        .map(|i| LocationSample {
            pos: common::ll(52.5 + i as f64 * 1e-4, 13.4),
            ts: from + i * 1000,
            speed: if i % 2 == 0 { Some(3.5) } else { None },
        })
        .collect()
}

async fn location_history(ctx: Ctx) {
    let store = ctx.open().await;
    let (c1, c2) = (CourierId::new("c1"), CourierId::new("c2"));
    store.record_locations(&t("t1"), &c1, samples(10_000, 10)).unwrap();
    store.record_locations(&t("t1"), &c2, samples(10_000, 5)).unwrap();
    store.record_locations(&t("t2"), &c1, samples(10_000, 3)).unwrap();
    // A duplicate sample (same courier and time) is kept once.
    store.record_locations(&t("t1"), &c1, samples(10_000, 1)).unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.stats().buffered_locations, 0);

    let all = store.export_locations(&t("t1"), &c1, 0, i64::MAX, usize::MAX).await.unwrap();
    assert_eq!(all, samples(10_000, 10), "every field round-trips, oldest first");
    let range = store.export_locations(&t("t1"), &c1, 12_000, 14_000, usize::MAX).await.unwrap();
    assert_eq!(range.iter().map(|s| s.ts).collect::<Vec<_>>(), vec![12_000, 13_000, 14_000], "inclusive range");
    let page = store.export_locations(&t("t1"), &c1, 12_000, i64::MAX, 2).await.unwrap();
    assert_eq!(page.iter().map(|s| s.ts).collect::<Vec<_>>(), vec![12_000, 13_000], "a page: the oldest `limit`");

    // Erase: only that courier of that tenant, including samples still buffered.
    store.record_locations(&t("t1"), &c1, samples(50_000, 2)).unwrap();
    assert_eq!(store.erase_locations(&t("t1"), &c1).await.unwrap(), 10);
    store.flush().await.unwrap();
    assert!(store.export_locations(&t("t1"), &c1, 0, i64::MAX, usize::MAX).await.unwrap().is_empty());
    assert_eq!(store.export_locations(&t("t2"), &c1, 0, i64::MAX, usize::MAX).await.unwrap().len(), 3);
    assert_eq!(store.export_locations(&t("t1"), &c2, 0, i64::MAX, usize::MAX).await.unwrap().len(), 5);

    // Purge: everything older than the cut-off, every tenant.
    assert_eq!(store.purge_locations(12_000).await.unwrap(), 2 + 2);
    assert_eq!(store.export_locations(&t("t1"), &c2, 0, i64::MAX, usize::MAX).await.unwrap().len(), 3);
    assert_eq!(store.export_locations(&t("t2"), &c1, 0, i64::MAX, usize::MAX).await.unwrap().len(), 1);
    store.close().await.unwrap();
}

async fn courier_snapshots_latest_wins(ctx: Ctx) {
    let store = ctx.open().await;
    let newest = courier("t1", "c1", 300, 52.7);
    store.snapshot_couriers(vec![courier("t1", "c1", 100, 52.5)]).unwrap();
    store.snapshot_couriers(vec![newest.clone(), courier("t1", "c2", 100, 52.5)]).unwrap();
    store.snapshot_couriers(vec![courier("t1", "c1", 200, 52.6)]).unwrap(); // older: ignored
    // The periodic flusher writes them without an explicit flush.
    let s = store.clone();
    common::eventually(Duration::from_secs(5), "snapshots flushed", move || {
        let s = s.clone();
        async move { s.load().await.unwrap().couriers.len() == 2 }
    })
    .await;
    let rec = store.load().await.unwrap();
    assert_eq!(rec.couriers.iter().find(|c| c.id.as_str() == "c1"), Some(&newest));
    assert!(store.stats().courier_rows >= 2);

    // An older snapshot arriving later, through the buffer or a commit, never overwrites.
    store.snapshot_couriers(vec![courier("t1", "c1", 250, 1.0)]).unwrap();
    store.flush().await.unwrap();
    store.commit(vec![Write::Courier(courier("t1", "c1", 260, 2.0))]).await.unwrap();
    let rec = store.load().await.unwrap();
    assert_eq!(rec.couriers.iter().find(|c| c.id.as_str() == "c1"), Some(&newest));
    // A newer one does; a courier with no fix round-trips.
    let mut bare = courier("t1", "c1", 400, 0.0);
    bare.last_fix = None;
    bare.name = None;
    bare.device_id = None;
    store.commit(vec![Write::Courier(bare.clone())]).await.unwrap();
    let rec = store.load().await.unwrap();
    assert_eq!(rec.couriers.iter().find(|c| c.id.as_str() == "c1"), Some(&bare));
    store.close().await.unwrap();
}

/// A store is shared by runtimes: HTTP handlers read it from their workers' runtimes, which can
/// be busy (a worker thread running a long request polls no I/O meanwhile) and stop before the
/// final flush at shutdown. A connection the pool opened during such a read must not belong to
/// that runtime, or statements on the main runtime that get it hang or fail.
async fn reads_from_a_runtime_that_stops_leave_the_store_working(ctx: Ctx) {
    let store = SqlStore::open(&ctx.url, StoreOptions { max_connections: 4, ..ctx.options() }).await.unwrap();
    let q = || EventQuery { tenant: t("t1"), entity: None, since_seq: None, limit: 10 };
    let s = store.clone();
    let (read, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let (read_tx, read_rx) = read;
    let (release_tx, release_rx) = release;
    let other = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            // More reads at once than the pool has connections: it opens every one it may.
            let reads = futures_util::future::join_all((0..8).map(|_| s.events(q()))).await;
            read_tx.send(reads.iter().all(Result::is_ok)).unwrap();
            // Busy: this runtime's thread polls nothing until the test is done with the store.
            let _ = release_rx.recv();
        });
    });
    assert!(read_rx.recv().unwrap(), "reads on the other runtime failed");
    for round in 0..3 {
        let reads = futures_util::future::join_all((0..8).map(|_| store.events(q()))).await;
        assert!(reads.iter().all(Result::is_ok), "round {round} while the other runtime is busy: {reads:?}");
    }
    release_tx.send(()).unwrap();
    other.join().unwrap();
    // That runtime is gone now. Writes, reads and the final flush must still work.
    let reads = futures_util::future::join_all((0..8).map(|_| store.events(q()))).await;
    assert!(reads.iter().all(Result::is_ok), "after the other runtime stopped: {reads:?}");
    store.commit(vec![Write::Event(event("t1", EntityKind::Courier, "c1", "courier.created", 100))]).await.unwrap();
    store.snapshot_couriers(vec![courier("t1", "c1", 100, 52.5)]).unwrap();
    store.close().await.unwrap();
    let store = ctx.open().await;
    assert_eq!(store.load().await.unwrap().couriers.len(), 1);
    assert_eq!(store.events(q()).await.unwrap().len(), 1);
    store.close().await.unwrap();
}

/// A backlog larger than `flush_batch` (after an outage, say) goes out in several transactions,
/// each small enough for the statement timeout, not in one that could outlast it every time.
async fn a_large_backlog_is_flushed_in_batches(ctx: Ctx) {
    let store = SqlStore::open(&ctx.url, StoreOptions { flush_batch: 100, snapshot_flush: Duration::from_secs(1), ..ctx.options() }).await.unwrap();
    let c1 = CourierId::new("c1");
    store.record_locations(&t("t1"), &c1, samples(0, 1_050)).unwrap();
    let couriers: Vec<_> = (0..250).map(|i| courier("t1", &format!("c{i}"), 100, 52.5)).collect();
    store.snapshot_couriers(couriers).unwrap();
    store.flush().await.unwrap();
    let stats = store.stats();
    assert_eq!((stats.location_rows, stats.courier_rows, stats.buffered_locations, stats.buffered_couriers), (1_050, 250, 0, 0));
    assert!(stats.snapshot_flushes >= 11, "1,050 samples in batches of 100: {stats:?}");
    assert_eq!(store.export_locations(&t("t1"), &c1, 0, i64::MAX, usize::MAX).await.unwrap(), samples(0, 1_050));
    assert_eq!(store.load().await.unwrap().couriers.len(), 250);
    store.close().await.unwrap();
}

async fn zone_geometry_round_trip(ctx: Ctx) {
    let store = ctx.open().await;
    let z = zone("t1", "z1");
    assert_eq!(z.geometry.0[0].interiors().len(), 1, "fixture has a hole");
    store.commit(vec![Write::Zone(z.clone())]).await.unwrap();
    let rec = store.load().await.unwrap();
    assert_eq!(rec.zones, vec![z.clone()]);
    // Bit-exact coordinates.
    let bits = |z: &hexfleet_actors::domain::ZoneRecord| -> Vec<u64> {
        use geo::CoordsIter;
        z.geometry.coords_iter().flat_map(|c| [c.x.to_bits(), c.y.to_bits()]).collect()
    };
    assert_eq!(bits(&rec.zones[0]), bits(&z));
    // Replace, then delete.
    let mut z2 = z.clone();
    z2.kind = "restricted".into();
    z2.name = None;
    z2.geometry.0.truncate(1);
    store.commit(vec![Write::Zone(z2.clone())]).await.unwrap();
    assert_eq!(store.load().await.unwrap().zones, vec![z2]);
    store.commit(vec![Write::DeleteZone { tenant: t("t1"), id: ZoneId::new("z1") }]).await.unwrap();
    assert!(store.load().await.unwrap().zones.is_empty());
    store.close().await.unwrap();
}

/// A courier app's first contact registers the courier with a default profile; a profile PUT
/// racing it in the same millisecond (same `updated_at`, which an upsert cannot order) must
/// win, in either order and within one group too.
async fn a_registration_never_replaces_a_profile(ctx: Ctx) {
    let store = ctx.open().await;
    let profile = courier("t1", "c1", 1_000, 50.0);
    let mut default = courier("t1", "c1", 1_000, 0.0);
    (default.name, default.device_id, default.last_fix) = (None, None, None);
    store.commit(vec![Write::Courier(profile.clone())]).await.unwrap();
    store.commit(vec![Write::RegisterCourier(default.clone())]).await.unwrap();
    // The same two in one group, the registration last.
    let mut other = profile.clone();
    other.id = CourierId::new("c2");
    let mut other_default = default.clone();
    other_default.id = CourierId::new("c2");
    store.commit(vec![Write::Courier(other.clone()), Write::RegisterCourier(other_default)]).await.unwrap();
    // In one group, a registration stamped after the profile (its node's clock read later):
    // the profile still wins (the registration was applied first, and the profile's upsert
    // then refused as older).
    let mut later = profile.clone();
    later.id = CourierId::new("c4");
    let mut later_default = default.clone();
    (later_default.id, later_default.updated_at) = (CourierId::new("c4"), 1_005);
    store.commit(vec![Write::Courier(later.clone()), Write::RegisterCourier(later_default)]).await.unwrap();
    // A registration alone inserts.
    let mut fresh = default.clone();
    fresh.id = CourierId::new("c3");
    store.commit(vec![Write::RegisterCourier(fresh.clone())]).await.unwrap();
    store.close().await.unwrap();
    let store = ctx.open().await;
    let mut got = store.load().await.unwrap().couriers;
    got.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    assert_eq!(got, vec![profile, other, fresh, later]);
    store.close().await.unwrap();
}

/// `Fleet::shutdown` writes every courier's latest state, also when the snapshot buffer cannot
/// take them all at once: it flushes and queues the rest again instead of dropping them.
async fn shutdown_writes_every_couriers_last_state_past_a_full_buffer(ctx: Ctx) {
    use hexfleet_actors::clock::ManualClock;
    use hexfleet_actors::domain::{Fix, LatLng};
    use hexfleet_actors::publish::NullPublisher;
    use hexfleet_actors::{Fleet, FleetConfig, FleetDeps};
    use std::sync::Arc;
    let opts = StoreOptions { snapshot_capacity: 1_500, snapshot_flush: Duration::from_secs(1), ..ctx.options() };
    let store = Arc::new(SqlStore::open(&ctx.url, opts).await.unwrap());
    let clock = Arc::new(ManualClock::new(1_764_000_000_000));
    // A courier snapshots itself once an hour here, so its last move is written by the
    // shutdown alone.
    let config = FleetConfig { snapshot_every_ms: 3_600_000, ..FleetConfig::default() };
    let fleet = Fleet::start(FleetDeps { store: store.clone(), publisher: Arc::new(NullPublisher), clock: clock.clone(), config }).await.unwrap();
    let tenant = t("t1");
    let ids: Vec<CourierId> = (0..2_000).map(|i| CourierId::new(format!("c{i}"))).collect();
    for r in futures_util::future::join_all(ids.iter().map(|id| fleet.ensure_courier(&tenant, id))).await {
        r.unwrap();
    }
    let move_all = |lat: f64| {
        let ts = clock_now(&clock);
        for id in &ids {
            let fix = Fix { pos: LatLng::new(lat, 13.4).unwrap(), ts, speed: None, heading: None, acc: None };
            fleet.ingest(&tenant, id, [fix]).unwrap();
        }
    };
    let all_at = |lat: f64| ids.iter().all(|id| fleet.courier(&tenant, id).unwrap().last_fix.is_some_and(|f| f.pos.lat == lat));
    move_all(50.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !all_at(50.0) {
        assert!(Instant::now() < deadline, "couriers did not take the first fix");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.flush().await.unwrap();
    clock.advance(10_000);
    move_all(50.0005); // 55 m in 10 s: a plausible move
    while !all_at(50.0005) {
        assert!(Instant::now() < deadline, "couriers did not take the second fix");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 2,000 couriers' last state in chunks of 1,000 into a buffer of 1,500.
    fleet.shutdown().await.unwrap();
    store.close().await.unwrap();
    let store = ctx.open().await;
    let couriers = store.load().await.unwrap().couriers;
    let stale: Vec<&str> = couriers.iter().filter(|c| c.last_fix.is_none_or(|f| f.pos.lat != 50.0005)).map(|c| c.id.as_str()).collect();
    assert_eq!((couriers.len(), stale.len()), (2_000, 0), "stale after shutdown: {:?}", &stale[..stale.len().min(5)]);
    store.close().await.unwrap();
}

fn clock_now(c: &hexfleet_actors::clock::ManualClock) -> i64 {
    use hexfleet_actors::clock::Clock as _;
    c.now_ms()
}

async fn snapshot_backpressure(ctx: Ctx) {
    let opts = StoreOptions { snapshot_capacity: 3, snapshot_flush: Duration::from_secs(1), ..ctx.options() };
    let store = SqlStore::open(&ctx.url, opts).await.unwrap();
    store.snapshot_couriers((0..3).map(|i| courier("t1", &format!("c{i}"), 1, 50.0)).collect()).unwrap();
    // Latest-wins updates of buffered couriers still fit; a fourth courier does not.
    store.snapshot_couriers(vec![courier("t1", "c0", 2, 50.0)]).unwrap();
    let err = store.snapshot_couriers(vec![courier("t1", "c3", 2, 50.0)]).unwrap_err();
    assert!(matches!(err, StoreError::Backpressure), "{err:?}");
    store.flush().await.unwrap();
    store.snapshot_couriers(vec![courier("t1", "c3", 2, 50.0)]).unwrap();
    let err = store.record_locations(&t("t1"), &CourierId::new("c0"), samples(0, 4)).unwrap_err();
    assert!(matches!(err, StoreError::Backpressure), "{err:?}");
    store.close().await.unwrap();
    let store = ctx.open().await;
    assert_eq!(store.load().await.unwrap().couriers.len(), 4);
    store.close().await.unwrap();
}

async fn migrate_is_idempotent(ctx: Ctx) {
    let expected = match ctx.kind {
        Kind::Sqlite => "sqlite",
        Kind::Postgres => "postgres",
    };
    assert_eq!(hexfleet_persistence::migrate(&ctx.url).await.unwrap(), expected);
    assert_eq!(hexfleet_persistence::migrate(&ctx.url).await.unwrap(), expected);
    let store = ctx.open().await;
    assert_eq!(store.backend(), expected);
    store.ping().await.unwrap();
    store.close().await.unwrap();
}

/// SQLite accepts a `sqlite:` URL and a plain path, creating missing directories.
#[tokio::test]
async fn sqlite_url_forms() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("a/b/plain.db");
    let url = format!("sqlite:{}", dir.path().join("c/url.db").display());
    for u in [plain.to_string_lossy().into_owned(), url] {
        let store = SqlStore::open(&u, StoreOptions::default()).await.unwrap();
        assert_eq!(store.backend(), "sqlite");
        store.commit(vec![Write::Order(new_order("t1", "o1", 1))]).await.unwrap();
        store.close().await.unwrap();
        let store = SqlStore::open(&u, StoreOptions::default()).await.unwrap();
        assert_eq!(store.load().await.unwrap().open_orders.len(), 1, "{u}");
        store.close().await.unwrap();
    }
    assert!(matches!(
        SqlStore::open("mysql://x", StoreOptions::default()).await,
        Err(hexfleet_persistence::PersistenceError::UnsupportedUrl(_))
    ));
}

/// PostgreSQL behind a proxy that is cut: durable writes fail fast with `Unavailable`,
/// snapshots stay buffered, and everything resumes when the proxy is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_and_recovery() {
    common::run(Kind::Postgres, |ctx| outage(ctx, Outage::Cut)).await;
}

/// The same with a network partition instead of refused connections: connections hang rather
/// than fail, so only the store's timeouts make the commit fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_partition_and_recovery() {
    common::run(Kind::Postgres, |ctx| outage(ctx, Outage::Stall)).await;
}

#[derive(Clone, Copy, Debug)]
enum Outage {
    Cut,
    Stall,
}

async fn outage(ctx: Ctx, how: Outage) {
    let proxy = Proxy::start(common::pg_host_port(&ctx.url)).await;
    let url = common::via(&ctx.url, proxy.addr);
    let opts = StoreOptions {
        acquire_timeout: Duration::from_millis(500),
        statement_timeout: Duration::from_secs(2),
        // Small groups: without the writer's fail-fast, 64 callers would wait 8 timeouts.
        max_group: 8,
        ..ctx.options()
    };
    let store = SqlStore::open(&url, opts).await.unwrap();
    store.commit(vec![Write::Order(new_order("t1", "before", 1))]).await.unwrap();
    store.snapshot_couriers(vec![courier("t1", "c0", 1, 50.0)]).unwrap();
    store.flush().await.unwrap();

    match how {
        Outage::Cut => proxy.cut(),
        Outage::Stall => proxy.stall(),
    }
    let started = Instant::now();
    let err = store.commit(vec![Write::Order(new_order("t1", "during", 2))]).await.unwrap_err();
    let took = started.elapsed();
    eprintln!("{how:?}: commit failed after {took:?}: {err}");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(took < Duration::from_secs(3), "commit must fail within a few seconds, took {took:?}");
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));

    // Many callers at once: each fails within about two attempts, not one timeout per group.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.commit(vec![Write::Order(new_order("t1", &format!("during{i}"), 2))]).await
        }));
    }
    for task in tasks {
        assert!(matches!(task.await.unwrap(), Err(StoreError::Unavailable(_))));
    }
    let took = started.elapsed();
    eprintln!("{how:?}: 64 concurrent commits failed within {took:?}");
    assert!(took < Duration::from_secs(3), "concurrent commits must fail fast, took {took:?}");

    // Tracking goes on: snapshots are accepted and kept while flushes fail.
    let couriers: Vec<_> = (0..50).map(|i| courier("t1", &format!("c{i}"), 10, 50.0 + f64::from(i) * 0.01)).collect();
    store.snapshot_couriers(couriers.clone()).unwrap();
    store.record_locations(&t("t1"), &CourierId::new("c1"), samples(1_000, 5)).unwrap();
    let s = store.clone();
    common::eventually(Duration::from_secs(10), "a flush fails and keeps its rows", move || {
        let st = s.stats();
        async move { st.flush_failures >= 1 && st.buffered_couriers == 50 && st.buffered_locations == 5 }
    })
    .await;

    proxy.restore();
    let s = store.clone();
    common::eventually(Duration::from_secs(10), "commits succeed again", move || {
        let s = s.clone();
        async move { s.commit(vec![Write::Order(new_order("t1", "after", 3))]).await.is_ok() }
    })
    .await;
    let s = store.clone();
    common::eventually(Duration::from_secs(10), "buffered snapshots written", move || {
        let st = s.stats();
        async move { st.buffered_couriers == 0 && st.buffered_locations == 0 }
    })
    .await;
    store.close().await.unwrap();
    drop(proxy);

    // Checked directly, not through the proxy.
    let direct = ctx.open().await;
    let mut rec = direct.load().await.unwrap();
    rec.couriers.sort_by(|a, b| a.id.cmp(&b.id));
    let mut expected = couriers;
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(rec.couriers, expected);
    let mut ids: Vec<_> = rec.open_orders.iter().map(|o| o.id.as_str().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, vec!["after", "before"], "the commit that failed during the outage is absent");
    assert_eq!(direct.export_locations(&t("t1"), &CourierId::new("c1"), 0, i64::MAX, usize::MAX).await.unwrap().len(), 5);
    direct.close().await.unwrap();
}

async fn speed_tables_round_trip(ctx: Ctx) {
    use hexfleet_actors::domain::Vehicle;
    use hexfleet_actors::store::SpeedTable;
    let store = ctx.open().await;
    assert!(store.load_speeds().await.unwrap().is_empty());
    let table = |tenant: &str, vehicle, text: &str, at| SpeedTable { tenant: TenantId::new(tenant), vehicle, text: text.into(), updated_at: at };
    store
        .save_speeds(vec![table("t1", Vehicle::Bike, "hexfleet-speeds v1\n87283472bffffff 3 4.5 10\n", 1), table("t2", Vehicle::Car, "hexfleet-speeds v1\n", 1)])
        .await
        .unwrap();
    // Saving again replaces that pair only.
    store.save_speeds(vec![table("t1", Vehicle::Bike, "hexfleet-speeds v1\n", 2)]).await.unwrap();
    let mut got = store.load_speeds().await.unwrap();
    got.sort_by(|a, b| a.tenant.as_str().cmp(b.tenant.as_str()));
    assert_eq!(got, vec![table("t1", Vehicle::Bike, "hexfleet-speeds v1\n", 2), table("t2", Vehicle::Car, "hexfleet-speeds v1\n", 1)]);
    store.close().await.unwrap();
}

/// On PostgreSQL an event's `seq` comes from a sequence taken outside any lock, so two
/// transactions appending a tenant's events could commit out of `seq` order, and a reader
/// following `since` would pass the earlier one for good. Every appender holds the tenant's
/// event lock until it commits. Here another transaction holds it with seq S1 not yet
/// committed (as a webhook change or another node's writer would): the store's own append
/// waits for it, so no reader sees a seq past S1 before S1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_events_become_visible_in_seq_order_on_postgres() {
    use sqlx::Connection as _;
    common::run(Kind::Postgres, |ctx| async move {
        let store = ctx.open().await;
        let mut other = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
        // What every appender does first (`ops::insert_events`), then its insert.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7011))").bind("t1").execute(&mut other).await.unwrap();
        let s1: i64 = sqlx::query_scalar(
            "INSERT INTO events (tenant, entity, entity_id, kind, actor, ts, attrs) \
             VALUES ('t1', 'order', 'o1', 'order.created', 'x', 1, '{}') RETURNING seq",
        )
        .fetch_one(&mut other)
        .await
        .unwrap();
        let s = store.clone();
        let append = tokio::spawn(async move { s.commit(vec![Write::Event(event("t1", EntityKind::Order, "o2", "order.created", 2))]).await });
        let all = || EventQuery { tenant: TenantId::new("t1"), entity: None, since_seq: Some(0), limit: 100 };
        // Nothing to wait for when it is right: the append gets half a second to get past the
        // lock (it commits in milliseconds when it does not take it).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(store.events(all()).await.unwrap(), vec![], "a seq past {s1} is visible while {s1} is not");
        assert!(!append.is_finished(), "the append did not wait for the tenant's event lock");
        sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
        append.await.unwrap().unwrap();
        let seqs: Vec<i64> = store.events(all()).await.unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs.len(), 2);
        assert!(seqs[0] == s1 && seqs[1] > s1, "{seqs:?}");
        // Another tenant's appends do not wait for t1's.
        sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7011))").bind("t1").execute(&mut other).await.unwrap();
        let t2 = tokio::time::timeout(Duration::from_secs(5), store.commit(vec![Write::Event(event("t2", EntityKind::Order, "o3", "order.created", 3))]));
        t2.await.expect("t2's append does not wait for t1's lock").unwrap();
        sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
        store.close().await.unwrap();
    })
    .await;
}
