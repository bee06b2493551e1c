//! What each subcommand does. `main` only parses and calls [`run`].

use std::io::Write as _;
use std::sync::Arc;

use tally_ingest::{rebuild, sweep};

use crate::api::AppState;
use crate::clock::{Clock, SystemClock};
use crate::config::{Cli, Command, LedgerCommand, validate_database_url};
use crate::{demo, server};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    validate_database_url(&cli.common.database_url)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match cli.command {
        Command::Migrate => {
            let _ = server::open_store(&cli.common.database_url, clock.as_ref()).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.server.validate()?;
            let store = server::open_store(&cli.common.database_url, clock.as_ref()).await?;
            let listener = server::bind(&config).await?;
            tracing::info!(listen = %config.listen, role = ?args.role, "tally serving");
            server::run(
                listener,
                AppState { store, clock },
                config.sweep_interval,
                server::shutdown_signal(),
            )
            .await
        }
        Command::Demo(args) => {
            let config = args.server.validate()?;
            let store = server::open_store(&cli.common.database_url, clock.as_ref()).await?;
            let listener = server::bind(&config).await?;
            let addr = listener.local_addr()?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let state = AppState {
                store,
                clock: Arc::clone(&clock),
            };
            let serving = tokio::spawn(server::run(
                listener,
                state,
                config.sweep_interval,
                async move {
                    let _ = stop_rx.await;
                },
            ));
            let report = demo::run_scenario(&format!("http://{addr}"), clock.now()).await;
            let outcome = match report {
                Ok(text) => {
                    demo::print(&text)?;
                    if !args.exit {
                        demo::print(&format!(
                            "\nServing on http://{addr} until interrupted (Ctrl-C).\n"
                        ))?;
                        server::shutdown_signal().await;
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            };
            let _ = stop_tx.send(());
            serving.await??;
            std::io::stdout().flush()?;
            outcome
        }
        Command::Ledger { command } => {
            let store = server::open_store(&cli.common.database_url, clock.as_ref()).await?;
            match command {
                LedgerCommand::Rebuild => {
                    let r = rebuild::rebuild(&store).await?;
                    demo::print(&format!(
                        "rebuilt projections from {} events over {} accounts\n",
                        r.events, r.accounts
                    ))?;
                }
                LedgerCommand::Sweep => {
                    let n = sweep::expire_due(&store, clock.now()).await?;
                    demo::print(&format!("expired {n} lots\n"))?;
                }
            }
            Ok(())
        }
    }
}
