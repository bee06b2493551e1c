//! tally's event store: the ledger made durable in PostgreSQL.
//!
//! - [`db`]: connect (creating the database when missing) and migrate.
//! - [`store`]: [`Store::ingest`], one transaction per batch: dedupe by event id, record
//!   conflicts, apply the pure domain (`tally-ledger`) and write every projection.
//! - `project` (private): the projection writers shared by the live path and [`rebuild`].
//! - [`query`]: the read side (balances, ledger entries, usage, decisions, conflicts).
//! - [`rebuild`]: replay the log into fresh projections.
//! - [`sweep`]: append expiry events for lots past their expiry.

pub mod db;
pub mod error;
mod project;
pub mod query;
pub mod rebuild;
mod state;
pub mod store;
pub mod sweep;

pub use error::StoreError;
pub use store::{BatchMode, BatchReport, Idempotency, Store, StoredResponse};
