//! The SQL: every statement the store runs, written once and compiled for both backends.
//!
//! The SQL text is shared (SQLite understands `$N` placeholders and `ON CONFLICT … DO UPDATE`
//! like PostgreSQL); [`backend_ops!`] instantiates the same functions for `sqlx::Postgres`
//! ([`pg`]) and `sqlx::Sqlite` ([`sqlite`]). The only differences are passed in as
//! parameters: how a JSON value is written (`::json` cast on PostgreSQL) and read back, the
//! database clock ([`pg::NOW`], also used by [`crate::leases`]), and how a transaction that
//! checks market-lease fences holds the lease rows until it commits (see [`pg::commit`]).
//!
//! Multi-row statements are chunked so that one statement stays below both backends' bind
//! parameter limits (PostgreSQL 65,535; SQLite 32,766). On PostgreSQL the snapshot flusher uses
//! [`pg_bulk`] instead: `INSERT … SELECT * FROM UNNEST(array, …)`, one statement per table.

use std::collections::HashMap;

use hexfleet_actors::domain::{CourierRecord, DomainEvent, LocationSample, Order, ZoneRecord};
use hexfleet_actors::store::{Recovered, Write};

use crate::error::PersistenceError;
use crate::rows::{CourierRow, OrderRow, ZoneRow};

/// Most bind parameters one statement uses.
///
/// The multi-row statements built with `QueryBuilder` differ in text for every row count, so
/// they are not kept in the connections' prepared-statement caches (`persistent(false)`): each
/// distinct count would otherwise stay cached, up to 100 per connection, each the size of a
/// statement with up to 30,000 parameters (about 1.4 KiB of SQLite's memory per courier in
/// `hexfleet-bench memory`).
const MAX_PARAMS: usize = 30_000;

/// One location sample to append to the history.
pub(crate) type LocationRow<'a> = (&'a str, &'a str, &'a LocationSample);

/// A group of writes reduced to the statements needed, preserving the effect of applying them
/// in order: the last snapshot per order, courier and zone wins (a zone's last write may be a
/// delete), events are appended in order. Fences (`Write::Fence`) are collected once each,
/// sorted, to be checked before anything is written.
#[derive(Default)]
pub(crate) struct Reduced<'a> {
    pub orders: Vec<&'a Order>,
    pub couriers: Vec<&'a CourierRecord>,
    /// Couriers to insert unless they exist (applied before `couriers`, so a snapshot in the
    /// same group still wins).
    pub registrations: Vec<&'a CourierRecord>,
    pub zone_upserts: Vec<&'a ZoneRecord>,
    pub zone_deletes: Vec<(&'a str, &'a str)>,
    pub events: Vec<&'a DomainEvent>,
    /// (tenant, holder, epoch) of every fence, deduplicated and sorted by tenant: every
    /// transaction locks lease rows in the same order (and so does [`crate::leases`]), so two
    /// of them never wait for each other in a cycle.
    pub fences: Vec<(&'a str, &'a str, i64)>,
}

impl<'a> Reduced<'a> {
    pub(crate) fn new(writes: impl IntoIterator<Item = &'a Write>) -> Self {
        let mut orders: HashMap<(&str, &str), usize> = HashMap::new();
        let mut couriers: HashMap<(&str, &str), usize> = HashMap::new();
        let mut zones: HashMap<(&str, &str), Option<&ZoneRecord>> = HashMap::new();
        let mut r = Reduced::default();
        for w in writes {
            match w {
                Write::Order(o) => match orders.get(&(o.tenant.as_str(), o.id.as_str())) {
                    Some(&i) => r.orders[i] = o,
                    None => {
                        orders.insert((o.tenant.as_str(), o.id.as_str()), r.orders.len());
                        r.orders.push(o);
                    }
                },
                Write::Courier(c) => match couriers.get(&(c.tenant.as_str(), c.id.as_str())) {
                    Some(&i) => r.couriers[i] = c,
                    None => {
                        couriers.insert((c.tenant.as_str(), c.id.as_str()), r.couriers.len());
                        r.couriers.push(c);
                    }
                },
                Write::RegisterCourier(c) => r.registrations.push(c),
                Write::Zone(z) => {
                    zones.insert((z.tenant.as_str(), z.id.as_str()), Some(z));
                }
                Write::DeleteZone { tenant, id } => {
                    zones.insert((tenant.as_str(), id.as_str()), None);
                }
                Write::Event(e) => r.events.push(e),
                Write::Fence { tenant, holder, epoch } => r.fences.push((tenant.as_str(), holder.as_str(), *epoch)),
            }
        }
        r.fences.sort_unstable();
        r.fences.dedup();
        // Rows locked in one order by every transaction (the flusher sorts its couriers too).
        r.orders.sort_unstable_by(|a, b| (a.tenant.as_str(), a.id.as_str()).cmp(&(b.tenant.as_str(), b.id.as_str())));
        r.couriers.sort_unstable_by(|a, b| (a.tenant.as_str(), a.id.as_str()).cmp(&(b.tenant.as_str(), b.id.as_str())));
        for (key, z) in zones {
            match z {
                Some(z) => r.zone_upserts.push(z),
                None => r.zone_deletes.push(key),
            }
        }
        r
    }
}

