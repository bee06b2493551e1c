//! Credit lots: what was bought or granted, and what is left of it.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::money::Money;

/// A purchase expires exactly this many days (of 86,400 s) after the purchase instant, leap
/// years included: 2028-02-01 + 365 days is 2029-01-31.
pub const PURCHASE_VALIDITY_DAYS: i64 = 365;
/// Lower priorities burn first; purchases sit behind typical promotional grants (0..100).
pub const PURCHASE_PRIORITY: i32 = 100;
/// Credits are bought in whole cents.
pub const CREDIT_AMOUNT_PLACES: u32 = 2;

pub fn minimum_purchase() -> Money {
    Money::from_cents(500)
}

pub fn purchase_expiry(purchased_at: DateTime<Utc>) -> DateTime<Utc> {
    purchased_at + Duration::days(PURCHASE_VALIDITY_DAYS)
}

pub fn validate_credit_amount(amount: Money) -> Result<(), DomainError> {
    if !amount.is_positive() {
        return Err(DomainError::AmountNotPositive);
    }
    Money::from_decimal_exact(amount.as_decimal(), CREDIT_AMOUNT_PLACES)?;
    Ok(())
}

pub fn validate_purchase_amount(amount: Money) -> Result<(), DomainError> {
    validate_credit_amount(amount)?;
    if amount < minimum_purchase() {
        return Err(DomainError::PurchaseBelowMinimum);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LotSource {
    Purchase,
    Grant,
}

impl LotSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LotSource::Purchase => "purchase",
            LotSource::Grant => "grant",
        }
    }
    pub fn parse(s: &str) -> Option<LotSource> {
        match s {
            "purchase" => Some(LotSource::Purchase),
            "grant" => Some(LotSource::Grant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LotStatus {
    Open,
    Expired,
    Voided,
}

impl LotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LotStatus::Open => "open",
            LotStatus::Expired => "expired",
            LotStatus::Voided => "voided",
        }
    }
    pub fn parse(s: &str) -> Option<LotStatus> {
        match s {
            "open" => Some(LotStatus::Open),
            "expired" => Some(LotStatus::Expired),
            "voided" => Some(LotStatus::Voided),
            _ => None,
        }
    }
}

/// A lot. Invariant: `amount = burned + expired + voided + remaining`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    pub lot_id: Uuid,
    pub account_id: String,
    pub source: LotSource,
    pub amount: Money,
    pub remaining: Money,
    pub burned: Money,
    pub expired: Money,
    pub voided: Money,
    pub priority: i32,
    pub granted_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub status: LotStatus,
    pub closed_at: Option<DateTime<Utc>>,
}

impl Lot {
    /// Whether this lot may pay for usage that happened at `at`: open, not empty, and
    /// `at` in `[granted_at, expires_at)`.
    pub fn can_burn_at(&self, at: DateTime<Utc>) -> bool {
        self.status == LotStatus::Open
            && self.remaining.is_positive()
            && self.granted_at <= at
            && at < self.expires_at
    }

    /// The burn order: priority, then earliest expiry, then oldest, then id for a total order.
    pub fn burn_order_key(&self) -> (i32, DateTime<Utc>, DateTime<Utc>, Uuid) {
        (self.priority, self.expires_at, self.granted_at, self.lot_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn purchase_expires_365_days_later_across_a_leap_day() {
        let bought = Utc.with_ymd_and_hms(2028, 2, 1, 12, 30, 0).unwrap();
        assert_eq!(
            purchase_expiry(bought),
            Utc.with_ymd_and_hms(2029, 1, 31, 12, 30, 0).unwrap()
        );
        let bought = Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap();
        assert_eq!(
            purchase_expiry(bought),
            Utc.with_ymd_and_hms(2027, 11, 23, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn purchase_amount_rules() {
        assert_eq!(
            validate_purchase_amount(Money::from_cents(499)),
            Err(DomainError::PurchaseBelowMinimum)
        );
        assert_eq!(validate_purchase_amount(Money::from_cents(500)), Ok(()));
        assert_eq!(
            validate_purchase_amount(Money::from_cents(0)),
            Err(DomainError::AmountNotPositive)
        );
        assert_eq!(
            validate_purchase_amount(Money::from_cents(-600)),
            Err(DomainError::AmountNotPositive)
        );
        let precise = Money::from_decimal_rounded("5.001".parse().unwrap()).unwrap();
        assert_eq!(
            validate_purchase_amount(precise),
            Err(DomainError::AmountTooPrecise { max_places: 2 })
        );
    }
}
