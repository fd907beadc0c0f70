//! The REST API under `/v1`, the OsmAnd/Traccar endpoint, health, readiness, metrics, OpenAPI
//! and the static pages. Handlers authenticate, check role and tenant, convert DTOs and call the
//! fleet; they hold no state of their own.

use actix_web::http::{Method, StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use hexfleet_actors::domain::{CourierId, EntityKind, OrderId, TenantId, Vehicle, valid_id};
use hexfleet_actors::fleet::CourierPatch;
use hexfleet_actors::order::Command;
use hexfleet_actors::store::EventQuery;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Auth, Role};
use crate::dto::{AssignReq, CourierDto, CourierPutReq, LatLngDto, LocDto, NearbyDto, NewOrderReq, OrderDto, PositionDto, TrailDto};
use crate::error::ApiError;
use crate::osmand;
use crate::server::AppState;

/// Largest JSON body accepted by the REST API.
pub const MAX_JSON_BODY: usize = 256 * 1024;

type State = web::Data<AppState>;

/// Routes of this module.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::JsonConfig::default().limit(MAX_JSON_BODY).error_handler(crate::error::json_error))
        .app_data(web::QueryConfig::default().error_handler(crate::error::query_error))
        .app_data(web::PathConfig::default().error_handler(crate::error::path_error))
        .app_data(web::PayloadConfig::default().limit(MAX_JSON_BODY));
    // At the root, where probes, scrapers and Traccar URLs look, and under `/v1` with the rest
    // of the API (the design brief lists them there); before the `/v1` scope, which would
    // otherwise claim them.
    for base in ["", "/v1"] {
        cfg.service(resource(&format!("{base}/healthz"), vec![get(healthz)]))
            .service(resource(&format!("{base}/readyz"), vec![get(readyz)]))
            .service(resource(&format!("{base}/metrics"), vec![get(metrics)]))
            .service(resource(&format!("{base}/openapi.json"), vec![get(openapi)]))
            .service(resource(&format!("{base}/osmand"), vec![get(osmand_get), post(osmand_post)]));
    }
    cfg.service(resource("/", vec![get(console_page)]))
        .service(resource("/console", vec![get(console_page)]))
        .service(resource("/track/{order_id}", vec![get(console_page)]))
        .service(resource("/favicon.ico", vec![get(favicon)]))
        .service(
            web::scope("/v1")
                .service(resource("/orders", vec![post(create_order)]))
                .service(resource("/orders/{id}", vec![get(get_order)]))
                .service(resource("/orders/{id}/cancel", vec![post(cancel_order)]))
                .service(resource("/orders/{id}/assign", vec![post(assign_order)]))
                .service(resource("/orders/{id}/release", vec![post(release_order)]))
                .service(resource("/couriers/nearby", vec![get(nearby)]))
                .service(resource("/couriers/{id}", vec![get(get_courier), put(put_courier)]))
                .service(resource("/couriers/{id}/trail", vec![get(get_trail)]))
                .service(resource("/couriers/{id}/device-key", vec![get(device_key)]))
                .service(resource("/couriers/{id}/history", vec![get(crate::history::export), delete(crate::history::erase)]))
                .service(resource("/events", vec![get(events)]))
                .service(resource("/market", vec![get(crate::markets::get_market)]))
                .service(resource("/zones", vec![get(crate::zones::list_zones)]))
                .service(resource("/zones/{id}", vec![get(crate::zones::get_zone), put(crate::zones::put_zone), delete(crate::zones::delete_zone)]))
                .service(resource("/webhooks", vec![get(crate::webhooks::list_webhooks)]))
                .service(resource(
                    "/webhooks/{id}",
                    vec![get(crate::webhooks::get_webhook), put(crate::webhooks::put_webhook), delete(crate::webhooks::delete_webhook)],
                ))
                .service(resource("/webhooks/{id}/deliveries", vec![get(crate::webhooks::deliveries)]))
                .service(resource("/webhooks/{id}/redeliver", vec![post(crate::webhooks::redeliver)])),
        );
}

