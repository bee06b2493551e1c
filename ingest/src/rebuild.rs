//! Replay: empty every projection and fold the whole log through the same domain function and
//! the same writers as the live path. One transaction, so readers see the old projections or
//! the new ones, never a mix.

use std::collections::HashMap;

use sqlx::types::Json;
use tally_ledger::{AccountState, Event, apply};

use crate::error::StoreError;
use crate::project::{self, AppliedEvent};
use crate::store::Store;

/// Events read and written per round of the replay.
pub const REPLAY_PAGE: i64 = 5000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    pub events: u64,
    pub accounts: u64,
}

pub async fn rebuild(store: &Store) -> Result<RebuildReport, StoreError> {
    let prices = store.prices();
    let mut tx = store.pool().begin().await?;
    // Blocks ingest (which inserts into event) until the replay commits.
    sqlx::query("lock table event in exclusive mode")
        .execute(&mut *tx)
        .await?;
    sqlx::query("truncate ledger_entry, credit_lot, usage_hourly, account")
        .execute(&mut *tx)
        .await?;

    let mut states: HashMap<String, Option<AccountState>> = HashMap::new();
    let mut after = i64::MIN;
    let mut count = 0u64;
    loop {
        let rows: Vec<(i64, Json<Event>, Vec<u8>)> = sqlx::query_as(
            "select seq, payload, payload_hash from event where seq > $1 order by seq limit $2",
        )
        .bind(after)
        .bind(REPLAY_PAGE)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        let events: Vec<(i64, Event, [u8; 32])> = rows
            .into_iter()
            .map(|(seq, Json(e), h)| {
                let hash: [u8; 32] = h
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(format!("hash of seq {seq}")))?;
                Ok((seq, e, hash))
            })
            .collect::<Result<_, StoreError>>()?;
        let mut items = Vec::with_capacity(events.len());
        let mut touched: Vec<String> = Vec::new();
        for (seq, event, hash) in &events {
            let slot = states.entry(event.account_id.clone()).or_insert(None);
            let applied = apply(slot, event, &prices).map_err(|e| {
                StoreError::Corrupt(format!(
                    "event seq {seq} ({}) no longer applies: {e}",
                    event.event_id
                ))
            })?;
            touched.push(event.account_id.clone());
            items.push(AppliedEvent {
                seq: *seq,
                event,
                hash: *hash,
                applied,
            });
        }
        touched.sort();
        touched.dedup();
        let touched_states: Vec<&AccountState> = touched
            .iter()
            .filter_map(|a| states.get(a).and_then(Option::as_ref))
            .collect();
        project::write_projections(&mut tx, &items, &touched_states).await?;
        count += items.len() as u64;
        // Closed lots never change again and are not needed by later events except to judge
        // a void or expiry naming them, which the domain does by id: keep them.
    }
    tx.commit().await?;
    Ok(RebuildReport {
        events: count,
        accounts: states.len() as u64,
    })
}
