//! Geofences: polygons (with holes) and circles, the [`FenceSet`] that answers "which fences
//! contain this point" in about a microsecond for 10k fences, and the per-courier
//! [`FenceTracker`] that turns fixes into enter / exit / dwell events.
//!
//! # Semantics
//! Polygon coordinates are planar longitude/latitude degrees, exactly as GeoJSON (RFC 7946)
//! and `geo` read them: x = longitude, y = latitude, straight edges in degree space. A fence
//! that crosses the antimeridian must be cut there into a `MultiPolygon` (as RFC 7946 asks);
//! it is not unwrapped here. A point on a border counts as inside (`geo::Intersects`).
//! Circles are exact on the sphere: inside when the haversine distance ≤ radius.
//!
//! # How a query stays fast
//! Each fence is covered by H3 cells at a resolution chosen for its size (finest up to
//! [`FenceSetConfig::max_res`] whose cover stays under [`FenceSetConfig::target_cells`]).
//! Every cell of the cover is either *interior* (the whole cell is inside: answer with no
//! geometry) or *boundary* (the border may pass through: run the exact test). A point whose
//! cell is in no cover is outside every fence without any test. A query is one `to_cell` at
//! the finest resolution in use, a parent computation and a hash look-up per resolution in use,
//! and exact tests only for boundary hits. No separate bounding-box R-tree is needed: the cell
//! map *is* the coarse index, and its cost does not grow with the number of fences.
//!
//! The boundary band is built so it is safe without trusting planar cell outlines: every
//! ring edge is sampled at most a quarter cell edge apart, the cells of the samples and all
//! their neighbours form the candidate band. A cell outside it cannot touch the border, so its
//! centre decides for all of it. Inside the candidate band, a cell whose centre is farther
//! from the border than the cell's circumradius is decided by its centre too; only the rest
//! are boundary cells that need an exact test.

use std::collections::HashSet;

use geo::coordinate_position::{CoordPos, coord_pos_relative_to_ring};
use geo::kernels::{Kernel, Orientation, RobustKernel};
use geo::{Area, BoundingRect, Coord, MultiPolygon, Polygon};
use smallvec::SmallVec;
use h3o::geom::{ContainmentMode, TilerBuilder};

use crate::GeoError;
use crate::cells::{CellIndex, KeyMap, Resolution, cell_at, cell_center, cell_circumradius_m, disk};
use crate::coord::{LatLng, haversine_m};

/// Caller-chosen id of a fence (the actors map zone ids and stop ids onto it).
pub type FenceId = u64;

/// Metres per degree of latitude on the mean sphere.
const M_PER_DEG: f64 = std::f64::consts::PI * crate::EARTH_RADIUS_M / 180.0;

/// The geometry of a fence.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// One or more polygons, each with optional holes, in lng/lat degrees.
    Polygons(MultiPolygon<f64>),
    /// Everything within `radius_m` metres (great-circle) of `center`: pickup and drop-off
    /// arrival zones.
    Circle { center: LatLng, radius_m: f64 },
}

/// A validated fence geometry. Build with [`Fence::polygon`], [`Fence::multi_polygon`] or
/// [`Fence::circle`].
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    shape: Shape,
    /// Polygons only: each polygon's degree bounding box (min lng, min lat, max lng, max lat),
    /// computed once. `geo`'s `Intersects` recomputes it on every call, which was a third of a
    /// 10k-fence query.
    boxes: Vec<[f64; 4]>,
}

impl Fence {
    /// A polygon fence (holes allowed). Rings are closed automatically by `geo`.
    pub fn polygon(p: Polygon<f64>) -> Result<Fence, GeoError> {
        Fence::multi_polygon(MultiPolygon::new(vec![p]))
    }

    /// A multi-polygon fence. Every coordinate must be a valid lng/lat within
    /// [`MAX_FENCE_LAT`] of the equator, no edge may cross the antimeridian (cut the fence there
    /// into a `MultiPolygon`), and every ring must have at least three distinct corners and an
    /// area. Edges across the antimeridian or near a pole are long in degrees and short on the
    /// sphere: h3o's tiler would trace them with gaps and its fill would escape through them to
    /// cover the whole globe.
    pub fn multi_polygon(mp: MultiPolygon<f64>) -> Result<Fence, GeoError> {
        if mp.0.is_empty() {
            return Err(GeoError::EmptyFence);
        }
        for p in &mp.0 {
            for ring in std::iter::once(p.exterior()).chain(p.interiors()) {
                for c in &ring.0 {
                    LatLng::new(c.y, c.x)?;
                    if c.y.abs() > MAX_FENCE_LAT {
                        return Err(GeoError::Ring("fences must lie within 85 degrees of the equator"));
                    }
                }
                if ring.0.windows(2).any(|w| (w[1].x - w[0].x).abs() > 180.0) {
                    return Err(GeoError::Ring("an edge crosses the antimeridian: cut the fence there into a MultiPolygon"));
                }
                if Polygon::new(ring.clone(), Vec::new()).unsigned_area() <= MIN_RING_AREA_DEG2 {
                    return Err(GeoError::Ring("a ring has no area"));
                }
                let mut distinct = ring.0.clone();
                distinct.dedup();
                if distinct.first() == distinct.last() {
                    distinct.pop();
                }
                if distinct.len() < 3 {
                    return Err(GeoError::Ring("a ring needs at least three distinct corners"));
                }
            }
        }
        let boxes = mp
            .0
            .iter()
            .map(|p| {
                let r = p.bounding_rect().expect("rings have corners");
                [r.min().x, r.min().y, r.max().x, r.max().y]
            })
            .collect();
        Ok(Fence { shape: Shape::Polygons(mp), boxes })
    }

    /// Length of the border in metres (planar edges, scaled by the cosine of their latitude).
    fn perimeter_m(&self) -> f64 {
        match &self.shape {
            Shape::Circle { radius_m, .. } => std::f64::consts::TAU * radius_m,
            Shape::Polygons(mp) => mp
                .0
                .iter()
                .flat_map(|p| std::iter::once(p.exterior()).chain(p.interiors()))
                .flat_map(|r| r.0.windows(2))
                .map(|w| {
                    let cos = ((w[0].y + w[1].y) / 2.0).to_radians().cos();
                    (((w[1].x - w[0].x) * cos).powi(2) + (w[1].y - w[0].y).powi(2)).sqrt() * M_PER_DEG
                })
                .sum(),
        }
    }

    /// A circle fence.
    pub fn circle(center: LatLng, radius_m: f64) -> Result<Fence, GeoError> {
        if !(radius_m.is_finite() && radius_m > 0.0) {
            return Err(GeoError::Radius(radius_m));
        }
        Ok(Fence { shape: Shape::Circle { center, radius_m }, boxes: Vec::new() })
    }

    /// The geometry.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Exact membership, border included. Linear in the number of vertices for polygons; the
    /// [`FenceSet`] calls it only for points in boundary cells.
    pub fn contains(&self, p: LatLng) -> bool {
        match &self.shape {
            Shape::Polygons(mp) => {
                // Same answer as `geo::Intersects<Coord>` on the multi-polygon (border and hole
                // borders inside), with the bounding boxes cached.
                let c = Coord { x: p.lng, y: p.lat };
                mp.0.iter().zip(&self.boxes).any(|(poly, b)| {
                    if !in_box(p, b) {
                        return false;
                    }
                    match coord_pos_relative_to_ring(c, poly.exterior()) {
                        CoordPos::Outside => false,
                        CoordPos::OnBoundary => true,
                        // The first hole the point is not outside of decides, as in `geo`.
                        CoordPos::Inside => poly.interiors().iter().map(|h| coord_pos_relative_to_ring(c, h)).find(|pos| *pos != CoordPos::Outside) != Some(CoordPos::Inside),
                    }
                })
            }
            Shape::Circle { center, radius_m } => haversine_m(*center, p) <= *radius_m,
        }
    }

