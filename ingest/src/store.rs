//! The write path: one PostgreSQL transaction per batch of events, applying the pure domain
//! and every projection together.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Duration, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tally_ledger::catalog::builtin_price_version;
use tally_ledger::{
    AccountState, Applied, DomainError, Event, EventBody, PriceBook, PriceVersion, apply,
};
use uuid::Uuid;

use crate::error::StoreError;
use crate::project::{self, AppliedEvent};
use crate::state;

/// Events may claim an event time at most this far ahead of the store's clock. Price versions
/// must take effect later than that, so no applied event is ever repriced by a new version.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;
/// The most events one batch may carry; larger inputs are split by the caller.
pub const MAX_BATCH_EVENTS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// One refused event refuses the whole batch (the HTTP API: nothing half-applied).
    AllOrNothing,
    /// Refused events are reported and skipped (ingest from a log, expiry sweeps).
    BestEffort,
}

#[derive(Debug, Clone)]
pub struct RejectedEvent {
    pub index: usize,
    pub event_id: Uuid,
    pub error: DomainError,
}

#[derive(Debug, Default)]
pub struct BatchReport {
    pub applied: Vec<Uuid>,
    pub duplicates: Vec<Uuid>,
    pub conflicts: Vec<Uuid>,
    pub rejected: Vec<RejectedEvent>,
    /// The state after the batch of every account it changed.
    pub states: HashMap<String, AccountState>,
}

impl BatchReport {
    pub fn changed_accounts(&self) -> BTreeSet<String> {
        self.states.keys().cloned().collect()
    }
}

/// An idempotency key claim: the command runs once per `(scope, key)`; a retry with the same
/// request hash gets the stored response, a different request is refused.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub scope: String,
    pub key: String,
    pub request_hash: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: serde_json::Value,
    /// True when this response was stored by an earlier identical request.
    pub replayed: bool,
}

/// Called after every committed batch with the new state of each account it changed: how the
/// gateways of this process learn of a purchase or an exhausted balance without polling.
pub type CommitListener = Arc<dyn Fn(&HashMap<String, AccountState>, DateTime<Utc>) + Send + Sync>;

pub struct Store {
    pool: PgPool,
    prices: RwLock<Arc<PriceBook>>,
    listeners: RwLock<Vec<CommitListener>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store over a migrated database and makes sure the built-in price version
    /// exists.
    pub async fn open(pool: PgPool, now: DateTime<Utc>) -> Result<Store, StoreError> {
        let builtin = builtin_price_version();
        sqlx::query(
            "insert into price_version (version, effective_from, document, published_at)
             values ($1, $2, $3, $4) on conflict do nothing",
        )
        .bind(&builtin.version)
        .bind(builtin.effective_from)
        .bind(sqlx::types::Json(&builtin))
        .bind(now)
        .execute(&pool)
        .await?;
        let store = Store {
            pool,
            prices: RwLock::new(Arc::new(PriceBook::default())),
            listeners: RwLock::new(Vec::new()),
        };
        let book = store.load_price_book(&store.pool).await?;
        store.set_prices(book);
        Ok(store)
    }

    pub fn on_commit(&self, listener: CommitListener) {
        match self.listeners.write() {
            Ok(mut l) => l.push(listener),
            Err(p) => p.into_inner().push(listener),
        }
    }

