//! `GET /v1/alerts`: the alert outbox, newest first, with each alert's delivery state.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use tally_ingest::query;
use tally_ledger::event::validate_id;

use super::AppState;
use super::error::ApiError;
use super::extract::ApiQuery;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertParams {
    account_id: Option<String>,
    limit: Option<i64>,
}

pub(super) async fn list(
    State(s): State<AppState>,
    ApiQuery(p): ApiQuery<AlertParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_LIMIT}"),
        ));
    }
    if let Some(account_id) = &p.account_id {
        validate_id("account_id", account_id)
            .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
        query::account_state(s.store.pool(), account_id).await?;
    }
    let alerts = crate::alerts::list(s.store.pool(), p.account_id.as_deref(), limit).await?;
    Ok(Json(serde_json::json!({ "alerts": alerts })))
}
