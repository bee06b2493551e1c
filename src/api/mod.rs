//! The ledger role's HTTP API (JSON). Every error has the shape
//! `{"error":{"code":"...","message":"..."}}`; see `openapi.yaml` for the whole contract.

pub mod alerts;
pub mod error;
pub mod exports;
pub mod extract;
pub mod request_logs;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tally_ingest::query::{self, Granularity, UsageDim, UsageQuery};
use tally_ingest::{BatchMode, BatchReport, Idempotency, Store};
use tally_ledger::event::{
    AccountOpened, CreditsGranted, CreditsPurchased, LotVoided, validate_id,
};
use tally_ledger::lot::CREDIT_AMOUNT_PLACES;
use tally_ledger::{DomainError, Event, EventBody, Money, PriceVersion};
use uuid::Uuid;

use crate::clock::Clock;
use error::ApiError;
use extract::{ApiJson, ApiPath, ApiQuery};

/// The OpenAPI document of this API, kept in the repository and served as is.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// Idempotency keys are opaque to us but bounded.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Default priority of promotional grants: ahead of purchases (100), so gifts burn first.
pub const DEFAULT_GRANT_PRIORITY: i32 = 50;

/// Names ids derived from idempotency keys, so a retried command produces the same event id and
/// lot id, and the event log itself absorbs the retry.
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x2b1f_6d0e_9c3a_4e57_8f21_d4c6_a9e0_5b73);

#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
}

pub fn router(state: AppState) -> Router {
    tally_gateway_core::telemetry::init();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.yaml", get(openapi))
        .route("/metrics", get(metrics))
        .route("/v1/accounts", post(create_account))
        .route("/v1/accounts/{account_id}", get(get_account))
        .route("/v1/accounts/{account_id}/purchases", post(purchase))
        .route("/v1/accounts/{account_id}/grants", post(grant))
        .route("/v1/accounts/{account_id}/lots", get(list_lots))
        .route(
            "/v1/accounts/{account_id}/lots/{lot_id}/void",
            post(void_lot),
        )
        .route("/v1/accounts/{account_id}/balance", get(balance))
        .route("/v1/accounts/{account_id}/ledger", get(ledger))
        .route(
            "/v1/accounts/{account_id}/statements/{period}",
            get(exports::account_statement),
        )
        .route("/v1/exports/platform", get(exports::platform))
        .route("/v1/usage", get(usage))
        .route("/v1/request-logs", get(request_logs::list))
        .route("/v1/alerts", get(alerts::list))
        .route("/v1/enforcement/{account_id}", get(enforcement))
        .route("/v1/events", post(post_events))
        .route("/v1/events/conflicts", get(list_conflicts))
        .route("/v1/prices", get(list_prices).post(publish_prices))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::Store(tally_ingest::StoreError::NotFound("route".to_string()))
}

async fn healthz(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    sqlx::query("select 1")
        .execute(s.store.pool())
        .await
        .map_err(tally_ingest::StoreError::from)?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

/// Prometheus text exposition of every metric of this process: all roles register in the one
/// default registry, so any listener shows them all.
pub async fn metrics() -> axum::response::Response {
    match prometheus::TextEncoder::new().encode_to_string(&prometheus::gather()) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}

/// A dollar amount as sent by a client: a decimal string or an integer; checked by the domain.
#[derive(Debug, Clone, Copy)]
pub struct AmountInput(Decimal);

impl<'de> Deserialize<'de> for AmountInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        tally_ledger::money::deserialize_decimal(d).map(AmountInput)
    }
}

impl AmountInput {
    fn credit_amount(self) -> Result<Money, DomainError> {
        if self.0 <= Decimal::ZERO {
            return Err(DomainError::AmountNotPositive);
        }
        Money::from_decimal_exact(self.0, CREDIT_AMOUNT_PLACES)
    }
}

fn idempotency(
    headers: &HeaderMap,
    scope: String,
    body: &impl Serialize,
) -> Result<Option<Idempotency>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_LEN)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
            )
        })?;
    let canonical = serde_json::to_vec(body)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))?;
    let mut h = Sha256::new();
    h.update(scope.as_bytes());
    h.update([0]);
    h.update(&canonical);
    Ok(Some(Idempotency {
        scope,
        key: key.to_string(),
        request_hash: h.finalize().to_vec(),
    }))
}

