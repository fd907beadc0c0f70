//! WGS84 coordinates and great-circle distances.
//!
//! [`LatLng`] is validated on construction (finite, |lat| ≤ 90, |lng| ≤ 180), so the rest of the
//! engine never sees NaN or out-of-range degrees. Distances use the haversine formula on a
//! sphere of the mean Earth radius (error against the WGS84 ellipsoid ≤ 0.5 %).

/// Mean Earth radius in metres (IUGG).
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Why a coordinate pair was refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum CoordError {
    #[error("coordinates must be finite numbers")]
    NotFinite,
    #[error("latitude {0} is outside [-90, 90]")]
    Latitude(f64),
    #[error("longitude {0} is outside [-180, 180]")]
    Longitude(f64),
}

/// A WGS84 position in degrees. Construct with [`LatLng::new`], which validates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatLng {
    pub lat: f64,
    pub lng: f64,
}

impl LatLng {
    /// Validates and builds a position.
    pub fn new(lat: f64, lng: f64) -> Result<Self, CoordError> {
        if !lat.is_finite() || !lng.is_finite() {
            return Err(CoordError::NotFinite);
        }
        if !(-90.0..=90.0).contains(&lat) {
            return Err(CoordError::Latitude(lat));
        }
        if !(-180.0..=180.0).contains(&lng) {
            return Err(CoordError::Longitude(lng));
        }
        Ok(LatLng { lat, lng })
    }

    /// The point on the unit sphere (Earth-centred, Earth-fixed, radius 1).
    ///
    /// Euclidean (chord) distance between unit vectors grows monotonically with great-circle
    /// distance, so an R-tree over these points answers nearest-neighbour questions exactly,
    /// with no seam at the antimeridian and no distortion near the poles.
    pub fn to_unit(self) -> [f64; 3] {
        let (la, lo) = (self.lat.to_radians(), self.lng.to_radians());
        let c = la.cos();
        [c * lo.cos(), c * lo.sin(), la.sin()]
    }

    /// As a `geo::Point` (x = lng, y = lat).
    pub fn to_point(self) -> geo::Point<f64> {
        geo::Point::new(self.lng, self.lat)
    }
}

/// Great-circle distance in metres (haversine).
pub fn haversine_m(a: LatLng, b: LatLng) -> f64 {
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dla = la2 - la1;
    let dlo = (b.lng - a.lng).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// Chord length on the unit sphere for a great-circle distance in metres.
pub fn metres_to_chord(m: f64) -> f64 {
    let angle = (m / EARTH_RADIUS_M).min(std::f64::consts::PI);
    2.0 * (angle / 2.0).sin()
}

/// Great-circle distance in metres for a chord length on the unit sphere.
pub fn chord_to_metres(c: f64) -> f64 {
    2.0 * (c / 2.0).clamp(0.0, 1.0).asin() * EARTH_RADIUS_M
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_coordinates() {
        assert_eq!(LatLng::new(f64::NAN, 0.0), Err(CoordError::NotFinite));
        assert_eq!(LatLng::new(0.0, f64::INFINITY), Err(CoordError::NotFinite));
        assert_eq!(LatLng::new(90.5, 0.0), Err(CoordError::Latitude(90.5)));
        assert_eq!(LatLng::new(0.0, -180.1), Err(CoordError::Longitude(-180.1)));
        assert!(LatLng::new(-90.0, 180.0).is_ok());
    }

    #[test]
    fn haversine_known_distances() {
        // Berlin Brandenburger Tor → Alexanderplatz ≈ 2.3 km; one degree of latitude ≈ 111.2 km.
        let a = LatLng::new(52.5163, 13.3777).unwrap();
        let b = LatLng::new(52.5219, 13.4132).unwrap();
        let d = haversine_m(a, b);
        assert!((2_350.0..2_500.0).contains(&d), "{d}");
        let one_deg = haversine_m(LatLng::new(0.0, 0.0).unwrap(), LatLng::new(1.0, 0.0).unwrap());
        assert!((one_deg - 111_195.0).abs() < 5.0, "{one_deg}");
        // Across the antimeridian: 0.2° of longitude at the equator, not 359.8°.
        let e = haversine_m(LatLng::new(0.0, 179.9).unwrap(), LatLng::new(0.0, -179.9).unwrap());
        assert!((e - 22_239.0).abs() < 5.0, "{e}");
    }

    #[test]
    fn chord_round_trip() {
        for m in [0.0, 1.0, 500.0, 12_345.0, 5_000_000.0] {
            assert!((chord_to_metres(metres_to_chord(m)) - m).abs() < 1e-3 * m.max(1.0));
        }
    }
}
