//! The versioned, effective-dated price book.
//!
//! A usage event is priced with the version in force at its *event time*, never "now", so a
//! replay a year later prices every event exactly as the live path did. New versions may only
//! take effect in the future (see [`PriceBook::check_publishable`]), which keeps that promise.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::event::TokenCounts;
use crate::money::Money;

/// Prices are quoted per million tokens, as every provider does.
const TOKENS_PER_PRICE_UNIT: i64 = 1_000_000;

/// Price per million tokens for each token class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrices {
    #[serde(deserialize_with = "crate::money::deserialize_decimal")]
    pub input_per_mtok: Decimal,
    #[serde(deserialize_with = "crate::money::deserialize_decimal")]
    pub cached_input_per_mtok: Decimal,
    #[serde(deserialize_with = "crate::money::deserialize_decimal")]
    pub output_per_mtok: Decimal,
    #[serde(deserialize_with = "crate::money::deserialize_decimal")]
    pub reasoning_per_mtok: Decimal,
}

impl TokenPrices {
    pub fn new(input: Decimal, cached_input: Decimal, output: Decimal, reasoning: Decimal) -> Self {
        TokenPrices {
            input_per_mtok: input,
            cached_input_per_mtok: cached_input,
            output_per_mtok: output,
            reasoning_per_mtok: reasoning,
        }
    }

    fn validate(&self, field: &'static str) -> Result<(), DomainError> {
        for p in [
            self.input_per_mtok,
            self.cached_input_per_mtok,
            self.output_per_mtok,
            self.reasoning_per_mtok,
        ] {
            if p.is_sign_negative() {
                return Err(DomainError::invalid(field, "prices must not be negative"));
            }
            if p > Decimal::from(1_000_000) || p.normalize().scale() > 6 {
                return Err(DomainError::invalid(
                    field,
                    "prices must be at most $1,000,000 per million tokens with at most 6 decimals",
                ));
            }
        }
        Ok(())
    }

    /// Exact cost of `tokens`, rounded once to the money scale.
    pub fn cost(&self, tokens: &TokenCounts) -> Result<Money, DomainError> {
        let parts = [
            (tokens.input, self.input_per_mtok),
            (tokens.cached_input, self.cached_input_per_mtok),
            (tokens.output, self.output_per_mtok),
            (tokens.reasoning, self.reasoning_per_mtok),
        ];
        let mut total = Decimal::ZERO;
        for (count, price) in parts {
            let part = Decimal::from(count)
                .checked_mul(price)
                .ok_or(DomainError::AmountOverflow)?;
            total = total.checked_add(part).ok_or(DomainError::AmountOverflow)?;
        }
        let total = total
            .checked_div(Decimal::from(TOKENS_PER_PRICE_UNIT))
            .ok_or(DomainError::AmountOverflow)?;
        Money::from_decimal_rounded(total)
    }
}

/// The platform's processing fee on managed usage: a percentage of the upstream cost plus an
/// amount per successful request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeePolicy {
    #[serde(deserialize_with = "crate::money::deserialize_decimal")]
    pub percent: Decimal,
    pub per_request_usd: Money,
}

impl FeePolicy {
    pub fn none() -> FeePolicy {
        FeePolicy {
            percent: Decimal::ZERO,
            per_request_usd: Money::ZERO,
        }
    }

    /// The per-request part is charged only for successful attempts: a failed attempt that
    /// streamed nothing costs the customer nothing.
    pub fn fee(&self, upstream_cost: Money, success: bool) -> Result<Money, DomainError> {
        let pct = upstream_cost
            .as_decimal()
            .checked_mul(self.percent)
            .and_then(|v| v.checked_div(Decimal::ONE_HUNDRED))
            .ok_or(DomainError::AmountOverflow)?;
        let pct = Money::from_decimal_rounded(pct)?;
        if success {
            pct.checked_add(self.per_request_usd)
        } else {
            Ok(pct)
        }
    }
}

