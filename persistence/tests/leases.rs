//! Market leases on both backends: taking, keeping, renewing and releasing a lease on the
//! database clock, the epoch (fencing token) rules, which markets are free, loading one
//! market, and fenced commits (a batch whose fence does not hold writes nothing, alone).

#[macro_use]
mod common;

use std::time::Duration;

use common::{Ctx, Kind, courier, event, eventually, new_order, zone};
use hexfleet_actors::domain::{CourierId, EntityKind, OrderId, OrderState, TenantId, ZoneId};
use hexfleet_actors::store::{EventQuery, Store, StoreError, Write};
use hexfleet_persistence::SqlStore;
use sqlx::Connection;

both_backends!(
    acquire_keep_and_take_over,
    renew_and_release,
    unowned_markets_and_load_tenant,
    fenced_commit_writes_nothing,
    fenced_batch_fails_alone_in_its_group,
    fence_waits_for_a_take_over_in_progress,
    concurrent_acquires_have_one_winner,
    a_lost_markets_buffered_snapshots_are_dropped,
    flushes_are_fenced_by_the_lease_held_at_flush_time,
);

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(300);

fn t(s: &str) -> TenantId {
    TenantId::new(s)
}

fn fence(tenant: &str, holder: &str, epoch: i64) -> Write {
    Write::Fence { tenant: t(tenant), holder: holder.into(), epoch }
}

/// Waits (with a deadline) until `tenant`'s lease is no longer live on the database clock.
async fn until_lapsed(store: &SqlStore, tenant: &str) {
    let tenant = t(tenant);
    eventually(Duration::from_secs(10), "the lease lapses", || async {
        !store.lease(&tenant).await.unwrap().expect("lease row").live
    })
    .await;
}

/// An order and its creation event, for a fenced batch.
fn order_batch(tenant: &str, id: &str) -> Vec<Write> {
    vec![
        Write::Order(new_order(tenant, id, 1_000)),
        Write::Event(event(tenant, EntityKind::Order, id, "order.created", 1_000)),
    ]
}

/// Events recorded for one order.
async fn order_events(store: &SqlStore, tenant: &str, id: &str) -> usize {
    let q = EventQuery { tenant: t(tenant), entity: Some((EntityKind::Order, id.into())), since_seq: None, limit: 100 };
    store.events(q).await.unwrap().len()
}

async fn order_stored(store: &SqlStore, tenant: &str, id: &str) -> bool {
    store.order(&t(tenant), &OrderId::new(id)).await.unwrap().is_some()
}

async fn acquire_keep_and_take_over(ctx: Ctx) {
    let store = ctx.open().await;
    assert_eq!(store.lease(&t("m1")).await.unwrap(), None, "no lease yet");
    assert!(store.leases().await.unwrap().is_empty());

    // A free market: epoch 1.
    let a = store.acquire_lease(&t("m1"), "A", "http://a:1", LONG).await.unwrap().expect("free market is taken");
    assert_eq!((a.tenant.as_str(), a.holder.as_str(), a.addr.as_str(), a.epoch, a.live), ("m1", "A", "http://a:1", 1, true));
    assert_eq!(store.lease(&t("m1")).await.unwrap(), Some(a.clone()));

    // Another holder is refused while the lease is live, and changes nothing.
    assert_eq!(store.acquire_lease(&t("m1"), "B", "http://b:1", LONG).await.unwrap(), None);
    assert_eq!(store.lease(&t("m1")).await.unwrap(), Some(a.clone()));

    // The holder taking it again keeps the epoch and gets a new expiry and address.
    let again = store.acquire_lease(&t("m1"), "A", "http://a:2", LONG).await.unwrap().expect("own lease");
    assert_eq!((again.epoch, again.addr.as_str(), again.live), (1, "http://a:2", true));
    assert!(again.expires_at >= a.expires_at);

    // Shortened, it lapses on the database clock; then another holder takes it, epoch 2.
    let short = store.acquire_lease(&t("m1"), "A", "http://a:2", SHORT).await.unwrap().expect("own lease");
    assert_eq!(short.epoch, 1);
    assert!(short.expires_at < again.expires_at);
    until_lapsed(&store, "m1").await;
    let lapsed = store.lease(&t("m1")).await.unwrap().unwrap();
    assert_eq!((lapsed.holder.as_str(), lapsed.epoch, lapsed.live), ("A", 1, false), "a lapsed lease keeps its row");
    let b = store.acquire_lease(&t("m1"), "B", "http://b:1", LONG).await.unwrap().expect("lapsed lease is taken");
    assert_eq!((b.holder.as_str(), b.addr.as_str(), b.epoch, b.live), ("B", "http://b:1", 2, true));
    assert_eq!(store.acquire_lease(&t("m1"), "A", "http://a:2", LONG).await.unwrap(), None, "the old holder is refused");

    // The same holder taking its own lapsed lease again also moves the epoch on.
    store.acquire_lease(&t("m2"), "A", "http://a:2", SHORT).await.unwrap().expect("free");
    until_lapsed(&store, "m2").await;
    let m2 = store.acquire_lease(&t("m2"), "A", "http://a:2", LONG).await.unwrap().expect("own lapsed lease");
    assert_eq!(m2.epoch, 2);

    let all = store.leases().await.unwrap();
    let got: Vec<(&str, &str, i64, bool)> =
        all.iter().map(|l| (l.tenant.as_str(), l.holder.as_str(), l.epoch, l.live)).collect();
    assert_eq!(got, [("m1", "B", 2, true), ("m2", "A", 2, true)]);
    store.close().await.unwrap();
}

