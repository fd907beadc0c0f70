//! Domain and actors of hexfleet: couriers, orders, zones and dispatch as `ractor` actors.
//!
//! This crate owns the live state of the fleet and the rules of the order lifecycle. It talks
//! to durable storage only through the [`store::Store`] trait and to watchers only through the
//! [`publish::Publisher`] trait; it knows nothing of HTTP, WebSockets, Redis or SQL.
//!
//! Entry point: [`fleet::Fleet::start`]. See `fleet.rs` for the supervision tree.

pub mod clock;
pub mod courier;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod fleet;
mod matching;
pub mod order;
pub mod positions;
pub mod publish;
mod routing;
pub mod speeds;
pub mod store;
pub mod zone;

pub use error::FleetError;
pub use fleet::{Fleet, FleetConfig, FleetDeps};
