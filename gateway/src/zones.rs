//! `/v1/zones`: zones (service areas and other geofences) as GeoJSON Features.
//!
//! - `PUT /v1/zones/{id}`: a GeoJSON Feature whose geometry is a `Polygon` or `MultiPolygon`
//!   (holes allowed) and whose `properties.kind` is required (`service_area` restricts where
//!   orders may be created; anything else is a plain geofence); `properties.name` is optional.
//!   201 when created, 200 when replaced; the answer is the stored zone.
//! - `GET /v1/zones` → `{"items":[Feature…]}`; `GET /v1/zones/{id}` → Feature;
//!   `DELETE /v1/zones/{id}` → 204.
//!
//! Returned Features always carry a `MultiPolygon` and, in `properties`, the live `supply`
//! (available couriers inside), `demand` (orders waiting for a courier with their pickup
//! inside) and `surge` (demand / max(supply, 1)). Dispatchers and admins only, tenant-scoped.
//!
//! Validation (400 with the usual error shape): well-formed GeoJSON Feature, Polygon or
//! MultiPolygon only, every ring closed (first position = last) with at least 4 positions,
//! finite coordinates with |lng| ≤ 180 and |lat| ≤ 90, at most [`MAX_POLYGONS`] polygons,
//! [`MAX_RINGS`] rings per polygon and [`MAX_VERTICES`] positions in all; the body itself is
//! limited to [`crate::api::MAX_JSON_BODY`] (413 beyond). NaN and infinities are not JSON, so
//! they fail as malformed JSON.

use actix_web::{HttpResponse, web};
use geo::{Coord, LineString, MultiPolygon, Polygon};
use hexfleet_actors::domain::{ZoneId, ZoneRecord, valid_id};
use hexfleet_actors::zone::AreaStats;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::{Auth, Role};
use crate::error::ApiError;
use crate::server::AppState;

type State = web::Data<AppState>;

/// Most polygons in one zone.
pub const MAX_POLYGONS: usize = 100;
/// Most rings (exterior + holes) per polygon.
pub const MAX_RINGS: usize = 100;
/// Most positions in one zone, all rings together.
pub const MAX_VERTICES: usize = 20_000;
/// Longest `properties.name`.
pub const MAX_NAME: usize = 200;

/// A zone on the wire: a GeoJSON Feature.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ZoneDto {
    /// Always `Feature`.
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub id: String,
    /// A GeoJSON `MultiPolygon`.
    #[schema(value_type = Object)]
    pub geometry: Value,
    pub properties: ZonePropsDto,
}

/// `properties` of a zone Feature.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ZonePropsDto {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub updated_at: i64,
    /// Available couriers inside.
    pub supply: usize,
    /// Orders waiting for a courier whose pickup is inside.
    pub demand: usize,
    /// demand / max(supply, 1).
    pub surge: f64,
}

/// `PUT /v1/zones/{id}` body as the OpenAPI document gives it; the handler reads the body with
/// the `geojson` crate ([`parse_feature`]), which checks what a schema cannot say: rings are
/// closed, have at least 4 positions, and the sizes stay within bounds.
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // read by no code: it documents the body
pub struct ZonePutDoc {
    #[serde(rename = "type")]
    #[schema(pattern = "^Feature$")]
    type_: String,
    geometry: ZoneGeometryDoc,
    properties: ZonePutPropsDoc,
}

/// A GeoJSON `Polygon` (coordinates: rings of `[lng, lat]` positions, the first the outer
/// boundary, each closed) or `MultiPolygon` (a list of those).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ZoneGeometryDoc {
    #[serde(rename = "type")]
    #[schema(pattern = "^(Polygon|MultiPolygon)$")]
    type_: String,
    #[schema(min_items = 1)]
    coordinates: Vec<Vec<Value>>,
}

/// `properties` of a zone Feature sent: `kind` (`service_area`, or any other label), `name`.
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ZonePutPropsDoc {
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$", min_length = 1, max_length = 64, example = "service_area")]
    kind: String,
    #[schema(max_length = 200, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    name: Option<String>,
}

/// `GET /v1/zones` answer.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ZoneListDto {
    pub items: Vec<ZoneDto>,
}

impl ZoneDto {
    pub fn new(z: &ZoneRecord, stats: Option<AreaStats>) -> Self {
        let s = stats.unwrap_or_default();
        ZoneDto {
            type_: "Feature",
            id: z.id.to_string(),
            geometry: multi_polygon_json(&z.geometry),
            properties: ZonePropsDto {
                kind: z.kind.clone(),
                name: z.name.clone(),
                updated_at: z.updated_at,
                supply: s.supply,
                demand: s.demand,
                surge: s.surge,
            },
        }
    }
}

