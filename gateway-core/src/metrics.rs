//! Live model metrics for selection strategies: what this gateway saw of each (provider, model)
//! over a short sliding window ([`ModelMetrics`]), and what the fleet saw ([`GlobalMetrics`],
//! filled by a feed).
//!
//! These are routing hints, not accounting: they may be approximate, they are lost on restart,
//! and floats are fine here. Money and token accounting live in the usage events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

/// Attempts kept per (provider, model): enough for stable percentiles, small enough that a
/// snapshot sorts them in microseconds.
pub const WINDOW_ATTEMPTS: usize = 1024;

/// Older attempts are forgotten, so that a model that recovered (or broke) is seen as it is now
/// rather than as it was during a busy hour.
pub const WINDOW_MAX_AGE: Duration = Duration::from_secs(5 * 60);

/// Distinct (provider, model) pairs tracked at once. Clients can name any pass-through model
/// (`openai:whatever`), so without a bound the map would grow with every invented name.
pub const MAX_TRACKED_MODELS: usize = 4096;

/// (provider id, the provider's own model name).
pub type ModelKey = (String, String);

/// Metrics of every model seen, by (provider, model).
pub type MetricsSnapshot = HashMap<ModelKey, MetricsView>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyView {
    pub upstream_ms_avg: f64,
    pub upstream_ms_p50: f64,
    pub upstream_ms_p95: f64,
}

/// One model's metrics over the window. Latency and throughput come from successful attempts
/// only: a failure that returns at once (a 429) would otherwise make a model look fast.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsView {
    pub latency: LatencyView,
    /// Failed attempts / attempts, 0..=1.
    pub error_rate: f64,
    /// Output tokens per second of upstream time.
    pub tokens_per_second: f64,
    /// Attempts in the window, failed ones included.
    pub requests: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    upstream_ms: u64,
    ok: bool,
    output_tokens: i64,
}

#[derive(Debug, Default)]
struct Window {
    samples: VecDeque<Sample>,
}

impl Window {
    fn push(&mut self, sample: Sample) {
        if self.samples.len() >= WINDOW_ATTEMPTS {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.expire(sample.at);
    }

    fn expire(&mut self, now: Instant) {
        while self
            .samples
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > WINDOW_MAX_AGE)
        {
            self.samples.pop_front();
        }
    }

    fn view(&self, now: Instant) -> Option<MetricsView> {
        let live = self
            .samples
            .iter()
            .filter(|s| now.saturating_duration_since(s.at) <= WINDOW_MAX_AGE);
        let mut requests = 0u64;
        let mut failures = 0u64;
        let mut ok_ms: Vec<u64> = Vec::with_capacity(self.samples.len());
        let mut ok_tokens = 0i64;
        for s in live {
            requests += 1;
            if s.ok {
                ok_ms.push(s.upstream_ms);
                ok_tokens = ok_tokens.saturating_add(s.output_tokens.max(0));
            } else {
                failures += 1;
            }
        }
        if requests == 0 {
            return None;
        }
        let mut view = MetricsView {
            requests,
            error_rate: failures as f64 / requests as f64,
            ..MetricsView::default()
        };
        if !ok_ms.is_empty() {
            ok_ms.sort_unstable();
            let total_ms: u64 = ok_ms.iter().fold(0u64, |a, &b| a.saturating_add(b));
            view.latency = LatencyView {
                upstream_ms_avg: total_ms as f64 / ok_ms.len() as f64,
                upstream_ms_p50: nearest_rank(&ok_ms, 0.50) as f64,
                upstream_ms_p95: nearest_rank(&ok_ms, 0.95) as f64,
            };
            if total_ms > 0 {
                view.tokens_per_second = ok_tokens as f64 * 1000.0 / total_ms as f64;
            }
        }
        Some(view)
    }
}

/// The nearest-rank percentile: always one of the observed values, never an interpolation.
fn nearest_rank(sorted: &[u64], p: f64) -> u64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    let index = rank.min(sorted.len()).saturating_sub(1);
    sorted.get(index).copied().unwrap_or_default()
}

