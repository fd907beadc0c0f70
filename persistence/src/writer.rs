//! The write path: the group-commit writer task and the snapshot buffer with its flusher.
//!
//! - **Group commit.** `commit` sends its batch into a bounded queue and awaits a oneshot. One
//!   writer task takes the first waiting request plus everything queued behind it (up to
//!   `max_group`), applies them all in a single transaction and answers every caller. While a
//!   transaction runs, new requests pile up and form the next group, so under load the cost of
//!   one durable commit is shared by many callers. If a group fails because the database
//!   refused a statement (not because it is unreachable), each request is retried in its own
//!   transaction so one bad batch fails alone. A failed market-lease fence names its market:
//!   the requests fenced on it are retried alone (and fail with `StoreError::Fenced`), the
//!   others again as one group.
//! - **Snapshots.** Courier snapshots (latest per courier wins) and location samples wait in a
//!   bounded in-memory buffer and are written every `snapshot_flush` as multi-row statements in
//!   one transaction. A failed flush puts the rows back (newer snapshots win) and retries with
//!   backoff; rows the database refuses individually are dropped and counted, so one bad row
//!   cannot wedge the buffer.
//! - **Outages.** Every database call of the writer and the flusher is bounded by
//!   `statement_timeout`, and acquiring a connection by `acquire_timeout`: a dead database
//!   makes `commit` fail with `Unavailable` instead of hanging. Requests that queued up while
//!   a failing attempt waited fail with it, so a caller waits at most about two attempts. On
//!   PostgreSQL a COMMIT that went unanswered is resolved with `txid_status` (up to one more
//!   timeout, `resolve_commit`): one that did commit is reported done. The pool opens new
//!   connections when the database is back; nothing else needs to reconnect.
//!
//! Architecture invariant: a tenant's events become visible in `seq` order. The writer appends
//! one transaction at a time; webhook changes append their audit events in their own
//! transactions, and with several nodes each has a writer, so every appender takes the
//! tenant's event lock until it commits (`ops::insert_events`; PostgreSQL only, SQLite
//! serialises write transactions itself).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hexfleet_actors::domain::{CourierId, CourierRecord, LocationSample, TenantId};
use hexfleet_actors::store::{StoreError, Write};
use tokio::sync::{mpsc, oneshot};

use crate::db::Db;
use crate::error::PersistenceError;
use crate::ops::{LocationRow, NotedXid, Reduced};
use crate::options::StoreOptions;
use crate::store::Inner;

/// One caller's batch waiting for the writer.
pub(crate) struct CommitReq {
    pub writes: Vec<Write>,
    pub reply: oneshot::Sender<Result<(), StoreError>>,
    /// When it was queued ([`StoreOptions::queue_wait`]).
    pub queued_at: tokio::time::Instant,
}

/// Counters of the write path (monotonic).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub commit_transactions: AtomicU64,
    pub commit_failures: AtomicU64,
    pub snapshot_flushes: AtomicU64,
    pub courier_rows: AtomicU64,
    pub location_rows: AtomicU64,
    pub dropped_rows: AtomicU64,
    pub flush_failures: AtomicU64,
    pub fenced_rows: AtomicU64,
}

