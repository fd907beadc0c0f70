//! Location history over HTTP (privacy: export and erase per courier) and the retention purge.
//!
//! - `GET /v1/couriers/{id}/history?from=&to=` answers a GeoJSON `FeatureCollection`
//!   (`application/geo+json`) of `Point` features, one per stored sample, oldest first, with
//!   `properties` `courier_id`, `ts` (Unix ms), `time` (RFC 3339 UTC, which QGIS's temporal
//!   controller and most GIS tools read as a date-time field) and `speed` (m/s, may be null).
//!   Points rather than one `LineString` because every sample keeps its own time and speed, and
//!   one geometry type per collection imports as one layer; a track line is one QGIS
//!   "Points to path" away.
//!   The answer is streamed, read from the store [`EXPORT_PAGE`] samples at a time.
//! - `DELETE /v1/couriers/{id}/history` erases every stored sample of the courier (also those
//!   still buffered for the next flush), answers `{"erased": n}` and appends a
//!   `courier.history_erased` event to the audit log.
//!
//! Both are for dispatchers and admins of the courier's tenant, and for the courier itself.
//! An unknown courier is 404.
//!
//! Retention: [`spawn_purge`] deletes samples older than the retention period on start and then
//! every purge interval, counting what it deleted in `hexfleet_history_purged_total`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use actix_web::{HttpResponse, web};
use hexfleet_actors::domain::{CourierId, DomainEvent, EntityKind, LocationSample, Ms};
use hexfleet_actors::store::{Store, StoreError, Write};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::server::AppState;

type State = web::Data<AppState>;

/// A GeoJSON FeatureCollection of a courier's location samples.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryCollection {
    /// Always `FeatureCollection`.
    #[serde(rename = "type")]
    #[schema(example = "FeatureCollection")]
    pub kind: String,
    pub features: Vec<HistoryFeature>,
}

/// One sample as a GeoJSON Point feature.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryFeature {
    /// Always `Feature`.
    #[serde(rename = "type")]
    #[schema(example = "Feature")]
    pub kind: String,
    pub geometry: PointGeometry,
    pub properties: HistoryProperties,
}

/// A GeoJSON Point: `coordinates` are `[lng, lat]` (RFC 7946 order), WGS84 degrees.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PointGeometry {
    /// Always `Point`.
    #[serde(rename = "type")]
    #[schema(example = "Point")]
    pub kind: String,
    #[schema(example = json!([13.405, 52.52]))]
    pub coordinates: [f64; 2],
}

/// What is known about one sample.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryProperties {
    pub courier_id: String,
    /// Fix time, Unix ms.
    pub ts: i64,
    /// Fix time as RFC 3339 UTC (for GIS tools).
    #[schema(example = "2026-01-31T12:00:00.000Z")]
    pub time: String,
    /// Speed in m/s when the device reported it.
    pub speed: Option<f32>,
}

/// The answer of an erase.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErasedDto {
    /// Samples erased.
    pub erased: u64,
}

fn rfc3339(ts: Ms) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ts).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

impl HistoryCollection {
    pub fn new(courier: &CourierId, samples: &[LocationSample]) -> Self {
        HistoryCollection { kind: "FeatureCollection".into(), features: samples.iter().map(|s| HistoryFeature::new(courier, s)).collect() }
    }
}

impl HistoryFeature {
    pub fn new(courier: &CourierId, s: &LocationSample) -> Self {
        HistoryFeature {
            kind: "Feature".into(),
            geometry: PointGeometry { kind: "Point".into(), coordinates: [s.pos.lng, s.pos.lat] },
            properties: HistoryProperties { courier_id: courier.to_string(), ts: s.ts, time: rfc3339(s.ts), speed: s.speed },
        }
    }
}

/// Samples read per page of an export. The answer is streamed page by page (keyset on `ts`,
/// unique per courier), so a month of 1 Hz history is never held whole in memory.
pub const EXPORT_PAGE: usize = 5_000;

/// Where an export stream is.
enum Export {
    /// A page read and not yet sent (`first`: the collection's opening goes before it).
    Page { samples: Vec<LocationSample>, first: bool },
    /// Reading the next page failed: the answer breaks off.
    Failed(StoreError),
    Done,
}

