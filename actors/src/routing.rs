//! Stop order for one courier's orders: domain orders adapted to the planner of
//! `hexfleet_geo::stops` (exact up to 8 stops, insertion plus local search beyond), with
//! pickup-before-drop-off, capacity, `ready_at` waits and lateness against `deliver_by`.
//!
//! The dispatcher uses [`RoutePlanner::plan`] to price adding an order to a courier's route (the
//! marginal cost and the delay it causes to the orders already held); the courier actor uses it
//! to send the device its `route`. Travel time is great-circle distance × detour ÷ speed, where
//! the speed is learned from the fleet per H3 cell and hour of week (`crate::speeds`) when a
//! model exists for the courier's tenant and vehicle, and the vehicle's prior speed otherwise:
//! an ETA model, not a road router (see `hexfleet_geo::eta::RouteProvider`).

use std::collections::HashMap;
use std::sync::Arc;

use hexfleet_geo::eta::SpeedModel;
use hexfleet_geo::stops::{self, RouteProblem, Stop, StopKind};
use hexfleet_geo::{LatLng, haversine_m};

use crate::domain::{Ms, Order};
use crate::publish::RouteStop;

/// Parameters of route planning.
#[derive(Clone, Debug)]
pub struct RoutePlanner {
    /// Road distance ÷ great-circle distance.
    pub detour: f64,
    /// Vehicle speed in m/s where no learned model exists.
    pub speed_mps: f64,
    /// Learned speeds of this tenant's vehicle type (they fall back to the vehicle's prior
    /// where nothing was observed).
    pub speeds: Option<Arc<SpeedModel>>,
    /// Departure time (Unix ms): the hour of week the learned speeds are read at.
    pub at_ms: Ms,
    /// Speeds already looked up (a dispatch round prices the same pickups and courier
    /// positions many times; a look-up is an H3 cell and two hash probes). Shared only by
    /// planners of the same model and departure time.
    pub memo: Option<Arc<SpeedMemo>>,
    /// Seconds spent at a pickup.
    pub pickup_service_s: f64,
    /// Seconds spent at a drop-off.
    pub dropoff_service_s: f64,
    /// Cost of one second of lateness, in seconds of route time.
    pub lateness_weight: f64,
}

/// See [`RoutePlanner::memo`].
#[derive(Debug, Default)]
pub struct SpeedMemo(parking_lot::Mutex<HashMap<(u64, u64), f64>>);

/// A planned route.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedRoute {
    pub stops: Vec<RouteStop>,
    /// Route time in seconds (travel, waiting and service) plus weighted lateness.
    pub cost_s: f64,
    /// Seconds from now until each order's drop-off is done, in `orders` order.
    pub done_s: Vec<f64>,
}

impl RoutePlanner {
    /// Expected speed around `p`, m/s.
    pub fn speed_at(&self, p: LatLng) -> f64 {
        let Some(m) = &self.speeds else { return self.speed_mps };
        match &self.memo {
            None => m.speed_mps(p, self.at_ms),
            Some(memo) => *memo.0.lock().entry((p.lat.to_bits(), p.lng.to_bits())).or_insert_with(|| m.speed_mps(p, self.at_ms)),
        }
    }

    /// Travel seconds between two points (at the mean of the speeds at both ends).
    pub fn travel_s(&self, a: LatLng, b: LatLng) -> f64 {
        Self::leg_s(haversine_m(a, b), self.detour, 0.5 * (self.speed_at(a) + self.speed_at(b)))
    }

    fn leg_s(metres: f64, detour: f64, speed_mps: f64) -> f64 {
        metres * detour / speed_mps.max(0.1)
    }

