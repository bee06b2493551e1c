//! Fleet-wide model metrics: what every gateway's attempts looked like per (provider, model),
//! aggregated where the events are applied and published to the gateways for their routing
//! strategies (`m.metrics.global.*`).
//!
//! Each ingest instance sees only its own partitions, so a report is one instance's share and
//! must be mergeable: counts and sums add, and latency goes into fixed buckets, whose counts
//! add too, so percentiles over the merged buckets are the fleet's. Routing hints, not
//! accounting: floats are fine in the derived views.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_ledger::Usage;

/// Upper bounds (ms) of the latency buckets; one more bucket holds everything slower. Spaced
/// about ×1.5 so a percentile read off a bucket bound is within that factor.
pub const LATENCY_BOUNDS_MS: [u64; 30] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000,
    3_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 60_000, 120_000, 300_000,
];

/// A report covers this much recent time.
pub const WINDOW_SECS: i64 = 300;
/// Attempts are counted in slots of this length; the window slides by whole slots.
pub const SLOT_SECS: i64 = 10;

/// One (provider, model)'s attempts in a window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelWindow {
    pub requests: u64,
    pub failed: u64,
    /// Over successful attempts only: a 429 that returns at once would make a model look fast.
    pub ok_upstream_ms_sum: u64,
    pub ok_output_tokens: u64,
    /// Successful attempts per latency bucket (`LATENCY_BOUNDS_MS`, then the overflow bucket).
    pub latency_buckets: Vec<u64>,
}

impl ModelWindow {
    fn record(&mut self, usage: &Usage) {
        self.requests += 1;
        if !usage.is_success() {
            self.failed += 1;
            return;
        }
        self.ok_upstream_ms_sum = self
            .ok_upstream_ms_sum
            .saturating_add(usage.upstream_latency_ms);
        let out = usage.tokens.output.max(0) + usage.tokens.reasoning.max(0);
        self.ok_output_tokens = self
            .ok_output_tokens
            .saturating_add(u64::try_from(out).unwrap_or(0));
        let idx = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| usage.upstream_latency_ms <= *b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.bucket_mut(idx);
        self.latency_buckets[idx] += 1;
    }

    fn bucket_mut(&mut self, idx: usize) {
        if self.latency_buckets.len() <= idx {
            self.latency_buckets.resize(LATENCY_BOUNDS_MS.len() + 1, 0);
        }
    }

    pub fn merge(&mut self, other: &ModelWindow) {
        self.requests += other.requests;
        self.failed += other.failed;
        self.ok_upstream_ms_sum = self
            .ok_upstream_ms_sum
            .saturating_add(other.ok_upstream_ms_sum);
        self.ok_output_tokens = self.ok_output_tokens.saturating_add(other.ok_output_tokens);
        for (i, c) in other
            .latency_buckets
            .iter()
            .enumerate()
            .take(LATENCY_BOUNDS_MS.len() + 1)
        {
            self.bucket_mut(i);
            self.latency_buckets[i] += c;
        }
    }

    fn ok(&self) -> u64 {
        self.requests - self.failed.min(self.requests)
    }

    pub fn upstream_ms_avg(&self) -> f64 {
        match self.ok() {
            0 => 0.0,
            n => self.ok_upstream_ms_sum as f64 / n as f64,
        }
    }

