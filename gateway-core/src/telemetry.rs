//! Prometheus metrics of the gateway, in the process-wide default registry (see
//! `tally_ingest::telemetry`). Labels stay low-cardinality: never an account, key or request.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge};
use tally_ingest::telemetry::{
    counter, counter_vec, delay_buckets, gauge, histogram, histogram_vec,
};
use tally_ledger::{CredentialKind, TokenCounts};

use crate::catalog;
use crate::error::GatewayError;

/// Events waiting in the gateway's durable spool for the broker.
pub static SPOOL_DEPTH_EVENTS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "tally_spool_depth_events",
        "Usage events in the gateway's on-disk spool, not yet acknowledged by the broker",
    )
});

pub static SPOOL_DEPTH_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "tally_spool_depth_bytes",
        "Bytes in the gateway's on-disk spool, not yet acknowledged by the broker",
    )
});

/// Events the spool could not take because it was full.
pub static SPOOL_FULL: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "tally_spool_full_total",
        "Usage events refused by the full spool (see the spool-full policy)",
    )
});

/// From the usage event that changed an account's decision to this gateway holding it.
pub static DECISION_PROPAGATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_decision_propagation_seconds",
        "Delay from a usage event to its account's new enforcement decision at this gateway",
        delay_buckets(),
    )
});

/// Seconds, for whole requests and upstream calls: a millisecond to the longest stream.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0,
    ]
}

/// Seconds, for the gateway's own share of a request: tens of microseconds to a second.
pub fn overhead_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0,
    ]
}

/// Requests answered, by client API (`openai`, `anthropic`, `models`), the provider, model and
/// credential kind of the last attempt (`none` when no attempt was made) and status class.
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "tally_gateway_requests_total",
        "Requests answered by the gateway, by client API, provider, model and credential kind of the last attempt, and status class",
        &[
            "api",
            "provider",
            "model",
            "credential_kind",
            "status_class",
        ],
    )
});

/// Until the response starts: for a stream, its headers, not its end.
pub static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "tally_gateway_request_duration_seconds",
        "Time from a request's arrival to the start of its response",
        &["api", "provider"],
        latency_buckets(),
    )
});

/// Summed over a request's attempts; requests that made none are not observed.
pub static UPSTREAM_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "tally_gateway_upstream_duration_seconds",
        "Time a request spent in upstream calls, summed over its attempts",
        &["api", "provider"],
        latency_buckets(),
    )
});

pub static OVERHEAD: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "tally_gateway_overhead_seconds",
        "The gateway's own share of a request: total time minus time in upstream calls",
        &["api", "provider"],
        overhead_buckets(),
    )
});

/// Attempts that failed and sent the request on to the next key or model (the last failed
/// attempt of a request that failed outright counts too).
pub static FAILOVERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "tally_gateway_failovers_total",
        "Upstream attempts that failed over, by provider and reason",
        &["provider", "reason"],
    )
});

/// Requests the gateway refused itself, by the error code the client saw.
pub static DENIALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "tally_gateway_denials_total",
        "Requests refused by the gateway before or instead of an upstream call, by reason",
        &["reason"],
    )
});

pub static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "tally_gateway_tokens_total",
        "Tokens metered, by provider, model, credential kind and class (input, cached_input, output, reasoning)",
        &["provider", "model", "credential_kind", "class"],
    )
});

/// The provider label: a catalog provider's id; every custom provider is `custom`, since their
/// ids are chosen by customers.
pub fn provider_label(provider: &str) -> &'static str {
    catalog::provider(provider).map_or("custom", |p| p.id)
}

/// The model label: a client may send any model string, so only a model of the provider's
/// catalog keeps its name; anything else is `other`.
pub fn model_label(provider: &str, model: &str) -> &'static str {
    catalog::provider(provider)
        .and_then(|p| p.models.iter().find(|m| **m == model))
        .copied()
        .unwrap_or("other")
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// What a request's metrics need of its attempts: labels of the last one, and the time spent
/// upstream over all of them.
#[derive(Debug, Clone, Copy)]
pub struct Attempts {
    provider: &'static str,
    model: &'static str,
    credential_kind: &'static str,
    upstream: Duration,
    count: u32,
}

impl Default for Attempts {
    fn default() -> Self {
        Attempts {
            provider: "none",
            model: "none",
            credential_kind: "none",
            upstream: Duration::ZERO,
            count: 0,
        }
    }
}

impl Attempts {
    pub fn record(&mut self, provider: &str, model: &str, kind: CredentialKind, took: Duration) {
        self.provider = provider_label(provider);
        self.model = model_label(provider, model);
        self.credential_kind = kind.as_str();
        self.upstream += took;
        self.count += 1;
    }
}

