//! The ledger role's HTTP API against a real PostgreSQL (one fresh database per test).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::http::StatusCode;
use chrono::Duration;
use common::{Harness, dec, dump_projections, t0, usage};
use serde_json::{Value, json};
use sqlx::PgPool;

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn purchase_is_idempotent_by_key(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    let body = json!({"amount_usd": "25.00"});
    let hdr = [("idempotency-key", "order-1")];
    let (s1, b1) = h
        .request("POST", "/v1/accounts/acme/purchases", Some(&body), &hdr)
        .await;
    let (s2, b2) = h
        .request("POST", "/v1/accounts/acme/purchases", Some(&body), &hdr)
        .await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(b1, b2, "a retry returns the stored response");
    let (s3, b3) = h
        .request(
            "POST",
            "/v1/accounts/acme/purchases",
            Some(&json!({"amount_usd": "30.00"})),
            &hdr,
        )
        .await;
    assert_eq!(s3, StatusCode::CONFLICT, "{b3}");
    assert_eq!(b3["error"]["code"], "idempotency_key_reused");
    let bal = h.balance("acme").await;
    assert_eq!(dec(&bal["balance_usd"]), "25".parse().unwrap());
    assert_eq!(bal["lots"].as_array().unwrap().len(), 1);
    // The same key on another account is another command.
    h.open_account("other").await;
    let (s4, _) = h
        .request("POST", "/v1/accounts/other/purchases", Some(&body), &hdr)
        .await;
    assert_eq!(s4, StatusCode::CREATED);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn purchased_lot_expires_365_days_later_and_burns_after_grants(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    let p = h.buy("acme", "10.00").await;
    assert_eq!(
        p["lot"]["expires_at"],
        json!((t0() + Duration::days(365)).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    );
    let (s, g) = h
        .post("/v1/accounts/acme/grants", &json!({"amount_usd": "1.00", "expires_at": t0() + Duration::days(10), "reason": "promo"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{g}");
    // 1M input tokens of gpt-4o = $2.50 upstream + 5% fee = $2.625: the grant ($1) goes first.
    let e = usage(
        "acme",
        1,
        t0() + Duration::minutes(1),
        "k1",
        "managed",
        "openai:gpt-4o",
        1_000_000,
        0,
    );
    let (s, b) = h.post_events(&[e]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let bal = h.balance("acme").await;
    assert_eq!(dec(&bal["remaining_usd"]), "8.375".parse().unwrap());
    let lots = bal["lots"].as_array().unwrap();
    assert_eq!(lots.len(), 1, "the grant is used up: {bal}");
    assert_eq!(lots[0]["source"], "purchase");
    assert_eq!(dec(&bal["totals"]["charged_fee"]), "0.125".parse().unwrap());
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn bad_input_is_refused_with_a_code_and_changes_nothing(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    let before = h.event_count().await;
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "POST",
            "/v1/accounts/acme/purchases",
            json!({"amount_usd": "0"}),
            "amount_not_positive",
        ),
        (
            "POST",
            "/v1/accounts/acme/purchases",
            json!({"amount_usd": "-10.00"}),
            "amount_not_positive",
        ),
        (
            "POST",
            "/v1/accounts/acme/purchases",
            json!({"amount_usd": "4.99"}),
            "purchase_below_minimum",
        ),
        (
            "POST",
            "/v1/accounts/acme/purchases",
            json!({"amount_usd": "10.001"}),
            "amount_too_precise",
        ),
        (
            "POST",
            "/v1/accounts/acme/purchases",
            json!({"amount_usd": "99999999999999999999999"}),
            "amount_too_large",
        ),
        (
            "POST",
            "/v1/accounts/acme/purchases",
            json!({"amount_usd": 10.5}),
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts/acme/purchases",
            json!({"amount_usd": "1e3"}),
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts/acme/purchases",
            json!({"amount_usd": "10.00", "tip": 1}),
            "invalid_request",
        ),
        (
            "POST",
            "/v1/accounts/nobody/purchases",
            json!({"amount_usd": "10.00"}),
            "account_not_found",
        ),
        (
            "POST",
            "/v1/accounts/acme/grants",
            json!({"amount_usd": "5.00", "expires_at": t0() - Duration::days(1)}),
            "invalid_expiry",
        ),
        (
            "POST",
            "/v1/accounts",
            json!({"account_id": "acme", "name": "again"}),
            "account_exists",
        ),
        (
            "POST",
            "/v1/accounts",
            json!({"account_id": "has space", "name": "x"}),
            "invalid_request",
        ),
    ];
    for (method, path, body, code) in cases {
        let (s, b) = h.request(method, path, Some(&body), &[]).await;
        assert!(s.is_client_error(), "{path} {body} -> {s} {b}");
        assert_eq!(b["error"]["code"], code, "{path} {body} -> {b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Malformed JSON and a missing content type.
    let req = axum::http::Request::post("/v1/accounts/acme/purchases")
        .header("content-type", "application/json")
        .body(axum::body::Body::from("{\"amount_usd\": "))
        .unwrap();
    let (s, b) = h.raw(req).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let req = axum::http::Request::post("/v1/accounts/acme/purchases")
        .body(axum::body::Body::from("{}"))
        .unwrap();
    let (s, b) = h.raw(req).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("unsupported_media_type")
        )
    );

    // A batch with one bad event applies none of them.
    let good = usage("acme", 1, t0(), "k1", "byok", "openai:gpt-4o", 10, 10);
    let mut bad = usage("acme", 2, t0(), "k1", "byok", "openai:gpt-4o", 10, 10);
    bad["tokens"]["input"] = json!(-5);
    let (s, b) = h.post_events(&[good.clone(), bad]).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "{b}"
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("events[1]"),
        "{b}"
    );
    let mut stranger = usage("acme", 3, t0(), "k1", "byok", "openai:gpt-4o", 10, 10);
    stranger["account_id"] = json!("ghost");
    let (s, b) = h.post_events(&[good.clone(), stranger]).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("account_not_found")),
        "{b}"
    );
    let mut extra = good.clone();
    extra["prompt"] = json!("secret text");
    let (s, b) = h.post_events(&[extra]).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "{b}"
    );

    // Usage queries: inverted range, unaligned range, unknown dimension.
    for q in [
        "from=2026-11-02T10:00:00Z&to=2026-11-02T09:00:00Z",
        "from=2026-11-02T09:30:00Z&to=2026-11-02T10:00:00Z",
        "from=2026-11-02T09:00:00Z&to=2026-11-02T10:00:00Z&group_by=colour",
        "from=2026-11-02T09:00:00Z&to=2026-11-02T10:00:00Z&granularity=week",
        "from=2026-11-02T09:00:00Z&to=2026-11-02T10:00:00Z&bogus=1",
    ] {
        let (s, b) = h.get(&format!("/v1/usage?account_id=acme&{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {b}");
    }
    assert_eq!(h.event_count().await, before, "nothing was applied");
    let bal = h.balance("acme").await;
    assert_eq!(dec(&bal["balance_usd"]), rust_decimal::Decimal::ZERO);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn duplicates_are_absorbed_and_conflicts_recorded_not_applied(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    h.buy("acme", "10.00").await;
    let e = usage(
        "acme",
        1,
        t0() + Duration::minutes(1),
        "k1",
        "managed",
        "openai:gpt-4o",
        100_000,
        10_000,
    );
    let (_, first) = h.post_events(&[e.clone(), e.clone()]).await;
    assert_eq!(first["applied"], 1);
    assert_eq!(first["duplicates"].as_array().unwrap().len(), 1);
    let (_, again) = h.post_events(std::slice::from_ref(&e)).await;
    assert_eq!(
        (
            again["applied"].as_u64(),
            again["duplicates"].as_array().unwrap().len()
        ),
        (Some(0), 1)
    );
    let after_first = h.balance("acme").await["balance_usd"].clone();

    let mut changed = e.clone();
    changed["tokens"]["output"] = json!(99_999);
    let (s, b) = h.post_events(&[changed]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["conflicts"].as_array().unwrap().len(), 1);
    assert_eq!(
        h.balance("acme").await["balance_usd"],
        after_first,
        "a conflict is not applied"
    );
    let (_, c) = h.get("/v1/events/conflicts").await;
    let rows = c["conflicts"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["event_id"], e["event_id"]);
    assert_eq!(rows[0]["offered_payload"]["tokens"]["output"], 99_999);
    assert_eq!(rows[0]["existing_payload"]["tokens"]["output"], 10_000);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn byok_is_attributed_not_charged_and_never_denied(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    h.buy("acme", "5.00").await;
    let at = t0() + Duration::minutes(5);
    let events = vec![
        usage(
            "acme",
            1,
            at,
            "team-a",
            "byok",
            "anthropic:claude-sonnet-4-5",
            1_000_000,
            0,
        ),
        usage(
            "acme",
            2,
            at,
            "team-b",
            "attached",
            "openai:gpt-4o",
            1_000_000,
            0,
        ),
        usage(
            "acme",
            3,
            at,
            "team-c",
            "managed",
            "openai:gpt-4o",
            1_000_000,
            0,
        ),
        usage(
            "acme",
            4,
            at,
            "team-c",
            "managed",
            "openai:gpt-4o",
            1_000_000,
            0,
        ),
    ];
    let (s, b) = h.post_events(&events).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let bal = h.balance("acme").await;
    // Two managed requests of $2.625 against $5.00: $0.25 of debt.
    assert_eq!(dec(&bal["debt_usd"]), "0.25".parse().unwrap());
    assert_eq!(
        dec(&bal["totals"]["byok_attributed"]),
        "5.5".parse().unwrap()
    );
    let (_, d) = h.get("/v1/enforcement/acme").await;
    assert_eq!(
        (d["allow_managed"].as_bool(), d["allow_byok"].as_bool()),
        (Some(false), Some(true))
    );
    assert_eq!(d["reason"], "credits_exhausted");

    let (_, u) = h.get("/v1/usage?account_id=acme&from=2026-11-02T00:00:00Z&to=2026-11-03T00:00:00Z&group_by=credential_kind").await;
    let rows = u["rows"].as_array().unwrap();
    let by_kind = |k: &str| {
        rows.iter()
            .find(|r| r["credential_kind"] == k)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        dec(&by_kind("byok")["charged_usd"]),
        rust_decimal::Decimal::ZERO
    );
    assert_eq!(
        dec(&by_kind("byok")["attributed_usd"]),
        "3".parse().unwrap()
    );
    assert_eq!(
        dec(&by_kind("attached")["attributed_usd"]),
        "2.5".parse().unwrap()
    );
    assert_eq!(
        dec(&by_kind("managed")["charged_usd"]),
        "5.25".parse().unwrap()
    );
    assert_eq!(by_kind("managed")["requests"], 2);

    // The next purchase pays the debt first.
    let p = h.buy("acme", "10.00").await;
    assert_eq!(dec(&p["lot"]["remaining_usd"]), "9.75".parse().unwrap());
    assert_eq!(dec(&p["debt_usd"]), rust_decimal::Decimal::ZERO);
    let (_, d) = h.get("/v1/enforcement/acme").await;
    assert_eq!(d["allow_managed"], true);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn usage_groups_by_any_dimension_and_period(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    let day1 = t0();
    let day2 = t0() + Duration::days(1);
    let events = vec![
        usage("acme", 1, day1, "k1", "byok", "openai:gpt-4o", 1000, 100),
        usage(
            "acme",
            2,
            day1 + Duration::hours(2),
            "k1",
            "byok",
            "openai:gpt-4o-mini",
            1000,
            100,
        ),
        usage("acme", 3, day2, "k2", "byok", "openai:gpt-4o", 1000, 100),
        usage("acme", 4, day2, "k2", "byok", "unknown:model-x", 1000, 100),
    ];
    h.clock.set(day2);
    let (s, b) = h.post_events(&events).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let base = "/v1/usage?account_id=acme&from=2026-11-01T00:00:00Z&to=2026-11-05T00:00:00Z";
    let (_, total) = h.get(base).await;
    assert_eq!(total["rows"][0]["requests"], 4);
    assert_eq!(
        total["rows"][0]["unpriced_requests"], 1,
        "unknown models are reported, not free: {total}"
    );
    let (_, by_day) = h
        .get(&format!("{base}&granularity=day&group_by=api_key_id"))
        .await;
    let rows = by_day["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{by_day}");
    assert_eq!(
        (rows[0]["api_key_id"].as_str(), rows[0]["requests"].as_i64()),
        (Some("k1"), Some(2))
    );
    assert_eq!(rows[0]["period_start"], "2026-11-02T00:00:00Z");
    let (_, filtered) = h
        .get(&format!("{base}&model=gpt-4o&group_by=model,provider"))
        .await;
    let rows = filtered["rows"].as_array().unwrap();
    assert_eq!(
        (rows.len(), rows[0]["requests"].as_i64()),
        (1, Some(2)),
        "{filtered}"
    );
    let (_, hourly) = h.get(&format!("{base}&granularity=hour")).await;
    assert_eq!(hourly["rows"].as_array().unwrap().len(), 3);
    let (_, empty) = h
        .get("/v1/usage?account_id=acme&from=2025-01-01T00:00:00Z&to=2025-01-02T00:00:00Z")
        .await;
    assert_eq!(empty["rows"][0]["requests"], 0);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn expiry_is_an_event_that_moves_the_remainder_to_breakage(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    h.buy("acme", "20.00").await;
    let (_, g) = h
        .post(
            "/v1/accounts/acme/grants",
            &json!({"amount_usd": "5.00", "expires_at": t0() + Duration::days(3), "priority": 1}),
        )
        .await;
    let grant_id = g["lot"]["lot_id"].clone();
    h.clock.set(t0() + Duration::hours(1));
    let e = usage(
        "acme",
        1,
        t0() + Duration::hours(1),
        "k",
        "managed",
        "openai:gpt-4o",
        400_000,
        0,
    );
    let (s, b) = h.post_events(&[e]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let bal = h.balance("acme").await;
    assert_eq!(
        dec(&bal["expiring_next_30_days_usd"]),
        "3.95".parse().unwrap()
    );

    // Not yet due: nothing expires.
    assert_eq!(
        tally_ingest::sweep::expire_due(&h.store, t0() + Duration::days(2))
            .await
            .unwrap(),
        0
    );
    // At the expiry instant a late event may still be on its way: the grace period holds it.
    assert_eq!(
        tally_ingest::sweep::expire_due(&h.store, t0() + Duration::days(3))
            .await
            .unwrap(),
        0
    );
    let after_grace =
        t0() + Duration::days(3) + Duration::seconds(tally_ingest::sweep::EXPIRY_GRACE_SECS);
    h.clock.set(after_grace);
    assert_eq!(
        tally_ingest::sweep::expire_due(&h.store, after_grace)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        tally_ingest::sweep::expire_due(&h.store, after_grace)
            .await
            .unwrap(),
        0,
        "idempotent"
    );
    let bal = h.balance("acme").await;
    assert_eq!(dec(&bal["totals"]["expired"]), "3.95".parse().unwrap());
    assert_eq!(dec(&bal["remaining_usd"]), "20".parse().unwrap());
    let (_, lots) = h.get("/v1/accounts/acme/lots").await;
    let grant = lots["lots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lot_id"] == grant_id)
        .cloned()
        .unwrap();
    assert_eq!(
        (grant["status"].as_str(), grant["closed_at"].clone()),
        (Some("expired"), json!("2026-11-05T09:00:00Z"))
    );

    // Usage that happened before the expiry but arrives after it cannot burn the expired lot.
    let late = usage(
        "acme",
        2,
        t0() + Duration::days(2),
        "k",
        "managed",
        "openai:gpt-4o",
        400_000,
        0,
    );
    let (s, b) = h.post_events(&[late]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        dec(&h.balance("acme").await["remaining_usd"]),
        "18.95".parse().unwrap()
    );

    // Voiding a lot takes what is left; voiding it again is refused.
    let lot_id = h.balance("acme").await["lots"][0]["lot_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = h
        .post(
            &format!("/v1/accounts/acme/lots/{lot_id}/void"),
            &json!({"reason": "refund"}),
        )
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("voided")),
        "{v}"
    );
    let (s, v) = h
        .post(&format!("/v1/accounts/acme/lots/{lot_id}/void"), &json!({}))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lot_closed"))
    );
    let bal = h.balance("acme").await;
    assert_eq!(dec(&bal["totals"]["voided"]), "18.95".parse().unwrap());
    assert_eq!(bal["decision"]["allow_managed"], false);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn ledger_entries_balance_and_paginate(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    h.buy("acme", "10.00").await;
    let events: Vec<Value> = (0..5)
        .map(|n| {
            usage(
                "acme",
                n,
                t0() + Duration::minutes(1),
                "k",
                "managed",
                "openai:gpt-4o",
                10_000,
                1_000,
            )
        })
        .collect();
    let (s, b) = h.post_events(&events).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let unbalanced: i64 = sqlx::query_scalar(
        "select count(*) from (select event_seq from ledger_entry group by event_seq having sum(amount_usd) <> 0) x",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(unbalanced, 0);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/accounts/acme/ledger?limit=4&after={c}"),
            None => "/v1/accounts/acme/ledger?limit=4".to_string(),
        };
        let (s, page) = h.get(&path).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        seen.extend(page["entries"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    // 2 lines for the purchase, 3 per usage event (lot burn, upstream revenue, fee).
    assert_eq!(seen.len(), 2 + 5 * 3);
    let sum: rust_decimal::Decimal = seen.iter().map(|e| dec(&e["amount_usd"])).sum();
    assert_eq!(sum, rust_decimal::Decimal::ZERO);
    assert!(
        seen.iter()
            .filter(|e| e["kind"] == "usage")
            .all(|e| e["price_version"] == "builtin-2025-01")
    );
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn rebuild_reproduces_every_projection_row_for_row(pool: PgPool) {
    let h = Harness::new(pool).await;
    for acct in ["a1", "a2"] {
        h.open_account(acct).await;
        h.buy(acct, "12.34").await;
        h.post(
            &format!("/v1/accounts/{acct}/grants"),
            &json!({"amount_usd": "3.00", "expires_at": t0() + Duration::days(2)}),
        )
        .await;
    }
    let mut events = Vec::new();
    for n in 0..60u32 {
        let acct = if n % 2 == 0 { "a1" } else { "a2" };
        let kind = ["managed", "byok", "attached"][(n % 3) as usize];
        let model = [
            "openai:gpt-4o",
            "anthropic:claude-haiku-4-5",
            "mystery:model",
        ][(n % 5 % 3) as usize];
        events.push(usage(
            acct,
            n,
            t0() + Duration::minutes(i64::from(n) * 7),
            &format!("key{}", n % 4),
            kind,
            model,
            20_000 + i64::from(n) * 1000,
            3_000,
        ));
    }
    h.clock.set(t0() + Duration::hours(8));
    for chunk in events.chunks(7) {
        let (s, b) = h.post_events(chunk).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    h.clock.set(t0() + Duration::days(3));
    tally_ingest::sweep::expire_due(&h.store, tally::clock::Clock::now(h.clock.as_ref()))
        .await
        .unwrap();
    h.buy("a1", "5.00").await;
    let live = dump_projections(&h.pool).await;
    assert!(live.len() > 100, "a real history: {} rows", live.len());
    let report = tally_ingest::rebuild::rebuild(&h.store).await.unwrap();
    assert_eq!(report.accounts, 2);
    let rebuilt = dump_projections(&h.pool).await;
    assert_eq!(live, rebuilt);
    // And twice in a row.
    tally_ingest::rebuild::rebuild(&h.store).await.unwrap();
    assert_eq!(live, dump_projections(&h.pool).await);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn new_price_versions_apply_from_their_effective_time_only(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    let (_, book) = h.get("/v1/prices").await;
    let mut v = book["versions"][0].clone();
    v["version"] = json!("2026-12");
    v["effective_from"] = json!(t0() - Duration::hours(1));
    let (s, b) = h.post("/v1/prices", &v).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "retroactive: {b}"
    );
    let from = t0() + Duration::days(1);
    v["effective_from"] = json!(from);
    v["models"]["openai:gpt-4o"]["input_per_mtok"] = json!("5");
    let (s, b) = h.post("/v1/prices", &v).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    h.clock.set(from + Duration::hours(1));
    let before = usage(
        "acme",
        1,
        from - Duration::seconds(1),
        "k",
        "byok",
        "openai:gpt-4o",
        1_000_000,
        0,
    );
    let after = usage("acme", 2, from, "k", "byok", "openai:gpt-4o", 1_000_000, 0);
    let (s, b) = h.post_events(&[before, after]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let bal = h.balance("acme").await;
    assert_eq!(
        dec(&bal["totals"]["byok_attributed"]),
        "7.5".parse().unwrap()
    );
    let (_, page) = h.get("/v1/accounts/acme/ledger").await;
    let versions: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["price_version"].as_str())
        .collect();
    assert!(
        versions.contains(&"builtin-2025-01") && versions.contains(&"2026-12"),
        "{versions:?}"
    );
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn unknown_routes_and_accounts_use_the_error_shape(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (s, b) = h.get("/v1/nothing").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    for path in [
        "/v1/accounts/ghost",
        "/v1/accounts/ghost/balance",
        "/v1/enforcement/ghost",
        "/v1/accounts/ghost/ledger",
    ] {
        let (s, b) = h.get(path).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("account_not_found")),
            "{path}"
        );
    }
    let (s, _) = h.get("/healthz").await;
    assert_eq!(s, StatusCode::OK);
    let (s, doc) = h.get("/openapi.yaml").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        doc.as_str().is_some_and(|d| d.contains("openapi:")),
        "served as written"
    );
}

/// The event log refuses every change: the ledger lines' reference to their event rests on it.
#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn the_event_log_is_append_only(pool: PgPool) {
    let h = common::Harness::new(pool.clone()).await;
    h.open_account("acme").await;
    for sql in [
        "update event set kind = kind",
        "delete from event",
        "truncate event cascade",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(h.event_count().await, 1);
}
