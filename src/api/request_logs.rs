//! `GET /v1/request-logs`: one row per request attempt, newest first, metadata only.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tally_ingest::query;
use tally_ingest::request_log::{
    self, Cursor, DEFAULT_LIMIT, InvalidFilter, RequestLogPage, RequestLogQuery, StatusFilter,
};
use tally_ledger::CredentialKind;

use super::AppState;
use super::error::ApiError;
use super::extract::ApiQuery;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RequestLogParams {
    account_id: Option<String>,
    api_key_id: Option<String>,
    endpoint_id: Option<String>,
    credential_kind: Option<String>,
    credential_id: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    request_id: Option<String>,
    status: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    cursor: Option<String>,
    limit: Option<i64>,
}

fn bad(e: InvalidFilter) -> ApiError {
    ApiError::bad_request("invalid_query", e.to_string())
}

impl RequestLogParams {
    fn into_query(self) -> Result<RequestLogQuery, ApiError> {
        let credential_kind = match self.credential_kind.as_deref() {
            None => None,
            Some(k) => Some(CredentialKind::parse(k).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    "credential_kind must be attached, byok or managed",
                )
            })?),
        };
        let q = RequestLogQuery {
            account_id: self.account_id,
            api_key_id: self.api_key_id,
            endpoint_id: self.endpoint_id,
            credential_kind,
            credential_id: self.credential_id,
            provider: self.provider,
            model: self.model,
            request_id: self.request_id,
            status: self
                .status
                .as_deref()
                .map(StatusFilter::parse)
                .transpose()
                .map_err(bad)?,
            from: self.from,
            to: self.to,
            cursor: self
                .cursor
                .as_deref()
                .map(Cursor::parse)
                .transpose()
                .map_err(bad)?,
            limit: self.limit.unwrap_or(DEFAULT_LIMIT),
        };
        q.validate().map_err(bad)?;
        Ok(q)
    }
}

pub(super) async fn list(
    State(s): State<AppState>,
    ApiQuery(p): ApiQuery<RequestLogParams>,
) -> Result<Json<RequestLogPage>, ApiError> {
    let q = p.into_query()?;
    if let Some(account_id) = &q.account_id {
        // An unknown account is a 404, as on the other account-scoped reads, not an empty page.
        query::account_state(s.store.pool(), account_id).await?;
    }
    Ok(Json(request_log::list(s.store.pool(), &q).await?))
}