/// Records one answered request.
pub fn observe_request(api: &'static str, status: u16, total: Duration, attempts: &Attempts) {
    REQUESTS
        .with_label_values(&[
            api,
            attempts.provider,
            attempts.model,
            attempts.credential_kind,
            status_class(status),
        ])
        .inc();
    let labels = [api, attempts.provider];
    REQUEST_DURATION
        .with_label_values(&labels)
        .observe(total.as_secs_f64());
    if attempts.count > 0 {
        UPSTREAM_DURATION
            .with_label_values(&labels)
            .observe(attempts.upstream.as_secs_f64());
    }
    OVERHEAD
        .with_label_values(&labels)
        .observe(total.saturating_sub(attempts.upstream).as_secs_f64());
}

/// Records a failed attempt by a reason of few values.
pub fn observe_failover(provider: &str, error: &GatewayError) {
    let reason = match error {
        GatewayError::Timeout => "timeout",
        GatewayError::Upstream { status, .. } => match status {
            429 => "rate_limited",
            401 | 403 => "auth_failed",
            408 => "timeout",
            500..=599 => "upstream_error",
            _ => "other",
        },
        _ => "other",
    };
    FAILOVERS
        .with_label_values(&[provider_label(provider), reason])
        .inc();
}

/// Records a refusal of the gateway's own; upstream failures are failovers, not denials.
pub fn observe_denial(error: &GatewayError) {
    if matches!(error, GatewayError::Upstream { .. } | GatewayError::Timeout) {
        return;
    }
    DENIALS.with_label_values(&[error.parts().1]).inc();
}

pub fn observe_tokens(provider: &str, model: &str, kind: CredentialKind, tokens: &TokenCounts) {
    let (p, m, k) = (
        provider_label(provider),
        model_label(provider, model),
        kind.as_str(),
    );
    for (class, n) in [
        ("input", tokens.input),
        ("cached_input", tokens.cached_input),
        ("output", tokens.output),
        ("reasoning", tokens.reasoning),
    ] {
        TOKENS
            .with_label_values(&[p, m, k, class])
            .inc_by(u64::try_from(n).unwrap_or(0));
    }
}

/// Forces every metric of this module into existence (so each shows in `/metrics` from the
/// start, at zero).
pub fn init() {
    tally_ingest::telemetry::init();
    LazyLock::force(&SPOOL_DEPTH_EVENTS);
    LazyLock::force(&SPOOL_DEPTH_BYTES);
    LazyLock::force(&SPOOL_FULL);
    LazyLock::force(&DECISION_PROPAGATION);
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_DURATION);
    LazyLock::force(&UPSTREAM_DURATION);
    LazyLock::force(&OVERHEAD);
    LazyLock::force(&FAILOVERS);
    LazyLock::force(&DENIALS);
    LazyLock::force(&TOKENS);
    // The common refusals show from the first scrape, at zero, so their rates read 0, not "no
    // data"; a reason not listed here appears when it first happens.
    for e in [
        GatewayError::Unauthenticated,
        GatewayError::WrongEndpoint,
        GatewayError::BadRequest(String::new()),
        GatewayError::ProviderNotAllowed(String::new()),
        GatewayError::ModelUnknown(String::new()),
        GatewayError::EgressRefused(String::new()),
        GatewayError::CreditsExhausted,
        GatewayError::NoCredentials(String::new()),
    ] {
        DENIALS.with_label_values(&[e.parts().1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(provider_label("openai"), "openai");
        assert_eq!(provider_label("acme-internal-llm"), "custom");
        assert_eq!(model_label("openai", "gpt-4o"), "gpt-4o");
        assert_eq!(model_label("openai", "gpt-4o-my-finetune-123"), "other");
        assert_eq!(model_label("anthropic", "gpt-4o"), "other");
        assert_eq!(model_label("acme-internal-llm", "gpt-4o"), "other");
    }

    #[test]
    fn a_request_is_counted_with_its_overhead() {
        init();
        let mut a = Attempts::default();
        a.record(
            "openai",
            "client-chosen-model",
            CredentialKind::Managed,
            Duration::from_millis(30),
        );
        let before = REQUESTS
            .with_label_values(&["openai", "openai", "other", "managed", "2xx"])
            .get();
        observe_request("openai", 200, Duration::from_millis(31), &a);
        assert_eq!(
            REQUESTS
                .with_label_values(&["openai", "openai", "other", "managed", "2xx"])
                .get(),
            before + 1
        );
        observe_denial(&GatewayError::CreditsExhausted);
        observe_denial(&GatewayError::Timeout);
        assert!(DENIALS.with_label_values(&["credits_exhausted"]).get() >= 1);
        assert_eq!(DENIALS.with_label_values(&["upstream_timeout"]).get(), 0);
    }
}
