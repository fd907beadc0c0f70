//! `hexfleet-sim`: a simulated fleet over real sockets, and the load generator.
//!
//! It speaks only the wire protocol (repo `ARCHITECTURE.md`, "Wire protocol") and knows nothing
//! of the server's crates, so it tests the server the way real clients would.
//!
//! Components:
//! - [`demo`]: couriers + Poisson order demand + customers watching, for `hexfleet demo`
//!   ([`run_demo`], [`DemoConfig`]).
//! - [`courier`]: one simulated courier (movement, offers, pickup and drop-off) over a socket.
//! - [`load`]: the load generator: many sockets, a target GPS rate, watcher latency, server
//!   memory, and the same stream written to Redis for comparison.
//! - [`trace`]: GPS trace parsers (CSV, GPX, Denver CSV) and replay as a courier.
//! - [`movement`], [`demand`], [`geomath`]: the models, pure and seeded.
//! - [`protocol`], [`token`], [`net`]: wire messages, JWT minting, sockets and a tiny HTTP client.
//!
//! Architecture invariant: the simulator connects only to loopback addresses, and every loop
//! it runs ends by itself (bounded in count or time) or on its shutdown token.

pub mod courier;
pub mod demand;
pub mod demo;
pub mod geomath;
pub mod load;
pub mod movement;
pub mod net;
pub mod protocol;
pub mod replay;
pub mod token;
pub mod trace;

pub use demo::{run_demo, DemoConfig};
pub use tokio_util::sync::CancellationToken;

/// A Berlin-sized city box around central Berlin: `[min_lng, min_lat, max_lng, max_lat]`
/// (about 20 km × 16 km).
pub const DEFAULT_BBOX: [f64; 4] = [13.25, 52.44, 13.55, 52.58];

/// The secret the simulator uses when none is given (matches nothing in production).
pub const DEFAULT_JWT_SECRET: &str = "hexfleet-dev-secret";

/// Now, Unix milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
