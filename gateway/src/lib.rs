//! `hexfleet-gateway`: the edge of hexfleet. It owns HTTP (actix-web), WebSockets (actix-ws),
//! authentication (JWT), the fan-out broker (local sessions and Redis pub/sub between nodes),
//! Prometheus metrics, the static console page and the `hexfleet` binary.
//!
//! Architecture invariant: only this crate knows HTTP (served and, for webhooks and requests
//! forwarded to a market's owner, sent),
//! WebSocket, JWT and Redis. It turns wire
//! messages into domain calls on [`hexfleet_actors::Fleet`] and domain updates into wire
//! messages; every error is mapped to a status or a WebSocket error code once, in [`error`].
//!
//! Components: [`config`] (CLI), [`server`] (assembly, shutdown), [`api`] (REST),
//! [`ws`] (WebSocket sessions), [`ingest`] (the courier ingest port: courier sockets read by
//! tokio-tungstenite on the raw stream), [`broker`] (fan-out), [`relay`] (the broker's Redis pub/sub between nodes), [`auth`], [`dto`] (wire types),
//! [`osmand`] (Traccar/OsmAnd protocol), [`history`] (location history export/erase and the
//! retention purge), [`zones`] (zone CRUD as GeoJSON), [`webhooks`] (subscriptions and the
//! delivery worker: signed POSTs with retries), [`markets`] (market leases between nodes and
//! forwarding to a market's owner), [`error`].

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod dto;
pub mod error;
pub mod history;
pub mod http_limit;
pub mod ingest;
pub mod markets;
pub mod openapi;
pub mod osmand;
pub mod relay;
pub mod server;
pub mod webhooks;
pub mod ws;
pub mod zones;

pub use server::{Running, ServeConfig, start};
