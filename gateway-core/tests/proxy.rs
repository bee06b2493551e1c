//! The proxy over real sockets: client → gateway → mock provider, with the ledger behind it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;
use tally_gateway_core::catalog::ApiShape;
use tally_gateway_core::config::GatewayConfig;
use tally_gateway_core::decisions::DecisionCache;
use tally_gateway_core::error::GatewayError;
use tally_gateway_core::mock::{self, MockBehavior, MockState};
use tally_gateway_core::proxy::{
    self, Authenticator, Caller, CredentialSource, CustomProvider, Gateway, UpstreamKey,
};
use tally_gateway_core::sink::InProcessSink;
use tally_ingest::{BatchMode, Store};
use tally_ledger::event::{AccountOpened, CreditsPurchased};
use tally_ledger::{CredentialKind, Event, EventBody, Money};
use uuid::Uuid;

#[derive(Debug, Default)]
struct StaticAuth(HashMap<String, Caller>);

impl Authenticator for StaticAuth {
    fn verify(&self, token: &str, endpoint_id: &str) -> Result<Caller, GatewayError> {
        let c = self.0.get(token).ok_or(GatewayError::Unauthenticated)?;
        if c.endpoint_id != endpoint_id {
            return Err(GatewayError::WrongEndpoint);
        }
        Ok(c.clone())
    }
}

type KeysByAccountProvider = HashMap<(String, String), Vec<Arc<UpstreamKey>>>;

#[derive(Debug, Default)]
struct StaticCreds(
    Mutex<KeysByAccountProvider>,
    Mutex<HashMap<String, String>>,
    std::sync::atomic::AtomicBool,
    Mutex<HashMap<String, Arc<tally_gateway_core::routes::Route>>>,
);

impl StaticCreds {
    fn set(&self, account: &str, provider: &str, keys: &[(&str, CredentialKind)]) {
        let keys = keys
            .iter()
            .map(|(k, kind)| {
                Arc::new(UpstreamKey {
                    credential_id: format!("cred-{k}"),
                    account_id: account.to_string(),
                    provider: provider.to_string(),
                    kind: *kind,
                    api_key_id: None,
                    masked: String::new(),
                    api_key: SecretString::from(k.to_string()),
                })
            })
            .collect();
        self.0
            .lock()
            .unwrap()
            .insert((account.into(), provider.into()), keys);
    }
}

impl CredentialSource for StaticCreds {
    fn route(
        &self,
        _account_id: &str,
        name: &str,
    ) -> Option<Arc<tally_gateway_core::routes::Route>> {
        self.3.lock().unwrap().get(name).cloned()
    }

