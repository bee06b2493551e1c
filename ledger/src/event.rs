//! The events of the log. Everything tally knows is one of these; every projection is a fold
//! over them in log order.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::DomainError;
use crate::money::Money;

/// Identifiers chosen by callers (accounts, keys, endpoints, credentials) share one shape, so
/// they are safe in URLs, CSV and log fields.
pub const MAX_ID_LEN: usize = 128;
/// No attempt lasts a day; a larger latency is a bug upstream, and bounding it keeps the hourly
/// latency sums far from overflow.
pub const MAX_LATENCY_MS: u64 = 86_400_000;

pub fn validate_id(field: &'static str, id: &str) -> Result<(), DomainError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(DomainError::invalid(
            field,
            format!("must be 1 to {MAX_ID_LEN} characters"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'))
    {
        return Err(DomainError::invalid(
            field,
            "may contain only ASCII letters, digits and _ - . : /",
        ));
    }
    Ok(())
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Uuid,
    /// When it happened in the world (event time), not when tally learned of it.
    pub occurred_at: DateTime<Utc>,
    pub account_id: String,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    AccountOpened(AccountOpened),
    CreditsPurchased(CreditsPurchased),
    CreditsGranted(CreditsGranted),
    LotVoided(LotVoided),
    LotExpired(LotExpired),
    Usage(Usage),
}

impl EventBody {
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::AccountOpened(_) => "account_opened",
            EventBody::CreditsPurchased(_) => "credits_purchased",
            EventBody::CreditsGranted(_) => "credits_granted",
            EventBody::LotVoided(_) => "lot_voided",
            EventBody::LotExpired(_) => "lot_expired",
            EventBody::Usage(_) => "usage",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountOpened {
    pub name: String,
    /// Below this available balance the account is in the low-balance state (alerts, dashboards).
    #[serde(default)]
    pub low_balance_threshold_usd: Money,
}

/// A purchase opens a lot that expires exactly [`crate::lot::PURCHASE_VALIDITY_DAYS`] after
/// `occurred_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsPurchased {
    pub lot_id: Uuid,
    pub amount_usd: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_reference: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsGranted {
    pub lot_id: Uuid,
    pub amount_usd: Money,
    pub expires_at: DateTime<Utc>,
    /// Lower burns first. Purchases have [`crate::lot::PURCHASE_PRIORITY`].
    pub priority: i32,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LotVoided {
    pub lot_id: Uuid,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LotExpired {
    pub lot_id: Uuid,
}

/// Which kind of provider credential served an attempt; decides who pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A provider key attached to the gateway API key: the customer's account pays upstream.
    Attached,
    /// An account-level provider key of the customer: the customer's account pays upstream.
    Byok,
    /// The platform's own key: paid from credits.
    Managed,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Attached => "attached",
            CredentialKind::Byok => "byok",
            CredentialKind::Managed => "managed",
        }
    }

    pub fn parse(s: &str) -> Option<CredentialKind> {
        match s {
            "attached" => Some(CredentialKind::Attached),
            "byok" => Some(CredentialKind::Byok),
            "managed" => Some(CredentialKind::Managed),
            _ => None,
        }
    }

    pub fn is_charged(self) -> bool {
        self == CredentialKind::Managed
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// Counts reported by the provider.
    Provider,
    /// Counts estimated by the gateway's tokenizer.
    Estimate,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Provider => "provider",
            TokenSource::Estimate => "estimate",
        }
    }
}

/// Token counts per class. The classes are disjoint: `input` excludes `cached_input`, and
/// `output` excludes `reasoning`, so each token is priced exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCounts {
    #[serde(default)]
    pub input: i64,
    #[serde(default)]
    pub cached_input: i64,
    #[serde(default)]
    pub output: i64,
    #[serde(default)]
    pub reasoning: i64,
}

/// A single request may not claim more tokens than this per class; anything larger is a bug
/// upstream, and refusing it keeps cost arithmetic far from overflow.
pub const MAX_TOKENS_PER_CLASS: i64 = 1_000_000_000;

impl TokenCounts {
    pub fn validate(&self) -> Result<(), DomainError> {
        for (field, v) in [
            ("tokens.input", self.input),
            ("tokens.cached_input", self.cached_input),
            ("tokens.output", self.output),
            ("tokens.reasoning", self.reasoning),
        ] {
            if v < 0 {
                return Err(DomainError::invalid(field, "must not be negative"));
            }
            if v > MAX_TOKENS_PER_CLASS {
                return Err(DomainError::invalid(
                    field,
                    format!("must be at most {MAX_TOKENS_PER_CLASS}"),
                ));
            }
        }
        Ok(())
    }

    pub fn total(&self) -> i64 {
        self.input + self.cached_input + self.output + self.reasoning
    }
}

