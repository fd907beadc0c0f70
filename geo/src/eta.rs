//! Travel-time estimates: distance × detour factor ÷ speed, with speeds learned online per
//! (H3 cell, hour of week) from observed courier movement, and the [`RouteProvider`] seam where
//! a real road router (OSRM over HTTP, in another crate) can replace the estimate.
//!
//! Why this shape: a city's speeds depend on where (centre vs ring road) and when (rush hour vs
//! Sunday night) far more than on anything else we observe, and a courier fleet measures exactly
//! that all day. Cells at resolution 7 (~5 km²) are coarse enough to fill up with data and fine
//! enough to separate districts. Each cell keeps a bounded running mean, so it follows slow
//! changes (road works, seasons) instead of freezing, and a shrinkage prior keeps sparse cells
//! from trusting two noisy samples.

use std::fmt::Write as _;

use crate::GeoError;
use crate::cells::{CellIndex, KeyMap, Resolution, cell_at};
use crate::coord::{LatLng, haversine_m};

/// Seconds in a week; hour-of-week is counted from Monday 00:00 in the model's time zone.
const WEEK_H: i64 = 168;

/// A route between two points: length and duration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Route {
    pub metres: f64,
    pub seconds: f64,
}

/// Something that estimates routes. The actors depend on this trait, not on the model, so an
/// operator with a road router plugs it in without touching dispatch.
pub trait RouteProvider {
    /// The route from `from` to `to` leaving at `at_ms` (Unix ms).
    fn route(&self, from: LatLng, to: LatLng, at_ms: i64) -> Route;
}

/// Settings of a [`SpeedModel`].
#[derive(Debug, Clone, Copy)]
pub struct SpeedConfig {
    /// Cell resolution of the table (7 ≈ 1.2 km edges).
    pub res: Resolution,
    /// Speed used where nothing was learned, m/s (6 ≈ 22 km/h: urban two-wheeler).
    pub prior_mps: f64,
    /// Weight of the prior, in samples: a cell with `n` samples answers
    /// `(n·mean + prior_weight·fallback) / (n + prior_weight)`.
    pub prior_weight: f64,
    /// The running mean weighs at most this many samples, so old data fades (an exponential
    /// moving average with α = 1/cap once full).
    pub max_samples: u32,
    /// Observed speeds are clamped to this range, m/s; samples above `max_mps × 1.5` are
    /// rejected as GPS jumps rather than clamped.
    pub min_mps: f64,
    pub max_mps: f64,
    /// Offset of local time from UTC in seconds, for hour-of-week.
    pub utc_offset_s: i64,
}

