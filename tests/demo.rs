//! `tally demo`'s scenario over real sockets: client → gateway → mock provider → ledger. What a
//! new user sees first must work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sqlx::PgPool;

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn demo_scenario_runs_end_to_end_over_http(pool: PgPool) {
    let live = common::live_stack(&pool, |_, _| {}).await;
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
    stack.stop().await.unwrap();
    let unbalanced: i64 =
        sqlx::query_scalar("select count(*) from (select 1 from ledger_entry group by event_seq having sum(amount_usd) <> 0) x")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unbalanced, 0);
    // The fleet-wide metrics the strategies read come from the same ledger.
    let global = tally::gateway::global_metrics(&pool, clock.now())
        .await
        .unwrap();
    let openai = &global[&("openai".to_string(), "gpt-4o".to_string())];
    assert!(
        openai.requests >= 22 && openai.error_rate == 0.0,
        "{openai:?}"
    );
    let anthropic = &global[&("anthropic".to_string(), "claude-sonnet-4-5".to_string())];
    assert!(
        anthropic.error_rate > 0.4 && anthropic.error_rate < 0.6,
        "half its attempts were 429s: {anthropic:?}"
    );
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
