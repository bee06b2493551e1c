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
    /// OTLP/gRPC endpoint for OpenTelemetry spans (e.g. http://127.0.0.1:4317); unset: none.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
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
    /// Finance exports: account statements and platform reports, per calendar month (UTC).
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// One account's statement for one month: opening and closing position, purchases,
    /// grants, managed usage, BYOK attributed cost, expiries, voids, debt, per-key and
    /// per-provider breakdowns.
    Statement {
        #[arg(long)]
        account: String,
        /// The month, `YYYY-MM` (UTC).
        #[arg(long)]
        period: tally_ledger::statement::Period,
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::api::exports::ExportFormat,
        /// Write here instead of standard output.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Platform-wide revenue, breakage, voids, purchases, grants and outstanding credit
    /// liability and debt, one row per month.
    Platform {
        /// One month, `YYYY-MM` (UTC).
        #[arg(long, required_unless_present = "from", conflicts_with_all = ["from", "to"])]
        period: Option<tally_ledger::statement::Period>,
        /// First month of a range (with `--to`, both included).
        #[arg(long, requires = "to")]
        from: Option<tally_ledger::statement::Period>,
        /// Last month of a range.
        #[arg(long, requires = "from")]
        to: Option<tally_ledger::statement::Period>,
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::api::exports::ExportFormat,
        /// Write here instead of standard output.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The ledger's HTTP API (with the admin API for keys) and the expiry sweep.
    Ledger,
    /// The OpenAI/Anthropic-compatible proxy; usage goes to the ledger's database, or to Kafka
    /// when `TALLY_KAFKA_BROKERS` is set.
    Gateway,
    /// The Kafka ingest consumer: usage and credit events from Kafka into the ledger, decisions
    /// and fleet metrics back. Needs `TALLY_KAFKA_BROKERS`.
    Ingest,
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
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub alerts: AlertArgs,
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
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Directory the demo writes its sample statement (CSV) to.
    #[arg(long, env = "TALLY_DEMO_OUT", default_value = ".")]
    pub out_dir: std::path::PathBuf,
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

/// What the gateway does when its spool is full (the broker has been away that long).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SpoolFullArg {
    /// Refuse managed (credit-paid) traffic until the spool has room: nothing goes unbilled.
    DenyManaged,
    /// Keep serving; events that do not fit are dropped, counted and logged.
    KeepServing,
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap brokers (host:port, comma-separated). Unset: every role runs over the
    /// embedded in-process bus instead.
    #[arg(long, env = "TALLY_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Extra librdkafka properties for every client, `key=value` (e.g.
    /// `security.protocol=SASL_SSL`): the flag repeated, or one per line in the environment
    /// variable. Not split on commas, because values such as passwords may hold them. May hold
    /// credentials: never logged or echoed.
    #[arg(
        long = "kafka-property",
        env = "TALLY_KAFKA_PROPERTIES",
        value_delimiter = '\n',
        hide_env_values = true
    )]
    pub kafka_properties: Vec<SecretArg>,
    #[arg(long, env = "TALLY_KAFKA_TOPIC_USAGE", default_value = "tally.usage")]
    pub kafka_topic_usage: String,
    #[arg(
        long,
        env = "TALLY_KAFKA_TOPIC_CREDITS",
        default_value = "tally.credits"
    )]
    pub kafka_topic_credits: String,
    #[arg(
        long,
        env = "TALLY_KAFKA_TOPIC_DECISIONS",
        default_value = "tally.decisions"
    )]
    pub kafka_topic_decisions: String,
    #[arg(
        long,
        env = "TALLY_KAFKA_TOPIC_METRICS",
        default_value = "tally.model-metrics"
    )]
    pub kafka_topic_metrics: String,
    #[arg(
        long,
        env = "TALLY_KAFKA_TOPIC_DEAD_LETTER",
        default_value = "tally.dead-letter"
    )]
    pub kafka_topic_dead_letter: String,
    /// Partitions of the account-keyed topics when tally creates them.
    #[arg(long, env = "TALLY_KAFKA_PARTITIONS", default_value_t = 12)]
    pub kafka_partitions: i32,
    #[arg(long, env = "TALLY_KAFKA_REPLICATION", default_value_t = 1)]
    pub kafka_replication: i32,
    /// The ingest consumer group.
    #[arg(long, env = "TALLY_KAFKA_GROUP", default_value = "tally-ingest")]
    pub kafka_group: String,
    /// Where the gateway spools usage events on disk until the broker has them.
    #[arg(long, env = "TALLY_SPOOL_DIR", default_value = "tally-spool")]
    pub spool_dir: std::path::PathBuf,
    #[arg(long, env = "TALLY_SPOOL_MAX_BYTES", default_value_t = 1 << 30)]
    pub spool_max_bytes: u64,
    #[arg(
        long,
        env = "TALLY_SPOOL_FULL_POLICY",
        value_enum,
        default_value = "deny-managed"
    )]
    pub spool_full_policy: SpoolFullArg,
}

