//! Webhook subscriptions and their delivery outbox.
//!
//! A subscription names an HTTP(S) URL, a signing secret and the event kinds it wants (exact
//! kinds such as `order.delivered`, or patterns ending in `*`: `order.*`, `zone.*`, `*`). The
//! outbox is filled by a trigger on `events` (see the `webhooks` migration), inside the
//! transaction that appends the events, so an event is due for delivery exactly when it is
//! durable, whichever code path appended it. The gateway's delivery worker
//! [claims](SqlStore::claim_webhook_deliveries) due rows under a lease, sends them, and
//! [records](SqlStore::finish_webhook_delivery) the outcome; a worker that dies mid-delivery
//! leaves its rows due again when the lease lapses (at-least-once; receivers dedupe on the
//! event's `seq`).

use hexfleet_actors::domain::{DomainEvent, EntityKind, TenantId};
use hexfleet_actors::store::StoredEvent;

use crate::error::PersistenceError;
use crate::rows::EventRow;
use crate::store::SqlStore;

/// A webhook subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    /// Owning tenant.
    pub tenant: TenantId,
    /// Id chosen by the client (`PUT /v1/webhooks/{id}`).
    pub id: String,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Event kinds or patterns (`order.*`), as given.
    pub events: Vec<String>,
    /// HMAC-SHA256 key of the signature header.
    pub secret: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// Delivery counts of one webhook.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebhookStats {
    /// Waiting for their first attempt or for a retry.
    pub pending: i64,
    /// Answered 2xx.
    pub delivered: i64,
    /// Gave up after the last attempt.
    pub dead: i64,
}

/// A state of an outbox row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    /// Not delivered yet; will be attempted at `next_attempt_at`.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed.
    Dead,
}

impl DeliveryState {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    fn parse(s: &str) -> Result<Self, PersistenceError> {
        match s {
            "pending" => Ok(DeliveryState::Pending),
            "delivered" => Ok(DeliveryState::Delivered),
            "dead" => Ok(DeliveryState::Dead),
            other => Err(PersistenceError::corrupt("webhook_outbox", format!("unknown state {other:?}"))),
        }
    }
}

/// One outbox row as a dispatcher sees it (`GET /v1/webhooks/{id}/deliveries`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// The event's position in the log.
    pub event_seq: i64,
    /// The event's kind.
    pub kind: String,
    /// Where the delivery stands.
    pub state: DeliveryState,
    /// Attempts made (or started) so far.
    pub attempts: i32,
    /// When the next attempt is due (pending rows), Unix ms.
    pub next_attempt_at: i64,
    /// HTTP status of the last attempt, when one came back.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Unix ms of the last change.
    pub updated_at: i64,
}

/// A claimed delivery: everything the worker needs to send it.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The webhook it goes to.
    pub webhook_id: String,
    /// The webhook's URL now.
    pub url: String,
    /// The webhook's secret now.
    pub secret: String,
    /// This attempt's number (1 for the first).
    pub attempt: i32,
    /// What is delivered.
    pub event: StoredEvent,
}

/// How one claim shares the due deliveries out ([`SqlStore::claim_webhook_deliveries`]).
/// The default shares nothing out: every due row, oldest first.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClaimShares<'a> {
    /// At most this many rows of any one webhook (its oldest).
    pub per_webhook: Option<u32>,
    /// No tenant past this many sends, counting what it has in flight.
    pub per_tenant: Option<u32>,
    /// Sends each tenant has in flight now (tenants not listed: none). The tenants with the
    /// fewest go first.
    pub in_flight: &'a [(&'a str, u32)],
}

/// How an attempt ended, as the worker decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Delivered {
        /// The receiver's status.
        status: u16,
    },
    /// Failed; try again at `at`.
    Retry {
        /// Unix ms of the next attempt.
        at: i64,
        /// The receiver's status, when it answered.
        status: Option<u16>,
        /// What went wrong.
        error: String,
    },
    /// Not attempted: the endpoint's circuit is open (the worker pauses a failing endpoint).
    /// Pending again at `at`; the claim's attempt is given back, and the last status, error and
    /// change time are kept (a deferral is not an attempt, so it does not postpone giving up,
    /// [`SqlStore::expire_webhook_deliveries`]).
    Deferred {
        /// Unix ms from which it may be claimed again.
        at: i64,
        /// The endpoint whose circuit is open. If the webhook points elsewhere by the time this
        /// is recorded (a fixed URL), the delivery is due at once instead.
        url: String,
    },
    /// Failed for the last time.
    Dead {
        /// The receiver's status, when it answered.
        status: Option<u16>,
        /// What went wrong.
        error: String,
    },
}

