//! Li & Lim pickup-and-delivery benchmark (PDPTW, the 100-customer instances): hexfleet's stop
//! planner ([`hexfleet_geo::stops`], with hard windows and the return to the depot) inside a
//! multi-vehicle search, and a validator that shares no code with either, to measure the gap
//! to the best-known solutions. Run by `hexfleet-bench lilim`.
//!
//! Format, one instance per file: a first line `vehicles capacity speed`, then one line per node
//! `id x y demand ready due service pickup delivery`. Node 0 is the depot. A pickup has
//! `pickup = 0` and `delivery` = its delivery's id; a delivery has `pickup` = its pickup's id.
//! Distances are Euclidean, travel time = distance / speed, every node (the depot too) has a
//! hard window [ready, due] on the service start (on the arrival, for the return to the depot),
//! and a vehicle that arrives early waits. The literature ranks solutions by vehicles first,
//! then total distance.
//!
//! The search, per instance:
//! 1. Construction: the requests in a few fixed orders (pickup ready time, delivery due time,
//!    pickup due time, angle around the depot, distance from it); each is inserted where its
//!    marginal distance is smallest among the positions that keep every window and the capacity,
//!    and opens a new vehicle when no route takes it. The best of the orders is kept.
//! 2. Vehicle reduction: take out the route with the fewest requests and run the large
//!    neighbourhood search below on the other routes, with a penalty per unserved request, until
//!    all are served (then try the next route) or the budget is spent.
//! 3. Distance: the same search with the number of vehicles fixed.
//! 4. Each final route re-planned from scratch by [`stops::plan`] (exact up to 8 stops, the
//!    heuristic beyond), kept when shorter. `stops` minimises completion time (travel, waiting,
//!    service), not distance, so this is a check of the planner more than an improvement step.
//!
//! The large neighbourhood search is Ropke & Pisinger's, simplified: remove 4–21 requests
//! (random ones, ones related in space and time, the most costly ones, or a whole route),
//! re-insert them by regret insertion (greedy, regret-2 or regret-3, half the time with noise),
//! accept by simulated annealing. Candidate positions are screened with each route's earliest
//! and latest service times; every insertion the search commits is then checked by
//! [`stops::evaluate`] on the whole route (a refusal is counted, see [`Outcome::refused`]).

use hexfleet_geo::stops::{self, RouteEnd, RouteProblem, Stop, StopKind};
use crate::Rng;

/// One node of an instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Node {
    pub x: f64,
    pub y: f64,
    /// Positive at a pickup, the opposite at its delivery, 0 at the depot.
    pub demand: i32,
    pub ready: f64,
    pub due: f64,
    pub service: f64,
    /// At a delivery, its pickup; 0 otherwise.
    pub pickup: usize,
    /// At a pickup, its delivery; 0 otherwise.
    pub delivery: usize,
}

/// A parsed instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    /// Vehicles available (first line). Not a constraint here: the search uses as few as it can.
    pub fleet: usize,
    pub capacity: i32,
    pub speed: f64,
    pub nodes: Vec<Node>,
    /// `(pickup, delivery)` node ids.
    pub requests: Vec<(usize, usize)>,
    dist: Vec<f64>,
}

fn numbers(line: &str) -> Result<Vec<f64>, String> {
    line.split_whitespace().map(|t| t.parse::<f64>().map_err(|e| format!("{t:?}: {e}"))).collect()
}

