//! Finance statements: a calendar month of an account's (or the whole platform's) ledger lines,
//! folded into opening position, movements, closing position and usage breakdowns.
//!
//! Everything here is read from the double-entry postings (see [`crate::posting`]); nothing is
//! recomputed from prices or lots, so a statement says exactly what the ledger says.
//!
//! **Position.** An account's position is read off its two customer-facing ledger accounts:
//! `credits` is the remaining credit of its lots (the `customer_credits` liability, sign
//! flipped), `debt` is what managed usage took beyond the lots and no purchase has paid yet
//! (the `customer_debt` receivable), and `balance = credits - debt`.
//!
//! **Periods follow event time.** A line belongs to the month (UTC) of its event's
//! `occurred_at`, the same instant the ledger used to apply it. An event that arrives late (a
//! queued usage event, an expiry swept after its instant) lands in the month it happened in,
//! so a month's statement can still change after the month has ended; opening(M + 1) always
//! equals closing(M), because both are sums of the same lines.
//!
//! **Identities** checked by every fold (an unbalanced ledger is an error, never a statement):
//!
//! ```text
//! closing.balance = opening.balance + purchases + grants
//!                   - (managed upstream cost + managed fee) - expired - voided
//! closing.debt    = opening.debt + debt_incurred - debt_settled
//! closing.credits = opening.credits + purchases + grants - debt_settled
//!                   - credits_burned - expired - voided
//! managed charged = credits_burned + debt_incurred
//! ```
//!
//! BYOK and attached-key upstream cost is a memo (`byok_attributed`): reported, never charged,
//! outside every identity.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::DomainError;
use crate::event::{Event, EventBody};
use crate::money::Money;
use crate::posting::{LedgerAccount, Posting};

/// Statement months are limited to four-digit years, so `YYYY-MM` is the whole syntax.
pub const MIN_YEAR: i32 = 1970;
pub const MAX_YEAR: i32 = 9999;

const PERIOD_RULE: &str = "must be a calendar month as YYYY-MM (UTC), e.g. 2026-10";

/// A calendar month in UTC, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Period {
    year: i32,
    month: u32,
}

impl Period {
    pub fn new(year: i32, month: u32) -> Result<Period, DomainError> {
        if !(MIN_YEAR..=MAX_YEAR).contains(&year) || !(1..=12).contains(&month) {
            return Err(DomainError::invalid("period", PERIOD_RULE));
        }
        Ok(Period { year, month })
    }

    /// The month `at` falls in.
    pub fn containing(at: DateTime<Utc>) -> Result<Period, DomainError> {
        Period::new(at.year(), at.month())
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }

    /// First instant of the month.
    pub fn start(self) -> DateTime<Utc> {
        first_instant(self.year, self.month)
    }

    /// First instant after the month (exclusive end).
    pub fn end(self) -> DateTime<Utc> {
        if self.month == 12 {
            first_instant(self.year + 1, 1)
        } else {
            first_instant(self.year, self.month + 1)
        }
    }

    pub fn contains(self, at: DateTime<Utc>) -> bool {
        self.start() <= at && at < self.end()
    }

    pub fn next(self) -> Result<Period, DomainError> {
        if self.month == 12 {
            Period::new(self.year + 1, 1)
        } else {
            Period::new(self.year, self.month + 1)
        }
    }

    /// Months from `self` to `other`, both included; zero when `other` is before `self`.
    pub fn months_until(self, other: Period) -> usize {
        let index = |p: Period| i64::from(p.year) * 12 + i64::from(p.month);
        usize::try_from(index(other) - index(self) + 1).unwrap_or(0)
    }
}

