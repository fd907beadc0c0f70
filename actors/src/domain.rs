//! Domain types shared by the actors, the storage trait and the gateway: identifiers, fixes,
//! couriers, orders and their state machine, zones and domain events.
//!
//! These are plain Rust types. Wire formats live at the edges (`gateway` DTOs, `persistence`
//! rows), so nothing here derives `Serialize`.

use std::fmt;
use std::sync::Arc;

pub use hexfleet_geo::LatLng;

/// Unix time in milliseconds.
pub type Ms = i64;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);
        impl $name {
            /// Wraps an id; callers validate length and charset at the edge.
            pub fn new(s: impl AsRef<str>) -> Self { Self(Arc::from(s.as_ref())) }
            /// The id as text.
            pub fn as_str(&self) -> &str { &self.0 }
            /// The shared text (clone it to hand the id on without copying).
            pub fn as_arc(&self) -> &Arc<str> { &self.0 }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { write!(f, "{}", self.0) }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.0) }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self { Self::new(s) }
        }
    };
}

id_type!(
    /// A tenant (fleet operator). Every read and write is scoped to one; it is also the dispatch
    /// market in this version.
    TenantId
);
id_type!(
    /// A courier, unique within its tenant.
    CourierId
);
id_type!(
    /// An order, unique within its tenant.
    OrderId
);
id_type!(
    /// A zone (service area or other geofence), unique within its tenant.
    ZoneId
);

/// Maximum length of any id accepted from the outside.
pub const MAX_ID_LEN: usize = 64;

/// Checks an id from the outside: 1..=64 chars of `[A-Za-z0-9_.:-]`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// One GPS fix from a courier device, already validated by the edge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fix {
    pub pos: LatLng,
    /// Device time of the fix.
    pub ts: Ms,
    /// Metres per second.
    pub speed: Option<f32>,
    /// Degrees clockwise from north.
    pub heading: Option<f32>,
    /// Horizontal accuracy in metres.
    pub acc: Option<f32>,
}

/// Whether a courier takes work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CourierStatus {
    Available,
    Offline,
}

impl CourierStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CourierStatus::Available => "available",
            CourierStatus::Offline => "offline",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "available" => Some(CourierStatus::Available),
            "offline" => Some(CourierStatus::Offline),
            _ => None,
        }
    }
}

/// Vehicle kinds the dispatcher knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vehicle {
    Foot,
    Bike,
    Scooter,
    Car,
    Van,
}

impl Vehicle {
    pub const ALL: [Vehicle; 5] = [Vehicle::Foot, Vehicle::Bike, Vehicle::Scooter, Vehicle::Car, Vehicle::Van];
    pub fn as_str(self) -> &'static str {
        match self {
            Vehicle::Foot => "foot",
            Vehicle::Bike => "bike",
            Vehicle::Scooter => "scooter",
            Vehicle::Car => "car",
            Vehicle::Van => "van",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
    /// Cruise speed prior in m/s, used before speeds are learned.
    pub fn prior_speed_mps(self) -> f64 {
        match self {
            Vehicle::Foot => 1.4,
            Vehicle::Bike => 4.5,
            Vehicle::Scooter => 7.0,
            Vehicle::Car => 9.0,
            Vehicle::Van => 8.0,
        }
    }
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A courier's profile and last known state, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct CourierRecord {
    pub tenant: TenantId,
    pub id: CourierId,
    pub name: Option<String>,
    pub vehicle: Vehicle,
    /// How many orders (in size units) it can carry at once.
    pub capacity: u16,
    /// OsmAnd/Traccar device identifier, unique within the tenant.
    pub device_id: Option<String>,
    pub status: CourierStatus,
    pub on_shift: bool,
    pub last_fix: Option<Fix>,
    pub updated_at: Ms,
}

impl CourierRecord {
    /// Takes the profile (name, vehicle, capacity, device, shift) of `p`; the live state
    /// (status, position) and the version time stay.
    pub fn set_profile(&mut self, p: &CourierRecord) {
        self.name.clone_from(&p.name);
        self.vehicle = p.vehicle;
        self.capacity = p.capacity;
        self.device_id.clone_from(&p.device_id);
        self.on_shift = p.on_shift;
    }

    /// A courier registered with defaults (first connection of an unknown courier).
    pub fn new(tenant: TenantId, id: CourierId, now: Ms) -> Self {
        CourierRecord {
            tenant,
            id,
            name: None,
            vehicle: Vehicle::Bike,
            capacity: 2,
            device_id: None,
            status: CourierStatus::Offline,
            on_shift: true,
            last_fix: None,
            updated_at: now,
        }
    }
}

/// The order lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderState {
    Created,
    Offered,
    Assigned,
    AtPickup,
    PickedUp,
    AtDropoff,
    Delivered,
    Cancelled,
    Failed,
    Expired,
}

