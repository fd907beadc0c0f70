//! Webhook subscriptions and the delivery outbox, on both backends: which events land in the
//! outbox (same transaction as the event), claiming under a lease, retries, outcomes, purge.

#[macro_use]
mod common;

use std::collections::BTreeSet;

use common::{Ctx, event};
use hexfleet_actors::domain::{EntityKind, TenantId};
use hexfleet_actors::store::{EventQuery, Store, Write};
use hexfleet_persistence::webhooks::{ClaimShares, DeliveryState, Outcome, Webhook};

both_backends!(
    outbox_follows_subscriptions,
    claims_leases_and_outcomes,
    open_circuits_are_skipped_and_deferrals_give_the_attempt_back,
    redelivery_requeues_finished_deliveries,
    a_claim_takes_at_most_per_webhook_rows_of_each_webhook,
    tenants_take_turns_and_none_passes_its_share,
    deliveries_not_attempted_for_long_are_given_up
);

/// Deleting a webhook while a commit appends an event it subscribes to does not deadlock
/// (PostgreSQL). The commit holds the tenant's event lock, then its trigger queues a delivery,
/// whose foreign key locks the webhook's row. The delete locked that row first and then waited
/// for the event lock: one of the two failed after `deadlock_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_webhook_beside_a_commit_does_not_deadlock() {
    use sqlx::Connection as _;
    common::run(common::Kind::Postgres, |ctx| async move {
        let store = ctx.open().await;
        store.put_webhook(&hook("t1", "w", &["order.*"], 1_000), "dispatcher:d").await.unwrap();
        // A commit under way: it holds t1's event lock, as the writer does from its first
        // event until it commits.
        let mut writer = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        let mut tx = writer.begin().await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7011))").bind("t1").execute(&mut *tx).await.unwrap();
        let delete = tokio::spawn({
            let store = store.clone();
            async move { store.delete_webhook(&TenantId::new("t1"), "w", "admin:a", 2_000).await }
        });
        // The delete waits for the event lock (before the fix, having locked the webhook's row).
        let mut watch = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory'";
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while sqlx::query_scalar::<_, i64>(waiting).fetch_one(&mut watch).await.unwrap() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the delete never waited for the event lock");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // The commit's event, which the webhook subscribes to.
        sqlx::query(
            "INSERT INTO events (tenant, entity, entity_id, kind, actor, reason, ts, attrs) \
             VALUES ('t1', 'order', 'o1', 'order.created', 'system', NULL, 3000, '{}'::json)",
        )
        .execute(&mut *tx)
        .await
        .expect("the commit's event is appended");
        tx.commit().await.expect("the commit goes through");
        let deleted = delete.await.unwrap();
        assert!(deleted.expect("the delete goes through"), "the webhook was deleted");
        assert!(store.webhook(&TenantId::new("t1"), "w").await.unwrap().is_none());
        store.close().await.unwrap();
    })
    .await;
}

/// A claim whose read of the claimed rows times out leaves nothing leased (PostgreSQL). The
/// claim was an `UPDATE` and then a `SELECT`, each on its own: with the read stuck (here behind a
/// lock on `events`, which it joins) past the statement timeout, the rows stayed leased to a
/// claimer that never got them until the lease lapsed, with an attempt counted that was never
/// made. Now the two are one transaction, rolled back with the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_read_times_out_leases_nothing() {
    use sqlx::Connection as _;
    common::run(common::Kind::Postgres, |ctx| async move {
        let opts = hexfleet_persistence::StoreOptions { statement_timeout: std::time::Duration::from_millis(300), ..ctx.options() };
        let store = hexfleet_persistence::SqlStore::open(&ctx.url, opts).await.unwrap();
        store.put_webhook(&hook("t1", "w", &["order.*"], 1_000), "dispatcher:d").await.unwrap();
        store.commit(vec![Write::Event(event("t1", EntityKind::Order, "o1", "order.created", 2_000))]).await.unwrap();

        // The read of the claimed rows joins `events`: a lock on it holds the read, not the
        // `UPDATE` of the outbox before it.
        let mut locker = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
        let mut tx = locker.begin().await.unwrap();
        sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();
        let stuck = store.claim_webhook_deliveries(10_000, 50_000, "A", 10, &ClaimShares::default(), &[]).await;
        assert!(stuck.is_err(), "the claim's read waits for the lock past the statement timeout: {stuck:?}");
        tx.rollback().await.unwrap();

        // Nothing is leased to "A": the delivery is claimable at once, as its first attempt.
        let again = store.claim_webhook_deliveries(10_000, 50_000, "B", 10, &ClaimShares::default(), &[]).await.unwrap();
        assert_eq!(again.iter().map(|d| (d.event.event.entity_id.as_str(), d.attempt)).collect::<Vec<_>>(), vec![("o1", 1)]);
        let recs = store.webhook_deliveries(&TenantId::new("t1"), "w", 10).await.unwrap();
        assert_eq!(recs.iter().map(|r| r.attempts).collect::<Vec<_>>(), vec![1], "one attempt counted, B's");
        store.close().await.unwrap();
    })
    .await;
}