/// The audit entry of a webhook change (the secret stays out of the log).
fn audit_event(w: &Webhook, actor: &str, kind: &str) -> DomainEvent {
    DomainEvent {
        tenant: w.tenant.clone(),
        entity: EntityKind::Webhook,
        entity_id: w.id.clone(),
        kind: kind.into(),
        actor: actor.to_owned(),
        reason: None,
        ts: w.updated_at,
        attrs: vec![("url".into(), w.url.clone()), ("events".into(), w.events.join(","))],
    }
}

/// Splits a subscribed pattern into the `prefix` column (`None` for an exact kind).
fn prefix_of(pattern: &str) -> Option<&str> {
    pattern.strip_suffix('*')
}

#[derive(sqlx::FromRow)]
struct WebhookRow {
    tenant: String,
    id: String,
    url: String,
    secret: String,
    events: String,
    created_at: i64,
    updated_at: i64,
}

impl WebhookRow {
    fn into_domain(self) -> Result<Webhook, PersistenceError> {
        let events: Vec<String> = serde_json::from_str(&self.events)
            .map_err(|e| PersistenceError::corrupt("webhooks", format!("events: {e}")))?;
        Ok(Webhook {
            tenant: TenantId::new(self.tenant),
            id: self.id,
            url: self.url,
            secret: self.secret,
            events,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    event_seq: i64,
    kind: String,
    state: String,
    attempts: i32,
    next_attempt_at: i64,
    last_status: Option<i32>,
    last_error: Option<String>,
    updated_at: i64,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    webhook_id: String,
    url: String,
    secret: String,
    attempts: i32,
    #[sqlx(flatten)]
    event: EventRow,
}

/// Longest `last_error` kept (a receiver's error page is not worth storing whole).
const MAX_ERROR_LEN: usize = 500;

fn clip(s: &str) -> &str {
    if s.len() <= MAX_ERROR_LEN {
        return s;
    }
    let mut end = MAX_ERROR_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A span of milliseconds in the largest whole unit, for people: "72 h", "5 min", "3 s".
fn span(ms: i64) -> String {
    match ms {
        3_600_000.. => format!("{} h", ms / 3_600_000),
        60_000.. => format!("{} min", ms / 60_000),
        _ => format!("{} s", ms / 1000),
    }
}

macro_rules! webhook_ops {
    ($name:ident, $db:ty, json_in = $json_in:literal, json_out = $json_out:literal, candidates = $candidates:literal, expire = $expire:literal, share_lock = $share_lock:literal) => {
        #[doc = concat!("Webhook statements compiled for `", stringify!($db), "`.")]
        mod $name {
            use sqlx::{Pool, QueryBuilder};

            use super::*;

            type Db = $db;
            const JSON_IN: &str = $json_in;
            const JSON_OUT: &str = $json_out;

            pub(super) async fn put(pool: &Pool<Db>, w: &Webhook, audit: &DomainEvent) -> Result<bool, PersistenceError> {
                let events = serde_json::to_string(&w.events).expect("strings serialize");
                let mut tx = pool.begin().await?;
                // A write first: on SQLite a transaction that reads and then writes cannot wait
                // for the group-commit writer's lock (it fails as busy); this one takes the write
                // lock at its first statement and waits for it like any writer.
                sqlx::query("DELETE FROM webhook_events WHERE tenant = $1 AND webhook_id = $2")
                    .bind(w.tenant.as_str())
                    .bind(&w.id)
                    .execute(&mut *tx)
                    .await?;
                let existed: Option<i64> = sqlx::query_scalar("SELECT created_at FROM webhooks WHERE tenant = $1 AND id = $2")
                    .bind(w.tenant.as_str())
                    .bind(&w.id)
                    .fetch_optional(&mut *tx)
                    .await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO webhooks (tenant, id, url, secret, events, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5{JSON_IN}, $6, $6) \
                     ON CONFLICT (tenant, id) DO UPDATE SET url = excluded.url, secret = excluded.secret, \
                     events = excluded.events, updated_at = excluded.updated_at"
                )))
                .bind(w.tenant.as_str())
                .bind(&w.id)
                .bind(&w.url)
                .bind(&w.secret)
                .bind(events)
                .bind(w.updated_at)
                .execute(&mut *tx)
                .await?;
                if existed.is_some() {
                    // A replaced webhook (typically a fixed URL) gets its waiting deliveries at
                    // once, not at the end of a backoff or a circuit-breaker pause.
                    sqlx::query(
                        "UPDATE webhook_outbox SET next_attempt_at = $1 \
                         WHERE tenant = $2 AND webhook_id = $3 AND state = 'pending' AND lease IS NULL AND next_attempt_at > $1",
                    )
                    .bind(w.updated_at)
                    .bind(w.tenant.as_str())
                    .bind(&w.id)
                    .execute(&mut *tx)
                    .await?;
                }
                let mut patterns: Vec<&str> = w.events.iter().map(String::as_str).collect();
                patterns.sort_unstable();
                patterns.dedup();
                if !patterns.is_empty() {
                    let mut qb = QueryBuilder::<Db>::new("INSERT INTO webhook_events (tenant, webhook_id, pattern, prefix) ");
                    qb.push_values(&patterns, |mut b, p| {
                        b.push_bind(w.tenant.as_str()).push_bind(&w.id).push_bind(*p).push_bind(prefix_of(p));
                    });
                    qb.build().persistent(false).execute(&mut *tx).await?;
                }
                let mut audit = audit.clone();
                audit.kind = if existed.is_none() { "webhook.created" } else { "webhook.updated" }.into();
                crate::ops::$name::insert_events(&mut tx, &[&audit]).await?;
                tx.commit().await?;
                Ok(existed.is_none())
            }

            fn select_webhooks() -> String {
                format!("SELECT tenant, id, url, secret, events{JSON_OUT} AS events, created_at, updated_at FROM webhooks")
            }

            pub(super) async fn get(pool: &Pool<Db>, tenant: &TenantId, id: &str) -> Result<Option<Webhook>, PersistenceError> {
                let row: Option<WebhookRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!("{} WHERE tenant = $1 AND id = $2", select_webhooks())))
                    .bind(tenant.as_str())
                    .bind(id)
                    .fetch_optional(pool)
                    .await?;
                row.map(WebhookRow::into_domain).transpose()
            }

            pub(super) async fn list(pool: &Pool<Db>, tenant: &TenantId) -> Result<Vec<Webhook>, PersistenceError> {
                let rows: Vec<WebhookRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!("{} WHERE tenant = $1 ORDER BY id", select_webhooks())))
                    .bind(tenant.as_str())
                    .fetch_all(pool)
                    .await?;
                rows.into_iter().map(WebhookRow::into_domain).collect()
            }

            pub(super) async fn delete(pool: &Pool<Db>, tenant: &TenantId, id: &str, audit: &DomainEvent) -> Result<bool, PersistenceError> {
                let mut tx = pool.begin().await?;
                // The tenant's event lock before the webhook's row, as a commit takes them (its
                // trigger queues deliveries, whose foreign key locks the webhook's row). The
                // other way round, a commit of an event this webhook subscribes to deadlocked
                // with the delete on PostgreSQL (one of them failed after `deadlock_timeout`).
                crate::ops::$name::lock_events(&mut tx, tenant.as_str()).await?;
                let gone = sqlx::query("DELETE FROM webhooks WHERE tenant = $1 AND id = $2")
                    .bind(tenant.as_str())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                // Its patterns and deliveries go with it (`ON DELETE CASCADE`).
                if gone > 0 {
                    crate::ops::$name::insert_events(&mut tx, &[audit]).await?;
                }
                tx.commit().await?;
                Ok(gone > 0)
            }

            pub(super) async fn redeliver(
                pool: &Pool<Db>,
                tenant: &TenantId,
                id: &str,
                seq: Option<i64>,
                at: i64,
                audit: &DomainEvent,
            ) -> Result<u64, PersistenceError> {
                let mut tx = pool.begin().await?;
                // One finished delivery (dead or delivered), or every dead one.
                let which = if seq.is_some() { "state <> 'pending' AND event_seq = $4" } else { "state = 'dead' AND $4 IS NULL" };
                let n = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE webhook_outbox SET state = 'pending', attempts = 0, next_attempt_at = $1, updated_at = $1, lease = NULL \
                     WHERE tenant = $2 AND webhook_id = $3 AND {which}"
                )))
                .bind(at)
                .bind(tenant.as_str())
                .bind(id)
                .bind(seq)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n > 0 {
                    let mut audit = audit.clone();
                    audit.attrs.push(("count".into(), n.to_string()));
                    crate::ops::$name::insert_events(&mut tx, &[&audit]).await?;
                }
                tx.commit().await?;
                Ok(n)
            }

            pub(super) async fn pause(pool: &Pool<Db>, tenant: &str, id: &str, url: &str, until: i64) -> Result<u64, PersistenceError> {
                // Only while the webhook still points at `url`, read under a share lock
                // (PostgreSQL): a replacement that commits first is waited for and wins.
                let r = sqlx::query(concat!(
                    "UPDATE webhook_outbox SET next_attempt_at = $1 \
                     WHERE tenant = $2 AND webhook_id = $3 AND state = 'pending' AND lease IS NULL AND next_attempt_at < $1 \
                     AND EXISTS (SELECT 1 FROM webhooks w WHERE w.tenant = $2 AND w.id = $3 AND w.url = $4",
                    $share_lock,
                    ")"
                ))
                .bind(until)
                .bind(tenant)
                .bind(id)
                .bind(url)
                .execute(pool)
                .await?;
                Ok(r.rows_affected())
            }

            pub(super) async fn stats(pool: &Pool<Db>, tenant: &TenantId, id: &str) -> Result<WebhookStats, PersistenceError> {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT state, COUNT(*) FROM webhook_outbox WHERE tenant = $1 AND webhook_id = $2 GROUP BY state",
                )
                .bind(tenant.as_str())
                .bind(id)
                .fetch_all(pool)
                .await?;
                let mut s = WebhookStats::default();
                for (state, n) in rows {
                    match DeliveryState::parse(&state)? {
                        DeliveryState::Pending => s.pending = n,
                        DeliveryState::Delivered => s.delivered = n,
                        DeliveryState::Dead => s.dead = n,
                    }
                }
                Ok(s)
            }

            pub(super) async fn deliveries(
                pool: &Pool<Db>,
                tenant: &TenantId,
                id: &str,
                limit: i64,
            ) -> Result<Vec<DeliveryRecord>, PersistenceError> {
                let rows: Vec<OutboxRow> = sqlx::query_as(
                    "SELECT o.event_seq, e.kind, o.state, o.attempts, o.next_attempt_at, o.last_status, o.last_error, o.updated_at \
                     FROM webhook_outbox o JOIN events e ON e.tenant = o.tenant AND e.seq = o.event_seq \
                     WHERE o.tenant = $1 AND o.webhook_id = $2 ORDER BY o.event_seq DESC LIMIT $3",
                )
                .bind(tenant.as_str())
                .bind(id)
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.into_iter()
                    .map(|r| {
                        Ok(DeliveryRecord {
                            event_seq: r.event_seq,
                            kind: r.kind,
                            state: DeliveryState::parse(&r.state)?,
                            attempts: r.attempts,
                            next_attempt_at: r.next_attempt_at,
                            last_status: r.last_status,
                            last_error: r.last_error,
                            updated_at: r.updated_at,
                        })
                    })
                    .collect()
            }

            pub(super) async fn claim(
                pool: &Pool<Db>,
                now: i64,
                lease_until: i64,
                lease: &str,
                limit: i64,
                shares: &ClaimShares<'_>,
                skip: &[(&str, &str, &str)],
            ) -> Result<Vec<Delivery>, PersistenceError> {
                // Webhooks `w` whose rows are left alone (open circuits) while they still point
                // at the URL that failed, as `$first, $first+1, …`.
                let not_skipped = |first: usize| {
                    if skip.is_empty() {
                        return String::new();
                    }
                    let rows: Vec<String> =
                        (0..skip.len()).map(|i| format!("(${}, ${}, ${})", first + 3 * i, first + 3 * i + 1, first + 3 * i + 2)).collect();
                    format!(" AND (w.tenant, w.id, w.url) NOT IN (VALUES {})", rows.join(", "))
                };
                // Every statement goes webhook by webhook, each a seek in `webhook_outbox_next`
                // (tenant, webhook_id, state, next_attempt_at, event_seq): a claim costs the
                // number of webhooks, not the due backlog (a whole-backlog scan took about a
                // second at 200k due rows, and held SQLite's write lock meanwhile).
                // First a read of what is due (an idle outbox costs no write transaction:
                // SQLite's write lock is the group-commit writer's): each webhook's oldest due
                // rows, `per_webhook` of them at most (`$candidates`, per backend; `{skip}`
                // filters the webhooks). Then tenants take turns: a row's rank is its place
                // among its tenant's candidates plus the sends that tenant has in flight, rows
                // ranked past `per_tenant` wait, and the lowest ranks go first (oldest first
                // among equals). A tenant with a large or slow backlog gets no more than its
                // share of the slots that free up while another tenant has deliveries due.
                let candidates = $candidates.replace("{skip}", &not_skipped(5));
                let first_busy = 5 + 3 * skip.len();
                let (busy_join, busy) = if shares.in_flight.is_empty() {
                    (String::new(), "0")
                } else {
                    let rows: Vec<String> =
                        (0..shares.in_flight.len()).map(|i| format!("(${}, ${})", first_busy + 2 * i, first_busy + 2 * i + 1)).collect();
                    (format!(" LEFT JOIN (VALUES {}) f ON f.column1 = c.tenant", rows.join(", ")), "COALESCE(f.column2, 0)")
                };
                let due = format!(
                    "SELECT c.tenant, c.webhook_id, c.event_seq FROM \
                     (SELECT c0.tenant, c0.webhook_id, c0.event_seq, c0.next_attempt_at, \
                      ROW_NUMBER() OVER (PARTITION BY c0.tenant ORDER BY c0.next_attempt_at, c0.event_seq) AS turn \
                      FROM ({candidates}) c0) c{busy_join} \
                     WHERE c.turn + {busy} <= $4 ORDER BY c.turn + {busy}, c.next_attempt_at, c.event_seq LIMIT $2"
                );
                let mut q = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(due))
                    .bind(now)
                    .bind(limit)
                    .bind(shares.per_webhook.map_or(i64::MAX, i64::from))
                    .bind(shares.per_tenant.map_or(i64::MAX / 2, i64::from));
                for (t, w, u) in skip {
                    q = q.bind(*t).bind(*w).bind(*u);
                }
                for (t, n) in shares.in_flight {
                    q = q.bind(*t).bind(i64::from(*n));
                }
                let keys = q.fetch_all(pool).await?;
                if keys.is_empty() {
                    return Ok(Vec::new());
                }
                // Then the claim, by primary key. The condition is re-checked on rows another
                // node claimed meanwhile (PostgreSQL re-evaluates it after waiting for the row
                // lock), so no row is claimed twice within one lease. The claim and the read of
                // what it claimed are one transaction: a read that fails or times out (the
                // caller's statement timeout drops it) rolls the claim back, instead of leaving
                // rows leased to nobody until the lease lapses, with an attempt counted that was
                // never made.
                let mut tx = pool.begin().await?;
                let values: Vec<String> =
                    (0..keys.len()).map(|i| format!("(${}, ${}, ${})", 4 + 3 * i, 5 + 3 * i, 6 + 3 * i)).collect();
                let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE webhook_outbox SET lease = $1, next_attempt_at = $2, attempts = attempts + 1 \
                     WHERE state = 'pending' AND next_attempt_at <= $3 AND (tenant, webhook_id, event_seq) IN (VALUES {})",
                    values.join(", ")
                )))
                .bind(lease)
                .bind(lease_until)
                .bind(now);
                for (t, w, seq) in &keys {
                    q = q.bind(t.as_str()).bind(w.as_str()).bind(*seq);
                }
                q.execute(&mut *tx).await?;
                let rows: Vec<ClaimedRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT o.webhook_id, w.url, w.secret, o.attempts, \
                     e.seq, e.tenant, e.entity, e.entity_id, e.kind, e.actor, e.reason, e.ts, e.attrs{JSON_OUT} AS attrs \
                     FROM webhook_outbox o \
                     JOIN webhooks w ON w.tenant = o.tenant AND w.id = o.webhook_id \
                     JOIN events e ON e.tenant = o.tenant AND e.seq = o.event_seq \
                     WHERE o.lease = $1 AND o.state = 'pending' ORDER BY e.seq"
                )))
                .bind(lease)
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                rows.into_iter()
                    .map(|r| {
                        let (seq, event) = r.event.into_domain()?;
                        Ok(Delivery {
                            webhook_id: r.webhook_id,
                            url: r.url,
                            secret: r.secret,
                            attempt: r.attempts,
                            event: StoredEvent { seq, event },
                        })
                    })
                    .collect()
            }

            pub(super) async fn finish(
                pool: &Pool<Db>,
                tenant: &TenantId,
                webhook_id: &str,
                seq: i64,
                lease: &str,
                outcome: &Outcome,
                now: i64,
            ) -> Result<bool, PersistenceError> {
                if let Outcome::Deferred { at, url } = outcome {
                    // The URL is read under a share lock (PostgreSQL): a replacement committing
                    // meanwhile is waited for, so the pause cannot land after it.
                    let r = sqlx::query(concat!(
                        "UPDATE webhook_outbox SET attempts = attempts - 1, lease = NULL, next_attempt_at = \
                         CASE WHEN EXISTS (SELECT 1 FROM webhooks w WHERE w.tenant = $2 AND w.id = $3 AND w.url = $6",
                        $share_lock,
                        ") THEN $1 ELSE $7 END \
                         WHERE tenant = $2 AND webhook_id = $3 AND event_seq = $4 AND lease = $5"
                    ))
                    .bind(*at)
                    .bind(tenant.as_str())
                    .bind(webhook_id)
                    .bind(seq)
                    .bind(lease)
                    .bind(url)
                    .bind(now)
                    .execute(pool)
                    .await?;
                    return Ok(r.rows_affected() > 0);
                }
                let (state, next, status, error) = match outcome {
                    Outcome::Deferred { .. } => unreachable!("handled above"),
                    Outcome::Delivered { status } => (DeliveryState::Delivered, now, Some(*status), None),
                    Outcome::Retry { at, status, error } => (DeliveryState::Pending, *at, *status, Some(clip(error))),
                    Outcome::Dead { status, error } => (DeliveryState::Dead, now, *status, Some(clip(error))),
                };
                let r = sqlx::query(
                    "UPDATE webhook_outbox SET state = $1, next_attempt_at = $2, last_status = $3, last_error = $4, \
                     updated_at = $5, lease = NULL \
                     WHERE tenant = $6 AND webhook_id = $7 AND event_seq = $8 AND lease = $9",
                )
                .bind(state.as_str())
                .bind(next)
                .bind(status.map(i32::from))
                .bind(error)
                .bind(now)
                .bind(tenant.as_str())
                .bind(webhook_id)
                .bind(seq)
                .bind(lease)
                .execute(pool)
                .await?;
                Ok(r.rows_affected() > 0)
            }

            /// Gives up at most `batch` pending deliveries not attempted (nor queued) since
            /// `before` and not leased (a paused row is not; a lease that lapsed before `before`
            /// counts as none): `dead` with `error`. The outer condition repeats the inner one:
            /// PostgreSQL re-checks it on a row that changed meanwhile (an attempt just made).
            pub(super) async fn expire(pool: &Pool<Db>, before: i64, now: i64, batch: i64, error: &str) -> Result<u64, PersistenceError> {
                let r = sqlx::query($expire).bind(error).bind(now).bind(before).bind(batch).execute(pool).await?;
                Ok(r.rows_affected())
            }

            /// Deletes at most `batch` finished deliveries last changed before `before`.
            pub(super) async fn purge(pool: &Pool<Db>, before: i64, batch: i64) -> Result<u64, PersistenceError> {
                let r = sqlx::query(
                    "DELETE FROM webhook_outbox WHERE (tenant, webhook_id, event_seq) IN \
                     (SELECT tenant, webhook_id, event_seq FROM webhook_outbox \
                      WHERE state <> 'pending' AND updated_at < $1 LIMIT $2)",
                )
                .bind(before)
                .bind(batch)
                .execute(pool)
                .await?;
                Ok(r.rows_affected())
            }
        }
    };
}

