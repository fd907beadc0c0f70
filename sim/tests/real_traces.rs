//! The trace parsers on the real recordings in `../shared/data/traces/` (outside the repo):
//! a Garmin GPX car trip and two Denver drives as `latitude,longitude` CSV at ~1 Hz.
//!
//! A missing file fails the test when `CI=true`, and is skipped with a note otherwise.

use std::path::PathBuf;

use hexfleet_sim::geomath::{LatLng, distance_m};
use hexfleet_sim::trace::{self, Trace};

fn data(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/traces/")).join(name);
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "test data missing: {} (the shared data directory must sit beside the repo)",
        p.display()
    );
    eprintln!("note: {} is missing; skipping", p.display());
    None
}

fn assert_plausible(t: &Trace, max_speed: f64) {
    assert!(t.fixes.windows(2).all(|w| w[0].ts <= w[1].ts), "{}: not in time order", t.id);
    assert!(t.fixes.iter().all(|f| LatLng::new(f.lat, f.lng).is_valid()));
    assert!(t.max_speed() <= max_speed, "{}: {} m/s", t.id, t.max_speed());
}

#[test]
fn gpx_car_trip_has_104_timestamped_fixes() {
    let Some(path) = data("around-visnjan-with-car.gpx") else { return };
    let traces = trace::load(&path).unwrap();
    assert_eq!(traces.len(), 1);
    let t = &traces[0];
    assert_eq!(t.id, "around-visnjan-with-car");
    assert_eq!(t.fixes.len(), 104);
    // First point as recorded; its <time>, not the metadata's.
    let first = t.fixes[0];
    assert_eq!((first.lat, first.lng), (45.2735188510, 13.7142099626));
    assert_eq!(first.ts, trace::parse_iso8601_ms("2020-12-18T06:15:50Z").unwrap());
    assert!(t.fixes.windows(2).all(|w| w[1].ts > w[0].ts), "every fix has its own timestamp");
    // A car around Višnjan, Istria: a few minutes, no teleporting.
    assert!((5 * 60_000..=60 * 60_000).contains(&t.duration_ms()), "{} ms", t.duration_ms());
    assert_plausible(t, 45.0);
    let visnjan = LatLng::new(45.27, 13.72);
    assert!(t.fixes.iter().all(|f| distance_m(visnjan, LatLng::new(f.lat, f.lng)) < 20_000.0));
}

#[test]
fn denver_csvs_parse_at_one_hertz() {
    for (name, rows) in [("denver_trace_1.csv", 1053), ("denver_trace_2.csv", 799)] {
        let Some(path) = data(name) else { return };
        let traces = trace::load(&path).unwrap();
        assert_eq!(traces.len(), 1, "{name}");
        let t = &traces[0];
        assert_eq!(t.fixes.len(), rows, "{name}: header skipped, every row a fix");
        assert!(t.fixes.iter().enumerate().all(|(i, f)| f.ts == i as i64 * 1000), "{name}: 1 Hz");
        assert_eq!(t.duration_ms(), (rows as i64 - 1) * 1000);
        let denver = LatLng::new(39.74, -104.99);
        assert!(t.fixes.iter().all(|f| distance_m(denver, LatLng::new(f.lat, f.lng)) < 50_000.0), "{name}: in Denver");
        // Driving, at the assumed 1 Hz: below 40 m/s (144 km/h) even with GPS jitter.
        assert_plausible(t, 40.0);
        // Another assumed period scales the times, not the points.
        let slow = trace::load_with_period(&path, 2000).unwrap();
        assert_eq!(slow[0].duration_ms(), 2 * t.duration_ms());
        assert_eq!(slow[0].fixes[5].lat, t.fixes[5].lat);
    }
}
