//! Alerts against a real PostgreSQL and a real webhook receiver (axum on 127.0.0.1:0) that
//! refuses the first deliveries: crossings alerted once, signed, retried with backoff until
//! delivered, deduplicated by id; lot expiry alerted once per lot, ahead of time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{Duration, Utc};
use common::{Harness, t0, usage};
use serde_json::{Value, json};
use sqlx::PgPool;
use tally::alerts::{
    ALERT_ID_HEADER, AlertEngine, AlertKind, AlertSettings, SIGNATURE_HEADER, Webhook,
    verify_signature,
};
use tally::clock::Clock;

const SECRET: &str = "whsec-test-0123456789abcdef";

#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    /// The signature's timestamp, when it verified.
    signed_at: Option<i64>,
    body: Value,
}

/// A webhook receiver that answers 500 to its first `fail_first` calls, then 200.
#[derive(Debug, Default)]
struct Receiver {
    fail_first: usize,
    calls: AtomicUsize,
    every: Mutex<Vec<Delivery>>,
    accepted: Mutex<Vec<Delivery>>,
}

impl Receiver {
    fn every(&self) -> Vec<Delivery> {
        self.every.lock().unwrap().clone()
    }

    /// What a receiver keeps after deduplicating by alert id.
    fn deduped(&self) -> BTreeMap<String, Value> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|d| (d.id.clone(), d.body.clone()))
            .collect()
    }
}

