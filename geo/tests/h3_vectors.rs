//! H3 cells and boundaries against the uber/h3 reference vectors (`shared/data/h3/`).

mod common;

use hexfleet_geo::LatLng;
use hexfleet_geo::cells::{CellIndex, cell_at, cell_boundary, cell_center};

/// Degrees of tolerance: the vectors are printed with 6–10 decimals.
const CENTER_TOL: f64 = 1e-6;
const VERTEX_TOL: f64 = 1e-6;

fn parse_cell(s: &str) -> CellIndex {
    s.parse().unwrap_or_else(|e| panic!("bad cell {s}: {e}"))
}

fn check_centers(file: &str) -> usize {
    let Some(text) = common::shared_data(file) else { return 0 };
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let cell = parse_cell(it.next().unwrap());
        let lat: f64 = it.next().unwrap().parse().unwrap();
        let lng: f64 = it.next().unwrap().parse().unwrap();
        let c = cell_center(cell);
        assert!((c.lat - lat).abs() < CENTER_TOL && (c.lng - lng).abs() < CENTER_TOL, "{file}: centre of {cell} is {c:?}, want {lat} {lng}");
        // The published centre maps back to the cell at its resolution.
        assert_eq!(cell_at(LatLng::new(lat, lng).unwrap(), cell.resolution()), cell, "{file}: {lat} {lng}");
        n += 1;
    }
    assert!(n > 0, "{file} has no vectors");
    n
}

#[test]
fn centers_match_uber_h3() {
    let n: usize = ["h3/bc05r09centers.txt", "h3/bc14r10centers.txt", "h3/bc19r11centers.txt", "h3/res00ic.txt"].iter().map(|f| check_centers(f)).sum();
    eprintln!("checked {n} cell centres");
}

#[test]
fn boundaries_match_uber_h3() {
    for file in ["h3/bc05r09cells.txt", "h3/bc14r10cells.txt"] {
        let Some(text) = common::shared_data(file) else { return };
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let mut n = 0;
        while let Some(head) = lines.next() {
            let cell = parse_cell(head);
            assert_eq!(lines.next(), Some("{"), "{file}: {cell}");
            let mut want = Vec::new();
            for l in lines.by_ref() {
                if l == "}" {
                    break;
                }
                let mut it = l.split_whitespace();
                let lat: f64 = it.next().unwrap().parse().unwrap();
                let lng: f64 = it.next().unwrap().parse().unwrap();
                want.push((lat, lng));
            }
            let got = cell_boundary(cell);
            assert_eq!(got.len(), want.len(), "{file}: vertex count of {cell}");
            for (g, w) in got.iter().zip(&want) {
                assert!((g.lat - w.0).abs() < VERTEX_TOL && (g.lng - w.1).abs() < VERTEX_TOL, "{file}: {cell} vertex {g:?} vs {w:?}");
            }
            n += 1;
        }
        assert!(n > 0, "{file} has no cells");
    }
}
