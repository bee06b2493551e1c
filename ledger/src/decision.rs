//! Enforcement decisions: may this account's managed traffic go upstream right now?

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::account::AccountState;
use crate::error::DomainError;
use crate::money::Money;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionReason {
    /// Credits are available above the low-balance threshold.
    Ok,
    /// Credits are available but at or below the account's threshold.
    LowBalance,
    /// Nothing is left to burn (or debt exceeds what is left): managed traffic is denied.
    CreditsExhausted,
}

impl DecisionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionReason::Ok => "ok",
            DecisionReason::LowBalance => "low_balance",
            DecisionReason::CreditsExhausted => "credits_exhausted",
        }
    }
}

/// The decision for one account at one instant. BYOK and attached-key traffic is never denied
/// for credits, so `allow_byok` is always true; it is spelled out so no caller has to infer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub account_id: String,
    pub allow_managed: bool,
    pub allow_byok: bool,
    pub reason: DecisionReason,
    /// Spendable credits minus debt.
    pub available_usd: Money,
    pub spendable_usd: Money,
    pub debt_usd: Money,
    pub low_balance_threshold_usd: Money,
    pub low_balance: bool,
    pub evaluated_at: DateTime<Utc>,
    /// When the decision may change by the clock alone (the next open lot expiry).
    pub next_change_at: Option<DateTime<Utc>>,
}

pub fn decide(state: &AccountState, now: DateTime<Utc>) -> Result<Decision, DomainError> {
    let spendable = state.spendable_at(now)?;
    let available = spendable.checked_sub(state.debt)?;
    let exhausted = !available.is_positive();
    let low = available <= state.low_balance_threshold;
    let reason = if exhausted {
        DecisionReason::CreditsExhausted
    } else if low {
        DecisionReason::LowBalance
    } else {
        DecisionReason::Ok
    };
    let next_change_at = state
        .lots
        .iter()
        .filter(|l| l.can_burn_at(now) || (l.remaining.is_positive() && l.granted_at > now))
        .map(|l| if l.granted_at > now { l.granted_at } else { l.expires_at })
        .min();
    Ok(Decision {
        account_id: state.account_id.clone(),
        allow_managed: !exhausted,
        allow_byok: true,
        reason,
        available_usd: available,
        spendable_usd: spendable,
        debt_usd: state.debt,
        low_balance_threshold_usd: state.low_balance_threshold,
        low_balance: low,
        evaluated_at: now,
        next_change_at,
    })
}
