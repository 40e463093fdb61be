//! The gateway's errors, mapped once to HTTP status, gRPC code and metric
//! label: the HTTP and gRPC faces and the request counter all read
//! [`ServeError::kind`].

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
    /// The client did not send the whole body within `body_timeout`.
    #[error("body: not received within {} ms", .0.as_millis())]
    BodyTimeout(std::time::Duration),
    /// Well-formed but not allowed: a click token that does not verify.
    #[error("{0}")]
    Forbidden(String),
    /// Already done: a click replayed for an impression already clicked.
    #[error("{0}")]
    AlreadyRecorded(String),
    /// No API key, or one that is not configured.
    #[error("{0}")]
    Unauthenticated(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The publisher's rate limit is spent.
    #[error("rate limit of publisher {publisher:?} reached; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// The publisher.
        publisher: String,
        /// Until a request would be admitted.
        retry_after: std::time::Duration,
    },
}

impl From<adserve_features::request::FieldError> for ServeError {
    fn from(e: adserve_features::request::FieldError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

/// The closed set of outcomes of a gateway request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (a fill or a no-fill).
    Ok,
    /// Refused: malformed input.
    InvalidArgument,
    /// Refused: body over the limit.
    PayloadTooLarge,
    /// Refused: the body was not received in time (a slow or stalled client).
    RequestTimeout,
    /// Failed: a required dependency is down.
    Unavailable,
    /// Refused: not allowed (a forged, expired or future click token).
    Forbidden,
    /// Refused: already recorded (a replayed click).
    AlreadyRecorded,
    /// Refused: no valid API key.
    Unauthenticated,
    /// Refused: the publisher's rate limit.
    RateLimited,
    /// Refused: what it names does not exist.
    NotFound,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 10] = [
        Self::Ok,
        Self::InvalidArgument,
        Self::PayloadTooLarge,
        Self::RequestTimeout,
        Self::Unavailable,
        Self::Forbidden,
        Self::AlreadyRecorded,
        Self::Unauthenticated,
        Self::RateLimited,
        Self::NotFound,
    ];

    /// The `status` label of `adserve_gateway_requests_total`, and the
    /// `error.code` of a JSON error body.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::InvalidArgument => "invalid_argument",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::Unavailable => "unavailable",
            Self::Forbidden => "forbidden",
            Self::AlreadyRecorded => "already_recorded",
            Self::Unauthenticated => "unauthenticated",
            Self::RateLimited => "rate_limited",
            Self::NotFound => "not_found",
        }
    }

    /// The HTTP status.
    pub fn http_status(self) -> StatusCode {
        match self {
            Self::Ok => StatusCode::OK,
            Self::InvalidArgument => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::AlreadyRecorded => StatusCode::CONFLICT,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound => StatusCode::NOT_FOUND,
        }
    }

    /// The gRPC code.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::Ok => tonic::Code::Ok,
            Self::InvalidArgument | Self::PayloadTooLarge => tonic::Code::InvalidArgument,
            Self::RequestTimeout => tonic::Code::DeadlineExceeded,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Forbidden => tonic::Code::PermissionDenied,
            Self::AlreadyRecorded => tonic::Code::AlreadyExists,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::RateLimited => tonic::Code::ResourceExhausted,
            Self::NotFound => tonic::Code::NotFound,
        }
    }
}

impl ServeError {
    /// What kind of failure this is.
    pub fn kind(&self) -> Outcome {
        match self {
            Self::InvalidArgument(_) => Outcome::InvalidArgument,
            Self::Unavailable(_) => Outcome::Unavailable,
            Self::TooLarge(_) => Outcome::PayloadTooLarge,
            Self::BodyTimeout(_) => Outcome::RequestTimeout,
            Self::Forbidden(_) => Outcome::Forbidden,
            Self::AlreadyRecorded(_) => Outcome::AlreadyRecorded,
            Self::Unauthenticated(_) => Outcome::Unauthenticated,
            Self::RateLimited { .. } => Outcome::RateLimited,
            Self::NotFound(_) => Outcome::NotFound,
        }
    }
}

/// Which face a request came through (`api` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// HTTP/JSON.
    Http,
    /// gRPC.
    Grpc,
}

/// Counts one request in `adserve_gateway_requests_total{api,route,status}`.
pub fn record<T>(api: Api, route: &'static str, result: &Result<T, ServeError>) {
    let status = result.as_ref().map_or_else(ServeError::kind, |_| Outcome::Ok).label();
    let api = match api {
        Api::Http => "http",
        Api::Grpc => "grpc",
    };
    metrics::counter!("adserve_gateway_requests_total", "api" => api, "route" => route, "status" => status)
        .increment(1);
}

impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> Self {
        tonic::Status::new(e.kind().grpc_code(), e.to_string())
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> axum::response::Response {
        let kind = self.kind();
        let body = serde_json::json!({ "error": { "code": kind.label(), "message": self.to_string() } });
        let mut response = (kind.http_status(), Json(body)).into_response();
        if let Self::RateLimited { retry_after, .. } = &self {
            // Whole seconds, rounded up: never earlier than the bucket refills.
            let seconds = retry_after.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = axum::http::HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, value);
            }
        }
        if let Self::Unauthenticated(_) = &self {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_the_same_way_on_both_faces() {
        for e in
            [ServeError::InvalidArgument("x: y".into()), ServeError::Unavailable("z".into()), ServeError::TooLarge(9)]
        {
            let kind = e.kind();
            let message = e.to_string();
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), kind.grpc_code());
            assert_eq!(status.message(), message);
            assert!(kind.http_status().is_client_error() || kind.http_status().is_server_error());
        }
        assert_eq!(Outcome::ALL.iter().filter(|o| o.http_status().is_success()).count(), 1);
    }
}