async fn renew_and_release(ctx: Ctx) {
    let store = ctx.open().await;
    let m1 = store.acquire_lease(&t("m1"), "A", "http://a", LONG).await.unwrap().unwrap();
    store.acquire_lease(&t("m2"), "A", "http://a", SHORT).await.unwrap().unwrap();
    store.acquire_lease(&t("m3"), "A", "http://a", LONG).await.unwrap().unwrap();
    store.acquire_lease(&t("m4"), "B", "http://b", LONG).await.unwrap().unwrap();
    until_lapsed(&store, "m2").await;

    // Only the holder's leases are renewed and returned, by tenant: the lapsed m2, which no one
    // took, comes back at its epoch.
    let renewed = store.renew_leases("A", LONG).await.unwrap();
    assert_eq!(renewed, vec![(t("m1"), 1), (t("m2"), 1), (t("m3"), 1)]);
    let m1_after = store.lease(&t("m1")).await.unwrap().unwrap();
    assert!(m1_after.live);
    let m2 = store.lease(&t("m2")).await.unwrap().unwrap();
    assert!(m2.live && m2.epoch == 1, "a lapsed lease no one took is renewed: {m2:?}");
    assert!(store.renew_leases("nobody", LONG).await.unwrap().is_empty());
    let _ = m1;

    // A lease another holder took is not renewed for the old one.
    ctx.exec("UPDATE market_leases SET expires_at = 1 WHERE tenant = 'm2'").await;
    store.acquire_lease(&t("m2"), "B", "http://b", LONG).await.unwrap().expect("lapsed lease is taken");
    assert_eq!(store.renew_leases("A", LONG).await.unwrap(), vec![(t("m1"), 1), (t("m3"), 1)]);
    assert_eq!(store.renew_leases("B", LONG).await.unwrap(), vec![(t("m2"), 2), (t("m4"), 1)]);

    // Release gives up every live lease of the holder at once, keeping holder and epoch.
    assert_eq!(store.release_leases("A").await.unwrap(), 2);
    for m in ["m1", "m3"] {
        let l = store.lease(&t(m)).await.unwrap().unwrap();
        assert_eq!((l.holder.as_str(), l.epoch, l.live, l.expires_at), ("A", 1, false, 0), "{m}");
    }
    assert!(store.lease(&t("m4")).await.unwrap().unwrap().live, "another holder's lease stays");
    assert_eq!(store.release_leases("A").await.unwrap(), 0, "nothing left to release");
    assert!(store.renew_leases("A", LONG).await.unwrap().is_empty(), "released leases are not renewed");

    // The next holder of a released market gets the next epoch, even the one that released it.
    let c = store.acquire_lease(&t("m1"), "C", "http://c", LONG).await.unwrap().expect("released lease is taken");
    assert_eq!(c.epoch, 2);
    let a = store.acquire_lease(&t("m3"), "A", "http://a", LONG).await.unwrap().expect("released lease is taken");
    assert_eq!(a.epoch, 2);
    store.close().await.unwrap();
}

