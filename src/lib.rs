//! The `tally` application: configuration, the ledger role's HTTP API, process wiring and the
//! demo. Domain logic lives in `tally-ledger` (pure) and `tally-ingest` (PostgreSQL); this crate
//! only connects them to the outside.
//!
//! - [`config`]: flags and environment, validated before any IO.
//! - [`api`]: the HTTP API and its one error mapping.
//! - [`server`]: connect, migrate, serve, sweep expiries, stop on signal.
//! - [`alerts`]: low-balance, credits-exhausted and lot-expiry alerts as signed webhooks.
//! - [`observability`]: logs, and OpenTelemetry spans over OTLP when configured.
//! - [`pipeline`]: the Kafka pipeline's pieces (topics, gateway sink and feedback, ingest).
//! - [`demo`]: `tally demo`, end to end over the real API.
//! - [`cli`]: what each subcommand does.

pub mod alerts;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod observability;
pub mod pipeline;
pub mod server;
pub mod stack;
