//! The PostgreSQL store must agree with the pure in-memory ledger, whatever the batch
//! boundaries, duplicates, conflicts and refusals, and concurrent writers must not lose money.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use sqlx::PgPool;
use tally_ingest::{BatchMode, Store, query};
use tally_ledger::catalog::builtin_price_version;
use tally_ledger::event::{AccountOpened, CreditsGranted, CreditsPurchased, LotExpired, LotVoided};
use tally_ledger::{
    CredentialKind, Event, EventBody, Ledger, LotStatus, Money, Outcome, PriceBook, TokenCounts,
    TokenSource, Usage,
};
use uuid::Uuid;

/// A small deterministic generator: the history is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2028, 2, 27, 0, 0, 0).unwrap()
}

fn history(seed: u64, len: usize) -> Vec<Event> {
    let mut rng = Rng(seed);
    let accounts = ["s1", "s2", "s3"];
    let mut t = start();
    let mut events: Vec<Event> = accounts
        .iter()
        .map(|a| Event {
            event_id: Uuid::from_u128(u128::from(rng.next()) << 64 | u128::from(rng.next())),
            occurred_at: t,
            account_id: (*a).to_string(),
            body: EventBody::AccountOpened(AccountOpened {
                name: format!("{a} ltd"),
                low_balance_threshold_usd: Money::from_cents(100),
            }),
        })
        .collect();
    let mut lots: Vec<(String, Uuid, DateTime<Utc>)> = Vec::new();
    for n in 0..len {
        // Time mostly moves forward, sometimes jumps days, sometimes an event is late.
        t += Duration::seconds(i64::try_from(rng.below(4000)).unwrap());
        if rng.below(10) == 0 {
            t += Duration::days(i64::try_from(rng.below(20)).unwrap());
        }
        let at = if rng.below(8) == 0 {
            t - Duration::hours(i64::try_from(rng.below(48)).unwrap())
        } else {
            t
        };
        let account = accounts[usize::try_from(rng.below(3)).unwrap()].to_string();
        let id = Uuid::from_u128(u128::from(rng.next()) << 64 | u128::from(rng.next()) | 1);
        let body = match rng.below(20) {
            0..=2 => {
                let lot_id = Uuid::from_u128(u128::from(rng.next()) << 32 | n as u128);
                lots.push((account.clone(), lot_id, at + Duration::days(365)));
                EventBody::CreditsPurchased(CreditsPurchased {
                    lot_id,
                    amount_usd: Money::from_cents(i64::try_from(400 + rng.below(3000)).unwrap()),
                    payment_reference: None,
                })
            }
            3..=4 => {
                let lot_id = Uuid::from_u128(u128::from(rng.next()) << 32 | n as u128);
                let expires = at + Duration::hours(i64::try_from(1 + rng.below(24 * 15)).unwrap());
                lots.push((account.clone(), lot_id, expires));
                EventBody::CreditsGranted(CreditsGranted {
                    lot_id,
                    amount_usd: Money::from_cents(i64::try_from(1 + rng.below(1500)).unwrap()),
                    expires_at: expires,
                    priority: i32::try_from(rng.below(120)).unwrap(),
                    reason: String::new(),
                })
            }
            5 if !lots.is_empty() => {
                let (a, lot_id, _) =
                    lots[usize::try_from(rng.below(lots.len() as u64)).unwrap()].clone();
                return_event(
                    &mut events,
                    id,
                    at,
                    a,
                    EventBody::LotVoided(LotVoided {
                        lot_id,
                        reason: "test".into(),
                    }),
                );
                continue;
            }
            6 if !lots.is_empty() => {
                let (a, lot_id, expires) =
                    lots[usize::try_from(rng.below(lots.len() as u64)).unwrap()].clone();
                // Mostly at or after the expiry; sometimes too early, which must be refused.
                let when = if rng.below(4) == 0 {
                    expires - Duration::seconds(1)
                } else {
                    expires
                };
                return_event(
                    &mut events,
                    id,
                    when,
                    a,
                    EventBody::LotExpired(LotExpired { lot_id }),
                );
                continue;
            }
            7 if events.len() > 5 => {
                // A duplicate, or the same id with another payload (a conflict).
                let mut again =
                    events[usize::try_from(rng.below(events.len() as u64)).unwrap()].clone();
                if rng.below(2) == 0 {
                    again.occurred_at += Duration::seconds(1);
                }
                events.push(again);
                continue;
            }
            _ => {
                let kind = [
                    CredentialKind::Managed,
                    CredentialKind::Managed,
                    CredentialKind::Byok,
                    CredentialKind::Attached,
                ][usize::try_from(rng.below(4)).unwrap()];
                let model = ["gpt-4o", "gpt-4o-mini", "claude-haiku-4-5", "nonexistent"]
                    [usize::try_from(rng.below(4)).unwrap()];
                let provider = if model.starts_with("claude") {
                    "anthropic"
                } else {
                    "openai"
                };
                EventBody::Usage(Usage {
                    request_id: format!("r{n}"),
                    attempt: 1,
                    endpoint_id: "default".into(),
                    api_key_id: format!("key{}", rng.below(3)),
                    provider: provider.into(),
                    model: model.into(),
                    credential_kind: kind,
                    credential_id: format!("{}-1", kind.as_str()),
                    tokens: TokenCounts {
                        input: i64::try_from(rng.below(400_000)).unwrap(),
                        cached_input: i64::try_from(rng.below(50_000)).unwrap(),
                        output: i64::try_from(rng.below(60_000)).unwrap(),
                        reasoning: i64::try_from(rng.below(10_000)).unwrap(),
                    },
                    token_source: if rng.below(3) == 0 {
                        TokenSource::Estimate
                    } else {
                        TokenSource::Provider
                    },
                    upstream_latency_ms: 100,
                    total_latency_ms: 120,
                    status: if rng.below(10) == 0 { 500 } else { 200 },
                    streaming: rng.below(2) == 0,
                })
            }
        };
        events.push(Event {
            event_id: id,
            occurred_at: at,
            account_id: account,
            body,
        });
    }
    events
}

