//! The dispatcher: one actor per market (tenant). Every tick it lapses expired offers, expires
//! orders nobody took, and matches unassigned orders to couriers (see `matching.rs` for the
//! candidates, the marginal-route-cost model with batching, and the optimal or greedy
//! matching). Building and solving a round runs on a blocking thread so it never stalls
//! ingest. Each offer records its candidates and costs, which `GET /v1/orders/{id}` shows.
//! It also reports couriers that went silent while holding orders (`courier.silent`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::domain::{Actor as Who, AssignmentRecord, CourierId, DomainEvent, EntityKind, Ms, Order, OrderId, OrderState, TenantId};
use crate::fleet::FleetCtx;
use crate::order::Command;
use crate::publish::Update;
use crate::store::Write;

/// Messages of the dispatcher.
pub enum DispatchMsg {
    /// Periodic tick, with when it was sent.
    Tick(std::time::Instant),
    /// Tick now and answer when the round is done (tests, tools).
    TickNow(RpcReplyPort<()>),
    /// An order of this market changed.
    OrderChanged(Arc<Order>),
}

pub struct Dispatcher;

pub struct DispatcherArgs {
    pub ctx: Arc<FleetCtx>,
    pub tenant: TenantId,
}

pub struct DispatcherState {
    ctx: Arc<FleetCtx>,
    tenant: TenantId,
    /// Open orders of the market as last reported by their actors.
    orders: HashMap<OrderId, Arc<Order>>,
    ticker: Option<tokio::task::JoinHandle<()>>,
    /// When the last round ended: ticks sent before that were queued behind it.
    round_ended: Option<std::time::Instant>,
    /// Couriers holding orders that were reported silent ([`DispatcherState::watch_holders`]).
    silent: HashSet<CourierId>,
    /// When the dispatcher started (server clock).
    started_at: Ms,
    /// Silence events to log, then publish, in order ([`log_then_publish`]).
    silence_log: tokio::sync::mpsc::UnboundedSender<Vec<DomainEvent>>,
    /// Orders a take-back was sent for ([`DispatcherState::release_from_silent`]), and when:
    /// not sent again until the order changes, or for [`RELEASE_RESEND_MS`].
    release_sent: HashMap<OrderId, Ms>,
}

/// How long a take-back from a silent courier that changed nothing (a store outage) waits
/// before it is sent again.
const RELEASE_RESEND_MS: Ms = 30_000;

/// Logs each batch of events, then publishes it, one batch after the other: a `silent` and the
/// `silent_cleared` of the next round cannot reach the log (and the webhooks) in the wrong
/// order, and consoles see only what was logged. Ends when the dispatcher is dropped.
fn log_then_publish(ctx: Arc<FleetCtx>) -> tokio::sync::mpsc::UnboundedSender<Vec<DomainEvent>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<DomainEvent>>();
    tokio::spawn(async move {
        while let Some(events) = rx.recv().await {
            let n = events.len();
            match ctx.store.commit(events.iter().cloned().map(Write::Event).collect()).await {
                Ok(()) => {
                    for e in events {
                        ctx.publisher.publish(Update::Event(Arc::new(e)));
                    }
                }
                Err(e) => tracing::warn!(error = %e, n, "courier silence events not logged nor published"),
            }
        }
    });
    tx
}

impl Actor for Dispatcher {
    type Msg = DispatchMsg;
    type State = DispatcherState;
    type Arguments = DispatcherArgs;

    async fn pre_start(&self, me: ActorRef<DispatchMsg>, args: DispatcherArgs) -> Result<DispatcherState, ActorProcessingErr> {
        let orders = args.ctx.open_orders(&args.tenant).into_iter().map(|o| (o.id.clone(), o)).collect();
        let ticker = Some(me.send_interval(args.ctx.config.dispatch_tick, || DispatchMsg::Tick(std::time::Instant::now())));
        let (started_at, silence_log) = (args.ctx.clock.now_ms(), log_then_publish(args.ctx.clone()));
        Ok(DispatcherState { ctx: args.ctx, tenant: args.tenant, orders, ticker, round_ended: None, silent: HashSet::new(), started_at, silence_log, release_sent: HashMap::new() })
    }

