//! `GET /v1/request-logs` against a real PostgreSQL: one row per attempt, managed and BYOK told
//! apart with what the ledger charged or attributed, every filter, pagination, bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use axum::http::StatusCode;
use chrono::Duration;
use common::{Harness, dec, t0, usage};
use serde_json::{Value, json};
use sqlx::PgPool;

/// acme: a managed request that failed over (429, then 200), a BYOK request, an attached-key
/// request on Anthropic, a streaming managed 500; globex: one managed request.
async fn seeded(pool: PgPool) -> Harness {
    let h = Harness::new(pool).await;
    h.open_account("acme").await;
    h.open_account("globex").await;
    h.buy("acme", "50.00").await;
    h.buy("globex", "50.00").await;
    h.clock.set(t0() + Duration::hours(2));
    let at = |m: i64| t0() + Duration::minutes(m);
    let mut failed = usage("acme", 1, at(1), "k1", "managed", "openai:gpt-4o", 0, 0);
    failed["status"] = json!(429);
    failed["request_id"] = json!("req-fo");
    let mut served = usage(
        "acme",
        2,
        at(1),
        "k1",
        "managed",
        "openai:gpt-4o",
        1_000_000,
        0,
    );
    served["attempt"] = json!(2);
    served["request_id"] = json!("req-fo");
    let byok = usage(
        "acme",
        3,
        at(2),
        "k2",
        "byok",
        "openai:gpt-4o",
        1_000_000,
        0,
    );
    let mut attached = usage(
        "acme",
        4,
        at(3),
        "k2",
        "attached",
        "anthropic:claude-haiku-4-5",
        1000,
        500,
    );
    attached["token_source"] = json!("estimate");
    let mut broken = usage(
        "acme",
        5,
        at(4),
        "k1",
        "managed",
        "openai:gpt-4o-mini",
        10,
        0,
    );
    broken["status"] = json!(500);
    broken["streaming"] = json!(true);
    let other = usage("globex", 6, at(5), "g1", "managed", "openai:gpt-4o", 100, 0);
    let (s, b) = h
        .post_events(&[failed, served, byok, attached, broken, other])
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    h
}

async fn page(h: &Harness, query: &str) -> Value {
    let (s, b) = h.get(&format!("/v1/request-logs?{query}")).await;
    assert_eq!(s, StatusCode::OK, "{query}: {b}");
    b
}

