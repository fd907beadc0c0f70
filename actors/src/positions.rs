//! The live fleet index of each tenant, double-buffered so the GPS hot path never takes a
//! global lock.
//!
//! Courier actors write their latest entry into a sharded map (`DashMap`: one shard lock held
//! for a few tens of nanoseconds). A background task rebuilds an immutable
//! [`hexfleet_geo::FleetIndex`] from the map every `rebuild_every` (bulk load, ~15 ms for 100k
//! couriers, on a blocking thread) and publishes it with an atomic pointer swap. Readers
//! (nearby queries, dispatch) load the current snapshot without locking; it is at most one
//! rebuild period plus the rebuild time old, which the design allows (≤ 250 ms).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use hexfleet_geo::{CourierEntry, CourierKey, FleetIndex};
use parking_lot::RwLock;

use crate::domain::{CourierId, TenantId};

/// One tenant's positions: the live map and the current index snapshot.
pub struct TenantIndex {
    live: DashMap<CourierKey, CourierEntry>,
    dirty: AtomicBool,
    snapshot: ArcSwap<FleetIndex>,
    ids: DashMap<CourierId, CourierKey>,
    names: RwLock<Vec<CourierId>>,
    next_key: AtomicU64,
}

impl TenantIndex {
    fn new() -> Self {
        TenantIndex {
            live: DashMap::new(),
            dirty: AtomicBool::new(false),
            snapshot: ArcSwap::from_pointee(FleetIndex::new()),
            ids: DashMap::new(),
            names: RwLock::new(Vec::new()),
            next_key: AtomicU64::new(0),
        }
    }

    /// The stable index key of a courier id (interned on first use).
    pub fn key(&self, id: &CourierId) -> CourierKey {
        if let Some(k) = self.ids.get(id) {
            return *k;
        }
        *self.ids.entry(id.clone()).or_insert_with(|| {
            let mut names = self.names.write();
            let k = self.next_key.fetch_add(1, Ordering::Relaxed);
            debug_assert_eq!(k as usize, names.len());
            names.push(id.clone());
            k
        })
    }

    /// The courier id behind a key.
    pub fn id(&self, key: CourierKey) -> Option<CourierId> {
        self.names.read().get(key as usize).cloned()
    }

    /// Records a courier's latest entry (hot path: one shard lock).
    pub fn upsert(&self, entry: CourierEntry) {
        self.live.insert(entry.key, entry);
        self.dirty.store(true, Ordering::Release);
    }

    /// Removes a courier from the index.
    pub fn remove(&self, key: CourierKey) {
        if self.live.remove(&key).is_some() {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// The current immutable snapshot.
    pub fn snapshot(&self) -> Arc<FleetIndex> {
        self.snapshot.load_full()
    }

    /// Rebuilds the snapshot now if anything changed (blocking: call off the async workers).
    pub fn rebuild_blocking(&self) -> bool {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return false;
        }
        let entries: Vec<CourierEntry> = self.live.iter().map(|e| *e.value()).collect();
        self.snapshot.store(Arc::new(FleetIndex::bulk_load(entries)));
        true
    }

    /// How many couriers have a position.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// All tenants' indexes.
#[derive(Default)]
pub struct Positions {
    tenants: DashMap<TenantId, Arc<TenantIndex>>,
}

impl Positions {
    /// The tenant's index, created on first use.
    pub fn tenant(&self, tenant: &TenantId) -> Arc<TenantIndex> {
        if let Some(t) = self.tenants.get(tenant) {
            return t.clone();
        }
        self.tenants.entry(tenant.clone()).or_insert_with(|| Arc::new(TenantIndex::new())).clone()
    }

    /// Rebuilds every dirty tenant index (blocking).
    pub fn rebuild_all_blocking(&self) -> usize {
        let all: Vec<Arc<TenantIndex>> = self.tenants.iter().map(|t| t.value().clone()).collect();
        all.iter().filter(|t| t.rebuild_blocking()).count()
    }

    /// Runs the rebuild loop until the returned handle is aborted.
    pub fn spawn_rebuilder(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let me = me.clone();
                let started = std::time::Instant::now();
                let rebuilt = tokio::task::spawn_blocking(move || me.rebuild_all_blocking()).await.unwrap_or(0);
                if rebuilt > 0 {
                    metrics::histogram!("hexfleet_index_rebuild_seconds").record(started.elapsed().as_secs_f64());
                }
            }
        })
    }
}
