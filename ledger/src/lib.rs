//! tally's ledger domain, pure: no database, no network, no clock of its own.
//!
//! - [`money`]: US dollars as fixed-scale decimals with checked arithmetic.
//! - [`event`]: the events of the log (accounts, purchases, grants, voids, expiries, usage).
//! - [`lot`]: credit lots, their validity window and burn order.
//! - [`pricing`] and [`catalog`]: the versioned, effective-dated price book.
//! - [`posting`]: double-entry ledger accounts and postings.
//! - [`account`]: an account's state and [`account::apply`], the fold step of every projection.
//! - [`decision`]: allow or deny managed traffic.
//! - [`statement`]: finance statements and platform reports, folded from ledger lines.
//!
//! The PostgreSQL store (crate `tally-ingest`) loads state, calls [`account::apply`] inside one
//! transaction per batch and writes the results; replaying the log through the same function
//! rebuilds every projection.

pub mod account;
pub mod catalog;
pub mod decision;
pub mod error;
pub mod event;
pub mod ledger;
pub mod lot;
pub mod money;
pub mod posting;
pub mod pricing;
pub mod statement;

pub use account::{AccountState, Applied, Totals, UsageCharge, apply};
pub use decision::{Decision, DecisionReason, decide};
pub use error::DomainError;
pub use event::{CredentialKind, Event, EventBody, TokenCounts, TokenSource, Usage};
pub use ledger::{Ledger, Outcome};
pub use lot::{Lot, LotSource, LotStatus};
pub use money::Money;
pub use posting::{LedgerAccount, Posting};
pub use pricing::{PriceBasis, PriceBook, PriceVersion};
