//! Finance statements reconcile exactly with the ledger, over random histories.
//!
//! A history is a list of purchases, grants, voids, expiries and usage (managed, BYOK,
//! attached) for two accounts, each at a random instant over eight months, offered in a random
//! order: most events are "late" relative to some other. Every applied event's postings become
//! statement lines stamped with the event's `occurred_at`; then, per account and month:
//!
//! - the identity `opening + purchases + grants - charged - expired - voided = closing` holds
//!   exactly, and so do the credit and debt identities;
//! - closing(M) = opening(M + 1), the month before the history opens on zero and the month
//!   after it closes on the reference ledger's final state;
//! - the months' movements add up to the reference ledger's lifetime `Totals`;
//! - the breakdowns per key and per provider/model add up to the month's usage;
//! - folding the lines summed the way the database sums them gives the same statement;
//! - the platform report is the sum of the accounts' statements.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use tally_ledger::catalog::builtin_price_version;
use tally_ledger::event::{AccountOpened, CreditsGranted, CreditsPurchased, LotExpired, LotVoided};
use tally_ledger::statement::{
    EntryKind, Period, PlatformReport, Position, Statement, StatementLine, UsageDims, UsageFigures,
};
use tally_ledger::{
    CredentialKind, Event, EventBody, Ledger, LedgerAccount, Money, Outcome, PriceBook,
    TokenCounts, TokenSource, Usage,
};
use uuid::Uuid;

const ACCOUNTS: [&str; 2] = ["acct-a", "acct-b"];
const MODELS: [(&str, &str); 4] = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-sonnet-4-5"),
    ("ollama", "llama3"), // not in the catalog: unpriced
];
const DAY_SECS: i64 = 86_400;
/// Events fall in [2026-01-01, 2026-09-01): eight months.
const SPAN_SECS: i64 = 243 * DAY_SECS;

fn origin() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

fn prices() -> PriceBook {
    PriceBook::new(vec![builtin_price_version()]).unwrap()
}

fn m(cents: i64) -> Money {
    Money::from_cents(cents)
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
    },
    Grant {
        acct: usize,
        cents: i64,
        at: i64,
        validity: i64,
        priority: i32,
    },
    Void {
        target: usize,
        at: i64,
    },
    /// At the lot's expiry plus `late` seconds (a negative `late` is refused by the ledger).
    Expire {
        target: usize,
        late: i64,
    },
    Usage {
        acct: usize,
        key: usize,
        kind: CredentialKind,
        model: usize,
        input: i64,
        output: i64,
        at: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let at = 0..SPAN_SECS;
    let purchase = (0usize..2, 500i64..=20_000, at.clone())
        .prop_map(|(acct, cents, at)| Op::Purchase { acct, cents, at });
    let grant = (
        0usize..2,
        1i64..=5_000,
        at.clone(),
        DAY_SECS..=120 * DAY_SECS,
        0i32..=150,
    )
        .prop_map(|(acct, cents, at, validity, priority)| Op::Grant {
            acct,
            cents,
            at,
            validity,
            priority,
        });
    let void = (0usize..64, at.clone()).prop_map(|(target, at)| Op::Void { target, at });
    let late = prop_oneof![
        3 => 0i64..=900,
        1 => -DAY_SECS..0,
        1 => 0i64..=40 * DAY_SECS,
    ];
    let expire = (0usize..64, late).prop_map(|(target, late)| Op::Expire { target, late });
    let kind = prop_oneof![
        4 => Just(CredentialKind::Managed),
        1 => Just(CredentialKind::Byok),
        1 => Just(CredentialKind::Attached),
    ];
    let usage = (
        (0usize..2, 0usize..3, kind, 0usize..MODELS.len()),
        prop_oneof![1 => Just(0i64), 3 => 0i64..3_000_000],
        prop_oneof![1 => Just(0i64), 3 => 0i64..500_000],
        at,
    )
        .prop_map(|((acct, key, kind, model), input, output, at)| Op::Usage {
            acct,
            key,
            kind,
            model,
            input,
            output,
            at,
        });
    prop_oneof![3 => purchase, 3 => grant, 1 => void, 2 => expire, 10 => usage]
}

