//! An account's ledger state and the one function that moves it: [`apply`].
//!
//! `apply` is pure. It either returns the balanced postings and usage charge of an event and
//! updates the state, or returns an error and leaves the state exactly as it was.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::event::{Event, EventBody, Usage};
use crate::lot::{self, Lot, LotSource, LotStatus};
use crate::money::Money;
use crate::posting::{LedgerAccount, Posting};
use crate::pricing::{PriceBasis, PriceBook};

/// Running totals of an account. Conservation: `purchased + granted = burned + expired +
/// voided + remaining`, and `debt = debt_incurred - debt_settled`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub purchased: Money,
    pub granted: Money,
    /// Taken from lots: by managed usage, and by purchases settling debt.
    pub burned: Money,
    pub expired: Money,
    pub voided: Money,
    /// Managed usage charged beyond what the lots covered.
    pub debt_incurred: Money,
    pub debt_settled: Money,
    /// Managed usage charged: upstream cost and processing fee.
    pub charged_upstream: Money,
    pub charged_fee: Money,
    /// BYOK and attached-key upstream cost, attributed to the customer's own provider account.
    pub byok_attributed: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountState {
    pub account_id: String,
    pub name: String,
    pub low_balance_threshold: Money,
    pub opened_at: DateTime<Utc>,
    pub debt: Money,
    pub totals: Totals,
    /// Every lot that can still change: open ones. A closed lot never changes again, so a
    /// store may leave it out when loading state.
    pub lots: Vec<Lot>,
}

impl AccountState {
    /// Sum of the remaining amounts of open lots.
    pub fn remaining(&self) -> Result<Money, DomainError> {
        Money::try_sum(self.lots.iter().filter(|l| l.status == LotStatus::Open).map(|l| l.remaining))
    }

    /// What managed usage at `at` could still burn.
    pub fn spendable_at(&self, at: DateTime<Utc>) -> Result<Money, DomainError> {
        Money::try_sum(self.lots.iter().filter(|l| l.can_burn_at(at)).map(|l| l.remaining))
    }

    fn lot_mut(&mut self, lot_id: Uuid) -> Result<&mut Lot, DomainError> {
        self.lots
            .iter_mut()
            .find(|l| l.lot_id == lot_id)
            .ok_or(DomainError::UnknownLot(lot_id))
    }
}

/// What applying one usage event cost, and who pays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCharge {
    pub price_version: Option<String>,
    pub price_basis: PriceBasis,
    pub upstream_cost: Money,
    /// Zero unless managed.
    pub fee: Money,
    /// Zero unless managed: `upstream_cost + fee = burned + debt_incurred`.
    pub burned: Money,
    pub debt_incurred: Money,
    /// Zero unless BYOK or attached.
    pub attributed: Money,
}