/// One version of the price book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceVersion {
    pub version: String,
    pub effective_from: DateTime<Utc>,
    pub fee: FeePolicy,
    /// Keyed by `provider:model`.
    pub models: BTreeMap<String, TokenPrices>,
    /// Prices applied to models the version does not list; such usage is flagged. Without a
    /// fallback, unknown models are held as unpriced and reported, never silently free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<TokenPrices>,
}

impl PriceVersion {
    pub fn validate(&self) -> Result<(), DomainError> {
        crate::event::validate_id("version", &self.version)?;
        if self.fee.percent.is_sign_negative() || self.fee.percent > Decimal::ONE_HUNDRED {
            return Err(DomainError::invalid(
                "fee.percent",
                "must be between 0 and 100",
            ));
        }
        if self.fee.per_request_usd.is_negative() {
            return Err(DomainError::invalid(
                "fee.per_request_usd",
                "must not be negative",
            ));
        }
        for (key, prices) in &self.models {
            match key.split_once(':') {
                Some((p, m)) if !p.is_empty() && !m.is_empty() => {}
                _ => {
                    return Err(DomainError::invalid(
                        "models",
                        format!("'{key}' is not provider:model"),
                    ));
                }
            }
            prices.validate("models")?;
        }
        if let Some(f) = &self.fallback {
            f.validate("fallback")?;
        }
        Ok(())
    }
}

/// How a usage event's cost was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceBasis {
    Catalog,
    Fallback,
    Unpriced,
}

impl PriceBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            PriceBasis::Catalog => "catalog",
            PriceBasis::Fallback => "fallback",
            PriceBasis::Unpriced => "unpriced",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    pub version: Option<String>,
    pub basis: PriceBasis,
    pub upstream_cost: Money,
    pub fee_policy: Option<FeePolicy>,
}

/// All versions, ordered by `effective_from`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceBook {
    versions: Vec<PriceVersion>,
}

impl PriceBook {
    pub fn new(mut versions: Vec<PriceVersion>) -> Result<PriceBook, DomainError> {
        for v in &versions {
            v.validate()?;
        }
        versions.sort_by_key(|v| v.effective_from);
        for pair in versions.windows(2) {
            if pair[0].effective_from == pair[1].effective_from {
                return Err(DomainError::invalid(
                    "effective_from",
                    format!(
                        "versions '{}' and '{}' take effect at the same instant",
                        pair[0].version, pair[1].version
                    ),
                ));
            }
            if pair[0].version == pair[1].version {
                return Err(DomainError::invalid(
                    "version",
                    format!("'{}' appears twice", pair[0].version),
                ));
            }
        }
        Ok(PriceBook { versions })
    }

    pub fn versions(&self) -> &[PriceVersion] {
        &self.versions
    }

    pub fn in_force_at(&self, at: DateTime<Utc>) -> Option<&PriceVersion> {
        self.versions.iter().rev().find(|v| v.effective_from <= at)
    }

    /// A new version must take effect after `now` and after every existing version, and must
    /// not reuse a version name: anything else would reprice events already applied.
    pub fn check_publishable(
        &self,
        v: &PriceVersion,
        now: DateTime<Utc>,
    ) -> Result<(), DomainError> {
        v.validate()?;
        if v.effective_from <= now {
            return Err(DomainError::invalid(
                "effective_from",
                "must be in the future: past prices are fixed so that replays price identically",
            ));
        }
        if let Some(last) = self.versions.last()
            && v.effective_from <= last.effective_from
        {
            return Err(DomainError::invalid(
                "effective_from",
                "must be after the latest version's",
            ));
        }
        if self.versions.iter().any(|x| x.version == v.version) {
            return Err(DomainError::invalid(
                "version",
                format!("'{}' already exists", v.version),
            ));
        }
        Ok(())
    }

