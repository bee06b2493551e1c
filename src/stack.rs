//! Every role in one process: the ledger API (with the admin API), the expiry sweep, the
//! gateway and, with Kafka, the ingest consumer, sharing one store and stopping together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tally_gateway_core::admin::{self, AdminState};
use tally_ingest::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::AppState;
use crate::clock::Clock;
use crate::config::{GatewaySettings, KafkaSettings};
use crate::gateway::{self, GatewayRuntime};
use crate::{pipeline, server};

/// How long a stopping process lets its servers finish open requests.
pub const SERVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Stack {
    pub ledger_addr: Option<SocketAddr>,
    pub gateway_addr: Option<SocketAddr>,
    pub runtime: Option<GatewayRuntime>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

#[derive(Debug)]
pub struct StackParts {
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
    /// Serves the ledger and admin APIs when given.
    pub ledger: Option<TcpListener>,
    /// Serves the gateway when given.
    pub gateway: Option<TcpListener>,
    pub settings: GatewaySettings,
    pub kek: tally_gateway_core::secrets::Kek,
    pub sweep_interval: Duration,
    /// Kafka, when configured; otherwise the roles share the in-process bus.
    pub kafka: Option<KafkaSettings>,
    /// Run the Kafka ingest consumer in this process (needs `kafka`).
    pub ingest: bool,
}

impl Stack {
    pub async fn start(parts: StackParts) -> anyhow::Result<Stack> {
        let (stop, stop_rx) = watch::channel(false);
        let StackParts {
            store,
            clock,
            ledger,
            gateway: gateway_listener,
            settings,
            kek,
            sweep_interval,
            kafka,
            ingest,
        } = parts;
        if ingest && kafka.is_none() {
            anyhow::bail!("the ingest role consumes Kafka: set TALLY_KAFKA_BROKERS");
        }
        if let Some(k) = &kafka {
            pipeline::prepare(k).await?;
        }
        // Only a process that serves the gateway produces usage: the others must not open (and
        // lock) a spool or follow the feedback topics. Their gateway object only backs the
        // admin API's provider-key checks, which meter nothing.
        let bus = match (&kafka, gateway_listener.is_some()) {
            (Some(k), true) => gateway::Bus::Kafka(k),
            _ => gateway::Bus::InProcess,
        };
        let runtime = gateway::start(
            Arc::clone(&store),
            &settings,
            kek,
            Arc::clone(&clock),
            bus,
            stop_rx.clone(),
        )
        .await?;
        let mut tasks = Vec::new();
        if let (true, Some(k)) = (ingest, &kafka) {
            let c = Arc::clone(&clock);
            tasks.push(pipeline::start_ingest(
                k,
                Arc::clone(&store),
                Arc::new(move || c.now()),
                stop_rx.clone(),
            )?);
        }
        let ledger_addr = match ledger {
            Some(listener) => {
                let addr = listener.local_addr()?;
                let c = Arc::clone(&clock);
                let admin_clock: admin::Clock = Arc::new(move || c.now());
                let admin = admin::router(
                    AdminState::new(
                        store.pool().clone(),
                        Arc::clone(&runtime.keyring),
                        admin_clock,
                    )
                    .with_gateway(Arc::clone(&runtime.gateway)),
                );
                let state = AppState {
                    store: Arc::clone(&store),
                    clock: Arc::clone(&clock),
                };
                let mut rx = stop_rx.clone();
                tasks.push(tokio::spawn(server::run_with(
                    listener,
                    state,
                    Some(admin),
                    sweep_interval,
                    async move {
                        let _ = rx.changed().await;
                    },
                )));
                Some(addr)
            }
            None => None,
        };
        let gateway_addr = match gateway_listener {
            Some(listener) => {
                let addr = listener.local_addr()?;
                let rt = runtime.clone();
                let rx = stop_rx.clone();
                tasks.push(tokio::spawn(async move {
                    gateway::serve(listener, &rt, rx).await
                }));
                Some(addr)
            }
            None => None,
        };
        Ok(Stack {
            ledger_addr,
            gateway_addr,
            runtime: Some(runtime),
            stop,
            tasks,
        })
    }

    /// Runs the alert loops (evaluation, and webhook delivery when configured) beside the
    /// ledger role; they stop with the rest of the stack.
    pub fn start_alerts(
        &mut self,
        pool: sqlx::PgPool,
        clock: Arc<dyn Clock>,
        settings: crate::alerts::AlertSettings,
    ) -> anyhow::Result<()> {
        let engine = crate::alerts::AlertEngine::new(pool, clock, settings)?;
        self.tasks.push(crate::alerts::spawn(
            Arc::new(engine),
            self.stop.subscribe(),
        ));
        Ok(())
    }

    /// Resolves when a role's task ends before `stop` was asked for: a failure (the ingest
    /// consumer gave up, a listener died) that the process must not outlive looking healthy.
    pub async fn ended_early(&mut self) -> anyhow::Error {
        if self.tasks.is_empty() {
            return std::future::pending().await;
        }
        let (ended, index, _) = futures_util::future::select_all(self.tasks.iter_mut()).await;
        drop(self.tasks.remove(index));
        match ended {
            Ok(Ok(())) => anyhow::anyhow!("a role stopped on its own"),
            Ok(Err(e)) => e,
            Err(e) => anyhow::Error::from(e),
        }
    }

    /// Stops every server and loop and waits for the servers to finish their requests; then
    /// the gateway's usage pipeline stores (and ships) what those requests produced, so none
    /// of it is lost to the restart.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let mut outcome = Ok(());
        // Graceful shutdown waits for every open connection; a stalled client or upstream must
        // not hold the process (and the sink's drain behind it) for ever.
        let deadline = tokio::time::Instant::now() + SERVER_DRAIN_TIMEOUT;
        for mut t in self.tasks {
            let ended = match tokio::time::timeout_at(deadline, &mut t).await {
                Ok(joined) => joined.map_err(anyhow::Error::from).and_then(|r| r),
                Err(_) => {
                    t.abort();
                    tracing::warn!(
                        "connections still open after {SERVER_DRAIN_TIMEOUT:?}; closing them"
                    );
                    Ok(())
                }
            };
            if outcome.is_ok() {
                outcome = ended;
            }
        }
        // Only now: the sink must outlive every request that can still send to it.
        if let Some(runtime) = &self.runtime {
            let stopped = runtime.shutdown().await;
            if outcome.is_ok() {
                outcome = stopped;
            }
        }
        outcome
    }
}