/// PostgreSQL: when the server answering started (Unix µs), an SQL expression. A transaction
/// id names one transaction only on the server that handed it out ([`NotedXid`]).
macro_rules! pg_server_started {
    () => {
        "(EXTRACT(EPOCH FROM pg_postmaster_start_time()) * 1000000)::BIGINT"
    };
}

/// PostgreSQL: how transaction `$1` ended (`committed`, `aborted`, `in progress`), and the
/// answering server's start time, to compare with the one noted with the id.
pub(crate) const PG_XID_STATUS: &str = concat!("SELECT txid_status($1), ", pg_server_started!());

macro_rules! backend_ops {
    (
        $name:ident, $db:ty, json_in = $json_in:literal, json_out = $json_out:literal, now = $now:literal,
        begin_write = $begin_write:literal, lock_shared = $lock_shared:literal, lock_update = $lock_update:literal,
        lock_events = $lock_events:literal, xid = $xid:expr
    ) => {
        #[doc = concat!("Statements compiled for `", stringify!($db), "`.")]
        pub(crate) mod $name {
            use hexfleet_actors::domain::{CourierId, CourierRecord, DomainEvent, LocationSample, Order, OrderId, TenantId, ZoneId, ZoneRecord};
            use hexfleet_actors::store::{EventQuery, Recovered, SpeedTable, StoredEvent};
            use sqlx::{Pool, QueryBuilder};

            use super::{LocationRow, Reduced, MAX_PARAMS};
            use crate::error::PersistenceError::Fenced;
            use crate::error::PersistenceError;
            use crate::rows::{self, CourierRow, EventRow, OrderRow, ZoneRow, COURIER_COLUMNS, ORDER_COLUMNS, TERMINAL_STATES_SQL, ZONE_COLUMNS};

            type Db = $db;
            type Conn = <Db as sqlx::Database>::Connection;

            /// How a bound JSON text parameter is written.
            const JSON_IN: &str = $json_in;
            /// How a JSON column is read back as text.
            const JSON_OUT: &str = $json_out;
            /// The database clock, Unix ms (an SQL expression): market leases are timed by it,
            /// never by a node's clock, so clock skew between nodes does not matter.
            pub(crate) const NOW: &str = $now;
            /// Starts a write transaction that holds the write lock from its first statement.
            const BEGIN_WRITE: &str = $begin_write;
            /// Appended to a `SELECT` of lease rows that must not change before the transaction
            /// commits (a fence check).
            const LOCK_SHARED: &str = $lock_shared;
            /// Appended to a `SELECT` of lease rows that the statement is about to update (locks
            /// them in the `ORDER BY` order).
            pub(crate) const LOCK_UPDATE: &str = $lock_update;
            /// Takes a tenant's event lock until the transaction ends (empty: not needed).
            const LOCK_EVENTS: &str = $lock_events;

            /// Checks market-lease fences `(tenant, holder, epoch)`, sorted by tenant, inside the
            /// caller's transaction: each lease row must still name that holder at that epoch
            /// (and, with `live`, be unexpired), and stays so until the transaction ends. The
            /// first that does not hold fails with [`PersistenceError::Fenced`] naming its tenant.
            ///
            /// Commits (dispatch decisions) need a live lease. Snapshot flushes do not: a lease
            /// that lapsed while the database was down, and that no one took (a take-over raises
            /// the epoch), is still this node's, and its buffered rows must not be lost.
            pub(crate) async fn check_fences(conn: &mut Conn, fences: &[(&str, &str, i64)], live: bool) -> Result<(), PersistenceError> {
                let live_sql = if live { format!(" AND expires_at > {NOW}") } else { String::new() };
                for (tenant, holder, epoch) in fences {
                    let held: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT 1 FROM market_leases WHERE tenant = $1 AND holder = $2 AND epoch = $3{live_sql}{LOCK_SHARED}"
                    )))
                    .bind(*tenant)
                    .bind(*holder)
                    .bind(*epoch)
                    .fetch_optional(&mut *conn)
                    .await?;
                    if held.is_none() {
                        return Err(Fenced { tenant: (*tenant).to_owned() });
                    }
                }
                Ok(())
            }

            /// Applies a reduced group of writes on one connection (inside the caller's
            /// transaction). Checks the fences first: if one does not hold, fails with
            /// [`PersistenceError::Fenced`] before anything is written (the caller rolls back).
            pub(crate) async fn apply(conn: &mut Conn, r: &Reduced<'_>) -> Result<(), PersistenceError> {
                check_fences(conn, &r.fences, true).await?;
                upsert_orders(conn, &r.orders).await?;
                // Profiles and snapshots before first registrations: a registration is an insert
                // if absent, while a profile written before it with an earlier `updated_at`
                // would be refused by the registration's row.
                upsert_couriers(conn, &r.couriers, super::CourierColumns::Profile).await?;
                register_couriers(conn, &r.registrations).await?;
                upsert_zones(conn, &r.zone_upserts).await?;
                for (tenant, id) in &r.zone_deletes {
                    sqlx::query("DELETE FROM zones WHERE tenant = $1 AND id = $2")
                        .bind(*tenant)
                        .bind(*id)
                        .execute(&mut *conn)
                        .await?;
                }
                insert_events(conn, &r.events).await?;
                Ok(())
            }

            /// Applies a group of writes in one transaction. The transaction holds what its fence
            /// checks read until it commits, so a market cannot change hands in between: on
            /// PostgreSQL the checked lease rows are locked `FOR SHARE` (a concurrent acquire of
            /// one waits for this commit); on SQLite the transaction is `BEGIN IMMEDIATE`, holding
            /// the database's write lock from the start (a deferred one that reads first could
            /// not take the lock later once another writer committed: `SQLITE_BUSY_SNAPSHOT`).
            ///
            /// Just before COMMIT the transaction's id and its server's identity go to `noted`
            /// (`$xid`; empty: the backend has none to give, and `noted` stays unset). A COMMIT
            /// whose answer never comes (timed out, connection lost) may still have committed;
            /// they let the caller ask.
            pub(crate) async fn commit(pool: &Pool<Db>, r: &Reduced<'_>, noted: &super::NotedXid) -> Result<(), PersistenceError> {
                let mut tx = if r.fences.is_empty() { pool.begin().await? } else { pool.begin_with(BEGIN_WRITE).await? };
                apply(&mut tx, r).await?;
                if !$xid.is_empty() {
                    let (id, server): (i64, i64) = sqlx::query_as($xid).fetch_one(&mut *tx).await?;
                    noted.set(id, server);
                }
                tx.commit().await?;
                Ok(())
            }

            /// Upserts orders; an older version never overwrites a newer one.
            pub(crate) async fn upsert_orders(conn: &mut Conn, orders: &[&Order]) -> Result<(), PersistenceError> {
                for chunk in orders.chunks(MAX_PARAMS / rows::ORDER_COLUMN_COUNT) {
                    let mut qb = QueryBuilder::<Db>::new(format!("INSERT INTO orders ({ORDER_COLUMNS}) "));
                    qb.push_values(chunk, |mut b, o| {
                        b.push_bind(o.tenant.as_str())
                            .push_bind(o.id.as_str())
                            .push_bind(o.pickup.lat)
                            .push_bind(o.pickup.lng)
                            .push_bind(o.dropoff.lat)
                            .push_bind(o.dropoff.lng)
                            .push_bind(i64::from(o.size))
                            .push_bind(o.ready_at)
                            .push_bind(o.deliver_by)
                            .push_bind(o.state.as_str())
                            .push_bind(o.courier.as_ref().map(CourierId::as_str))
                            .push_bind(o.offer.as_ref().map(|f| f.courier.as_str()))
                            .push_bind(o.offer.as_ref().map(|f| f.expires_at))
                            .push_bind(rows::declined_json(o))
                            .push_bind(rows::assignment_json(o))
                            .push_bind(o.created_at)
                            .push_bind(o.updated_at)
                            .push_bind(i64::from(o.version))
                            .push_bind(o.released_at);
                    });
                    qb.push(
                        " ON CONFLICT (tenant, id) DO UPDATE SET pickup_lat = excluded.pickup_lat, \
                         pickup_lng = excluded.pickup_lng, dropoff_lat = excluded.dropoff_lat, \
                         dropoff_lng = excluded.dropoff_lng, size = excluded.size, ready_at = excluded.ready_at, \
                         deliver_by = excluded.deliver_by, state = excluded.state, courier = excluded.courier, \
                         offer_courier = excluded.offer_courier, offer_expires_at = excluded.offer_expires_at, \
                         declined = excluded.declined, assignment = excluded.assignment, \
                         created_at = excluded.created_at, updated_at = excluded.updated_at, \
                         version = excluded.version, released_at = excluded.released_at \
                         WHERE orders.version <= excluded.version",
                    );
                    qb.build().persistent(false).execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// Inserts couriers that do not exist yet; an existing row is left as it is.
            async fn register_couriers(conn: &mut Conn, couriers: &[&CourierRecord]) -> Result<(), PersistenceError> {
                for chunk in couriers.chunks(MAX_PARAMS / 15) {
                    let mut qb = courier_values(chunk);
                    qb.push(" ON CONFLICT (tenant, id) DO NOTHING");
                    qb.build().persistent(false).execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// `INSERT INTO couriers (…) VALUES (…), …` for `chunk`, to be finished by an
            /// `ON CONFLICT` clause.
            fn courier_values(chunk: &[&CourierRecord]) -> QueryBuilder<Db> {
                let mut qb = QueryBuilder::<Db>::new(format!("INSERT INTO couriers ({COURIER_COLUMNS}) "));
                qb.push_values(chunk, |mut b, c| {
                    let f = c.last_fix.as_ref();
                    b.push_bind(c.tenant.as_str())
                        .push_bind(c.id.as_str())
                        .push_bind(c.name.as_deref())
                        .push_bind(c.vehicle.as_str())
                        .push_bind(i64::from(c.capacity))
                        .push_bind(c.device_id.as_deref())
                        .push_bind(c.status.as_str())
                        .push_bind(c.on_shift)
                        .push_bind(f.map(|f| f.pos.lat))
                        .push_bind(f.map(|f| f.pos.lng))
                        .push_bind(f.map(|f| f.ts))
                        .push_bind(f.and_then(|f| f.speed).map(f64::from))
                        .push_bind(f.and_then(|f| f.heading).map(f64::from))
                        .push_bind(f.and_then(|f| f.acc).map(f64::from))
                        .push_bind(c.updated_at);
                });
                qb
            }

            /// Upserts couriers: `columns` says which of an existing row's columns
            /// ([`super::CourierColumns`]).
            pub(crate) async fn upsert_couriers(
                conn: &mut Conn,
                couriers: &[&CourierRecord],
                columns: super::CourierColumns,
            ) -> Result<(), PersistenceError> {
                for chunk in couriers.chunks(MAX_PARAMS / 15) {
                    let mut qb = courier_values(chunk);
                    qb.push(columns.on_conflict());
                    qb.build().persistent(false).execute(&mut *conn).await?;
                }
                Ok(())
            }

            async fn upsert_zones(conn: &mut Conn, zones: &[&ZoneRecord]) -> Result<(), PersistenceError> {
                for chunk in zones.chunks(200) {
                    let mut qb = QueryBuilder::<Db>::new("INSERT INTO zones (tenant, id, kind, name, geometry, updated_at) ");
                    qb.push_values(chunk, |mut b, z| {
                        b.push_bind(z.tenant.as_str())
                            .push_bind(z.id.as_str())
                            .push_bind(z.kind.as_str())
                            .push_bind(z.name.as_deref())
                            .push_bind(rows::geometry_wkb(z))
                            .push_bind(z.updated_at);
                    });
                    qb.push(
                        " ON CONFLICT (tenant, id) DO UPDATE SET kind = excluded.kind, name = excluded.name, \
                         geometry = excluded.geometry, updated_at = excluded.updated_at",
                    );
                    qb.build().persistent(false).execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// Takes `tenant`'s event lock until the transaction ends (re-entrant: a later
            /// [`insert_events`] in the same transaction takes it again at no cost). A
            /// transaction that locks a row a commit's trigger reads (a webhook it deletes)
            /// takes it first, in the commits' order, or the two can deadlock.
            pub(crate) async fn lock_events(conn: &mut Conn, tenant: &str) -> Result<(), PersistenceError> {
                if !LOCK_EVENTS.is_empty() {
                    sqlx::query(LOCK_EVENTS).bind(tenant).execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// Appends events. A tenant's events become visible in `seq` order, so a reader
            /// following `seq > since` never passes one that commits later. PostgreSQL hands out
            /// `seq` from a sequence outside any lock, so two transactions (the writer, a webhook
            /// change, another node's writer during a take-over) could commit out of order:
            /// every appender takes its tenants' event locks first, sorted (no deadlock), and
            /// holds them until it commits. SQLite runs one write transaction at a time already.
            /// Called at most once per transaction.
            pub(crate) async fn insert_events(conn: &mut Conn, events: &[&DomainEvent]) -> Result<(), PersistenceError> {
                if !LOCK_EVENTS.is_empty() {
                    let mut tenants: Vec<&str> = events.iter().map(|e| e.tenant.as_str()).collect();
                    tenants.sort_unstable();
                    tenants.dedup();
                    for t in tenants {
                        lock_events(conn, t).await?;
                    }
                }
                for chunk in events.chunks(MAX_PARAMS / 8) {
                    let mut qb = QueryBuilder::<Db>::new(
                        "INSERT INTO events (tenant, entity, entity_id, kind, actor, reason, ts, attrs) ",
                    );
                    qb.push_values(chunk, |mut b, e| {
                        b.push_bind(e.tenant.as_str())
                            .push_bind(e.entity.as_str())
                            .push_bind(e.entity_id.as_str())
                            .push_bind(e.kind.as_str())
                            .push_bind(e.actor.as_str())
                            .push_bind(e.reason.as_deref())
                            .push_bind(e.ts)
                            .push_bind(rows::attrs_json(e))
                            .push_unseparated(JSON_IN);
                    });
                    qb.build().persistent(false).execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// Appends location samples; a sample already stored (same courier and time) is kept.
            pub(crate) async fn insert_locations(conn: &mut Conn, samples: &[LocationRow<'_>]) -> Result<(), PersistenceError> {
                for chunk in samples.chunks(MAX_PARAMS / 6) {
                    let mut qb = QueryBuilder::<Db>::new("INSERT INTO location_history (tenant, courier, ts, lat, lng, speed) ");
                    qb.push_values(chunk, |mut b, (tenant, courier, s)| {
                        b.push_bind(*tenant)
                            .push_bind(*courier)
                            .push_bind(s.ts)
                            .push_bind(s.pos.lat)
                            .push_bind(s.pos.lng)
                            .push_bind(s.speed.map(f64::from));
                    });
                    qb.push(" ON CONFLICT (tenant, courier, ts) DO NOTHING");
                    qb.build().persistent(false).execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// Writes buffered snapshots in one transaction (PostgreSQL uses [`super::pg_bulk`]).
            #[allow(dead_code)]
            pub(crate) async fn write_snapshots(
                pool: &Pool<Db>,
                couriers: &[&CourierRecord],
                locations: &[LocationRow<'_>],
                fences: &[(&str, &str, i64)],
            ) -> Result<(), PersistenceError> {
                let mut tx = if fences.is_empty() { pool.begin().await? } else { pool.begin_with(BEGIN_WRITE).await? };
                check_fences(&mut tx, fences, false).await?;
                upsert_couriers(&mut tx, couriers, super::CourierColumns::Live).await?;
                insert_locations(&mut tx, locations).await?;
                tx.commit().await?;
                Ok(())
            }

            /// The naive write path, one autocommitted statement per courier (benchmark baseline).
            pub(crate) async fn upsert_couriers_one_by_one(pool: &Pool<Db>, couriers: &[CourierRecord]) -> Result<(), PersistenceError> {
                let mut conn = pool.acquire().await?;
                for c in couriers {
                    upsert_couriers(&mut conn, &[c], super::CourierColumns::Live).await?;
                }
                Ok(())
            }

            pub(crate) async fn load(pool: &Pool<Db>) -> Result<Recovered, PersistenceError> {
                let couriers: Vec<CourierRow> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COURIER_COLUMNS} FROM couriers")))
                        .fetch_all(pool)
                        .await?;
                let orders: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {ORDER_COLUMNS} FROM orders WHERE state NOT IN {TERMINAL_STATES_SQL}"
                )))
                .fetch_all(pool)
                .await?;
                let zones: Vec<ZoneRow> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {ZONE_COLUMNS} FROM zones")))
                        .fetch_all(pool)
                        .await?;
                super::recovered(couriers, orders, zones)
            }

            /// [`load`] of one tenant (a market taken over from another node).
            pub(crate) async fn load_tenant(pool: &Pool<Db>, tenant: &TenantId) -> Result<Recovered, PersistenceError> {
                let couriers: Vec<CourierRow> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COURIER_COLUMNS} FROM couriers WHERE tenant = $1")))
                        .bind(tenant.as_str())
                        .fetch_all(pool)
                        .await?;
                let orders: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {ORDER_COLUMNS} FROM orders WHERE tenant = $1 AND state NOT IN {TERMINAL_STATES_SQL}"
                )))
                .bind(tenant.as_str())
                .fetch_all(pool)
                .await?;
                let zones: Vec<ZoneRow> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {ZONE_COLUMNS} FROM zones WHERE tenant = $1")))
                        .bind(tenant.as_str())
                        .fetch_all(pool)
                        .await?;
                super::recovered(couriers, orders, zones)
            }

            pub(crate) async fn device_courier(pool: &Pool<Db>, device_id: &str) -> Result<Option<(TenantId, CourierId)>, PersistenceError> {
                let row: Option<(String, String)> =
                    sqlx::query_as("SELECT tenant, id FROM couriers WHERE device_id = $1 ORDER BY updated_at DESC LIMIT 1")
                        .bind(device_id)
                        .fetch_optional(pool)
                        .await?;
                Ok(row.map(|(t, id)| (TenantId::new(t), CourierId::new(id))))
            }

            pub(crate) async fn zone_versions(pool: &Pool<Db>) -> Result<Vec<(TenantId, ZoneId, i64)>, PersistenceError> {
                let rows: Vec<(String, String, i64)> =
                    sqlx::query_as("SELECT tenant, id, updated_at FROM zones").fetch_all(pool).await?;
                Ok(rows.into_iter().map(|(t, id, at)| (TenantId::new(t), ZoneId::new(id), at)).collect())
            }

            pub(crate) async fn zone(pool: &Pool<Db>, tenant: &TenantId, id: &ZoneId) -> Result<Option<ZoneRecord>, PersistenceError> {
                let row: Option<ZoneRow> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {ZONE_COLUMNS} FROM zones WHERE tenant = $1 AND id = $2")))
                        .bind(tenant.as_str())
                        .bind(id.as_str())
                        .fetch_optional(pool)
                        .await?;
                row.map(ZoneRow::into_domain).transpose()
            }

            pub(crate) async fn order(pool: &Pool<Db>, tenant: &TenantId, id: &OrderId) -> Result<Option<Order>, PersistenceError> {
                let row: Option<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {ORDER_COLUMNS} FROM orders WHERE tenant = $1 AND id = $2"
                )))
                .bind(tenant.as_str())
                .bind(id.as_str())
                .fetch_optional(pool)
                .await?;
                row.map(OrderRow::into_domain).transpose()
            }

            pub(crate) async fn events(pool: &Pool<Db>, q: &EventQuery) -> Result<Vec<StoredEvent>, PersistenceError> {
                let mut qb = QueryBuilder::<Db>::new(format!(
                    "SELECT seq, tenant, entity, entity_id, kind, actor, reason, ts, attrs{JSON_OUT} AS attrs \
                     FROM events WHERE tenant = "
                ));
                qb.push_bind(q.tenant.as_str());
                if let Some((kind, id)) = &q.entity {
                    qb.push(" AND entity = ").push_bind(kind.as_str());
                    qb.push(" AND entity_id = ").push_bind(id.as_str());
                }
                if let Some(since) = q.since_seq {
                    qb.push(" AND seq > ").push_bind(since);
                }
                qb.push(" ORDER BY seq LIMIT ").push_bind(i64::from(q.limit));
                let rows: Vec<EventRow> = qb.build_query_as().fetch_all(pool).await?;
                rows.into_iter()
                    .map(|r| r.into_domain().map(|(seq, event)| StoredEvent { seq, event }))
                    .collect()
            }

            pub(crate) async fn export_locations(
                pool: &Pool<Db>,
                tenant: &TenantId,
                courier: &CourierId,
                from: i64,
                to: i64,
                limit: usize,
            ) -> Result<Vec<LocationSample>, PersistenceError> {
                let rows: Vec<rows::LocationRow> = sqlx::query_as(
                    "SELECT ts, lat, lng, speed FROM location_history \
                     WHERE tenant = $1 AND courier = $2 AND ts >= $3 AND ts <= $4 ORDER BY ts LIMIT $5",
                )
                .bind(tenant.as_str())
                .bind(courier.as_str())
                .bind(from)
                .bind(to)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(pool)
                .await?;
                rows.into_iter().map(rows::LocationRow::into_domain).collect()
            }

            /// Deletes one batch of a courier's history: its samples up to its `batch + 1`-th
            /// oldest (a seek on the primary key), or all of them when no more than `batch` are
            /// left. The caller repeats while more than `batch` rows went.
            pub(crate) async fn erase_locations(pool: &Pool<Db>, tenant: &TenantId, courier: &CourierId, batch: i64) -> Result<u64, PersistenceError> {
                let r = sqlx::query(
                    "DELETE FROM location_history WHERE tenant = $1 AND courier = $2 AND ts <= COALESCE(\
                     (SELECT ts FROM location_history WHERE tenant = $1 AND courier = $2 ORDER BY ts LIMIT 1 OFFSET $3), \
                     9223372036854775807)",
                )
                .bind(tenant.as_str())
                .bind(courier.as_str())
                .bind(batch)
                .execute(pool)
                .await?;
                Ok(r.rows_affected())
            }

            /// Deletes one batch of history older than `before` for every tenant (the retention
            /// job runs across tenants; the index on `ts` serves both parts): every sample up to
            /// the `batch + 1`-th oldest one (more than `batch` rows, with ties), or all of them
            /// when no more than `batch` are left. The caller repeats while more than `batch`
            /// rows went, so a large backlog is deleted in short statements.
            pub(crate) async fn purge_locations(pool: &Pool<Db>, before: i64, batch: i64) -> Result<u64, PersistenceError> {
                let r = sqlx::query(
                    "DELETE FROM location_history WHERE ts < $1 AND ts <= COALESCE(\
                     (SELECT ts FROM location_history WHERE ts < $1 ORDER BY ts LIMIT 1 OFFSET $2), $1)",
                )
                .bind(before)
                .bind(batch)
                .execute(pool)
                .await?;
                Ok(r.rows_affected())
            }

            /// Saves speed tables, after checking `fences` (holder and epoch of each market's
            /// lease, as the snapshot flush does) in the same transaction.
            pub(crate) async fn save_speeds(pool: &Pool<Db>, tables: &[SpeedTable], fences: &[(&str, &str, i64)]) -> Result<(), PersistenceError> {
                let mut tx = if fences.is_empty() { pool.begin().await? } else { pool.begin_with(BEGIN_WRITE).await? };
                check_fences(&mut tx, fences, false).await?;
                for t in tables {
                    sqlx::query(
                        "INSERT INTO speed_models (tenant, vehicle, model, updated_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (tenant, vehicle) DO UPDATE SET model = excluded.model, updated_at = excluded.updated_at",
                    )
                    .bind(t.tenant.as_str())
                    .bind(t.vehicle.as_str())
                    .bind(&t.text)
                    .bind(t.updated_at)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            pub(crate) async fn load_speeds(pool: &Pool<Db>) -> Result<Vec<SpeedTable>, PersistenceError> {
                let rows: Vec<(String, String, String, i64)> =
                    sqlx::query_as("SELECT tenant, vehicle, model, updated_at FROM speed_models").fetch_all(pool).await?;
                rows.into_iter()
                    .map(|(tenant, vehicle, text, updated_at)| {
                        let vehicle = hexfleet_actors::domain::Vehicle::parse(&vehicle)
                            .ok_or_else(|| PersistenceError::corrupt("speed_models", format!("unknown vehicle {vehicle:?}")))?;
                        Ok(SpeedTable { tenant: TenantId::new(tenant), vehicle, text, updated_at })
                    })
                    .collect()
            }

            pub(crate) async fn ping(pool: &Pool<Db>) -> Result<(), PersistenceError> {
                sqlx::query("SELECT 1").execute(pool).await?;
                Ok(())
            }
        }
    };
}

backend_ops!(
    pg,
    sqlx::Postgres,
    json_in = "::json",
    json_out = "::text",
    now = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
    begin_write = "BEGIN",
    lock_shared = " FOR SHARE",
    lock_update = " FOR UPDATE",
    lock_events = "SELECT pg_advisory_xact_lock(hashtextextended($1, 7011))",
    xid = concat!("SELECT txid_current(), ", pg_server_started!())
);
backend_ops!(
    sqlite,
    sqlx::Sqlite,
    json_in = "",
    json_out = "",
    now = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    begin_write = "BEGIN IMMEDIATE",
    lock_shared = "",
    lock_update = "",
    lock_events = "",
    xid = ""
);

/// A transaction's id and its server's identity (the server's start time, µs), noted just
/// before COMMIT: an id is only meaningful on the server that gave it. After a crash restart
/// or a failover to a standby, the same id can name another transaction, so an answer from a
/// server that started at another time settles nothing.
#[derive(Debug, Default)]
pub(crate) struct NotedXid {
    xid: std::sync::atomic::AtomicI64,
    server: std::sync::atomic::AtomicI64,
}

impl NotedXid {
    fn set(&self, xid: i64, server: i64) {
        use std::sync::atomic::Ordering::Release;
        self.server.store(server, Release);
        self.xid.store(xid, Release);
    }

    /// `(xid, server)` once noted.
    pub(crate) fn get(&self) -> Option<(i64, i64)> {
        use std::sync::atomic::Ordering::Acquire;
        let xid = self.xid.load(Acquire);
        (xid > 0).then(|| (xid, self.server.load(Acquire)))
    }
}

/// Decodes the rows of a recovery load. A row this build cannot read (a state, vehicle or
/// geometry written by a newer build, a row edited by hand) is skipped with an error naming
/// it, not the whole load: one bad row stopped every node that loaded its market, and an
/// older build could not start on a database a newer one had written (a rollback).
fn recovered(couriers: Vec<CourierRow>, orders: Vec<OrderRow>, zones: Vec<ZoneRow>) -> Result<Recovered, PersistenceError> {
    Ok(Recovered {
        couriers: readable(couriers, |r| (r.tenant.clone(), r.id.clone()), CourierRow::into_domain),
        open_orders: readable(orders, |r| (r.tenant.clone(), r.id.clone()), OrderRow::into_domain),
        zones: readable(zones, |r| (r.tenant.clone(), r.id.clone()), ZoneRow::into_domain),
    })
}

/// The rows `decode` can read; the others logged (with their `(tenant, id)`) and left out.
fn readable<R, T>(rows: Vec<R>, key: impl Fn(&R) -> (String, String), decode: impl Fn(R) -> Result<T, PersistenceError>) -> Vec<T> {
    rows.into_iter()
        .filter_map(|r| {
            let (tenant, id) = key(&r);
            decode(r)
                .inspect_err(|e| tracing::error!(%tenant, %id, error = %e, "a stored row this build cannot read is left out of the recovery"))
                .ok()
        })
        .collect()
}

/// [`CourierColumns::Live`]'s `ON CONFLICT` clause, as a literal: the PostgreSQL bulk upsert
/// ([`pg_bulk::upsert_couriers`]) appends it to its statement with `concat!`.
macro_rules! live_on_conflict {
    () => {
        " ON CONFLICT (tenant, id) DO UPDATE SET status = excluded.status, \
                 fix_lat = excluded.fix_lat, fix_lng = excluded.fix_lng, fix_ts = excluded.fix_ts, \
                 fix_speed = excluded.fix_speed, fix_heading = excluded.fix_heading, fix_acc = excluded.fix_acc, \
                 updated_at = excluded.updated_at \
                 WHERE couriers.updated_at <= excluded.updated_at"
    };
}

/// Which columns of an existing courier row an upsert writes.
///
/// A courier row holds two things written by two paths: its profile (name, vehicle, capacity,
/// device, on shift), written durably by a profile change (`Write::Courier`, one at a time per
/// courier), and its live state (status, last fix, `updated_at`), written by the snapshot
/// flusher from the courier's actor. Before, each wrote both, guarded by `updated_at` alone: a
/// snapshot taken during a profile change (a fix arriving meanwhile, stamped later, carrying the
/// old profile) overwrote the new profile, or made the store refuse it as older; until the next
/// snapshot (half a second) the stored profile was the old one, and a crash then kept it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CourierColumns {
    /// A profile change: the profile always (profile changes are serialised per courier, and
    /// fenced by the market's lease), the live columns only if newer.
    Profile,
    /// A snapshot: the live columns if newer; the profile never (only when inserting).
    Live,
}

impl CourierColumns {
    fn on_conflict(self) -> &'static str {
        match self {
            CourierColumns::Profile => {
                " ON CONFLICT (tenant, id) DO UPDATE SET name = excluded.name, vehicle = excluded.vehicle, \
                 capacity = excluded.capacity, device_id = excluded.device_id, on_shift = excluded.on_shift, \
                 status = CASE WHEN couriers.updated_at <= excluded.updated_at THEN excluded.status ELSE couriers.status END, \
                 fix_lat = CASE WHEN couriers.updated_at <= excluded.updated_at THEN excluded.fix_lat ELSE couriers.fix_lat END, \
                 fix_lng = CASE WHEN couriers.updated_at <= excluded.updated_at THEN excluded.fix_lng ELSE couriers.fix_lng END, \
                 fix_ts = CASE WHEN couriers.updated_at <= excluded.updated_at THEN excluded.fix_ts ELSE couriers.fix_ts END, \
                 fix_speed = CASE WHEN couriers.updated_at <= excluded.updated_at THEN excluded.fix_speed ELSE couriers.fix_speed END, \
                 fix_heading = CASE WHEN couriers.updated_at <= excluded.updated_at THEN excluded.fix_heading ELSE couriers.fix_heading END, \
                 fix_acc = CASE WHEN couriers.updated_at <= excluded.updated_at THEN excluded.fix_acc ELSE couriers.fix_acc END, \
                 updated_at = CASE WHEN couriers.updated_at <= excluded.updated_at THEN excluded.updated_at ELSE couriers.updated_at END"
            }
            CourierColumns::Live => live_on_conflict!(),
        }
    }
}