    /// Signed distance to the border in metres: positive inside, negative outside.
    ///
    /// Exact for circles. For polygons, distances to the edges are measured in a local
    /// equirectangular projection centred on `p` (error well under 1 % within tens of km),
    /// which is what hysteresis margins of a few tens of metres need. Linear in the vertices;
    /// the tracker calls it only when a fence's state is about to flip.
    pub fn depth_m(&self, p: LatLng) -> f64 {
        match &self.shape {
            Shape::Circle { center, radius_m } => radius_m - haversine_m(*center, p),
            Shape::Polygons(mp) => {
                let kx = p.lat.to_radians().cos() * M_PER_DEG;
                let proj = |c: &Coord<f64>| {
                    let mut dx = c.x - p.lng;
                    if dx > 180.0 {
                        dx -= 360.0;
                    } else if dx < -180.0 {
                        dx += 360.0;
                    }
                    (dx * kx, (c.y - p.lat) * M_PER_DEG)
                };
                let mut best = f64::INFINITY;
                for poly in &mp.0 {
                    for ring in std::iter::once(poly.exterior()).chain(poly.interiors()) {
                        for w in ring.0.windows(2) {
                            best = best.min(seg_dist(proj(&w[0]), proj(&w[1])));
                        }
                    }
                }
                if self.contains(p) { best } else { -best }
            }
        }
    }

    /// Degree bounding box as (min lng, min lat, max lng, max lat).
    fn bbox(&self) -> (f64, f64, f64, f64) {
        match &self.shape {
            Shape::Polygons(mp) => {
                let r = mp.bounding_rect().expect("validated non-empty");
                (r.min().x, r.min().y, r.max().x, r.max().y)
            }
            Shape::Circle { center, radius_m } => {
                let dlat = radius_m / M_PER_DEG;
                let dlng = radius_m / (M_PER_DEG * center.lat.to_radians().cos().max(1e-6));
                (center.lng - dlng, center.lat - dlat, center.lng + dlng, center.lat + dlat)
            }
        }
    }
}

