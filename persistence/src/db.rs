//! [`Db`]: the connection pool of whichever backend the URL named, and opening it (SQLite in
//! WAL mode with `synchronous=FULL`, so a commit that returned survives power loss).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::error::PersistenceError;
use crate::options::StoreOptions;

/// The pool of one backend.
#[derive(Clone, Debug)]
pub(crate) enum Db {
    Pg(PgPool),
    Sqlite(SqlitePool),
}

/// Which database a URL names.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Db {
    pub(crate) async fn open(url: &str, opts: &StoreOptions) -> Result<Db, PersistenceError> {
        if is_postgres(url) {
            let o = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(opts.max_connections)
                .acquire_timeout(opts.acquire_timeout)
                // A connection broken by an outage is found by this ping before it is handed
                // out, so the writer never gets a dead one after the database is back.
                .test_before_acquire(true)
                .connect_with(o)
                .await?;
            return Ok(Db::Pg(pool));
        }
        let o = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url)?
        } else if url.contains("://") {
            return Err(PersistenceError::UnsupportedUrl(url.to_owned()));
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        let o = o
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let file = o.get_filename();
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
            && file != Path::new(":memory:")
        {
            std::fs::create_dir_all(dir)
                .map_err(|source| PersistenceError::CreateDir { path: dir.display().to_string(), source })?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(o)
            .await?;
        Ok(Db::Sqlite(pool))
    }

    /// Applies the migrations this build has that the database lacks. Migrations the database
    /// has and this build does not (a newer build ran them: a rollback, or an older node during
    /// a rolling upgrade) are left alone: sqlx refuses to start by default, and the previous
    /// build could not start again after a bad release. Migrations are written to be additive
    /// (new tables, new nullable columns), so an older build runs on the newer schema.
    pub(crate) async fn migrate(&self) -> Result<(), PersistenceError> {
        match self {
            Db::Pg(p) => {
                let mut m = sqlx::migrate!("./migrations/postgres");
                m.set_ignore_missing(true);
                m.run(p).await?
            }
            Db::Sqlite(p) => {
                let mut m = sqlx::migrate!("./migrations/sqlite");
                m.set_ignore_missing(true);
                m.run(p).await?
            }
        }
        Ok(())
    }

    pub(crate) async fn close(&self) {
        match self {
            Db::Pg(p) => p.close().await,
            Db::Sqlite(p) => p.close().await,
        }
    }

    pub(crate) fn backend(&self) -> &'static str {
        match self {
            Db::Pg(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }
}
