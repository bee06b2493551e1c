//! Expiry as events: lots past their expiry get a `lot_expired` event appended, so a replay of
//! the log expires exactly the same amounts at exactly the same instants.

use chrono::{DateTime, Utc};
use tally_ledger::event::LotExpired;
use tally_ledger::{Event, EventBody};
use uuid::Uuid;

use crate::error::StoreError;
use crate::store::{BatchMode, Store};

/// A lot is expired this long after its expiry instant, not at once: usage that happened
/// before the instant (a long stream, a queued event) may still be on its way, and must find the
/// lot open rather than be charged as debt while the same credits go to breakage.
pub const EXPIRY_GRACE_SECS: i64 = 900;

/// Lots expired per sweep round; the sweep loops until none are due.
pub const SWEEP_BATCH: i64 = 1000;

/// Namespace of the deterministic ids of expiry events: one id per lot, so two sweepers (or a
/// retried sweep) append the expiry once.
const EXPIRY_NAMESPACE: Uuid = Uuid::from_u128(0x6a0c_91f4_0d55_4d0b_9a43_c1e4_0f2e_7b11);

pub fn expiry_event_id(lot_id: Uuid) -> Uuid {
    Uuid::new_v5(&EXPIRY_NAMESPACE, lot_id.as_bytes())
}

/// Expires every open lot whose expiry is at least [`EXPIRY_GRACE_SECS`] before `now`. Returns
/// how many were expired.
pub async fn expire_due(store: &Store, now: DateTime<Utc>) -> Result<usize, StoreError> {
    let due_before = now - chrono::Duration::seconds(EXPIRY_GRACE_SECS);
    let mut total = 0;
    loop {
        let due: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
            "select lot_id, account_id, expires_at from credit_lot
             where status = 'open' and expires_at <= $1 order by expires_at, lot_id limit $2",
        )
        .bind(due_before)
        .bind(SWEEP_BATCH)
        .fetch_all(store.pool())
        .await?;
        if due.is_empty() {
            return Ok(total);
        }
        let events: Vec<Event> = due
            .iter()
            .map(|(lot_id, account_id, expires_at)| Event {
                event_id: expiry_event_id(*lot_id),
                // Event time is the expiry instant itself, whenever the sweep runs.
                occurred_at: *expires_at,
                account_id: account_id.clone(),
                body: EventBody::LotExpired(LotExpired { lot_id: *lot_id }),
            })
            .collect();
        let report = store.ingest(&events, BatchMode::BestEffort, now).await?;
        total += report.applied.len();
        if report.applied.is_empty() {
            // Everything due was already expired by someone else, or refused: stop, do not spin.
            return Ok(total);
        }
    }
}
