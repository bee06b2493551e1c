//! Checking a provider key against its provider before saving it: valid, invalid or
//! unreachable, without storing or echoing the key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use tally::clock::{Clock, SystemClock};
use tally::config::{DEFAULT_GATEWAY_LISTEN, GatewaySettings};
use tally::stack::{Stack, StackParts};
use tally_gateway_core::config::GatewayConfig;
use tally_gateway_core::mock;
use tally_gateway_core::secrets::Kek;
use tally_ingest::Store;
use tokio::net::TcpListener;

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn provider_keys_are_checked_against_the_provider(pool: PgPool) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = Arc::new(Store::open(pool.clone(), clock.now()).await.unwrap());
    let (mock_addr, mock_state) = mock::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    // A port nothing listens on: bind one, note it, let it go.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = GatewayConfig::default();
    config
        .base_url_overrides
        .insert("openai".into(), format!("http://{mock_addr}/v1"));
    config
        .base_url_overrides
        .insert("anthropic".into(), format!("http://{mock_addr}/v1"));
    config
        .base_url_overrides
        .insert("mistral".into(), format!("http://{closed}/v1"));
    let settings = GatewaySettings {
        listen: DEFAULT_GATEWAY_LISTEN.parse().unwrap(),
        config,
        kek: None,
    };
    let stack = Stack::start(StackParts {
        store,
        clock,
        ledger: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        gateway: None,
        settings,
        kek: Kek::from_bytes(&[3; 32]),
        sweep_interval: Duration::from_secs(60),
    })
    .await
    .unwrap();
    let api = format!("http://{}", stack.ledger_addr.unwrap());
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
