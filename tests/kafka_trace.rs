//! OpenTelemetry: the trace of a gateway request travels with its usage event through Kafka
//! headers into the ingest span. Its own test binary: it installs the process's global
//! subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::json;
use sqlx::PgPool;
use tracing_subscriber::layer::SubscriberExt;

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn the_request_trace_reaches_the_ingest_span_through_kafka(pool: PgPool) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let spool = tempfile::tempdir().unwrap();
    let kafka = common::kafka_settings(spool.path());
    let live = common::live_stack_with(&pool, Some(kafka), |_, _| {}).await;
    let token = common::account_with_key(&live.ledger, "traced", Some("20.00")).await;
    // Wait until the purchase reached the gateway's decision cache.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", live.gateway))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().unwrap();
        let in_trace: Vec<&str> = spans
            .iter()
            .filter(|s| s.span_context.trace_id().to_string() == trace_id)
            .map(|s| s.name.as_ref())
            .collect();
        if in_trace.contains(&"gateway.request") && in_trace.contains(&"ingest.event") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans of the client's trace: {in_trace:?}; all spans: {:?}",
            spans.iter().map(|s| s.name.as_ref()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    live.stack.stop().await.unwrap();
}
