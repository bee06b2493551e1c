//! The built-in provider catalog: where each provider lives, which API it speaks, whether the
//! platform offers managed keys for it, and its models (priced by the ledger's price book).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiShape {
    /// `POST {base}/chat/completions`, `Authorization: Bearer`.
    OpenAi,
    /// `POST {base}/messages`, `x-api-key`.
    Anthropic,
}

impl ApiShape {
    pub fn parse(s: &str) -> Option<ApiShape> {
        match s {
            "openai" => Some(ApiShape::OpenAi),
            "anthropic" => Some(ApiShape::Anthropic),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProviderInfo {
    pub id: &'static str,
    /// Base URL up to and including the API version segment.
    pub base_url: &'static str,
    pub shape: ApiShape,
    /// Platform-managed keys (paid from credits) exist only for these.
    pub managed: bool,
    pub models: &'static [&'static str],
}

pub const PROVIDERS: &[ProviderInfo] = &[
    ProviderInfo {
        id: "openai",
        base_url: "https://api.openai.com/v1",
        shape: ApiShape::OpenAi,
        managed: true,
        models: &[
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "o3-mini",
        ],
    },
    ProviderInfo {
        id: "anthropic",
        base_url: "https://api.anthropic.com/v1",
        shape: ApiShape::Anthropic,
        managed: true,
        models: &["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"],
    },
    ProviderInfo {
        id: "google",
        base_url: "https://generativelanguage.googleapis.com/v1beta/openai",
        shape: ApiShape::OpenAi,
        managed: false,
        models: &["gemini-2.5-flash", "gemini-2.5-pro"],
    },
    ProviderInfo {
        id: "deepseek",
        base_url: "https://api.deepseek.com/v1",
        shape: ApiShape::OpenAi,
        managed: false,
        models: &["deepseek-chat", "deepseek-reasoner"],
    },
    ProviderInfo {
        id: "groq",
        base_url: "https://api.groq.com/openai/v1",
        shape: ApiShape::OpenAi,
        managed: false,
        models: &["llama-3.3-70b-versatile", "llama-3.1-8b-instant"],
    },
    ProviderInfo {
        id: "mistral",
        base_url: "https://api.mistral.ai/v1",
        shape: ApiShape::OpenAi,
        managed: false,
        models: &["mistral-large-latest", "mistral-small-latest"],
    },
];

pub fn provider(id: &str) -> Option<&'static ProviderInfo> {
    PROVIDERS.iter().find(|p| p.id == id)
}

/// The provider of a bare catalog model name (`gpt-4o` → openai).
pub fn provider_of_model(model: &str) -> Option<&'static ProviderInfo> {
    PROVIDERS.iter().find(|p| p.models.contains(&model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_ledger::catalog::builtin_price_version;

    #[test]
    fn every_catalog_model_has_a_price() {
        let prices = builtin_price_version();
        for p in PROVIDERS {
            for m in p.models {
                assert!(
                    prices.models.contains_key(&format!("{}:{m}", p.id)),
                    "{}:{m} has no price",
                    p.id
                );
            }
        }
    }

    #[test]
    fn managed_keys_only_for_openai_and_anthropic() {
        let managed: Vec<_> = PROVIDERS
            .iter()
            .filter(|p| p.managed)
            .map(|p| p.id)
            .collect();
        assert_eq!(managed, ["openai", "anthropic"]);
    }
}
