//! The gateway's Kafka event sink, write-ahead through a durable on-disk [`Spool`].
//!
//! [`EventSink::send`] only puts the event in a bounded in-memory channel. A writer task
//! group-commits what arrived into the spool (one fsync for many events); a shipper task reads
//! the spool in order and produces each record with rdkafka's idempotent producer, keeps a
//! bounded number of deliveries in flight, and acknowledges the delivered prefix to the spool.
//! When the broker is unreachable the records stay in the spool and the shipper retries from
//! the first unacknowledged one with an exponential backoff, so they go out in order when the
//! broker returns. A retry may send a record twice; the consumer dedupes by event id.
//! A sink started on the same directory after a restart ships what the previous one left.
//!
//! A spool write that fails (an IO or storage error) is kept in memory and retried with a
//! backoff; only after the retries (or a shutdown's deadline) run out are its events dropped.
//!
//! The configured [`SpoolFullPolicy`] decides whether the gateway keeps serving managed traffic
//! while the spool is nearly full or failing. Under [`SpoolFullPolicy::DenyManaged`] new managed
//! requests are refused once the spool passes a high-water mark ([`HIGH_WATER_PERCENT`] of its
//! bound), before anything is lost: the rest is a reserve for the usage of requests already
//! admitted. They are served again below [`LOW_WATER_PERCENT`]. Events that still cannot be
//! stored are dropped (counted in [`SPOOL_FULL`] and logged with their id).
//!
//! The sink is stopped last, by [`KafkaSinkRunner::shutdown`], once the requests that produce
//! events have ended: it moves what is buffered into the spool and ships for a while.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use tally_ledger::Event;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::sink::EventSink;
use crate::spool::{Spool, SpoolError};
use crate::telemetry::{SPOOL_DEPTH_BYTES, SPOOL_DEPTH_EVENTS, SPOOL_FULL};

/// Message headers set on every event.
pub const HEADER_CONTENT_TYPE: &str = "content-type";
pub const HEADER_EVENT_KIND: &str = "tally-event-kind";
const CONTENT_TYPE_JSON: &str = "application/json";

/// Events buffered in memory between `send` and the spool writer.
pub const CHANNEL_CAPACITY: usize = 65_536;
/// Events committed to the spool in one transaction at most.
const WRITE_BATCH_MAX: usize = 4_096;
/// Records handed to the producer and not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 4_096;
/// Records read from the spool at a time.
const READ_BATCH: usize = 512;
/// The smallest spool bound accepted: a few events must always fit.
pub const MIN_SPOOL_BYTES: u64 = 4_096;
/// Above this share of the spool's bound the deny-managed policy refuses new managed traffic;
/// the rest of the spool is kept for the events of requests already admitted.
pub const HIGH_WATER_PERCENT: u64 = 90;
/// Below this share managed traffic is served again (apart from the high-water mark, so the
/// policy does not flap with every event).
pub const LOW_WATER_PERCENT: u64 = 75;
/// Free slots of the in-memory buffer kept, like the spool's reserve, for admitted requests.
const CHANNEL_RESERVE: usize = CHANNEL_CAPACITY / 10;
/// Retry schedule of a spool write that failed; then its events are dropped.
const WRITE_RETRY_MIN: Duration = Duration::from_millis(50);
const WRITE_RETRY_MAX: Duration = Duration::from_secs(1);
const WRITE_RETRIES: usize = 8;
/// Retry schedule of the shipper while the broker is unreachable.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Consecutive failed delivery rounds after which the producer is replaced.
const RENEW_PRODUCER_AFTER: u32 = 3;
/// Pause before handing more records to a producer whose local queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(20);
/// Producer settings the sink depends on; callers may not override them.
const RESERVED_PROPERTIES: [&str; 3] = ["bootstrap.servers", "enable.idempotence", "acks"];
/// Defaults callers may override through `client_properties`.
const DEFAULT_PROPERTIES: [(&str, &str); 2] = [
    ("linger.ms", "5"),
    // A record that cannot be delivered in this time is reported failed and retried from the
    // spool, where it is safe, rather than held in the client's memory indefinitely.
    ("message.timeout.ms", "10000"),
];

/// What the gateway does while the spool cannot take more events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpoolFullPolicy {
    /// Refuse managed traffic (`metering_unavailable`) until the spool has room again: no
    /// unmetered spend on the operator's keys. BYOK traffic keeps being served.
    #[default]
    DenyManaged,
    /// Keep serving everything; the events that do not fit are dropped.
    KeepServing,
}