impl Instance {
    /// Parses the Li & Lim format and checks that pickups and deliveries pair up.
    pub fn parse(name: &str, text: &str) -> Result<Self, String> {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let (_, head) = lines.next().ok_or("empty instance")?;
        let head = numbers(head)?;
        if head.len() < 3 || head[1] <= 0.0 || head[2] <= 0.0 {
            return Err(format!("first line: expected `vehicles capacity speed`, got {head:?}"));
        }
        let mut nodes = Vec::new();
        for (no, line) in lines {
            let f = numbers(line).map_err(|e| format!("line {}: {e}", no + 1))?;
            if f.len() != 9 || f[0] != nodes.len() as f64 {
                return Err(format!("line {}: expected `{} x y demand ready due service pickup delivery`", no + 1, nodes.len()));
            }
            nodes.push(Node { x: f[1], y: f[2], demand: f[3] as i32, ready: f[4], due: f[5], service: f[6], pickup: f[7] as usize, delivery: f[8] as usize });
        }
        let n = nodes.len();
        let mut requests = Vec::new();
        for (i, v) in nodes.iter().enumerate().skip(1) {
            let ok = if v.delivery != 0 {
                let d = nodes.get(v.delivery);
                requests.push((i, v.delivery));
                v.pickup == 0 && v.demand >= 0 && d.is_some_and(|d| d.pickup == i && d.delivery == 0 && d.demand == -v.demand)
            } else {
                nodes.get(v.pickup).is_some_and(|p| v.pickup != 0 && p.delivery == i)
            };
            if !ok {
                return Err(format!("node {i}: pickup/delivery fields do not pair up"));
            }
        }
        if n < 3 || nodes[0].demand != 0 || 2 * requests.len() != n - 1 {
            return Err("expected a depot and pickup/delivery pairs".into());
        }
        let dist = (0..n * n).map(|k| (nodes[k / n].x - nodes[k % n].x).hypot(nodes[k / n].y - nodes[k % n].y)).collect();
        Ok(Instance { name: name.to_owned(), fleet: head[0] as usize, capacity: head[1] as i32, speed: head[2], nodes, requests, dist })
    }

    /// Euclidean distance between nodes.
    pub fn d(&self, a: usize, b: usize) -> f64 {
        self.dist[a * self.nodes.len() + b]
    }

    /// Travel time between nodes.
    pub fn t(&self, a: usize, b: usize) -> f64 {
        self.d(a, b) / self.speed
    }
}

/// A best-known solution's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BestKnown {
    pub vehicles: usize,
    pub distance: f64,
}

/// The row of `instance` in a best-known CSV with columns `instance`, `routes`, `distance`.
pub fn best_known(csv: &str, instance: &str) -> Option<BestKnown> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (ci, cr, cd) = (col("instance")?, col("routes")?, col("distance")?);
    lines.map(|l| l.split(',').map(str::trim).collect::<Vec<_>>()).find(|f| f.get(ci) == Some(&instance)).and_then(|f| {
        Some(BestKnown { vehicles: f.get(cr)?.parse().ok()?, distance: f.get(cd)?.parse().ok()? })
    })
}

/// Checks a solution on its own (no code shared with the search or `stops`): every request
/// served exactly once, pickup before its delivery in the same route, load within
/// `0..=capacity`, service within every window, back at the depot by its closing time. Routes
/// are node ids without the depot; empty routes are allowed and do not count. Returns the
/// total Euclidean distance.
pub fn validate(inst: &Instance, routes: &[Vec<usize>]) -> Result<f64, String> {
    let n = inst.nodes.len();
    let depot = inst.nodes[0];
    let mut served = vec![0u32; n];
    let mut in_route = vec![usize::MAX; n];
    let mut total = 0.0;
    for (r, route) in routes.iter().enumerate() {
        if route.is_empty() {
            continue;
        }
        let (mut t, mut at, mut load, mut dist) = (depot.ready, 0usize, 0i32, 0.0);
        for &v in route {
            if v == 0 || v >= n {
                return Err(format!("route {r}: node {v} is not a customer"));
            }
            served[v] += 1;
            in_route[v] = r;
            let node = inst.nodes[v];
            if node.delivery == 0 && in_route[node.pickup] != r {
                return Err(format!("route {r}: delivery {v} before its pickup {} (or without it)", node.pickup));
            }
            dist += inst.d(at, v);
            t = (t + inst.d(at, v) / inst.speed).max(node.ready);
            if t > node.due {
                return Err(format!("route {r}: service at {v} starts at {t:.3}, after its window closes at {}", node.due));
            }
            t += node.service;
            load += node.demand;
            if !(0..=inst.capacity).contains(&load) {
                return Err(format!("route {r}: load {load} after node {v}, capacity {}", inst.capacity));
            }
            at = v;
        }
        dist += inst.d(at, 0);
        t += inst.d(at, 0) / inst.speed;
        if t > depot.due {
            return Err(format!("route {r}: back at the depot at {t:.3}, after it closes at {}", depot.due));
        }
        if load != 0 {
            return Err(format!("route {r}: ends with load {load}"));
        }
        total += dist;
    }
    if let Some(v) = (1..n).find(|&v| served[v] != 1) {
        return Err(format!("node {v} is served {} times", served[v]));
    }
    Ok(total)
}

