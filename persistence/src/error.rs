//! The crate's one error type, [`PersistenceError`], and its mapping onto the storage port's
//! [`StoreError`] (which the gateway maps to HTTP 503 and friends).

use hexfleet_actors::domain::TenantId;
use hexfleet_actors::store::StoreError;

/// Everything that can go wrong in `hexfleet-persistence`.
#[derive(Debug, thiserror::Error)]
pub enum PersistenceError {
    /// The database URL is not one this crate understands.
    #[error("unsupported database url: {0}")]
    UnsupportedUrl(String),
    /// Creating the directory for an embedded SQLite database failed.
    #[error("cannot create database directory {path}")]
    CreateDir {
        /// The directory that could not be created.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be reached, or a statement failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row could not be turned back into a domain value.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table the row came from.
        table: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// A write queue is full.
    #[error("write queue is full")]
    Backpressure,
    /// The writer task is gone (the store was shut down).
    #[error("store writer stopped")]
    WriterStopped,
    /// The runtime the store was opened on (where its statements run) is shutting down.
    #[error("the store's runtime has stopped")]
    HomeStopped,
    /// A database call took longer than the configured timeout.
    #[error("database call timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// A commit waited in the writer's queue longer than `StoreOptions::queue_wait` and was
    /// not written (the database is slow, the queue long).
    #[error("the commit waited {0:?} for the writer and was not written")]
    QueuedTooLong(std::time::Duration),
    /// A `Write::Fence` of the batch did not hold (the market's lease is another holder's, at
    /// another epoch, or lapsed): nothing of the batch was written. Not a connectivity error.
    #[error("market {tenant} is no longer held at the fenced epoch")]
    Fenced {
        /// The market (tenant) whose fence failed.
        tenant: String,
    },
}

impl PersistenceError {
    pub(crate) fn corrupt(table: &'static str, detail: impl Into<String>) -> Self {
        PersistenceError::Corrupt { table, detail: detail.into() }
    }

    /// True when the error says "the database is not there" rather than "this write is wrong":
    /// the writer answers every caller of a failed group with `Unavailable` in the first case
    /// and retries each caller's batch on its own in the second.
    pub(crate) fn is_connectivity(&self) -> bool {
        match self {
            PersistenceError::Database(e) => is_connectivity(e),
            PersistenceError::Timeout(_) | PersistenceError::WriterStopped | PersistenceError::HomeStopped => true,
            _ => false,
        }
    }

    /// True for a statement that failed because of other transactions or a server-side limit,
    /// not because of what it writes (PostgreSQL: deadlock 40P01, serialization 40001, lock
    /// not available 55P03, cancelled by `statement_timeout` 57014): the same batch can go
    /// through when tried again.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            PersistenceError::Database(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("40P01" | "40001" | "55P03" | "57014"))
            }
            _ => false,
        }
    }
}

/// Whether a sqlx error means the connection or the server is gone (as opposed to a statement
/// the database refused).
pub(crate) fn is_connectivity(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            // PostgreSQL: class 08 (connection exception), 57P (operator intervention:
            // admin shutdown, crash shutdown, cannot connect now), 53 (insufficient resources).
            // SQLite: BUSY (5), LOCKED (6), IOERR (10), FULL (13), CANTOPEN (14) and their
            // extended codes.
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") {
                return true;
            }
            match code.parse::<i64>() {
                Ok(n) => matches!(n & 0xff, 5 | 6 | 10 | 13 | 14),
                Err(_) => false,
            }
        }
        _ => false,
    }
}

impl From<PersistenceError> for StoreError {
    fn from(e: PersistenceError) -> Self {
        match e {
            PersistenceError::Backpressure => StoreError::Backpressure,
            PersistenceError::Corrupt { table, detail } => StoreError::Corrupt(format!("{table}: {detail}")),
            PersistenceError::Fenced { tenant } => StoreError::Fenced(TenantId::new(tenant)),
            other => StoreError::Unavailable(Box::new(other)),
        }
    }
}
