//! Wire types: the JSON the outside world sends and receives, and their conversions to and
//! from domain types. Validation of coordinates and timestamps happens here, at the edge.

use std::sync::Arc;

use hexfleet_actors::domain::{
    AssignmentRecord, CourierRecord, Fix, LatLng, Ms, Order, OrderId, valid_id,
};
use hexfleet_actors::publish::{CourierNotice, RouteStop};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// A coordinate on the wire.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LatLngDto {
    /// Degrees north, WGS 84.
    #[schema(minimum = -90.0, maximum = 90.0)]
    pub lat: f64,
    /// Degrees east, WGS 84.
    #[schema(minimum = -180.0, maximum = 180.0)]
    pub lng: f64,
}

impl LatLngDto {
    /// Validates: finite, |lat| ≤ 90, |lng| ≤ 180.
    pub fn to_domain(self) -> Result<LatLng, ApiError> {
        LatLng::new(self.lat, self.lng).map_err(|e| ApiError::bad_request("bad_coordinates", e.to_string()))
    }
}

impl From<LatLng> for LatLngDto {
    fn from(p: LatLng) -> Self {
        LatLngDto { lat: p.lat, lng: p.lng }
    }
}

/// Fixes may be at most this far in the future (device clock skew).
pub const MAX_FUTURE_MS: Ms = 60_000;
/// Fixes older than this are refused (a week of offline buffering).
pub const MAX_PAST_MS: Ms = 7 * 24 * 3_600_000;

/// One `loc` from a courier app.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct LocDto {
    pub lat: f64,
    pub lng: f64,
    pub ts: Ms,
    #[serde(default)]
    pub speed: Option<f32>,
    #[serde(default)]
    pub heading: Option<f32>,
    #[serde(default)]
    pub acc: Option<f32>,
}

impl LocDto {
    /// Validates coordinates, time window and optional fields.
    pub fn to_fix(self, now: Ms) -> Result<Fix, ApiError> {
        let pos = LatLngDto { lat: self.lat, lng: self.lng }.to_domain()?;
        if self.ts > now + MAX_FUTURE_MS {
            return Err(ApiError::bad_request("bad_timestamp", "ts is too far in the future"));
        }
        if self.ts < now - MAX_PAST_MS {
            return Err(ApiError::bad_request("bad_timestamp", "ts is too old"));
        }
        let finite = |v: Option<f32>| v.filter(|x| x.is_finite());
        if self.speed.is_some_and(|s| !s.is_finite() || s < 0.0) || self.heading.is_some_and(|h| !h.is_finite())
            || self.acc.is_some_and(|a| !a.is_finite() || a < 0.0)
        {
            return Err(ApiError::bad_request("bad_value", "speed, heading and acc must be finite and not negative"));
        }
        Ok(Fix { pos, ts: self.ts, speed: finite(self.speed), heading: finite(self.heading).map(|h| h.rem_euclid(360.0)), acc: finite(self.acc) })
    }
}

/// Maximum fixes in one `locs` batch.
pub const MAX_BATCH: usize = 100;

/// Messages a courier app sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum CourierIn {
    Loc(LocDto),
    Locs { items: Vec<LocDto> },
    Status { status: String },
    OfferReply { order_id: String, accept: bool },
    OrderEvent { order_id: String, event: String },
}

/// A stop in a route.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StopDto {
    pub order_id: String,
    pub kind: String,
    pub lat: f64,
    pub lng: f64,
}

impl From<&RouteStop> for StopDto {
    fn from(s: &RouteStop) -> Self {
        StopDto { order_id: s.order.to_string(), kind: if s.pickup { "pickup" } else { "dropoff" }.into(), lat: s.pos.lat, lng: s.pos.lng }
    }
}

/// Why an order went where it went.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AssignmentDto {
    pub at: Ms,
    pub policy: String,
    pub courier_id: String,
    pub cost_s: f64,
    pub candidates: Vec<CandidateDto>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CandidateDto {
    pub courier_id: String,
    pub cost_s: f64,
}

impl From<&AssignmentRecord> for AssignmentDto {
    fn from(a: &AssignmentRecord) -> Self {
        AssignmentDto {
            at: a.at,
            policy: a.policy.clone(),
            courier_id: a.courier.to_string(),
            cost_s: a.cost_s,
            candidates: a.candidates.iter().map(|(c, cost)| CandidateDto { courier_id: c.to_string(), cost_s: *cost }).collect(),
        }
    }
}