/// Routes with their methods, for [`resource`].
pub(crate) struct On(Vec<Method>, Vec<actix_web::Route>);

macro_rules! on {
    ($($name:ident => $method:ident),*) => {$(
        /// A route for this method, for [`resource`].
        pub(crate) fn $name<F, Args>(handler: F) -> On
        where
            F: actix_web::Handler<Args>,
            Args: actix_web::FromRequest + 'static,
            F::Output: actix_web::Responder + 'static,
        {
            On(vec![Method::$method], vec![web::method(Method::$method).to(handler)])
        }
    )*};
}
on!(put => PUT, post => POST, delete => DELETE);

/// A `GET` route, which serves `HEAD` too (the same answer without its body, RFC 9110 9.3.2).
pub(crate) fn get<F, Args>(handler: F) -> On
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    On(vec![Method::GET, Method::HEAD], vec![web::method(Method::GET).to(handler.clone()), web::method(Method::HEAD).to(handler)])
}

/// A path and the methods it serves. Any other method gets 405 in the error shape with `Allow`
/// listing these and `OPTIONS` (RFC 9110, 15.5.6); `OPTIONS` gets 204 with the same `Allow`.
/// (Routes added one by one at the app's root made actix fall through to the default
/// service: a 404.)
pub(crate) fn resource(path: &str, routes: Vec<On>) -> actix_web::Resource {
    let allow: Vec<&str> = routes.iter().flat_map(|On(ms, _)| ms.iter().map(Method::as_str)).chain(["OPTIONS"]).collect();
    let allow = allow.join(", ");
    routes.into_iter().flat_map(|On(_, rs)| rs).fold(web::resource(path), |r, route| r.route(route)).default_service(web::to(move |req: HttpRequest| {
        let allow = allow.clone();
        async move {
            if req.method() == Method::OPTIONS {
                return HttpResponse::NoContent().insert_header((header::ALLOW, allow)).finish();
            }
            let e = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{} is not served here; use {allow}", req.method()));
            let mut r = actix_web::ResponseError::error_response(&e);
            if let Ok(v) = header::HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            r
        }
    }))
}

fn order_id(raw: &str) -> Result<OrderId, ApiError> {
    if valid_id(raw) { Ok(OrderId::new(raw)) } else { Err(ApiError::bad_request("bad_id", "invalid order id")) }
}

pub(crate) fn courier_id(raw: &str) -> Result<CourierId, ApiError> {
    if valid_id(raw) { Ok(CourierId::new(raw)) } else { Err(ApiError::bad_request("bad_id", "invalid courier id")) }
}

/// The order as `auth` may see it: all of it for staff, without the dispatch record for the
/// customer and the courier.
fn order_for(auth: &Auth, o: &hexfleet_actors::domain::Order) -> OrderDto {
    if auth.is_staff() { OrderDto::from(o) } else { OrderDto::for_watchers(o) }
}

/// Whether the caller may read this order: staff of the tenant, its customer, its courier.
fn may_see_order(auth: &Auth, o: &hexfleet_actors::domain::Order) -> bool {
    match auth.claims.role {
        Role::Dispatcher | Role::Admin => true,
        Role::Customer => auth.claims.order_id.as_deref() == Some(o.id.as_str()),
        Role::Courier => o.courier.as_ref().is_some_and(|c| c.as_str() == auth.claims.sub),
    }
}

/// Creates an order, answered once it is durable.
///
/// Dispatchers and admins. With a client-chosen `id` the request is idempotent: the same
/// request again (same pickup, drop-off, size and times) gets the order as it is now, 201 as
/// the first time; another order under that id is 409 `conflict`, and a retry while the first
/// attempt is still being written 409 `in_progress` (retry it).
#[utoipa::path(post, path = "/v1/orders", request_body = NewOrderReq, responses((status = 201, body = OrderDto), (status = 400), (status = 401), (status = 403), (status = 409), (status = 503)), security(("bearer" = [])))]
pub(crate) async fn create_order(st: State, auth: Auth, body: web::Json<NewOrderReq>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let new = body.into_inner().to_domain()?;
    let fleet = st.fleet.clone();
    let tenant = auth.tenant.clone();
    let who = auth.who();
    let o = st.on_main(async move { fleet.create_order(&tenant, new, &who).await }).await??;
    Ok(HttpResponse::Created().json(OrderDto::from(o.as_ref())))
}

