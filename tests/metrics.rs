//! `/metrics` on every listener: after managed and BYOK traffic, failovers, denials and
//! ledger events, both the ledger listener and the gateway listener expose the expected series
//! in the Prometheus text format, and no account, key, token, credential, request id or
//! client-chosen model name appears in them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod traffic;

use sqlx::PgPool;

/// Whether `text` has a sample of `name` carrying every `label="value"` pair.
fn has_series(text: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    text.lines().any(|line| {
        let Some(rest) = line.strip_prefix(name) else {
            return false;
        };
        let Some(labelset) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) else {
            return labels.is_empty() && rest.starts_with(' ');
        };
        let pairs: Vec<&str> = labelset.0.split(',').collect();
        labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()))
    })
}

/// The value of the first sample of `name` carrying every pair.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| has_series(l, name, labels))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
        .next()
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

async fn scrape(base: &str) -> String {
    let r = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "content type {ct}");
    r.text().await.unwrap()
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn metrics_show_traffic_and_never_an_identifier(pool: PgPool) {
    let live = common::live_stack(&pool, |_, _| {}).await;
    // Every metric exists from the first scrape, before any traffic.
    let first = scrape(&live.gateway).await;
    for name in [
        "tally_gateway_denials_total",
        "tally_ingest_events_total",
        "tally_ingest_batch_size_events",
        "tally_ingest_lag_seconds",
        "tally_ingest_dead_letters_total",
        "tally_spool_depth_events",
        "tally_decision_propagation_seconds",
    ] {
        assert!(
            first.contains(&format!("# TYPE {name} ")),
            "{name} missing before traffic"
        );
    }

    let served = traffic::serve(&live.ledger, &live.gateway, &live.mock, &pool).await;
    let ledger = scrape(&live.ledger).await;
    let gateway = scrape(&live.gateway).await;

    for (name, labels) in [
        (
            "tally_gateway_requests_total",
            &[
                ("api", "openai"),
                ("provider", "openai"),
                ("model", "gpt-4o"),
                ("credential_kind", "managed"),
                ("status_class", "2xx"),
            ][..],
        ),
        (
            "tally_gateway_requests_total",
            &[
                ("api", "anthropic"),
                ("provider", "anthropic"),
                ("model", "claude-sonnet-4-5"),
                ("credential_kind", "byok"),
                ("status_class", "2xx"),
            ],
        ),
        (
            "tally_gateway_requests_total",
            &[("provider", "openai"), ("model", "other")],
        ),
        (
            "tally_gateway_requests_total",
            &[("api", "models"), ("status_class", "2xx")],
        ),
        (
            "tally_gateway_failovers_total",
            &[("provider", "anthropic"), ("reason", "rate_limited")],
        ),
        (
            "tally_gateway_denials_total",
            &[("reason", "invalid_api_key")],
        ),
        (
            "tally_gateway_denials_total",
            &[("reason", "credits_exhausted")],
        ),
        (
            "tally_gateway_denials_total",
            &[("reason", "provider_not_allowed")],
        ),
        (
            "tally_gateway_tokens_total",
            &[
                ("provider", "openai"),
                ("model", "gpt-4o"),
                ("credential_kind", "managed"),
                ("class", "output"),
            ],
        ),
        (
            "tally_gateway_request_duration_seconds_count",
            &[("api", "openai"), ("provider", "openai")],
        ),
        (
            "tally_gateway_upstream_duration_seconds_count",
            &[("api", "anthropic"), ("provider", "anthropic")],
        ),
        (
            "tally_gateway_overhead_seconds_count",
            &[("api", "openai"), ("provider", "openai")],
        ),
        (
            "tally_ingest_events_total",
            &[("kind", "usage"), ("outcome", "applied")],
        ),
        (
            "tally_ingest_events_total",
            &[("kind", "usage"), ("outcome", "duplicate")],
        ),
        (
            "tally_ingest_events_total",
            &[("kind", "usage"), ("outcome", "conflict")],
        ),
        (
            "tally_ingest_events_total",
            &[("kind", "usage"), ("outcome", "rejected")],
        ),
        (
            "tally_ingest_events_total",
            &[("kind", "lot_expired"), ("outcome", "applied")],
        ),
        (
            "tally_ingest_cost_usd_total",
            &[
                ("provider", "openai"),
                ("model", "gpt-4o"),
                ("credential_kind", "managed"),
                ("component", "fee"),
            ],
        ),
        (
            "tally_ingest_cost_usd_total",
            &[
                ("provider", "anthropic"),
                ("model", "claude-sonnet-4-5"),
                ("credential_kind", "byok"),
                ("component", "attributed"),
            ],
        ),
        (
            "tally_ingest_cost_usd_total",
            &[("provider", "openai"), ("model", "other")],
        ),
        ("tally_ingest_batch_size_events_count", &[]),
        ("tally_ingest_lag_seconds_count", &[]),
    ] {
        for (listener, text) in [("ledger", &ledger), ("gateway", &gateway)] {
            assert!(
                has_series(text, name, labels),
                "{listener} /metrics lacks {name} {labels:?}:\n{text}"
            );
        }
    }
    let managed = value(
        &gateway,
        "tally_gateway_requests_total",
        &[
            ("api", "openai"),
            ("model", "gpt-4o"),
            ("credential_kind", "managed"),
            ("status_class", "2xx"),
        ],
    );
    assert_eq!(managed, 6.0, "six managed requests answered 200");
    let upstream_cost = value(
        &gateway,
        "tally_ingest_cost_usd_total",
        &[
            ("model", "gpt-4o"),
            ("credential_kind", "managed"),
            ("component", "upstream"),
        ],
    );
    assert!(upstream_cost > 0.0, "managed gpt-4o usage has a cost");

    for (what, secret) in served.secrets() {
        for (listener, text) in [("ledger", &ledger), ("gateway", &gateway)] {
            assert!(
                !text.contains(&secret),
                "{what} {secret:?} found in the {listener} listener's /metrics"
            );
        }
    }
    live.stack.stop().await.unwrap();
}