async fn unowned_markets_and_load_tenant(ctx: Ctx) {
    let store = ctx.open().await;
    let mut done = new_order("c", "o-done", 10);
    done.state = OrderState::Delivered;
    let mut a_done = new_order("a", "o-a-done", 10);
    a_done.state = OrderState::Cancelled;
    store
        .commit(vec![
            Write::Courier(courier("a", "c1", 10, 52.5)),
            Write::Courier(courier("a", "c2", 10, 52.6)),
            Write::Order(new_order("a", "o-a", 10)),
            Write::Order(a_done),
            Write::Zone(zone("a", "z-a")),
            Write::Order(new_order("b", "o-b", 10)),
            Write::Courier(courier("b2", "c1", 10, 52.5)),
            // Only a terminal order, or only a zone: nothing to dispatch, not a market.
            Write::Order(done),
            Write::Zone(zone("d", "z-d")),
        ])
        .await
        .unwrap();
    assert_eq!(store.unowned_markets().await.unwrap(), vec![t("a"), t("b"), t("b2")]);

    // Leased markets are not listed; a lapsed lease's market is, even with nothing in it.
    store.acquire_lease(&t("a"), "N1", "http://n1", LONG).await.unwrap().unwrap();
    store.acquire_lease(&t("b2"), "N2", "http://n2", LONG).await.unwrap().unwrap();
    store.acquire_lease(&t("e"), "N1", "http://n1", SHORT).await.unwrap().unwrap();
    assert_eq!(store.unowned_markets().await.unwrap(), vec![t("b")]);
    until_lapsed(&store, "e").await;
    assert_eq!(store.unowned_markets().await.unwrap(), vec![t("b"), t("e")]);
    // Released ones are listed again.
    store.release_leases("N1").await.unwrap();
    assert_eq!(store.unowned_markets().await.unwrap(), vec![t("a"), t("b"), t("e")]);

    // One market's couriers, open orders and zones, and nothing of another market.
    let a = store.load_tenant(&t("a")).await.unwrap();
    let mut couriers: Vec<&str> = a.couriers.iter().map(|c| c.id.as_str()).collect();
    couriers.sort_unstable();
    assert_eq!(couriers, ["c1", "c2"]);
    assert!(a.couriers.iter().all(|c| c.tenant == t("a")));
    assert_eq!(a.couriers.iter().find(|c| c.id == CourierId::new("c1")), Some(&courier("a", "c1", 10, 52.5)));
    assert_eq!(a.open_orders, vec![new_order("a", "o-a", 10)], "open orders only");
    assert_eq!(a.zones.len(), 1);
    assert_eq!((a.zones[0].tenant.as_str(), a.zones[0].id.clone()), ("a", ZoneId::new("z-a")));
    let b = store.load_tenant(&t("b")).await.unwrap();
    assert!(b.couriers.is_empty() && b.zones.is_empty());
    assert_eq!(b.open_orders, vec![new_order("b", "o-b", 10)]);
    let c = store.load_tenant(&t("c")).await.unwrap();
    assert!(c.couriers.is_empty() && c.open_orders.is_empty() && c.zones.is_empty(), "{c:?}");
    assert_eq!(store.load_tenant(&t("nowhere")).await.unwrap(), Default::default());
    store.close().await.unwrap();
}

/// Commits `batch` and expects it to be fenced on `market`, with nothing of it written.
async fn expect_fenced(store: &SqlStore, market: &str, batch: Vec<Write>, what: &str) {
    let ids: Vec<(String, String)> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Order(o) => Some((o.tenant.to_string(), o.id.to_string())),
            _ => None,
        })
        .collect();
    match store.commit(batch).await {
        Err(StoreError::Fenced(m)) => assert_eq!(m, t(market), "{what}"),
        other => panic!("{what}: expected Fenced({market}), got {other:?}"),
    }
    for (tenant, id) in ids {
        assert!(!order_stored(store, &tenant, &id).await, "{what}: order {tenant}/{id} must not be written");
        assert_eq!(order_events(store, &tenant, &id).await, 0, "{what}: no event of {tenant}/{id} may be appended");
    }
}