#[derive(Clone)]
pub struct KafkaSinkConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// The usage topic.
    pub topic: String,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub when_full: SpoolFullPolicy,
    /// Extra librdkafka properties (security settings, timeouts). They may hold secrets: they
    /// are never logged.
    pub client_properties: Vec<(String, String)>,
}

/// Property values may be credentials (SASL passwords): only their keys are shown.
impl std::fmt::Debug for KafkaSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = tally_ingest::kafka::property_keys(&self.client_properties);
        f.debug_struct("KafkaSinkConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .field("when_full", &self.when_full)
            .field("client_properties", &keys)
            .finish()
    }
}

impl KafkaSinkConfig {
    /// Checks the configuration without touching the disk or the network.
    pub fn validate(&self) -> Result<(), KafkaSinkError> {
        let bad = |m: String| Err(KafkaSinkError::Config(m));
        if self.brokers.split(',').any(|b| b.trim().is_empty()) {
            return bad("brokers must be a comma-separated list of host:port".into());
        }
        validate_topic(&self.topic)?;
        if self.spool_dir.as_os_str().is_empty() {
            return bad("the spool directory must be set".into());
        }
        if self.spool_max_bytes < MIN_SPOOL_BYTES {
            return bad(format!(
                "the spool bound must be at least {MIN_SPOOL_BYTES} bytes, got {}",
                self.spool_max_bytes
            ));
        }
        for (k, _) in &self.client_properties {
            if k.trim().is_empty() {
                return bad("a client property has an empty name".into());
            }
            if RESERVED_PROPERTIES.contains(&k.as_str()) {
                return bad(format!(
                    "client property {k} is set by the sink and cannot be overridden"
                ));
            }
        }
        Ok(())
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in DEFAULT_PROPERTIES {
            c.set(k, v);
        }
        for (k, v) in &self.client_properties {
            c.set(k, v);
        }
        c.set("enable.idempotence", "true").set("acks", "all");
        c
    }
}

fn validate_topic(topic: &str) -> Result<(), KafkaSinkError> {
    tally_ingest::kafka::check_topic_name(topic).map_err(KafkaSinkError::Config)
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("kafka sink configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("kafka sink task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Counters of one sink, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KafkaSinkStats {
    /// Events handed to `send`.
    pub accepted: u64,
    /// Events committed to the spool.
    pub spooled: u64,
    /// Records the broker acknowledged (a record retried after an outage may count twice).
    pub shipped: u64,
    /// Events lost: the spool or the in-memory buffer was full, or the sink was shut down.
    pub dropped: u64,
    /// What the spool holds now.
    pub depth_events: u64,
    pub depth_bytes: u64,
}

/// The state `send` and `accepts_managed` read; it never holds the spool itself, so the spool
/// file is released as soon as the tasks end.
#[derive(Debug)]
struct Shared {
    policy: SpoolFullPolicy,
    max_bytes: u64,
    /// Above the high-water mark (or an event did not fit), until below the low-water mark.
    full: AtomicBool,
    /// The last spool write failed and is being retried.
    write_failing: AtomicBool,
    accepted: AtomicU64,
    spooled: AtomicU64,
    shipped: AtomicU64,
    dropped: AtomicU64,
    depth_events: AtomicU64,
    depth_bytes: AtomicU64,
    /// The tasks' controls live as long as the tasks, so dropping the runner without a
    /// shutdown leaves the sink running. The writer's is the shutdown's deadline, once set.
    stop_writer: watch::Sender<Option<Instant>>,
    shipper_phase: watch::Sender<Phase>,
}

impl Shared {
    fn new(
        policy: SpoolFullPolicy,
        max_bytes: u64,
        stop_writer: watch::Sender<Option<Instant>>,
        shipper_phase: watch::Sender<Phase>,
    ) -> Shared {
        Shared {
            policy,
            max_bytes,
            full: AtomicBool::new(false),
            write_failing: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            spooled: AtomicU64::new(0),
            shipped: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            depth_events: AtomicU64::new(0),
            depth_bytes: AtomicU64::new(0),
            stop_writer,
            shipper_phase,
        }
    }

    fn set_depth(&self, (events, bytes): (u64, u64)) {
        self.depth_events.store(events, Ordering::Relaxed);
        self.depth_bytes.store(bytes, Ordering::Relaxed);
        SPOOL_DEPTH_EVENTS.set(i64::try_from(events).unwrap_or(i64::MAX));
        SPOOL_DEPTH_BYTES.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        if bytes > self.max_bytes / 100 * HIGH_WATER_PERCENT {
            self.mark_full("the spool is above its high-water mark");
        } else if bytes <= self.max_bytes / 100 * LOW_WATER_PERCENT
            && self.full.swap(false, Ordering::Relaxed)
        {
            tracing::warn!(
                depth_events = events,
                depth_bytes = bytes,
                "event spool has room again; managed traffic is served"
            );
        }
    }

    fn mark_full(&self, why: &str) {
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::error!(
                reason = why,
                max_bytes = self.max_bytes,
                policy = ?self.policy,
                "event spool is nearly full{}",
                match self.policy {
                    SpoolFullPolicy::DenyManaged => {
                        "; new managed traffic is refused, the rest is kept for requests under way"
                    }
                    SpoolFullPolicy::KeepServing => "; events that do not fit are dropped",
                }
            );
        }
    }

    fn write_failed(&self, error: &str, events: usize) {
        if !self.write_failing.swap(true, Ordering::Relaxed) {
            tracing::error!(
                error,
                events,
                policy = ?self.policy,
                "writing to the event spool failed; the batch is kept and retried{}",
                match self.policy {
                    SpoolFullPolicy::DenyManaged => "; managed traffic is refused meanwhile",
                    SpoolFullPolicy::KeepServing => "",
                }
            );
        } else {
            tracing::warn!(error, events, "writing to the event spool failed again");
        }
    }

    fn write_succeeded(&self) {
        if self.write_failing.swap(false, Ordering::Relaxed) {
            tracing::warn!("writing to the event spool works again");
        }
    }

    /// Whether new managed traffic may be admitted, given `channel_room` free slots in the
    /// buffer in front of the spool.
    fn admits_managed(&self, channel_room: usize) -> bool {
        match self.policy {
            SpoolFullPolicy::KeepServing => true,
            SpoolFullPolicy::DenyManaged => {
                !self.full.load(Ordering::Relaxed)
                    && !self.write_failing.load(Ordering::Relaxed)
                    && channel_room >= CHANNEL_RESERVE
            }
        }
    }

    fn drop_event(&self, event_id: Uuid, why: &str) {
        SPOOL_FULL.inc();
        self.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%event_id, reason = why, "usage event dropped: the spool cannot take it");
    }
}

