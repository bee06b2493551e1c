//! The event pipeline over Kafka: topics, the ingest consumer group, and the feedback the
//! gateways read (decisions, fleet model metrics).
//!
//! Ingest commits offsets only after the batch is in PostgreSQL, and the store dedupes by event
//! id, so a crash or a rebalance anywhere in between re-reads some messages and counts none of
//! them twice. A message that cannot be decoded or that the ledger refuses goes to the
//! dead-letter topic (durably, before the offsets move past it) and never blocks its partition.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tally_ledger::{Decision, Event, EventBody, decide};
use tokio::sync::watch;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::StoreError;
use crate::fleet::{FleetAggregator, FleetReport};
use crate::store::{BatchMode, BatchReport, MAX_BATCH_EVENTS, Store};
use crate::telemetry;

/// W3C trace context headers carried by every event message.
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";
/// Why a dead letter was set aside, and where it came from.
pub const HEADER_DLQ_REASON: &str = "tally-dlq-reason";
pub const HEADER_DLQ_SOURCE: &str = "tally-dlq-source";

/// Messages taken into one ledger transaction at most.
pub const INGEST_BATCH_MAX: usize = MAX_BATCH_EVENTS;
/// A partial batch waits this long for company before it is applied.
pub const INGEST_BATCH_WAIT: Duration = Duration::from_millis(10);
/// Lanes of one ingest member, each applying its own share of the partitions: see
/// [`Ingest::run`].
pub const INGEST_LANES: usize = 2;
/// How often each ingest instance publishes its share of the fleet's model metrics.
pub const METRICS_PUBLISH_INTERVAL: Duration = Duration::from_secs(5);
/// Waits between retries of a batch the database or the broker could not take.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The longest a fetch waits on the broker for new messages. Brokers that answer a fetch only
/// when this runs out (not when data arrives) would otherwise add librdkafka's 500 ms default
/// to every hop of a decision's way back to the gateways.
const FETCH_WAIT_MAX_MS: &str = "20";
/// How long one produce may wait in the client before it is reported failed.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Lane(String),
}

/// Topic names. Every event topic is keyed by account id, so one account's events stay in
/// order on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Usage events from the gateways.
    pub usage: String,
    /// Credit and admin events (purchases, grants, voids) from other systems.
    pub credits: String,
    /// Compacted: the latest enforcement decision of every account.
    pub decisions: String,
    /// Fleet model metrics, one report per ingest instance and interval.
    pub metrics: String,
    /// Events that could not be decoded or were refused, with the reason in a header.
    pub dead_letter: String,
}

impl Default for Topics {
    fn default() -> Topics {
        Topics {
            usage: "tally.usage".into(),
            credits: "tally.credits".into(),
            decisions: "tally.decisions".into(),
            metrics: "tally.model-metrics".into(),
            dead_letter: "tally.dead-letter".into(),
        }
    }
}

#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    pub topics: Topics,
    /// Partitions of the keyed topics when this process creates them.
    pub partitions: i32,
    pub replication: i32,
    /// The ingest consumer group.
    pub group_id: String,
    /// Extra librdkafka properties (`security.protocol`, SASL, ...), applied to every client.
    pub client_properties: Vec<(String, String)>,
}

/// Kafka's rule for topic names (the broker refuses anything else).
pub fn check_topic_name(name: &str) -> Result<(), String> {
    let legal = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 249 || name == "." || name == ".." || !legal {
        return Err(format!(
            "invalid topic name {name:?}: 1 to 249 characters of [a-zA-Z0-9._-]"
        ));
    }
    Ok(())
}

/// The keys of librdkafka properties, for `Debug`: values may be credentials (SASL passwords)
/// and are never shown.
pub fn property_keys(properties: &[(String, String)]) -> Vec<&str> {
    properties.iter().map(|(k, _)| k.as_str()).collect()
}

