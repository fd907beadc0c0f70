//! Storage for hexfleet: the sqlx implementation of the actors' [`Store`] port on PostgreSQL
//! (production) or SQLite (the embedded default), with the same schema and behaviour on both.
//!
//! Components:
//! - [`db`](crate::db): opening the pool for a URL and applying the migrations
//!   (`migrations/postgres`, `migrations/sqlite`);
//! - `ops`: every SQL statement, written once and compiled for both backends;
//! - `rows`: the crate's own row types and their conversions to the domain types;
//! - `wkb`: zone geometry as Well-Known Binary (bit-exact round trip);
//! - `writer`: the group-commit writer task and the courier snapshot / location buffer with its
//!   periodic flusher;
//! - [`webhooks`]: webhook subscriptions and their delivery outbox, filled in the transaction
//!   that appends the events;
//! - [`leases`]: market leases between nodes (holder, address, epoch, expiry on the database
//!   clock); a batch carrying a `Write::Fence` commits only while its lease holds;
//! - [`SqlStore`]: the handle implementing [`Store`].
//!
//! Durability: [`Store::commit`] returns after COMMIT (SQLite in WAL mode with
//! `synchronous=FULL`); courier snapshots and location samples are written every
//! [`StoreOptions::snapshot_flush`] (≤ 1 s), which is the most a crash can lose of them.
//!
//! Architecture invariant: only this crate knows sqlx; every table has a tenant column and
//! every statement but the retention purge filters by tenant.
//!
//! [`Store`]: hexfleet_actors::store::Store
//! [`Store::commit`]: hexfleet_actors::store::Store::commit

#![warn(missing_docs)]

/// Runs the same call on whichever backend `$db` (a `&Db`) is, with the statements of the
/// crate module `$m` (its `pg` and `sqlite` submodules), and awaits it.
macro_rules! on_backend {
    ($db:expr, $m:ident :: $f:ident ( $($arg:expr),* )) => {
        match $db {
            $crate::db::Db::Pg(p) => $crate::$m::pg::$f(p, $($arg),*).await,
            $crate::db::Db::Sqlite(p) => $crate::$m::sqlite::$f(p, $($arg),*).await,
        }
    };
}

mod db;
mod error;
pub mod leases;
mod ops;
mod options;
mod rows;
mod store;
pub mod webhooks;
mod wkb;
mod writer;

pub use db::is_postgres;
pub use error::PersistenceError;
pub use options::StoreOptions;
pub use store::{LeaseLookup, SqlStore, StoreStats};

/// Where the embedded SQLite database lives when no `DATABASE_URL` is given.
pub const DEFAULT_SQLITE_PATH: &str = "./data/hexfleet.db";

/// Applies the migrations to the database named by `url` (as [`SqlStore::open`] understands
/// it) and closes it again; returns the backend, `"postgres"` or `"sqlite"`. Used by
/// `hexfleet migrate`.
pub async fn migrate(url: &str) -> Result<&'static str, PersistenceError> {
    let db = db::Db::open(url, &StoreOptions::default().normalized()).await?;
    db.migrate().await?;
    let backend = db.backend();
    db.close().await;
    Ok(backend)
}