/// An event on its way to the spool, with the trace context of the request that produced it.
#[derive(Debug)]
struct Pending {
    event: Event,
    trace: Vec<(String, String)>,
}

/// A spool record: the Kafka message, ready to produce.
#[derive(Debug, Serialize, Deserialize)]
struct Spooled {
    event_id: Uuid,
    key: String,
    kind: String,
    #[serde(default)]
    trace: Vec<(String, String)>,
    /// The event's JSON, produced as is.
    value: String,
}

/// The sink the proxy holds. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KafkaSink {
    tx: mpsc::Sender<Pending>,
    shared: Arc<Shared>,
}

/// The sink's tasks; [`KafkaSinkRunner::shutdown`] stops them.
#[derive(Debug)]
pub struct KafkaSinkRunner {
    writer: JoinHandle<()>,
    shipper: JoinHandle<()>,
    shared: Arc<Shared>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Run,
    /// Ship what the spool holds, then end.
    FinishWhenEmpty,
    /// End now; the spool keeps what is left.
    Stop,
}

impl KafkaSink {
    /// Validates the configuration, opens (and recovers) the spool and starts the writer and
    /// shipper tasks. The broker need not be reachable.
    pub async fn start(
        cfg: KafkaSinkConfig,
    ) -> Result<(KafkaSink, KafkaSinkRunner), KafkaSinkError> {
        cfg.validate()?;
        let producer: FutureProducer = cfg.producer_config().create()?;
        let dir = cfg.spool_dir.clone();
        let max = cfg.spool_max_bytes;
        let spool = Arc::new(tokio::task::spawn_blocking(move || Spool::open(&dir, max)).await??);
        let (stop_writer, stop_rx) = watch::channel(None);
        let (shipper_phase, phase_rx) = watch::channel(Phase::Run);
        let shared = Arc::new(Shared::new(
            cfg.when_full,
            cfg.spool_max_bytes,
            stop_writer,
            shipper_phase,
        ));
        let depth = spool.depth();
        shared.set_depth(depth);
        if depth.0 > 0 {
            tracing::info!(
                events = depth.0,
                bytes = depth.1,
                "event spool holds events from a previous run; shipping them first"
            );
        }
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let wake = Arc::new(Notify::new());
        let writer = tokio::spawn(writer(
            rx,
            Arc::clone(&spool),
            Arc::clone(&shared),
            Arc::clone(&wake),
            stop_rx,
        ));
        let shipper = tokio::spawn(
            Shipper {
                producer,
                client: cfg.producer_config(),
                topic: cfg.topic,
                spool,
                shared: Arc::clone(&shared),
                wake,
                phase: phase_rx,
            }
            .run(),
        );
        Ok((
            KafkaSink {
                tx,
                shared: Arc::clone(&shared),
            },
            KafkaSinkRunner {
                writer,
                shipper,
                shared,
            },
        ))
    }