fn derived_id(idem: Option<&Idempotency>, what: &str) -> Uuid {
    match idem {
        Some(i) => Uuid::new_v5(
            &COMMAND_NAMESPACE,
            format!("{what}\u{0}{}\u{0}{}", i.scope, i.key).as_bytes(),
        ),
        None => Uuid::new_v4(),
    }
}

fn check_account_id(id: &str) -> Result<(), ApiError> {
    validate_id("account_id", id).map_err(ApiError::from)
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    #[serde(default)]
    account_id: Option<String>,
    name: String,
    #[serde(default, skip_serializing)]
    low_balance_threshold_usd: Option<AmountInput>,
}

async fn create_account(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CreateAccount>,
) -> Result<(StatusCode, Json<query::AccountView>), ApiError> {
    let account_id = req
        .account_id
        .clone()
        .unwrap_or_else(|| format!("acct_{}", Uuid::new_v4().simple()));
    check_account_id(&account_id)?;
    let threshold = match req.low_balance_threshold_usd {
        None => Money::ZERO,
        Some(AmountInput(d)) if d < Decimal::ZERO => {
            return Err(
                DomainError::invalid("low_balance_threshold_usd", "must not be negative").into(),
            );
        }
        Some(AmountInput(d)) => Money::from_decimal_exact(d, CREDIT_AMOUNT_PLACES)?,
    };
    let event = Event {
        event_id: Uuid::new_v4(),
        occurred_at: s.clock.now(),
        account_id: account_id.clone(),
        body: EventBody::AccountOpened(AccountOpened {
            name: req.name,
            low_balance_threshold_usd: threshold,
        }),
    };
    let report = ingest_one(&s, event).await?;
    let state = report.states.get(&account_id).ok_or_else(|| {
        tally_ingest::StoreError::Corrupt("opened account missing from batch".into())
    })?;
    Ok((StatusCode::CREATED, Json(query::AccountView::from(state))))
}

async fn ingest_one(s: &AppState, event: Event) -> Result<BatchReport, ApiError> {
    let report = s
        .store
        .ingest(
            std::slice::from_ref(&event),
            BatchMode::AllOrNothing,
            s.clock.now(),
        )
        .await?;
    Ok(report)
}

#[derive(Serialize)]
struct AccountResponse {
    #[serde(flatten)]
    account: query::AccountView,
    balance_usd: Money,
    debt_usd: Money,
}

async fn get_account(
    State(s): State<AppState>,
    ApiPath(account_id): ApiPath<String>,
) -> Result<Json<AccountResponse>, ApiError> {
    check_account_id(&account_id)?;
    let state = query::account_state(s.store.pool(), &account_id).await?;
    let remaining = state.remaining()?;
    Ok(Json(AccountResponse {
        account: query::AccountView::from(&state),
        balance_usd: remaining.checked_sub(state.debt)?,
        debt_usd: state.debt,
    }))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PurchaseRequest {
    #[serde(serialize_with = "ser_amount")]
    amount_usd: AmountInput,
    #[serde(default)]
    payment_reference: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GrantRequest {
    #[serde(serialize_with = "ser_amount")]
    amount_usd: AmountInput,
    expires_at: DateTime<Utc>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    reason: Option<String>,
}

fn ser_amount<S: serde::Serializer>(a: &AmountInput, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&a.0.normalize().to_string())
}

/// A new lot and the balance after it.
fn lot_response(report: &BatchReport, account_id: &str, lot_id: Uuid) -> (u16, serde_json::Value) {
    let Some(state) = report.states.get(account_id) else {
        return (
            500,
            serde_json::json!({"error": {"code": "internal", "message": "lot missing"}}),
        );
    };
    let lot = state
        .lots
        .iter()
        .find(|l| l.lot_id == lot_id)
        .map(query::LotView::from);
    let balance = state
        .remaining()
        .and_then(|r| r.checked_sub(state.debt))
        .unwrap_or(Money::ZERO);
    (
        201,
        serde_json::json!({
            "lot": lot,
            "balance_usd": balance,
            "debt_usd": state.debt,
        }),
    )
}

async fn run_lot_command(
    s: &AppState,
    headers: &HeaderMap,
    account_id: String,
    what: &str,
    request: &impl Serialize,
    body: impl FnOnce(Uuid) -> EventBody,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let idem = idempotency(headers, format!("{what}:{account_id}"), request)?;
    let lot_id = derived_id(idem.as_ref(), "lot");
    let event = Event {
        event_id: derived_id(idem.as_ref(), "event"),
        occurred_at: s.clock.now(),
        account_id: account_id.clone(),
        body: body(lot_id),
    };
    let (_, resp) = s
        .store
        .ingest_with(
            std::slice::from_ref(&event),
            BatchMode::AllOrNothing,
            s.clock.now(),
            idem.as_ref(),
            |r| lot_response(r, &account_id, lot_id),
        )
        .await?;
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK);
    Ok((status, Json(resp.body)))
}