/// Distance from the origin to the segment a–b in the plane.
fn seg_dist(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 { (-(a.0 * dx + a.1 * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
    let (x, y) = (a.0 + t * dx, a.1 + t * dy);
    (x * x + y * y).sqrt()
}

/// Tuning of the H3 cover.
#[derive(Debug, Clone, Copy)]
pub struct FenceSetConfig {
    /// Finest resolution a cover may use. Each resolution in use costs one hash look-up per
    /// query, so fewer distinct resolutions make queries faster; finer cells make boundary
    /// bands thinner (fewer exact tests) but covers larger. The default 10 (~66 m edges) puts
    /// every fence of up to ~15 km² at one resolution; a 50–100 m pickup circle is then a few
    /// boundary cells, and the exact test of a circle is one haversine from a dense array.
    /// Measured on 10k mixed fences: one look-up at 10 with 105k cover cells, against two
    /// look-ups (10 and 11) with 750k cover cells when the finest was 11.
    pub max_res: Resolution,
    /// Upper bound on the estimated cells per fence; larger fences get a coarser resolution,
    /// so memory stays ~O(target) per fence and a city-wide zone costs as much as a block.
    pub target_cells: usize,
}

impl Default for FenceSetConfig {
    fn default() -> Self {
        FenceSetConfig { max_res: Resolution::Ten, target_cells: 1024 }
    }
}

/// One fence in one cover cell. The id is stored here so an interior hit is answered without
/// touching the fence's slot (a cache miss per fence in a 10k-fence set).
#[derive(Debug, Clone, Copy)]
struct CoverEntry {
    id: FenceId,
    slot: u32,
    interior: bool,
}

/// The first, cheap step of an exact test, kept in a dense array beside the slots so a
/// boundary hit costs one cache line before any geometry: circles are decided here, polygons
/// are rejected here when the point is outside their bounding box.
#[derive(Debug, Clone)]
enum Quick {
    Circle { center: LatLng, radius_m: f64 },
    /// A single polygon without holes (the common case): its bounding box and its closed ring,
    /// one pointer away instead of four (slot → multi-polygon → polygon → ring).
    Ring { bbox: [f64; 4], ring: Box<[Coord<f64>]> },
    /// Anything else: the degree bounding box (min lng, min lat, max lng, max lat) of the whole
    /// multi-polygon; the exact test goes to the fence.
    Boxed([f64; 4]),
}

impl Quick {
    fn of(fence: &Fence) -> Quick {
        match &fence.shape {
            Shape::Circle { center, radius_m } => Quick::Circle { center: *center, radius_m: *radius_m },
            Shape::Polygons(mp) => {
                let (a, b, c, d) = fence.bbox();
                match mp.0.as_slice() {
                    [p] if p.interiors().is_empty() => Quick::Ring { bbox: [a, b, c, d], ring: p.exterior().0.clone().into_boxed_slice() },
                    _ => Quick::Boxed([a, b, c, d]),
                }
            }
        }
    }
}

fn in_box(p: LatLng, b: &[f64; 4]) -> bool {
    !(p.lng < b[0] || p.lat < b[1] || p.lng > b[2] || p.lat > b[3])
}

/// Inside or on the border of a closed ring: `geo`'s `coord_pos_relative_to_ring` (the same
/// winding-number rule and robust orientation predicate) over a slice, so the fast path gives
/// exactly the answer of [`Fence::contains`].
fn ring_contains(c: Coord<f64>, ring: &[Coord<f64>]) -> bool {
    let between = |v: f64, a: f64, b: f64| if a < b { v >= a && v <= b } else { v >= b && v <= a };
    let mut winding = 0i32;
    for w in ring.windows(2) {
        let (s, e) = (w[0], w[1]);
        if s.y <= c.y {
            if e.y >= c.y {
                let o = <RobustKernel as Kernel<f64>>::orient2d(s, e, c);
                if o == Orientation::CounterClockwise && e.y != c.y {
                    winding += 1;
                } else if o == Orientation::Collinear && between(c.x, s.x, e.x) {
                    return true;
                }
            }
        } else if e.y <= c.y {
            let o = <RobustKernel as Kernel<f64>>::orient2d(s, e, c);
            if o == Orientation::Clockwise {
                winding -= 1;
            } else if o == Orientation::Collinear && between(c.x, s.x, e.x) {
                return true;
            }
        }
    }
    winding != 0
}

#[derive(Debug, Clone)]
struct Slot {
    fence: Fence,
    cover: Vec<CellIndex>,
    /// Sequence number of the first insertion of this id ([`FenceSet::seq`]).
    added_seq: u64,
    added_at_ms: i64,
}

/// A set of fences with an H3 cover index. See the module docs for semantics and speed.
#[derive(Debug, Clone, Default)]
pub struct FenceSet {
    config: FenceSetConfig,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    ids: KeyMap<FenceId, u32>,
    /// Cover cell → the fences covering it; most cells hold one or two, inline.
    cells: KeyMap<CellIndex, SmallVec<[CoverEntry; 2]>>,
    /// Per slot, the cheap first step of the exact test (dummy for free slots).
    quick: Vec<Quick>,
    /// Number of fences covered at each resolution; the query visits resolutions in use only.
    res_use: [u32; 16],
    seq: u64,
}

impl FenceSet {
    /// An empty set with the default cover tuning.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set with explicit cover tuning.
    pub fn with_config(config: FenceSetConfig) -> Self {
        FenceSet { config, ..Self::default() }
    }

    /// Adds a fence, or replaces the geometry of an existing id. `at_ms` is when it was
    /// created; trackers use it as the start of a silent initial stay (dwell is counted from
    /// it). Replacing keeps the original creation sequence, so trackers keep their state and
    /// evaluate the new geometry from their next fix.
    pub fn insert(&mut self, id: FenceId, fence: Fence, at_ms: i64) {
        let (added_seq, added_at_ms) = match self.remove_slot(id) {
            Some(old) => (old.added_seq, old.added_at_ms),
            None => {
                self.seq += 1;
                (self.seq, at_ms)
            }
        };
        let res = self.pick_resolution(&fence);
        let entries = cover(&fence, res);
        let slot_no = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.quick.push(Quick::Boxed([0.0; 4]));
                (self.slots.len() - 1) as u32
            }
        };
        self.quick[slot_no as usize] = Quick::of(&fence);
        let mut cover_cells = Vec::with_capacity(entries.len());
        for (cell, interior) in entries {
            self.cells.entry(cell).or_default().push(CoverEntry { id, slot: slot_no, interior });
            cover_cells.push(cell);
        }
        self.res_use[u8::from(res) as usize] += 1;
        self.ids.insert(id, slot_no);
        self.slots[slot_no as usize] = Some(Slot { fence, cover: cover_cells, added_seq, added_at_ms });
    }

    /// Removes a fence; returns its geometry. Trackers close open stays with
    /// [`FenceTracker::on_fence_removed`] (or lazily at their next fix).
    pub fn remove(&mut self, id: FenceId) -> Option<Fence> {
        self.remove_slot(id).map(|s| s.fence)
    }

    fn remove_slot(&mut self, id: FenceId) -> Option<Slot> {
        let slot_no = self.ids.remove(&id)?;
        let slot = self.slots[slot_no as usize].take().expect("ids point at live slots");
        self.quick[slot_no as usize] = Quick::Boxed([0.0; 4]);
        for cell in &slot.cover {
            if let Some(v) = self.cells.get_mut(cell) {
                v.retain(|e| e.slot != slot_no);
                if v.is_empty() {
                    self.cells.remove(cell);
                }
            }
        }
        if let Some(c) = slot.cover.first() {
            self.res_use[u8::from(c.resolution()) as usize] -= 1;
        }
        self.free.push(slot_no);
        Some(slot)
    }

    /// Finest resolution ≤ `max_res` whose estimated cover stays within `target_cells`: the
    /// bounding box's area over a cell's, plus the boundary band (three cells per cell edge
    /// along the perimeter; a long thin fence is mostly band).
    fn pick_resolution(&self, fence: &Fence) -> Resolution {
        let (x0, y0, x1, y1) = fence.bbox();
        let lat_mid = ((y0 + y1) / 2.0).to_radians().cos().max(0.01);
        let area = ((y1 - y0) * M_PER_DEG).max(1.0) * ((x1 - x0) * M_PER_DEG * lat_mid).max(1.0);
        let perimeter = fence.perimeter_m();
        let mut res = self.config.max_res;
        while let Some(coarser) = res.pred() {
            if area / res.area_m2() + 3.0 * perimeter / res.edge_length_m() <= self.config.target_cells as f64 {
                break;
            }
            res = coarser;
        }
        res
    }

    /// Number of fences.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The fence of an id.
    pub fn get(&self, id: FenceId) -> Option<&Fence> {
        self.slot(id).map(|s| &s.fence)
    }

    fn slot(&self, id: FenceId) -> Option<&Slot> {
        self.ids.get(&id).and_then(|s| self.slots[*s as usize].as_ref())
    }

    /// A counter bumped by every insertion of a new id. Trackers remember the last value they
    /// saw to recognise fences created since their previous fix.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Total cover cells (a memory gauge: ~40 bytes each).
    pub fn cover_cells(&self) -> usize {
        self.cells.len()
    }

    /// How many fences are covered at each H3 resolution (index = resolution); a query makes
    /// one hash look-up per resolution in use.
    pub fn resolutions_in_use(&self) -> [u32; 16] {
        self.res_use
    }

    /// Whether fence `id` contains `p` (border included); `false` for unknown ids.
    pub fn contains(&self, id: FenceId, p: LatLng) -> bool {
        self.slot(id).is_some_and(|s| s.fence.contains(p))
    }

    /// Calls `f` with the id of every fence containing `p` (border included), each once.
    pub fn for_each_containing(&self, p: LatLng, mut f: impl FnMut(FenceId)) {
        let Some(finest) = (0..16u8).rev().find(|r| self.res_use[*r as usize] > 0) else { return };
        let base = cell_at(p, Resolution::try_from(finest).expect("0..16"));
        for r in (0..=finest).rev() {
            if self.res_use[r as usize] == 0 {
                continue;
            }
            let cell = if r == finest { base } else { base.parent(Resolution::try_from(r).expect("0..16")).expect("coarser") };
            let Some(entries) = self.cells.get(&cell) else { continue };
            // Two passes so the independent loads of the cheap tests overlap (the time here is
            // cache misses, not arithmetic): interior hits and circles and bounding boxes
            // first, then the exact ring tests of what is left.
            let mut exact: SmallVec<[(u32, FenceId); 8]> = SmallVec::new();
            for e in entries {
                if e.interior {
                    f(e.id);
                    continue;
                }
                match &self.quick[e.slot as usize] {
                    Quick::Circle { center, radius_m } => {
                        if haversine_m(*center, p) <= *radius_m {
                            f(e.id);
                        }
                    }
                    Quick::Ring { bbox, .. } | Quick::Boxed(bbox) => {
                        if in_box(p, bbox) {
                            exact.push((e.slot, e.id));
                        }
                    }
                }
            }
            for (slot, id) in exact {
                let inside = match &self.quick[slot as usize] {
                    Quick::Ring { ring, .. } => ring_contains(Coord { x: p.lng, y: p.lat }, ring),
                    _ => self.slots[slot as usize].as_ref().expect("cover points at live slots").fence.contains(p),
                };
                if inside {
                    f(id);
                }
            }
        }
    }

    /// Appends the ids of the fences containing `p` to `out` (no allocation once `out` has
    /// grown).
    pub fn containing_into(&self, p: LatLng, out: &mut Vec<FenceId>) {
        self.for_each_containing(p, |id| out.push(id));
    }

    /// The ids of the fences containing `p`, in no particular order.
    pub fn containing(&self, p: LatLng) -> Vec<FenceId> {
        let mut v = Vec::new();
        self.containing_into(p, &mut v);
        v
    }

    /// Every fence id, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = FenceId> + '_ {
        self.ids.keys().copied()
    }
}

