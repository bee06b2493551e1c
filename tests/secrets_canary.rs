//! Canary: a provider key and a gateway key, once created, never appear again — not in any
//! response, not in any log line (at TRACE, every crate), not in error messages — while
//! traffic flows, fails over and errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use sqlx::PgPool;
use tally_gateway_core::mock::MockBehavior;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn canary_keys_never_leak(pool: PgPool) {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let canary = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    let live = common::live_stack(&pool, |_, _| {}).await;
    let (mock_state, api, gw, stack) = (live.mock, live.ledger, live.gateway, live.stack);
    let http = reqwest::Client::new();
    let mut bodies: Vec<String> = Vec::new();
    async fn call(
        http: &reqwest::Client,
        req: reqwest::RequestBuilder,
        bodies: &mut Vec<String>,
    ) -> (u16, Value) {
        let _ = http;
        let r = req.send().await.unwrap();
        let s = r.status().as_u16();
        let text = r.text().await.unwrap();
        bodies.push(text.clone());
        (s, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    let (s, _) = call(
        &http,
        http.post(format!("{api}/v1/accounts"))
            .json(&json!({"account_id": "canary", "name": "Canary"})),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 201);
    // The one response allowed to carry the token is the creation; keep it out of the check.
    let created = http
        .post(format!("{api}/v1/accounts/canary/keys"))
        .json(&json!({"endpoint_id": "default"}))
        .send()
        .await
        .unwrap();
    let token = created.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    // `tly_<key_id>_<secret>`: the secret is base64url and may itself contain '_'.
    let token_secret = token.splitn(3, '_').nth(2).unwrap().to_string();
    assert!(token_secret.len() >= 32);

    // A mistyped body carrying the key: refused without echoing it.
    let (s, b) = call(
        &http,
        http.post(format!("{api}/v1/accounts/canary/provider-keys"))
            .json(
                &json!({"provider": "openai", "api_key": canary, "kind": "byok", "colour": "red"}),
            ),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = call(
        &http,
        http.post(format!("{api}/v1/accounts/canary/provider-keys"))
            .json(&json!({"provider": "openai", "api_key": 12345, "kind": canary})),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = call(
        &http,
        http.post(format!("{api}/v1/accounts/canary/provider-keys"))
            .json(&json!({"provider": "openai", "api_key": canary, "kind": "byok"})),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, _) = call(
        &http,
        http.get(format!("{api}/v1/accounts/canary/provider-keys")),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &http,
        http.get(format!("{api}/v1/accounts/canary/keys")),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 200);

    // Traffic: a failure of the canary key upstream, then success, then a streamed answer.
    mock_state.set_behavior(canary.clone(), MockBehavior::status(401));
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let (s, _) = call(
        &http,
        http.post(format!("{gw}/v1/chat/completions"))
            .bearer_auth(&token)
            .json(&body),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 502, "the only key failed");
    mock_state.remove_behavior(&canary);
    let (s, _) = call(
        &http,
        http.post(format!("{gw}/v1/chat/completions"))
            .bearer_auth(&token)
            .json(&body),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 200);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (s, _) = call(
        &http,
        http.post(format!("{gw}/v1/chat/completions"))
            .bearer_auth(&token)
            .json(&streamed),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        mock_state.calls(&canary) >= 3,
        "the canary key really was used upstream"
    );
    // A forged secret for the real key id, and a wrong endpoint.
    let key_part: Vec<&str> = token.splitn(3, '_').take(2).collect();
    let forged = format!("{}_{}", key_part.join("_"), "A".repeat(43));
    let (s, _) = call(
        &http,
        http.post(format!("{gw}/v1/chat/completions"))
            .bearer_auth(&forged)
            .json(&body),
        &mut bodies,
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = call(
        &http,
        http.post(format!("{gw}/e/other/v1/chat/completions"))
            .bearer_auth(&token)
            .json(&body),
        &mut bodies,
    )
    .await;
    assert!(s == 401 || s == 403, "{s}");
    let (s, _) = call(&http, http.get(format!("{api}/v1/usage?account_id=canary&from=2026-01-01T00:00:00Z&to=2027-01-01T00:00:00Z&group_by=credential_id")), &mut bodies).await;
    assert_eq!(s, 200);
    stack.stop().await.unwrap();

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(
        logs.len() > 1000,
        "the logs were captured: {} bytes",
        logs.len()
    );
    for (name, secret) in [
        ("provider key", canary.as_str()),
        ("gateway token secret", token_secret.as_str()),
    ] {
        assert!(!logs.contains(secret), "{name} found in the logs");
        for b in &bodies {
            assert!(!b.contains(secret), "{name} found in a response: {b}");
        }
    }
    // Nor in the database, where provider keys are sealed and tokens hashed.
    let dump: Vec<String> = sqlx::query_scalar(
        "select t::text from provider_credential t union all select t::text from gateway_api_key t union all select payload::text from event",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        dump.iter()
            .all(|r| !r.contains(&canary) && !r.contains(&token_secret))
    );
}