/// The lots the history opens, so voids and expiries can name them.
struct LotRef {
    lot_id: Uuid,
    acct: usize,
    expires_at: DateTime<Utc>,
}

fn events(ops: &[Op]) -> Vec<Event> {
    let mut out = Vec::new();
    let mut lots: Vec<LotRef> = Vec::new();
    let mut n = 0u128;
    let mut id = || {
        n += 1;
        Uuid::from_u128(n)
    };
    // Opened before anything else happens, so no event is refused for an unknown account.
    for a in ACCOUNTS {
        out.push(Event {
            event_id: id(),
            occurred_at: origin() - Duration::days(1),
            account_id: a.to_string(),
            body: EventBody::AccountOpened(AccountOpened {
                name: a.to_string(),
                low_balance_threshold_usd: Money::ZERO,
            }),
        });
    }
    let at = |s: i64| origin() + Duration::seconds(s);
    for (i, op) in ops.iter().enumerate() {
        let (acct, occurred_at, body) = match op {
            Op::Purchase { acct, cents, at: t } => {
                let lot_id = id();
                lots.push(LotRef {
                    lot_id,
                    acct: *acct,
                    expires_at: at(*t) + Duration::days(365),
                });
                let body = EventBody::CreditsPurchased(CreditsPurchased {
                    lot_id,
                    amount_usd: m(*cents),
                    payment_reference: None,
                });
                (*acct, at(*t), body)
            }
            Op::Grant {
                acct,
                cents,
                at: t,
                validity,
                priority,
            } => {
                let lot_id = id();
                let expires_at = at(*t) + Duration::seconds(*validity);
                lots.push(LotRef {
                    lot_id,
                    acct: *acct,
                    expires_at,
                });
                let body = EventBody::CreditsGranted(CreditsGranted {
                    lot_id,
                    amount_usd: m(*cents),
                    expires_at,
                    priority: *priority,
                    reason: "promo".to_string(),
                });
                (*acct, at(*t), body)
            }
            Op::Void { target, at: t } => {
                let Some(l) = lots.get(target % lots.len().max(1)) else {
                    continue;
                };
                let body = EventBody::LotVoided(LotVoided {
                    lot_id: l.lot_id,
                    reason: "refund".to_string(),
                });
                (l.acct, at(*t), body)
            }
            Op::Expire { target, late } => {
                let Some(l) = lots.get(target % lots.len().max(1)) else {
                    continue;
                };
                let body = EventBody::LotExpired(LotExpired { lot_id: l.lot_id });
                (l.acct, l.expires_at + Duration::seconds(*late), body)
            }
            Op::Usage {
                acct,
                key,
                kind,
                model,
                input,
                output,
                at: t,
            } => {
                let (provider, model) = MODELS[*model];
                let body = EventBody::Usage(Usage {
                    request_id: format!("req-{i}"),
                    attempt: 1,
                    endpoint_id: "default".to_string(),
                    api_key_id: format!("key-{acct}-{key}"),
                    provider: provider.to_string(),
                    model: model.to_string(),
                    credential_kind: *kind,
                    credential_id: format!("{}-{provider}", kind.as_str()),
                    tokens: TokenCounts {
                        input: *input,
                        output: *output,
                        ..TokenCounts::default()
                    },
                    token_source: TokenSource::Provider,
                    upstream_latency_ms: 100,
                    total_latency_ms: 110,
                    status: 200,
                    streaming: false,
                });
                (*acct, at(*t), body)
            }
        };
        out.push(Event {
            event_id: id(),
            occurred_at,
            account_id: ACCOUNTS[acct].to_string(),
            body,
        });
    }
    out
}

type History = BTreeMap<String, Vec<(DateTime<Utc>, StatementLine)>>;

