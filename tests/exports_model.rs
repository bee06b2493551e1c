//! Finance exports read from PostgreSQL reconcile exactly with the reference ledger, over random
//! histories.
//!
//! Each case gets its own database. A history covers three accounts over about five months:
//! purchases, grants with expiries, voids, explicit `lot_expired` events, managed, BYOK and
//! attached usage over several keys, providers and models, and sweeps that expire what is due.
//! Events arrive in order of a random arrival instant that is often later than their
//! `occurred_at` (by up to 40 days, so across month ends), in random batch sizes through
//! `Store::ingest`; every batch and sweep is mirrored on the in-memory `tally_ledger::Ledger`.
//! One account always overdraws with a late event and then buys, so debt is incurred and
//! settled in every case. Then, for every account and month, the SQL statement
//! (`tally_ingest::statement::account_statement`) and the platform reports over the whole range
//! must satisfy:
//!
//! 1. the months' movements add up to the reference ledger's lifetime totals;
//! 2. closing(M) = opening(M + 1), the first month opens on zero and the last closes on the
//!    reference ledger's final credits and debt;
//! 3. every statement's own identities;
//! 4. the per-key and per-provider/model breakdowns add up to the month's usage;
//! 5. each platform month is the sum of the accounts' statements of that month, and its
//!    closing liability is the sum of the accounts' remaining credits at the end.
//!
//! Each SQL statement must also equal, field for field, the pure fold over the postings the
//! reference ledger applied.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_ingest::statement::{account_statement, platform_reports};
use tally_ingest::sweep::{EXPIRY_GRACE_SECS, expire_due, expiry_event_id};
use tally_ingest::{BatchMode, Store};
use tally_ledger::catalog::builtin_price_version;
use tally_ledger::event::{AccountOpened, CreditsGranted, CreditsPurchased, LotExpired, LotVoided};
use tally_ledger::statement::{Period, Position, Statement, StatementLine, UsageFigures};
use tally_ledger::{
    CredentialKind, Event, EventBody, Ledger, LotSource, LotStatus, Money, Outcome, PriceBook,
    TokenCounts, TokenSource, Usage,
};
use uuid::Uuid;

const ACCOUNTS: [&str; 3] = ["exp-a", "exp-b", "exp-c"];
const MODELS: [(&str, &str); 4] = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-sonnet-4-5"),
    ("ollama", "llama3"), // not in the catalog: unpriced
];
const DAY: i64 = 86_400;
/// Events happen in [2027-01-01, 2027-05-31).
const SPAN: i64 = 150 * DAY;
/// Grants last at most this long, so the final sweep expires every one of them.
const MAX_GRANT_VALIDITY: i64 = 60 * DAY;

fn origin() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
}

fn at(s: i64) -> DateTime<Utc> {
    origin() + Duration::seconds(s)
}

fn d(v: Money) -> Decimal {
    v.as_decimal()
}

#[derive(Debug, Clone)]
enum Op {
    Purchase {
        acct: usize,
        cents: i64,
        at: i64,
        delay: i64,
    },
    Grant {
        acct: usize,
        cents: i64,
        at: i64,
        validity: i64,
        priority: i32,
        delay: i64,
    },
    Void {
        target: usize,
        at: i64,
        delay: i64,
    },
    /// At the lot's expiry plus `late` seconds (a negative `late` is refused by the ledger).
    Expire {
        target: usize,
        late: i64,
        delay: i64,
    },
    Usage {
        acct: usize,
        key: usize,
        kind: CredentialKind,
        model: usize,
        input: i64,
        output: i64,
        at: i64,
        delay: i64,
    },
    /// The expiry sweep, run at `at`.
    Sweep {
        at: i64,
    },
}

/// How long after it happened an event reaches the store: mostly at once, sometimes days
/// later, sometimes in a later month.
fn delay() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => 0i64..600,
        2 => 0i64..3 * DAY,
        1 => 5 * DAY..40 * DAY,
    ]
}

/// An instant of the span, in seconds from its start; sometimes exactly on a month boundary or
/// one second before it, where an off-by-one period filter would show.
fn instant() -> BoxedStrategy<i64> {
    const MONTH_STARTS: [i64; 5] = [0, 31 * DAY, 59 * DAY, 90 * DAY, 120 * DAY];
    prop_oneof![
        8 => 0..SPAN,
        1 => (prop::sample::select(&MONTH_STARTS[..]), 0i64..2)
            .prop_map(|(start, before)| (start - before).max(0)),
    ]
    .boxed()
}