/// An order on the wire.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OrderDto {
    pub id: String,
    pub state: String,
    pub pickup: LatLngDto,
    pub dropoff: LatLngDto,
    pub size: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Ms>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliver_by: Option<Ms>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub courier_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offer_expires_at: Option<Ms>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assignment: Option<AssignmentDto>,
    /// When the order was last handed back to dispatch (`release`); staff only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_at: Option<Ms>,
    pub created_at: Ms,
    pub updated_at: Ms,
    pub version: u32,
}

impl From<&Order> for OrderDto {
    fn from(o: &Order) -> Self {
        OrderDto {
            id: o.id.to_string(),
            state: o.state.as_str().into(),
            pickup: o.pickup.into(),
            dropoff: o.dropoff.into(),
            size: o.size,
            ready_at: o.ready_at,
            deliver_by: o.deliver_by,
            courier_id: o.courier.as_ref().map(|c| c.to_string()),
            offered_to: o.offer.as_ref().map(|f| f.courier.to_string()),
            offer_expires_at: o.offer.as_ref().map(|f| f.expires_at),
            assignment: o.assignment.as_ref().map(AssignmentDto::from),
            released_at: o.released_at,
            created_at: o.created_at,
            updated_at: o.updated_at,
            version: o.version,
        }
    }
}

impl OrderDto {
    /// The order as customers and couriers see it: without the dispatch record (the other
    /// candidate couriers and what each would have cost), the open offer (who is being
    /// asked) and when it was last handed back. Dispatchers and admins get [`OrderDto::from`].
    pub fn for_watchers(o: &Order) -> Self {
        OrderDto { offered_to: None, offer_expires_at: None, assignment: None, released_at: None, ..OrderDto::from(o) }
    }

    /// [`OrderDto::for_watchers`] of an order already rendered whole (the `order` of an
    /// update that consoles share): takes out the same fields, which serialise to nothing when
    /// unset.
    pub fn strip_for_watchers(order: &mut serde_json::Value) {
        if let Some(fields) = order.as_object_mut() {
            for k in ["assignment", "offered_to", "offer_expires_at", "released_at"] {
                fields.remove(k);
            }
        }
    }
}

/// An optional integer as JSON Schema (and so the OpenAPI document) reads one: `3` or `3.0`,
/// a number with no fraction, which is what a client writing every number as a double sends.
/// `3.5`, and a value out of the field's range, are refused.
pub fn json_int<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error as _;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    // 2^63 is exact as a double; a whole double below it in magnitude converts exactly.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    let whole = n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < LIMIT).map(|f| f as i64));
    let i = whole.ok_or_else(|| D::Error::custom(format!("invalid value: {n}, expected an integer")))?;
    T::try_from(i).map(Some).map_err(|_| D::Error::custom(format!("invalid value: {n} is out of range")))
}

/// One entry of the event log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventDto {
    /// Position in the tenant's log; `since` takes it.
    pub seq: i64,
    /// `order`, `courier`, `zone` or `webhook`.
    pub entity: String,
    pub entity_id: String,
    /// Dotted name: `order.assigned`, `zone.enter`, `courier.registered`, …
    pub kind: String,
    /// Who did it: `system`, `courier:ID`, `dispatcher:SUB`, …
    pub actor: String,
    pub reason: Option<String>,
    /// Unix ms.
    pub ts: Ms,
    /// The kind's own attributes, as strings.
    pub attrs: std::collections::BTreeMap<String, String>,
}

impl From<hexfleet_actors::store::StoredEvent> for EventDto {
    fn from(s: hexfleet_actors::store::StoredEvent) -> Self {
        let e = s.event;
        EventDto {
            seq: s.seq,
            entity: e.entity.as_str().to_owned(),
            entity_id: e.entity_id,
            kind: e.kind,
            actor: e.actor,
            reason: e.reason,
            ts: e.ts,
            attrs: e.attrs.into_iter().collect(),
        }
    }
}

/// `GET /v1/events` answer, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventListDto {
    pub items: Vec<EventDto>,
}

