//! The persistence crate's own row types and their conversions to and from the domain types of
//! `hexfleet_actors::domain`. Nested parts (an order's declined list and assignment record, an
//! event's attributes) are stored as JSON text, their formats live here; a zone's geometry is
//! WKB (see [`crate::wkb`]).

use std::fmt;

use hexfleet_actors::domain::{
    AssignmentRecord, CourierId, CourierRecord, CourierStatus, DomainEvent, EntityKind, Fix, LatLng,
    LocationSample, Offer, Order, OrderId, OrderState, TenantId, Vehicle, ZoneId, ZoneRecord,
};
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::PersistenceError;

/// Builds a position read from the database, rejecting values the domain would reject.
pub(crate) fn latlng(table: &'static str, lat: f64, lng: f64) -> Result<LatLng, PersistenceError> {
    LatLng::new(lat, lng).map_err(|e| PersistenceError::corrupt(table, format!("bad position ({lat}, {lng}): {e:?}")))
}

fn opt_f32(v: Option<f64>) -> Option<f32> {
    // f32 -> f64 -> f32 is exact, so a stored f32 comes back bit for bit.
    v.map(|x| x as f32)
}

/// `couriers` table.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct CourierRow {
    pub tenant: String,
    pub id: String,
    pub name: Option<String>,
    pub vehicle: String,
    pub capacity: i64,
    pub device_id: Option<String>,
    pub status: String,
    pub on_shift: bool,
    pub fix_lat: Option<f64>,
    pub fix_lng: Option<f64>,
    pub fix_ts: Option<i64>,
    pub fix_speed: Option<f64>,
    pub fix_heading: Option<f64>,
    pub fix_acc: Option<f64>,
    pub updated_at: i64,
}

pub(crate) const COURIER_COLUMNS: &str = "tenant, id, name, vehicle, capacity, device_id, status, on_shift, \
     fix_lat, fix_lng, fix_ts, fix_speed, fix_heading, fix_acc, updated_at";

impl CourierRow {
    pub(crate) fn into_domain(self) -> Result<CourierRecord, PersistenceError> {
        const T: &str = "couriers";
        let vehicle = Vehicle::parse(&self.vehicle)
            .ok_or_else(|| PersistenceError::corrupt(T, format!("unknown vehicle {:?}", self.vehicle)))?;
        let status = CourierStatus::parse(&self.status)
            .ok_or_else(|| PersistenceError::corrupt(T, format!("unknown status {:?}", self.status)))?;
        let capacity = u16::try_from(self.capacity)
            .map_err(|_| PersistenceError::corrupt(T, format!("capacity out of range: {}", self.capacity)))?;
        let last_fix = match (self.fix_lat, self.fix_lng, self.fix_ts) {
            (Some(lat), Some(lng), Some(ts)) => Some(Fix {
                pos: latlng(T, lat, lng)?,
                ts,
                speed: opt_f32(self.fix_speed),
                heading: opt_f32(self.fix_heading),
                acc: opt_f32(self.fix_acc),
            }),
            _ => None,
        };
        Ok(CourierRecord {
            tenant: TenantId::new(self.tenant),
            id: CourierId::new(self.id),
            name: self.name,
            vehicle,
            capacity,
            device_id: self.device_id,
            status,
            on_shift: self.on_shift,
            last_fix,
            updated_at: self.updated_at,
        })
    }
}

/// `orders` table.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct OrderRow {
    pub tenant: String,
    pub id: String,
    pub pickup_lat: f64,
    pub pickup_lng: f64,
    pub dropoff_lat: f64,
    pub dropoff_lng: f64,
    pub size: i64,
    pub ready_at: Option<i64>,
    pub deliver_by: Option<i64>,
    pub state: String,
    pub courier: Option<String>,
    pub offer_courier: Option<String>,
    pub offer_expires_at: Option<i64>,
    pub declined: String,
    pub assignment: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub version: i64,
    pub released_at: Option<i64>,
}