/// Midnight of the first of a validated month. Every such date exists, so the fallback is
/// unreachable; it keeps the function total without a panic.
fn first_instant(year: i32, month: u32) -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|n| n.and_utc())
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for Period {
    type Err = DomainError;

    /// Exactly `YYYY-MM`: four digits, a hyphen, two digits. Nothing else is a month.
    fn from_str(s: &str) -> Result<Period, DomainError> {
        let b = s.as_bytes();
        let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        if b.len() != 7 || b[4] != b'-' || !digits(0..4) || !digits(5..7) {
            return Err(DomainError::invalid("period", PERIOD_RULE));
        }
        let year = s[0..4]
            .parse()
            .map_err(|_| DomainError::invalid("period", PERIOD_RULE))?;
        let month = s[5..7]
            .parse()
            .map_err(|_| DomainError::invalid("period", PERIOD_RULE))?;
        Period::new(year, month)
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Period, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The kinds of events that post ledger lines (`account_opened` posts none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    CreditsPurchased,
    CreditsGranted,
    LotVoided,
    LotExpired,
    Usage,
}

impl EntryKind {
    pub const ALL: [EntryKind; 5] = [
        EntryKind::CreditsPurchased,
        EntryKind::CreditsGranted,
        EntryKind::LotVoided,
        EntryKind::LotExpired,
        EntryKind::Usage,
    ];

    /// The event kind, as in [`EventBody::kind`] and the event log's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::CreditsPurchased => "credits_purchased",
            EntryKind::CreditsGranted => "credits_granted",
            EntryKind::LotVoided => "lot_voided",
            EntryKind::LotExpired => "lot_expired",
            EntryKind::Usage => "usage",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn of(body: &EventBody) -> Option<EntryKind> {
        EntryKind::parse(body.kind())
    }
}

/// Who used what, for the usage breakdowns.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UsageDims {
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
}

/// An amount on one ledger account, from events of one kind (and, for usage, one key, provider
/// and model). One posting is a line; so is the sum of several postings that share all of
/// these and the sign of their amount, which is how a database hands them over. The fold is a
/// sum, so both give the same statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    pub kind: EntryKind,
    pub ledger_account: LedgerAccount,
    /// Debit positive, credit negative, as in the ledger.
    pub amount: Money,
    /// Present for usage lines.
    pub usage: Option<UsageDims>,
}

impl StatementLine {
    /// The lines of one applied event: its postings, with the event's kind and usage
    /// dimensions.
    pub fn of_applied(event: &Event, postings: &[Posting]) -> Vec<StatementLine> {
        let Some(kind) = EntryKind::of(&event.body) else {
            return Vec::new();
        };
        let usage = match &event.body {
            EventBody::Usage(u) => Some(UsageDims {
                api_key_id: u.api_key_id.clone(),
                provider: u.provider.clone(),
                model: u.model.clone(),
            }),
            _ => None,
        };
        postings
            .iter()
            .map(|p| StatementLine {
                kind,
                ledger_account: p.ledger_account,
                amount: p.amount,
                usage: usage.clone(),
            })
            .collect()
    }
}

/// Why lines could not be folded into a statement. Each is a broken ledger or a caller's bug,
/// never a customer's input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatementError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the ledger does not reconcile: {identity} (expected {expected}, found {found})")]
    Unbalanced {
        identity: &'static str,
        expected: Money,
        found: Money,
    },
    #[error("a {kind} line on {account} is not possible in this ledger")]
    UnexpectedLine {
        kind: &'static str,
        account: &'static str,
    },
}

/// Credits, debt and their difference at an instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Remaining credits of the lots: unburned, unexpired, not voided.
    pub credits_usd: Money,
    /// Managed usage charged beyond the credits, not yet paid by a purchase.
    pub debt_usd: Money,
    /// `credits_usd - debt_usd`.
    pub balance_usd: Money,
}

/// Zero written like every other amount: nine decimals and no sign. A sum that never moved is
/// [`Money::ZERO`] (`"0"`), and a negated zero would print as `"-0.000000000"`.
fn canon(m: Money) -> Money {
    if m.is_zero() { Money::from_cents(0) } else { m }
}

impl Position {
    pub fn new(credits: Money, debt: Money) -> Result<Position, StatementError> {
        Ok(Position {
            credits_usd: canon(credits),
            debt_usd: canon(debt),
            balance_usd: canon(credits.checked_sub(debt)?),
        })
    }

    /// From the sums of all `customer_credits` and `customer_debt` lines up to an instant.
    pub fn from_ledger_sums(
        customer_credits: Money,
        customer_debt: Money,
    ) -> Result<Position, StatementError> {
        Position::new(customer_credits.neg(), customer_debt)
    }

