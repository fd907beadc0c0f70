//! Webhooks: the HTTP API that manages subscriptions and the worker that delivers events.
//!
//! - `PUT /v1/webhooks/{id}` `{url, events[], secret}` creates (201) or replaces (200) a
//!   subscription; `GET /v1/webhooks`, `GET /v1/webhooks/{id}` (with delivery counts),
//!   `DELETE /v1/webhooks/{id}` (204; pending deliveries are dropped), and
//!   `GET /v1/webhooks/{id}/deliveries?limit=` (newest first: state, attempts, last status and
//!   error), and `POST /v1/webhooks/{id}/redeliver` `{}` or `{"seq": N}` (send dead deliveries,
//!   or one finished delivery, again). Dispatchers and admins of the tenant; the secret is never
//!   read back.
//! - `events` holds event kinds of the log (`order.delivered`, `zone.enter`, …) or patterns
//!   ending in `*` (`order.*`, `zone.*`, `*`). A webhook gets the events appended after it was
//!   created.
//!
//! Delivery ([`spawn_delivery`]): the outbox rows are written by the same transaction as the
//! events (see `hexfleet_persistence::webhooks`), so nothing durable is missed. Every poll the
//! worker claims due rows under a lease (the request timeout plus a margin), POSTs each as JSON
//! and records the outcome: 2xx is delivered; anything else (another status, a timeout, a
//! refused connection, a redirect, which is not followed) is retried with exponential backoff
//! and jitter until `max_attempts`, then the row is dead. Delivery is at least once and not
//! ordered across retries: receivers dedupe and order on `seq` (also in `X-Hexfleet-Delivery`).
//!
//! Destinations: unless `allow_private` is set (`--webhook-allow-private`), a webhook may not
//! reach loopback, private (RFC 1918, unique-local), link-local (cloud metadata), CGNAT,
//! unspecified, multicast or documentation addresses: a URL naming one is refused at `PUT`, and
//! a host name is resolved by [`PublicOnly`] at every connection, which refuses it if any
//! address it resolves to is one of those (so DNS cannot be used to reach them either). This
//! keeps one tenant's dispatcher from probing the operator's internal network (SSRF).
//!
//! A webhook whose endpoint fails `breaker_after` times in a row is paused ([`Breakers`]):
//! its rows are not claimed for a cool-down (no attempt counted), then one delivery probes it.
//! So a dead endpoint neither burns its retries nor holds up other webhooks' batches.
//!
//! Signature: `X-Hexfleet-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! A receiver recomputes it over the raw body and rejects old `t` values (replays). For
//! receivers that check the body alone (GitHub's scheme), `X-Hexfleet-Signature-256:
//! sha256=<hex HMAC-SHA256(secret, body)>` too; the body's `id` and `ts` then tell a replay.
//!
//! Metrics: `hexfleet_webhook_deliveries_total{outcome="delivered"|"retry"|"dead"|"deferred"}`,
//! `hexfleet_webhook_circuit_opened_total` and `hexfleet_webhook_delivery_seconds`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use futures_util::StreamExt as _;
use hexfleet_actors::domain::{Ms, valid_id};
use hexfleet_persistence::SqlStore;
use hexfleet_persistence::webhooks::{ClaimShares, Delivery, DeliveryRecord, Outcome, Webhook, WebhookStats};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, Role};
use crate::error::ApiError;
use crate::server::AppState;

type State = web::Data<AppState>;

/// Most patterns one webhook may list.
pub const MAX_PATTERNS: usize = 32;
/// Longest accepted URL, in characters.
pub const MAX_URL_LEN: usize = 2048;
/// Secret length bounds (characters, as JSON Schema's `maxLength` counts them). The secret protects the tenant's own receiver, which may
/// have one already: any length is taken (32 random bytes are advised); 16 at least refused
/// the short secrets test receivers and older integrations use.
pub const SECRET_LEN: std::ops::RangeInclusive<usize> = 1..=256;

/// How the delivery worker behaves.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// How often due deliveries are looked for.
    pub poll: Duration,
    /// Per-request timeout (connect, send, and wait for the status).
    pub timeout: Duration,
    /// Attempts before a delivery is given up (dead).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles each time up to `max_backoff`, ±20 % jitter.
    pub backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Deliveries in flight at once. A claim takes only as many as there are free slots, and
    /// every claimed delivery is sent at once, so a claim's lease (timeout + 30 s) always
    /// outlasts its sends.
    pub concurrency: usize,
    /// Deliveries in flight at once to one webhook (and URL): a slow endpoint holds no more
    /// slots than this, and the other webhooks' deliveries go on around it.
    pub per_webhook: usize,
    /// Deliveries in flight at once for one tenant, over its webhooks. Free slots go to the
    /// tenants with the fewest in flight (then the oldest delivery), so a tenant with many
    /// slow endpoints or a large backlog leaves the rest to the others.
    pub per_tenant: usize,
    /// Consecutive failures after which an endpoint's circuit opens ([`Breakers`]).
    pub breaker_after: u32,
    /// First pause of an open circuit; doubles after each failed probe, up to
    /// [`MAX_BREAKER_COOLDOWN`].
    pub breaker_cooldown: Duration,
    /// A pending delivery not attempted (nor queued) for this long is given up (`dead`, and
    /// sent again only by a redelivery). An endpoint whose circuit stays open is probed one
    /// delivery per pause, so without this its backlog would grow for as long as it is down.
    /// Nothing is given up in the worker's first `give_up_after` or hour, whichever is
    /// shorter: after an outage of the service itself, what waited is attempted first. Keep it
    /// above `max_backoff` × 1.2, or a retry may be given up before its time.
    pub give_up_after: Duration,
    /// Delivered and dead rows are purged after this long.
    pub keep_finished: Duration,
    /// How often deliveries are given up and purged.
    pub housekeeping: Duration,
    /// Let webhooks reach loopback and private networks (on-premises receivers, tests).
    pub allow_private: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            poll: Duration::from_millis(250),
            timeout: Duration::from_secs(10),
            max_attempts: 15,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(3600),
            concurrency: 16,
            per_webhook: 4,
            per_tenant: 8,
            breaker_after: 5,
            breaker_cooldown: Duration::from_secs(30),
            give_up_after: Duration::from_secs(72 * 3600),
            keep_finished: Duration::from_secs(7 * 24 * 3600),
            housekeeping: Duration::from_secs(3600),
            allow_private: false,
        }
    }
}