    /// The bound of the bucket holding the `q` quantile of successful attempts (0 when none).
    pub fn upstream_ms_quantile(&self, q: f64) -> f64 {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.latency_buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return LATENCY_BOUNDS_MS
                    .get(i)
                    .copied()
                    .unwrap_or(LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1])
                    as f64;
            }
        }
        0.0
    }

    pub fn error_rate(&self) -> f64 {
        match self.requests {
            0 => 0.0,
            n => self.failed as f64 / n as f64,
        }
    }

    pub fn tokens_per_second(&self) -> f64 {
        match self.ok_upstream_ms_sum {
            0 => 0.0,
            ms => self.ok_output_tokens as f64 / (ms as f64 / 1000.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub provider: String,
    pub model: String,
    #[serde(flatten)]
    pub window: ModelWindow,
}

/// One ingest instance's share of the fleet's metrics, as published on the metrics topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetReport {
    /// The publishing instance; a gateway keeps the latest report of each.
    pub instance: String,
    pub at: DateTime<Utc>,
    pub window_secs: i64,
    pub models: Vec<ModelEntry>,
}

/// Distinct (provider, model) pairs counted at once; clients can invent model names.
pub const MAX_MODELS: usize = 4096;

/// (provider, model) → its window.
pub type ModelWindows = HashMap<(String, String), ModelWindow>;

/// Counts applied usage in time slots and reports the last `WINDOW_SECS`.
#[derive(Debug, Default)]
pub struct FleetAggregator {
    /// (slot number, the slot's counts), oldest first.
    slots: VecDeque<(i64, ModelWindows)>,
}

impl FleetAggregator {
    pub fn new() -> FleetAggregator {
        FleetAggregator::default()
    }

    /// Counts one applied attempt, at the time it was applied (`now`), so a late event still
    /// counts as recent evidence.
    pub fn record(&mut self, usage: &Usage, now: DateTime<Utc>) {
        let slot = now.timestamp().div_euclid(SLOT_SECS);
        if self.slots.back().is_none_or(|(s, _)| *s < slot) {
            self.slots.push_back((slot, HashMap::new()));
        }
        self.expire(now);
        let Some((_, models)) = self.slots.back_mut() else {
            return;
        };
        let key = (usage.provider.clone(), usage.model.clone());
        if !models.contains_key(&key) && models.len() >= MAX_MODELS {
            return;
        }
        models.entry(key).or_default().record(usage);
    }

    fn expire(&mut self, now: DateTime<Utc>) {
        let oldest = (now.timestamp() - WINDOW_SECS).div_euclid(SLOT_SECS);
        while self.slots.front().is_some_and(|(s, _)| *s <= oldest) {
            self.slots.pop_front();
        }
    }

    pub fn report(&mut self, instance: &str, now: DateTime<Utc>) -> FleetReport {
        self.expire(now);
        let mut merged: BTreeMap<(String, String), ModelWindow> = BTreeMap::new();
        for (_, models) in &self.slots {
            for (k, w) in models {
                merged.entry(k.clone()).or_default().merge(w);
            }
        }
        FleetReport {
            instance: instance.to_string(),
            at: now,
            window_secs: WINDOW_SECS,
            models: merged
                .into_iter()
                .map(|((provider, model), window)| ModelEntry {
                    provider,
                    model,
                    window,
                })
                .collect(),
        }
    }
}

/// The fleet's view: the latest report of every instance heard from recently, merged.
#[derive(Debug, Default)]
pub struct FleetView {
    reports: HashMap<String, FleetReport>,
}

impl FleetView {
    pub fn new() -> FleetView {
        FleetView::default()
    }

    /// Keeps `report` if it is the newest from its instance.
    pub fn absorb(&mut self, report: FleetReport) {
        match self.reports.get(&report.instance) {
            Some(old) if old.at > report.at => {}
            _ => {
                self.reports.insert(report.instance.clone(), report);
            }
        }
    }

    /// Every model's merged window; instances silent for longer than a window are left out
    /// (they stopped, and their share moved to another instance).
    pub fn merged(&mut self, now: DateTime<Utc>) -> ModelWindows {
        self.reports
            .retain(|_, r| (now - r.at).num_seconds() <= WINDOW_SECS);
        let mut out = ModelWindows::new();
        for r in self.reports.values() {
            for m in &r.models {
                out.entry((m.provider.clone(), m.model.clone()))
                    .or_default()
                    .merge(&m.window);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_ledger::{CredentialKind, TokenCounts, TokenSource};

    fn usage(model: &str, ms: u64, status: u16, out: i64) -> Usage {
        Usage {
            request_id: "r".into(),
            attempt: 1,
            endpoint_id: "default".into(),
            api_key_id: "k".into(),
            provider: "openai".into(),
            model: model.into(),
            credential_kind: CredentialKind::Managed,
            credential_id: "c".into(),
            tokens: TokenCounts {
                input: 10,
                output: out,
                ..TokenCounts::default()
            },
            token_source: TokenSource::Provider,
            upstream_latency_ms: ms,
            total_latency_ms: ms + 1,
            status,
            streaming: false,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn two_instances_merge_to_the_fleet_percentiles() {
        let mut a = FleetAggregator::new();
        let mut b = FleetAggregator::new();
        for i in 0..90 {
            a.record(&usage("gpt-4o", 100, 200, 50), at(i % 20));
        }
        for i in 0..10 {
            b.record(&usage("gpt-4o", 2_000, 200, 50), at(i % 20));
        }
        b.record(&usage("gpt-4o", 5, 429, 0), at(5));
        let mut view = FleetView::new();
        view.absorb(a.report("a", at(30)));
        view.absorb(b.report("b", at(30)));
        let m = &view.merged(at(31))[&("openai".to_string(), "gpt-4o".to_string())];
        assert_eq!(m.requests, 101);
        assert_eq!(m.failed, 1);
        assert_eq!(m.upstream_ms_quantile(0.5), 100.0);
        assert_eq!(m.upstream_ms_quantile(0.95), 2_000.0);
        assert!(
            (m.upstream_ms_avg() - 290.0).abs() < 1e-9,
            "{}",
            m.upstream_ms_avg()
        );
        assert!((m.error_rate() - 1.0 / 101.0).abs() < 1e-9);
        // 100 attempts × 50 tokens over 29 s of upstream time.
        assert!((m.tokens_per_second() - 5_000.0 / 29.0).abs() < 1e-9);
    }

    #[test]
    fn the_window_slides_and_silent_instances_drop_out() {
        let mut a = FleetAggregator::new();
        a.record(&usage("gpt-4o", 100, 200, 1), at(0));
        assert_eq!(a.report("a", at(WINDOW_SECS + SLOT_SECS)).models.len(), 0);
        let mut view = FleetView::new();
        a.record(&usage("gpt-4o", 100, 200, 1), at(400));
        view.absorb(a.report("a", at(400)));
        // An older report from the same instance does not replace a newer one.
        view.absorb(FleetReport {
            instance: "a".into(),
            at: at(1),
            window_secs: WINDOW_SECS,
            models: vec![],
        });
        assert_eq!(view.merged(at(401)).len(), 1);
        assert_eq!(view.merged(at(400 + WINDOW_SECS + 1)).len(), 0);
    }

    #[test]
    fn reports_round_trip_as_json() {
        let mut a = FleetAggregator::new();
        a.record(&usage("gpt-4o", 100, 200, 1), at(0));
        let r = a.report("a", at(1));
        let back: FleetReport = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