/// A route as one courier's [`RouteProblem`] for `hexfleet_geo::stops`: stop `k` is node
/// `nodes[k]` (hard window `latest_s` = its due time, no soft deadline, lateness weight 0), the
/// courier leaves the depot when it opens and must be back by its closing time (the
/// [`RouteEnd`]). Travel times for it: [`route_travel`].
pub fn route_problem(inst: &Instance, nodes: &[usize]) -> RouteProblem {
    let stops = nodes
        .iter()
        .map(|&v| {
            let n = inst.nodes[v];
            let pickup = n.delivery != 0;
            Stop {
                order: if pickup { v } else { n.pickup } as u32,
                kind: if pickup { StopKind::Pickup } else { StopKind::Dropoff },
                size: n.demand.unsigned_abs() as u16,
                ready_at_s: n.ready,
                deliver_by_s: None,
                service_s: n.service,
                latest_s: Some(n.due),
            }
        })
        .collect();
    RouteProblem {
        start_s: inst.nodes[0].ready,
        capacity: inst.capacity as u16,
        stops,
        lateness_weight: 0.0,
        end: Some(RouteEnd { latest_s: Some(inst.nodes[0].due) }),
    }
}

/// The travel-time function of [`route_problem`]: node 0 and node `nodes.len() + 1` are the
/// depot, node `k` is `nodes[k - 1]`.
pub fn route_travel<'a>(inst: &'a Instance, nodes: &'a [usize]) -> impl Fn(usize, usize) -> f64 + 'a {
    let id = move |k: usize| if k == 0 || k > nodes.len() { 0 } else { nodes[k - 1] };
    move |a, b| inst.t(id(a), id(b))
}

/// Does `stops::evaluate` accept the route in this order?
fn stops_accepts(inst: &Instance, nodes: &[usize]) -> bool {
    let order: Vec<usize> = (0..nodes.len()).collect();
    stops::evaluate(&route_problem(inst, nodes), &order, route_travel(inst, nodes)).is_some()
}

/// Search budget.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Large-neighbourhood iterations in all: vehicle reduction may use up to half, distance
    /// gets the rest.
    pub iterations: usize,
    pub seed: u64,
}

/// What [`stops::plan`] made of the final routes, each re-planned from scratch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Replan {
    /// Non-empty routes.
    pub routes: usize,
    /// Routes of more than [`stops::EXACT_MAX_STOPS`] stops (the heuristic's), and for how many
    /// of them it found a feasible order (one exists: the route's own).
    pub heuristic_routes: usize,
    pub heuristic_found: usize,
    /// Routes where the planner's order finishes no later than the search's order (it
    /// minimises completion time, so the exact planner always does).
    pub no_later: usize,
    /// Routes where its order is also shorter, and so replaced the search's; distance saved.
    pub shorter: usize,
    pub saved: f64,
    /// Time spent in `stops::plan`, seconds.
    pub seconds: f64,
}

/// The result of [`solve`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Non-empty routes, node ids without the depot.
    pub routes: Vec<Vec<usize>>,
    pub distance: f64,
    /// Vehicles and distance after the construction, and after vehicle reduction.
    pub construction: (usize, f64),
    pub reduced: (usize, f64),
    pub replan: Replan,
    /// Insertions that the screening allowed and `stops::evaluate` refused (0 unless the two
    /// disagree, e.g. on a rounding tie); refused insertions are not made.
    pub refused: usize,
    pub iterations: usize,
}

/// Cost of one vehicle and of one unserved request in the search's objective (distance units),
/// far above any distance difference. An unserved request costs more than a vehicle, so
/// emptying a route by leaving its requests unserved never pays.
const VEHICLE: f64 = 10_000.0;
const UNSERVED: f64 = 100_000.0;