/// `request_id/attempt` of every row, in order.
fn ids(b: &Value) -> Vec<String> {
    b["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}/{}", r["request_id"].as_str().unwrap(), r["attempt"]))
        .collect()
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn rows_are_attempts_newest_first_and_tell_byok_from_managed(pool: PgPool) {
    let h = seeded(pool).await;
    let b = page(&h, "account_id=acme").await;
    assert_eq!(
        ids(&b),
        ["req-5/1", "req-4/1", "req-3/1", "req-fo/2", "req-fo/1"],
        "newest first; attempts of one instant in log order, latest first"
    );
    assert_eq!(b["next_cursor"], Value::Null);
    let rows = b["rows"].as_array().unwrap();

    let managed = &rows[3];
    assert_eq!(managed["credential_kind"], "managed");
    assert_eq!(managed["paid_by"], "credits");
    assert_eq!(managed["credential_id"], "managed-openai");
    assert_eq!(managed["api_key_id"], "k1");
    assert_eq!(managed["status"], 200);
    assert_eq!(managed["success"], true);
    // 1M input tokens of gpt-4o: $2.50 upstream + 5% fee, charged to credits.
    assert_eq!(dec(&managed["upstream_cost_usd"]), "2.5".parse().unwrap());
    assert_eq!(dec(&managed["fee_usd"]), "0.125".parse().unwrap());
    assert_eq!(dec(&managed["charged_usd"]), "2.625".parse().unwrap());
    assert_eq!(dec(&managed["attributed_usd"]), "0".parse().unwrap());
    assert_eq!(managed["price_version"], "builtin-2025-01");
    assert_eq!(managed["tokens"]["input"], 1_000_000);
    assert_eq!(
        (
            &managed["upstream_latency_ms"],
            &managed["total_latency_ms"],
            &managed["overhead_ms"]
        ),
        (&json!(300), &json!(310), &json!(10))
    );

    let byok = &rows[2];
    assert_eq!(byok["credential_kind"], "byok");
    assert_eq!(byok["paid_by"], "customer_provider_account");
    // The same tokens: the upstream cost is attributed to the customer's key, never charged.
    assert_eq!(dec(&byok["upstream_cost_usd"]), "2.5".parse().unwrap());
    assert_eq!(dec(&byok["charged_usd"]), "0".parse().unwrap());
    assert_eq!(dec(&byok["fee_usd"]), "0".parse().unwrap());
    assert_eq!(dec(&byok["attributed_usd"]), "2.5".parse().unwrap());

    let attached = &rows[1];
    assert_eq!(attached["credential_kind"], "attached");
    assert_eq!(attached["paid_by"], "customer_provider_account");
    assert_eq!(attached["token_source"], "estimate");
    assert_eq!(dec(&attached["charged_usd"]), "0".parse().unwrap());
    assert!(dec(&attached["attributed_usd"]) > "0".parse().unwrap());

    let failed = &rows[4];
    assert_eq!(
        (&failed["status"], &failed["success"]),
        (&json!(429), &json!(false))
    );
    assert_eq!(failed["price_version"], Value::Null, "nothing to price");
    assert_eq!(dec(&failed["charged_usd"]), "0".parse().unwrap());
    assert_eq!(rows[0]["streaming"], true);

    // The ledger agrees: what the rows charged is what the account burned.
    let charged: rust_decimal::Decimal = rows.iter().map(|r| dec(&r["charged_usd"])).sum();
    let bal = h.balance("acme").await;
    assert_eq!(dec(&bal["totals"]["burned"]), charged);

    // Metadata only: exactly these fields, no room for a prompt or completion.
    let keys: BTreeSet<&str> = managed
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = [
        "event_id",
        "event_seq",
        "occurred_at",
        "recorded_at",
        "request_id",
        "attempt",
        "account_id",
        "endpoint_id",
        "api_key_id",
        "provider",
        "model",
        "credential_kind",
        "credential_id",
        "paid_by",
        "status",
        "success",
        "streaming",
        "tokens",
        "token_source",
        "upstream_latency_ms",
        "total_latency_ms",
        "overhead_ms",
        "price_version",
        "upstream_cost_usd",
        "fee_usd",
        "charged_usd",
        "attributed_usd",
    ]
    .into();
    assert_eq!(keys, expected);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn every_filter_narrows_the_rows(pool: PgPool) {
    let h = seeded(pool).await;
    let all = page(&h, "").await;
    assert_eq!(ids(&all).len(), 6, "without account_id: every account");
    assert_eq!(ids(&page(&h, "account_id=globex").await), ["req-6/1"]);
    for (query, expected) in [
        ("account_id=acme&api_key_id=k2", vec!["req-4/1", "req-3/1"]),
        ("api_key_id=k1", vec!["req-5/1", "req-fo/2", "req-fo/1"]),
        ("account_id=acme&credential_kind=byok", vec!["req-3/1"]),
        ("account_id=acme&credential_kind=attached", vec!["req-4/1"]),
        (
            "account_id=acme&credential_kind=managed",
            vec!["req-5/1", "req-fo/2", "req-fo/1"],
        ),
        ("credential_id=byok-openai", vec!["req-3/1"]),
        ("account_id=acme&provider=anthropic", vec!["req-4/1"]),
        ("account_id=acme&model=gpt-4o-mini", vec!["req-5/1"]),
        ("endpoint_id=default&account_id=globex", vec!["req-6/1"]),
        ("request_id=req-fo", vec!["req-fo/2", "req-fo/1"]),
        ("account_id=acme&status=429", vec!["req-fo/1"]),
        ("account_id=acme&status=4xx", vec!["req-fo/1"]),
        ("account_id=acme&status=5xx", vec!["req-5/1"]),
        (
            "account_id=acme&status=2xx",
            vec!["req-4/1", "req-3/1", "req-fo/2"],
        ),
        ("account_id=acme&status=404", vec![]),
        ("account_id=acme&api_key_id=g1", vec![]),
    ] {
        assert_eq!(ids(&page(&h, query).await), expected, "{query}");
    }
    // [from, to) on event time; `+` of an offset must be encoded in a query string.
    let from = (t0() + Duration::minutes(2)).to_rfc3339();
    let to = (t0() + Duration::minutes(4)).to_rfc3339();
    let q = format!(
        "account_id=acme&from={}&to={}",
        from.replace('+', "%2B"),
        to.replace('+', "%2B")
    );
    assert_eq!(ids(&page(&h, &q).await), ["req-4/1", "req-3/1"]);
    let q = format!("account_id=acme&from={}", from.replace('+', "%2B"));
    assert_eq!(ids(&page(&h, &q).await), ["req-5/1", "req-4/1", "req-3/1"]);
    let q = format!("account_id=acme&to={}", from.replace('+', "%2B"));
    assert_eq!(ids(&page(&h, &q).await), ["req-fo/2", "req-fo/1"]);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn pages_follow_the_cursor_without_gaps_or_repeats(pool: PgPool) {
    let h = seeded(pool).await;
    let whole = ids(&page(&h, "").await);
    for limit in [1, 2, 4, 5, 6, 7] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10 {
            let q = match &cursor {
                Some(c) => format!("limit={limit}&cursor={c}"),
                None => format!("limit={limit}"),
            };
            let b = page(&h, &q).await;
            let got = ids(&b);
            assert!(got.len() <= limit, "{q}: {got:?}");
            seen.extend(got);
            match b["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(seen, whole, "limit {limit}");
    }
    // Filters hold across pages.
    let first = page(&h, "account_id=acme&credential_kind=managed&limit=2").await;
    assert_eq!(ids(&first), ["req-5/1", "req-fo/2"]);
    let c = first["next_cursor"].as_str().unwrap();
    let second = page(
        &h,
        &format!("account_id=acme&credential_kind=managed&limit=2&cursor={c}"),
    )
    .await;
    assert_eq!(ids(&second), ["req-fo/1"]);
    assert_eq!(second["next_cursor"], Value::Null);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn bad_filters_are_refused_in_the_error_shape(pool: PgPool) {
    let h = seeded(pool).await;
    for (query, mentions) in [
        ("credential_kind=platform", "credential_kind"),
        ("status=7xx", "status"),
        ("status=abc", "status"),
        ("status=99", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("cursor=nonsense", "cursor"),
        ("cursor=1.x", "cursor"),
        ("from=yesterday", "from"),
        ("from=2026-11-02T10:00:00Z&to=2026-11-02T09:00:00Z", "from"),
        ("provider=open%20ai", "provider"),
        ("account_id=a%20b", "account_id"),
        ("colour=blue", "colour"),
    ] {
        let (s, b) = h.get(&format!("/v1/request-logs?{query}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {b}");
        assert_eq!(b["error"]["code"], "invalid_query", "{query}: {b}");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{query}: {message}");
    }
    let (s, b) = h.get("/v1/request-logs?account_id=nobody").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["error"]["code"], "account_not_found");
}