fn return_event(
    events: &mut Vec<Event>,
    id: Uuid,
    at: DateTime<Utc>,
    account: String,
    body: EventBody,
) {
    events.push(Event {
        event_id: id,
        occurred_at: at,
        account_id: account,
        body,
    });
}

async fn check_store_matches_model(pool: PgPool, seed: u64) {
    let events = history(seed, 400);
    let now = events.iter().map(|e| e.occurred_at).max().unwrap() + Duration::days(1);
    let store = Store::open(pool.clone(), now).await.unwrap();
    let mut model = Ledger::new(PriceBook::new(vec![builtin_price_version()]).unwrap());
    let mut expected_applied = 0;
    let mut expected_conflicts = 0;
    for e in &events {
        match model.offer(e) {
            Outcome::Applied(_) => expected_applied += 1,
            Outcome::Conflict => expected_conflicts += 1,
            Outcome::Duplicate | Outcome::Rejected(_) => {}
        }
    }
    let mut rng = Rng(seed ^ 0xdead_beef);
    let (mut applied, mut conflicts, mut i) = (0, 0, 0);
    while i < events.len() {
        let size = usize::try_from(1 + rng.below(60))
            .unwrap()
            .min(events.len() - i);
        let report = store
            .ingest(&events[i..i + size], BatchMode::BestEffort, now)
            .await
            .unwrap();
        applied += report.applied.len();
        conflicts += report.conflicts.len();
        i += size;
    }
    assert_eq!(
        (applied, conflicts),
        (expected_applied, expected_conflicts),
        "seed {seed}"
    );
    // The history is not trivial: most events apply, and there are conflicts and debts.
    assert!(
        applied > 250 && conflicts > 0,
        "seed {seed}: {applied} applied, {conflicts} conflicts"
    );
    assert!(
        model
            .accounts()
            .any(|a| a.totals.debt_incurred.is_positive()),
        "seed {seed}: no overdraft exercised"
    );
    assert!(
        model.accounts().any(|a| a.totals.expired.is_positive()),
        "seed {seed}: no expiry exercised"
    );
    for expected in model.accounts() {
        let got = query::account_state(&pool, &expected.account_id)
            .await
            .unwrap();
        let open: Vec<_> = expected
            .lots
            .iter()
            .filter(|l| l.status == LotStatus::Open)
            .cloned()
            .collect();
        assert_eq!(
            got.totals, expected.totals,
            "seed {seed} account {}",
            expected.account_id
        );
        assert_eq!(got.debt, expected.debt, "seed {seed}");
        let mut got_open = got.lots.clone();
        got_open.sort_by_key(|l| l.lot_id);
        let mut open = open;
        open.sort_by_key(|l| l.lot_id);
        assert_eq!(
            got_open, open,
            "seed {seed} account {}",
            expected.account_id
        );
        let all = query::lots(&pool, &expected.account_id).await.unwrap();
        assert_eq!(
            all.len(),
            expected.lots.len(),
            "seed {seed}: closed lots are kept too"
        );
    }
    // Conservation in the projections themselves.
    let bad: i64 = sqlx::query_scalar(
        "select count(*) from account a where purchased_usd + granted_usd <> burned_usd + expired_usd + voided_usd
            + coalesce((select sum(remaining_usd) from credit_lot l where l.account_id = a.account_id), 0)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(bad, 0, "seed {seed}");
    let unbalanced: i64 =
        sqlx::query_scalar("select count(*) from (select 1 from ledger_entry group by event_seq having sum(amount_usd) <> 0) x")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unbalanced, 0);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn store_matches_the_pure_ledger_seed_1(pool: PgPool) {
    check_store_matches_model(pool, 1).await;
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn store_matches_the_pure_ledger_seed_2(pool: PgPool) {
    check_store_matches_model(pool, 2).await;
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn store_matches_the_pure_ledger_seed_3(pool: PgPool) {
    check_store_matches_model(pool, 0x5eed).await;
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn concurrent_batches_on_one_account_lose_nothing(pool: PgPool) {
    let now = start() + Duration::days(1);
    let store = Arc::new(Store::open(pool.clone(), now).await.unwrap());
    let open = Event {
        event_id: Uuid::new_v4(),
        occurred_at: start(),
        account_id: "busy".into(),
        body: EventBody::AccountOpened(AccountOpened {
            name: "busy".into(),
            low_balance_threshold_usd: Money::ZERO,
        }),
    };
    let buy = Event {
        event_id: Uuid::new_v4(),
        occurred_at: start(),
        account_id: "busy".into(),
        body: EventBody::CreditsPurchased(CreditsPurchased {
            lot_id: Uuid::new_v4(),
            amount_usd: Money::from_cents(1000),
            payment_reference: None,
        }),
    };
    store
        .ingest(&[open, buy], BatchMode::AllOrNothing, now)
        .await
        .unwrap();
    let usage = |n: u32| Event {
        event_id: Uuid::new_v4(),
        occurred_at: start() + Duration::seconds(i64::from(n)),
        account_id: "busy".into(),
        body: EventBody::Usage(Usage {
            request_id: format!("c{n}"),
            attempt: 1,
            endpoint_id: "default".into(),
            api_key_id: "k".into(),
            provider: "openai".into(),
            model: "gpt-4o".into(),
            credential_kind: CredentialKind::Managed,
            credential_id: "m".into(),
            // $0.10 upstream + 5% = $0.105 each.
            tokens: TokenCounts {
                input: 40_000,
                ..TokenCounts::default()
            },
            token_source: TokenSource::Provider,
            upstream_latency_ms: 1,
            total_latency_ms: 1,
            status: 200,
            streaming: false,
        }),
    };
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let store = Arc::clone(&store);
        let batch: Vec<Event> = (0..20).map(|i| usage(w * 100 + i)).collect();
        tasks.push(tokio::spawn(async move {
            store
                .ingest(&batch, BatchMode::AllOrNothing, now)
                .await
                .map(|r| r.applied.len())
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().unwrap();
    }
    assert_eq!(applied, 160);
    let s = query::account_state(&pool, "busy").await.unwrap();
    // 160 × $0.105 = $16.80 against $10.00: $6.80 of debt, nothing lost or doubled.
    assert_eq!(
        s.totals
            .charged_upstream
            .checked_add(s.totals.charged_fee)
            .unwrap(),
        Money::from_cents(1680)
    );
    assert_eq!(s.debt, Money::from_cents(680));
    assert_eq!(s.remaining().unwrap(), Money::ZERO);
    let requests: i64 = sqlx::query_scalar("select sum(requests)::bigint from usage_hourly")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(requests, 160);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn a_lot_id_is_never_reused_across_accounts_or_after_closing(pool: PgPool) {
    let now = start() + Duration::days(400);
    let store = Store::open(pool.clone(), now).await.unwrap();
    let ev = |account: &str, at: DateTime<Utc>, body: EventBody| Event {
        event_id: Uuid::new_v4(),
        occurred_at: at,
        account_id: account.into(),
        body,
    };
    let open = |a: &str| {
        ev(
            a,
            start(),
            EventBody::AccountOpened(AccountOpened {
                name: a.into(),
                low_balance_threshold_usd: Money::ZERO,
            }),
        )
    };
    let lot = Uuid::new_v4();
    let buy = |a: &str, at| {
        ev(
            a,
            at,
            EventBody::CreditsPurchased(CreditsPurchased {
                lot_id: lot,
                amount_usd: Money::from_cents(500),
                payment_reference: None,
            }),
        )
    };
    store
        .ingest(
            &[open("a"), open("b"), buy("a", start())],
            BatchMode::AllOrNothing,
            now,
        )
        .await
        .unwrap();
    // Another account, and (after voiding) the same account: both refused, the lot untouched.
    let err = store
        .ingest(&[buy("b", start())], BatchMode::AllOrNothing, now)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tally_ingest::StoreError::Rejected {
                error: tally_ledger::DomainError::DuplicateLot(_),
                ..
            }
        ),
        "{err}"
    );
    store
        .ingest(
            &[ev(
                "a",
                start(),
                EventBody::LotVoided(LotVoided {
                    lot_id: lot,
                    reason: String::new(),
                }),
            )],
            BatchMode::AllOrNothing,
            now,
        )
        .await
        .unwrap();
    let err = store
        .ingest(
            &[buy("a", start() + Duration::days(1))],
            BatchMode::AllOrNothing,
            now,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tally_ingest::StoreError::Rejected {
                error: tally_ledger::DomainError::DuplicateLot(_),
                ..
            }
        ),
        "{err}"
    );
    // Within one batch too.
    let other = Uuid::new_v4();
    let grant = |a: &str| {
        ev(
            a,
            start(),
            EventBody::CreditsGranted(CreditsGranted {
                lot_id: other,
                amount_usd: Money::from_cents(100),
                expires_at: start() + Duration::days(1),
                priority: 0,
                reason: String::new(),
            }),
        )
    };
    let report = store
        .ingest(&[grant("a"), grant("b")], BatchMode::BestEffort, now)
        .await
        .unwrap();
    assert_eq!((report.applied.len(), report.rejected.len()), (1, 1));
    let lots = query::lots(&pool, "a").await.unwrap();
    assert_eq!(
        lots.iter().find(|l| l.lot_id == lot).map(|l| l.status),
        Some("voided")
    );
    assert!(query::lots(&pool, "b").await.unwrap().is_empty());
}