/// Builds and improves a solution; see the module documentation. Deterministic for a seed.
/// `Err` only when a request cannot be served even alone.
pub fn solve(inst: &Instance, params: Params) -> Result<Outcome, String> {
    let mut s = Search::new(inst, params.seed);
    let mut orders: Vec<Vec<usize>> = Vec::new();
    let by = |key: &dyn Fn(usize, usize) -> f64| {
        let mut v: Vec<usize> = (0..inst.requests.len()).collect();
        v.sort_by(|&a, &b| {
            let (ka, kb) = (key(inst.requests[a].0, inst.requests[a].1), key(inst.requests[b].0, inst.requests[b].1));
            ka.total_cmp(&kb).then(a.cmp(&b))
        });
        v
    };
    let depot = inst.nodes[0];
    orders.push(by(&|p, _| inst.nodes[p].ready));
    orders.push(by(&|_, d| inst.nodes[d].due));
    orders.push(by(&|p, _| inst.nodes[p].due));
    orders.push(by(&|p, _| (inst.nodes[p].y - depot.y).atan2(inst.nodes[p].x - depot.x)));
    orders.push(by(&|p, d| -(inst.d(0, p) + inst.d(0, d))));
    let mut best: Option<Sol> = None;
    for order in &orders {
        let sol = s.construct(order)?;
        if best.as_ref().is_none_or(|b| sol.cost() < b.cost()) {
            best = Some(sol);
        }
    }
    let mut full = best.ok_or("no requests")?;
    let construction = (full.vehicles(), full.distance());

    // Vehicle reduction.
    let mut budget = params.iterations / 2;
    while full.vehicles() > 1 && budget > 0 {
        let mut sol = full.clone();
        sol.routes.retain(|r| !r.nodes.is_empty());
        let smallest = (0..sol.routes.len()).min_by(|&a, &b| sol.routes[a].nodes.len().cmp(&sol.routes[b].nodes.len()).then(sol.routes[a].dist.total_cmp(&sol.routes[b].dist))).ok_or("no routes")?;
        let gone = sol.routes.remove(smallest);
        sol.bank = gone.nodes.iter().filter(|&&v| inst.nodes[v].delivery != 0).map(|&v| s.req_of[v]).collect();
        s.repair(&mut sol, 2, false);
        let (sol, used) = if sol.bank.is_empty() { (sol, 0) } else { s.lns(sol, budget, true) };
        budget -= used.min(budget);
        if !sol.bank.is_empty() {
            break;
        }
        full = sol;
    }
    let reduced = (full.vehicles(), full.distance());

    // Distance.
    let left = params.iterations - (params.iterations / 2 - budget);
    let (mut full, _) = s.lns(full, left, false);
    if !full.bank.is_empty() {
        return Err("the search lost a request".into());
    }

    // Re-plan each route with the stop planner.
    let mut replan = Replan::default();
    for route in full.routes.iter_mut().filter(|r| !r.nodes.is_empty()) {
        replan.routes += 1;
        let (own, planned) = {
            let p = route_problem(inst, &route.nodes);
            let tt = route_travel(inst, &route.nodes);
            let own = stops::evaluate(&p, &(0..route.nodes.len()).collect::<Vec<_>>(), &tt).ok_or("the search made a route that stops::evaluate refuses")?;
            let started = std::time::Instant::now();
            let planned = stops::plan(&p, &tt);
            replan.seconds += started.elapsed().as_secs_f64();
            (own, planned)
        };
        let heuristic = route.nodes.len() > stops::EXACT_MAX_STOPS;
        replan.heuristic_routes += usize::from(heuristic);
        let Some(plan) = planned else { continue };
        replan.heuristic_found += usize::from(heuristic);
        replan.no_later += usize::from(plan.end_s <= own.end_s + 1e-9);
        let candidate = Route::new(inst, plan.order.iter().map(|&k| route.nodes[k]).collect());
        if candidate.dist < route.dist - 1e-9 {
            replan.shorter += 1;
            replan.saved += route.dist - candidate.dist;
            *route = candidate;
        }
    }
    full.routes.retain(|r| !r.nodes.is_empty());
    Ok(Outcome {
        distance: full.distance(),
        routes: full.routes.into_iter().map(|r| r.nodes).collect(),
        construction,
        reduced,
        replan,
        refused: s.refused,
        iterations: s.iterations,
    })
}

