//! Configuration: command-line flags with environment overrides, validated before any IO.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;
use tally_gateway_core::config::GatewayConfig;

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
    /// Run the mock OpenAI/Anthropic provider (for trying the gateway without real keys).
    MockProvider {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
    },
    /// Ledger maintenance.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The ledger's HTTP API (with the admin API for keys) and the expiry sweep.
    Ledger,
    /// The OpenAI/Anthropic-compatible proxy; usage goes to the ledger's database.
    Gateway,
    /// Every role available in this build, in one process.
    All,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[arg(long, value_enum, default_value = "all", env = "TALLY_ROLE")]
    pub role: Role,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
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
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

pub const DEFAULT_GATEWAY_LISTEN: &str = "127.0.0.1:8080";

/// A secret given on the command line or in the environment: redacted in `Debug`, so no log
/// of the parsed configuration can carry it.
#[derive(Clone)]
pub struct SecretArg(pub SecretString);

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for SecretArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretArg(SecretString::from(s.to_string())))
    }
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address of the gateway (the OpenAI/Anthropic-compatible proxy).
    #[arg(long, env = "TALLY_GATEWAY_LISTEN", default_value = DEFAULT_GATEWAY_LISTEN)]
    pub gateway_listen: String,
    /// Key-encryption key for provider keys at rest: 32 random bytes, base64. Required by
    /// `serve`; `demo` uses a throwaway one when unset.
    #[arg(long, env = "TALLY_KEK", hide_env_values = true)]
    pub kek: Option<SecretArg>,
    /// The platform's own OpenAI keys (comma-separated), paid from credits.
    #[arg(
        long,
        env = "TALLY_MANAGED_OPENAI_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub managed_openai_keys: Vec<SecretArg>,
    /// The platform's own Anthropic keys (comma-separated), paid from credits.
    #[arg(
        long,
        env = "TALLY_MANAGED_ANTHROPIC_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub managed_anthropic_keys: Vec<SecretArg>,
    /// `provider=url` pairs replacing catalog base URLs (comma-separated).
    #[arg(long, env = "TALLY_PROVIDER_BASE_URLS", value_delimiter = ',')]
    pub provider_base_urls: Vec<String>,
    /// Only these providers may be used (comma-separated); empty allows all.
    #[arg(long, env = "TALLY_ALLOWED_PROVIDERS", value_delimiter = ',')]
    pub allowed_providers: Vec<String>,
    /// Only these `provider:model`s may be used (comma-separated); empty allows all.
    #[arg(long, env = "TALLY_ALLOWED_MODELS", value_delimiter = ',')]
    pub allowed_models: Vec<String>,
    /// Hosts, IPs or CIDR blocks custom providers may reach although private or loopback
    /// (comma-separated); everything else private, loopback, link-local or metadata is refused.
    #[arg(long, env = "TALLY_EGRESS_ALLOWLIST", value_delimiter = ',')]
    pub egress_allowlist: Vec<String>,
    /// Model selection strategies, CEL over `ai.models`, separated by ';' and tried in order
    /// (e.g. `ai.models.filter(m, m.metrics.global.latency.upstream_ms_avg < 1000)`).
    #[arg(long, env = "TALLY_MODEL_STRATEGIES", value_delimiter = ';')]
    pub model_strategies: Vec<String>,
    #[arg(long, env = "TALLY_PER_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub per_request_timeout_secs: u64,
    #[arg(long, env = "TALLY_TOTAL_TIMEOUT_SECS", default_value_t = 360)]
    pub total_timeout_secs: u64,
}

/// Gateway settings after validation.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub config: GatewayConfig,
    /// Base64 KEK as given; opened by the caller so the key type stays in one place.
    pub kek: Option<SecretString>,
}

impl GatewayArgs {
    pub fn validate(&self) -> Result<GatewaySettings, ConfigError> {
        let listen =
            self.gateway_listen
                .parse::<SocketAddr>()
                .map_err(|e| ConfigError::Invalid {
                    field: "gateway_listen (TALLY_GATEWAY_LISTEN)",
                    reason: format!("'{}': {e}", self.gateway_listen),
                })?;
        let mut config = GatewayConfig {
            per_request_timeout: Duration::from_secs(self.per_request_timeout_secs),
            total_timeout: Duration::from_secs(self.total_timeout_secs),
            custom_provider_allowlist: self.egress_allowlist.clone(),
            strategies: self
                .model_strategies
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            ..GatewayConfig::default()
        };
        for (provider, keys) in [
            ("openai", &self.managed_openai_keys),
            ("anthropic", &self.managed_anthropic_keys),
        ] {
            if !keys.is_empty() {
                config.managed_keys.insert(
                    provider.to_string(),
                    keys.iter().map(|k| k.0.clone()).collect(),
                );
            }
        }
        for pair in &self.provider_base_urls {
            let (provider, url) = pair.split_once('=').ok_or_else(|| ConfigError::Invalid {
                field: "provider_base_urls (TALLY_PROVIDER_BASE_URLS)",
                reason: format!("'{pair}' is not provider=url"),
            })?;
            config
                .base_url_overrides
                .insert(provider.trim().to_string(), url.trim().to_string());
        }
        if !self.allowed_providers.is_empty() {
            config.only_allow_configured_providers = true;
            for p in &self.allowed_providers {
                config
                    .configured_providers
                    .entry(p.trim().to_string())
                    .or_default();
            }
        }
        if !self.allowed_models.is_empty() {
            config.only_allow_configured_models = true;
            for m in &self.allowed_models {
                let (p, model) = m.split_once(':').ok_or_else(|| ConfigError::Invalid {
                    field: "allowed_models (TALLY_ALLOWED_MODELS)",
                    reason: format!("'{m}' is not provider:model"),
                })?;
                config
                    .configured_providers
                    .entry(p.trim().to_string())
                    .or_default()
                    .insert(model.trim().to_string());
            }
        }
        config.validate().map_err(|e| ConfigError::Invalid {
            field: "gateway",
            reason: e.to_string(),
        })?;
        Ok(GatewaySettings {
            listen,
            config,
            kek: self.kek.as_ref().map(|k| k.0.clone()),
        })
    }
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