/// Body of `PUT /v1/webhooks/{id}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookPutReq {
    /// `http://` or `https://` URL the events are POSTed to.
    #[schema(example = "https://example.com/hooks/hexfleet", max_length = 2048, pattern = "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\\s\\u0000-\\u001F\\u007F-\\u009F]+[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub url: String,
    /// Event kinds or patterns: `order.delivered`, `order.*`, `zone.enter`, `*`.
    #[schema(example = json!(["order.*", "zone.enter"]), min_items = 1, max_items = 32)]
    pub events: Vec<String>,
    /// HMAC-SHA256 key for `X-Hexfleet-Signature` and `X-Hexfleet-Signature-256`, 1 to 256
    /// characters, no control characters.
    #[schema(min_length = 1, max_length = 256, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub secret: String,
}

/// Delivery counts of a webhook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookStatsDto {
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
}

/// A webhook as the API shows it (the secret is never shown).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookDto {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Present on single-webhook answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<WebhookStatsDto>,
}

/// `GET /v1/webhooks`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookListDto {
    pub items: Vec<WebhookDto>,
}

/// One delivery of `GET /v1/webhooks/{id}/deliveries`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryDto {
    pub seq: i64,
    pub kind: String,
    /// `pending`, `delivered` or `dead`.
    pub state: String,
    pub attempts: i32,
    /// When a pending delivery is next attempted (Unix ms).
    pub next_attempt_at: Option<i64>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub updated_at: i64,
}

/// `GET /v1/webhooks/{id}/deliveries`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryListDto {
    pub items: Vec<DeliveryDto>,
}

/// The JSON body POSTed for one event.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct WebhookPayload {
    /// `<tenant>:<seq>`: the same for every retry (dedupe on it).
    pub id: String,
    /// Position in the tenant's event log (`GET /v1/events?since=`).
    pub seq: i64,
    pub tenant: String,
    pub webhook_id: String,
    /// e.g. `order.delivered`, `zone.enter`.
    pub kind: String,
    /// `order`, `courier`, `zone` or `webhook`.
    pub entity: String,
    pub entity_id: String,
    /// Who caused it.
    pub actor: String,
    pub reason: Option<String>,
    /// When it happened (Unix ms).
    pub ts: i64,
    #[schema(value_type = Object)]
    pub attrs: serde_json::Map<String, serde_json::Value>,
}

impl WebhookPayload {
    fn of(d: &Delivery) -> Self {
        let e = &d.event.event;
        WebhookPayload {
            id: format!("{}:{}", e.tenant, d.event.seq),
            seq: d.event.seq,
            tenant: e.tenant.to_string(),
            webhook_id: d.webhook_id.clone(),
            kind: e.kind.clone(),
            entity: e.entity.as_str().to_owned(),
            entity_id: e.entity_id.clone(),
            actor: e.actor.clone(),
            reason: e.reason.clone(),
            ts: e.ts,
            attrs: e.attrs.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
        }
    }
}

/// `t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, unix_s: i64, body: &[u8]) -> String {
    format!("t={unix_s},v1={}", hmac_hex(secret, &[unix_s.to_string().as_bytes(), b".", body]))
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn body_signature(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hmac_hex(secret, &[body]))
}

/// Hex HMAC-SHA256 under `secret` of `parts`, one after the other.
fn hmac_hex(secret: &str, parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// [`valid_pattern`] as a regular expression, for the OpenAPI document (with at most 64 bytes).
pub const EVENT_PATTERN: &str = r"^(\*|[a-z0-9_]+(\.[a-z0-9_]+)*(\.\*)?)$";

/// Checks one subscribed pattern: `*`, or dotted lowercase words, optionally ending in `.*`.
fn valid_pattern(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    let body = p.strip_suffix(".*").unwrap_or(p);
    !body.is_empty()
        && p.len() <= 64
        && body.split('.').all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
}

/// Whether a webhook may connect to `ip` when private destinations are not allowed.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF 192.0.0/24
                || (a == 198 && (18..20).contains(&b)) // benchmarking 198.18/15
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_loopback() || v6.is_unspecified() {
                return false;
            }
            // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d) carry an IPv4 address.
            if let Some(v4) = v6.to_ipv4() {
                return is_public(IpAddr::V4(v4));
            }
            // 6to4 (2002::/16) embeds one too.
            if seg[0] == 0x2002 {
                let v4 = std::net::Ipv4Addr::new((seg[1] >> 8) as u8, seg[1] as u8, (seg[2] >> 8) as u8, seg[2] as u8);
                return is_public(IpAddr::V4(v4));
            }
            !(v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (seg[0] & 0xffc0) == 0xfe80 // link local fe80::/10
                || (seg[0] & 0xffc0) == 0xfec0 // site local fec0::/10 (deprecated)
                || (seg[0] == 0x0064 && seg[1] == 0xff9b) // NAT64 64:ff9b::/96 and 64:ff9b:1::/48
                || (seg[0] == 0x2001 && seg[1] == 0x0000) // Teredo 2001::/32
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)) // documentation
        }
    }
}

/// The address a URL names literally (`http://10.0.0.1/`, `http://[::1]/`), if it does.
fn literal_ip(u: &reqwest::Url) -> Option<std::net::IpAddr> {
    match u.host()? {
        url::Host::Ipv4(ip) => Some(ip.into()),
        url::Host::Ipv6(ip) => Some(ip.into()),
        url::Host::Domain(_) => None,
    }
}

