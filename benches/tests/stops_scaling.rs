//! How the stop-order planner's time grows with the route: a measurement, run by hand
//! (`cargo test --release -p hexfleet-benches --test stops_scaling -- --ignored --nocapture`).

use std::time::Instant;

use hexfleet_benches::{route, travel_matrix};
use hexfleet_geo::stops::plan;

#[test]
#[ignore = "a measurement; run by hand"]
fn plan_time_by_route_length() {
    for (pairs, onboard) in [(3, 2), (8, 4), (15, 5), (25, 10), (40, 20), (70, 30)] {
        let (mut p, pts) = route(pairs, onboard, 7);
        // A van: room for everything it holds.
        p.capacity = u16::try_from(pairs + onboard).unwrap();
        let m = travel_matrix(&pts);
        let t = Instant::now();
        let got = plan(&p, |a, b| m[a][b]);
        let took = t.elapsed();
        let cost = got.map_or(f64::NAN, |g| g.cost);
        println!("{:>3} stops: {:>10.1} ms, cost {cost:.0} s", p.stops.len(), took.as_secs_f64() * 1e3);
    }
}