    pub fn stats(&self) -> KafkaSinkStats {
        stats_of(&self.shared)
    }
}

fn stats_of(s: &Shared) -> KafkaSinkStats {
    KafkaSinkStats {
        accepted: s.accepted.load(Ordering::Relaxed),
        spooled: s.spooled.load(Ordering::Relaxed),
        shipped: s.shipped.load(Ordering::Relaxed),
        dropped: s.dropped.load(Ordering::Relaxed),
        depth_events: s.depth_events.load(Ordering::Relaxed),
        depth_bytes: s.depth_bytes.load(Ordering::Relaxed),
    }
}

impl EventSink for KafkaSink {
    fn send(&self, event: Event) {
        self.shared.accepted.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            event,
            trace: crate::trace::current_context_headers()
                .into_iter()
                .collect(),
        };
        match self.tx.try_send(pending) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(p)) => {
                // The disk cannot keep up: as good as a full spool.
                self.shared
                    .mark_full("the in-memory buffer in front of the spool is full");
                self.shared.drop_event(p.event.event_id, "buffer full");
            }
            Err(mpsc::error::TrySendError::Closed(p)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(event_id = %p.event.event_id, "usage event dropped: the kafka sink is shut down");
            }
        }
    }

    fn accepts_managed(&self) -> bool {
        self.shared.admits_managed(self.tx.capacity())
    }
}

impl KafkaSinkRunner {
    pub fn stats(&self) -> KafkaSinkStats {
        stats_of(&self.shared)
    }

    /// Stops taking events, moves what is buffered into the spool, ships for up to `timeout`
    /// and leaves the rest in the spool for the next start. Returns the final counters.
    ///
    /// Call it once whatever sends events has stopped: an event sent afterwards is dropped.
    pub async fn shutdown(self, timeout: Duration) -> Result<KafkaSinkStats, KafkaSinkError> {
        let deadline = Instant::now() + timeout;
        self.shared.stop_writer.send_replace(Some(deadline));
        self.writer.await?;
        self.shared
            .shipper_phase
            .send_replace(Phase::FinishWhenEmpty);
        let mut shipper = self.shipper;
        if tokio::time::timeout_at(deadline, &mut shipper)
            .await
            .is_err()
        {
            self.shared.shipper_phase.send_replace(Phase::Stop);
            shipper.await?;
        }
        let stats = stats_of(&self.shared);
        if stats.depth_events > 0 {
            tracing::warn!(
                events = stats.depth_events,
                "kafka sink shut down with events left in the spool; the next start ships them"
            );
        }
        Ok(stats)
    }
}

async fn writer(
    mut rx: mpsc::Receiver<Pending>,
    spool: Arc<Spool>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, WRITE_BATCH_MAX) => {
                if n == 0 {
                    return;
                }
            }
            _ = stopped(&mut stop) => {
                // Refuse new events but keep what is buffered.
                rx.close();
                while rx.recv_many(&mut batch, WRITE_BATCH_MAX).await > 0 {
                    store(std::mem::take(&mut batch), &spool, &shared, &stop).await;
                }
                wake.notify_one();
                return;
            }
        }
        store(std::mem::take(&mut batch), &spool, &shared, &stop).await;
        wake.notify_one();
    }
}