/// The Kafka pipeline's settings after validation; `None` when Kafka is not configured.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub config: tally_ingest::kafka::KafkaConfig,
    pub spool_dir: std::path::PathBuf,
    pub spool_max_bytes: u64,
    pub spool_full_policy: SpoolFullArg,
}

impl KafkaArgs {
    pub fn validate(&self) -> Result<Option<KafkaSettings>, ConfigError> {
        use secrecy::ExposeSecret;
        let Some(brokers) = self
            .kafka_brokers
            .as_deref()
            .filter(|b| !b.trim().is_empty())
        else {
            return Ok(None);
        };
        let mut client_properties = Vec::new();
        for (i, p) in self.kafka_properties.iter().enumerate() {
            let p = p.0.expose_secret();
            if p.trim().is_empty() {
                continue;
            }
            // The entry may be a password: the error names its position only.
            let (k, v) = p.split_once('=').ok_or_else(|| ConfigError::Invalid {
                field: "kafka_properties (TALLY_KAFKA_PROPERTIES)",
                reason: format!("entry {} is not key=value", i + 1),
            })?;
            client_properties.push((k.trim().to_string(), v.trim().to_string()));
        }
        let config = tally_ingest::kafka::KafkaConfig {
            brokers: brokers.trim().to_string(),
            topics: tally_ingest::kafka::Topics {
                usage: self.kafka_topic_usage.clone(),
                credits: self.kafka_topic_credits.clone(),
                decisions: self.kafka_topic_decisions.clone(),
                metrics: self.kafka_topic_metrics.clone(),
                dead_letter: self.kafka_topic_dead_letter.clone(),
            },
            partitions: self.kafka_partitions,
            replication: self.kafka_replication,
            group_id: self.kafka_group.clone(),
            client_properties,
        };
        config.validate().map_err(|e| ConfigError::Invalid {
            field: "kafka (TALLY_KAFKA_*)",
            reason: e.to_string(),
        })?;
        if self.spool_max_bytes < 1 << 20 {
            return Err(ConfigError::Invalid {
                field: "spool_max_bytes (TALLY_SPOOL_MAX_BYTES)",
                reason: "must be at least 1 MiB".into(),
            });
        }
        Ok(Some(KafkaSettings {
            config,
            spool_dir: self.spool_dir.clone(),
            spool_max_bytes: self.spool_max_bytes,
            spool_full_policy: self.spool_full_policy,
        }))
    }
}

/// Alerts of the ledger role: low balance, credits exhausted, lots about to expire.
#[derive(Debug, Clone, Args)]
pub struct AlertArgs {
    /// Where alerts are POSTed (http or https). Unset: alerts are recorded and logged only.
    #[arg(long, env = "TALLY_ALERT_WEBHOOK_URL", hide_env_values = true)]
    pub alert_webhook_url: Option<String>,
    /// Signs every delivery (HMAC-SHA256, header `tally-signature`); required with the URL,
    /// at least 16 characters. Never logged.
    #[arg(long, env = "TALLY_ALERT_WEBHOOK_SECRET", hide_env_values = true)]
    pub alert_webhook_secret: Option<SecretArg>,
    /// How long before a lot expires its alert is raised (e.g. `7d`, `36h`).
    #[arg(long, env = "TALLY_ALERT_EXPIRY_LEAD", default_value = "7d")]
    pub alert_expiry_lead: String,
    /// First retry delay of a failed delivery; doubles per attempt (e.g. `10s`).
    #[arg(long, env = "TALLY_ALERT_RETRY_MIN_DELAY", default_value = "10s")]
    pub alert_retry_min_delay: String,
    /// Longest retry delay; deliveries are retried at this pace until they succeed.
    #[arg(long, env = "TALLY_ALERT_RETRY_MAX_DELAY", default_value = "1h")]
    pub alert_retry_max_delay: String,
}

fn parse_span(field: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(value.trim()).map_err(|e| ConfigError::Invalid {
        field,
        reason: format!("'{value}': {e} (use e.g. 7d, 36h, 90m, 30s)"),
    })?;
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            field,
            reason: "must be longer than zero".to_string(),
        });
    }
    Ok(d)
}

