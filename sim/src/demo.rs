//! The demo fleet: couriers, Poisson order demand with hotspots, and customers watching their
//! orders, all against a running server. `hexfleet demo` calls [`run_demo`] in-process.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::courier::{run_courier, CourierOptions, CourierSpec, CourierToken, SimStats};
use crate::demand::{Demand, Poisson};
use crate::geomath::BBox;
use crate::movement::{random_point, Vehicle};
use crate::net::{connect_ws, post_json, Server};
use crate::protocol::{is_terminal_state, ServerMsg};
use crate::token::{courier_id, TokenMint};

/// What the demo simulates.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The server, e.g. `http://127.0.0.1:8080` (must be loopback).
    pub base_url: String,
    /// HS256 secret the server verifies tokens with.
    pub jwt_secret: String,
    pub tenant: String,
    pub couriers: usize,
    /// `[min_lng, min_lat, max_lng, max_lat]`.
    pub bbox: [f64; 4],
    /// Mean order arrivals per minute (Poisson).
    pub orders_per_min: f64,
    /// At most this many customers watching their orders at once.
    pub watchers: usize,
    /// Dispatcher consoles on the whole box. Each logs at the end (debug, "console shows
    /// order") the open orders it shows, for a failover drill to compare with the store.
    pub consoles: usize,
    /// Longest pickup → drop-off distance, metres: short trips so a viewer sees deliveries
    /// within the first minutes.
    pub max_trip_m: f64,
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080".to_owned(),
            jwt_secret: crate::DEFAULT_JWT_SECRET.to_owned(),
            tenant: "demo".to_owned(),
            couriers: 200,
            bbox: crate::DEFAULT_BBOX,
            orders_per_min: 30.0,
            watchers: 20,
            consoles: 0,
            max_trip_m: 2_000.0,
            seed: 42,
        }
    }
}

/// Runs the demo fleet until `shutdown` is cancelled, then stops every client (bounded wait).
pub async fn run_demo(cfg: DemoConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_demo_with(cfg, CourierOptions::default(), shutdown, Arc::new(SimStats::default())).await
}

/// [`run_demo`] with explicit courier behaviour and a stats handle the caller can read.
pub async fn run_demo_with(
    cfg: DemoConfig,
    opts: CourierOptions,
    shutdown: CancellationToken,
    stats: Arc<SimStats>,
) -> anyhow::Result<()> {
    let server = Server::parse(&cfg.base_url)?;
    let bbox = BBox::from_array(cfg.bbox);
    anyhow::ensure!(bbox.is_valid(), "invalid bbox {:?}", cfg.bbox);
    let mint = TokenMint::new(&cfg.jwt_secret, &cfg.tenant, 24 * 3600);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let stop = shutdown.child_token();
    let mut tasks = JoinSet::new();

    for i in 1..=cfg.couriers {
        let id = courier_id(i);
        let spec = CourierSpec {
            token: CourierToken::Minted(mint.clone()),
            id,
            vehicle: if rng.random_bool(0.7) { Vehicle::Bike } else { Vehicle::Car },
            start: random_point(&mut rng, &bbox),
            seed: rng.random(),
        };
        let (server, opts, stats, stop) = (server.clone(), opts.clone(), stats.clone(), stop.clone());
        // Stagger the connects over ~2 s so the server is not hit by a thundering herd.
        let delay = Duration::from_millis((i as u64 * 2000) / cfg.couriers.max(1) as u64);
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            run_courier(server, spec, bbox, opts, stats, stop).await
        });
    }

    let demand = Demand { max_trip_m: cfg.max_trip_m, ..Demand::with_random_hotspots(&mut rng, bbox, 4) };
    {
        let (server, mint, stats, stop, cfg) = (server.clone(), mint.clone(), stats.clone(), stop.clone(), cfg.clone());
        let seed = rng.random();
        tasks.spawn(async move { order_loop(server, mint, demand, cfg, stats, stop, seed).await });
    }
    for n in 1..=cfg.consoles {
        let (server, mint, stats, stop) = (server.clone(), mint.clone(), stats.clone(), stop.clone());
        tasks.spawn(async move { watch_console(&server, &mint, bbox, n, &stats, &stop).await });
    }
    {
        let (stats, stop) = (stats.clone(), stop.clone());
        tasks.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            every.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = every.tick() => log_stats(&stats),
                }
            }
        });
    }

    shutdown.cancelled().await;
    stop.cancel();
    // Every task watches `stop`; give them a bounded time to say goodbye.
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "demo task ended with an error"),
                Err(e) if e.is_panic() => tracing::error!(error = %e, "demo task panicked"),
                _ => {}
            }
        }
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    log_stats(&stats);
    Ok(())
}

