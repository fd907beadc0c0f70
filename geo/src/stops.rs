//! Stop order for one courier: in what order to visit its pickups and drop-offs.
//!
//! Constraints: an order's pickup comes before its drop-off; orders already on board have only
//! a drop-off; the load never exceeds the courier's capacity; service at a stop with a hard
//! window (`latest_s`) starts by then, and the route reaches its optional end node
//! ([`RouteEnd`], e.g. the depot) by its deadline. Objective: the route's completion time
//! (travel, waiting for `ready_at`, service, and the leg to the end node when there is one) plus
//! `lateness_weight` × the sum of lateness against each drop-off's soft `deliver_by`. Travel
//! times come from a caller-supplied function over node indices (0 = the courier's position,
//! `i + 1` = `stops[i]`, `stops.len() + 1` = the end node), so the same code runs on haversine
//! ETAs, a learned speed model, a road router's matrix, or the Euclidean Li & Lim benchmark.
//!
//! * Up to [`EXACT_MAX_STOPS`] stops: exact dynamic programming over (visited set, last stop)
//!   with Pareto labels on (time, lateness). The load is a function of the visited set, so
//!   capacity and precedence are checked per set; keeping every non-dominated (time,
//!   lateness) pair makes it exact even with waiting and lateness, because both the remaining
//!   time and the remaining lateness only grow with the arrival time. Labels that miss a hard
//!   window are dropped (an earlier label never misses one a later label meets).
//! * Beyond: cheapest insertion of each request (pickup/drop-off pair, or lone drop-off) from
//!   several request orders, then local search (relocate a request, move a stop, reverse a
//!   segment) and seeded ruin-and-recreate, within a work budget ([`SEARCH_BUDGET`]); see
//!   [`plan_heuristic`].

/// Routes up to this many stops are solved exactly by [`plan`].
pub const EXACT_MAX_STOPS: usize = 8;

/// The most work [`plan_heuristic`] does, in stops evaluated, beyond its first construction.
/// The search grows as about n⁴ (a local-search pass is n² moves of n stops, and passes grow
/// with n too): without a bound a courier holding 50 orders (100 stops) took 3.9 s per plan,
/// and one holding 85 took 43 s, on every change of what it holds.
pub const SEARCH_BUDGET: u64 = 8_000_000;

/// Pickup or drop-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    Pickup,
    Dropoff,
}

/// One stop of a courier's route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stop {
    /// The caller's order reference; a pickup and a drop-off with the same `order` form a pair.
    pub order: u32,
    pub kind: StopKind,
    /// Size units loaded at the pickup and unloaded at the drop-off.
    pub size: u16,
    /// Earliest service start (seconds on the problem's clock); the courier waits until then.
    pub ready_at_s: f64,
    /// Drop-offs only: lateness is counted after this.
    pub deliver_by_s: Option<f64>,
    /// Time spent at the stop.
    pub service_s: f64,
    /// Hard window: the latest service start (same clock). An order that starts service here
    /// later is infeasible: [`evaluate`] returns `None` for it and the planners never return it.
    /// `None` for no hard window (the usual case; `deliver_by_s` stays a soft target).
    pub latest_s: Option<f64>,
}

/// The node a route must finish at after its last stop (a depot, a hub, the end of a shift's
/// area). It is node `stops.len() + 1` of the travel-time function.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RouteEnd {
    /// Hard latest arrival at the end node; `None` for no deadline.
    pub latest_s: Option<f64>,
}

/// One courier's stops.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteProblem {
    /// The courier's clock now (seconds, same clock as the stops' times).
    pub start_s: f64,
    /// Capacity in size units. The initial load is the size of the on-board orders (drop-offs
    /// whose pickup is not in `stops`).
    pub capacity: u16,
    pub stops: Vec<Stop>,
    /// Seconds of cost per second of lateness (e.g. 5: being late is five times worse than
    /// driving longer).
    pub lateness_weight: f64,
    /// Where the route must end, if anywhere: `None` ends it at its last stop (a courier stays
    /// where it delivered). With an end node the travel there counts in the cost and `end_s`.
    pub end: Option<RouteEnd>,
}

/// A stop order and what it costs.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Indices into `stops`, in visiting order.
    pub order: Vec<usize>,
    /// `(end_s - start_s) + lateness_weight * lateness_s`.
    pub cost: f64,
    /// When the last stop is done, or, with a [`RouteEnd`], when the route reaches it.
    pub end_s: f64,
    /// Total lateness over drop-offs, in seconds.
    pub lateness_s: f64,
}

impl RouteProblem {
    /// For each stop, the index of the stop that must come before it (a drop-off's pickup).
    fn predecessors(&self) -> Vec<Option<usize>> {
        self.stops
            .iter()
            .map(|s| match s.kind {
                StopKind::Pickup => None,
                StopKind::Dropoff => self.stops.iter().position(|p| p.kind == StopKind::Pickup && p.order == s.order),
            })
            .collect()
    }