impl OrderState {
    pub const ALL: [OrderState; 10] = [
        OrderState::Created,
        OrderState::Offered,
        OrderState::Assigned,
        OrderState::AtPickup,
        OrderState::PickedUp,
        OrderState::AtDropoff,
        OrderState::Delivered,
        OrderState::Cancelled,
        OrderState::Failed,
        OrderState::Expired,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Created => "created",
            OrderState::Offered => "offered",
            OrderState::Assigned => "assigned",
            OrderState::AtPickup => "at_pickup",
            OrderState::PickedUp => "picked_up",
            OrderState::AtDropoff => "at_dropoff",
            OrderState::Delivered => "delivered",
            OrderState::Cancelled => "cancelled",
            OrderState::Failed => "failed",
            OrderState::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
    /// No transition leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(self, OrderState::Delivered | OrderState::Cancelled | OrderState::Failed | OrderState::Expired)
    }
    /// A courier holds the order (it occupies capacity and appears in the courier's route).
    pub fn is_held(self) -> bool {
        matches!(self, OrderState::Assigned | OrderState::AtPickup | OrderState::PickedUp | OrderState::AtDropoff)
    }
    /// The goods are on board.
    pub fn is_on_board(self) -> bool {
        matches!(self, OrderState::PickedUp | OrderState::AtDropoff)
    }
}

/// An offer outstanding to one courier.
#[derive(Clone, Debug, PartialEq)]
pub struct Offer {
    pub courier: CourierId,
    pub expires_at: Ms,
}

/// Why an order went to a courier: the candidates the dispatcher weighed and their costs.
#[derive(Clone, Debug, PartialEq)]
pub struct AssignmentRecord {
    pub at: Ms,
    /// `optimal`, `greedy`, `nearest` or `override`.
    pub policy: String,
    pub courier: CourierId,
    /// Cost of the chosen pair in seconds (ETA to pickup + detour + lateness penalty).
    pub cost_s: f64,
    /// Candidates considered with their costs, cheapest first.
    pub candidates: Vec<(CourierId, f64)>,
}

/// An order and its live state.
#[derive(Clone, Debug, PartialEq)]
pub struct Order {
    pub tenant: TenantId,
    pub id: OrderId,
    pub pickup: LatLng,
    pub dropoff: LatLng,
    /// Capacity units the order takes.
    pub size: u16,
    pub ready_at: Option<Ms>,
    pub deliver_by: Option<Ms>,
    pub state: OrderState,
    pub courier: Option<CourierId>,
    pub offer: Option<Offer>,
    /// Couriers that declined or let an offer lapse; not offered this order again.
    pub declined: Vec<CourierId>,
    pub assignment: Option<AssignmentRecord>,
    pub created_at: Ms,
    pub updated_at: Ms,
    /// Number of transitions applied; increases by one per transition.
    pub version: u32,
    /// When a courier or a dispatcher last handed the order back to dispatch (`Release`): its
    /// wait for a courier, after which it expires, restarts there.
    pub released_at: Option<Ms>,
}

impl Order {
    /// The courier this order commits capacity of: the one it is offered to or held by.
    pub fn commitment(&self) -> Option<&CourierId> {
        match self.state {
            OrderState::Offered => self.offer.as_ref().map(|o| &o.courier),
            s if s.is_held() => self.courier.as_ref(),
            _ => None,
        }
    }
}

/// Who caused something, for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    System,
    Courier(CourierId),
    Customer(String),
    Dispatcher(String),
    Admin(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::System => f.write_str("system"),
            Actor::Courier(id) => write!(f, "courier:{id}"),
            Actor::Customer(id) => write!(f, "customer:{id}"),
            Actor::Dispatcher(id) => write!(f, "dispatcher:{id}"),
            Actor::Admin(id) => write!(f, "admin:{id}"),
        }
    }
}

/// Kinds of entity an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntityKind {
    Order,
    Courier,
    Zone,
    /// A webhook subscription (its changes are audited; the gateway owns webhooks).
    Webhook,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Order => "order",
            EntityKind::Courier => "courier",
            EntityKind::Zone => "zone",
            EntityKind::Webhook => "webhook",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "order" => Some(EntityKind::Order),
            "courier" => Some(EntityKind::Courier),
            "zone" => Some(EntityKind::Zone),
            "webhook" => Some(EntityKind::Webhook),
            _ => None,
        }
    }
}

/// An entry of the append-only event log (the audit trail).
#[derive(Clone, Debug, PartialEq)]
pub struct DomainEvent {
    pub tenant: TenantId,
    pub entity: EntityKind,
    pub entity_id: String,
    /// Dotted name, e.g. `order.assigned`, `zone.enter`, `courier.registered`.
    pub kind: String,
    pub actor: String,
    pub reason: Option<String>,
    pub ts: Ms,
    /// Extra attributes (stored as a JSON object of strings).
    pub attrs: Vec<(String, String)>,
}

/// A zone: a service area or another geofence, drawn by a dispatcher.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneRecord {
    pub tenant: TenantId,
    pub id: ZoneId,
    /// `service_area`, or any other label (e.g. `restricted`, `hub`).
    pub kind: String,
    pub name: Option<String>,
    pub geometry: geo::MultiPolygon<f64>,
    pub updated_at: Ms,
}

impl ZoneRecord {
    pub fn is_service_area(&self) -> bool {
        self.kind == "service_area"
    }
}

/// One downsampled point of a courier's location history.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocationSample {
    pub pos: LatLng,
    pub ts: Ms,
    pub speed: Option<f32>,
}
