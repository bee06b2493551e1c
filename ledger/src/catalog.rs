//! The price book tally ships with, so a fresh install prices the common models. Operators
//! publish newer versions through the API; this one stays in force for events before them.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

use crate::money::Money;
use crate::pricing::{FeePolicy, PriceVersion, TokenPrices};

pub const BUILTIN_VERSION: &str = "builtin-2025-01";

/// Provider, model, and prices per million tokens: input, cached input, output, reasoning.
const BUILTIN_PRICES: &[(&str, &str, [i64; 4])] = &[
    // Prices in millionths of a dollar per million tokens, so the table stays integer.
    (
        "openai",
        "gpt-4o",
        [2_500_000, 1_250_000, 10_000_000, 10_000_000],
    ),
    ("openai", "gpt-4o-mini", [150_000, 75_000, 600_000, 600_000]),
    (
        "openai",
        "gpt-4.1",
        [2_000_000, 500_000, 8_000_000, 8_000_000],
    ),
    (
        "openai",
        "gpt-4.1-mini",
        [400_000, 100_000, 1_600_000, 1_600_000],
    ),
    (
        "openai",
        "o3-mini",
        [1_100_000, 550_000, 4_400_000, 4_400_000],
    ),
    (
        "anthropic",
        "claude-sonnet-4-5",
        [3_000_000, 300_000, 15_000_000, 15_000_000],
    ),
    (
        "anthropic",
        "claude-haiku-4-5",
        [1_000_000, 100_000, 5_000_000, 5_000_000],
    ),
    (
        "anthropic",
        "claude-opus-4-1",
        [15_000_000, 1_500_000, 75_000_000, 75_000_000],
    ),
    (
        "google",
        "gemini-2.5-flash",
        [300_000, 75_000, 2_500_000, 2_500_000],
    ),
    (
        "google",
        "gemini-2.5-pro",
        [1_250_000, 310_000, 10_000_000, 10_000_000],
    ),
    (
        "deepseek",
        "deepseek-chat",
        [270_000, 70_000, 1_100_000, 1_100_000],
    ),
    (
        "deepseek",
        "deepseek-reasoner",
        [550_000, 140_000, 2_190_000, 2_190_000],
    ),
    (
        "groq",
        "llama-3.3-70b-versatile",
        [590_000, 590_000, 790_000, 790_000],
    ),
    (
        "groq",
        "llama-3.1-8b-instant",
        [50_000, 50_000, 80_000, 80_000],
    ),
    (
        "mistral",
        "mistral-large-latest",
        [2_000_000, 2_000_000, 6_000_000, 6_000_000],
    ),
    (
        "mistral",
        "mistral-small-latest",
        [100_000, 100_000, 300_000, 300_000],
    ),
];

pub fn builtin_effective_from() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The built-in version: catalog prices, a 5% processing fee, no fallback (unknown models are
/// held as unpriced until an operator prices them).
pub fn builtin_price_version() -> PriceVersion {
    let micro = |v: i64| Decimal::new(v, 6);
    let models: BTreeMap<String, TokenPrices> = BUILTIN_PRICES
        .iter()
        .map(|(provider, model, [i, c, o, r])| {
            (
                format!("{provider}:{model}"),
                TokenPrices::new(micro(*i), micro(*c), micro(*o), micro(*r)),
            )
        })
        .collect();
    PriceVersion {
        version: BUILTIN_VERSION.to_string(),
        effective_from: builtin_effective_from(),
        fee: FeePolicy {
            percent: Decimal::new(5, 0),
            per_request_usd: Money::ZERO,
        },
        models,
        fallback: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_version_is_valid() {
        builtin_price_version().validate().unwrap();
    }
}