/// A DNS resolver for webhook requests that refuses host names resolving to non-public
/// addresses (see the module doc). Every address must be public, so a name cannot mix one in.
#[derive(Debug)]
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                // The address stays in the server's log: the error reaches the tenant (a
                // delivery's `last_error`), who must not learn the internal network's layout.
                tracing::warn!(%host, ip = %bad.ip(), "webhook destination resolves to a non-public address; refused");
                return Err(format!("{host} resolves to an address webhooks may not reach (loopback, private or link-local)").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn validate(req: &WebhookPutReq, allow_private: bool) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::bad_request("invalid_webhook", m));
    // Characters, as the OpenAPI document's maxLength counts them.
    if req.url.chars().count() > MAX_URL_LEN {
        return bad(format!("url is longer than {MAX_URL_LEN} characters"));
    }
    if crate::dto::has_control_chars(&req.url) || crate::dto::has_control_chars(&req.secret) {
        return bad("url and secret may not contain control characters".into());
    }
    // As the OpenAPI document's pattern says: `http://` or `https://` first, no blanks (the
    // URL parser would forgive a leading space, `http:\\host` or `http:host`).
    let scheme_end = req.url.find("://").unwrap_or(0);
    if !matches!(req.url[..scheme_end].to_ascii_lowercase().as_str(), "http" | "https") || req.url.contains(char::is_whitespace) {
        return bad("url must start with http:// or https:// and hold no spaces".into());
    }
    match reqwest::Url::parse(&req.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            let literal = literal_ip(&u);
            let local_name = u.host_str().is_some_and(|h| h.eq_ignore_ascii_case("localhost") || h.to_ascii_lowercase().ends_with(".localhost"));
            if !allow_private && (literal.is_some_and(|ip| !is_public(ip)) || local_name) {
                return Err(ApiError::bad_request(
                    "forbidden_destination",
                    "webhooks may not reach loopback, private or link-local addresses on this server (see --webhook-allow-private)",
                ));
            }
        }
        Ok(_) => return bad("url must be an absolute http:// or https:// URL with a host".into()),
        Err(e) => return bad(format!("url: {e}")),
    }
    if req.events.is_empty() || req.events.len() > MAX_PATTERNS {
        return bad(format!("events must list 1 to {MAX_PATTERNS} kinds or patterns"));
    }
    if let Some(p) = req.events.iter().find(|p| !valid_pattern(p)) {
        return bad(format!("event pattern {p:?} is not a kind (`order.delivered`), a prefix pattern (`order.*`) or `*`"));
    }
    if !SECRET_LEN.contains(&req.secret.chars().count()) {
        return bad(format!("secret must be {} to {} characters", SECRET_LEN.start(), SECRET_LEN.end()));
    }
    Ok(())
}

fn webhook_id(raw: &str) -> Result<String, ApiError> {
    if valid_id(raw) { Ok(raw.to_owned()) } else { Err(ApiError::bad_request("bad_id", "invalid webhook id")) }
}

fn dto(w: Webhook, stats: Option<WebhookStats>) -> WebhookDto {
    WebhookDto {
        id: w.id,
        url: w.url,
        events: w.events,
        created_at: w.created_at,
        updated_at: w.updated_at,
        deliveries: stats.map(|s| WebhookStatsDto { pending: s.pending, delivered: s.delivered, dead: s.dead }),
    }
}

fn store_err(e: hexfleet_persistence::PersistenceError) -> ApiError {
    ApiError::from(hexfleet_actors::store::StoreError::from(e))
}

#[utoipa::path(put, path = "/v1/webhooks/{id}", params(("id" = String, Path)), request_body = WebhookPutReq, responses((status = 201, body = WebhookDto), (status = 200, body = WebhookDto), (status = 400), (status = 403), (status = 503)), security(("bearer" = [])))]
pub(crate) async fn put_webhook(st: State, auth: Auth, path: web::Path<String>, body: web::Json<WebhookPutReq>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = webhook_id(&path)?;
    let req = body.into_inner();
    validate(&req, st.webhooks_allow_private)?;
    let now = st.fleet.now_ms();
    let w = Webhook { tenant: auth.tenant.clone(), id, url: req.url, events: req.events, secret: req.secret, created_at: now, updated_at: now };
    let created = st.store.put_webhook(&w, &auth.who().to_string()).await.map_err(store_err)?;
    let stored = st.store.webhook(&w.tenant, &w.id).await.map_err(store_err)?.ok_or_else(|| ApiError::internal("webhook vanished"))?;
    let body = dto(stored, None);
    Ok(if created { HttpResponse::Created().json(body) } else { HttpResponse::Ok().json(body) })
}

#[utoipa::path(get, path = "/v1/webhooks", responses((status = 200, body = WebhookListDto), (status = 403)), security(("bearer" = [])))]
pub(crate) async fn list_webhooks(st: State, auth: Auth) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let items = st.store.webhooks(&auth.tenant).await.map_err(store_err)?.into_iter().map(|w| dto(w, None)).collect();
    Ok(HttpResponse::Ok().json(WebhookListDto { items }))
}

#[utoipa::path(get, path = "/v1/webhooks/{id}", params(("id" = String, Path)), responses((status = 200, body = WebhookDto), (status = 404)), security(("bearer" = [])))]
pub(crate) async fn get_webhook(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = webhook_id(&path)?;
    let w = st.store.webhook(&auth.tenant, &id).await.map_err(store_err)?.ok_or_else(|| ApiError::not_found(format!("webhook {id} not found")))?;
    let stats = st.store.webhook_stats(&auth.tenant, &id).await.map_err(store_err)?;
    Ok(HttpResponse::Ok().json(dto(w, Some(stats))))
}

#[utoipa::path(delete, path = "/v1/webhooks/{id}", params(("id" = String, Path)), responses((status = 204), (status = 404)), security(("bearer" = [])))]
pub(crate) async fn delete_webhook(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = webhook_id(&path)?;
    if st.store.delete_webhook(&auth.tenant, &id, &auth.who().to_string(), st.fleet.now_ms()).await.map_err(store_err)? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::not_found(format!("webhook {id} not found")))
    }
}

