//! Market leases: which node owns a market's dispatch.
//!
//! A market is a tenant. A node owns a market while it holds the market's lease, a row of
//! `market_leases` (holder, advertised address, epoch, expiry); another node takes the market
//! over, from the snapshot in the database, once the lease lapses or is released. Every time
//! is the **database's** clock (Unix ms, read inside the statements that need it), never a
//! node's, so clock skew between nodes does not matter.
//!
//! - [`SqlStore::acquire_lease`] takes a free, lapsed or released lease, or extends one the
//!   holder already has, in one atomic upsert; [`SqlStore::renew_leases`] extends all of a
//!   holder's leases no one else took (live or lapsed) and tells which it still has;
//!   [`SqlStore::release_leases`] gives them up at once (clean shutdown).
//! - The **epoch** is the fencing token: 1 for a market's first lease, one more every time the
//!   lease changes hands or is taken again after a lapse or a release, unchanged while one
//!   holder keeps it live. Rows are never deleted (a release sets `expires_at` to 0), so a
//!   market's epochs only grow and a `(holder, epoch)` that stopped holding never holds again.
//! - **Fencing** happens in the commit path (`ops`): a batch carrying a `Write::Fence` commits
//!   only if the lease is still live at that holder and epoch, checked inside the transaction,
//!   which keeps the lease from changing hands until it commits.
//!
//! Lease rows are locked in tenant order by every statement that locks several (renew,
//! release, a group commit's fence checks), so two of them never deadlock.

use std::time::Duration;

use hexfleet_actors::domain::TenantId;

use crate::error::PersistenceError;
use crate::rows::TERMINAL_STATES_SQL;
use crate::store::SqlStore;

/// A market lease as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The market.
    pub tenant: TenantId,
    /// Who holds (or last held) it.
    pub holder: String,
    /// The base URL the holder advertised, where other nodes forward the market's requests.
    pub addr: String,
    /// The fencing token: grows by one every time the lease changes hands or is taken again
    /// after a lapse or a release.
    pub epoch: i64,
    /// Unix ms on the database clock; 0 once released.
    pub expires_at: i64,
    /// `expires_at` > now (database clock) when read.
    pub live: bool,
}

#[derive(sqlx::FromRow)]
struct LeaseRow {
    tenant: String,
    holder: String,
    addr: String,
    epoch: i64,
    expires_at: i64,
    /// The database clock when the row was read.
    db_now: i64,
}

impl LeaseRow {
    fn into_lease(self) -> Lease {
        Lease {
            tenant: TenantId::new(self.tenant),
            holder: self.holder,
            addr: self.addr,
            epoch: self.epoch,
            live: self.expires_at > self.db_now,
            expires_at: self.expires_at,
        }
    }
}

/// A lease length in ms, clamped so that now + ttl cannot overflow.
fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).min(i64::MAX / 4)
}

macro_rules! lease_ops {
    ($name:ident, $db:ty) => {
        #[doc = concat!("Lease statements compiled for `", stringify!($db), "`.")]
        mod $name {
            use sqlx::Pool;

            use super::*;
            use crate::ops::$name::{LOCK_UPDATE, NOW};

            type Db = $db;

            /// The columns of a [`LeaseRow`], with the database clock.
            fn returning() -> String {
                format!("tenant, holder, addr, epoch, expires_at, {NOW} AS db_now")
            }

            /// The holder's leases that were not released, live or lapsed, locked in tenant
            /// order (PostgreSQL) by the statement that uses it as `tenant IN (…)`. A lapsed
            /// lease still naming the holder was taken by no one since.
            fn kept_by_holder() -> String {
                format!(
                    "SELECT tenant FROM market_leases WHERE holder = $1 AND expires_at > 0 \
                     ORDER BY tenant{LOCK_UPDATE}"
                )
            }

            /// The holder's live leases, locked in tenant order like [`kept_by_holder`].
            fn live_of_holder() -> String {
                format!(
                    "SELECT tenant FROM market_leases WHERE holder = $1 AND expires_at > {NOW} \
                     ORDER BY tenant{LOCK_UPDATE}"
                )
            }

            pub(super) async fn acquire(
                pool: &Pool<Db>,
                tenant: &TenantId,
                holder: &str,
                addr: &str,
                ttl: i64,
            ) -> Result<Option<Lease>, PersistenceError> {
                // Kept by the same holder while live: same epoch and acquired_at, new expiry.
                // Otherwise (another holder's lapsed or released lease, or the holder's own
                // lapsed one) the epoch moves on. When another holder's lease is live the
                // WHERE is false: nothing changes and no row comes back.
                let row: Option<LeaseRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO market_leases (tenant, holder, addr, epoch, expires_at, acquired_at) \
                     VALUES ($1, $2, $3, 1, {NOW} + $4, {NOW}) \
                     ON CONFLICT (tenant) DO UPDATE SET \
                     epoch = CASE WHEN market_leases.holder = excluded.holder AND market_leases.expires_at > {NOW} \
                       THEN market_leases.epoch ELSE market_leases.epoch + 1 END, \
                     acquired_at = CASE WHEN market_leases.holder = excluded.holder AND market_leases.expires_at > {NOW} \
                       THEN market_leases.acquired_at ELSE excluded.acquired_at END, \
                     holder = excluded.holder, addr = excluded.addr, expires_at = excluded.expires_at \
                     WHERE market_leases.holder = excluded.holder OR market_leases.expires_at <= {NOW} \
                     RETURNING {}",
                    returning()
                )))
                .bind(tenant.as_str())
                .bind(holder)
                .bind(addr)
                .bind(ttl)
                .fetch_optional(pool)
                .await?;
                Ok(row.map(LeaseRow::into_lease))
            }

            pub(super) async fn renew(pool: &Pool<Db>, holder: &str, ttl: i64) -> Result<Vec<(TenantId, i64)>, PersistenceError> {
                let mut rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "UPDATE market_leases SET expires_at = {NOW} + $2 \
                     WHERE holder = $1 AND expires_at > 0 AND tenant IN ({}) \
                     RETURNING tenant, epoch",
                    kept_by_holder()
                )))
                .bind(holder)
                .bind(ttl)
                .fetch_all(pool)
                .await?;
                rows.sort_unstable();
                Ok(rows.into_iter().map(|(t, epoch)| (TenantId::new(t), epoch)).collect())
            }

            pub(super) async fn release(pool: &Pool<Db>, holder: &str) -> Result<u64, PersistenceError> {
                let r = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE market_leases SET expires_at = 0 \
                     WHERE holder = $1 AND expires_at > {NOW} AND tenant IN ({})",
                    live_of_holder()
                )))
                .bind(holder)
                .execute(pool)
                .await?;
                Ok(r.rows_affected())
            }

            pub(super) async fn get(pool: &Pool<Db>, tenant: &TenantId) -> Result<Option<Lease>, PersistenceError> {
                let row: Option<LeaseRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM market_leases WHERE tenant = $1",
                    returning()
                )))
                .bind(tenant.as_str())
                .fetch_optional(pool)
                .await?;
                Ok(row.map(LeaseRow::into_lease))
            }

            pub(super) async fn list(pool: &Pool<Db>) -> Result<Vec<Lease>, PersistenceError> {
                let rows: Vec<LeaseRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM market_leases ORDER BY tenant",
                    returning()
                )))
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().map(LeaseRow::into_lease).collect())
            }

            pub(super) async fn unowned(pool: &Pool<Db>) -> Result<Vec<TenantId>, PersistenceError> {
                // Across tenants by design: this is how a node finds markets to take over.
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT m.tenant FROM (\
                       SELECT tenant FROM couriers \
                       UNION SELECT tenant FROM orders WHERE state NOT IN {TERMINAL_STATES_SQL} \
                       UNION SELECT tenant FROM market_leases) m \
                     WHERE NOT EXISTS (SELECT 1 FROM market_leases l WHERE l.tenant = m.tenant AND l.expires_at > {NOW}) \
                     ORDER BY m.tenant"
                )))
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().map(TenantId::new).collect())
            }
        }
    };
}

