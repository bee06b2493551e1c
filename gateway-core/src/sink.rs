//! Where the gateway hands its usage events. The client's response never waits on it.
//!
//! [`InProcessSink`] is the embedded default: a bounded channel drained by one task that
//! applies events to the ledger in batches and refreshes decisions from the result. On
//! [`InProcessSinkRunner::shutdown`] it applies what is still buffered before it ends. The
//! Kafka pipeline implements [`EventSink`] a second time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tally_ingest::fleet::{FleetAggregator, FleetView};
use tally_ingest::{BatchMode, Store};
use tally_ledger::{Event, EventBody};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::decisions::DecisionCache;
use crate::metrics::GlobalMetrics;

/// Events buffered between the request path and the ledger writer.
pub const SINK_CHANNEL_CAPACITY: usize = 65_536;
/// Events applied per ledger transaction at most.
pub const SINK_BATCH_MAX: usize = 2_000;
/// A partial batch waits at most this long for company.
pub const SINK_BATCH_WAIT: Duration = Duration::from_millis(20);
/// Delay before retrying a batch the database refused to take (outage).
pub const SINK_RETRY_DELAY: Duration = Duration::from_millis(500);
/// How long past its deadline a shutdown waits for a database call already under way.
const SINK_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Takes ownership of the event; never blocks the caller.
    fn send(&self, event: Event);

    /// Whether managed traffic may be served: false while the sink cannot record the usage it
    /// would cause (a full spool under the deny-managed policy).
    fn accepts_managed(&self) -> bool {
        true
    }
}

#[derive(Debug, Default)]
pub struct SinkStats {
    pub accepted: AtomicU64,
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub retries: AtomicU64,
    /// Events lost: sent after the shutdown, or the database stayed down past its deadline.
    pub dropped: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct InProcessSink {
    tx: mpsc::Sender<Event>,
    /// Events waiting on their own task for room in the channel; the shutdown waits for them.
    parked: TaskTracker,
    pub stats: Arc<SinkStats>,
}

impl EventSink for InProcessSink {
    fn send(&self, event: Event) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                // Full: park the event on its own task rather than drop it or stall the client.
                let tx = self.tx.clone();
                let stats = Arc::clone(&self.stats);
                self.parked.spawn(async move {
                    if let Err(mpsc::error::SendError(event)) = tx.send(event).await {
                        dropped_after_shutdown(&stats, &event);
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(event)) => {
                dropped_after_shutdown(&self.stats, &event)
            }
        }
    }
}

fn dropped_after_shutdown(stats: &SinkStats, event: &Event) {
    stats.dropped.fetch_add(1, Ordering::Relaxed);
    tracing::error!(event_id = %event.event_id, "usage event dropped: the event sink is shut down");
}

/// The in-process sink's writer task; [`InProcessSinkRunner::shutdown`] stops it. Dropping the
/// runner leaves the writer running.
#[derive(Debug)]
pub struct InProcessSinkRunner {
    writer: JoinHandle<()>,
    /// When set, the deadline of the shutdown.
    stop: Arc<watch::Sender<Option<Instant>>>,
    pub stats: Arc<SinkStats>,
}

impl InProcessSinkRunner {
    /// Stops taking events and applies what is buffered (parked events included), retrying a
    /// database outage until `timeout`; what still cannot be stored then is dropped and
    /// counted. Returns once the writer has ended.
    pub async fn shutdown(self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.stop.send_replace(Some(deadline));
        // The writer honours the deadline between database calls; one call may still be
        // running then, so it gets a little longer before it is abandoned.
        let mut writer = self.writer;
        if tokio::time::timeout_at(deadline + SINK_SHUTDOWN_GRACE, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
            tracing::error!(
                "the ledger writer did not finish in time; buffered usage events are lost"
            );
        }
    }
}

impl InProcessSink {
    /// Starts the writer task. It ends on [`InProcessSinkRunner::shutdown`], or once every
    /// sender is dropped and the channel drained.
    pub fn start(
        store: Arc<Store>,
        decisions: Arc<DecisionCache>,
        clock: Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>,
    ) -> (InProcessSink, InProcessSinkRunner) {
        Self::start_with_fleet(store, decisions, None, clock)
    }

