//! Reading account state back from the projections, for the domain to continue from.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, Postgres, Transaction};
use tally_ledger::{AccountState, Lot, LotSource, LotStatus, Money, Totals};
use uuid::Uuid;

use crate::error::StoreError;

pub(crate) fn money(d: Decimal) -> Result<Money, StoreError> {
    Money::from_decimal_rounded(d).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    account_id: String,
    name: String,
    low_balance_threshold_usd: Decimal,
    opened_at: DateTime<Utc>,
    debt_usd: Decimal,
    purchased_usd: Decimal,
    granted_usd: Decimal,
    burned_usd: Decimal,
    expired_usd: Decimal,
    voided_usd: Decimal,
    debt_incurred_usd: Decimal,
    debt_settled_usd: Decimal,
    charged_upstream_usd: Decimal,
    charged_fee_usd: Decimal,
    byok_attributed_usd: Decimal,
}

pub(crate) const LOT_COLUMNS: &str = "lot_id, account_id, source, amount_usd, remaining_usd, burned_usd, \
     expired_usd, voided_usd, priority, granted_at, expires_at, status, closed_at";

#[derive(sqlx::FromRow)]
pub(crate) struct LotRow {
    lot_id: Uuid,
    account_id: String,
    source: String,
    amount_usd: Decimal,
    remaining_usd: Decimal,
    burned_usd: Decimal,
    expired_usd: Decimal,
    voided_usd: Decimal,
    priority: i32,
    granted_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    status: String,
    closed_at: Option<DateTime<Utc>>,
}

impl LotRow {
    pub(crate) fn into_lot(self) -> Result<Lot, StoreError> {
        Ok(Lot {
            lot_id: self.lot_id,
            account_id: self.account_id,
            source: LotSource::parse(&self.source)
                .ok_or_else(|| StoreError::Corrupt(format!("lot source '{}'", self.source)))?,
            amount: money(self.amount_usd)?,
            remaining: money(self.remaining_usd)?,
            burned: money(self.burned_usd)?,
            expired: money(self.expired_usd)?,
            voided: money(self.voided_usd)?,
            priority: self.priority,
            granted_at: self.granted_at,
            expires_at: self.expires_at,
            status: LotStatus::parse(&self.status)
                .ok_or_else(|| StoreError::Corrupt(format!("lot status '{}'", self.status)))?,
            closed_at: self.closed_at,
        })
    }
}

impl AccountRow {
    fn into_state(self, lots: Vec<Lot>) -> Result<AccountState, StoreError> {
        Ok(AccountState {
            account_id: self.account_id,
            name: self.name,
            low_balance_threshold: money(self.low_balance_threshold_usd)?,
            opened_at: self.opened_at,
            debt: money(self.debt_usd)?,
            totals: Totals {
                purchased: money(self.purchased_usd)?,
                granted: money(self.granted_usd)?,
                burned: money(self.burned_usd)?,
                expired: money(self.expired_usd)?,
                voided: money(self.voided_usd)?,
                debt_incurred: money(self.debt_incurred_usd)?,
                debt_settled: money(self.debt_settled_usd)?,
                charged_upstream: money(self.charged_upstream_usd)?,
                charged_fee: money(self.charged_fee_usd)?,
                byok_attributed: money(self.byok_attributed_usd)?,
            },
            lots,
        })
    }
}

const ACCOUNT_COLUMNS: &str = "account_id, name, low_balance_threshold_usd, opened_at, debt_usd, \
     purchased_usd, granted_usd, burned_usd, expired_usd, voided_usd, debt_incurred_usd, \
     debt_settled_usd, charged_upstream_usd, charged_fee_usd, byok_attributed_usd";

/// The state of each account (`None` for an account that does not exist): its open lots plus
/// any closed lot that `referenced_lots` names, so a void or expiry of a closed lot is judged
/// exactly as a replay of the whole log would judge it.
pub(crate) async fn load_states(
    tx: &mut Transaction<'_, Postgres>,
    accounts: &[String],
    referenced_lots: &[Uuid],
) -> Result<HashMap<String, Option<AccountState>>, StoreError> {
    load_states_conn(tx, accounts, referenced_lots).await
}

pub(crate) async fn load_states_conn(
    conn: &mut PgConnection,
    accounts: &[String],
    referenced_lots: &[Uuid],
) -> Result<HashMap<String, Option<AccountState>>, StoreError> {
    let rows: Vec<AccountRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {ACCOUNT_COLUMNS} from account where account_id = any($1)"
    )))
    .bind(accounts)
    .fetch_all(&mut *conn)
    .await?;
    let lot_rows: Vec<LotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {LOT_COLUMNS} from credit_lot
         where account_id = any($1) and (status = 'open' or lot_id = any($2))
         order by account_id, granted_at, lot_id"
    )))
    .bind(accounts)
    .bind(referenced_lots)
    .fetch_all(&mut *conn)
    .await?;
    let mut lots: HashMap<String, Vec<Lot>> = HashMap::new();
    for row in lot_rows {
        let lot = row.into_lot()?;
        lots.entry(lot.account_id.clone()).or_default().push(lot);
    }
    let mut states: HashMap<String, Option<AccountState>> =
        accounts.iter().map(|a| (a.clone(), None)).collect();
    for row in rows {
        let account_lots = lots.remove(&row.account_id).unwrap_or_default();
        let state = row.into_state(account_lots)?;
        states.insert(state.account_id.clone(), Some(state));
    }
    Ok(states)
}
