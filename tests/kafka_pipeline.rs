//! The Kafka pipeline against a real Kafka-protocol broker (tansu, started by tests/run.sh):
//! credits and usage through the ingest group into the ledger, duplicates, a crash between the
//! database commit and the offset commit, poison messages, two ingest members sharing the
//! partitions, and decisions back to a gateway (with the propagation delay measured).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use tally::config::KafkaSettings;
use tally_gateway_core::decisions::DecisionCache;
use tally_gateway_core::metrics::GlobalMetrics;
use tally_ingest::Store;
use tally_ingest::kafka::{Fault, HEADER_DLQ_REASON, Ingest, KafkaConfig};
use tokio::sync::watch;

struct Pipe {
    settings: KafkaSettings,
    store: Arc<Store>,
    pool: PgPool,
    producer: FutureProducer,
    _spool: tempfile::TempDir,
}

async fn pipe(pool: PgPool) -> Pipe {
    let spool = tempfile::tempdir().unwrap();
    let settings = common::kafka_settings(spool.path());
    tally::pipeline::prepare(&settings).await.unwrap();
    let store = Arc::new(Store::open(pool.clone(), Utc::now()).await.unwrap());
    let producer = settings.config.producer().unwrap();
    Pipe {
        settings,
        store,
        pool,
        producer,
        _spool: spool,
    }
}

impl Pipe {
    fn cfg(&self) -> &KafkaConfig {
        &self.settings.config
    }

    fn ingest(&self, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        tally::pipeline::start_ingest(
            &self.settings,
            Arc::clone(&self.store),
            Arc::new(Utc::now),
            stop,
        )
        .unwrap()
    }