/// One attempt of one request through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub request_id: String,
    pub attempt: u32,
    pub endpoint_id: String,
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
    pub credential_kind: CredentialKind,
    pub credential_id: String,
    pub tokens: TokenCounts,
    pub token_source: TokenSource,
    pub upstream_latency_ms: u64,
    pub total_latency_ms: u64,
    /// HTTP status the attempt ended with (the upstream's, or the gateway's own on timeout).
    pub status: u16,
    pub streaming: bool,
}

impl Usage {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn validate(&self) -> Result<(), DomainError> {
        validate_id("request_id", &self.request_id)?;
        validate_id("endpoint_id", &self.endpoint_id)?;
        validate_id("api_key_id", &self.api_key_id)?;
        validate_id("provider", &self.provider)?;
        validate_id("credential_id", &self.credential_id)?;
        if self.model.is_empty()
            || self.model.len() > MAX_ID_LEN
            || self.model.chars().any(char::is_control)
        {
            return Err(DomainError::invalid(
                "model",
                format!("must be 1 to {MAX_ID_LEN} printable characters"),
            ));
        }
        if !(100..=599).contains(&self.status) {
            return Err(DomainError::invalid(
                "status",
                "must be an HTTP status (100-599)",
            ));
        }
        if self.total_latency_ms > MAX_LATENCY_MS {
            return Err(DomainError::invalid(
                "total_latency_ms",
                format!("must not exceed {MAX_LATENCY_MS} (one day)"),
            ));
        }
        if self.upstream_latency_ms > self.total_latency_ms {
            return Err(DomainError::invalid(
                "upstream_latency_ms",
                "must not exceed total_latency_ms",
            ));
        }
        self.tokens.validate()
    }
}

impl Event {
    /// Checks what can be checked without state: ids, amounts' signs, token counts.
    pub fn validate(&self) -> Result<(), DomainError> {
        validate_id("account_id", &self.account_id)?;
        match &self.body {
            EventBody::AccountOpened(o) => {
                if o.name.trim().is_empty() || o.name.len() > 200 {
                    return Err(DomainError::invalid("name", "must be 1 to 200 characters"));
                }
                if o.low_balance_threshold_usd.is_negative() {
                    return Err(DomainError::invalid(
                        "low_balance_threshold_usd",
                        "must not be negative",
                    ));
                }
                Ok(())
            }
            EventBody::CreditsPurchased(p) => crate::lot::validate_purchase_amount(p.amount_usd),
            EventBody::CreditsGranted(g) => {
                crate::lot::validate_credit_amount(g.amount_usd)?;
                if g.expires_at <= self.occurred_at {
                    return Err(DomainError::ExpiryNotAfterGrant);
                }
                Ok(())
            }
            EventBody::LotVoided(_) | EventBody::LotExpired(_) => Ok(()),
            EventBody::Usage(u) => u.validate(),
        }
    }

    /// SHA-256 of the canonical JSON: the same event id arriving with another hash is a
    /// conflict, not a duplicate.
    pub fn payload_hash(&self) -> [u8; 32] {
        // Serializing a typed value cannot fail: every field is a plain string, number or map.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&bytes).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_json(extra: &str) -> String {
        format!(
            r#"{{"event_id":"6f1c2b9e-8f4e-4c55-9d57-2f3a1f9f0a11","occurred_at":"2026-11-01T10:00:00Z",
            "account_id":"acme","type":"usage","request_id":"r1","attempt":1,"endpoint_id":"default",
            "api_key_id":"key_1","provider":"openai","model":"gpt-4o","credential_kind":"managed",
            "credential_id":"managed-openai","tokens":{{"input":10,"output":5}},"token_source":"provider",
            "upstream_latency_ms":100,"total_latency_ms":110,"status":200,"streaming":false{extra}}}"#
        )
    }

    #[test]
    fn usage_round_trips_through_json() {
        let e: Event = serde_json::from_str(&usage_json("")).unwrap();
        assert_eq!(e.body.kind(), "usage");
        let back: Event = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.payload_hash(), e.payload_hash());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<Event>(&usage_json(r#","colour":"blue""#)).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn negative_tokens_are_invalid() {
        let json = usage_json("").replace(r#""input":10"#, r#""input":-3"#);
        let e: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(
            e.validate(),
            Err(DomainError::invalid("tokens.input", "must not be negative"))
        );
    }

    #[test]
    fn latencies_beyond_a_day_are_invalid() {
        let json = usage_json("").replace(
            r#""total_latency_ms":110"#,
            r#""total_latency_ms":9223372036854775807"#,
        );
        let e: Event = serde_json::from_str(&json).unwrap();
        let err = e.validate().unwrap_err().to_string();
        assert!(err.contains("total_latency_ms"), "{err}");
    }

    #[test]
    fn ids_are_restricted() {
        assert!(validate_id("account_id", "acme-corp_1").is_ok());
        assert!(validate_id("account_id", "").is_err());
        assert!(validate_id("account_id", "a b").is_err());
    }
}
