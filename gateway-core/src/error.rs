//! Gateway errors, each rendered in the error shape of the API the client called.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::catalog::ApiShape;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GatewayError {
    #[error("missing or invalid gateway API key")]
    Unauthenticated,
    #[error("this gateway API key is not valid for this endpoint")]
    WrongEndpoint,
    #[error("{0}")]
    BadRequest(String),
    #[error("provider not allowed: {0}")]
    ProviderNotAllowed(String),
    #[error("model unknown: {0}")]
    ModelUnknown(String),
    #[error("custom provider address refused: {0}")]
    EgressRefused(String),
    #[error("credits exhausted: managed requests are denied until credits are added")]
    CreditsExhausted,
    #[error("no provider key available for {0}")]
    NoCredentials(String),
    #[error("upstream error: {message}")]
    Upstream { status: u16, message: String },
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("usage metering is unavailable: managed requests are refused until it recovers")]
    MeteringUnavailable,
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>) -> GatewayError {
        GatewayError::BadRequest(message.into())
    }

    /// Status, stable code, and the provider-style error type.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            GatewayError::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "authentication_error",
            ),
            GatewayError::WrongEndpoint => {
                (StatusCode::FORBIDDEN, "wrong_endpoint", "permission_error")
            }
            GatewayError::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "invalid_request_error",
            ),
            GatewayError::ProviderNotAllowed(_) => (
                StatusCode::BAD_REQUEST,
                "provider_not_allowed",
                "invalid_request_error",
            ),
            GatewayError::ModelUnknown(_) => (
                StatusCode::BAD_REQUEST,
                "model_unknown",
                "invalid_request_error",
            ),
            GatewayError::EgressRefused(_) => {
                (StatusCode::FORBIDDEN, "egress_refused", "permission_error")
            }
            GatewayError::CreditsExhausted => (
                StatusCode::FORBIDDEN,
                "credits_exhausted",
                "permission_error",
            ),
            // A missing key is configuration, not an outage: a 4xx, so SDKs do not retry it.
            GatewayError::NoCredentials(_) => (
                StatusCode::BAD_REQUEST,
                "no_provider_key",
                "invalid_request_error",
            ),
            GatewayError::Upstream { status, .. } if *status == 429 => (
                StatusCode::TOO_MANY_REQUESTS,
                "upstream_rate_limited",
                "rate_limit_error",
            ),
            GatewayError::Upstream { .. } => {
                (StatusCode::BAD_GATEWAY, "upstream_error", "api_error")
            }
            GatewayError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "api_error"),
            // The gateway's own metering is down (its event spool is full): retryable.
            GatewayError::MeteringUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "metering_unavailable",
                "api_error",
            ),
        }
    }

    pub fn into_response_for(self, shape: ApiShape) -> Response {
        let (status, code, kind) = self.parts();
        let message = self.to_string();
        let body = match shape {
            ApiShape::OpenAi => json!({"error": {"message": message, "type": kind, "code": code}}),
            ApiShape::Anthropic => {
                json!({"type": "error", "error": {"type": kind, "message": message, "code": code}})
            }
        };
        (status, axum::Json(body)).into_response()
    }
}
