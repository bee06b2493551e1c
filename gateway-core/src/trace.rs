//! W3C trace context across the gateway's edges: continuing a client's trace from its request
//! headers, and carrying the request's trace into the Kafka message of each usage event.

use std::collections::HashMap;

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the trace the client's `traceparent` names, if it sent one.
pub fn continue_from_headers(span: &tracing::Span, headers: &HeaderMap) {
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(parent);
    }
}

#[derive(Default)]
struct Map(HashMap<String, String>);

impl Injector for Map {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// The `traceparent` (and `tracestate`) of the current span, when tracing exports
/// OpenTelemetry spans; empty otherwise.
pub fn current_context_headers() -> HashMap<String, String> {
    let cx = tracing::Span::current().context();
    let mut map = Map::default();
    TraceContextPropagator::new().inject_context(&cx, &mut map);
    map.0
}