impl UsageCharge {
    pub fn charged(&self) -> Money {
        self.upstream_cost.checked_add(self.fee).unwrap_or(Money::ZERO)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// Balanced: sums to zero.
    pub postings: Vec<Posting>,
    pub usage: Option<UsageCharge>,
    /// Lots created or changed by the event.
    pub touched_lots: Vec<Uuid>,
}

/// Applies one event to the state of its account (`None` when the account does not exist yet).
pub fn apply(
    state: &mut Option<AccountState>,
    event: &Event,
    prices: &PriceBook,
) -> Result<Applied, DomainError> {
    event.validate()?;
    let at = event.occurred_at;
    if let EventBody::AccountOpened(o) = &event.body {
        if state.is_some() {
            return Err(DomainError::AccountExists(event.account_id.clone()));
        }
        *state = Some(AccountState {
            account_id: event.account_id.clone(),
            name: o.name.clone(),
            low_balance_threshold: o.low_balance_threshold_usd,
            opened_at: at,
            debt: Money::ZERO,
            totals: Totals::default(),
            lots: Vec::new(),
        });
        return Ok(Applied::default());
    }
    let Some(acct) = state.as_mut() else {
        return Err(DomainError::UnknownAccount(event.account_id.clone()));
    };
    let applied = match &event.body {
        EventBody::AccountOpened(_) => unreachable_opened(),
        EventBody::CreditsPurchased(p) => open_lot(
            acct,
            NewLot {
                lot_id: p.lot_id,
                source: LotSource::Purchase,
                amount: p.amount_usd,
                priority: lot::PURCHASE_PRIORITY,
                granted_at: at,
                expires_at: lot::purchase_expiry(at),
            },
        )?,
        EventBody::CreditsGranted(g) => open_lot(
            acct,
            NewLot {
                lot_id: g.lot_id,
                source: LotSource::Grant,
                amount: g.amount_usd,
                priority: g.priority,
                granted_at: at,
                expires_at: g.expires_at,
            },
        )?,
        EventBody::LotVoided(v) => close_lot(acct, v.lot_id, at, LotStatus::Voided)?,
        EventBody::LotExpired(x) => close_lot(acct, x.lot_id, at, LotStatus::Expired)?,
        EventBody::Usage(u) => charge_usage(acct, u, at, prices)?,
    };
    debug_assert!(balanced(&applied.postings));
    Ok(applied)
}

fn unreachable_opened() -> Applied {
    // Handled before the account lookup; kept total so the match needs no panic.
    Applied::default()
}

/// Whether postings sum to exactly zero.
pub fn balanced(postings: &[Posting]) -> bool {
    Money::try_sum(postings.iter().map(|p| p.amount)).is_ok_and(|s| s.is_zero())
}

struct NewLot {
    lot_id: Uuid,
    source: LotSource,
    amount: Money,
    priority: i32,
    granted_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

fn open_lot(acct: &mut AccountState, new: NewLot) -> Result<Applied, DomainError> {
    if acct.lots.iter().any(|l| l.lot_id == new.lot_id) {
        return Err(DomainError::DuplicateLot(new.lot_id));
    }
    // Purchases pay outstanding debt first; grants are gifts and do not.
    let settle = match new.source {
        LotSource::Purchase => new.amount.min(acct.debt),
        LotSource::Grant => Money::ZERO,
    };
    let remaining = new.amount.checked_sub(settle)?;
    let source_account = match new.source {
        LotSource::Purchase => LedgerAccount::PaymentsReceived,
        LotSource::Grant => LedgerAccount::PromotionalGrants,
    };
    let (purchased, granted) = match new.source {
        LotSource::Purchase => (acct.totals.purchased.checked_add(new.amount)?, acct.totals.granted),
        LotSource::Grant => (acct.totals.purchased, acct.totals.granted.checked_add(new.amount)?),
    };
    let burned = acct.totals.burned.checked_add(settle)?;
    let debt_settled = acct.totals.debt_settled.checked_add(settle)?;
    let debt = acct.debt.checked_sub(settle)?;

    let mut postings = vec![Posting::new(source_account, new.amount)];
    postings.push(Posting::on_lot(LedgerAccount::CustomerCredits, remaining.neg(), new.lot_id));
    if settle.is_positive() {
        postings.push(Posting::on_lot(LedgerAccount::CustomerDebt, settle.neg(), new.lot_id));
    }
    postings.retain(|p| !p.amount.is_zero());

    acct.totals.purchased = purchased;
    acct.totals.granted = granted;
    acct.totals.burned = burned;
    acct.totals.debt_settled = debt_settled;
    acct.debt = debt;
    acct.lots.push(Lot {
        lot_id: new.lot_id,
        account_id: acct.account_id.clone(),
        source: new.source,
        amount: new.amount,
        remaining,
        burned: settle,
        expired: Money::ZERO,
        voided: Money::ZERO,
        priority: new.priority,
        granted_at: new.granted_at,
        expires_at: new.expires_at,
        status: LotStatus::Open,
        closed_at: None,
    });
    Ok(Applied { postings, usage: None, touched_lots: vec![new.lot_id] })
}

fn close_lot(
    acct: &mut AccountState,
    lot_id: Uuid,
    at: DateTime<Utc>,
    to: LotStatus,
) -> Result<Applied, DomainError> {
    let lot = acct.lot_mut(lot_id)?;
    if lot.status != LotStatus::Open {
        // An expiry racing a void (or a second sweep) finds the lot closed: nothing to move.
        // A void of a closed lot is a caller's mistake and is refused.
        return match to {
            LotStatus::Expired => Ok(Applied::default()),
            _ => Err(DomainError::LotClosed(lot_id)),
        };
    }
    if to == LotStatus::Expired && at < lot.expires_at {
        return Err(DomainError::ExpiryTooEarly { lot_id, expires_at: lot.expires_at.to_rfc3339() });
    }
    let amount = lot.remaining;
    let counter = match to {
        LotStatus::Expired => LedgerAccount::Breakage,
        _ => LedgerAccount::VoidedCredits,
    };
    let new_total = match to {
        LotStatus::Expired => acct.totals.expired.checked_add(amount)?,
        _ => acct.totals.voided.checked_add(amount)?,
    };
    let lot = acct.lot_mut(lot_id)?;
    lot.remaining = Money::ZERO;
    lot.status = to;
    lot.closed_at = Some(at);
    match to {
        LotStatus::Expired => {
            lot.expired = amount;
            acct.totals.expired = new_total;
        }
        _ => {
            lot.voided = amount;
            acct.totals.voided = new_total;
        }
    }
    let postings = if amount.is_zero() {
        Vec::new()
    } else {
        vec![
            Posting::on_lot(LedgerAccount::CustomerCredits, amount, lot_id),
            Posting::on_lot(counter, amount.neg(), lot_id),
        ]
    };
    Ok(Applied { postings, usage: None, touched_lots: vec![lot_id] })
}

fn charge_usage(
    acct: &mut AccountState,
    u: &Usage,
    at: DateTime<Utc>,
    prices: &PriceBook,
) -> Result<Applied, DomainError> {
    let pricing = prices.price(at, &u.provider, &u.model, &u.tokens)?;
    let upstream = pricing.upstream_cost;

    if !u.credential_kind.is_charged() {
        let attributed_total = acct.totals.byok_attributed.checked_add(upstream)?;
        acct.totals.byok_attributed = attributed_total;
        let postings = if upstream.is_zero() {
            Vec::new()
        } else {
            vec![
                Posting::new(LedgerAccount::ByokAttributedCost, upstream),
                Posting::new(LedgerAccount::ByokAttributedCostContra, upstream.neg()),
            ]
        };
        return Ok(Applied {
            postings,
            usage: Some(UsageCharge {
                price_version: pricing.version,
                price_basis: pricing.basis,
                upstream_cost: upstream,
                fee: Money::ZERO,
                burned: Money::ZERO,
                debt_incurred: Money::ZERO,
                attributed: upstream,
            }),
            touched_lots: Vec::new(),
        });
    }

    let fee = match (&pricing.fee_policy, pricing.basis) {
        // Nothing to take a percentage of, and no agreed price: charge nothing, report it.
        (_, PriceBasis::Unpriced) | (None, _) => Money::ZERO,
        (Some(policy), _) => policy.fee(upstream, u.is_success())?,
    };
    let charge = upstream.checked_add(fee)?;

    // Plan the burn on a sorted view, then mutate: no error can occur after the first write.
    let mut order: Vec<usize> = (0..acct.lots.len()).filter(|&i| acct.lots[i].can_burn_at(at)).collect();
    order.sort_by_key(|&i| acct.lots[i].burn_order_key());
    let mut left = charge;
    let mut plan: Vec<(usize, Money)> = Vec::new();
    for i in order {
        if !left.is_positive() {
            break;
        }
        let take = acct.lots[i].remaining.min(left);
        left = left.checked_sub(take)?;
        plan.push((i, take));
    }
    let burned = charge.checked_sub(left)?;
    let debt_incurred = left;
    let new_totals = Totals {
        burned: acct.totals.burned.checked_add(burned)?,
        debt_incurred: acct.totals.debt_incurred.checked_add(debt_incurred)?,
        charged_upstream: acct.totals.charged_upstream.checked_add(upstream)?,
        charged_fee: acct.totals.charged_fee.checked_add(fee)?,
        ..acct.totals.clone()
    };
    let new_debt = acct.debt.checked_add(debt_incurred)?;
    let mut lot_updates = Vec::with_capacity(plan.len());
    for &(i, take) in &plan {
        let lot = &acct.lots[i];
        lot_updates.push((i, lot.remaining.checked_sub(take)?, lot.burned.checked_add(take)?));
    }

    let mut postings = Vec::with_capacity(plan.len() + 3);
    let mut touched_lots = Vec::with_capacity(plan.len());
    for (&(i, take), (_, remaining, lot_burned)) in plan.iter().zip(lot_updates) {
        let lot = &mut acct.lots[i];
        lot.remaining = remaining;
        lot.burned = lot_burned;
        postings.push(Posting::on_lot(LedgerAccount::CustomerCredits, take, lot.lot_id));
        touched_lots.push(lot.lot_id);
    }
    if debt_incurred.is_positive() {
        postings.push(Posting::new(LedgerAccount::CustomerDebt, debt_incurred));
    }
    if upstream.is_positive() {
        postings.push(Posting::new(LedgerAccount::RevenueUpstreamCost, upstream.neg()));
    }
    if fee.is_positive() {
        postings.push(Posting::new(LedgerAccount::RevenueProcessingFee, fee.neg()));
    }
    acct.totals = new_totals;
    acct.debt = new_debt;

    Ok(Applied {
        postings,
        usage: Some(UsageCharge {
            price_version: pricing.version,
            price_basis: pricing.basis,
            upstream_cost: upstream,
            fee,
            burned,
            debt_incurred,
            attributed: Money::ZERO,
        }),
        touched_lots,
    })
}