/// The error every caller of a failed group sees (the source is shared).
#[derive(Debug, thiserror::Error)]
#[error("group commit failed")]
struct GroupFailed(#[source] Arc<PersistenceError>);

/// Runs the group-commit writer until every sender is gone.
pub(crate) async fn run_writer(db: Db, mut rx: mpsc::Receiver<CommitReq>, counters: Arc<Counters>, opts: StoreOptions) {
    let mut group: Vec<CommitReq> = Vec::with_capacity(opts.max_group);
    while let Some(first) = rx.recv().await {
        group.push(first);
        while group.len() < opts.max_group {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        // Requests that waited too long are answered, not written: their callers are about to
        // give up (and report them failed).
        let now = tokio::time::Instant::now();
        let late: Vec<CommitReq> =
            group.extract_if(.., |r| !r.writes.is_empty() && now.duration_since(r.queued_at) > opts.queue_wait).collect();
        if !late.is_empty() {
            tracing::warn!(requests = late.len(), queue_wait = ?opts.queue_wait, "commits waited too long for the writer; not written");
            let e = Arc::new(PersistenceError::QueuedTooLong(opts.queue_wait));
            late.into_iter().for_each(|r| answer_failed(r, &e, &counters));
        }
        if group.iter().all(|r| r.writes.is_empty()) {
            // Only barriers (`flush` / `close` waiting for the queue to drain): nothing to write.
            for r in group.drain(..) {
                let _ = r.reply.send(Ok(()));
            }
            continue;
        }
        let result = commit_group(&db, group.iter().flat_map(|r| r.writes.iter()), opts.statement_timeout).await;
        counters.commit_transactions.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                counters.commits.fetch_add(group.len() as u64, Ordering::Relaxed);
                for r in group.drain(..) {
                    let _ = r.reply.send(Ok(()));
                }
            }
            Err(e) if e.is_connectivity() || group.len() == 1 => {
                let connectivity = e.is_connectivity();
                let e = Arc::new(e);
                let fail = |r: CommitReq| answer_failed(r, &e, &counters);
                let mut failed = group.len();
                group.drain(..).for_each(fail);
                if connectivity {
                    // Fail fast: whatever queued up while this attempt waited for the database
                    // fails with it, instead of each later group waiting out its own timeout.
                    while let Ok(r) = rx.try_recv() {
                        failed += 1;
                        fail(r);
                    }
                }
                if matches!(*e, PersistenceError::Fenced { .. }) {
                    tracing::info!(error = %e, "commit fenced: market moved");
                } else {
                    tracing::warn!(error = %e, requests = failed, "group commit failed");
                }
            }
            Err(e) => {
                let refused = std::mem::replace(&mut group, Vec::with_capacity(opts.max_group));
                retry_refused(&db, refused, e, &counters, (opts.statement_timeout, opts.queue_wait)).await;
            }
        }
    }
    tracing::debug!("store writer stopped");
}

/// Answers one request of a group that failed as a whole. A barrier (no writes) only waits
/// for the requests before it to be answered, so it succeeds.
fn answer_failed(r: CommitReq, e: &Arc<PersistenceError>, counters: &Counters) {
    let res = if r.writes.is_empty() {
        Ok(())
    } else {
        counters.commit_failures.fetch_add(1, Ordering::Relaxed);
        Err(group_error(e))
    };
    let _ = r.reply.send(res);
}

/// What the callers of a group that failed as a whole are told: `Fenced` when the one request
/// of the group carried a fence that did not hold, `Unavailable` otherwise.
fn group_error(e: &Arc<PersistenceError>) -> StoreError {
    match &**e {
        PersistenceError::Fenced { tenant } => StoreError::Fenced(TenantId::new(tenant)),
        _ => StoreError::Unavailable(Box::new(GroupFailed(e.clone()))),
    }
}

/// Answers the requests of a group the database refused (`e`, not a connectivity error) so
/// that only the requests at fault fail. When a fence failed, the requests fenced on that
/// market go alone and the others again as one group (repeated while fences fail): a market
/// that moved, whose in-flight batches all fail, does not cost every other batch of the group
/// its own transaction. Any other refusal: every request alone.
async fn retry_refused(db: &Db, mut group: Vec<CommitReq>, mut e: PersistenceError, counters: &Counters, (limit, queue_wait): (Duration, Duration)) {
    loop {
        let PersistenceError::Fenced { tenant } = &e else {
            tracing::warn!(error = %e, requests = group.len(), "group commit refused, retrying requests one by one");
            return commit_each(db, group, counters, (limit, queue_wait)).await;
        };
        let tenant = tenant.clone();
        let (fenced, rest): (Vec<CommitReq>, Vec<CommitReq>) = group.into_iter().partition(|r| {
            r.writes.iter().any(|w| matches!(w, Write::Fence { tenant: t, .. } if t.as_str() == tenant))
        });
        tracing::info!(%tenant, fenced = fenced.len(), others = rest.len(), "group commit fenced: market moved");
        if fenced.is_empty() || rest.len() <= 1 {
            // Nothing left to group (or no request names the market, which cannot happen:
            // never loop on it).
            commit_each(db, fenced, counters, (limit, queue_wait)).await;
            return commit_each(db, rest, counters, (limit, queue_wait)).await;
        }
        commit_each(db, fenced, counters, (limit, queue_wait)).await;
        let res = commit_group(db, rest.iter().flat_map(|r| r.writes.iter()), limit).await;
        counters.commit_transactions.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(()) => {
                counters.commits.fetch_add(rest.len() as u64, Ordering::Relaxed);
                for r in rest {
                    let _ = r.reply.send(Ok(()));
                }
                return;
            }
            Err(again) if again.is_connectivity() => {
                tracing::warn!(error = %again, requests = rest.len(), "group commit failed");
                let again = Arc::new(again);
                for r in rest {
                    answer_failed(r, &again, counters);
                }
                return;
            }
            Err(again) => {
                group = rest;
                e = again;
            }
        }
    }
}

