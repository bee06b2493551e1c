//! Configuration: command-line flags with environment overrides, validated before any IO.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tally";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Usage metering, pricing, credits and enforcement for an AI gateway"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// PostgreSQL URL; the database is created when missing.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, global = true)]
    pub database_url: String,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "TALLY_LOG", global = true)]
    pub log: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a role (or every role in one process) until interrupted.
    Serve(ServeArgs),
    /// Apply pending migrations and exit.
    Migrate,
    /// Run the whole flow end to end on the embedded defaults and print what happened.
    Demo(DemoArgs),
    /// Ledger maintenance.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The ledger's HTTP API and the expiry sweep.
    Ledger,
    /// Every role available in this build, in one process.
    All,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[arg(long, value_enum, default_value = "all", env = "TALLY_ROLE")]
    pub role: Role,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "TALLY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Seconds between expiry sweeps.
    #[arg(long, env = "TALLY_SWEEP_INTERVAL_SECS", default_value_t = 60)]
    pub sweep_interval_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Exit after printing the summary instead of serving until interrupted.
    #[arg(long)]
    pub exit: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Replay the event log into fresh projections.
    Rebuild,
    /// Append expiry events for every lot past its expiry, now.
    Sweep,
}

/// Server settings after validation.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub sweep_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The bad field is named; nothing has touched the network or the disk yet.
pub fn validate_database_url(url: &str) -> Result<(), ConfigError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::Invalid {
            field: "database_url (DATABASE_URL)",
            reason: "must be a postgres:// or postgresql:// URL".to_string(),
        });
    }
    sqlx::postgres::PgConnectOptions::from_str(url)
        .map(|_| ())
        .map_err(|e| ConfigError::Invalid {
            field: "database_url (DATABASE_URL)",
            reason: redact_url(&e.to_string()),
        })
}

/// Connection strings may carry passwords; error text about them never does.
fn redact_url(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(a), Some(b)) if b > a => format!("{}://***{}", &s[..a], &s[b..]),
        _ => s.to_string(),
    }
}

impl ServerArgs {
    pub fn validate(&self) -> Result<ServerConfig, ConfigError> {
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::Invalid {
                field: "listen (TALLY_LISTEN)",
                reason: format!("'{}': {e}", self.listen),
            })?;
        if self.sweep_interval_secs == 0 || self.sweep_interval_secs > 86_400 {
            return Err(ConfigError::Invalid {
                field: "sweep_interval_secs (TALLY_SWEEP_INTERVAL_SECS)",
                reason: "must be 1 to 86400".to_string(),
            });
        }
        Ok(ServerConfig {
            listen,
            sweep_interval: Duration::from_secs(self.sweep_interval_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_listen_address_is_named() {
        let args = ServerArgs {
            listen: "nope".into(),
            sweep_interval_secs: 60,
        };
        let err = args.validate().unwrap_err().to_string();
        assert!(err.contains("TALLY_LISTEN"), "{err}");
    }

    #[test]
    fn bad_database_url_is_named_without_password() {
        let err = validate_database_url("mysql://u:secretpw@h/db")
            .unwrap_err()
            .to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
        assert!(!err.contains("secretpw"), "{err}");
        validate_database_url(DEFAULT_DATABASE_URL).unwrap();
    }
}