#[utoipa::path(get, path = "/v1/orders/{id}", params(("id" = String, Path)), responses((status = 200, body = OrderDto), (status = 404)), security(("bearer" = [])))]
pub(crate) async fn get_order(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = order_id(&path)?;
    let o = st.fleet.order(&auth.tenant, &id).await?;
    if !may_see_order(&auth, &o) {
        // Same answer as a missing order: do not reveal other customers' ids.
        return Err(ApiError::not_found("order not found"));
    }
    Ok(HttpResponse::Ok().json(order_for(&auth, &o)))
}

#[utoipa::path(post, path = "/v1/orders/{id}/cancel", params(("id" = String, Path)), responses((status = 200, body = OrderDto), (status = 404), (status = 409)), security(("bearer" = [])))]
pub(crate) async fn cancel_order(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = order_id(&path)?;
    auth.require(&[Role::Dispatcher, Role::Admin, Role::Customer])?;
    if auth.claims.role == Role::Customer && auth.claims.order_id.as_deref() != Some(id.as_str()) {
        return Err(ApiError::not_found("order not found"));
    }
    let o = st.fleet.command(&auth.tenant, &id, Command::Cancel, auth.who()).await?;
    Ok(HttpResponse::Ok().json(order_for(&auth, &o)))
}

#[utoipa::path(post, path = "/v1/orders/{id}/assign", params(("id" = String, Path)), request_body = AssignReq, responses((status = 200, body = OrderDto), (status = 404), (status = 409)), security(("bearer" = [])))]
pub(crate) async fn assign_order(st: State, auth: Auth, path: web::Path<String>, body: web::Json<AssignReq>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = order_id(&path)?;
    let courier = courier_id(&body.courier_id)?;
    let o = st.fleet.assign(&auth.tenant, &id, &courier, auth.who()).await?;
    Ok(HttpResponse::Ok().json(OrderDto::from(o.as_ref())))
}

/// Takes an order back from its courier, before pickup, and hands it to dispatch again.
///
/// For a courier gone silent, or one that cannot make it: an order `offered`, `assigned` or
/// `at_pickup` goes back to `created`, the courier is told (`order_update`) and is not offered
/// it again, and the order's wait for a courier (30 minutes before it expires) restarts. The audit event
/// is `order.released`. Dispatchers and admins; a courier hands an order back itself with
/// `{"t":"order_event","event":"released"}`. 409 once the goods are on board.
#[utoipa::path(post, path = "/v1/orders/{id}/release", params(("id" = String, Path)), responses((status = 200, body = OrderDto), (status = 403), (status = 404), (status = 409)), security(("bearer" = [])))]
pub(crate) async fn release_order(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = order_id(&path)?;
    let o = st.fleet.command(&auth.tenant, &id, Command::Release { courier: None }, auth.who()).await?;
    Ok(HttpResponse::Ok().json(OrderDto::from(o.as_ref())))
}

