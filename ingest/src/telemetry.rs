//! Prometheus metrics of the ingest side, in the process-wide default registry so that every
//! role's `/metrics` shows them. Labels stay low-cardinality: never an account, key or request.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use prometheus::core::Collector;
use prometheus::{
    CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
};
use rust_decimal::prelude::ToPrimitive;
use tally_ledger::{Event, EventBody, Money, PriceBasis, PriceBook};
use uuid::Uuid;

use crate::project::AppliedEvent;
use crate::store::BatchReport;

/// Registers `collector` in the default registry. A second registration of the same name can
/// only come from a programming error; the metric then still counts, unexported, rather than
/// take the process down.
pub fn register<C: Collector + Clone + 'static>(collector: C) -> C {
    if let Err(e) = prometheus::register(Box::new(collector.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    collector
}

// Construction fails only for an invalid metric or label name. Every name is a constant and
// `every_metric_registers` below builds them all, so a bad one fails the tests, not a server.
#[allow(clippy::expect_used)]
pub fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::with_opts(Opts::new(name, help)).expect("valid metric name"))
}

#[allow(clippy::expect_used)]
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name"))
}

/// A counter of fractional amounts (dollars). Money of record stays in the ledger; this is a
/// rate to watch.
#[allow(clippy::expect_used)]
pub fn float_counter_vec(name: &str, help: &str, labels: &[&str]) -> CounterVec {
    register(CounterVec::new(Opts::new(name, help), labels).expect("valid metric name"))
}

#[allow(clippy::expect_used)]
pub fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::with_opts(Opts::new(name, help)).expect("valid metric name"))
}

#[allow(clippy::expect_used)]
pub fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric name"),
    )
}

#[allow(clippy::expect_used)]
pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    register(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .expect("valid metric name"),
    )
}

/// Seconds, for delays from a few milliseconds to minutes.
pub fn delay_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ]
}

/// Events per batch, from one event (the HTTP API) up to `MAX_BATCH_EVENTS`.
pub fn batch_buckets() -> Vec<f64> {
    vec![
        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    ]
}

/// Seconds from an event's occurrence to its application: sub-second when the pipeline keeps
/// up, up to a day when a spool or a dead broker held events back.
pub fn lag_buckets() -> Vec<f64> {
    vec![
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0,
        86400.0,
    ]
}

/// Events offered to the store, by event kind and outcome: `applied`, `duplicate` (same id and
/// payload, absorbed), `conflict` (same id, other payload, recorded) or `rejected` (refused by
/// the domain).
pub static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "tally_ingest_events_total",
        "Events offered to the ledger store, by kind and outcome (applied, duplicate, conflict, rejected)",
        &["kind", "outcome"],
    )
});

pub static BATCH_SIZE: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_ingest_batch_size_events",
        "Events per batch committed by the ledger store",
        batch_buckets(),
    )
});

/// Usage events only: other kinds carry an event time chosen by an operator (backfills,
/// expiry instants), which says nothing about the pipeline.
pub static LAG: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_ingest_lag_seconds",
        "Delay from a usage event's occurred_at to its application to the ledger",
        lag_buckets(),
    )
});

/// Cost of applied usage. `component` is `upstream` and `fee` for managed usage (charged from
/// credits), `attributed` for BYOK and attached keys (paid by the customer to its provider).
pub static COST_USD: LazyLock<CounterVec> = LazyLock::new(|| {
    float_counter_vec(
        "tally_ingest_cost_usd_total",
        "Cost of applied usage in USD, by provider, model, credential kind and component (upstream, fee, attributed)",
        &["provider", "model", "credential_kind", "component"],
    )
});

/// Outcome label values.
const APPLIED: &str = "applied";
const DUPLICATE: &str = "duplicate";
const CONFLICT: &str = "conflict";
const REJECTED: &str = "rejected";

/// Provider and model labels of a cost. A client may name any model and a custom provider any
/// id, so only what the price book prices keeps its name: an unpriced model is `other`, a
/// provider the price book has never priced is `custom`.
pub fn cost_labels<'a>(
    prices: &PriceBook,
    provider: &'a str,
    model: &'a str,
    basis: PriceBasis,
) -> (&'a str, &'a str) {
    if basis == PriceBasis::Catalog {
        return (provider, model);
    }
    let known = prices.versions().iter().any(|v| {
        v.models
            .keys()
            .any(|k| k.split_once(':').is_some_and(|(p, _)| p == provider))
    });
    (if known { provider } else { "custom" }, "other")
}

