//! What each subcommand does. `main` only parses and calls [`run`].

use std::io::Write as _;
use std::sync::Arc;

use tally_gateway_core::mock;
use tally_ingest::{rebuild, sweep};
use tokio::net::TcpListener;

use crate::api::exports;
use crate::clock::{Clock, SystemClock};
use crate::config::{Cli, Command, ExportCommand, LedgerCommand, Role, validate_database_url};
use crate::stack::{Stack, StackParts};
use crate::{demo, gateway, server};

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the {what}: {e}"))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    validate_database_url(&cli.common.database_url)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match cli.command {
        Command::Migrate => {
            let _ = server::open_store(&cli.common.database_url, clock.as_ref()).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::MockProvider { listen } => {
            let addr: std::net::SocketAddr = listen.parse()?;
            let (bound, _state) = mock::spawn(addr).await?;
            demo::print(&format!(
                "mock provider on http://{bound}/v1 (OpenAI and Anthropic APIs); Ctrl-C stops it\n"
            ))?;
            server::shutdown_signal().await;
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.server.validate()?;
            let settings = args.gateway.validate()?;
            let kafka = args.kafka.validate()?;
            let alerts = args.alerts.validate()?;
            let kek = gateway::kek(&settings, false)?;
            if args.role == Role::Ingest && kafka.is_none() {
                anyhow::bail!("--role ingest consumes Kafka: set TALLY_KAFKA_BROKERS");
            }
            let store = server::open_store(&cli.common.database_url, clock.as_ref()).await?;
            // The ingest role also serves the ledger API on TALLY_LISTEN, for its /metrics and
            // health; the expiry sweep it runs there is idempotent (deterministic expiry ids).
            let ledger = match args.role {
                Role::Ledger | Role::All | Role::Ingest => {
                    Some(bind(config.listen, "ledger API").await?)
                }
                Role::Gateway => None,
            };
            let gw = match args.role {
                Role::Gateway | Role::All => Some(bind(settings.listen, "gateway").await?),
                Role::Ledger | Role::Ingest => None,
            };
            let ingest = kafka.is_some() && matches!(args.role, Role::Ingest | Role::All);
            let alert_deps = (store.pool().clone(), Arc::clone(&clock));
            let mut stack = Stack::start(StackParts {
                store,
                clock,
                ledger,
                gateway: gw,
                settings,
                kek,
                sweep_interval: config.sweep_interval,
                kafka,
                ingest,
            })
            .await?;
            if matches!(args.role, Role::Ledger | Role::All) {
                stack.start_alerts(alert_deps.0, alert_deps.1, alerts)?;
            }
            tracing::info!(ledger = ?stack.ledger_addr, gateway = ?stack.gateway_addr, role = ?args.role, "tally serving");
            tokio::select! {
                () = server::shutdown_signal() => stack.stop().await,
                failure = stack.ended_early() => {
                    tracing::error!(error = %failure, "a role failed; stopping");
                    stack.stop().await?;
                    Err(failure)
                }
            }
        }
        Command::Demo(args) => {
            let config = args.server.validate()?;
            let mut settings = args.gateway.validate()?;
            let kafka = args.kafka.validate()?;
            let kek = gateway::kek(&settings, true)?;
            let store = server::open_store(&cli.common.database_url, clock.as_ref()).await?;
            let (mock_addr, mock_state) = mock::spawn("127.0.0.1:0".parse()?).await?;
            demo::configure_gateway(&mut settings.config, mock_addr);
            let ledger = bind(config.listen, "ledger API").await?;
            let gw = bind(settings.listen, "gateway").await?;
            let stack = Stack::start(StackParts {
                store,
                clock: Arc::clone(&clock),
                ledger: Some(ledger),
                gateway: Some(gw),
                settings,
                kek,
                sweep_interval: config.sweep_interval,
                ingest: kafka.is_some(),
                kafka,
            })
            .await?;
            let (ledger_addr, gateway_addr) = match (stack.ledger_addr, stack.gateway_addr) {
                (Some(l), Some(g)) => (l, g),
                _ => anyhow::bail!("the demo needs both the ledger API and the gateway"),
            };
            let report = demo::run_scenario_with(
                &format!("http://{ledger_addr}"),
                &format!("http://{gateway_addr}"),
                &mock_state,
                clock.now(),
                Some(&args.out_dir),
            )
            .await;
            let outcome = match report {
                Ok(text) => {
                    demo::print(&text)?;
                    if !args.exit {
                        demo::print(&format!(
                            "\nServing until interrupted (Ctrl-C): ledger API http://{ledger_addr}, gateway http://{gateway_addr}/v1, \
                             mock provider http://{mock_addr}/v1.\n"
                        ))?;
                        server::shutdown_signal().await;
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            };
            stack.stop().await?;
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
        Command::Export { command } => {
            export(&cli.common.database_url, clock.as_ref(), command).await
        }
    }
}

/// `tally export`: one finance export, written to `--output` or to standard output.
async fn export(
    database_url: &str,
    clock: &dyn Clock,
    command: ExportCommand,
) -> anyhow::Result<()> {
    // Everything the arguments alone can refuse is refused before connecting.
    let range = match &command {
        ExportCommand::Statement { account, .. } => {
            tally_ledger::event::validate_id("account", account)?;
            None
        }
        ExportCommand::Platform {
            period, from, to, ..
        } => {
            let (from, to) = match (period, from, to) {
                (Some(p), None, None) => (*p, *p),
                (None, Some(f), Some(t)) => (*f, *t),
                _ => anyhow::bail!("give --period, or --from and --to"),
            };
            exports::check_range(from, to).map_err(anyhow::Error::msg)?;
            Some((from, to))
        }
    };
    let store = server::open_store(database_url, clock).await?;
    let (body, format, output) = match (command, range) {
        (
            ExportCommand::Statement {
                account,
                period,
                format,
                output,
            },
            _,
        ) => {
            let s =
                tally_ingest::statement::account_statement(store.pool(), &account, period).await?;
            (exports::render_statement(&s, format)?, format, output)
        }
        (ExportCommand::Platform { format, output, .. }, Some((from, to))) => {
            let reports = tally_ingest::statement::platform_reports(store.pool(), from, to).await?;
            (
                exports::render_platform(from, to, &reports, format)?,
                format,
                output,
            )
        }
        (ExportCommand::Platform { .. }, None) => {
            anyhow::bail!("give --period, or --from and --to")
        }
    };
    match output {
        Some(path) => std::fs::write(&path, &body)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&body)?;
            if format == exports::ExportFormat::Json {
                stdout.write_all(b"\n")?;
            }
            stdout.flush()?;
        }
    }
    Ok(())
}
