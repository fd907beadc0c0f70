//! H3 cells (via `h3o`): the cell of a position, grid disks, and [`CourierCells`], the
//! cell → couriers map behind heatmaps, console viewports and zone notifications.
//!
//! Why H3 next to the R-tree: the R-tree answers metric questions (nearest, radius); cells give
//! a stable, shareable *name* for an area. A courier changing cell is the cheap trigger for
//! "tell the zone actors", and per-cell counts are what a heatmap draws. Cells are also the
//! keys of the fence cover ([`crate::fence`]) and of the learned speed table ([`crate::eta`]).

use std::collections::HashMap;

pub use h3o::{CellIndex, Resolution};

use crate::GeoError;
use crate::coord::LatLng;
use crate::index::CourierKey;

/// A fast hasher for 64-bit keys (H3 cells, courier keys, fence ids): one multiply and a
/// xor-shift (the splitmix64 finaliser). H3 indices carry their unused digits as runs of 1
/// bits, so the mixing matters; SipHash's DoS resistance does not, since keys are ours.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(29) ^ n;
    }
}

/// `BuildHasher` for [`KeyHasher`].
pub type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;

/// A `HashMap` keyed by cells or numeric ids, with the fast [`KeyHasher`].
pub type KeyMap<K, V> = HashMap<K, V, KeyHash>;

/// The resolution for a number `0..=15`.
pub fn resolution(r: u8) -> Result<Resolution, GeoError> {
    Resolution::try_from(r).map_err(|_| GeoError::Resolution(r))
}

/// The H3 cell containing `p` at resolution `res`.
///
/// `LatLng` is validated on construction, so this cannot fail.
pub fn cell_at(p: LatLng, res: Resolution) -> CellIndex {
    h3o::LatLng::new(p.lat, p.lng).expect("LatLng is validated on construction").to_cell(res)
}

/// The centre of a cell.
pub fn cell_center(cell: CellIndex) -> LatLng {
    let c = h3o::LatLng::from(cell);
    LatLng { lat: c.lat(), lng: c.lng() }
}

/// The boundary vertices of a cell, counter-clockwise, not closed (6 for hexagons, 5 for
/// pentagons, up to 10 where a cell crosses an icosahedron edge).
pub fn cell_boundary(cell: CellIndex) -> Vec<LatLng> {
    cell.boundary().iter().map(|v| LatLng { lat: v.lat(), lng: v.lng() }).collect()
}

/// The cell and every cell within `k` steps of it (a "filled hexagon"), centre first.
pub fn disk(cell: CellIndex, k: u32) -> Vec<CellIndex> {
    cell.grid_disk(k)
}

/// The cells within `k` steps of the cell containing `p` at `res`: the candidates to scan for
/// "what is around here" without a metric query.
pub fn disk_around(p: LatLng, res: Resolution, k: u32) -> Vec<CellIndex> {
    disk(cell_at(p, res), k)
}

/// The greatest distance in metres from a cell's centre to its boundary vertices, with 5 %
/// slack for the curvature of its true edges. Any point of the cell lies within this of the
/// centre; the fence cover uses it to classify cells against circles.
pub fn cell_circumradius_m(cell: CellIndex) -> f64 {
    let c = cell_center(cell);
    cell_boundary(cell).into_iter().map(|v| crate::haversine_m(c, v)).fold(0.0, f64::max) * 1.05
}

/// A courier's cell changed (or it appeared, `from == None`). The actors forward this to the
/// zone actors of both cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellChange {
    pub key: CourierKey,
    pub from: Option<CellIndex>,
    pub to: CellIndex,
}

/// Cell → courier keys at one resolution, with moves and removals.
///
/// Named `CourierCells` rather than `CellIndex` so it does not clash with [`h3o::CellIndex`],
/// which callers use next to it. Buckets are small vectors (at resolution 9 a cell is ~0.1 km²,
/// a handful of couriers), so a move is two hash look-ups and a swap-remove.
#[derive(Debug, Clone)]
pub struct CourierCells {
    res: Resolution,
    buckets: KeyMap<CellIndex, Vec<CourierKey>>,
    at: KeyMap<CourierKey, CellIndex>,
}

impl CourierCells {
    /// An empty map at resolution `res` (9 is a good default: ~174 m edges).
    pub fn new(res: Resolution) -> Self {
        CourierCells { res, buckets: KeyMap::default(), at: KeyMap::default() }
    }

    /// The resolution the map keys on.
    pub fn resolution(&self) -> Resolution {
        self.res
    }

    /// Records `key` at `p`. Returns the change when the courier is new or changed cell, `None`
    /// when it stayed in its cell (the common case on the GPS hot path: nothing to notify).
    pub fn update(&mut self, key: CourierKey, p: LatLng) -> Option<CellChange> {
        let to = cell_at(p, self.res);
        let from = self.at.insert(key, to);
        if from == Some(to) {
            return None;
        }
        if let Some(old) = from {
            self.take_from_bucket(old, key);
        }
        self.buckets.entry(to).or_default().push(key);
        Some(CellChange { key, from, to })
    }

    /// Forgets a courier; returns the cell it was in.
    pub fn remove(&mut self, key: CourierKey) -> Option<CellIndex> {
        let old = self.at.remove(&key)?;
        self.take_from_bucket(old, key);
        Some(old)
    }