/// A `MultiPolygon` as GeoJSON.
pub fn multi_polygon_json(mp: &MultiPolygon<f64>) -> Value {
    let ring = |l: &LineString<f64>| l.0.iter().map(|c| json!([c.x, c.y])).collect::<Vec<_>>();
    let polys: Vec<Value> = mp
        .0
        .iter()
        .map(|p| Value::Array(std::iter::once(p.exterior()).chain(p.interiors()).map(|l| Value::Array(ring(l))).collect()))
        .collect();
    json!({ "type": "MultiPolygon", "coordinates": polys })
}

/// A zone as the console draws it (no live counts; `GET /v1/zones` has them).
pub fn console_feature(z: &ZoneRecord) -> Value {
    json!({ "type": "Feature", "id": z.id.as_str(), "geometry": multi_polygon_json(&z.geometry),
        "properties": { "kind": z.kind, "name": z.name, "updated_at": z.updated_at } })
}

fn zone_id(raw: &str) -> Result<ZoneId, ApiError> {
    if valid_id(raw) { Ok(ZoneId::new(raw)) } else { Err(ApiError::bad_request("bad_id", "invalid zone id")) }
}

fn bad(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, msg)
}

/// Parses and validates a zone Feature: (geometry, kind, name).
pub fn parse_feature(body: Value) -> Result<(MultiPolygon<f64>, String, Option<String>), ApiError> {
    let feature: geojson::Feature =
        serde_json::from_value(body).map_err(|e| bad("invalid_geojson", format!("expected a GeoJSON Feature: {e}")))?;
    let props = feature.properties.as_ref();
    let kind = match props.and_then(|p| p.get("kind")) {
        Some(Value::String(k)) if valid_id(k) => k.clone(),
        Some(_) => return Err(bad("bad_kind", "properties.kind must be 1-64 characters of [A-Za-z0-9_.:-]")),
        None => return Err(bad("missing_kind", "properties.kind is required (e.g. \"service_area\")")),
    };
    let name = match props.and_then(|p| p.get("name")) {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if n.chars().count() <= MAX_NAME && !crate::dto::has_control_chars(n) => Some(n.clone()),
        Some(_) => return Err(bad("bad_name", format!("properties.name must be a string of at most {MAX_NAME} characters, none of them control characters"))),
    };
    let geometry = feature.geometry.ok_or_else(|| bad("invalid_geojson", "the Feature has no geometry"))?;
    let polys = match geometry.value {
        geojson::GeometryValue::Polygon { coordinates } => vec![coordinates],
        geojson::GeometryValue::MultiPolygon { coordinates } => coordinates,
        other => {
            return Err(bad("unsupported_geometry", format!("geometry must be a Polygon or MultiPolygon, not {}", other.type_name())));
        }
    };
    if polys.is_empty() {
        return Err(bad("invalid_geometry", "the geometry has no polygon"));
    }
    if polys.len() > MAX_POLYGONS {
        return Err(bad("too_large", format!("at most {MAX_POLYGONS} polygons per zone")));
    }
    let mut vertices = 0usize;
    let mut out = Vec::with_capacity(polys.len());
    for (pi, rings) in polys.iter().enumerate() {
        if rings.is_empty() {
            return Err(bad("invalid_geometry", format!("polygon {pi} has no ring")));
        }
        if rings.len() > MAX_RINGS {
            return Err(bad("too_large", format!("at most {MAX_RINGS} rings per polygon")));
        }
        let mut lines = Vec::with_capacity(rings.len());
        for (ri, ring) in rings.iter().enumerate() {
            vertices += ring.len();
            if vertices > MAX_VERTICES {
                return Err(bad("too_large", format!("at most {MAX_VERTICES} positions per zone")));
            }
            if ring.len() < 4 {
                return Err(bad("invalid_geometry", format!("polygon {pi} ring {ri} has fewer than 4 positions")));
            }
            let mut coords = Vec::with_capacity(ring.len());
            for p in ring {
                let s = p.as_slice();
                if s.len() < 2 {
                    return Err(bad("bad_coordinates", "a position needs a longitude and a latitude"));
                }
                let (lng, lat) = (s[0], s[1]);
                if !(lng.is_finite() && lat.is_finite() && (-180.0..=180.0).contains(&lng) && (-90.0..=90.0).contains(&lat)) {
                    return Err(bad("bad_coordinates", format!("position [{lng}, {lat}] is not a valid longitude, latitude")));
                }
                coords.push(Coord { x: lng, y: lat });
            }
            if coords.first() != coords.last() {
                return Err(bad("open_ring", format!("polygon {pi} ring {ri} is not closed (its last position must equal its first)")));
            }
            lines.push(LineString::new(coords));
        }
        let exterior = lines.remove(0);
        out.push(Polygon::new(exterior, lines));
    }
    Ok((MultiPolygon::new(out), kind, name))
}

