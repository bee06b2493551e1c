//! The read side: what the usage API, balances, ledger listing and enforcement lookups return.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgPool, QueryBuilder, Row};
use tally_ledger::{AccountState, Decision, Lot, LotStatus, Money, Totals, decide};
use uuid::Uuid;

use crate::error::StoreError;
use crate::state::{self, LOT_COLUMNS, LotRow, money};

/// Lots expiring within this window are called out on the balance.
pub const EXPIRING_SOON_DAYS: i64 = 30;
pub const MAX_PAGE: i64 = 1000;

pub async fn account_state(pool: &PgPool, account_id: &str) -> Result<AccountState, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut states = state::load_states_conn(&mut conn, &[account_id.to_string()], &[]).await?;
    states
        .remove(account_id)
        .flatten()
        .ok_or_else(|| StoreError::NotFound(format!("account '{account_id}'")))
}

pub async fn decision(
    pool: &PgPool,
    account_id: &str,
    now: DateTime<Utc>,
) -> Result<Decision, StoreError> {
    let state = account_state(pool, account_id).await?;
    Ok(decide(&state, now)?)
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    pub account_id: String,
    pub name: String,
    pub low_balance_threshold_usd: Money,
    pub opened_at: DateTime<Utc>,
}

impl From<&AccountState> for AccountView {
    fn from(s: &AccountState) -> AccountView {
        AccountView {
            account_id: s.account_id.clone(),
            name: s.name.clone(),
            low_balance_threshold_usd: s.low_balance_threshold,
            opened_at: s.opened_at,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LotView {
    pub lot_id: Uuid,
    pub source: &'static str,
    pub status: &'static str,
    pub amount_usd: Money,
    pub remaining_usd: Money,
    pub burned_usd: Money,
    pub expired_usd: Money,
    pub voided_usd: Money,
    pub priority: i32,
    pub granted_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
}

impl From<&Lot> for LotView {
    fn from(l: &Lot) -> LotView {
        LotView {
            lot_id: l.lot_id,
            source: l.source.as_str(),
            status: l.status.as_str(),
            amount_usd: l.amount,
            remaining_usd: l.remaining,
            burned_usd: l.burned,
            expired_usd: l.expired,
            voided_usd: l.voided,
            priority: l.priority,
            granted_at: l.granted_at,
            expires_at: l.expires_at,
            closed_at: l.closed_at,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BalanceView {
    pub account_id: String,
    pub as_of: DateTime<Utc>,
    /// Remaining credits minus debt.
    pub balance_usd: Money,
    pub remaining_usd: Money,
    /// What managed usage could burn right now (lots inside their validity window).
    pub spendable_usd: Money,
    pub debt_usd: Money,
    pub expiring_next_30_days_usd: Money,
    /// Open lots with something left, in burn order.
    pub lots: Vec<LotView>,
    pub totals: Totals,
    pub decision: Decision,
}

pub fn balance_view(state: &AccountState, now: DateTime<Utc>) -> Result<BalanceView, StoreError> {
    let remaining = state.remaining()?;
    let soon = now + Duration::days(EXPIRING_SOON_DAYS);
    let mut lots: Vec<&Lot> = state
        .lots
        .iter()
        .filter(|l| l.status == LotStatus::Open && l.remaining.is_positive())
        .collect();
    lots.sort_by_key(|l| l.burn_order_key());
    let expiring = Money::try_sum(
        lots.iter()
            .filter(|l| l.expires_at < soon)
            .map(|l| l.remaining),
    )?;
    Ok(BalanceView {
        account_id: state.account_id.clone(),
        as_of: now,
        balance_usd: remaining.checked_sub(state.debt)?,
        remaining_usd: remaining,
        spendable_usd: state.spendable_at(now)?,
        debt_usd: state.debt,
        expiring_next_30_days_usd: expiring,
        lots: lots.into_iter().map(LotView::from).collect(),
        totals: state.totals.clone(),
        decision: decide(state, now)?,
    })
}

pub async fn lots(pool: &PgPool, account_id: &str) -> Result<Vec<LotView>, StoreError> {
    let rows: Vec<LotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {LOT_COLUMNS} from credit_lot where account_id = $1 order by granted_at, lot_id"
    )))
    .bind(account_id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| r.into_lot().map(|l| LotView::from(&l)))
        .collect()
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EntryView {
    pub event_seq: i64,
    pub line_no: i32,
    pub event_id: Uuid,
    pub ledger_account: String,
    /// Debit positive, credit negative.
    #[serde(serialize_with = "ser_decimal")]
    pub amount_usd: Decimal,
    pub lot_id: Option<Uuid>,
    pub price_version: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub kind: String,
}

fn ser_decimal<S: serde::Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&d.to_string())
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryPage {
    pub entries: Vec<EntryView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A position in the ledger: `event_seq.line_no`.
pub fn parse_cursor(s: &str) -> Option<(i64, i32)> {
    let (a, b) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

pub async fn ledger_entries(
    pool: &PgPool,
    account_id: &str,
    after: Option<(i64, i32)>,
    limit: i64,
) -> Result<EntryPage, StoreError> {
    let limit = limit.clamp(1, MAX_PAGE);
    let (seq, line) = after.unwrap_or((-1, -1));
    let mut entries: Vec<EntryView> = sqlx::query_as(
        "select l.event_seq, l.line_no, l.event_id, l.ledger_account, l.amount_usd, l.lot_id, l.price_version,
                l.occurred_at, e.kind
         from ledger_entry l join event e on e.seq = l.event_seq
         where l.account_id = $1 and (l.event_seq, l.line_no) > ($2, $3)
         order by l.event_seq, l.line_no
         limit $4",
    )
    .bind(account_id)
    .bind(seq)
    .bind(line)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = entries.len() as i64 > limit;
    entries.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more {
        entries
            .last()
            .map(|e| format!("{}.{}", e.event_seq, e.line_no))
    } else {
        None
    };
    Ok(EntryPage {
        entries,
        next_cursor,
    })
}

/// A dimension of the usage rollup that reports may filter and group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum UsageDim {
    ApiKey,
    Endpoint,
    Credential,
    CredentialKind,
    Provider,
    Model,
}

impl UsageDim {
    pub const ALL: [UsageDim; 6] = [
        UsageDim::ApiKey,
        UsageDim::Endpoint,
        UsageDim::Credential,
        UsageDim::CredentialKind,
        UsageDim::Provider,
        UsageDim::Model,
    ];

    /// The name used in query strings and responses; also the column name.
    pub fn column(self) -> &'static str {
        match self {
            UsageDim::ApiKey => "api_key_id",
            UsageDim::Endpoint => "endpoint_id",
            UsageDim::Credential => "credential_id",
            UsageDim::CredentialKind => "credential_kind",
            UsageDim::Provider => "provider",
            UsageDim::Model => "model",
        }
    }

    pub fn parse(s: &str) -> Option<UsageDim> {
        let s = s.trim();
        UsageDim::ALL
            .into_iter()
            .find(|d| d.column() == s || d.column().trim_end_matches("_id") == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "month" => Some(Granularity::Month),
            _ => None,
        }
    }
    fn sql(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub account_id: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: Vec<UsageDim>,
    pub granularity: Option<Granularity>,
    pub filters: Vec<(UsageDim, String)>,
}

impl UsageQuery {
    /// Usage is kept per hour of event time, so a window must start and end on whole hours.
    pub fn validate(&self) -> Result<(), tally_ledger::DomainError> {
        use tally_ledger::DomainError;
        if self.from >= self.to {
            return Err(DomainError::invalid("from", "must be before 'to'"));
        }
        for (field, t) in [("from", self.from), ("to", self.to)] {
            if t.duration_trunc(TimeDelta::hours(1)).ok() != Some(t) {
                return Err(DomainError::invalid(
                    field,
                    "must be on a whole hour (usage is kept per hour)",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_start: Option<DateTime<Utc>>,
    #[serde(flatten)]
    pub group: BTreeMap<String, String>,
    pub requests: i64,
    pub failed_requests: i64,
    pub streaming_requests: i64,
    pub estimated_requests: i64,
    pub unpriced_requests: i64,
    pub fallback_priced_requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub upstream_cost_usd: Money,
    pub fee_usd: Money,
    /// Charged to credits (managed only).
    pub charged_usd: Money,
    /// BYOK and attached: upstream cost paid by the customer's own provider account.
    pub attributed_usd: Money,
}

const USAGE_SUMS: &str = "sum(requests)::bigint as requests, sum(failed_requests)::bigint as failed_requests,
    sum(streaming_requests)::bigint as streaming_requests, sum(estimated_requests)::bigint as estimated_requests,
    sum(unpriced_requests)::bigint as unpriced_requests,
    sum(fallback_priced_requests)::bigint as fallback_priced_requests,
    sum(input_tokens)::bigint as input_tokens, sum(cached_input_tokens)::bigint as cached_input_tokens,
    sum(output_tokens)::bigint as output_tokens, sum(reasoning_tokens)::bigint as reasoning_tokens,
    sum(upstream_cost_usd) as upstream_cost_usd, sum(fee_usd) as fee_usd, sum(charged_usd) as charged_usd,
    sum(attributed_usd) as attributed_usd";

pub async fn usage(pool: &PgPool, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
    q.validate()?;
    let mut qb: QueryBuilder<sqlx::Postgres> = QueryBuilder::new("select ");
    let mut group_exprs: Vec<String> = Vec::new();
    if let Some(g) = q.granularity {
        group_exprs.push(format!(
            "date_trunc('{}', hour at time zone 'UTC') at time zone 'UTC'",
            g.sql()
        ));
    }
    for d in &q.group_by {
        group_exprs.push(d.column().to_string());
    }
    if q.granularity.is_some() {
        qb.push(format!("{} as period_start, ", group_exprs[0]));
    }
    for d in &q.group_by {
        qb.push(format!("{}, ", d.column()));
    }
    qb.push(USAGE_SUMS);
    qb.push(" from usage_hourly where account_id = ");
    qb.push_bind(q.account_id.clone());
    qb.push(" and hour >= ");
    qb.push_bind(q.from);
    qb.push(" and hour < ");
    qb.push_bind(q.to);
    for (d, v) in &q.filters {
        qb.push(format!(" and {} = ", d.column()));
        qb.push_bind(v.clone());
    }
    if !group_exprs.is_empty() {
        qb.push(format!(
            " group by {} order by {}",
            group_exprs.join(", "),
            group_exprs.join(", ")
        ));
    }
    let rows = qb.build().fetch_all(pool).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let requests: Option<i64> = row.try_get("requests")?;
        let Some(requests) = requests else {
            // An ungrouped sum over no rows: report zeros rather than nulls.
            out.push(empty_usage_row());
            continue;
        };
        let mut group = BTreeMap::new();
        for d in &q.group_by {
            group.insert(
                d.column().to_string(),
                row.try_get::<String, _>(d.column())?,
            );
        }
        let dec = |name: &str| -> Result<Money, StoreError> {
            let v: Option<Decimal> = row.try_get(name)?;
            money(v.unwrap_or_default())
        };
        out.push(UsageRow {
            period_start: if q.granularity.is_some() {
                row.try_get("period_start")?
            } else {
                None
            },
            group,
            requests,
            failed_requests: row.try_get("failed_requests")?,
            streaming_requests: row.try_get("streaming_requests")?,
            estimated_requests: row.try_get("estimated_requests")?,
            unpriced_requests: row.try_get("unpriced_requests")?,
            fallback_priced_requests: row.try_get("fallback_priced_requests")?,
            input_tokens: row.try_get("input_tokens")?,
            cached_input_tokens: row.try_get("cached_input_tokens")?,
            output_tokens: row.try_get("output_tokens")?,
            reasoning_tokens: row.try_get("reasoning_tokens")?,
            upstream_cost_usd: dec("upstream_cost_usd")?,
            fee_usd: dec("fee_usd")?,
            charged_usd: dec("charged_usd")?,
            attributed_usd: dec("attributed_usd")?,
        });
    }
    Ok(out)
}

fn empty_usage_row() -> UsageRow {
    UsageRow {
        period_start: None,
        group: BTreeMap::new(),
        requests: 0,
        failed_requests: 0,
        streaming_requests: 0,
        estimated_requests: 0,
        unpriced_requests: 0,
        fallback_priced_requests: 0,
        input_tokens: 0,
        cached_input_tokens: 0,
        output_tokens: 0,
        reasoning_tokens: 0,
        upstream_cost_usd: Money::ZERO,
        fee_usd: Money::ZERO,
        charged_usd: Money::ZERO,
        attributed_usd: Money::ZERO,
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ConflictView {
    pub event_id: Uuid,
    pub first_seen_at: DateTime<Utc>,
    pub times_seen: i64,
    pub offered_payload: serde_json::Value,
    pub existing_payload: serde_json::Value,
}

pub async fn conflicts(pool: &PgPool, limit: i64) -> Result<Vec<ConflictView>, StoreError> {
    Ok(sqlx::query_as(
        "select c.event_id, c.first_seen_at, c.times_seen, c.offered_payload, e.payload as existing_payload
         from event_conflict c join event e on e.event_id = c.event_id
         order by c.first_seen_at desc, c.event_id limit $1",
    )
    .bind(limit.clamp(1, MAX_PAGE))
    .fetch_all(pool)
    .await?)
}