/// `POST /v1/orders` body.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrderReq {
    /// The client's id for the order, which makes the request idempotent; the server picks one
    /// without it.
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$", min_length = 1, max_length = 64)]
    pub id: Option<String>,
    pub pickup: LatLngDto,
    pub dropoff: LatLngDto,
    /// Capacity units it takes (default 1).
    #[schema(minimum = 1, maximum = 100)]
    #[serde(default, deserialize_with = "json_int")]
    pub size: Option<u16>,
    /// When the pickup is ready, Unix ms, within 30 days of now (default: now).
    #[serde(default, deserialize_with = "json_int")]
    pub ready_at: Option<Ms>,
    /// When it must be delivered, Unix ms, within 30 days of now.
    #[serde(default, deserialize_with = "json_int")]
    pub deliver_by: Option<Ms>,
}

impl NewOrderReq {
    pub fn to_domain(self) -> Result<hexfleet_actors::fleet::NewOrder, ApiError> {
        if let Some(id) = &self.id
            && !valid_id(id)
        {
            return Err(ApiError::bad_request("bad_id", "id must be 1-64 characters of [A-Za-z0-9_.:-]"));
        }
        let size = self.size.unwrap_or(1);
        if !(1..=100).contains(&size) {
            return Err(ApiError::bad_request("bad_size", "size must be 1..=100"));
        }
        Ok(hexfleet_actors::fleet::NewOrder {
            id: self.id.map(OrderId::new),
            pickup: self.pickup.to_domain()?,
            dropoff: self.dropoff.to_domain()?,
            size,
            ready_at: self.ready_at,
            deliver_by: self.deliver_by,
        })
    }
}

/// `POST /v1/orders/{id}/assign` body.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
pub struct AssignReq {
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$", min_length = 1, max_length = 64)]
    pub courier_id: String,
}

/// `PUT /v1/couriers/{id}` body.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CourierPutReq {
    /// Up to 200 characters, no control characters.
    #[schema(max_length = 200, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub name: Option<String>,
    #[schema(pattern = "^(foot|bike|scooter|car|van)$")]
    pub vehicle: Option<String>,
    /// Capacity units it carries at once.
    #[schema(minimum = 1, maximum = 100)]
    #[serde(default, deserialize_with = "json_int")]
    pub capacity: Option<u16>,
    /// The OsmAnd/Traccar device id that reports for this courier.
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$", min_length = 1, max_length = 64)]
    pub device_id: Option<String>,
    pub on_shift: Option<bool>,
}

/// A courier on the wire.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CourierDto {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub vehicle: String,
    pub capacity: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: String,
    pub on_shift: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<PositionDto>,
    pub updated_at: Ms,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PositionDto {
    pub lat: f64,
    pub lng: f64,
    pub ts: Ms,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heading: Option<f32>,
}

/// A courier's recent positions, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TrailDto {
    pub courier_id: String,
    pub items: Vec<PositionDto>,
}

/// The key an OsmAnd/Traccar device sends with its reports.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceKeyDto {
    pub courier_id: String,
    pub device_id: String,
    /// 32 hex characters; the device sends it as `key=` (its server URL
    /// `https://HOST/osmand?key=KEY`).
    pub key: String,
}

impl From<&Fix> for PositionDto {
    fn from(f: &Fix) -> Self {
        PositionDto { lat: f.pos.lat, lng: f.pos.lng, ts: f.ts, speed: f.speed, heading: f.heading }
    }
}

impl From<&CourierRecord> for CourierDto {
    fn from(c: &CourierRecord) -> Self {
        CourierDto {
            id: c.id.to_string(),
            name: c.name.clone(),
            vehicle: c.vehicle.as_str().into(),
            capacity: c.capacity,
            device_id: c.device_id.clone(),
            status: c.status.as_str().into(),
            on_shift: c.on_shift,
            position: c.last_fix.as_ref().map(PositionDto::from),
            updated_at: c.updated_at,
        }
    }
}

/// The answer of `GET /v1/couriers/nearby`: nearest first.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NearbyListDto {
    pub items: Vec<NearbyDto>,
}

/// One entry of `GET /v1/couriers/nearby`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NearbyDto {
    pub courier: CourierDto,
    pub distance_m: f64,
}

