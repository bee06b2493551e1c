//! The `tally` binary: parse the command line, start logging, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = tally::config::Cli::parse();
    let default_filter = match cli.command {
        tally::config::Command::Demo(_) => "warn",
        _ => "info",
    };
    let filter = cli
        .common
        .log
        .clone()
        .unwrap_or_else(|| default_filter.to_string());
    let _telemetry = tally::observability::init(&filter, cli.common.otlp_endpoint.as_deref())?;
    tally::cli::run(cli).await
}
