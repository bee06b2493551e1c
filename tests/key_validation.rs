//! Checking a provider key against its provider before saving it: valid, invalid or
//! unreachable, without storing or echoing the key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpListener;

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn provider_keys_are_checked_against_the_provider(pool: PgPool) {
    // A port nothing listens on: bind one, note it, let it go.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let live = common::live_stack(&pool, |config, _| {
        config
            .base_url_overrides
            .insert("mistral".into(), format!("http://{closed}/v1"));
    })
    .await;
    let (mock_state, api, stack) = (live.mock, live.ledger, live.stack);
    let http = reqwest::Client::new();
    http.post(format!("{api}/v1/accounts"))
        .json(&json!({"account_id": "acme", "name": "Acme"}))
        .send()
        .await
        .unwrap();
    let check = |provider: &str, key: &str| {
        let req = http
            .post(format!("{api}/v1/accounts/acme/provider-keys/validate"))
            .json(&json!({"provider": provider, "api_key": key}));
        async move {
            let r = req.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    mock_state.invalidate_key("sk-revoked-000000000000000000");
    let (s, b) = check("openai", "sk-good-0000000000000000000000").await;
    assert_eq!(
        (s, b["result"].as_str(), b["status"].as_u64()),
        (200, Some("valid"), Some(200)),
        "{b}"
    );
    let (s, b) = check("anthropic", "sk-ant-good-000000000000000000").await;
    assert_eq!((s, b["result"].as_str()), (200, Some("valid")), "{b}");
    let (s, b) = check("openai", "sk-revoked-000000000000000000").await;
    assert_eq!(
        (s, b["result"].as_str(), b["status"].as_u64()),
        (200, Some("invalid"), Some(401)),
        "{b}"
    );
    let (s, b) = check("mistral", "mistral-key-00000000000000000").await;
    assert_eq!((s, b["result"].as_str()), (200, Some("unreachable")), "{b}");
    let (s, b) = check("nonesuch", "whatever-key-000000000000000").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{b}"
    );
    assert!(!b.to_string().contains("whatever-key"), "{b}");
    // Nothing was stored.
    let stored: i64 = sqlx::query_scalar("select count(*) from provider_credential")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    assert_eq!(
        mock_state.calls("sk-good-0000000000000000000000"),
        0,
        "a models listing is not a billable call"
    );
    stack.stop().await.unwrap();
}
