//! Finance exports against a real PostgreSQL, through the HTTP API and `tally export`: an
//! account's statements over three months (purchases, grants, managed and BYOK usage, an
//! expiry, a void, debt, a late event) and the platform report, with exact figures in JSON and
//! CSV; bad input gets the API's error shape and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use chrono::{DateTime, TimeZone, Utc};
use clap::Parser;
use common::{Harness, dump_projections, usage};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;

fn at(month: u32, day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, month, day, hour, 0, 0).unwrap()
}

/// `"18.95"` as the API writes money: nine decimals.
fn usd(s: &str) -> String {
    let mut d: rust_decimal::Decimal = s.parse().unwrap();
    d.rescale(9);
    d.to_string()
}

async fn get_raw(h: &Harness, path: &str) -> (StatusCode, HeaderMap, Vec<u8>) {
    let req = Request::builder().uri(path).body(Body::empty()).unwrap();
    let resp = h.app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status, parts.headers, bytes)
}

async fn get_json(h: &Harness, path: &str) -> Value {
    let (status, headers, body) = get_raw(h, path).await;
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, StatusCode::OK, "{path}: {text}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    serde_json::from_slice(&body).unwrap()
}

/// Builds the history of `acme` (October to December 2026) and `beta` (November).
async fn history(h: &Harness) {
    // October: $20 bought, a $5 grant that burns first and expires, a $3 grant voided.
    h.clock.set(at(10, 1, 8));
    h.open_account("acme").await;
    h.clock.set(at(10, 2, 9));
    h.buy("acme", "20.00").await;
    h.clock.set(at(10, 3, 9));
    let (s, g1) = h
        .post(
            "/v1/accounts/acme/grants",
            &json!({"amount_usd": "5.00", "expires_at": at(10, 20, 0), "priority": 10}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{g1}");
    // 1M input tokens of gpt-4o: $2.50 upstream + 5% fee, taken from the grant.
    let october = [
        usage(
            "acme",
            1,
            at(10, 5, 12),
            "k1",
            "managed",
            "openai:gpt-4o",
            1_000_000,
            0,
        ),
        // BYOK: $3.00 attributed to the customer's own Anthropic account, not charged.
        usage(
            "acme",
            2,
            at(10, 6, 12),
            "k2",
            "byok",
            "anthropic:claude-sonnet-4-5",
            1_000_000,
            0,
        ),
    ];
    h.clock.set(at(10, 6, 13));
    let (s, b) = h.post_events(&october).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // The sweep expires what is left of the grant ($2.375) at its expiry instant.
    let expired = tally_ingest::sweep::expire_due(&h.store, at(10, 21, 0))
        .await
        .unwrap();
    assert_eq!(expired, 1);
    h.clock.set(at(10, 25, 9));
    let (s, g2) = h
        .post(
            "/v1/accounts/acme/grants",
            &json!({"amount_usd": "3.00", "expires_at": at(12, 31, 0), "priority": 10}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{g2}");
    h.clock.set(at(10, 26, 9));
    let g2_lot = g2["lot"]["lot_id"].as_str().unwrap().to_string();
    let (s, b) = h
        .post(
            &format!("/v1/accounts/acme/lots/{g2_lot}/void"),
            &json!({"reason": "refund"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // November: $26.88 of managed usage against $20 of credits: $6.88 of debt. And attached
    // (BYOK-like) usage. `beta` buys $7 and uses BYOK.
    let november = [
        // 10M input tokens of gpt-4o: $25.00 + $1.25.
        usage(
            "acme",
            3,
            at(11, 2, 12),
            "k1",
            "managed",
            "openai:gpt-4o",
            10_000_000,
            0,
        ),
        // 1M output tokens of gpt-4o-mini: $0.60 + $0.03.
        usage(
            "acme",
            4,
            at(11, 2, 13),
            "k2",
            "managed",
            "openai:gpt-4o-mini",
            0,
            1_000_000,
        ),
        // 100k output tokens of claude-sonnet-4-5 on an attached key: $1.50.
        usage(
            "acme",
            5,
            at(11, 3, 12),
            "k2",
            "attached",
            "anthropic:claude-sonnet-4-5",
            0,
            100_000,
        ),
    ];
    h.clock.set(at(11, 3, 13));
    let (s, b) = h.post_events(&november).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    h.clock.set(at(11, 15, 9));
    h.open_account("beta").await;
    h.buy("beta", "7.00").await;
    h.clock.set(at(11, 16, 13));
    let (s, b) = h
        .post_events(&[usage(
            "beta",
            1,
            at(11, 16, 12),
            "kb",
            "byok",
            "openai:gpt-4o",
            100_000,
            0,
        )])
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // December: a $10 purchase pays the $6.88 of debt first.
    h.clock.set(at(12, 1, 9));
    h.buy("acme", "10.00").await;

    // Late: managed usage of October 28 arrives now. No lot could pay for it then (the
    // purchase lot is empty, the grants are closed, December's lot did not exist): $1.05 of
    // debt, in October's statement; December's purchase has already settled what it settled.
    let (s, b) = h
        .post_events(&[usage(
            "acme",
            6,
            at(10, 28, 12),
            "k1",
            "managed",
            "openai:gpt-4o",
            400_000,
            0,
        )])
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

fn position(credits: &str, debt: &str, balance: &str) -> Value {
    json!({"credits_usd": usd(credits), "debt_usd": usd(debt), "balance_usd": usd(balance)})
}

fn figures(upstream: &str, fee: &str, charged: &str, byok: &str) -> Value {
    json!({
        "managed_upstream_cost_usd": usd(upstream),
        "managed_fee_usd": usd(fee),
        "managed_charged_usd": usd(charged),
        "byok_attributed_usd": usd(byok),
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// The statement as the API returns it, with every figure.
#[allow(clippy::too_many_arguments)]
fn statement(
    account: &str,
    period: &str,
    opening: Value,
    m: [&str; 11],
    closing: Value,
    by_key: Vec<(&str, Value)>,
    by_model: Vec<(&str, &str, Value)>,
) -> Value {
    let (start, end) = match period {
        "2026-10" => ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z"),
        "2026-11" => ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
        _ => ("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    };
    json!({
        "account_id": account,
        "period": period,
        "period_start": start,
        "period_end": end,
        "opening": opening,
        "purchases_usd": usd(m[0]),
        "grants_usd": usd(m[1]),
        "managed_upstream_cost_usd": usd(m[2]),
        "managed_fee_usd": usd(m[3]),
        "managed_charged_usd": usd(m[4]),
        "credits_burned_usd": usd(m[5]),
        "expired_usd": usd(m[6]),
        "voided_usd": usd(m[7]),
        "debt_incurred_usd": usd(m[8]),
        "debt_settled_usd": usd(m[9]),
        "byok_attributed_usd": usd(m[10]),
        "closing": closing,
        "by_api_key": by_key.into_iter().map(|(k, f)| with(json!({"api_key_id": k}), f)).collect::<Vec<_>>(),
        "by_provider_model": by_model.into_iter().map(|(p, m, f)| with(json!({"provider": p, "model": m}), f)).collect::<Vec<_>>(),
    })
}

fn expected_statements() -> Vec<Value> {
    vec![
        statement(
            "acme",
            "2026-10",
            position("0", "0", "0"),
            // purchases, grants, upstream, fee, charged, burned, expired, voided, incurred,
            // settled, byok
            [
                "20", "8", "3.5", "0.175", "3.675", "2.625", "2.375", "3", "1.05", "0", "3",
            ],
            position("20", "1.05", "18.95"),
            vec![
                ("k1", figures("3.5", "0.175", "3.675", "0")),
                ("k2", figures("0", "0", "0", "3")),
            ],
            vec![
                (
                    "anthropic",
                    "claude-sonnet-4-5",
                    figures("0", "0", "0", "3"),
                ),
                ("openai", "gpt-4o", figures("3.5", "0.175", "3.675", "0")),
            ],
        ),
        statement(
            "acme",
            "2026-11",
            position("20", "1.05", "18.95"),
            [
                "0", "0", "25.6", "1.28", "26.88", "20", "0", "0", "6.88", "0", "1.5",
            ],
            position("0", "7.93", "-7.93"),
            vec![
                ("k1", figures("25", "1.25", "26.25", "0")),
                ("k2", figures("0.6", "0.03", "0.63", "1.5")),
            ],
            vec![
                (
                    "anthropic",
                    "claude-sonnet-4-5",
                    figures("0", "0", "0", "1.5"),
                ),
                ("openai", "gpt-4o", figures("25", "1.25", "26.25", "0")),
                ("openai", "gpt-4o-mini", figures("0.6", "0.03", "0.63", "0")),
            ],
        ),
        statement(
            "acme",
            "2026-12",
            position("0", "7.93", "-7.93"),
            ["10", "0", "0", "0", "0", "0", "0", "0", "0", "6.88", "0"],
            position("3.12", "1.05", "2.07"),
            vec![],
            vec![],
        ),
    ]
}

/// Every cell of a statement CSV, by (section, item, key, provider, model).
fn csv_cells(bytes: &[u8]) -> (Vec<String>, BTreeMap<[String; 5], String>) {
    let mut r = csv::Reader::from_reader(bytes);
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    let mut cells = BTreeMap::new();
    for rec in r.records() {
        let rec = rec.unwrap();
        let key = [2, 3, 4, 5, 6].map(|i| rec[i].to_string());
        assert!(
            cells.insert(key, rec[7].to_string()).is_none(),
            "a cell twice: {rec:?}"
        );
    }
    (header, cells)
}

/// The CSV cells a JSON statement should produce.
fn cells_of(s: &Value) -> BTreeMap<[String; 5], String> {
    let mut out = BTreeMap::new();
    let mut put = |section: &str, item: &str, k: &str, p: &str, m: &str, v: &Value| {
        out.insert(
            [section, item, k, p, m].map(str::to_string),
            v.as_str().unwrap().to_string(),
        );
    };
    for side in ["opening", "closing"] {
        for item in ["credits_usd", "debt_usd", "balance_usd"] {
            put(side, item, "", "", "", &s[side][item]);
        }
    }
    for item in [
        "purchases_usd",
        "grants_usd",
        "managed_upstream_cost_usd",
        "managed_fee_usd",
        "managed_charged_usd",
        "credits_burned_usd",
        "expired_usd",
        "voided_usd",
        "debt_incurred_usd",
        "debt_settled_usd",
        "byok_attributed_usd",
    ] {
        put("movements", item, "", "", "", &s[item]);
    }
    let usage_items = [
        "managed_upstream_cost_usd",
        "managed_fee_usd",
        "managed_charged_usd",
        "byok_attributed_usd",
    ];
    for k in s["by_api_key"].as_array().unwrap() {
        for item in usage_items {
            put(
                "by_api_key",
                item,
                k["api_key_id"].as_str().unwrap(),
                "",
                "",
                &k[item],
            );
        }
    }
    for m in s["by_provider_model"].as_array().unwrap() {
        let (p, model) = (
            m["provider"].as_str().unwrap(),
            m["model"].as_str().unwrap(),
        );
        for item in usage_items {
            put("by_provider_model", item, "", p, model, &m[item]);
        }
    }
    out
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn statements_give_exact_figures_in_json_and_csv(pool: PgPool) {
    let h = Harness::new(pool).await;
    history(&h).await;
    let expected = expected_statements();
    for want in &expected {
        let period = want["period"].as_str().unwrap();
        let got = get_json(&h, &format!("/v1/accounts/acme/statements/{period}")).await;
        assert_eq!(&got, want, "statement of {period}");
        let same = get_json(
            &h,
            &format!("/v1/accounts/acme/statements/{period}?format=json"),
        )
        .await;
        assert_eq!(same, got);

        let (status, headers, body) = get_raw(
            &h,
            &format!("/v1/accounts/acme/statements/{period}?format=csv"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/csv; charset=utf-8");
        assert_eq!(
            headers[header::CONTENT_DISPOSITION],
            format!("attachment; filename=\"statement-acme-{period}.csv\"").as_str()
        );
        let (header_row, cells) = csv_cells(&body);
        assert_eq!(
            header_row,
            [
                "account_id",
                "period",
                "section",
                "item",
                "api_key_id",
                "provider",
                "model",
                "amount_usd"
            ]
        );
        assert_eq!(cells, cells_of(want), "CSV statement of {period}");
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.lines()
                .all(|l| l.starts_with(&format!("acme,{period},")) || l.starts_with("account_id,")),
            "{text}"
        );
    }
    // The months chain, and the last closing is the balance now.
    for pair in expected.windows(2) {
        assert_eq!(pair[0]["closing"], pair[1]["opening"]);
    }
    let bal = h.balance("acme").await;
    assert_eq!(bal["balance_usd"], expected[2]["closing"]["balance_usd"]);
    assert_eq!(bal["debt_usd"], expected[2]["closing"]["debt_usd"]);
    assert_eq!(bal["remaining_usd"], expected[2]["closing"]["credits_usd"]);
    // The months add up to the account's lifetime totals.
    let t = &bal["totals"];
    for (total, item) in [
        ("purchased", "purchases_usd"),
        ("granted", "grants_usd"),
        ("expired", "expired_usd"),
        ("voided", "voided_usd"),
        ("debt_incurred", "debt_incurred_usd"),
        ("debt_settled", "debt_settled_usd"),
        ("charged_upstream", "managed_upstream_cost_usd"),
        ("charged_fee", "managed_fee_usd"),
        ("byok_attributed", "byok_attributed_usd"),
    ] {
        let sum: rust_decimal::Decimal = expected.iter().map(|s| common::dec(&s[item])).sum();
        assert_eq!(common::dec(&t[total]), sum, "{total}");
    }

    // Before the account's first event, and for an account opened later: all zeros.
    let empty = get_json(&h, "/v1/accounts/acme/statements/2026-09").await;
    assert_eq!(
        empty,
        statement(
            "acme",
            "2026-09",
            position("0", "0", "0"),
            ["0"; 11],
            position("0", "0", "0"),
            vec![],
            vec![]
        )
        .as_object()
        .map(|o| {
            let mut o = o.clone();
            o["period_start"] = json!("2026-09-01T00:00:00Z");
            o["period_end"] = json!("2026-10-01T00:00:00Z");
            Value::Object(o)
        })
        .unwrap()
    );
    let beta_oct = get_json(&h, "/v1/accounts/beta/statements/2026-10").await;
    assert_eq!(beta_oct["closing"], position("0", "0", "0"));
    let beta_nov = get_json(&h, "/v1/accounts/beta/statements/2026-11").await;
    assert_eq!(beta_nov["purchases_usd"], usd("7"));
    assert_eq!(beta_nov["byok_attributed_usd"], usd("0.25"));
    assert_eq!(beta_nov["closing"], position("7", "0", "7"));
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn a_late_event_changes_the_month_it_belongs_to(pool: PgPool) {
    let h = Harness::new(pool).await;
    h.clock.set(at(10, 1, 8));
    h.open_account("acme").await;
    h.clock.set(at(10, 2, 9));
    h.buy("acme", "20.00").await;
    h.clock.set(at(11, 2, 13));
    let (s, _) = h
        .post_events(&[usage(
            "acme",
            1,
            at(11, 2, 12),
            "k1",
            "managed",
            "openai:gpt-4o",
            1_000_000,
            0,
        )])
        .await;
    assert_eq!(s, StatusCode::OK);
    let oct_before = get_json(&h, "/v1/accounts/acme/statements/2026-10").await;
    let nov_before = get_json(&h, "/v1/accounts/acme/statements/2026-11").await;
    // October 30's usage reaches the ledger in November.
    let (s, _) = h
        .post_events(&[usage(
            "acme",
            2,
            at(10, 30, 12),
            "k1",
            "managed",
            "openai:gpt-4o",
            400_000,
            0,
        )])
        .await;
    assert_eq!(s, StatusCode::OK);
    let oct = get_json(&h, "/v1/accounts/acme/statements/2026-10").await;
    let nov = get_json(&h, "/v1/accounts/acme/statements/2026-11").await;
    assert_eq!(oct_before["managed_charged_usd"], usd("0"));
    assert_eq!(oct["managed_charged_usd"], usd("1.05"));
    assert_eq!(oct["closing"], position("18.95", "0", "18.95"));
    assert_eq!(nov["opening"], oct["closing"]);
    assert_eq!(
        nov["managed_charged_usd"],
        nov_before["managed_charged_usd"]
    );
    assert_eq!(nov["closing"], position("16.325", "0", "16.325"));
}

fn platform_row(period: &str, v: [&str; 15]) -> Value {
    let (start, end) = match period {
        "2026-10" => ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z"),
        "2026-11" => ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
        _ => ("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    };
    let names = [
        "purchases_usd",
        "grants_usd",
        "revenue_upstream_cost_usd",
        "revenue_processing_fee_usd",
        "revenue_usd",
        "credits_burned_usd",
        "breakage_usd",
        "voided_usd",
        "debt_incurred_usd",
        "debt_settled_usd",
        "byok_attributed_usd",
        "opening_credit_liability_usd",
        "closing_credit_liability_usd",
        "opening_debt_usd",
        "closing_debt_usd",
    ];
    let mut row = json!({"period": period, "period_start": start, "period_end": end});
    for (n, x) in names.iter().zip(v) {
        row[*n] = json!(usd(x));
    }
    row
}

fn expected_platform() -> Vec<Value> {
    vec![
        platform_row(
            "2026-10",
            [
                "20", "8", "3.5", "0.175", "3.675", "2.625", "2.375", "3", "1.05", "0", "3", "0",
                "20", "0", "1.05",
            ],
        ),
        platform_row(
            "2026-11",
            [
                "7", "0", "25.6", "1.28", "26.88", "20", "0", "0", "6.88", "0", "1.75", "20", "7",
                "1.05", "7.93",
            ],
        ),
        platform_row(
            "2026-12",
            [
                "10", "0", "0", "0", "0", "0", "0", "0", "0", "6.88", "0", "7", "10.12", "7.93",
                "1.05",
            ],
        ),
    ]
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn platform_export_gives_revenue_breakage_and_liability_per_month(pool: PgPool) {
    let h = Harness::new(pool).await;
    history(&h).await;
    let expected = expected_platform();
    let got = get_json(&h, "/v1/exports/platform?from=2026-10&to=2026-12").await;
    assert_eq!(
        (&got["from"], &got["to"]),
        (&json!("2026-10"), &json!("2026-12"))
    );
    let periods = got["periods"].as_array().unwrap();
    assert_eq!(periods.len(), 3);
    for (p, want) in periods.iter().zip(&expected) {
        let mut p = p.clone();
        let by_model = p
            .as_object_mut()
            .unwrap()
            .remove("by_provider_model")
            .unwrap();
        assert_eq!(&p, want);
        if want["period"] == "2026-11" {
            assert_eq!(
                by_model,
                json!([
                    with(
                        json!({"provider": "anthropic", "model": "claude-sonnet-4-5"}),
                        figures("0", "0", "0", "1.5")
                    ),
                    with(
                        json!({"provider": "openai", "model": "gpt-4o"}),
                        figures("25", "1.25", "26.25", "0.25")
                    ),
                    with(
                        json!({"provider": "openai", "model": "gpt-4o-mini"}),
                        figures("0.6", "0.03", "0.63", "0")
                    ),
                ])
            );
        }
    }
    // One month alone is the same month of the range.
    let nov = get_json(&h, "/v1/exports/platform?period=2026-11").await;
    assert_eq!(nov["periods"][0], periods[1]);

    let (status, headers, body) = get_raw(
        &h,
        "/v1/exports/platform?from=2026-10&to=2026-12&format=csv",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/csv; charset=utf-8");
    assert_eq!(
        headers[header::CONTENT_DISPOSITION],
        "attachment; filename=\"platform-2026-10-2026-12.csv\""
    );
    let mut r = csv::Reader::from_reader(body.as_slice());
    let header_row: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(header_row, tally::api::exports::PLATFORM_CSV_HEADER);
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 3);
    for (row, want) in rows.iter().zip(&expected) {
        for (name, cell) in header_row.iter().zip(row.iter()) {
            assert_eq!(want[name.as_str()].as_str().unwrap(), cell, "{name}");
        }
    }
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn bad_export_requests_get_the_error_shape_and_change_nothing(pool: PgPool) {
    let h = Harness::new(pool.clone()).await;
    history(&h).await;
    let events = h.event_count().await;
    let projections = dump_projections(&pool).await;
    let cases = [
        ("/v1/accounts/acme/statements/2026-13", 400, "invalid_path"),
        ("/v1/accounts/acme/statements/2026-1", 400, "invalid_path"),
        ("/v1/accounts/acme/statements/october", 400, "invalid_path"),
        (
            "/v1/accounts/acme/statements/2026-10?format=xml",
            400,
            "invalid_query",
        ),
        (
            "/v1/accounts/acme/statements/2026-10?format=CSV",
            400,
            "invalid_query",
        ),
        (
            "/v1/accounts/acme/statements/2026-10?colour=blue",
            400,
            "invalid_query",
        ),
        (
            "/v1/accounts/nobody/statements/2026-10",
            404,
            "account_not_found",
        ),
        (
            "/v1/accounts/no%20body/statements/2026-10",
            400,
            "invalid_request",
        ),
        ("/v1/exports/platform", 400, "invalid_query"),
        (
            "/v1/exports/platform?period=2026-10&from=2026-10&to=2026-11",
            400,
            "invalid_query",
        ),
        ("/v1/exports/platform?from=2026-10", 400, "invalid_query"),
        (
            "/v1/exports/platform?from=2026-12&to=2026-10",
            400,
            "invalid_query",
        ),
        (
            "/v1/exports/platform?from=2016-10&to=2026-10",
            400,
            "invalid_query",
        ),
        ("/v1/exports/platform?period=10-2026", 400, "invalid_query"),
        (
            "/v1/exports/platform?period=2026-10&format=pdf",
            400,
            "invalid_query",
        ),
        (
            "/v1/exports/platform?period=2026-10&account_id=acme",
            400,
            "invalid_query",
        ),
    ];
    for (path, status, code) in cases {
        let (s, body) = h.get(path).await;
        assert_eq!(s.as_u16(), status, "{path}: {body}");
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert_eq!(body.as_object().unwrap().len(), 1, "{path}: {body}");
    }
    assert_eq!(h.event_count().await, events);
    assert_eq!(dump_projections(&pool).await, projections);
}

/// The URL of the test's own database, for `tally export --database-url`.
async fn database_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("select current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test server");
    let base = base.split('?').next().unwrap();
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{name}")
}

fn out_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-exports-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn cli(args: &[&str]) -> anyhow::Result<()> {
    let cli = tally::config::Cli::try_parse_from(args)?;
    tally::cli::run(cli).await
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn the_cli_writes_what_the_api_serves(pool: PgPool) {
    let h = Harness::new(pool.clone()).await;
    history(&h).await;
    let url = database_url(&pool).await;
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "statement",
                "--account",
                "acme",
                "--period",
                "2026-11",
                "--format",
                "csv",
            ],
            "/v1/accounts/acme/statements/2026-11?format=csv",
        ),
        (
            &[
                "statement",
                "--account",
                "acme",
                "--period",
                "2026-10",
                "--format",
                "json",
            ],
            "/v1/accounts/acme/statements/2026-10?format=json",
        ),
        (
            &["platform", "--period", "2026-11", "--format", "csv"],
            "/v1/exports/platform?period=2026-11&format=csv",
        ),
        (
            &["platform", "--from", "2026-10", "--to", "2026-12"],
            "/v1/exports/platform?from=2026-10&to=2026-12&format=csv",
        ),
    ];
    for (args, path) in cases {
        let file = out_file("export.out");
        let mut argv = vec!["tally", "--database-url", &url, "export"];
        argv.extend_from_slice(args);
        let file_arg = file.to_str().unwrap().to_string();
        argv.extend_from_slice(&["--output", &file_arg]);
        cli(&argv).await.unwrap();
        let written = std::fs::read(&file).unwrap();
        let (status, _, served) = get_raw(&h, path).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            String::from_utf8(written).unwrap(),
            String::from_utf8(served).unwrap(),
            "tally export {args:?}"
        );
    }
    // The expected figures, once more, from the CLI's file.
    let file = out_file("statement.csv");
    cli(&[
        "tally",
        "--database-url",
        &url,
        "export",
        "statement",
        "--account",
        "acme",
        "--period",
        "2026-12",
        "--output",
        file.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let (_, cells) = csv_cells(&std::fs::read(&file).unwrap());
    assert_eq!(cells, cells_of(&expected_statements()[2]));

    // Bad input: refused, nothing written, nothing changed.
    let events = h.event_count().await;
    let projections = dump_projections(&pool).await;
    for (args, needle) in [
        (
            vec!["statement", "--account", "nobody", "--period", "2026-10"],
            "not found",
        ),
        (
            vec!["statement", "--account", "no body", "--period", "2026-10"],
            "account",
        ),
        (
            vec!["statement", "--account", "acme", "--period", "2026-13"],
            "YYYY-MM",
        ),
        (
            vec![
                "statement",
                "--account",
                "acme",
                "--period",
                "2026-10",
                "--format",
                "xml",
            ],
            "xml",
        ),
        (
            vec!["platform", "--from", "2026-12", "--to", "2026-10"],
            "must not be after",
        ),
        (
            vec![
                "platform", "--period", "2026-10", "--from", "2026-10", "--to", "2026-11",
            ],
            "cannot be used with",
        ),
        (vec!["platform"], "required"),
    ] {
        let file = out_file("refused.csv");
        let mut argv = vec!["tally", "--database-url", &url, "export"];
        argv.extend(args.iter().copied());
        let file_arg = file.to_str().unwrap().to_string();
        argv.extend_from_slice(&["--output", &file_arg]);
        let err = cli(&argv).await.unwrap_err().to_string();
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!file.exists(), "{args:?} wrote a file");
    }
    assert_eq!(h.event_count().await, events);
    assert_eq!(dump_projections(&pool).await, projections);
}

/// `tally demo` ends by writing the demo account's statement of the month; its closing balance
/// is the account's balance.
#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn the_demo_writes_a_sample_statement(pool: PgPool) {
    let live = common::live_stack(&pool, |_, _| {}).await;
    let dir = out_file("unused").parent().unwrap().to_path_buf();
    let report = tally::demo::run_scenario_with(
        &live.ledger,
        &live.gateway,
        &live.mock,
        live.clock.now(),
        Some(&dir),
    )
    .await
    .unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = &files[0];
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with("tally-demo-statement-demo-") && name.ends_with(".csv"),
        "{name}"
    );
    assert!(
        report.contains(&format!(
            "Sample statement (CSV) written to {}",
            file.display()
        )),
        "{report}"
    );
    let (_, cells) = csv_cells(&std::fs::read(file).unwrap());
    let account = name
        .trim_start_matches("tally-demo-statement-")
        .rsplit_once('-')
        .and_then(|(rest, _)| rest.rsplit_once('-'))
        .map(|(account, _)| account.to_string())
        .unwrap();
    let bal: Value = reqwest::get(format!("{}/v1/accounts/{account}/balance", live.ledger))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let closing = |item: &str| cells[&["closing", item, "", "", ""].map(str::to_string)].clone();
    assert_eq!(closing("balance_usd"), bal["balance_usd"].as_str().unwrap());
    assert_eq!(closing("debt_usd"), bal["debt_usd"].as_str().unwrap());
    let movement = |item: &str| cells[&["movements", item, "", "", ""].map(str::to_string)].clone();
    assert_eq!(movement("purchases_usd"), usd("70"));
    assert!(common::dec(&json!(movement("byok_attributed_usd"))) > rust_decimal::Decimal::ZERO);
    live.stack.stop().await.unwrap();
}