pub(crate) const ORDER_COLUMNS: &str = "tenant, id, pickup_lat, pickup_lng, dropoff_lat, dropoff_lng, size, \
     ready_at, deliver_by, state, courier, offer_courier, offer_expires_at, declined, assignment, \
     created_at, updated_at, version, released_at";

/// How many columns [`ORDER_COLUMNS`] names (bind parameters per order row).
pub(crate) const ORDER_COLUMN_COUNT: usize = 19;

/// The terminal states, as SQL (kept next to `OrderState::is_terminal`'s meaning; checked by a test).
pub(crate) const TERMINAL_STATES_SQL: &str = "('delivered', 'cancelled', 'failed', 'expired')";

/// JSON form of an [`AssignmentRecord`].
#[derive(Serialize, Deserialize)]
struct AssignmentJson {
    at: i64,
    policy: String,
    courier: String,
    /// `null` when not finite (JSON has no infinity).
    cost_s: Option<f64>,
    candidates: Vec<(String, Option<f64>)>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Encodes an order's declined list as JSON text.
pub(crate) fn declined_json(o: &Order) -> String {
    let ids: Vec<&str> = o.declined.iter().map(CourierId::as_str).collect();
    serde_json::to_string(&ids).expect("a list of strings serializes")
}

/// Encodes an order's assignment record as JSON text.
pub(crate) fn assignment_json(o: &Order) -> Option<String> {
    o.assignment.as_ref().map(|a| {
        let j = AssignmentJson {
            at: a.at,
            policy: a.policy.clone(),
            courier: a.courier.as_str().to_owned(),
            cost_s: finite(a.cost_s),
            candidates: a.candidates.iter().map(|(c, cost)| (c.as_str().to_owned(), finite(*cost))).collect(),
        };
        serde_json::to_string(&j).expect("assignment serializes")
    })
}

impl OrderRow {
    pub(crate) fn into_domain(self) -> Result<Order, PersistenceError> {
        const T: &str = "orders";
        let state = OrderState::parse(&self.state)
            .ok_or_else(|| PersistenceError::corrupt(T, format!("unknown state {:?}", self.state)))?;
        let declined: Vec<String> = serde_json::from_str(&self.declined)
            .map_err(|e| PersistenceError::corrupt(T, format!("declined: {e}")))?;
        let assignment = match self.assignment {
            None => None,
            Some(text) => {
                let j: AssignmentJson = serde_json::from_str(&text)
                    .map_err(|e| PersistenceError::corrupt(T, format!("assignment: {e}")))?;
                Some(AssignmentRecord {
                    at: j.at,
                    policy: j.policy,
                    courier: CourierId::new(j.courier),
                    cost_s: j.cost_s.unwrap_or(f64::INFINITY),
                    candidates: j
                        .candidates
                        .into_iter()
                        .map(|(c, cost)| (CourierId::new(c), cost.unwrap_or(f64::INFINITY)))
                        .collect(),
                })
            }
        };
        let offer = match (self.offer_courier, self.offer_expires_at) {
            (Some(courier), Some(expires_at)) => Some(Offer { courier: CourierId::new(courier), expires_at }),
            _ => None,
        };
        Ok(Order {
            tenant: TenantId::new(self.tenant),
            id: OrderId::new(self.id),
            pickup: latlng(T, self.pickup_lat, self.pickup_lng)?,
            dropoff: latlng(T, self.dropoff_lat, self.dropoff_lng)?,
            size: u16::try_from(self.size).map_err(|_| PersistenceError::corrupt(T, "size out of range"))?,
            ready_at: self.ready_at,
            deliver_by: self.deliver_by,
            state,
            courier: self.courier.map(CourierId::new),
            offer,
            declined: declined.into_iter().map(CourierId::new).collect(),
            assignment,
            created_at: self.created_at,
            updated_at: self.updated_at,
            version: u32::try_from(self.version).map_err(|_| PersistenceError::corrupt(T, "version out of range"))?,
            released_at: self.released_at,
        })
    }
}

/// The columns of [`ZoneRow`], in order.
pub(crate) const ZONE_COLUMNS: &str = "tenant, id, kind, name, geometry, updated_at";

/// `zones` table.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ZoneRow {
    pub tenant: String,
    pub id: String,
    pub kind: String,
    pub name: Option<String>,
    /// WKB MultiPolygon.
    pub geometry: Vec<u8>,
    pub updated_at: i64,
}