fn op() -> impl Strategy<Value = Op> {
    let purchase =
        (0usize..3, 500i64..=8_000, instant(), delay()).prop_map(|(acct, cents, at, delay)| {
            Op::Purchase {
                acct,
                cents,
                at,
                delay,
            }
        });
    let grant = (
        (0usize..3, 1i64..=3_000),
        instant(),
        DAY..=MAX_GRANT_VALIDITY,
        0i32..=150,
        delay(),
    )
        .prop_map(|((acct, cents), at, validity, priority, delay)| Op::Grant {
            acct,
            cents,
            at,
            validity,
            priority,
            delay,
        });
    let void = (0usize..64, instant(), delay()).prop_map(|(target, at, delay)| Op::Void {
        target,
        at,
        delay,
    });
    let late = prop_oneof![2 => 0i64..=900, 1 => -DAY..0, 2 => 0i64..=20 * DAY];
    let expire = (0usize..64, late, delay()).prop_map(|(target, late, delay)| Op::Expire {
        target,
        late,
        delay,
    });
    let kind = prop_oneof![
        4 => Just(CredentialKind::Managed),
        1 => Just(CredentialKind::Byok),
        1 => Just(CredentialKind::Attached),
    ];
    let usage = (
        (0usize..3, 0usize..3, kind, 0usize..MODELS.len()),
        prop_oneof![1 => Just(0i64), 4 => 0i64..2_000_000],
        prop_oneof![1 => Just(0i64), 3 => 0i64..300_000],
        instant(),
        delay(),
    )
        .prop_map(
            |((acct, key, kind, model), input, output, at, delay)| Op::Usage {
                acct,
                key,
                kind,
                model,
                input,
                output,
                at,
                delay,
            },
        );
    let sweep = instant().prop_map(|at| Op::Sweep { at });
    prop_oneof![
        3 => purchase,
        3 => grant,
        1 => void,
        2 => expire,
        10 => usage,
        1 => sweep,
    ]
}

#[derive(Debug, Clone)]
struct Case {
    ops: Vec<Op>,
    /// When the guaranteed overdraft happens (it arrives 35 days later).
    overdraft_at: i64,
    /// Batch sizes, used in turn.
    batches: Vec<usize>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(op(), 30..70),
        instant(),
        prop::collection::vec(1usize..25, 1..8),
    )
        .prop_map(|(ops, overdraft_at, batches)| Case {
            ops,
            overdraft_at,
            batches,
        })
}

/// What reaches the store, in arrival order.
enum Item {
    /// Arrival instant and event.
    Event(DateTime<Utc>, Box<Event>),
    Sweep(DateTime<Utc>),
}

struct LotRef {
    lot_id: Uuid,
    acct: usize,
    expires_at: DateTime<Utc>,
}

fn usage_body(
    request_id: String,
    api_key_id: String,
    kind: CredentialKind,
    model: usize,
    input: i64,
    output: i64,
) -> EventBody {
    let (provider, model) = MODELS[model];
    EventBody::Usage(Usage {
        request_id,
        attempt: 1,
        endpoint_id: "default".to_string(),
        api_key_id,
        provider: provider.to_string(),
        model: model.to_string(),
        credential_kind: kind,
        credential_id: format!("{}-{provider}", kind.as_str()),
        tokens: TokenCounts {
            input,
            output,
            ..TokenCounts::default()
        },
        token_source: TokenSource::Provider,
        upstream_latency_ms: 100,
        total_latency_ms: 110,
        status: 200,
        streaming: false,
    })
}

