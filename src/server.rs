//! Starting the roles: connect, migrate, serve HTTP, run the expiry sweep, stop on signal.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tally_ingest::{Store, db, sweep};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::clock::Clock;
use crate::config::ServerConfig;

/// Connects (creating the database when missing), applies pending migrations, opens the store.
pub async fn open_store(database_url: &str, clock: &dyn Clock) -> anyhow::Result<Arc<Store>> {
    let pool = db::connect(database_url).await?;
    db::migrate(&pool).await?;
    Ok(Arc::new(Store::open(pool, clock.now()).await?))
}

/// Serves the ledger API on `listener` and sweeps expiries every `sweep_interval` until
/// `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    sweep_interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(listener, state, None, sweep_interval, shutdown).await
}

/// [`run`], with more routes beside the ledger's (the admin API of keys and credentials).
pub async fn run_with(
    listener: TcpListener,
    state: AppState,
    extra: Option<axum::Router>,
    sweep_interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let sweeper = tokio::spawn(sweep_loop(state.clone(), sweep_interval, stop_rx));
    let app = match extra {
        Some(extra) => api::router(state).merge(extra),
        None => api::router(state),
    };
    let served = axum::serve(
        axum::serve::ListenerExt::tap_io(listener, |tcp| {
            // Small SSE frames must leave at once, not wait for Nagle.
            let _ = tcp.set_nodelay(true);
        }),
        app,
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    let _ = sweeper.await;
    served?;
    Ok(())
}

async fn sweep_loop(state: AppState, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        match sweep::expire_due(&state.store, state.clock.now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(lots = n, "expired credit lots"),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed; retrying next interval"),
        }
    }
}

pub async fn bind(config: &ServerConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