/// Property values may be credentials (SASL passwords): only their keys are shown.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = property_keys(&self.client_properties);
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("group_id", &self.group_id)
            .field("client_properties", &keys)
            .finish()
    }
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            topics: Topics::default(),
            partitions: 12,
            replication: 1,
            group_id: "tally-ingest".into(),
            client_properties: Vec::new(),
        }
    }

    /// Checks everything that can be checked without a broker.
    pub fn validate(&self) -> Result<(), PipelineError> {
        if self.brokers.trim().is_empty()
            || self.brokers.split(',').any(|b| {
                b.trim()
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            })
        {
            return Err(PipelineError::Config(format!(
                "brokers must be host:port[,host:port...], got {:?}",
                self.brokers
            )));
        }
        let t = &self.topics;
        let names = [
            &t.usage,
            &t.credits,
            &t.decisions,
            &t.metrics,
            &t.dead_letter,
        ];
        for name in names {
            check_topic_name(name).map_err(PipelineError::Config)?;
        }
        if names.iter().collect::<HashSet<_>>().len() != names.len() {
            return Err(PipelineError::Config("topic names must differ".into()));
        }
        if !(1..=10_000).contains(&self.partitions) || !(1..=32).contains(&self.replication) {
            return Err(PipelineError::Config(
                "partitions must be 1..=10000 and replication 1..=32".into(),
            ));
        }
        if self.group_id.trim().is_empty() {
            return Err(PipelineError::Config(
                "the consumer group id is empty".into(),
            ));
        }
        Ok(())
    }

    /// A client configuration with the brokers and the operator's extra properties.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.client_properties {
            c.set(k, v);
        }
        c
    }

    /// An idempotent producer for the pipeline's own topics.
    pub fn producer(&self) -> Result<FutureProducer, PipelineError> {
        Ok(self
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000")
            .create()?)
    }
}

/// Creates the pipeline's topics when absent; existing ones are left as they are.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<(), PipelineError> {
    cfg.validate()?;
    let admin: AdminClient<DefaultClientContext> = cfg.client().create()?;
    let t = &cfg.topics;
    let replication = || TopicReplication::Fixed(cfg.replication);
    let week_ms = (7 * 24 * 3600 * 1000).to_string();
    let month_ms = (30u64 * 24 * 3600 * 1000).to_string();
    let hour_ms = (3600 * 1000).to_string();
    let topics = [
        NewTopic::new(&t.usage, cfg.partitions, replication()).set("retention.ms", &week_ms),
        NewTopic::new(&t.credits, cfg.partitions, replication()).set("retention.ms", &month_ms),
        NewTopic::new(&t.decisions, cfg.partitions, replication()).set("cleanup.policy", "compact"),
        NewTopic::new(&t.metrics, 1, replication()).set("retention.ms", &hour_ms),
        NewTopic::new(&t.dead_letter, cfg.partitions, replication()).set("retention.ms", &month_ms),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(PipelineError::Topic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// What the decisions topic carries: the decision, and when the newest event behind it
/// happened, from which a gateway measures how long the decision took to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionMessage {
    #[serde(flatten)]
    pub decision: Decision,
    pub source_event_at: Option<DateTime<Utc>>,
}

pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The ingest consumer: one member of the ingest group.
pub struct Ingest {
    cfg: KafkaConfig,
    store: Arc<Store>,
    clock: Clock,
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    instance: String,
    fleet: std::sync::Mutex<FleetAggregator>,
    fault: std::sync::atomic::AtomicU8,
    /// The highest offset this member committed, per (topic, partition).
    committed: std::sync::Mutex<HashMap<(String, i32), i64>>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("group", &self.cfg.group_id)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Applied and committed.
    Done,
    /// `stop` flipped while retrying; nothing committed.
    Stopped,
    /// An injected fault ended the member (tests).
    Crashed,
}

/// Where a test makes an ingest member die mid-batch.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    /// After the batch was read, before anything was written.
    CrashBeforeApply = 1,
    /// After the database commit, before the offset commit.
    CrashAfterApply = 2,
}

/// A decoded message: the event and the span that carries its producer's trace. The span is
/// held until the batch is committed, so it covers the event's whole time in ingest.
struct Decoded {
    event: Event,
    _span: tracing::Span,
}

struct DeadLetter {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    source: String,
    reason: String,
}

struct HeaderMap<'a>(HashMap<&'a str, &'a str>);

impl Extractor for HeaderMap<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).copied()
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().copied().collect()
    }
}