/// Registers a courier or changes its profile (the fields given; the others are kept).
///
/// Dispatchers and admins of the tenant. A courier may change its own `name` and `on_shift`
/// only: its `capacity` and `vehicle` decide what dispatch gives it, and its `device_id` which
/// tracker reports as it (and whose key it may read), so they are staff's to set (403).
#[utoipa::path(put, path = "/v1/couriers/{id}", params(("id" = String, Path)), request_body = CourierPutReq, responses((status = 200, body = CourierDto), (status = 400), (status = 403), (status = 409)), security(("bearer" = [])))]
pub(crate) async fn put_courier(st: State, auth: Auth, path: web::Path<String>, body: web::Json<CourierPutReq>) -> Result<HttpResponse, ApiError> {
    let id = courier_id(&path)?;
    auth.require_self_or_staff(id.as_str())?;
    let b = body.into_inner();
    if !auth.is_staff() && (b.capacity.is_some() || b.vehicle.is_some() || b.device_id.is_some()) {
        return Err(ApiError::forbidden(
            "a courier may change only its name and on_shift; capacity, vehicle and device_id are set by dispatchers and admins",
        ));
    }
    let vehicle = match b.vehicle.as_deref() {
        Some(v) => Some(Vehicle::parse(v).ok_or_else(|| ApiError::bad_request("bad_vehicle", "vehicle must be foot, bike, scooter, car or van"))?),
        None => None,
    };
    if b.capacity.is_some_and(|c| !(1..=100).contains(&c)) {
        return Err(ApiError::bad_request("bad_capacity", "capacity must be 1..=100"));
    }
    if b.device_id.as_deref().is_some_and(|d| !valid_id(d)) {
        return Err(ApiError::bad_request("bad_device_id", "device_id must be 1-64 characters of [A-Za-z0-9_.:-]"));
    }
    if b.name.as_ref().is_some_and(|n| n.chars().count() > 200) {
        return Err(ApiError::bad_request("bad_name", "name is longer than 200 characters"));
    }
    if b.name.as_deref().is_some_and(crate::dto::has_control_chars) {
        return Err(ApiError::bad_request("bad_name", "name contains control characters"));
    }
    // With several nodes, the couriers of markets run elsewhere are not in this node's device
    // map (the fleet checks that one): the store knows every market's.
    if st.markets.is_some()
        && let Some(d) = b.device_id.as_deref()
        && let Some((t, c)) = st.store.device_courier(d).await?
        && (t != auth.tenant || c != id)
    {
        return Err(hexfleet_actors::FleetError::Conflict(format!("device {d} belongs to another courier")).into());
    }
    let patch = CourierPatch { name: b.name, vehicle, capacity: b.capacity, device_id: b.device_id, on_shift: b.on_shift };
    let fleet = st.fleet.clone();
    let tenant = auth.tenant.clone();
    let who = auth.who();
    let rec = st.on_main(async move { fleet.upsert_courier(&tenant, &id, patch, &who).await }).await??;
    Ok(HttpResponse::Ok().json(CourierDto::from(&rec)))
}

#[utoipa::path(get, path = "/v1/couriers/{id}", params(("id" = String, Path)), responses((status = 200, body = CourierDto), (status = 404)), security(("bearer" = [])))]
pub(crate) async fn get_courier(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = courier_id(&path)?;
    auth.require_self_or_staff(id.as_str())?;
    let rec = st.fleet.courier(&auth.tenant, &id)?;
    Ok(HttpResponse::Ok().json(CourierDto::from(&rec)))
}

/// A courier's recent positions, from memory.
///
/// The last fixes the courier's actor kept (`--trail-len`, 32 by default), oldest first, late
/// fixes in their time order; for breadcrumbs on a map. Older positions are in the location
/// history (`/history`). Dispatchers and admins of the tenant, or the courier itself.
#[utoipa::path(get, path = "/v1/couriers/{id}/trail", params(("id" = String, Path)), responses((status = 200, body = TrailDto), (status = 403), (status = 404)), security(("bearer" = [])))]
pub(crate) async fn get_trail(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = courier_id(&path)?;
    auth.require_self_or_staff(id.as_str())?;
    let trail = st.fleet.trail(&auth.tenant, &id).await?;
    Ok(HttpResponse::Ok().json(TrailDto { courier_id: id.to_string(), items: trail.iter().map(PositionDto::from).collect() }))
}

