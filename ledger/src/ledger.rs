//! An in-memory ledger: the whole fold, with idempotency by event id. The PostgreSQL store does
//! the same thing durably; this one is the reference the store is tested against, and what the
//! property tests drive.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use crate::account::{AccountState, Applied, apply};
use crate::error::DomainError;
use crate::event::Event;
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
                self.seen.insert(event.event_id, hash);
                if let Some(s) = state {
                    self.accounts.insert(event.account_id.clone(), s);
                }
                Outcome::Applied(applied)
            }
            Err(e) => Outcome::Rejected(e),
        }
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