#[derive(Debug)]
struct CachedSnapshot {
    taken: Instant,
    snapshot: Arc<MetricsSnapshot>,
}

/// This gateway's own observations, per (provider, model), over the last [`WINDOW_ATTEMPTS`]
/// attempts and at most [`WINDOW_MAX_AGE`].
///
/// Recording takes one shard lock of the map and the model's own mutex, so attempts on
/// different models do not contend.
#[derive(Debug, Default)]
pub struct ModelMetrics {
    windows: DashMap<ModelKey, Mutex<Window>>,
    cached: ArcSwapOption<CachedSnapshot>,
}

impl ModelMetrics {
    pub fn new() -> ModelMetrics {
        ModelMetrics::default()
    }

    /// One attempt: its upstream latency, whether it succeeded, and the output tokens it
    /// produced.
    pub fn record(
        &self,
        provider: &str,
        model: &str,
        upstream_ms: u64,
        ok: bool,
        output_tokens: i64,
    ) {
        self.record_at(
            Instant::now(),
            provider,
            model,
            upstream_ms,
            ok,
            output_tokens,
        );
    }

    /// [`record`](Self::record) at a given time, for tests that need the window to age.
    pub fn record_at(
        &self,
        at: Instant,
        provider: &str,
        model: &str,
        upstream_ms: u64,
        ok: bool,
        output_tokens: i64,
    ) {
        let sample = Sample {
            at,
            upstream_ms,
            ok,
            output_tokens,
        };
        let key = (provider.to_string(), model.to_string());
        if let Some(window) = self.windows.get(&key) {
            lock(&window).push(sample);
            return;
        }
        if self.windows.len() >= MAX_TRACKED_MODELS {
            self.forget_idle(at);
            if self.windows.len() >= MAX_TRACKED_MODELS {
                // Dropping one routing hint is better than unbounded memory.
                return;
            }
        }
        let window = self.windows.entry(key).or_default();
        lock(&window).push(sample);
    }

    fn forget_idle(&self, now: Instant) {
        self.windows.retain(|_, window| {
            let mut w = lock(window);
            w.expire(now);
            !w.samples.is_empty()
        });
    }

    /// Every model's metrics now. Locks each window briefly and sorts its latencies: meant to
    /// be taken once in a while (see [`snapshot_cached`](Self::snapshot_cached)), not per
    /// request.
    pub fn snapshot(&self) -> MetricsSnapshot {
        self.snapshot_at(Instant::now())
    }

    pub fn snapshot_at(&self, now: Instant) -> MetricsSnapshot {
        self.windows
            .iter()
            .filter_map(|entry| {
                let view = lock(entry.value()).view(now)?;
                Some((entry.key().clone(), view))
            })
            .collect()
    }

    /// A snapshot at most `max_age` old, shared between callers. The same `Arc` comes back until
    /// it is replaced, so callers can key their own caches on it (`Arc::ptr_eq`).
    pub fn snapshot_cached(&self, max_age: Duration) -> Arc<MetricsSnapshot> {
        let now = Instant::now();
        if let Some(cached) = self.cached.load().as_ref()
            && now.saturating_duration_since(cached.taken) < max_age
        {
            return Arc::clone(&cached.snapshot);
        }
        // Racing callers may each take one; the last stored wins and all are equally fresh.
        let snapshot = Arc::new(self.snapshot_at(now));
        self.cached.store(Some(Arc::new(CachedSnapshot {
            taken: now,
            snapshot: Arc::clone(&snapshot),
        })));
        snapshot
    }
}

/// A poisoned window only means a panic elsewhere mid-push; its samples are still usable.
fn lock(window: &Mutex<Window>) -> std::sync::MutexGuard<'_, Window> {
    window.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Metrics aggregated across the fleet, replaced wholesale by a feed; empty until one arrives.
#[derive(Debug, Default)]
pub struct GlobalMetrics {
    current: ArcSwap<MetricsSnapshot>,
}