    fn initial_load(&self, pred: &[Option<usize>]) -> i32 {
        self.stops.iter().zip(pred).filter(|(s, p)| s.kind == StopKind::Dropoff && p.is_none()).map(|(s, _)| i32::from(s.size)).sum()
    }

    fn delta(&self, i: usize) -> i32 {
        let s = &self.stops[i];
        match s.kind {
            StopKind::Pickup => i32::from(s.size),
            StopKind::Dropoff => -i32::from(s.size),
        }
    }

    /// Departure from stop `i` when arriving at `arrive`, and the lateness there; `None` when
    /// service would start after the stop's hard window.
    fn visit(&self, i: usize, arrive: f64) -> Option<(f64, f64)> {
        let s = &self.stops[i];
        let begin = arrive.max(s.ready_at_s);
        if s.latest_s.is_some_and(|l| begin > l) {
            return None;
        }
        let late = match (s.kind, s.deliver_by_s) {
            (StopKind::Dropoff, Some(by)) => (begin - by).max(0.0),
            _ => 0.0,
        };
        Some((begin + s.service_s, late))
    }

    /// When the route is over, leaving node `at` at `t`: `t` itself without an end node, else
    /// the arrival there (`None` after its deadline).
    fn finish(&self, t: f64, at: usize, tt: impl Fn(usize, usize) -> f64) -> Option<f64> {
        let Some(end) = self.end else { return Some(t) };
        let arrive = t + tt(at, self.stops.len() + 1);
        if end.latest_s.is_some_and(|l| arrive > l) { None } else { Some(arrive) }
    }

    /// Number of nodes of the travel-time function: the start, the stops, the end if any.
    fn nodes(&self) -> usize {
        self.stops.len() + 1 + usize::from(self.end.is_some())
    }

    /// Travel matrix over [`Self::nodes`], computed once: the closure may be a model look-up.
    fn matrix(&self, tt: impl Fn(usize, usize) -> f64) -> Vec<f64> {
        let k = self.nodes();
        (0..k).flat_map(|a| (0..k).map(move |b| (a, b))).map(|(a, b)| tt(a, b)).collect()
    }
}

/// Evaluates a given order; `None` when it is not a permutation of the stops or breaks
/// precedence, capacity, a hard window or the end node's deadline.
pub fn evaluate(p: &RouteProblem, order: &[usize], tt: impl Fn(usize, usize) -> f64) -> Option<Plan> {
    let pred = p.predecessors();
    let n = p.stops.len();
    if order.len() != n {
        return None;
    }
    let mut seen = vec![false; n];
    let (mut t, mut late, mut load, mut at) = (p.start_s, 0.0, p.initial_load(&pred), 0usize);
    if load > i32::from(p.capacity) {
        return None;
    }
    for &i in order {
        if i >= n || seen[i] || pred[i].is_some_and(|q| !seen[q]) {
            return None;
        }
        seen[i] = true;
        load += p.delta(i);
        if load > i32::from(p.capacity) {
            return None;
        }
        let (dep, l) = p.visit(i, t + tt(at, i + 1))?;
        t = dep;
        late += l;
        at = i + 1;
    }
    let t = p.finish(t, at, &tt)?;
    Some(Plan { order: order.to_vec(), cost: (t - p.start_s) + p.lateness_weight * late, end_s: t, lateness_s: late })
}

/// The best stop order: exact up to [`EXACT_MAX_STOPS`] stops, heuristic beyond. `None` when
/// no order is feasible (capacity, hard windows, the end's deadline); beyond
/// [`EXACT_MAX_STOPS`], also when the heuristic finds no feasible order although one exists,
/// which tight hard windows make possible (see [`plan_heuristic`]).
pub fn plan(p: &RouteProblem, tt: impl Fn(usize, usize) -> f64) -> Option<Plan> {
    if p.stops.len() <= EXACT_MAX_STOPS { plan_exact(p, tt) } else { plan_heuristic(p, tt) }
}

#[derive(Debug, Clone, Copy)]
struct Label {
    t: f64,
    late: f64,
    /// Index of the previous label in the arena (`u32::MAX` for the start).
    prev: u32,
    last: u8,
}