/// The cover of a fence at `res`: (cell, interior?) pairs, each cell once.
fn cover(fence: &Fence, res: Resolution) -> Vec<(CellIndex, bool)> {
    match &fence.shape {
        Shape::Circle { center, radius_m } => {
            let c0 = cell_at(*center, res);
            // Adjacent centres are ≥ ~1.2 average edges apart even where H3 is most distorted.
            let k = (radius_m / (res.edge_length_m() * 1.2)).ceil() as u32 + 2;
            let mut out = Vec::new();
            for c in disk(c0, k) {
                let d = haversine_m(*center, cell_center(c));
                let r = cell_circumradius_m(c);
                if d + r <= *radius_m {
                    out.push((c, true));
                } else if d - r <= *radius_m {
                    out.push((c, false));
                }
            }
            out
        }
        Shape::Polygons(mp) => {
            // Boundary band: cells of samples along every edge, plus their neighbours.
            let step = res.edge_length_m() * 0.25;
            let mut seeds: HashSet<CellIndex> = HashSet::new();
            for poly in &mp.0 {
                for ring in std::iter::once(poly.exterior()).chain(poly.interiors()) {
                    for w in ring.0.windows(2) {
                        sample_edge(w[0], w[1], step, |p| {
                            seeds.insert(cell_at(p, res));
                        });
                    }
                }
            }
            let mut band: HashSet<CellIndex> = HashSet::with_capacity(seeds.len() * 3);
            for s in seeds {
                band.extend(disk(s, 1));
            }
            // Thin the band: a cell whose centre is farther from every edge than the cell's
            // circumradius lies wholly on one side, so it is interior (centre inside) or left
            // out (centre outside). The 2 % + 1 m margin covers the local projection of
            // `depth_m` (well under 1 % at cell scale). Only cells the border can really reach
            // stay boundary cells, about a third of the candidates, and each of those costs an
            // exact test per query.
            let mut out: Vec<(CellIndex, bool)> = Vec::with_capacity(band.len());
            for c in &band {
                let depth = fence.depth_m(cell_center(*c));
                let reach = cell_circumradius_m(*c) * 1.02 + 1.0;
                if depth > reach {
                    out.push((*c, true));
                } else if depth >= -reach {
                    out.push((*c, false));
                }
            }
            // Interior: cells whose centre is inside and that the border cannot reach.
            let mut tiler = TilerBuilder::new(res)
                .containment_mode(ContainmentMode::ContainsCentroid)
                .disable_transmeridian_heuristic()
                .build();
            for p in &mp.0 {
                tiler.add(p.clone()).expect("validated in Fence::multi_polygon");
            }
            let mut seen = HashSet::new();
            // Checked by centre as well: a cover must never hold a cell the fence does not
            // (the tiler's fill trusts its own tracing of the rings).
            for c in tiler.into_coverage() {
                if !band.contains(&c) && fence.contains(cell_center(c)) && seen.insert(c) {
                    out.push((c, true));
                }
            }
            out
        }
    }
}

/// The latitude fences must stay within (degrees): no delivery zone lies beyond it, and near
/// the poles planar edges and H3 covers stop agreeing.
pub const MAX_FENCE_LAT: f64 = 85.0;

/// A ring's least area, in square degrees (about 0.01 m² at the equator): below it the ring
/// is a line or a point.
const MIN_RING_AREA_DEG2: f64 = 1e-12;

/// Calls `f` on points along the planar lng/lat segment a–b, at most `step` metres apart
/// (measured with the largest longitude scale on the segment, so never farther).
fn sample_edge(a: Coord<f64>, b: Coord<f64>, step: f64, mut f: impl FnMut(LatLng)) {
    let cos_max = if (a.y <= 0.0) != (b.y <= 0.0) { 1.0 } else { a.y.to_radians().cos().max(b.y.to_radians().cos()) };
    let dx = (b.x - a.x) * M_PER_DEG * cos_max;
    let dy = (b.y - a.y) * M_PER_DEG;
    let n = ((dx * dx + dy * dy).sqrt() / step).ceil().max(1.0) as usize;
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let lng = (a.x + (b.x - a.x) * t).clamp(-180.0, 180.0);
        let lat = (a.y + (b.y - a.y) * t).clamp(-90.0, 90.0);
        f(LatLng { lat, lng });
    }
}

/// Hysteresis and dwell settings of a [`FenceTracker`].
///
/// A fence's state flips (enter or exit) when the new side is confirmed by either
/// `confirm_fixes` consecutive fixes on that side, or one fix at least `margin_m` metres past
/// the border. Jitter around a border (GPS noise is typically 5–20 m) alternates sides and is
/// never confirmed; a real crossing quickly goes deep or stays. The event's time is the
/// first fix on the new side, not the confirming one.
#[derive(Debug, Clone, Copy)]
pub struct TrackerConfig {
    /// Consecutive fixes on the new side that confirm a flip (1 disables the count rule).
    pub confirm_fixes: u8,
    /// Depth past the border, in metres, that confirms a flip on a single fix.
    pub margin_m: f64,
    /// Emit one `Dwell` event after this long inside (per stay); `None` disables.
    pub dwell_ms: Option<i64>,
    /// Longest silence between two fixes that still counts as time inside. What happened in
    /// a longer gap (the app closed for the night, a phone without signal) is not known: a
    /// stay's dwell counts the time observed inside, without the gap, and a flip half
    /// confirmed before it starts over. `None`: every gap counts.
    pub max_gap_ms: Option<i64>,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig { confirm_fixes: 3, margin_m: 25.0, dwell_ms: Some(120_000), max_gap_ms: Some(600_000) }
    }
}

/// What happened to a courier and a fence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FenceEventKind {
    Enter,
    /// The stay ended: `dwell_ms` inside; `removed` when it ended because the fence was
    /// deleted rather than because the courier left.
    Exit { dwell_ms: i64, removed: bool },
    /// Inside for `dwell_ms` (emitted once per stay, when the threshold is passed).
    Dwell { dwell_ms: i64 },
}

/// One geofence event, timed by fix time (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FenceEvent {
    pub fence: FenceId,
    pub kind: FenceEventKind,
    pub at_ms: i64,
}

/// What the tracker did with a fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixOutcome {
    /// Evaluated; events (if any) were appended.
    Applied,
    /// Not newer than the latest fix processed: ignored for fences (it still belongs in the
    /// trail, which is the caller's business).
    Late,
}

#[derive(Debug, Clone, Copy)]
struct FenceState {
    fence: FenceId,
    /// The confirmed side.
    inside: bool,
    /// Start of the current stay (when `inside`).
    since_ms: i64,
    dwell_sent: bool,
    /// Consecutive fixes seen on the other side, and the time of the first of them.
    streak: u8,
    flip_ms: i64,
}