    /// Like [`InProcessSink::start`], also feeding the fleet model metrics into `global` from
    /// what it applies, as the Kafka pipeline's ingest does (the embedded bus is the fleet).
    pub fn start_with_fleet(
        store: Arc<Store>,
        decisions: Arc<DecisionCache>,
        global: Option<Arc<GlobalMetrics>>,
        clock: Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>,
    ) -> (InProcessSink, InProcessSinkRunner) {
        let (tx, rx) = mpsc::channel(SINK_CHANNEL_CAPACITY);
        let stats = Arc::new(SinkStats::default());
        let fleet = global.map(|g| Fleet {
            global: g,
            aggregator: FleetAggregator::new(),
            view: FleetView::new(),
        });
        let (stop, stop_rx) = watch::channel(None);
        let stop = Arc::new(stop);
        let parked = TaskTracker::new();
        let writer = tokio::spawn(writer(Writer {
            rx,
            parked: parked.clone(),
            store,
            decisions,
            fleet,
            clock,
            stats: Arc::clone(&stats),
            stop: stop_rx,
            _keep_open: Arc::clone(&stop),
        }));
        (
            InProcessSink {
                tx,
                parked,
                stats: Arc::clone(&stats),
            },
            InProcessSinkRunner {
                writer,
                stop,
                stats,
            },
        )
    }
}

/// The embedded bus's share of the fleet metrics: what it applied, published to the gateway's
/// global metrics after every batch.
struct Fleet {
    global: Arc<GlobalMetrics>,
    aggregator: FleetAggregator,
    view: FleetView,
}

impl Fleet {
    fn record(
        &mut self,
        batch: &[Event],
        report: &tally_ingest::BatchReport,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let applied: std::collections::HashSet<&uuid::Uuid> = report.applied.iter().collect();
        for e in batch {
            if let EventBody::Usage(u) = &e.body
                && applied.contains(&e.event_id)
            {
                self.aggregator.record(u, now);
            }
        }
        // Cheap (a merge over a few hundred slots and models), so the strategies see every
        // batch at once.
        self.view.absorb(self.aggregator.report("in-process", now));
        self.global
            .set(crate::feedback::snapshot_of(&mut self.view, now));
    }
}

struct Writer {
    rx: mpsc::Receiver<Event>,
    parked: TaskTracker,
    store: Arc<Store>,
    decisions: Arc<DecisionCache>,
    fleet: Option<Fleet>,
    clock: Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>,
    stats: Arc<SinkStats>,
    stop: watch::Receiver<Option<Instant>>,
    /// The stop signal's sender lives as long as the writer, so a dropped runner never reads
    /// as a shutdown.
    _keep_open: Arc<watch::Sender<Option<Instant>>>,
}

async fn writer(mut w: Writer) {
    let mut batch: Vec<Event> = Vec::with_capacity(SINK_BATCH_MAX);
    loop {
        if batch.is_empty() {
            let next = tokio::select! {
                e = w.rx.recv() => e,
                _ = stopping(&mut w.stop) => break,
            };
            match next {
                Some(e) => batch.push(e),
                None => return,
            }
        }
        let deadline = tokio::time::Instant::now() + SINK_BATCH_WAIT;
        while batch.len() < SINK_BATCH_MAX {
            match tokio::time::timeout_at(deadline, w.rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                Ok(None) | Err(_) => break,
            }
        }
        w.apply(&mut batch).await;
    }
    // Shutting down: apply what is buffered, and what parked tasks still hand over, then close.
    w.parked.close();
    let mut closed = false;
    loop {
        let received = if closed {
            w.rx.recv_many(&mut batch, SINK_BATCH_MAX).await
        } else {
            tokio::select! {
                n = w.rx.recv_many(&mut batch, SINK_BATCH_MAX) => n,
                _ = w.parked.wait() => {
                    w.rx.close();
                    closed = true;
                    continue;
                }
            }
        };
        if received == 0 {
            break;
        }
        w.apply(&mut batch).await;
    }
}

/// Resolves once a shutdown is asked for (holding no borrow, so the writer stays `Send`).
async fn stopping(stop: &mut watch::Receiver<Option<Instant>>) {
    let _ = stop.wait_for(Option::is_some).await.map(drop);
}

impl Writer {
    /// A shutdown's deadline has passed: database outages are no longer waited out.
    fn past_deadline(&self) -> bool {
        matches!(*self.stop.borrow(), Some(d) if Instant::now() >= d)
    }