fn log_stats(s: &SimStats) {
    let g = SimStats::get;
    tracing::info!(
        couriers_connected = g(&s.connected),
        locs_sent = g(&s.locs_sent),
        orders_created = g(&s.orders_created),
        order_errors = g(&s.order_errors),
        order_retries = g(&s.order_retries),
        offers = g(&s.offers),
        accepted = g(&s.accepted),
        declined = g(&s.declined),
        assigned = g(&s.assigned),
        picked_up = g(&s.picked_up),
        delivered = g(&s.delivered),
        watchers = g(&s.watchers_open),
        watcher_msgs = g(&s.watcher_msgs),
        watcher_reconnects = g(&s.watcher_reconnects),
        console_reconnects = g(&s.console_reconnects),
        server_errors = g(&s.server_errors),
        disconnects = g(&s.disconnects),
        "sim"
    );
}

async fn order_loop(
    server: Server,
    mint: TokenMint,
    demand: Demand,
    cfg: DemoConfig,
    stats: Arc<SimStats>,
    stop: CancellationToken,
    seed: u64,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Order ids unique to this run (a restarted demo on the same database starts anew).
    let (run, mut n) = (crate::unix_ms(), 0u64);
    let poisson = Poisson::per_minute(cfg.orders_per_min);
    // Each order is created (and maybe watched) by a task of its own, so a creation retried
    // through a failover does not hold up the arrivals behind it: a shop's customers keep
    // ordering while its backend retries. At most MAX_CREATING are being created at once.
    let creating = Arc::new(tokio::sync::Semaphore::new(MAX_CREATING));
    let mut orders = JoinSet::new();
    loop {
        let gap = poisson.next_gap_s(&mut rng).min(3600.0);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs_f64(gap)) => {}
        }
        while orders.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = creating.clone().acquire_owned() => p?,
        };
        let o = demand.next_order(&mut rng);
        // The client names its order, so a retry after an answer that never came (or a 503
        // whose commit did happen) cannot create it twice: the same id and details are
        // answered with the order as it is.
        n += 1;
        let id = format!("sim-{run:x}-{n}");
        let body = serde_json::json!({
            "id": id,
            "pickup": {"lat": o.pickup.lat, "lng": o.pickup.lng},
            "dropoff": {"lat": o.dropoff.lat, "lng": o.dropoff.lng},
        });
        let (server, mint, stats, stop, watchers) = (server.clone(), mint.clone(), stats.clone(), stop.clone(), cfg.watchers);
        orders.spawn(async move {
            let created = create_order(&server, &mint, &body, &stats, &stop).await;
            drop(permit);
            if !created {
                stats.order_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            stats.orders_created.fetch_add(1, Ordering::Relaxed);
            // One line per order the server accepted: a failover drill checks each is still there.
            tracing::debug!(order = %id, "order accepted");
            // Claimed before the watch starts, so two orders created at once cannot both take
            // the last place.
            if stats.watchers_open.fetch_add(1, Ordering::Relaxed) as usize >= watchers {
                stats.watchers_open.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            let r = match mint.customer(&id) {
                Ok(token) => watch_order(&server, &id, &token, &stats, &stop).await,
                Err(e) => Err(e),
            };
            stats.watchers_open.fetch_sub(1, Ordering::Relaxed);
            if let Err(e) = r {
                tracing::debug!(order = %id, error = %format!("{e:#}"), "watcher ended");
            }
        });
    }
    orders.abort_all();
    Ok(())
}

