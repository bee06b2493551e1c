//! A gateway's side of the Kafka pipeline's feedback: every account's latest enforcement
//! decision and the fleet's model metrics, read from their topics into the caches the request
//! path reads ([`DecisionCache`], [`GlobalMetrics`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use tally_ingest::fleet::{FleetView, ModelWindow};
use tally_ingest::kafka::{Feedback, KafkaConfig, decode_feedback};
use tokio::sync::watch;

use crate::decisions::DecisionCache;
use crate::metrics::{GlobalMetrics, LatencyView, MetricsSnapshot, MetricsView};
use crate::telemetry;

pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The routing view of one model's fleet-wide window.
pub fn view_of(w: &ModelWindow) -> MetricsView {
    MetricsView {
        latency: LatencyView {
            upstream_ms_avg: w.upstream_ms_avg(),
            upstream_ms_p50: w.upstream_ms_quantile(0.50),
            upstream_ms_p95: w.upstream_ms_quantile(0.95),
        },
        error_rate: w.error_rate(),
        tokens_per_second: w.tokens_per_second(),
        requests: w.requests,
    }
}

/// The routing snapshot of the fleet's view at `now`.
pub fn snapshot_of(view: &mut FleetView, now: DateTime<Utc>) -> MetricsSnapshot {
    view.merged(now)
        .iter()
        .map(|(k, w)| (k.clone(), view_of(w)))
        .collect()
}

/// Reads the feedback topics until `stop` flips.
pub async fn run(
    cfg: KafkaConfig,
    consumer: StreamConsumer,
    decisions: Arc<DecisionCache>,
    global: Arc<GlobalMetrics>,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
) {
    let mut fleet = FleetView::new();
    loop {
        let m = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.changed() => return,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "feedback consume error");
                continue;
            }
        };
        match decode_feedback(&cfg, &m) {
            Ok(Feedback::Decision(d)) => {
                let now = clock();
                // Timed whether or not the cache already had news as fresh (from this process's
                // own commit or the refresher): it measures the pipeline's way back.
                if let Some(at) = d.source_event_at {
                    let secs = (now - at).num_microseconds().unwrap_or(0) as f64 / 1e6;
                    telemetry::DECISION_PROPAGATION.observe(secs.max(0.0));
                }
                decisions.apply(d.decision);
            }
            Ok(Feedback::Metrics(report)) => {
                fleet.absorb(report);
                global.set(snapshot_of(&mut fleet, clock()));
            }
            Err(e) => tracing::warn!(
                error = %e,
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                "unreadable feedback message skipped"
            ),
        }
    }
}
