//! Request logs: one row per request attempt, read straight from the `usage` events of the log
//! (newest first) with what the ledger charged or attributed for it.
//!
//! The log already holds every field a row needs, so the ingest path writes nothing extra for
//! this view; two partial indexes (migration `20261123000005_request_log.sql`) serve the
//! account and API-key filters. Rows carry metadata only: a usage event has no prompt or
//! completion body to show.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgPool, QueryBuilder, Row};
use tally_ledger::event::{MAX_ID_LEN, validate_id};
use tally_ledger::{CredentialKind, Event, EventBody, Money, TokenCounts, TokenSource};
use uuid::Uuid;

use crate::error::StoreError;
use crate::state::money;

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

/// A filter the caller got wrong: the field and why, safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidFilter {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidFilter {
    InvalidFilter {
        field,
        reason: reason.into(),
    }
}

/// The HTTP status an attempt ended with: one code, or a class such as `5xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Exact(u16),
    /// The hundreds digit: `4` is 400 to 499.
    Class(u16),
}

impl StatusFilter {
    pub fn parse(s: &str) -> Result<StatusFilter, InvalidFilter> {
        let s = s.trim();
        let bad = || {
            invalid(
                "status",
                "must be an HTTP status (100-599) or a class: 1xx to 5xx",
            )
        };
        if let Some(digit) = s
            .strip_suffix("xx")
            .or_else(|| s.strip_suffix("XX"))
            .filter(|d| d.len() == 1)
        {
            return match digit.parse::<u16>() {
                Ok(d @ 1..=5) => Ok(StatusFilter::Class(d)),
                _ => Err(bad()),
            };
        }
        match s.parse::<u16>() {
            Ok(code @ 100..=599) => Ok(StatusFilter::Exact(code)),
            _ => Err(bad()),
        }
    }

    /// The inclusive range of codes it matches.
    fn range(self) -> (i32, i32) {
        match self {
            StatusFilter::Exact(c) => (i32::from(c), i32::from(c)),
            StatusFilter::Class(d) => (i32::from(d) * 100, i32::from(d) * 100 + 99),
        }
    }
}

/// A position in the newest-first order: the last row of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub occurred_at: DateTime<Utc>,
    pub seq: i64,
}

impl Cursor {
    /// Microseconds are PostgreSQL's own precision, so the instant round-trips exactly.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.occurred_at.timestamp_micros(), self.seq)
    }

    pub fn parse(s: &str) -> Result<Cursor, InvalidFilter> {
        let bad = || invalid("cursor", "not a cursor returned by this API (next_cursor)");
        let (micros, seq) = s.split_once('.').ok_or_else(bad)?;
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        let seq: i64 = seq.parse().map_err(|_| bad())?;
        let occurred_at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
        Ok(Cursor { occurred_at, seq })
    }
}

/// What to list. Every filter is optional and they combine with AND.
#[derive(Debug, Clone, Default)]
pub struct RequestLogQuery {
    pub account_id: Option<String>,
    pub api_key_id: Option<String>,
    pub endpoint_id: Option<String>,
    pub credential_kind: Option<CredentialKind>,
    pub credential_id: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub request_id: Option<String>,
    pub status: Option<StatusFilter>,
    /// Inclusive lower bound on event time.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound on event time.
    pub to: Option<DateTime<Utc>>,
    /// Rows strictly older than this (the previous page's `next_cursor`).
    pub cursor: Option<Cursor>,
    pub limit: i64,
}

impl RequestLogQuery {
    pub fn validate(&self) -> Result<(), InvalidFilter> {
        for (field, v) in [
            ("account_id", &self.account_id),
            ("api_key_id", &self.api_key_id),
            ("endpoint_id", &self.endpoint_id),
            ("credential_id", &self.credential_id),
            ("provider", &self.provider),
            ("request_id", &self.request_id),
        ] {
            if let Some(v) = v {
                validate_id(field, v).map_err(|e| match e {
                    tally_ledger::DomainError::Invalid { field, reason } => invalid(field, reason),
                    other => invalid(field, other.to_string()),
                })?;
            }
        }
        if let Some(m) = &self.model
            && (m.is_empty() || m.len() > MAX_ID_LEN || m.chars().any(char::is_control))
        {
            return Err(invalid(
                "model",
                format!("must be 1 to {MAX_ID_LEN} printable characters"),
            ));
        }
        if let (Some(from), Some(to)) = (self.from, self.to)
            && from >= to
        {
            return Err(invalid("from", "must be before 'to'"));
        }
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            return Err(invalid("limit", format!("must be 1 to {MAX_LIMIT}")));
        }
        Ok(())
    }
}