impl Default for SpeedConfig {
    fn default() -> Self {
        SpeedConfig { res: Resolution::Seven, prior_mps: 6.0, prior_weight: 5.0, max_samples: 500, min_mps: 1.0, max_mps: 35.0, utc_offset_s: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    mean: f64,
    n: u32,
}

/// Learned speeds per (cell, hour of week), with a per-cell all-hours fallback.
#[derive(Debug, Clone)]
pub struct SpeedModel {
    config: SpeedConfig,
    by_hour: KeyMap<(CellIndex, u8), Stat>,
    by_cell: KeyMap<CellIndex, Stat>,
}

impl SpeedModel {
    /// An empty model.
    pub fn new(config: SpeedConfig) -> Self {
        SpeedModel { config, by_hour: KeyMap::default(), by_cell: KeyMap::default() }
    }

    /// The settings.
    pub fn config(&self) -> &SpeedConfig {
        &self.config
    }

    /// Hour of week (0 = Monday 00:00–01:00 local) of a Unix ms time.
    pub fn hour_of_week(&self, at_ms: i64) -> u8 {
        // 1970-01-01 was a Thursday: hour 0 of the epoch is hour 72 of its week.
        let h = (at_ms.div_euclid(1000) + self.config.utc_offset_s).div_euclid(3600);
        (h + 72).rem_euclid(WEEK_H) as u8
    }

    /// Learns from two consecutive fixes of one courier. Returns whether the sample was used:
    /// pairs too close in time or space (stops, GPS noise), too far apart in time (gaps hide
    /// stops), or implausibly fast are ignored.
    pub fn observe(&mut self, from: LatLng, from_ms: i64, to: LatLng, to_ms: i64) -> bool {
        let dt = (to_ms - from_ms) as f64 / 1000.0;
        if !(1.0..=300.0).contains(&dt) {
            return false;
        }
        let d = haversine_m(from, to);
        if d < 10.0 {
            return false;
        }
        let v = d / dt;
        if v > self.config.max_mps * 1.5 {
            return false;
        }
        let v = v.clamp(self.config.min_mps, self.config.max_mps);
        let mid = LatLng { lat: (from.lat + to.lat) / 2.0, lng: if (from.lng - to.lng).abs() > 180.0 { from.lng } else { (from.lng + to.lng) / 2.0 } };
        let cell = cell_at(mid, self.config.res);
        let h = self.hour_of_week(from_ms);
        let cap = self.config.max_samples.max(1);
        for s in [self.by_hour.entry((cell, h)).or_insert(Stat { mean: 0.0, n: 0 }), self.by_cell.entry(cell).or_insert(Stat { mean: 0.0, n: 0 })] {
            s.n = (s.n + 1).min(cap);
            s.mean += (v - s.mean) / f64::from(s.n);
        }
        true
    }

    /// Expected speed in m/s at `p` at `at_ms`: the cell-and-hour mean shrunk towards the
    /// cell's all-hours mean, itself shrunk towards the prior.
    pub fn speed_mps(&self, p: LatLng, at_ms: i64) -> f64 {
        let cell = cell_at(p, self.config.res);
        self.speed_in(cell, self.hour_of_week(at_ms))
    }

    fn speed_in(&self, cell: CellIndex, hour: u8) -> f64 {
        let k = self.config.prior_weight;
        let shrink = |s: Option<&Stat>, fallback: f64| s.map_or(fallback, |s| (f64::from(s.n) * s.mean + k * fallback) / (f64::from(s.n) + k));
        let cell_mean = shrink(self.by_cell.get(&cell), self.config.prior_mps);
        shrink(self.by_hour.get(&(cell, hour)), cell_mean)
    }

    /// Number of (cell, hour) entries learned.
    pub fn len(&self) -> usize {
        self.by_hour.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hour.is_empty()
    }

    /// The learned table as text: a header line, then one `cell hour mean_mps samples` line per
    /// entry (`hour` = `*` for a cell's all-hours entry), sorted so equal models save equal
    /// bytes. Settings are not saved; they belong to configuration.
    pub fn save(&self) -> String {
        let mut rows: Vec<(u64, i16, Stat)> = self.by_hour.iter().map(|((c, h), s)| (u64::from(*c), i16::from(*h), *s)).collect();
        rows.extend(self.by_cell.iter().map(|(c, s)| (u64::from(*c), -1, *s)));
        rows.sort_by_key(|r| (r.0, r.1));
        let mut out = String::from("hexfleet-speeds v1\n");
        for (c, h, s) in rows {
            let hour = if h < 0 { "*".to_string() } else { h.to_string() };
            let _ = writeln!(out, "{c:x} {hour} {} {}", s.mean, s.n);
        }
        out
    }

    /// Loads a table written by [`SpeedModel::save`] into a model with the given settings.
    pub fn load(config: SpeedConfig, text: &str) -> Result<SpeedModel, GeoError> {
        let mut m = SpeedModel::new(config);
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, "hexfleet-speeds v1")) => {}
            _ => return Err(GeoError::SpeedTable { line: 1, reason: "missing header `hexfleet-speeds v1`" }),
        }
        for (i, line) in lines {
            let line_no = i + 1;
            let err = |reason| GeoError::SpeedTable { line: line_no, reason };
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let [c, h, mean, n] = f[..] else { return Err(err("expected 4 fields")) };
            let cell = u64::from_str_radix(c, 16).ok().and_then(|c| CellIndex::try_from(c).ok()).ok_or(err("bad cell"))?;
            let mean: f64 = mean.parse().map_err(|_| err("bad mean"))?;
            if !mean.is_finite() || mean <= 0.0 {
                return Err(err("mean must be a positive number"));
            }
            // Clamped: a count beyond the cap would overflow the running mean's update.
            let n: u32 = n.parse::<u32>().map_err(|_| err("bad sample count"))?.min(config.max_samples.max(1));
            let s = Stat { mean, n };
            if h == "*" {
                m.by_cell.insert(cell, s);
            } else {
                let h: u8 = h.parse().ok().filter(|h| i64::from(*h) < WEEK_H).ok_or(err("hour must be * or 0..168"))?;
                m.by_hour.insert((cell, h), s);
            }
        }
        Ok(m)
    }
}

/// Haversine distance × detour factor at the learned speed: the default [`RouteProvider`].
#[derive(Debug, Clone)]
pub struct HaversineRouter {
    pub model: SpeedModel,
    /// Road distance over great-circle distance; ~1.3 in grid-like cities, ~1.4–1.5 with
    /// rivers and one-way streets.
    pub detour: f64,
}

impl HaversineRouter {
    pub fn new(model: SpeedModel, detour: f64) -> Self {
        HaversineRouter { model, detour }
    }
}

