//! Property tests of the ledger domain over random event histories.
//!
//! A history is built from a list of abstract operations (purchases, grants, voids, expiries,
//! usage, duplicates, conflicts, re-opened accounts) for one to three accounts, with event times
//! that mostly move forward but sometimes go backwards (late events). Each history is offered to
//! the in-memory reference [`Ledger`] with the built-in price book, and every outcome is recorded
//! together with the account's state before and after, so each property can be checked against
//! the records.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::{Decimal, RoundingStrategy};
use tally_ledger::account::balanced;
use tally_ledger::catalog::builtin_price_version;
use tally_ledger::event::{AccountOpened, CreditsGranted, CreditsPurchased, LotExpired, LotVoided};
use tally_ledger::{
    AccountState, Applied, CredentialKind, DomainError, Event, EventBody, Ledger, LedgerAccount,
    Lot, LotSource, LotStatus, Money, Outcome, PriceBasis, PriceBook, TokenCounts, TokenSource,
    Usage, apply, decide,
};
use uuid::Uuid;

const DAY: i64 = 86_400;
const ACCOUNTS: [&str; 3] = ["acct-a", "acct-b", "acct-c"];

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn prices() -> PriceBook {
    PriceBook::new(vec![builtin_price_version()]).unwrap()
}

fn ts(y: i32, m: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, mi, s).unwrap()
}

/// Where histories start: well after the built-in price version took effect.
fn base_time() -> DateTime<Utc> {
    ts(2026, 1, 1, 0, 0, 0)
}

/// Catalog models and a few the catalog does not know (unpriced).
fn models() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = builtin_price_version()
        .models
        .keys()
        .map(|k| {
            let (p, m) = k.split_once(':').unwrap();
            (p.to_string(), m.to_string())
        })
        .collect();
    for (p, m) in [
        ("openai", "gpt-9-unknown"),
        ("ollama", "llama3"),
        ("anthropic", "claude-0"),
    ] {
        out.push((p.to_string(), m.to_string()));
    }
    out
}

fn m(cents: i64) -> Money {
    Money::from_cents(cents)
}

fn dec(v: Money) -> Decimal {
    v.as_decimal()
}

fn round9(d: Decimal) -> Decimal {
    let mut r = d.round_dp_with_strategy(9, RoundingStrategy::MidpointNearestEven);
    r.rescale(9);
    r
}

// ---------------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum ExpiryAt {
    Exact,
    Late(i64),
    EarlySecs(i64),
    EarlyNanos(i64),
}

#[derive(Debug, Clone)]
enum Op {
    Purchase {
        acct: usize,
        cents: i64,
        dt: i64,
        reuse: Option<usize>,
    },
    Grant {
        acct: usize,
        cents: i64,
        priority: i32,
        validity: i64,
        dt: i64,
    },
    Void {
        acct: usize,
        target: Option<usize>,
        dt: i64,
    },
    Expire {
        target: usize,
        at: ExpiryAt,
    },
    Usage(UsageOp),
    /// Usage on a lot's boundary: at its expiry (or just before), or at its grant instant.
    UsageAtBoundary {
        target: usize,
        boundary: Boundary,
        usage: UsageOp,
    },
    Duplicate {
        pick: usize,
    },
    Conflict {
        pick: usize,
    },
    Reopen {
        acct: usize,
    },
}

#[derive(Debug, Clone, Copy)]
enum Boundary {
    Expiry,
    BeforeExpiry,
    Grant,
    BeforeGrant,
}

#[derive(Debug, Clone)]
struct UsageOp {
    acct: usize,
    kind: CredentialKind,
    model: usize,
    tokens: TokenCounts,
    status: u16,
    streaming: bool,
    dt: i64,
    before_catalog: bool,
}

fn dt() -> impl Strategy<Value = i64> {
    prop_oneof![
        14 => 0..=2 * DAY,
        2 => Just(0i64),
        3 => -(5 * DAY)..0,          // a late event
        1 => (20 * DAY)..=(200 * DAY), // a quiet period: lots come due
    ]
}

fn token_count() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(0i64), 3 => 0i64..5_000, 2 => 0i64..2_000_000]
}

fn tokens() -> impl Strategy<Value = TokenCounts> {
    (token_count(), token_count(), token_count(), token_count()).prop_map(
        |(input, cached_input, output, reasoning)| TokenCounts {
            input,
            cached_input,
            output,
            reasoning,
        },
    )
}

fn kind() -> impl Strategy<Value = CredentialKind> {
    prop_oneof![
        4 => Just(CredentialKind::Managed),
        1 => Just(CredentialKind::Byok),
        1 => Just(CredentialKind::Attached),
    ]
}

fn usage_op() -> impl Strategy<Value = UsageOp> {
    (
        0usize..3,
        kind(),
        0usize..64,
        tokens(),
        prop_oneof![4 => Just(200u16), 1 => Just(429u16), 1 => Just(500u16), 1 => Just(499u16)],
        any::<bool>(),
        dt(),
        prop::bool::weighted(0.03),
    )
        .prop_map(
            |(acct, kind, model, tokens, status, streaming, dt, before_catalog)| UsageOp {
                acct,
                kind,
                model,
                tokens,
                status,
                streaming,
                dt,
                before_catalog,
            },
        )
}

fn expiry_at() -> impl Strategy<Value = ExpiryAt> {
    prop_oneof![
        3 => Just(ExpiryAt::Exact),
        3 => (0i64..=30 * DAY).prop_map(ExpiryAt::Late),
        1 => (1i64..=10 * DAY).prop_map(ExpiryAt::EarlySecs),
        1 => (1i64..=1_000).prop_map(ExpiryAt::EarlyNanos),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0usize..3, prop_oneof![9 => 500i64..=50_000, 1 => 1i64..500], dt(),
              prop::option::weighted(0.05, 0usize..64))
            .prop_map(|(acct, cents, dt, reuse)| Op::Purchase { acct, cents, dt, reuse }),
        3 => (0usize..3, prop_oneof![1i64..=300, 300i64..=20_000], -5i32..=200,
              prop_oneof![1 => -DAY..=0, 3 => 1i64..=3_600, 8 => 3_600i64..=90 * DAY], dt())
            .prop_map(|(acct, cents, priority, validity, dt)| Op::Grant { acct, cents, priority, validity, dt }),
        2 => (0usize..3, prop::option::weighted(0.8, 0usize..64), dt())
            .prop_map(|(acct, target, dt)| Op::Void { acct, target, dt }),
        3 => (0usize..64, expiry_at()).prop_map(|(target, at)| Op::Expire { target, at }),
        14 => usage_op().prop_map(Op::Usage),
        2 => (0usize..64, prop_oneof![Just(Boundary::Expiry), Just(Boundary::BeforeExpiry),
                                      Just(Boundary::Grant), Just(Boundary::BeforeGrant)], usage_op())
            .prop_map(|(target, boundary, usage)| Op::UsageAtBoundary { target, boundary, usage }),
        2 => (0usize..256).prop_map(|pick| Op::Duplicate { pick }),
        2 => (0usize..256).prop_map(|pick| Op::Conflict { pick }),
        1 => (0usize..3).prop_map(|acct| Op::Reopen { acct }),
    ]
}