    fn take_from_bucket(&mut self, cell: CellIndex, key: CourierKey) {
        if let Some(b) = self.buckets.get_mut(&cell) {
            if let Some(i) = b.iter().position(|k| *k == key) {
                b.swap_remove(i);
            }
            if b.is_empty() {
                self.buckets.remove(&cell);
            }
        }
    }

    /// The cell a courier is in.
    pub fn cell_of(&self, key: CourierKey) -> Option<CellIndex> {
        self.at.get(&key).copied()
    }

    /// Couriers in one cell of this map's resolution (empty for other resolutions).
    pub fn in_cell(&self, cell: CellIndex) -> &[CourierKey] {
        self.buckets.get(&cell).map_or(&[], Vec::as_slice)
    }

    /// Couriers in the cells within `k` steps of `cell`.
    pub fn in_disk(&self, cell: CellIndex, k: u32) -> Vec<CourierKey> {
        disk(cell, k).into_iter().flat_map(|c| self.in_cell(c).iter().copied()).collect()
    }

    /// Number of couriers tracked.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Non-empty cells with their courier counts, at this map's resolution.
    pub fn counts(&self) -> impl Iterator<Item = (CellIndex, usize)> + '_ {
        self.buckets.iter().map(|(c, b)| (*c, b.len()))
    }

    /// Courier counts aggregated to a coarser resolution (a zoomed-out heatmap). A `res` finer
    /// than the map's is treated as the map's own.
    pub fn heatmap(&self, res: Resolution) -> HashMap<CellIndex, usize> {
        let mut out = HashMap::new();
        for (c, n) in self.counts() {
            let p = c.parent(res).unwrap_or(c);
            *out.entry(p).or_insert(0) += n;
        }
        out
    }

    /// Courier counts of the cells whose centre lies in the viewport box (south-west `min`,
    /// north-east `max`, wrapping the antimeridian when `min.lng > max.lng`), aggregated at
    /// `res`: what the console draws for its current view.
    pub fn heatmap_in_bbox(&self, res: Resolution, min: LatLng, max: LatLng) -> HashMap<CellIndex, usize> {
        let mut h = self.heatmap(res);
        h.retain(|c, _| crate::index::in_box(cell_center(*c), min, max));
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ll(lat: f64, lng: f64) -> LatLng {
        LatLng::new(lat, lng).unwrap()
    }

    #[test]
    fn resolution_bounds() {
        assert!(resolution(15).is_ok());
        assert!(matches!(resolution(16), Err(GeoError::Resolution(16))));
    }

    #[test]
    fn cell_of_a_point_contains_it() {
        let p = ll(45.5017, -73.5673);
        let c = cell_at(p, Resolution::Nine);
        assert_eq!(c.resolution(), Resolution::Nine);
        assert!(crate::haversine_m(cell_center(c), p) <= cell_circumradius_m(c));
        assert_eq!(disk(c, 1).len(), 7);
        assert_eq!(disk(c, 1)[0], c);
    }

    #[test]
    fn moves_report_cell_changes_only() {
        let mut m = CourierCells::new(Resolution::Nine);
        let a = ll(45.5017, -73.5673);
        let ch = m.update(7, a).unwrap();
        assert_eq!(ch.from, None);
        assert_eq!(m.update(7, a), None, "same position, same cell");
        let b = ll(45.52, -73.60);
        let ch = m.update(7, b).unwrap();
        assert_eq!(ch.from, Some(cell_at(a, Resolution::Nine)));
        assert!(m.in_cell(cell_at(a, Resolution::Nine)).is_empty());
        assert_eq!(m.in_cell(cell_at(b, Resolution::Nine)), &[7]);
        assert_eq!(m.remove(7), Some(cell_at(b, Resolution::Nine)));
        assert!(m.is_empty());
        assert_eq!(m.counts().count(), 0);
    }

    proptest! {
        #[test]
        fn buckets_match_brute_force(moves in prop::collection::vec((0u64..40, 45.4f64..45.6, -73.7f64..-73.5, any::<bool>()), 1..300)) {
            let mut m = CourierCells::new(Resolution::Eight);
            let mut last: HashMap<u64, LatLng> = HashMap::new();
            for &(k, la, ln, rm) in &moves {
                if rm && k % 5 == 0 {
                    prop_assert_eq!(m.remove(k).is_some(), last.remove(&k).is_some());
                } else {
                    m.update(k, ll(la, ln));
                    last.insert(k, ll(la, ln));
                }
            }
            prop_assert_eq!(m.len(), last.len());
            let total: usize = m.counts().map(|(_, n)| n).sum();
            prop_assert_eq!(total, last.len());
            for (k, p) in &last {
                let c = cell_at(*p, Resolution::Eight);
                prop_assert_eq!(m.cell_of(*k), Some(c));
                prop_assert!(m.in_cell(c).contains(k));
            }
            let coarse: usize = m.heatmap(Resolution::Six).values().sum();
            prop_assert_eq!(coarse, last.len());
            let everything = m.heatmap_in_bbox(Resolution::Eight, ll(-90.0, -180.0), ll(90.0, 180.0));
            prop_assert_eq!(everything.values().sum::<usize>(), last.len());
        }
    }
}