/// Commits what fits of `batch` to the spool in one transaction; drops the rest. A write that
/// fails is retried with a backoff, up to [`WRITE_RETRIES`] times or a shutdown's deadline.
async fn store(
    batch: Vec<Pending>,
    spool: &Arc<Spool>,
    shared: &Shared,
    stop: &watch::Receiver<Option<Instant>>,
) {
    let mut ids = Vec::with_capacity(batch.len());
    let mut records = Vec::with_capacity(batch.len());
    for p in batch {
        match encode(p) {
            Ok((id, bytes)) => {
                ids.push(id);
                records.push(bytes);
            }
            Err((id, e)) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(event_id = %id, error = %e, "usage event cannot be encoded; dropped");
            }
        }
    }
    // Shared with each attempt, so a failed one (even a panicked one) leaves them for the next.
    let records = Arc::new(records);
    let mut retries = write_retry_schedule();
    let (stored, why) = loop {
        let (spool, attempt) = (Arc::clone(spool), Arc::clone(&records));
        let outcome = tokio::task::spawn_blocking(move || {
            // Only this task appends, so the room measured here only grows until the append.
            let (_, used) = spool.depth();
            let mut room = spool.max_bytes().saturating_sub(used);
            let fits = attempt
                .iter()
                .take_while(|r| {
                    let len = r.len() as u64;
                    let ok = len <= room;
                    room = room.saturating_sub(len);
                    ok
                })
                .count();
            let result = spool.append(&attempt[..fits]);
            (fits, result, spool.depth())
        })
        .await;
        let error = match outcome {
            Ok((fits, Ok(()), depth)) => {
                shared.write_succeeded();
                shared.set_depth(depth);
                break (fits, Lost::Full);
            }
            Ok((_, Err(e), depth)) => {
                shared.set_depth(depth);
                e.to_string()
            }
            Err(e) => e.to_string(),
        };
        shared.write_failed(&error, records.len());
        let deadline = *stop.borrow();
        let delay = retries.next().and_then(|delay| match deadline {
            None => Some(delay),
            Some(d) => d
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
                .map(|left| delay.min(left)),
        });
        match delay {
            Some(d) => tokio::time::sleep(d).await,
            None => break (0, Lost::WriteFailed),
        }
    };
    shared.spooled.fetch_add(stored as u64, Ordering::Relaxed);
    if stored < ids.len() {
        // A failing write already refuses managed traffic until a write succeeds.
        if why == Lost::Full {
            shared.mark_full("an event did not fit");
        }
        let why = match why {
            Lost::Full => "spool full",
            Lost::WriteFailed => "spool write failed",
        };
        for id in &ids[stored..] {
            shared.drop_event(*id, why);
        }
    }
}

/// Why `store` could not keep an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    Full,
    WriteFailed,
}

/// Resolves once the writer is told to stop (holding no borrow of the channel, so the writer's
/// future stays `Send`).
async fn stopped(stop: &mut watch::Receiver<Option<Instant>>) {
    let _ = stop.wait_for(Option::is_some).await.map(drop);
}

async fn stop_phase(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p == Phase::Stop).await.map(drop);
}

fn encode(p: Pending) -> Result<(Uuid, Vec<u8>), (Uuid, serde_json::Error)> {
    let id = p.event.event_id;
    let value = serde_json::to_string(&p.event).map_err(|e| (id, e))?;
    let record = Spooled {
        event_id: id,
        key: p.event.account_id,
        kind: p.event.body.kind().to_string(),
        trace: p.trace,
        value,
    };
    serde_json::to_vec(&record)
        .map(|b| (id, b))
        .map_err(|e| (id, e))
}

struct Shipper {
    producer: FutureProducer,
    /// To build a fresh producer when the current one stays stuck.
    client: ClientConfig,
    topic: String,
    spool: Arc<Spool>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    phase: watch::Receiver<Phase>,
}

/// How a record handed to the producer ended.
type Delivered = (u64, Result<(), KafkaError>);