async fn hook(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let n = r.calls.fetch_add(1, Ordering::SeqCst);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let d = Delivery {
        id: header(ALERT_ID_HEADER),
        signed_at: verify_signature(SECRET.as_bytes(), &header(SIGNATURE_HEADER), &body),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    r.every.lock().unwrap().push(d.clone());
    if n < r.fail_first {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    r.accepted.lock().unwrap().push(d);
    StatusCode::OK
}

async fn receiver(fail_first: usize) -> (Arc<Receiver>, Webhook) {
    let r = Arc::new(Receiver {
        fail_first,
        ..Receiver::default()
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Arc::clone(&r));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let webhook = Webhook {
        url: format!("http://{addr}/hook").parse().unwrap(),
        secret: SECRET.to_string().into(),
    };
    (r, webhook)
}

fn settings(webhook: Option<Webhook>) -> AlertSettings {
    AlertSettings {
        webhook,
        retry_min_delay: StdDuration::from_secs(1),
        retry_max_delay: StdDuration::from_secs(8),
        ..AlertSettings::default()
    }
}

async fn open_account(h: &Harness, id: &str, threshold: &str) {
    let (s, b) = h
        .post(
            "/v1/accounts",
            &json!({"account_id": id, "name": id, "low_balance_threshold_usd": threshold}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

/// Managed gpt-4o usage of `millions` of input tokens: $2.625 per million with the fee.
async fn spend(h: &Harness, account: &str, n: u32, millions: i64) {
    let e = usage(
        account,
        n,
        h.clock.now(),
        "k1",
        "managed",
        "openai:gpt-4o",
        millions * 1_000_000,
        0,
    );
    let (s, b) = h.post_events(&[e]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

fn kinds(raised: &[tally::alerts::RaisedAlert]) -> Vec<AlertKind> {
    raised.iter().map(|a| a.kind).collect()
}

async fn alert_rows(pool: &PgPool) -> Vec<(uuid::Uuid, String, i32, bool, Option<String>)> {
    sqlx::query_as(
        "select alert_id, kind, attempts, delivered_at is not null, last_error
         from alert order by created_at, alert_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn crossings_alert_once_are_signed_retried_and_deduplicated(pool: PgPool) {
    let h = Harness::new(pool.clone()).await;
    let (rx, webhook) = receiver(2).await;
    let engine = AlertEngine::new(pool.clone(), h.clock.clone(), settings(Some(webhook))).unwrap();
    open_account(&h, "acme", "5.00").await;
    // Never funded: an empty new account has nothing to run out of.
    assert_eq!(kinds(&engine.evaluate().await.unwrap()), []);
    h.buy("acme", "10.00").await;
    assert_eq!(kinds(&engine.evaluate().await.unwrap()), []);

    // $10.00 - $5.25 = $4.75: at or below the $5.00 threshold.
    h.clock.advance(Duration::minutes(1));
    spend(&h, "acme", 1, 2).await;
    let low = engine.evaluate().await.unwrap();
    assert_eq!(kinds(&low), [AlertKind::LowBalance]);
    assert_eq!(
        kinds(&engine.evaluate().await.unwrap()),
        [],
        "once per crossing"
    );

    // Another $5.25: nothing left, $0.50 of debt.
    h.clock.advance(Duration::minutes(1));
    spend(&h, "acme", 2, 2).await;
    let exhausted = engine.evaluate().await.unwrap();
    assert_eq!(kinds(&exhausted), [AlertKind::CreditsExhausted]);
    // Still exhausted and low after more activity: nothing new.
    let byok = usage(
        "acme",
        3,
        h.clock.now(),
        "k1",
        "byok",
        "openai:gpt-4o",
        10,
        0,
    );
    assert_eq!(h.post_events(&[byok]).await.0, StatusCode::OK);
    assert_eq!(kinds(&engine.evaluate().await.unwrap()), []);

    // A top-up back above the threshold re-arms both; falling again alerts again.
    h.clock.advance(Duration::minutes(1));
    h.buy("acme", "20.00").await;
    assert_eq!(kinds(&engine.evaluate().await.unwrap()), []);
    h.clock.advance(Duration::minutes(1));
    spend(&h, "acme", 4, 6).await;
    let low_again = engine.evaluate().await.unwrap();
    assert_eq!(kinds(&low_again), [AlertKind::LowBalance]);
    assert_ne!(
        low[0].alert_id, low_again[0].alert_id,
        "a new crossing, a new id"
    );

    // A second instance evaluating the same ledger records nothing more.
    let other = AlertEngine::new(pool.clone(), h.clock.clone(), settings(None)).unwrap();
    assert_eq!(kinds(&other.evaluate().await.unwrap()), []);
    let ids: BTreeSet<String> = [&low[0], &exhausted[0], &low_again[0]]
        .iter()
        .map(|a| a.alert_id.to_string())
        .collect();
    assert_eq!(alert_rows(&pool).await.len(), 3);

    // Delivery: the receiver refuses the first two posts.
    let first = engine.deliver_due().await.unwrap();
    assert_eq!((first.delivered, first.failed), (1, 2));
    let retry = engine.deliver_due().await.unwrap();
    assert_eq!(
        (retry.delivered, retry.failed),
        (0, 0),
        "the failed ones wait for their backoff"
    );
    let failed: Vec<_> = alert_rows(&pool)
        .await
        .into_iter()
        .filter(|r| !r.3)
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|r| r.2 == 1 && r.4.as_deref() == Some("HTTP 500")),
        "{failed:?}"
    );
    h.clock.advance(Duration::seconds(30));
    let second = engine.deliver_due().await.unwrap();
    assert_eq!((second.delivered, second.failed), (2, 0));
    let rows = alert_rows(&pool).await;
    assert!(rows.iter().all(|r| r.3 && r.4.is_none()), "{rows:?}");
    assert_eq!(rows.iter().map(|r| r.2).sum::<i32>(), 5, "3 + 2 retries");

    // A delivery whose success was not recorded (a crash after the post) is sent again, with
    // the same id and body.
    let again = low[0].alert_id;
    sqlx::query("update alert set delivered_at = null, next_attempt_at = $2 where alert_id = $1")
        .bind(again)
        .bind(h.clock.now())
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(engine.deliver_due().await.unwrap().delivered, 1);

    let every = rx.every();
    assert_eq!(every.len(), 6);
    for d in &every {
        // Signed, at the delivering instance's clock.
        let signed_at = d
            .signed_at
            .unwrap_or_else(|| panic!("bad signature: {d:?}"));
        assert!(
            (t0().timestamp()..=h.clock.now().timestamp()).contains(&signed_at),
            "{d:?}"
        );
        assert_eq!(
            d.body["id"],
            json!(d.id),
            "header and body carry the same id"
        );
        assert_eq!(d.body["account_id"], "acme");
    }
    let sent_again: Vec<_> = every.iter().filter(|d| d.id == again.to_string()).collect();
    assert!(sent_again.len() >= 2);
    assert!(sent_again.iter().all(|d| d.body == sent_again[0].body));

    // Deduplicated by id: exactly one logical alert per crossing.
    let kept = rx.deduped();
    assert_eq!(kept.keys().cloned().collect::<BTreeSet<_>>(), ids);
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for body in kept.values() {
        *by_type
            .entry(body["type"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        by_type,
        BTreeMap::from([
            ("credits_exhausted".to_string(), 1),
            ("low_balance".to_string(), 2)
        ])
    );
    let exhausted_body = &kept[&exhausted[0].alert_id.to_string()];
    assert_eq!(exhausted_body["data"]["reason"], "credits_exhausted");
    assert_eq!(exhausted_body["data"]["allow_managed"], false);
    assert_eq!(exhausted_body["data"]["debt_usd"], "0.500000000");
    let low_body = &kept[&low[0].alert_id.to_string()];
    assert_eq!(low_body["data"]["available_usd"], "4.750000000");
    assert_eq!(low_body["data"]["low_balance_threshold_usd"], "5.000000000");

    // The outbox through the API.
    let (s, b) = h.get("/v1/alerts?account_id=acme").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let listed = b["alerts"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|a| !a["delivered_at"].is_null()));
    assert_eq!(h.get("/v1/alerts?limit=0").await.0, StatusCode::BAD_REQUEST);
    let (s, b) = h.get("/v1/alerts?account_id=nobody").await;
    assert_eq!(
        (s, &b["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("account_not_found"))
    );
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn lots_are_alerted_once_within_the_lead_time(pool: PgPool) {
    let h = Harness::new(pool.clone()).await;
    open_account(&h, "acme", "2.00").await;
    h.buy("acme", "10.00").await;
    let grant = |amount: &str, days: i64, priority: i32| json!({"amount_usd": amount, "expires_at": t0() + Duration::days(days), "priority": priority});
    let mut lots = Vec::new();
    for (amount, days, priority) in [("10.00", 10, 50), ("10.00", 30, 50), ("1.05", 5, 0)] {
        let (s, b) = h
            .post("/v1/accounts/acme/grants", &grant(amount, days, priority))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        lots.push(b["lot"]["lot_id"].as_str().unwrap().to_string());
    }
    // The $1.05 grant burns first and is used up ($1.00 upstream + 5%): nothing of it can expire.
    let e = usage(
        "acme",
        1,
        t0(),
        "k1",
        "managed",
        "openai:gpt-4o",
        400_000,
        0,
    );
    assert_eq!(h.post_events(&[e]).await.0, StatusCode::OK);

    // No webhook: alerts are recorded (and logged), not delivered.
    let engine = AlertEngine::new(pool.clone(), h.clock.clone(), settings(None)).unwrap();
    assert_eq!(kinds(&engine.evaluate().await.unwrap()), [], "10 days out");

    h.clock.advance(Duration::days(4));
    let raised = engine.evaluate().await.unwrap();
    assert_eq!(kinds(&raised), [AlertKind::LotExpiring]);
    assert_eq!(raised[0].lot_id.unwrap().to_string(), lots[0]);
    assert_eq!(kinds(&engine.evaluate().await.unwrap()), [], "once per lot");
    let other = AlertEngine::new(pool.clone(), h.clock.clone(), settings(None)).unwrap();
    assert_eq!(
        kinds(&other.evaluate().await.unwrap()),
        [],
        "once across instances"
    );

    // Past the first lot's expiry it is not alerted again; the second comes within the lead.
    h.clock.advance(Duration::days(20));
    let raised = engine.evaluate().await.unwrap();
    assert_eq!(kinds(&raised), [AlertKind::LotExpiring]);
    assert_eq!(raised[0].lot_id.unwrap().to_string(), lots[1]);

    let (s, b) = h.get("/v1/alerts?account_id=acme").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let listed = b["alerts"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let first = &listed[1];
    assert_eq!(first["kind"], "lot_expiring");
    assert_eq!(first["payload"]["type"], "lot_expiring");
    assert_eq!(first["payload"]["id"], first["alert_id"]);
    assert_eq!(first["payload"]["data"]["lot_id"], json!(lots[0]));
    assert_eq!(first["payload"]["data"]["remaining_usd"], "10.000000000");
    assert_eq!(
        first["payload"]["data"]["expires_at"],
        json!(t0() + Duration::days(10))
    );
    assert_eq!(
        (&first["attempts"], &first["delivered_at"]),
        (&json!(0), &Value::Null)
    );
    assert_eq!(engine.deliver_due().await.unwrap().delivered, 0);
}

/// The loops as `tally serve` runs them (`Stack::start_alerts`), in real time: backoff delays
/// of 100 ms to 400 ms, so the refused deliveries are retried within a second or so.
#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn the_running_loops_retry_with_backoff_until_delivered(pool: PgPool) {
    let mut live = common::live_stack(&pool, |_, _| {}).await;
    let (rx, webhook) = receiver(2).await;
    let settings = AlertSettings {
        webhook: Some(webhook),
        retry_min_delay: StdDuration::from_millis(100),
        retry_max_delay: StdDuration::from_millis(400),
        poll_interval: StdDuration::from_millis(50),
        ..AlertSettings::default()
    };
    live.stack
        .start_alerts(pool.clone(), Arc::clone(&live.clock), settings)
        .unwrap();

    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        let req = http.post(format!("{}{path}", live.ledger)).json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        }
    };
    post(
        "/v1/accounts",
        json!({"account_id": "acme", "name": "Acme", "low_balance_threshold_usd": "5.00"}),
    )
    .await;
    post(
        "/v1/accounts/acme/purchases",
        json!({"amount_usd": "10.00"}),
    )
    .await;
    let e = usage(
        "acme",
        1,
        Utc::now(),
        "k1",
        "managed",
        "openai:gpt-4o",
        2_000_000,
        0,
    );
    post("/v1/events", json!({"events": [e]})).await;

    let deadline = std::time::Instant::now() + StdDuration::from_secs(20);
    while rx.deduped().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "not delivered in time: {:?}",
            rx.every()
        );
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    let every = rx.every();
    assert_eq!(every.len(), 3, "two refusals, then the delivery: {every:?}");
    assert!(
        every
            .iter()
            .all(|d| d.signed_at.is_some() && d.id == every[0].id)
    );
    assert_eq!(every[0].body["type"], "low_balance");
    // The delivery is recorded shortly after the receiver accepted it.
    let deadline = std::time::Instant::now() + StdDuration::from_secs(5);
    loop {
        let rows = alert_rows(&pool).await;
        if rows.len() == 1 && rows[0].3 {
            assert_eq!(rows[0].2, 3);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    // The loops stop with the stack.
    live.stack.stop().await.unwrap();
}