/// The case's events and sweeps, sorted by arrival (ties keep generation order).
fn arrivals(case: &Case) -> Vec<Item> {
    let mut n = 0u128;
    let mut id = || {
        n += 1;
        Uuid::from_u128(n)
    };
    let mut lots: Vec<LotRef> = Vec::new();
    let mut out: Vec<(DateTime<Utc>, Item)> = Vec::new();
    let ev = |account: usize, occurred_at, body, event_id| Event {
        event_id,
        occurred_at,
        account_id: ACCOUNTS[account].to_string(),
        body,
    };
    for (a, name) in ACCOUNTS.iter().enumerate() {
        let opened = origin() - Duration::days(1);
        let body = EventBody::AccountOpened(AccountOpened {
            name: (*name).to_string(),
            low_balance_threshold_usd: Money::ZERO,
        });
        out.push((
            opened,
            Item::Event(opened, Box::new(ev(a, opened, body, id()))),
        ));
    }
    let mut acct0_credit_cents = 0i64;
    for (i, op) in case.ops.iter().enumerate() {
        let (acct, occurred_at, delay, body) = match op {
            Op::Sweep { at: t } => {
                out.push((at(*t), Item::Sweep(at(*t))));
                continue;
            }
            Op::Purchase {
                acct,
                cents,
                at: t,
                delay,
            } => {
                let lot_id = id();
                lots.push(LotRef {
                    lot_id,
                    acct: *acct,
                    expires_at: tally_ledger::lot::purchase_expiry(at(*t)),
                });
                if *acct == 0 {
                    acct0_credit_cents += cents;
                }
                let body = EventBody::CreditsPurchased(CreditsPurchased {
                    lot_id,
                    amount_usd: Money::from_cents(*cents),
                    payment_reference: None,
                });
                (*acct, at(*t), *delay, body)
            }
            Op::Grant {
                acct,
                cents,
                at: t,
                validity,
                priority,
                delay,
            } => {
                let lot_id = id();
                let expires_at = at(*t + *validity);
                lots.push(LotRef {
                    lot_id,
                    acct: *acct,
                    expires_at,
                });
                if *acct == 0 {
                    acct0_credit_cents += cents;
                }
                let body = EventBody::CreditsGranted(CreditsGranted {
                    lot_id,
                    amount_usd: Money::from_cents(*cents),
                    expires_at,
                    priority: *priority,
                    reason: "promo".to_string(),
                });
                (*acct, at(*t), *delay, body)
            }
            Op::Void {
                target,
                at: t,
                delay,
            } => {
                let Some(l) = lots.get(target % lots.len().max(1)) else {
                    continue;
                };
                let body = EventBody::LotVoided(LotVoided {
                    lot_id: l.lot_id,
                    reason: "refund".to_string(),
                });
                (l.acct, at(*t), *delay, body)
            }
            Op::Expire {
                target,
                late,
                delay,
            } => {
                let Some(l) = lots.get(target % lots.len().max(1)) else {
                    continue;
                };
                let body = EventBody::LotExpired(LotExpired { lot_id: l.lot_id });
                (
                    l.acct,
                    l.expires_at + Duration::seconds(*late),
                    *delay,
                    body,
                )
            }
            Op::Usage {
                acct,
                key,
                kind,
                model,
                input,
                output,
                at: t,
                delay,
            } => {
                let body = usage_body(
                    format!("req-{i}"),
                    format!("key-{acct}-{key}"),
                    *kind,
                    *model,
                    *input,
                    *output,
                );
                (*acct, at(*t), *delay, body)
            }
        };
        let arrival = occurred_at + Duration::seconds(delay);
        out.push((
            arrival,
            Item::Event(arrival, Box::new(ev(acct, occurred_at, body, id()))),
        ));
    }
    // The overdraft: managed gpt-4o input at $2.50 per million tokens, a dollar more than every
    // credit the account is ever given, arriving 35 days late; then a purchase settles it.
    let tokens = (acct0_credit_cents / 100 + 1) * 400_000;
    let body = usage_body(
        "req-overdraft".to_string(),
        "key-0-0".to_string(),
        CredentialKind::Managed,
        0,
        tokens,
        0,
    );
    let overdraft = at(case.overdraft_at);
    let arrival = overdraft + Duration::days(35);
    out.push((
        arrival,
        Item::Event(arrival, Box::new(ev(0, overdraft, body, id()))),
    ));
    let settle_at = overdraft + Duration::days(36);
    let body = EventBody::CreditsPurchased(CreditsPurchased {
        lot_id: id(),
        amount_usd: Money::from_cents(1_000),
        payment_reference: None,
    });
    out.push((
        settle_at,
        Item::Event(settle_at, Box::new(ev(0, settle_at, body, id()))),
    ));
    // A final sweep after every grant has expired.
    let end = at(SPAN + MAX_GRANT_VALIDITY + 40 * DAY + DAY);
    out.push((end, Item::Sweep(end)));
    out.sort_by_key(|(arrival, _)| *arrival);
    out.into_iter().map(|(_, item)| item).collect()
}