/// Body of `POST /v1/webhooks/{id}/redeliver`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeliverReq {
    /// The event (`seq`) of one finished delivery (dead or delivered) to send again; without it,
    /// every dead delivery of the webhook is sent again.
    #[serde(default, deserialize_with = "crate::dto::json_int")]
    pub seq: Option<i64>,
}

/// Answer of `POST /v1/webhooks/{id}/redeliver`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RedeliverDto {
    /// Deliveries queued again (pending, attempts from 0).
    pub requeued: u64,
}

/// Sends deliveries again after the receiver was fixed: dead ones (all, or one by `seq`) or a
/// delivered one by `seq`. They start over (attempts from 0) and are due at once. Recorded as
/// `webhook.redelivered` in the event log.
#[utoipa::path(post, path = "/v1/webhooks/{id}/redeliver", params(("id" = String, Path)), request_body = RedeliverReq,
    responses((status = 200, body = RedeliverDto), (status = 404, description = "no such webhook, or no finished delivery with that seq")),
    security(("bearer" = [])))]
pub(crate) async fn redeliver(st: State, auth: Auth, path: web::Path<String>, body: web::Json<RedeliverReq>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = webhook_id(&path)?;
    if st.store.webhook(&auth.tenant, &id).await.map_err(store_err)?.is_none() {
        return Err(ApiError::not_found(format!("webhook {id} not found")));
    }
    let seq = body.seq;
    let requeued = st.store.redeliver_webhook(&auth.tenant, &id, seq, &auth.who().to_string(), st.fleet.now_ms()).await.map_err(store_err)?;
    if let (Some(seq), 0) = (seq, requeued) {
        return Err(ApiError::not_found(format!(
            "webhook {id} has no dead or delivered delivery of event {seq} (a pending one is already queued)"
        )));
    }
    Ok(HttpResponse::Ok().json(RedeliverDto { requeued }))
}

