//! Finance exports from the ledger lines: an account's monthly statement and the platform's
//! monthly report. The database sums `ledger_entry` lines (exact `numeric`) per event kind,
//! ledger account, sign and usage dimensions; the pure fold in
//! [`tally_ledger::statement`] turns the sums into figures and checks every identity.
//!
//! A line belongs to the month of its event's `occurred_at` (UTC), the instant the ledger
//! applied it at. Each export reads one snapshot (a repeatable-read, read-only transaction), so
//! its opening position and its movements come from the same state of the log.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Row};
use tally_ledger::statement::{
    EntryKind, Period, PlatformReport, Position, Statement, StatementError, StatementLine,
    UsageDims,
};
use tally_ledger::{LedgerAccount, Money};

use crate::error::StoreError;

/// A platform export covers at most this many months per request.
pub const MAX_EXPORT_MONTHS: usize = 120;

fn corrupt(e: StatementError) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn money(d: Decimal) -> Result<Money, StoreError> {
    Money::from_decimal_rounded(d).map_err(|e| StoreError::Corrupt(format!("ledger sum: {e}")))
}

async fn snapshot(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The statement of `account_id` for `period`. An account that does not exist is
/// [`StoreError::NotFound`]; a month before the account was opened is all zeros.
pub async fn account_statement(
    pool: &PgPool,
    account_id: &str,
    period: Period,
) -> Result<Statement, StoreError> {
    let mut tx = snapshot(pool).await?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from account where account_id = $1)")
            .bind(account_id)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        return Err(StoreError::NotFound(format!("account '{account_id}'")));
    }
    let opening = opening_position(&mut tx, Some(account_id), period).await?;
    let mut lines = period_lines(&mut tx, Some(account_id), period, period).await?;
    tx.commit().await?;
    let lines = lines.remove(&period).unwrap_or_default();
    Statement::build(account_id, period, opening, &lines).map_err(corrupt)
}

/// The platform report of every month from `from` to `to`, both included; each month opens on
/// the previous one's closing position.
pub async fn platform_reports(
    pool: &PgPool,
    from: Period,
    to: Period,
) -> Result<Vec<PlatformReport>, StoreError> {
    let months = from.months_until(to);
    if months == 0 || months > MAX_EXPORT_MONTHS {
        return Err(tally_ledger::DomainError::invalid(
            "period",
            format!("'from' must not be after 'to', and a range covers at most {MAX_EXPORT_MONTHS} months"),
        )
        .into());
    }
    let mut tx = snapshot(pool).await?;
    let mut opening = opening_position(&mut tx, None, from).await?;
    let mut lines = period_lines(&mut tx, None, from, to).await?;
    tx.commit().await?;
    let mut out = Vec::with_capacity(months);
    let mut period = from;
    for i in 0..months {
        if i > 0 {
            period = period.next()?;
        }
        let report =
            PlatformReport::build(period, opening, &lines.remove(&period).unwrap_or_default())
                .map_err(corrupt)?;
        opening = report.closing().map_err(corrupt)?;
        out.push(report);
    }
    Ok(out)
}

/// The position at the start of `period`: every customer-credit and customer-debt line before
/// it, of one account or of all.
async fn opening_position(
    conn: &mut PgConnection,
    account_id: Option<&str>,
    period: Period,
) -> Result<Position, StoreError> {
    let sql = if account_id.is_some() {
        "select ledger_account, sum(amount_usd) as amount from ledger_entry
         where account_id = $2 and occurred_at < $1
           and ledger_account in ('customer_credits', 'customer_debt')
         group by ledger_account"
    } else {
        "select ledger_account, sum(amount_usd) as amount from ledger_entry
         where occurred_at < $1 and ledger_account in ('customer_credits', 'customer_debt')
         group by ledger_account"
    };
    let mut q = sqlx::query(sql).bind(period.start());
    if let Some(a) = account_id {
        q = q.bind(a);
    }
    let (mut credits, mut debt) = (Money::ZERO, Money::ZERO);
    for row in q.fetch_all(&mut *conn).await? {
        let account: String = row.try_get("ledger_account")?;
        let amount = money(row.try_get("amount")?)?;
        match account.as_str() {
            "customer_credits" => credits = amount,
            _ => debt = amount,
        }
    }
    Position::from_ledger_sums(credits, debt).map_err(corrupt)
}

/// The lines of the months `from..=to`, summed per month, event kind, ledger account, sign and
/// (for usage) key, provider and model.
async fn period_lines(
    conn: &mut PgConnection,
    account_id: Option<&str>,
    from: Period,
    to: Period,
) -> Result<BTreeMap<Period, Vec<StatementLine>>, StoreError> {
    let filter = if account_id.is_some() {
        "l.account_id = $3 and"
    } else {
        ""
    };
    let sql = format!(
        "select to_char(l.occurred_at at time zone 'UTC', 'YYYY-MM') as period, e.kind, l.ledger_account,
                l.amount_usd > 0 as debit,
                e.payload ->> 'api_key_id' as api_key_id, e.payload ->> 'provider' as provider,
                e.payload ->> 'model' as model, sum(l.amount_usd) as amount
         from ledger_entry l join event e on e.seq = l.event_seq
         where {filter} l.occurred_at >= $1 and l.occurred_at < $2
         group by 1, 2, 3, 4, 5, 6, 7
         order by 1, 2, 3, 4, 5, 6, 7"
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(from.start())
        .bind(to.end());
    if let Some(a) = account_id {
        q = q.bind(a);
    }
    let mut out: BTreeMap<Period, Vec<StatementLine>> = BTreeMap::new();
    for row in q.fetch_all(&mut *conn).await? {
        let period: String = row.try_get("period")?;
        let period: Period = period
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("ledger line month '{period}': {e}")))?;
        let kind: String = row.try_get("kind")?;
        let kind = EntryKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("ledger line of a '{kind}' event")))?;
        let account: String = row.try_get("ledger_account")?;
        let ledger_account = LedgerAccount::parse(&account)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown ledger account '{account}'")))?;
        let dims = (
            row.try_get::<Option<String>, _>("api_key_id")?,
            row.try_get::<Option<String>, _>("provider")?,
            row.try_get::<Option<String>, _>("model")?,
        );
        let usage = match (kind, dims) {
            (EntryKind::Usage, (Some(api_key_id), Some(provider), Some(model))) => {
                Some(UsageDims {
                    api_key_id,
                    provider,
                    model,
                })
            }
            _ => None,
        };
        out.entry(period).or_default().push(StatementLine {
            kind,
            ledger_account,
            amount: money(row.try_get("amount")?)?,
            usage,
        });
    }
    Ok(out)
}
