//! Starting the gateway role: key ring, decision cache, event sink (in process or Kafka), the
//! proxy, and the loops that keep the in-memory state in step with the database.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tally_gateway_core::decisions::{self, DecisionCache};
use tally_gateway_core::kafka_sink::KafkaSinkRunner;
use tally_gateway_core::keys::KeyRing;
use tally_gateway_core::metrics::GlobalMetrics;
use tally_gateway_core::proxy::{self, Gateway};
use tally_gateway_core::secrets::Kek;
use tally_gateway_core::sink::{EventSink, InProcessSink, InProcessSinkRunner, SinkStats};
use tally_ingest::Store;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::{GatewaySettings, KafkaSettings};

/// Other instances' key and credential changes are picked up this often; this instance's own
/// admin writes reload at once.
pub const KEYRING_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// `last_used_at` of gateway keys is written this often, in one statement.
pub const LAST_USED_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// How long a stopping gateway waits, once its server has stopped, for upstream attempts and
/// streams still running (a client that hung up does not stop them: the provider bills them).
pub const IN_FLIGHT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct GatewayRuntime {
    pub gateway: Arc<Gateway>,
    pub keyring: Arc<KeyRing>,
    pub decisions: Arc<DecisionCache>,
    /// The in-process sink's counters (none when events go through Kafka).
    pub sink_stats: Option<Arc<SinkStats>>,
    /// Taken by [`GatewayRuntime::shutdown`].
    sink_runner: Arc<std::sync::Mutex<Option<SinkRunner>>>,
}

/// The event sink's tasks, stopped after everything that sends to it.
#[derive(Debug)]
enum SinkRunner {
    InProcess(InProcessSinkRunner),
    Kafka(KafkaSinkRunner),
}

impl GatewayRuntime {
    /// Stops the usage pipeline once the gateway's server has stopped taking requests and
    /// finished the exchanges under way: waits (up to [`IN_FLIGHT_DRAIN_TIMEOUT`]) for the
    /// attempts and streams still running, so their usage is in the sink, then stops the sink,
    /// which stores everything it holds (ledger or spool) and ships the spool for a while.
    /// Later calls do nothing.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        let left = self
            .gateway
            .wait_for_in_flight(IN_FLIGHT_DRAIN_TIMEOUT)
            .await;
        if left > 0 {
            tracing::error!(
                tasks = left,
                timeout = ?IN_FLIGHT_DRAIN_TIMEOUT,
                "requests still running at shutdown; their usage is lost"
            );
        }
        let runner = match self.sink_runner.lock() {
            Ok(mut r) => r.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        match runner {
            Some(SinkRunner::Kafka(r)) => {
                let stats = r
                    .shutdown(crate::pipeline::SINK_SHUTDOWN_TIMEOUT)
                    .await
                    .context("stopping the Kafka event sink")?;
                tracing::info!(?stats, "event sink stopped");
            }
            Some(SinkRunner::InProcess(r)) => {
                r.shutdown(crate::pipeline::SINK_SHUTDOWN_TIMEOUT).await;
            }
            None => {}
        }
        Ok(())
    }
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

/// Where the gateway's usage events go.
#[derive(Debug)]
pub enum Bus<'a> {
    /// The embedded default: applied to the ledger in this process.
    InProcess,
    /// Through Kafka: spooled on disk, produced to the usage topic; decisions and fleet
    /// metrics come back on their topics.
    Kafka(&'a KafkaSettings),
}

pub async fn start(
    store: Arc<Store>,
    settings: &GatewaySettings,
    kek: Kek,
    clock: Arc<dyn Clock>,
    bus: Bus<'_>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<GatewayRuntime> {
    let pool = store.pool().clone();
    let keyring = Arc::new(KeyRing::load(&pool, Arc::new(kek)).await?);
    let decisions = DecisionCache::new();
    let listening = Arc::clone(&decisions);
    let commit_clock = Arc::clone(&clock);
    // Stamped now, after the commit, not with the batch's start time: a refresh that read the
    // ledger before this commit carries an earlier stamp and cannot replace this decision.
    store.on_commit(Arc::new(move |states, _| {
        listening.update_from_states(states.values(), commit_clock.now())
    }));
    decisions.refresh(&pool, clock.now()).await?;
    let fn_clock: proxy::Clock = {
        let c = Arc::clone(&clock);
        Arc::new(move || c.now())
    };
    let global = Arc::new(GlobalMetrics::new());
    let (sink, sink_stats, runner): (Arc<dyn EventSink>, Option<Arc<SinkStats>>, SinkRunner) =
        match bus {
            Bus::InProcess => {
                let (sink, runner) = InProcessSink::start_with_fleet(
                    Arc::clone(&store),
                    Arc::clone(&decisions),
                    Some(Arc::clone(&global)),
                    Arc::clone(&fn_clock),
                );
                let stats = Arc::clone(&sink.stats);
                (Arc::new(sink), Some(stats), SinkRunner::InProcess(runner))
            }
            Bus::Kafka(kafka) => {
                let (sink, runner) = crate::pipeline::start_sink(kafka).await?;
                crate::pipeline::start_feedback(
                    kafka,
                    Arc::clone(&decisions),
                    Arc::clone(&global),
                    Arc::clone(&fn_clock),
                    stop.clone(),
                )
                .await?;
                (sink, None, SinkRunner::Kafka(runner))
            }
        };
    let mut gateway = Gateway::new(
        settings.config.clone(),
        keyring.clone(),
        keyring.clone(),
        Arc::clone(&decisions),
        sink,
        fn_clock,
    )?;
    gateway.global_metrics = global;
    let gateway = Arc::new(gateway);
    spawn_loops(
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
        sink_runner: Arc::new(std::sync::Mutex::new(Some(runner))),
    })
}

fn spawn_loops(
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

/// Serves the proxy on `listener` until `stop` flips, then finishes the requests under way.
/// [`GatewayRuntime::shutdown`] comes after it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runtime: &GatewayRuntime,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tally_gateway_core::telemetry::init();
    // Every role's listener shows the process's metrics, the gateway's included.
    let app = proxy::router(Arc::clone(&runtime.gateway))
        .route("/metrics", axum::routing::get(crate::api::metrics));
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