webhook_ops!(
    pg,
    sqlx::Postgres,
    json_in = "::json",
    json_out = "::text",
    candidates = "SELECT d.tenant, d.webhook_id, d.event_seq, d.next_attempt_at FROM webhooks w CROSS JOIN LATERAL \
           (SELECT x.tenant, x.webhook_id, x.event_seq, x.next_attempt_at FROM webhook_outbox x \
            WHERE x.tenant = w.tenant AND x.webhook_id = w.id AND x.state = 'pending' AND x.next_attempt_at <= $1 \
            ORDER BY x.next_attempt_at, x.event_seq LIMIT $3) d \
           WHERE TRUE{skip}",
    expire = "UPDATE webhook_outbox SET state = 'dead', last_error = $1, updated_at = $2, lease = NULL \
              WHERE (tenant, webhook_id, event_seq) IN \
              (SELECT tenant, webhook_id, event_seq FROM webhook_outbox \
               WHERE state = 'pending' AND updated_at < $3 AND (lease IS NULL OR next_attempt_at <= $3) LIMIT $4) \
              AND state = 'pending' AND updated_at < $3 AND (lease IS NULL OR next_attempt_at <= $3)",
    share_lock = " FOR SHARE"
);
// SQLite has no LATERAL: a correlated `rowid IN (… LIMIT)` per webhook is its seek.
webhook_ops!(
    sqlite,
    sqlx::Sqlite,
    json_in = "",
    json_out = "",
    candidates = "SELECT o.tenant, o.webhook_id, o.event_seq, o.next_attempt_at FROM webhooks w, webhook_outbox o \
           WHERE o.rowid IN (SELECT x.rowid FROM webhook_outbox x \
            WHERE x.tenant = w.tenant AND x.webhook_id = w.id AND x.state = 'pending' AND x.next_attempt_at <= $1 \
            ORDER BY x.next_attempt_at, x.event_seq LIMIT $3){skip}",
    // Without statistics SQLite prefers `webhook_outbox_due (state, …)`, which reads every
    // pending row: the inner search is pinned to the partial index, and the outer re-check's
    // columns are kept from driving an index (`+`), so the outer is a primary-key lookup.
    expire = "UPDATE webhook_outbox SET state = 'dead', last_error = $1, updated_at = $2, lease = NULL \
              WHERE (tenant, webhook_id, event_seq) IN \
              (SELECT tenant, webhook_id, event_seq FROM webhook_outbox INDEXED BY webhook_outbox_untouched \
               WHERE state = 'pending' AND updated_at < $3 AND (lease IS NULL OR next_attempt_at <= $3) LIMIT $4) \
              AND +state = 'pending' AND +updated_at < $3 AND (lease IS NULL OR +next_attempt_at <= $3)",
    // Writes are serial in SQLite: a statement reads the URL as the last commit left it.
    share_lock = ""
);

