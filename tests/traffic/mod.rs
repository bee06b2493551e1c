//! Traffic for the metrics and dashboards tests: managed and BYOK requests over the live stack,
//! a failover, denials, a model outside the catalog, and ledger events that are duplicates,
//! conflicts and rejections; plus credits that expire soon and a lot that already expired
//! (breakage). Every identifier a metric label must never carry is returned, for canary checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tally_gateway_core::mock::{MockBehavior, MockState};

/// What the traffic created that must never show up in `/metrics`.
#[derive(Debug)]
pub struct Served {
    pub account_id: String,
    pub broke_account_id: String,
    pub key_id: String,
    pub token: String,
    pub provider_keys: Vec<String>,
    pub credential_ids: Vec<String>,
    pub request_ids: Vec<String>,
    /// A model name a client chose, outside the catalog.
    pub client_model: String,
}

impl Served {
    /// Every value a metric label must never carry.
    pub fn secrets(&self) -> Vec<(&'static str, String)> {
        let token_secret = self.token.splitn(3, '_').nth(2).unwrap().to_string();
        let mut out = vec![
            ("account id", self.account_id.clone()),
            ("account id", self.broke_account_id.clone()),
            ("gateway key id", self.key_id.clone()),
            ("gateway token", self.token.clone()),
            ("gateway token secret", token_secret),
            ("client model", self.client_model.clone()),
        ];
        out.extend(
            self.provider_keys
                .iter()
                .map(|k| ("provider key", k.clone())),
        );
        out.extend(
            self.credential_ids
                .iter()
                .map(|c| ("credential id", c.clone())),
        );
        out.extend(self.request_ids.iter().map(|r| ("request id", r.clone())));
        out
    }
}