async fn fenced_commit_writes_nothing(ctx: Ctx) {
    let store = ctx.open().await;
    let a = store.acquire_lease(&t("m"), "A", "http://a", LONG).await.unwrap().unwrap();
    assert_eq!(a.epoch, 1);

    // A fence that holds: the batch commits.
    let mut ok = vec![fence("m", "A", 1)];
    ok.extend(order_batch("m", "o1"));
    store.commit(ok).await.unwrap();
    assert!(order_stored(&store, "m", "o1").await);
    assert_eq!(order_events(&store, "m", "o1").await, 1);

    // Stale epoch, wrong holder, a market never leased: fenced, nothing written.
    let mut stale = vec![fence("m", "A", 0)];
    stale.extend(order_batch("m", "o2"));
    expect_fenced(&store, "m", stale, "stale epoch").await;
    let mut wrong = order_batch("m", "o3");
    wrong.push(fence("m", "B", 1)); // where the fence stands in the batch does not matter
    expect_fenced(&store, "m", wrong, "wrong holder").await;
    let mut never = vec![fence("free", "A", 1)];
    never.extend(order_batch("free", "o4"));
    expect_fenced(&store, "free", never, "no lease").await;
    // Two fences, one of which fails: the whole batch fails, writes of both markets too.
    store.acquire_lease(&t("n"), "A", "http://a", LONG).await.unwrap().unwrap();
    let mut mixed = vec![fence("n", "A", 1), fence("m", "A", 7)];
    mixed.extend(order_batch("n", "o5"));
    mixed.extend(order_batch("m", "o5"));
    expect_fenced(&store, "m", mixed, "one of two fences fails").await;

    // A lapsed lease fences its old holder; the new holder's fence holds, the old one's not.
    store.acquire_lease(&t("m"), "A", "http://a", SHORT).await.unwrap().unwrap();
    until_lapsed(&store, "m").await;
    let mut lapsed = vec![fence("m", "A", 1)];
    lapsed.extend(order_batch("m", "o6"));
    expect_fenced(&store, "m", lapsed, "lapsed lease").await;
    let b = store.acquire_lease(&t("m"), "B", "http://b", LONG).await.unwrap().unwrap();
    assert_eq!(b.epoch, 2);
    let mut old = vec![fence("m", "A", 1)];
    old.extend(order_batch("m", "o7"));
    expect_fenced(&store, "m", old, "taken over").await;
    let mut new = vec![fence("m", "B", 2)];
    new.extend(order_batch("m", "o8"));
    store.commit(new).await.unwrap();
    assert!(order_stored(&store, "m", "o8").await);

    // A released lease fences too.
    store.release_leases("B").await.unwrap();
    let mut released = vec![fence("m", "B", 2)];
    released.extend(order_batch("m", "o9"));
    expect_fenced(&store, "m", released, "released lease").await;

    // In all, exactly the two fenced batches that held were written.
    let q = EventQuery { tenant: t("m"), entity: None, since_seq: None, limit: 100 };
    let ids: Vec<String> = store.events(q).await.unwrap().into_iter().map(|e| e.event.entity_id).collect();
    assert_eq!(ids, ["o1", "o8"]);
    let q = EventQuery { tenant: t("n"), entity: None, since_seq: None, limit: 100 };
    assert!(store.events(q).await.unwrap().is_empty());
    store.close().await.unwrap();
}