/// Per-courier fence state machine: enter, exit and dwell with hysteresis.
///
/// * **Fix-time order.** Fixes are evaluated in fix-time order. A fix whose time is not after
///   the latest processed one returns [`FixOutcome::Late`] and changes nothing: rewriting the
///   past would mean retracting events already delivered, and a late fix is by definition
///   already superseded for "where is the courier now". (Phones that replay a buffer send it
///   in order, so it is processed normally as long as it is newer than what came live.)
/// * **Silent initial state.** Fences created since the previous fix are initialised from the
///   courier's *previous* position, without events: a fence drawn around a parked courier does
///   not produce `enter`, and a courier that drives in after the fence was created does. On a
///   courier's first fix every fence containing it is initialised silently (we do not know
///   when it entered).
/// * **Closing exit.** Removing a fence ends an open stay with `Exit { removed: true }`, either
///   through [`FenceTracker::on_fence_removed`] or at the next fix.
/// * **Gaps.** A silence longer than [`TrackerConfig::max_gap_ms`] is not counted as time
///   inside: dwell is the time observed inside. An exit after such a gap is still timed at the
///   first fix outside (when the courier left within the gap is not known).
///
/// States are kept only for fences the courier is inside or about to flip, so memory is a few
/// dozen bytes per courier.
#[derive(Debug, Clone, Default)]
pub struct FenceTracker {
    config: TrackerConfig,
    states: Vec<FenceState>,
    last_ms: Option<i64>,
    last_pos: Option<LatLng>,
    seen_seq: u64,
    scratch: Vec<FenceId>,
}

impl FenceTracker {
    /// A tracker for one courier.
    pub fn new(config: TrackerConfig) -> Self {
        FenceTracker { config, ..Self::default() }
    }

