//! [`StoreOptions`]: the knobs of the store (flush interval, queue bounds, pool size, timeouts).

use std::time::Duration;

/// Configuration of a [`crate::SqlStore`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How often buffered courier snapshots and location samples are written. Clamped to
    /// 10 ms..=1 s: a crash loses at most this much of them. Default 500 ms.
    pub snapshot_flush: Duration,
    /// Commit requests that may wait for the writer; beyond it `commit` answers `Backpressure`.
    /// Default 16,384: a dispatch round makes one commit per matched order at once (5,000 in
    /// the 5k-orders benchmark) on top of the API's own writes; 4,096 shed creates at 12k/s.
    pub queue_capacity: usize,
    /// Courier snapshots (distinct couriers) and, separately, location samples that may wait for
    /// a flush; beyond it `snapshot_couriers` / `record_locations` answer `Backpressure`. This is
    /// also what is kept in memory while the database is down.
    pub snapshot_capacity: usize,
    /// Most commit requests merged into one transaction.
    pub max_group: usize,
    /// Longest a commit request waits in the queue for the writer to start it. One not started
    /// by then fails (`Unavailable`) without being written: a slow database with a long queue
    /// (a dispatch round's thousands of commits) would otherwise write it after its caller had
    /// given up and reported it failed. With this, a commit is settled within `queue_wait`
    /// plus three `statement_timeout`s (its group's attempt; when the group was refused, its
    /// own attempt, not started past `queue_wait` + one timeout; the resolution of an
    /// unanswered COMMIT): 19 s by default, which callers' own waits are sized to (the
    /// actors' `commit_wait`, 20 s). Default 4 s.
    pub queue_wait: Duration,
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long a caller waits for a connection; with the database down, `commit` fails with
    /// `Unavailable` after about this long.
    pub acquire_timeout: Duration,
    /// Upper bound on one transaction of the writer or the flusher (a half-open connection must
    /// not wedge them).
    pub statement_timeout: Duration,
    /// Rows of location history one statement of the retention purge deletes (about).
    pub purge_batch: usize,
    /// Most courier snapshots, and separately location samples, one flush transaction writes;
    /// a larger backlog (after a database outage: up to `snapshot_capacity` of each) is written
    /// in several, each within `statement_timeout`. Default 20,000.
    pub flush_batch: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            snapshot_flush: Duration::from_millis(500),
            queue_capacity: 16_384,
            snapshot_capacity: 500_000,
            max_group: 512,
            queue_wait: Duration::from_secs(4),
            max_connections: 8,
            acquire_timeout: Duration::from_millis(1500),
            statement_timeout: Duration::from_secs(5),
            purge_batch: 20_000,
            flush_batch: 20_000,
        }
    }
}

impl StoreOptions {
    pub(crate) fn normalized(mut self) -> Self {
        self.snapshot_flush = self.snapshot_flush.clamp(Duration::from_millis(10), Duration::from_secs(1));
        self.queue_capacity = self.queue_capacity.max(1);
        self.snapshot_capacity = self.snapshot_capacity.max(1);
        self.max_group = self.max_group.max(1);
        self.max_connections = self.max_connections.max(2);
        self.purge_batch = self.purge_batch.max(1);
        self.flush_batch = self.flush_batch.max(1);
        self
    }
}
