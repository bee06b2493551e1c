//! The Kafka event sink against a real broker (tansu): delivery with keys, JSON values and
//! headers; a broker that is down then returns; a gateway restart; a full spool and its policy,
//! which refuses managed traffic at a high-water mark, before anything is lost.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

#[path = "support/broker.rs"]
mod broker;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use broker::Broker;
use chrono::Utc;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tally_gateway_core::kafka_sink::{
    KafkaSink, KafkaSinkConfig, KafkaSinkRunner, SpoolFullPolicy,
};
use tally_gateway_core::sink::EventSink;
use tally_ledger::event::{TokenCounts, TokenSource, Usage};
use tally_ledger::{CredentialKind, Event, EventBody};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use uuid::Uuid;

const PARTITIONS: i32 = 3;

fn usage(account: &str, i: u32) -> Event {
    Event {
        event_id: Uuid::new_v4(),
        occurred_at: Utc::now(),
        account_id: account.to_string(),
        body: EventBody::Usage(Usage {
            request_id: format!("req_{i}"),
            attempt: 1,
            endpoint_id: "ep_1".into(),
            api_key_id: "key_1".into(),
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            credential_kind: CredentialKind::Managed,
            credential_id: "managed-openai".into(),
            tokens: TokenCounts {
                input: 10 + i64::from(i),
                output: 5,
                ..TokenCounts::default()
            },
            token_source: TokenSource::Provider,
            upstream_latency_ms: 120,
            total_latency_ms: 130,
            status: 200,
            streaming: false,
        }),
    }
}

fn config(
    bootstrap: &str,
    topic: &str,
    dir: &Path,
    max_bytes: u64,
    when_full: SpoolFullPolicy,
) -> KafkaSinkConfig {
    KafkaSinkConfig {
        brokers: bootstrap.to_string(),
        topic: topic.to_string(),
        spool_dir: dir.to_path_buf(),
        spool_max_bytes: max_bytes,
        when_full,
        // Reconnect quickly once the broker is back, so the tests need not wait out
        // librdkafka's default ten-second reconnect backoff.
        client_properties: vec![
            ("reconnect.backoff.ms".into(), "50".into()),
            ("reconnect.backoff.max.ms".into(), "500".into()),
            ("message.timeout.ms".into(), "5000".into()),
        ],
    }
}

fn topic_name() -> String {
    format!("usage-{}", Uuid::new_v4().simple())
}

/// Logs of the sink (and librdkafka), shown for a failing test.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn eventually(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message as read back from the topic.
#[derive(Debug, Clone)]
struct Received {
    partition: i32,
    key: String,
    event: Event,
    headers: HashMap<String, String>,
}

fn received(m: &BorrowedMessage<'_>) -> Received {
    let mut headers = HashMap::new();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            let v = std::str::from_utf8(h.value.expect("header value")).expect("utf-8 header");
            headers.insert(h.key.to_string(), v.to_string());
        }
    }
    Received {
        partition: m.partition(),
        key: String::from_utf8(m.key().expect("message key").to_vec()).expect("utf-8 key"),
        event: serde_json::from_slice(m.payload().expect("payload")).expect("event JSON"),
        headers,
    }
}

/// Reads the topic from the start until `done` says the messages so far are enough.
async fn consume_until(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool + Send + 'static,
) -> Vec<Received> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("test-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .expect("partition offset");
        }
        consumer.assign(&tpl).expect("assign");
        let until = Instant::now() + timeout;
        let mut out = Vec::new();
        while !done(&out) {
            assert!(
                Instant::now() < until,
                "timed out reading {topic}: {} messages so far",
                out.len()
            );
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(received(&m)),
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .expect("consumer task")
}

fn distinct_ids(msgs: &[Received]) -> HashSet<Uuid> {
    msgs.iter().map(|m| m.event.event_id).collect()
}