/// Exact DP over (visited set, last stop) with Pareto labels. Exponential: use for up to ~12
/// stops (8 in well under a millisecond). `None` exactly when no order is feasible.
///
/// # Panics
/// With more than 16 stops.
pub fn plan_exact(p: &RouteProblem, tt: impl Fn(usize, usize) -> f64) -> Option<Plan> {
    let n = p.stops.len();
    assert!(n <= 16, "exact stop ordering is for small routes");
    let pred = p.predecessors();
    let load0 = p.initial_load(&pred);
    let cap = i32::from(p.capacity);
    if load0 > cap {
        return None;
    }
    // Travel matrix once: the closure may be a model look-up.
    let (m, k) = (p.matrix(tt), p.nodes());
    let tm = |a: usize, b: usize| m[a * k + b];
    if n == 0 {
        return evaluate(p, &[], tm);
    }
    let full = (1usize << n) - 1;
    let need: Vec<usize> = pred.iter().map(|q| q.map_or(0, |q| 1 << q)).collect();
    let mut load = vec![0i32; full + 1];
    for mask in 1..=full {
        let low = mask.trailing_zeros() as usize;
        load[mask] = load[mask & (mask - 1)] + p.delta(low);
    }
    let mut arena: Vec<Label> = Vec::new();
    // labels[mask * n + last] = label ids, Pareto-minimal on (t, late).
    let mut labels: Vec<Vec<u32>> = vec![Vec::new(); (full + 1) * n];
    let push = |arena: &mut Vec<Label>, slot: &mut Vec<u32>, l: Label| {
        if slot.iter().any(|&id| {
            let o = arena[id as usize];
            o.t <= l.t && o.late <= l.late
        }) {
            return;
        }
        slot.retain(|&id| {
            let o = arena[id as usize];
            !(l.t <= o.t && l.late <= o.late)
        });
        slot.push(arena.len() as u32);
        arena.push(l);
    };
    for i in 0..n {
        if need[i] == 0
            && load0 + p.delta(i) <= cap
            && let Some((t, late)) = p.visit(i, p.start_s + tm(0, i + 1))
        {
            let mut slot = std::mem::take(&mut labels[(1 << i) * n + i]);
            push(&mut arena, &mut slot, Label { t, late, prev: u32::MAX, last: i as u8 });
            labels[(1 << i) * n + i] = slot;
        }
    }
    for mask in 1..full {
        if load0 + load[mask] > cap {
            continue;
        }
        for last in 0..n {
            if labels[mask * n + last].is_empty() {
                continue;
            }
            let from = labels[mask * n + last].clone();
            for (j, &nj) in need.iter().enumerate() {
                let bit = 1 << j;
                if mask & bit != 0 || nj & mask != nj || load0 + load[mask | bit] > cap {
                    continue;
                }
                let key = (mask | bit) * n + j;
                let mut slot = std::mem::take(&mut labels[key]);
                for &id in &from {
                    let l = arena[id as usize];
                    if let Some((t, late)) = p.visit(j, l.t + tm(last + 1, j + 1)) {
                        push(&mut arena, &mut slot, Label { t, late: l.late + late, prev: id, last: j as u8 });
                    }
                }
                labels[key] = slot;
            }
        }
    }
    // Complete labels with the leg to the end node (if any); the best feasible one wins.
    let (best, end_s) = (0..n)
        .flat_map(|last| labels[full * n + last].iter().map(move |&id| (id, last)))
        .filter_map(|(id, last)| Some((id, p.finish(arena[id as usize].t, last + 1, tm)?)))
        .min_by(|a, b| {
            let cost = |(id, end): (u32, f64)| (end - p.start_s) + p.lateness_weight * arena[id as usize].late;
            cost(*a).total_cmp(&cost(*b))
        })?;
    let mut order = Vec::with_capacity(n);
    let mut id = best;
    while id != u32::MAX {
        let l = arena[id as usize];
        order.push(l.last as usize);
        id = l.prev;
    }
    order.reverse();
    let late = arena[best as usize].late;
    Some(Plan { order, cost: (end_s - p.start_s) + p.lateness_weight * late, end_s, lateness_s: late })
}

/// A delivery request in a route: its pickup (absent for an order already on board) and its
/// drop-off (or a lone pickup), as indices into the stops.
type Request = (Option<usize>, usize);

/// Insertion plus local search, restarted and perturbed; fast for dozens of stops, not
/// guaranteed optimal.
///
/// 1. Construction from several request orders (most urgent first, earliest ready first,
///    nearest first, and a few seeded shuffles), each by cheapest insertion.
/// 2. Local search on each: relocate a request (pickup and drop-off together) to its best
///    position, move a single stop, reverse a segment (2-opt), until no move improves.
/// 3. Ruin and recreate from the best: take out a few requests, insert them back cheapest
///    first, local search, keep the result when it is better. The random numbers come from a
///    fixed seed, so a problem always gets the same plan.
///
/// The lateness term makes the objective flat in places and steep in others, which is where
/// plain insertion + 2-opt stalls: on 20,000 random 8-stop instances it was 1.8 % above the
/// optimum on average and 75 % in the worst case; with the restarts, the single-stop move and
/// the ruin step it is 0.014 % on average and 23 % in the worst case.
///
/// Hard windows (`latest_s`, the end's deadline) are constraints of every partial route, so
/// insertion only uses positions that keep them. A returned plan always satisfies them, but
/// with tight windows every construction can get stuck, and then this returns `None` although
/// a feasible order may exist: use [`plan_exact`] when that must be decided.
pub fn plan_heuristic(p: &RouteProblem, tt: impl Fn(usize, usize) -> f64) -> Option<Plan> {
    heuristic(p, tt).0
}