    fn byok_fallback_to_managed(&self, _account_id: &str) -> bool {
        self.2.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn credentials_for(
        &self,
        account_id: &str,
        _api_key_id: &str,
        provider: &str,
    ) -> Vec<Arc<UpstreamKey>> {
        self.0
            .lock()
            .unwrap()
            .get(&(account_id.to_string(), provider.to_string()))
            .cloned()
            .unwrap_or_default()
    }
    fn custom_provider(&self, _account_id: &str, provider: &str) -> Option<CustomProvider> {
        self.1
            .lock()
            .unwrap()
            .get(provider)
            .map(|url| CustomProvider {
                base_url: url.clone(),
                shape: ApiShape::OpenAi,
            })
    }
}

struct World {
    mock_addr: std::net::SocketAddr,
    base: String,
    http: reqwest::Client,
    mock: Arc<MockState>,
    creds: Arc<StaticCreds>,
    decisions: Arc<DecisionCache>,
    store: Arc<Store>,
    pool: PgPool,
}

const TOKEN: &str = "tly_test_token";
const MANAGED_OPENAI: &str = "sk-managed-openai-1";

async fn world(pool: PgPool, tweak: impl FnOnce(&mut GatewayConfig)) -> World {
    let (mock_addr, mock) = mock::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let now = Utc::now();
    let store = Arc::new(Store::open(pool.clone(), now).await.unwrap());
    let open = |id: &str| Event {
        event_id: Uuid::new_v4(),
        occurred_at: now - chrono::Duration::minutes(1),
        account_id: id.into(),
        body: EventBody::AccountOpened(AccountOpened {
            name: id.into(),
            low_balance_threshold_usd: Money::ZERO,
        }),
    };
    store
        .ingest(&[open("acme")], BatchMode::BestEffort, now)
        .await
        .unwrap();
    let decisions = DecisionCache::new();
    decisions.refresh(&pool, now).await.unwrap();
    let clock: proxy::Clock = Arc::new(Utc::now);
    let (sink, _writer) = InProcessSink::start(
        Arc::clone(&store),
        Arc::clone(&decisions),
        Arc::clone(&clock),
    );
    let mut config = GatewayConfig::default();
    for p in ["openai", "anthropic", "groq"] {
        config
            .base_url_overrides
            .insert(p.into(), format!("http://{mock_addr}/v1"));
    }
    config
        .managed_keys
        .insert("openai".into(), vec![SecretString::from(MANAGED_OPENAI)]);
    config.managed_keys.insert(
        "anthropic".into(),
        vec![SecretString::from("sk-managed-anthropic-1")],
    );
    config.per_request_timeout = Duration::from_secs(5);
    config.total_timeout = Duration::from_secs(10);
    tweak(&mut config);
    let mut auth = StaticAuth::default();
    auth.0.insert(
        TOKEN.into(),
        Caller {
            account_id: "acme".into(),
            endpoint_id: "default".into(),
            api_key_id: "key_a".into(),
        },
    );
    let creds = Arc::new(StaticCreds::default());
    let gw = Gateway::new(
        config,
        Arc::new(auth),
        creds.clone(),
        Arc::clone(&decisions),
        Arc::new(sink),
        clock,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, proxy::router(Arc::new(gw))).await });
    World {
        mock_addr,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        mock,
        creds,
        decisions,
        store,
        pool,
    }
}

impl World {
    async fn buy(&self, cents: i64) {
        let now = Utc::now();
        let e = Event {
            event_id: Uuid::new_v4(),
            occurred_at: now - chrono::Duration::seconds(30),
            account_id: "acme".into(),
            body: EventBody::CreditsPurchased(CreditsPurchased {
                lot_id: Uuid::new_v4(),
                amount_usd: Money::from_cents(cents),
                payment_reference: None,
            }),
        };
        let r = self
            .store
            .ingest(&[e], BatchMode::AllOrNothing, now)
            .await
            .unwrap();
        self.decisions.update_from_states(r.states.values(), now);
    }

