//! `tally demo`'s scenario over a real socket: what a new user sees first must work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tally::api::AppState;
use tally::clock::{Clock, SystemClock};
use tally_ingest::Store;

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn demo_scenario_runs_end_to_end_over_http(pool: PgPool) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = Arc::new(Store::open(pool.clone(), clock.now()).await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tally::server::run(
        listener,
        AppState {
            store,
            clock: Arc::clone(&clock),
        },
        Duration::from_secs(60),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let report = tally::demo::run_scenario(&format!("http://{addr}"), clock.now())
        .await
        .unwrap();
    for expected in [
        "returned the same lot: true",
        "applied 0 and absorbed 5 duplicates",
        "key_frontend  managed",
        "key_backend   byok",
        "key_batch     attached",
        "managed traffic DENIED (403 credits_exhausted); BYOK traffic allowed",
        "A $50.00 purchase pays the debt first: the new lot has $46.1250 left",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    // The books balance after the whole scenario.
    let unbalanced: i64 =
        sqlx::query_scalar("select count(*) from (select 1 from ledger_entry group by event_seq having sum(amount_usd) <> 0) x")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unbalanced, 0);
}