/// [`plan_heuristic`], and the work it did in stops evaluated.
fn heuristic(p: &RouteProblem, tt: impl Fn(usize, usize) -> f64) -> (Option<Plan>, u64) {
    let n = p.stops.len();
    let pred = p.predecessors();
    if p.initial_load(&pred) > i32::from(p.capacity) {
        return (None, 0);
    }
    // Travel matrix once: the closure may be a model look-up, and the search calls it a lot.
    let (m, k) = (p.matrix(tt), p.nodes());
    let tm = |a: usize, b: usize| m[a * k + b];
    // Work done, in stops evaluated: the search stops improving once it passes
    // [`SEARCH_BUDGET`] (the first construction always completes).
    let spent = std::cell::Cell::new(0u64);
    let eval = |o: &[usize]| {
        spent.set(spent.get() + o.len() as u64);
        evaluate_partial(p, &pred, o, &tm)
    };
    let over = || spent.get() >= SEARCH_BUDGET;
    // Requests: (pickup?, drop-off or lone stop).
    let mut reqs: Vec<Request> = Vec::new();
    for i in 0..n {
        match p.stops[i].kind {
            StopKind::Dropoff => reqs.push((pred[i], i)),
            StopKind::Pickup => {
                if !pred.contains(&Some(i)) {
                    reqs.push((None, i));
                }
            }
        }
    }
    if reqs.is_empty() {
        return (evaluate(p, &[], tm), 0);
    }
    // On-board drop-offs always go first: partial routes count their load until they are
    // inserted, so inserting them early frees capacity for the pairs.
    let onboard_first = |a: &Request, b: &Request| a.0.is_some().cmp(&b.0.is_some());
    let by_key = |key: &dyn Fn(&Request) -> f64| {
        let mut v = reqs.clone();
        v.sort_by(|a, b| onboard_first(a, b).then(key(a).total_cmp(&key(b))));
        v
    };
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ n as u64);
    // Most urgent: the earliest of the drop-off's soft deadline and either stop's hard window.
    let deadline = |r: &Request| {
        let stop = |i: usize| p.stops[i].latest_s.unwrap_or(f64::INFINITY);
        let d = &p.stops[r.1];
        d.deliver_by_s.unwrap_or(f64::INFINITY).min(stop(r.1)).min(r.0.map_or(f64::INFINITY, stop))
    };
    let mut starts = vec![
        by_key(&deadline),
        by_key(&|r| r.0.map_or(0.0, |pu| p.stops[pu].ready_at_s)),
        by_key(&|r| tm(0, r.0.unwrap_or(r.1) + 1)),
        by_key(&|r| -tm(0, r.0.unwrap_or(r.1) + 1)),
    ];
    for _ in 0..2 {
        let mut v = reqs.clone();
        rng.shuffle(&mut v);
        v.sort_by(onboard_first);
        starts.push(v);
    }
    let mut best: Option<(f64, Vec<usize>)> = None;
    for order in &starts {
        if best.is_some() && over() {
            break;
        }
        let Some(route) = construct(Vec::with_capacity(n), order, &eval) else { continue };
        let Some(c) = eval(&route) else { continue };
        let (c, route) = local_search(c, route, &reqs, &eval, &over);
        if best.as_ref().is_none_or(|(b, _)| c < *b - 1e-9) {
            best = Some((c, route));
        }
    }
    let Some((mut best_c, mut best_r)) = best else { return (None, spent.get()) };
    // Ruin and recreate.
    // Effort falls with the route's size (one local search costs about n^4 / 2 stop visits):
    // 40 rounds at 8 stops, 6 at 20, 4 beyond 25.
    let iters = (2560 / (n * n).max(1)).clamp(4, 40);
    let max_ruin = reqs.len().clamp(1, 4);
    for _ in 0..iters {
        if over() {
            break;
        }
        let k = 1 + rng.below(max_ruin);
        let mut out: Vec<Request> = Vec::with_capacity(k);
        while out.len() < k {
            let r = reqs[rng.below(reqs.len())];
            if !out.contains(&r) {
                out.push(r);
            }
        }
        let kept: Vec<usize> = best_r.iter().copied().filter(|&s| !out.iter().any(|r| r.0 == Some(s) || r.1 == s)).collect();
        rng.shuffle(&mut out);
        out.sort_by(onboard_first);
        let Some(route) = construct(kept, &out, &eval) else { continue };
        let Some(c) = eval(&route) else { continue };
        let (c, route) = local_search(c, route, &reqs, &eval, &over);
        if c < best_c - 1e-9 {
            best_c = c;
            best_r = route;
        }
    }
    (evaluate(p, &best_r, tm), spent.get())
}

/// Inserts `reqs` one by one, each at its cheapest place.
fn construct(mut route: Vec<usize>, reqs: &[Request], eval: &impl Fn(&[usize]) -> Option<f64>) -> Option<Vec<usize>> {
    for &r in reqs {
        route = best_insertion(&route, r, eval)?.1;
    }
    Some(route)
}