/// The body of an export whose first page is `first`: a `HistoryCollection`, rendered page by
/// page; each full page is followed by a read of the next, from the store's home runtime.
fn export_stream(
    store: Arc<hexfleet_persistence::SqlStore>,
    tenant: hexfleet_actors::domain::TenantId,
    courier: CourierId,
    to: Ms,
    first: Vec<LocationSample>,
) -> impl futures_util::Stream<Item = Result<web::Bytes, actix_web::Error>> {
    futures_util::stream::unfold(Export::Page { samples: first, first: true }, move |state| {
        let (store, tenant, courier) = (store.clone(), tenant.clone(), courier.clone());
        async move {
            match state {
                Export::Done => None,
                Export::Failed(e) => {
                    tracing::warn!(courier = %courier, error = %e, "history export broke off");
                    Some((Err(actix_web::error::ErrorServiceUnavailable(e.to_string())), Export::Done))
                }
                Export::Page { samples, first } => {
                    metrics::counter!("hexfleet_history_exported_total").increment(samples.len() as u64);
                    let mut out = Vec::with_capacity(samples.len() * 200 + 64);
                    if first {
                        out.extend_from_slice(br#"{"type":"FeatureCollection","features":["#);
                    }
                    for (i, s) in samples.iter().enumerate() {
                        if !first || i > 0 {
                            out.push(b',');
                        }
                        // Plain data: serialising it to memory cannot fail.
                        serde_json::to_writer(&mut out, &HistoryFeature::new(&courier, s)).unwrap_or_default();
                    }
                    let next = match samples.last() {
                        Some(last) if samples.len() == EXPORT_PAGE && last.ts < to => {
                            match store.export_locations(&tenant, &courier, last.ts + 1, to, EXPORT_PAGE).await {
                                Ok(samples) => Export::Page { samples, first: false },
                                Err(e) => Export::Failed(e),
                            }
                        }
                        _ => {
                            out.extend_from_slice(b"]}");
                            Export::Done
                        }
                    };
                    Some((Ok(web::Bytes::from(out)), next))
                }
            }
        }
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct HistoryQuery {
    from: Option<i64>,
    to: Option<i64>,
}

/// Checks the caller may see or erase this courier's history and that the courier exists.
fn authorize(st: &AppState, auth: &Auth, raw: &str) -> Result<CourierId, ApiError> {
    let id = crate::api::courier_id(raw)?;
    auth.require_self_or_staff(id.as_str())?;
    st.fleet.courier(&auth.tenant, &id)?;
    Ok(id)
}

/// Export a courier's location history as GeoJSON.
///
/// Point features, oldest first, properties `courier_id`, `ts` (Unix ms), `time` (RFC 3339 UTC)
/// and `speed` (m/s). Dispatchers and admins of the tenant, or the courier itself.
#[utoipa::path(
    get,
    path = "/v1/couriers/{id}/history",
    operation_id = "export_courier_history",
    params(
        ("id" = String, Path),
        ("from" = Option<i64>, Query, minimum = 0, description = "Unix ms, inclusive (default 0); not after `to`"),
        ("to" = Option<i64>, Query, minimum = 0, description = "Unix ms, inclusive (default now)")
    ),
    responses(
        (status = 200, description = "GeoJSON FeatureCollection of Point features, oldest first", body = HistoryCollection, content_type = "application/geo+json"),
        (status = 400), (status = 401), (status = 403), (status = 404), (status = 503)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn export(st: State, auth: Auth, path: web::Path<String>, q: web::Query<HistoryQuery>) -> Result<HttpResponse, ApiError> {
    let id = authorize(&st, &auth, &path)?;
    let from = q.from.unwrap_or(0);
    let to = q.to.unwrap_or_else(|| st.fleet.now_ms());
    if from < 0 || to < 0 {
        return Err(ApiError::bad_request("bad_range", "from and to are Unix milliseconds, not negative"));
    }
    if from > to {
        return Err(ApiError::bad_request("bad_range", "from is after to"));
    }
    // The first page is read before answering, so a store that is down still gets a 503 with
    // the error shape; a failure on a later page breaks the answer off (its JSON unfinished).
    let first = st.store.export_locations(&auth.tenant, &id, from, to, EXPORT_PAGE).await?;
    let body = export_stream(st.store.clone(), auth.tenant.clone(), id, to, first);
    Ok(HttpResponse::Ok().content_type("application/geo+json").streaming(body))
}

/// Erase a courier's location history (privacy); recorded in the event log.
///
/// Dispatchers and admins of the tenant, or the courier itself.
#[utoipa::path(
    delete,
    path = "/v1/couriers/{id}/history",
    operation_id = "erase_courier_history",
    params(("id" = String, Path)),
    responses((status = 200, description = "Samples erased", body = ErasedDto), (status = 400), (status = 401), (status = 403), (status = 404), (status = 503)),
    security(("bearer" = []))
)]
pub(crate) async fn erase(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = authorize(&st, &auth, &path)?;
    let erased = st.store.erase_locations(&auth.tenant, &id).await?;
    metrics::counter!("hexfleet_history_erased_total").increment(erased);
    let event = DomainEvent {
        tenant: auth.tenant.clone(),
        entity: EntityKind::Courier,
        entity_id: id.to_string(),
        kind: "courier.history_erased".into(),
        actor: auth.who().to_string(),
        reason: None,
        ts: st.fleet.now_ms(),
        attrs: vec![("erased".into(), erased.to_string())],
    };
    // The erase is done; the audit event goes in the same database. If it cannot be written the
    // caller learns it (503) and may repeat the erase, which then records `erased: 0`.
    if let Err(e) = st.store.commit(vec![Write::Event(event)]).await {
        tracing::error!(courier = %id, erased, error = %e, "history erased but the audit event was not written");
        return Err(ApiError::new(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            format!("{erased} samples erased, but the audit event could not be written; retry the request"),
        ));
    }
    tracing::info!(courier = %id, tenant = %auth.tenant, erased, "location history erased");
    Ok(HttpResponse::Ok().json(ErasedDto { erased }))
}

/// Deletes history older than `now - retention` once; counts and logs what it deleted.
pub async fn purge_once(store: &dyn Store, now: Ms, retention: Duration) -> Result<u64, StoreError> {
    let before = now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let n = store.purge_locations(before).await?;
    metrics::counter!("hexfleet_history_purged_total").increment(n);
    metrics::counter!("hexfleet_history_purge_runs_total").increment(1);
    if n > 0 {
        tracing::info!(deleted = n, before, "location history retention purge");
    } else {
        tracing::debug!(before, "location history retention purge: nothing to delete");
    }
    Ok(n)
}

/// Runs [`purge_once`] at once and then every `every` until `stop` is cancelled. A purge in
/// progress is finished (bounded by the store's statement timeout), never cut off mid-way.
pub fn spawn_purge(
    store: Arc<dyn Store>,
    now: impl Fn() -> Ms + Send + 'static,
    retention: Duration,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = purge_once(store.as_ref(), now(), retention).await {
                metrics::counter!("hexfleet_history_purge_failures_total").increment(1);
                tracing::warn!(error = %e, "location history retention purge failed; retrying at the next interval");
            }
        }
        tracing::debug!("retention purge stopped");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexfleet_actors::domain::{LatLng, TenantId};
    use hexfleet_actors::store::MemoryStore;

    fn sample(ts: Ms) -> LocationSample {
        LocationSample { pos: LatLng::new(52.5, 13.4).unwrap(), ts, speed: None }
    }

    #[tokio::test]
    async fn purge_deletes_only_what_is_older_than_the_retention() {
        let store = MemoryStore::new();
        let (t, c) = (TenantId::new("t"), CourierId::new("c"));
        let day = 86_400_000;
        let now = 100 * day;
        store.record_locations(&t, &c, vec![sample(now - 31 * day), sample(now - 30 * day - 1), sample(now - 30 * day), sample(now - 1)]).unwrap();
        let n = purge_once(&store, now, Duration::from_secs(30 * 86_400)).await.unwrap();
        assert_eq!(n, 2);
        let left: Vec<Ms> = store.export_locations(&t, &c, 0, now, usize::MAX).await.unwrap().iter().map(|s| s.ts).collect();
        assert_eq!(left, vec![now - 30 * day, now - 1]);
    }

    #[tokio::test]
    async fn purge_task_runs_at_start_retries_after_failures_and_stops_when_cancelled() {
        let store = Arc::new(MemoryStore::new());
        let (t, c) = (TenantId::new("t"), CourierId::new("c"));
        store.set_down(true);
        let stop = CancellationToken::new();
        let task = spawn_purge(store.clone(), || 10_000, Duration::from_secs(1), Duration::from_millis(20), stop.clone());
        tokio::time::sleep(Duration::from_millis(50)).await; // a few failed runs
        store.set_down(false);
        store.record_locations(&t, &c, vec![sample(1), sample(9_500)]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.export_locations(&t, &c, 0, 10_000, usize::MAX).await.unwrap().len() != 1 {
            assert!(std::time::Instant::now() < deadline, "purge did not run after the store came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("purge task stops").unwrap();
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
    }
}