    /// The position after `lines`, starting from nothing.
    pub fn of_lines<'a>(
        lines: impl IntoIterator<Item = &'a StatementLine>,
    ) -> Result<Position, StatementError> {
        let (mut credits, mut debt) = (Money::ZERO, Money::ZERO);
        for l in lines {
            match l.ledger_account {
                LedgerAccount::CustomerCredits => credits = credits.checked_add(l.amount)?,
                LedgerAccount::CustomerDebt => debt = debt.checked_add(l.amount)?,
                _ => {}
            }
        }
        Position::from_ledger_sums(credits, debt)
    }
}

/// What moved during the period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movements {
    /// Credit purchases, gross (a part may have paid debt: `debt_settled_usd`).
    pub purchases_usd: Money,
    /// Promotional grants.
    pub grants_usd: Money,
    /// Managed usage: the upstream provider cost charged to the customer.
    pub managed_upstream_cost_usd: Money,
    /// Managed usage: the platform's processing fee.
    pub managed_fee_usd: Money,
    /// `managed_upstream_cost_usd + managed_fee_usd`: what managed usage was charged.
    pub managed_charged_usd: Money,
    /// The part of `managed_charged_usd` paid from the lots.
    pub credits_burned_usd: Money,
    /// Lot remainders expired (breakage).
    pub expired_usd: Money,
    /// Lot remainders voided (refunds, write-offs).
    pub voided_usd: Money,
    /// The part of `managed_charged_usd` the lots could not pay.
    pub debt_incurred_usd: Money,
    /// Debt paid by purchases.
    pub debt_settled_usd: Money,
    /// Memo, not charged: upstream cost of BYOK and attached-key usage, paid by the customer's
    /// own provider account.
    pub byok_attributed_usd: Money,
}

/// Usage money of one key, or one provider and model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageFigures {
    pub managed_upstream_cost_usd: Money,
    pub managed_fee_usd: Money,
    pub managed_charged_usd: Money,
    pub byok_attributed_usd: Money,
}

impl UsageFigures {
    fn canonical(self) -> UsageFigures {
        UsageFigures {
            managed_upstream_cost_usd: canon(self.managed_upstream_cost_usd),
            managed_fee_usd: canon(self.managed_fee_usd),
            managed_charged_usd: canon(self.managed_charged_usd),
            byok_attributed_usd: canon(self.byok_attributed_usd),
        }
    }