    async fn produce(&self, topic: &str, key: Option<&str>, payload: &[u8]) {
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    async fn produce_event(&self, topic: &str, event: &Value) {
        let key = event["account_id"].as_str().unwrap().to_string();
        self.produce(topic, Some(&key), event.to_string().as_bytes())
            .await;
    }

    /// Opens `account` with `amount` of purchased credits, through the credits topic.
    async fn open_with_credits(&self, account: &str, amount: &str) {
        let now = Utc::now();
        let credits = self.cfg().topics.credits.clone();
        self.produce_event(
            &credits,
            &json!({"event_id": uuid::Uuid::new_v4(), "occurred_at": now, "account_id": account,
                    "type": "account_opened", "name": account, "low_balance_threshold_usd": "1.00"}),
        )
        .await;
        self.produce_event(
            &credits,
            &json!({"event_id": uuid::Uuid::new_v4(), "occurred_at": now, "account_id": account,
                    "type": "credits_purchased", "lot_id": uuid::Uuid::new_v4(), "amount_usd": amount}),
        )
        .await;
    }

    async fn event_count(&self) -> i64 {
        sqlx::query_scalar("select count(*) from event")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn wait_for_events(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.event_count().await;
            if got >= n {
                assert_eq!(got, n, "more events than were sent");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {got} of {n} events reached the ledger"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn burned(&self, account: &str) -> Decimal {
        sqlx::query_scalar(
            "select burned_usd + debt_incurred_usd from account where account_id = $1",
        )
        .bind(account)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Every message of `topic` from the beginning, waiting until `n` arrived.
    async fn read_topic(&self, topic: &str, n: usize) -> Vec<rdkafka::message::OwnedMessage> {
        let consumer: StreamConsumer = self
            .cfg()
            .client()
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.cfg().partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while out.len() < n {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => out.push(m.detach()),
                Ok(Err(e)) => panic!("reading {topic}: {e}"),
                Err(_) => panic!("only {} of {n} messages on {topic}", out.len()),
            }
        }
        out
    }
}

fn usage_event(account: &str, n: u32, input: i64, output: i64) -> Value {
    common::usage(
        account,
        n,
        Utc::now(),
        "key-1",
        "managed",
        "openai:gpt-4o",
        input,
        output,
    )
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn credits_and_usage_flow_through_the_ingest_group_once_each(pool: PgPool) {
    let p = pipe(pool).await;
    let (stop, rx) = watch::channel(false);
    let ingest = p.ingest(rx);
    p.open_with_credits("acme", "50.00").await;
    // Usage for an account the ledger does not know yet is refused (dead-lettered), and the
    // credits topic is not ordered with the usage topic: let the account land first.
    p.wait_for_events(2).await;
    let usage_topic = p.cfg().topics.usage.clone();
    for n in 0..40 {
        p.produce_event(&usage_topic, &usage_event("acme", n, 1_000, 500))
            .await;
    }
    p.wait_for_events(42).await;
    let first = p.burned("acme").await;
    assert!(first > Decimal::ZERO);
    // Every usage event delivered a second time (a broker, a producer retry or a replayed spool
    // may all do this), then one new event with the same tokens.
    for n in 0..40 {
        p.produce_event(&usage_topic, &usage_event("acme", n, 1_000, 500))
            .await;
    }
    p.produce_event(&usage_topic, &usage_event("acme", 40, 1_000, 500))
        .await;
    p.wait_for_events(43).await;
    let after = p.burned("acme").await;
    assert_eq!(
        after - first,
        first / Decimal::from(40),
        "only the new event was charged; the 40 redelivered ones were absorbed"
    );
    let decisions = p.cfg().topics.decisions.clone();
    let msgs = p.read_topic(&decisions, 1).await;
    let d: Value = serde_json::from_slice(msgs[0].payload().unwrap()).unwrap();
    assert_eq!(d["account_id"], "acme");
    stop.send(true).unwrap();
    ingest.await.unwrap().unwrap();
}

/// An ingest member that dies at `fault` in its first usage batch, then a new member of the
/// same group: every event counted exactly once.
async fn crash_and_recover(pool: PgPool, fault: Fault) {
    let p = pipe(pool).await;
    let (stop, rx) = watch::channel(false);
    let opener = p.ingest(rx);
    p.open_with_credits("acme", "5.00").await;
    p.wait_for_events(2).await;
    stop.send(true).unwrap();
    opener.await.unwrap().unwrap();

    let usage_topic = p.cfg().topics.usage.clone();
    for n in 0..20 {
        p.produce_event(&usage_topic, &usage_event("acme", n, 10_000, 1_000))
            .await;
    }
    let doomed = Arc::new(
        Ingest::new(
            p.cfg().clone(),
            Arc::clone(&p.store),
            Arc::new(Utc::now),
            "doomed",
        )
        .unwrap(),
    );
    doomed.inject_fault(fault);
    let (_keep, rx) = watch::channel(false);
    // The member ends by itself at the fault, as a crash would end it: no offsets committed.
    tokio::time::timeout(Duration::from_secs(60), Arc::clone(&doomed).run(rx))
        .await
        .expect("the faulty member stops at its fault")
        .unwrap();
    drop(doomed);
    let written = p.event_count().await;
    match fault {
        Fault::CrashBeforeApply => assert_eq!(written, 2, "nothing was written before the crash"),
        _ => assert!(written > 2, "the batch reached the ledger before the crash"),
    }

    let (stop, rx) = watch::channel(false);
    let next = p.ingest(rx);
    p.produce_event(&usage_topic, &usage_event("acme", 999, 10_000, 1_000))
        .await;
    p.wait_for_events(23).await;
    let charged: i64 = sqlx::query_scalar(
        "select count(distinct e.event_seq) from ledger_entry e join event v on v.seq = e.event_seq where v.kind = 'usage'",
    )
    .fetch_one(&p.pool)
    .await
    .unwrap();
    assert_eq!(charged, 21, "every usage event charged exactly once");
    // 21 identical events: the revenue is exactly 21 times one event's.
    let revenue = |event_id: Option<uuid::Uuid>| {
        let pool = p.pool.clone();
        async move {
            sqlx::query_scalar::<_, Decimal>(
                "select coalesce(sum(e.amount_usd), 0) from ledger_entry e join event v on v.seq = e.event_seq
                 where e.ledger_account in ('revenue_upstream_cost', 'revenue_processing_fee')
                   and ($1::uuid is null or v.event_id = $1)",
            )
            .bind(event_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let sentinel_id = usage_event("acme", 999, 0, 0)["event_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let one = revenue(Some(sentinel_id)).await;
    assert_ne!(one, Decimal::ZERO);
    assert_eq!(revenue(None).await, one * Decimal::from(21));
    stop.send(true).unwrap();
    next.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn a_crash_between_the_database_commit_and_the_offset_commit_counts_nothing_twice(
    pool: PgPool,
) {
    crash_and_recover(pool, Fault::CrashAfterApply).await;
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn a_crash_before_the_database_commit_loses_nothing(pool: PgPool) {
    crash_and_recover(pool, Fault::CrashBeforeApply).await;
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn poison_messages_go_to_the_dead_letter_topic_and_never_block_the_partition(pool: PgPool) {
    let p = pipe(pool).await;
    let (stop, rx) = watch::channel(false);
    let ingest = p.ingest(rx);
    p.open_with_credits("acme", "10.00").await;
    p.wait_for_events(2).await;
    let usage_topic = p.cfg().topics.usage.clone();
    p.produce(&usage_topic, Some("acme"), b"\x00\x01 not json")
        .await;
    let mut negative = usage_event("acme", 1, 10, 10);
    negative["tokens"]["input"] = json!(-5);
    p.produce_event(&usage_topic, &negative).await;
    p.produce(
        &usage_topic,
        Some("someone-else"),
        usage_event("acme", 2, 10, 10).to_string().as_bytes(),
    )
    .await;
    // An event the ledger refuses: usage for an account that was never opened.
    p.produce_event(&usage_topic, &usage_event("ghost", 3, 10, 10))
        .await;
    p.produce_event(&usage_topic, &usage_event("acme", 4, 10, 10))
        .await;
    p.wait_for_events(3).await;
    let dlq = p.cfg().topics.dead_letter.clone();
    let dead = p.read_topic(&dlq, 4).await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| {
            let h = m.headers().unwrap();
            let r = h
                .iter()
                .find(|h| h.key == HEADER_DLQ_REASON)
                .unwrap()
                .value
                .unwrap();
            String::from_utf8(r.to_vec()).unwrap()
        })
        .collect();
    let all = reasons.join(" | ");
    for expected in [
        "malformed event",
        "refused",
        "key is not the event's account_id",
    ] {
        assert!(all.contains(expected), "{expected:?} missing in {all}");
    }
    assert!(
        tally_ingest::telemetry::DEAD_LETTERS.get() >= 4,
        "dead letters are counted"
    );
    stop.send(true).unwrap();
    ingest.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn two_ingest_members_share_the_partitions_and_survive_a_rebalance(pool: PgPool) {
    let p = pipe(pool).await;
    let (stop_a, rx_a) = watch::channel(false);
    let (stop_b, rx_b) = watch::channel(false);
    let a = p.ingest(rx_a);
    let b = p.ingest(rx_b);
    let accounts: Vec<String> = (0..12).map(|i| format!("team-{i}")).collect();
    for acc in &accounts {
        p.open_with_credits(acc, "100.00").await;
    }
    p.wait_for_events(24).await;
    let usage_topic = p.cfg().topics.usage.clone();
    let mut sent = 0u32;
    for round in 0..25u32 {
        for (i, acc) in accounts.iter().enumerate() {
            p.produce_event(
                &usage_topic,
                &usage_event(acc, round * 100 + i as u32, 1_000, 100),
            )
            .await;
            sent += 1;
        }
        if round == 10 {
            // Member A leaves mid-stream: its partitions move to B, mid-batch or not.
            stop_a.send(true).unwrap();
        }
    }
    p.wait_for_events(i64::from(sent) + 24).await;
    a.await.unwrap().unwrap();
    // Exactly one charge per usage event on every account.
    let first = p.burned(&accounts[0]).await;
    for acc in &accounts {
        assert_eq!(p.burned(acc).await, first, "{acc}");
    }
    let charged: i64 = sqlx::query_scalar(
        "select count(distinct event_seq) from ledger_entry e join event v on v.seq = e.event_seq where v.kind = 'usage'",
    )
    .fetch_one(&p.pool)
    .await
    .unwrap();
    assert_eq!(charged, i64::from(sent));
    stop_b.send(true).unwrap();
    b.await.unwrap().unwrap();
}

/// From the usage event that exhausts an account's credits to a gateway (another process: its
/// only news is the decisions topic) denying the account's managed traffic. Prints the
/// distribution; the target is under 1 s at p99.
#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn exhaustion_reaches_other_gateways_through_the_decisions_topic(pool: PgPool) {
    let p = pipe(pool).await;
    let (stop, rx) = watch::channel(false);
    let ingest = p.ingest(rx.clone());
    let cache = DecisionCache::new();
    let global = Arc::new(GlobalMetrics::new());
    let feedback = tally::pipeline::start_feedback(
        &p.settings,
        Arc::clone(&cache),
        Arc::clone(&global),
        Arc::new(Utc::now),
        rx,
    )
    .await
    .unwrap();
    let usage_topic = p.cfg().topics.usage.clone();
    let rounds: u64 = 20;
    let mut delays = Vec::new();
    for r in 0..rounds {
        let account = format!("acct-{r}");
        p.open_with_credits(&account, "5.00").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cache.allow_managed(&account, Utc::now()) {
            assert!(Instant::now() < deadline, "{account} never allowed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // 1M output tokens of gpt-4o: $10, twice the credits.
        let started = Instant::now();
        p.produce_event(&usage_topic, &usage_event(&account, 1, 0, 1_000_000))
            .await;
        while cache.allow_managed(&account, Utc::now()) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{account} never denied"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(started.elapsed());
    }
    delays.sort();
    let pct =
        |q: f64| delays[((q * delays.len() as f64).ceil() as usize).clamp(1, delays.len()) - 1];
    eprintln!(
        "decision propagation over Kafka ({rounds} rounds): p50 {:?}, p99 {:?}, max {:?}",
        pct(0.50),
        pct(0.99),
        delays[delays.len() - 1]
    );
    // Fleet metrics arrive on their topic too.
    let key = ("openai".to_string(), "gpt-4o".to_string());
    let deadline = Instant::now() + Duration::from_secs(20);
    while global.load().get(&key).is_none_or(|m| m.requests < rounds) {
        assert!(
            Instant::now() < deadline,
            "the fleet metrics never showed all {rounds} attempts: {:?}",
            global.load().get(&key)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = &global.load()[&key];
    assert_eq!(m.requests, rounds);
    assert_eq!(m.latency.upstream_ms_p50, 300.0, "{m:?}");
    stop.send(true).unwrap();
    ingest.await.unwrap().unwrap();
    feedback.await.unwrap();
}
