//! Shared test harness: an in-process app over a fresh database (one per test, made by
//! `sqlx::test`), a manual clock, and JSON request helpers.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_arguments
)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use tally::api::{self, AppState};
use tally::clock::ManualClock;
use tally_ingest::Store;
use tower::ServiceExt;

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap()
}

pub struct Harness {
    pub app: Router,
    pub store: Arc<Store>,
    pub clock: Arc<ManualClock>,
    pub pool: PgPool,
}

impl Harness {
    pub async fn new(pool: PgPool) -> Harness {
        let clock = Arc::new(ManualClock::new(t0()));
        let store = Arc::new(Store::open(pool.clone(), t0()).await.unwrap());
        let app = api::router(AppState {
            store: Arc::clone(&store),
            clock: clock.clone(),
        });
        Harness {
            app,
            store,
            clock,
            pool,
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string()))
                .unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        self.raw(req).await
    }

    pub async fn raw(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request("GET", path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.request("POST", path, Some(body), &[]).await
    }

    pub async fn open_account(&self, id: &str) {
        let (s, b) = self.post("/v1/accounts", &json!({"account_id": id, "name": format!("{id} inc"), "low_balance_threshold_usd": "2.00"})).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }

    pub async fn buy(&self, id: &str, amount: &str) -> Value {
        let (s, b) = self
            .post(
                &format!("/v1/accounts/{id}/purchases"),
                &json!({"amount_usd": amount}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b
    }

    pub async fn post_events(&self, events: &[Value]) -> (StatusCode, Value) {
        self.post("/v1/events", &json!({"events": events})).await
    }

    pub async fn balance(&self, id: &str) -> Value {
        let (s, b) = self.get(&format!("/v1/accounts/{id}/balance")).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        b
    }

    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("select count(*) from event")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// A usage event as the gateway would send it.
pub fn usage(
    account: &str,
    n: u32,
    at: DateTime<Utc>,
    key: &str,
    kind: &str,
    model: &str,
    input: i64,
    output: i64,
) -> Value {
    let (provider, model) = model.split_once(':').unwrap();
    json!({
        "event_id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("{account}/{n}").as_bytes()),
        "occurred_at": at,
        "account_id": account,
        "type": "usage",
        "request_id": format!("req-{n}"),
        "attempt": 1,
        "endpoint_id": "default",
        "api_key_id": key,
        "provider": provider,
        "model": model,
        "credential_kind": kind,
        "credential_id": format!("{kind}-{provider}"),
        "tokens": {"input": input, "cached_input": 0, "output": output, "reasoning": 0},
        "token_source": "provider",
        "upstream_latency_ms": 300,
        "total_latency_ms": 310,
        "status": 200,
        "streaming": false
    })
}

pub fn dec(v: &Value) -> rust_decimal::Decimal {
    v.as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {v}"))
        .parse()
        .unwrap()
}

/// Every projection table, every row, in a stable order, as text: what `rebuild` must reproduce.
pub async fn dump_projections(pool: &PgPool) -> Vec<String> {
    let mut out = Vec::new();
    for (table, order) in [
        ("account", "account_id"),
        ("credit_lot", "lot_id"),
        ("ledger_entry", "event_seq, line_no"),
        (
            "usage_hourly",
            "account_id, hour, endpoint_id, api_key_id, credential_kind, credential_id, provider, model",
        ),
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select t::text from {table} t order by {order}"
        )))
        .fetch_all(pool)
        .await
        .unwrap();
        out.extend(rows.into_iter().map(|r| format!("{table}: {r}")));
    }
    out
}

/// Every role in one process over real sockets, with the mock provider as the upstream of
/// OpenAI and Anthropic (see `tally::demo::configure_gateway`).
pub struct LiveStack {
    pub stack: tally::stack::Stack,
    pub ledger: String,
    pub gateway: String,
    pub mock: Arc<tally_gateway_core::mock::MockState>,
    pub mock_addr: std::net::SocketAddr,
    pub clock: Arc<dyn tally::clock::Clock>,
}

