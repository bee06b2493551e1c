//! Starting the gateway role: key ring, decision cache, in-process event sink, the proxy, and
//! the loops that keep the in-memory state in step with the database.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tally_gateway_core::decisions::{self, DecisionCache};
use tally_gateway_core::keys::KeyRing;
use tally_gateway_core::proxy::{self, Gateway};
use tally_gateway_core::secrets::Kek;
use tally_gateway_core::sink::{InProcessSink, SinkStats};
use tally_ingest::Store;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::GatewaySettings;

/// Other instances' key and credential changes are picked up this often; this instance's own
/// admin writes reload at once.
pub const KEYRING_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// The fleet-wide model metrics (`m.metrics.global.*`) are re-read from the ledger this often.
pub const GLOBAL_METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// How far back the fleet-wide metrics look, in whole hours of the usage rollup.
const GLOBAL_METRICS_WINDOW_HOURS: i64 = 1;

/// Fleet-wide metrics from the ledger's hourly usage of every gateway: average upstream latency,
/// error rate and output tokens per second per provider and model. Percentiles need the
/// per-attempt feed of the Kafka pipeline and stay 0 here.
pub async fn global_metrics(
    pool: &sqlx::PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<tally_gateway_core::metrics::MetricsSnapshot, sqlx::Error> {
    use tally_gateway_core::metrics::{LatencyView, MetricsView};
    let since = now - chrono::Duration::hours(GLOBAL_METRICS_WINDOW_HOURS + 1);
    let rows: Vec<(String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "select provider, model, sum(requests)::bigint, sum(failed_requests)::bigint,
                sum(upstream_latency_ms_sum)::bigint, sum(output_tokens + reasoning_tokens)::bigint
         from usage_hourly where hour >= $1 group by provider, model",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|r| r.2 > 0)
        .map(|(provider, model, requests, failed, ms, out)| {
            // Metrics for routing, not money: floats are fine here.
            let avg = ms as f64 / requests as f64;
            let view = MetricsView {
                latency: LatencyView {
                    upstream_ms_avg: avg,
                    upstream_ms_p50: 0.0,
                    upstream_ms_p95: 0.0,
                },
                error_rate: failed as f64 / requests as f64,
                tokens_per_second: if ms > 0 {
                    out as f64 / (ms as f64 / 1000.0)
                } else {
                    0.0
                },
                requests: u64::try_from(requests).unwrap_or(0),
            };
            ((provider, model), view)
        })
        .collect())
}

/// `last_used_at` of gateway keys is written this often, in one statement.
pub const LAST_USED_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct GatewayRuntime {
    pub gateway: Arc<Gateway>,
    pub keyring: Arc<KeyRing>,
    pub decisions: Arc<DecisionCache>,
    pub sink_stats: Arc<SinkStats>,
}

/// The KEK from configuration; `demo` may fall back to a fixed, published one because its data
/// is throwaway. `serve` refuses to start without a real one.
pub fn kek(settings: &GatewaySettings, allow_demo_key: bool) -> anyhow::Result<Kek> {
    match &settings.kek {
        Some(k) => Kek::from_base64(k.expose_secret()).context("invalid TALLY_KEK"),
        None if allow_demo_key => {
            let bytes: [u8; 32] =
                Sha256::digest(b"tally demo key-encryption key; never use outside the demo").into();
            Ok(Kek::from_bytes(&bytes))
        }
        None => anyhow::bail!(
            "TALLY_KEK is required: 32 random bytes, base64 (e.g. `head -c32 /dev/urandom | base64`); \
             provider keys are encrypted with it"
        ),
    }
}

pub async fn start(
    store: Arc<Store>,
    settings: &GatewaySettings,
    kek: Kek,
    clock: Arc<dyn Clock>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<GatewayRuntime> {
    let pool = store.pool().clone();
    let keyring = Arc::new(KeyRing::load(&pool, Arc::new(kek)).await?);
    let decisions = DecisionCache::new();
    let listening = Arc::clone(&decisions);
    store.on_commit(Arc::new(move |states, now| {
        listening.update_from_states(states.values(), now)
    }));
    decisions.refresh(&pool, clock.now()).await?;
    let fn_clock: proxy::Clock = {
        let c = Arc::clone(&clock);
        Arc::new(move || c.now())
    };
    let (sink, _writer) = InProcessSink::start(
        Arc::clone(&store),
        Arc::clone(&decisions),
        Arc::clone(&fn_clock),
    );
    let sink_stats = Arc::clone(&sink.stats);
    let gateway = Arc::new(Gateway::new(
        settings.config.clone(),
        keyring.clone(),
        keyring.clone(),
        Arc::clone(&decisions),
        Arc::new(sink),
        fn_clock,
    )?);
    spawn_loops(
        Arc::clone(&gateway.global_metrics),
        pool,
        Arc::clone(&keyring),
        Arc::clone(&decisions),
        clock,
        stop,
    );
    Ok(GatewayRuntime {
        gateway,
        keyring,
        decisions,
        sink_stats,
    })
}

fn spawn_loops(
    global: Arc<tally_gateway_core::metrics::GlobalMetrics>,
    pool: sqlx::PgPool,
    keyring: Arc<KeyRing>,
    decisions: Arc<DecisionCache>,
    clock: Arc<dyn Clock>,
    stop: watch::Receiver<bool>,
) {
    let mut stop_a = stop.clone();
    let (p, d, c) = (pool.clone(), Arc::clone(&decisions), Arc::clone(&clock));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(decisions::REFRESH_INTERVAL);
        loop {
            tokio::select! { _ = tick.tick() => {}, _ = stop_a.changed() => return }
            if let Err(e) = d.refresh(&p, c.now()).await {
                tracing::warn!(error = %e, "decision refresh failed; serving the last known decisions");
            }
        }
    });
    let mut stop_b = stop.clone();
    let (p, k) = (pool.clone(), Arc::clone(&keyring));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(KEYRING_RELOAD_INTERVAL);
        loop {
            tokio::select! { _ = tick.tick() => {}, _ = stop_b.changed() => return }
            if let Err(e) = k.reload(&p).await {
                tracing::warn!(error = %e, "key ring reload failed; serving the last snapshot");
            }
        }
    });
    let mut stop_d = stop.clone();
    let (p, c, g) = (pool.clone(), Arc::clone(&clock), Arc::clone(&global));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(GLOBAL_METRICS_INTERVAL);
        loop {
            tokio::select! { _ = tick.tick() => {}, _ = stop_d.changed() => return }
            match global_metrics(&p, c.now()).await {
                Ok(m) => g.set(m),
                Err(e) => {
                    tracing::warn!(error = %e, "fleet metrics refresh failed; keeping the last ones")
                }
            }
        }
    });
    let mut stop_c = stop;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LAST_USED_FLUSH_INTERVAL);
        loop {
            let stopping =
                tokio::select! { _ = tick.tick() => false, _ = stop_c.changed() => true };
            if let Err(e) = keyring.flush_last_used(&pool).await {
                tracing::warn!(error = %e, "writing last_used_at failed; will retry");
            }
            if stopping {
                return;
            }
        }
    });
}