#[derive(Debug, Clone)]
struct GenLot {
    lot_id: Uuid,
    acct: usize,
    granted_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct History {
    accounts: usize,
    events: Vec<Event>,
}

struct Builder {
    accounts: usize,
    cursor: DateTime<Utc>,
    events: Vec<Event>,
    lots: Vec<GenLot>,
    next_event: u128,
    next_lot: u128,
    models: Vec<(String, String)>,
}

impl Builder {
    fn event_id(&mut self) -> Uuid {
        self.next_event += 1;
        Uuid::from_u128((1u128 << 64) | self.next_event)
    }

    fn lot_id(&mut self) -> Uuid {
        self.next_lot += 1;
        Uuid::from_u128((2u128 << 64) | self.next_lot)
    }

    fn unknown_lot_id(&mut self) -> Uuid {
        self.next_lot += 1;
        Uuid::from_u128((3u128 << 64) | self.next_lot)
    }

    fn step(&mut self, dt: i64) -> DateTime<Utc> {
        self.cursor += Duration::seconds(dt);
        self.cursor
    }

    fn push(&mut self, at: DateTime<Utc>, acct: usize, body: EventBody) {
        let event_id = self.event_id();
        self.events.push(Event {
            event_id,
            occurred_at: at,
            account_id: ACCOUNTS[acct % self.accounts].to_string(),
            body,
        });
    }

    fn usage(&mut self, at: DateTime<Utc>, u: &UsageOp) {
        let n = self.accounts;
        let (provider, model) = self.models[u.model % self.models.len()].clone();
        let credential_id = match u.kind {
            CredentialKind::Managed => format!("managed-{provider}"),
            CredentialKind::Byok => format!("byok-{provider}-1"),
            CredentialKind::Attached => format!("attached-{provider}-1"),
        };
        let body = EventBody::Usage(Usage {
            request_id: format!("req-{}", self.next_event),
            attempt: 1,
            endpoint_id: "default".to_string(),
            api_key_id: format!("key-{}", u.acct % n),
            provider,
            model,
            credential_kind: u.kind,
            credential_id,
            tokens: u.tokens,
            token_source: if u.streaming {
                TokenSource::Estimate
            } else {
                TokenSource::Provider
            },
            upstream_latency_ms: 120,
            total_latency_ms: 135,
            status: u.status,
            streaming: u.streaming,
        });
        self.push(at, u.acct, body);
    }

