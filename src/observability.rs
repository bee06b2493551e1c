//! Logging and tracing set-up: human-readable logs on stderr, and OpenTelemetry spans exported
//! over OTLP when an endpoint is configured. The request span's context travels with each usage
//! event through Kafka into the ingest span, so one trace shows a request from the client to
//! the ledger.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber. `otlp_endpoint` (e.g. `http://127.0.0.1:4317`) turns on
/// span export over OTLP/gRPC.
pub fn init(filter: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(filter).context("invalid log filter (TALLY_LOG)")?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let provider = match otlp_endpoint.filter(|e| !e.trim().is_empty()) {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .context("OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT)")?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name("tally")
                            .build(),
                    )
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("tally")));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(Telemetry { provider })
}
