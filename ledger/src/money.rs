//! US dollars as a fixed-scale decimal.
//!
//! Every stored or computed amount is rounded to [`MONEY_SCALE`] decimal places with banker's
//! rounding, so that the same inputs always give the same digits and sums never drift.
//! Arithmetic is checked: an overflow is an error, never a wrap or a panic.

use std::fmt;
use std::iter::Sum;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::DomainError;

/// Decimal places kept for every amount: nano-dollars, so a price of $0.075 per million tokens
/// times a single token is still exact.
pub const MONEY_SCALE: u32 = 9;

/// The largest amount a single movement may carry. Far above any real balance, far below the
/// point where `Decimal` (28 significant digits) would lose the nano-dollar digits.
pub const MAX_AMOUNT_USD: Decimal = Decimal::from_parts(0xD4A5_1000, 0xE8, 0, false, 0); // 1_000_000_000_000

/// An amount of US dollars at [`MONEY_SCALE`]. May be negative (postings, net balances).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(Decimal);

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);

    /// Rounds to the money scale. Use for computed values (prices × tokens, fees).
    pub fn from_decimal_rounded(value: Decimal) -> Result<Money, DomainError> {
        if value.abs() > MAX_AMOUNT_USD {
            return Err(DomainError::AmountOverflow);
        }
        let mut rounded =
            value.round_dp_with_strategy(MONEY_SCALE, RoundingStrategy::MidpointNearestEven);
        rounded.rescale(MONEY_SCALE);
        Ok(Money(rounded))
    }

    /// Accepts only values that are already exact at `max_places` decimals (user input).
    pub fn from_decimal_exact(value: Decimal, max_places: u32) -> Result<Money, DomainError> {
        if value.abs() > MAX_AMOUNT_USD {
            return Err(DomainError::AmountOverflow);
        }
        if value.normalize().scale() > max_places {
            return Err(DomainError::AmountTooPrecise { max_places });
        }
        Money::from_decimal_rounded(value)
    }

    /// Whole cents, for tests and literals.
    pub fn from_cents(cents: i64) -> Money {
        let mut d = Decimal::new(cents, 2);
        d.rescale(MONEY_SCALE);
        Money(d)
    }

    pub fn as_decimal(self) -> Decimal {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    pub fn is_positive(self) -> bool {
        self.0 > Decimal::ZERO
    }

    pub fn is_negative(self) -> bool {
        self.0 < Decimal::ZERO
    }

    pub fn checked_add(self, other: Money) -> Result<Money, DomainError> {
        self.0
            .checked_add(other.0)
            .ok_or(DomainError::AmountOverflow)
            .and_then(Money::from_decimal_rounded)
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, DomainError> {
        self.0
            .checked_sub(other.0)
            .ok_or(DomainError::AmountOverflow)
            .and_then(Money::from_decimal_rounded)
    }

    // Kept inherent (callers need no trait import); `std::ops::Neg` would be equivalent.
    #[allow(clippy::should_implement_trait)]
    pub fn neg(self) -> Money {
        Money(-self.0)
    }

    pub fn min(self, other: Money) -> Money {
        if self <= other { self } else { other }
    }

    pub fn max(self, other: Money) -> Money {
        if self >= other { self } else { other }
    }

    /// Sums with overflow checking.
    pub fn try_sum<I: IntoIterator<Item = Money>>(items: I) -> Result<Money, DomainError> {
        items
            .into_iter()
            .try_fold(Money::ZERO, |acc, m| acc.checked_add(m))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}", self.0)
    }
}

/// Summing inside one process where overflow was already excluded by `MAX_AMOUNT_USD` per item
/// would still be unchecked; callers use `try_sum` instead. This impl exists for tests only.
impl<'a> Sum<&'a Money> for Decimal {
    fn sum<I: Iterator<Item = &'a Money>>(iter: I) -> Decimal {
        iter.fold(Decimal::ZERO, |acc, m| acc + m.0)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        let d = deserialize_decimal(deserializer)?;
        Money::from_decimal_exact(d, MONEY_SCALE).map_err(serde::de::Error::custom)
    }
}

/// Reads a decimal from a JSON string or integer. A JSON float is refused: it has already been
/// rounded to binary by the time serde sees it, and money must not pass through binary floats.
pub fn deserialize_decimal<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Decimal, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Decimal;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a decimal amount as a string, e.g. \"12.50\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Decimal, E> {
            let v = v.trim();
            if v.contains(['e', 'E']) {
                return Err(E::custom("amounts are plain decimals, without exponent"));
            }
            v.parse::<Decimal>()
                .map_err(|_| E::custom(format!("'{v}' is not a decimal amount")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_f64<E: serde::de::Error>(self, _v: f64) -> Result<Decimal, E> {
            Err(E::custom(
                "amounts with a fraction must be JSON strings (\"12.50\") so no precision is lost",
            ))
        }
    }
    deserializer.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn max_amount_is_one_trillion() {
        assert_eq!(MAX_AMOUNT_USD, Decimal::from(1_000_000_000_000_i64));
    }

    #[test]
    fn rounding_is_bankers_at_nano_scale() {
        let m = Money::from_decimal_rounded(Decimal::from_str("0.0000000025").unwrap()).unwrap();
        assert_eq!(m.to_string(), "0.000000002");
        let m = Money::from_decimal_rounded(Decimal::from_str("0.0000000035").unwrap()).unwrap();
        assert_eq!(m.to_string(), "0.000000004");
    }

    #[test]
    fn exact_refuses_extra_places_but_accepts_trailing_zeros() {
        let ok = Money::from_decimal_exact(Decimal::from_str("5.10").unwrap(), 2);
        assert_eq!(
            ok.map(|m| m.to_string()).ok(),
            Some("5.100000000".to_string())
        );
        let too_precise = Money::from_decimal_exact(Decimal::from_str("5.001").unwrap(), 2);
        assert!(matches!(
            too_precise,
            Err(DomainError::AmountTooPrecise { max_places: 2 })
        ));
    }

    #[test]
    fn overflow_is_an_error() {
        let big = Money::from_decimal_rounded(MAX_AMOUNT_USD).unwrap();
        assert!(matches!(
            big.checked_add(big),
            Err(DomainError::AmountOverflow)
        ));
    }

    #[test]
    fn json_floats_are_refused_strings_and_integers_accepted() {
        assert!(serde_json::from_str::<Money>("12.5").is_err());
        assert_eq!(
            serde_json::from_str::<Money>("\"12.5\"")
                .map(|m| m.to_string())
                .ok(),
            Some("12.500000000".to_string())
        );
        assert_eq!(
            serde_json::from_str::<Money>("7")
                .map(|m| m.to_string())
                .ok(),
            Some("7.000000000".to_string())
        );
        assert!(serde_json::from_str::<Money>("\"1e3\"").is_err());
    }
}