#[derive(Debug, Deserialize)]
pub(crate) struct DeliveriesQuery {
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", params(("id" = String, Path), ("limit" = Option<i64>, Query, minimum = 0, maximum = 4_294_967_295_i64, description = "At most this many, newest first (default 100); above 1,000 is taken as 1,000, 0 as 1")), responses((status = 200, body = DeliveryListDto), (status = 404)), security(("bearer" = [])))]
pub(crate) async fn deliveries(st: State, auth: Auth, path: web::Path<String>, q: web::Query<DeliveriesQuery>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = webhook_id(&path)?;
    if st.store.webhook(&auth.tenant, &id).await.map_err(store_err)?.is_none() {
        return Err(ApiError::not_found(format!("webhook {id} not found")));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = st.store.webhook_deliveries(&auth.tenant, &id, limit).await.map_err(store_err)?.into_iter().map(delivery_dto).collect();
    Ok(HttpResponse::Ok().json(DeliveryListDto { items }))
}

fn delivery_dto(r: DeliveryRecord) -> DeliveryDto {
    use hexfleet_persistence::webhooks::DeliveryState;
    DeliveryDto {
        seq: r.event_seq,
        kind: r.kind,
        state: r.state.as_str().to_owned(),
        attempts: r.attempts,
        next_attempt_at: (r.state == DeliveryState::Pending).then_some(r.next_attempt_at),
        last_status: r.last_status,
        last_error: r.last_error,
        updated_at: r.updated_at,
    }
}

/// Wait after failed attempt number `attempt` (1-based): `backoff · 2^(attempt-1)`, capped,
/// scaled by `jitter` (0.8..1.2).
pub fn backoff_after(cfg: &WebhookConfig, attempt: u32, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let base = cfg.backoff.saturating_mul(1u32 << exp).min(cfg.max_backoff);
    base.mul_f64(jitter.clamp(0.8, 1.2))
}

/// A span in ms, to add to or subtract from a Unix-ms time (one too long for an `i64` is
/// taken as `i64::MAX / 4`, which cannot overflow either).
fn ms(d: Duration) -> Ms {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// What one attempt decided, before it is written back.
fn judge(cfg: &WebhookConfig, attempt: i32, now: Ms, result: Result<u16, String>) -> Outcome {
    let (status, error) = match result {
        Ok(s) if (200..300).contains(&s) => return Outcome::Delivered { status: s },
        Ok(s) => (Some(s), format!("HTTP {s}")),
        Err(e) => (None, e),
    };
    let attempt = u32::try_from(attempt.max(1)).unwrap_or(1);
    if attempt >= cfg.max_attempts {
        return Outcome::Dead { status, error };
    }
    let wait = backoff_after(cfg, attempt, 0.8 + 0.4 * rand::random::<f64>());
    Outcome::Retry { at: now + ms(wait), status, error }
}

/// The error chain of a failed request, on one line (reqwest's top level says little).
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() { "timed out".to_owned() } else { e.to_string() };
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

async fn send(client: &reqwest::Client, d: &Delivery, unix_s: i64, allow_private: bool) -> Result<u16, String> {
    if !allow_private {
        // Names go through `PublicOnly`; literal addresses never reach a resolver.
        let url = reqwest::Url::parse(&d.url).map_err(|e| format!("url: {e}"))?;
        if let Some(ip) = literal_ip(&url).filter(|ip| !is_public(*ip)) {
            return Err(format!("{ip} is not an address webhooks may reach"));
        }
    }
    let payload = WebhookPayload::of(d);
    let body = serde_json::to_vec(&payload).map_err(|e| e.to_string())?;
    let sig = signature(&d.secret, unix_s, &body);
    let body_sig = body_signature(&d.secret, &body);
    let resp = client
        .post(&d.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Hexfleet-Event", &d.event.event.kind)
        .header("X-Hexfleet-Delivery", payload.id)
        .header("X-Hexfleet-Attempt", d.attempt.to_string())
        .header("X-Hexfleet-Signature", sig)
        .header("X-Hexfleet-Signature-256", body_sig)
        .body(body)
        .send()
        .await
        .map_err(|e| describe(&e))?;
    Ok(resp.status().as_u16())
}

/// Longest pause of a failing endpoint.
pub const MAX_BREAKER_COOLDOWN: Duration = Duration::from_secs(600);

/// One webhook's circuit.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Circuit {
    /// Sending; `failures` in a row so far.
    Closed { failures: u32 },
    /// Paused until the instant; `pauses` in a row so far (the next pause doubles).
    /// `probe_out`: the pause is the wait for a probe's outcome.
    Open { until: Instant, pauses: u32, probe_out: bool },
    /// The pause ended at `since`: the next delivery claimed probes the endpoint.
    Probing { pauses: u32, since: Instant },
}

/// The delivery worker's circuit breakers, one per webhook and URL (`(tenant, id, url)`: a
/// webhook pointed at a new URL starts closed), on this node.
///
/// `breaker_after` failed attempts in a row open a webhook's circuit for `breaker_cooldown`:
/// its deliveries are not claimed meanwhile (they stay pending, no attempt counted). Then one
/// delivery probes the endpoint: success closes the circuit, failure opens it again for twice
/// as long (up to [`MAX_BREAKER_COOLDOWN`], or the cool-down if that is longer). So a dead
/// endpoint costs one attempt per pause instead of a batch of timeouts per poll, and other
/// webhooks' batches are not held up by it.
#[derive(Debug)]
pub struct Breakers {
    after: u32,
    cooldown: Duration,
    circuits: std::collections::HashMap<CircuitKey, Circuit>,
}

/// `(tenant, webhook id, url)`.
pub type CircuitKey = (String, String, String);

/// What the worker does with a claimed delivery.
#[derive(Debug, PartialEq)]
pub enum Admit {
    Send,
    /// Its circuit is open (or its probe is out): back to pending at the instant, uncounted.
    Defer(Instant),
}

impl Breakers {
    pub fn new(cfg: &WebhookConfig) -> Self {
        Breakers { after: cfg.breaker_after.max(1), cooldown: cfg.breaker_cooldown, circuits: Default::default() }
    }

    /// Webhooks whose circuit is open at `now` (not to be claimed).
    pub fn open(&mut self, now: Instant) -> Vec<CircuitKey> {
        for c in self.circuits.values_mut() {
            if let Circuit::Open { until, pauses, .. } = *c
                && until <= now
            {
                *c = Circuit::Probing { pauses, since: until };
            }
        }
        self.circuits.iter().filter(|(_, c)| matches!(c, Circuit::Open { .. })).map(|(k, _)| k.clone()).collect()
    }

    /// When the circuit of `key` closes again, if it is open.
    pub fn open_until(&self, key: &CircuitKey) -> Option<Instant> {
        match self.circuits.get(key) {
            Some(Circuit::Open { until, .. }) => Some(*until),
            _ => None,
        }
    }

    /// Whether to send a claimed delivery of `key` now. A probing circuit lets one delivery
    /// out; the others wait `probe_wait` (a request timeout) for its outcome.
    pub fn admit(&mut self, key: &CircuitKey, now: Instant, probe_wait: Duration) -> Admit {
        match self.circuits.get_mut(key) {
            None | Some(Circuit::Closed { .. }) => Admit::Send,
            Some(Circuit::Open { until, .. }) => Admit::Defer(*until),
            Some(c) => {
                let pauses = if let Circuit::Probing { pauses, .. } = *c { pauses } else { 0 };
                *c = Circuit::Open { until: now + probe_wait, pauses, probe_out: true };
                Admit::Send
            }
        }
    }

    /// Records the outcome of a delivery sent; returns the pause when it opened the circuit.
    pub fn record(&mut self, key: CircuitKey, ok: bool, now: Instant) -> Option<Duration> {
        let c = self.circuits.entry(key).or_insert(Circuit::Closed { failures: 0 });
        if ok {
            // A late success of a send made before the circuit opened does not close it: only
            // the probe does (a flaky endpoint would otherwise flap and never back off).
            if !matches!(c, Circuit::Open { probe_out: false, .. }) {
                *c = Circuit::Closed { failures: 0 };
            }
            return None;
        }
        let pauses = match *c {
            Circuit::Closed { failures } if failures + 1 < self.after => {
                *c = Circuit::Closed { failures: failures + 1 };
                return None;
            }
            Circuit::Closed { .. } => 0,
            Circuit::Open { pauses, probe_out: true, .. } => pauses + 1,
            // A send made before the circuit opened, failing late: already counted in.
            Circuit::Open { probe_out: false, .. } | Circuit::Probing { .. } => return None,
        };
        let pause = self.cooldown.saturating_mul(1u32 << pauses.min(16)).min(MAX_BREAKER_COOLDOWN.max(self.cooldown));
        *c = Circuit::Open { until: now + pause, pauses, probe_out: false };
        Some(pause)
    }

    /// Forgets closed circuits with no failures, and circuits whose probe nobody claimed for
    /// a long time (the webhook was deleted or points elsewhere): the map keeps only the
    /// webhooks that fail.
    fn tidy(&mut self, now: Instant) {
        self.circuits.retain(|_, c| match *c {
            Circuit::Closed { failures } => failures > 0,
            Circuit::Probing { since, .. } => now.saturating_duration_since(since) < MAX_BREAKER_COOLDOWN * 2,
            Circuit::Open { .. } => true,
        });
    }
}

/// Sends one claimed delivery (or defers it while its circuit is open) and records the outcome;
/// returns its key.
#[allow(clippy::too_many_arguments)]
async fn deliver(
    d: Delivery,
    key: CircuitKey,
    lease: String,
    client: &reqwest::Client,
    cfg: &WebhookConfig,
    store: &SqlStore,
    now: &(impl Fn() -> Ms + Send + Sync),
    breakers: &parking_lot::Mutex<Breakers>,
) -> CircuitKey {
    let started = Instant::now();
    let admitted = breakers.lock().admit(&key, started, cfg.timeout);
    let (outcome, opened) = match admitted {
        Admit::Defer(until) => {
            (Outcome::Deferred { at: now() + ms(until.saturating_duration_since(started)), url: d.url.clone() }, None)
        }
        Admit::Send => {
            // The signature's `t` is the wall clock now (receivers compare it with theirs), not
            // the fleet clock, which does not follow a wall-clock step after start.
            let unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            let result = send(client, &d, unix_s, cfg.allow_private).await;
            metrics::histogram!("hexfleet_webhook_delivery_seconds").record(started.elapsed().as_secs_f64());
            let ok = matches!(result, Ok(s) if (200..300).contains(&s));
            let opened = breakers.lock().record(key.clone(), ok, Instant::now());
            if let Some(pause) = opened {
                metrics::counter!("hexfleet_webhook_circuit_opened_total").increment(1);
                tracing::warn!(tenant = %d.event.event.tenant, webhook = %d.webhook_id, ?pause,
                    "webhook endpoint keeps failing; its deliveries are paused");
            }
            (judge(cfg, d.attempt, now(), result), opened)
        }
    };
    let label = match &outcome {
        Outcome::Delivered { .. } => "delivered",
        Outcome::Retry { .. } => "retry",
        Outcome::Dead { .. } => "dead",
        Outcome::Deferred { .. } => "deferred",
    };
    metrics::counter!("hexfleet_webhook_deliveries_total", "outcome" => label).increment(1);
    if let Outcome::Dead { error, .. } = &outcome {
        tracing::warn!(webhook = %d.webhook_id, seq = d.event.seq, %error, "webhook delivery gave up");
    }
    let e = &d.event.event;
    if let Err(err) = store.finish_webhook_delivery(&e.tenant, &d.webhook_id, d.event.seq, &lease, &outcome, now()).await {
        // The lease lapses and the delivery is made again: at least once.
        tracing::warn!(error = %err, webhook = %d.webhook_id, seq = d.event.seq, "cannot record a webhook delivery");
    }
    // The circuit is open, and this send opened it or failed after it opened: the backlog,
    // this delivery included (recorded just above), waits out the pause off the claim's path;
    // only while the webhook points at this URL (`pause_webhook_deliveries`).
    let pause = opened.is_some() || matches!(outcome, Outcome::Retry { .. });
    let open_until = breakers.lock().open_until(&key);
    if let Some(until) = open_until.filter(|_| pause) {
        let until = now() + ms(until.saturating_duration_since(Instant::now()));
        if let Err(err) = store.pause_webhook_deliveries(e.tenant.as_str(), &d.webhook_id, &d.url, until).await {
            tracing::warn!(error = %err, webhook = %d.webhook_id, "cannot move a paused webhook's deliveries");
        }
    }
    key
}

/// Starts the delivery worker; it stops when `stop` is cancelled (finishing the requests in
/// flight). `now` is the fleet's clock in Unix ms.
pub fn spawn_delivery(
    store: Arc<SqlStore>,
    now: impl Fn() -> Ms + Send + Sync + 'static,
    cfg: WebhookConfig,
    node: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let now = Arc::new(now);
    // Its own task: purging an hour of finished rows can take minutes of batches, and while
    // the worker's loop waited for it, no delivery was claimed, and the sends under way were
    // not polled (a 200 read late counted as a timeout, was retried, and fed the breaker).
    let housekeeping = tokio::spawn(housekeep(store.clone(), now.clone(), cfg.clone(), stop.clone()));
    tokio::spawn(async move {
        let mut builder = reqwest::Client::builder();
        if !cfg.allow_private {
            // A proxy from the environment would resolve names itself, past `PublicOnly`.
            builder = builder.dns_resolver(Arc::new(PublicOnly)).no_proxy();
        }
        let client = match builder
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hexfleet-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "webhook delivery disabled: cannot build the HTTP client");
                return;
            }
        };
        let lease_ms = ms(cfg.timeout + Duration::from_secs(30));
        let slots = cfg.concurrency.max(1);
        let per_webhook = cfg.per_webhook.clamp(1, slots);
        let per_tenant = u32::try_from(cfg.per_tenant.clamp(1, slots)).unwrap_or(u32::MAX);
        let mut tick = tokio::time::interval(cfg.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let breakers = parking_lot::Mutex::new(Breakers::new(&cfg));
        // Sends in flight, and how many per (tenant, webhook, URL). A claim takes only what can
        // be sent at once (so its lease, timeout + 30 s, outlasts every send) and skips
        // webhooks at `per_webhook`: a slow endpoint holds at most that many slots, and the
        // others go on around it. Tenants take turns for the free slots, none past
        // `per_tenant` (`ClaimShares`).
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut busy: HashMap<CircuitKey, usize> = HashMap::new();
        loop {
            // Claims at start, at each tick, and whenever a send ends (its slot, or its webhook
            // under the cap, may take a row that waited).
            if in_flight.len() < slots && !stop.is_cancelled() {
                let free = slots - in_flight.len();
                let t = now();
                let lease = format!("{node}:{}", uuid::Uuid::new_v4().simple());
                let mut skip_keys = breakers.lock().open(Instant::now());
                skip_keys.extend(busy.iter().filter(|(_, n)| **n >= per_webhook).map(|(k, _)| k.clone()));
                let skip: Vec<(&str, &str, &str)> = skip_keys.iter().map(|(t, w, u)| (t.as_str(), w.as_str(), u.as_str())).collect();
                let mut tenants: HashMap<&str, u32> = HashMap::new();
                for ((tenant, _, _), n) in &busy {
                    *tenants.entry(tenant.as_str()).or_default() += u32::try_from(*n).unwrap_or(u32::MAX);
                }
                let tenants: Vec<(&str, u32)> = tenants.into_iter().collect();
                let shares = ClaimShares { per_webhook: Some(1), per_tenant: Some(per_tenant), in_flight: &tenants };
                let claim = u32::try_from(free).unwrap_or(u32::MAX);
                // The sends under way are polled while the claim waits (a slow database, a
                // busy SQLite write lock, a full pool: up to the statement timeout). reqwest
                // checks its deadline before a response that is ready, so a 2xx not read in
                // time counted as a timeout, was sent again and fed the breaker.
                let mut ended = Vec::new();
                let claimed = {
                    let claiming = store.claim_webhook_deliveries(t, t + lease_ms, &lease, claim, &shares, &skip);
                    tokio::pin!(claiming);
                    loop {
                        tokio::select! {
                            r = &mut claiming => break r,
                            Some(key) = in_flight.next(), if !in_flight.is_empty() => ended.push(key),
                        }
                    }
                };
                for key in ended {
                    release(&mut busy, &key);
                }
                match claimed {
                    Ok(batch) => {
                        for d in batch {
                            let key: CircuitKey = (d.event.event.tenant.to_string(), d.webhook_id.clone(), d.url.clone());
                            *busy.entry(key.clone()).or_default() += 1;
                            in_flight.push(deliver(d, key, lease.clone(), &client, &cfg, &store, &*now, &breakers));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot claim webhook deliveries; retrying next poll"),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(key) = in_flight.next(), if !in_flight.is_empty() => release(&mut busy, &key),
                _ = tick.tick() => breakers.lock().tidy(Instant::now()),
            }
        }
        // Stopping: the sends under way finish and are recorded.
        while in_flight.next().await.is_some() {}
        let _ = housekeeping.await;
        tracing::debug!("webhook delivery stopped");
    })
}

/// A send to `key` ended: its slot is free.
fn release(busy: &mut HashMap<CircuitKey, usize>, key: &CircuitKey) {
    if let Some(n) = busy.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            busy.remove(key);
        }
    }
}

/// Every `housekeeping` period: gives up deliveries not attempted for `give_up_after`, then
/// purges finished ones older than `keep_finished`. Stops when `stop` is cancelled (a batch
/// under way is dropped; its statement is rolled back).
async fn housekeep(store: Arc<SqlStore>, now: Arc<impl Fn() -> Ms + Send + Sync + 'static>, cfg: WebhookConfig, stop: CancellationToken) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(cfg.housekeeping);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let round = async || {
        let t = now();
        // Not in the first hour after start: after an outage of the service itself, what
        // waited is attempted before anything is given up.
        if started.elapsed() >= cfg.give_up_after.min(Duration::from_secs(3600)) {
            let before = t - ms(cfg.give_up_after);
            match store.expire_webhook_deliveries(before, t).await {
                Ok(n) if n > 0 => tracing::warn!(given_up = n, "webhook deliveries not attempted for {:?} given up", cfg.give_up_after),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot give up old webhook deliveries"),
            }
        }
        let before = t - ms(cfg.keep_finished);
        match store.purge_webhook_deliveries(before).await {
            Ok(n) if n > 0 => tracing::info!(purged = n, "old webhook deliveries purged"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "webhook delivery purge failed"),
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = round() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_documented_event_pattern_is_valid_pattern() {
        let re = regex::Regex::new(super::EVENT_PATTERN).unwrap();
        for p in ["*", "order.*", "order.delivered", "zone.enter", "courier.silent", "a_1.b2.*", "", ".", "order.", ".x", "order.**", "Order.x", "a b", "*.x", "x.*.y"] {
            assert_eq!(re.is_match(p), super::valid_pattern(p), "{p:?}");
        }
    }

    use super::*;

    fn req(url: &str, events: &[&str], secret: &str) -> WebhookPutReq {
        WebhookPutReq { url: url.into(), events: events.iter().map(|s| s.to_string()).collect(), secret: secret.into() }
    }

    #[test]
    fn validation() {
        let s = "0123456789abcdef";
        assert!(validate(&req("https://example.com/h", &["order.*", "zone.enter", "*"], s), false).is_ok());
        assert!(validate(&req("http://127.0.0.1:9000/x", &["order.delivered"], s), true).is_ok());
        for private in ["http://127.0.0.1:9000/x", "http://10.1.2.3/", "http://169.254.169.254/latest/meta-data", "http://[::1]:80/", "http://localhost:8080/", "http://192.168.0.1/", "http://[fd00::1]/", "http://100.64.0.1/", "http://0.0.0.0/"] {
            let e = validate(&req(private, &["*"], s), false).unwrap_err();
            assert_eq!(e.code, "forbidden_destination", "{private}");
        }
        for bad_url in ["ftp://example.com/", "example.com/h", "https://", "not a url", "file:///etc/passwd"] {
            assert!(validate(&req(bad_url, &["*"], s), true).is_err(), "{bad_url}");
        }
        for bad in ["", "order.", ".order", "Order.created", "order.*.x", "order*", "order..x", "**"] {
            assert!(validate(&req("https://e.com", &[bad], s), true).is_err(), "{bad:?}");
        }
        assert!(validate(&req("https://e.com", &[], s), true).is_err());
        assert!(validate(&req("https://e.com", &["*"], "short"), true).is_ok(), "the receiver's own secret, whatever its length");
        assert!(validate(&req("https://e.com", &["*"], ""), true).is_err());
        assert!(validate(&req("https://e.com", &["*"], &"s".repeat(257)), true).is_err());
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("k{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(validate(&req("https://e.com", &many, s), true).is_err());
    }

    #[test]
    fn public_addresses() {
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34", "2002:808:808::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.100.100.200", "0.0.0.0", "255.255.255.255", "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "198.18.0.1", "240.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1", "64:ff9b:1::1", "2002:7f00:1::1", "2002:a00:1::", "2001:0:4136:e378::1", "fec0::1"] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_private_addresses() {
        use reqwest::dns::Resolve as _;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = match PublicOnly.resolve(name).await {
            Ok(_) => panic!("localhost resolved"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("may not reach"), "{err}");
        assert!(!err.contains("127.0.0.1") && !err.contains("::1"), "the address reaches the tenant: {err}");
    }

    #[test]
    fn a_failing_endpoint_is_paused_then_probed_once() {
        let cfg = WebhookConfig { breaker_after: 3, breaker_cooldown: Duration::from_secs(30), ..Default::default() };
        let mut b = Breakers::new(&cfg);
        let key = |id: &str| ("t".to_owned(), id.to_owned(), format!("https://example.com/{id}"));
        let (k, other) = (key("bad"), key("good"));
        let t0 = Instant::now();
        let wait = Duration::from_secs(10);
        // Two failures, a success: still closed, the count starts again.
        assert_eq!(b.record(k.clone(), false, t0), None);
        assert_eq!(b.record(k.clone(), false, t0), None);
        assert_eq!(b.record(k.clone(), true, t0), None);
        assert_eq!(b.record(k.clone(), false, t0), None);
        assert_eq!(b.record(k.clone(), false, t0), None);
        // The third in a row opens it for the cool-down; late failures of the same batch do
        // not stretch the pause.
        assert_eq!(b.record(k.clone(), false, t0), Some(Duration::from_secs(30)));
        assert_eq!(b.record(k.clone(), false, t0), None);
        // Failed sends are retried after the pause (the worker reads it).
        assert_eq!((b.open_until(&k), b.open_until(&other)), (Some(t0 + Duration::from_secs(30)), None));
        assert_eq!(b.open(t0 + Duration::from_secs(29)), vec![k.clone()]);
        assert_eq!(b.admit(&k, t0, wait), Admit::Defer(t0 + Duration::from_secs(30)));
        assert_eq!(b.admit(&other, t0, wait), Admit::Send, "other webhooks are not affected");
        // After the pause: claimable again, one probe goes out, the rest wait for its outcome.
        let t1 = t0 + Duration::from_secs(30);
        assert!(b.open(t1).is_empty());
        assert_eq!(b.admit(&k, t1, wait), Admit::Send);
        assert_eq!(b.admit(&k, t1, wait), Admit::Defer(t1 + wait));
        assert_eq!(b.open(t1), vec![k.clone()], "not claimed while the probe is out");
        // The probe fails: paused twice as long.
        assert_eq!(b.record(k.clone(), false, t1), Some(Duration::from_secs(60)));
        let t2 = t1 + Duration::from_secs(60);
        assert!(b.open(t2).is_empty());
        assert_eq!(b.admit(&k, t2, wait), Admit::Send);
        // Up to the cap.
        let mut t = t2;
        for _ in 0..10 {
            let p = b.record(k.clone(), false, t).expect("a failed probe reopens");
            assert!(p <= MAX_BREAKER_COOLDOWN);
            t += p;
            assert!(b.open(t).is_empty());
            assert_eq!(b.admit(&k, t, wait), Admit::Send);
        }
        assert_eq!(b.record(k.clone(), false, t), Some(MAX_BREAKER_COOLDOWN));
        // A probe that succeeds closes it: everything is sent again.
        let t3 = t + MAX_BREAKER_COOLDOWN;
        assert!(b.open(t3).is_empty());
        assert_eq!(b.admit(&k, t3, wait), Admit::Send);
        assert_eq!(b.record(k.clone(), true, t3), None);
        assert_eq!(b.admit(&k, t3, wait), Admit::Send);
        assert_eq!(b.admit(&k, t3, wait), Admit::Send);
        b.tidy(t3);
        assert!(b.circuits.is_empty(), "healthy webhooks are not kept");

        // A late success (sent before the circuit opened) does not close it.
        for _ in 0..3 {
            b.record(k.clone(), false, t3);
        }
        assert_eq!(b.open(t3), vec![k.clone()]);
        assert_eq!(b.record(k.clone(), true, t3), None);
        assert_eq!(b.open(t3), vec![k.clone()], "still open");
        // The same webhook at a new URL starts closed; a probe nobody claims is forgotten.
        let moved = ("t".to_owned(), "bad".to_owned(), "https://example.com/fixed".to_owned());
        assert_eq!(b.admit(&moved, t3, wait), Admit::Send);
        let late = t3 + Duration::from_secs(30) + MAX_BREAKER_COOLDOWN * 2;
        assert!(b.open(late).is_empty());
        b.tidy(late);
        assert!(b.circuits.is_empty(), "an unclaimed probe of a webhook gone elsewhere is dropped");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let cfg = WebhookConfig { backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(60), ..Default::default() };
        let waits: Vec<u64> = (1..=8).map(|a| backoff_after(&cfg, a, 1.0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff_after(&cfg, 3, 0.8), Duration::from_millis(3200));
        assert_eq!(backoff_after(&cfg, 3, 5.0), Duration::from_millis(4800), "jitter is clamped");
        assert_eq!(backoff_after(&cfg, u32::MAX, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn outcomes() {
        let cfg = WebhookConfig { max_attempts: 3, backoff: Duration::from_secs(10), ..Default::default() };
        assert_eq!(judge(&cfg, 1, 1_000, Ok(204)), Outcome::Delivered { status: 204 });
        match judge(&cfg, 1, 1_000, Ok(503)) {
            Outcome::Retry { at, status: Some(503), .. } => assert!((9_000..=13_000).contains(&at), "{at}"),
            o => panic!("{o:?}"),
        }
        match judge(&cfg, 2, 1_000, Err("connection refused".into())) {
            Outcome::Retry { at, status: None, error } => {
                assert!((17_000..=25_000).contains(&at), "{at}");
                assert_eq!(error, "connection refused");
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(judge(&cfg, 3, 1_000, Ok(301)), Outcome::Dead { status: Some(301), .. }));
    }

    #[test]
    fn signature_matches_python_hmac() {
        // Vectors from Python: hmac.new(key, b"<t>.<body>", hashlib.sha256).hexdigest()
        assert_eq!(signature("key", 1, b"{}"), "t=1,v1=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224");
        assert_eq!(
            signature("0123456789abcdef", 1_700_000_000, br#"{"seq":1}"#),
            "t=1700000000,v1=e08bda826cf051c0f1f919531cf4fec45eca56a374d4a56a26f82fcfb9101386"
        );
        // hmac.new(b"key", b"{}", hashlib.sha256).hexdigest()
        assert_eq!(body_signature("key", b"{}"), "sha256=a777724d943eb48dc69bca8a4a6d57a04db3f9ec7e1de4e581e860265bdf3032");
    }
}
