//! Where the gateway hands its usage events. The client's response never waits on it.
//!
//! [`InProcessSink`] is the embedded default: a bounded channel drained by one task that
//! applies events to the ledger in batches and refreshes decisions from the result. The Kafka
//! pipeline implements [`EventSink`] a second time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tally_ingest::fleet::{FleetAggregator, FleetView};
use tally_ingest::{BatchMode, Store};
use tally_ledger::{Event, EventBody};
use tokio::sync::mpsc;

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
}

#[derive(Debug, Clone)]
pub struct InProcessSink {
    tx: mpsc::Sender<Event>,
    pub stats: Arc<SinkStats>,
}

impl EventSink for InProcessSink {
    fn send(&self, event: Event) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::TrySendError::Full(event)) = self.tx.try_send(event) {
            // Full: park the event on its own task rather than drop it or stall the client.
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(event).await;
            });
        }
    }
}

impl InProcessSink {
    /// Starts the writer task. It ends once every sender is dropped and the channel drained.
    pub fn start(
        store: Arc<Store>,
        decisions: Arc<DecisionCache>,
        clock: Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>,
    ) -> (InProcessSink, tokio::task::JoinHandle<()>) {
        Self::start_with_fleet(store, decisions, None, clock)
    }

    /// Like [`InProcessSink::start`], also feeding the fleet model metrics into `global` from
    /// what it applies, as the Kafka pipeline's ingest does (the embedded bus is the fleet).
    pub fn start_with_fleet(
        store: Arc<Store>,
        decisions: Arc<DecisionCache>,
        global: Option<Arc<GlobalMetrics>>,
        clock: Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>,
    ) -> (InProcessSink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(SINK_CHANNEL_CAPACITY);
        let stats = Arc::new(SinkStats::default());
        let fleet = global.map(|g| Fleet {
            global: g,
            aggregator: FleetAggregator::new(),
            view: FleetView::new(),
        });
        let handle = tokio::spawn(writer(
            rx,
            store,
            decisions,
            fleet,
            clock,
            Arc::clone(&stats),
        ));
        (InProcessSink { tx, stats }, handle)
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

async fn writer(
    mut rx: mpsc::Receiver<Event>,
    store: Arc<Store>,
    decisions: Arc<DecisionCache>,
    mut fleet: Option<Fleet>,
    clock: Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>,
    stats: Arc<SinkStats>,
) {
    let mut batch: Vec<Event> = Vec::with_capacity(SINK_BATCH_MAX);
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(e) => batch.push(e),
                None => return,
            }
        }
        let deadline = tokio::time::Instant::now() + SINK_BATCH_WAIT;
        while batch.len() < SINK_BATCH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                Ok(None) | Err(_) => break,
            }
        }
        let now = clock();
        match store.ingest(&batch, BatchMode::BestEffort, now).await {
            Ok(report) => {
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
                decisions.update_from_states(report.states.values(), now);
                if let Some(f) = fleet.as_mut() {
                    f.record(&batch, &report, now);
                }
                batch.clear();
            }
            Err(e) if e.is_transient() => {
                // The database is down or busy: keep the batch and retry; ingest is idempotent
                // by event id, so a retry never double counts.
                stats.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, events = batch.len(), "ledger write failed; retrying");
                tokio::time::sleep(SINK_RETRY_DELAY).await;
            }
            Err(e) => {
                // Something in this batch cannot be stored at all. Retrying it whole would block
                // every later event, so apply the events one by one and set aside only the one
                // that fails alone.
                tracing::warn!(error = %e, events = batch.len(), "batch refused; applying its events one by one");
                for event in std::mem::take(&mut batch) {
                    loop {
                        match store
                            .ingest(std::slice::from_ref(&event), BatchMode::BestEffort, clock())
                            .await
                        {
                            Ok(report) => {
                                stats
                                    .applied
                                    .fetch_add(report.applied.len() as u64, Ordering::Relaxed);
                                decisions.update_from_states(report.states.values(), clock());
                                break;
                            }
                            Err(e) if e.is_transient() => {
                                tokio::time::sleep(SINK_RETRY_DELAY).await
                            }
                            Err(e) => {
                                stats.rejected.fetch_add(1, Ordering::Relaxed);
                                tracing::error!(event_id = %event.event_id, account_id = %event.account_id,
                                    error = %e, "usage event cannot be stored; dropped");
                                break;
                            }
                        }
                    }
                }
            }
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
