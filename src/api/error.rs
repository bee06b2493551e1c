//! The one mapping from every error to HTTP: a status, a stable code, a message safe to show.
//! Internal details are logged once here and never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tally_ingest::StoreError;
use tally_ledger::DomainError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: String,
}

pub fn domain_status(e: &DomainError) -> (StatusCode, &'static str) {
    match e {
        DomainError::AmountOverflow => (StatusCode::BAD_REQUEST, "amount_too_large"),
        DomainError::AmountTooPrecise { .. } => (StatusCode::BAD_REQUEST, "amount_too_precise"),
        DomainError::AmountNotPositive => (StatusCode::BAD_REQUEST, "amount_not_positive"),
        DomainError::PurchaseBelowMinimum => (StatusCode::BAD_REQUEST, "purchase_below_minimum"),
        DomainError::AccountExists(_) => (StatusCode::CONFLICT, "account_exists"),
        DomainError::UnknownAccount(_) => (StatusCode::NOT_FOUND, "account_not_found"),
        DomainError::UnknownLot(_) => (StatusCode::NOT_FOUND, "lot_not_found"),
        DomainError::DuplicateLot(_) => (StatusCode::CONFLICT, "lot_exists"),
        DomainError::LotClosed(_) => (StatusCode::CONFLICT, "lot_closed"),
        DomainError::ExpiryTooEarly { .. } => (StatusCode::BAD_REQUEST, "expiry_too_early"),
        DomainError::ExpiryNotAfterGrant => (StatusCode::BAD_REQUEST, "invalid_expiry"),
        DomainError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
    }
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            ApiError::BadRequest { code, message } => {
                (StatusCode::BAD_REQUEST, code, message.clone())
            }
            ApiError::UnsupportedMediaType { message } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                message.clone(),
            ),
            ApiError::Domain(e) => {
                let (s, c) = domain_status(e);
                (s, c, e.to_string())
            }
            ApiError::Store(StoreError::Domain(e)) => {
                let (s, c) = domain_status(e);
                (s, c, e.to_string())
            }
            ApiError::Store(StoreError::Rejected {
                index,
                event_id,
                error,
            }) => {
                let (s, c) = domain_status(error);
                (
                    s,
                    c,
                    format!(
                        "events[{index}] ({event_id}): {error}; no event of the batch was applied"
                    ),
                )
            }
            ApiError::Store(StoreError::IdempotencyMismatch) => (
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request".to_string(),
            ),
            ApiError::Store(StoreError::NotFound(what)) => {
                let code = if what.starts_with("account") {
                    "account_not_found"
                } else {
                    "not_found"
                };
                (
                    StatusCode::NOT_FOUND,
                    code,
                    format!("{what} does not exist"),
                )
            }
            ApiError::Store(StoreError::Database(e)) if is_unavailable(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; retry later".to_string(),
            ),
            ApiError::Store(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; it has been logged".to_string(),
            ),
        }
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = %self, code, "request failed");
        } else {
            tracing::debug!(error = %self, code, "request refused");
        }
        (
            status,
            Json(Body {
                error: Detail { code, message },
            }),
        )
            .into_response()
    }
}