fn dto(st: &AppState, z: &ZoneRecord) -> ZoneDto {
    ZoneDto::new(z, st.fleet.zone_stats(&z.tenant, &z.id))
}

#[utoipa::path(put, path = "/v1/zones/{id}", params(("id" = String, Path)),
    request_body(content = ZonePutDoc, description = "GeoJSON Feature: Polygon or MultiPolygon geometry, properties.kind (required), properties.name"),
    responses((status = 201, body = ZoneDto), (status = 200, body = ZoneDto), (status = 400), (status = 403), (status = 503)),
    security(("bearer" = [])))]
pub(crate) async fn put_zone(st: State, auth: Auth, path: web::Path<String>, body: web::Json<Value>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = zone_id(&path)?;
    let (geometry, kind, name) = parse_feature(body.into_inner())?;
    let existed = st.fleet.zone(&auth.tenant, &id).is_ok();
    let rec = ZoneRecord { tenant: auth.tenant.clone(), id, kind, name, geometry, updated_at: 0 };
    let fleet = st.fleet.clone();
    let tenant = auth.tenant.clone();
    let who = auth.who();
    let z = st.on_main(async move { fleet.put_zone(&tenant, rec, &who).await }).await??;
    let body = dto(&st, &z);
    Ok(if existed { HttpResponse::Ok().json(body) } else { HttpResponse::Created().json(body) })
}

#[utoipa::path(get, path = "/v1/zones", responses((status = 200, body = ZoneListDto), (status = 403)), security(("bearer" = [])))]
pub(crate) async fn list_zones(st: State, auth: Auth) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let items = st.fleet.zones(&auth.tenant).iter().map(|z| dto(&st, z)).collect();
    Ok(HttpResponse::Ok().json(ZoneListDto { items }))
}

#[utoipa::path(get, path = "/v1/zones/{id}", params(("id" = String, Path)), responses((status = 200, body = ZoneDto), (status = 404)), security(("bearer" = [])))]
pub(crate) async fn get_zone(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let z = st.fleet.zone(&auth.tenant, &zone_id(&path)?)?;
    Ok(HttpResponse::Ok().json(dto(&st, &z)))
}

#[utoipa::path(delete, path = "/v1/zones/{id}", params(("id" = String, Path)), responses((status = 204), (status = 404), (status = 503)), security(("bearer" = [])))]
pub(crate) async fn delete_zone(st: State, auth: Auth, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    auth.require(&[Role::Dispatcher, Role::Admin])?;
    let id = zone_id(&path)?;
    let fleet = st.fleet.clone();
    let tenant = auth.tenant.clone();
    let who = auth.who();
    st.on_main(async move { fleet.delete_zone(&tenant, &id, &who).await }).await??;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(coords: Value) -> Value {
        json!({"type":"Feature","properties":{"kind":"hub"},"geometry":{"type":"Polygon","coordinates":coords}})
    }

    #[test]
    fn parses_polygons_with_holes_and_refuses_bad_ones() {
        let ok = feature(json!([[[0,0],[1,0],[1,1],[0,1],[0,0]],[[0.2,0.2],[0.4,0.2],[0.4,0.4],[0.2,0.2]]]));
        let (mp, kind, name) = parse_feature(ok).unwrap();
        assert_eq!((mp.0.len(), mp.0[0].interiors().len(), kind.as_str(), name), (1, 1, "hub", None));
        let code = |v: Value| parse_feature(v).unwrap_err().code;
        assert_eq!(code(feature(json!([[[0,0],[1,0],[1,1],[0,1]]]))), "open_ring");
        assert_eq!(code(feature(json!([[[0,0],[1,0],[0,0]]]))), "invalid_geometry");
        assert_eq!(code(feature(json!([[[0,0],[181,0],[1,1],[0,0]]]))), "bad_coordinates");
        assert_eq!(code(feature(json!([[[0,0],[1,91],[1,1],[0,0]]]))), "bad_coordinates");
        assert_eq!(code(json!({"type":"Feature","properties":{},"geometry":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,0]]]}})), "missing_kind");
        assert_eq!(code(json!({"type":"Feature","properties":{"kind":"x"},"geometry":{"type":"Point","coordinates":[0,0]}})), "unsupported_geometry");
        assert_eq!(code(json!({"type":"Polygon","coordinates":[]})), "invalid_geojson");
    }
}