impl RouteProvider for HaversineRouter {
    /// Speed is the harmonic mean of the speeds at the start, the middle and the end (time adds
    /// up per distance, so harmonic is the right mean for equal thirds of the way).
    fn route(&self, from: LatLng, to: LatLng, at_ms: i64) -> Route {
        let metres = haversine_m(from, to) * self.detour;
        if metres == 0.0 {
            return Route { metres, seconds: 0.0 };
        }
        let mid = LatLng { lat: (from.lat + to.lat) / 2.0, lng: if (from.lng - to.lng).abs() > 180.0 { from.lng } else { (from.lng + to.lng) / 2.0 } };
        let inv: f64 = [from, mid, to].iter().map(|p| 1.0 / self.model.speed_mps(*p, at_ms).max(0.1)).sum::<f64>() / 3.0;
        Route { metres, seconds: metres * inv }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ll(lat: f64, lng: f64) -> LatLng {
        LatLng::new(lat, lng).unwrap()
    }

    /// Monday 2024-01-01 08:00 UTC.
    const MON_8: i64 = 1_704_096_000_000;

    #[test]
    fn hour_of_week_starts_monday() {
        let m = SpeedModel::new(SpeedConfig::default());
        assert_eq!(m.hour_of_week(MON_8), 8);
        assert_eq!(m.hour_of_week(0), 72, "the epoch was a Thursday");
        assert_eq!(m.hour_of_week(MON_8 + 7 * 24 * 3_600_000), 8);
        assert_eq!(m.hour_of_week(-1), 71);
        let east = SpeedModel::new(SpeedConfig { utc_offset_s: 3600, ..SpeedConfig::default() });
        assert_eq!(east.hour_of_week(MON_8), 9);
    }

    #[test]
    fn learns_per_cell_and_hour_with_a_prior() {
        let mut m = SpeedModel::new(SpeedConfig::default());
        let a = ll(45.5, -73.6);
        assert_eq!(m.speed_mps(a, MON_8), 6.0, "prior where nothing is known");
        // 100 samples at ~12 m/s (120 m in 10 s) on Monday 8:00.
        let b = ll(45.5 + 120.0 / 111_195.0, -73.6);
        for i in 0..100 {
            assert!(m.observe(a, MON_8 + i * 10_000, b, MON_8 + i * 10_000 + 10_000));
        }
        let v = m.speed_mps(a, MON_8 + 1_000);
        assert!((v - 12.0).abs() < 0.5, "{v}");
        // Another hour in the same cell falls back to the cell's all-hours mean.
        let other_hour = m.speed_mps(a, MON_8 + 5 * 3_600_000);
        assert!((other_hour - v).abs() < 0.5, "{other_hour}");
        // Far away: the prior.
        assert_eq!(m.speed_mps(ll(48.85, 2.35), MON_8), 6.0);
        // Rejected samples.
        assert!(!m.observe(a, 0, b, 500), "too short in time");
        assert!(!m.observe(a, 0, a, 10_000), "not moving");
        assert!(!m.observe(a, 0, ll(46.5, -73.6), 10_000), "a GPS jump");
    }

    #[test]
    fn save_load_round_trip() {
        let mut m = SpeedModel::new(SpeedConfig::default());
        let pts = [ll(45.5, -73.6), ll(45.51, -73.61), ll(45.53, -73.57), ll(45.45, -73.7)];
        for (i, w) in pts.windows(2).enumerate() {
            m.observe(w[0], MON_8 + i as i64 * 3_600_000, w[1], MON_8 + i as i64 * 3_600_000 + 120_000);
        }
        let text = m.save();
        let back = SpeedModel::load(SpeedConfig::default(), &text).unwrap();
        assert_eq!(back.save(), text);
        assert_eq!(back.len(), m.len());
        for p in pts {
            assert_eq!(back.speed_mps(p, MON_8), m.speed_mps(p, MON_8));
        }
        assert!(matches!(SpeedModel::load(SpeedConfig::default(), "nope"), Err(GeoError::SpeedTable { line: 1, .. })));
        let bad = "hexfleet-speeds v1\n872b8e3c2ffffff 200 5.0 3\n";
        assert!(matches!(SpeedModel::load(SpeedConfig::default(), bad), Err(GeoError::SpeedTable { line: 2, .. })));
    }

    #[test]
    fn a_stored_sample_count_beyond_the_cap_is_clamped() {
        let cell = cell_at(ll(45.5, -73.6), Resolution::Seven);
        let text = format!("hexfleet-speeds v1\n{:x} * 3.0 {}\n{:x} 7 3.0 {}\n", u64::from(cell), u32::MAX, u64::from(cell), u32::MAX);
        let mut m = SpeedModel::load(SpeedConfig::default(), &text).unwrap();
        // Learning on top neither overflows nor leaves the plausible range.
        let (a, b) = (ll(45.5, -73.6), ll(45.5005, -73.6));
        assert!(m.observe(a, MON_8, b, MON_8 + 10_000));
        let v = m.speed_mps(a, MON_8);
        assert!(v.is_finite() && (2.9..=3.6).contains(&v), "{v}");
    }

    #[test]
    fn router_uses_distance_detour_and_speed() {
        let r = HaversineRouter::new(SpeedModel::new(SpeedConfig::default()), 1.3);
        let (a, b) = (ll(45.5, -73.6), ll(45.51, -73.6));
        let route = r.route(a, b, MON_8);
        assert!((route.metres - haversine_m(a, b) * 1.3).abs() < 1e-9);
        assert!((route.seconds - route.metres / 6.0).abs() < 1e-6);
        assert_eq!(r.route(a, a, MON_8).seconds, 0.0);
    }
}