impl SqlStore {
    /// Creates or replaces a webhook (its patterns too); returns true when it was created.
    /// Deliveries already in the outbox keep going to the webhook under its new URL and secret.
    /// Appends `webhook.created` or `webhook.updated` (by `actor`, with the URL and patterns,
    /// never the secret) to the event log in the same transaction.
    pub async fn put_webhook(&self, w: &Webhook, actor: &str) -> Result<bool, PersistenceError> {
        let (db, audit, w) = (self.db().clone(), audit_event(w, actor, "webhook.updated"), w.clone());
        self.bounded(async move { on_backend!(&db, webhooks::put(&w, &audit)) }).await
    }

    /// One webhook.
    pub async fn webhook(&self, tenant: &TenantId, id: &str) -> Result<Option<Webhook>, PersistenceError> {
        let (db, tenant, id) = (self.db().clone(), tenant.clone(), id.to_owned());
        self.bounded(async move { on_backend!(&db, webhooks::get(&tenant, &id)) }).await
    }

    /// The tenant's webhooks, by id.
    pub async fn webhooks(&self, tenant: &TenantId) -> Result<Vec<Webhook>, PersistenceError> {
        let (db, tenant) = (self.db().clone(), tenant.clone());
        self.bounded(async move { on_backend!(&db, webhooks::list(&tenant)) }).await
    }

