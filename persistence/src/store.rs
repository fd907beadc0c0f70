//! [`SqlStore`]: the sqlx implementation of the actors' [`Store`] port, tying together the pool
//! ([`crate::db`]), the statements ([`crate::ops`]) and the write path ([`crate::writer`]).
//!
//! Reads go straight to the pool. Durable writes go through the group-commit writer task;
//! courier snapshots and location samples go into the bounded [`SnapshotBuffer`] that the
//! flusher task writes out every `snapshot_flush`.
//!
//! Every statement runs on the runtime that opened the store (its *home*), whichever runtime
//! the caller is on. A pool connection is a socket registered with the reactor of the runtime
//! that opened it: one opened from an HTTP worker's runtime would only make progress while that
//! worker's thread polls it (a worker busy with a long request stalls every statement that gets
//! the connection), and would die with the worker at shutdown, under the final flush.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hexfleet_actors::domain::{CourierId, CourierRecord, LocationSample, Ms, Order, OrderId, TenantId, ZoneId, ZoneRecord};
use hexfleet_actors::store::{EventQuery, Recovered, SpeedTable, Store, StoreError, StoredEvent, Write};
use tokio::sync::{mpsc, oneshot};

use crate::db::Db;
use crate::error::PersistenceError;
use crate::options::StoreOptions;
use crate::writer::{self, CommitReq, Counters, SnapshotBuffer};

/// Connections of the write path's own pool on PostgreSQL ([`Inner::writes`]).
const WRITE_CONNECTIONS: u32 = 4;

/// State shared by the store handle, the writer and the flusher.
#[derive(Debug)]
pub(crate) struct Inner {
    /// Reads and the other statements.
    pub(crate) db: Db,
    /// The writer's, the flusher's and the lease renewals' own connections (PostgreSQL; the
    /// same pool as `db` on SQLite, whose writes take one file lock anyway): reads that hold
    /// every connection of `db` (consoles' snapshots, history exports, event pages) made a
    /// commit's connection wait past `acquire_timeout`, which the writer took for an outage,
    /// failing every queued commit; and a lease renewal could wait the same way. Take-overs
    /// (`acquire_lease`, as many at once as markets asked for) stay on `db`.
    pub(crate) writes: Db,
    pub(crate) opts: StoreOptions,
    pub(crate) counters: Arc<Counters>,
    pub(crate) snapshots: parking_lot::Mutex<SnapshotBuffer>,
    /// Serializes flushes (the periodic one and explicit `flush` calls), so rows of one courier
    /// are never written by two transactions racing each other.
    pub(crate) flush_lock: tokio::sync::Mutex<()>,
    commits: mpsc::Sender<CommitReq>,
    /// Set by [`SqlStore::close`]; later durable writes fail at once.
    closed: AtomicBool,
    /// With market leases: whose rows a flush may write ([`SqlStore::fence_snapshots`]).
    pub(crate) snapshot_fences: std::sync::OnceLock<LeaseOf>,
    /// The runtime that opened the store, where every statement runs ([`SqlStore::at_home`]).
    home: tokio::runtime::Handle,
}

/// `(holder, epoch)` of the lease this node holds on a market, `None` when it holds none.
pub type LeaseLookup = dyn Fn(&TenantId) -> Option<(String, i64)> + Send + Sync;

/// [`LeaseLookup`] with a `Debug` for [`Inner`].
pub(crate) struct LeaseOf(pub(crate) Box<LeaseLookup>);

impl std::fmt::Debug for LeaseOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseOf(..)")
    }
}