/// What the run exercised, summed over all cases: each must happen somewhere.
struct Coverage {
    swept: AtomicUsize,
    expired_by_event: AtomicUsize,
    voided: AtomicUsize,
    late_across_months: AtomicUsize,
    byok: AtomicUsize,
    debt_cases: AtomicUsize,
}

static COVERAGE: Coverage = Coverage {
    swept: AtomicUsize::new(0),
    expired_by_event: AtomicUsize::new(0),
    voided: AtomicUsize::new(0),
    late_across_months: AtomicUsize::new(0),
    byok: AtomicUsize::new(0),
    debt_cases: AtomicUsize::new(0),
};

fn bump(c: &AtomicUsize) {
    c.fetch_add(1, Ordering::Relaxed);
}

type History = BTreeMap<String, Vec<(DateTime<Utc>, StatementLine)>>;

/// The reference ledger and the lines of every event it applied, per account.
struct Reference {
    ledger: Ledger,
    history: History,
    latest: Option<DateTime<Utc>>,
}

impl Reference {
    fn offer(&mut self, e: &Event) -> bool {
        let Outcome::Applied(a) = self.ledger.offer(e) else {
            return false;
        };
        let month = Period::containing(e.occurred_at).unwrap();
        if self
            .latest
            .is_some_and(|l| month < Period::containing(l).unwrap())
        {
            bump(&COVERAGE.late_across_months);
        }
        self.latest = self.latest.max(Some(e.occurred_at));
        match &e.body {
            EventBody::LotExpired(x) if e.event_id != expiry_event_id(x.lot_id) => {
                bump(&COVERAGE.expired_by_event)
            }
            EventBody::LotVoided(_) => bump(&COVERAGE.voided),
            EventBody::Usage(u) if u.credential_kind != CredentialKind::Managed => {
                bump(&COVERAGE.byok)
            }
            _ => {}
        }
        self.history
            .entry(e.account_id.clone())
            .or_default()
            .extend(
                StatementLine::of_applied(e, &a.postings)
                    .into_iter()
                    .map(|l| (e.occurred_at, l)),
            );
        true
    }

    /// The events the sweep should append at `now`: one per open lot due, in its order.
    fn due_expiries(&self, now: DateTime<Utc>) -> Vec<Event> {
        let due_before = now - Duration::seconds(EXPIRY_GRACE_SECS);
        let mut due: Vec<(DateTime<Utc>, Uuid, String)> = self
            .ledger
            .accounts()
            .flat_map(|s| s.lots.iter())
            .filter(|l| l.status == LotStatus::Open && l.expires_at <= due_before)
            .map(|l| (l.expires_at, l.lot_id, l.account_id.clone()))
            .collect();
        due.sort();
        due.into_iter()
            .map(|(expires_at, lot_id, account_id)| Event {
                event_id: expiry_event_id(lot_id),
                occurred_at: expires_at,
                account_id,
                body: EventBody::LotExpired(LotExpired { lot_id }),
            })
            .collect()
    }
}

/// Ingests the pending events in the case's batch sizes, mirroring each batch on the reference.
async fn flush(
    store: &Store,
    reference: &mut Reference,
    pending: &mut Vec<(DateTime<Utc>, Event)>,
    sizes: &mut impl Iterator<Item = usize>,
) -> Result<(), TestCaseError> {
    let mut rest = pending.as_slice();
    while !rest.is_empty() {
        let size = sizes.next().unwrap().min(rest.len());
        let (batch, tail) = rest.split_at(size);
        rest = tail;
        let now = batch.iter().map(|(arrival, _)| *arrival).max().unwrap();
        let events: Vec<Event> = batch.iter().map(|(_, e)| e.clone()).collect();
        let expected: Vec<Uuid> = events
            .iter()
            .filter(|e| reference.offer(e))
            .map(|e| e.event_id)
            .collect();
        let report = store
            .ingest(&events, BatchMode::BestEffort, now)
            .await
            .unwrap();
        prop_assert_eq!(&report.applied, &expected, "batch applied at {}", now);
    }
    pending.clear();
    Ok(())
}

