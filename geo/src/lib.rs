//! `hexfleet-geo`: the pure, synchronous spatial engine of hexfleet.
//!
//! It answers "who is near" ([`FleetIndex`], an R-tree), "which H3 cell is this in and who is in
//! that cell" ([`cells`]), "which fence is this in, and did the courier just enter, leave or
//! dwell" ([`fence`]), "how long will it take" ([`eta`]), "in what order to visit the stops"
//! ([`stops`]) and "who takes which order" ([`assign`]).
//!
//! Architecture invariant: no I/O, no async, no actors, no wire types. Everything here is plain
//! functions and data structures that the `actors` crate calls and the benches measure. Time is
//! always passed in (Unix ms or relative seconds), never read from a clock.

pub mod assign;
pub mod cells;
pub mod coord;
pub mod eta;
pub mod fence;
pub mod index;
pub mod stops;

pub use coord::{CoordError, EARTH_RADIUS_M, LatLng, haversine_m};
pub use index::{CourierEntry, CourierKey, FleetIndex};

/// Everything in this crate that can be refused. Core queries do not fail; only building
/// things from outside input (fences, resolutions, saved speed tables) can.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error(transparent)]
    Coord(#[from] CoordError),
    #[error("h3 resolution {0} is outside 0..=15")]
    Resolution(u8),
    #[error("invalid fence ring: {0}")]
    Ring(&'static str),
    #[error("fence has no polygon")]
    EmptyFence,
    #[error("fence radius {0} m must be finite and positive")]
    Radius(f64),
    #[error("speed table line {line}: {reason}")]
    SpeedTable { line: usize, reason: &'static str },
}