/// The key the courier's OsmAnd/Traccar device must send with its reports.
///
/// Derived from the JWT secret, the tenant, the courier and its `device_id` (set with `PUT` by
/// staff), so it is the same on every node and is not stored. To revoke it, give the courier a
/// new device id (a device given to another courier has another key too). Configure the device's server URL as `https://HOST/osmand?key=KEY`. 409 when the courier
/// has no device id. Dispatchers and admins of the tenant, or the courier itself.
#[utoipa::path(get, path = "/v1/couriers/{id}/device-key", params(("id" = String, Path)), responses((status = 200, body = crate::dto::DeviceKeyDto), (status = 403), (status = 404), (status = 409)), security(("bearer" = [])))]
pub(crate) async fn device_key(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = courier_id(&path)?;
    auth.require_self_or_staff(id.as_str())?;
    let rec = st.fleet.courier(&auth.tenant, &id)?;
    let Some(device_id) = rec.device_id.clone() else {
        return Err(hexfleet_actors::FleetError::Conflict(format!("courier {id} has no device_id")).into());
    };
    let key = st.keys.device_key(auth.tenant.as_str(), id.as_str(), &device_id);
    Ok(HttpResponse::Ok().json(crate::dto::DeviceKeyDto { courier_id: id.to_string(), device_id, key }))
}

#[derive(Debug, Deserialize)]
pub(crate) struct NearbyQuery {
    lat: f64,
    lng: f64,
    k: Option<usize>,
    radius_m: Option<f64>,
}

/// Most couriers one `nearby` answers with.
pub const MAX_NEARBY: usize = 500;

