//! Travel speeds learned from the fleet's own movement, per tenant and vehicle, for ETAs and
//! dispatch (`hexfleet_geo::eta::SpeedModel`: per H3 cell and hour of week, shrunk towards
//! the vehicle's prior speed where little was seen).
//!
//! Flow: a courier actor, when it keeps a location-history sample (every `history_every_ms`
//! or 100 m), hands the pair (previous sample → this one) to [`Speeds::observe`], a
//! non-blocking `try_send` into a bounded queue (samples are dropped and counted when it is
//! full: the hot path never waits and takes no lock). One learner task owns the models, folds
//! samples in, and every `publish_every` swaps in immutable copies of the models that changed.
//! Readers ([`Speeds::model`]: the courier's ETA to its next stop, dispatch pricing) load the
//! published map without locking.
//!
//! Persistence: the learner saves the tables that changed every `speed_save_every` (5 min) and
//! when the fleet shuts down (`Store::save_speeds`), and the fleet loads them at start, so a
//! restart keeps what was learned; a crash loses at most the last interval of learning.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hexfleet_geo::LatLng;
use hexfleet_geo::eta::{SpeedConfig, SpeedModel};
use tokio::sync::{mpsc, oneshot};

use crate::clock::SharedClock;
use crate::domain::{Ms, TenantId, Vehicle};
use crate::store::{SpeedTable, Store};

/// Samples waiting for the learner before new ones are dropped.
const QUEUE: usize = 65_536;

type Key = (TenantId, Vehicle);
type Published = HashMap<Key, Arc<SpeedModel>>;

/// One observed movement of one courier.
#[derive(Clone, Debug, PartialEq)]
pub struct SpeedSample {
    pub tenant: TenantId,
    pub vehicle: Vehicle,
    pub from: LatLng,
    pub from_ms: Ms,
    pub to: LatLng,
    pub to_ms: Ms,
}

enum Msg {
    Sample(SpeedSample),
    /// Save what changed now and answer (shutdown).
    Save(oneshot::Sender<()>),
    /// Replace these models with the stored ones (a market taken over from another node).
    Reload(Vec<SpeedTable>, oneshot::Sender<()>),
}

/// How the learner runs.
#[derive(Clone)]
pub struct LearnerConfig {
    /// How often changed models become visible to readers.
    pub publish_every: Duration,
    /// How often changed models are saved.
    pub save_every: Duration,
    /// Where they are saved.
    pub store: Arc<dyn Store>,
    /// The clock of `updated_at`.
    pub clock: SharedClock,
}

/// The learned speeds: the queue into the learner and the published models.
#[derive(Debug)]
pub struct Speeds {
    tx: mpsc::Sender<Msg>,
    published: Arc<ArcSwap<Published>>,
    dropped: metrics::Counter,
}

/// The speed model settings for a vehicle: its prior, and speeds it cannot reach rejected.
pub fn config_for(vehicle: Vehicle) -> SpeedConfig {
    let prior = vehicle.prior_speed_mps();
    SpeedConfig { prior_mps: prior, min_mps: (prior / 5.0).min(1.0), ..SpeedConfig::default() }
}