    fn op(&mut self, op: &Op) {
        let n = self.accounts;
        match op {
            Op::Purchase {
                acct,
                cents,
                dt,
                reuse,
            } => {
                let at = self.step(*dt);
                let lot_id = match reuse {
                    Some(i) if !self.lots.is_empty() => self.lots[i % self.lots.len()].lot_id,
                    _ => {
                        let id = self.lot_id();
                        let expires_at = at + Duration::seconds(365 * DAY);
                        // Only lots that will exist are targets of voids, expiries and reuse: a
                        // refused event that is offered again after the lot appears would
                        // apply the second time (refusals are not remembered by id).
                        if *cents >= 500 {
                            self.lots.push(GenLot {
                                lot_id: id,
                                acct: acct % n,
                                granted_at: at,
                                expires_at,
                            });
                        }
                        id
                    }
                };
                let body = EventBody::CreditsPurchased(CreditsPurchased {
                    lot_id,
                    amount_usd: m(*cents),
                    payment_reference: Some(format!("pay-{}", self.next_event)),
                });
                self.push(at, *acct, body);
            }
            Op::Grant {
                acct,
                cents,
                priority,
                validity,
                dt,
            } => {
                let at = self.step(*dt);
                let lot_id = self.lot_id();
                let expires_at = at + Duration::seconds(*validity);
                if *validity > 0 {
                    self.lots.push(GenLot {
                        lot_id,
                        acct: acct % n,
                        granted_at: at,
                        expires_at,
                    });
                }
                let body = EventBody::CreditsGranted(CreditsGranted {
                    lot_id,
                    amount_usd: m(*cents),
                    expires_at,
                    priority: *priority,
                    reason: "promo".to_string(),
                });
                self.push(at, *acct, body);
            }
            Op::Void { acct, target, dt } => {
                let at = self.step(*dt);
                let (acct, lot_id) = match target {
                    Some(i) if !self.lots.is_empty() => {
                        let l = &self.lots[i % self.lots.len()];
                        (l.acct, l.lot_id)
                    }
                    _ => (*acct, self.unknown_lot_id()),
                };
                let body = EventBody::LotVoided(LotVoided {
                    lot_id,
                    reason: "refund".to_string(),
                });
                self.push(at, acct, body);
            }
            Op::Expire { target, at } => {
                if self.lots.is_empty() {
                    return;
                }
                let l = self.lots[target % self.lots.len()].clone();
                let when = match at {
                    ExpiryAt::Exact => l.expires_at,
                    ExpiryAt::Late(s) => l.expires_at + Duration::seconds(*s),
                    ExpiryAt::EarlySecs(s) => l.expires_at - Duration::seconds(*s),
                    ExpiryAt::EarlyNanos(ns) => l.expires_at - Duration::nanoseconds(*ns),
                };
                let body = EventBody::LotExpired(LotExpired { lot_id: l.lot_id });
                self.push(when, l.acct, body);
            }
            Op::UsageAtBoundary {
                target,
                boundary,
                usage,
            } => {
                if self.lots.is_empty() {
                    return;
                }
                let l = self.lots[target % self.lots.len()].clone();
                let at = match boundary {
                    Boundary::Expiry => l.expires_at,
                    Boundary::BeforeExpiry => l.expires_at - Duration::nanoseconds(1),
                    Boundary::Grant => l.granted_at,
                    Boundary::BeforeGrant => l.granted_at - Duration::nanoseconds(1),
                };
                let usage = UsageOp {
                    acct: l.acct,
                    kind: CredentialKind::Managed,
                    before_catalog: false,
                    ..usage.clone()
                };
                self.usage(at, &usage);
            }
            Op::Usage(u) => {
                let at = if u.before_catalog {
                    ts(2024, 6, 1, 12, 0, 0)
                } else {
                    self.step(u.dt)
                };
                self.usage(at, u);
            }
            Op::Duplicate { pick } => {
                let e = self.events[pick % self.events.len()].clone();
                self.events.push(e);
            }
            Op::Conflict { pick } => {
                let e = self.events[pick % self.events.len()].clone();
                self.events.push(changed_payload(&e));
            }
            Op::Reopen { acct } => {
                let at = self.step(0);
                let body = EventBody::AccountOpened(AccountOpened {
                    name: "again".to_string(),
                    low_balance_threshold_usd: Money::ZERO,
                });
                self.push(at, *acct, body);
            }
        }
    }
}

/// The same event id with another payload. The change never turns a refused event into an
/// acceptable one or the reverse (except the expiry time, which is what expiries are about).
fn changed_payload(e: &Event) -> Event {
    let mut e = e.clone();
    match &mut e.body {
        EventBody::AccountOpened(o) => o.name.push_str(" (renamed)"),
        EventBody::CreditsPurchased(p) => p.payment_reference = Some("changed".to_string()),
        EventBody::CreditsGranted(g) => g.reason.push_str(" (changed)"),
        EventBody::LotVoided(v) => v.reason.push_str(" (changed)"),
        EventBody::LotExpired(_) => e.occurred_at += Duration::days(1),
        EventBody::Usage(u) => u.tokens.input += 1,
    }
    e
}

fn build(accounts: usize, thresholds: &[i64], ops: &[Op]) -> History {
    let mut b = Builder {
        accounts,
        cursor: base_time(),
        events: Vec::new(),
        lots: Vec::new(),
        next_event: 0,
        next_lot: 0,
        models: models(),
    };
    for (i, threshold) in thresholds.iter().enumerate().take(accounts) {
        let body = EventBody::AccountOpened(AccountOpened {
            name: format!("Account {i}"),
            low_balance_threshold_usd: m(*threshold),
        });
        b.push(base_time(), i, body);
    }
    for op in ops {
        b.op(op);
    }
    History {
        accounts,
        events: b.events,
    }
}

fn history() -> impl Strategy<Value = History> {
    (
        1usize..=3,
        prop::collection::vec(0i64..=2_000, 3),
        prop::collection::vec(op(), 1..70),
    )
        .prop_map(|(n, thresholds, ops)| build(n, &thresholds, &ops))
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Record {
    event: Event,
    before: Option<AccountState>,
    after: Option<AccountState>,
    outcome: Outcome,
}

impl Record {
    fn applied(&self) -> Option<&Applied> {
        match &self.outcome {
            Outcome::Applied(a) => Some(a),
            _ => None,
        }
    }
}

fn offer_all(ledger: &mut Ledger, events: &[Event]) -> Vec<Record> {
    events
        .iter()
        .map(|e| {
            let before = ledger.account(&e.account_id).cloned();
            let outcome = ledger.offer(e);
            let after = ledger.account(&e.account_id).cloned();
            Record {
                event: e.clone(),
                before,
                after,
                outcome,
            }
        })
        .collect()
}

fn run(h: &History) -> (Ledger, Vec<Record>) {
    let mut ledger = Ledger::new(prices());
    let records = offer_all(&mut ledger, &h.events);
    (ledger, records)
}

fn states(ledger: &Ledger) -> Vec<AccountState> {
    ledger.accounts().cloned().collect()
}

fn lot(state: &AccountState, lot_id: Uuid) -> &Lot {
    state.lots.iter().find(|l| l.lot_id == lot_id).unwrap()
}

/// Per account, the sum of postings of every applied event by ledger account.
fn posting_sums(records: &[Record]) -> BTreeMap<(String, LedgerAccount), Decimal> {
    let mut sums = BTreeMap::new();
    for r in records {
        if let Some(a) = r.applied() {
            for p in &a.postings {
                *sums
                    .entry((r.event.account_id.clone(), p.ledger_account))
                    .or_insert(Decimal::ZERO) += dec(p.amount);
            }
        }
    }
    sums
}

/// The upstream cost of a usage event, computed here from the catalog's prices.
fn expected_upstream(at: DateTime<Utc>, u: &Usage) -> Decimal {
    let v = builtin_price_version();
    if at < v.effective_from {
        return Decimal::ZERO;
    }
    let Some(p) = v.models.get(&format!("{}:{}", u.provider, u.model)) else {
        return Decimal::ZERO;
    };
    let t = u.tokens;
    let total = Decimal::from(t.input) * p.input_per_mtok
        + Decimal::from(t.cached_input) * p.cached_input_per_mtok
        + Decimal::from(t.output) * p.output_per_mtok
        + Decimal::from(t.reasoning) * p.reasoning_per_mtok;
    round9(total / Decimal::from(1_000_000))
}

fn eligible_at(l: &Lot, at: DateTime<Utc>) -> bool {
    l.status == LotStatus::Open
        && l.remaining > Money::ZERO
        && l.granted_at <= at
        && at < l.expires_at
}

// ---------------------------------------------------------------------------------------------
// 1. Conservation
// ---------------------------------------------------------------------------------------------

fn check_conservation(state: &AccountState) -> Result<(), TestCaseError> {
    let t = &state.totals;
    let remaining: Decimal = state
        .lots
        .iter()
        .filter(|l| l.status == LotStatus::Open)
        .map(|l| dec(l.remaining))
        .sum();
    prop_assert_eq!(dec(state.remaining().unwrap()), remaining);
    prop_assert_eq!(
        dec(t.purchased) + dec(t.granted),
        dec(t.burned) + dec(t.expired) + dec(t.voided) + remaining,
        "credits in != burned + expired + voided + remaining for {}",
        state.account_id
    );
    prop_assert_eq!(dec(state.debt), dec(t.debt_incurred) - dec(t.debt_settled));
    prop_assert!(!state.debt.is_negative(), "negative debt {:?}", state.debt);
    prop_assert_eq!(
        dec(t.charged_upstream) + dec(t.charged_fee),
        dec(t.burned) - dec(t.debt_settled) + dec(t.debt_incurred)
    );
    let (mut purchased, mut granted, mut burned, mut expired, mut voided) = (
        Decimal::ZERO,
        Decimal::ZERO,
        Decimal::ZERO,
        Decimal::ZERO,
        Decimal::ZERO,
    );
    for l in &state.lots {
        prop_assert_eq!(
            dec(l.amount),
            dec(l.burned) + dec(l.expired) + dec(l.voided) + dec(l.remaining),
            "lot {} does not conserve",
            l.lot_id
        );
        prop_assert!(!l.remaining.is_negative() && !l.burned.is_negative());
        prop_assert!(l.granted_at < l.expires_at);
        prop_assert_eq!(&l.account_id, &state.account_id);
        match l.status {
            LotStatus::Open => {
                prop_assert!(l.closed_at.is_none() && l.expired.is_zero() && l.voided.is_zero())
            }
            LotStatus::Expired => {
                prop_assert!(l.closed_at.is_some() && l.remaining.is_zero() && l.voided.is_zero())
            }
            LotStatus::Voided => {
                prop_assert!(l.closed_at.is_some() && l.remaining.is_zero() && l.expired.is_zero())
            }
        }
        match l.source {
            LotSource::Purchase => purchased += dec(l.amount),
            LotSource::Grant => granted += dec(l.amount),
        }
        burned += dec(l.burned);
        expired += dec(l.expired);
        voided += dec(l.voided);
    }
    // The ledger keeps closed lots, so the lots add up to the totals.
    prop_assert_eq!(purchased, dec(t.purchased));
    prop_assert_eq!(granted, dec(t.granted));
    prop_assert_eq!(burned, dec(t.burned));
    prop_assert_eq!(expired, dec(t.expired));
    prop_assert_eq!(voided, dec(t.voided));
    Ok(())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn p1_conservation_per_account_and_per_lot(h in history()) {
        let (ledger, records) = run(&h);
        prop_assert_eq!(ledger.accounts().count(), h.accounts);
        for r in &records {
            if let Some(after) = &r.after {
                check_conservation(after)?;
            }
        }
        // A lot's money is counted in one account only: lot ids are unique across accounts.
        let mut ids = BTreeSet::new();
        for s in ledger.accounts() {
            for l in &s.lots {
                prop_assert!(ids.insert(l.lot_id), "lot {} is held by two accounts", l.lot_id);
            }
        }
        // Totals match what the applied events brought in.
        for s in ledger.accounts() {
            let mut purchased = Decimal::ZERO;
            let mut granted = Decimal::ZERO;
            for r in records.iter().filter(|r| r.event.account_id == s.account_id && r.applied().is_some()) {
                match &r.event.body {
                    EventBody::CreditsPurchased(p) => purchased += dec(p.amount_usd),
                    EventBody::CreditsGranted(g) => granted += dec(g.amount_usd),
                    _ => {}
                }
            }
            prop_assert_eq!(dec(s.totals.purchased), purchased);
            prop_assert_eq!(dec(s.totals.granted), granted);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Double entry
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn p2_postings_balance_and_sum_to_the_totals(h in history()) {
        let (ledger, records) = run(&h);
        for r in &records {
            if let Some(a) = r.applied() {
                prop_assert!(balanced(&a.postings), "unbalanced postings for {:?}: {:?}", r.event, a.postings);
                let sum: Decimal = a.postings.iter().map(|p| dec(p.amount)).sum();
                prop_assert_eq!(sum, Decimal::ZERO);
                for p in &a.postings {
                    prop_assert!(!p.amount.is_zero(), "zero posting in {:?}", a.postings);
                    if p.ledger_account == LedgerAccount::CustomerCredits {
                        prop_assert!(p.lot_id.is_some(), "customer credits posting without a lot");
                    }
                }
            }
        }
        let sums = posting_sums(&records);
        for s in ledger.accounts() {
            let t = &s.totals;
            let get = |a: LedgerAccount| sums.get(&(s.account_id.clone(), a)).copied().unwrap_or(Decimal::ZERO);
            prop_assert_eq!(get(LedgerAccount::PaymentsReceived), dec(t.purchased));
            prop_assert_eq!(get(LedgerAccount::PromotionalGrants), dec(t.granted));
            prop_assert_eq!(get(LedgerAccount::CustomerCredits), -dec(s.remaining().unwrap()));
            prop_assert_eq!(get(LedgerAccount::CustomerDebt), dec(s.debt));
            prop_assert_eq!(get(LedgerAccount::RevenueUpstreamCost), -dec(t.charged_upstream));
            prop_assert_eq!(get(LedgerAccount::RevenueProcessingFee), -dec(t.charged_fee));
            prop_assert_eq!(get(LedgerAccount::Breakage), -dec(t.expired));
            prop_assert_eq!(get(LedgerAccount::VoidedCredits), -dec(t.voided));
            prop_assert_eq!(get(LedgerAccount::ByokAttributedCost), dec(t.byok_attributed));
            prop_assert_eq!(get(LedgerAccount::ByokAttributedCostContra), -dec(t.byok_attributed));
            // Per lot: what the postings moved is what the lot still holds.
            for l in &s.lots {
                let on_lot: Decimal = records
                    .iter()
                    .filter(|r| r.event.account_id == s.account_id)
                    .filter_map(Record::applied)
                    .flat_map(|a| a.postings.iter())
                    .filter(|p| p.ledger_account == LedgerAccount::CustomerCredits && p.lot_id == Some(l.lot_id))
                    .map(|p| dec(p.amount))
                    .sum();
                prop_assert_eq!(on_lot, -dec(l.remaining), "lot {}", l.lot_id);
            }
            // Usage charges add up to the totals.
            let mut burned = Decimal::ZERO;
            let mut debt = Decimal::ZERO;
            let mut attributed = Decimal::ZERO;
            for r in records.iter().filter(|r| r.event.account_id == s.account_id) {
                if let Some(c) = r.applied().and_then(|a| a.usage.as_ref()) {
                    burned += dec(c.burned);
                    debt += dec(c.debt_incurred);
                    attributed += dec(c.attributed);
                    prop_assert_eq!(dec(c.upstream_cost) + dec(c.fee) - dec(c.attributed), dec(c.burned) + dec(c.debt_incurred));
                }
            }
            prop_assert_eq!(burned, dec(t.burned) - dec(t.debt_settled));
            prop_assert_eq!(debt, dec(t.debt_incurred));
            prop_assert_eq!(attributed, dec(t.byok_attributed));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Replay
// ---------------------------------------------------------------------------------------------

fn chunks<T: Clone>(items: &[T], sizes: &[usize]) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut rest = items;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes
            .get(i)
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        out.push(rest[..n].to_vec());
        rest = &rest[n..];
        i += 1;
    }
    out
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn p3_replay_is_deterministic_and_batching_makes_no_difference(
        h in history(),
        sizes in prop::collection::vec(1usize..12, 0..30),
    ) {
        let (ledger, records) = run(&h);
        let accepted: Vec<&Record> = records.iter().filter(|r| r.applied().is_some()).collect();

        // The accepted events, replayed in order into a fresh ledger, apply identically.
        let mut fresh = Ledger::new(prices());
        for r in &accepted {
            let again = fresh.offer(&r.event);
            prop_assert_eq!(&again, &r.outcome, "replay differs for {:?}", r.event);
        }
        prop_assert_eq!(states(&fresh), states(&ledger));

        // The whole offered history in chunks, the ledger carried over between them.
        let mut carried = Ledger::new(prices());
        let mut outcomes = Vec::new();
        for chunk in chunks(&h.events, &sizes) {
            let mut next = carried.clone();
            outcomes.extend(chunk.iter().map(|e| next.offer(e)));
            carried = next;
        }
        let expected: Vec<Outcome> = records.iter().map(|r| r.outcome.clone()).collect();
        prop_assert_eq!(outcomes, expected);
        prop_assert_eq!(states(&carried), states(&ledger));
        prop_assert_eq!(carried.conflicts(), ledger.conflicts());

        // Like the store: the whole offered history in batches; per batch, load each account's
        // state (through JSON, as a store keeps it), fold the batch with `apply` on that state
        // (a refused event must leave it exactly as it was, since later events of the batch see
        // it), with idempotency by event id and lot ids unique across accounts, then write the
        // states back.
        let book = prices();
        let mut stored: BTreeMap<String, String> = BTreeMap::new();
        let mut seen: BTreeMap<Uuid, [u8; 32]> = BTreeMap::new();
        let mut lot_owner: BTreeMap<Uuid, String> = BTreeMap::new();
        let mut outcomes = Vec::new();
        for batch in chunks(&h.events, &sizes) {
            let mut loaded: BTreeMap<String, Option<AccountState>> = BTreeMap::new();
            for e in &batch {
                if let Some(hash) = seen.get(&e.event_id) {
                    outcomes.push(if *hash == e.payload_hash() { Outcome::Duplicate } else { Outcome::Conflict });
                    continue;
                }
                let state = loaded.entry(e.account_id.clone()).or_insert_with(|| {
                    stored.get(&e.account_id).map(|json| serde_json::from_str(json).unwrap())
                });
                let before = state.clone();
                let new_lot = match &e.body {
                    EventBody::CreditsPurchased(p) => Some(p.lot_id),
                    EventBody::CreditsGranted(g) => Some(g.lot_id),
                    _ => None,
                };
                match apply(state, e, &book) {
                    Ok(_) if new_lot.is_some_and(|l| lot_owner.get(&l).is_some_and(|o| *o != e.account_id)) => {
                        *state = before;
                        outcomes.push(Outcome::Rejected(DomainError::DuplicateLot(new_lot.unwrap())));
                    }
                    Ok(a) => {
                        seen.insert(e.event_id, e.payload_hash());
                        if let Some(l) = new_lot {
                            lot_owner.insert(l, e.account_id.clone());
                        }
                        outcomes.push(Outcome::Applied(a));
                    }
                    Err(err) => {
                        prop_assert_eq!(&*state, &before, "a refused event changed the state: {:?}", e);
                        outcomes.push(Outcome::Rejected(err));
                    }
                }
            }
            for (id, s) in loaded {
                if let Some(s) = s {
                    stored.insert(id, serde_json::to_string(&s).unwrap());
                }
            }
        }
        let expected: Vec<Outcome> = records.iter().map(|r| r.outcome.clone()).collect();
        prop_assert_eq!(outcomes, expected);
        let rebuilt: Vec<AccountState> = stored.values().map(|j| serde_json::from_str(j).unwrap()).collect();
        prop_assert_eq!(rebuilt, states(&ledger));
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Idempotency
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn p4_every_event_twice_is_the_same_as_once_and_conflicts_change_nothing(
        h in history(),
        delays in prop::collection::vec(prop_oneof![2 => Just(0usize), 1 => 0usize..80], 1..80),
    ) {
        let (ledger, records) = run(&h);

        // Each event offered a second time, right after the first or later.
        let mut twice: Vec<((usize, u8, usize), &Event)> = Vec::new();
        for (i, e) in h.events.iter().enumerate() {
            twice.push(((i, 0, i), e));
            twice.push(((i + delays[i % delays.len()], 1, i), e));
        }
        twice.sort_by_key(|(k, _)| *k);
        let mut doubled = Ledger::new(prices());
        let mut first: BTreeMap<usize, Outcome> = BTreeMap::new();
        for ((_, second, i), e) in twice {
            let before = doubled.account(&e.account_id).cloned();
            let outcome = doubled.offer(e);
            if second == 0 {
                first.insert(i, outcome);
                continue;
            }
            match &first[&i] {
                Outcome::Applied(_) | Outcome::Duplicate => {
                    prop_assert_eq!(&outcome, &Outcome::Duplicate, "second offer of {:?}", e)
                }
                Outcome::Conflict => prop_assert_eq!(&outcome, &Outcome::Conflict),
                Outcome::Rejected(_) => {}
            }
            if matches!(outcome, Outcome::Duplicate | Outcome::Conflict) {
                prop_assert_eq!(doubled.account(&e.account_id), before.as_ref());
            }
        }
        prop_assert_eq!(states(&doubled), states(&ledger));

        // Within the history: duplicates and conflicts change nothing.
        let mut applied_ids: BTreeMap<Uuid, &Event> = BTreeMap::new();
        for r in &records {
            match &r.outcome {
                Outcome::Duplicate => {
                    prop_assert_eq!(applied_ids.get(&r.event.event_id), Some(&&r.event));
                    prop_assert_eq!(&r.before, &r.after);
                }
                Outcome::Conflict => {
                    let earlier = applied_ids.get(&r.event.event_id);
                    prop_assert!(earlier.is_some_and(|e| *e != &r.event));
                    prop_assert_eq!(&r.before, &r.after);
                }
                Outcome::Applied(_) => {
                    prop_assert!(applied_ids.insert(r.event.event_id, &r.event).is_none());
                }
                Outcome::Rejected(_) => {
                    prop_assert!(!applied_ids.contains_key(&r.event.event_id));
                    prop_assert_eq!(&r.before, &r.after);
                }
            }
        }
        let conflicts: Vec<Uuid> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Conflict)
            .map(|r| r.event.event_id)
            .collect();
        prop_assert_eq!(ledger.conflicts(), &conflicts[..]);

        // Every applied id, offered again with another payload, is a conflict and moves nothing.
        let mut probe = ledger.clone();
        let before = states(&probe);
        for (n, e) in applied_ids.values().enumerate() {
            let changed = changed_payload(e);
            prop_assert_eq!(probe.offer(&changed), Outcome::Conflict);
            prop_assert_eq!(probe.offer(e), Outcome::Duplicate);
            prop_assert_eq!(probe.conflicts().len(), conflicts.len() + n + 1);
        }
        prop_assert_eq!(states(&probe), before);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Burns stay inside validity windows and follow the burn order
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn p5_burns_only_valid_lots_in_burn_order(h in history()) {
        let (_, records) = run(&h);
        for r in &records {
            let (Some(a), EventBody::Usage(u)) = (r.applied(), &r.event.body) else { continue };
            let at = r.event.occurred_at;
            let before = r.before.as_ref().unwrap();
            let after = r.after.as_ref().unwrap();
            let charge = a.usage.as_ref().unwrap();
            let mut takes: BTreeMap<Uuid, Decimal> = BTreeMap::new();
            for p in a.postings.iter().filter(|p| p.ledger_account == LedgerAccount::CustomerCredits) {
                prop_assert!(p.amount.is_positive());
                let lot_id = p.lot_id.unwrap();
                prop_assert!(takes.insert(lot_id, dec(p.amount)).is_none(), "lot {} burned twice", lot_id);
                let l = lot(before, lot_id);
                prop_assert!(l.status == LotStatus::Open, "burned a closed lot {:?}", l);
                prop_assert!(l.granted_at <= at && at < l.expires_at, "burned lot {:?} at {}", l, at);
                prop_assert!(dec(p.amount) <= dec(l.remaining));
                prop_assert_eq!(dec(lot(after, lot_id).remaining), dec(l.remaining) - dec(p.amount));
                prop_assert_eq!(dec(lot(after, lot_id).burned), dec(l.burned) + dec(p.amount));
            }
            let touched: BTreeSet<Uuid> = a.touched_lots.iter().copied().collect();
            prop_assert_eq!(touched, takes.keys().copied().collect::<BTreeSet<_>>());
            if u.credential_kind != CredentialKind::Managed {
                prop_assert!(takes.is_empty());
                continue;
            }
            prop_assert_eq!(takes.values().copied().sum::<Decimal>(), dec(charge.burned));
            // Lots not burned are untouched.
            for l in &before.lots {
                if !takes.contains_key(&l.lot_id) {
                    prop_assert_eq!(l, lot(after, l.lot_id));
                }
            }
            let mut eligible: Vec<&Lot> = before.lots.iter().filter(|l| eligible_at(l, at)).collect();
            eligible.sort_by_key(|l| (l.priority, l.expires_at, l.granted_at, l.lot_id));
            let mut stopped = false;
            for l in &eligible {
                let take = takes.get(&l.lot_id).copied().unwrap_or(Decimal::ZERO);
                if stopped {
                    prop_assert!(take.is_zero(), "lot {:?} burned before an earlier lot was empty", l);
                }
                if take != dec(l.remaining) {
                    stopped = true;
                }
            }
            if charge.debt_incurred.is_positive() {
                prop_assert!(!stopped, "debt incurred while lots could still pay");
            }
            let spendable: Decimal = eligible.iter().map(|l| dec(l.remaining)).sum();
            let charged = dec(charge.upstream_cost) + dec(charge.fee);
            prop_assert_eq!(dec(charge.burned), charged.min(spendable));
            prop_assert_eq!(dec(charge.debt_incurred), (charged - spendable).max(Decimal::ZERO));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Expiry boundaries and leap days
// ---------------------------------------------------------------------------------------------

fn open(at: DateTime<Utc>) -> Event {
    Event {
        event_id: Uuid::from_u128(1),
        occurred_at: at,
        account_id: "acct-a".to_string(),
        body: EventBody::AccountOpened(AccountOpened {
            name: "A".to_string(),
            low_balance_threshold_usd: Money::ZERO,
        }),
    }
}

fn event(n: u128, at: DateTime<Utc>, body: EventBody) -> Event {
    Event {
        event_id: Uuid::from_u128(n),
        occurred_at: at,
        account_id: "acct-a".to_string(),
        body,
    }
}

fn purchase(n: u128, at: DateTime<Utc>, lot_id: Uuid, cents: i64) -> Event {
    event(
        n,
        at,
        EventBody::CreditsPurchased(CreditsPurchased {
            lot_id,
            amount_usd: m(cents),
            payment_reference: None,
        }),
    )
}

fn grant(
    n: u128,
    at: DateTime<Utc>,
    lot_id: Uuid,
    cents: i64,
    expires_at: DateTime<Utc>,
    priority: i32,
) -> Event {
    event(
        n,
        at,
        EventBody::CreditsGranted(CreditsGranted {
            lot_id,
            amount_usd: m(cents),
            expires_at,
            priority,
            reason: String::new(),
        }),
    )
}

fn expire(n: u128, at: DateTime<Utc>, lot_id: Uuid) -> Event {
    event(n, at, EventBody::LotExpired(LotExpired { lot_id }))
}

fn usage(n: u128, at: DateTime<Utc>, kind: CredentialKind, output_tokens: i64) -> Event {
    event(
        n,
        at,
        EventBody::Usage(Usage {
            request_id: format!("req-{n}"),
            attempt: 1,
            endpoint_id: "default".to_string(),
            api_key_id: "key-1".to_string(),
            provider: "openai".to_string(),
            model: "gpt-4o".to_string(),
            credential_kind: kind,
            credential_id: "cred-1".to_string(),
            tokens: TokenCounts {
                input: 0,
                cached_input: 0,
                output: output_tokens,
                reasoning: 0,
            },
            token_source: TokenSource::Provider,
            upstream_latency_ms: 10,
            total_latency_ms: 12,
            status: 200,
            streaming: false,
        }),
    )
}

fn applied(o: Outcome) -> Applied {
    match o {
        Outcome::Applied(a) => a,
        other => panic!("expected Applied, got {other:?}"),
    }
}

fn instant_around_leap_days() -> impl Strategy<Value = DateTime<Utc>> {
    let days = prop_oneof![
        Just(ts(2028, 2, 29, 0, 0, 0)),
        Just(ts(2028, 2, 28, 0, 0, 0)),
        Just(ts(2028, 3, 1, 0, 0, 0)),
        Just(ts(2027, 3, 1, 0, 0, 0)),
        Just(ts(2032, 2, 29, 0, 0, 0)),
        Just(ts(2026, 12, 31, 0, 0, 0)),
        (0i64..2_000).prop_map(|d| ts(2026, 1, 1, 0, 0, 0) + Duration::days(d)),
    ];
    (
        days,
        0i64..DAY,
        prop_oneof![Just(0i64), 0i64..1_000_000_000],
    )
        .prop_map(|(d, s, ns)| d + Duration::seconds(s) + Duration::nanoseconds(ns))
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn p6_expiry_boundaries(
        at in instant_around_leap_days(),
        cents in 500i64..=20_000,
        validity in 2i64..=400 * DAY,
        priority in -5i32..=200,
        grant_too in any::<bool>(),
    ) {
        let lot_id = Uuid::from_u128(0xA);
        let mut ledger = Ledger::new(prices());
        applied(ledger.offer(&open(at - Duration::days(1))));
        let mut expires_at = at + Duration::seconds(365 * DAY);
        if grant_too {
            expires_at = at + Duration::seconds(validity);
            applied(ledger.offer(&grant(2, at, lot_id, cents, expires_at, priority)));
        } else {
            applied(ledger.offer(&purchase(2, at, lot_id, cents)));
        }
        let l = lot(ledger.account("acct-a").unwrap(), lot_id).clone();
        prop_assert_eq!(l.granted_at, at);
        prop_assert_eq!(l.expires_at, expires_at);
        if !grant_too {
            prop_assert_eq!((l.expires_at - l.granted_at).num_seconds(), 365 * DAY);
            prop_assert_eq!((l.expires_at - l.granted_at).subsec_nanos(), 0);
        }

        // Expiring one nanosecond or one second early is refused and changes nothing.
        let base = ledger.clone();
        for (n, early) in [(3u128, Duration::nanoseconds(1)), (4, Duration::seconds(1))] {
            let outcome = ledger.offer(&expire(n, expires_at - early, lot_id));
            prop_assert_eq!(
                outcome,
                Outcome::Rejected(DomainError::ExpiryTooEarly { lot_id, expires_at: expires_at.to_rfc3339() })
            );
        }
        prop_assert_eq!(states(&ledger), states(&base));
        // Exactly at expires_at works, and the whole remainder becomes breakage.
        let a = applied(ledger.offer(&expire(5, expires_at, lot_id)));
        let s = ledger.account("acct-a").unwrap();
        let closed = lot(s, lot_id);
        prop_assert_eq!(closed.status, LotStatus::Expired);
        prop_assert_eq!(closed.expired, m(cents));
        prop_assert_eq!(s.totals.expired, m(cents));
        prop_assert_eq!(
            a.postings.iter().find(|p| p.ledger_account == LedgerAccount::Breakage).map(|p| p.amount),
            Some(m(-cents))
        );

        // Usage exactly at expires_at cannot burn the lot; one second earlier it does, and so
        // does usage exactly at the grant instant, but not one nanosecond before it.
        for (n, when, burns) in [
            (6u128, expires_at, false),
            (7, expires_at - Duration::seconds(1), true),
            (8, at, true),
            (9, at - Duration::nanoseconds(1), false),
        ] {
            let mut probe = base.clone();
            let a = applied(probe.offer(&usage(n, when, CredentialKind::Managed, 10_000)));
            let c = a.usage.unwrap();
            prop_assert!(c.charged().is_positive());
            prop_assert_eq!(a.touched_lots == vec![lot_id], burns, "usage at {} (lot {}..{})", when, at, expires_at);
            prop_assert_eq!(c.burned.is_positive(), burns);
            prop_assert_eq!(c.debt_incurred.is_positive(), !burns);
            let d = decide(probe.account("acct-a").unwrap(), when).unwrap();
            prop_assert_eq!(d.allow_managed, burns);
        }
    }
}

#[test]
fn leap_day_purchases_expire_365_days_of_86400_seconds_later() {
    for (bought, expires) in [
        (ts(2028, 2, 29, 0, 0, 0), ts(2029, 2, 28, 0, 0, 0)),
        (ts(2028, 2, 29, 23, 59, 59), ts(2029, 2, 28, 23, 59, 59)),
        (ts(2028, 2, 28, 12, 0, 0), ts(2029, 2, 27, 12, 0, 0)),
        (ts(2028, 3, 1, 0, 0, 0), ts(2029, 3, 1, 0, 0, 0)),
        (ts(2027, 3, 1, 0, 0, 0), ts(2028, 2, 29, 0, 0, 0)),
    ] {
        let mut ledger = Ledger::new(prices());
        applied(ledger.offer(&open(bought)));
        applied(ledger.offer(&purchase(2, bought, Uuid::from_u128(7), 500)));
        let l = lot(ledger.account("acct-a").unwrap(), Uuid::from_u128(7));
        assert_eq!(l.expires_at, expires, "bought {bought}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Managed traffic, BYOK and decisions
// ---------------------------------------------------------------------------------------------

fn check_decision(state: &AccountState, now: DateTime<Utc>) -> Result<(), TestCaseError> {
    let d = decide(state, now).unwrap();
    let spendable: Decimal = state
        .lots
        .iter()
        .filter(|l| eligible_at(l, now))
        .map(|l| dec(l.remaining))
        .sum();
    let available = spendable - dec(state.debt);
    prop_assert!(d.allow_byok);
    prop_assert_eq!(dec(d.spendable_usd), spendable);
    prop_assert_eq!(dec(d.available_usd), available);
    prop_assert_eq!(d.debt_usd, state.debt);
    prop_assert_eq!(
        d.allow_managed,
        available > Decimal::ZERO,
        "at {}: {:?}",
        now,
        d
    );
    prop_assert_eq!(
        d.reason == tally_ledger::DecisionReason::CreditsExhausted,
        !d.allow_managed
    );
    prop_assert_eq!(d.low_balance, available <= dec(state.low_balance_threshold));
    if let Some(next) = d.next_change_at {
        prop_assert!(next > now);
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn p7_byok_never_touches_credits_and_decisions_follow_the_balance(h in history()) {
        let (ledger, records) = run(&h);
        for r in &records {
            let (Some(a), EventBody::Usage(u)) = (r.applied(), &r.event.body) else { continue };
            let at = r.event.occurred_at;
            let before = r.before.as_ref().unwrap();
            let after = r.after.as_ref().unwrap();
            let c = a.usage.as_ref().unwrap();
            let upstream = expected_upstream(at, u);
            prop_assert_eq!(dec(c.upstream_cost), upstream, "upstream cost of {:?}", u);
            let basis_priced = c.price_basis == PriceBasis::Catalog;
            prop_assert_eq!(
                basis_priced,
                at >= builtin_price_version().effective_from
                    && builtin_price_version().models.contains_key(&format!("{}:{}", u.provider, u.model))
            );
            if u.credential_kind == CredentialKind::Managed {
                let fee = if basis_priced { round9(upstream * Decimal::new(5, 2)) } else { Decimal::ZERO };
                prop_assert_eq!(dec(c.fee), fee);
                prop_assert!(c.attributed.is_zero());
            } else {
                // Who pays upstream is the customer's own provider account: no fee, no burn, no
                // debt, and nothing but the attribution total moves.
                prop_assert!(c.fee.is_zero() && c.burned.is_zero() && c.debt_incurred.is_zero());
                prop_assert_eq!(dec(c.attributed), upstream);
                let mut expected = before.clone();
                expected.totals.byok_attributed = before.totals.byok_attributed.checked_add(c.attributed).unwrap();
                prop_assert_eq!(&expected, after);
                prop_assert!(a.touched_lots.is_empty());
            }
        }
        // Decisions at the event times, and around every lot boundary.
        for r in &records {
            if let Some(after) = &r.after {
                check_decision(after, r.event.occurred_at)?;
            }
        }
        for s in ledger.accounts() {
            for l in &s.lots {
                for now in [
                    l.granted_at - Duration::nanoseconds(1),
                    l.granted_at,
                    l.expires_at - Duration::nanoseconds(1),
                    l.expires_at,
                ] {
                    check_decision(s, now)?;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Overdraft and debt settlement
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn p8_usage_beyond_credits_is_debt_and_the_next_purchase_pays_it_first(
        first in 500i64..=5_000,
        outputs in prop::collection::vec(100_000i64..=3_000_000, 1..6),
        grant_cents in 1i64..=5_000,
        second in 500i64..=20_000,
    ) {
        let t0 = ts(2026, 3, 1, 9, 0, 0);
        let mut ledger = Ledger::new(prices());
        applied(ledger.offer(&open(t0)));
        applied(ledger.offer(&purchase(2, t0, Uuid::from_u128(0xB1), first)));
        let mut charged = Decimal::ZERO;
        for (i, out) in outputs.iter().enumerate() {
            let n = 10 + i as u128;
            let a = applied(ledger.offer(&usage(n, t0 + Duration::minutes(n as i64), CredentialKind::Managed, *out)));
            charged += dec(a.usage.unwrap().charged());
        }
        let s = ledger.account("acct-a").unwrap().clone();
        let expected_debt = (charged - dec(m(first))).max(Decimal::ZERO);
        prop_assert_eq!(dec(s.debt), expected_debt);
        prop_assert_eq!(dec(s.totals.burned), charged.min(dec(m(first))));
        prop_assert_eq!(
            decide(&s, t0 + Duration::hours(1)).unwrap().allow_managed,
            dec(m(first)) > charged
        );

        // A grant is a gift: it does not settle debt.
        let g = applied(ledger.offer(&grant(30, t0 + Duration::hours(1), Uuid::from_u128(0xB2), grant_cents, t0 + Duration::days(30), 0)));
        let s = ledger.account("acct-a").unwrap().clone();
        prop_assert_eq!(dec(s.debt), expected_debt);
        prop_assert_eq!(lot(&s, Uuid::from_u128(0xB2)).remaining, m(grant_cents));
        prop_assert!(g.postings.iter().all(|p| p.ledger_account != LedgerAccount::CustomerDebt));

        // The next purchase pays the debt first.
        let lot_id = Uuid::from_u128(0xB3);
        let p = applied(ledger.offer(&purchase(31, t0 + Duration::hours(2), lot_id, second)));
        let s = ledger.account("acct-a").unwrap();
        let settled = expected_debt.min(dec(m(second)));
        let l = lot(s, lot_id);
        prop_assert_eq!(dec(l.remaining), dec(m(second)) - settled);
        prop_assert_eq!(dec(l.burned), settled);
        prop_assert_eq!(dec(s.debt), expected_debt - settled);
        prop_assert_eq!(dec(s.totals.debt_settled), settled);
        let debt_posting: Decimal = p
            .postings
            .iter()
            .filter(|p| p.ledger_account == LedgerAccount::CustomerDebt)
            .map(|p| dec(p.amount))
            .sum();
        prop_assert_eq!(debt_posting, -settled);
        check_conservation(s)?;
    }

    #[test]
    fn p8_purchases_settle_debt_and_grants_do_not_in_random_histories(h in history()) {
        let (_, records) = run(&h);
        for r in &records {
            if r.applied().is_none() {
                continue;
            }
            let (Some(before), Some(after)) = (&r.before, &r.after) else { continue };
            match &r.event.body {
                EventBody::CreditsPurchased(p) => {
                    let settle = dec(p.amount_usd).min(dec(before.debt));
                    prop_assert_eq!(dec(lot(after, p.lot_id).remaining), dec(p.amount_usd) - settle);
                    prop_assert_eq!(dec(after.debt), dec(before.debt) - settle);
                }
                EventBody::CreditsGranted(g) => {
                    prop_assert_eq!(lot(after, g.lot_id).remaining, g.amount_usd);
                    prop_assert_eq!(after.debt, before.debt);
                }
                EventBody::Usage(_) => prop_assert!(after.debt >= before.debt),
                _ => prop_assert_eq!(after.debt, before.debt),
            }
        }
    }
}