async fn purchase(
    State(s): State<AppState>,
    ApiPath(account_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<PurchaseRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    check_account_id(&account_id)?;
    let amount = req.amount_usd.credit_amount()?;
    tally_ledger::lot::validate_purchase_amount(amount)?;
    let reference = req.payment_reference.clone();
    run_lot_command(&s, &headers, account_id, "purchase", &req, |lot_id| {
        EventBody::CreditsPurchased(CreditsPurchased {
            lot_id,
            amount_usd: amount,
            payment_reference: reference,
        })
    })
    .await
}

async fn grant(
    State(s): State<AppState>,
    ApiPath(account_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<GrantRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    check_account_id(&account_id)?;
    let amount = req.amount_usd.credit_amount()?;
    let (expires_at, priority, reason) = (
        req.expires_at,
        req.priority.unwrap_or(DEFAULT_GRANT_PRIORITY),
        req.reason.clone().unwrap_or_default(),
    );
    run_lot_command(&s, &headers, account_id, "grant", &req, |lot_id| {
        EventBody::CreditsGranted(CreditsGranted {
            lot_id,
            amount_usd: amount,
            expires_at,
            priority,
            reason,
        })
    })
    .await
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VoidRequest {
    #[serde(default)]
    reason: Option<String>,
}

async fn void_lot(
    State(s): State<AppState>,
    ApiPath((account_id, lot_id)): ApiPath<(String, Uuid)>,
    ApiJson(req): ApiJson<VoidRequest>,
) -> Result<Json<query::LotView>, ApiError> {
    check_account_id(&account_id)?;
    let event = Event {
        event_id: Uuid::new_v4(),
        occurred_at: s.clock.now(),
        account_id: account_id.clone(),
        body: EventBody::LotVoided(LotVoided {
            lot_id,
            reason: req.reason.unwrap_or_default(),
        }),
    };
    let report = ingest_one(&s, event).await?;
    let lot = report
        .states
        .get(&account_id)
        .and_then(|st| st.lots.iter().find(|l| l.lot_id == lot_id))
        .map(query::LotView::from)
        .ok_or_else(|| tally_ingest::StoreError::Corrupt("voided lot missing from batch".into()))?;
    Ok(Json(lot))
}

async fn list_lots(
    State(s): State<AppState>,
    ApiPath(account_id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_account_id(&account_id)?;
    query::account_state(s.store.pool(), &account_id).await?;
    let lots = query::lots(s.store.pool(), &account_id).await?;
    Ok(Json(serde_json::json!({ "lots": lots })))
}

async fn balance(
    State(s): State<AppState>,
    ApiPath(account_id): ApiPath<String>,
) -> Result<Json<query::BalanceView>, ApiError> {
    check_account_id(&account_id)?;
    let state = query::account_state(s.store.pool(), &account_id).await?;
    Ok(Json(query::balance_view(&state, s.clock.now())?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerParams {
    after: Option<String>,
    limit: Option<i64>,
}

async fn ledger(
    State(s): State<AppState>,
    ApiPath(account_id): ApiPath<String>,
    ApiQuery(p): ApiQuery<LedgerParams>,
) -> Result<Json<query::EntryPage>, ApiError> {
    check_account_id(&account_id)?;
    query::account_state(s.store.pool(), &account_id).await?;
    let after =
        match p.after.as_deref() {
            None => None,
            Some(c) => Some(query::parse_cursor(c).ok_or_else(|| {
                ApiError::bad_request("invalid_query", "after: not a ledger cursor")
            })?),
        };
    let limit = p.limit.unwrap_or(100);
    if !(1..=query::MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {}", query::MAX_PAGE),
        ));
    }
    Ok(Json(
        query::ledger_entries(s.store.pool(), &account_id, after, limit).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    account_id: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    group_by: Option<String>,
    granularity: Option<String>,
    api_key_id: Option<String>,
    endpoint_id: Option<String>,
    credential_id: Option<String>,
    credential_kind: Option<String>,
    provider: Option<String>,
    model: Option<String>,
}

async fn usage(
    State(s): State<AppState>,
    ApiQuery(p): ApiQuery<UsageParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_account_id(&p.account_id)?;
    let mut group_by = Vec::new();
    for part in p
        .group_by
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|x| !x.trim().is_empty())
    {
        let dim = UsageDim::parse(part).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!(
                    "group_by: unknown dimension '{part}'; use any of {}",
                    UsageDim::ALL.map(UsageDim::column).join(", ")
                ),
            )
        })?;
        if !group_by.contains(&dim) {
            group_by.push(dim);
        }
    }
    let granularity = match p.granularity.as_deref() {
        None => None,
        Some(g) => Some(Granularity::parse(g).ok_or_else(|| {
            ApiError::bad_request("invalid_query", "granularity must be hour, day or month")
        })?),
    };
    if let Some(kind) = p.credential_kind.as_deref()
        && tally_ledger::CredentialKind::parse(kind).is_none()
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "credential_kind must be attached, byok or managed",
        ));
    }
    let filters: Vec<(UsageDim, String)> = [
        (UsageDim::ApiKey, p.api_key_id),
        (UsageDim::Endpoint, p.endpoint_id),
        (UsageDim::Credential, p.credential_id),
        (UsageDim::CredentialKind, p.credential_kind),
        (UsageDim::Provider, p.provider),
        (UsageDim::Model, p.model),
    ]
    .into_iter()
    .filter_map(|(d, v)| v.map(|v| (d, v)))
    .collect();
    let q = UsageQuery {
        account_id: p.account_id,
        from: p.from,
        to: p.to,
        group_by,
        granularity,
        filters,
    };
    q.validate()?;
    query::account_state(s.store.pool(), &q.account_id).await?;
    let rows = query::usage(s.store.pool(), &q).await?;
    Ok(Json(serde_json::json!({
        "account_id": q.account_id,
        "from": q.from,
        "to": q.to,
        "rows": rows,
    })))
}

