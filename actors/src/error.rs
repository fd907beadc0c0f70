//! The one error enum of the actors crate. The gateway maps each variant to an HTTP status or
//! a WebSocket error code, once.

use crate::domain::OrderState;
use crate::store::StoreError;

/// Errors from fleet operations.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("cannot {action} an order that is {from}")]
    InvalidTransition { action: &'static str, from: &'static str },
    #[error("conflict: {0}")]
    Conflict(String),
    /// An earlier request is doing the same thing (creating that order); retry.
    #[error("in progress: {0}")]
    InProgress(String),
    #[error("not allowed: {0}")]
    Forbidden(String),
    #[error("outside every service area")]
    OutsideServiceArea,
    #[error("durable storage is unavailable")]
    Store(#[from] StoreError),
    #[error("the {0} actor did not answer in time")]
    Timeout(&'static str),
    #[error("the {0} actor is gone")]
    ActorGone(&'static str),
}

impl FleetError {
    pub(crate) fn transition(action: &'static str, from: OrderState) -> Self {
        FleetError::InvalidTransition { action, from: from.as_str() }
    }
}
