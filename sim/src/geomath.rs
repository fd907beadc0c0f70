//! Small spherical geometry helpers for the simulator: distances, bearings, moving a point.
//!
//! The simulator does not depend on `hexfleet-geo` (it must only speak the wire protocol), so it
//! carries the few formulas it needs. Accuracy of a spherical Earth is plenty for city scale.

/// Mean Earth radius in metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A WGS84 position in degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatLng {
    pub lat: f64,
    pub lng: f64,
}

impl LatLng {
    pub fn new(lat: f64, lng: f64) -> Self {
        Self { lat, lng }
    }

    /// True when both coordinates are finite and within WGS84 ranges.
    pub fn is_valid(&self) -> bool {
        self.lat.is_finite() && self.lng.is_finite() && self.lat.abs() <= 90.0 && self.lng.abs() <= 180.0
    }
}

/// Great-circle distance in metres (haversine).
pub fn distance_m(a: LatLng, b: LatLng) -> f64 {
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = la2 - la1;
    let dlng = (b.lng - a.lng).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlng / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// Initial bearing from `a` to `b` in degrees, 0 = north, clockwise, in `[0, 360)`.
pub fn bearing_deg(a: LatLng, b: LatLng) -> f64 {
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlng = (b.lng - a.lng).to_radians();
    let y = dlng.sin() * la2.cos();
    let x = la1.cos() * la2.sin() - la1.sin() * la2.cos() * dlng.cos();
    (y.atan2(x).to_degrees() + 360.0) % 360.0
}

/// Moves `a` towards `b` by at most `dist_m` metres (great-circle distance from `a`).
/// Returns `b` when the leg is shorter than `dist_m`.
///
/// The point lies on the straight lat/lng segment from `a` to `b`, so it stays inside any box
/// holding both ends. Its haversine distance from `a` is not exactly proportional to the
/// fraction of the segment, so the fraction is corrected a few times and finally rounded down:
/// the result is never farther than `dist_m` (speeds derived from fixes never exceed the model's).
pub fn toward(a: LatLng, b: LatLng, dist_m: f64) -> LatLng {
    let total = distance_m(a, b);
    if total <= dist_m || total <= f64::EPSILON {
        return b;
    }
    if dist_m <= 0.0 {
        return a;
    }
    let lerp = |f: f64| LatLng::new(a.lat + (b.lat - a.lat) * f, a.lng + (b.lng - a.lng) * f);
    let mut f = dist_m / total;
    for _ in 0..3 {
        let d = distance_m(a, lerp(f));
        if d <= f64::EPSILON {
            break;
        }
        f = (f * dist_m / d).min(1.0);
    }
    let mut p = lerp(f);
    // Never overshoot, not even by rounding.
    for _ in 0..8 {
        let d = distance_m(a, p);
        if d <= dist_m {
            break;
        }
        f *= (dist_m / d) * (1.0 - 1e-12);
        p = lerp(f);
    }
    p
}

/// The point `dist_m` metres from `a` along `bearing` degrees (flat-Earth approximation, city scale).
pub fn offset(a: LatLng, bearing: f64, dist_m: f64) -> LatLng {
    let b = bearing.to_radians();
    let dlat = dist_m * b.cos() / EARTH_RADIUS_M;
    let dlng = dist_m * b.sin() / (EARTH_RADIUS_M * a.lat.to_radians().cos());
    LatLng::new(a.lat + dlat.to_degrees(), a.lng + dlng.to_degrees())
}

/// A bounding box `[min_lng, min_lat, max_lng, max_lat]`, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BBox {
    pub min_lng: f64,
    pub min_lat: f64,
    pub max_lng: f64,
    pub max_lat: f64,
}

impl BBox {
    pub fn from_array(b: [f64; 4]) -> Self {
        Self { min_lng: b[0], min_lat: b[1], max_lng: b[2], max_lat: b[3] }
    }

    pub fn to_array(self) -> [f64; 4] {
        [self.min_lng, self.min_lat, self.max_lng, self.max_lat]
    }

    /// True when the box is finite, non-empty and inside WGS84.
    pub fn is_valid(&self) -> bool {
        LatLng::new(self.min_lat, self.min_lng).is_valid()
            && LatLng::new(self.max_lat, self.max_lng).is_valid()
            && self.min_lng < self.max_lng
            && self.min_lat < self.max_lat
    }

    pub fn contains(&self, p: LatLng) -> bool {
        p.lng >= self.min_lng && p.lng <= self.max_lng && p.lat >= self.min_lat && p.lat <= self.max_lat
    }

    pub fn clamp(&self, p: LatLng) -> LatLng {
        LatLng::new(p.lat.clamp(self.min_lat, self.max_lat), p.lng.clamp(self.min_lng, self.max_lng))
    }

    pub fn center(&self) -> LatLng {
        LatLng::new((self.min_lat + self.max_lat) / 2.0, (self.min_lng + self.max_lng) / 2.0)
    }

    /// The point at fractions `(fx, fy)` of the box, `0..=1` each (x = longitude).
    pub fn at(&self, fx: f64, fy: f64) -> LatLng {
        LatLng::new(
            self.min_lat + (self.max_lat - self.min_lat) * fy,
            self.min_lng + (self.max_lng - self.min_lng) * fx,
        )
    }

    /// Width and height in metres, measured through the centre.
    pub fn size_m(&self) -> (f64, f64) {
        let c = self.center();
        let w = distance_m(LatLng::new(c.lat, self.min_lng), LatLng::new(c.lat, self.max_lng));
        let h = distance_m(LatLng::new(self.min_lat, c.lng), LatLng::new(self.max_lat, c.lng));
        (w, h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_degree_of_latitude_is_about_111_km() {
        let d = distance_m(LatLng::new(52.0, 13.0), LatLng::new(53.0, 13.0));
        assert!((d - 111_195.0).abs() < 100.0, "{d}");
    }

    #[test]
    fn offset_then_distance_round_trips() {
        let a = LatLng::new(52.5, 13.4);
        for bearing in [0.0, 45.0, 90.0, 200.0, 315.0] {
            let b = offset(a, bearing, 500.0);
            assert!((distance_m(a, b) - 500.0).abs() < 1.0);
            let back = bearing_deg(a, b);
            let diff = ((back - bearing + 540.0) % 360.0 - 180.0).abs();
            assert!(diff < 0.5, "bearing {bearing} came back as {back}");
        }
    }

    #[test]
    fn toward_never_overshoots() {
        let a = LatLng::new(52.5, 13.4);
        let b = offset(a, 90.0, 100.0);
        assert_eq!(toward(a, b, 150.0), b);
        let m = toward(a, b, 40.0);
        assert!((distance_m(a, m) - 40.0).abs() < 1e-6);
        assert!(distance_m(a, m) <= 40.0);
        // A long diagonal leg, where linear interpolation in degrees is visibly off.
        let far = LatLng::new(52.58, 13.55);
        let start = LatLng::new(52.44, 13.25);
        for d in [1.0, 6.0, 14.0, 5_000.0] {
            let p = toward(start, far, d);
            let got = distance_m(start, p);
            assert!(got <= d && d - got < 1e-6, "asked {d} m, moved {got} m");
        }
    }
}
