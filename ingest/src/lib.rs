//! tally's event store: the ledger made durable in PostgreSQL.
//!
//! - [`db`]: connect (creating the database when missing) and migrate.
//! - [`store`]: [`Store::ingest`], one transaction per batch: dedupe by event id, record
//!   conflicts, apply the pure domain (`tally-ledger`) and write every projection.
//! - `project` (private): the projection writers shared by the live path and [`rebuild`].
//! - [`query`]: the read side (balances, ledger entries, usage, decisions, conflicts).
//! - [`request_log`]: request logs, one row per attempt, read from the usage events.
//! - [`statement`]: finance exports (account statements, platform reports) from ledger lines.
//! - [`rebuild`]: replay the log into fresh projections.
//! - [`sweep`]: append expiry events for lots past their expiry.
//! - [`kafka`]: the pipeline over Kafka (topics, the ingest consumer group, feedback).
//! - [`fleet`]: fleet-wide model metrics, mergeable across ingest instances.
//! - [`telemetry`]: Prometheus metrics of the ingest side.

pub mod db;
pub mod error;
pub mod fleet;
pub mod kafka;
mod project;
pub mod query;
pub mod rebuild;
pub mod request_log;
mod state;
pub mod statement;
pub mod store;
pub mod sweep;
pub mod telemetry;

pub use error::StoreError;
pub use store::{BatchMode, BatchReport, Idempotency, Store, StoredResponse};
