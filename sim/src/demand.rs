//! Order demand: a Poisson arrival process (exponential gaps) with a few hotspots where
//! pickups cluster (restaurants, a mall), and drop-offs a plausible ride away.

use rand::Rng;

use crate::geomath::{offset, BBox, LatLng};
use crate::movement::{random_point, random_point_near};

/// A Poisson process: exponentially distributed gaps with mean `1 / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Poisson {
    /// Events per second.
    pub rate_per_s: f64,
}

impl Poisson {
    pub fn per_minute(per_min: f64) -> Self {
        Self { rate_per_s: per_min / 60.0 }
    }

    /// Seconds until the next event (infinite when the rate is zero or negative).
    pub fn next_gap_s(&self, rng: &mut impl Rng) -> f64 {
        if self.rate_per_s <= 0.0 || !self.rate_per_s.is_finite() {
            return f64::INFINITY;
        }
        // Inverse CDF; 1 - u lies in (0, 1] so ln never sees 0.
        let u: f64 = rng.random();
        -(1.0 - u).ln() / self.rate_per_s
    }
}

/// A place where pickups cluster.
#[derive(Debug, Clone, Copy)]
pub struct Hotspot {
    pub center: LatLng,
    /// Standard deviation of pickup distance from the centre, metres.
    pub sigma_m: f64,
    /// Relative weight among hotspots.
    pub weight: f64,
}

/// A new order's pickup and drop-off.
#[derive(Debug, Clone, Copy)]
pub struct OrderSpec {
    pub pickup: LatLng,
    pub dropoff: LatLng,
}

/// Draws orders: `hotspot_share` of pickups near a hotspot, the rest anywhere in the box.
#[derive(Debug, Clone)]
pub struct Demand {
    pub bbox: BBox,
    pub hotspots: Vec<Hotspot>,
    pub hotspot_share: f64,
    /// Longest pickup → drop-off distance drawn, metres (at least 600).
    pub max_trip_m: f64,
}

impl Demand {
    /// `n` hotspots at random places in the box.
    pub fn with_random_hotspots(rng: &mut impl Rng, bbox: BBox, n: usize) -> Self {
        let (w, h) = bbox.size_m();
        let sigma = (w.min(h) / 20.0).clamp(100.0, 800.0);
        let hotspots = (0..n)
            .map(|_| Hotspot {
                center: bbox.at(rng.random_range(0.15..0.85), rng.random_range(0.15..0.85)),
                sigma_m: sigma,
                weight: rng.random_range(1.0..3.0),
            })
            .collect();
        let max_trip_m = (w.min(h) / 2.0).clamp(600.0, 5_000.0);
        Self { bbox, hotspots, hotspot_share: 0.7, max_trip_m }
    }

    pub fn next_order(&self, rng: &mut impl Rng) -> OrderSpec {
        let pickup = if !self.hotspots.is_empty() && rng.random_bool(self.hotspot_share.clamp(0.0, 1.0)) {
            let total: f64 = self.hotspots.iter().map(|h| h.weight).sum();
            let mut pick = rng.random_range(0.0..total);
            let mut chosen = self.hotspots[0];
            for h in &self.hotspots {
                if pick < h.weight {
                    chosen = *h;
                    break;
                }
                pick -= h.weight;
            }
            let r = gaussian(rng).abs() * chosen.sigma_m;
            self.bbox.clamp(offset(chosen.center, rng.random_range(0.0..360.0), r))
        } else {
            random_point(rng, &self.bbox)
        };
        let dropoff = random_point_near(rng, pickup, 500.0, self.max_trip_m.max(600.0), &self.bbox);
        OrderSpec { pickup, dropoff }
    }
}

/// A standard normal sample (Box–Muller).
pub fn gaussian(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geomath::distance_m;
    use rand::SeedableRng;

    #[test]
    fn poisson_gap_mean_matches_rate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let p = Poisson::per_minute(30.0); // 0.5/s: mean gap 2 s
        let n = 50_000;
        let gaps: Vec<f64> = (0..n).map(|_| p.next_gap_s(&mut rng)).collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean - 2.0).abs() < 0.05, "mean gap {mean}");
        // Exponential: the standard deviation equals the mean.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((var.sqrt() - 2.0).abs() < 0.1, "sd {}", var.sqrt());
        // Counting in 60 s windows gives mean and variance ~30 (Poisson).
        let mut t = 0.0;
        let mut counts = vec![0u32; 200];
        loop {
            t += p.next_gap_s(&mut rng);
            let w = (t / 60.0) as usize;
            if w >= counts.len() {
                break;
            }
            counts[w] += 1;
        }
        let m = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
        assert!((m - 30.0).abs() < 1.5, "count mean {m}");
        assert_eq!(Poisson::per_minute(0.0).next_gap_s(&mut rng), f64::INFINITY);
    }

    #[test]
    fn orders_cluster_at_hotspots_and_stay_in_the_box() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let bbox = BBox::from_array(crate::DEFAULT_BBOX);
        let d = Demand::with_random_hotspots(&mut rng, bbox, 3);
        let mut near = 0;
        let n = 2_000;
        for _ in 0..n {
            let o = d.next_order(&mut rng);
            assert!(bbox.contains(o.pickup) && bbox.contains(o.dropoff));
            if d.hotspots.iter().any(|h| distance_m(h.center, o.pickup) < 3.0 * h.sigma_m) {
                near += 1;
            }
        }
        // 70 % from hotspots plus some uniform ones that happen to land close.
        assert!(near as f64 / n as f64 > 0.65, "{near} of {n} near a hotspot");
    }
}