/// Encodes a zone's geometry as WKB.
pub(crate) fn geometry_wkb(z: &ZoneRecord) -> Vec<u8> {
    crate::wkb::encode(&z.geometry)
}

impl ZoneRow {
    pub(crate) fn into_domain(self) -> Result<ZoneRecord, PersistenceError> {
        const T: &str = "zones";
        let geometry =
            crate::wkb::decode(&self.geometry).map_err(|e| PersistenceError::corrupt(T, format!("geometry: {e}")))?;
        Ok(ZoneRecord {
            tenant: TenantId::new(self.tenant),
            id: ZoneId::new(self.id),
            kind: self.kind,
            name: self.name,
            geometry,
            updated_at: self.updated_at,
        })
    }
}

/// `events` table.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub seq: i64,
    pub tenant: String,
    pub entity: String,
    pub entity_id: String,
    pub kind: String,
    pub actor: String,
    pub reason: Option<String>,
    pub ts: i64,
    pub attrs: String,
}

impl EventRow {
    pub(crate) fn into_domain(self) -> Result<(i64, DomainEvent), PersistenceError> {
        const T: &str = "events";
        let entity = EntityKind::parse(&self.entity)
            .ok_or_else(|| PersistenceError::corrupt(T, format!("unknown entity {:?}", self.entity)))?;
        let attrs: Attrs =
            serde_json::from_str(&self.attrs).map_err(|e| PersistenceError::corrupt(T, format!("attrs: {e}")))?;
        Ok((
            self.seq,
            DomainEvent {
                tenant: TenantId::new(self.tenant),
                entity,
                entity_id: self.entity_id,
                kind: self.kind,
                actor: self.actor,
                reason: self.reason,
                ts: self.ts,
                attrs: attrs.0,
            },
        ))
    }
}

/// Encodes event attributes as a JSON object, keeping their order (and duplicates).
pub(crate) fn attrs_json(e: &DomainEvent) -> String {
    serde_json::to_string(&AttrsRef(&e.attrs)).expect("attrs serialize")
}

struct AttrsRef<'a>(&'a [(String, String)]);

impl Serialize for AttrsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// Event attributes read back in document order.
struct Attrs(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Attrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Attrs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attrs, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(Attrs(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `location_history` table.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LocationRow {
    pub ts: i64,
    pub lat: f64,
    pub lng: f64,
    pub speed: Option<f64>,
}

impl LocationRow {
    pub(crate) fn into_domain(self) -> Result<LocationSample, PersistenceError> {
        Ok(LocationSample { pos: latlng("location_history", self.lat, self.lng)?, ts: self.ts, speed: opt_f32(self.speed) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_sql_matches_the_domain() {
        for s in OrderState::ALL {
            let quoted = format!("'{}'", s.as_str());
            assert_eq!(TERMINAL_STATES_SQL.contains(&quoted), s.is_terminal(), "{s:?}");
        }
    }

    #[test]
    fn the_order_column_count_is_the_columns_named() {
        assert_eq!(ORDER_COLUMNS.split(',').count(), ORDER_COLUMN_COUNT);
    }

    #[test]
    fn attrs_keep_order_and_duplicates() {
        let attrs = vec![("z".to_owned(), "1".to_owned()), ("a".to_owned(), "2".to_owned()), ("z".to_owned(), "3".to_owned())];
        let text = serde_json::to_string(&AttrsRef(&attrs)).unwrap();
        let back: Attrs = serde_json::from_str(&text).unwrap();
        assert_eq!(back.0, attrs);
    }
}