    fn add(&mut self, account: LedgerAccount, amount: Money) -> Result<(), StatementError> {
        match account {
            LedgerAccount::RevenueUpstreamCost => {
                self.managed_upstream_cost_usd =
                    self.managed_upstream_cost_usd.checked_sub(amount)?;
                self.managed_charged_usd = self.managed_charged_usd.checked_sub(amount)?;
            }
            LedgerAccount::RevenueProcessingFee => {
                self.managed_fee_usd = self.managed_fee_usd.checked_sub(amount)?;
                self.managed_charged_usd = self.managed_charged_usd.checked_sub(amount)?;
            }
            LedgerAccount::ByokAttributedCost => {
                self.byok_attributed_usd = self.byok_attributed_usd.checked_add(amount)?;
            }
            _ => {}
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    pub api_key_id: String,
    #[serde(flatten)]
    pub figures: UsageFigures,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUsage {
    pub provider: String,
    pub model: String,
    #[serde(flatten)]
    pub figures: UsageFigures,
}

/// One account's statement for one month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub account_id: String,
    pub period: Period,
    pub period_start: DateTime<Utc>,
    /// Exclusive.
    pub period_end: DateTime<Utc>,
    pub opening: Position,
    #[serde(flatten)]
    pub movements: Movements,
    pub closing: Position,
    /// Usage per gateway API key, by key id; keys whose usage moved no money are left out.
    pub by_api_key: Vec<KeyUsage>,
    /// Usage per provider and model, in that order.
    pub by_provider_model: Vec<ModelUsage>,
}

impl Statement {
    /// Folds the lines of `period` onto the position at its start. Every line must belong to
    /// the period (by its event's `occurred_at`); the caller selects them.
    pub fn build<'a>(
        account_id: &str,
        period: Period,
        opening: Position,
        lines: impl IntoIterator<Item = &'a StatementLine>,
    ) -> Result<Statement, StatementError> {
        let opening = Position::new(opening.credits_usd, opening.debt_usd)?;
        let mut fold = Fold::default();
        for l in lines {
            fold.add(l)?;
        }
        let (movements, closing) = fold.finish(opening)?;
        Ok(Statement {
            account_id: account_id.to_string(),
            period,
            period_start: period.start(),
            period_end: period.end(),
            opening,
            movements,
            closing,
            by_api_key: fold
                .by_key
                .into_iter()
                .map(|(api_key_id, figures)| KeyUsage {
                    api_key_id,
                    figures: figures.canonical(),
                })
                .collect(),
            by_provider_model: model_rows(fold.by_model),
        })
    }

    /// The statement of `period` from an account's whole history of `(occurred_at, line)`:
    /// lines before the period make the opening position, lines after it are ignored.
    pub fn from_history(
        account_id: &str,
        period: Period,
        history: &[(DateTime<Utc>, StatementLine)],
    ) -> Result<Statement, StatementError> {
        let opening = Position::of_lines(
            history
                .iter()
                .filter(|(at, _)| *at < period.start())
                .map(|(_, l)| l),
        )?;
        Statement::build(
            account_id,
            period,
            opening,
            history
                .iter()
                .filter(|(at, _)| period.contains(*at))
                .map(|(_, l)| l),
        )
    }
}

/// The whole platform for one month: revenue, breakage and what is owed either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformReport {
    pub period: Period,
    pub period_start: DateTime<Utc>,
    /// Exclusive.
    pub period_end: DateTime<Utc>,
    /// Managed usage charged: upstream cost plus processing fee.
    pub revenue_usd: Money,
    pub revenue_upstream_cost_usd: Money,
    pub revenue_processing_fee_usd: Money,
    /// Expired credit remainders.
    pub breakage_usd: Money,
    pub voided_usd: Money,
    pub purchases_usd: Money,
    pub grants_usd: Money,
    pub credits_burned_usd: Money,
    pub debt_incurred_usd: Money,
    pub debt_settled_usd: Money,
    /// Memo: BYOK and attached-key upstream cost, not charged.
    pub byok_attributed_usd: Money,
    /// Credits owed to customers at the start of the period: unburned, unexpired, not voided.
    pub opening_credit_liability_usd: Money,
    /// The same at the end of the period.
    pub closing_credit_liability_usd: Money,
    pub opening_debt_usd: Money,
    pub closing_debt_usd: Money,
    /// Revenue and attributed cost per provider and model.
    pub by_provider_model: Vec<ModelUsage>,
}

impl PlatformReport {
    /// Folds the lines of every account in `period` onto the platform-wide position at its
    /// start.
    pub fn build<'a>(
        period: Period,
        opening: Position,
        lines: impl IntoIterator<Item = &'a StatementLine>,
    ) -> Result<PlatformReport, StatementError> {
        let opening = Position::new(opening.credits_usd, opening.debt_usd)?;
        let mut fold = Fold::default();
        for l in lines {
            fold.add(l)?;
        }
        let (m, closing) = fold.finish(opening)?;
        Ok(PlatformReport {
            period,
            period_start: period.start(),
            period_end: period.end(),
            revenue_usd: m.managed_charged_usd,
            revenue_upstream_cost_usd: m.managed_upstream_cost_usd,
            revenue_processing_fee_usd: m.managed_fee_usd,
            breakage_usd: m.expired_usd,
            voided_usd: m.voided_usd,
            purchases_usd: m.purchases_usd,
            grants_usd: m.grants_usd,
            credits_burned_usd: m.credits_burned_usd,
            debt_incurred_usd: m.debt_incurred_usd,
            debt_settled_usd: m.debt_settled_usd,
            byok_attributed_usd: m.byok_attributed_usd,
            opening_credit_liability_usd: opening.credits_usd,
            closing_credit_liability_usd: closing.credits_usd,
            opening_debt_usd: opening.debt_usd,
            closing_debt_usd: closing.debt_usd,
            by_provider_model: model_rows(fold.by_model),
        })
    }

    /// The position at the end of the period, to open the next one with.
    pub fn closing(&self) -> Result<Position, StatementError> {
        Position::new(self.closing_credit_liability_usd, self.closing_debt_usd)
    }
}