impl Inner {
    /// Whether [`SqlStore::close`] has run (the flusher stops then).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A [`Store`] on PostgreSQL or SQLite. Cheap to clone (one shared handle); the writer and
/// flusher tasks stop when the last clone is dropped or [`SqlStore::close`] is called.
#[derive(Clone, Debug)]
pub struct SqlStore {
    inner: Arc<Inner>,
}

/// A point-in-time view of the store's write-path counters (monotonic since open) and buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// `commit` calls that became durable.
    pub commits: u64,
    /// Transactions the group-commit writer ran (fewer than `commits` when grouping works).
    pub commit_transactions: u64,
    /// `commit` calls answered with an error by the writer.
    pub commit_failures: u64,
    /// Snapshot flush transactions that wrote something (a backlog over `flush_batch` takes several).
    pub snapshot_flushes: u64,
    /// Courier snapshot rows written.
    pub courier_rows: u64,
    /// Location samples written.
    pub location_rows: u64,
    /// Rows the database refused one by one and that were dropped.
    pub dropped_rows: u64,
    /// Flushes that failed because the database was unreachable (rows were kept).
    pub flush_failures: u64,
    /// Snapshot rows dropped at flush because this node no longer held their market.
    pub fenced_rows: u64,
    /// Courier snapshots waiting for the next flush.
    pub buffered_couriers: usize,
    /// Location samples waiting for the next flush.
    pub buffered_locations: usize,
}

impl SqlStore {
    /// Opens the database named by `url` (PostgreSQL for `postgres://` / `postgresql://`,
    /// otherwise SQLite: a `sqlite:` URL or a plain file path, created if missing), applies the
    /// migrations and starts the writer and flusher tasks. Must be called inside a Tokio runtime.
    pub async fn open(url: &str, opts: StoreOptions) -> Result<SqlStore, PersistenceError> {
        let opts = opts.normalized();
        let db = Db::open(url, &opts).await?;
        db.migrate().await?;
        let writes = match &db {
            // The writer and the resolution of its unanswered COMMIT, the flusher, the renewer.
            Db::Pg(_) => Db::open(url, &StoreOptions { max_connections: WRITE_CONNECTIONS, ..opts.clone() }).await?,
            Db::Sqlite(_) => db.clone(),
        };
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(opts.queue_capacity);
        tokio::spawn(writer::run_writer(writes.clone(), rx, counters.clone(), opts.clone()));
        let inner = Arc::new(Inner {
            db,
            writes,
            opts: opts.clone(),
            counters,
            snapshots: parking_lot::Mutex::new(SnapshotBuffer::default()),
            flush_lock: tokio::sync::Mutex::new(()),
            commits: tx,
            closed: AtomicBool::new(false),
            snapshot_fences: std::sync::OnceLock::new(),
            home: tokio::runtime::Handle::current(),
        });
        tokio::spawn(writer::run_flusher(Arc::downgrade(&inner), opts.snapshot_flush));
        tracing::info!(backend = inner.db.backend(), "store opened");
        Ok(SqlStore { inner })
    }