async fn enforcement(
    State(s): State<AppState>,
    ApiPath(account_id): ApiPath<String>,
) -> Result<Json<tally_ledger::Decision>, ApiError> {
    check_account_id(&account_id)?;
    Ok(Json(
        query::decision(s.store.pool(), &account_id, s.clock.now()).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBatch {
    events: Vec<Event>,
}

#[derive(Serialize)]
struct EventBatchResult {
    applied: usize,
    duplicates: Vec<Uuid>,
    conflicts: Vec<Uuid>,
}

async fn post_events(
    State(s): State<AppState>,
    ApiJson(batch): ApiJson<EventBatch>,
) -> Result<Json<EventBatchResult>, ApiError> {
    if batch.events.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "events must not be empty",
        ));
    }
    let report = s
        .store
        .ingest(&batch.events, BatchMode::AllOrNothing, s.clock.now())
        .await?;
    Ok(Json(EventBatchResult {
        applied: report.applied.len(),
        duplicates: report.duplicates,
        conflicts: report.conflicts,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConflictParams {
    limit: Option<i64>,
}

async fn list_conflicts(
    State(s): State<AppState>,
    ApiQuery(p): ApiQuery<ConflictParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = query::conflicts(s.store.pool(), p.limit.unwrap_or(100)).await?;
    Ok(Json(serde_json::json!({ "conflicts": rows })))
}

async fn list_prices(State(s): State<AppState>) -> Json<serde_json::Value> {
    let book = s.store.prices();
    Json(serde_json::json!({ "versions": book.versions() }))
}

async fn publish_prices(
    State(s): State<AppState>,
    ApiJson(v): ApiJson<PriceVersion>,
) -> Result<(StatusCode, Json<PriceVersion>), ApiError> {
    s.store
        .publish_price_version(v.clone(), s.clock.now())
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}