async fn run_case(pool: PgPool, case: &Case) -> Result<(), TestCaseError> {
    let store = Store::open(pool.clone(), origin() - Duration::days(2))
        .await
        .unwrap();
    let mut reference = Reference {
        ledger: Ledger::new(PriceBook::new(vec![builtin_price_version()]).unwrap()),
        history: History::new(),
        latest: None,
    };
    let mut sizes = case.batches.iter().copied().cycle();
    let mut pending: Vec<(DateTime<Utc>, Event)> = Vec::new();
    for item in arrivals(case) {
        match item {
            Item::Event(arrival, e) => pending.push((arrival, *e)),
            Item::Sweep(now) => {
                flush(&store, &mut reference, &mut pending, &mut sizes).await?;
                let due = reference.due_expiries(now);
                let expected = due.iter().filter(|e| reference.offer(e)).count();
                COVERAGE.swept.fetch_add(expected, Ordering::Relaxed);
                let swept = expire_due(&store, now).await.unwrap();
                prop_assert_eq!(swept, expected, "sweep at {}", now);
            }
        }
    }
    flush(&store, &mut reference, &mut pending, &mut sizes).await?;
    check_exports(&pool, &reference).await
}

fn figures(f: &UsageFigures) -> [Decimal; 4] {
    [
        d(f.managed_upstream_cost_usd),
        d(f.managed_fee_usd),
        d(f.managed_charged_usd),
        d(f.byok_attributed_usd),
    ]
}

fn add_to(total: &mut [Decimal], values: &[Decimal]) {
    for (t, v) in total.iter_mut().zip(values) {
        *t += v;
    }
}

fn check_identities(s: &Statement) -> Result<(), TestCaseError> {
    let (o, c, mv) = (&s.opening, &s.closing, &s.movements);
    prop_assert_eq!(
        d(c.balance_usd),
        d(o.balance_usd) + d(mv.purchases_usd) + d(mv.grants_usd)
            - d(mv.managed_upstream_cost_usd)
            - d(mv.managed_fee_usd)
            - d(mv.expired_usd)
            - d(mv.voided_usd),
        "balance identity of {} {}",
        s.account_id,
        s.period
    );
    prop_assert_eq!(
        d(c.debt_usd),
        d(o.debt_usd) + d(mv.debt_incurred_usd) - d(mv.debt_settled_usd)
    );
    prop_assert_eq!(
        d(c.credits_usd),
        d(o.credits_usd) + d(mv.purchases_usd) + d(mv.grants_usd)
            - d(mv.debt_settled_usd)
            - d(mv.credits_burned_usd)
            - d(mv.expired_usd)
            - d(mv.voided_usd)
    );
    prop_assert_eq!(d(c.balance_usd), d(c.credits_usd) - d(c.debt_usd));
    prop_assert_eq!(d(o.balance_usd), d(o.credits_usd) - d(o.debt_usd));
    prop_assert_eq!(
        d(mv.managed_charged_usd),
        d(mv.managed_upstream_cost_usd) + d(mv.managed_fee_usd)
    );
    prop_assert_eq!(
        d(mv.managed_charged_usd),
        d(mv.credits_burned_usd) + d(mv.debt_incurred_usd)
    );
    // A month's closing credits or debt may be negative: a purchase that happened in January
    // but arrived after February's overdraft settles that debt in January's statement.
    for v in [
        mv.expired_usd,
        mv.voided_usd,
        mv.debt_incurred_usd,
        mv.debt_settled_usd,
    ] {
        prop_assert!(!v.is_negative(), "{} {}: {:?}", s.account_id, s.period, s);
    }
    let usage = [
        d(mv.managed_upstream_cost_usd),
        d(mv.managed_fee_usd),
        d(mv.managed_charged_usd),
        d(mv.byok_attributed_usd),
    ];
    let mut by_key = [Decimal::ZERO; 4];
    for k in &s.by_api_key {
        add_to(&mut by_key, &figures(&k.figures));
    }
    let mut by_model = [Decimal::ZERO; 4];
    for m in &s.by_provider_model {
        add_to(&mut by_model, &figures(&m.figures));
    }
    prop_assert_eq!(
        by_key,
        usage,
        "per-key breakdown of {} {}",
        s.account_id,
        s.period
    );
    prop_assert_eq!(
        by_model,
        usage,
        "per-model breakdown of {} {}",
        s.account_id,
        s.period
    );
    Ok(())
}