impl AlertArgs {
    pub fn validate(&self) -> Result<crate::alerts::AlertSettings, ConfigError> {
        use secrecy::ExposeSecret;
        let lead_field = "alert_expiry_lead (TALLY_ALERT_EXPIRY_LEAD)";
        let lead = parse_span(lead_field, &self.alert_expiry_lead)?;
        let expiry_lead = chrono::TimeDelta::from_std(lead)
            .ok()
            .filter(|d| *d <= chrono::TimeDelta::days(366))
            .ok_or_else(|| ConfigError::Invalid {
                field: lead_field,
                reason: "must be at most 366 days".to_string(),
            })?;
        let retry_min_delay = parse_span(
            "alert_retry_min_delay (TALLY_ALERT_RETRY_MIN_DELAY)",
            &self.alert_retry_min_delay,
        )?;
        let retry_max_delay = parse_span(
            "alert_retry_max_delay (TALLY_ALERT_RETRY_MAX_DELAY)",
            &self.alert_retry_max_delay,
        )?;
        if retry_max_delay < retry_min_delay {
            return Err(ConfigError::Invalid {
                field: "alert_retry_max_delay (TALLY_ALERT_RETRY_MAX_DELAY)",
                reason: "must not be shorter than TALLY_ALERT_RETRY_MIN_DELAY".to_string(),
            });
        }
        let url = self
            .alert_webhook_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty());
        let webhook = match (url, &self.alert_webhook_secret) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    field: "alert_webhook_secret (TALLY_ALERT_WEBHOOK_SECRET)",
                    reason: "is required with TALLY_ALERT_WEBHOOK_URL: deliveries are signed"
                        .to_string(),
                });
            }
            (Some(url), Some(secret)) => {
                // The URL may carry a token of the receiver: errors describe it, never echo it.
                let url_field = "alert_webhook_url (TALLY_ALERT_WEBHOOK_URL)";
                let url: reqwest::Url = url.parse().map_err(|e| ConfigError::Invalid {
                    field: url_field,
                    reason: format!("not a URL: {e}"),
                })?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(ConfigError::Invalid {
                        field: url_field,
                        reason: "must be an http:// or https:// URL with a host".to_string(),
                    });
                }
                if secret.0.expose_secret().len() < crate::alerts::MIN_SECRET_LEN {
                    return Err(ConfigError::Invalid {
                        field: "alert_webhook_secret (TALLY_ALERT_WEBHOOK_SECRET)",
                        reason: format!(
                            "must be at least {} characters",
                            crate::alerts::MIN_SECRET_LEN
                        ),
                    });
                }
                Some(crate::alerts::Webhook {
                    url,
                    secret: secret.0.clone(),
                })
            }
        };
        Ok(crate::alerts::AlertSettings {
            webhook,
            expiry_lead,
            retry_min_delay,
            retry_max_delay,
            ..crate::alerts::AlertSettings::default()
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
    fn kafka_properties_keep_commas_and_never_echo_a_value() {
        use clap::Parser;
        let password = "pa,ss=w0rd;canary";
        let cli = Cli::try_parse_from([
            "tally",
            "serve",
            "--kafka-brokers",
            "127.0.0.1:9092",
            "--kafka-property",
            &format!("sasl.password={password}"),
            "--kafka-property",
            "security.protocol=SASL_SSL",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let k = args.kafka.validate().unwrap().unwrap();
        assert!(
            k.config
                .client_properties
                .contains(&("sasl.password".to_string(), password.to_string()))
        );
        assert!(!format!("{k:?}").contains("canary"), "{k:?}");
        let cli = Cli::try_parse_from([
            "tally",
            "serve",
            "--kafka-brokers",
            "127.0.0.1:9092",
            "--kafka-property",
            "secretcanaryvalue-without-equals",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let err = args.kafka.validate().unwrap_err().to_string();
        assert!(err.contains("entry 1"), "{err}");
        assert!(!err.contains("canary"), "{err}");
    }

    #[test]
    fn bad_listen_address_is_named() {
        let args = ServerArgs {
            listen: "nope".into(),
            sweep_interval_secs: 60,
        };
        let err = args.validate().unwrap_err().to_string();
        assert!(err.contains("TALLY_LISTEN"), "{err}");
    }

    fn alert_args(url: Option<&str>, secret: Option<&str>, lead: &str) -> AlertArgs {
        AlertArgs {
            alert_webhook_url: url.map(str::to_string),
            alert_webhook_secret: secret.map(|s| s.parse().unwrap()),
            alert_expiry_lead: lead.to_string(),
            alert_retry_min_delay: "10s".to_string(),
            alert_retry_max_delay: "1h".to_string(),
        }
    }

    #[test]
    fn alert_settings_are_validated_and_the_secret_never_shown() {
        let s = alert_args(None, None, "7d").validate().unwrap();
        assert!(s.webhook.is_none());
        assert_eq!(s.expiry_lead, chrono::TimeDelta::days(7));
        let s = alert_args(None, None, "36h").validate().unwrap();
        assert_eq!(s.expiry_lead, chrono::TimeDelta::hours(36));
        for bad in ["7 parsecs", "", "0s", "400d"] {
            let err = alert_args(None, None, bad)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("TALLY_ALERT_EXPIRY_LEAD"), "{bad}: {err}");
        }
        let secret = "topsecret-0123456789";
        let err = alert_args(Some("https://h.example/x"), None, "7d")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("TALLY_ALERT_WEBHOOK_SECRET"), "{err}");
        let err = alert_args(Some("ftp://h.example/tok123"), Some(secret), "7d")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TALLY_ALERT_WEBHOOK_URL") && !err.contains("tok123"),
            "{err}"
        );
        let err = alert_args(Some("https://h.example/x"), Some("short"), "7d")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TALLY_ALERT_WEBHOOK_SECRET") && !err.contains("short"),
            "{err}"
        );
        let s = alert_args(Some("https://h.example/x"), Some(secret), "7d")
            .validate()
            .unwrap();
        assert!(s.webhook.is_some());
        let shown = format!("{s:?} {:?}", alert_args(None, Some(secret), "7d"));
        assert!(!shown.contains(secret), "{shown}");
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
