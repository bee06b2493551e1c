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
        .map(|l| {
            if l.granted_at > now {
                l.granted_at
            } else {
                l.expires_at
            }
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::apply;
    use crate::catalog::builtin_price_version;
    use crate::event::{
        AccountOpened, CredentialKind, CreditsGranted, CreditsPurchased, Event, EventBody,
        TokenCounts, TokenSource, Usage,
    };
    use crate::pricing::PriceBook;
    use chrono::{Duration, TimeZone};
    use uuid::Uuid;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap()
    }

    fn c(cents: i64) -> Money {
        Money::from_cents(cents)
    }

    fn fold(threshold_cents: i64, bodies: Vec<(DateTime<Utc>, EventBody)>) -> AccountState {
        let book = PriceBook::new(vec![builtin_price_version()]).unwrap();
        let mut state = None;
        let open = EventBody::AccountOpened(AccountOpened {
            name: "Acme".into(),
            low_balance_threshold_usd: c(threshold_cents),
        });
        for (at, body) in std::iter::once((t0(), open)).chain(bodies) {
            let event = Event {
                event_id: Uuid::new_v4(),
                occurred_at: at,
                account_id: "acme".into(),
                body,
            };
            apply(&mut state, &event, &book).unwrap();
        }
        state.unwrap()
    }

    fn purchase(n: u128, cents: i64) -> EventBody {
        EventBody::CreditsPurchased(CreditsPurchased {
            lot_id: Uuid::from_u128(n),
            amount_usd: c(cents),
            payment_reference: None,
        })
    }

    fn grant(n: u128, cents: i64, expires_at: DateTime<Utc>) -> EventBody {
        EventBody::CreditsGranted(CreditsGranted {
            lot_id: Uuid::from_u128(n),
            amount_usd: c(cents),
            expires_at,
            priority: 0,
            reason: String::new(),
        })
    }

    /// Managed gpt-4o usage costing `upstream_cents` plus the 5% fee.
    fn managed(upstream_cents: i64) -> EventBody {
        EventBody::Usage(Usage {
            request_id: "req-1".into(),
            attempt: 1,
            endpoint_id: "default".into(),
            api_key_id: "key-1".into(),
            provider: "openai".into(),
            model: "gpt-4o".into(),
            credential_kind: CredentialKind::Managed,
            credential_id: "managed-openai".into(),
            tokens: TokenCounts {
                input: upstream_cents * 4_000,
                ..TokenCounts::default()
            },
            token_source: TokenSource::Provider,
            upstream_latency_ms: 1,
            total_latency_ms: 1,
            status: 200,
            streaming: false,
        })
    }

    #[test]
    fn a_new_account_has_no_credits_but_byok_is_allowed() {
        let d = decide(&fold(0, vec![]), t0()).unwrap();
        assert!(!d.allow_managed && d.allow_byok);
        assert_eq!(d.reason, DecisionReason::CreditsExhausted);
        assert_eq!((d.available_usd, d.next_change_at), (Money::ZERO, None));
    }

    #[test]
    fn low_balance_is_at_or_below_the_threshold() {
        let s = fold(500, vec![(t0(), purchase(1, 500))]);
        let d = decide(&s, t0()).unwrap();
        assert_eq!(
            (d.allow_managed, d.reason, d.low_balance),
            (true, DecisionReason::LowBalance, true)
        );
        let s = fold(499, vec![(t0(), purchase(1, 500))]);
        let d = decide(&s, t0()).unwrap();
        assert_eq!(
            (d.allow_managed, d.reason, d.low_balance),
            (true, DecisionReason::Ok, false)
        );
    }

    #[test]
    fn debt_is_taken_from_what_is_available() {
        // $10.50 of usage with no credits is debt; a $10.00 grant does not settle it.
        let s = fold(
            0,
            vec![
                (t0(), managed(1_000)),
                (t0(), grant(1, 1_000, t0() + Duration::days(30))),
            ],
        );
        let d = decide(&s, t0()).unwrap();
        assert_eq!(
            (d.spendable_usd, d.debt_usd, d.available_usd),
            (c(1_000), c(1_050), c(-50))
        );
        assert!(!d.allow_managed);
        assert_eq!(d.reason, DecisionReason::CreditsExhausted);
        // Exactly zero available is exhausted too.
        let s = fold(
            0,
            vec![
                (t0(), managed(1_000)),
                (t0(), grant(1, 1_050, t0() + Duration::days(30))),
            ],
        );
        let d = decide(&s, t0()).unwrap();
        assert_eq!((d.available_usd, d.allow_managed), (Money::ZERO, false));
        // A purchase pays the debt first: $20.00 leaves $9.50.
        let s = fold(0, vec![(t0(), managed(1_000)), (t0(), purchase(2, 2_000))]);
        let d = decide(&s, t0()).unwrap();
        assert_eq!(
            (d.available_usd, d.debt_usd, d.allow_managed),
            (c(950), Money::ZERO, true)
        );
    }

    #[test]
    fn lots_count_only_inside_their_window_and_the_next_change_is_the_nearest_boundary() {
        let t = t0();
        let s = fold(
            0,
            vec![
                (t + Duration::days(2), grant(1, 300, t + Duration::days(5))),
                (t + Duration::days(1), grant(2, 200, t + Duration::days(3))),
            ],
        );
        let before = decide(&s, t).unwrap();
        assert!(!before.allow_managed);
        assert_eq!(before.next_change_at, Some(t + Duration::days(1)));
        let one = decide(&s, t + Duration::days(1)).unwrap();
        assert_eq!(
            (one.spendable_usd, one.next_change_at),
            (c(200), Some(t + Duration::days(2)))
        );
        let both = decide(&s, t + Duration::days(2)).unwrap();
        assert_eq!(
            (both.spendable_usd, both.next_change_at),
            (c(500), Some(t + Duration::days(3)))
        );
        let last = decide(&s, t + Duration::days(3)).unwrap();
        assert_eq!(
            (last.spendable_usd, last.next_change_at),
            (c(300), Some(t + Duration::days(5)))
        );
        let none = decide(&s, t + Duration::days(5)).unwrap();
        assert_eq!((none.allow_managed, none.next_change_at), (false, None));
    }
}
