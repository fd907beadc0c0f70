//! The fence set against plain `geo` point-in-polygon on the real Montreal electoral districts
//! (`shared/data/zones/montreal_districts.geojson`, 58 Polygons and MultiPolygons with holes).

mod common;

use geo::{Coord, Intersects, LineString, MultiPolygon, Polygon};
use hexfleet_geo::LatLng;
use hexfleet_geo::fence::{Fence, FenceSet};
use proptest::prelude::*;
use serde_json::Value;

fn ring(v: &Value) -> LineString<f64> {
    LineString::from(v.as_array().unwrap().iter().map(|c| (c[0].as_f64().unwrap(), c[1].as_f64().unwrap())).collect::<Vec<_>>())
}

fn polygon(v: &Value) -> Polygon<f64> {
    let rings = v.as_array().unwrap();
    Polygon::new(ring(&rings[0]), rings[1..].iter().map(ring).collect())
}

/// The districts as `geo` multi-polygons, or `None` when the data is absent (outside CI).
fn districts() -> Option<Vec<MultiPolygon<f64>>> {
    let text = common::shared_data("zones/montreal_districts.geojson")?;
    let fc: Value = serde_json::from_str(&text).expect("valid GeoJSON");
    let out: Vec<MultiPolygon<f64>> = fc["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let g = &f["geometry"];
            match g["type"].as_str().unwrap() {
                "Polygon" => MultiPolygon::new(vec![polygon(&g["coordinates"])]),
                "MultiPolygon" => MultiPolygon::new(g["coordinates"].as_array().unwrap().iter().map(polygon).collect()),
                t => panic!("unexpected geometry {t}"),
            }
        })
        .collect();
    assert_eq!(out.len(), 58);
    Some(out)
}

/// Districts and their fence set, built once for all tests of this file.
fn fixture() -> Option<&'static (Vec<MultiPolygon<f64>>, FenceSet)> {
    static F: std::sync::OnceLock<Option<(Vec<MultiPolygon<f64>>, FenceSet)>> = std::sync::OnceLock::new();
    F.get_or_init(|| districts().map(|ds| {
        let set = build(&ds);
        (ds, set)
    }))
    .as_ref()
}

fn build(ds: &[MultiPolygon<f64>]) -> FenceSet {
    let mut set = FenceSet::new();
    for (i, d) in ds.iter().enumerate() {
        set.insert(i as u64, Fence::multi_polygon(d.clone()).unwrap(), 0);
    }
    set
}

fn check(set: &FenceSet, ds: &[MultiPolygon<f64>], lat: f64, lng: f64) -> Result<(), TestCaseError> {
    let mut got = set.containing(LatLng::new(lat, lng).unwrap());
    got.sort_unstable();
    let want: Vec<u64> = ds.iter().enumerate().filter(|(_, d)| d.intersects(&Coord { x: lng, y: lat })).map(|(i, _)| i as u64).collect();
    prop_assert_eq!(got, want, "at lat {} lng {}", lat, lng);
    Ok(())
}

#[test]
fn districts_match_geo_on_a_dense_grid() {
    let Some((ds, set)) = fixture() else { return };
    // 300 × 300 grid over the island's bounding box (~45.40..45.71, -73.98..-73.47).
    let mut inside = 0;
    for i in 0..300 {
        for j in 0..300 {
            let lat = 45.40 + 0.31 * (i as f64 + 0.5) / 300.0;
            let lng = -73.98 + 0.51 * (j as f64 + 0.5) / 300.0;
            check(set, ds, lat, lng).unwrap();
            inside += usize::from(!set.containing(LatLng::new(lat, lng).unwrap()).is_empty());
        }
    }
    assert!(inside > 10_000, "the grid should hit the districts often ({inside})");
}

#[test]
fn districts_match_geo_on_their_own_vertices() {
    // Vertices are on borders: the hardest points, and they must count as inside.
    let Some((ds, set)) = fixture() else { return };
    for (i, d) in ds.iter().enumerate() {
        for p in &d.0 {
            for c in p.exterior().0.iter().step_by(7) {
                let got = set.containing(LatLng::new(c.y, c.x).unwrap());
                assert!(got.contains(&(i as u64)), "vertex {c:?} of district {i}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn districts_match_geo_on_random_points(pts in prop::collection::vec((45.40f64..45.71, -73.98f64..-73.47), 2_000)) {
        let Some((ds, set)) = fixture() else { return Ok(()) };
        for (la, ln) in pts {
            check(set, ds, la, ln)?;
        }
    }
}
