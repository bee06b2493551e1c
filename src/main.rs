//! The `tally` binary: parse the command line, start logging, hand over to the library.

use clap::Parser;
use tracing_subscriber::EnvFilter;

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
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(filter)?)
        .with_writer(std::io::stderr)
        .init();
    tally::cli::run(cli).await
}
