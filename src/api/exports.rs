//! Finance exports: `GET /v1/accounts/{account_id}/statements/{period}` and
//! `GET /v1/exports/platform`, as JSON or CSV. The figures come from
//! [`tally_ingest::statement`] (ledger lines folded by [`tally_ledger::statement`]); this module
//! only checks the request and renders. `tally export` renders through the same functions.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use tally_ingest::StoreError;
use tally_ingest::statement::{self, MAX_EXPORT_MONTHS};
use tally_ledger::Money;
use tally_ledger::statement::{Movements, Period, PlatformReport, Position, Statement};

use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::{AppState, check_account_id};

/// How an export is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// JSON, money as decimal strings (the API's default).
    Json,
    /// CSV (RFC 4180), money as plain decimals (the CLI's default).
    Csv,
}

impl ExportFormat {
    pub fn parse(s: &str) -> Option<ExportFormat> {
        match s {
            "json" => Some(ExportFormat::Json),
            "csv" => Some(ExportFormat::Csv),
            _ => None,
        }
    }
}

/// Rendering failed; with in-memory writers this means a bug, never bad input.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("csv: {0}")]
    Csv(#[from] csv::Error),
    #[error("csv: {0}")]
    CsvFlush(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<RenderError> for ApiError {
    fn from(e: RenderError) -> ApiError {
        ApiError::Store(StoreError::Corrupt(e.to_string()))
    }
}

/// Checks a month range of the platform export.
pub fn check_range(from: Period, to: Period) -> Result<(), String> {
    match from.months_until(to) {
        0 => Err(format!("from ({from}) must not be after to ({to})")),
        n if n > MAX_EXPORT_MONTHS => Err(format!(
            "a range covers at most {MAX_EXPORT_MONTHS} months; {from}..{to} is {n}"
        )),
        _ => Ok(()),
    }
}

fn format_param(format: Option<&str>) -> Result<ExportFormat, ApiError> {
    match format {
        None => Ok(ExportFormat::Json),
        Some(f) => ExportFormat::parse(f)
            .ok_or_else(|| ApiError::bad_request("invalid_query", "format must be json or csv")),
    }
}

fn period_param(code: &'static str, name: &str, value: &str) -> Result<Period, ApiError> {
    value.parse::<Period>().map_err(|_| {
        ApiError::bad_request(
            code,
            format!("{name}: '{value}' is not a calendar month; use YYYY-MM (UTC), e.g. 2026-10"),
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatementParams {
    format: Option<String>,
}

pub(super) async fn account_statement(
    State(s): State<AppState>,
    ApiPath((account_id, period)): ApiPath<(String, String)>,
    ApiQuery(p): ApiQuery<StatementParams>,
) -> Result<Response, ApiError> {
    check_account_id(&account_id)?;
    let period = period_param("invalid_path", "period", &period)?;
    let format = format_param(p.format.as_deref())?;
    let st = statement::account_statement(s.store.pool(), &account_id, period).await?;
    let body = render_statement(&st, format)?;
    Ok(respond(
        format,
        &format!("statement-{}-{period}", file_safe(&account_id)),
        body,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlatformParams {
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

pub(super) async fn platform(
    State(s): State<AppState>,
    ApiQuery(p): ApiQuery<PlatformParams>,
) -> Result<Response, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_query", m);
    let (from, to) = match (p.period.as_deref(), p.from.as_deref(), p.to.as_deref()) {
        (Some(period), None, None) => {
            let p = period_param("invalid_query", "period", period)?;
            (p, p)
        }
        (None, Some(from), Some(to)) => (
            period_param("invalid_query", "from", from)?,
            period_param("invalid_query", "to", to)?,
        ),
        (Some(_), _, _) => {
            return Err(bad("give either period, or from and to".to_string()));
        }
        _ => {
            return Err(bad(
                "period (YYYY-MM), or from and to (YYYY-MM, both included), is required"
                    .to_string(),
            ));
        }
    };
    check_range(from, to).map_err(bad)?;
    let format = format_param(p.format.as_deref())?;
    let reports = statement::platform_reports(s.store.pool(), from, to).await?;
    let body = render_platform(from, to, &reports, format)?;
    let name = if from == to {
        format!("platform-{from}")
    } else {
        format!("platform-{from}-{to}")
    };
    Ok(respond(format, &name, body))
}

fn respond(format: ExportFormat, name: &str, body: Vec<u8>) -> Response {
    match format {
        ExportFormat::Json => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        ExportFormat::Csv => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{name}.csv\""),
                ),
            ],
            body,
        )
            .into_response(),
    }
}

/// Account ids may hold `/` and `:`; a file name should not.
pub fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A spreadsheet would run a cell that starts like a formula; names chosen by callers (models
/// may hold any printable character) are prefixed with `'` so they stay text.
fn csv_text(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn position_items(p: &Position) -> [(&'static str, Money); 3] {
    [
        ("credits_usd", p.credits_usd),
        ("debt_usd", p.debt_usd),
        ("balance_usd", p.balance_usd),
    ]
}

fn movement_items(m: &Movements) -> [(&'static str, Money); 11] {
    [
        ("purchases_usd", m.purchases_usd),
        ("grants_usd", m.grants_usd),
        ("managed_upstream_cost_usd", m.managed_upstream_cost_usd),
        ("managed_fee_usd", m.managed_fee_usd),
        ("managed_charged_usd", m.managed_charged_usd),
        ("credits_burned_usd", m.credits_burned_usd),
        ("expired_usd", m.expired_usd),
        ("voided_usd", m.voided_usd),
        ("debt_incurred_usd", m.debt_incurred_usd),
        ("debt_settled_usd", m.debt_settled_usd),
        ("byok_attributed_usd", m.byok_attributed_usd),
    ]
}

fn usage_items(f: &tally_ledger::statement::UsageFigures) -> [(&'static str, Money); 4] {
    [
        ("managed_upstream_cost_usd", f.managed_upstream_cost_usd),
        ("managed_fee_usd", f.managed_fee_usd),
        ("managed_charged_usd", f.managed_charged_usd),
        ("byok_attributed_usd", f.byok_attributed_usd),
    ]
}

/// The columns of a statement in CSV: one amount per row, so every section fits one table.
pub const STATEMENT_CSV_HEADER: [&str; 8] = [
    "account_id",
    "period",
    "section",
    "item",
    "api_key_id",
    "provider",
    "model",
    "amount_usd",
];

pub fn statement_csv(s: &Statement) -> Result<Vec<u8>, RenderError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(STATEMENT_CSV_HEADER)?;
    let account = csv_text(&s.account_id);
    let period = s.period.to_string();
    let mut row = |section: &str,
                   item: &str,
                   key: &str,
                   provider: &str,
                   model: &str,
                   amount: Money|
     -> Result<(), RenderError> {
        w.write_record([
            account.as_str(),
            period.as_str(),
            section,
            item,
            &csv_text(key),
            &csv_text(provider),
            &csv_text(model),
            &amount.to_string(),
        ])?;
        Ok(())
    };
    for (item, v) in position_items(&s.opening) {
        row("opening", item, "", "", "", v)?;
    }
    for (item, v) in movement_items(&s.movements) {
        row("movements", item, "", "", "", v)?;
    }
    for (item, v) in position_items(&s.closing) {
        row("closing", item, "", "", "", v)?;
    }
    for k in &s.by_api_key {
        for (item, v) in usage_items(&k.figures) {
            row("by_api_key", item, &k.api_key_id, "", "", v)?;
        }
    }
    for m in &s.by_provider_model {
        for (item, v) in usage_items(&m.figures) {
            row("by_provider_model", item, "", &m.provider, &m.model, v)?;
        }
    }
    w.into_inner()
        .map_err(|e| RenderError::CsvFlush(e.error().to_string()))
}

/// The columns of the platform export in CSV: one row per month.
pub const PLATFORM_CSV_HEADER: [&str; 18] = [
    "period",
    "period_start",
    "period_end",
    "purchases_usd",
    "grants_usd",
    "revenue_upstream_cost_usd",
    "revenue_processing_fee_usd",
    "revenue_usd",
    "credits_burned_usd",
    "breakage_usd",
    "voided_usd",
    "debt_incurred_usd",
    "debt_settled_usd",
    "byok_attributed_usd",
    "opening_credit_liability_usd",
    "closing_credit_liability_usd",
    "opening_debt_usd",
    "closing_debt_usd",
];

pub fn platform_csv(reports: &[PlatformReport]) -> Result<Vec<u8>, RenderError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(PLATFORM_CSV_HEADER)?;
    for r in reports {
        let amounts = [
            r.purchases_usd,
            r.grants_usd,
            r.revenue_upstream_cost_usd,
            r.revenue_processing_fee_usd,
            r.revenue_usd,
            r.credits_burned_usd,
            r.breakage_usd,
            r.voided_usd,
            r.debt_incurred_usd,
            r.debt_settled_usd,
            r.byok_attributed_usd,
            r.opening_credit_liability_usd,
            r.closing_credit_liability_usd,
            r.opening_debt_usd,
            r.closing_debt_usd,
        ];
        let mut record = vec![r.period.to_string(), ts(r.period_start), ts(r.period_end)];
        record.extend(amounts.iter().map(Money::to_string));
        w.write_record(&record)?;
    }
    w.into_inner()
        .map_err(|e| RenderError::CsvFlush(e.error().to_string()))
}

pub fn render_statement(s: &Statement, format: ExportFormat) -> Result<Vec<u8>, RenderError> {
    match format {
        ExportFormat::Json => Ok(serde_json::to_vec(s)?),
        ExportFormat::Csv => statement_csv(s),
    }
}

/// The JSON body of the platform export; fields in this order.
#[derive(Serialize)]
struct PlatformExport<'a> {
    from: Period,
    to: Period,
    periods: &'a [PlatformReport],
}

pub fn render_platform(
    from: Period,
    to: Period,
    reports: &[PlatformReport],
    format: ExportFormat,
) -> Result<Vec<u8>, RenderError> {
    match format {
        ExportFormat::Json => Ok(serde_json::to_vec(&PlatformExport {
            from,
            to,
            periods: reports,
        })?),
        ExportFormat::Csv => platform_csv(reports),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_like_names_stay_text_and_file_names_stay_plain() {
        assert_eq!(csv_text("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(csv_text("gpt-4o"), "gpt-4o");
        assert_eq!(file_safe("org/acme:1"), "org_acme_1");
    }

    #[test]
    fn ranges_are_ordered_and_bounded() {
        let p = |s: &str| s.parse::<Period>().unwrap();
        assert!(check_range(p("2026-10"), p("2026-10")).is_ok());
        assert!(check_range(p("2026-11"), p("2026-10")).is_err());
        assert!(check_range(p("2016-11"), p("2026-10")).is_ok());
        assert!(check_range(p("2016-10"), p("2026-10")).is_err());
    }
}
