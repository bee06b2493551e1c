//! Every role in one process: the ledger API (with the admin API), the expiry sweep, and the
//! gateway, sharing one store and stopping together.

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
use crate::config::GatewaySettings;
use crate::gateway::{self, GatewayRuntime};
use crate::server;

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
        } = parts;
        let runtime = gateway::start(
            Arc::clone(&store),
            &settings,
            kek,
            Arc::clone(&clock),
            stop_rx.clone(),
        )
        .await?;
        let mut tasks = Vec::new();
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

    /// Stops every server and loop and waits for the servers to finish their requests.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}
