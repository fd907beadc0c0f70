//! The storage port: what the actors need from durable storage. `persistence` implements it
//! with sqlx (SQLite or PostgreSQL); [`MemoryStore`] implements it in memory for actor tests.
//!
//! Durability contract:
//! - [`Store::commit`] returns only once the whole batch is durable (atomically), so an order is
//!   acknowledged after it is safe. Implementations group concurrent commits into one
//!   transaction.
//! - [`Store::snapshot_couriers`] and [`Store::record_locations`] only enqueue into a bounded
//!   queue and return at once; a crash loses at most the last flush interval (≤ 1 s).

use std::collections::HashMap;
use std::error::Error as StdError;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::domain::{
    CourierId, CourierRecord, DomainEvent, EntityKind, LocationSample, Ms, Order, OrderId, TenantId, ZoneId,
    ZoneRecord,
};

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the write; durable writes must answer 503.
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn StdError + Send + Sync>),
    /// The bounded write queue is full; the caller may retry later.
    #[error("store write queue is full")]
    Backpressure,
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A [`Write::Fence`] of the batch did not hold: this node no longer owns the market, so
    /// nothing of the batch was written.
    #[error("market {0} is not owned by this node (any more)")]
    Fenced(TenantId),
}

/// One durable write; a batch of them is applied atomically by [`Store::commit`].
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Insert or replace the order's snapshot.
    Order(Order),
    /// Insert or replace the courier's profile and last state.
    Courier(CourierRecord),
    /// Insert the courier unless it exists (its app's first contact): never replaces a profile
    /// written meanwhile, even one with the same `updated_at`.
    RegisterCourier(CourierRecord),
    /// Insert or replace a zone.
    Zone(ZoneRecord),
    /// Delete a zone.
    DeleteZone { tenant: TenantId, id: ZoneId },
    /// Append to the event log.
    Event(DomainEvent),
    /// A fencing token: the batch commits only if `holder` still holds `tenant`'s market lease
    /// at `epoch` (checked inside the transaction), and fails whole with
    /// [`StoreError::Fenced`] otherwise. Writes nothing itself.
    Fence { tenant: TenantId, holder: String, epoch: i64 },
}

/// Everything needed to rebuild the actors after a restart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    pub couriers: Vec<CourierRecord>,
    /// Orders not in a terminal state.
    pub open_orders: Vec<Order>,
    pub zones: Vec<ZoneRecord>,
}

/// A filter over the event log.
#[derive(Clone, Debug, PartialEq)]
pub struct EventQuery {
    pub tenant: TenantId,
    pub entity: Option<(EntityKind, String)>,
    /// Only events with a sequence number greater than this.
    pub since_seq: Option<i64>,
    pub limit: u32,
}

/// An event as read back, with its position in the log.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub seq: i64,
    pub event: DomainEvent,
}

/// The storage port.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies the batch atomically and returns once it is durable.
    async fn commit(&self, batch: Vec<Write>) -> Result<(), StoreError>;
    /// Enqueues periodic courier snapshots (latest wins); not durable on return.
    fn snapshot_couriers(&self, couriers: Vec<CourierRecord>) -> Result<(), StoreError>;
    /// Enqueues downsampled location history; not durable on return.
    fn record_locations(&self, tenant: &TenantId, courier: &CourierId, samples: Vec<LocationSample>)
        -> Result<(), StoreError>;
    /// Loads couriers, open orders and zones of every tenant.
    async fn load(&self) -> Result<Recovered, StoreError>;
    /// Loads the couriers, open orders and zones of one tenant (a market taken over).
    async fn load_tenant(&self, tenant: &TenantId) -> Result<Recovered, StoreError>;
    /// Reads one order (any state).
    async fn order(&self, tenant: &TenantId, id: &OrderId) -> Result<Option<Order>, StoreError>;
    /// (tenant, id, updated_at) of every stored zone: what another node may have changed.
    async fn zone_versions(&self) -> Result<Vec<(TenantId, ZoneId, Ms)>, StoreError>;
    /// Reads one zone (another node may have changed it).
    async fn zone(&self, tenant: &TenantId, id: &ZoneId) -> Result<Option<ZoneRecord>, StoreError>;
    /// Reads the event log, oldest first.
    async fn events(&self, query: EventQuery) -> Result<Vec<StoredEvent>, StoreError>;
    /// A courier's location history between `from` and `to` (inclusive), oldest first, at most
    /// `limit` samples (a long history is read page by page: the next page starts after the
    /// last sample's `ts`, which is unique per courier).
    async fn export_locations(&self, tenant: &TenantId, courier: &CourierId, from: Ms, to: Ms, limit: usize)
        -> Result<Vec<LocationSample>, StoreError>;
    /// Erases a courier's location history; returns how many samples were erased.
    async fn erase_locations(&self, tenant: &TenantId, courier: &CourierId) -> Result<u64, StoreError>;
    /// Deletes location history older than `before`; returns how many samples were deleted.
    async fn purge_locations(&self, before: Ms) -> Result<u64, StoreError>;
    /// Checks the store is reachable (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Writes out everything queued (shutdown path).
    async fn flush(&self) -> Result<(), StoreError>;
    /// Replaces the stored speed tables of these (tenant, vehicle) pairs.
    async fn save_speeds(&self, tables: Vec<SpeedTable>) -> Result<(), StoreError>;
    /// Every stored speed table.
    async fn load_speeds(&self) -> Result<Vec<SpeedTable>, StoreError>;
}