/// Commits each request in its own transaction and answers it. Once one fails because the
/// database is unreachable, the rest fail with it untried (each would wait out its own
/// timeout).
async fn commit_each(db: &Db, group: Vec<CommitReq>, counters: &Counters, (limit, queue_wait): (Duration, Duration)) {
    let mut outage: Option<Arc<PersistenceError>> = None;
    for r in group {
        if let Some(e) = &outage {
            answer_failed(r, e, counters);
            continue;
        }
        // Each request of a refused group runs after the ones before it: one reached after
        // its queue wait and the group's attempt is not written (its caller's wait is sized to
        // that, plus one attempt of its own and a resolution).
        if !r.writes.is_empty() && r.queued_at.elapsed() > queue_wait + limit {
            answer_failed(r, &Arc::new(PersistenceError::QueuedTooLong(queue_wait)), counters);
            continue;
        }
        let res = commit_group(db, r.writes.iter(), limit).await;
        counters.commit_transactions.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(()) => {
                counters.commits.fetch_add(1, Ordering::Relaxed);
                let _ = r.reply.send(Ok(()));
            }
            Err(e) if e.is_connectivity() => {
                let e = Arc::new(e);
                answer_failed(r, &e, counters);
                outage = Some(e);
            }
            Err(e) => {
                counters.commit_failures.fetch_add(1, Ordering::Relaxed);
                let _ = r.reply.send(Err(e.into()));
            }
        }
    }
}

async fn commit_group<'a>(
    db: &Db,
    writes: impl Iterator<Item = &'a Write>,
    limit: Duration,
) -> Result<(), PersistenceError> {
    let reduced = Reduced::new(writes);
    let noted = NotedXid::default();
    let fut = async {
        match db {
            Db::Pg(p) => crate::ops::pg::commit(p, &reduced, &noted).await,
            Db::Sqlite(p) => crate::ops::sqlite::commit(p, &reduced, &noted).await,
        }
    };
    let res = tokio::time::timeout(limit, fut).await.map_err(|_| PersistenceError::Timeout(limit)).and_then(|r| r);
    match (res, db, noted.get()) {
        // PostgreSQL: the COMMIT was sent (the id was noted just before) and its answer never
        // came. It may still have committed.
        (Err(e), Db::Pg(p), Some((xid, server))) if e.is_connectivity() => resolve_commit(p, xid, server, e, limit).await,
        (res, _, _) => res,
    }
}