impl Speeds {
    /// The handle and its learner task (spawned on the current runtime); the task ends when
    /// the handle is dropped. `publish_every` bounds how stale a reader's model is.
    /// `saved` are the tables stored by an earlier run; a table that does not parse is logged
    /// and skipped (its pair starts from the prior).
    pub fn start(cfg: LearnerConfig, saved: Vec<SpeedTable>) -> Arc<Speeds> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut models = HashMap::new();
        for t in saved {
            match SpeedModel::load(config_for(t.vehicle), &t.text) {
                Ok(m) => {
                    models.insert((t.tenant, t.vehicle), m);
                }
                Err(e) => tracing::warn!(tenant = %t.tenant, vehicle = t.vehicle.as_str(), error = %e, "stored speed table unreadable; starting from the prior"),
            }
        }
        let published: Published = models.iter().map(|(k, m)| (k.clone(), Arc::new(m.clone()))).collect();
        let published = Arc::new(ArcSwap::from_pointee(published));
        tokio::spawn(learn(rx, models, published.clone(), cfg));
        Arc::new(Speeds { tx, published, dropped: metrics::counter!("hexfleet_speed_samples_dropped_total") })
    }

    /// Queues a sample for learning; never waits.
    pub fn observe(&self, s: SpeedSample) {
        if self.tx.try_send(Msg::Sample(s)).is_err() {
            self.dropped.increment(1);
        }
    }

    /// Saves every model that changed since the last save, and waits (shutdown path; samples
    /// queued before this call are learned first).
    pub async fn save_now(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Save(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Replaces the models of these tables with the stored text, and publishes them at once:
    /// a market taken over from another node continues from what that node last saved, not
    /// from this node's copy of when it started.
    pub async fn reload(&self, tables: Vec<SpeedTable>) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Reload(tables, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The latest published model of a tenant's vehicle type, if anything was learned.
    pub fn model(&self, tenant: &TenantId, vehicle: Vehicle) -> Option<Arc<SpeedModel>> {
        self.published.load().get(&(tenant.clone(), vehicle)).cloned()
    }
}

async fn save(models: &HashMap<Key, SpeedModel>, unsaved: &mut HashSet<Key>, cfg: &LearnerConfig) {
    if unsaved.is_empty() {
        return;
    }
    let at = cfg.clock.now_ms();
    let tables: Vec<SpeedTable> = unsaved
        .iter()
        .filter_map(|k| models.get(k).map(|m| SpeedTable { tenant: k.0.clone(), vehicle: k.1, text: m.save(), updated_at: at }))
        .collect();
    match cfg.store.save_speeds(tables).await {
        Ok(()) => unsaved.clear(),
        // Kept for the next interval.
        Err(e) => tracing::warn!(error = %e, "learned speeds not saved; retrying later"),
    }
}

async fn learn(mut rx: mpsc::Receiver<Msg>, mut models: HashMap<Key, SpeedModel>, published: Arc<ArcSwap<Published>>, cfg: LearnerConfig) {
    let mut dirty: HashSet<Key> = HashSet::new();
    let mut unsaved: HashSet<Key> = HashSet::new();
    let mut tick = tokio::time::interval(cfg.publish_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut save_tick = tokio::time::interval_at(tokio::time::Instant::now() + cfg.save_every, cfg.save_every);
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let learned = metrics::counter!("hexfleet_speed_samples_learned_total");
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                None => break,
                Some(Msg::Sample(s)) => {
                    let key = (s.tenant, s.vehicle);
                    let m = models.entry(key.clone()).or_insert_with(|| SpeedModel::new(config_for(key.1)));
                    if m.observe(s.from, s.from_ms, s.to, s.to_ms) {
                        learned.increment(1);
                        dirty.insert(key.clone());
                        unsaved.insert(key);
                    }
                }
                Some(Msg::Save(reply)) => {
                    save(&models, &mut unsaved, &cfg).await;
                    let _ = reply.send(());
                }
                Some(Msg::Reload(tables, reply)) => {
                    let mut next: Published = (**published.load()).clone();
                    for t in tables {
                        match SpeedModel::load(config_for(t.vehicle), &t.text) {
                            Ok(m) => {
                                let key = (t.tenant, t.vehicle);
                                next.insert(key.clone(), Arc::new(m.clone()));
                                models.insert(key.clone(), m);
                                unsaved.remove(&key);
                                dirty.remove(&key);
                            }
                            Err(e) => tracing::warn!(tenant = %t.tenant, vehicle = t.vehicle.as_str(), error = %e, "stored speed table unreadable; kept this node's model"),
                        }
                    }
                    published.store(Arc::new(next));
                    let _ = reply.send(());
                }
            },
            _ = save_tick.tick() => save(&models, &mut unsaved, &cfg).await,
            _ = tick.tick() => {
                if dirty.is_empty() {
                    continue;
                }
                let mut next: Published = (**published.load()).clone();
                for key in dirty.drain() {
                    if let Some(m) = models.get(&key) {
                        next.insert(key, Arc::new(m.clone()));
                    }
                }
                published.store(Arc::new(next));
            }
        }
    }
    tracing::debug!("speed learner stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ll(lat: f64, lng: f64) -> LatLng {
        LatLng::new(lat, lng).unwrap()
    }

    fn learner(store: Arc<dyn Store>) -> LearnerConfig {
        let clock = Arc::new(crate::clock::ManualClock::new(42));
        LearnerConfig { publish_every: Duration::from_millis(20), save_every: Duration::from_secs(3600), store, clock }
    }

    #[tokio::test]
    async fn learns_per_tenant_and_vehicle_and_publishes() {
        let store = Arc::new(crate::store::MemoryStore::new());
        let speeds = Speeds::start(learner(store.clone()), Vec::new());
        let t = TenantId::new("t");
        assert!(speeds.model(&t, Vehicle::Bike).is_none(), "nothing learned yet");
        // A bike crawling at 2 m/s through one district, 10 s steps.
        let (lat, mut lng) = (52.52f64, 13.40f64);
        let t0 = 1_764_000_000_000;
        for i in 0..200 {
            let next = lng + 20.0 / (111_320.0 * lat.to_radians().cos());
            speeds.observe(SpeedSample { tenant: t.clone(), vehicle: Vehicle::Bike, from: ll(lat, lng), from_ms: t0 + i * 10_000, to: ll(lat, next), to_ms: t0 + (i + 1) * 10_000 });
            lng = next;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let m = loop {
            if let Some(m) = speeds.model(&t, Vehicle::Bike).filter(|m| !m.is_empty())
                && m.speed_mps(ll(lat, 13.41), t0 + 500_000) < 2.5
            {
                break m;
            }
            assert!(tokio::time::Instant::now() < deadline, "model not published");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let v = m.speed_mps(ll(lat, 13.41), t0 + 500_000);
        assert!((1.9..2.5).contains(&v), "learned about 2 m/s, got {v}");
        // Elsewhere, and for other vehicles and tenants, the priors hold.
        assert!((m.speed_mps(ll(48.85, 2.35), t0) - Vehicle::Bike.prior_speed_mps()).abs() < 1e-9);
        assert!(speeds.model(&t, Vehicle::Car).is_none());
        assert!(speeds.model(&TenantId::new("other"), Vehicle::Bike).is_none());

        // Saved on request; a new learner starts from the saved table (published at once).
        assert!(store.load_speeds().await.unwrap().is_empty(), "not saved before the interval");
        speeds.save_now().await;
        let saved = store.load_speeds().await.unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!((saved[0].vehicle, saved[0].updated_at), (Vehicle::Bike, 42));
        let again = Speeds::start(learner(store.clone()), saved);
        let m2 = again.model(&t, Vehicle::Bike).expect("loaded model");
        assert_eq!(m2.speed_mps(ll(lat, 13.41), t0 + 500_000), v);
        // A table that does not parse is skipped, not fatal.
        let bad = crate::store::SpeedTable { tenant: t.clone(), vehicle: Vehicle::Car, text: "nonsense".into(), updated_at: 1 };
        let third = Speeds::start(learner(store), vec![bad]);
        assert!(third.model(&t, Vehicle::Car).is_none());
    }
}