/// Serves the proxy on `listener` until `stop` flips.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runtime: &GatewayRuntime,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = proxy::router(Arc::clone(&runtime.gateway));
    axum::serve(
        axum::serve::ListenerExt::tap_io(listener, |tcp| {
            // Small SSE frames must leave at once, not wait for Nagle.
            let _ = tcp.set_nodelay(true);
        }),
        app,
    )
    .with_graceful_shutdown(async move {
        let _ = stop.changed().await;
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewaySettings;
    use tally_gateway_core::config::GatewayConfig;

    fn settings(kek: Option<&str>) -> GatewaySettings {
        GatewaySettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            config: GatewayConfig::default(),
            kek: kek.map(|k| secrecy::SecretString::from(k.to_string())),
        }
    }

    #[test]
    fn serve_refuses_to_start_without_a_kek_and_never_echoes_a_bad_one() {
        let err = kek(&settings(None), false).unwrap_err().to_string();
        assert!(err.contains("TALLY_KEK is required"), "{err}");
        assert!(
            kek(&settings(None), true).is_ok(),
            "the demo may use its throwaway key"
        );
        let err = format!(
            "{:#}",
            kek(&settings(Some("not-base64-secret-value")), false).unwrap_err()
        );
        assert!(!err.contains("not-base64-secret-value"), "{err}");
        let good = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert!(kek(&settings(Some(good)), false).is_ok());
    }
}