    pub fn price(
        &self,
        at: DateTime<Utc>,
        provider: &str,
        model: &str,
        tokens: &TokenCounts,
    ) -> Result<Pricing, DomainError> {
        let Some(version) = self.in_force_at(at) else {
            return Ok(Pricing {
                version: None,
                basis: PriceBasis::Unpriced,
                upstream_cost: Money::ZERO,
                fee_policy: None,
            });
        };
        let key = format!("{provider}:{model}");
        let (basis, prices) = match (version.models.get(&key), &version.fallback) {
            (Some(p), _) => (PriceBasis::Catalog, p),
            (None, Some(f)) => (PriceBasis::Fallback, f),
            (None, None) => {
                return Ok(Pricing {
                    version: Some(version.version.clone()),
                    basis: PriceBasis::Unpriced,
                    upstream_cost: Money::ZERO,
                    fee_policy: Some(version.fee.clone()),
                });
            }
        };
        Ok(Pricing {
            version: Some(version.version.clone()),
            basis,
            upstream_cost: prices.cost(tokens)?,
            fee_policy: Some(version.fee.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn version(name: &str, from: DateTime<Utc>, input: &str) -> PriceVersion {
        let mut models = BTreeMap::new();
        models.insert(
            "openai:gpt-4o".to_string(),
            TokenPrices::new(d(input), d("1.25"), d("10"), d("10")),
        );
        PriceVersion {
            version: name.to_string(),
            effective_from: from,
            fee: FeePolicy {
                percent: d("5"),
                per_request_usd: Money::ZERO,
            },
            models,
            fallback: None,
        }
    }

    #[test]
    fn the_version_in_force_at_event_time_prices_it() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let t1 = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let book = PriceBook::new(vec![version("v2", t1, "5"), version("v1", t0, "2.5")]).unwrap();
        let tokens = TokenCounts {
            input: 1_000_000,
            ..Default::default()
        };
        let before = book
            .price(
                t1 - chrono::Duration::seconds(1),
                "openai",
                "gpt-4o",
                &tokens,
            )
            .unwrap();
        let after = book.price(t1, "openai", "gpt-4o", &tokens).unwrap();
        assert_eq!(
            (before.version.as_deref(), before.upstream_cost),
            (Some("v1"), Money::from_cents(250))
        );
        assert_eq!(
            (after.version.as_deref(), after.upstream_cost),
            (Some("v2"), Money::from_cents(500))
        );
    }

    #[test]
    fn unknown_models_are_unpriced_or_fallback_never_silently_free() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut v = version("v1", t0, "2.5");
        let tokens = TokenCounts {
            input: 1000,
            ..Default::default()
        };
        let book = PriceBook::new(vec![v.clone()]).unwrap();
        let p = book.price(t0, "acme", "llama", &tokens).unwrap();
        assert_eq!(p.basis, PriceBasis::Unpriced);
        v.fallback = Some(TokenPrices::new(d("1"), d("1"), d("1"), d("1")));
        let book = PriceBook::new(vec![v]).unwrap();
        let p = book.price(t0, "acme", "llama", &tokens).unwrap();
        assert_eq!(
            (p.basis, p.upstream_cost.to_string()),
            (PriceBasis::Fallback, "0.001000000".to_string())
        );
    }

    #[test]
    fn fee_is_percent_plus_per_request_on_success_only() {
        let fee = FeePolicy {
            percent: d("5.5"),
            per_request_usd: Money::from_cents(1),
        };
        let upstream = Money::from_cents(200);
        assert_eq!(fee.fee(upstream, true).unwrap().to_string(), "0.120000000");
        assert_eq!(fee.fee(upstream, false).unwrap().to_string(), "0.110000000");
    }

    #[test]
    fn publishing_into_the_past_is_refused() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let book = PriceBook::new(vec![version("v1", t0, "2.5")]).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        assert!(
            book.check_publishable(&version("v2", now, "3"), now)
                .is_err()
        );
        assert!(
            book.check_publishable(&version("v2", now + chrono::Duration::hours(1), "3"), now)
                .is_ok()
        );
        assert!(
            book.check_publishable(&version("v1", now + chrono::Duration::hours(1), "3"), now)
                .is_err()
        );
    }
}
