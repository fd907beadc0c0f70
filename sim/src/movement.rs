//! How a simulated courier moves: a vehicle with a realistic speed, following a plausible
//! street-like path (a Manhattan-style zig-zag along a jittered grid) between two points.
//!
//! The model is deterministic for a given RNG, so tests can check speeds and paths.

use rand::Rng;

use crate::geomath::{bearing_deg, distance_m, offset, toward, BBox, LatLng};

/// The vehicle a courier rides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vehicle {
    Bike,
    Car,
}

impl Vehicle {
    /// Cruising speed range in m/s: bike 4–6, car 8–14.
    pub fn speed_range(self) -> (f64, f64) {
        match self {
            Vehicle::Bike => (4.0, 6.0),
            Vehicle::Car => (8.0, 14.0),
        }
    }

    /// The fastest this vehicle ever goes in the model.
    pub fn max_speed(self) -> f64 {
        self.speed_range().1
    }
}

/// A plausible path from `from` to `to`: alternating north–south and east–west legs, like
/// streets of a grid, with a little jitter. All points are clamped into `bbox`.
pub fn street_path(rng: &mut impl Rng, from: LatLng, to: LatLng, bbox: &BBox) -> Vec<LatLng> {
    let d = distance_m(from, to);
    // One turn every ~400–900 m, at least one corner unless the trip is tiny.
    let corners = if d < 100.0 { 0 } else { ((d / rng.random_range(400.0..900.0)) as usize).clamp(1, 8) };
    let mut pts = Vec::with_capacity(corners * 2 + 2);
    let mut cur = from;
    for i in 0..corners {
        let f = (i + 1) as f64 / (corners + 1) as f64;
        let target = LatLng::new(from.lat + (to.lat - from.lat) * f, from.lng + (to.lng - from.lng) * f);
        // Go along latitude first or longitude first, at random: an L-shaped step.
        let corner = if rng.random_bool(0.5) { LatLng::new(cur.lat, target.lng) } else { LatLng::new(target.lat, cur.lng) };
        let jitter = offset(corner, rng.random_range(0.0..360.0), rng.random_range(0.0..30.0));
        pts.push(bbox.clamp(jitter));
        cur = target;
        pts.push(bbox.clamp(cur));
    }
    let last = if rng.random_bool(0.5) { LatLng::new(cur.lat, to.lng) } else { LatLng::new(to.lat, cur.lng) };
    pts.push(bbox.clamp(last));
    pts.push(to);
    pts.dedup_by(|a, b| distance_m(*a, *b) < 1.0);
    pts
}

/// What one step of movement produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fix {
    pub pos: LatLng,
    /// Metres per second over the step just taken (0 when standing).
    pub speed: f64,
    /// Degrees, 0 = north.
    pub heading: f64,
}

/// A courier's body: position, vehicle and the path it is following.
#[derive(Debug, Clone)]
pub struct Mover {
    pub vehicle: Vehicle,
    pub pos: LatLng,
    pub heading: f64,
    /// Cruising speed for the current path, m/s.
    pub cruise: f64,
    path: std::collections::VecDeque<LatLng>,
}

impl Mover {
    pub fn new(vehicle: Vehicle, pos: LatLng) -> Self {
        Self { vehicle, pos, heading: 0.0, cruise: vehicle.speed_range().0, path: Default::default() }
    }

    /// Plans a street-like path to `to` and picks a cruising speed for it.
    pub fn go_to(&mut self, rng: &mut impl Rng, to: LatLng, bbox: &BBox) {
        let (lo, hi) = self.vehicle.speed_range();
        self.cruise = rng.random_range(lo..=hi);
        self.path = street_path(rng, self.pos, to, bbox).into();
    }

    /// True when the path is finished.
    pub fn arrived(&self) -> bool {
        self.path.is_empty()
    }

    /// Where the current path ends, if any.
    pub fn destination(&self) -> Option<LatLng> {
        self.path.back().copied()
    }

    /// Advances `dt_s` seconds along the path at cruising speed (a little slower at corners).
    pub fn step(&mut self, rng: &mut impl Rng, dt_s: f64) -> Fix {
        let start = self.pos;
        // Traffic: +-10 % around cruise, never above the vehicle's maximum.
        let v = (self.cruise * rng.random_range(0.9..=1.1)).min(self.vehicle.max_speed());
        let mut budget = v * dt_s.max(0.0);
        while budget > 0.0 {
            let Some(&next) = self.path.front() else { break };
            let leg = distance_m(self.pos, next);
            if leg <= budget {
                self.pos = next;
                budget -= leg;
                self.path.pop_front();
                // Slowing down for a corner eats part of the step.
                budget *= 0.7;
            } else {
                self.pos = toward(self.pos, next, budget);
                budget = 0.0;
            }
        }
        let moved = distance_m(start, self.pos);
        if moved > 0.5 {
            self.heading = bearing_deg(start, self.pos);
        }
        let speed = if dt_s > 0.0 { moved / dt_s } else { 0.0 };
        Fix { pos: self.pos, speed, heading: self.heading }
    }
}

/// A uniform random point in `bbox`.
pub fn random_point(rng: &mut impl Rng, bbox: &BBox) -> LatLng {
    bbox.at(rng.random_range(0.0..=1.0), rng.random_range(0.0..=1.0))
}

/// A random point `min_m..max_m` metres from `from`, clamped into `bbox`.
pub fn random_point_near(rng: &mut impl Rng, from: LatLng, min_m: f64, max_m: f64, bbox: &BBox) -> LatLng {
    bbox.clamp(offset(from, rng.random_range(0.0..360.0), rng.random_range(min_m..=max_m)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn berlin() -> BBox {
        BBox::from_array(crate::DEFAULT_BBOX)
    }

    #[test]
    fn speeds_stay_realistic_and_paths_arrive() {
        let bbox = berlin();
        for (seed, vehicle) in [(1, Vehicle::Bike), (2, Vehicle::Car), (3, Vehicle::Bike), (4, Vehicle::Car)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut m = Mover::new(vehicle, random_point(&mut rng, &bbox));
            for _trip in 0..5 {
                let to = random_point(&mut rng, &bbox);
                m.go_to(&mut rng, to, &bbox);
                let mut steps = 0;
                while !m.arrived() {
                    let before = m.pos;
                    let dt = rng.random_range(1.0..5.0);
                    let fix = m.step(&mut rng, dt);
                    let v = distance_m(before, fix.pos) / dt;
                    assert!(v <= vehicle.max_speed() + 1e-6, "{vehicle:?} moved at {v} m/s");
                    assert!(bbox.contains(fix.pos));
                    steps += 1;
                    assert!(steps < 20_000, "never arrived");
                }
                assert!(distance_m(m.pos, to) < 1.0);
            }
        }
    }

    #[test]
    fn cruising_speed_is_in_the_vehicle_range() {
        let bbox = berlin();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut m = Mover::new(Vehicle::Car, bbox.at(0.1, 0.1));
        m.go_to(&mut rng, bbox.at(0.9, 0.9), &bbox);
        let mut speeds = Vec::new();
        for _ in 0..100 {
            let f = m.step(&mut rng, 1.0);
            speeds.push(f.speed);
        }
        let mean = speeds.iter().sum::<f64>() / speeds.len() as f64;
        assert!((6.0..=14.0).contains(&mean), "mean car speed {mean}");
    }
}