/// Offers the events to the reference ledger in log order and keeps the lines of the applied
/// ones, per account.
fn run(events: &[Event]) -> (Ledger, History) {
    let mut ledger = Ledger::new(prices());
    let mut history: History = BTreeMap::new();
    for e in events {
        if let Outcome::Applied(a) = ledger.offer(e) {
            history.entry(e.account_id.clone()).or_default().extend(
                StatementLine::of_applied(e, &a.postings)
                    .into_iter()
                    .map(|l| (e.occurred_at, l)),
            );
        }
    }
    (ledger, history)
}

/// One month before the history through one month after its last event (expiries may come
/// more than a year after the other events).
fn months(history: &History) -> Vec<Period> {
    let mut p: Period = "2025-12".parse().unwrap();
    let latest = history
        .values()
        .flatten()
        .map(|(at, _)| *at)
        .max()
        .unwrap_or_else(origin);
    let last = Period::containing(latest).unwrap().next().unwrap();
    let mut out = Vec::new();
    while p <= last {
        out.push(p);
        p = p.next().unwrap();
    }
    out
}

/// Sums lines the way the store's query does: per kind, ledger account, sign and usage
/// dimensions.
fn aggregated<'a>(lines: impl Iterator<Item = &'a StatementLine>) -> Vec<StatementLine> {
    let mut sums: BTreeMap<(EntryKind, LedgerAccount, bool, Option<UsageDims>), Money> =
        BTreeMap::new();
    for l in lines {
        let s = sums
            .entry((
                l.kind,
                l.ledger_account,
                l.amount.is_positive(),
                l.usage.clone(),
            ))
            .or_default();
        *s = s.checked_add(l.amount).unwrap();
    }
    sums.into_iter()
        .map(|((kind, ledger_account, _, usage), amount)| StatementLine {
            kind,
            ledger_account,
            amount,
            usage,
        })
        .collect()
}

fn add_figures(total: &mut [Decimal; 4], f: &UsageFigures) {
    for (t, v) in total.iter_mut().zip([
        f.managed_upstream_cost_usd,
        f.managed_fee_usd,
        f.managed_charged_usd,
        f.byok_attributed_usd,
    ]) {
        *t += d(v);
    }
}

