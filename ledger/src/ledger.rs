//! An in-memory ledger: the whole fold, with idempotency by event id. The PostgreSQL store does
//! the same thing durably; this one is the reference the store is tested against, and what the
//! property tests drive.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use crate::account::{AccountState, Applied, apply};
use crate::error::DomainError;
use crate::event::{Event, EventBody};
use crate::pricing::PriceBook;

/// What became of one event offered to the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied(Applied),
    /// Same id, same payload: already counted, absorbed.
    Duplicate,
    /// Same id, different payload: recorded, not applied.
    Conflict,
    /// The domain refused it; nothing changed.
    Rejected(DomainError),
}

#[derive(Debug, Clone, Default)]
pub struct Ledger {
    prices: PriceBook,
    accounts: BTreeMap<String, AccountState>,
    seen: HashMap<Uuid, [u8; 32]>,
    conflicts: Vec<Uuid>,
}

impl Ledger {
    pub fn new(prices: PriceBook) -> Ledger {
        Ledger {
            prices,
            ..Ledger::default()
        }
    }

    pub fn offer(&mut self, event: &Event) -> Outcome {
        let hash = event.payload_hash();
        if let Some(seen) = self.seen.get(&event.event_id) {
            if *seen == hash {
                return Outcome::Duplicate;
            }
            self.conflicts.push(event.event_id);
            return Outcome::Conflict;
        }
        let mut state = self.accounts.get(&event.account_id).cloned();
        match apply(&mut state, event, &self.prices) {
            Ok(applied) => {
                if let Some(lot_id) = self.lot_of_another_account(event) {
                    return Outcome::Rejected(DomainError::DuplicateLot(lot_id));
                }
                self.seen.insert(event.event_id, hash);
                if let Some(s) = state {
                    self.accounts.insert(event.account_id.clone(), s);
                }
                Outcome::Applied(applied)
            }
            Err(e) => Outcome::Rejected(e),
        }
    }

    /// The lot id a purchase or grant would open, when another account already holds it.
    /// [`apply`] sees one account only, but lot ids are unique across all accounts (the store's
    /// `credit_lot` table is keyed by `lot_id` alone).
    fn lot_of_another_account(&self, event: &Event) -> Option<Uuid> {
        let lot_id = match &event.body {
            EventBody::CreditsPurchased(p) => p.lot_id,
            EventBody::CreditsGranted(g) => g.lot_id,
            _ => return None,
        };
        self.accounts
            .iter()
            .filter(|(id, _)| **id != event.account_id)
            .any(|(_, s)| s.lots.iter().any(|l| l.lot_id == lot_id))
            .then_some(lot_id)
    }

    pub fn account(&self, account_id: &str) -> Option<&AccountState> {
        self.accounts.get(account_id)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &AccountState> {
        self.accounts.values()
    }

    pub fn conflicts(&self) -> &[Uuid] {
        &self.conflicts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::builtin_price_version;
    use crate::event::{AccountOpened, CreditsGranted, CreditsPurchased, EventBody};
    use crate::money::Money;
    use chrono::{Duration, TimeZone, Utc};

    fn event(n: u128, account: &str, body: EventBody) -> Event {
        Event {
            event_id: Uuid::from_u128(n),
            occurred_at: Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap(),
            account_id: account.into(),
            body,
        }
    }

    fn opened(n: u128, account: &str) -> Event {
        event(
            n,
            account,
            EventBody::AccountOpened(AccountOpened {
                name: account.into(),
                low_balance_threshold_usd: Money::ZERO,
            }),
        )
    }

    fn purchase(n: u128, account: &str, lot: u128, cents: i64) -> Event {
        event(
            n,
            account,
            EventBody::CreditsPurchased(CreditsPurchased {
                lot_id: Uuid::from_u128(lot),
                amount_usd: Money::from_cents(cents),
                payment_reference: None,
            }),
        )
    }

    fn ledger() -> Ledger {
        let mut ledger = Ledger::new(PriceBook::new(vec![builtin_price_version()]).unwrap());
        for (n, account) in [(1, "a"), (2, "b")] {
            assert!(matches!(
                ledger.offer(&opened(n, account)),
                Outcome::Applied(_)
            ));
        }
        ledger
    }

    #[test]
    fn duplicates_are_absorbed_and_conflicts_recorded_not_applied() {
        let mut ledger = ledger();
        let p = purchase(10, "a", 100, 500);
        assert!(matches!(ledger.offer(&p), Outcome::Applied(_)));
        let state = ledger.account("a").cloned();
        assert_eq!(ledger.offer(&p), Outcome::Duplicate);
        let changed = purchase(10, "a", 100, 600);
        assert_eq!(ledger.offer(&changed), Outcome::Conflict);
        assert_eq!(ledger.conflicts(), &[Uuid::from_u128(10)]);
        assert_eq!(ledger.account("a").cloned(), state);
    }

    #[test]
    fn refused_events_are_not_remembered() {
        let mut ledger = ledger();
        let early = purchase(10, "c", 100, 500);
        assert_eq!(
            ledger.offer(&early),
            Outcome::Rejected(DomainError::UnknownAccount("c".into()))
        );
        assert!(matches!(
            ledger.offer(&opened(11, "c")),
            Outcome::Applied(_)
        ));
        assert!(matches!(ledger.offer(&early), Outcome::Applied(_)));
    }

    #[test]
    fn lot_ids_are_unique_across_accounts() {
        let mut ledger = ledger();
        assert!(matches!(
            ledger.offer(&purchase(10, "a", 100, 500)),
            Outcome::Applied(_)
        ));
        let before: Vec<AccountState> = ledger.accounts().cloned().collect();
        let lot = Uuid::from_u128(100);
        assert_eq!(
            ledger.offer(&purchase(11, "b", 100, 700)),
            Outcome::Rejected(DomainError::DuplicateLot(lot))
        );
        let grant = event(
            12,
            "b",
            EventBody::CreditsGranted(CreditsGranted {
                lot_id: lot,
                amount_usd: Money::from_cents(100),
                expires_at: Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap() + Duration::days(1),
                priority: 0,
                reason: String::new(),
            }),
        );
        assert_eq!(
            ledger.offer(&grant),
            Outcome::Rejected(DomainError::DuplicateLot(lot))
        );
        // Other refusals keep their own reason.
        assert_eq!(
            ledger.offer(&purchase(13, "b", 100, 499)),
            Outcome::Rejected(DomainError::PurchaseBelowMinimum)
        );
        assert_eq!(ledger.accounts().cloned().collect::<Vec<_>>(), before);
        // Refused, so the id is free to be used again with a valid payload.
        assert!(matches!(
            ledger.offer(&purchase(11, "b", 101, 700)),
            Outcome::Applied(_)
        ));
    }
}