fn model_rows(by_model: BTreeMap<(String, String), UsageFigures>) -> Vec<ModelUsage> {
    by_model
        .into_iter()
        .map(|((provider, model), figures)| ModelUsage {
            provider,
            model,
            figures: figures.canonical(),
        })
        .collect()
}

#[derive(Default)]
struct Fold {
    m: Movements,
    credits_delta: Money,
    debt_delta: Money,
    byok_contra: Money,
    by_key: BTreeMap<String, UsageFigures>,
    by_model: BTreeMap<(String, String), UsageFigures>,
}

fn add(total: &mut Money, amount: Money) -> Result<(), StatementError> {
    *total = total.checked_add(amount)?;
    Ok(())
}

impl Fold {
    fn add(&mut self, l: &StatementLine) -> Result<(), StatementError> {
        use EntryKind as K;
        use LedgerAccount as A;
        let a = l.amount;
        let unexpected = || StatementError::UnexpectedLine {
            kind: l.kind.as_str(),
            account: l.ledger_account.as_str(),
        };
        let m = &mut self.m;
        match (l.kind, l.ledger_account) {
            (K::CreditsPurchased, A::PaymentsReceived) => add(&mut m.purchases_usd, a)?,
            (K::CreditsGranted, A::PromotionalGrants) => add(&mut m.grants_usd, a)?,
            (K::LotExpired, A::Breakage) => add(&mut m.expired_usd, a.neg())?,
            (K::LotVoided, A::VoidedCredits) => add(&mut m.voided_usd, a.neg())?,
            (K::Usage, A::RevenueUpstreamCost) => {
                add(&mut m.managed_upstream_cost_usd, a.neg())?;
                add(&mut m.managed_charged_usd, a.neg())?;
            }
            (K::Usage, A::RevenueProcessingFee) => {
                add(&mut m.managed_fee_usd, a.neg())?;
                add(&mut m.managed_charged_usd, a.neg())?;
            }
            (K::Usage, A::ByokAttributedCost) => add(&mut m.byok_attributed_usd, a)?,
            (K::Usage, A::ByokAttributedCostContra) => add(&mut self.byok_contra, a.neg())?,
            (K::Usage, A::CustomerDebt) if a.is_positive() => {
                add(&mut m.debt_incurred_usd, a)?;
                add(&mut self.debt_delta, a)?;
            }
            (K::CreditsPurchased, A::CustomerDebt) if a.is_negative() => {
                add(&mut m.debt_settled_usd, a.neg())?;
                add(&mut self.debt_delta, a)?;
            }
            (K::Usage, A::CustomerCredits) if a.is_positive() => {
                add(&mut m.credits_burned_usd, a)?;
                add(&mut self.credits_delta, a.neg())?;
            }
            (K::CreditsPurchased | K::CreditsGranted, A::CustomerCredits) if a.is_negative() => {
                add(&mut self.credits_delta, a.neg())?;
            }
            (K::LotExpired | K::LotVoided, A::CustomerCredits) if a.is_positive() => {
                add(&mut self.credits_delta, a.neg())?;
            }
            _ if a.is_zero() => {}
            _ => return Err(unexpected()),
        }
        if matches!(
            l.ledger_account,
            A::RevenueUpstreamCost | A::RevenueProcessingFee | A::ByokAttributedCost
        ) {
            let dims = l.usage.as_ref().ok_or_else(unexpected)?;
            self.by_key
                .entry(dims.api_key_id.clone())
                .or_default()
                .add(l.ledger_account, a)?;
            self.by_model
                .entry((dims.provider.clone(), dims.model.clone()))
                .or_default()
                .add(l.ledger_account, a)?;
        }
        Ok(())
    }