    /// Deletes a webhook with its pending and past deliveries, appending `webhook.deleted` (by
    /// `actor`, at `at`) in the same transaction; returns false if there was none.
    pub async fn delete_webhook(&self, tenant: &TenantId, id: &str, actor: &str, at: i64) -> Result<bool, PersistenceError> {
        let audit = DomainEvent {
            tenant: tenant.clone(),
            entity: EntityKind::Webhook,
            entity_id: id.to_owned(),
            kind: "webhook.deleted".into(),
            actor: actor.to_owned(),
            reason: None,
            ts: at,
            attrs: Vec::new(),
        };
        let (db, tenant, id) = (self.db().clone(), tenant.clone(), id.to_owned());
        self.bounded(async move { on_backend!(&db, webhooks::delete(&tenant, &id, &audit)) }).await
    }

    /// Queues deliveries of a webhook again, as new (attempt count reset, due at `at`): the
    /// one of event `seq` if it is finished (dead or delivered), or every dead one. Appends
    /// `webhook.redelivered` (by `actor`, with the count) in the same transaction when any
    /// was. Returns how many; the caller checks that the webhook exists.
    pub async fn redeliver_webhook(&self, tenant: &TenantId, id: &str, seq: Option<i64>, actor: &str, at: i64) -> Result<u64, PersistenceError> {
        let audit = DomainEvent {
            tenant: tenant.clone(),
            entity: EntityKind::Webhook,
            entity_id: id.to_owned(),
            kind: "webhook.redelivered".into(),
            actor: actor.to_owned(),
            reason: None,
            ts: at,
            attrs: seq.map(|s| ("seq".to_owned(), s.to_string())).into_iter().collect(),
        };
        let (db, tenant, id) = (self.db().clone(), tenant.clone(), id.to_owned());
        self.bounded(async move { on_backend!(&db, webhooks::redeliver(&tenant, &id, seq, at, &audit)) }).await
    }