    /// The weighted lateness `o` has however it is served: picked up at once (or when ready)
    /// and driven straight to its drop-off, `0` without a `deliver_by`. A dispatch round prices
    /// a courier by the cost it adds beyond this and the direct trip: an order already late, or
    /// too far for its deadline, would otherwise cost more than leaving it unassigned with every
    /// courier, and wait until it expired.
    pub fn unavoidable_lateness_cost(&self, o: &Order, now: Ms) -> f64 {
        let Some(by) = o.deliver_by else { return 0.0 };
        let rel = |t: Ms| (t - now) as f64 / 1000.0;
        let at_dropoff = if o.state.is_on_board() {
            0.0
        } else {
            o.ready_at.map_or(0.0, rel).max(0.0) + self.pickup_service_s + self.travel_s(o.pickup, o.dropoff)
        };
        self.lateness_weight * (at_dropoff - rel(by)).max(0.0)
    }

    /// The best stop order for `orders` starting at `start` at time `now` (Unix ms), with the
    /// courier's `capacity`. Orders on board contribute only their drop-off. `None` when no
    /// order satisfies the capacity (e.g. the on-board load alone exceeds it).
    pub fn plan(&self, start: LatLng, now: Ms, capacity: u16, orders: &[&Order]) -> Option<PlannedRoute> {
        if orders.is_empty() {
            return Some(PlannedRoute { stops: Vec::new(), cost_s: 0.0, done_s: Vec::new() });
        }
        let mut pts = vec![start];
        let mut stops = Vec::with_capacity(orders.len() * 2);
        for (i, o) in orders.iter().enumerate() {
            let rel = |t: Ms| (t - now) as f64 / 1000.0;
            if !o.state.is_on_board() {
                pts.push(o.pickup);
                stops.push(Stop {
                    order: i as u32,
                    kind: StopKind::Pickup,
                    size: o.size,
                    ready_at_s: o.ready_at.map_or(0.0, rel).max(0.0),
                    deliver_by_s: None,
                    service_s: self.pickup_service_s,
                    latest_s: None,
                });
            }
            pts.push(o.dropoff);
            stops.push(Stop {
                order: i as u32,
                kind: StopKind::Dropoff,
                size: o.size,
                ready_at_s: 0.0,
                deliver_by_s: o.deliver_by.map(rel),
                service_s: self.dropoff_service_s,
                latest_s: None,
            });
        }
        let p = RouteProblem { start_s: 0.0, capacity, stops, lateness_weight: self.lateness_weight, end: None };
        // One speed look-up per point (an H3 cell each), not per pair.
        let v: Vec<f64> = pts.iter().map(|p| self.speed_at(*p)).collect();
        let tt = |a: usize, b: usize| Self::leg_s(haversine_m(pts[a], pts[b]), self.detour, 0.5 * (v[a] + v[b]));
        let plan = stops::plan(&p, tt)?;
        // Walk the plan once more for each drop-off's completion time.
        let mut done_s = vec![0.0; orders.len()];
        let (mut t, mut at) = (0.0f64, 0usize);
        let mut out = Vec::with_capacity(plan.order.len());
        for &i in &plan.order {
            let s = &p.stops[i];
            t = (t + tt(at, i + 1)).max(s.ready_at_s) + s.service_s;
            at = i + 1;
            let o = orders[s.order as usize];
            let pickup = s.kind == StopKind::Pickup;
            if !pickup {
                done_s[s.order as usize] = t;
            }
            out.push(RouteStop { order: o.id.clone(), pickup, pos: if pickup { o.pickup } else { o.dropoff } });
        }
        Some(PlannedRoute { stops: out, cost_s: plan.cost, done_s })
    }
}

