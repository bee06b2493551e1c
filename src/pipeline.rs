//! The Kafka pipeline's pieces as the roles start them: topics, the gateway's sink and
//! feedback, and the ingest consumer.

use std::sync::Arc;

use anyhow::Context;
use tally_gateway_core::decisions::DecisionCache;
use tally_gateway_core::feedback;
use tally_gateway_core::kafka_sink::{
    KafkaSink, KafkaSinkConfig, KafkaSinkRunner, SpoolFullPolicy,
};
use tally_gateway_core::metrics::GlobalMetrics;
use tally_gateway_core::sink::EventSink;
use tally_ingest::Store;
use tally_ingest::kafka::{self, Ingest};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{KafkaSettings, SpoolFullArg};

/// How long a stopping gateway keeps shipping its spool to the broker (what the broker has
/// not taken by then stays in the spool for the next start), or, in process, retries a ledger
/// outage.
pub const SINK_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Fails fast, naming the brokers, when they do not answer; then creates missing topics.
pub async fn prepare(kafka: &KafkaSettings) -> anyhow::Result<()> {
    let cfg = kafka.config.clone();
    tokio::task::spawn_blocking(move || kafka::check_brokers(&cfg))
        .await?
        .with_context(|| format!("Kafka brokers {} do not answer", kafka.config.brokers))?;
    kafka::ensure_topics(&kafka.config)
        .await
        .context("creating the Kafka topics")?;
    Ok(())
}

/// The gateway's event sink over Kafka, with its on-disk spool. The runner is stopped (with
/// [`SINK_SHUTDOWN_TIMEOUT`]) only after the requests that produce events have ended.
pub async fn start_sink(
    kafka: &KafkaSettings,
) -> anyhow::Result<(Arc<dyn EventSink>, KafkaSinkRunner)> {
    let cfg = KafkaSinkConfig {
        brokers: kafka.config.brokers.clone(),
        topic: kafka.config.topics.usage.clone(),
        spool_dir: kafka.spool_dir.clone(),
        spool_max_bytes: kafka.spool_max_bytes,
        when_full: match kafka.spool_full_policy {
            SpoolFullArg::DenyManaged => SpoolFullPolicy::DenyManaged,
            SpoolFullArg::KeepServing => SpoolFullPolicy::KeepServing,
        },
        client_properties: kafka.config.client_properties.clone(),
    };
    let (sink, runner) = KafkaSink::start(cfg)
        .await
        .context("starting the Kafka event sink")?;
    Ok((Arc::new(sink), runner))
}

/// Follows the decisions and metrics topics into this gateway's caches.
pub async fn start_feedback(
    kafka: &KafkaSettings,
    decisions: Arc<DecisionCache>,
    global: Arc<GlobalMetrics>,
    clock: feedback::Clock,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let cfg = kafka.config.clone();
    let consumer = tokio::task::spawn_blocking(move || kafka::feedback_consumer(&cfg))
        .await?
        .context("subscribing to the decisions and metrics topics")?;
    Ok(tokio::spawn(feedback::run(
        kafka.config.clone(),
        consumer,
        decisions,
        global,
        clock,
        stop,
    )))
}

/// Joins the ingest group and consumes until `stop` flips.
pub fn start_ingest(
    kafka: &KafkaSettings,
    store: Arc<Store>,
    clock: kafka::Clock,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let instance = format!(
        "ingest-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let ingest = Arc::new(
        Ingest::new(kafka.config.clone(), store, clock, instance)
            .context("joining the ingest consumer group")?,
    );
    Ok(tokio::spawn(async move {
        ingest.run(stop).await.map_err(anyhow::Error::from)
    }))
}