    /// Delivery counts of one webhook.
    pub async fn webhook_stats(&self, tenant: &TenantId, id: &str) -> Result<WebhookStats, PersistenceError> {
        let (db, tenant, id) = (self.db().clone(), tenant.clone(), id.to_owned());
        self.bounded(async move { on_backend!(&db, webhooks::stats(&tenant, &id)) }).await
    }

    /// The newest `limit` deliveries of one webhook, newest first.
    pub async fn webhook_deliveries(&self, tenant: &TenantId, id: &str, limit: u32) -> Result<Vec<DeliveryRecord>, PersistenceError> {
        let (db, tenant, id) = (self.db().clone(), tenant.clone(), id.to_owned());
        self.bounded(async move { on_backend!(&db, webhooks::deliveries(&tenant, &id, i64::from(limit))) }).await
    }

    /// Moves the waiting deliveries of a webhook whose circuit opened to `until` (attempts
    /// unchanged), so that a paused backlog does not stay at the front of every claim's scan;
    /// only while the webhook still points at `url`, the endpoint that failed (a replacement
    /// made first, typically a fixed URL, wins: its deliveries stay due).
    pub async fn pause_webhook_deliveries(&self, tenant: &str, id: &str, url: &str, until: i64) -> Result<u64, PersistenceError> {
        let (db, tenant, id, url) = (self.db().clone(), tenant.to_owned(), id.to_owned(), url.to_owned());
        self.bounded(async move { on_backend!(&db, webhooks::pause(&tenant, &id, &url, until)) }).await
    }

