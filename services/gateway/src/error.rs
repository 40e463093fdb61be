//! The gateway's errors, mapped once to HTTP and gRPC status codes.

use axum::{Json, http::StatusCode, response::IntoResponse};

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// A dependency without which nothing can be served is down.
    #[error("{0}")]
    Unavailable(String),
    /// The request body is larger than `max_body_bytes`.
    #[error("body: larger than the {0}-byte limit")]
    TooLarge(usize),
}

impl ServeError {
    fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "invalid_argument",
            Self::Unavailable(_) => "unavailable",
            Self::TooLarge(_) => "payload_too_large",
        }
    }
}

impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ServeError::Unavailable(m) => tonic::Status::unavailable(m),
            e @ ServeError::TooLarge(_) => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> axum::response::Response {
        let status = match self {
            Self::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
        let body = serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } });
        (status, Json(body)).into_response()
    }
}
