//! Stopping the stack while gateway requests are under way (a slow non-streaming request, a
//! slow stream, and a request whose client hung up while the provider still works): the
//! requests finish, and the usage of every one is recorded — on the usage topic through the
//! Kafka sink, in the ledger through the in-process sink — before `Stack::stop` returns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};
use sqlx::PgPool;
use tally_gateway_core::mock::MockBehavior;

/// The provider takes this long: the stack is stopped while it works.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(1500);

/// Starts the three requests against `gateway` and returns once the provider has them all.
/// The handles yield the request ids the clients saw (none for the one that hung up).
async fn requests_under_way(
    live: &common::LiveStack,
    token: &str,
) -> Vec<tokio::task::JoinHandle<Option<String>>> {
    live.mock.set_behavior(
        tally::demo::DEMO_MANAGED_OPENAI_KEY,
        MockBehavior::latency(UPSTREAM_LATENCY),
    );
    let calls_before = live.mock.calls(tally::demo::DEMO_MANAGED_OPENAI_KEY);
    let url = format!("{}/v1/chat/completions", live.gateway);
    let body = |stream: bool| {
        json!({"model": "openai:gpt-4o", "stream": stream,
               "messages": [{"role": "user", "content": "hello there"}]})
    };
    let mut handles = Vec::new();
    for stream in [false, true] {
        let (url, token, body) = (url.clone(), token.to_string(), body(stream));
        handles.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "stream: {stream}");
            let id = r.headers()["x-tally-request-id"]
                .to_str()
                .unwrap()
                .to_string();
            let text = r.text().await.unwrap();
            if stream {
                assert!(
                    text.contains("data: [DONE]"),
                    "the stream ran to its end: {text}"
                );
            }
            Some(id)
        }));
    }
    // This client gives up long before the provider answers; the attempt goes on.
    let (u, t, b) = (url.clone(), token.to_string(), body(false));
    handles.push(tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(u)
            .bearer_auth(t)
            .timeout(Duration::from_millis(300))
            .json(&b)
            .send()
            .await;
        assert!(r.is_err(), "the client hung up before the answer");
        None
    }));
    let until = Instant::now() + Duration::from_secs(10);
    while live.mock.calls(tally::demo::DEMO_MANAGED_OPENAI_KEY) < calls_before + 3 {
        assert!(
            Instant::now() < until,
            "the provider never got the requests"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the impatient client hang up before the stop.
    tokio::time::sleep(Duration::from_millis(400)).await;
    handles
}

async fn request_ids(handles: Vec<tokio::task::JoinHandle<Option<String>>>) -> HashSet<String> {
    let mut ids = HashSet::new();
    for h in handles {
        ids.extend(h.await.unwrap());
    }
    assert_eq!(ids.len(), 2);
    ids
}

/// Usage events of `account` on the topic, as JSON, once there are `n` of them.
fn usage_on_topic(brokers: &str, topic: &str, account: &str, n: usize) -> Vec<Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let partitions = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap()
        .topics()[0]
        .partitions()
        .len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, i32::try_from(p).unwrap(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let mut out: Vec<Value> = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < until,
            "only {} of {n} usage events on {topic}: {out:?}",
            out.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            if v["type"] == "usage" && v["account_id"] == account {
                out.push(v);
            }
        }
    }
    out
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn a_kafka_gateway_stopped_mid_request_ships_the_usage_of_every_request(pool: PgPool) {
    let spool = tempfile::tempdir().unwrap();
    let kafka = common::kafka_settings(spool.path());
    let (brokers, topic) = (
        kafka.config.brokers.clone(),
        kafka.config.topics.usage.clone(),
    );
    let live = common::live_stack_with(&pool, Some(kafka), |_, _| {}).await;
    let token = common::account_with_key(&live.ledger, "acme", Some("50.00")).await;
    // The purchase reaches the gateway's decision cache.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let handles = requests_under_way(&live, &token).await;
    live.stack.stop().await.unwrap();
    let ids = request_ids(handles).await;

    let events = tokio::task::spawn_blocking(move || usage_on_topic(&brokers, &topic, "acme", 3))
        .await
        .unwrap();
    let shipped: HashSet<String> = events
        .iter()
        .map(|e| e["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(shipped.len(), 3, "{events:?}");
    assert!(shipped.is_superset(&ids), "{shipped:?} vs {ids:?}");
    assert!(
        events.iter().all(|e| e["status"] == 200),
        "every attempt succeeded upstream: {events:?}"
    );
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn an_in_process_gateway_stopped_mid_request_applies_the_usage_of_every_request(
    pool: PgPool,
) {
    let live = common::live_stack(&pool, |_, _| {}).await;
    let token = common::account_with_key(&live.ledger, "acme", Some("50.00")).await;

    let handles = requests_under_way(&live, &token).await;
    live.stack.stop().await.unwrap();
    // Read at once: the ledger has them when `stop` returns.
    let applied: Vec<String> = sqlx::query_scalar(
        "select payload->>'request_id' from event where account_id = 'acme' and kind = 'usage'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let ids = request_ids(handles).await;
    let applied: HashSet<String> = applied.into_iter().collect();
    assert_eq!(applied.len(), 3, "{applied:?}");
    assert!(applied.is_superset(&ids), "{applied:?} vs {ids:?}");
}