/// One attempt of one request, as metered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestLogRow {
    pub event_id: Uuid,
    pub event_seq: i64,
    pub occurred_at: DateTime<Utc>,
    /// When the ledger recorded it; minus `occurred_at`, how late it arrived.
    pub recorded_at: DateTime<Utc>,
    pub request_id: String,
    pub attempt: u32,
    pub account_id: String,
    pub endpoint_id: String,
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
    pub credential_kind: CredentialKind,
    pub credential_id: String,
    /// Who paid upstream: `credits` (managed, charged to the account's credits) or
    /// `customer_provider_account` (BYOK or attached key: attributed, never charged).
    pub paid_by: &'static str,
    pub status: u16,
    pub success: bool,
    pub streaming: bool,
    pub tokens: TokenCounts,
    pub token_source: TokenSource,
    pub upstream_latency_ms: u64,
    pub total_latency_ms: u64,
    /// The gateway's own share of the total.
    pub overhead_ms: u64,
    /// The price version the ledger priced it with; absent when it cost nothing.
    pub price_version: Option<String>,
    /// Upstream provider cost, whoever paid it.
    pub upstream_cost_usd: Money,
    pub fee_usd: Money,
    /// Taken from credits (or added to debt): upstream cost plus fee, managed only.
    pub charged_usd: Money,
    /// Upstream cost the customer's own provider account paid (BYOK and attached only).
    pub attributed_usd: Money,
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestLogPage {
    pub rows: Vec<RequestLogRow>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Lists request attempts newest first (event time, then log order).
pub async fn list(pool: &PgPool, q: &RequestLogQuery) -> Result<RequestLogPage, StoreError> {
    q.validate()
        .map_err(|e| tally_ledger::DomainError::invalid(e.field, e.reason))?;
    // The lateral sum reads only the ledger lines of the rows on the page (by primary key).
    let mut qb: QueryBuilder<sqlx::Postgres> = QueryBuilder::new(
        "select e.seq, e.occurred_at, e.recorded_at, e.payload, l.upstream, l.fee, l.attributed,
                l.price_version
         from event e
         cross join lateral (
             select coalesce(-sum(amount_usd) filter (where ledger_account = 'revenue_upstream_cost'), 0) as upstream,
                    coalesce(-sum(amount_usd) filter (where ledger_account = 'revenue_processing_fee'), 0) as fee,
                    coalesce(sum(amount_usd) filter (where ledger_account = 'byok_attributed_cost'), 0) as attributed,
                    max(price_version) as price_version
             from ledger_entry where event_seq = e.seq
         ) as l
         where e.kind = 'usage'",
    );
    if let Some(a) = &q.account_id {
        qb.push(" and e.account_id = ").push_bind(a.clone());
    }
    for (key, value) in [
        ("api_key_id", &q.api_key_id),
        ("endpoint_id", &q.endpoint_id),
        ("credential_id", &q.credential_id),
        ("provider", &q.provider),
        ("model", &q.model),
        ("request_id", &q.request_id),
    ] {
        if let Some(v) = value {
            // `key` is one of the literals above, never input.
            qb.push(format!(" and e.payload ->> '{key}' = "))
                .push_bind(v.clone());
        }
    }
    if let Some(k) = q.credential_kind {
        qb.push(" and e.payload ->> 'credential_kind' = ")
            .push_bind(k.as_str());
    }
    if let Some(s) = q.status {
        let (lo, hi) = s.range();
        qb.push(" and (e.payload ->> 'status')::int between ")
            .push_bind(lo)
            .push(" and ")
            .push_bind(hi);
    }
    if let Some(from) = q.from {
        qb.push(" and e.occurred_at >= ").push_bind(from);
    }
    if let Some(to) = q.to {
        qb.push(" and e.occurred_at < ").push_bind(to);
    }
    if let Some(c) = q.cursor {
        qb.push(" and (e.occurred_at, e.seq) < (")
            .push_bind(c.occurred_at)
            .push(", ")
            .push_bind(c.seq)
            .push(")");
    }
    qb.push(" order by e.occurred_at desc, e.seq desc limit ")
        .push_bind(q.limit + 1);
    let records = qb.build().fetch_all(pool).await?;
    let more = records.len() as i64 > q.limit;
    let mut rows = Vec::with_capacity(records.len());
    for r in records
        .iter()
        .take(usize::try_from(q.limit).unwrap_or(usize::MAX))
    {
        let seq: i64 = r.try_get("seq")?;
        let payload: serde_json::Value = r.try_get("payload")?;
        let event: Event = serde_json::from_value(payload)
            .map_err(|e| StoreError::Corrupt(format!("event {seq}: {e}")))?;
        let EventBody::Usage(u) = event.body else {
            return Err(StoreError::Corrupt(format!(
                "event {seq} is filed as usage but is not"
            )));
        };
        let upstream = money(r.try_get::<Decimal, _>("upstream")?)?;
        let fee = money(r.try_get::<Decimal, _>("fee")?)?;
        let attributed = money(r.try_get::<Decimal, _>("attributed")?)?;
        rows.push(RequestLogRow {
            event_id: event.event_id,
            event_seq: seq,
            occurred_at: r.try_get("occurred_at")?,
            recorded_at: r.try_get("recorded_at")?,
            paid_by: if u.credential_kind.is_charged() {
                "credits"
            } else {
                "customer_provider_account"
            },
            success: u.is_success(),
            overhead_ms: u.total_latency_ms.saturating_sub(u.upstream_latency_ms),
            request_id: u.request_id,
            attempt: u.attempt,
            account_id: event.account_id,
            endpoint_id: u.endpoint_id,
            api_key_id: u.api_key_id,
            provider: u.provider,
            model: u.model,
            credential_kind: u.credential_kind,
            credential_id: u.credential_id,
            status: u.status,
            streaming: u.streaming,
            tokens: u.tokens,
            token_source: u.token_source,
            upstream_latency_ms: u.upstream_latency_ms,
            total_latency_ms: u.total_latency_ms,
            price_version: r.try_get("price_version")?,
            upstream_cost_usd: upstream.checked_add(attributed)?,
            fee_usd: fee,
            charged_usd: upstream.checked_add(fee)?,
            attributed_usd: attributed,
        });
    }
    let next_cursor = if more {
        rows.last().map(|r| {
            Cursor {
                occurred_at: r.occurred_at,
                seq: r.event_seq,
            }
            .encode()
        })
    } else {
        None
    };
    Ok(RequestLogPage { rows, next_cursor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_filters_parse_codes_and_classes() {
        assert_eq!(StatusFilter::parse("429"), Ok(StatusFilter::Exact(429)));
        assert_eq!(StatusFilter::parse("5xx"), Ok(StatusFilter::Class(5)));
        assert_eq!(StatusFilter::parse("2XX").unwrap().range(), (200, 299));
        for bad in [
            "", "99", "600", "6xx", "0xx", "xx", "4x", "abc", "-200", "45xx",
        ] {
            assert!(StatusFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor {
            occurred_at: DateTime::from_timestamp_micros(1_793_000_000_123_456).unwrap(),
            seq: 42,
        };
        assert_eq!(Cursor::parse(&c.encode()), Ok(c));
        for bad in ["", "12", "a.b", "1.x", "99999999999999999999.1"] {
            assert!(Cursor::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_filters_are_named() {
        let q = RequestLogQuery {
            limit: 0,
            ..RequestLogQuery::default()
        };
        assert_eq!(q.validate().unwrap_err().field, "limit");
        let q = RequestLogQuery {
            provider: Some("open ai".into()),
            limit: 10,
            ..RequestLogQuery::default()
        };
        assert_eq!(q.validate().unwrap_err().field, "provider");
        let t = DateTime::from_timestamp(1_793_000_000, 0).unwrap();
        let q = RequestLogQuery {
            from: Some(t),
            to: Some(t),
            limit: 10,
            ..RequestLogQuery::default()
        };
        assert_eq!(q.validate().unwrap_err().field, "from");
    }
}
