//! The gateway's in-memory enforcement decisions. The request path only reads this map; it is
//! fed by the event sink after each applied batch and by a refresher that follows the ledger
//! (purchases, grants, expiries, other instances) about once a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sqlx::PgPool;
use tally_ledger::{AccountState, Decision, decide};

/// How often the refresher looks for accounts the ledger changed.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct DecisionCache {
    decisions: DashMap<String, Decision>,
    /// Highest `account.last_event_seq` already reflected.
    seen_seq: AtomicI64,
    /// The high-water marks of the last refreshes. Event seqs are drawn inside transactions
    /// that commit out of order, so a batch with a lower seq can land after a higher one has
    /// been seen; each refresh re-reads from the mark of several rounds ago to catch it.
    recent_marks: std::sync::Mutex<std::collections::VecDeque<i64>>,
}

/// Refresh rounds a change may commit late and still be seen (× `REFRESH_INTERVAL`).
pub const REFRESH_LOOKBACK_ROUNDS: usize = 20;

impl DecisionCache {
    pub fn new() -> Arc<DecisionCache> {
        Arc::new(DecisionCache::default())
    }

    /// Whether managed traffic of `account_id` may go upstream at `now`. An account the ledger
    /// has never decided for has no credits: denied.
    pub fn allow_managed(&self, account_id: &str, now: DateTime<Utc>) -> bool {
        match self.decisions.get(account_id) {
            Some(d) => match d.next_change_at {
                // Past a lot's expiry the cached "allow" may be stale; deny until refreshed
                // rather than spend credits that may be gone.
                Some(at) if at <= now && d.allow_managed => false,
                _ => d.allow_managed,
            },
            None => false,
        }
    }

    pub fn get(&self, account_id: &str) -> Option<Decision> {
        self.decisions.get(account_id).map(|d| d.clone())
    }

    pub fn update_from_states<'a>(
        &self,
        states: impl IntoIterator<Item = &'a AccountState>,
        now: DateTime<Utc>,
    ) {
        for s in states {
            if let Ok(d) = decide(s, now) {
                self.apply(d);
            }
        }
    }

    /// Takes `decision` unless the cache holds one evaluated later: decisions arrive by several
    /// paths (this process's commits, the decisions topic, the refresher), and a slow one must
    /// not overwrite a newer one. Returns whether it was taken.
    pub fn apply(&self, decision: Decision) -> bool {
        match self.decisions.entry(decision.account_id.clone()) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().evaluated_at > decision.evaluated_at {
                    return false;
                }
                e.insert(decision);
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(decision);
            }
        }
        true
    }

    /// Re-decides every account whose ledger changed since the last call, and every account
    /// whose decision may have changed with time.
    pub async fn refresh(
        &self,
        pool: &PgPool,
        now: DateTime<Utc>,
    ) -> Result<usize, tally_ingest::StoreError> {
        let since = {
            let marks = match self.recent_marks.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            marks
                .front()
                .copied()
                .unwrap_or_else(|| self.seen_seq.load(Ordering::Acquire))
        };
        let changed: Vec<(String, i64)> = sqlx::query_as(
            "select account_id, last_event_seq from account where last_event_seq > $1",
        )
        .bind(since)
        .fetch_all(pool)
        .await?;
        let mut ids: Vec<String> = changed.iter().map(|(a, _)| a.clone()).collect();
        ids.extend(
            self.decisions
                .iter()
                .filter(|d| d.next_change_at.is_some_and(|at| at <= now))
                .map(|d| d.account_id.clone()),
        );
        ids.sort();
        ids.dedup();
        for id in &ids {
            match tally_ingest::query::account_state(pool, id).await {
                Ok(state) => self.update_from_states([&state], now),
                Err(tally_ingest::StoreError::NotFound(_)) => {
                    self.decisions.remove(id);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(max) = changed.iter().map(|(_, s)| *s).max() {
            self.seen_seq.fetch_max(max, Ordering::AcqRel);
        }
        let mut marks = match self.recent_marks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        marks.push_back(self.seen_seq.load(Ordering::Acquire));
        while marks.len() > REFRESH_LOOKBACK_ROUNDS {
            marks.pop_front();
        }
        Ok(ids.len())
    }
}