fn usd(m: Money) -> f64 {
    m.as_decimal().to_f64().unwrap_or(0.0)
}

/// Records a committed batch: every event's outcome, the batch size, usage lag and cost.
pub(crate) fn observe_batch(
    events: &[Event],
    report: &BatchReport,
    items: &[AppliedEvent<'_>],
    prices: &PriceBook,
    now: DateTime<Utc>,
) {
    BATCH_SIZE.observe(events.len() as f64);
    let kinds: HashMap<Uuid, &'static str> =
        events.iter().map(|e| (e.event_id, e.body.kind())).collect();
    let kind_of = |id: &Uuid| kinds.get(id).copied().unwrap_or("unknown");
    for id in &report.duplicates {
        EVENTS.with_label_values(&[kind_of(id), DUPLICATE]).inc();
    }
    for id in &report.conflicts {
        EVENTS.with_label_values(&[kind_of(id), CONFLICT]).inc();
    }
    for r in &report.rejected {
        EVENTS
            .with_label_values(&[kind_of(&r.event_id), REJECTED])
            .inc();
    }
    for item in items {
        let event = item.event;
        EVENTS
            .with_label_values(&[event.body.kind(), APPLIED])
            .inc();
        let EventBody::Usage(u) = &event.body else {
            continue;
        };
        let lag_ms = (now - event.occurred_at).num_milliseconds().max(0);
        LAG.observe(lag_ms as f64 / 1000.0);
        let Some(charge) = &item.applied.usage else {
            continue;
        };
        let (provider, model) = cost_labels(prices, &u.provider, &u.model, charge.price_basis);
        let kind = u.credential_kind.as_str();
        let components: &[(&str, Money)] = match u.credential_kind {
            tally_ledger::CredentialKind::Managed => {
                &[("upstream", charge.upstream_cost), ("fee", charge.fee)]
            }
            _ => &[("attributed", charge.attributed)],
        };
        for (component, amount) in components {
            COST_USD
                .with_label_values(&[provider, model, kind, component])
                .inc_by(usd(*amount).max(0.0));
        }
    }
}

/// Records an event that refused its whole all-or-nothing batch.
pub(crate) fn observe_refused(event: Option<&Event>) {
    let kind = event.map_or("unknown", |e| e.body.kind());
    EVENTS.with_label_values(&[kind, REJECTED]).inc();
}

/// Messages set aside on the dead-letter topic (malformed or refused events).
pub static DEAD_LETTERS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "tally_ingest_dead_letters_total",
        "Events sent to the dead-letter topic because they could not be decoded or were refused",
    )
});

/// Messages the ingest consumer group is behind the end of its partitions.
pub static CONSUMER_LAG: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "tally_ingest_consumer_lag_messages",
        "Messages between the ingest consumer's position and the end of its assigned partitions",
    )
});

/// Offset commits that failed (a rebalance took the partition; the next owner re-reads and
/// dedupes).
pub static OFFSET_COMMIT_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "tally_ingest_offset_commit_failures_total",
        "Kafka offset commits that failed after the batch was applied",
    )
});

/// Forces every metric of this module into existence (so each shows in `/metrics` from the
/// start, at zero).
pub fn init() {
    LazyLock::force(&DEAD_LETTERS);
    LazyLock::force(&CONSUMER_LAG);
    LazyLock::force(&OFFSET_COMMIT_FAILURES);
    LazyLock::force(&EVENTS);
    LazyLock::force(&BATCH_SIZE);
    LazyLock::force(&LAG);
    LazyLock::force(&COST_USD);
    // Every kind and outcome shows from the first scrape, at zero, so rates read 0, not "no data".
    for kind in [
        "account_opened",
        "credits_purchased",
        "credits_granted",
        "lot_voided",
        "lot_expired",
        "usage",
    ] {
        for outcome in [APPLIED, DUPLICATE, CONFLICT, REJECTED] {
            EVENTS.with_label_values(&[kind, outcome]);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_registers() {
        super::init();
        let names: Vec<String> = prometheus::gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert!(
            names.iter().any(|n| n == "tally_ingest_dead_letters_total"),
            "{names:?}"
        );
    }
}