#[utoipa::path(get, path = "/v1/couriers/nearby", params(("lat" = f64, Query, minimum = -90.0, maximum = 90.0), ("lng" = f64, Query, minimum = -180.0, maximum = 180.0), ("k" = Option<usize>, Query, minimum = 1, maximum = 500, description = "How many (default 10)"), ("radius_m" = Option<f64>, Query, exclusive_minimum = 0.0, description = "Only couriers within this many metres")), responses((status = 200, body = crate::dto::NearbyListDto), (status = 400), (status = 403)), security(("bearer" = [])))]
pub(crate) async fn nearby(st: State, auth: Auth, q: web::Query<NearbyQuery>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let at = LatLngDto { lat: q.lat, lng: q.lng }.to_domain()?;
    let k = q.k.unwrap_or(10);
    if !(1..=MAX_NEARBY).contains(&k) {
        return Err(ApiError::bad_request("bad_k", format!("k must be 1..={MAX_NEARBY}")));
    }
    if q.radius_m.is_some_and(|r| !r.is_finite() || r <= 0.0) {
        return Err(ApiError::bad_request("bad_radius", "radius_m must be a positive number"));
    }
    let items: Vec<NearbyDto> = st
        .fleet
        .nearby(&auth.tenant, at, k, q.radius_m)
        .await
        .into_iter()
        .map(|n| NearbyDto { courier: CourierDto::from(&n.courier), distance_m: (n.distance_m * 10.0).round() / 10.0 })
        .collect();
    Ok(HttpResponse::Ok().json(crate::dto::NearbyListDto { items }))
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    entity: Option<String>,
    id: Option<String>,
    since: Option<i64>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/events", params(("entity" = Option<String>, Query, pattern = "^(order|courier|zone|webhook)$", description = "With id: one entity's events"), ("id" = Option<String>, Query, description = "With entity"), ("since" = Option<i64>, Query, description = "Events after this seq"), ("limit" = Option<i64>, Query, minimum = 0, maximum = 4_294_967_295_i64, description = "At most this many (default 100); above 1,000 is taken as 1,000, 0 as 1")), responses((status = 200, body = crate::dto::EventListDto)), security(("bearer" = [])))]
pub(crate) async fn events(st: State, auth: Auth, q: web::Query<EventsQuery>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let entity = match (&q.entity, &q.id) {
        (Some(e), Some(id)) => {
            let kind = EntityKind::parse(e).ok_or_else(|| ApiError::bad_request("bad_entity", "entity must be order, courier, zone or webhook"))?;
            Some((kind, id.clone()))
        }
        (None, None) => None,
        _ => return Err(ApiError::bad_request("bad_entity", "entity and id go together")),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let evs = st.fleet.ctx().store.events(EventQuery { tenant: auth.tenant.clone(), entity, since_seq: q.since, limit }).await?;
    let items = evs.into_iter().map(crate::dto::EventDto::from).collect();
    Ok(HttpResponse::Ok().json(crate::dto::EventListDto { items }))
}

// ---- OsmAnd / Traccar Client ----

async fn osmand_get(st: State, req: HttpRequest) -> HttpResponse {
    let parsed = osmand::parse_query(req.query_string(), st.fleet.now_ms()).map(|f| vec![f]);
    let key = osmand::key_of(req.query_string());
    osmand_report(&st, &req, web::Bytes::new(), parsed, key, StatusCode::BAD_REQUEST).await
}

async fn osmand_post(st: State, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    // Read here rather than by the `Bytes` extractor, whose refusal of a large body is a plain
    // text 413, not the error shape.
    let body = match payload.to_bytes_limited(MAX_JSON_BODY).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return osmand_err(StatusCode::BAD_REQUEST, "bad_request", &format!("body not read: {e}")),
        Err(_) => return osmand_err(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &format!("body larger than {MAX_JSON_BODY} bytes")),
    };
    let now = st.fleet.now_ms();
    let json = req.headers().get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/json"));
    let q = req.query_string();
    if json {
        let parsed = osmand::parse_json(&body, now);
        return osmand_report(&st, &req, body, parsed, osmand::key_of(q), StatusCode::NOT_FOUND).await;
    }
    // As Traccar: the query if it holds the report, else the form body (the URL may then hold
    // only the device key).
    let form = if osmand::names_device(q) {
        q
    } else {
        match std::str::from_utf8(&body) {
            Ok(form) => form,
            Err(_) => return osmand_err(StatusCode::BAD_REQUEST, "bad_request", "body is not utf-8"),
        }
    };
    let parsed = osmand::parse_query(form, now).map(|f| vec![f]);
    let key = osmand::key_of(form).or_else(|| osmand::key_of(q));
    osmand_report(&st, &req, body, parsed, key, StatusCode::BAD_REQUEST).await
}

/// One parsed report: refused if it did not parse, forwarded if another node owns its
/// device's market, else ingested here (`unknown`: the status for an unregistered device).
async fn osmand_report(
    st: &AppState,
    req: &HttpRequest,
    body: web::Bytes,
    parsed: Result<Vec<osmand::OsmandFix>, osmand::OsmandError>,
    key: Option<String>,
    unknown: StatusCode,
) -> HttpResponse {
    let fixes = match parsed {
        Ok(f) => f,
        Err(e) => return osmand_err(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    let owners = match osmand_authorize(st, &fixes, key.as_deref(), unknown).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    if let Some(r) = osmand_forward(st, req, body, &fixes).await {
        return r;
    }
    osmand_ingest(st, &fixes, &owners, unknown)
}

/// Every device of a report must be registered and match `key` ([`crate::auth::Keys::device_key`]);
/// with `--osmand-keyless` a report without a key is taken too. Checked on the node the device
/// reached, before a report is forwarded: forwarding (a 503 `market_moving`, or a hop to the
/// owner) told a registered device from an unknown one. A missing or wrong key is answered as
/// an unknown device (same status, same message), with the HMAC computed for unknown devices
/// too; it is counted in `hexfleet_osmand_bad_key_total` (logged at debug level only: anyone
/// who knows a device id could fill the log). Returns each device's courier and tenant, the
/// ones its key was checked against.
async fn osmand_authorize<'a>(
    st: &AppState,
    fixes: &'a [osmand::OsmandFix],
    key: Option<&str>,
    unknown: StatusCode,
) -> Result<Vec<(&'a str, (TenantId, CourierId))>, HttpResponse> {
    let mut checked: Vec<(&str, (TenantId, CourierId))> = Vec::new();
    for f in fixes {
        let device = f.device_id.as_str();
        if checked.iter().any(|(d, _)| *d == device) {
            continue;
        }
        let local = st.fleet.device(device);
        let from_store = local.is_none();
        let mut owner = match (local, &st.markets) {
            (Some(owner), _) => Some(owner),
            (None, Some(m)) => m.device_owner(device).await.map_err(|e| osmand_err(e.status, e.code, &e.message))?,
            (None, None) => None,
        };
        let allows = |owner: &Option<(TenantId, CourierId)>| match (key, owner) {
            (Some(k), o) => {
                // For an unknown device the MAC is computed all the same (and fails).
                let (t, c) = o.as_ref().map_or(("", ""), |(t, c)| (t.as_str(), c.as_str()));
                st.keys.device_key_matches(t, c, device, k) && o.is_some()
            }
            (None, o) => st.osmand_keyless && o.is_some(),
        };
        let mut allowed = allows(&owner);
        // A key refused against an owner cached a while ago is checked once more against the
        // store: the device may have gone to another courier since (whose key this is).
        if !allowed
            && key.is_some()
            && from_store
            && let Some(m) = &st.markets
            && m.forget_stale_device(device)
        {
            owner = m.device_owner(device).await.map_err(|e| osmand_err(e.status, e.code, &e.message))?;
            allowed = allows(&owner);
        }
        if !allowed {
            if owner.is_some() {
                metrics::counter!("hexfleet_osmand_bad_key_total").increment(1);
                tracing::debug!(device, key_sent = key.is_some(), "OsmAnd report refused: device key missing or wrong");
            }
            return Err(osmand_unknown(unknown, device));
        }
        checked.extend(owner.map(|o| (device, o)));
    }
    Ok(checked)
}

/// The answer to a report from an unregistered device, or one without its key.
fn osmand_unknown(status: StatusCode, device: &str) -> HttpResponse {
    osmand_err(status, "unknown_device", &format!("device {device} is not registered to a courier, or the report's key (`key=`) is missing or wrong"))
}

/// With market leases: a report goes to the node owning its devices' market (devices carry no
/// token, so the middleware cannot route them). A device known here must have its market
/// served here now: a node that stepped down, or whose market moved, keeps its device map, and
/// a report it took would answer 200 and then be lost (OsmAnd and Traccar clients drop what
/// was answered 200). A device unknown here is looked up in the store. A batch is forwarded
/// whole, to the first owner found elsewhere.
async fn osmand_forward(st: &AppState, req: &HttpRequest, body: web::Bytes, fixes: &[osmand::OsmandFix]) -> Option<HttpResponse> {
    let markets = st.markets.as_ref()?;
    let mut checked: Vec<TenantId> = Vec::new();
    let mut unknown = None;
    for f in fixes {
        let Some((tenant, _)) = st.fleet.device(&f.device_id) else {
            unknown = unknown.or(Some(&f.device_id));
            continue;
        };
        if checked.contains(&tenant) {
            continue;
        }
        match markets.route(&tenant).await {
            Ok(crate::markets::Route::Local) => checked.push(tenant),
            Ok(crate::markets::Route::Remote(owner)) => return Some(osmand_forward_to(markets, &owner, req, body).await),
            Err(e) => return Some(osmand_err(e.status, e.code, &e.message)),
        }
    }
    match markets.route_device(unknown?).await {
        Ok(None) => None,
        Ok(Some(owner)) => Some(osmand_forward_to(markets, &owner, req, body).await),
        Err(e) => Some(osmand_err(e.status, e.code, &e.message)),
    }
}

/// Forwards a report to `owner`, unless it was forwarded once already or `owner` is this node
/// (a lease not yet changed hands): 503 then.
async fn osmand_forward_to(markets: &crate::markets::Markets, owner: &str, req: &HttpRequest, body: web::Bytes) -> HttpResponse {
    if req.headers().contains_key(crate::markets::FORWARDED) || markets.is_self(owner) {
        return osmand_err(StatusCode::SERVICE_UNAVAILABLE, "market_moving", "the device's market is changing owner; retry");
    }
    metrics::counter!("hexfleet_market_forwarded_total").increment(1);
    markets.forward(owner, req, body).await
}

fn osmand_err(status: StatusCode, code: &'static str, msg: &str) -> HttpResponse {
    metrics::counter!("hexfleet_osmand_rejected_total").increment(1);
    actix_web::ResponseError::error_response(&ApiError::new(status, code, msg))
}

/// Maps device ids to couriers and ingests with the same checks as the courier socket. A fix
/// of a known device that fails them (a clock far ahead, a fix a week old, a negative speed) is
/// dropped and counted (`hexfleet_osmand_dropped_total{reason}`), and the report still answers
/// 200: Traccar Client and OsmAnd keep a position until it is answered 200 and send the oldest
/// first, so a 400 for one bad fix stopped the device's reports for good. The devices' keys
/// were checked first ([`osmand_authorize`], which gives `owners`): a device registered to
/// another courier since is answered as unknown, its key being the old courier's.
fn osmand_ingest(st: &AppState, fixes: &[osmand::OsmandFix], owners: &[(&str, (TenantId, CourierId))], unknown: StatusCode) -> HttpResponse {
    let now = st.fleet.now_ms();
    let mut by_courier: Vec<((TenantId, CourierId), Vec<hexfleet_actors::domain::Fix>)> = Vec::new();
    for f in fixes {
        let owner = st.fleet.device(&f.device_id).filter(|o| owners.iter().any(|(d, k)| *d == f.device_id && k == o));
        let Some(owner) = owner else {
            return osmand_unknown(unknown, &f.device_id);
        };
        let loc = LocDto { lat: f.lat, lng: f.lng, ts: f.ts_ms, speed: f.speed_mps, heading: f.heading, acc: f.accuracy };
        let fix = match loc.to_fix(now) {
            Ok(fix) => fix,
            Err(e) => {
                metrics::counter!("hexfleet_osmand_dropped_total", "reason" => e.code).increment(1);
                tracing::debug!(device = %f.device_id, code = e.code, message = %e.message, "OsmAnd fix dropped");
                continue;
            }
        };
        match by_courier.iter_mut().find(|(k, _)| *k == owner) {
            Some((_, v)) => v.push(fix),
            None => by_courier.push((owner, vec![fix])),
        }
    }
    for ((tenant, courier), fixes) in by_courier {
        let n = fixes.len() as u64;
        if let Err(e) = st.fleet.ingest(&tenant, &courier, fixes) {
            let e = ApiError::from(e);
            return osmand_err(e.status, e.code, &e.message);
        }
        metrics::counter!("hexfleet_osmand_fixes_total").increment(n);
    }
    HttpResponse::Ok().finish()
}

// ---- operations ----

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

async fn readyz(st: State) -> HttpResponse {
    if st.shutdown.is_cancelled() {
        return HttpResponse::ServiceUnavailable().json(json!({ "status": "shutting_down" }));
    }
    match st.store.ping().await {
        Ok(()) => HttpResponse::Ok().json(json!({ "status": "ready", "store": st.store.backend() })),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({ "status": "store_unavailable", "error": e.to_string() })),
    }
}

async fn metrics(st: State) -> HttpResponse {
    let (couriers, orders) = st.fleet.counts();
    let (ws_c, ws_t, ws_k) = st.broker.session_counts();
    metrics::gauge!("hexfleet_couriers").set(couriers as f64);
    metrics::gauge!("hexfleet_open_orders").set(orders as f64);
    metrics::gauge!("hexfleet_ws_sessions", "kind" => "courier").set(ws_c as f64);
    metrics::gauge!("hexfleet_ws_sessions", "kind" => "track").set(ws_t as f64);
    metrics::gauge!("hexfleet_ws_sessions", "kind" => "console").set(ws_k as f64);
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(st.metrics.render())
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(crate::openapi::spec_json())
}

/// A hexagon, as SVG (browsers accept it at `/favicon.ico` by its content type).
const FAVICON: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><polygon points="16,2 28,9 28,23 16,30 4,23 4,9" fill="#0f766e"/><circle cx="16" cy="16" r="5" fill="#fff"/></svg>"##;

async fn favicon() -> HttpResponse {
    HttpResponse::Ok().content_type("image/svg+xml").insert_header(("cache-control", "public, max-age=86400")).body(FAVICON)
}

async fn console_page() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(include_str!("../static/console.html"))
}

use hexfleet_actors::store::Store as _;