/// Every month from the one before the accounts opened through the one after the last line.
fn months(reference: &Reference) -> Vec<Period> {
    let latest = reference
        .history
        .values()
        .flatten()
        .map(|(at, _)| *at)
        .max()
        .unwrap();
    let mut p = Period::containing(origin() - Duration::days(40)).unwrap();
    let last = Period::containing(latest).unwrap().next().unwrap();
    let mut out = Vec::new();
    while p <= last {
        out.push(p);
        p = p.next().unwrap();
    }
    out
}

/// Per month, what the platform report must equal: the sums of the account statements.
const PLATFORM_FIELDS: usize = 14;

async fn check_exports(pool: &PgPool, reference: &Reference) -> Result<(), TestCaseError> {
    let months = months(reference);
    let mut platform_sums: BTreeMap<Period, [Decimal; PLATFORM_FIELDS]> = BTreeMap::new();
    let mut platform_models: BTreeMap<(Period, String, String), [Decimal; 4]> = BTreeMap::new();
    let no_lines = Vec::new();
    for acct in ACCOUNTS {
        let state = reference.ledger.account(acct).unwrap();
        let lines = reference.history.get(acct).unwrap_or(&no_lines);
        let mut statements = Vec::with_capacity(months.len());
        for p in &months {
            let s = account_statement(pool, acct, *p).await.unwrap();
            let pure = Statement::from_history(acct, *p, lines).unwrap();
            prop_assert_eq!(
                &s,
                &pure,
                "SQL statement of {} {} vs the pure fold",
                acct,
                p
            );
            statements.push(s);
        }
        // (2) The months chain from zero to the reference ledger's final position.
        prop_assert_eq!(statements[0].opening, Position::default());
        prop_assert_eq!(
            statements[1].opening,
            Position::default(),
            "nothing happens before the account opens"
        );
        prop_assert_eq!(
            statements.last().unwrap().closing,
            Position::new(state.remaining().unwrap(), state.debt).unwrap()
        );
        let mut lifetime = [Decimal::ZERO; 10];
        for (i, s) in statements.iter().enumerate() {
            // (3) and (4).
            check_identities(s)?;
            if let Some(next) = statements.get(i + 1) {
                prop_assert_eq!(
                    s.closing,
                    next.opening,
                    "{}: closing of {} is opening of {}",
                    acct,
                    s.period,
                    next.period
                );
            }
            let mv = &s.movements;
            add_to(
                &mut lifetime,
                &[
                    d(mv.purchases_usd),
                    d(mv.grants_usd),
                    d(mv.credits_burned_usd),
                    d(mv.expired_usd),
                    d(mv.voided_usd),
                    d(mv.debt_incurred_usd),
                    d(mv.debt_settled_usd),
                    d(mv.managed_upstream_cost_usd),
                    d(mv.managed_fee_usd),
                    d(mv.byok_attributed_usd),
                ],
            );
            add_to(
                platform_sums.entry(s.period).or_default(),
                &[
                    d(mv.purchases_usd),
                    d(mv.grants_usd),
                    d(mv.managed_charged_usd),
                    d(mv.managed_upstream_cost_usd),
                    d(mv.managed_fee_usd),
                    d(mv.credits_burned_usd),
                    d(mv.expired_usd),
                    d(mv.voided_usd),
                    d(mv.debt_incurred_usd),
                    d(mv.debt_settled_usd),
                    d(mv.byok_attributed_usd),
                    d(s.opening.credits_usd),
                    d(s.closing.credits_usd),
                    d(s.closing.debt_usd),
                ],
            );
            for m in &s.by_provider_model {
                add_to(
                    platform_models
                        .entry((s.period, m.provider.clone(), m.model.clone()))
                        .or_default(),
                    &figures(&m.figures),
                );
            }
        }
        // (1) Lifetime totals of the reference ledger. Its `burned` also counts what purchases
        // took to pay debt; a statement shows that as `debt_settled`.
        let t = &state.totals;
        prop_assert_eq!(
            lifetime,
            [
                d(t.purchased),
                d(t.granted),
                d(t.burned) - d(t.debt_settled),
                d(t.expired),
                d(t.voided),
                d(t.debt_incurred),
                d(t.debt_settled),
                d(t.charged_upstream),
                d(t.charged_fee),
                d(t.byok_attributed),
            ],
            "lifetime totals of {}",
            acct
        );
        if acct == ACCOUNTS[0] {
            prop_assert!(t.debt_incurred.is_positive() && t.debt_settled.is_positive());
            bump(&COVERAGE.debt_cases);
        }
    }

    // (5) The platform reports over the whole range.
    let reports = platform_reports(pool, months[0], *months.last().unwrap())
        .await
        .unwrap();
    prop_assert_eq!(reports.len(), months.len());
    for (r, p) in reports.iter().zip(&months) {
        prop_assert_eq!(r.period, *p);
        let got = [
            d(r.purchases_usd),
            d(r.grants_usd),
            d(r.revenue_usd),
            d(r.revenue_upstream_cost_usd),
            d(r.revenue_processing_fee_usd),
            d(r.credits_burned_usd),
            d(r.breakage_usd),
            d(r.voided_usd),
            d(r.debt_incurred_usd),
            d(r.debt_settled_usd),
            d(r.byok_attributed_usd),
            d(r.opening_credit_liability_usd),
            d(r.closing_credit_liability_usd),
            d(r.closing_debt_usd),
        ];
        prop_assert_eq!(got, platform_sums[p], "platform report of {}", p);
        let models: BTreeMap<(String, String), [Decimal; 4]> = r
            .by_provider_model
            .iter()
            .map(|m| ((m.provider.clone(), m.model.clone()), figures(&m.figures)))
            .collect();
        let expected: BTreeMap<(String, String), [Decimal; 4]> = platform_models
            .range((*p, String::new(), String::new())..)
            .take_while(|((q, _, _), _)| q == p)
            .map(|((_, provider, model), f)| ((provider.clone(), model.clone()), *f))
            .collect();
        prop_assert_eq!(models, expected, "platform per-model figures of {}", p);
    }
    let liability: Decimal = reference
        .ledger
        .accounts()
        .map(|s| d(s.remaining().unwrap()))
        .sum();
    let debt: Decimal = reference.ledger.accounts().map(|s| d(s.debt)).sum();
    let last = reports.last().unwrap();
    prop_assert_eq!(d(last.closing_credit_liability_usd), liability);
    prop_assert_eq!(d(last.closing_debt_usd), debt);
    // Every grant has been expired by the final sweep: what is owed is unspent purchases.
    let open_grants = reference
        .ledger
        .accounts()
        .flat_map(|s| s.lots.iter())
        .filter(|l| l.source == LotSource::Grant && l.status == LotStatus::Open)
        .count();
    prop_assert_eq!(open_grants, 0);
    Ok(())
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at a PostgreSQL server (tests never skip without one)")
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("DATABASE_URL has a database");
    format!("{server}/{name}{query}")
}