/// A route and its schedule.
#[derive(Debug, Clone, Default)]
struct Route {
    nodes: Vec<usize>,
    /// Earliest service start at each position.
    begin: Vec<f64>,
    /// Latest service start at each position that keeps the rest of the route feasible, and at
    /// `nodes.len()` the depot's closing time.
    latest: Vec<f64>,
    /// Load after each position.
    load: Vec<i32>,
    dist: f64,
}

impl Route {
    fn new(inst: &Instance, nodes: Vec<usize>) -> Self {
        let mut r = Route { nodes, ..Default::default() };
        r.refresh(inst);
        r
    }

    fn refresh(&mut self, inst: &Instance) {
        let m = self.nodes.len();
        let depot = inst.nodes[0];
        self.begin.clear();
        self.load.clear();
        let (mut t, mut at, mut load, mut dist) = (depot.ready, 0usize, 0i32, 0.0);
        for &v in &self.nodes {
            let n = inst.nodes[v];
            let b = (t + inst.t(at, v)).max(n.ready);
            load += n.demand;
            dist += inst.d(at, v);
            self.begin.push(b);
            self.load.push(load);
            t = b + n.service;
            at = v;
        }
        self.dist = if m == 0 { 0.0 } else { dist + inst.d(at, 0) };
        self.latest.clear();
        self.latest.resize(m + 1, depot.due);
        for k in (0..m).rev() {
            let v = self.nodes[k];
            let next = if k + 1 < m { self.nodes[k + 1] } else { 0 };
            self.latest[k] = inst.nodes[v].due.min(self.latest[k + 1] - inst.nodes[v].service - inst.t(v, next));
        }
    }

    /// When the vehicle leaves the node before gap `g` (the depot for `g == 0`).
    fn departure(&self, inst: &Instance, g: usize) -> f64 {
        if g == 0 { inst.nodes[0].ready } else { self.begin[g - 1] + inst.nodes[self.nodes[g - 1]].service }
    }

    fn with(&self, p: usize, d: usize, ins: Ins) -> Vec<usize> {
        let mut v = Vec::with_capacity(self.nodes.len() + 2);
        v.extend_from_slice(&self.nodes[..ins.i]);
        v.push(p);
        v.extend_from_slice(&self.nodes[ins.i..ins.j]);
        v.push(d);
        v.extend_from_slice(&self.nodes[ins.j..]);
        v
    }
}

/// An insertion: pickup before `nodes[i]`, delivery before `nodes[j]` (`i <= j`; at the end
/// when equal to the length), and its added distance.
#[derive(Debug, Clone, Copy)]
struct Ins {
    cost: f64,
    i: usize,
    j: usize,
}