/// The learned speeds of one tenant's vehicle type, as `hexfleet_geo::eta::SpeedModel::save`
/// writes them (`speeds.rs`).
#[derive(Clone, Debug, PartialEq)]
pub struct SpeedTable {
    pub tenant: TenantId,
    pub vehicle: crate::domain::Vehicle,
    pub text: String,
    pub updated_at: Ms,
}

/// An in-memory [`Store`] for tests of the actors. Not durable; never used by `serve`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    orders: HashMap<(TenantId, OrderId), Order>,
    couriers: HashMap<(TenantId, CourierId), CourierRecord>,
    zones: HashMap<(TenantId, ZoneId), ZoneRecord>,
    events: Vec<DomainEvent>,
    locations: HashMap<(TenantId, CourierId), Vec<LocationSample>>,
    speeds: HashMap<(TenantId, crate::domain::Vehicle), SpeedTable>,
    /// When set, every call fails as if the database were down.
    down: bool,
    /// How long each commit takes (tests of races around a commit in flight).
    commit_delay: Option<std::time::Duration>,
}

impl MemoryInner {
    /// As the SQL store: a courier row is replaced only by one at least as new.
    fn put_courier(&mut self, c: CourierRecord) {
        let key = (c.tenant.clone(), c.id.clone());
        if self.couriers.get(&key).is_none_or(|old| old.updated_at <= c.updated_at) {
            self.couriers.insert(key, c);
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
    /// Simulates an outage (tests of the 503 path in the actors).
    pub fn set_down(&self, down: bool) {
        self.inner.lock().down = down;
    }
    /// Makes every commit take `delay` before it applies (a slow database).
    pub fn set_commit_delay(&self, delay: Option<std::time::Duration>) {
        self.inner.lock().commit_delay = delay;
    }
    /// All events appended so far.
    pub fn all_events(&self) -> Vec<DomainEvent> {
        self.inner.lock().events.clone()
    }
    fn check(inner: &MemoryInner) -> Result<(), StoreError> {
        if inner.down { Err(StoreError::Unavailable("memory store is down".into())) } else { Ok(()) }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn commit(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        let delay = self.inner.lock().commit_delay;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut g = self.inner.lock();
        Self::check(&g)?;
        for w in batch {
            match w {
                Write::Order(o) => {
                    g.orders.insert((o.tenant.clone(), o.id.clone()), o);
                }
                Write::Courier(c) => g.put_courier(c),
                Write::RegisterCourier(c) => {
                    g.couriers.entry((c.tenant.clone(), c.id.clone())).or_insert(c);
                }
                Write::Zone(z) => {
                    g.zones.insert((z.tenant.clone(), z.id.clone()), z);
                }
                Write::DeleteZone { tenant, id } => {
                    g.zones.remove(&(tenant, id));
                }
                Write::Event(e) => g.events.push(e),
                // The memory store has no leases: it serves one node.
                Write::Fence { .. } => {}
            }
        }
        Ok(())
    }
    fn snapshot_couriers(&self, couriers: Vec<CourierRecord>) -> Result<(), StoreError> {
        let mut g = self.inner.lock();
        Self::check(&g)?;
        for c in couriers {
            g.put_courier(c);
        }
        Ok(())
    }
    fn record_locations(&self, tenant: &TenantId, courier: &CourierId, samples: Vec<LocationSample>)
        -> Result<(), StoreError> {
        let mut g = self.inner.lock();
        Self::check(&g)?;
        g.locations.entry((tenant.clone(), courier.clone())).or_default().extend(samples);
        Ok(())
    }
    async fn load(&self) -> Result<Recovered, StoreError> {
        let g = self.inner.lock();
        Self::check(&g)?;
        Ok(Recovered {
            couriers: g.couriers.values().cloned().collect(),
            open_orders: g.orders.values().filter(|o| !o.state.is_terminal()).cloned().collect(),
            zones: g.zones.values().cloned().collect(),
        })
    }
    async fn load_tenant(&self, tenant: &TenantId) -> Result<Recovered, StoreError> {
        let mut r = self.load().await?;
        r.couriers.retain(|c| c.tenant == *tenant);
        r.open_orders.retain(|o| o.tenant == *tenant);
        r.zones.retain(|z| z.tenant == *tenant);
        Ok(r)
    }
    async fn zone_versions(&self) -> Result<Vec<(TenantId, ZoneId, Ms)>, StoreError> {
        let g = self.inner.lock();
        Self::check(&g)?;
        Ok(g.zones.values().map(|z| (z.tenant.clone(), z.id.clone(), z.updated_at)).collect())
    }
    async fn zone(&self, tenant: &TenantId, id: &ZoneId) -> Result<Option<ZoneRecord>, StoreError> {
        let g = self.inner.lock();
        Self::check(&g)?;
        Ok(g.zones.get(&(tenant.clone(), id.clone())).cloned())
    }
    async fn order(&self, tenant: &TenantId, id: &OrderId) -> Result<Option<Order>, StoreError> {
        let g = self.inner.lock();
        Self::check(&g)?;
        Ok(g.orders.get(&(tenant.clone(), id.clone())).cloned())
    }
    async fn events(&self, q: EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let g = self.inner.lock();
        Self::check(&g)?;
        Ok(g.events
            .iter()
            .enumerate()
            .map(|(i, e)| StoredEvent { seq: i as i64 + 1, event: e.clone() })
            .filter(|s| s.event.tenant == q.tenant)
            .filter(|s| q.since_seq.is_none_or(|since| s.seq > since))
            .filter(|s| {
                q.entity.as_ref().is_none_or(|(k, id)| s.event.entity == *k && s.event.entity_id == *id)
            })
            .take(q.limit as usize)
            .collect())
    }
    async fn export_locations(&self, tenant: &TenantId, courier: &CourierId, from: Ms, to: Ms, limit: usize)
        -> Result<Vec<LocationSample>, StoreError> {
        let g = self.inner.lock();
        Self::check(&g)?;
        let mut v: Vec<LocationSample> = g.locations
            .get(&(tenant.clone(), courier.clone()))
            .map(|v| v.iter().filter(|s| s.ts >= from && s.ts <= to).copied().collect())
            .unwrap_or_default();
        v.sort_by_key(|s| s.ts);
        v.dedup_by_key(|s| s.ts);
        v.truncate(limit);
        Ok(v)
    }
    async fn erase_locations(&self, tenant: &TenantId, courier: &CourierId) -> Result<u64, StoreError> {
        let mut g = self.inner.lock();
        Self::check(&g)?;
        Ok(g.locations.remove(&(tenant.clone(), courier.clone())).map_or(0, |v| v.len() as u64))
    }
    async fn purge_locations(&self, before: Ms) -> Result<u64, StoreError> {
        let mut g = self.inner.lock();
        Self::check(&g)?;
        let mut n = 0;
        for v in g.locations.values_mut() {
            let len = v.len();
            v.retain(|s| s.ts >= before);
            n += (len - v.len()) as u64;
        }
        Ok(n)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Self::check(&self.inner.lock())
    }
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn save_speeds(&self, tables: Vec<SpeedTable>) -> Result<(), StoreError> {
        let mut g = self.inner.lock();
        Self::check(&g)?;
        for t in tables {
            g.speeds.insert((t.tenant.clone(), t.vehicle), t);
        }
        Ok(())
    }
    async fn load_speeds(&self) -> Result<Vec<SpeedTable>, StoreError> {
        let g = self.inner.lock();
        Self::check(&g)?;
        Ok(g.speeds.values().cloned().collect())
    }
}