/// Asks PostgreSQL how transaction `xid` of the server that started at `server` ended, after
/// its COMMIT went unanswered (`e`): its callers are told the truth rather than a failure that
/// may have been durable (they would retry, or give up on, writes that did happen: an order
/// reported failed that comes back after a restart). Polls `txid_status` for up to `limit`
/// while it is in progress. If that does not settle it (the database unreachable, the COMMIT
/// still waiting, or a server that restarted or failed over meanwhile, whose ids may name
/// other transactions), `e` stands and the outcome stays unknown (logged). An abort also
/// leaves `e`: without deferred constraints, a COMMIT aborts when its connection or server
/// went away, and the writer then fails fast as for any outage.
async fn resolve_commit(pool: &sqlx::PgPool, xid: i64, server: i64, e: PersistenceError, limit: Duration) -> Result<(), PersistenceError> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        let ask = sqlx::query_as::<_, (Option<String>, i64)>(crate::ops::PG_XID_STATUS).bind(xid).fetch_one(pool);
        match tokio::time::timeout_at(until, ask).await {
            Ok(Ok((_, now_server))) if now_server != server => {
                tracing::warn!(xid, error = %e, "a commit went unanswered and the database restarted since: outcome unknown");
                return Err(e);
            }
            Ok(Ok((Some(s), _))) if s == "committed" => {
                tracing::warn!(xid, error = %e, "a commit went unanswered but did commit: reported as done");
                return Ok(());
            }
            Ok(Ok((Some(s), _))) if s == "aborted" => return Err(e),
            Ok(Ok(_)) => {} // in progress (or not known yet): ask again
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(xid, error = %e, "a commit went unanswered and its outcome is unknown");
                return Err(e);
            }
        }
        if tokio::time::Instant::now() + Duration::from_millis(50) >= until {
            tracing::warn!(xid, error = %e, "a commit went unanswered and is still in progress");
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Courier snapshots and location samples waiting for the next flush.
#[derive(Debug, Default)]
pub(crate) struct SnapshotBuffer {
    couriers: HashMap<(TenantId, CourierId), CourierRecord>,
    locations: Vec<(TenantId, CourierId, LocationSample)>,
}

impl SnapshotBuffer {
    /// Adds snapshots (all or none); an older snapshot of a courier never replaces a newer one.
    pub(crate) fn push_couriers(&mut self, couriers: Vec<CourierRecord>, cap: usize) -> Result<(), PersistenceError> {
        let new_keys = couriers
            .iter()
            .filter(|c| !self.couriers.contains_key(&(c.tenant.clone(), c.id.clone())))
            .count();
        if self.couriers.len() + new_keys > cap {
            return Err(PersistenceError::Backpressure);
        }
        for c in couriers {
            self.keep_newest(c);
        }
        Ok(())
    }

    fn keep_newest(&mut self, c: CourierRecord) {
        match self.couriers.entry((c.tenant.clone(), c.id.clone())) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if c.updated_at >= e.get().updated_at {
                    e.insert(c);
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(c);
            }
        }
    }

    /// Adds location samples (all or none).
    pub(crate) fn push_locations(
        &mut self,
        tenant: &TenantId,
        courier: &CourierId,
        samples: Vec<LocationSample>,
        cap: usize,
    ) -> Result<(), PersistenceError> {
        if self.locations.len() + samples.len() > cap {
            return Err(PersistenceError::Backpressure);
        }
        self.locations.extend(samples.into_iter().map(|s| (tenant.clone(), courier.clone(), s)));
        Ok(())
    }

    /// Drops everything buffered of one tenant (a market this node lost); returns how many
    /// snapshots and samples.
    pub(crate) fn discard_tenant(&mut self, tenant: &TenantId) -> (usize, usize) {
        let (c, l) = self.len();
        self.couriers.retain(|(t, _), _| t != tenant);
        self.locations.retain(|(t, _, _)| t != tenant);
        (c - self.couriers.len(), l - self.locations.len())
    }

    /// Drops buffered samples of one courier (privacy erase).
    pub(crate) fn erase_locations(&mut self, tenant: &TenantId, courier: &CourierId) {
        self.locations.retain(|(t, c, _)| !(t == tenant && c == courier));
    }

    pub(crate) fn len(&self) -> (usize, usize) {
        (self.couriers.len(), self.locations.len())
    }

    /// Takes up to `couriers` snapshots and the oldest `locations` samples.
    fn take_up_to(&mut self, couriers: usize, locations: usize) -> (Vec<CourierRecord>, Vec<(TenantId, CourierId, LocationSample)>) {
        let c = if couriers >= self.couriers.len() {
            std::mem::take(&mut self.couriers).into_values().collect()
        } else {
            let keys: Vec<(TenantId, CourierId)> = self.couriers.keys().take(couriers).cloned().collect();
            keys.iter().filter_map(|k| self.couriers.remove(k)).collect()
        };
        let l = if locations >= self.locations.len() {
            std::mem::take(&mut self.locations)
        } else {
            self.locations.drain(..locations).collect()
        };
        (c, l)
    }

    /// Puts rows of a failed flush back in front of what arrived meanwhile. May exceed the
    /// capacity: rows once accepted are never dropped for lack of room.
    fn put_back(&mut self, couriers: Vec<CourierRecord>, mut locations: Vec<(TenantId, CourierId, LocationSample)>) {
        for c in couriers {
            self.keep_newest(c);
        }
        locations.append(&mut self.locations);
        self.locations = locations;
    }
}