    /// The movements and closing position, once every identity is checked.
    fn finish(&self, opening: Position) -> Result<(Movements, Position), StatementError> {
        let m = &self.m;
        let closing = Position::new(
            opening.credits_usd.checked_add(self.credits_delta)?,
            opening.debt_usd.checked_add(self.debt_delta)?,
        )?;
        let sum = |items: &[Money]| Money::try_sum(items.iter().copied());
        let check = |identity: &'static str, expected: Money, found: Money| {
            if expected == found {
                Ok(())
            } else {
                Err(StatementError::Unbalanced {
                    identity,
                    expected,
                    found,
                })
            }
        };
        check(
            "byok attributed cost = its contra",
            m.byok_attributed_usd,
            self.byok_contra,
        )?;
        check(
            "managed charged = credits burned + debt incurred",
            m.managed_charged_usd,
            sum(&[m.credits_burned_usd, m.debt_incurred_usd])?,
        )?;
        let balance = sum(&[opening.balance_usd, m.purchases_usd, m.grants_usd])?
            .checked_sub(sum(&[m.managed_charged_usd, m.expired_usd, m.voided_usd])?)?;
        check(
            "closing balance = opening + purchases + grants - charged - expired - voided",
            balance,
            closing.balance_usd,
        )?;
        let credits =
            sum(&[opening.credits_usd, m.purchases_usd, m.grants_usd])?.checked_sub(sum(&[
                m.debt_settled_usd,
                m.credits_burned_usd,
                m.expired_usd,
                m.voided_usd,
            ])?)?;
        check(
            "closing credits = opening + purchases + grants - settled - burned - expired - voided",
            credits,
            closing.credits_usd,
        )?;
        let debt = opening
            .debt_usd
            .checked_add(m.debt_incurred_usd)?
            .checked_sub(m.debt_settled_usd)?;
        check(
            "closing debt = opening + incurred - settled",
            debt,
            closing.debt_usd,
        )?;
        let movements = Movements {
            purchases_usd: canon(m.purchases_usd),
            grants_usd: canon(m.grants_usd),
            managed_upstream_cost_usd: canon(m.managed_upstream_cost_usd),
            managed_fee_usd: canon(m.managed_fee_usd),
            managed_charged_usd: canon(m.managed_charged_usd),
            credits_burned_usd: canon(m.credits_burned_usd),
            expired_usd: canon(m.expired_usd),
            voided_usd: canon(m.voided_usd),
            debt_incurred_usd: canon(m.debt_incurred_usd),
            debt_settled_usd: canon(m.debt_settled_usd),
            byok_attributed_usd: canon(m.byok_attributed_usd),
        };
        Ok((movements, closing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn c(cents: i64) -> Money {
        Money::from_cents(cents)
    }

    fn line(kind: EntryKind, account: LedgerAccount, cents: i64) -> StatementLine {
        StatementLine {
            kind,
            ledger_account: account,
            amount: c(cents),
            usage: (kind == EntryKind::Usage).then(|| UsageDims {
                api_key_id: "key_1".into(),
                provider: "openai".into(),
                model: "gpt-4o".into(),
            }),
        }
    }

    #[test]
    fn periods_parse_strictly_and_span_their_month() {
        let p: Period = "2026-10".parse().unwrap();
        assert_eq!(p.to_string(), "2026-10");
        assert_eq!(
            p.start(),
            Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(p.end(), Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
        let dec: Period = "2026-12".parse().unwrap();
        assert_eq!(
            dec.end(),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(dec.next().unwrap().to_string(), "2027-01");
        assert!(p.contains(p.start()) && !p.contains(p.end()));
        assert_eq!(p.months_until(dec), 3);
        assert_eq!(dec.months_until(p), 0);
        for bad in [
            "",
            "2026",
            "2026-1",
            "2026-13",
            "2026-00",
            "26-10",
            "2026/10",
            "2026-10-01",
            " 2026-10",
            "+026-10",
            "1969-12",
            "2026-1a",
        ] {
            assert!(bad.parse::<Period>().is_err(), "{bad:?}");
        }
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            "\"2026-10\"".to_string()
        );
        assert!("9999-12".parse::<Period>().unwrap().next().is_err());
    }

    #[test]
    fn a_month_of_lines_reconciles() {
        use EntryKind as K;
        use LedgerAccount as A;
        let opening = Position::new(c(1_000), c(0)).unwrap();
        let lines = vec![
            // Usage of $10.50 with $10.00 left: $0.50 of debt.
            line(K::Usage, A::CustomerCredits, 1_000),
            line(K::Usage, A::CustomerDebt, 50),
            line(K::Usage, A::RevenueUpstreamCost, -1_000),
            line(K::Usage, A::RevenueProcessingFee, -50),
            // A $20 purchase pays the debt first.
            line(K::CreditsPurchased, A::PaymentsReceived, 2_000),
            line(K::CreditsPurchased, A::CustomerCredits, -1_950),
            line(K::CreditsPurchased, A::CustomerDebt, -50),
            line(K::CreditsGranted, A::PromotionalGrants, 300),
            line(K::CreditsGranted, A::CustomerCredits, -300),
            line(K::LotExpired, A::CustomerCredits, 100),
            line(K::LotExpired, A::Breakage, -100),
            line(K::LotVoided, A::CustomerCredits, 200),
            line(K::LotVoided, A::VoidedCredits, -200),
            line(K::Usage, A::ByokAttributedCost, 70),
            line(K::Usage, A::ByokAttributedCostContra, -70),
        ];
        let p: Period = "2026-10".parse().unwrap();
        let s = Statement::build("acme", p, opening, &lines).unwrap();
        let m = &s.movements;
        assert_eq!(
            (m.purchases_usd, m.grants_usd, m.managed_charged_usd),
            (c(2_000), c(300), c(1_050))
        );
        assert_eq!(
            (
                m.credits_burned_usd,
                m.debt_incurred_usd,
                m.debt_settled_usd
            ),
            (c(1_000), c(50), c(50))
        );
        assert_eq!(
            (m.expired_usd, m.voided_usd, m.byok_attributed_usd),
            (c(100), c(200), c(70))
        );
        // 10 + 20 + 3 - 10.50 - 1 - 2 = 19.50
        assert_eq!(s.closing, Position::new(c(1_950), c(0)).unwrap());
        assert_eq!(s.by_api_key.len(), 1);
        assert_eq!(s.by_api_key[0].figures.managed_charged_usd, c(1_050));
        assert_eq!(s.by_provider_model[0].figures.byok_attributed_usd, c(70));
    }

    #[test]
    fn zero_is_written_like_any_amount() {
        let p: Period = "2026-10".parse().unwrap();
        let s = Statement::build("acme", p, Position::default(), &[]).unwrap();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["opening"]["credits_usd"], "0.000000000");
        assert_eq!(json["voided_usd"], "0.000000000");
        let lines = [line(EntryKind::Usage, LedgerAccount::ByokAttributedCost, 5)];
        let err = Statement::build("acme", p, Position::default(), &lines).unwrap_err();
        assert!(matches!(err, StatementError::Unbalanced { .. }), "{err}");
        let lines = [
            line(EntryKind::Usage, LedgerAccount::ByokAttributedCost, 5),
            line(
                EntryKind::Usage,
                LedgerAccount::ByokAttributedCostContra,
                -5,
            ),
        ];
        let s = Statement::build("acme", p, Position::default(), &lines).unwrap();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["by_api_key"][0]["managed_fee_usd"], "0.000000000");
        assert_eq!(json["closing"]["balance_usd"], "0.000000000");
    }

    #[test]
    fn an_unbalanced_ledger_is_an_error_not_a_statement() {
        use EntryKind as K;
        use LedgerAccount as A;
        let p: Period = "2026-10".parse().unwrap();
        // Breakage without the lot giving anything up.
        let lines = [line(K::LotExpired, A::Breakage, -100)];
        let err = Statement::build("acme", p, Position::default(), &lines).unwrap_err();
        assert!(matches!(err, StatementError::Unbalanced { .. }), "{err}");
        // Revenue posted by a purchase cannot happen.
        let lines = [line(K::CreditsPurchased, A::RevenueUpstreamCost, -100)];
        let err = Statement::build("acme", p, Position::default(), &lines).unwrap_err();
        assert!(
            matches!(err, StatementError::UnexpectedLine { .. }),
            "{err}"
        );
    }
}
