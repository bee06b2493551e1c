//! Ingest throughput: usage events from the broker into the ledger with every projection
//! (events, accounts, lots, double-entry ledger lines, hourly rollups), and, in the same run, a
//! raw `COPY` of the same event rows into the same PostgreSQL as the baseline.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/tally_bench \
//! TALLY_BENCH_KAFKA_BROKERS=127.0.0.1:9092 \
//! cargo run --release --example ingest_throughput -- [EVENTS] [ACCOUNTS] [PARTITIONS]
//! ```
//!
//! The database named in `DATABASE_URL` is dropped and re-created: point it at a scratch one.
#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::TryStreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::{Connection, PgConnection};
use tally_ingest::Store;
use tally_ingest::kafka::{Ingest, KafkaConfig, Topics};
use tally_ledger::Event;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: EVENTS ACCOUNTS PARTITIONS"))
        .collect();
    let events_n = args.first().copied().unwrap_or(200_000);
    let accounts_n = args.get(1).copied().unwrap_or(1_000);
    let partitions = args.get(2).copied().unwrap_or(4) as i32;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/tally_bench".into());
    let brokers = std::env::var("TALLY_BENCH_KAFKA_BROKERS")
        .expect("TALLY_BENCH_KAFKA_BROKERS=host:port of a Kafka-protocol broker");

    // A fresh database, so every run starts from the same state.
    let (server, db) = url
        .rsplit_once('/')
        .expect("DATABASE_URL ends with /dbname");
    let mut admin = PgConnection::connect(&format!("{server}/postgres")).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists \"{db}\" with (force)"
    )))
    .execute(&mut admin)
    .await?;
    tally_ingest::db::ensure_database(&url).await?;
    let pool = tally_ingest::db::connect(&url).await?;
    tally_ingest::db::migrate(&pool).await?;
    let now = Utc::now();
    let store = Arc::new(Store::open(pool.clone(), now).await?);

    // Accounts with credits, applied directly (not part of the measurement).
    let mut setup = Vec::new();
    for a in 0..accounts_n {
        let acc = format!("acct-{a}");
        setup.push(event(
            serde_json::json!({"event_id": uuid::Uuid::new_v4(), "occurred_at": now,
            "account_id": acc, "type": "account_opened", "name": acc}),
        ));
        setup.push(event(
            serde_json::json!({"event_id": uuid::Uuid::new_v4(), "occurred_at": now,
            "account_id": acc, "type": "credits_purchased", "lot_id": uuid::Uuid::new_v4(),
            "amount_usd": "1000000.00"}),
        ));
    }
    for chunk in setup.chunks(5_000) {
        store
            .ingest(chunk, tally_ingest::BatchMode::AllOrNothing, now)
            .await?;
    }

    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut cfg = KafkaConfig::new(brokers);
    cfg.topics = Topics {
        usage: format!("bench{}.usage", &run[..8]),
        credits: format!("bench{}.credits", &run[..8]),
        decisions: format!("bench{}.decisions", &run[..8]),
        metrics: format!("bench{}.metrics", &run[..8]),
        dead_letter: format!("bench{}.dlq", &run[..8]),
    };
    cfg.partitions = partitions;
    cfg.group_id = format!("bench{}", &run[..8]);
    tally_ingest::kafka::ensure_topics(&cfg).await?;

    // The events, produced before ingest starts so the broker is not the bottleneck measured.
    let models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5"];
    let producer: FutureProducer = cfg
        .client()
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let t = Instant::now();
    let mut pending = Vec::with_capacity(events_n);
    for i in 0..events_n {
        let acc = format!("acct-{}", i % accounts_n);
        let model = models[i % models.len()];
        let provider = if model.starts_with("claude") {
            "anthropic"
        } else {
            "openai"
        };
        let kind = if i % 4 == 0 { "byok" } else { "managed" };
        let payload = serde_json::json!({
            "event_id": uuid::Uuid::new_v4(), "occurred_at": now, "account_id": acc, "type": "usage",
            "request_id": format!("req-{i}"), "attempt": 1, "endpoint_id": "default",
            "api_key_id": format!("key-{}", i % 7), "provider": provider, "model": model,
            "credential_kind": kind, "credential_id": format!("{kind}-{provider}"),
            "tokens": {"input": 1200, "cached_input": 0, "output": 300, "reasoning": 0},
            "token_source": "provider", "upstream_latency_ms": 420, "total_latency_ms": 431,
            "status": 200, "streaming": false
        })
        .to_string();
        let topic = cfg.topics.usage.clone();
        let p = producer.clone();
        pending.push(tokio::spawn(async move {
            p.send(
                FutureRecord::to(&topic).key(&acc).payload(&payload),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| e)
        }));
    }
    for p in pending {
        p.await??;
    }
    producer.flush(Duration::from_secs(30))?;
    let produce_secs = t.elapsed().as_secs_f64();
    println!(
        "produced {events_n} usage events over {accounts_n} accounts into {partitions} partitions in {produce_secs:.2} s"
    );

    // Ingest: broker → decode → dedupe → ledger with all projections → offsets committed.
    let base: i64 = sqlx::query_scalar("select count(*) from event")
        .fetch_one(&pool)
        .await?;
    let (stop, rx) = watch::channel(false);
    let ingest = Arc::new(Ingest::new(
        cfg.clone(),
        Arc::clone(&store),
        Arc::new(Utc::now),
        "bench",
    )?);
    // The end is seen through the store's own counter of committed usage events, read in
    // process: polling `count(*)` on the event table every 50 ms (TALLY_BENCH_POLL=sql, the
    // first version of this benchmark) takes a good share of the database's CPU away from the
    // ingest it measures.
    let applied = || {
        tally_ingest::telemetry::EVENTS
            .with_label_values(&["usage", "applied"])
            .get()
    };
    let poll_sql = std::env::var("TALLY_BENCH_POLL").is_ok_and(|v| v == "sql");
    let applied_base = applied();
    let t = Instant::now();
    let task = tokio::spawn(Arc::clone(&ingest).run(rx));
    loop {
        if poll_sql {
            let n: i64 = sqlx::query_scalar("select count(*) from event")
                .fetch_one(&pool)
                .await?;
            if n - base >= events_n as i64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            if applied() - applied_base >= events_n as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let ingest_secs = t.elapsed().as_secs_f64();
    stop.send(true)?;
    task.await??;
    let n: i64 = sqlx::query_scalar("select count(*) from event")
        .fetch_one(&pool)
        .await?;
    assert_eq!(
        n - base,
        events_n as i64,
        "every event is in the ledger once"
    );
    let ingest_rate = events_n as f64 / ingest_secs;

    // Baseline: the same event rows, raw COPY into an identical table, no projections.
    let mut conn = pool.acquire().await?;
    sqlx::query("create table event_copy (like event including all)")
        .execute(&mut *conn)
        .await?;
    let mut rows = Vec::new();
    {
        let mut out = conn
            .copy_out_raw("copy (select * from event where kind = 'usage') to stdout")
            .await?;
        while let Some(chunk) = out.try_next().await? {
            rows.extend_from_slice(&chunk);
        }
    }
    let t = Instant::now();
    let mut copy = conn.copy_in_raw("copy event_copy from stdin").await?;
    copy.send(rows).await?;
    let copied = copy.finish().await?;
    let copy_secs = t.elapsed().as_secs_f64();
    let copy_rate = copied as f64 / copy_secs;

    println!(
        "ingest (broker → ledger, all projections): {events_n} events in {ingest_secs:.2} s = {ingest_rate:.0} events/s"
    );
    println!(
        "raw COPY of the same {copied} event rows:     {copy_secs:.2} s = {copy_rate:.0} rows/s"
    );
    println!("ratio ingest / raw COPY: {:.2}", ingest_rate / copy_rate);
    Ok(())
}

fn event(v: serde_json::Value) -> Event {
    serde_json::from_value(v).expect("valid event")
}