fn loc_rows(v: &[(TenantId, CourierId, LocationSample)]) -> Vec<LocationRow<'_>> {
    v.iter().map(|(t, c, s)| (t.as_str(), c.as_str(), s)).collect()
}

/// A lease this node holds on a market, `(tenant, holder, epoch)`: checked in the flush's
/// transaction, like a `Write::Fence` in a commit.
pub(crate) type FenceToken = (TenantId, String, i64);

async fn write_snapshots(
    db: &Db,
    couriers: &[CourierRecord],
    locations: &[(TenantId, CourierId, LocationSample)],
    fences: &[FenceToken],
    limit: Duration,
) -> Result<(), PersistenceError> {
    let couriers: Vec<&CourierRecord> = couriers.iter().collect();
    let locations = loc_rows(locations);
    let fences: Vec<(&str, &str, i64)> = fences.iter().map(|(t, h, e)| (t.as_str(), h.as_str(), *e)).collect();
    let fut = async {
        match db {
            Db::Pg(p) => crate::ops::pg_bulk::write_snapshots(p, &couriers, &locations, &fences).await,
            Db::Sqlite(p) => crate::ops::sqlite::write_snapshots(p, &couriers, &locations, &fences).await,
        }
    };
    tokio::time::timeout(limit, fut).await.map_err(|_| PersistenceError::Timeout(limit))?
}

/// The fence of `tenant`'s rows, if its market is fenced.
fn fence_of(fences: &[FenceToken], tenant: &TenantId) -> Vec<FenceToken> {
    fences.iter().filter(|f| f.0 == *tenant).cloned().collect()
}

/// Removes `tenant`'s rows from a flush (a market this node does not hold); returns how many.
fn drop_tenant(couriers: &mut Vec<CourierRecord>, locations: &mut Vec<(TenantId, CourierId, LocationSample)>, tenant: &TenantId) -> usize {
    let before = couriers.len() + locations.len();
    couriers.retain(|c| c.tenant != *tenant);
    locations.retain(|l| l.0 != *tenant);
    before - couriers.len() - locations.len()
}

/// With market leases, the fences of the tenants in a flush: tenants whose market this node
/// no longer holds lose their rows here (counted in `fenced_rows`).
fn flush_fences(
    inner: &Inner,
    couriers: &mut Vec<CourierRecord>,
    locations: &mut Vec<(TenantId, CourierId, LocationSample)>,
) -> Vec<FenceToken> {
    let tenants = couriers.iter().map(|c| c.tenant.clone()).chain(locations.iter().map(|l| l.0.clone()));
    let (fences, unheld) = lease_fences(inner, tenants);
    for t in unheld {
        let n = drop_tenant(couriers, locations, &t);
        inner.counters.fenced_rows.fetch_add(n as u64, Ordering::Relaxed);
        tracing::info!(tenant = %t, rows = n, "snapshot rows of a market this node does not hold dropped at flush");
    }
    fences
}