    async fn post_stop(&self, _me: ActorRef<DispatchMsg>, st: &mut DispatcherState) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.ticker.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(&self, _me: ActorRef<DispatchMsg>, msg: DispatchMsg, st: &mut DispatcherState) -> Result<(), ActorProcessingErr> {
        match msg {
            DispatchMsg::Tick(sent) => {
                if tick_is_due(sent, st.round_ended) {
                    st.round().await;
                }
            }
            DispatchMsg::TickNow(reply) => {
                st.round().await;
                let _ = reply.send(());
            }
            DispatchMsg::OrderChanged(o) => {
                st.release_sent.remove(&o.id);
                if o.state.is_terminal() {
                    st.orders.remove(&o.id);
                } else {
                    // Keep the newest version (messages from different actors may interleave).
                    let newer = st.orders.get(&o.id).is_none_or(|prev| prev.version <= o.version);
                    if newer {
                        st.orders.insert(o.id.clone(), o);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a tick sent at `sent` still calls for a round. Ticks arrive every period whatever
/// the rounds take; those sent while a round ran (queued behind it) are skipped, so a market
/// whose rounds outlast the period runs them back to back instead of piling ticks up in the
/// mailbox, ahead of the order notices and lapses queued behind them.
fn tick_is_due(sent: std::time::Instant, round_ended: Option<std::time::Instant>) -> bool {
    round_ended.is_none_or(|ended| sent >= ended)
}

/// Since when an unassigned order has been waiting for a courier: its creation, its
/// `ready_at` when that is later (an order scheduled for later does not expire before it is
/// due), or when it was last handed back (`released_at`: an order a courier gave back after
/// 25 minutes is not expired a few minutes later, before dispatch could place it).
fn waiting_since(o: &Order) -> Ms {
    o.created_at.max(o.ready_at.unwrap_or(Ms::MIN)).max(o.released_at.unwrap_or(Ms::MIN))
}

impl DispatcherState {
    /// One dispatch round, and when it ended ([`tick_is_due`]).
    async fn round(&mut self) {
        self.tick().await;
        self.round_ended = Some(std::time::Instant::now());
    }

    /// Tells dispatchers about couriers that hold orders and went silent: no fix for more than
    /// `courier_stale_ms` (a dead phone, no signal). Dispatch already passes them over for new
    /// orders, but the orders they hold wait on them; a `courier.silent` event (consoles, the
    /// log, webhooks) names the courier and its orders, so a dispatcher can take them back
    /// (`release`). `courier.silent_cleared` closes it: heard from again, or holding nothing
    /// any more. One event per change while the dispatcher runs, not one per round (the flags
    /// are not kept across a restart or a takeover). For `courier_stale_ms` after the
    /// dispatcher starts nobody is flagged: after a restart or a market takeover the couriers'
    /// last fixes are old until their apps reconnect.
    fn watch_holders(&mut self, now: Ms) {
        let mut holding: HashMap<&CourierId, Vec<&OrderId>> = HashMap::new();
        for o in self.orders.values() {
            if let Some(c) = o.courier.as_ref().filter(|_| o.state.is_held()) {
                holding.entry(c).or_default().push(&o.id);
            }
        }
        let mut events = Vec::new();
        let event = |c: &CourierId, kind: &str, reason: String, attrs: Vec<(String, String)>| DomainEvent {
            tenant: self.tenant.clone(),
            entity: EntityKind::Courier,
            entity_id: c.to_string(),
            kind: kind.into(),
            actor: Who::System.to_string(),
            reason: Some(reason),
            ts: now,
            attrs,
        };
        self.silent.retain(|c| {
            let keep = holding.contains_key(c);
            if !keep {
                events.push(event(c, "courier.silent_cleared", "holds no orders any more".into(), Vec::new()));
            }
            keep
        });
        let settled = now.saturating_sub(self.started_at) >= self.ctx.config.courier_stale_ms;
        for (c, orders) in holding {
            let heard_at = self.ctx.heard_at(&self.tenant, c);
            let heard = self.ctx.recent(heard_at, now);
            let flagged = self.silent.contains(c);
            if heard && flagged {
                self.silent.remove(c);
                events.push(event(c, "courier.silent_cleared", "heard from again".into(), Vec::new()));
            } else if !heard && !flagged && settled {
                self.silent.insert(c.clone());
                metrics::counter!("hexfleet_couriers_silent_total").increment(1);
                let mut orders: Vec<&str> = orders.iter().map(|o| o.as_str()).collect();
                orders.sort_unstable();
                // A courier that never sent a fix has `heard_at` = `Ms::MIN`.
                let silent_s = heard_at.filter(|&at| at > 0).map(|at| now.saturating_sub(at) / 1000);
                let reason = match silent_s {
                    Some(s) => format!("no position for {s} s while holding {} order(s)", orders.len()),
                    None => format!("no position yet while holding {} order(s)", orders.len()),
                };
                let mut attrs = vec![("orders".into(), orders.join(","))];
                attrs.extend(silent_s.map(|s| ("silent_s".into(), s.to_string())));
                events.push(event(c, "courier.silent", reason, attrs));
            }
        }
        if let Some(limit) = self.ctx.config.release_silent_after_ms.filter(|_| settled) {
            self.release_from_silent(now, limit);
        }
        for e in &events {
            tracing::info!(tenant = %self.tenant, courier = %e.entity_id, kind = %e.kind, reason = e.reason.as_deref().unwrap_or(""), "courier silence");
        }
        if !events.is_empty() {
            // In order, and published once logged: through the market's fenced store, so a node
            // that lost the market publishes nothing.
            let _ = self.silence_log.send(events);
        }
    }

    /// `--release-silent-after-s`: orders not yet picked up, held by a courier silent for
    /// `limit`, go back to dispatch. Silent since the latest of its last fix, the order's last
    /// change (an order just assigned to a courier whose app is not open yet is not taken
    /// back at once) and the dispatcher's start (after a restart, the apps get `limit` to
    /// reconnect). The take-back names the holder (`Release` with the courier, by `system`):
    /// the order actor refuses it if the order moved to someone else meanwhile, as this
    /// round's view may be a notice behind. Goods on board stay with their courier.
    fn release_from_silent(&mut self, now: Ms, limit: Ms) {
        for o in self.orders.values() {
            let Some(c) = o.courier.as_ref().filter(|_| matches!(o.state, OrderState::Assigned | OrderState::AtPickup)) else { continue };
            let heard_at = self.ctx.heard_at(&self.tenant, c);
            if self.ctx.recent(heard_at, now) || self.release_sent.get(&o.id).is_some_and(|&at| now.saturating_sub(at) < RELEASE_RESEND_MS) {
                continue;
            }
            let since = heard_at.unwrap_or(Ms::MIN).max(o.updated_at).max(self.started_at);
            if now.saturating_sub(since) >= limit {
                tracing::info!(tenant = %self.tenant, courier = %c, order = %o.id, silent_s = now.saturating_sub(since) / 1000, "taking an order back from a silent courier");
                self.release_sent.insert(o.id.clone(), now);
                self.ctx.order_command(&self.tenant, &o.id, Command::Release { courier: Some(c.clone()) }, Who::System);
            }
        }
    }

    async fn tick(&mut self) {
        let started = std::time::Instant::now();
        let now = self.ctx.clock.now_ms();
        self.watch_holders(now);
        let cfg = &self.ctx.config;
        // 1. Offers that lapsed, orders nobody took (saying so when no courier can carry one:
        // it was accepted, as a bigger vehicle may join, but nothing tells its creator else).
        let mut largest = None;
        for o in self.orders.values() {
            match (&o.state, &o.offer) {
                (OrderState::Offered, Some(offer)) if offer.expires_at <= now => {
                    self.ctx.order_command(&self.tenant, &o.id, Command::OfferLapsed { courier: offer.courier.clone() }, Who::System);
                }
                (OrderState::Created, _) if now - waiting_since(o) >= cfg.order_expiry_ms => {
                    let largest = *largest.get_or_insert_with(|| self.ctx.largest_capacity(&self.tenant));
                    let why = largest.filter(|&c| o.size > c).map(|c| format!("no courier can carry it: size {} is over the largest capacity, {c}", o.size));
                    self.ctx.order_command(&self.tenant, &o.id, Command::Expire { why }, Who::System);
                }
                _ => {}
            }
        }
        // 2. Match unassigned orders that are ready (or will be within ten minutes), oldest first.
        let mut open: Vec<Arc<Order>> = self
            .orders
            .values()
            .filter(|o| o.state == OrderState::Created && o.ready_at.is_none_or(|r| r - now <= 10 * 60_000))
            .filter(|o| now - waiting_since(o) < cfg.order_expiry_ms)
            .cloned()
            .collect();
        if open.is_empty() {
            return;
        }
        open.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        // What each courier is already committed to, as this dispatcher knows it.
        let committed = crate::matching::commitments(self.orders.values());
        let (ctx, tenant) = (self.ctx.clone(), self.tenant.clone());
        let open2 = open.clone();
        let solve = move || crate::matching::plan_round(&ctx, &tenant, &open2, &committed, now);
        let round = match tokio::task::spawn_blocking(solve).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(tenant = %self.tenant, error = %e, "dispatch round failed");
                return;
            }
        };
        let cfg = &self.ctx.config;
        let policy = cfg.dispatch_policy.as_str();
        let n = round.picks.len();
        for pick in round.picks {
            let o = &open[pick.order];
            let record = AssignmentRecord { at: now, policy: policy.into(), courier: pick.courier.clone(), cost_s: pick.cost_s, candidates: pick.candidates };
            let cmd = if cfg.auto_accepts(&self.tenant) {
                Command::Assign { courier: pick.courier, record }
            } else {
                Command::Offer { courier: pick.courier, lasts_ms: cfg.offer_timeout_ms, record }
            };
            self.ctx.order_command(&self.tenant, &o.id, cmd, Who::System);
        }
        metrics::histogram!("hexfleet_dispatch_tick_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("hexfleet_dispatch_matches_total").increment(n as u64);
        tracing::debug!(
            tenant = %self.tenant,
            open = open.len(),
            couriers = round.couriers,
            pairs = round.pairs,
            matched = n,
            cost = round.cost,
            lower_bound = round.lower_bound,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "dispatch round"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn ticks_queued_behind_a_round_are_skipped() {
        let t0 = Instant::now();
        assert!(tick_is_due(t0, None), "the first tick runs");
        let ended = t0 + Duration::from_secs(5);
        // Sent at 2 s and 4 s while the round ran from 0 to 5 s: skipped.
        assert!(!tick_is_due(t0 + Duration::from_secs(2), Some(ended)));
        assert!(!tick_is_due(t0 + Duration::from_secs(4), Some(ended)));
        // The next one after it ends runs.
        assert!(tick_is_due(t0 + Duration::from_secs(6), Some(ended)));
    }
}