    /// Claims up to `limit` deliveries due at `now` (every tenant), shared out as `shares`
    /// says (at most `per_webhook` of any one webhook, its oldest; tenants in turn, none past
    /// `per_tenant` with what it has in flight), except those of the webhooks in `skip`
    /// (`(tenant, webhook id, url)`: endpoints whose circuit is open or that have as many sends
    /// in flight as they may, while the webhook still points at that URL): they are leased to
    /// `lease` until `lease_until`, their attempt counted, and returned oldest event first.
    pub async fn claim_webhook_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        lease: &str,
        limit: u32,
        shares: &ClaimShares<'_>,
        skip: &[(&str, &str, &str)],
    ) -> Result<Vec<Delivery>, PersistenceError> {
        let (db, lease) = (self.db().clone(), lease.to_owned());
        let skip: Vec<[String; 3]> = skip.iter().map(|&(t, w, u)| [t.to_owned(), w.to_owned(), u.to_owned()]).collect();
        let in_flight: Vec<(String, u32)> = shares.in_flight.iter().map(|&(t, n)| (t.to_owned(), n)).collect();
        let (per_webhook, per_tenant) = (shares.per_webhook, shares.per_tenant);
        self.bounded(async move {
            let skip: Vec<(&str, &str, &str)> = skip.iter().map(|[t, w, u]| (t.as_str(), w.as_str(), u.as_str())).collect();
            let in_flight: Vec<(&str, u32)> = in_flight.iter().map(|(t, n)| (t.as_str(), *n)).collect();
            let shares = ClaimShares { per_webhook, per_tenant, in_flight: &in_flight };
            on_backend!(&db, webhooks::claim(now, lease_until, &lease, i64::from(limit), &shares, &skip))
        })
        .await
    }

    /// Records how a claimed delivery ended. Returns false when the lease was lost meanwhile
    /// (the row was claimed again, or the webhook deleted); the outcome is then dropped.
    pub async fn finish_webhook_delivery(
        &self,
        tenant: &TenantId,
        webhook_id: &str,
        seq: i64,
        lease: &str,
        outcome: &Outcome,
        now: i64,
    ) -> Result<bool, PersistenceError> {
        let (db, tenant, webhook_id) = (self.db().clone(), tenant.clone(), webhook_id.to_owned());
        let (lease, outcome) = (lease.to_owned(), outcome.clone());
        self.bounded(async move { on_backend!(&db, webhooks::finish(&tenant, &webhook_id, seq, &lease, &outcome, now)) }).await
    }

    /// Gives up pending deliveries (every tenant) not attempted since `before`, nor queued
    /// since (an endpoint whose circuit stays open gets one probe per pause, so the rest of its
    /// backlog would wait for ever), and not leased (paused ones are given up too; a lease
    /// that lapsed before `before` counts as none). They become `dead` with
    /// `last_error` saying so, and can be sent again with a redelivery. In batches of
    /// `purge_batch`, as the purge. Returns how many.
    pub async fn expire_webhook_deliveries(&self, before: i64, now: i64) -> Result<u64, PersistenceError> {
        let error = format!("gave up: not attempted for {}", span((now - before).max(0)));
        self.in_batches(|db, batch| {
            let error = error.clone();
            async move { on_backend!(&db, webhooks::expire(before, now, batch, &error)) }
        })
        .await
    }

    /// Deletes delivered and dead deliveries last changed before `before` (every tenant), in
    /// batches of `purge_batch` (as the location history): one DELETE of a large backlog would
    /// outlast the statement timeout on every run, and on SQLite hold the write lock that
    /// commits wait for. On an error the batches already deleted stay deleted.
    pub async fn purge_webhook_deliveries(&self, before: i64) -> Result<u64, PersistenceError> {
        self.in_batches(|db, batch| async move { on_backend!(&db, webhooks::purge(before, batch)) }).await
    }

    /// Runs `step` (a statement touching at most `purge_batch` rows, each bounded by the
    /// statement timeout) until it touches fewer; returns how many rows it touched in all.
    async fn in_batches<Fut>(&self, step: impl Fn(crate::db::Db, i64) -> Fut) -> Result<u64, PersistenceError>
    where
        Fut: std::future::Future<Output = Result<u64, PersistenceError>> + Send + 'static,
    {
        let batch = i64::try_from(self.options().purge_batch).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let n = self.bounded(step(self.db().clone(), batch)).await?;
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_split_into_prefixes() {
        assert_eq!(prefix_of("order.*"), Some("order."));
        assert_eq!(prefix_of("*"), Some(""));
        assert_eq!(prefix_of("zone.enter"), None);
    }

    #[test]
    fn errors_are_clipped_on_a_char_boundary() {
        let long = "é".repeat(400);
        let c = clip(&long);
        assert!(c.len() <= MAX_ERROR_LEN && c.len() >= MAX_ERROR_LEN - 1);
        assert!(long.starts_with(c));
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn spans_read_in_whole_units() {
        assert_eq!(span(72 * 3_600_000 + 5), "72 h");
        assert_eq!(span(5 * 60_000), "5 min");
        assert_eq!(span(2_500), "2 s");
    }
}