/// Order creations in flight at once; past it, new arrivals wait (a backend's worker pool).
const MAX_CREATING: usize = 64;

/// Creates one order, retrying while the server says to try again (503, after its
/// `Retry-After`) or does not answer, as a shop's backend would: at most 10 attempts.
async fn create_order(server: &Server, mint: &TokenMint, body: &serde_json::Value, stats: &SimStats, stop: &CancellationToken) -> bool {
    for attempt in 1..=10 {
        // A token per request: a demo that runs for longer than a token lives goes on.
        let Ok(dispatcher) = mint.dispatcher() else { return false };
        let wait = match post_json(server, "/v1/orders", &dispatcher, body, Duration::from_secs(10)).await {
            Ok(r) if r.status == 201 || r.status == 200 => return true,
            Ok(r) if r.status == 503 || r.status == 504 => r.retry_after.unwrap_or(Duration::from_secs(2)),
            Ok(r) => {
                tracing::debug!(status = r.status, body = %String::from_utf8_lossy(&r.body), "order rejected");
                return false;
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), attempt, "order request failed");
                Duration::from_secs(2)
            }
        };
        stats.order_retries.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    false
}

/// A customer watching one order until it ends (at most two hours). Like a tracking page, it
/// reconnects when its socket closes (a node restarting, a market moving to another node),
/// with `?since=` its last `seq`, so it gets what it missed or a resync and a fresh snapshot.
async fn watch_order(
    server: &Server,
    order_id: &str,
    token: &str,
    stats: &SimStats,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = tokio::time::sleep(Duration::from_secs(2 * 3600));
    tokio::pin!(deadline);
    let mut since: Option<u64> = None;
    let mut failures = 0u32;
    tracing::debug!(order = %order_id, "watching order");
    loop {
        let path = match since {
            Some(s) => format!("/v1/ws/track/{order_id}?token={token}&since={s}"),
            None => format!("/v1/ws/track/{order_id}?token={token}"),
        };
        match connect_ws(server, &path, None, None, Duration::from_secs(10)).await {
            Ok(mut ws) => {
                let ended = loop {
                    tokio::select! {
                        _ = stop.cancelled() => break true,
                        _ = &mut deadline => break true,
                        m = ws.next() => {
                            let text = match m {
                                Some(Ok(Message::Text(t))) => t,
                                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break false,
                                Some(Ok(_)) => continue,
                            };
                            stats.watcher_msgs.fetch_add(1, Ordering::Relaxed);
                            // Reset on data, not on the upgrade: a node that takes the upgrade
                            // and then closes at once (its market moving) is backed off from,
                            // not spun on.
                            failures = 0;
                            let (seq, end) = match serde_json::from_str::<ServerMsg>(text.as_str()) {
                                Ok(ServerMsg::OrderUpdate { seq, state, .. }) => (seq, is_terminal_state(&state).then_some(state)),
                                Ok(ServerMsg::Courier { seq, .. } | ServerMsg::Resync { seq }) => (seq, None),
                                _ => (0, None),
                            };
                            if seq > 0 {
                                since = Some(seq);
                            }
                            if let Some(state) = end {
                                tracing::debug!(order = %order_id, %state, "watcher saw the order end");
                                break true;
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                if ended {
                    return Ok(());
                }
                stats.watcher_reconnects.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(order = %order_id, error = %format!("{e:#}"), failures, "watcher connect failed"),
        }
        failures += 1;
        if failures > 20 {
            anyhow::bail!("tracking socket of {order_id}: {failures} connects in a row without a message");
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = &mut deadline => return Ok(()),
            _ = tokio::time::sleep(crate::courier::reconnect_backoff(failures)) => {}
        }
    }
}

/// The open orders a console shows, after one of its messages: an `orders` snapshot replaces
/// them, a batch updates them (an order that ended leaves).
fn console_orders(open: &mut std::collections::HashMap<String, String>, v: &serde_json::Value) {
    if v["t"] != "orders" {
        return;
    }
    if v["snapshot"] == true {
        open.clear();
    }
    for item in v["items"].as_array().into_iter().flatten() {
        let (Some(id), Some(state)) = (item["id"].as_str(), item["state"].as_str()) else { continue };
        if is_terminal_state(state) {
            open.remove(id);
        } else {
            open.insert(id.to_owned(), state.to_owned());
        }
    }
}

/// A dispatcher's console on the whole box. Like the shipped console page it reconnects when
/// its socket closes (a node stopping, a market moving), with `?since=` its last `seq`, and
/// subscribes again, for a fresh snapshot. It keeps the open orders it shows (a snapshot
/// replaces them, a batch updates them); at the end it logs them (debug: "console view", then
/// "console shows order" per order), so a failover drill can check that what a dispatcher sees
/// converged to the store.
async fn watch_console(server: &Server, mint: &TokenMint, bbox: BBox, n: usize, stats: &SimStats, stop: &CancellationToken) -> anyhow::Result<()> {
    let subscribe = serde_json::json!({"t": "subscribe", "bbox": [bbox.min_lng, bbox.min_lat, bbox.max_lng, bbox.max_lat]}).to_string();
    let mut open: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut since: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        let token = mint.dispatcher()?;
        let path = match since {
            Some(s) => format!("/v1/ws/console?token={token}&since={s}"),
            None => format!("/v1/ws/console?token={token}"),
        };
        match connect_ws(server, &path, None, None, Duration::from_secs(10)).await {
            Ok(mut ws) => {
                let stopped = if futures_util::SinkExt::send(&mut ws, Message::text(subscribe.clone())).await.is_err() {
                    false
                } else {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break true,
                            m = ws.next() => {
                                let text = match m {
                                    Some(Ok(Message::Text(t))) => t,
                                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break false,
                                    Some(Ok(_)) => continue,
                                };
                                failures = 0;
                                let Ok(v) = serde_json::from_str::<serde_json::Value>(text.as_str()) else { continue };
                                if let Some(seq) = v["seq"].as_u64().filter(|s| *s > 0) {
                                    since = Some(seq);
                                }
                                console_orders(&mut open, &v);
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                if stopped {
                    break;
                }
                stats.console_reconnects.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(console = n, error = %format!("{e:#}"), failures, "console connect failed"),
        }
        failures += 1;
        if failures > 20 {
            anyhow::bail!("console {n}: {failures} connects in a row without a message");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(crate::courier::reconnect_backoff(failures)) => {}
        }
    }
    tracing::debug!(console = n, orders = open.len(), at_ms = crate::unix_ms(), "console view");
    for (id, state) in &open {
        tracing::debug!(console = n, order = %id, %state, "console shows order");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot replaces what the console showed (orders that ended while it was away
    /// leave), a batch updates it, an order that ends leaves, other messages change nothing.
    #[test]
    fn a_console_shows_the_open_orders_of_its_last_snapshot_and_batches() {
        let mut open = std::collections::HashMap::new();
        let msg = |t: &str, snapshot: bool, items: &[(&str, &str)]| {
            let items: Vec<_> = items.iter().map(|(id, state)| serde_json::json!({"id": id, "state": state})).collect();
            serde_json::json!({"t": t, "seq": 7, "snapshot": snapshot, "items": items})
        };
        console_orders(&mut open, &msg("orders", true, &[("o1", "created"), ("o2", "assigned")]));
        console_orders(&mut open, &msg("orders", false, &[("o1", "offered"), ("o3", "created"), ("o2", "delivered")]));
        console_orders(&mut open, &msg("couriers", true, &[("o9", "created")]));
        let mut shown: Vec<_> = open.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        shown.sort();
        assert_eq!(shown, [("o1", "offered"), ("o3", "created")]);
        // Reconnected: the fresh snapshot is the truth; o1 ended while the console was away.
        console_orders(&mut open, &msg("orders", true, &[("o3", "picked_up")]));
        assert_eq!(open.into_iter().collect::<Vec<_>>(), [("o3".to_owned(), "picked_up".to_owned())]);
    }
}
