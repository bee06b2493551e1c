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
        Money::try_sum(
            self.lots
                .iter()
                .filter(|l| l.status == LotStatus::Open)
                .map(|l| l.remaining),
        )
    }

    /// What managed usage at `at` could still burn.
    pub fn spendable_at(&self, at: DateTime<Utc>) -> Result<Money, DomainError> {
        Money::try_sum(
            self.lots
                .iter()
                .filter(|l| l.can_burn_at(at))
                .map(|l| l.remaining),
        )
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
        self.upstream_cost
            .checked_add(self.fee)
            .unwrap_or(Money::ZERO)
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
        // Opening an account that has state is what the early branch refuses; kept total here.
        EventBody::AccountOpened(_) => {
            return Err(DomainError::AccountExists(event.account_id.clone()));
        }
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
        LotSource::Purchase => (
            acct.totals.purchased.checked_add(new.amount)?,
            acct.totals.granted,
        ),
        LotSource::Grant => (
            acct.totals.purchased,
            acct.totals.granted.checked_add(new.amount)?,
        ),
    };
    let burned = acct.totals.burned.checked_add(settle)?;
    let debt_settled = acct.totals.debt_settled.checked_add(settle)?;
    let debt = acct.debt.checked_sub(settle)?;

    let mut postings = vec![Posting::new(source_account, new.amount)];
    postings.push(Posting::on_lot(
        LedgerAccount::CustomerCredits,
        remaining.neg(),
        new.lot_id,
    ));
    if settle.is_positive() {
        postings.push(Posting::on_lot(
            LedgerAccount::CustomerDebt,
            settle.neg(),
            new.lot_id,
        ));
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
    Ok(Applied {
        postings,
        usage: None,
        touched_lots: vec![new.lot_id],
    })
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
        return Err(DomainError::ExpiryTooEarly {
            lot_id,
            expires_at: lot.expires_at.to_rfc3339(),
        });
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
    Ok(Applied {
        postings,
        usage: None,
        touched_lots: vec![lot_id],
    })
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
    let mut order: Vec<usize> = (0..acct.lots.len())
        .filter(|&i| acct.lots[i].can_burn_at(at))
        .collect();
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
        lot_updates.push((
            i,
            lot.remaining.checked_sub(take)?,
            lot.burned.checked_add(take)?,
        ));
    }

    let mut postings = Vec::with_capacity(plan.len() + 3);
    let mut touched_lots = Vec::with_capacity(plan.len());
    for (&(i, take), (_, remaining, lot_burned)) in plan.iter().zip(lot_updates) {
        let lot = &mut acct.lots[i];
        lot.remaining = remaining;
        lot.burned = lot_burned;
        postings.push(Posting::on_lot(
            LedgerAccount::CustomerCredits,
            take,
            lot.lot_id,
        ));
        touched_lots.push(lot.lot_id);
    }
    if debt_incurred.is_positive() {
        postings.push(Posting::new(LedgerAccount::CustomerDebt, debt_incurred));
    }
    if upstream.is_positive() {
        postings.push(Posting::new(
            LedgerAccount::RevenueUpstreamCost,
            upstream.neg(),
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::builtin_price_version;
    use crate::event::{
        AccountOpened, CredentialKind, CreditsGranted, CreditsPurchased, LotExpired, LotVoided,
        TokenCounts, TokenSource,
    };
    use chrono::{Duration, TimeZone};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn book() -> PriceBook {
        PriceBook::new(vec![builtin_price_version()]).unwrap()
    }

    fn lot_id(n: u128) -> Uuid {
        Uuid::from_u128(0x1000 + n)
    }

    fn ev(at: DateTime<Utc>, body: EventBody) -> Event {
        Event {
            event_id: Uuid::new_v4(),
            occurred_at: at,
            account_id: "acme".to_string(),
            body,
        }
    }

    fn opened() -> Option<AccountState> {
        let mut state = None;
        let open = ev(
            t0(),
            EventBody::AccountOpened(AccountOpened {
                name: "Acme".into(),
                low_balance_threshold_usd: Money::ZERO,
            }),
        );
        apply(&mut state, &open, &book()).unwrap();
        state
    }

    fn purchase(at: DateTime<Utc>, n: u128, cents: i64) -> Event {
        ev(
            at,
            EventBody::CreditsPurchased(CreditsPurchased {
                lot_id: lot_id(n),
                amount_usd: Money::from_cents(cents),
                payment_reference: None,
            }),
        )
    }

    fn grant(
        at: DateTime<Utc>,
        n: u128,
        cents: i64,
        expires_at: DateTime<Utc>,
        priority: i32,
    ) -> Event {
        ev(
            at,
            EventBody::CreditsGranted(CreditsGranted {
                lot_id: lot_id(n),
                amount_usd: Money::from_cents(cents),
                expires_at,
                priority,
                reason: "promo".into(),
            }),
        )
    }

    fn usage(
        at: DateTime<Utc>,
        kind: CredentialKind,
        provider: &str,
        model: &str,
        tokens: TokenCounts,
    ) -> Event {
        ev(
            at,
            EventBody::Usage(Usage {
                request_id: "req-1".into(),
                attempt: 1,
                endpoint_id: "default".into(),
                api_key_id: "key-1".into(),
                provider: provider.into(),
                model: model.into(),
                credential_kind: kind,
                credential_id: "cred-1".into(),
                tokens,
                token_source: TokenSource::Provider,
                upstream_latency_ms: 10,
                total_latency_ms: 12,
                status: 200,
                streaming: false,
            }),
        )
    }

    /// gpt-4o input at $2.50 per million tokens: `cents` worth of upstream cost.
    fn gpt4o(at: DateTime<Utc>, kind: CredentialKind, upstream_cents: i64) -> Event {
        let tokens = TokenCounts {
            input: upstream_cents * 4_000,
            ..TokenCounts::default()
        };
        usage(at, kind, "openai", "gpt-4o", tokens)
    }

    fn lot(state: &Option<AccountState>, n: u128) -> &Lot {
        state
            .as_ref()
            .unwrap()
            .lots
            .iter()
            .find(|l| l.lot_id == lot_id(n))
            .unwrap()
    }

    fn c(cents: i64) -> Money {
        Money::from_cents(cents)
    }

    #[test]
    fn events_before_the_account_is_opened_or_reopening_it_are_refused() {
        let mut state = None;
        assert_eq!(
            apply(&mut state, &purchase(t0(), 1, 500), &book()),
            Err(DomainError::UnknownAccount("acme".into()))
        );
        assert_eq!(state, None);
        let mut state = opened();
        let before = state.clone();
        let again = ev(
            t0(),
            EventBody::AccountOpened(AccountOpened {
                name: "B".into(),
                low_balance_threshold_usd: c(0),
            }),
        );
        assert_eq!(
            apply(&mut state, &again, &book()),
            Err(DomainError::AccountExists("acme".into()))
        );
        assert_eq!(state, before);
    }

    #[test]
    fn a_purchase_opens_a_lot_with_balanced_postings() {
        let mut state = opened();
        let applied = apply(&mut state, &purchase(t0(), 1, 2_500), &book()).unwrap();
        assert_eq!(
            applied.postings,
            vec![
                Posting::new(LedgerAccount::PaymentsReceived, c(2_500)),
                Posting::on_lot(LedgerAccount::CustomerCredits, c(-2_500), lot_id(1)),
            ]
        );
        assert_eq!(applied.touched_lots, vec![lot_id(1)]);
        let l = lot(&state, 1);
        assert_eq!(
            (l.source, l.priority, l.remaining),
            (LotSource::Purchase, lot::PURCHASE_PRIORITY, c(2_500))
        );
        assert_eq!(l.expires_at, t0() + Duration::days(365));
        assert_eq!(state.as_ref().unwrap().totals.purchased, c(2_500));
    }

    #[test]
    fn refused_events_leave_the_state_exactly_as_it_was() {
        let mut state = opened();
        apply(&mut state, &purchase(t0(), 1, 1_000), &book()).unwrap();
        let before = state.clone();
        let refused = [
            (purchase(t0(), 1, 700), DomainError::DuplicateLot(lot_id(1))),
            (purchase(t0(), 2, 499), DomainError::PurchaseBelowMinimum),
            (
                grant(t0(), 3, 100, t0(), 0),
                DomainError::ExpiryNotAfterGrant,
            ),
            (
                ev(
                    t0(),
                    EventBody::LotVoided(LotVoided {
                        lot_id: lot_id(9),
                        reason: String::new(),
                    }),
                ),
                DomainError::UnknownLot(lot_id(9)),
            ),
            (
                ev(
                    t0() + Duration::days(364),
                    EventBody::LotExpired(LotExpired { lot_id: lot_id(1) }),
                ),
                DomainError::ExpiryTooEarly {
                    lot_id: lot_id(1),
                    expires_at: (t0() + Duration::days(365)).to_rfc3339(),
                },
            ),
        ];
        for (event, error) in refused {
            assert_eq!(apply(&mut state, &event, &book()), Err(error));
            assert_eq!(state, before);
        }
    }

    #[test]
    fn voiding_a_closed_lot_is_refused_and_expiring_it_again_moves_nothing() {
        let mut state = opened();
        apply(&mut state, &purchase(t0(), 1, 1_000), &book()).unwrap();
        let void = ev(
            t0(),
            EventBody::LotVoided(LotVoided {
                lot_id: lot_id(1),
                reason: "refund".into(),
            }),
        );
        let applied = apply(&mut state, &void, &book()).unwrap();
        assert_eq!(
            applied.postings,
            vec![
                Posting::on_lot(LedgerAccount::CustomerCredits, c(1_000), lot_id(1)),
                Posting::on_lot(LedgerAccount::VoidedCredits, c(-1_000), lot_id(1)),
            ]
        );
        assert_eq!(
            (lot(&state, 1).status, lot(&state, 1).voided),
            (LotStatus::Voided, c(1_000))
        );
        let before = state.clone();
        assert_eq!(
            apply(&mut state, &void, &book()),
            Err(DomainError::LotClosed(lot_id(1)))
        );
        // An expiry sweep racing the void finds it closed: nothing to move, whatever its time.
        let expire = ev(
            t0(),
            EventBody::LotExpired(LotExpired { lot_id: lot_id(1) }),
        );
        assert_eq!(apply(&mut state, &expire, &book()), Ok(Applied::default()));
        assert_eq!(state, before);
    }

    #[test]
    fn an_empty_lot_expires_without_postings() {
        let mut state = opened();
        apply(&mut state, &purchase(t0(), 1, 500), &book()).unwrap();
        apply(
            &mut state,
            &gpt4o(t0(), CredentialKind::Managed, 1_000),
            &book(),
        )
        .unwrap();
        assert!(lot(&state, 1).remaining.is_zero());
        let expire = ev(
            t0() + Duration::days(365),
            EventBody::LotExpired(LotExpired { lot_id: lot_id(1) }),
        );
        let applied = apply(&mut state, &expire, &book()).unwrap();
        assert!(applied.postings.is_empty());
        assert_eq!(applied.touched_lots, vec![lot_id(1)]);
        assert_eq!(
            (lot(&state, 1).status, lot(&state, 1).expired),
            (LotStatus::Expired, Money::ZERO)
        );
    }

    #[test]
    fn usage_burns_by_priority_then_earliest_expiry_then_oldest() {
        let mut state = opened();
        let t = t0();
        apply(&mut state, &purchase(t, 1, 1_000), &book()).unwrap(); // priority 100
        apply(
            &mut state,
            &grant(t, 2, 200, t + Duration::days(60), 10),
            &book(),
        )
        .unwrap();
        apply(
            &mut state,
            &grant(t, 3, 200, t + Duration::days(30), 10),
            &book(),
        )
        .unwrap();
        apply(
            &mut state,
            &grant(t + Duration::hours(1), 4, 200, t + Duration::days(30), 10),
            &book(),
        )
        .unwrap();
        apply(
            &mut state,
            &grant(t, 5, 200, t + Duration::days(90), 50),
            &book(),
        )
        .unwrap();
        // $10.00 upstream + 5% fee = $10.50: lots 3, 4, 2 (priority 10, by expiry then age),
        // then lot 5 (priority 50), then $2.50 of the purchase.
        let applied = apply(
            &mut state,
            &gpt4o(t + Duration::hours(2), CredentialKind::Managed, 1_000),
            &book(),
        )
        .unwrap();
        let charge = applied.usage.clone().unwrap();
        assert_eq!(
            (charge.upstream_cost, charge.fee, charge.burned),
            (c(1_000), c(50), c(1_050))
        );
        assert_eq!(
            applied.touched_lots,
            vec![lot_id(3), lot_id(4), lot_id(2), lot_id(5), lot_id(1)]
        );
        assert_eq!(lot(&state, 1).remaining, c(750));
        assert_eq!(
            applied.postings,
            vec![
                Posting::on_lot(LedgerAccount::CustomerCredits, c(200), lot_id(3)),
                Posting::on_lot(LedgerAccount::CustomerCredits, c(200), lot_id(4)),
                Posting::on_lot(LedgerAccount::CustomerCredits, c(200), lot_id(2)),
                Posting::on_lot(LedgerAccount::CustomerCredits, c(200), lot_id(5)),
                Posting::on_lot(LedgerAccount::CustomerCredits, c(250), lot_id(1)),
                Posting::new(LedgerAccount::RevenueUpstreamCost, c(-1_000)),
                Posting::new(LedgerAccount::RevenueProcessingFee, c(-50)),
            ]
        );
    }

    #[test]
    fn late_usage_skips_lots_granted_after_it_and_closed_lots() {
        let mut state = opened();
        let t = t0();
        apply(
            &mut state,
            &grant(t + Duration::days(1), 1, 1_000, t + Duration::days(10), 0),
            &book(),
        )
        .unwrap();
        apply(
            &mut state,
            &grant(t, 2, 1_000, t + Duration::days(10), 5),
            &book(),
        )
        .unwrap();
        let void = ev(
            t,
            EventBody::LotVoided(LotVoided {
                lot_id: lot_id(2),
                reason: String::new(),
            }),
        );
        apply(&mut state, &void, &book()).unwrap();
        // Happened before lot 1 existed, and lot 2 is voided: all debt.
        let applied = apply(
            &mut state,
            &gpt4o(t + Duration::hours(1), CredentialKind::Managed, 100),
            &book(),
        )
        .unwrap();
        assert_eq!(applied.usage.unwrap().debt_incurred, c(105));
        assert!(applied.touched_lots.is_empty());
        assert_eq!(lot(&state, 1).remaining, c(1_000));
        assert_eq!(state.as_ref().unwrap().debt, c(105));
    }

    #[test]
    fn a_purchase_settles_debt_first_and_a_grant_does_not() {
        let mut state = opened();
        let t = t0();
        let applied = apply(
            &mut state,
            &gpt4o(t, CredentialKind::Managed, 1_000),
            &book(),
        )
        .unwrap();
        assert_eq!(applied.usage.unwrap().debt_incurred, c(1_050));
        assert!(
            applied
                .postings
                .contains(&Posting::new(LedgerAccount::CustomerDebt, c(1_050)))
        );

        let applied = apply(
            &mut state,
            &grant(t, 1, 2_000, t + Duration::days(30), 0),
            &book(),
        )
        .unwrap();
        assert_eq!(state.as_ref().unwrap().debt, c(1_050));
        assert!(
            applied
                .postings
                .iter()
                .all(|p| p.ledger_account != LedgerAccount::CustomerDebt)
        );

        let applied = apply(&mut state, &purchase(t, 2, 600), &book()).unwrap();
        assert_eq!(
            applied.postings,
            vec![
                Posting::new(LedgerAccount::PaymentsReceived, c(600)),
                Posting::on_lot(LedgerAccount::CustomerDebt, c(-600), lot_id(2)),
            ]
        );
        assert_eq!(
            (lot(&state, 2).remaining, lot(&state, 2).burned),
            (Money::ZERO, c(600))
        );
        apply(&mut state, &purchase(t, 3, 1_000), &book()).unwrap();
        assert_eq!(
            (lot(&state, 3).remaining, lot(&state, 3).burned),
            (c(550), c(450))
        );
        let s = state.unwrap();
        assert_eq!(s.debt, Money::ZERO);
        assert_eq!(
            (
                s.totals.debt_incurred,
                s.totals.debt_settled,
                s.totals.burned
            ),
            (c(1_050), c(1_050), c(1_050))
        );
    }

    #[test]
    fn byok_and_attached_usage_is_attributed_never_charged() {
        for kind in [CredentialKind::Byok, CredentialKind::Attached] {
            let mut state = opened();
            apply(&mut state, &purchase(t0(), 1, 500), &book()).unwrap();
            let applied = apply(&mut state, &gpt4o(t0(), kind, 250), &book()).unwrap();
            let charge = applied.usage.unwrap();
            assert_eq!((charge.upstream_cost, charge.attributed), (c(250), c(250)));
            assert_eq!(
                (charge.fee, charge.burned, charge.debt_incurred),
                (Money::ZERO, Money::ZERO, Money::ZERO)
            );
            assert_eq!(
                applied.postings,
                vec![
                    Posting::new(LedgerAccount::ByokAttributedCost, c(250)),
                    Posting::new(LedgerAccount::ByokAttributedCostContra, c(-250)),
                ]
            );
            let s = state.unwrap();
            assert_eq!(
                (
                    s.totals.byok_attributed,
                    s.totals.burned,
                    s.lots[0].remaining
                ),
                (c(250), Money::ZERO, c(500))
            );
        }
    }

    #[test]
    fn unpriced_usage_charges_nothing_and_says_so() {
        let mut state = opened();
        apply(&mut state, &purchase(t0(), 1, 500), &book()).unwrap();
        let tokens = TokenCounts {
            input: 1_000_000,
            output: 1_000_000,
            ..TokenCounts::default()
        };
        let unknown = apply(
            &mut state,
            &usage(t0(), CredentialKind::Managed, "ollama", "llama3", tokens),
            &book(),
        );
        let charge = unknown.unwrap().usage.unwrap();
        assert_eq!(charge.price_basis, PriceBasis::Unpriced);
        assert_eq!(
            charge.price_version.as_deref(),
            Some(crate::catalog::BUILTIN_VERSION)
        );
        assert_eq!(charge.charged(), Money::ZERO);
        // Before the first price version took effect there is no version at all.
        let early = Utc.with_ymd_and_hms(2024, 12, 31, 23, 59, 59).unwrap();
        let applied = apply(
            &mut state,
            &usage(early, CredentialKind::Managed, "openai", "gpt-4o", tokens),
            &book(),
        )
        .unwrap();
        let charge = applied.usage.unwrap();
        assert_eq!(
            (charge.price_version, charge.price_basis),
            (None, PriceBasis::Unpriced)
        );
        assert!(applied.postings.is_empty());
        assert_eq!(lot(&state, 1).remaining, c(500));
    }

    #[test]
    fn zero_tokens_cost_nothing_and_post_nothing() {
        let mut state = opened();
        apply(&mut state, &purchase(t0(), 1, 500), &book()).unwrap();
        let applied = apply(
            &mut state,
            &gpt4o(t0(), CredentialKind::Managed, 0),
            &book(),
        )
        .unwrap();
        assert!(applied.postings.is_empty() && applied.touched_lots.is_empty());
        assert_eq!(applied.usage.unwrap().charged(), Money::ZERO);
    }

    #[test]
    fn spendable_counts_only_lots_inside_their_window() {
        let mut state = opened();
        let t = t0();
        apply(
            &mut state,
            &grant(t, 1, 300, t + Duration::days(1), 0),
            &book(),
        )
        .unwrap();
        apply(
            &mut state,
            &purchase(t + Duration::hours(1), 2, 500),
            &book(),
        )
        .unwrap();
        let s = state.unwrap();
        assert_eq!(s.remaining().unwrap(), c(800));
        assert_eq!(
            s.spendable_at(t - Duration::nanoseconds(1)).unwrap(),
            Money::ZERO
        );
        assert_eq!(s.spendable_at(t).unwrap(), c(300));
        assert_eq!(s.spendable_at(t + Duration::hours(1)).unwrap(), c(800));
        assert_eq!(s.spendable_at(t + Duration::days(1)).unwrap(), c(500));
    }
}
