//! tally's gateway core: the OpenAI/Anthropic-compatible proxy whose every attempt becomes a
//! usage event.
//!
//! - [`keys`] and [`secrets`]: gateway API keys (hash + public id, constant-time checks) and
//!   provider credentials sealed with an AEAD; [`admin`]: their write-only admin API.
//! - [`catalog`]: providers, their API shapes and models.
//! - [`config`]: restrictions, timeouts, managed keys, base URL overrides.
//! - [`proxy`]: authentication, model resolution, credential order, enforcement, failover and
//!   metering, for `/v1/chat/completions`, `/v1/messages` and `/v1/models`.
//! - [`strategy`] and [`metrics`]: CEL model selection over live metrics, and `tally/auto`.
//! - [`routes`]: logical model names resolving to fallback chains or weighted splits.
//! - [`decisions`]: the in-memory enforcement cache the request path reads.
//! - [`sink`]: where usage events go ([`sink::EventSink`]); in process by default.
//! - [`kafka_sink`]: the Kafka sink, write-ahead through a bounded on-disk [`spool`].
//! - [`spool`]: a durable FIFO of records on local disk (redb).
//! - [`feedback`]: decisions and fleet metrics from the Kafka pipeline into those caches.
//! - [`trace`]: W3C trace context in from clients and out with every usage event.
//! - [`tokens`]: tiktoken estimates when a provider reports no usage.
//! - [`egress`]: where custom providers may connect (no private or metadata addresses).
//! - [`error`]: gateway errors in each API's own shape.
//! - [`telemetry`]: Prometheus metrics of the gateway.
//! - [`mock`]: a mock OpenAI/Anthropic upstream for tests, benchmarks and the demo.

pub mod admin;
pub mod catalog;
pub mod config;
pub mod decisions;
pub mod egress;
pub mod error;
pub mod feedback;
pub mod kafka_sink;
pub mod keys;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod routes;
pub mod secrets;
pub mod sink;
pub mod spool;
pub mod strategy;
pub mod telemetry;
pub mod tokens;
pub mod trace;
