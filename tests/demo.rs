//! `tally demo`'s scenario over real sockets: client → gateway → mock provider → ledger. What a
//! new user sees first must work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sqlx::PgPool;

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn demo_scenario_runs_end_to_end_over_http(pool: PgPool) {
    let live = common::live_stack(&pool, |_, _| {}).await;
    demo_scenario(live, pool).await;
}

/// The same demo with Kafka configured: usage goes gateway → spool → broker → ingest group →
/// ledger, decisions and fleet metrics come back over their topics.
#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn demo_scenario_runs_through_kafka(pool: PgPool) {
    let spool = tempfile::tempdir().unwrap();
    let kafka = common::kafka_settings(spool.path());
    let live = common::live_stack_with(&pool, Some(kafka), |_, _| {}).await;
    demo_scenario(live, pool).await;
}

async fn demo_scenario(live: common::LiveStack, pool: PgPool) {
    let (clock, mock_state, ledger, gateway) = (live.clock, live.mock, live.ledger, live.gateway);
    let stack = live.stack;
    let report = tally::demo::run_scenario(&ledger, &gateway, &mock_state, clock.now())
        .await
        .unwrap();
    for expected in [
        "returned the same lot: true",
        "frontend  managed     openai:gpt-4o                12        0",
        "backend   byok        anthropic:claude-sonnet-4-5  12        6",
        "the next managed request got HTTP 403 credits_exhausted, while a BYOK request still got HTTP 200",
        "managed traffic DENIED (403 credits_exhausted); BYOK traffic allowed",
        "Managed requests are served again (HTTP 200)",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    // The demo's provider keys never show in what it printed.
    assert!(!report.contains("sk-ant-demo"), "{report}");
    // The fleet-wide metrics the strategies read come from what the ledger applied.
    let global = stack
        .runtime
        .as_ref()
        .unwrap()
        .gateway
        .global_metrics
        .clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let key = |p: &str, m: &str| (p.to_string(), m.to_string());
    loop {
        let g = global.load();
        let ready = g
            .get(&key("openai", "gpt-4o"))
            .is_some_and(|m| m.requests >= 22)
            && g.contains_key(&key("anthropic", "claude-sonnet-4-5"));
        if ready || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let g = global.load();
    let openai = &g[&key("openai", "gpt-4o")];
    assert!(
        openai.requests >= 22 && openai.error_rate == 0.0 && openai.latency.upstream_ms_p95 > 0.0,
        "{openai:?}"
    );
    let anthropic = &g[&key("anthropic", "claude-sonnet-4-5")];
    assert!(
        anthropic.error_rate > 0.4 && anthropic.error_rate < 0.6,
        "half its attempts were 429s: {anthropic:?}"
    );
    stack.stop().await.unwrap();
    let unbalanced: i64 =
        sqlx::query_scalar("select count(*) from (select 1 from ledger_entry group by event_seq having sum(amount_usd) <> 0) x")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unbalanced, 0);
    let managed_calls = mock_state.calls(tally::demo::DEMO_MANAGED_OPENAI_KEY);
    let metered: i64 = sqlx::query_scalar(
        "select coalesce(sum(requests), 0)::bigint from usage_hourly where credential_kind = 'managed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        metered,
        i64::try_from(managed_calls).unwrap(),
        "every upstream call was metered exactly once"
    );
}