impl Shipper {
    async fn run(mut self) {
        let mut in_flight = FuturesOrdered::new();
        // The first sequence number not yet handed to the producer.
        let mut next: u64 = 0;
        let mut backoff = retry_schedule();
        let mut outage = false;
        let mut failed_rounds: u32 = 0;
        loop {
            let phase = *self.phase.borrow();
            if phase == Phase::Stop {
                break;
            }
            let mut queue_full = false;
            if in_flight.len() < MAX_IN_FLIGHT {
                let want = READ_BATCH.min(MAX_IN_FLIGHT - in_flight.len());
                let spool = Arc::clone(&self.spool);
                let read = tokio::task::spawn_blocking(move || spool.peek_from(next, want)).await;
                let records = match read {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "reading the event spool failed; retrying");
                        self.pause(backoff.next().unwrap_or(RETRY_MAX)).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the event spool failed; retrying");
                        self.pause(backoff.next().unwrap_or(RETRY_MAX)).await;
                        continue;
                    }
                };
                tracing::trace!(
                    next,
                    read = records.len(),
                    in_flight = in_flight.len(),
                    "shipper read the spool"
                );
                for (seq, bytes) in records {
                    match self.produce(seq, &bytes) {
                        Produced::InFlight(f) => {
                            in_flight.push_back(f);
                            next = seq + 1;
                        }
                        Produced::Undecodable => {
                            // Nothing can ever ship it; acknowledge it with its neighbours.
                            in_flight.push_back(Box::pin(std::future::ready((seq, Ok(())))));
                            next = seq + 1;
                        }
                        Produced::QueueFull => {
                            queue_full = true;
                            break;
                        }
                        Produced::Failed(e) => {
                            in_flight.push_back(Box::pin(std::future::ready((seq, Err(e)))));
                            next = seq + 1;
                            break;
                        }
                    }
                }
            }
            if in_flight.is_empty() {
                if queue_full {
                    self.pause(QUEUE_FULL_PAUSE).await;
                    continue;
                }
                if phase == Phase::FinishWhenEmpty
                    && self.shared.depth_events.load(Ordering::Relaxed) == 0
                {
                    break;
                }
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = self.phase.changed() => {}
                }
                continue;
            }
            // Wait for the oldest delivery, then take every one already settled behind it.
            let first = tokio::select! {
                d = in_flight.next() => d,
                _ = stop_phase(&mut self.phase) => break,
            };
            let mut settled: Vec<Delivered> = first.into_iter().collect();
            while let Some(Some(d)) = futures_util::FutureExt::now_or_never(in_flight.next()) {
                settled.push(d);
            }
            let failed = settled.iter().position(|(_, r)| r.is_err());
            tracing::trace!(settled = settled.len(), failed = ?failed, first = ?settled.first().map(|s| s.0), "deliveries settled");
            let delivered = &settled[..failed.unwrap_or(settled.len())];
            if let Some((last, _)) = delivered.last() {
                self.ack(*last, delivered.len() as u64).await;
            }
            match failed.map(|i| &settled[i]) {
                None => {
                    failed_rounds = 0;
                    if outage {
                        outage = false;
                        tracing::info!("kafka reachable again; shipping the spooled events");
                    }
                    backoff = retry_schedule();
                }
                Some((seq, Err(e))) => {
                    if !outage {
                        outage = true;
                        tracing::warn!(error = %e, seq, "kafka delivery failed; events stay in the spool and are retried in order");
                    }
                    // Let the rest settle (they may have made it: acknowledged next round as
                    // duplicates at worst), then start again from the oldest record left.
                    while let Some(rest) = tokio::select! {
                        d = in_flight.next() => d,
                        _ = stop_phase(&mut self.phase) => None,
                    } {
                        drop(rest);
                    }
                    next = 0;
                    failed_rounds += 1;
                    if failed_rounds.is_multiple_of(RENEW_PRODUCER_AFTER)
                        || self.producer.client().fatal_error().is_some()
                    {
                        self.renew_producer(failed_rounds).await;
                    }
                    self.pause(backoff.next().unwrap_or(RETRY_MAX)).await;
                }
                Some((_, Ok(()))) => {}
            }
        }
        drop(in_flight);
        // Dropping a producer flushes for up to half a second: not on the runtime's threads.
        let producer = self.producer;
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
    }

    /// Replaces a producer that keeps failing. An idempotent producer can wedge for good: a
    /// fatal error, or a broker that has forgotten its producer id (it then keeps answering
    /// UNKNOWN_PRODUCER_ID to every epoch the client bumps locally). A new one asks for a new id.
    async fn renew_producer(&mut self, failed_rounds: u32) {
        match self.client.create::<FutureProducer>() {
            Ok(fresh) => {
                let fatal = self.producer.client().fatal_error();
                tracing::info!(failed_rounds, fatal = ?fatal, "replacing the kafka producer after repeated delivery failures");
                let old = std::mem::replace(&mut self.producer, fresh);
                let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            }
            Err(e) => tracing::error!(error = %e, "creating a new kafka producer failed"),
        }
    }

    fn produce(&self, seq: u64, bytes: &[u8]) -> Produced {
        let record: Spooled = match serde_json::from_slice(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(seq, error = %e, "spool record cannot be decoded; dropped");
                return Produced::Undecodable;
            }
        };
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_CONTENT_TYPE,
                value: Some(CONTENT_TYPE_JSON),
            })
            .insert(Header {
                key: HEADER_EVENT_KIND,
                value: Some(record.kind.as_str()),
            });
        for (k, v) in &record.trace {
            headers = headers.insert(Header {
                key: k.as_str(),
                value: Some(v.as_str()),
            });
        }
        let message = FutureRecord::to(&self.topic)
            .key(record.key.as_str())
            .payload(record.value.as_str())
            .headers(headers);
        match self.producer.send_result(message) {
            Ok(delivery) => Produced::InFlight(Box::pin(async move {
                let result = match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                };
                (seq, result)
            })),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Produced::QueueFull
            }
            Err((e, _)) => Produced::Failed(e),
        }
    }

    async fn ack(&self, upto: u64, count: u64) {
        let spool = Arc::clone(&self.spool);
        match tokio::task::spawn_blocking(move || spool.ack(upto).map(|()| spool.depth())).await {
            Ok(Ok(depth)) => {
                self.shared.shipped.fetch_add(count, Ordering::Relaxed);
                self.shared.set_depth(depth);
            }
            // Left in the spool: shipped again later, deduplicated downstream.
            Ok(Err(e)) => {
                tracing::error!(error = %e, "acknowledging shipped events in the spool failed");
                // A storage failure reopens the spool, which rereads its depth from disk.
                self.shared.set_depth(self.spool.depth());
            }
            Err(e) => {
                tracing::error!(error = %e, "acknowledging shipped events in the spool failed")
            }
        }
    }

    /// Sleeps, unless told to stop.
    async fn pause(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop_phase(&mut self.phase) => {}
        }
    }
}

type DeliveryFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Delivered> + Send>>;

enum Produced {
    InFlight(DeliveryFuture),
    Undecodable,
    QueueFull,
    Failed(KafkaError),
}

fn write_retry_schedule() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(WRITE_RETRY_MIN)
        .with_max_delay(WRITE_RETRY_MAX)
        .with_jitter()
        .with_max_times(WRITE_RETRIES)
        .build()
}

fn retry_schedule() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KafkaSinkConfig {
        KafkaSinkConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "tally.usage".into(),
            spool_dir: PathBuf::from("/nonexistent/never/created"),
            spool_max_bytes: 1 << 20,
            when_full: SpoolFullPolicy::DenyManaged,
            client_properties: vec![("linger.ms".into(), "1".into())],
        }
    }

    #[test]
    fn a_sound_config_validates() {
        config().validate().unwrap();
    }

    #[test]
    fn bad_configs_are_refused_before_any_io() {
        type Mutation = Box<dyn Fn(&mut KafkaSinkConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("brokers", Box::new(|c| c.brokers = String::new())),
            ("brokers", Box::new(|c| c.brokers = "a:1,,b:2".into())),
            ("topic", Box::new(|c| c.topic = String::new())),
            ("topic", Box::new(|c| c.topic = "usage events".into())),
            ("topic", Box::new(|c| c.topic = "..".into())),
            ("topic", Box::new(|c| c.topic = "x".repeat(250))),
            (
                "spool directory",
                Box::new(|c| c.spool_dir = PathBuf::new()),
            ),
            ("spool bound", Box::new(|c| c.spool_max_bytes = 100)),
            (
                "enable.idempotence",
                Box::new(|c| {
                    c.client_properties
                        .push(("enable.idempotence".into(), "false".into()))
                }),
            ),
            (
                "acks",
                Box::new(|c| c.client_properties.push(("acks".into(), "1".into()))),
            ),
            (
                "empty name",
                Box::new(|c| c.client_properties.push((" ".into(), "x".into()))),
            ),
        ];
        for (needle, mutate) in cases {
            let mut c = config();
            mutate(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn secrets_in_client_properties_stay_out_of_errors() {
        let mut c = config();
        c.client_properties
            .push(("sasl.password".into(), "hunter2".into()));
        c.topic = String::new();
        let err = c.validate().unwrap_err().to_string();
        assert!(!err.contains("hunter2"));
    }

    #[test]
    fn callers_cannot_weaken_delivery_guarantees_but_may_tune_the_rest() {
        let c = config().producer_config();
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("linger.ms"), Some("1"));
        assert_eq!(c.get("message.timeout.ms"), Some("10000"));
    }

    #[tokio::test]
    async fn start_refuses_a_bad_config_without_creating_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config();
        c.spool_dir = dir.path().join("spool");
        c.topic = "bad topic".into();
        assert!(matches!(
            KafkaSink::start(c).await,
            Err(KafkaSinkError::Config(_))
        ));
        assert!(!dir.path().join("spool").exists());
    }

    fn shared(policy: SpoolFullPolicy, max_bytes: u64) -> Arc<Shared> {
        Arc::new(Shared::new(
            policy,
            max_bytes,
            watch::channel(None).0,
            watch::channel(Phase::Run).0,
        ))
    }

    fn pending(i: u32) -> Pending {
        let event: Event = serde_json::from_value(serde_json::json!({
            "event_id": Uuid::new_v4(),
            "occurred_at": "2025-01-01T00:00:00Z",
            "account_id": format!("acct_{i}"),
            "type": "account_opened",
            "name": "Acme",
        }))
        .unwrap();
        Pending {
            event,
            trace: Vec::new(),
        }
    }

    #[test]
    fn deny_managed_refuses_above_the_high_water_mark_and_serves_again_below_the_low_one() {
        let s = shared(SpoolFullPolicy::DenyManaged, 1000);
        let room = CHANNEL_CAPACITY;
        s.set_depth((1, 900));
        assert!(s.admits_managed(room), "at the mark: still admitted");
        s.set_depth((2, 901));
        assert!(
            !s.admits_managed(room),
            "above it: refused while the reserve is left for requests under way"
        );
        s.set_depth((1, 800));
        assert!(!s.admits_managed(room), "not yet back below the low mark");
        s.set_depth((1, 750));
        assert!(s.admits_managed(room));
        assert!(
            !s.admits_managed(CHANNEL_RESERVE - 1),
            "a nearly full buffer in front of the spool refuses too"
        );
        assert_eq!(s.dropped.load(Ordering::Relaxed), 0);

        let keep = shared(SpoolFullPolicy::KeepServing, 1000);
        keep.set_depth((9, 1000));
        assert!(keep.admits_managed(0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_spool_write_is_kept_and_retried_instead_of_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
        let s = shared(SpoolFullPolicy::DenyManaged, 1 << 20);
        spool.fail_next_appends(3);
        let task = tokio::spawn({
            let (spool, s) = (Arc::clone(&spool), Arc::clone(&s));
            async move {
                let stop = s.stop_writer.subscribe();
                store((0..5).map(pending).collect(), &spool, &s, &stop).await
            }
        });
        let until = Instant::now() + Duration::from_secs(5);
        while !s.write_failing.load(Ordering::Relaxed) {
            assert!(Instant::now() < until, "the write never failed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            !s.admits_managed(CHANNEL_CAPACITY),
            "no managed traffic while its usage cannot be stored"
        );
        task.await.unwrap();
        let st = stats_of(&s);
        assert_eq!(
            (st.spooled, st.dropped, st.depth_events),
            (5, 0, 5),
            "{st:?}"
        );
        assert_eq!(spool.depth().0, 5);
        assert!(s.admits_managed(CHANNEL_CAPACITY), "served again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_recovers_from_a_failing_disk_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(crate::spool::faulty::Faults::default());
        let spool = Arc::new(Spool::open_faulty(dir.path(), 1 << 20, Arc::clone(&faults)).unwrap());
        let s = shared(SpoolFullPolicy::DenyManaged, 1 << 20);
        // A real redb IO failure, which poisons the database until it is reopened.
        faults.fail_writes(u32::MAX);
        faults.fail_syncs(u32::MAX);
        let task = tokio::spawn({
            let (spool, s) = (Arc::clone(&spool), Arc::clone(&s));
            async move {
                let stop = s.stop_writer.subscribe();
                store((0..5).map(pending).collect(), &spool, &s, &stop).await
            }
        });
        let until = Instant::now() + Duration::from_secs(5);
        while !s.write_failing.load(Ordering::Relaxed) {
            assert!(Instant::now() < until, "the write never failed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!s.admits_managed(CHANNEL_CAPACITY));
        faults.fail_writes(0);
        faults.fail_syncs(0);
        task.await.unwrap();
        let st = stats_of(&s);
        assert_eq!(
            (st.spooled, st.dropped, st.depth_events),
            (5, 0, 5),
            "{st:?}"
        );
        assert!(s.admits_managed(CHANNEL_CAPACITY), "served again");
        // The shipper's reads and acknowledgements work on the same spool, each event once.
        let all = spool.peek(100).unwrap();
        assert_eq!(all.len(), 5);
        spool.ack(all[4].0).unwrap();
        assert_eq!(spool.depth(), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_still_failing_at_the_shutdown_deadline_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
        let s = shared(SpoolFullPolicy::DenyManaged, 1 << 20);
        spool.fail_next_appends(u32::MAX);
        let started = Instant::now();
        s.stop_writer
            .send_replace(Some(started + Duration::from_millis(300)));
        let stop = s.stop_writer.subscribe();
        store((0..3).map(pending).collect(), &spool, &s, &stop).await;
        let st = stats_of(&s);
        assert_eq!((st.spooled, st.dropped), (0, 3), "{st:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(spool.depth(), (0, 0));
    }

    #[test]
    fn a_spool_record_carries_key_kind_trace_and_the_event_json() {
        let event: Event = serde_json::from_value(serde_json::json!({
            "event_id": "6f1c1f7e-6a3b-4a53-9c55-0d7fb1d1a001",
            "occurred_at": "2025-01-01T00:00:00Z",
            "account_id": "acct_1",
            "type": "account_opened",
            "name": "Acme",
        }))
        .unwrap();
        let (id, bytes) = encode(Pending {
            event: event.clone(),
            trace: vec![("traceparent".into(), "00-abc-def-01".into())],
        })
        .unwrap();
        assert_eq!(id, event.event_id);
        let r: Spooled = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(r.key, "acct_1");
        assert_eq!(r.kind, "account_opened");
        assert_eq!(
            r.trace,
            vec![("traceparent".into(), "00-abc-def-01".into())]
        );
        assert_eq!(serde_json::from_str::<Event>(&r.value).unwrap(), event);
    }
}