async fn post(http: &reqwest::Client, url: String, body: Value, expect: u16) -> Value {
    let r = http.post(&url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, expect, "POST {url}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Sends one chat request; returns the status and the request id the gateway gave it.
async fn chat(
    http: &reqwest::Client,
    gateway: &str,
    token: &str,
    model: &str,
    stream: bool,
) -> (u16, Option<String>) {
    let r = http
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(token)
        .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get("x-tally-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = r.bytes().await.unwrap();
    (status, id)
}

async fn message(
    http: &reqwest::Client,
    gateway: &str,
    token: &str,
    model: &str,
) -> (u16, Option<String>) {
    let r = http
        .post(format!("{gateway}/v1/messages"))
        .header("x-api-key", token)
        .json(&json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get("x-tally-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = r.bytes().await.unwrap();
    (status, id)
}

/// Drives the traffic and waits until the ledger applied all of its usage.
pub async fn serve(ledger: &str, gateway: &str, mock: &MockState, pool: &PgPool) -> Served {
    let http = reqwest::Client::new();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let account = format!("acct-canary-{}", &run[..16]);
    let broke = format!("acct-broke-{}", &run[..16]);
    let now = Utc::now();

    post(&http, format!("{ledger}/v1/accounts"), json!({"account_id": account, "name": "Dashboards Inc", "low_balance_threshold_usd": "2.00"}), 201).await;
    post(
        &http,
        format!("{ledger}/v1/accounts/{account}/purchases"),
        json!({"amount_usd": "20.00"}),
        201,
    )
    .await;
    // Credits expiring within 30 days, and within 90 days.
    for (amount, days) in [("5.00", 20), ("3.00", 60)] {
        post(
            &http,
            format!("{ledger}/v1/accounts/{account}/grants"),
            json!({"amount_usd": amount, "expires_at": now + Duration::days(days), "priority": 10, "reason": "promotion"}),
            201,
        )
        .await;
    }
    // A grant that expired two hours ago, unused: breakage.
    let lot = uuid::Uuid::new_v4();
    let expired_at = now - Duration::hours(2);
    post(
        &http,
        format!("{ledger}/v1/events"),
        json!({"events": [
            {"event_id": uuid::Uuid::new_v4(), "occurred_at": now - Duration::hours(3), "account_id": account,
             "type": "credits_granted", "lot_id": lot, "amount_usd": "2.00", "expires_at": expired_at,
             "priority": 20, "reason": "trial"},
            {"event_id": uuid::Uuid::new_v4(), "occurred_at": expired_at, "account_id": account,
             "type": "lot_expired", "lot_id": lot}
        ]}),
        200,
    )
    .await;

    let key = post(
        &http,
        format!("{ledger}/v1/accounts/{account}/keys"),
        json!({"endpoint_id": "default", "description": "dashboards-frontend"}),
        201,
    )
    .await;
    let token = key["token"].as_str().unwrap().to_string();
    let key_id = key["key_id"].as_str().unwrap().to_string();
    // Two BYOK Anthropic keys, the first rate-limited upstream: every Anthropic request fails
    // over once.
    let limited = format!("sk-ant-canary-limited-{run}");
    let good = format!("sk-ant-canary-good-{run}");
    let mut credential_ids = Vec::new();
    for (k, position) in [(&limited, 0), (&good, 1)] {
        let c = post(
            &http,
            format!("{ledger}/v1/accounts/{account}/provider-keys"),
            json!({"provider": "anthropic", "api_key": k, "kind": "byok", "position": position}),
            201,
        )
        .await;
        credential_ids.push(c["credential_id"].as_str().unwrap().to_string());
    }
    mock.set_behavior(limited.clone(), MockBehavior::status(429));

    let mut request_ids = Vec::new();
    let mut usage_rows = 0;
    for i in 0..6 {
        let (s, id) = chat(&http, gateway, &token, "gpt-4o", i % 2 == 0).await;
        assert_eq!(s, 200, "managed request {i}");
        request_ids.extend(id);
        usage_rows += 1;
    }
    for i in 0..3 {
        let (s, id) = message(&http, gateway, &token, "claude-sonnet-4-5").await;
        assert_eq!(s, 200, "BYOK request {i}");
        request_ids.extend(id);
        usage_rows += 2;
    }
    // A model the catalog does not know, named with its provider: served, labelled `other`.
    let client_model = format!("canary-model-{}", &run[..12]);
    let (s, id) = chat(
        &http,
        gateway,
        &token,
        &format!("openai:{client_model}"),
        false,
    )
    .await;
    assert!(s < 500, "unknown model: {s}");
    request_ids.extend(id);
    usage_rows += 1;
    // Denials: a bad token, a provider nobody configured, and an account without credits.
    let (s, _) = chat(&http, gateway, "tly_nokey_notasecret", "gpt-4o", false).await;
    assert_eq!(s, 401);
    let (s, _) = chat(&http, gateway, &token, "nosuchprovider:some-model", false).await;
    assert_eq!(s, 400);
    post(
        &http,
        format!("{ledger}/v1/accounts"),
        json!({"account_id": broke, "name": "Broke Ltd"}),
        201,
    )
    .await;
    let broke_key = post(
        &http,
        format!("{ledger}/v1/accounts/{broke}/keys"),
        json!({"endpoint_id": "default"}),
        201,
    )
    .await;
    let (s, _) = chat(
        &http,
        gateway,
        broke_key["token"].as_str().unwrap(),
        "gpt-4o",
        false,
    )
    .await;
    assert_eq!(s, 403, "no credits, managed denied");
    let r = http
        .get(format!("{gateway}/v1/models"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Ledger events: one offered twice (duplicate), one re-offered changed (conflict), one for
    // an account that does not exist (rejected).
    let event = |tokens: i64| {
        json!({"event_id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("{run}/usage").as_bytes()),
               "occurred_at": now, "account_id": account, "type": "usage", "request_id": format!("req-posted-{run}"),
               "attempt": 1, "endpoint_id": "default", "api_key_id": key_id, "provider": "openai", "model": "gpt-4o-mini",
               "credential_kind": "managed", "credential_id": "managed-openai-1",
               "tokens": {"input": tokens, "cached_input": 0, "output": 10, "reasoning": 0}, "token_source": "provider",
               "upstream_latency_ms": 120, "total_latency_ms": 125, "status": 200, "streaming": false})
    };
    request_ids.push(format!("req-posted-{run}"));
    post(
        &http,
        format!("{ledger}/v1/events"),
        json!({"events": [event(100)]}),
        200,
    )
    .await;
    usage_rows += 1;
    post(
        &http,
        format!("{ledger}/v1/events"),
        json!({"events": [event(100)]}),
        200,
    )
    .await;
    let r = http
        .post(format!("{ledger}/v1/events"))
        .json(&json!({"events": [event(999)]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().as_u16() < 500, "conflict: {}", r.status());
    let mut missing = event(5);
    missing["event_id"] = json!(uuid::Uuid::new_v4());
    missing["account_id"] = json!(format!("acct-missing-{run}"));
    let r = http
        .post(format!("{ledger}/v1/events"))
        .json(&json!({"events": [missing]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        404,
        "usage of an unknown account is refused"
    );

    // Usage reaches the ledger a moment after each response.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let applied: i64 = sqlx::query_scalar(
            "select coalesce(sum(requests), 0)::bigint from usage_hourly where account_id = $1",
        )
        .bind(&account)
        .fetch_one(pool)
        .await
        .unwrap();
        if applied >= usage_rows {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {applied} of {usage_rows} usage attempts reached the ledger"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Served {
        account_id: account,
        broke_account_id: broke,
        key_id,
        token,
        provider_keys: vec![limited, good],
        credential_ids,
        request_ids,
        client_model,
    }
}