    /// Applies `batch` and empties it: retries while the database is unavailable (until a
    /// shutdown's deadline), sets aside only the events the ledger refuses.
    async fn apply(&mut self, batch: &mut Vec<Event>) {
        loop {
            let now = (self.clock)();
            match self.store.ingest(batch, BatchMode::BestEffort, now).await {
                Ok(report) => {
                    let stats = &self.stats;
                    stats
                        .applied
                        .fetch_add(report.applied.len() as u64, Ordering::Relaxed);
                    stats
                        .duplicates
                        .fetch_add(report.duplicates.len() as u64, Ordering::Relaxed);
                    stats
                        .rejected
                        .fetch_add(report.rejected.len() as u64, Ordering::Relaxed);
                    for r in &report.rejected {
                        tracing::error!(event_id = %r.event_id, error = %r.error, "usage event refused by the ledger");
                    }
                    self.decisions
                        .update_from_states(report.states.values(), now);
                    if let Some(f) = self.fleet.as_mut() {
                        f.record(batch, &report, now);
                    }
                    batch.clear();
                    return;
                }
                Err(e) if e.is_transient() => {
                    if self.give_up(batch, &e) {
                        batch.clear();
                        return;
                    }
                    // The database is down or busy: keep the batch and retry; ingest is
                    // idempotent by event id, so a retry never double counts.
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, events = batch.len(), "ledger write failed; retrying");
                    self.pause().await;
                }
                Err(e) => {
                    // Something in this batch cannot be stored at all. Retrying it whole would
                    // block every later event, so apply the events one by one and set aside only
                    // the one that fails alone.
                    tracing::warn!(error = %e, events = batch.len(), "batch refused; applying its events one by one");
                    for event in std::mem::take(batch) {
                        self.apply_one(event).await;
                    }
                    return;
                }
            }
        }
    }

    async fn apply_one(&mut self, event: Event) {
        loop {
            let one = std::slice::from_ref(&event);
            match self
                .store
                .ingest(one, BatchMode::BestEffort, (self.clock)())
                .await
            {
                Ok(report) => {
                    self.stats
                        .applied
                        .fetch_add(report.applied.len() as u64, Ordering::Relaxed);
                    self.decisions
                        .update_from_states(report.states.values(), (self.clock)());
                    return;
                }
                // Only what the event brings on itself sets it aside; anything else (an outage,
                // a full disk, a read-only standby) is waited out like a transient failure.
                Err(e) if !e.is_event_fault() => {
                    if self.give_up(std::slice::from_ref(&event), &e) {
                        return;
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    self.pause().await;
                }
                Err(e) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(event_id = %event.event_id, account_id = %event.account_id,
                        error = %e, "usage event cannot be stored; dropped");
                    return;
                }
            }
        }
    }

    /// Past a shutdown's deadline, counts `events` as dropped: the caller gives up on them.
    fn give_up(&self, events: &[Event], e: &tally_ingest::StoreError) -> bool {
        if !self.past_deadline() {
            return false;
        }
        self.stats
            .dropped
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        for event in events {
            tracing::error!(event_id = %event.event_id, error = %e,
                "usage event dropped: the ledger stayed unavailable until the shutdown deadline");
        }
        true
    }

    /// Waits before a retry; a shutdown's deadline cuts it short.
    async fn pause(&mut self) {
        let until = Instant::now() + SINK_RETRY_DELAY;
        let until = match *self.stop.borrow_and_update() {
            Some(d) => until.min(d),
            None => until,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            // A shutdown starting now sets a deadline, which the next pause honours.
            _ = self.stop.changed() => {}
        }
    }
}

/// A sink that keeps events in memory, for tests.
#[derive(Debug, Default)]
pub struct MemorySink(pub std::sync::Mutex<Vec<Event>>);

impl EventSink for MemorySink {
    fn send(&self, event: Event) {
        match self.0.lock() {
            Ok(mut v) => v.push(event),
            Err(p) => p.into_inner().push(event),
        }
    }
}