fn check_statement(s: &Statement) -> Result<(), TestCaseError> {
    let (o, c, mv) = (&s.opening, &s.closing, &s.movements);
    prop_assert_eq!(
        d(c.balance_usd),
        d(o.balance_usd) + d(mv.purchases_usd) + d(mv.grants_usd)
            - d(mv.managed_upstream_cost_usd)
            - d(mv.managed_fee_usd)
            - d(mv.expired_usd)
            - d(mv.voided_usd)
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
    prop_assert_eq!(
        d(mv.managed_charged_usd),
        d(mv.managed_upstream_cost_usd) + d(mv.managed_fee_usd)
    );
    let usage = [
        d(mv.managed_upstream_cost_usd),
        d(mv.managed_fee_usd),
        d(mv.managed_charged_usd),
        d(mv.byok_attributed_usd),
    ];
    let mut by_key = [Decimal::ZERO; 4];
    s.by_api_key
        .iter()
        .for_each(|k| add_figures(&mut by_key, &k.figures));
    let mut by_model = [Decimal::ZERO; 4];
    s.by_provider_model
        .iter()
        .for_each(|k| add_figures(&mut by_model, &k.figures));
    prop_assert_eq!(by_key, usage);
    prop_assert_eq!(by_model, usage);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn statements_reconcile_exactly_with_the_ledger(
        ops in prop::collection::vec(op(), 1..80),
        shuffle in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        check_history(&ops, &shuffle)?;
    }
}

fn check_history(ops: &[Op], shuffle: &[prop::sample::Index]) -> Result<(), TestCaseError> {
    let mut evs = events(ops);
    // Swap some events so log order and event time disagree even more.
    let n = evs.len();
    for (i, ix) in shuffle.iter().enumerate() {
        let (a, b) = (2 + i % (n - 2).max(1), 2 + ix.index((n - 2).max(1)));
        if a < n && b < n {
            evs.swap(a, b);
        }
    }
    let (ledger, history) = run(&evs);
    let months = months(&history);
    let mut platform_opening = Position::default();
    let mut platform: Vec<PlatformReport> = Vec::new();
    for p in &months {
        let lines: Vec<&StatementLine> = history
            .values()
            .flatten()
            .filter(|(at, _)| p.contains(*at))
            .map(|(_, l)| l)
            .collect();
        let r = PlatformReport::build(*p, platform_opening, lines.iter().copied()).unwrap();
        platform_opening = r.closing().unwrap();
        platform.push(r);
    }

    let mut platform_sums = BTreeMap::<Period, [Decimal; 8]>::new();
    for acct in ACCOUNTS {
        let state = ledger.account(acct).unwrap();
        let empty = Vec::new();
        let h = history.get(acct).unwrap_or(&empty);
        let statements: Vec<Statement> = months
            .iter()
            .map(|p| Statement::from_history(acct, *p, h).unwrap())
            .collect();
        prop_assert_eq!(statements[0].opening, Position::default());
        let last = statements.last().unwrap();
        prop_assert_eq!(
            last.closing,
            Position::new(state.remaining().unwrap(), state.debt).unwrap()
        );
        let mut total = [Decimal::ZERO; 10];
        for (i, s) in statements.iter().enumerate() {
            check_statement(s)?;
            if let Some(next) = statements.get(i + 1) {
                prop_assert_eq!(
                    s.closing,
                    next.opening,
                    "closing of {} is opening of {}",
                    s.period,
                    next.period
                );
            }
            // The same lines, summed as the database sums them, onto the opening position
            // read from ledger sums.
            let before: Vec<&StatementLine> = h
                .iter()
                .filter(|(at, _)| *at < s.period.start())
                .map(|(_, l)| l)
                .collect();
            let sum_of = |account: LedgerAccount| {
                Money::try_sum(
                    before
                        .iter()
                        .filter(|l| l.ledger_account == account)
                        .map(|l| l.amount),
                )
                .unwrap()
            };
            let opening = Position::from_ledger_sums(
                sum_of(LedgerAccount::CustomerCredits),
                sum_of(LedgerAccount::CustomerDebt),
            )
            .unwrap();
            let grouped = aggregated(
                h.iter()
                    .filter(|(at, _)| s.period.contains(*at))
                    .map(|(_, l)| l),
            );
            prop_assert_eq!(
                &Statement::build(acct, s.period, opening, &grouped).unwrap(),
                s
            );

            let mv = &s.movements;
            for (t, v) in total.iter_mut().zip([
                mv.purchases_usd,
                mv.grants_usd,
                mv.credits_burned_usd,
                mv.expired_usd,
                mv.voided_usd,
                mv.debt_incurred_usd,
                mv.debt_settled_usd,
                mv.managed_upstream_cost_usd,
                mv.managed_fee_usd,
                mv.byok_attributed_usd,
            ]) {
                *t += d(v);
            }
            let ps = platform_sums.entry(s.period).or_default();
            for (t, v) in ps.iter_mut().zip([
                mv.purchases_usd,
                mv.grants_usd,
                mv.managed_charged_usd,
                mv.expired_usd,
                mv.voided_usd,
                mv.byok_attributed_usd,
                s.closing.credits_usd,
                s.closing.debt_usd,
            ]) {
                *t += d(v);
            }
        }
        // Lifetime totals of the reference ledger. Its `burned` also counts what purchases
        // took to pay debt; the statement shows that as `debt_settled`.
        let t = &state.totals;
        prop_assert_eq!(
            total,
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
            ]
        );
    }
    for r in &platform {
        let s = platform_sums[&r.period];
        prop_assert_eq!(
            [
                d(r.purchases_usd),
                d(r.grants_usd),
                d(r.revenue_usd),
                d(r.breakage_usd),
                d(r.voided_usd),
                d(r.byok_attributed_usd),
                d(r.closing_credit_liability_usd),
                d(r.closing_debt_usd),
            ],
            s,
            "platform report of {}",
            r.period
        );
        prop_assert_eq!(
            d(r.revenue_usd),
            d(r.revenue_upstream_cost_usd) + d(r.revenue_processing_fee_usd)
        );
        let mut by_model = [Decimal::ZERO; 4];
        r.by_provider_model
            .iter()
            .for_each(|m| add_figures(&mut by_model, &m.figures));
        prop_assert_eq!(
            by_model,
            [
                d(r.revenue_upstream_cost_usd),
                d(r.revenue_processing_fee_usd),
                d(r.revenue_usd),
                d(r.byok_attributed_usd)
            ]
        );
    }
    let liability: Decimal = ledger.accounts().map(|s| d(s.remaining().unwrap())).sum();
    prop_assert_eq!(
        d(platform.last().unwrap().closing_credit_liability_usd),
        liability
    );
    Ok(())
}