/// Per account, the ids in order of first arrival.
fn first_arrival_order(msgs: &[Received]) -> HashMap<String, Vec<Uuid>> {
    let mut seen = HashSet::new();
    let mut out: HashMap<String, Vec<Uuid>> = HashMap::new();
    for m in msgs {
        if seen.insert(m.event.event_id) {
            out.entry(m.key.clone()).or_default().push(m.event.event_id);
        }
    }
    out
}

fn sent_order(events: &[Event]) -> HashMap<String, Vec<Uuid>> {
    let mut out: HashMap<String, Vec<Uuid>> = HashMap::new();
    for e in events {
        out.entry(e.account_id.clone())
            .or_default()
            .push(e.event_id);
    }
    out
}

async fn shutdown(runner: KafkaSinkRunner) -> tally_gateway_core::kafka_sink::KafkaSinkStats {
    runner
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_topic_keyed_by_account_with_json_and_headers() {
    logs();
    let broker = Broker::launch();
    let topic = topic_name();
    broker.create_topic(&topic, PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let (sink, runner) = KafkaSink::start(config(
        &broker.bootstrap(),
        &topic,
        dir.path(),
        1 << 20,
        SpoolFullPolicy::DenyManaged,
    ))
    .await
    .unwrap();

    // Outside any OpenTelemetry span: no trace headers.
    let mut sent: Vec<Event> = (0..30)
        .map(|i| usage(["acct_a", "acct_b", "acct_c"][i as usize % 3], i))
        .collect();
    for e in &sent {
        sink.send(e.clone());
    }
    // Inside a traced request: the W3C context of that span travels along.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let traced = usage("acct_a", 99);
    let trace_id = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("gateway.request");
        let _entered = span.enter();
        sink.send(traced.clone());
        span.context().span().span_context().trace_id().to_string()
    });
    sent.push(traced.clone());
    assert_ne!(trace_id, "00000000000000000000000000000000");

    let n = sent.len();
    let got = consume_until(
        &broker.bootstrap(),
        &topic,
        Duration::from_secs(20),
        move |m| distinct_ids(m).len() >= n,
    )
    .await;
    let by_id: HashMap<Uuid, &Received> = got.iter().map(|m| (m.event.event_id, m)).collect();
    for e in &sent {
        let m = by_id
            .get(&e.event_id)
            .unwrap_or_else(|| panic!("event {} missing", e.event_id));
        assert_eq!(m.key, e.account_id);
        assert_eq!(&m.event, e, "the value is the event's JSON");
        assert_eq!(
            m.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(
            m.headers.get("tally-event-kind").map(String::as_str),
            Some("usage")
        );
        if e.event_id == traced.event_id {
            let tp = m.headers.get("traceparent").expect("traceparent header");
            assert!(
                tp.starts_with("00-") && tp.contains(&trace_id),
                "{tp} vs {trace_id}"
            );
        } else {
            assert!(!m.headers.contains_key("traceparent"), "{:?}", m.headers);
        }
    }
    // One account, one partition, in the order sent.
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    for m in &got {
        assert_eq!(
            *partition_of.entry(&m.key).or_insert(m.partition),
            m.partition
        );
    }
    assert_eq!(first_arrival_order(&got), sent_order(&sent));

    eventually("the spool to empty", Duration::from_secs(10), || {
        let s = sink.stats();
        s.depth_events == 0 && s.shipped >= n as u64
    })
    .await;
    let stats = shutdown(runner).await;
    assert_eq!(
        (stats.accepted, stats.spooled, stats.dropped),
        (n as u64, n as u64, 0)
    );
    assert_eq!((stats.depth_events, stats.depth_bytes), (0, 0));
    assert!(sink.accepts_managed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_down_fills_the_spool_and_everything_ships_when_it_returns() {
    logs();
    let mut broker = Broker::reserve();
    let topic = topic_name();
    let dir = tempfile::tempdir().unwrap();
    let (sink, runner) = KafkaSink::start(config(
        &broker.bootstrap(),
        &topic,
        dir.path(),
        16 << 20,
        SpoolFullPolicy::DenyManaged,
    ))
    .await
    .unwrap();

    let mut sent = Vec::new();
    for i in 0..600u32 {
        let e = usage(&format!("acct_{}", i % 7), i);
        sink.send(e.clone());
        sent.push(e);
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eventually("every event in the spool", Duration::from_secs(10), || {
        sink.stats().spooled == 600
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = sink.stats();
    assert_eq!((s.depth_events, s.shipped, s.dropped), (600, 0, 0), "{s:?}");
    assert!(s.depth_bytes > 600 * 100, "{s:?}");
    assert!(
        sink.accepts_managed(),
        "a spool with room does not deny anything"
    );

    broker.start();
    broker.create_topic(&topic, PARTITIONS).await;
    eventually("the spool to drain", Duration::from_secs(30), || {
        sink.stats().depth_events == 0
    })
    .await;
    let got = consume_until(&broker.bootstrap(), &topic, Duration::from_secs(20), |m| {
        distinct_ids(m).len() >= 600
    })
    .await;
    let ids = distinct_ids(&got);
    assert_eq!(ids, sent.iter().map(|e| e.event_id).collect::<HashSet<_>>());
    assert_eq!(
        first_arrival_order(&got),
        sent_order(&sent),
        "shipped in order per account"
    );
    let s = shutdown(runner).await;
    assert_eq!(
        (s.depth_events, s.depth_bytes, s.dropped),
        (0, 0, 0),
        "{s:?}"
    );
    assert!(s.shipped >= 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_ships_what_the_previous_one_spooled() {
    logs();
    let mut broker = Broker::reserve();
    let topic = topic_name();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &broker.bootstrap(),
        &topic,
        dir.path(),
        16 << 20,
        SpoolFullPolicy::DenyManaged,
    );

    let (sink, runner) = KafkaSink::start(cfg.clone()).await.unwrap();
    let sent: Vec<Event> = (0..200)
        .map(|i| usage(&format!("acct_{}", i % 5), i))
        .collect();
    for e in &sent {
        sink.send(e.clone());
    }
    // Shut down at once: whatever is buffered goes to the spool; nothing can ship.
    let s = runner.shutdown(Duration::from_millis(300)).await.unwrap();
    assert_eq!(
        (s.spooled, s.shipped, s.dropped, s.depth_events),
        (200, 0, 0, 200),
        "{s:?}"
    );
    // The old handle no longer takes events; it says so rather than lose them silently.
    sink.send(usage("acct_late", 0));
    assert_eq!(sink.stats().dropped, 1);
    drop(sink);

    broker.start();
    broker.create_topic(&topic, PARTITIONS).await;
    let (sink2, runner2) = KafkaSink::start(cfg).await.unwrap();
    assert_eq!(sink2.stats().depth_events, 200, "recovered from disk");
    eventually(
        "the new sink to drain the old spool",
        Duration::from_secs(30),
        || sink2.stats().depth_events == 0,
    )
    .await;
    let got = consume_until(&broker.bootstrap(), &topic, Duration::from_secs(20), |m| {
        distinct_ids(m).len() >= 200
    })
    .await;
    assert_eq!(
        distinct_ids(&got),
        sent.iter().map(|e| e.event_id).collect::<HashSet<_>>()
    );
    assert_eq!(first_arrival_order(&got), sent_order(&sent));
    let s2 = shutdown(runner2).await;
    assert_eq!((s2.depth_events, s2.dropped), (0, 0));
    assert!(s2.shipped >= 200);
}

/// Sends events to a sink whose broker is down until its 4 KiB spool overflows.
async fn overflow(policy: SpoolFullPolicy) {
    logs();
    let mut broker = Broker::reserve();
    let topic = topic_name();
    let dir = tempfile::tempdir().unwrap();
    let (sink, runner) = KafkaSink::start(config(
        &broker.bootstrap(),
        &topic,
        dir.path(),
        4096,
        policy,
    ))
    .await
    .unwrap();
    let full_before = tally_gateway_core::telemetry::SPOOL_FULL.get();
    assert!(sink.accepts_managed());
    for i in 0..40 {
        sink.send(usage("acct_full", i));
    }
    eventually(
        "every event stored or dropped",
        Duration::from_secs(10),
        || {
            let s = sink.stats();
            s.spooled + s.dropped == 40
        },
    )
    .await;
    let s = sink.stats();
    assert!(s.spooled > 0 && s.dropped > 0, "{s:?}");
    assert!(s.depth_bytes <= 4096, "{s:?}");
    assert!(
        tally_gateway_core::telemetry::SPOOL_FULL.get() >= full_before + s.dropped,
        "the spool-full counter counts every dropped event"
    );
    match policy {
        SpoolFullPolicy::DenyManaged => {
            assert!(
                !sink.accepts_managed(),
                "a full spool denies managed traffic"
            )
        }
        SpoolFullPolicy::KeepServing => assert!(sink.accepts_managed()),
    }

    broker.start();
    broker.create_topic(&topic, PARTITIONS).await;
    eventually("the spool to drain", Duration::from_secs(30), || {
        sink.stats().depth_events == 0
    })
    .await;
    assert!(
        sink.accepts_managed(),
        "managed traffic is served again once the spool has room"
    );
    // Room again: new events are stored and shipped.
    let after = usage("acct_full", 1000);
    sink.send(after.clone());
    let stored = s.spooled;
    let got = consume_until(
        &broker.bootstrap(),
        &topic,
        Duration::from_secs(20),
        move |m| m.iter().any(|r| r.event.event_id == after.event_id),
    )
    .await;
    assert!(distinct_ids(&got).len() as u64 >= stored);
    let end = shutdown(runner).await;
    assert_eq!(end.dropped, s.dropped, "{end:?}");
    assert_eq!(end.spooled, stored + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_under_deny_managed_refuses_managed_traffic_until_it_drains() {
    logs();
    overflow(SpoolFullPolicy::DenyManaged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_under_keep_serving_drops_and_counts_but_serves() {
    logs();
    overflow(SpoolFullPolicy::KeepServing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_managed_refuses_new_traffic_at_the_high_water_mark_before_any_event_is_lost() {
    logs();
    let mut broker = Broker::reserve();
    let topic = topic_name();
    let dir = tempfile::tempdir().unwrap();
    let max: u64 = 64 << 10;
    let (sink, runner) = KafkaSink::start(config(
        &broker.bootstrap(),
        &topic,
        dir.path(),
        max,
        SpoolFullPolicy::DenyManaged,
    ))
    .await
    .unwrap();

    // Admitted requests report their usage, one at a time, until managed traffic is refused.
    let mut sent = 0u64;
    while sink.accepts_managed() {
        assert!(sent < 500, "never refused: {:?}", sink.stats());
        sink.send(usage("acct_hw", sent as u32));
        sent += 1;
        eventually("the event stored", Duration::from_secs(10), || {
            let s = sink.stats();
            s.spooled + s.dropped == sent
        })
        .await;
    }
    let s = sink.stats();
    assert_eq!(s.dropped, 0, "refused before anything was lost: {s:?}");
    assert!(
        s.depth_bytes > max / 100 * tally_gateway_core::kafka_sink::HIGH_WATER_PERCENT,
        "{s:?}"
    );
    assert!(s.depth_bytes <= max, "{s:?}");

    // Requests admitted just before the mark finish later: their usage fits in the reserve.
    for i in 0..5 {
        sink.send(usage("acct_hw", 1000 + i));
    }
    eventually("the late events stored", Duration::from_secs(10), || {
        sink.stats().spooled == sent + 5
    })
    .await;
    assert_eq!(sink.stats().dropped, 0, "{:?}", sink.stats());
    assert!(!sink.accepts_managed());

    broker.start();
    broker.create_topic(&topic, PARTITIONS).await;
    eventually(
        "managed traffic admitted again",
        Duration::from_secs(30),
        || sink.accepts_managed(),
    )
    .await;
    let n = sent as usize + 5;
    let got = consume_until(
        &broker.bootstrap(),
        &topic,
        Duration::from_secs(30),
        move |m| distinct_ids(m).len() >= n,
    )
    .await;
    assert_eq!(distinct_ids(&got).len(), n);
    let end = shutdown(runner).await;
    assert_eq!((end.dropped, end.spooled), (0, sent + 5), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_delivery_timeout_is_retried_from_the_spool_in_order() {
    logs();
    let mut broker = Broker::launch();
    let topic = topic_name();
    broker.create_topic(&topic, PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        &broker.bootstrap(),
        &topic,
        dir.path(),
        16 << 20,
        SpoolFullPolicy::DenyManaged,
    );
    // Deliveries fail fast during the outage, so the shipper's own retry does the work.
    cfg.client_properties
        .retain(|(k, _)| k != "message.timeout.ms");
    cfg.client_properties
        .push(("message.timeout.ms".into(), "800".into()));
    let (sink, runner) = KafkaSink::start(cfg).await.unwrap();

    let before: Vec<Event> = (0..50)
        .map(|i| usage(&format!("acct_{}", i % 4), i))
        .collect();
    for e in &before {
        sink.send(e.clone());
    }
    eventually("the first events to ship", Duration::from_secs(20), || {
        let s = sink.stats();
        s.shipped >= 50 && s.depth_events == 0
    })
    .await;

    broker.stop();
    let during: Vec<Event> = (0..300)
        .map(|i| usage(&format!("acct_{}", i % 4), 100 + i))
        .collect();
    for e in &during {
        sink.send(e.clone());
    }
    // Longer than several delivery timeouts: the records fail and go back to the spool's head.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = sink.stats();
    assert_eq!(s.depth_events, 300, "{s:?}");
    assert!(sink.accepts_managed());

    // The restarted broker (memory storage) has forgotten the topic and this producer.
    broker.start();
    broker.create_topic(&topic, PARTITIONS).await;
    eventually(
        "the spool to drain after the outage",
        Duration::from_secs(30),
        || sink.stats().depth_events == 0,
    )
    .await;
    let wanted: HashSet<Uuid> = during.iter().map(|e| e.event_id).collect();
    let w = wanted.clone();
    let got = consume_until(
        &broker.bootstrap(),
        &topic,
        Duration::from_secs(20),
        move |m| distinct_ids(m).is_superset(&w),
    )
    .await;
    let got: Vec<Received> = got
        .into_iter()
        .filter(|m| wanted.contains(&m.event.event_id))
        .collect();
    assert_eq!(
        first_arrival_order(&got),
        sent_order(&during),
        "in order per account"
    );
    let s = shutdown(runner).await;
    assert_eq!((s.depth_events, s.dropped), (0, 0), "{s:?}");
}

mod proxy_policy {
    //! The deny-managed policy as clients see it: the proxy over real sockets with a full spool.

    use std::sync::Arc;

    use secrecy::SecretString;
    use serde_json::{Value, json};
    use tally_gateway_core::config::GatewayConfig;
    use tally_gateway_core::decisions::DecisionCache;
    use tally_gateway_core::error::GatewayError;
    use tally_gateway_core::proxy::{
        self, Authenticator, Caller, CredentialSource, CustomProvider, Gateway, UpstreamKey,
    };
    use tally_ledger::{Decision, DecisionReason, Money};

    use super::*;

    const MANAGED_KEY: &str = "sk-managed-openai-1";
    const BYOK_KEY: &str = "sk-byok-beta-1";

    #[derive(Debug)]
    struct Auth;

    impl Authenticator for Auth {
        fn verify(&self, token: &str, _endpoint_id: &str) -> Result<Caller, GatewayError> {
            let account = match token {
                "tly_managed" => "acme",
                "tly_byok" => "beta",
                _ => return Err(GatewayError::Unauthenticated),
            };
            Ok(Caller {
                account_id: account.into(),
                endpoint_id: "default".into(),
                api_key_id: format!("key_{account}"),
            })
        }
    }

    /// `beta` brings its own OpenAI key; `acme` uses the operator's.
    #[derive(Debug)]
    struct Creds;

    impl CredentialSource for Creds {
        fn credentials_for(
            &self,
            account_id: &str,
            _api_key_id: &str,
            provider: &str,
        ) -> Vec<Arc<UpstreamKey>> {
            if account_id != "beta" || provider != "openai" {
                return Vec::new();
            }
            vec![Arc::new(UpstreamKey {
                credential_id: "cred-byok".into(),
                account_id: "beta".into(),
                provider: "openai".into(),
                kind: CredentialKind::Byok,
                api_key_id: None,
                masked: String::new(),
                api_key: SecretString::from(BYOK_KEY),
            })]
        }

        fn custom_provider(&self, _account_id: &str, _provider: &str) -> Option<CustomProvider> {
            None
        }
    }

    async fn chat(base: &str, token: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(token)
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_makes_the_proxy_refuse_managed_requests_with_503_until_it_drains() {
        logs();
        let (mock_addr, mock) = tally_gateway_core::mock::spawn("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut broker = Broker::reserve();
        let topic = topic_name();
        let dir = tempfile::tempdir().unwrap();
        let (sink, runner) = KafkaSink::start(config(
            &broker.bootstrap(),
            &topic,
            dir.path(),
            4096,
            SpoolFullPolicy::DenyManaged,
        ))
        .await
        .unwrap();

        let mut gw_config = GatewayConfig::default();
        gw_config
            .base_url_overrides
            .insert("openai".into(), format!("http://{mock_addr}/v1"));
        gw_config
            .managed_keys
            .insert("openai".into(), vec![SecretString::from(MANAGED_KEY)]);
        let decisions = DecisionCache::new();
        decisions.apply(Decision {
            account_id: "acme".into(),
            allow_managed: true,
            allow_byok: true,
            reason: DecisionReason::Ok,
            available_usd: Money::from_cents(10_000),
            spendable_usd: Money::from_cents(10_000),
            debt_usd: Money::ZERO,
            low_balance_threshold_usd: Money::ZERO,
            low_balance: false,
            evaluated_at: Utc::now(),
            next_change_at: None,
        });
        let gw = Gateway::new(
            gw_config,
            Arc::new(Auth),
            Arc::new(Creds),
            decisions,
            Arc::new(sink.clone()),
            Arc::new(Utc::now),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, proxy::router(Arc::new(gw))).await });

        let (s, b) = chat(&base, "tly_managed").await;
        assert_eq!(s, 200, "{b}");

        for i in 0..40 {
            sink.send(usage("acct_other", i));
        }
        eventually("the spool to overflow", Duration::from_secs(10), || {
            let s = sink.stats();
            s.spooled + s.dropped == s.accepted && s.dropped > 0
        })
        .await;
        let managed_calls = mock.calls(MANAGED_KEY);
        let (s, b) = chat(&base, "tly_managed").await;
        assert_eq!(s, 503, "{b}");
        assert_eq!(b["error"]["code"], "metering_unavailable", "{b}");
        assert_eq!(b["error"]["type"], "api_error", "{b}");
        assert_eq!(
            mock.calls(MANAGED_KEY),
            managed_calls,
            "no unmetered managed call"
        );
        // The customer's own key costs the operator nothing: still served.
        let (s, b) = chat(&base, "tly_byok").await;
        assert_eq!(s, 200, "{b}");

        broker.start();
        broker.create_topic(&topic, PARTITIONS).await;
        eventually("the spool to drain", Duration::from_secs(30), || {
            sink.accepts_managed()
        })
        .await;
        let (s, b) = chat(&base, "tly_managed").await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(mock.calls(MANAGED_KEY), managed_calls + 1);
        shutdown(runner).await;
    }
}