fn one_per_webhook() -> ClaimShares<'static> {
    ClaimShares { per_webhook: Some(1), ..ClaimShares::default() }
}

fn hook(tenant: &str, id: &str, events: &[&str], at: i64) -> Webhook {
    Webhook {
        tenant: TenantId::new(tenant),
        id: id.into(),
        url: format!("http://127.0.0.1:9/{id}"),
        events: events.iter().map(|s| s.to_string()).collect(),
        secret: "s3cret-s3cret".into(),
        created_at: at,
        updated_at: at,
    }
}

/// (webhook, kind) of every delivery claimable far in the future.
async fn due(store: &hexfleet_persistence::SqlStore, lease: &str) -> BTreeSet<(String, String)> {
    store
        .claim_webhook_deliveries(i64::MAX / 4, i64::MAX / 2, lease, 1000, &ClaimShares::default(), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.webhook_id, d.event.event.kind))
        .collect()
}

async fn outbox_follows_subscriptions(ctx: Ctx) {
    let store = ctx.open().await;
    let t = TenantId::new("t1");
    // Before any webhook exists, events go to the log only.
    store.commit(vec![Write::Event(event("t1", EntityKind::Order, "o0", "order.created", 900))]).await.unwrap();

    assert!(store.put_webhook(&hook("t1", "all-orders", &["order.*"], 1_000), "dispatcher:d").await.unwrap(), "created");
    assert!(store.put_webhook(&hook("t1", "picky", &["zone.enter", "order.delivered", "order.*"], 1_000), "dispatcher:d").await.unwrap());
    assert!(store.put_webhook(&hook("t2", "other-tenant", &["*"], 1_000), "dispatcher:d").await.unwrap());
    // Replacing says so, keeps created_at and takes the new patterns.
    assert!(!store.put_webhook(&hook("t1", "picky", &["zone.enter", "order.delivered"], 2_000), "dispatcher:d").await.unwrap());
    let picky = store.webhook(&t, "picky").await.unwrap().expect("stored");
    assert_eq!((picky.created_at, picky.updated_at), (1_000, 2_000));
    assert_eq!(picky.events, vec!["zone.enter".to_string(), "order.delivered".to_string()]);
    let ids: Vec<String> = store.webhooks(&t).await.unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(ids, ["all-orders", "picky"]);
    assert!(store.webhook(&TenantId::new("t2"), "picky").await.unwrap().is_none(), "tenants are apart");

    store
        .commit(vec![
            Write::Event(event("t1", EntityKind::Order, "o1", "order.created", 3_000)),
            Write::Event(event("t1", EntityKind::Zone, "z1", "zone.enter", 3_001)),
            Write::Event(event("t1", EntityKind::Courier, "c1", "courier.updated", 3_002)),
            Write::Event(event("t1", EntityKind::Order, "o1", "order.delivered", 3_003)),
            // `order.*` must not match a kind that merely starts with "order".
            Write::Event(event("t1", EntityKind::Order, "o1", "orderly.thing", 3_004)),
        ])
        .await
        .unwrap();
    let got = due(&store, "L").await;
    let want: BTreeSet<(String, String)> = [
        ("all-orders", "order.created"),
        ("all-orders", "order.delivered"),
        ("picky", "zone.enter"),
        ("picky", "order.delivered"),
        // `*` also matches the audit entry of its own creation (same transaction).
        ("other-tenant", "webhook.created"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "one delivery per matching (webhook, event), none across tenants");
    assert_eq!(store.webhook_stats(&t, "all-orders").await.unwrap().pending, 2);

    // Deleting a webhook drops its deliveries; another tenant's is untouched.
    assert!(store.delete_webhook(&t, "all-orders", "admin:a", 5_000).await.unwrap());
    assert!(!store.delete_webhook(&t, "all-orders", "admin:a", 5_000).await.unwrap(), "already gone");
    assert_eq!(store.webhook_stats(&t, "all-orders").await.unwrap().pending, 0);
    assert!(store.webhook_deliveries(&t, "all-orders", 10).await.unwrap().is_empty());
    assert_eq!(store.webhook_deliveries(&t, "picky", 10).await.unwrap().len(), 2);

    // Every change is in the audit log, in the same transaction, without the secret.
    let q = EventQuery { tenant: t.clone(), entity: Some((EntityKind::Webhook, "picky".into())), since_seq: None, limit: 10 };
    let kinds: Vec<String> = store.events(q).await.unwrap().into_iter().map(|e| e.event.kind).collect();
    assert_eq!(kinds, ["webhook.created", "webhook.updated"]);
    let q = EventQuery { tenant: t.clone(), entity: Some((EntityKind::Webhook, "all-orders".into())), since_seq: None, limit: 10 };
    let evs = store.events(q).await.unwrap();
    assert_eq!(evs.iter().map(|e| e.event.kind.as_str()).collect::<Vec<_>>(), ["webhook.created", "webhook.deleted"]);
    assert_eq!((evs[1].event.actor.as_str(), evs[1].event.ts), ("admin:a", 5_000));
    assert!(evs.iter().all(|e| !format!("{:?}", e.event.attrs).contains("s3cret")), "no secret in the log");
    store.close().await.unwrap();
}

/// A store that purges and gives up one row at a time (the batches go on until none is left),
/// with webhook `w` of tenant t1 on `order.*`, created at `at`.
async fn one_row_batches_and_a_webhook(ctx: &Ctx, at: i64) -> (hexfleet_persistence::SqlStore, TenantId) {
    let opts = hexfleet_persistence::StoreOptions { purge_batch: 1, ..ctx.options() };
    let store = hexfleet_persistence::SqlStore::open(&ctx.url, opts).await.unwrap();
    store.put_webhook(&hook("t1", "w", &["order.*"], at), "dispatcher:d").await.unwrap();
    (store, TenantId::new("t1"))
}

async fn claims_leases_and_outcomes(ctx: Ctx) {
    let (store, t) = one_row_batches_and_a_webhook(&ctx, 1_000).await;
    let evs: Vec<Write> =
        (0..5).map(|i| Write::Event(event("t1", EntityKind::Order, &format!("o{i}"), "order.created", 2_000 + i))).collect();
    store.commit(evs).await.unwrap();

    // Not due before the event's time; then claimed oldest first, at most `limit`.
    assert!(store.claim_webhook_deliveries(1_999, 50_000, "A", 10, &ClaimShares::default(), &[]).await.unwrap().is_empty());
    let a = store.claim_webhook_deliveries(10_000, 50_000, "A", 3, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!(a.len(), 3);
    assert!(a.windows(2).all(|w| w[0].event.seq < w[1].event.seq));
    assert!(a.iter().all(|d| d.attempt == 1 && d.url.ends_with("/w") && d.secret == "s3cret-s3cret"));
    assert_eq!(a[0].event.event.entity_id, "o0");
    // Leased rows are not claimed again until the lease lapses; the rest are.
    let b = store.claim_webhook_deliveries(10_000, 50_000, "B", 10, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!(b.len(), 2);
    assert!(store.claim_webhook_deliveries(49_999, 60_000, "C", 10, &ClaimShares::default(), &[]).await.unwrap().is_empty());

    // Outcomes.
    let d0 = &a[0];
    let ok = Outcome::Delivered { status: 204 };
    assert!(store.finish_webhook_delivery(&t, "w", d0.event.seq, "A", &ok, 11_000).await.unwrap());
    let retry = Outcome::Retry { at: 20_000, status: Some(500), error: "HTTP 500".into() };
    assert!(store.finish_webhook_delivery(&t, "w", a[1].event.seq, "A", &retry, 11_000).await.unwrap());
    let dead = Outcome::Dead { status: None, error: "x".repeat(10_000) };
    assert!(store.finish_webhook_delivery(&t, "w", a[2].event.seq, "A", &dead, 11_000).await.unwrap());
    // A stale lease cannot overwrite: b's rows belong to B.
    assert!(!store.finish_webhook_delivery(&t, "w", b[0].event.seq, "A", &ok, 11_000).await.unwrap());

    let s = store.webhook_stats(&t, "w").await.unwrap();
    assert_eq!((s.pending, s.delivered, s.dead), (3, 1, 1));
    let recs = store.webhook_deliveries(&t, "w", 10).await.unwrap();
    assert_eq!(recs.len(), 5);
    assert!(recs.windows(2).all(|w| w[0].event_seq > w[1].event_seq), "newest first");
    let r1 = recs.iter().find(|r| r.event_seq == a[1].event.seq).unwrap();
    assert_eq!((r1.state, r1.attempts, r1.next_attempt_at, r1.last_status), (DeliveryState::Pending, 1, 20_000, Some(500)));
    assert_eq!(r1.last_error.as_deref(), Some("HTTP 500"));
    let r2 = recs.iter().find(|r| r.event_seq == a[2].event.seq).unwrap();
    assert_eq!(r2.state, DeliveryState::Dead);
    assert!(r2.last_error.as_ref().unwrap().len() <= 500, "errors are clipped");

    // The retry comes back at its time, as attempt 2.
    assert!(store.claim_webhook_deliveries(19_999, 70_000, "D", 10, &ClaimShares::default(), &[]).await.unwrap().is_empty());
    let again = store.claim_webhook_deliveries(20_000, 70_000, "D", 10, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!(again.iter().map(|d| (d.event.seq, d.attempt)).collect::<Vec<_>>(), vec![(a[1].event.seq, 2)]);

    // Purge removes finished rows older than the cut-off, never pending ones.
    assert_eq!(store.purge_webhook_deliveries(11_001).await.unwrap(), 2);
    let s = store.webhook_stats(&t, "w").await.unwrap();
    assert_eq!((s.pending, s.delivered, s.dead), (3, 0, 0));
    store.close().await.unwrap();
}

/// The worker's circuit breaker rests on two store operations: a claim that leaves the rows of
/// webhooks with an open circuit alone (same tenant or not), and a deferral that puts a
/// claimed row back without counting the attempt or touching its last status.
async fn open_circuits_are_skipped_and_deferrals_give_the_attempt_back(ctx: Ctx) {
    let store = ctx.open().await;
    let t = TenantId::new("t1");
    for (tenant, id) in [("t1", "bad"), ("t1", "good"), ("t2", "bad")] {
        store.put_webhook(&hook(tenant, id, &["order.*"], 1_000), "dispatcher:d").await.unwrap();
    }
    let evs = |tenant: &str| -> Vec<Write> {
        (0..3).map(|i| Write::Event(event(tenant, EntityKind::Order, &format!("o{i}"), "order.created", 2_000 + i))).collect()
    };
    store.commit(evs("t1")).await.unwrap();
    store.commit(evs("t2")).await.unwrap();

    // t1's `bad` is skipped; t2's webhook of the same name is not.
    let got = store.claim_webhook_deliveries(10_000, 50_000, "A", 100, &ClaimShares::default(), &[("t1", "bad", "http://127.0.0.1:9/bad")]).await.unwrap();
    let mut who: Vec<(String, String)> = got.iter().map(|d| (d.event.event.tenant.to_string(), d.webhook_id.clone())).collect();
    who.dedup();
    assert_eq!(got.len(), 6);
    assert_eq!(who, [("t1".to_string(), "good".to_string()), ("t2".to_string(), "bad".to_string())]);
    // Only skipped rows are due: nothing is claimed, however many are skipped.
    assert!(store.claim_webhook_deliveries(10_000, 50_000, "B", 100, &ClaimShares::default(), &[("t1", "bad", "http://127.0.0.1:9/bad"), ("t9", "x", "http://x")]).await.unwrap().is_empty());

    // Claimed and deferred: pending again at `at`, attempt given back, last status kept.
    let bad = store.claim_webhook_deliveries(10_000, 50_000, "C", 1, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!((bad[0].webhook_id.as_str(), bad[0].attempt), ("bad", 1));
    let seq = bad[0].event.seq;
    let retry = Outcome::Retry { at: 10_000, status: Some(503), error: "HTTP 503".into() };
    assert!(store.finish_webhook_delivery(&t, "bad", seq, "C", &retry, 10_000).await.unwrap());
    let again = store.claim_webhook_deliveries(10_000, 50_000, "D", 100, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!(again.iter().find(|d| d.event.seq == seq).map(|d| d.attempt), Some(2));
    let deferred = Outcome::Deferred { at: 30_000, url: "http://127.0.0.1:9/bad".into() };
    assert!(store.finish_webhook_delivery(&t, "bad", seq, "D", &deferred, 10_001).await.unwrap());
    assert!(!store.finish_webhook_delivery(&t, "bad", seq, "D", &deferred, 10_002).await.unwrap(), "the lease is gone");
    let r = store.webhook_deliveries(&t, "bad", 10).await.unwrap().into_iter().find(|r| r.event_seq == seq).unwrap();
    assert_eq!((r.state, r.attempts, r.next_attempt_at, r.last_status), (DeliveryState::Pending, 1, 30_000, Some(503)));
    assert!(store.claim_webhook_deliveries(29_999, 50_000, "E", 100, &ClaimShares::default(), &[("t1", "good", "http://127.0.0.1:9/good"), ("t2", "bad", "http://127.0.0.1:9/bad")]).await.unwrap().iter().all(|d| d.event.seq != seq));
    let back = store.claim_webhook_deliveries(30_000, 60_000, "F", 100, &ClaimShares::default(), &[("t1", "good", "http://127.0.0.1:9/good"), ("t2", "bad", "http://127.0.0.1:9/bad")]).await.unwrap();
    assert!(back.iter().any(|d| d.event.seq == seq && d.attempt == 2), "claimed again at its time, as attempt 2");

    // Every lease above has lapsed by 100_000. The skip names the URL that failed: t1/bad is
    // skipped while it points there, not once it points elsewhere.
    let bad_url = "http://127.0.0.1:9/bad";
    let others = store.claim_webhook_deliveries(100_000, 200_000, "G0", 100, &ClaimShares::default(), &[("t1", "bad", bad_url)]).await.unwrap();
    assert!(!others.is_empty() && others.iter().all(|d| !(d.webhook_id == "bad" && d.event.event.tenant.as_str() == "t1")));
    let moved = store.claim_webhook_deliveries(100_000, 200_000, "G", 100, &ClaimShares::default(), &[("t1", "bad", "http://old.example/")]).await.unwrap();
    assert_eq!(moved.len(), 3, "a circuit of the old URL does not hold the webhook back");
    for d in &moved {
        let retry = Outcome::Retry { at: 150_000, status: Some(500), error: "HTTP 500".into() };
        assert!(store.finish_webhook_delivery(&t, "bad", d.event.seq, "G", &retry, 100_001).await.unwrap());
    }
    // A circuit opens: its waiting rows move to the end of the pause, attempts unchanged; a
    // pause of a URL the webhook no longer points at (recorded late) moves nothing.
    assert_eq!(store.pause_webhook_deliveries("t1", "bad", "http://old.example/", 400_000).await.unwrap(), 0);
    assert_eq!(store.pause_webhook_deliveries("t1", "bad", bad_url, 400_000).await.unwrap(), 3);
    assert!(store.claim_webhook_deliveries(300_000, 500_000, "H", 100, &ClaimShares::default(), &[]).await.unwrap().iter().all(|d| d.webhook_id != "bad" || d.event.event.tenant.as_str() != "t1"));
    // Replacing the webhook (a fixed URL) makes them due at once.
    let mut fixed = hook("t1", "bad", &["order.*"], 1_000);
    fixed.url = "http://127.0.0.1:9/fixed".into();
    fixed.updated_at = 310_000;
    assert!(!store.put_webhook(&fixed, "dispatcher:d").await.unwrap());
    let now_due = store.claim_webhook_deliveries(310_000, 500_000, "I", 100, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!(now_due.iter().filter(|d| d.webhook_id == "bad" && d.url.ends_with("/fixed")).count(), 3);
    // The old circuit's pause and deferrals, recorded after the replacement, do not hold the
    // webhook back: nothing is paused, and a deferred row is due at once (`now`), not at the
    // end of the old circuit's pause.
    assert_eq!(store.pause_webhook_deliveries("t1", "bad", bad_url, 900_000).await.unwrap(), 0);
    let stale = Outcome::Deferred { at: 900_000, url: bad_url.into() };
    let d0 = now_due.iter().find(|d| d.webhook_id == "bad").unwrap();
    assert!(store.finish_webhook_delivery(&t, "bad", d0.event.seq, "I", &stale, 320_000).await.unwrap());
    let r = store.webhook_deliveries(&t, "bad", 10).await.unwrap().into_iter().find(|r| r.event_seq == d0.event.seq).unwrap();
    assert_eq!((r.state, r.next_attempt_at), (DeliveryState::Pending, 320_000));
    store.close().await.unwrap();
}

/// Redelivery puts finished rows back as new: every dead one, or one by seq (dead or
/// delivered), never a pending one, and audits it in the same transaction.
async fn redelivery_requeues_finished_deliveries(ctx: Ctx) {
    let store = ctx.open().await;
    let t = TenantId::new("t1");
    store.put_webhook(&hook("t1", "w", &["order.*"], 1_000), "dispatcher:d").await.unwrap();
    let evs: Vec<Write> =
        (0..3).map(|i| Write::Event(event("t1", EntityKind::Order, &format!("o{i}"), "order.created", 2_000 + i))).collect();
    store.commit(evs).await.unwrap();
    let c = store.claim_webhook_deliveries(10_000, 50_000, "A", 10, &ClaimShares::default(), &[]).await.unwrap();
    let (dead, delivered, pending) = (c[0].event.seq, c[1].event.seq, c[2].event.seq);
    let gone = Outcome::Dead { status: Some(500), error: "HTTP 500".into() };
    assert!(store.finish_webhook_delivery(&t, "w", dead, "A", &gone, 11_000).await.unwrap());
    assert!(store.finish_webhook_delivery(&t, "w", delivered, "A", &Outcome::Delivered { status: 200 }, 11_000).await.unwrap());
    let later = Outcome::Retry { at: 40_000, status: Some(503), error: "HTTP 503".into() };
    assert!(store.finish_webhook_delivery(&t, "w", pending, "A", &later, 11_000).await.unwrap());

    assert_eq!(store.redeliver_webhook(&t, "w", Some(pending), "dispatcher:d", 12_000).await.unwrap(), 0, "pending: already queued");
    assert_eq!(store.redeliver_webhook(&t, "w", None, "dispatcher:d", 12_000).await.unwrap(), 1, "every dead one");
    assert_eq!(store.redeliver_webhook(&t, "w", Some(delivered), "admin:a", 12_500).await.unwrap(), 1);
    assert_eq!(store.redeliver_webhook(&TenantId::new("t2"), "w", None, "admin:a", 12_500).await.unwrap(), 0, "tenants are apart");
    let again = store.claim_webhook_deliveries(12_500, 60_000, "B", 10, &ClaimShares::default(), &[]).await.unwrap();
    let got: Vec<(i64, i32)> = again.iter().map(|d| (d.event.seq, d.attempt)).collect();
    assert_eq!(got, vec![(dead, 1), (delivered, 1)], "both start over; the pending one waits for its time");
    let q = EventQuery { tenant: t.clone(), entity: Some((EntityKind::Webhook, "w".into())), since_seq: None, limit: 10 };
    let kinds: Vec<String> = store.events(q).await.unwrap().into_iter().map(|e| e.event.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "webhook.redelivered").count(), 2, "{kinds:?}");
    store.close().await.unwrap();
}

/// The worker claims one row per webhook at a time (`per_webhook`), so that one webhook's
/// backlog cannot fill a claim: each webhook's oldest due row, the rest left due.
async fn a_claim_takes_at_most_per_webhook_rows_of_each_webhook(ctx: Ctx) {
    let store = ctx.open().await;
    for (tenant, id) in [("t1", "busy"), ("t1", "quiet"), ("t2", "busy")] {
        store.put_webhook(&hook(tenant, id, &["order.*"], 1_000), "dispatcher:d").await.unwrap();
    }
    let evs = |tenant: &str, n: i64| -> Vec<Write> {
        (0..n).map(|i| Write::Event(event(tenant, EntityKind::Order, &format!("o{i}"), "order.created", 2_000 + i))).collect()
    };
    store.commit(evs("t1", 5)).await.unwrap();
    store.commit(evs("t2", 2)).await.unwrap();
    let first = store.claim_webhook_deliveries(10_000, 50_000, "A", 100, &one_per_webhook(), &[]).await.unwrap();
    let mut who: Vec<(String, String, i64)> = first.iter().map(|d| (d.event.event.tenant.to_string(), d.webhook_id.clone(), d.event.event.ts)).collect();
    who.sort();
    assert_eq!(
        who,
        [("t1".into(), "busy".into(), 2_000), ("t1".into(), "quiet".into(), 2_000), ("t2".into(), "busy".into(), 2_000)],
        "one row per webhook, its oldest"
    );
    // Two at a time, under a total limit of three: the oldest rows overall.
    let second = store.claim_webhook_deliveries(10_000, 50_000, "B", 3, &ClaimShares { per_webhook: Some(2), ..ClaimShares::default() }, &[]).await.unwrap();
    assert_eq!(second.len(), 3);
    assert!(second.iter().all(|d| d.event.event.ts == 2_001), "{:?}", second.iter().map(|d| (&d.webhook_id, d.event.event.ts)).collect::<Vec<_>>());
    // Without the limit the other six come at once: 5 + 5 + 2 = 12 rows in all.
    let rest = store.claim_webhook_deliveries(10_000, 50_000, "C", 100, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!((rest.len(), first.len() + second.len() + rest.len()), (6, 12));
    store.close().await.unwrap();
}

/// Tenants take turns: a tenant whose backlog is older (or which has more sends in flight)
/// does not get every free slot while another tenant has deliveries due, and none passes
/// `per_tenant` with what it has in flight.
async fn tenants_take_turns_and_none_passes_its_share(ctx: Ctx) {
    let store = ctx.open().await;
    for (tenant, id) in [("t1", "a"), ("t1", "b"), ("t1", "c"), ("t2", "x")] {
        store.put_webhook(&hook(tenant, id, &["order.*"], 1_000), "dispatcher:d").await.unwrap();
    }
    let evs = |tenant: &str, at: i64| -> Vec<Write> {
        (0..3).map(|i| Write::Event(event(tenant, EntityKind::Order, &format!("o{i}"), "order.created", at + i))).collect()
    };
    // t1: three webhooks × events at 2000-2002; t2: one webhook, newer events at 3000-3002.
    store.commit(evs("t1", 2_000)).await.unwrap();
    store.commit(evs("t2", 3_000)).await.unwrap();
    let who = |got: &[hexfleet_persistence::webhooks::Delivery]| -> Vec<(String, i64)> {
        let mut v: Vec<(String, i64)> = got.iter().map(|d| (d.event.event.tenant.to_string(), d.event.event.ts)).collect();
        v.sort();
        v
    };
    // Oldest first alone would give two of t1's webhooks; in turn, t1's oldest and then t2's.
    let first = store.claim_webhook_deliveries(10_000, 50_000, "A", 2, &one_per_webhook(), &[]).await.unwrap();
    assert_eq!(who(&first), [("t1".to_string(), 2_000), ("t2".to_string(), 3_000)]);
    // A tenant with a send in flight yields to one with none, though its rows are older.
    let shares = ClaimShares { per_webhook: Some(1), in_flight: &[("t1", 1)], ..ClaimShares::default() };
    let second = store.claim_webhook_deliveries(10_000, 50_000, "B", 1, &shares, &[]).await.unwrap();
    assert_eq!(who(&second), [("t2".to_string(), 3_001)]);
    // No tenant past `per_tenant` with what it has in flight: one more of t1 (its oldest) and
    // t2's last, although t1 has eight rows due and the claim could take ten.
    let shares = ClaimShares { per_tenant: Some(2), in_flight: &[("t1", 1)], ..ClaimShares::default() };
    let third = store.claim_webhook_deliveries(10_000, 50_000, "C", 10, &shares, &[]).await.unwrap();
    assert_eq!(who(&third), [("t1".to_string(), 2_000), ("t2".to_string(), 3_002)]);
    // Skipped webhooks and sends in flight together (their parameters follow each other).
    let skip = [("t1", "a", "http://127.0.0.1:9/a"), ("t2", "x", "http://127.0.0.1:9/x")];
    let shares = ClaimShares { per_tenant: Some(2), in_flight: &[("t1", 1)], ..ClaimShares::default() };
    let fourth = store.claim_webhook_deliveries(10_000, 50_000, "C2", 10, &shares, &skip).await.unwrap();
    assert_eq!(fourth.len(), 1);
    assert_ne!(fourth[0].webhook_id, "a", "a skipped webhook's row");
    let shares = ClaimShares { per_tenant: Some(2), in_flight: &[("t1", 2), ("t2", 0)], ..ClaimShares::default() };
    assert!(store.claim_webhook_deliveries(10_000, 50_000, "D", 10, &shares, &[]).await.unwrap().is_empty());
    // Without shares the six rows of t1 left are all due.
    assert_eq!(store.claim_webhook_deliveries(10_000, 50_000, "E", 10, &ClaimShares::default(), &[]).await.unwrap().len(), 6);
    store.close().await.unwrap();
}

/// A pending delivery not attempted since the cut-off (never, or last before it; a deferral
/// is no attempt), nor queued since, is given up, in batches; one leased now, one attempted
/// since and finished ones are left alone. A redelivery sends a given-up one again.
async fn deliveries_not_attempted_for_long_are_given_up(ctx: Ctx) {
    let (store, t) = one_row_batches_and_a_webhook(&ctx, 500).await;
    let at = |id: &str, ts: i64| Write::Event(event("t1", EntityKind::Order, id, "order.created", ts));
    store.commit(vec![at("leased", 1_000), at("done", 1_100), at("retried", 1_200), at("deferred", 1_300)]).await.unwrap();
    // Rows count from when they were queued (the database's clock), not from their event's
    // time: these events are ancient, but were queued just now.
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert_eq!(store.expire_webhook_deliveries(wall - 600_000, wall).await.unwrap(), 0, "queued just now");
    // From here on the test's own clock: as if each row had been queued at its event's time.
    let queued_at_event_time = || {
        ctx.exec(
            "UPDATE webhook_outbox SET updated_at = (SELECT e.ts FROM events e WHERE e.tenant = webhook_outbox.tenant \
             AND e.seq = webhook_outbox.event_seq) WHERE updated_at > 1000000000",
        )
    };
    queued_at_event_time().await;
    // Claimed; "leased" stays in flight until 100_000.
    let claimed = store.claim_webhook_deliveries(1_500, 100_000, "L", 10, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!(claimed.len(), 4);
    let claimed_seq = |id: &str| claimed.iter().find(|d| d.event.event.entity_id == id).unwrap().event.seq;
    for (id, outcome) in [
        ("done", Outcome::Delivered { status: 204 }),
        ("retried", Outcome::Retry { at: 7_000, status: Some(503), error: "HTTP 503".into() }),
        ("deferred", Outcome::Deferred { at: 0, url: "http://127.0.0.1:9/w".into() }),
    ] {
        assert!(store.finish_webhook_delivery(&t, "w", claimed_seq(id), "L", &outcome, 6_000).await.unwrap());
    }
    store.commit(vec![at("old-1", 2_000), at("old-2", 2_100), at("recent", 9_000)]).await.unwrap();
    queued_at_event_time().await;
    // An open circuit's pause moves the waiting rows' next attempt on; paused is not leased.
    assert_eq!(store.pause_webhook_deliveries("t1", "w", "http://127.0.0.1:9/w", 50_000).await.unwrap(), 5);
    // Each order's event, by order id (the log also holds `webhook.created`).
    let evs = store.events(EventQuery { tenant: t.clone(), entity: None, since_seq: None, limit: 100 }).await.unwrap();
    let seq_of = |entity: &str| evs.iter().find(|e| e.event.entity_id == entity && e.event.kind == "order.created").unwrap().seq;
    let state = async |entity: &str| {
        let recs = store.webhook_deliveries(&t, "w", 10).await.unwrap();
        recs.into_iter().find(|r| r.event_seq == seq_of(entity)).map(|r| (r.state, r.last_error)).unwrap()
    };
    assert_eq!(store.expire_webhook_deliveries(5_000, 10_000).await.unwrap(), 3, "old-1, old-2, deferred (all paused)");
    let gave_up = (DeliveryState::Dead, Some("gave up: not attempted for 5 s".to_owned()));
    for id in ["old-1", "old-2", "deferred"] {
        assert_eq!(state(id).await, gave_up, "{id}");
    }
    assert_eq!(state("leased").await.0, DeliveryState::Pending, "in flight: left alone");
    assert_eq!(state("retried").await.0, DeliveryState::Pending, "attempted at 6_000");
    assert_eq!(state("recent").await.0, DeliveryState::Pending);
    assert_eq!(state("done").await.0, DeliveryState::Delivered);
    assert_eq!(store.expire_webhook_deliveries(9_500, 10_000).await.unwrap(), 2, "retried, recent");
    // The send in flight still records its outcome (its lease is intact).
    assert!(store.finish_webhook_delivery(&t, "w", seq_of("leased"), "L", &Outcome::Delivered { status: 200 }, 11_000).await.unwrap());
    // Given up is not lost: a redelivery sends it again.
    assert_eq!(store.redeliver_webhook(&t, "w", Some(seq_of("old-1")), "dispatcher:d", 12_000).await.unwrap(), 1);
    let again = store.claim_webhook_deliveries(12_000, 100_000, "M", 10, &ClaimShares::default(), &[]).await.unwrap();
    assert_eq!(again.iter().map(|d| d.event.event.entity_id.as_str()).collect::<Vec<_>>(), ["old-1"]);
    store.close().await.unwrap();
}

/// Not a test of correctness but a measurement (BENCHMARKS.md, "Webhook claims with a large
/// backlog"): how long a claim takes when one webhook has a large due backlog and others have
/// a few rows. Run with `cargo test -p hexfleet-persistence --test webhooks -- --ignored
/// --nocapture claim_time`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn claim_time_with_a_large_backlog() {
    for kind in [common::Kind::Sqlite, common::Kind::Postgres] {
        common::run(kind, move |ctx| async move {
            let store = ctx.open().await;
            for (tenant, id) in [("t1", "backlog"), ("t1", "quiet"), ("t2", "quiet")] {
                store.put_webhook(&hook(tenant, id, &["order.*"], 1_000), "dispatcher:d").await.unwrap();
            }
            let n: i64 = std::env::var("BACKLOG").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
            for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
                let evs = chunk.iter().map(|i| Write::Event(event("t1", EntityKind::Order, &format!("o{i}"), "order.created", 2_000 + i))).collect();
                store.commit(evs).await.unwrap();
            }
            store.commit(vec![Write::Event(event("t2", EntityKind::Order, "x", "order.created", 2_000))]).await.unwrap();
            // As autovacuum (PostgreSQL) or `PRAGMA optimize` would have by then.
            ctx.exec("ANALYZE").await;
            let mut times = Vec::new();
            for round in 0..5 {
                let started = std::time::Instant::now();
                let got = store.claim_webhook_deliveries(i64::MAX / 4, i64::MAX / 2, &format!("L{round}"), 16, &one_per_webhook(), &[]).await.unwrap();
                times.push(started.elapsed());
                assert!(!got.is_empty());
            }
            println!("{:?}: {n} due rows of one webhook: claim took {:?}", ctx.kind, times);
            store.close().await.unwrap();
        })
        .await;
    }
}
