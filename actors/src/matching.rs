//! One dispatch round: candidate pairs, their costs, and the matching.
//!
//! For each unassigned order, the candidates are the `k` couriers nearest to its pickup in the
//! fleet index snapshot (≤ 250 ms old) that are on shift, available, have not declined it, and
//! have capacity left after what is already committed to them (offers and held orders, from
//! the order actors' reservations). A courier already carrying orders is a candidate too: that
//! is batching.
//!
//! The cost of giving order `o` to courier `c` is the *marginal route cost*: the cost of `c`'s
//! best stop order with `o` added minus without it (route time plus weighted lateness, from
//! [`RoutePlanner`], so pickup-before-drop-off and capacity hold), minus `o`'s own direct trip
//! (pickup service, pickup → drop-off, drop-off service). For an idle courier that is the ETA to
//! the pickup plus any waiting and lateness; for a busy one it is the detour the batch adds.
//! Batching is refused when it would delay an order already held by more than
//! `batch_max_delay_s`. A pair costing more than `unassigned_cost_s` is not worth it: the order
//! waits for the next round.
//!
//! Each courier takes at most one new order per round (the marginal costs of two new orders on
//! the same route are not additive); a round is every 2 s by default, so a batch of several
//! forms over consecutive rounds, each step priced against the route as it then is.
//!
//! The matching is [`hexfleet_geo::assign::solve_optimal`] (minimum total cost) or, as a
//! baseline, [`hexfleet_geo::assign::solve_greedy`] (cheapest pair first).

use std::collections::HashMap;
use std::sync::Arc;

use hexfleet_geo::CourierKey;
use hexfleet_geo::assign::{self, AssignmentProblem};

use crate::domain::{CourierId, CourierStatus, Ms, Order, TenantId};
use crate::fleet::{DispatchPolicy, FleetCtx};
use crate::routing::{PlannedRoute, RoutePlanner};

/// The decision for one order.
#[derive(Clone, Debug)]
pub(crate) struct Pick {
    /// Index into the round's orders.
    pub order: usize,
    pub courier: CourierId,
    pub cost_s: f64,
    /// Every candidate weighed for this order with its cost, cheapest first.
    pub candidates: Vec<(CourierId, f64)>,
}

/// What a round decided and what it looked at.
#[derive(Clone, Debug, Default)]
pub(crate) struct Round {
    pub picks: Vec<Pick>,
    pub pairs: usize,
    pub couriers: usize,
    /// Total cost of the matching (assigned pairs plus waiting orders).
    pub cost: f64,
    /// Proven lower bound (optimal policy), `-inf` for greedy.
    pub lower_bound: f64,
}

/// A courier as seen by this round.
struct Col {
    id: CourierId,
    pos: hexfleet_geo::LatLng,
    capacity: u16,
    /// Capacity units already committed to it (offers and held orders).
    load: u16,
    planner: RoutePlanner,
    committed: Vec<Arc<Order>>,
    /// Best route for what is already committed (`None` if even that is infeasible).
    base: Option<PlannedRoute>,
}

/// The orders committed to each courier (offered to it or held by it), from a market's orders.
pub(crate) fn commitments<'a>(orders: impl Iterator<Item = &'a Arc<Order>>) -> HashMap<CourierId, Vec<Arc<Order>>> {
    let mut committed: HashMap<CourierId, Vec<Arc<Order>>> = HashMap::new();
    for o in orders {
        if let Some(c) = o.commitment() {
            committed.entry(c.clone()).or_default().push(o.clone());
        }
    }
    committed
}