/// Messages to a courier device, without their `seq` (numbered as the session sends them).
pub fn courier_notice_value(n: &CourierNotice) -> serde_json::Value {
    match n {
        CourierNotice::Offer { order, pickup, dropoff, expires_at } => serde_json::json!({
            "t": "offer", "order_id": order.as_str(), "pickup": LatLngDto::from(*pickup),
            "dropoff": LatLngDto::from(*dropoff), "expires_at": expires_at }),
        CourierNotice::Assigned { order, pickup, dropoff } => serde_json::json!({
            "t": "assigned", "order_id": order.as_str(), "pickup": LatLngDto::from(*pickup),
            "dropoff": LatLngDto::from(*dropoff) }),
        CourierNotice::Route { stops } => serde_json::json!({
            "t": "route", "stops": stops.iter().map(StopDto::from).collect::<Vec<_>>() }),
        CourierNotice::OrderUpdate(o) => order_update_value(o),
    }
}

/// The `order_update` message to a courier (the order as [`OrderDto::for_watchers`]), without
/// its `seq` (numbered as the session sends it).
pub fn order_update_value(o: &Arc<Order>) -> serde_json::Value {
    serde_json::json!({ "t": "order_update", "order_id": o.id.as_str(), "state": o.state.as_str(),
        "courier_id": o.courier.as_ref().map(|c| c.as_str()), "ts": o.updated_at, "order": OrderDto::for_watchers(o.as_ref()) })
}

/// Whether free text (a name, a secret, a URL) holds a control character. They are refused at
/// the edge: PostgreSQL refuses NUL in `text`, which would fail the whole commit group the
/// write was batched with (and answer 503 to a request that is simply wrong).
pub fn has_control_chars(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// An error frame.
pub fn error_json(code: &str, message: &str) -> String {
    serde_json::json!({ "t": "error", "code": code, "message": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexfleet_actors::domain::{AssignmentRecord, CourierId, LatLng, Offer, OrderId, OrderState, TenantId};

    /// The two ways of hiding the dispatch record agree: the order rendered for watchers is
    /// the whole order rendered, with the same fields taken out.
    #[test]
    fn an_order_stripped_for_watchers_is_the_order_rendered_for_watchers() {
        let c = CourierId::new("c1");
        let o = Order {
            tenant: TenantId::new("t"),
            id: OrderId::new("o1"),
            pickup: LatLng::new(52.5, 13.4).unwrap(),
            dropoff: LatLng::new(52.51, 13.41).unwrap(),
            size: 1,
            ready_at: None,
            deliver_by: Some(5_000),
            state: OrderState::Offered,
            courier: None,
            offer: Some(Offer { courier: c.clone(), expires_at: 4_000 }),
            declined: vec![],
            assignment: Some(AssignmentRecord { at: 1_000, policy: "optimal".into(), courier: c.clone(), cost_s: 60.0, candidates: vec![(c, 60.0)] }),
            created_at: 1_000,
            updated_at: 2_000,
            version: 2,
            released_at: Some(1_500),
        };
        let mut whole = serde_json::to_value(OrderDto::from(&o)).unwrap();
        assert!(whole.get("assignment").is_some() && whole.get("offered_to").is_some() && whole.get("released_at").is_some());
        OrderDto::strip_for_watchers(&mut whole);
        assert_eq!(whole, serde_json::to_value(OrderDto::for_watchers(&o)).unwrap());
    }

    #[test]
    fn integers_may_be_written_as_whole_doubles() {
        let order = |extra: &str| serde_json::from_str::<NewOrderReq>(&format!(r#"{{"pickup":{{"lat":1,"lng":2}},"dropoff":{{"lat":1,"lng":2}}{extra}}}"#));
        let o = order(r#","size":2.0,"ready_at":1764000000000.0,"deliver_by":1764000600000"#).unwrap();
        assert_eq!((o.size, o.ready_at, o.deliver_by), (Some(2), Some(1_764_000_000_000), Some(1_764_000_600_000)));
        let o = order(r#","size":null"#).unwrap();
        assert_eq!((o.size, o.ready_at), (None, None));
        for bad in [r#","size":2.5"#, r#","size":70000"#, r#","size":-1.0"#, r#","size":"2""#, r#","ready_at":1e300"#, r#","ready_at":true"#] {
            assert!(order(bad).is_err(), "{bad}");
        }
        let c: CourierPutReq = serde_json::from_str(r#"{"capacity":3e0}"#).unwrap();
        assert_eq!(c.capacity, Some(3));
        assert!(serde_json::from_str::<CourierPutReq>(r#"{"capacity":3.25}"#).is_err());
        assert!(serde_json::from_str::<CourierPutReq>(r#"{"capacity":3,"nope":1}"#).is_err(), "unknown fields are still refused");
    }
}