    /// `"postgres"` or `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        self.inner.db.backend()
    }

    /// The options in effect (after clamping).
    pub fn options(&self) -> &StoreOptions {
        &self.inner.opts
    }

    /// The write-path counters and buffer sizes.
    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        let (buffered_couriers, buffered_locations) = self.inner.snapshots.lock().len();
        StoreStats {
            commits: c.commits.load(Ordering::Relaxed),
            commit_transactions: c.commit_transactions.load(Ordering::Relaxed),
            commit_failures: c.commit_failures.load(Ordering::Relaxed),
            snapshot_flushes: c.snapshot_flushes.load(Ordering::Relaxed),
            courier_rows: c.courier_rows.load(Ordering::Relaxed),
            location_rows: c.location_rows.load(Ordering::Relaxed),
            dropped_rows: c.dropped_rows.load(Ordering::Relaxed),
            flush_failures: c.flush_failures.load(Ordering::Relaxed),
            fenced_rows: c.fenced_rows.load(Ordering::Relaxed),
            buffered_couriers,
            buffered_locations,
        }
    }

    /// The shutdown path: waits for every queued commit, writes out buffered snapshots, then
    /// closes the pool. Durable writes after this fail with `Unavailable`. Returns the flush
    /// error if the database could not take the buffered rows (they are lost then).
    pub async fn close(&self) -> Result<(), PersistenceError> {
        let drained = self.drain_commits().await;
        self.inner.closed.store(true, Ordering::Release);
        let flushed = self.flush_snapshots().await;
        self.inner.db.close().await;
        self.inner.writes.close().await;
        tracing::info!(backend = self.backend(), "store closed");
        drained.and(flushed)
    }

    /// The naive write path, one autocommitted upsert per courier; kept for the batched vs
    /// one-by-one benchmark only.
    #[doc(hidden)]
    pub async fn upsert_couriers_one_by_one(&self, couriers: &[CourierRecord]) -> Result<(), PersistenceError> {
        let (db, couriers) = (self.db().clone(), couriers.to_vec());
        self.at_home(async move { on_backend!(&db, ops::upsert_couriers_one_by_one(&couriers)) }).await
    }

    /// Waits until every commit queued before this call has been answered (an empty request
    /// travels through the FIFO queue behind them).
    async fn drain_commits(&self) -> Result<(), PersistenceError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .commits
            .send(CommitReq { writes: Vec::new(), reply, queued_at: tokio::time::Instant::now() })
            .await
            .map_err(|_| PersistenceError::WriterStopped)?;
        rx.await.map_err(|_| PersistenceError::WriterStopped)?.map_err(|_| PersistenceError::WriterStopped)
    }

    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The pool of the write path and the leases ([`Inner::writes`]).
    pub(crate) fn writes(&self) -> &Db {
        &self.inner.writes
    }

    /// Runs `fut` on the store's home runtime and waits for it (see the module doc). It runs to
    /// its end even if the caller stops waiting; callers bound it ([`SqlStore::bounded`]).
    pub(crate) async fn at_home<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, PersistenceError>> + Send + 'static,
    ) -> Result<T, PersistenceError> {
        match self.inner.home.spawn(fut).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(PersistenceError::HomeStopped),
        }
    }

    /// Runs a statement on the home runtime, bounded by the statement timeout so a half-open
    /// connection cannot hang a caller.
    pub(crate) async fn bounded<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, PersistenceError>> + Send + 'static,
    ) -> Result<T, PersistenceError> {
        self.within(self.inner.opts.statement_timeout, fut).await
    }

    /// Runs `fut` on the home runtime, bounded by `limit`.
    async fn within<T: Send + 'static>(
        &self,
        limit: Duration,
        fut: impl Future<Output = Result<T, PersistenceError>> + Send + 'static,
    ) -> Result<T, PersistenceError> {
        self.at_home(async move { tokio::time::timeout(limit, fut).await.map_err(|_| PersistenceError::Timeout(limit))? })
            .await
    }

    /// Writes out the buffered snapshots now, on the home runtime.
    async fn flush_snapshots(&self) -> Result<(), PersistenceError> {
        let inner = self.inner.clone();
        self.at_home(async move { writer::flush_snapshots(&inner).await }).await
    }

    /// Bounds a recovery load. Loading 100k couriers and 50k orders takes longer than one
    /// statement timeout may allow; it runs once at start (or once per market taken over), so
    /// it is bounded by a generous multiple.
    async fn load_bounded(
        &self,
        fut: impl Future<Output = Result<Recovered, PersistenceError>> + Send + 'static,
    ) -> Result<Recovered, StoreError> {
        self.within(self.inner.opts.statement_timeout * 12, fut).await.map_err(StoreError::from)
    }

    /// The courier a device (OsmAnd / Traccar Client) is registered to, in any tenant: how a
    /// node routes a device's report to the node owning the courier's market. With a device
    /// id registered twice (not prevented across tenants), the most recently updated courier.
    pub async fn device_courier(&self, device_id: &str) -> Result<Option<(TenantId, CourierId)>, StoreError> {
        let (db, device_id) = (self.db().clone(), device_id.to_owned());
        self.read(async move { on_backend!(&db, ops::device_courier(&device_id)) }).await
    }

    /// Drops the courier snapshots and location samples of `tenant` still waiting for a flush
    /// (a market this node lost: the new owner's rows must not be overwritten); returns how
    /// many. A flush already under way is not recalled.
    pub fn discard_buffered(&self, tenant: &TenantId) -> (usize, usize) {
        self.inner.snapshots.lock().discard_tenant(tenant)
    }

    /// Fences snapshot flushes by market lease: from now on each flush asks `lease_of` for the
    /// lease this node holds on every market in it, drops the rows of markets it holds no
    /// lease on, and checks the others' leases in the flush's transaction (a market lost after
    /// its rows were buffered loses them there). Set once, when the node runs market leases;
    /// later calls are ignored.
    pub fn fence_snapshots(&self, lease_of: Box<LeaseLookup>) {
        let _ = self.inner.snapshot_fences.set(LeaseOf(lease_of));
    }

    /// Bounds a read by the statement timeout, so a half-open connection cannot hang a caller.
    async fn read<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, PersistenceError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.bounded(fut).await.map_err(StoreError::from)
    }

    /// Runs `step`, one DELETE of location history under the statement timeout that takes a
    /// batch of [`StoreOptions::purge_batch`] rows and their ties (so more than a batch while
    /// some are left), until it deletes no more than a batch; returns the rows deleted in all.
    /// One DELETE of a large backlog would outlast the timeout on every run (and never finish),
    /// and on SQLite it would hold the write lock that commits wait for until they failed as
    /// if the database were down. On an error the batches already deleted stay deleted (the
    /// count is lost).
    async fn delete_history_in_batches<Fut>(&self, step: impl Fn(crate::db::Db, i64) -> Fut) -> Result<u64, StoreError>
    where
        Fut: Future<Output = Result<u64, PersistenceError>> + Send + 'static,
    {
        let batch = i64::try_from(self.inner.opts.purge_batch).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let n = self.read(step(self.db().clone(), batch)).await?;
            total += n;
            if n <= batch as u64 {
                return Ok(total);
            }
        }
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn commit(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(PersistenceError::WriterStopped.into());
        }
        if batch.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        let queued_at = tokio::time::Instant::now();
        self.inner.commits.try_send(CommitReq { writes: batch, reply, queued_at }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Backpressure,
            mpsc::error::TrySendError::Closed(_) => PersistenceError::WriterStopped.into(),
        })?;
        rx.await.map_err(|_| StoreError::from(PersistenceError::WriterStopped))?
    }

    fn snapshot_couriers(&self, couriers: Vec<CourierRecord>) -> Result<(), StoreError> {
        if couriers.is_empty() {
            return Ok(());
        }
        let cap = self.inner.opts.snapshot_capacity;
        self.inner.snapshots.lock().push_couriers(couriers, cap).map_err(StoreError::from)
    }

    fn record_locations(&self, tenant: &TenantId, courier: &CourierId, samples: Vec<LocationSample>)
        -> Result<(), StoreError> {
        if samples.is_empty() {
            return Ok(());
        }
        let cap = self.inner.opts.snapshot_capacity;
        self.inner.snapshots.lock().push_locations(tenant, courier, samples, cap).map_err(StoreError::from)
    }

    async fn load(&self) -> Result<Recovered, StoreError> {
        let db = self.db().clone();
        self.load_bounded(async move { on_backend!(&db, ops::load()) }).await
    }

    async fn load_tenant(&self, tenant: &TenantId) -> Result<Recovered, StoreError> {
        let (db, tenant) = (self.db().clone(), tenant.clone());
        self.load_bounded(async move { on_backend!(&db, ops::load_tenant(&tenant)) }).await
    }

    async fn order(&self, tenant: &TenantId, id: &OrderId) -> Result<Option<Order>, StoreError> {
        let (db, tenant, id) = (self.db().clone(), tenant.clone(), id.clone());
        self.read(async move { on_backend!(&db, ops::order(&tenant, &id)) }).await
    }
    /// With market leases ([`SqlStore::fence_snapshots`]), a market's tables are written only
    /// while this node holds its lease at the epoch it knows, checked in the transaction: a node
    /// that lost a market (and saves on its way out) does not overwrite the new owner's.
    async fn save_speeds(&self, mut tables: Vec<SpeedTable>) -> Result<(), StoreError> {
        loop {
            let (fences, unheld) = writer::lease_fences(&self.inner, tables.iter().map(|t| t.tenant.clone()));
            tables.retain(|x| !unheld.contains(&x.tenant));
            if tables.is_empty() {
                return Ok(());
            }
            let db = self.db().clone();
            let batch = tables.clone();
            let saved = self
                .read(async move {
                    let fences: Vec<(&str, &str, i64)> = fences.iter().map(|(t, h, e)| (t.as_str(), h.as_str(), *e)).collect();
                    on_backend!(&db, ops::save_speeds(&batch, &fences))
                })
                .await;
            match saved {
                Err(StoreError::Fenced(t)) => {
                    tracing::info!(tenant = %t, "learned speeds of a market another node holds now are not saved");
                    tables.retain(|x| x.tenant != t);
                }
                other => return other,
            }
        }
    }
    async fn load_speeds(&self) -> Result<Vec<SpeedTable>, StoreError> {
        let db = self.db().clone();
        self.read(async move { on_backend!(&db, ops::load_speeds()) }).await
    }
    async fn zone_versions(&self) -> Result<Vec<(TenantId, ZoneId, Ms)>, StoreError> {
        let db = self.db().clone();
        self.read(async move { on_backend!(&db, ops::zone_versions()) }).await
    }
    async fn zone(&self, tenant: &TenantId, id: &ZoneId) -> Result<Option<ZoneRecord>, StoreError> {
        let (db, tenant, id) = (self.db().clone(), tenant.clone(), id.clone());
        self.read(async move { on_backend!(&db, ops::zone(&tenant, &id)) }).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let db = self.db().clone();
        self.read(async move { on_backend!(&db, ops::events(&query)) }).await
    }

    async fn export_locations(&self, tenant: &TenantId, courier: &CourierId, from: Ms, to: Ms, limit: usize)
        -> Result<Vec<LocationSample>, StoreError> {
        let (db, tenant, courier) = (self.db().clone(), tenant.clone(), courier.clone());
        self.read(async move { on_backend!(&db, ops::export_locations(&tenant, &courier, from, to, limit)) }).await
    }

    async fn erase_locations(&self, tenant: &TenantId, courier: &CourierId) -> Result<u64, StoreError> {
        // Samples still buffered for this courier are erased too, or the next flush would bring
        // them back. Taking the flush lock first waits for a flush in progress (which may be
        // writing some of them), so what it wrote is there for the delete below. The lock is
        // not held through the delete: a long history (many batches) held every market's
        // flushes back meanwhile.
        {
            let _no_flush = self.inner.flush_lock.lock().await;
            self.inner.snapshots.lock().erase_locations(tenant, courier);
        }
        // In batches, as the retention purge ([`SqlStore::delete_history_in_batches`]).
        self.delete_history_in_batches(|db, batch| {
            let (tenant, courier) = (tenant.clone(), courier.clone());
            async move { on_backend!(&db, ops::erase_locations(&tenant, &courier, batch)) }
        })
        .await
    }

    /// In batches of about [`StoreOptions::purge_batch`] rows ([`SqlStore::delete_history_in_batches`]).
    async fn purge_locations(&self, before: Ms) -> Result<u64, StoreError> {
        self.delete_history_in_batches(|db, batch| async move { on_backend!(&db, ops::purge_locations(before, batch)) }).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let db = self.db().clone();
        self.read(async move { on_backend!(&db, ops::ping()) }).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.drain_commits().await?;
        self.flush_snapshots().await.map_err(StoreError::from)
    }
}