impl Ingest {
    /// Joins the ingest group on the usage and credits topics.
    pub fn new(
        cfg: KafkaConfig,
        store: Arc<Store>,
        clock: Clock,
        instance: impl Into<String>,
    ) -> Result<Ingest, PipelineError> {
        cfg.validate()?;
        let consumer: StreamConsumer = cfg
            .client()
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
            .create()?;
        consumer.subscribe(&[cfg.topics.usage.as_str(), cfg.topics.credits.as_str()])?;
        let producer = cfg.producer()?;
        Ok(Ingest {
            cfg,
            store,
            clock,
            consumer: Arc::new(consumer),
            producer,
            instance: instance.into(),
            fleet: std::sync::Mutex::new(FleetAggregator::new()),
            fault: std::sync::atomic::AtomicU8::new(Fault::None as u8),
            committed: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Consumes until `stop` flips; the batch in hand is finished (and committed) first.
    ///
    /// The assigned partitions are shared out over [`INGEST_LANES`] lanes. Each lane takes its
    /// own batches and applies them one after another, so one lane's decoding and offset commit
    /// overlap another's database write. A partition belongs to exactly one lane: its messages
    /// are applied in order, and its offsets are committed only after the database commit of
    /// their batch, in order. Events are keyed by account, and the keyed topics have the same
    /// partition count, so an account's events of every topic meet in one lane.
    pub async fn run(
        self: Arc<Self>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        let publisher = tokio::spawn(Arc::clone(&self).publish_metrics(stop.clone()));
        let lag = tokio::spawn(Arc::clone(&self).watch_lag(stop.clone()));
        let mut lanes = tokio::task::JoinSet::new();
        let mut feeds = Vec::with_capacity(INGEST_LANES);
        for _ in 0..INGEST_LANES {
            let (feed, messages) = tokio::sync::mpsc::channel(INGEST_BATCH_MAX);
            feeds.push(feed);
            lanes.spawn(Arc::clone(&self).lane(messages, stop.clone()));
        }
        let mut ended_early: Option<Option<Result<Flow, tokio::task::JoinError>>> = None;
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.changed() => break,
                ended = lanes.join_next() => {
                    ended_early = Some(ended);
                    break;
                }
                m = self.consumer.recv() => m,
            };
            let m = match next {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consume error");
                    continue;
                }
            };
            let lane = usize::try_from(m.partition()).unwrap_or(0) % INGEST_LANES;
            let Some(feed) = feeds.get(lane) else {
                continue;
            };
            // A lane a full batch behind holds the consumer back.
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                ended = lanes.join_next() => {
                    ended_early = Some(ended);
                    break;
                }
                sent = feed.send(m) => if sent.is_err() {
                    break;
                },
            }
        }
        // Messages fed to a lane but not yet in its batch are dropped uncommitted: the next
        // owner of their partitions re-reads them.
        drop(feeds);
        let failure = match ended_early {
            // Stopping: the lane saw the signal first.
            None | Some(None) | Some(Some(Ok(Flow::Stopped))) => None,
            // One lane died at an injected fault: the member dies with it, mid-batch anywhere.
            Some(Some(Ok(Flow::Crashed))) => {
                lanes.abort_all();
                None
            }
            Some(Some(Ok(Flow::Done))) => Some("an ingest lane ended on its own".to_string()),
            Some(Some(Err(e))) => Some(format!("an ingest lane failed: {e}")),
        };
        if failure.is_some() {
            lanes.abort_all();
        }
        while lanes.join_next().await.is_some() {}
        publisher.abort();
        lag.abort();
        match failure {
            // The process must not look healthy while nothing is ingested.
            Some(reason) => Err(PipelineError::Lane(reason)),
            None => Ok(()),
        }
    }

    /// One lane of [`Ingest::run`]: batches of its messages, applied and committed in order.
    async fn lane(
        self: Arc<Self>,
        mut messages: tokio::sync::mpsc::Receiver<OwnedMessage>,
        mut stop: watch::Receiver<bool>,
    ) -> Flow {
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(INGEST_BATCH_MAX);
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.changed() => None,
                m = messages.recv() => m,
            };
            let Some(first) = first else {
                return Flow::Stopped;
            };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + INGEST_BATCH_WAIT;
            while batch.len() < INGEST_BATCH_MAX {
                match tokio::time::timeout_at(deadline, messages.recv()).await {
                    Ok(Some(m)) => batch.push(m),
                    Ok(None) | Err(_) => break,
                }
            }
            match self.process(&batch, &mut stop).await {
                Flow::Done => batch.clear(),
                ended => return ended,
            }
        }
    }

    /// Applies one batch and commits its offsets. Retries (the database, the dead-letter
    /// topic) until it succeeds or the process stops; stopping mid-way commits nothing, so the
    /// next owner re-reads the batch.
    async fn process(&self, batch: &[OwnedMessage], stop: &mut watch::Receiver<bool>) -> Flow {
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut decoded: Vec<Decoded> = Vec::with_capacity(batch.len());
        let mut dead: Vec<DeadLetter> = Vec::new();
        for m in batch {
            let next = offsets
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(m.offset());
            *next = (*next).max(m.offset());
            match decode(m) {
                Ok(d) => decoded.push(d),
                Err(reason) => dead.push(DeadLetter {
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    source: format!("{}/{}/{}", m.topic(), m.partition(), m.offset()),
                    reason,
                }),
            }
        }

        if self.fault() == Fault::CrashBeforeApply {
            return Flow::Crashed;
        }
        let mut delay = RETRY_MIN;
        let reports = loop {
            match self.apply(&decoded).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, events = decoded.len(), "applying a batch failed; retrying");
                    if sleep_or_stop(&mut delay, stop).await {
                        return Flow::Stopped;
                    }
                }
            }
        };
        let by_id: HashMap<uuid::Uuid, &Decoded> =
            decoded.iter().map(|d| (d.event.event_id, d)).collect();
        let now = (self.clock)();
        let mut states = HashMap::new();
        let mut newest: HashMap<&str, DateTime<Utc>> = HashMap::new();
        for (report, refused) in &reports {
            for r in &report.rejected {
                if let Some(d) = by_id.get(&r.event_id) {
                    dead.push(dead_letter_of(&d.event, format!("refused: {}", r.error)));
                }
            }
            for (id, reason) in refused {
                if let Some(d) = by_id.get(id) {
                    dead.push(dead_letter_of(
                        &d.event,
                        format!("cannot be stored: {reason}"),
                    ));
                }
            }
            for id in &report.conflicts {
                if let Some(d) = by_id.get(id) {
                    dead.push(dead_letter_of(
                        &d.event,
                        "event_conflict: this event id was applied with another payload".into(),
                    ));
                }
            }
            let mut fleet = match self.fleet.lock() {
                Ok(f) => f,
                Err(p) => p.into_inner(),
            };
            for id in &report.applied {
                if let Some(d) = by_id.get(id) {
                    if let EventBody::Usage(u) = &d.event.body {
                        fleet.record(u, now);
                    }
                    let at = newest
                        .entry(d.event.account_id.as_str())
                        .or_insert(d.event.occurred_at);
                    *at = (*at).max(d.event.occurred_at);
                }
            }
            for (account, state) in &report.states {
                states.insert(account.clone(), state.clone());
            }
        }
        let mut delay = RETRY_MIN;
        while !dead.is_empty() {
            match self.send_dead_letters(&dead).await {
                Ok(()) => {
                    telemetry::DEAD_LETTERS.inc_by(dead.len() as u64);
                    dead.clear();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter topic unavailable; retrying");
                    if sleep_or_stop(&mut delay, stop).await {
                        return Flow::Stopped;
                    }
                }
            }
        }
        self.publish_decisions(&states, &newest, now);
        if self.fault() == Fault::CrashAfterApply {
            return Flow::Crashed;
        }
        let mut tpl = TopicPartitionList::new();
        {
            // A partition taken away and handed back can be re-fetched from an older offset
            // while a lane still holds the newer copies: never move this member's commit back.
            let mut high = match self.committed.lock() {
                Ok(h) => h,
                Err(p) => p.into_inner(),
            };
            for ((topic, partition), offset) in &offsets {
                let next = offset + 1;
                let mark = high.entry((topic.clone(), *partition)).or_insert(0);
                if next <= *mark {
                    continue;
                }
                *mark = next;
                if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(next)) {
                    tracing::warn!(error = %e, "offset list");
                }
            }
        }
        if tpl.count() == 0 {
            return Flow::Done;
        }
        // A synchronous commit can wait for a coordinator for many seconds: not on a runtime
        // worker, which the gateway's requests share in `--role all`.
        let consumer = Arc::clone(&self.consumer);
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await;
        match committed {
            Ok(Ok(())) => {}
            // Typically a rebalance took a partition mid-batch. Its next owner re-reads from the
            // last committed offset and the store absorbs what this batch already applied.
            Ok(Err(e)) => {
                telemetry::OFFSET_COMMIT_FAILURES.inc();
                tracing::warn!(error = %e, "offset commit failed; the batch will be re-read and deduplicated");
            }
            Err(e) => {
                telemetry::OFFSET_COMMIT_FAILURES.inc();
                tracing::warn!(error = %e, "offset commit task failed");
            }
        }
        Flow::Done
    }

    /// Test hook: makes this member stop dead at `fault` in its next batch, as a crash would
    /// (nothing after that point happens, the offsets of that batch are not committed).
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) {
        self.fault
            .store(fault as u8, std::sync::atomic::Ordering::SeqCst);
    }

    fn fault(&self) -> Fault {
        match self.fault.load(std::sync::atomic::Ordering::SeqCst) {
            1 => Fault::CrashBeforeApply,
            2 => Fault::CrashAfterApply,
            _ => Fault::None,
        }
    }

    /// Applies `decoded` in store-sized chunks. A chunk the store refuses as a whole is applied
    /// event by event, so one unstorable event is set aside instead of blocking the partition;
    /// those come back as `(event id, reason)`. Only an error the event brings on itself sets
    /// it aside: any other (the database failing over, a full disk) fails the whole batch, which
    /// is retried and its offsets not committed.
    async fn apply(
        &self,
        decoded: &[Decoded],
    ) -> Result<Vec<(BatchReport, Vec<(uuid::Uuid, String)>)>, StoreError> {
        let mut out = Vec::new();
        for chunk in decoded.chunks(MAX_BATCH_EVENTS) {
            let events: Vec<Event> = chunk.iter().map(|d| d.event.clone()).collect();
            match self
                .store
                .ingest(&events, BatchMode::BestEffort, (self.clock)())
                .await
            {
                Ok(report) => out.push((report, Vec::new())),
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    // Possibly one bad event spoiling the statement; find out which.
                    tracing::warn!(error = %e, events = events.len(), "batch refused; applying its events one by one");
                    let mut merged = BatchReport::default();
                    let mut refused = Vec::new();
                    for event in events {
                        match self
                            .store
                            .ingest(
                                std::slice::from_ref(&event),
                                BatchMode::BestEffort,
                                (self.clock)(),
                            )
                            .await
                        {
                            Ok(r) => {
                                merged.applied.extend(r.applied);
                                merged.duplicates.extend(r.duplicates);
                                merged.conflicts.extend(r.conflicts);
                                merged.rejected.extend(r.rejected);
                                merged.states.extend(r.states);
                            }
                            Err(e) if e.is_event_fault() => {
                                refused.push((event.event_id, e.to_string()))
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    out.push((merged, refused));
                }
            }
        }
        Ok(out)
    }

    async fn send_dead_letters(&self, dead: &[DeadLetter]) -> Result<(), KafkaError> {
        let sends = dead.iter().map(|d| {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_DLQ_REASON,
                    value: Some(d.reason.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_DLQ_SOURCE,
                    value: Some(d.source.as_bytes()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.cfg.topics.dead_letter).headers(headers);
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            if let Some(p) = &d.payload {
                record = record.payload(p.as_slice());
            }
            self.producer.send(record, PRODUCE_TIMEOUT)
        });
        for r in futures_util::future::join_all(sends).await {
            r.map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    /// Publishes the new decision of every account the batch changed, without waiting for the
    /// broker: best effort (a gateway that misses one converges through its periodic refresh
    /// from the ledger), so a slow decisions topic never holds up ingest.
    fn publish_decisions(
        &self,
        states: &HashMap<String, tally_ledger::AccountState>,
        newest: &HashMap<&str, DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        for s in states.values() {
            let Ok(decision) = decide(s, now) else {
                continue;
            };
            let msg = DecisionMessage {
                source_event_at: newest.get(s.account_id.as_str()).copied(),
                decision,
            };
            let Ok(value) = serde_json::to_vec(&msg) else {
                continue;
            };
            let record = FutureRecord::to(&self.cfg.topics.decisions)
                .key(s.account_id.as_str())
                .payload(value.as_slice());
            // Enqueued at once; the delivery report is not awaited.
            if let Err((e, _)) = self.producer.send_result(record) {
                tracing::warn!(error = %e, "publishing a decision failed; gateways converge by refresh");
            }
        }
    }

    async fn publish_metrics(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(METRICS_PUBLISH_INTERVAL);
        loop {
            tokio::select! { _ = tick.tick() => {}, _ = stop.changed() => return }
            let report = {
                let mut fleet = match self.fleet.lock() {
                    Ok(f) => f,
                    Err(p) => p.into_inner(),
                };
                fleet.report(&self.instance, (self.clock)())
            };
            let Ok(value) = serde_json::to_vec(&report) else {
                continue;
            };
            let sent = self
                .producer
                .send(
                    FutureRecord::to(&self.cfg.topics.metrics)
                        .key(self.instance.as_str())
                        .payload(value.as_slice()),
                    PRODUCE_TIMEOUT,
                )
                .await;
            if let Err((e, _)) = sent {
                tracing::warn!(error = %e, "publishing fleet metrics failed");
            }
        }
    }

    /// Keeps the consumer-lag gauge current: messages between this member's committed
    /// position and the end of its partitions.
    async fn watch_lag(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! { _ = tick.tick() => {}, _ = stop.changed() => return }
            let consumer = Arc::clone(&self.consumer);
            let lag = tokio::task::spawn_blocking(move || -> Result<i64, KafkaError> {
                let assignment = consumer.assignment()?;
                let committed = consumer.committed_offsets(assignment, Duration::from_secs(5))?;
                let mut lag = 0;
                for e in committed.elements() {
                    let (_, high) = consumer.fetch_watermarks(
                        e.topic(),
                        e.partition(),
                        Duration::from_secs(5),
                    )?;
                    let pos = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => 0,
                    };
                    lag += (high - pos).max(0);
                }
                Ok(lag)
            })
            .await;
            match lag {
                Ok(Ok(l)) => telemetry::CONSUMER_LAG.set(l),
                Ok(Err(e)) => tracing::debug!(error = %e, "consumer lag unavailable"),
                Err(_) => {}
            }
        }
    }
}

/// Sleeps for `delay` (then doubles it, capped) unless `stop` flips first; true when stopping.
async fn sleep_or_stop(delay: &mut Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let d = *delay;
    *delay = (*delay * 2).min(RETRY_MAX);
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

fn decode(m: &OwnedMessage) -> Result<Decoded, String> {
    let payload = m.payload().ok_or_else(|| "empty message".to_string())?;
    let event: Event =
        serde_json::from_slice(payload).map_err(|e| format!("malformed event: {e}"))?;
    match m.key() {
        Some(k) if k == event.account_id.as_bytes() => {}
        Some(_) => return Err("the message key is not the event's account_id".into()),
        None => return Err("the message has no key (it must be the account_id)".into()),
    }
    let span = tracing::info_span!(
        "ingest.event",
        event_id = %event.event_id,
        kind = event.body.kind(),
        partition = m.partition(),
        offset = m.offset(),
    );
    if let Some(headers) = m.headers() {
        let map: HashMap<&str, &str> = headers
            .iter()
            .filter_map(|h| Some((h.key, std::str::from_utf8(h.value?).ok()?)))
            .collect();
        if map.contains_key(HEADER_TRACEPARENT) {
            let parent = TraceContextPropagator::new().extract(&HeaderMap(map));
            let _ = span.set_parent(parent);
        }
    }
    Ok(Decoded { event, _span: span })
}

fn dead_letter_of(event: &Event, reason: String) -> DeadLetter {
    DeadLetter {
        key: Some(event.account_id.as_bytes().to_vec()),
        payload: serde_json::to_vec(event).ok(),
        source: format!("event {}", event.event_id),
        reason,
    }
}

/// Follows the decisions and metrics topics for a gateway: every partition from the start (the
/// decisions topic is compacted, so that is every account's latest decision), no group.
/// Blocks while it reads the topics' metadata: call it from `spawn_blocking`.
pub fn feedback_consumer(cfg: &KafkaConfig) -> Result<StreamConsumer, PipelineError> {
    cfg.validate()?;
    let consumer: StreamConsumer = cfg
        .client()
        // librdkafka wants a group id even for manual assignment; nothing is committed.
        .set(
            "group.id",
            format!("tally-gateway-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in [&cfg.topics.decisions, &cfg.topics.metrics] {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// What a gateway takes from the feedback topics.
#[derive(Debug)]
pub enum Feedback {
    Decision(DecisionMessage),
    Metrics(FleetReport),
}

/// Decodes one feedback message; anything unreadable is skipped (logged) by the caller.
pub fn decode_feedback(cfg: &KafkaConfig, m: &impl Message) -> Result<Feedback, String> {
    let payload = m.payload().ok_or("empty feedback message")?;
    if m.topic() == cfg.topics.decisions {
        serde_json::from_slice(payload)
            .map(Feedback::Decision)
            .map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(payload)
            .map(Feedback::Metrics)
            .map_err(|e| e.to_string())
    }
}

/// Checks that the brokers answer, for start-up. Blocks up to 10 s: call it from
/// `spawn_blocking`.
pub fn check_brokers(cfg: &KafkaConfig) -> Result<(), PipelineError> {
    let consumer: rdkafka::consumer::BaseConsumer = cfg.client().create()?;
    consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(())
}