/// The cheapest feasible insertion of pickup `p` and delivery `d` into `route`, screened with
/// the route's schedule: O(1) per position pair, exact for travel times with the triangle
/// inequality (up to rounding; [`stops::evaluate`] has the last word).
fn best_insertion(inst: &Instance, route: &Route, p: usize, d: usize) -> Option<Ins> {
    let nodes = &route.nodes;
    let m = nodes.len();
    let (np, nd) = (inst.nodes[p], inst.nodes[d]);
    let at = |k: usize| if k < m { nodes[k] } else { 0 };
    let mut best: Option<Ins> = None;
    let mut consider = |cost: f64, i: usize, j: usize| {
        if best.is_none_or(|b| cost < b.cost) {
            best = Some(Ins { cost, i, j });
        }
    };
    for i in 0..=m {
        let dep = route.departure(inst, i);
        if dep > np.due {
            break;
        }
        if (if i == 0 { 0 } else { route.load[i - 1] }) + np.demand > inst.capacity {
            continue;
        }
        let a = if i == 0 { 0 } else { nodes[i - 1] };
        let tp = (dep + inst.t(a, p)).max(np.ready);
        if tp > np.due {
            continue;
        }
        // The delivery right after the pickup.
        let b = at(i);
        let td = (tp + np.service + inst.t(p, d)).max(nd.ready);
        if td <= nd.due && td + nd.service + inst.t(d, b) <= route.latest[i] {
            consider(inst.d(a, p) + inst.d(p, d) + inst.d(d, b) - inst.d(a, b), i, i);
        }
        // The delivery after nodes[k]: walk the schedule pushed by the pickup.
        let add_p = inst.d(a, p) + inst.d(p, b) - inst.d(a, b);
        let (mut t, mut cur) = (tp, p);
        for (k, &v) in nodes.iter().enumerate().skip(i) {
            if route.load[k] + np.demand > inst.capacity {
                break;
            }
            t = (t + inst.nodes[cur].service + inst.t(cur, v)).max(inst.nodes[v].ready);
            if t > route.latest[k] {
                break;
            }
            cur = v;
            let b = at(k + 1);
            let td = (t + inst.nodes[v].service + inst.t(v, d)).max(nd.ready);
            if td <= nd.due && td + nd.service + inst.t(d, b) <= route.latest[k + 1] {
                consider(add_p + inst.d(v, d) + inst.d(d, b) - inst.d(v, b), i, k + 1);
            }
        }
    }
    best
}

/// A solution in the making: routes (some may be empty) and unserved requests.
#[derive(Debug, Clone, Default)]
struct Sol {
    routes: Vec<Route>,
    bank: Vec<usize>,
}

impl Sol {
    fn vehicles(&self) -> usize {
        self.routes.iter().filter(|r| !r.nodes.is_empty()).count()
    }

    fn distance(&self) -> f64 {
        self.routes.iter().map(|r| r.dist).sum()
    }

    fn cost(&self) -> f64 {
        VEHICLE * self.vehicles() as f64 + self.distance() + UNSERVED * self.bank.len() as f64
    }
}

struct Search<'a> {
    inst: &'a Instance,
    rng: Rng,
    /// Request of each node.
    req_of: Vec<usize>,
    /// The longest distance between two nodes.
    max_dist: f64,
    refused: usize,
    iterations: usize,
}

impl<'a> Search<'a> {
    fn new(inst: &'a Instance, seed: u64) -> Self {
        let mut req_of = vec![usize::MAX; inst.nodes.len()];
        for (q, &(p, d)) in inst.requests.iter().enumerate() {
            req_of[p] = q;
            req_of[d] = q;
        }
        let max_dist = inst.dist.iter().copied().fold(0.0, f64::max);
        Search { inst, rng: Rng::new(seed), req_of, max_dist, refused: 0, iterations: 0 }
    }

    /// The cheapest insertion of request `q` into `route`; an empty route costs a vehicle.
    fn insertion(&self, route: &Route, q: usize) -> Option<Ins> {
        let (p, d) = self.inst.requests[q];
        let mut ins = best_insertion(self.inst, route, p, d)?;
        if route.nodes.is_empty() {
            ins.cost += VEHICLE;
        }
        Some(ins)
    }

    /// Inserts request `q` into route `r` if `stops::evaluate` agrees with the screening.
    fn commit(&mut self, sol: &mut Sol, r: usize, q: usize, ins: Ins) -> bool {
        let (p, d) = self.inst.requests[q];
        let nodes = sol.routes[r].with(p, d, ins);
        if !stops_accepts(self.inst, &nodes) {
            self.refused += 1;
            return false;
        }
        sol.routes[r] = Route::new(self.inst, nodes);
        true
    }

    /// Cheapest insertion in a fixed order, a new vehicle when no route takes a request.
    fn construct(&mut self, order: &[usize]) -> Result<Sol, String> {
        let mut sol = Sol::default();
        for &q in order {
            let mut options: Vec<(Ins, usize)> = sol.routes.iter().enumerate().filter_map(|(r, route)| Some((self.insertion(route, q)?, r))).collect();
            options.sort_by(|a, b| a.0.cost.total_cmp(&b.0.cost));
            if options.into_iter().any(|(ins, r)| self.commit(&mut sol, r, q, ins)) {
                continue;
            }
            sol.routes.push(Route::new(self.inst, Vec::new()));
            let r = sol.routes.len() - 1;
            let ok = self.insertion(&sol.routes[r], q).is_some_and(|ins| self.commit(&mut sol, r, q, ins));
            if !ok {
                return Err(format!("request {q} {:?} cannot be served even alone", self.inst.requests[q]));
            }
        }
        Ok(sol)
    }