async fn fenced_batch_fails_alone_in_its_group(ctx: Ctx) {
    let store = ctx.open().await;
    store.acquire_lease(&t("m"), "A", "http://a", LONG).await.unwrap().unwrap();
    store.acquire_lease(&t("n"), "A", "http://a", LONG).await.unwrap().unwrap();

    // Issued together, so the writer takes them as one group.
    let mut stale = vec![fence("m", "A", 9)];
    stale.extend(order_batch("m", "stale"));
    let unfenced = order_batch("m", "plain");
    let mut valid = vec![fence("n", "A", 1)];
    valid.extend(order_batch("n", "valid"));
    let (r_stale, r_plain, r_valid) = tokio::join!(store.commit(stale), store.commit(unfenced), store.commit(valid));
    assert!(matches!(&r_stale, Err(StoreError::Fenced(m)) if *m == t("m")), "{r_stale:?}");
    r_plain.unwrap();
    r_valid.unwrap();
    assert!(!order_stored(&store, "m", "stale").await);
    assert_eq!(order_events(&store, "m", "stale").await, 0);
    assert!(order_stored(&store, "m", "plain").await && order_stored(&store, "n", "valid").await);

    // Many at once (large groups): every batch with a stale fence fails alone, whichever
    // market or group it is in; the others, fenced or not, commit.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("o{i}");
            let (market, f) = match i % 4 {
                0 => ("m", Some(fence("m", "A", 2))), // stale: m is at epoch 1
                1 => ("n", Some(fence("n", "A", 1))),
                2 => ("n", Some(fence("n", "B", 1))), // wrong holder
                _ => ("m", None),
            };
            let mut batch: Vec<Write> = f.into_iter().collect();
            batch.extend(order_batch(market, &id));
            (i, market, s.commit(batch).await)
        }));
    }
    for task in tasks {
        let (i, market, res) = task.await.unwrap();
        let id = format!("o{i}");
        if i % 4 == 0 || i % 4 == 2 {
            assert!(matches!(&res, Err(StoreError::Fenced(m)) if m.as_str() == market), "batch {i}: {res:?}");
            assert!(!order_stored(&store, market, &id).await, "batch {i} must write nothing");
            assert_eq!(order_events(&store, market, &id).await, 0, "batch {i} must append nothing");
        } else {
            assert!(res.is_ok(), "batch {i}: {res:?}");
            assert!(order_stored(&store, market, &id).await, "batch {i}");
            assert_eq!(order_events(&store, market, &id).await, 1, "batch {i}");
        }
    }
    store.close().await.unwrap();
}