    async fn chat(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Usage events the ledger applied, oldest first (waits for the sink).
    async fn usage_events(&self, at_least: usize) -> Vec<Value> {
        for _ in 0..200 {
            let rows: Vec<Value> =
                sqlx::query_scalar("select payload from event where kind = 'usage' order by seq")
                    .fetch_all(&self.pool)
                    .await
                    .unwrap();
            if rows.len() >= at_least {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {at_least} usage events arrived");
    }
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "say hello to the whole wide world"}]})
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn managed_request_is_metered_and_charged(pool: PgPool) {
    let w = world(pool, |_| {}).await;
    w.buy(1000).await;
    let (s, b) = w.chat(chat_body("gpt-4o")).await;
    assert_eq!(s, 200, "{b}");
    assert!(b["choices"][0]["message"]["content"].is_string());
    let events = w.usage_events(1).await;
    let e = &events[0];
    assert_eq!(
        (e["credential_kind"].as_str(), e["credential_id"].as_str()),
        (Some("managed"), Some("managed-openai-1"))
    );
    assert_eq!(
        (
            e["provider"].as_str(),
            e["model"].as_str(),
            e["status"].as_u64()
        ),
        (Some("openai"), Some("gpt-4o"), Some(200))
    );
    assert_eq!(e["token_source"], "provider");
    assert_eq!(
        e["tokens"]["input"].as_i64().unwrap() + e["tokens"]["cached_input"].as_i64().unwrap(),
        b["usage"]["prompt_tokens"].as_i64().unwrap()
    );
    assert_eq!(w.mock.calls(MANAGED_OPENAI), 1);
    let charged: bool = sqlx::query_scalar(
        "select charged_upstream_usd + charged_fee_usd > 0 from account where account_id = 'acme'",
    )
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert!(charged);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn without_credits_managed_is_denied_but_byok_works(pool: PgPool) {
    let w = world(pool, |_| {}).await;
    let (s, b) = w.chat(chat_body("openai:gpt-4o")).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("credits_exhausted")),
        "{b}"
    );
    assert_eq!(
        w.mock.total_calls(),
        0,
        "a denied request never reaches the provider"
    );
    let r = w
        .http
        .post(format!("{}/v1/messages", w.base))
        .header("x-api-key", TOKEN)
        .json(&json!({"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        (b["type"].as_str(), b["error"]["code"].as_str()),
        (Some("error"), Some("credits_exhausted")),
        "Anthropic's shape: {b}"
    );

    w.creds
        .set("acme", "openai", &[("sk-byok-1", CredentialKind::Byok)]);
    let (s, b) = w.chat(chat_body("gpt-4o")).await;
    assert_eq!(s, 200, "{b}");
    let events = w.usage_events(1).await;
    assert_eq!(events[0]["credential_kind"], "byok");
    assert_eq!(w.mock.calls("sk-byok-1"), 1);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn failover_tries_the_next_key_then_the_next_model(pool: PgPool) {
    let w = world(pool, |_| {}).await;
    w.creds.set(
        "acme",
        "openai",
        &[
            ("sk-rate-limited", CredentialKind::Byok),
            ("sk-broken", CredentialKind::Byok),
        ],
    );
    w.creds
        .set("acme", "groq", &[("gsk-good", CredentialKind::Byok)]);
    w.mock
        .set_behavior("sk-rate-limited", MockBehavior::status(429));
    w.mock.set_behavior("sk-broken", MockBehavior::status(500));
    let (s, b) = w
        .chat(json!({"models": ["openai:gpt-4o", "groq:llama-3.3-70b-versatile"], "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(s, 200, "{b}");
    let events = w.usage_events(3).await;
    let seen: Vec<(u64, &str, u64)> = events
        .iter()
        .map(|e| {
            (
                e["attempt"].as_u64().unwrap(),
                e["credential_id"].as_str().unwrap(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, "cred-sk-rate-limited", 429),
            (2, "cred-sk-broken", 500),
            (3, "cred-gsk-good", 200)
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e["request_id"] == events[0]["request_id"])
    );
    assert_eq!(
        (
            w.mock.calls("sk-rate-limited"),
            w.mock.calls("sk-broken"),
            w.mock.calls("gsk-good")
        ),
        (1, 1, 1)
    );
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn every_key_failing_returns_an_error_in_the_clients_shape(pool: PgPool) {
    let w = world(pool, |c| c.per_request_timeout = Duration::from_millis(300)).await;
    w.creds.set(
        "acme",
        "openai",
        &[
            ("sk-slow", CredentialKind::Byok),
            ("sk-revoked", CredentialKind::Byok),
        ],
    );
    w.mock
        .set_behavior("sk-slow", MockBehavior::latency(Duration::from_secs(3)));
    w.mock.set_behavior("sk-revoked", MockBehavior::status(401));
    let (s, b) = w.chat(chat_body("gpt-4o")).await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["error"]["code"], "upstream_error");
    let events = w.usage_events(2).await;
    assert_eq!(events[0]["status"], 504, "the slow key timed out");
    assert_eq!(events[1]["status"], 401);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn restrictions_give_the_seeds_errors(pool: PgPool) {
    let w = world(pool, |c| {
        c.only_allow_configured_providers = true;
        c.only_allow_configured_models = true;
        c.configured_providers
            .insert("openai".into(), ["gpt-4o-mini".to_string()].into());
    })
    .await;
    w.buy(1000).await;
    let (s, b) = w.chat(chat_body("anthropic:claude-haiku-4-5")).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("provider_not_allowed")),
        "{b}"
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("provider not allowed")
    );
    let (s, b) = w.chat(chat_body("gpt-4o")).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("model_unknown")),
        "{b}"
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model unknown")
    );
    let (s, b) = w.chat(chat_body("not-a-catalog-model")).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("model_unknown")),
        "{b}"
    );
    let (s, _) = w.chat(chat_body("gpt-4o-mini")).await;
    assert_eq!(s, 200);
    let r = w
        .http
        .post(format!("{}/v1/chat/completions", w.base))
        .bearer_auth("tly_forged")
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

async fn sse(w: &World, body: Value) -> (String, reqwest::StatusCode) {
    let r = w
        .http
        .post(format!("{}/v1/chat/completions", w.base))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (r.text().await.unwrap_or_default(), s)
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn streams_are_metered_from_provider_usage_or_estimated(pool: PgPool) {
    let w = world(pool, |_| {}).await;
    w.buy(1000).await;
    let mut body = chat_body("gpt-4o");
    body["stream"] = json!(true);
    let (text, s) = sse(&w, body.clone()).await;
    assert_eq!(s, 200);
    assert!(text.contains("[DONE]"));
    assert!(
        !text.contains("\"usage\":{"),
        "the usage chunk is only passed on when asked for:\n{text}"
    );
    // The gateway asked the provider for usage anyway.
    assert_eq!(
        w.mock.last_request().unwrap().body["stream_options"]["include_usage"],
        true
    );
    body["stream_options"] = json!({"include_usage": true});
    let (text, _) = sse(&w, body.clone()).await;
    assert!(text.contains("\"usage\""), "{text}");
    w.mock.set_behavior(
        MANAGED_OPENAI,
        MockBehavior {
            omit_usage: true,
            ..MockBehavior::default()
        },
    );
    let (_, _) = sse(&w, body.clone()).await;
    w.mock.set_behavior(
        MANAGED_OPENAI,
        MockBehavior {
            abort_after_chunks: Some(3),
            ..MockBehavior::default()
        },
    );
    let _ = sse(&w, body).await;
    let events = w.usage_events(4).await;
    let sources: Vec<&str> = events
        .iter()
        .map(|e| e["token_source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["provider", "provider", "estimate", "estimate"]);
    assert!(events.iter().all(|e| e["streaming"] == true));
    assert_eq!(events[0]["tokens"]["output"], 16);
    assert!(
        events[2]["tokens"]["output"].as_i64().unwrap() > 0,
        "estimated from the streamed text"
    );
    assert_eq!(
        events[3]["status"], 502,
        "an aborted stream is metered: {}",
        events[3]
    );
    assert!(events[3]["tokens"]["output"].as_i64().unwrap() > 0);
    assert!(events[3]["tokens"]["output"].as_i64().unwrap() < 16);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn anthropic_messages_stream_is_metered(pool: PgPool) {
    let w = world(pool, |_| {}).await;
    w.buy(1000).await;
    let r = w
        .http
        .post(format!("{}/v1/messages", w.base))
        .header("x-api-key", TOKEN)
        .json(&json!({"model": "anthropic:claude-haiku-4-5", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    let events = w.usage_events(1).await;
    assert_eq!(
        (
            events[0]["provider"].as_str(),
            events[0]["token_source"].as_str()
        ),
        (Some("anthropic"), Some("provider"))
    );
    assert_eq!(events[0]["tokens"]["output"], 16);
    assert!(events[0]["tokens"]["input"].as_i64().unwrap() > 0);
    let _ = ApiShape::Anthropic;
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn custom_providers_cannot_reach_private_addresses_unless_allow_listed(pool: PgPool) {
    let w = world(pool.clone(), |_| {}).await;
    let port = w.mock_addr.port();
    w.creds
        .1
        .lock()
        .unwrap()
        .insert("ollama".into(), format!("http://127.0.0.1:{port}/v1"));
    w.creds
        .1
        .lock()
        .unwrap()
        .insert("byname".into(), format!("http://localhost:{port}/v1"));
    w.creds
        .set("acme", "ollama", &[("ollama-key", CredentialKind::Byok)]);
    w.creds
        .set("acme", "byname", &[("byname-key", CredentialKind::Byok)]);
    let (s, b) = w.chat(chat_body("ollama:llama3")).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("egress_refused")),
        "{b}"
    );
    // A host name is checked where it matters: on the addresses it resolves to, at connect time.
    let (s, b) = w.chat(chat_body("byname:llama3")).await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(
        w.mock.total_calls(),
        0,
        "nothing reached the private address"
    );

    let allowed = world(pool, |c| {
        c.custom_provider_allowlist = vec!["127.0.0.1".into(), "localhost".into()]
    })
    .await;
    let port = allowed.mock_addr.port();
    allowed
        .creds
        .1
        .lock()
        .unwrap()
        .insert("ollama".into(), format!("http://127.0.0.1:{port}/v1"));
    allowed
        .creds
        .1
        .lock()
        .unwrap()
        .insert("byname".into(), format!("http://localhost:{port}/v1"));
    allowed
        .creds
        .set("acme", "ollama", &[("ollama-key", CredentialKind::Byok)]);
    allowed
        .creds
        .set("acme", "byname", &[("byname-key", CredentialKind::Byok)]);
    let (s, b) = allowed.chat(chat_body("ollama:llama3")).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = allowed.chat(chat_body("byname:llama3")).await;
    assert_eq!(s, 200, "{b}");
    // Custom providers never use managed keys.
    allowed.creds.set("acme", "ollama", &[]);
    let (s, b) = allowed.chat(chat_body("ollama:llama3")).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("no_provider_key")),
        "{b}"
    );
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn byok_failure_policy_strict_or_fallback_to_managed(pool: PgPool) {
    let w = world(pool, |_| {}).await;
    w.buy(1000).await;
    w.creds
        .set("acme", "openai", &[("sk-dead", CredentialKind::Byok)]);
    w.mock.set_behavior("sk-dead", MockBehavior::status(401));
    // Strict (the default): the customer's failing key is not replaced by the platform's.
    let (s, b) = w.chat(chat_body("gpt-4o")).await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(w.mock.calls(MANAGED_OPENAI), 0);
    w.creds.2.store(true, std::sync::atomic::Ordering::Relaxed);
    let (s, b) = w.chat(chat_body("gpt-4o")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(w.mock.calls(MANAGED_OPENAI), 1);
    let events = w.usage_events(3).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["credential_kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["byok", "byok", "managed"]);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn routes_resolve_logical_names_to_byok_primary_and_managed_secondary(pool: PgPool) {
    use tally_gateway_core::routes::{CredentialChoice, Route, RouteMode, RouteTarget};
    let w = world(pool, |_| {}).await;
    w.buy(1000).await;
    w.creds.set(
        "acme",
        "anthropic",
        &[("sk-ant-byok", CredentialKind::Byok)],
    );
    w.creds.set(
        "acme",
        "openai",
        &[("sk-openai-byok", CredentialKind::Byok)],
    );
    let route = Route {
        mode: RouteMode::Fallback,
        targets: vec![
            RouteTarget {
                model: "openai:gpt-4o".into(),
                credential: CredentialChoice::Managed,
                priority: 1,
                weight: 1,
            },
            RouteTarget {
                model: "openai:gpt-4o-mini".into(),
                credential: CredentialChoice::Byok,
                priority: 0,
                weight: 1,
            },
        ],
    };
    w.creds
        .3
        .lock()
        .unwrap()
        .insert("smart".into(), Arc::new(route));
    // Priority 0 (BYOK) serves while it works.
    let (s, b) = w.chat(chat_body("smart")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(w.mock.calls("sk-openai-byok"), 1);
    // When the BYOK account fails, the platform-managed target takes over, even though the
    // account has a BYOK key for openai (the target pins the credential kind).
    w.mock
        .set_behavior("sk-openai-byok", MockBehavior::status(429));
    let (s, b) = w.chat(chat_body("smart")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(w.mock.calls(MANAGED_OPENAI), 1);
    let events = w.usage_events(3).await;
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["model"].as_str().unwrap(),
                e["credential_kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("gpt-4o-mini", "byok"),
            ("gpt-4o-mini", "byok"),
            ("gpt-4o", "managed")
        ]
    );

    // A split sends traffic to both targets by weight.
    let split = Route {
        mode: RouteMode::Split,
        targets: vec![
            RouteTarget {
                model: "openai:gpt-4o".into(),
                credential: CredentialChoice::Managed,
                priority: 0,
                weight: 1,
            },
            RouteTarget {
                model: "openai:gpt-4o-mini".into(),
                credential: CredentialChoice::Managed,
                priority: 0,
                weight: 1,
            },
        ],
    };
    w.creds
        .3
        .lock()
        .unwrap()
        .insert("half".into(), Arc::new(split));
    for _ in 0..40 {
        let (s, _) = w.chat(chat_body("half")).await;
        assert_eq!(s, 200);
    }
    let models: Vec<String> = w
        .mock
        .requests()
        .iter()
        .rev()
        .take(40)
        .filter_map(|r| r.model.clone())
        .collect();
    let mini = models
        .iter()
        .filter(|m| m.as_str() == "gpt-4o-mini")
        .count();
    assert!(
        (5..=35).contains(&mini),
        "both targets get traffic: {mini} of 40"
    );
}

/// The same router in process (no gateway socket), driven with `tower::ServiceExt::oneshot`.
#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn in_process_router_serves_and_meters(pool: PgPool) {
    use tower::ServiceExt;
    let (mock_addr, mock) = mock::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut config = GatewayConfig::default();
    config
        .base_url_overrides
        .insert("openai".into(), format!("http://{mock_addr}/v1"));
    let mut auth = StaticAuth::default();
    auth.0.insert(
        TOKEN.into(),
        Caller {
            account_id: "acme".into(),
            endpoint_id: "default".into(),
            api_key_id: "key_a".into(),
        },
    );
    let creds = Arc::new(StaticCreds::default());
    creds.set("acme", "openai", &[("sk-inproc", CredentialKind::Byok)]);
    let sink = Arc::new(tally_gateway_core::sink::MemorySink::default());
    let gw = Gateway::new(
        config,
        Arc::new(auth),
        creds,
        DecisionCache::new(),
        sink.clone(),
        Arc::new(Utc::now),
    )
    .unwrap();
    let app = proxy::router(Arc::new(gw));
    let req = axum::http::Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(chat_body("gpt-4o").to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.calls("sk-inproc"), 1);
    let events = sink.0.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].account_id, "acme");
    let req = axum::http::Request::get("/v1/models")
        .header("x-api-key", "wrong")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(app.oneshot(req).await.unwrap().status(), 401);
    drop(pool);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn tally_auto_and_strategies_choose_models(pool: PgPool) {
    let w = world(pool.clone(), |c| {
        c.strategies = vec![
            // Matches nothing: the next strategy decides.
            "ai.models.filter(m, m.provider_id == 'nobody')".into(),
            "ai.models.filter(m, m.model_id == 'gpt-4o-mini' || m.provider_id == 'groq')".into(),
        ];
    })
    .await;
    w.buy(1000).await;
    w.creds
        .set("acme", "groq", &[("gsk-1", CredentialKind::Byok)]);
    let (s, b) = w.chat(chat_body("tally/auto")).await;
    assert_eq!(s, 200, "{b}");
    let first = w.mock.last_request().unwrap();
    assert_eq!(
        first.model.as_deref(),
        Some("gpt-4o-mini"),
        "catalog order among the strategy's models"
    );
    // The chosen models fail over among themselves: gpt-4o-mini (managed) fails, groq serves.
    w.mock
        .set_behavior(MANAGED_OPENAI, MockBehavior::status(503));
    let (s, b) = w.chat(chat_body("tally/auto")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        w.mock.last_request().unwrap().model.as_deref(),
        Some("llama-3.3-70b-versatile")
    );
    // A client's own list is narrowed by the strategies too.
    w.mock.remove_behavior(MANAGED_OPENAI);
    let (s, _) = w.chat(json!({"models": ["openai:gpt-4o", "openai:gpt-4o-mini"], "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(s, 200);
    assert_eq!(
        w.mock.last_request().unwrap().model.as_deref(),
        Some("gpt-4o-mini")
    );

    // Metrics drive selection: once this gateway has seen openai answer slowly, a latency
    // strategy prefers the fast provider.
    let w2 = world(pool, |c| {
        c.strategies =
            vec!["ai.models.filter(m, m.metrics.local.latency.upstream_ms_avg < 150)".into()];
    })
    .await;
    w2.creds
        .set("acme", "openai", &[("sk-slow", CredentialKind::Byok)]);
    w2.creds
        .set("acme", "groq", &[("gsk-fast", CredentialKind::Byok)]);
    w2.mock
        .set_behavior("sk-slow", MockBehavior::latency(Duration::from_millis(300)));
    let list = json!({"models": ["openai:gpt-4o", "groq:llama-3.3-70b-versatile"], "messages": [{"role": "user", "content": "hi"}]});
    let (s, _) = w2.chat(list.clone()).await;
    assert_eq!(s, 200);
    assert_eq!(
        w2.mock.calls("sk-slow"),
        1,
        "no metrics yet: both pass, openai first"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, _) = w2.chat(list).await;
    assert_eq!(s, 200);
    assert_eq!(
        (w2.mock.calls("sk-slow"), w2.mock.calls("gsk-fast")),
        (1, 1),
        "the slow model is filtered out now"
    );
}

#[test]
fn a_bad_strategy_is_refused_with_its_position() {
    let config = GatewayConfig {
        strategies: vec!["ai.models.filter(m, m.provider_id ==)".into()],
        ..GatewayConfig::default()
    };
    let err = Gateway::new(
        config,
        Arc::new(StaticAuth::default()),
        Arc::new(StaticCreds::default()),
        DecisionCache::new(),
        Arc::new(tally_gateway_core::sink::MemorySink::default()),
        Arc::new(Utc::now),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("strategy 0 at 1:"), "{err}");
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn control_characters_in_model_names_are_refused_and_endpoint_models_work(pool: PgPool) {
    let w = world(pool, |_| {}).await;
    w.buy(1000).await;
    let (s, b) = w.chat(chat_body("openai:gpt-4o\u{0}")).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{b}"
    );
    assert_eq!(w.mock.total_calls(), 0);
    // The ledger keeps ingesting afterwards.
    let (s, _) = w.chat(chat_body("gpt-4o")).await;
    assert_eq!(s, 200);
    assert_eq!(w.usage_events(1).await.len(), 1);
    // A route and the plain name lead to the same key: it is tried once, not twice.
    w.creds
        .set("acme", "openai", &[("sk-once", CredentialKind::Byok)]);
    w.mock.set_behavior("sk-once", MockBehavior::status(429));
    let route = tally_gateway_core::routes::Route {
        mode: tally_gateway_core::routes::RouteMode::Fallback,
        targets: vec![tally_gateway_core::routes::RouteTarget {
            model: "openai:gpt-4o".into(),
            credential: tally_gateway_core::routes::CredentialChoice::Byok,
            priority: 0,
            weight: 1,
        }],
    };
    w.creds
        .3
        .lock()
        .unwrap()
        .insert("alias".into(), Arc::new(route));
    let (s, _) = w.chat(json!({"models": ["alias", "openai:gpt-4o"], "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(s, 429);
    assert_eq!(w.mock.calls("sk-once"), 1);
}