/// Starts a [`LiveStack`] on `pool`; `tweak` may change the gateway configuration first.
pub async fn live_stack(
    pool: &PgPool,
    tweak: impl FnOnce(&mut tally_gateway_core::config::GatewayConfig, std::net::SocketAddr),
) -> LiveStack {
    live_stack_with(pool, None, tweak).await
}

/// Like [`live_stack`], with every role going through Kafka when `kafka` is given.
pub async fn live_stack_with(
    pool: &PgPool,
    kafka: Option<tally::config::KafkaSettings>,
    tweak: impl FnOnce(&mut tally_gateway_core::config::GatewayConfig, std::net::SocketAddr),
) -> LiveStack {
    use tally::clock::{Clock, SystemClock};
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = Arc::new(Store::open(pool.clone(), clock.now()).await.unwrap());
    let (mock_addr, mock) = tally_gateway_core::mock::spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut config = tally_gateway_core::config::GatewayConfig::default();
    tally::demo::configure_gateway(&mut config, mock_addr);
    tweak(&mut config, mock_addr);
    let settings = tally::config::GatewaySettings {
        listen: tally::config::DEFAULT_GATEWAY_LISTEN.parse().unwrap(),
        config,
        kek: None,
    };
    let stack = tally::stack::Stack::start(tally::stack::StackParts {
        store,
        clock: Arc::clone(&clock),
        ledger: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        gateway: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        settings,
        kek: tally_gateway_core::secrets::Kek::from_bytes(&[7; 32]),
        sweep_interval: std::time::Duration::from_secs(60),
        ingest: kafka.is_some(),
        kafka,
    })
    .await
    .unwrap();
    let ledger = format!("http://{}", stack.ledger_addr.unwrap());
    let gateway = format!("http://{}", stack.gateway_addr.unwrap());
    LiveStack {
        stack,
        ledger,
        gateway,
        mock,
        mock_addr,
        clock,
    }
}

/// The test broker's address, from `tests/run.sh`; a test that needs it fails loudly without it.
pub fn kafka_brokers() -> String {
    std::env::var("TALLY_TEST_KAFKA_BROKERS").expect(
        "TALLY_TEST_KAFKA_BROKERS is not set: run the suite with tests/run.sh, which starts a \
         Kafka-protocol broker (tansu), or point it at a broker",
    )
}

/// Kafka settings with topics and a group of their own, so tests sharing the broker never see
/// each other's messages.
pub fn kafka_settings(spool_dir: &std::path::Path) -> tally::config::KafkaSettings {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..12];
    let mut config = tally_ingest::kafka::KafkaConfig::new(kafka_brokers());
    config.topics = tally_ingest::kafka::Topics {
        usage: format!("t{run}.usage"),
        credits: format!("t{run}.credits"),
        decisions: format!("t{run}.decisions"),
        metrics: format!("t{run}.metrics"),
        dead_letter: format!("t{run}.dead-letter"),
    };
    config.partitions = 3;
    config.group_id = format!("t{run}.ingest");
    tally::config::KafkaSettings {
        config,
        spool_dir: spool_dir.to_path_buf(),
        spool_max_bytes: 64 << 20,
        spool_full_policy: tally::config::SpoolFullArg::DenyManaged,
    }
}

/// Opens `account` over the live ledger API, buys `credits` (unless `None`) and creates a
/// gateway key on the default endpoint; returns the key's token.
pub async fn account_with_key(ledger: &str, account: &str, credits: Option<&str>) -> String {
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{ledger}/v1/accounts"))
        .json(&json!({"account_id": account, "name": account}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    if let Some(amount) = credits {
        let r = http
            .post(format!("{ledger}/v1/accounts/{account}/purchases"))
            .json(&json!({"amount_usd": amount}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let r = http
        .post(format!("{ledger}/v1/accounts/{account}/keys"))
        .json(&json!({"endpoint_id": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}