/// A connection of the test's own, outside the store (to hold a transaction open).
enum Raw {
    Pg(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

impl Raw {
    async fn open(ctx: &Ctx) -> Raw {
        match ctx.kind {
            Kind::Postgres => Raw::Pg(sqlx::PgConnection::connect(&ctx.url).await.expect("connect")),
            Kind::Sqlite => {
                Raw::Sqlite(sqlx::SqliteConnection::connect(&format!("sqlite:{}", ctx.url)).await.expect("connect"))
            }
        }
    }

    async fn exec(&mut self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Raw::Pg(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Raw::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
        }
        .expect("exec");
    }
}

/// Another node taking the market over in a transaction that has not committed yet: a commit
/// fenced on the old lease waits for it (PostgreSQL: the `FOR SHARE` fence check waits for
/// the row lock; SQLite: the fenced transaction waits for the write lock) and then fails as
/// fenced, instead of committing writes the new owner would never load.
async fn fence_waits_for_a_take_over_in_progress(ctx: Ctx) {
    let store = ctx.open().await;
    store.acquire_lease(&t("m"), "A", "http://a", LONG).await.unwrap().unwrap();
    let mut other = Raw::open(&ctx).await;
    let begin = if ctx.kind == Kind::Sqlite { "BEGIN IMMEDIATE" } else { "BEGIN" };
    other.exec(begin).await;
    other.exec("UPDATE market_leases SET holder = 'B', addr = 'http://b', epoch = epoch + 1 WHERE tenant = 'm'").await;

    let s = store.clone();
    let mut batch = vec![fence("m", "A", 1)];
    batch.extend(order_batch("m", "o1"));
    let mut pending = tokio::spawn(async move { s.commit(batch).await });
    // Blocked while the take-over is open (bounded wait; the commit must not finish).
    let early = tokio::time::timeout(Duration::from_millis(400), &mut pending).await;
    assert!(early.is_err(), "the fenced commit must wait for the take-over: {early:?}");
    other.exec("COMMIT").await;
    let res = tokio::time::timeout(Duration::from_secs(10), pending).await.expect("commit answers").unwrap();
    assert!(matches!(&res, Err(StoreError::Fenced(m)) if *m == t("m")), "{res:?}");
    assert!(!order_stored(&store, "m", "o1").await);
    assert_eq!(order_events(&store, "m", "o1").await, 0);
    let l = store.lease(&t("m")).await.unwrap().unwrap();
    assert_eq!((l.holder.as_str(), l.epoch), ("B", 2));
    store.close().await.unwrap();
}

async fn concurrent_acquires_have_one_winner(ctx: Ctx) {
    let store = ctx.open().await;
    for round in 0..5 {
        let market = format!("m{round}");
        // A free market, then the same market once its lease lapsed: one winner each time.
        for want_epoch in [1, 2] {
            let mut tasks = Vec::new();
            for h in 0..8 {
                let (s, m) = (store.clone(), t(&market));
                tasks.push(tokio::spawn(async move {
                    let holder = format!("h{h}");
                    s.acquire_lease(&m, &holder, &format!("http://{holder}"), LONG).await.map(|l| (holder, l))
                }));
            }
            let mut winners = Vec::new();
            for task in tasks {
                let (holder, got) = task.await.unwrap().unwrap();
                if let Some(l) = got {
                    winners.push((holder, l));
                }
            }
            assert_eq!(winners.len(), 1, "{market}: exactly one of 8 holders wins: {winners:?}");
            let (holder, lease) = &winners[0];
            assert_eq!((&lease.holder, lease.epoch), (holder, want_epoch));
            assert_eq!(store.lease(&t(&market)).await.unwrap().unwrap().holder, *holder);
            if want_epoch == 1 {
                // The winner shortens its lease (same epoch) and lets it lapse.
                let short = store.acquire_lease(&t(&market), holder, "http://x", SHORT).await.unwrap().unwrap();
                assert_eq!(short.epoch, 1);
                until_lapsed(&store, &market).await;
            }
        }
    }
    store.close().await.unwrap();
}

/// What waits in the snapshot buffer for a market this node lost is dropped, and only that:
/// the other market's rows are written at the next flush, the lost one's never.
async fn a_lost_markets_buffered_snapshots_are_dropped(ctx: Ctx) {
    let opts = hexfleet_persistence::StoreOptions { snapshot_flush: Duration::from_secs(3600), ..ctx.options() };
    let store = SqlStore::open(&ctx.url, opts).await.expect("open store");
    store.snapshot_couriers(vec![courier("lost", "c1", 1_000, 50.0), courier("kept", "c2", 1_000, 51.0)]).unwrap();
    let sample = hexfleet_actors::domain::LocationSample { pos: common::ll(50.0, 3.0), ts: 1_000, speed: None };
    store.record_locations(&t("lost"), &CourierId::new("c1"), vec![sample, sample]).unwrap();
    store.record_locations(&t("kept"), &CourierId::new("c2"), vec![sample]).unwrap();
    assert_eq!(store.discard_buffered(&t("lost")), (1, 2));
    assert_eq!(store.discard_buffered(&t("lost")), (0, 0));
    store.flush().await.unwrap();
    assert!(store.load_tenant(&t("lost")).await.unwrap().couriers.is_empty(), "the lost market's snapshot was not written");
    assert_eq!(store.load_tenant(&t("kept")).await.unwrap().couriers.len(), 1);
    assert_eq!(store.export_locations(&t("kept"), &CourierId::new("c2"), 0, i64::MAX, usize::MAX).await.unwrap().len(), 1);
    assert!(store.export_locations(&t("lost"), &CourierId::new("c1"), 0, i64::MAX, usize::MAX).await.unwrap().is_empty());
    store.close().await.unwrap();
}

/// With fenced flushes, a snapshot row reaches the database only if this node still holds its
/// market's lease when the flush commits: rows of a market the node no longer claims are
/// dropped before the write, and rows of a market another node took after they were buffered
/// fail the fence in the flush's transaction, so they cannot overwrite the new owner's (older
/// by `updated_at`) row. The other markets' rows are written.
async fn flushes_are_fenced_by_the_lease_held_at_flush_time(ctx: Ctx) {
    use std::collections::HashMap;
    use std::sync::Arc;
    let opts = hexfleet_persistence::StoreOptions { snapshot_flush: Duration::from_secs(3600), ..ctx.options() };
    let store = SqlStore::open(&ctx.url, opts).await.expect("open store");
    let kept = store.acquire_lease(&t("kept"), "A", "http://a", LONG).await.unwrap().expect("kept");
    let lost = store.acquire_lease(&t("lost"), "A", "http://a", SHORT).await.unwrap().expect("lost");
    // Lapses (as in a database outage longer than the lease) but no one takes it: still A's.
    let lapsed = store.acquire_lease(&t("lapsed"), "A", "http://a", SHORT).await.unwrap().expect("lapsed");
    // What this node believes it holds (its `Markets`); `gone` it has already let go of.
    let held: Arc<parking_lot::Mutex<HashMap<TenantId, (String, i64)>>> = Arc::default();
    held.lock().insert(t("kept"), ("A".into(), kept.epoch));
    held.lock().insert(t("lost"), ("A".into(), lost.epoch));
    held.lock().insert(t("lapsed"), ("A".into(), lapsed.epoch));
    let view = held.clone();
    store.fence_snapshots(Box::new(move |tenant| view.lock().get(tenant).cloned()));

    let sample = hexfleet_actors::domain::LocationSample { pos: common::ll(50.0, 3.0), ts: 1_000, speed: None };
    store
        .snapshot_couriers(vec![
            courier("kept", "c1", 1_000, 50.0),
            courier("lost", "c2", 1_000, 50.0),
            courier("gone", "c3", 1_000, 50.0),
            courier("lapsed", "c4", 1_000, 50.0),
        ])
        .unwrap();
    for (m, c) in [("kept", "c1"), ("lost", "c2"), ("gone", "c3")] {
        store.record_locations(&t(m), &CourierId::new(c), vec![sample]).unwrap();
    }

    // B takes `lost` over (epoch + 1) and writes its own, older-stamped, snapshot of c2.
    until_lapsed(&store, "lost").await;
    until_lapsed(&store, "lapsed").await;
    let b = store.acquire_lease(&t("lost"), "B", "http://b", LONG).await.unwrap().expect("B takes the lapsed market");
    assert_eq!(b.epoch, lost.epoch + 1);
    store.commit(vec![fence("lost", "B", b.epoch), Write::Courier(courier("lost", "c2", 500, 52.0))]).await.unwrap();

    store.flush().await.expect("the flush writes what it may and drops the rest");
    let c1 = store.load_tenant(&t("kept")).await.unwrap().couriers;
    assert_eq!(c1.len(), 1, "the held market's snapshot is written");
    let c2 = store.load_tenant(&t("lost")).await.unwrap().couriers;
    assert_eq!(c2.len(), 1);
    assert_eq!((c2[0].updated_at, c2[0].last_fix.unwrap().pos.lat), (500, 52.0), "the new owner's row stands");
    assert!(store.load_tenant(&t("gone")).await.unwrap().couriers.is_empty(), "no lease claimed: not written");
    assert_eq!(store.load_tenant(&t("lapsed")).await.unwrap().couriers.len(), 1, "a lapsed lease no one took still covers the flush");
    assert_eq!(store.export_locations(&t("kept"), &CourierId::new("c1"), 0, i64::MAX, usize::MAX).await.unwrap().len(), 1);
    assert!(store.export_locations(&t("lost"), &CourierId::new("c2"), 0, i64::MAX, usize::MAX).await.unwrap().is_empty());
    assert!(store.export_locations(&t("gone"), &CourierId::new("c3"), 0, i64::MAX, usize::MAX).await.unwrap().is_empty());
    let stats = store.stats();
    assert_eq!(stats.fenced_rows, 4, "a snapshot and a sample each of `lost` and `gone`");
    assert_eq!((stats.buffered_couriers, stats.buffered_locations), (0, 0), "fenced rows are not put back");

    // Learned speeds the same way (before, only filtered by what the node believed it held):
    // B's table of `lost` stands, `gone` is not written, `lapsed` is.
    ctx.exec("INSERT INTO speed_models (tenant, vehicle, model, updated_at) VALUES ('lost', 'bike', 'B''s', 1500)").await;
    let table = |tenant: &str| hexfleet_actors::store::SpeedTable {
        tenant: t(tenant),
        vehicle: hexfleet_actors::domain::Vehicle::Bike,
        text: "A's".into(),
        updated_at: 2_000,
    };
    store.save_speeds(vec![table("kept"), table("lost"), table("gone"), table("lapsed")]).await.expect("saves what it may");
    let mut saved: Vec<(String, String)> = store.load_speeds().await.unwrap().into_iter().map(|s| (s.tenant.to_string(), s.text)).collect();
    saved.sort();
    let want = [("kept", "A's"), ("lapsed", "A's"), ("lost", "B's")].map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(saved, want);
    store.close().await.unwrap();
}
