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
        Ledger { prices, ..Ledger::default() }
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