/// Runs one case on a database of its own, dropped afterwards whatever the outcome.
fn run_on_fresh_database(case: &Case) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = database_url();
    let name = format!("tally_exports_model_{}", Uuid::new_v4().simple());
    let pool = rt.block_on(async {
        let pool = tally_ingest::db::connect(&with_database(&url, &name))
            .await
            .unwrap();
        tally_ingest::db::migrate(&pool).await.unwrap();
        pool
    });
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(run_case(pool.clone(), case))
    }));
    rt.block_on(async {
        pool.close().await;
        let admin = PgPool::connect(&url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{name}\" with (force)"
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
    });
    match outcome {
        Ok(result) => result,
        Err(panic) => resume_unwind(panic),
    }
}

#[test]
fn sql_exports_reconcile_exactly_with_the_ledger() {
    let mut runner = TestRunner::new(Config {
        cases: 20,
        max_shrink_iters: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |c| run_on_fresh_database(&c));
    if let Err(e) = result {
        panic!("{e}");
    }
    let c = &COVERAGE;
    let covered = [
        ("lots expired by the sweep", c.swept.load(Ordering::Relaxed)),
        (
            "lot_expired events sent and applied",
            c.expired_by_event.load(Ordering::Relaxed),
        ),
        ("voids applied", c.voided.load(Ordering::Relaxed)),
        (
            "late events landing in an earlier month",
            c.late_across_months.load(Ordering::Relaxed),
        ),
        ("BYOK or attached usage", c.byok.load(Ordering::Relaxed)),
        (
            "cases with debt incurred and settled",
            c.debt_cases.load(Ordering::Relaxed),
        ),
    ];
    for (what, n) in covered {
        assert!(n > 0, "the histories never exercised {what}: {covered:?}");
    }
}