    /// Regret-`k` insertion of the bank (`k` = 1: greedy), into existing routes only; what
    /// fits nowhere stays in the bank. With `noise`, insertion costs are blurred by up to
    /// ±2.5 % of the longest distance (Ropke & Pisinger), for diversity.
    fn repair(&mut self, sol: &mut Sol, k: usize, noise: bool) {
        let mut bank = std::mem::take(&mut sol.bank);
        let mut cost: Vec<Vec<Option<Ins>>> = bank.iter().map(|&q| sol.routes.iter().map(|r| self.insertion(r, q)).collect()).collect();
        let amplitude = if noise { 0.025 * self.max_dist } else { 0.0 };
        let mut ranked: Vec<(f64, usize)> = Vec::new();
        while !bank.is_empty() {
            // (score, best cost, bank index, route)
            let mut pick: Option<(f64, f64, usize, usize)> = None;
            for (b, row) in cost.iter().enumerate() {
                ranked.clear();
                for (r, ins) in row.iter().enumerate() {
                    if let Some(ins) = ins {
                        let blur = if noise { amplitude * (2.0 * self.rng.f() - 1.0) } else { 0.0 };
                        ranked.push(((ins.cost + blur).max(0.0), r));
                    }
                }
                if ranked.is_empty() {
                    continue;
                }
                ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
                let c1 = ranked[0].0;
                // A request with fewer than k options is the most urgent.
                let score = if k <= 1 { -c1 } else { (1..k).map(|h| ranked.get(h).map_or(1e9, |x| x.0) - c1).sum() };
                if pick.is_none_or(|(s, c, ..)| score > s || (score == s && c1 < c)) {
                    pick = Some((score, c1, b, ranked[0].1));
                }
            }
            let Some((_, _, b, r)) = pick else { break };
            let q = bank[b];
            let ins = cost[b][r].expect("picked a feasible insertion");
            if !self.commit(sol, r, q, ins) {
                cost[b][r] = None;
                continue;
            }
            bank.swap_remove(b);
            cost.swap_remove(b);
            for (row, &q) in cost.iter_mut().zip(&bank) {
                row[r] = self.insertion(&sol.routes[r], q);
            }
        }
        sol.bank = bank;
    }