    /// Fences the courier is (confirmed) inside.
    pub fn inside(&self) -> impl Iterator<Item = FenceId> + '_ {
        self.states.iter().filter(|s| s.inside).map(|s| s.fence)
    }

    /// Time of the latest fix processed.
    pub fn last_fix_ms(&self) -> Option<i64> {
        self.last_ms
    }

    /// Evaluates a fix at `p`, time `ts_ms`, against `set`; appends events to `out` in the
    /// order they happened.
    pub fn on_fix(&mut self, set: &FenceSet, p: LatLng, ts_ms: i64, out: &mut Vec<FenceEvent>) -> FixOutcome {
        if self.last_ms.is_some_and(|t| ts_ms <= t) {
            return FixOutcome::Late;
        }
        // A long silence: the time in it is not counted as inside (each stay's start moves on
        // by the gap), and half-confirmed flips start over (their first fixes are stale).
        let long_gap = self.long_gap(ts_ms);
        if long_gap && let Some(last) = self.last_ms {
            let gap = ts_ms - last;
            self.states.retain_mut(|s| {
                s.streak = 0;
                s.since_ms = s.since_ms.saturating_add(gap);
                s.inside
            });
        }
        // Fences deleted without telling us: close their stays.
        self.states.retain(|s| {
            if set.slot(s.fence).is_some() {
                return true;
            }
            if s.inside {
                out.push(FenceEvent { fence: s.fence, kind: FenceEventKind::Exit { dwell_ms: ts_ms - s.since_ms, removed: true }, at_ms: ts_ms });
            }
            false
        });
        // Fences created since the previous fix: initial state from the previous position, or
        // from this one on a first fix, silently.
        let first_fix = self.last_pos.is_none();
        if set.seq() > self.seen_seq || first_fix {
            // After a long silence the previous position says nothing about now: from this fix.
            let from = if long_gap { p } else { self.last_pos.unwrap_or(p) };
            let mut fresh = std::mem::take(&mut self.scratch);
            fresh.clear();
            set.for_each_containing(from, |id| {
                let s = set.slot(id).expect("just found");
                if first_fix || s.added_seq > self.seen_seq {
                    fresh.push(id);
                }
            });
            for id in fresh.drain(..) {
                if !self.states.iter().any(|s| s.fence == id) {
                    // A fence added since the last fix: inside since it was added (or since that
                    // fix). On a first fix nothing is known before it: the stay starts now, not
                    // when the fence was last edited (a false `dwell` after every restart).
                    let since = if first_fix || long_gap {
                        // (After a long silence the time before this fix is not counted.)
                        ts_ms
                    } else {
                        set.slot(id).map_or(ts_ms, |s| s.added_at_ms).max(self.last_ms.unwrap_or(i64::MIN)).min(ts_ms)
                    };
                    self.states.push(FenceState { fence: id, inside: true, since_ms: since, dwell_sent: false, streak: 0, flip_ms: 0 });
                }
            }
            self.scratch = fresh;
            self.seen_seq = set.seq();
        }

        let mut now_in = std::mem::take(&mut self.scratch);
        now_in.clear();
        set.containing_into(p, &mut now_in);
        let cfg = self.config;
        // Known fences: confirm or reset flips, emit dwell.
        let mut i = 0;
        while i < self.states.len() {
            let s = &mut self.states[i];
            let raw_in = now_in.contains(&s.fence);
            if raw_in == s.inside {
                s.streak = 0;
                if s.inside
                    && !s.dwell_sent
                    && let Some(d) = cfg.dwell_ms
                    && ts_ms - s.since_ms >= d
                {
                    s.dwell_sent = true;
                    out.push(FenceEvent { fence: s.fence, kind: FenceEventKind::Dwell { dwell_ms: ts_ms - s.since_ms }, at_ms: ts_ms });
                }
                if !s.inside {
                    // A pending entry that did not confirm.
                    self.states.swap_remove(i);
                    continue;
                }
                i += 1;
                continue;
            }
            if s.streak == 0 {
                s.flip_ms = ts_ms;
            }
            s.streak = s.streak.saturating_add(1);
            let deep = || {
                let d = set.get(s.fence).map_or(0.0, |f| f.depth_m(p));
                if raw_in { d >= cfg.margin_m } else { -d >= cfg.margin_m }
            };
            if s.streak >= cfg.confirm_fixes.max(1) || deep() {
                if raw_in {
                    s.inside = true;
                    s.since_ms = s.flip_ms;
                    s.dwell_sent = false;
                    s.streak = 0;
                    out.push(FenceEvent { fence: s.fence, kind: FenceEventKind::Enter, at_ms: s.flip_ms });
                } else {
                    out.push(FenceEvent { fence: s.fence, kind: FenceEventKind::Exit { dwell_ms: s.flip_ms - s.since_ms, removed: false }, at_ms: s.flip_ms });
                    self.states.swap_remove(i);
                    continue;
                }
            }
            i += 1;
        }
        // Fences entered for the first time: start a pending entry (or enter at once).
        for &id in &now_in {
            if self.states.iter().any(|s| s.fence == id) {
                continue;
            }
            let mut s = FenceState { fence: id, inside: false, since_ms: ts_ms, dwell_sent: false, streak: 1, flip_ms: ts_ms };
            let deep = set.get(id).is_some_and(|f| f.depth_m(p) >= cfg.margin_m);
            if cfg.confirm_fixes <= 1 || deep {
                s.inside = true;
                s.streak = 0;
                out.push(FenceEvent { fence: id, kind: FenceEventKind::Enter, at_ms: ts_ms });
            }
            self.states.push(s);
        }
        self.scratch = now_in;
        self.last_ms = Some(ts_ms);
        self.last_pos = Some(p);
        FixOutcome::Applied
    }

    /// The fence was deleted at `at_ms`: closes an open stay with `Exit { removed: true }`. Its
    /// dwell runs to the deletion, or to the last fix when that is a long silence ago.
    pub fn on_fence_removed(&mut self, id: FenceId, at_ms: i64) -> Option<FenceEvent> {
        let i = self.states.iter().position(|s| s.fence == id)?;
        let s = self.states.swap_remove(i);
        let end = match self.last_ms {
            Some(last) if self.long_gap(at_ms) => last,
            _ => at_ms,
        };
        s.inside.then(|| FenceEvent { fence: id, kind: FenceEventKind::Exit { dwell_ms: (end - s.since_ms).max(0), removed: true }, at_ms })
    }

    /// Whether `ts_ms` comes a longer silence than `max_gap_ms` after the last fix.
    fn long_gap(&self, ts_ms: i64) -> bool {
        matches!((self.last_ms, self.config.max_gap_ms), (Some(last), Some(max)) if ts_ms.saturating_sub(last) > max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geo::Intersects;

    #[test]
    fn ring_fast_path_matches_geo_on_corners_edges_and_around() {
        let poly = Polygon::new(
            geo::LineString::from(vec![(-73.60, 45.50), (-73.55, 45.49), (-73.52, 45.53), (-73.56, 45.52), (-73.58, 45.56), (-73.60, 45.50)]),
            vec![],
        );
        let ring = poly.exterior().0.clone();
        let mut pts: Vec<Coord<f64>> = ring.clone();
        for w in ring.windows(2) {
            pts.push(Coord { x: (w[0].x + w[1].x) / 2.0, y: (w[0].y + w[1].y) / 2.0 });
            pts.push(Coord { x: w[0].x, y: w[1].y });
            pts.push(Coord { x: w[1].x, y: w[0].y });
        }
        let mut k = 0u64;
        for _ in 0..2_000 {
            k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (a, b) = ((k >> 11) as f64 / (1u64 << 53) as f64, ((k >> 3) & 0xFFFF) as f64 / 65_536.0);
            pts.push(Coord { x: -73.61 + a * 0.10, y: 45.48 + b * 0.09 });
        }
        for c in pts {
            assert_eq!(ring_contains(c, &ring), poly.intersects(&c), "{c:?}");
        }
        let mut set = FenceSet::new();
        set.insert(1, Fence::polygon(poly.clone()).unwrap(), 0);
        assert!(matches!(set.quick[0], Quick::Ring { .. }), "a simple polygon takes the ring fast path");
        set.remove(1);
        assert!(matches!(set.quick[0], Quick::Boxed(_)), "removal frees the ring");
    }
    use geo::{LineString, polygon};
    use proptest::prelude::*;

    fn ll(lat: f64, lng: f64) -> LatLng {
        LatLng::new(lat, lng).unwrap()
    }

    /// A square of ~1.1 km around (45.5, -73.6) with a square hole in the middle.
    fn square_with_hole() -> Polygon<f64> {
        Polygon::new(
            LineString::from(vec![(-73.61, 45.49), (-73.59, 45.49), (-73.59, 45.51), (-73.61, 45.51), (-73.61, 45.49)]),
            vec![LineString::from(vec![(-73.602, 45.498), (-73.598, 45.498), (-73.598, 45.502), (-73.602, 45.502), (-73.602, 45.498)])],
        )
    }

    #[test]
    fn rejects_bad_fences() {
        assert!(matches!(Fence::multi_polygon(MultiPolygon::new(vec![])), Err(GeoError::EmptyFence)));
        assert!(matches!(Fence::circle(ll(0.0, 0.0), -1.0), Err(GeoError::Radius(_))));
        assert!(matches!(Fence::circle(ll(0.0, 0.0), f64::NAN), Err(GeoError::Radius(_))));
        let bad = polygon![(x: 0.0, y: 0.0), (x: 200.0, y: 0.0), (x: 0.0, y: 1.0)];
        assert!(matches!(Fence::polygon(bad), Err(GeoError::Coord(_))));
    }

    #[test]
    fn border_and_hole() {
        let mut set = FenceSet::new();
        set.insert(1, Fence::polygon(square_with_hole()).unwrap(), 0);
        assert_eq!(set.containing(ll(45.495, -73.605)), vec![1]);
        assert!(set.containing(ll(45.5, -73.6)).is_empty(), "in the hole");
        assert_eq!(set.containing(ll(45.49, -73.60)), vec![1], "on the outer border");
        assert_eq!(set.containing(ll(45.498, -73.60)), vec![1], "on the hole's border");
        assert!(set.containing(ll(45.52, -73.60)).is_empty());
        assert!(set.cover_cells() > 10);
        let f = set.get(1).unwrap();
        // Nearest border: the west edge, 0.005° of longitude away.
        let want = 0.005 * M_PER_DEG * 45.495f64.to_radians().cos();
        assert!((f.depth_m(ll(45.495, -73.605)) - want).abs() < 2.0);
        assert!(f.depth_m(ll(45.52, -73.60)) < -1000.0);
        assert!(set.remove(1).is_some());
        assert!(set.containing(ll(45.495, -73.605)).is_empty());
        assert_eq!(set.cover_cells(), 0);
    }

    #[test]
    fn circles() {
        let mut set = FenceSet::new();
        let c = ll(45.5, -73.6);
        set.insert(9, Fence::circle(c, 80.0).unwrap(), 0);
        set.insert(10, Fence::circle(c, 5_000.0).unwrap(), 0);
        let mut got = set.containing(c);
        got.sort_unstable();
        assert_eq!(got, vec![9, 10]);
        assert_eq!(set.containing(ll(45.5 + 100.0 / M_PER_DEG, -73.6)), vec![10]);
    }

    fn arb_polygon() -> impl Strategy<Value = Polygon<f64>> {
        // Star-shaped polygons (random radius per angle) around Montreal, 3–40 vertices, with
        // an optional hole.
        (3usize..40, 100.0f64..5_000.0, any::<bool>(), any::<u64>()).prop_map(|(n, r, hole, seed)| {
            let mut s = seed | 1;
            let mut rnd = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64
            };
            let (clat, clng) = (45.5f64, -73.6f64);
            let ring = |scale: f64, rnd: &mut dyn FnMut() -> f64| {
                let mut pts: Vec<(f64, f64)> = (0..n)
                    .map(|i| {
                        let a = i as f64 / n as f64 * std::f64::consts::TAU;
                        let rr = r * scale * (0.5 + rnd());
                        (clng + rr * a.cos() / (M_PER_DEG * clat.to_radians().cos()), clat + rr * a.sin() / M_PER_DEG)
                    })
                    .collect();
                pts.push(pts[0]);
                LineString::from(pts)
            };
            let ext = ring(1.0, &mut rnd);
            let holes = if hole { vec![ring(0.2, &mut rnd)] } else { vec![] };
            Polygon::new(ext, holes)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn set_matches_exact_test(polys in prop::collection::vec(arb_polygon(), 1..4), pts in prop::collection::vec((45.43f64..45.57, -73.7f64..-73.5), 200)) {
            let mut set = FenceSet::new();
            for (i, p) in polys.iter().enumerate() {
                set.insert(i as u64, Fence::polygon(p.clone()).unwrap(), 0);
            }
            for (la, ln) in pts {
                let mut got = set.containing(ll(la, ln));
                got.sort_unstable();
                let want: Vec<u64> = polys.iter().enumerate().filter(|(_, p)| p.intersects(&Coord { x: ln, y: la })).map(|(i, _)| i as u64).collect();
                prop_assert_eq!(got, want, "at {} {}", la, ln);
            }
        }

        #[test]
        fn circles_match_haversine(r in 20.0f64..3_000.0, pts in prop::collection::vec((45.45f64..45.55, -73.67f64..-73.53), 300)) {
            let mut set = FenceSet::new();
            let c = ll(45.5, -73.6);
            set.insert(1, Fence::circle(c, r).unwrap(), 0);
            for (la, ln) in pts {
                let p = ll(la, ln);
                prop_assert_eq!(set.containing(p) == vec![1], haversine_m(c, p) <= r);
            }
        }
    }

    fn ring(corners: &[(f64, f64)]) -> Result<Fence, GeoError> {
        let ls: Vec<Coord<f64>> = corners.iter().map(|&(x, y)| Coord { x, y }).collect();
        Fence::polygon(Polygon::new(geo::LineString(ls), Vec::new()))
    }

    /// Shapes that h3o's tiler would trace with gaps (its fill then covers the globe, or
    /// billions of cells near a pole), and rings without area, are refused.
    #[test]
    fn fences_across_the_antimeridian_near_a_pole_or_without_area_are_refused() {
        let refused = [
            // A polar cap written the usual way.
            vec![(-180.0, -90.0), (180.0, -90.0), (180.0, -60.0), (-180.0, -60.0), (-180.0, -90.0)],
            // Fiji, not cut at the antimeridian.
            vec![(179.0, -18.0), (-179.0, -18.0), (-179.0, -16.0), (179.0, -16.0), (179.0, -18.0)],
            // A small ring near the North Pole.
            vec![(-170.0, 89.0), (170.0, 89.0), (170.0, 89.05), (-170.0, 89.05), (-170.0, 89.0)],
            // No area: back and forth, and collinear.
            vec![(0.0, 0.0), (1.0, 0.0), (0.0, 0.0), (1.0, 0.0), (0.0, 0.0)],
            vec![(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (0.0, 0.0)],
        ];
        for r in refused {
            assert!(matches!(ring(&r), Err(GeoError::Ring(_))), "{r:?} was accepted");
        }
        // Fiji cut in two at the antimeridian is fine, and covers only Fiji.
        let east = Polygon::new(geo::LineString(vec![(179.0, -18.0), (180.0, -18.0), (180.0, -16.0), (179.0, -16.0)].into_iter().map(Coord::from).collect()), vec![]);
        let west = Polygon::new(geo::LineString(vec![(-180.0, -18.0), (-179.0, -18.0), (-179.0, -16.0), (-180.0, -16.0)].into_iter().map(Coord::from).collect()), vec![]);
        let mut set = FenceSet::new();
        set.insert(1, Fence::multi_polygon(MultiPolygon::new(vec![east, west])).unwrap(), 0);
        assert_eq!(set.containing(ll(-17.0, 179.5)), vec![1]);
        assert_eq!(set.containing(ll(-17.0, -179.5)), vec![1]);
        assert!(set.containing(ll(45.5, -73.6)).is_empty());
        assert!(set.containing(ll(-17.0, 0.0)).is_empty());
    }

    /// A long thin fence is mostly boundary band: its resolution is chosen for the band too,
    /// so its cover stays near the target instead of growing with its length.
    #[test]
    fn a_long_thin_fence_keeps_a_bounded_cover() {
        let mut set = FenceSet::new();
        let sliver = ring(&[(-89.0, 0.0), (89.0, 0.0), (89.0, 1e-4), (-89.0, 1e-4), (-89.0, 0.0)]).unwrap();
        set.insert(1, sliver, 0);
        let target = FenceSetConfig::default().target_cells;
        assert!(set.cover_cells() <= 8 * target, "{} cells for a target of {target}", set.cover_cells());
        assert_eq!(set.containing(ll(0.00005, 10.0)), vec![1]);
        assert!(set.containing(ll(0.001, 10.0)).is_empty());
    }

    // ---- tracker scenarios ----

    /// The square of the tracker scenarios: lng -73.61..-73.59, lat 45.49..45.51.
    fn square() -> Fence {
        Fence::polygon(polygon![(x: -73.61, y: 45.49), (x: -73.59, y: 45.49), (x: -73.59, y: 45.51), (x: -73.61, y: 45.51)]).unwrap()
    }

    fn one_square() -> FenceSet {
        let mut set = FenceSet::new();
        set.insert(1, square(), 0);
        set
    }

    /// A point `m` metres north of the square's southern border (negative: south, outside).
    fn at_border(m: f64) -> LatLng {
        ll(45.49 + m / M_PER_DEG, -73.60)
    }

    fn kinds(ev: &[FenceEvent]) -> Vec<FenceEventKind> {
        ev.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn jitter_at_border_does_not_flap() {
        let set = one_square();
        let mut t = FenceTracker::new(TrackerConfig::default());
        let mut ev = Vec::new();
        t.on_fix(&set, at_border(-200.0), 0, &mut ev);
        for i in 1..50 {
            let m = if i % 2 == 0 { 8.0 } else { -8.0 };
            t.on_fix(&set, at_border(m), i * 1000, &mut ev);
        }
        assert!(ev.is_empty(), "{ev:?}");
        // A real crossing: three fixes inside, shallow — enter, timed at the first of them.
        for i in 50..53 {
            t.on_fix(&set, at_border(10.0), i * 1000, &mut ev);
        }
        assert_eq!(ev, vec![FenceEvent { fence: 1, kind: FenceEventKind::Enter, at_ms: 50_000 }]);
        ev.clear();
        // Jitter again while inside: no exit.
        for i in 53..79 {
            let m = if i % 2 == 0 { 8.0 } else { -8.0 };
            t.on_fix(&set, at_border(m), i * 1000, &mut ev);
        }
        assert!(ev.is_empty(), "{ev:?}");
        // One deep fix outside exits at once.
        t.on_fix(&set, at_border(-100.0), 80_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Exit { dwell_ms: 30_000, removed: false }]);
    }

    #[test]
    fn deep_entry_and_dwell() {
        let set = one_square();
        let mut t = FenceTracker::new(TrackerConfig { dwell_ms: Some(60_000), ..TrackerConfig::default() });
        let mut ev = Vec::new();
        t.on_fix(&set, at_border(-500.0), 0, &mut ev);
        t.on_fix(&set, at_border(300.0), 10_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Enter]);
        ev.clear();
        t.on_fix(&set, at_border(300.0), 50_000, &mut ev);
        assert!(ev.is_empty());
        t.on_fix(&set, at_border(310.0), 70_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Dwell { dwell_ms: 60_000 }]);
        ev.clear();
        t.on_fix(&set, at_border(320.0), 200_000, &mut ev);
        assert!(ev.is_empty(), "dwell once per stay");
        assert_eq!(t.inside().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_long_silence_is_not_counted_as_time_inside() {
        let set = one_square();
        let mut t = FenceTracker::new(TrackerConfig { dwell_ms: Some(120_000), max_gap_ms: Some(600_000), ..TrackerConfig::default() });
        let mut ev = Vec::new();
        t.on_fix(&set, at_border(-500.0), 0, &mut ev);
        t.on_fix(&set, at_border(300.0), 10_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Enter]);
        ev.clear();
        // 60 s observed inside, then the app is closed for eight hours, still inside.
        t.on_fix(&set, at_border(300.0), 70_000, &mut ev);
        let back = 70_000 + 8 * 3_600_000;
        t.on_fix(&set, at_border(300.0), back, &mut ev);
        assert!(ev.is_empty(), "no dwell of eight hours: {ev:?}");
        // Observed time goes on counting after the gap: 60 s before it, 60 s after.
        t.on_fix(&set, at_border(300.0), back + 60_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Dwell { dwell_ms: 120_000 }]);
        ev.clear();
        // Another long gap, and the courier turns up far outside: the exit is at that fix, and
        // its dwell is what was observed (60 + 60 s, plus the 30 s to the last fix inside).
        t.on_fix(&set, at_border(300.0), back + 90_000, &mut ev);
        let later = back + 90_000 + 3_600_000;
        t.on_fix(&set, at_border(-500.0), later, &mut ev);
        assert_eq!(ev, vec![FenceEvent { fence: 1, kind: FenceEventKind::Exit { dwell_ms: 150_000, removed: false }, at_ms: later }]);
        // A fence drawn during a long silence around where the courier then turns up: its
        // stay starts at that fix, not when the fence was drawn.
        let mut fresh = FenceSet::new();
        let mut t = FenceTracker::new(TrackerConfig { dwell_ms: Some(120_000), max_gap_ms: Some(600_000), ..TrackerConfig::default() });
        ev.clear();
        t.on_fix(&fresh, at_border(300.0), 0, &mut ev);
        fresh.insert(1, square(), 60_000);
        t.on_fix(&fresh, at_border(300.0), 8 * 3_600_000, &mut ev);
        t.on_fix(&fresh, at_border(300.0), 8 * 3_600_000 + 60_000, &mut ev);
        assert!(ev.is_empty(), "no dwell counted from the fence's creation across the gap: {ev:?}");
        t.on_fix(&fresh, at_border(300.0), 8 * 3_600_000 + 120_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Dwell { dwell_ms: 120_000 }]);
        // A fence drawn during a long silence around where the courier was, who turns up
        // outside it: no stay at all (none from the old position, so no exit either).
        let mut old_spot = FenceSet::new();
        let mut u = FenceTracker::new(TrackerConfig { max_gap_ms: Some(600_000), ..TrackerConfig::default() });
        let mut ev2 = Vec::new();
        u.on_fix(&old_spot, at_border(300.0), 0, &mut ev2);
        old_spot.insert(1, square(), 60_000);
        u.on_fix(&old_spot, at_border(-500.0), 3_600_000, &mut ev2);
        assert!(ev2.is_empty() && u.inside().next().is_none(), "{ev2:?}");
        // A fence deleted a long silence after the last fix: the stay ran to that fix.
        ev.clear();
        let e = t.on_fence_removed(1, 8 * 3_600_000 + 120_000 + 5 * 3_600_000).unwrap();
        assert_eq!(e.kind, FenceEventKind::Exit { dwell_ms: 120_000, removed: true });
        // Gaps under the limit count: an hour's stay with a fix every five minutes.
        let mut t = FenceTracker::new(TrackerConfig { dwell_ms: Some(3_000_000), max_gap_ms: Some(600_000), ..TrackerConfig::default() });
        ev.clear();
        t.on_fix(&set, at_border(-500.0), 0, &mut ev);
        for i in 1..=13 {
            t.on_fix(&set, at_border(300.0), i * 300_000, &mut ev);
        }
        assert_eq!(kinds(&ev), vec![FenceEventKind::Enter, FenceEventKind::Dwell { dwell_ms: 3_000_000 }]);
    }

    #[test]
    fn late_fixes_do_not_flap() {
        let set = one_square();
        let mut t = FenceTracker::new(TrackerConfig::default());
        let mut ev = Vec::new();
        t.on_fix(&set, at_border(-500.0), 0, &mut ev);
        t.on_fix(&set, at_border(300.0), 10_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Enter]);
        ev.clear();
        // A buffered fix from before the entry arrives late, outside and deep: ignored.
        assert_eq!(t.on_fix(&set, at_border(-500.0), 5_000, &mut ev), FixOutcome::Late);
        assert_eq!(t.on_fix(&set, at_border(-500.0), 10_000, &mut ev), FixOutcome::Late, "same time is not newer");
        assert!(ev.is_empty());
        assert_eq!(t.inside().collect::<Vec<_>>(), vec![1]);
        assert_eq!(t.on_fix(&set, at_border(300.0), 11_000, &mut ev), FixOutcome::Applied);
        assert!(ev.is_empty());
    }

    #[test]
    fn fence_created_around_parked_courier_is_silent() {
        let mut set = FenceSet::new();
        let mut t = FenceTracker::new(TrackerConfig::default());
        let mut ev = Vec::new();
        let parked = ll(45.5, -73.6);
        t.on_fix(&set, parked, 0, &mut ev);
        set.insert(7, Fence::circle(parked, 300.0).unwrap(), 5_000);
        // Another courier far away drives in after the fence exists: that one is an entry.
        let mut other = FenceTracker::new(TrackerConfig::default());
        other.on_fix(&set, ll(45.6, -73.6), 0, &mut ev);
        for i in 1..5 {
            t.on_fix(&set, parked, 5_000 + i * 1000, &mut ev);
        }
        assert!(ev.is_empty(), "{ev:?}");
        assert_eq!(t.inside().collect::<Vec<_>>(), vec![7]);
        other.on_fix(&set, parked, 9_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Enter]);
        ev.clear();
        // The parked courier's stay counts from the fence's creation.
        t.on_fix(&set, ll(45.6, -73.6), 20_000, &mut ev);
        assert_eq!(kinds(&ev), vec![FenceEventKind::Exit { dwell_ms: 15_000, removed: false }]);
    }

    #[test]
    fn first_fix_inside_is_silent() {
        let set = one_square();
        let mut t = FenceTracker::new(TrackerConfig::default());
        let mut ev = Vec::new();
        t.on_fix(&set, at_border(300.0), 1_000, &mut ev);
        t.on_fix(&set, at_border(300.0), 2_000, &mut ev);
        assert!(ev.is_empty());
        assert_eq!(t.inside().count(), 1);
        // A first fix long after the fence was made (a restart, a shift starting at a hub):
        // the stay starts at that fix, so no dwell fires on it, and the dwell counts from it.
        let mut t = FenceTracker::new(TrackerConfig::default());
        t.on_fix(&set, at_border(300.0), 600_000, &mut ev);
        assert!(ev.is_empty(), "{ev:?}");
        t.on_fix(&set, at_border(300.0), 600_000 + 120_000, &mut ev);
        assert_eq!(ev, vec![FenceEvent { fence: 1, kind: FenceEventKind::Dwell { dwell_ms: 120_000 }, at_ms: 720_000 }]);
    }

    #[test]
    fn removed_fence_closes_the_stay() {
        let mut set = one_square();
        set.insert(2, Fence::circle(at_border(300.0), 100.0).unwrap(), 0);
        let mut t = FenceTracker::new(TrackerConfig::default());
        let mut ev = Vec::new();
        t.on_fix(&set, at_border(-500.0), 0, &mut ev);
        t.on_fix(&set, at_border(300.0), 1_000, &mut ev);
        assert_eq!(ev.len(), 2);
        ev.clear();
        // Told explicitly.
        set.remove(1);
        assert_eq!(t.on_fence_removed(1, 4_000), Some(FenceEvent { fence: 1, kind: FenceEventKind::Exit { dwell_ms: 3_000, removed: true }, at_ms: 4_000 }));
        assert_eq!(t.on_fence_removed(1, 4_000), None);
        // Not told: found at the next fix.
        set.remove(2);
        t.on_fix(&set, at_border(300.0), 6_000, &mut ev);
        assert_eq!(ev, vec![FenceEvent { fence: 2, kind: FenceEventKind::Exit { dwell_ms: 5_000, removed: true }, at_ms: 6_000 }]);
        assert_eq!(t.inside().count(), 0);
    }
}
