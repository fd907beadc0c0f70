//! The API error: every crate error is mapped here, once, to an HTTP status and a code, and
//! rendered as `{"error":{"code":"…","message":"…"}}`. WebSocket errors reuse the same codes.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use hexfleet_actors::FleetError;
use hexfleet_actors::store::StoreError;
use serde::Serialize;

/// An error as clients see it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl ApiError {
    /// The body clients get: `{"error":{"code":"…","message":"…"}}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&ErrorDto { error: ErrorDetail { code: self.code, message: &self.message } }).unwrap_or_default()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The body of every error answer, HTTP and WebSocket alike (`{"error":{"code":"…","message":"…"}}`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDto<'a> {
    pub error: ErrorDetail<'a>,
}

/// What went wrong: a stable code for programs and a sentence for people.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// Stable, snake_case (`bad_id`, `unauthorized`, `not_found`, `store_unavailable`, …).
    #[schema(example = "bad_id")]
    pub code: &'a str,
    /// Human-readable detail; its wording may change.
    pub message: &'a str,
}

/// Seconds a client is asked to wait before it retries a 503 (`Retry-After`, RFC 9110): a
/// store outage or a market changing owner lasts from seconds to a lease (10 s by default).
pub const RETRY_AFTER_S: u32 = 2;

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.insert_header((actix_web::http::header::RETRY_AFTER, RETRY_AFTER_S));
        }
        r.content_type("application/json").body(self.to_json())
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        let msg = e.to_string();
        match e {
            FleetError::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, "not_found", msg),
            FleetError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", msg),
            FleetError::InvalidTransition { .. } => ApiError::new(StatusCode::CONFLICT, "invalid_transition", msg),
            FleetError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", msg),
            FleetError::InProgress(_) => ApiError::new(StatusCode::CONFLICT, "in_progress", msg),
            FleetError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", msg),
            FleetError::OutsideServiceArea => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "outside_service_area", msg),
            FleetError::Store(s) => s.into(),
            FleetError::Timeout(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", msg),
            FleetError::ActorGone(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::Unavailable(_) | StoreError::Backpressure => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", format!("{msg}; retry later"))
            }
            StoreError::Corrupt(_) => ApiError::internal(msg),
            StoreError::Fenced(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "market_moving", format!("{msg}; retry later"))
            }
        }
    }
}

/// Maps actix's JSON and query extractor errors to our shape.
pub fn json_error(err: actix_web::error::JsonPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let e = match &err {
        J::OverflowKnownLength { .. } | J::Overflow { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", err.to_string())
        }
        J::ContentType => ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "expected application/json"),
        _ => ApiError::bad_request("malformed_json", err.to_string()),
    };
    e.into()
}

pub fn query_error(err: actix_web::error::QueryPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::bad_request("invalid_query", err.to_string()).into()
}

pub fn path_error(err: actix_web::error::PathError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::bad_request("invalid_path", err.to_string()).into()
}

/// Requests for a path no route serves: 404 in the error shape, as every other refusal (a
/// method a known path does not serve is a 405, `crate::api::resource`).
pub async fn no_route(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!("no route for {} {}", req.method(), req.path())))
}
