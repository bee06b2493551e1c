//! Gateway configuration: provider restrictions, timeouts, managed keys, base URL overrides.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use secrecy::SecretString;

use crate::catalog;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Refuse providers not listed in `configured_providers` ("provider not allowed").
    pub only_allow_configured_providers: bool,
    /// Refuse models not listed for their provider in `configured_providers` ("model unknown").
    pub only_allow_configured_models: bool,
    /// Provider id → the models configured for it (may be empty).
    pub configured_providers: BTreeMap<String, BTreeSet<String>>,
    /// Provider id → base URL replacing the catalog's (a mock, a regional endpoint, a proxy).
    pub base_url_overrides: BTreeMap<String, String>,
    /// Provider id → the platform's own keys, tried in order; OpenAI and Anthropic only.
    pub managed_keys: BTreeMap<String, Vec<SecretString>>,
    /// Hosts, IPs or CIDR blocks that custom providers may reach although they are private,
    /// loopback or link-local (a self-hosted Ollama or vLLM on the operator's network).
    pub custom_provider_allowlist: Vec<String>,
    /// Model selection strategies (CEL over `ai.models`), tried in order; the first that
    /// returns models wins.
    pub strategies: Vec<String>,
    /// Limit of one attempt, up to the response headers for streams and the whole body
    /// otherwise.
    pub per_request_timeout: Duration,
    /// Limit of all attempts of one request together.
    pub total_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            only_allow_configured_providers: false,
            only_allow_configured_models: false,
            configured_providers: BTreeMap::new(),
            base_url_overrides: BTreeMap::new(),
            managed_keys: BTreeMap::new(),
            custom_provider_allowlist: Vec::new(),
            strategies: Vec::new(),
            per_request_timeout: Duration::from_secs(60),
            // The seeds' default: six minutes for every attempt of a request.
            total_timeout: Duration::from_secs(360),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GatewayConfigError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl GatewayConfig {
    /// Checked before the gateway starts; names the bad field.
    pub fn validate(&self) -> Result<(), GatewayConfigError> {
        let invalid = |field: String, reason: &str| GatewayConfigError::Invalid {
            field,
            reason: reason.to_string(),
        };
        for provider in self.managed_keys.keys() {
            match catalog::provider(provider) {
                Some(p) if p.managed => {}
                _ => {
                    return Err(invalid(
                        format!("managed_keys.{provider}"),
                        "managed keys exist only for openai and anthropic",
                    ));
                }
            }
        }
        for (provider, url) in &self.base_url_overrides {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(invalid(
                        format!("base_url_overrides.{provider}"),
                        "must be an http(s) URL",
                    ));
                }
            }
        }
        if self.per_request_timeout.is_zero() || self.total_timeout.is_zero() {
            return Err(invalid(
                "per_request_timeout/total_timeout".into(),
                "must be positive",
            ));
        }
        if self.per_request_timeout > self.total_timeout {
            return Err(invalid(
                "per_request_timeout".into(),
                "must not exceed total_timeout",
            ));
        }
        Ok(())
    }

    pub fn base_url(&self, provider: &str) -> Option<String> {
        self.base_url_overrides
            .get(provider)
            .cloned()
            .or_else(|| catalog::provider(provider).map(|p| p.base_url.to_string()))
    }
}