/// With market leases ([`Inner::snapshot_fences`]): the fence of each of `tenants` this node
/// holds, sorted and once each, and the tenants it holds none of; without, nothing to fence.
pub(crate) fn lease_fences(inner: &Inner, tenants: impl Iterator<Item = TenantId>) -> (Vec<FenceToken>, Vec<TenantId>) {
    let Some(lease_of) = inner.snapshot_fences.get() else { return (Vec::new(), Vec::new()) };
    let mut tenants: Vec<TenantId> = tenants.collect();
    tenants.sort_unstable();
    tenants.dedup();
    let (mut fences, mut unheld) = (Vec::with_capacity(tenants.len()), Vec::new());
    for t in tenants {
        match (lease_of.0)(&t) {
            Some((holder, epoch)) => fences.push((t, holder, epoch)),
            None => unheld.push(t),
        }
    }
    (fences, unheld)
}

/// Writes out everything buffered when it starts, in transactions of at most `flush_batch`
/// snapshots and `flush_batch` samples: one transaction for a large backlog could outlast the
/// statement timeout on every attempt and never be written. Stops at the first batch that
/// fails (it and the rest stay buffered). Serialized (`Inner::flush_lock`).
pub(crate) async fn flush_snapshots(inner: &Inner) -> Result<(), PersistenceError> {
    let _serial = inner.flush_lock.lock().await;
    let batch = inner.opts.flush_batch;
    let (mut couriers_left, mut locations_left) = inner.snapshots.lock().len();
    while couriers_left + locations_left > 0 {
        let (couriers, locations) = inner.snapshots.lock().take_up_to(couriers_left.min(batch), locations_left.min(batch));
        if couriers.is_empty() && locations.is_empty() {
            break; // taken meanwhile (a market dropped, an erase)
        }
        couriers_left = couriers_left.saturating_sub(couriers.len());
        locations_left = locations_left.saturating_sub(locations.len());
        flush_batch(inner, couriers, locations).await?;
    }
    Ok(())
}

/// Splits a batch of at least two rows in two, leaving the first half in place: the first half
/// takes the odd courier, the second the odd sample, so each half is strictly smaller than the
/// batch (one courier and one sample: one each) and halving again ends.
fn split_in_halves<C, L>(couriers: &mut Vec<C>, locations: &mut Vec<L>) -> (Vec<C>, Vec<L>) {
    (couriers.split_off(couriers.len().div_ceil(2)), locations.split_off(locations.len() / 2))
}