/// First-improvement local search: relocate a request, move one stop, reverse a segment. Ends
/// early, with the best route so far, once `over` says the search budget is spent.
fn local_search(
    mut best: f64,
    mut route: Vec<usize>,
    reqs: &[Request],
    eval: &impl Fn(&[usize]) -> Option<f64>,
    over: &impl Fn() -> bool,
) -> (f64, Vec<usize>) {
    let n = route.len();
    let mut cand = Vec::with_capacity(n);
    let mut improved = true;
    let mut rounds = 0;
    while improved && rounds < 100 {
        improved = false;
        rounds += 1;
        for &r in reqs {
            if over() {
                return (best, route);
            }
            let without: Vec<usize> = route.iter().copied().filter(|&s| Some(s) != r.0 && s != r.1).collect();
            if let Some((c, found)) = best_insertion(&without, r, eval)
                && c < best - 1e-9
            {
                best = c;
                route = found;
                improved = true;
            }
        }
        for i in 0..n {
            if over() {
                return (best, route);
            }
            for j in 0..n {
                if i == j {
                    continue;
                }
                cand.clear();
                cand.extend_from_slice(&route);
                let s = cand.remove(i);
                cand.insert(j, s);
                if let Some(c) = eval(&cand)
                    && c < best - 1e-9
                {
                    best = c;
                    std::mem::swap(&mut route, &mut cand);
                    improved = true;
                }
            }
        }
        for i in 0..n {
            if over() {
                return (best, route);
            }
            for j in i + 1..n {
                cand.clear();
                cand.extend_from_slice(&route);
                cand[i..=j].reverse();
                if let Some(c) = eval(&cand)
                    && c < best - 1e-9
                {
                    best = c;
                    std::mem::swap(&mut route, &mut cand);
                    improved = true;
                }
            }
        }
    }
    (best, route)
}

/// Small deterministic generator for the heuristic's restarts (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Cost of a partial route (a subset of the stops), or `None` if it breaks precedence among
/// the stops it contains, capacity, a hard window or the end's deadline. With travel times
/// that obey the triangle inequality, adding stops only delays the others, so a partial route
/// that misses a window cannot be repaired by insertions and pruning it loses nothing.
fn evaluate_partial(p: &RouteProblem, pred: &[Option<usize>], order: &[usize], tt: &impl Fn(usize, usize) -> f64) -> Option<f64> {
    // The search calls this hundreds of thousands of times: no allocation for routes of up to
    // 256 stops.
    let mut small = [0u64; 4];
    let mut large = Vec::new();
    let seen: &mut [u64] = if p.stops.len() <= 256 {
        &mut small
    } else {
        large.resize(p.stops.len().div_ceil(64), 0);
        &mut large
    };
    let has = |seen: &[u64], i: usize| seen[i / 64] & (1 << (i % 64)) != 0;
    let (mut t, mut late, mut load, mut at) = (p.start_s, 0.0, p.initial_load(pred), 0usize);
    for &i in order {
        if pred[i].is_some_and(|q| !has(seen, q)) {
            return None;
        }
        seen[i / 64] |= 1 << (i % 64);
        load += p.delta(i);
        if load > i32::from(p.capacity) {
            return None;
        }
        let (dep, l) = p.visit(i, t + tt(at, i + 1))?;
        t = dep;
        late += l;
        at = i + 1;
    }
    let t = p.finish(t, at, tt)?;
    Some((t - p.start_s) + p.lateness_weight * late)
}