    fn notify(&self, states: &HashMap<String, AccountState>, now: DateTime<Utc>) {
        if states.is_empty() {
            return;
        }
        let listeners = match self.listeners.read() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        };
        for l in listeners {
            l(states, now);
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn prices(&self) -> Arc<PriceBook> {
        match self.prices.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn set_prices(&self, book: PriceBook) {
        match self.prices.write() {
            Ok(mut p) => *p = Arc::new(book),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(book),
        }
    }

    async fn load_price_book<'e, E>(&self, exec: E) -> Result<PriceBook, StoreError>
    where
        E: sqlx::PgExecutor<'e>,
    {
        let docs: Vec<sqlx::types::Json<PriceVersion>> =
            sqlx::query_scalar("select document from price_version order by effective_from")
                .fetch_all(exec)
                .await?;
        Ok(PriceBook::new(docs.into_iter().map(|d| d.0).collect())?)
    }

    /// Reloads the price book when another instance published a version since we loaded it.
    async fn current_prices(
        &self,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<Arc<PriceBook>, StoreError> {
        let latest: Option<String> = sqlx::query_scalar(
            "select version from price_version order by effective_from desc limit 1",
        )
        .fetch_optional(&mut **tx)
        .await?;
        let cached = self.prices();
        if latest.as_deref() == cached.versions().last().map(|v| v.version.as_str()) {
            return Ok(cached);
        }
        let book = self.load_price_book(&mut **tx).await?;
        self.set_prices(book);
        Ok(self.prices())
    }

    pub async fn publish_price_version(
        &self,
        v: PriceVersion,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("lock table price_version in exclusive mode")
            .execute(&mut *tx)
            .await?;
        let book = self.load_price_book(&mut *tx).await?;
        book.check_publishable(&v, now + Duration::seconds(MAX_CLOCK_SKEW_SECS))?;
        sqlx::query(
            "insert into price_version (version, effective_from, document, published_at) values ($1, $2, $3, $4)",
        )
        .bind(&v.version)
        .bind(v.effective_from)
        .bind(sqlx::types::Json(&v))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let book = self.load_price_book(&self.pool).await?;
        self.set_prices(book);
        Ok(())
    }

    /// Applies a batch: duplicates absorbed, conflicts recorded, the rest applied in order with
    /// all projections, in one transaction.
    pub async fn ingest(
        &self,
        events: &[Event],
        mode: BatchMode,
        now: DateTime<Utc>,
    ) -> Result<BatchReport, StoreError> {
        self.ingest_with(events, mode, now, None, |_| (200, serde_json::Value::Null))
            .await
            .map(|(report, _)| report)
    }

    /// Like [`Store::ingest`], run at most once per idempotency key. `respond` builds the
    /// response from the batch's outcome; it is stored with the events, in the same
    /// transaction.
    pub async fn ingest_with<F>(
        &self,
        events: &[Event],
        mode: BatchMode,
        now: DateTime<Utc>,
        idempotency: Option<&Idempotency>,
        respond: F,
    ) -> Result<(BatchReport, StoredResponse), StoreError>
    where
        F: Fn(&BatchReport) -> (u16, serde_json::Value),
    {
        // A concurrent batch may insert the same new event id between our check and our
        // insert (only across accounts, which do not share a lock); the retry sees it.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self
                .ingest_once(events, mode, now, idempotency, &respond)
                .await
            {
                Err(StoreError::Database(e)) if attempts < 3 && is_unique_violation(&e) => continue,
                other => {
                    if let Err(StoreError::Rejected { index, .. }) = &other {
                        crate::telemetry::observe_refused(events.get(*index));
                    }
                    return other;
                }
            }
        }
    }

    async fn ingest_once<F>(
        &self,
        events: &[Event],
        mode: BatchMode,
        now: DateTime<Utc>,
        idempotency: Option<&Idempotency>,
        respond: &F,
    ) -> Result<(BatchReport, StoredResponse), StoreError>
    where
        F: Fn(&BatchReport) -> (u16, serde_json::Value),
    {
        if events.len() > MAX_BATCH_EVENTS {
            return Err(DomainError::invalid(
                "events",
                format!("at most {MAX_BATCH_EVENTS} events per batch"),
            )
            .into());
        }
        let mut report = BatchReport::default();
        let mut candidates: Vec<(usize, &Event, [u8; 32])> = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let checked = event.validate().and_then(|()| check_not_future(event, now));
            match checked {
                Ok(()) => candidates.push((index, event, event.payload_hash())),
                Err(error) => reject(&mut report, mode, index, event.event_id, error)?,
            }
        }

        let mut tx = self.pool.begin().await?;
        if let Some(idem) = idempotency {
            sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 1))")
                .bind(format!("{}\n{}", idem.scope, idem.key))
                .execute(&mut *tx)
                .await?;
            let stored: Option<(Vec<u8>, i16, serde_json::Value)> = sqlx::query_as(
                "select request_hash, response_status, response_body from idempotency_record
                 where scope = $1 and idempotency_key = $2",
            )
            .bind(&idem.scope)
            .bind(&idem.key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((hash, status, body)) = stored {
                if hash != idem.request_hash {
                    return Err(StoreError::IdempotencyMismatch);
                }
                let status = u16::try_from(status).unwrap_or(200);
                return Ok((
                    report,
                    StoredResponse {
                        status,
                        body,
                        replayed: true,
                    },
                ));
            }
        }

        let accounts: BTreeSet<&str> = candidates
            .iter()
            .map(|(_, e, _)| e.account_id.as_str())
            .collect();
        let accounts: Vec<String> = accounts.into_iter().map(str::to_string).collect();
        // Per-account locks, taken in one sorted order so two batches never deadlock. They make
        // seq order equal application order within an account.
        sqlx::query(
            "select pg_advisory_xact_lock(k) from
             (select distinct hashtextextended(a, 0) as k from unnest($1::text[]) as a order by 1) as locks",
        )
        .bind(&accounts)
        .execute(&mut *tx)
        .await?;

        let ids: Vec<Uuid> = candidates.iter().map(|(_, e, _)| e.event_id).collect();
        let existing: HashMap<Uuid, Vec<u8>> = sqlx::query_as::<_, (Uuid, Vec<u8>)>(
            "select event_id, payload_hash from event where event_id = any($1)",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();

        let referenced_lots: Vec<Uuid> = candidates
            .iter()
            .filter_map(|(_, e, _)| match &e.body {
                EventBody::LotVoided(v) => Some(v.lot_id),
                EventBody::LotExpired(x) => Some(x.lot_id),
                _ => None,
            })
            .collect();
        let mut states: HashMap<String, Option<AccountState>> =
            state::load_states(&mut tx, &accounts, &referenced_lots).await?;
        // Lot ids are unique across accounts and for ever: a new lot may not reuse the id of
        // any lot, open or closed, of any account.
        let new_lots: Vec<Uuid> = candidates
            .iter()
            .filter_map(|(_, e, _)| opened_lot(e))
            .collect();
        let mut taken_lots: HashSet<Uuid> =
            sqlx::query_scalar("select lot_id from credit_lot where lot_id = any($1)")
                .bind(&new_lots)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let prices = self.current_prices(&mut tx).await?;

        let mut accepted_in_batch: HashMap<Uuid, [u8; 32]> = HashMap::new();
        let mut accepted: Vec<(usize, &Event, [u8; 32], Applied)> = Vec::new();
        let mut conflicts: Vec<(&Event, [u8; 32], Vec<u8>)> = Vec::new();
        for (index, event, hash) in candidates {
            let prior = existing
                .get(&event.event_id)
                .cloned()
                .or_else(|| accepted_in_batch.get(&event.event_id).map(|h| h.to_vec()));
            if let Some(prior) = prior {
                if prior == hash {
                    report.duplicates.push(event.event_id);
                } else {
                    report.conflicts.push(event.event_id);
                    conflicts.push((event, hash, prior));
                }
                continue;
            }
            if let Some(lot_id) = opened_lot(event).filter(|l| taken_lots.contains(l)) {
                reject(
                    &mut report,
                    mode,
                    index,
                    event.event_id,
                    DomainError::DuplicateLot(lot_id),
                )?;
                continue;
            }
            // `apply` leaves the state untouched when it refuses an event (a property the
            // ledger's tests hold it to), so it runs on the batch's state in place: no copy per
            // event.
            let slot = states.entry(event.account_id.clone()).or_insert(None);
            match apply(slot, event, &prices) {
                Ok(applied) => {
                    taken_lots.extend(opened_lot(event));
                    accepted_in_batch.insert(event.event_id, hash);
                    accepted.push((index, event, hash, applied));
                }
                Err(error) => reject(&mut report, mode, index, event.event_id, error)?,
            }
        }

        project::record_conflicts(&mut tx, &conflicts, now).await?;

        let seqs: Vec<i64> =
            sqlx::query_scalar("select nextval('event_seq') from generate_series(1, $1)")
                .bind(i64::try_from(accepted.len()).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await?;
        let mut seqs = seqs;
        seqs.sort_unstable();
        let items: Vec<AppliedEvent<'_>> = accepted
            .into_iter()
            .zip(seqs)
            .map(|((_, event, hash, applied), seq)| AppliedEvent {
                seq,
                event,
                hash,
                applied,
            })
            .collect();
        project::insert_events(&mut tx, &items, now).await?;
        let changed: BTreeSet<&str> = items.iter().map(|i| i.event.account_id.as_str()).collect();
        let changed_states: Vec<&AccountState> = changed
            .iter()
            .filter_map(|a| states.get(*a).and_then(Option::as_ref))
            .collect();
        project::write_projections(&mut tx, &items, &changed_states).await?;

        report.applied = items.iter().map(|i| i.event.event_id).collect();
        report.states = changed_states
            .into_iter()
            .map(|s| (s.account_id.clone(), s.clone()))
            .collect();

        let (status, body) = respond(&report);
        if let Some(idem) = idempotency {
            sqlx::query(
                "insert into idempotency_record
                 (scope, idempotency_key, request_hash, response_status, response_body, created_at)
                 values ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&idem.scope)
            .bind(&idem.key)
            .bind(&idem.request_hash)
            .bind(i16::try_from(status).unwrap_or(200))
            .bind(&body)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        crate::telemetry::observe_batch(events, &report, &items, &prices, now);
        self.notify(&report.states, now);
        Ok((
            report,
            StoredResponse {
                status,
                body,
                replayed: false,
            },
        ))
    }
}

fn opened_lot(event: &Event) -> Option<Uuid> {
    match &event.body {
        EventBody::CreditsPurchased(p) => Some(p.lot_id),
        EventBody::CreditsGranted(g) => Some(g.lot_id),
        _ => None,
    }
}

fn check_not_future(event: &Event, now: DateTime<Utc>) -> Result<(), DomainError> {
    if event.occurred_at > now + Duration::seconds(MAX_CLOCK_SKEW_SECS) {
        return Err(DomainError::invalid(
            "occurred_at",
            format!("is more than {MAX_CLOCK_SKEW_SECS}s in the future"),
        ));
    }
    Ok(())
}

fn reject(
    report: &mut BatchReport,
    mode: BatchMode,
    index: usize,
    event_id: Uuid,
    error: DomainError,
) -> Result<(), StoreError> {
    match mode {
        BatchMode::AllOrNothing => Err(StoreError::Rejected {
            index,
            event_id,
            error,
        }),
        BatchMode::BestEffort => {
            report.rejected.push(RejectedEvent {
                index,
                event_id,
                error,
            });
            Ok(())
        }
    }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "23505")
}