    /// Takes up to `q` requests out of the routes into the bank.
    fn destroy(&mut self, sol: &mut Sol, q: usize) {
        let inst = self.inst;
        // Where each node is served and when.
        let mut route_of = vec![usize::MAX; inst.nodes.len()];
        let mut begin = vec![0.0; inst.nodes.len()];
        let mut served = Vec::new();
        for (r, route) in sol.routes.iter().enumerate() {
            for (&v, &b) in route.nodes.iter().zip(&route.begin) {
                route_of[v] = r;
                begin[v] = b;
                if inst.nodes[v].delivery != 0 {
                    served.push(self.req_of[v]);
                }
            }
        }
        if served.is_empty() {
            return;
        }
        let q = q.min(served.len());
        let mut out: Vec<usize> = Vec::with_capacity(q);
        match self.rng.below(4) {
            0 => {
                // Random.
                while out.len() < q {
                    let x = served.swap_remove(self.rng.below(served.len()));
                    out.push(x);
                }
            }
            1 => {
                // Related (Shaw): close in space, in time and in size to one already taken.
                let horizon = inst.nodes[0].due.max(1.0);
                let (maxd, cap) = (self.max_dist.max(1.0), f64::from(inst.capacity.max(1)));
                out.push(served.swap_remove(self.rng.below(served.len())));
                while out.len() < q {
                    let (pa, da) = inst.requests[out[self.rng.below(out.len())]];
                    let rel = |x: usize| {
                        let (pb, db) = inst.requests[x];
                        9.0 * (inst.d(pa, pb) + inst.d(da, db)) / maxd
                            + 3.0 * ((begin[pa] - begin[pb]).abs() + (begin[da] - begin[db]).abs()) / horizon
                            + 2.0 * f64::from((inst.nodes[pa].demand - inst.nodes[pb].demand).abs()) / cap
                    };
                    served.sort_by(|&a, &b| rel(a).total_cmp(&rel(b)));
                    let k = (self.rng.f().powi(6) * served.len() as f64) as usize;
                    out.push(served.remove(k.min(served.len() - 1)));
                }
            }
            2 => {
                // Worst: the requests whose removal saves the most distance.
                let saving = |x: usize| {
                    let (p, d) = inst.requests[x];
                    let route = &sol.routes[route_of[p]].nodes;
                    let rest: Vec<usize> = route.iter().copied().filter(|&v| v != p && v != d).collect();
                    let len = |v: &[usize]| v.windows(2).map(|w| inst.d(w[0], w[1])).sum::<f64>() + v.first().map_or(0.0, |&a| inst.d(0, a)) + v.last().map_or(0.0, |&z| inst.d(z, 0));
                    len(route) - len(&rest)
                };
                let mut by_saving: Vec<(f64, usize)> = served.iter().map(|&x| (saving(x), x)).collect();
                by_saving.sort_by(|a, b| b.0.total_cmp(&a.0));
                while out.len() < q {
                    let k = (self.rng.f().powi(3) * by_saving.len() as f64) as usize;
                    out.push(by_saving.remove(k.min(by_saving.len() - 1)).1);
                }
            }
            _ => {
                // A whole route, the smaller of two picked at random.
                let nonempty: Vec<usize> = (0..sol.routes.len()).filter(|&r| !sol.routes[r].nodes.is_empty()).collect();
                let (a, b) = (nonempty[self.rng.below(nonempty.len())], nonempty[self.rng.below(nonempty.len())]);
                let r = if sol.routes[a].nodes.len() <= sol.routes[b].nodes.len() { a } else { b };
                out.extend(sol.routes[r].nodes.iter().filter(|&&v| inst.nodes[v].delivery != 0).map(|&v| self.req_of[v]));
            }
        }
        let mut touched = vec![false; sol.routes.len()];
        let mut gone = vec![false; inst.nodes.len()];
        for &x in &out {
            let (p, d) = inst.requests[x];
            touched[route_of[p]] = true;
            gone[p] = true;
            gone[d] = true;
        }
        for (r, route) in sol.routes.iter_mut().enumerate() {
            if touched[r] {
                route.nodes.retain(|&v| !gone[v]);
                route.refresh(inst);
            }
        }
        sol.bank.extend(out);
    }

    /// Large neighbourhood search from `start` for up to `iterations` (fewer with
    /// `until_served`, which returns as soon as every request is served). Returns the best
    /// solution seen and the iterations used.
    fn lns(&mut self, start: Sol, iterations: usize, until_served: bool) -> (Sol, usize) {
        let n = self.inst.requests.len();
        let (q_min, q_max) = (4.min(n), (n * 2 / 5).clamp(4.min(n), 30));
        // Start accepting 5 % worse with probability 1/2, end 200 times colder.
        let mut temp = 0.05 * start.distance().max(1.0) / std::f64::consts::LN_2;
        let cooling = 0.005f64.powf(1.0 / iterations.max(1) as f64);
        let mut best = start.clone();
        let mut cur = start;
        for it in 0..iterations {
            self.iterations += 1;
            let mut cand = cur.clone();
            let q = q_min + self.rng.below(q_max - q_min + 1);
            self.destroy(&mut cand, q);
            let k = 1 + self.rng.below(3);
            let noise = self.rng.f() < 0.5;
            self.repair(&mut cand, k, noise);
            let delta = cand.cost() - cur.cost();
            if delta < 0.0 || self.rng.f() < (-delta / temp).exp() {
                cur = cand;
                if cur.cost() < best.cost() - 1e-9 {
                    best = cur.clone();
                    if until_served && best.bank.is_empty() {
                        return (best, it + 1);
                    }
                }
            }
            temp *= cooling;
        }
        (best, iterations)
    }
}