/// The cheapest way to insert request `r` (optional pickup, then its stop) into `route`.
fn best_insertion(route: &[usize], r: Request, eval: &impl Fn(&[usize]) -> Option<f64>) -> Option<(f64, Vec<usize>)> {
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut cand = Vec::with_capacity(route.len() + 2);
    let mut consider = |cand: &Vec<usize>| {
        if let Some(c) = eval(cand)
            && best.as_ref().is_none_or(|(b, _)| c < *b)
        {
            best = Some((c, cand.clone()));
        }
    };
    match r.0 {
        None => {
            for j in 0..=route.len() {
                cand.clear();
                cand.extend_from_slice(&route[..j]);
                cand.push(r.1);
                cand.extend_from_slice(&route[j..]);
                consider(&cand);
            }
        }
        Some(pu) => {
            for i in 0..=route.len() {
                for j in i..=route.len() {
                    cand.clear();
                    cand.extend_from_slice(&route[..i]);
                    cand.push(pu);
                    cand.extend_from_slice(&route[i..j]);
                    cand.push(r.1);
                    cand.extend_from_slice(&route[j..]);
                    consider(&cand);
                }
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A random instance: `pairs` pickup/drop-off pairs and `onboard` lone drop-offs on a
    /// 10 km square, travel at 10 m/s, node 0 at the centre.
    fn instance(seed: u64, pairs: usize, onboard: usize, cap: u16) -> (RouteProblem, Vec<(f64, f64)>) {
        let mut s = seed | 1;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut pts = vec![(5_000.0, 5_000.0)];
        let mut stops = Vec::new();
        for o in 0..pairs + onboard {
            let size = 1 + (rnd() * 2.0) as u16;
            let by = Some(300.0 + rnd() * 2_000.0);
            if o < pairs {
                pts.push((rnd() * 10_000.0, rnd() * 10_000.0));
                stops.push(Stop { order: o as u32, kind: StopKind::Pickup, size, ready_at_s: rnd() * 600.0, deliver_by_s: None, service_s: 60.0, latest_s: None });
            }
            pts.push((rnd() * 10_000.0, rnd() * 10_000.0));
            stops.push(Stop { order: o as u32, kind: StopKind::Dropoff, size, ready_at_s: 0.0, deliver_by_s: by, service_s: 30.0, latest_s: None });
        }
        (RouteProblem { start_s: 0.0, capacity: cap, stops, lateness_weight: 3.0, end: None }, pts)
    }

    fn euclid(pts: &[(f64, f64)]) -> impl Fn(usize, usize) -> f64 + '_ {
        |a, b| ((pts[a].0 - pts[b].0).hypot(pts[a].1 - pts[b].1)) / 10.0
    }

    /// Adds hard windows to an [`instance`] (its own random stream, so the soft instances are
    /// unchanged): a reference order (on-board drop-offs, then each pair's pickup and drop-off
    /// back to back, pairs shuffled) is timed, and about half the stops get `latest_s` = their
    /// service start in it plus 0–400 s of slack (a quarter of those with no slack at all).
    /// With `end`, the route must also come back to the start point by the reference's return
    /// plus 0–400 s. The reference order meets every window, so the instance is feasible
    /// whenever it fits the capacity; other orders are cut off in varied ways.
    fn harden(p: &mut RouteProblem, pts: &mut Vec<(f64, f64)>, seed: u64, end: bool) {
        let mut s = seed.rotate_left(17) ^ 0xD1B5_4A32_D192_ED03 | 1;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let n = p.stops.len();
        let pred = p.predecessors();
        let mut pairs: Vec<usize> = (0..n).filter(|&i| p.stops[i].kind == StopKind::Dropoff && pred[i].is_some()).collect();
        for i in (1..pairs.len()).rev() {
            pairs.swap(i, (rnd() * (i + 1) as f64) as usize);
        }
        let mut order: Vec<usize> = (0..n).filter(|&i| p.stops[i].kind == StopKind::Dropoff && pred[i].is_none()).collect();
        for d in pairs {
            order.extend([pred[d].unwrap(), d]);
        }
        if end {
            pts.push(pts[0]);
        }
        let tt = euclid(pts);
        let (mut t, mut at) = (p.start_s, 0);
        for &i in &order {
            let s = &mut p.stops[i];
            let begin = (t + tt(at, i + 1)).max(s.ready_at_s);
            if rnd() < 0.5 {
                s.latest_s = Some(begin + if rnd() < 0.25 { 0.0 } else { rnd() * 400.0 });
            }
            t = begin + s.service_s;
            at = i + 1;
        }
        if end {
            p.end = Some(RouteEnd { latest_s: Some(t + tt(at, n + 1) + rnd() * 400.0) });
        }
    }

    /// Independent of `visit`/`finish`: does `order` keep precedence, capacity, every hard
    /// window and the end's deadline?
    fn keeps_hard_constraints(p: &RouteProblem, order: &[usize], tt: impl Fn(usize, usize) -> f64) -> bool {
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        if sorted != (0..p.stops.len()).collect::<Vec<_>>() {
            return false;
        }
        let pos = |i: usize| order.iter().position(|&x| x == i).unwrap();
        let mut load: i32 = 0;
        for (i, s) in p.stops.iter().enumerate() {
            let pickup = p.stops.iter().position(|q| q.kind == StopKind::Pickup && q.order == s.order);
            if s.kind == StopKind::Dropoff {
                match pickup {
                    Some(q) if pos(q) > pos(i) => return false,
                    Some(_) => {}
                    None => load += i32::from(s.size),
                }
            }
        }
        let (mut t, mut at) = (p.start_s, 0);
        for &i in order {
            let s = &p.stops[i];
            load += if s.kind == StopKind::Pickup { i32::from(s.size) } else { -i32::from(s.size) };
            let begin = (t + tt(at, i + 1)).max(s.ready_at_s);
            if load > i32::from(p.capacity) || s.latest_s.is_some_and(|l| begin > l) {
                return false;
            }
            t = begin + s.service_s;
            at = i + 1;
        }
        match p.end {
            Some(RouteEnd { latest_s: Some(l) }) => t + tt(at, p.stops.len() + 1) <= l,
            _ => true,
        }
    }

    fn all_permutations(n: usize) -> Vec<Vec<usize>> {
        fn go(cur: &mut Vec<usize>, used: &mut [bool], out: &mut Vec<Vec<usize>>) {
            if cur.len() == used.len() {
                out.push(cur.clone());
                return;
            }
            for i in 0..used.len() {
                if !used[i] {
                    used[i] = true;
                    cur.push(i);
                    go(cur, used, out);
                    cur.pop();
                    used[i] = false;
                }
            }
        }
        let mut out = Vec::new();
        go(&mut Vec::new(), &mut vec![false; n], &mut out);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(60))]
        #[test]
        fn exact_matches_all_permutations(seed in any::<u64>(), pairs in 0usize..4, onboard in 0usize..3, cap in 1u16..6, hard in any::<bool>(), end in any::<bool>()) {
            let (mut p, mut pts) = instance(seed, pairs, onboard, cap);
            prop_assume!(p.stops.len() <= 7);
            if hard {
                harden(&mut p, &mut pts, seed, end);
            }
            let tt = euclid(&pts);
            let brute = all_permutations(p.stops.len())
                .into_iter()
                .filter_map(|o| evaluate(&p, &o, &tt))
                .inspect(|pl| assert!(keeps_hard_constraints(&p, &pl.order, &tt), "evaluate accepted {:?}", pl.order))
                .map(|pl| pl.cost)
                .min_by(f64::total_cmp);
            let exact = plan_exact(&p, &tt);
            prop_assert_eq!(exact.is_some(), brute.is_some());
            if let (Some(e), Some(b)) = (exact, brute) {
                prop_assert!((e.cost - b).abs() < 1e-6, "dp {} vs brute {}", e.cost, b);
                prop_assert!(keeps_hard_constraints(&p, &e.order, &tt));
                let again = evaluate(&p, &e.order, &tt).unwrap();
                prop_assert!((again.cost - e.cost).abs() < 1e-6);
                prop_assert!((again.end_s - e.end_s).abs() < 1e-6);
                // With hard windows the heuristic may find nothing; what it returns is feasible.
                let h = plan_heuristic(&p, &tt);
                prop_assert!(h.is_some() || hard);
                if let Some(h) = h {
                    prop_assert!(keeps_hard_constraints(&p, &h.order, &tt));
                    prop_assert!(h.cost >= b - 1e-6);
                }
            } else {
                prop_assert!(plan_heuristic(&p, &tt).is_none());
            }
        }

        /// The heuristic never returns an order that breaks a hard window, the end's deadline,
        /// precedence or capacity, on routes beyond the exact planner's size too.
        #[test]
        fn heuristic_never_breaks_a_hard_window(seed in any::<u64>(), pairs in 1usize..10, onboard in 0usize..3, end in any::<bool>()) {
            let (mut p, mut pts) = instance(seed, pairs, onboard, 6);
            harden(&mut p, &mut pts, seed, end);
            let tt = euclid(&pts);
            if let Some(h) = plan_heuristic(&p, &tt) {
                prop_assert!(keeps_hard_constraints(&p, &h.order, &tt), "{:?} breaks a window", h.order);
                let again = evaluate(&p, &h.order, &tt).unwrap();
                prop_assert!((again.cost - h.cost).abs() < 1e-6);
            }
            if p.stops.len() <= EXACT_MAX_STOPS {
                let e = plan_exact(&p, &tt);
                if let Some(e) = &e {
                    prop_assert!(keeps_hard_constraints(&p, &e.order, &tt));
                }
                prop_assert!(e.is_some() || plan_heuristic(&p, &tt).is_none());
            }
        }

        #[test]
        fn heuristic_is_feasible_and_close_on_eight(seed in any::<u64>()) {
            let (p, pts) = instance(seed, 4, 0, 4);
            let tt = euclid(&pts);
            let e = plan_exact(&p, &tt).unwrap();
            let h = plan_heuristic(&p, &tt).unwrap();
            prop_assert!(h.cost >= e.cost - 1e-6);
            // Not a guarantee, a guard against losing the restarts or the ruin step: over 20,000
            // seeds the worst ratio measured was 1.23 (plain insertion + 2-opt reached 1.75).
            prop_assert!(h.cost <= e.cost * 1.5 + 1.0, "heuristic {} vs exact {}", h.cost, e.cost);
        }
    }

    /// The heuristic's average gap on 8-stop instances, on a fixed set of seeds so the figure
    /// is reproducible: measured 0.014 % mean over 20,000 seeds (plain insertion + 2-opt: 1.8 %).
    #[test]
    fn heuristic_mean_gap_on_eight_is_small() {
        let (mut sum, mut worst) = (0.0, 1.0f64);
        let n = 300;
        for k in 0..n {
            let (p, pts) = instance(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k + 1), 4, 0, 4);
            let tt = euclid(&pts);
            let r = plan_heuristic(&p, &tt).unwrap().cost / plan_exact(&p, &tt).unwrap().cost;
            sum += r;
            worst = worst.max(r);
        }
        let mean = sum / n as f64;
        assert!(mean < 1.005, "mean ratio {mean}");
        assert!(worst < 1.3, "worst ratio {worst}");
    }

    #[test]
    fn precedence_capacity_and_waiting() {
        // 0 → pickup A (ready at 100 s) → drop A; capacity 1 means B must wait for A's drop.
        let pts: [(f64, f64); 5] = [(0.0, 0.0), (100.0, 0.0), (200.0, 0.0), (110.0, 0.0), (210.0, 0.0)];
        let st = |o, kind, ready| Stop { order: o, kind, size: 1, ready_at_s: ready, deliver_by_s: None, service_s: 0.0, latest_s: None };
        let p = RouteProblem {
            start_s: 0.0,
            capacity: 1,
            stops: vec![st(0, StopKind::Pickup, 100.0), st(0, StopKind::Dropoff, 0.0), st(1, StopKind::Pickup, 0.0), st(1, StopKind::Dropoff, 0.0)],
            lateness_weight: 1.0,
            end: None,
        };
        let tt = |a: usize, b: usize| (pts[a].0 - pts[b].0).abs() / 10.0;
        let e = plan_exact(&p, tt).unwrap();
        for w in [[0, 2, 1, 3], [0, 2, 3, 1], [2, 0, 1, 3]] {
            assert!(evaluate(&p, &w, tt).is_none(), "{w:?} overloads");
        }
        assert!(evaluate(&p, &[1, 0, 2, 3], tt).is_none(), "drop before pickup");
        assert_eq!(plan_heuristic(&p, tt).unwrap().cost, e.cost);
        // Over capacity before starting: on-board load 2 > 1.
        let p2 = RouteProblem { capacity: 1, stops: vec![st(5, StopKind::Dropoff, 0.0), st(6, StopKind::Dropoff, 0.0)], ..p.clone() };
        assert!(plan(&p2, tt).is_none());
    }

    #[test]
    fn hard_windows_and_the_end_node() {
        // On a line: A at -100 m, B at 200 m, 10 m/s. A first is shorter (done at 40 s, not
        // 50 s), but B must be served by 25 s; then back to the start (node 3) by the deadline.
        let pts: [(f64, f64); 4] = [(0.0, 0.0), (-100.0, 0.0), (200.0, 0.0), (0.0, 0.0)];
        let tt = |a: usize, b: usize| (pts[a].0 - pts[b].0).abs() / 10.0;
        let st = |o, latest| Stop { order: o, kind: StopKind::Dropoff, size: 1, ready_at_s: 0.0, deliver_by_s: None, service_s: 0.0, latest_s: latest };
        let mut p = RouteProblem { start_s: 0.0, capacity: 2, stops: vec![st(0, None), st(1, None)], lateness_weight: 0.0, end: None };
        assert_eq!(plan_exact(&p, tt).unwrap().order, vec![0, 1]);
        p.stops[1].latest_s = Some(25.0);
        assert!(evaluate(&p, &[0, 1], tt).is_none(), "B would start at 40 s");
        let e = plan_exact(&p, tt).unwrap();
        assert_eq!((e.order.as_slice(), e.end_s), ([1, 0].as_slice(), 50.0));
        assert_eq!(plan_heuristic(&p, tt).unwrap().order, vec![1, 0]);
        // The end node: the way back counts in the cost and the end time.
        p.end = Some(RouteEnd { latest_s: Some(60.0) });
        let e = plan_exact(&p, tt).unwrap();
        assert_eq!((e.order.as_slice(), e.end_s, e.cost), ([1, 0].as_slice(), 60.0, 60.0));
        assert_eq!(plan_heuristic(&p, tt).unwrap().end_s, 60.0);
        p.end = Some(RouteEnd { latest_s: Some(59.0) });
        assert!(plan_exact(&p, tt).is_none() && plan_heuristic(&p, tt).is_none() && plan(&p, tt).is_none());
        // An empty route still has to reach the end.
        let q = RouteProblem { stops: vec![], end: Some(RouteEnd { latest_s: Some(5.0) }), ..p.clone() };
        let tt0 = |a: usize, b: usize| if a == b { 0.0 } else { 3.0 };
        assert_eq!(plan_exact(&q, tt0).unwrap().end_s, 3.0);
        assert_eq!(plan_heuristic(&q, tt0).unwrap().end_s, 3.0);
        // A window that no order can meet.
        p.end = None;
        p.stops[0].latest_s = Some(9.0);
        assert!(plan_exact(&p, tt).is_none() && plan_heuristic(&p, tt).is_none());
    }

    /// The search stops at its budget: a van's route of 100 stops did 450 million stop
    /// evaluations (3.9 s) without it. What it spends past the budget is the first
    /// construction and the step under way when the budget ran out.
    #[test]
    fn the_heuristic_keeps_to_its_budget_on_long_routes() {
        let (p, pts) = instance(7, 35, 30, 100);
        let tt = euclid(&pts);
        let (plan, spent) = heuristic(&p, &tt);
        let plan = plan.expect("a feasible order");
        assert_eq!(plan.order.len(), 100);
        assert!(evaluate(&p, &plan.order, &tt).is_some());
        assert!(spent <= 2 * SEARCH_BUDGET, "{spent} stops evaluated");
        // Short routes get the whole search: the budget is far from binding at 20 stops.
        let (p, pts) = instance(7, 8, 4, 12);
        let (_, spent) = heuristic(&p, euclid(&pts));
        assert!(spent < SEARCH_BUDGET / 4, "{spent} stops evaluated at 20 stops");
    }

    #[test]
    fn many_stops_use_the_heuristic() {
        let (p, pts) = instance(42, 10, 4, 12);
        let tt = euclid(&pts);
        let h = plan(&p, &tt).unwrap();
        assert_eq!(h.order.len(), 24);
        assert!(evaluate(&p, &h.order, &tt).is_some());
    }
}