/// PostgreSQL bulk writes with `UNNEST`: one statement per table whatever the row count, with
/// one array parameter per column (no bind-limit chunking, one plan). Used by the snapshot
/// flusher, whose batches are the big ones.
pub(crate) mod pg_bulk {
    use hexfleet_actors::domain::CourierRecord;
    use sqlx::{PgConnection, PgPool};

    use super::LocationRow;
    use crate::error::PersistenceError;

    /// Upserts courier snapshots ([`super::CourierColumns::Live`]: an existing row's profile is
    /// left alone, its live columns taken when newer).
    pub(crate) async fn upsert_couriers(conn: &mut PgConnection, couriers: &[&CourierRecord]) -> Result<(), PersistenceError> {
        if couriers.is_empty() {
            return Ok(());
        }
        let n = couriers.len();
        let mut tenant = Vec::with_capacity(n);
        let mut id = Vec::with_capacity(n);
        let mut name = Vec::with_capacity(n);
        let mut vehicle = Vec::with_capacity(n);
        let mut capacity = Vec::with_capacity(n);
        let mut device_id = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut on_shift = Vec::with_capacity(n);
        let mut fix_lat = Vec::with_capacity(n);
        let mut fix_lng = Vec::with_capacity(n);
        let mut fix_ts = Vec::with_capacity(n);
        let mut fix_speed = Vec::with_capacity(n);
        let mut fix_heading = Vec::with_capacity(n);
        let mut fix_acc = Vec::with_capacity(n);
        let mut updated_at = Vec::with_capacity(n);
        for c in couriers {
            let f = c.last_fix.as_ref();
            tenant.push(c.tenant.as_str());
            id.push(c.id.as_str());
            name.push(c.name.as_deref());
            vehicle.push(c.vehicle.as_str());
            capacity.push(i64::from(c.capacity));
            device_id.push(c.device_id.as_deref());
            status.push(c.status.as_str());
            on_shift.push(c.on_shift);
            fix_lat.push(f.map(|f| f.pos.lat));
            fix_lng.push(f.map(|f| f.pos.lng));
            fix_ts.push(f.map(|f| f.ts));
            fix_speed.push(f.and_then(|f| f.speed).map(f64::from));
            fix_heading.push(f.and_then(|f| f.heading).map(f64::from));
            fix_acc.push(f.and_then(|f| f.acc).map(f64::from));
            updated_at.push(c.updated_at);
        }
        sqlx::query(concat!(
            "INSERT INTO couriers (tenant, id, name, vehicle, capacity, device_id, status, on_shift, \
             fix_lat, fix_lng, fix_ts, fix_speed, fix_heading, fix_acc, updated_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], \
             $7::text[], $8::bool[], $9::float8[], $10::float8[], $11::int8[], $12::float8[], $13::float8[], \
             $14::float8[], $15::int8[])",
            live_on_conflict!()
        ))
        .bind(tenant)
        .bind(id)
        .bind(name)
        .bind(vehicle)
        .bind(capacity)
        .bind(device_id)
        .bind(status)
        .bind(on_shift)
        .bind(fix_lat)
        .bind(fix_lng)
        .bind(fix_ts)
        .bind(fix_speed)
        .bind(fix_heading)
        .bind(fix_acc)
        .bind(updated_at)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Appends location samples; a sample already stored (same courier and time) is kept.
    pub(crate) async fn insert_locations(conn: &mut PgConnection, samples: &[LocationRow<'_>]) -> Result<(), PersistenceError> {
        if samples.is_empty() {
            return Ok(());
        }
        let n = samples.len();
        let (mut tenant, mut courier, mut ts) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut lat, mut lng, mut speed) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for (t, c, s) in samples {
            tenant.push(*t);
            courier.push(*c);
            ts.push(s.ts);
            lat.push(s.pos.lat);
            lng.push(s.pos.lng);
            speed.push(s.speed.map(f64::from));
        }
        sqlx::query(
            "INSERT INTO location_history (tenant, courier, ts, lat, lng, speed) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::float8[], $5::float8[], $6::float8[]) \
             ON CONFLICT (tenant, courier, ts) DO NOTHING",
        )
        .bind(tenant)
        .bind(courier)
        .bind(ts)
        .bind(lat)
        .bind(lng)
        .bind(speed)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Writes buffered snapshots in one transaction.
    pub(crate) async fn write_snapshots(
        pool: &PgPool,
        couriers: &[&CourierRecord],
        locations: &[LocationRow<'_>],
        fences: &[(&str, &str, i64)],
    ) -> Result<(), PersistenceError> {
        let mut tx = pool.begin().await?;
        super::pg::check_fences(&mut tx, fences, false).await?;
        upsert_couriers(&mut tx, couriers).await?;
        insert_locations(&mut tx, locations).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use hexfleet_actors::domain::TenantId;
    use hexfleet_actors::store::Write;

    use super::Reduced;

    fn fence(tenant: &str, holder: &str, epoch: i64) -> Write {
        Write::Fence { tenant: TenantId::new(tenant), holder: holder.into(), epoch }
    }

    #[test]
    fn fences_are_collected_once_each_in_tenant_order() {
        let writes = [fence("m2", "A", 3), fence("m1", "A", 1), fence("m2", "A", 3), fence("m1", "B", 1), fence("m1", "A", 1)];
        let r = Reduced::new(writes.iter());
        assert_eq!(r.fences, [("m1", "A", 1), ("m1", "B", 1), ("m2", "A", 3)]);
        assert!(r.orders.is_empty() && r.events.is_empty(), "a fence writes nothing itself");
    }
}