/// Builds and solves one round over the tenant's current index snapshot. Runs on a blocking
/// thread.
pub(crate) fn plan_round(
    ctx: &FleetCtx,
    tenant: &TenantId,
    open: &[Arc<Order>],
    committed: &HashMap<CourierId, Vec<Arc<Order>>>,
    now: Ms,
) -> Round {
    let cfg = &ctx.config;
    let index = ctx.positions.tenant(tenant);
    let snap = index.fresh_blocking(cfg.index_rebuild);
    let mut cols: Vec<Col> = Vec::new();
    let mut col_of: HashMap<CourierKey, Option<u32>> = HashMap::new();
    let mut pairs: Vec<assign::Candidate> = Vec::new();
    // One planner per vehicle type for the round: the same learned model (a newer one may be
    // published mid-round) and a memo of the speeds looked up in it.
    let mut planners: HashMap<crate::domain::Vehicle, RoutePlanner> = HashMap::new();
    // Spare capacity by courier for the round. The nearest search skips couriers without room
    // for the order, so a hub full of busy couriers does not hide a free one further away. A
    // courier not heard from lately has none: its app may be dead.
    let mut spare: HashMap<CourierKey, u32> = HashMap::new();
    let mut spare_of = |key: CourierKey| -> u32 {
        *spare.entry(key).or_insert_with(|| {
            let Some(id) = index.id(key) else { return 0 };
            let Some(rec) = ctx.heard_courier(tenant, &id, now) else { return 0 };
            u32::from(rec.capacity).saturating_sub(u32::from(ctx.load(tenant, &id)))
        })
    };
    for (i, o) in open.iter().enumerate() {
        let declined: Vec<CourierKey> = o.declined.iter().map(|c| index.key(c)).collect();
        let near = snap.nearest(o.pickup, cfg.candidates_per_order, Some(cfg.max_pickup_distance_m), |e| {
            e.available && !declined.contains(&e.key) && spare_of(e.key) >= u32::from(o.size)
        });
        for (e, _) in near {
            let col = *col_of.entry(e.key).or_insert_with(|| {
                let id = index.id(e.key)?;
                let rec = ctx.heard_courier(tenant, &id, now)?;
                // The snapshot may be a little old: check the live record too.
                if !rec.on_shift || rec.status != CourierStatus::Available {
                    return None;
                }
                let planner = planners
                    .entry(rec.vehicle)
                    .or_insert_with(|| {
                        let mut p = ctx.planner(tenant, rec.vehicle, now);
                        if p.speeds.is_some() {
                            p.memo = Some(Arc::default());
                        }
                        p
                    })
                    .clone();
                let mine = committed.get(&id).cloned().unwrap_or_default();
                let refs: Vec<&Order> = mine.iter().map(|o| o.as_ref()).collect();
                let base = planner.plan(e.pos, now, rec.capacity, &refs);
                let load = ctx.load(tenant, &id);
                cols.push(Col { id, pos: e.pos, capacity: rec.capacity, load, planner, committed: mine, base });
                Some(cols.len() as u32 - 1)
            });
            let Some(col) = col else { continue };
            let c = &cols[col as usize];
            let Some(base) = &c.base else { continue };
            if u32::from(c.load) + u32::from(o.size) > u32::from(c.capacity) {
                continue;
            }
            let mut refs: Vec<&Order> = c.committed.iter().map(|o| o.as_ref()).collect();
            refs.push(o);
            let Some(with) = c.planner.plan(c.pos, now, c.capacity, &refs) else { continue };
            let delay = base.done_s.iter().zip(&with.done_s).map(|(b, w)| w - b).fold(0.0f64, f64::max);
            if delay > cfg.batch_max_delay_s {
                continue;
            }
            // What the order costs whoever serves it (the direct trip, and the lateness it has
            // even so) is not this courier's: the rest is the pickup trip, waiting, and the
            // delay to the courier's other orders, each late second weighted.
            let direct = cfg.pickup_service_s + c.planner.travel_s(o.pickup, o.dropoff) + cfg.dropoff_service_s;
            let cost = (with.cost_s - base.cost_s - direct - c.planner.unavoidable_lateness_cost(o, now)).max(0.0);
            pairs.push(assign::Candidate { order: i as u32, courier: col, cost });
        }
    }
    let problem = AssignmentProblem {
        n_orders: open.len(),
        n_couriers: cols.len(),
        candidates: pairs,
        unassigned_cost: vec![cfg.unassigned_cost_s; open.len()],
        courier_slots: Vec::new(),
    };
    let solution = match cfg.dispatch_policy {
        DispatchPolicy::Optimal => assign::solve_optimal(&problem),
        DispatchPolicy::Greedy => assign::solve_greedy(&problem),
    };
    let mut by_order: Vec<Vec<(CourierId, f64)>> = vec![Vec::new(); open.len()];
    for p in &problem.candidates {
        by_order[p.order as usize].push((cols[p.courier as usize].id.clone(), p.cost));
    }
    let picks = solution
        .courier_of
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let c = (*c)? as usize;
            let mut candidates = std::mem::take(&mut by_order[i]);
            candidates.sort_by(|a, b| a.1.total_cmp(&b.1));
            let courier = cols[c].id.clone();
            let cost_s = candidates.iter().find(|x| x.0 == courier).map_or(0.0, |x| x.1);
            Some(Pick { order: i, courier, cost_s, candidates })
        })
        .collect();
    Round { picks, pairs: problem.candidates.len(), couriers: cols.len(), cost: solution.cost, lower_bound: solution.lower_bound }
}