/// Writes one batch taken from the buffer; puts it back if the database is out of reach.
async fn flush_batch(
    inner: &Inner,
    mut couriers: Vec<CourierRecord>,
    mut locations: Vec<(TenantId, CourierId, LocationSample)>,
) -> Result<(), PersistenceError> {
    let mut fences = flush_fences(inner, &mut couriers, &mut locations);
    // Rows locked in one order by every writer of couriers (the commits' groups too), so a
    // flush and a group updating the same couriers never deadlock.
    couriers.sort_unstable_by(|a, b| (a.tenant.as_str(), a.id.as_str()).cmp(&(b.tenant.as_str(), b.id.as_str())));
    let limit = inner.opts.statement_timeout;
    let c = &inner.counters;
    let written = loop {
        if couriers.is_empty() && locations.is_empty() {
            return Ok(());
        }
        match write_snapshots(&inner.writes, &couriers, &locations, &fences, limit).await {
            // Lost between the buffer and the database: drop that market's rows, write the rest.
            Err(PersistenceError::Fenced { tenant }) => {
                let tenant = TenantId::new(tenant);
                let n = drop_tenant(&mut couriers, &mut locations, &tenant);
                fences.retain(|f| f.0 != tenant);
                c.fenced_rows.fetch_add(n as u64, Ordering::Relaxed);
                tracing::info!(tenant = %tenant, rows = n, "snapshot rows of a market lost to another node dropped at flush");
            }
            other => break other,
        }
    };
    match written {
        Ok(()) => {
            c.snapshot_flushes.fetch_add(1, Ordering::Relaxed);
            c.courier_rows.fetch_add(couriers.len() as u64, Ordering::Relaxed);
            c.location_rows.fetch_add(locations.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        // In the way of other transactions (a deadlock, a lock timeout), or too big for a
        // server-side statement timeout: written again at once in halves, each halved again if
        // it fails so. Before, such a batch was sent row by row (up to 20,000 rows, each its
        // own transaction) with the flush lock held.
        Err(e) if e.is_transient() && couriers.len() + locations.len() > 1 => {
            tracing::warn!(error = %e, couriers = couriers.len(), locations = locations.len(), "snapshot flush failed for now; writing it in halves");
            let (couriers2, locations2) = split_in_halves(&mut couriers, &mut locations);
            if let Err(e) = Box::pin(flush_batch(inner, couriers, locations)).await {
                inner.snapshots.lock().put_back(couriers2, locations2);
                return Err(e);
            }
            Box::pin(flush_batch(inner, couriers2, locations2)).await
        }
        // Out of reach (or one row in the way): kept, and tried again at the next flush.
        Err(e) if e.is_connectivity() || e.is_transient() => {
            c.flush_failures.fetch_add(1, Ordering::Relaxed);
            inner.snapshots.lock().put_back(couriers, locations);
            Err(e)
        }
        Err(e) => {
            // The database refused something in the batch: write row by row and drop only the
            // rows it refuses.
            tracing::warn!(error = %e, "snapshot flush refused, writing row by row");
            let mut couriers = couriers.into_iter();
            while let Some(one) = couriers.next() {
                match write_snapshots(&inner.writes, std::slice::from_ref(&one), &[], &fence_of(&fences, &one.tenant), limit).await {
                    Ok(()) => {
                        c.courier_rows.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.is_connectivity() => {
                        let rest: Vec<_> = std::iter::once(one).chain(couriers).collect();
                        inner.snapshots.lock().put_back(rest, locations);
                        return Err(e);
                    }
                    Err(PersistenceError::Fenced { .. }) => {
                        c.fenced_rows.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, tenant = %one.tenant, courier = %one.id, "dropping courier snapshot the database refuses");
                        c.dropped_rows.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for (i, one) in locations.iter().enumerate() {
                match write_snapshots(&inner.writes, &[], std::slice::from_ref(one), &fence_of(&fences, &one.0), limit).await {
                    Ok(()) => {
                        c.location_rows.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.is_connectivity() => {
                        inner.snapshots.lock().put_back(Vec::new(), locations[i..].to_vec());
                        return Err(e);
                    }
                    Err(PersistenceError::Fenced { .. }) => {
                        c.fenced_rows.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, tenant = %one.0, courier = %one.1, "dropping location sample the database refuses");
                        c.dropped_rows.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            c.snapshot_flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

/// Flushes every `snapshot_flush` while the store lives and is not closed (snapshots enqueued
/// after `close` are never written, like those of a crash); after a failure it waits with
/// exponential backoff (up to 2 s) before the next attempt.
pub(crate) async fn run_flusher(inner: Weak<Inner>, every: Duration) {
    let max_backoff = Duration::from_secs(2);
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        let Some(inner) = inner.upgrade().filter(|i| !i.is_closed()) else { break };
        match flush_snapshots(&inner).await {
            Ok(()) => wait = every,
            Err(e) => {
                wait = (wait * 2).min(max_backoff);
                tracing::warn!(error = %e, retry_in = ?wait, "snapshot flush failed; rows kept");
            }
        }
    }
    tracing::debug!("snapshot flusher stopped");
}

#[cfg(test)]
mod tests {
    use super::split_in_halves;

    /// Every batch of two rows or more splits into two smaller ones that hold all its rows
    /// (one courier and one sample included: the first version left that batch whole in its
    /// second half, and halved it for ever).
    #[test]
    fn halving_a_batch_always_makes_it_smaller() {
        for c in 0..6usize {
            for l in 0..6usize {
                if c + l < 2 {
                    continue;
                }
                let (mut couriers, mut locations): (Vec<usize>, Vec<usize>) = ((0..c).collect(), (0..l).collect());
                let (c2, l2) = split_in_halves(&mut couriers, &mut locations);
                let (first, second) = (couriers.len() + locations.len(), c2.len() + l2.len());
                assert!(first < c + l && second < c + l, "{c} couriers and {l} samples split into {first} and {second}");
                assert_eq!(first + second, c + l);
                assert!(first > 0 && second > 0);
            }
        }
    }
}