/// A usage event that happened in October but reached the ledger after November's events
/// changes October's statement, not November's movements; the months still chain.
#[test]
fn a_late_event_changes_the_month_it_happened_in() {
    let oct = |day: u32| Utc.with_ymd_and_hms(2026, 10, day, 12, 0, 0).unwrap();
    let nov = |day: u32| Utc.with_ymd_and_hms(2026, 11, day, 12, 0, 0).unwrap();
    let usage_at = |n: u128, at: DateTime<Utc>| Event {
        event_id: Uuid::from_u128(n),
        occurred_at: at,
        account_id: "acct-a".to_string(),
        body: EventBody::Usage(Usage {
            request_id: format!("req-{n}"),
            attempt: 1,
            endpoint_id: "default".to_string(),
            api_key_id: "key-1".to_string(),
            provider: "openai".to_string(),
            model: "gpt-4o".to_string(),
            credential_kind: CredentialKind::Managed,
            credential_id: "managed-openai".to_string(),
            // $2.50 upstream + 5% fee.
            tokens: TokenCounts {
                input: 1_000_000,
                ..TokenCounts::default()
            },
            token_source: TokenSource::Provider,
            upstream_latency_ms: 100,
            total_latency_ms: 110,
            status: 200,
            streaming: false,
        }),
    };
    let mut evs = vec![
        Event {
            event_id: Uuid::from_u128(1),
            occurred_at: oct(1),
            account_id: "acct-a".to_string(),
            body: EventBody::AccountOpened(AccountOpened {
                name: "A".to_string(),
                low_balance_threshold_usd: Money::ZERO,
            }),
        },
        Event {
            event_id: Uuid::from_u128(2),
            occurred_at: oct(2),
            account_id: "acct-a".to_string(),
            body: EventBody::CreditsPurchased(CreditsPurchased {
                lot_id: Uuid::from_u128(100),
                amount_usd: m(2_000),
                payment_reference: None,
            }),
        },
        usage_at(3, nov(3)),
    ];
    let (_, before) = run(&evs);
    evs.push(usage_at(4, oct(30)));
    let (_, after) = run(&evs);
    let (o, n): (Period, Period) = ("2026-10".parse().unwrap(), "2026-11".parse().unwrap());
    let st = |h: &History, p| Statement::from_history("acct-a", p, &h["acct-a"]).unwrap();
    let (oct_before, oct_after) = (st(&before, o), st(&after, o));
    let (nov_before, nov_after) = (st(&before, n), st(&after, n));
    assert_eq!(oct_before.movements.managed_charged_usd, Money::ZERO);
    let charged = Money::from_decimal_rounded(Decimal::new(2_625, 3)).unwrap();
    assert_eq!(oct_after.movements.managed_charged_usd, charged);
    assert_eq!(
        oct_after.closing.balance_usd,
        m(2_000).checked_sub(charged).unwrap()
    );
    assert_eq!(nov_after.movements, nov_before.movements);
    assert_eq!(nov_after.opening, oct_after.closing);
    assert_ne!(nov_after.closing, nov_before.closing);
}
