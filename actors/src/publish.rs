//! The fan-out port: what actors tell watchers. The gateway implements [`Publisher`] with its
//! broker (local WebSocket sessions, Redis between nodes).
//!
//! `publish` never blocks and never fails: the broker conflates positions (latest wins) and
//! queues discrete updates per watcher, disconnecting a watcher that cannot keep up.

use std::sync::Arc;

use crate::domain::{CourierId, CourierStatus, DomainEvent, Fix, LatLng, Order, OrderId, TenantId, ZoneRecord, ZoneId};

/// A stop in a courier's route.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteStop {
    pub order: OrderId,
    pub pickup: bool,
    pub pos: LatLng,
}

/// Messages addressed to one courier's device.
#[derive(Clone, Debug, PartialEq)]
pub enum CourierNotice {
    Offer { order: OrderId, pickup: LatLng, dropoff: LatLng, expires_at: i64 },
    Assigned { order: OrderId, pickup: LatLng, dropoff: LatLng },
    Route { stops: Vec<RouteStop> },
    OrderUpdate(Arc<Order>),
}

/// Something watchers may want to see.
#[derive(Clone, Debug)]
pub enum Update {
    /// A courier's live position moved (conflatable). `tracking` lists the orders it holds with
    /// the ETA in seconds to that order's next stop.
    CourierMoved {
        tenant: TenantId,
        courier: CourierId,
        fix: Fix,
        status: CourierStatus,
        tracking: Vec<(OrderId, Option<f64>)>,
    },
    /// A courier's status changed (conflatable with positions, latest wins), with its last
    /// fix, if any (a console shows the courier there with the new status).
    CourierStatus { tenant: TenantId, courier: CourierId, status: CourierStatus, last_fix: Option<Fix> },
    /// An order changed state (discrete: never dropped silently).
    Order(Arc<Order>),
    /// Addressed to one courier's device (discrete).
    ToCourier { tenant: TenantId, courier: CourierId, notice: CourierNotice },
    /// A zone was created or changed.
    Zone(Arc<ZoneRecord>),
    /// A zone was deleted.
    ZoneDeleted { tenant: TenantId, id: ZoneId },
    /// An audit event for the console feed (discrete).
    Event(Arc<DomainEvent>),
}

impl Update {
    pub fn tenant(&self) -> &TenantId {
        match self {
            Update::CourierMoved { tenant, .. }
            | Update::CourierStatus { tenant, .. }
            | Update::ToCourier { tenant, .. }
            | Update::ZoneDeleted { tenant, .. } => tenant,
            Update::Order(o) => &o.tenant,
            Update::Zone(z) => &z.tenant,
            Update::Event(e) => &e.tenant,
        }
    }
}

/// The fan-out port.
pub trait Publisher: Send + Sync + 'static {
    fn publish(&self, update: Update);
}

/// A publisher that drops everything (headless tools).
#[derive(Debug, Default)]
pub struct NullPublisher;

impl Publisher for NullPublisher {
    fn publish(&self, _update: Update) {}
}

/// A publisher that records updates (tests).
#[derive(Debug, Default)]
pub struct RecordingPublisher {
    pub updates: parking_lot::Mutex<Vec<Update>>,
    pub notify: tokio::sync::Notify,
}

impl Publisher for RecordingPublisher {
    fn publish(&self, update: Update) {
        self.updates.lock().push(update);
        self.notify.notify_waiters();
    }
}

impl RecordingPublisher {
    /// Waits until `pred` holds for some recorded update, or the deadline passes.
    pub async fn wait_for(&self, deadline: std::time::Duration, pred: impl Fn(&Update) -> bool) -> bool {
        let fut = async {
            loop {
                let notified = self.notify.notified();
                if self.updates.lock().iter().any(&pred) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, fut).await.is_ok()
    }
}