/// Nearest feasible stop next: the fallback when the planner finds no feasible order (a
/// dispatcher override beyond capacity). Pickups come before their drop-offs.
pub fn nearest_first<'a>(start: Option<LatLng>, orders: impl Iterator<Item = &'a Order>) -> Vec<RouteStop> {
    let mut open: Vec<RouteStop> = Vec::new();
    for o in orders {
        if !o.state.is_on_board() {
            open.push(RouteStop { order: o.id.clone(), pickup: true, pos: o.pickup });
        }
        open.push(RouteStop { order: o.id.clone(), pickup: false, pos: o.dropoff });
    }
    let mut out = Vec::with_capacity(open.len());
    let mut here = start;
    while !open.is_empty() {
        let feasible = |s: &RouteStop, open: &[RouteStop]| s.pickup || !open.iter().any(|p| p.pickup && p.order == s.order);
        let best = (0..open.len())
            .filter(|&i| feasible(&open[i], &open))
            .min_by(|&a, &b| {
                let da = here.map_or(0.0, |h| haversine_m(h, open[a].pos));
                let db = here.map_or(0.0, |h| haversine_m(h, open[b].pos));
                da.total_cmp(&db)
            })
            .expect("a drop-off is always feasible once its pickup is out");
        let s = open.remove(best);
        here = Some(s.pos);
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderId, OrderState, TenantId};

    fn order(id: &str, p: (f64, f64), d: (f64, f64), state: OrderState) -> Order {
        Order {
            tenant: TenantId::new("t"),
            id: OrderId::new(id),
            pickup: LatLng::new(p.0, p.1).unwrap(),
            dropoff: LatLng::new(d.0, d.1).unwrap(),
            size: 1,
            ready_at: None,
            deliver_by: None,
            state,
            courier: None,
            offer: None,
            declined: vec![],
            assignment: None,
            created_at: 0,
            updated_at: 0,
            version: 0,
            released_at: None,
        }
    }

    const P: RoutePlanner = RoutePlanner { detour: 1.3, speed_mps: 5.0, speeds: None, at_ms: 0, memo: None, pickup_service_s: 60.0, dropoff_service_s: 60.0, lateness_weight: 2.0 };

    #[test]
    fn pickups_precede_dropoffs_and_on_board_orders_have_only_a_dropoff() {
        let a = order("a", (45.50, -73.57), (45.52, -73.57), OrderState::Assigned);
        let b = order("b", (45.505, -73.57), (45.515, -73.57), OrderState::PickedUp);
        let start = LatLng::new(45.49, -73.57).unwrap();
        let r = P.plan(start, 0, 4, &[&a, &b]).unwrap();
        assert_eq!(r.stops.len(), 3);
        let pos = |id: &str, pickup: bool| r.stops.iter().position(|s| s.order.as_str() == id && s.pickup == pickup);
        assert!(pos("a", true).unwrap() < pos("a", false).unwrap());
        assert_eq!(pos("b", true), None);
        // Going north: pick a up, drop b, drop a.
        let ids: Vec<(&str, bool)> = r.stops.iter().map(|s| (s.order.as_str(), s.pickup)).collect();
        assert_eq!(ids, vec![("a", true), ("b", false), ("a", false)]);
        assert!(r.done_s[1] < r.done_s[0]);
    }

    #[test]
    fn capacity_limits_the_load() {
        // Capacity 1: the second pickup must wait until the first drop-off.
        let a = order("a", (45.50, -73.57), (45.52, -73.57), OrderState::Assigned);
        let b = order("b", (45.501, -73.57), (45.521, -73.57), OrderState::Assigned);
        let start = LatLng::new(45.49, -73.57).unwrap();
        let r = P.plan(start, 0, 1, &[&a, &b]).unwrap();
        let mut load = 0i32;
        for s in &r.stops {
            load += if s.pickup { 1 } else { -1 };
            assert!(load <= 1);
        }
        let two = P.plan(start, 0, 2, &[&a, &b]).unwrap();
        assert!(two.cost_s < r.cost_s, "more capacity never costs more");
    }

    #[test]
    fn fallback_orders_pickups_first() {
        let a = order("a", (45.50, -73.57), (45.49, -73.57), OrderState::Assigned);
        let s = nearest_first(Some(LatLng::new(45.49, -73.57).unwrap()), [&a].into_iter());
        assert!(s[0].pickup && !s[1].pickup);
    }
}