lease_ops!(pg, sqlx::Postgres);
lease_ops!(sqlite, sqlx::Sqlite);

impl SqlStore {
    /// Takes `tenant`'s lease for `holder` (advertised at `addr`) for `ttl`, if no one holds it,
    /// it lapsed (`expires_at` <= now, database clock), or `holder` already holds it. A market's
    /// first lease has epoch 1; one taken from another holder or after a lapse or release has
    /// the previous epoch + 1; one `holder` already holds live keeps its epoch and is extended.
    /// Returns the lease when `holder` now holds it, `None` when another holder holds it live.
    /// One atomic statement: of concurrent calls for a free market, exactly one wins.
    pub async fn acquire_lease(
        &self,
        tenant: &TenantId,
        holder: &str,
        addr: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, PersistenceError> {
        let ttl = ttl_ms(ttl);
        let (db, tenant, holder, addr) = (self.db().clone(), tenant.clone(), holder.to_owned(), addr.to_owned());
        self.bounded(async move { on_backend!(&db, leases::acquire(&tenant, &holder, &addr, ttl)) }).await
    }

    /// Extends every lease of `holder` to now + `ttl`, also one that lapsed while no one took
    /// it (after a database outage longer than the lease, say: no other node acted on the
    /// market since, so the holder may go on at the same epoch); returns (tenant, epoch) of
    /// the leases it still holds, by tenant. Taken or released leases are neither renewed nor
    /// returned: a market the caller believes it holds and that is missing here was lost.
    pub async fn renew_leases(&self, holder: &str, ttl: Duration) -> Result<Vec<(TenantId, i64)>, PersistenceError> {
        let ttl = ttl_ms(ttl);
        let (db, holder) = (self.writes().clone(), holder.to_owned());
        self.bounded(async move { on_backend!(&db, leases::renew(&holder, ttl)) }).await
    }

    /// Gives up every live lease of `holder` at once (`expires_at` = 0, epoch kept, so the next
    /// holder gets epoch + 1); returns how many.
    pub async fn release_leases(&self, holder: &str) -> Result<u64, PersistenceError> {
        let (db, holder) = (self.writes().clone(), holder.to_owned());
        self.bounded(async move { on_backend!(&db, leases::release(&holder)) }).await
    }

    /// One market's lease, if it ever had one.
    pub async fn lease(&self, tenant: &TenantId) -> Result<Option<Lease>, PersistenceError> {
        let (db, tenant) = (self.db().clone(), tenant.clone());
        self.bounded(async move { on_backend!(&db, leases::get(&tenant)) }).await
    }

    /// Every lease (admin listing), by tenant.
    pub async fn leases(&self) -> Result<Vec<Lease>, PersistenceError> {
        let db = self.db().clone();
        self.bounded(async move { on_backend!(&db, leases::list()) }).await
    }

    /// Markets no one holds live: tenants that have couriers, open orders or a lease row, and
    /// whose lease is missing, lapsed or released. Sorted.
    pub async fn unowned_markets(&self) -> Result<Vec<TenantId>, PersistenceError> {
        let db = self.db().clone();
        self.bounded(async move { on_backend!(&db, leases::unowned()) }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_clamped() {
        assert_eq!(ttl_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(ttl_ms(Duration::MAX), i64::MAX / 4);
    }
}