impl GlobalMetrics {
    pub fn new() -> GlobalMetrics {
        GlobalMetrics::default()
    }

    pub fn set(&self, map: MetricsSnapshot) {
        self.current.store(Arc::new(map));
    }

    /// The current map; the same `Arc` until the next [`set`](Self::set).
    pub fn load(&self) -> Arc<MetricsSnapshot> {
        self.current.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_observed_values() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 0.5), 50);
        assert_eq!(nearest_rank(&v, 0.95), 95);
        assert_eq!(nearest_rank(&[7], 0.95), 7);
        assert_eq!(nearest_rank(&[], 0.5), 0);
    }

    #[test]
    fn window_is_bounded_by_count_and_age() {
        let m = ModelMetrics::new();
        let t0 = Instant::now();
        for i in 0..(WINDOW_ATTEMPTS as u64 + 10) {
            m.record_at(t0, "openai", "gpt-4o", i, true, 10);
        }
        let s = m.snapshot_at(t0);
        let view = s[&("openai".to_string(), "gpt-4o".to_string())];
        assert_eq!(view.requests, WINDOW_ATTEMPTS as u64);
        // The oldest ten (0..10 ms) were pushed out.
        assert_eq!(
            view.latency.upstream_ms_p50,
            (10 + WINDOW_ATTEMPTS / 2 - 1) as f64
        );

        let later = t0 + WINDOW_MAX_AGE + Duration::from_secs(1);
        assert!(m.snapshot_at(later).is_empty());
    }

    #[test]
    fn errors_do_not_count_towards_latency() {
        let m = ModelMetrics::new();
        m.record("anthropic", "claude-haiku-4-5", 1000, true, 500);
        m.record("anthropic", "claude-haiku-4-5", 3000, true, 1500);
        m.record("anthropic", "claude-haiku-4-5", 1, false, 0);
        m.record("anthropic", "claude-haiku-4-5", 2, false, 0);
        let s = m.snapshot();
        let v = s[&("anthropic".to_string(), "claude-haiku-4-5".to_string())];
        assert_eq!(v.requests, 4);
        assert!((v.error_rate - 0.5).abs() < 1e-9);
        assert!((v.latency.upstream_ms_avg - 2000.0).abs() < 1e-9);
        assert!((v.tokens_per_second - 500.0).abs() < 1e-9);
        assert_eq!(v.latency.upstream_ms_p50, 1000.0);
        assert_eq!(v.latency.upstream_ms_p95, 3000.0);
    }

    #[test]
    fn tracked_models_are_bounded() {
        let m = ModelMetrics::new();
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_MODELS {
            m.record_at(t0, "openai", &format!("m{i}"), 1, true, 1);
        }
        m.record_at(t0, "openai", "one-too-many", 1, true, 1);
        assert_eq!(m.windows.len(), MAX_TRACKED_MODELS);
        // Once the old ones age out there is room again.
        let later = t0 + WINDOW_MAX_AGE + Duration::from_secs(1);
        m.record_at(later, "openai", "fresh", 1, true, 1);
        assert_eq!(m.windows.len(), 1);
    }

    #[test]
    fn cached_snapshot_is_shared_until_stale() {
        let m = ModelMetrics::new();
        m.record("openai", "gpt-4o", 10, true, 1);
        let a = m.snapshot_cached(Duration::from_secs(60));
        m.record("openai", "gpt-4o", 10, true, 1);
        let b = m.snapshot_cached(Duration::from_secs(60));
        assert!(Arc::ptr_eq(&a, &b));
        let c = m.snapshot_cached(Duration::ZERO);
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn global_starts_empty() {
        let g = GlobalMetrics::new();
        assert!(g.load().is_empty());
        let mut map = MetricsSnapshot::new();
        map.insert(("openai".into(), "gpt-4o".into()), MetricsView::default());
        g.set(map);
        assert_eq!(g.load().len(), 1);
    }
}
