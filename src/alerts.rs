//! Alerts: a signed webhook, and a log line, when an account's balance falls to or below its
//! low-balance threshold, when its credits run out, and some time before a credit lot expires.
//!
//! - [`transition`] is the pure rule: given what was already alerted for an account and what
//!   its decision looks like now, which alerts are raised. An alert fires on the crossing
//!   only; the balance rising back out of the condition re-arms it.
//! - [`AlertEngine::evaluate`] follows the accounts the ledger changed (`account.last_event_seq`,
//!   re-reading a few rounds back for batches that commit out of order, as the gateway's
//!   decision cache does) and the lots expiring within the lead time. Each account is
//!   evaluated under a lock on its `alert_state` row, and its alerts are inserted into the
//!   `alert` outbox in that same transaction: a crossing is recorded once, however many ledger
//!   instances evaluate it.
//! - [`AlertEngine::deliver_due`] claims due rows with `for update skip locked`, posts each to
//!   the webhook signed with HMAC-SHA256, and marks it delivered or schedules the next attempt
//!   with exponential backoff. Delivery is at least once; every alert has a stable id
//!   (`tally-alert-id`, also `id` in the body) for the receiver to dedupe on.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use hmac::digest::InvalidLength;
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::{PgPool, Postgres, Transaction};
use tally_ingest::StoreError;
use tally_ledger::{AccountState, Decision, DecisionReason, Money, decide};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::clock::Clock;

/// Header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "tally-signature";
/// Header carrying the alert id; the same on every delivery of one alert.
pub const ALERT_ID_HEADER: &str = "tally-alert-id";
pub const DEFAULT_EXPIRY_LEAD: chrono::TimeDelta = chrono::TimeDelta::days(7);
pub const DEFAULT_RETRY_MIN_DELAY: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(3600);
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A secret shorter than this is refused: it would make signatures guessable.
pub const MIN_SECRET_LEN: usize = 16;
/// Accounts evaluated per round; the rest wait for the next round.
pub const EVALUATE_BATCH: i64 = 1000;
/// Lots checked for an expiry alert per round.
pub const EXPIRY_BATCH: i64 = 1000;
/// Alerts claimed (and posted concurrently) per delivery round.
pub const DELIVERY_BATCH: i64 = 32;
/// Rounds a change may commit late and still be seen (× the poll interval).
pub const LOOKBACK_ROUNDS: usize = 20;
/// A claimed alert is retried by anyone once its claim is this much older than the request
/// timeout: the instance that claimed it has crashed or hung.
const CLAIM_MARGIN: Duration = Duration::from_secs(30);
/// The backoff doubles at most this many times; beyond, the delay is the maximum anyway.
const MAX_BACKOFF_STEPS: usize = 64;

/// Namespace of alert ids: the same crossing or lot always gets the same id.
const ALERT_NAMESPACE: Uuid = Uuid::from_u128(0x8d3e_52a1_7c4b_4f09_b6e2_19d0_3a7f_c5e8);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The available balance fell to or below the account's low-balance threshold.
    LowBalance,
    /// Nothing is left to spend: managed traffic is now denied.
    CreditsExhausted,
    /// A lot with credits left expires within the lead time.
    LotExpiring,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::LowBalance => "low_balance",
            AlertKind::CreditsExhausted => "credits_exhausted",
            AlertKind::LotExpiring => "lot_expiring",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pure rule

/// What has been alerted for one account and not yet re-armed, and how many times each
/// balance alert has fired (which makes every crossing's id distinct).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalanceAlertState {
    pub low_balance_active: bool,
    pub credits_exhausted_active: bool,
    pub low_balance_count: i64,
    pub credits_exhausted_count: i64,
}

/// The facts of an account's decision that alerts depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceObservation {
    /// Available at or below the threshold.
    pub low_balance: bool,
    pub credits_exhausted: bool,
    /// A zero threshold means the account asked for no low-balance alerts.
    pub threshold_set: bool,
    /// Credits were ever purchased or granted. An account that never had any has nothing to
    /// run out of: opening it is not a crossing.
    pub ever_funded: bool,
}

impl BalanceObservation {
    pub fn of(state: &AccountState, decision: &Decision) -> BalanceObservation {
        BalanceObservation {
            low_balance: decision.low_balance,
            credits_exhausted: decision.reason == DecisionReason::CreditsExhausted,
            threshold_set: state.low_balance_threshold.is_positive(),
            ever_funded: state.totals.purchased.is_positive() || state.totals.granted.is_positive(),
        }
    }
}

/// Which alerts `now` raises given `prev`, and the state to keep. A condition alerts once when
/// it starts to hold, and is re-armed when it stops holding.
pub fn transition(
    prev: BalanceAlertState,
    now: &BalanceObservation,
) -> (BalanceAlertState, Vec<AlertKind>) {
    let mut next = prev;
    let mut raised = Vec::new();
    let low = now.low_balance && now.threshold_set;
    if !low {
        next.low_balance_active = false;
    } else if !prev.low_balance_active && now.ever_funded {
        next.low_balance_active = true;
        next.low_balance_count += 1;
        raised.push(AlertKind::LowBalance);
    }
    if !now.credits_exhausted {
        next.credits_exhausted_active = false;
    } else if !prev.credits_exhausted_active && now.ever_funded {
        next.credits_exhausted_active = true;
        next.credits_exhausted_count += 1;
        raised.push(AlertKind::CreditsExhausted);
    }
    (next, raised)
}

/// The id of the `ordinal`-th alert of `kind` for `account_id`, observed at `event_seq`.
pub fn balance_alert_id(account_id: &str, kind: AlertKind, event_seq: i64, ordinal: i64) -> Uuid {
    Uuid::new_v5(
        &ALERT_NAMESPACE,
        format!(
            "{}\u{0}{account_id}\u{0}{event_seq}\u{0}{ordinal}",
            kind.as_str()
        )
        .as_bytes(),
    )
}

/// The id of the one expiry alert of a lot.
pub fn lot_alert_id(lot_id: Uuid) -> Uuid {
    Uuid::new_v5(
        &ALERT_NAMESPACE,
        format!("{}\u{0}{lot_id}", AlertKind::LotExpiring.as_str()).as_bytes(),
    )
}

/// The delay before retry number `attempts` (1 after the first failure): exponential from
/// `min` up to `max`, with jitter so receivers coming back are not hit by every sender at once.
pub fn retry_delay(min: Duration, max: Duration, attempts: u32) -> Duration {
    let steps = usize::try_from(attempts.saturating_sub(1))
        .unwrap_or(MAX_BACKOFF_STEPS)
        .min(MAX_BACKOFF_STEPS);
    ExponentialBuilder::new()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(steps)
        .unwrap_or(max)
}

// ---------------------------------------------------------------------------------------------
// Signatures

type HmacSha256 = Hmac<Sha256>;

/// HMAC accepts keys of any length; the error exists only in the generic `KeyInit` API.
fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Result<HmacSha256, InvalidLength> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret)?;
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    Ok(m)
}

/// The value of [`SIGNATURE_HEADER`] for `body` sent at `timestamp` (unix seconds).
pub fn signature_header(
    secret: &[u8],
    timestamp: i64,
    body: &[u8],
) -> Result<String, InvalidLength> {
    let sig = hex::encode(mac(secret, timestamp, body)?.finalize().into_bytes());
    Ok(format!("t={timestamp},v1={sig}"))
}

/// Checks a [`SIGNATURE_HEADER`] value in constant time; returns its timestamp when a `v1`
/// signature matches. Receivers should also refuse timestamps too far from their clock.
pub fn verify_signature(secret: &[u8], header: &str, body: &[u8]) -> Option<i64> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => timestamp = v.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.push(v),
            _ => {}
        }
    }
    let timestamp = timestamp?;
    signatures.into_iter().find_map(|s| {
        let bytes = hex::decode(s).ok()?;
        mac(secret, timestamp, body)
            .ok()?
            .verify_slice(&bytes)
            .ok()
            .map(|()| timestamp)
    })
}

// ---------------------------------------------------------------------------------------------
// Settings

/// Where alerts go. The secret signs every delivery and is never logged.
#[derive(Clone)]
pub struct Webhook {
    pub url: reqwest::Url,
    pub secret: SecretString,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL's path or query may carry a token of the receiver: show the origin only.
        f.debug_struct("Webhook")
            .field("origin", &self.url.origin().ascii_serialization())
            .field("secret", &"[redacted]")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// None: alerts are recorded and logged, not delivered.
    pub webhook: Option<Webhook>,
    /// How long before a lot's expiry its alert is raised.
    pub expiry_lead: chrono::TimeDelta,
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
    /// How often accounts are evaluated and due alerts delivered.
    pub poll_interval: Duration,
    pub request_timeout: Duration,
}

impl Default for AlertSettings {
    fn default() -> AlertSettings {
        AlertSettings {
            webhook: None,
            expiry_lead: DEFAULT_EXPIRY_LEAD,
            retry_min_delay: DEFAULT_RETRY_MIN_DELAY,
            retry_max_delay: DEFAULT_RETRY_MAX_DELAY,
            poll_interval: DEFAULT_POLL_INTERVAL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation and delivery

/// An alert recorded in the outbox by this evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaisedAlert {
    pub alert_id: Uuid,
    pub kind: AlertKind,
    pub account_id: String,
    pub lot_id: Option<Uuid>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    pub failed: usize,
}

/// The webhook body.
#[derive(Debug, Serialize)]
struct Envelope<'a, D: Serialize> {
    id: Uuid,
    #[serde(rename = "type")]
    kind: AlertKind,
    account_id: &'a str,
    created_at: DateTime<Utc>,
    data: D,
}

#[derive(Debug, Serialize)]
struct BalanceData {
    /// `account.last_event_seq` when the crossing was seen.
    event_seq: i64,
    reason: DecisionReason,
    available_usd: Money,
    spendable_usd: Money,
    debt_usd: Money,
    low_balance_threshold_usd: Money,
    allow_managed: bool,
}

#[derive(Debug, Serialize)]
struct LotData {
    lot_id: Uuid,
    expires_at: DateTime<Utc>,
    remaining_usd: Money,
}

#[derive(Debug)]
pub struct AlertEngine {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    settings: AlertSettings,
    client: reqwest::Client,
    /// Highest `account.last_event_seq` evaluated.
    seen_seq: AtomicI64,
    /// The marks of the last rounds; a round reads from the oldest (see [`LOOKBACK_ROUNDS`]).
    recent_marks: Mutex<VecDeque<i64>>,
}

impl AlertEngine {
    pub fn new(
        pool: PgPool,
        clock: Arc<dyn Clock>,
        settings: AlertSettings,
    ) -> Result<AlertEngine, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            // A redirect is a misconfigured receiver; following it would post signed alerts
            // somewhere nobody configured.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tally-alerts/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(AlertEngine {
            pool,
            clock,
            settings,
            client,
            seen_seq: AtomicI64::new(0),
            recent_marks: Mutex::new(VecDeque::new()),
        })
    }

    pub fn settings(&self) -> &AlertSettings {
        &self.settings
    }

    /// Records the alerts due now (balance crossings, lots about to expire) and logs each.
    pub async fn evaluate(&self) -> Result<Vec<RaisedAlert>, StoreError> {
        let mut raised = self.evaluate_balances().await?;
        raised.extend(self.evaluate_expiring_lots().await?);
        for a in &raised {
            tracing::info!(
                alert_id = %a.alert_id,
                kind = a.kind.as_str(),
                account_id = %a.account_id,
                lot_id = ?a.lot_id,
                webhook = self.settings.webhook.is_some(),
                "alert raised"
            );
        }
        Ok(raised)
    }

    fn since(&self) -> i64 {
        let marks = match self.recent_marks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        marks
            .front()
            .copied()
            .unwrap_or_else(|| self.seen_seq.load(Ordering::Acquire))
    }

    fn push_mark(&self) {
        let mut marks = match self.recent_marks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        marks.push_back(self.seen_seq.load(Ordering::Acquire));
        while marks.len() > LOOKBACK_ROUNDS {
            marks.pop_front();
        }
    }

    async fn evaluate_balances(&self) -> Result<Vec<RaisedAlert>, StoreError> {
        let now = self.clock.now();
        // Changed since the marks, and not yet evaluated at their current seq (by any instance).
        let changed: Vec<(String, i64)> = sqlx::query_as(
            "select a.account_id, a.last_event_seq
             from account a left join alert_state s on s.account_id = a.account_id
             where a.last_event_seq > $1
               and (s.account_id is null or s.last_event_seq < a.last_event_seq)
             order by a.last_event_seq limit $2",
        )
        .bind(self.since())
        .bind(EVALUATE_BATCH)
        .fetch_all(&self.pool)
        .await?;
        // Decisions also change by the clock alone: a lot's expiry, a grant's start.
        let timed: Vec<String> = sqlx::query_scalar(
            "select account_id from alert_state where next_check_at <= $1
             order by next_check_at limit $2",
        )
        .bind(now)
        .bind(EVALUATE_BATCH)
        .fetch_all(&self.pool)
        .await?;
        let ids: BTreeSet<&str> = changed
            .iter()
            .map(|(a, _)| a.as_str())
            .chain(timed.iter().map(String::as_str))
            .collect();
        let mut raised = Vec::new();
        for id in ids {
            raised.extend(self.evaluate_account(id, now).await?);
        }
        if let Some(max) = changed.iter().map(|(_, s)| *s).max() {
            self.seen_seq.fetch_max(max, Ordering::AcqRel);
        }
        self.push_mark();
        Ok(raised)
    }

    async fn evaluate_account(
        &self,
        account_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<RaisedAlert>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "insert into alert_state (account_id, low_balance_active, credits_exhausted_active,
                 low_balance_count, credits_exhausted_count, last_event_seq, next_check_at, updated_at)
             values ($1, false, false, 0, 0, -1, null, $2)
             on conflict (account_id) do nothing",
        )
        .bind(account_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // The lock serializes evaluators of one account; the account is read after taking it,
        // so the later evaluator sees at least what the earlier one saw.
        let (low_active, exhausted_active, low_count, exhausted_count, prev_seq, next_check): (
            bool,
            bool,
            i64,
            i64,
            i64,
            Option<DateTime<Utc>>,
        ) = sqlx::query_as(
            "select low_balance_active, credits_exhausted_active, low_balance_count,
                    credits_exhausted_count, last_event_seq, next_check_at
             from alert_state where account_id = $1 for update",
        )
        .bind(account_id)
        .fetch_one(&mut *tx)
        .await?;
        let seq: Option<i64> =
            sqlx::query_scalar("select last_event_seq from account where account_id = $1")
                .bind(account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(seq) = seq else {
            return Ok(Vec::new());
        };
        if seq <= prev_seq && next_check.is_none_or(|t| t > now) {
            // Another instance evaluated this account at this seq already.
            return Ok(Vec::new());
        }
        let state = match tally_ingest::query::account_state(&self.pool, account_id).await {
            Ok(s) => s,
            Err(StoreError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let decision = decide(&state, now)?;
        let prev = BalanceAlertState {
            low_balance_active: low_active,
            credits_exhausted_active: exhausted_active,
            low_balance_count: low_count,
            credits_exhausted_count: exhausted_count,
        };
        let (next, kinds) = transition(prev, &BalanceObservation::of(&state, &decision));
        let mut raised = Vec::new();
        for kind in kinds {
            let ordinal = match kind {
                AlertKind::LowBalance => next.low_balance_count,
                _ => next.credits_exhausted_count,
            };
            let alert_id = balance_alert_id(account_id, kind, seq, ordinal);
            let body = Envelope {
                id: alert_id,
                kind,
                account_id,
                created_at: now,
                data: BalanceData {
                    event_seq: seq,
                    reason: decision.reason,
                    available_usd: decision.available_usd,
                    spendable_usd: decision.spendable_usd,
                    debt_usd: decision.debt_usd,
                    low_balance_threshold_usd: decision.low_balance_threshold_usd,
                    allow_managed: decision.allow_managed,
                },
            };
            if insert_alert(&mut tx, alert_id, kind, account_id, None, &body, now).await? {
                raised.push(RaisedAlert {
                    alert_id,
                    kind,
                    account_id: account_id.to_string(),
                    lot_id: None,
                });
            }
        }
        sqlx::query(
            "update alert_state set low_balance_active = $2, credits_exhausted_active = $3,
                 low_balance_count = $4, credits_exhausted_count = $5,
                 last_event_seq = greatest(last_event_seq, $6), next_check_at = $7, updated_at = $8
             where account_id = $1",
        )
        .bind(account_id)
        .bind(next.low_balance_active)
        .bind(next.credits_exhausted_active)
        .bind(next.low_balance_count)
        .bind(next.credits_exhausted_count)
        .bind(seq)
        .bind(decision.next_change_at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(raised)
    }

    async fn evaluate_expiring_lots(&self) -> Result<Vec<RaisedAlert>, StoreError> {
        let now = self.clock.now();
        let horizon = now + self.settings.expiry_lead;
        let lots: Vec<(Uuid, String, DateTime<Utc>, Decimal)> = sqlx::query_as(
            "select l.lot_id, l.account_id, l.expires_at, l.remaining_usd from credit_lot l
             where l.status = 'open' and l.remaining_usd > 0
               and l.expires_at > $1 and l.expires_at <= $2
               and not exists (select 1 from alert a where a.kind = 'lot_expiring' and a.lot_id = l.lot_id)
             order by l.expires_at, l.lot_id limit $3",
        )
        .bind(now)
        .bind(horizon)
        .bind(EXPIRY_BATCH)
        .fetch_all(&self.pool)
        .await?;
        let mut raised = Vec::new();
        for (lot_id, account_id, expires_at, remaining) in lots {
            let alert_id = lot_alert_id(lot_id);
            let remaining_usd = Money::from_decimal_rounded(remaining)?;
            let body = Envelope {
                id: alert_id,
                kind: AlertKind::LotExpiring,
                account_id: &account_id,
                created_at: now,
                data: LotData {
                    lot_id,
                    expires_at,
                    remaining_usd,
                },
            };
            let mut tx = self.pool.begin().await?;
            let inserted = insert_alert(
                &mut tx,
                alert_id,
                AlertKind::LotExpiring,
                &account_id,
                Some(lot_id),
                &body,
                now,
            )
            .await?;
            tx.commit().await?;
            if inserted {
                raised.push(RaisedAlert {
                    alert_id,
                    kind: AlertKind::LotExpiring,
                    account_id,
                    lot_id: Some(lot_id),
                });
            }
        }
        Ok(raised)
    }

    /// Posts the alerts that are due, at most [`DELIVERY_BATCH`] at once. Without a webhook,
    /// does nothing: the alerts stay recorded.
    pub async fn deliver_due(&self) -> Result<DeliveryReport, StoreError> {
        let Some(webhook) = self.settings.webhook.clone() else {
            return Ok(DeliveryReport::default());
        };
        let now = self.clock.now();
        let lease = chrono::TimeDelta::from_std(self.settings.request_timeout + CLAIM_MARGIN)
            .unwrap_or(chrono::TimeDelta::minutes(1));
        // Claiming moves next_attempt_at past the request timeout: another instance skips the
        // rows while they are locked, and sees them as not due once committed.
        let claimed: Vec<(Uuid, String, String, serde_json::Value, i32)> = sqlx::query_as(
            "with due as (
                 select alert_id from alert
                 where delivered_at is null and next_attempt_at <= $1
                 order by next_attempt_at, alert_id limit $2
                 for update skip locked)
             update alert a set attempts = a.attempts + 1, next_attempt_at = $3
             from due where a.alert_id = due.alert_id
             returning a.alert_id, a.kind, a.account_id, a.payload, a.attempts",
        )
        .bind(now)
        .bind(DELIVERY_BATCH)
        .bind(now + lease)
        .fetch_all(&self.pool)
        .await?;
        let mut sends = tokio::task::JoinSet::new();
        for (alert_id, kind, account_id, payload, attempts) in claimed {
            let client = self.client.clone();
            let webhook = webhook.clone();
            let clock = Arc::clone(&self.clock);
            sends.spawn(async move {
                let result = post(&client, &webhook, alert_id, &payload, clock.now()).await;
                (alert_id, kind, account_id, attempts, result)
            });
        }
        let mut report = DeliveryReport::default();
        while let Some(joined) = sends.join_next().await {
            // A send that panicked keeps its claim until the lease runs out, then is retried.
            let Ok((alert_id, kind, account_id, attempts, result)) = joined else {
                continue;
            };
            let done_at = self.clock.now();
            match result {
                Ok(()) => {
                    sqlx::query(
                        "update alert set delivered_at = $2, last_error = null where alert_id = $1",
                    )
                    .bind(alert_id)
                    .bind(done_at)
                    .execute(&self.pool)
                    .await?;
                    report.delivered += 1;
                    tracing::info!(%alert_id, kind, %account_id, attempts, "alert delivered");
                }
                Err(error) => {
                    let delay = retry_delay(
                        self.settings.retry_min_delay,
                        self.settings.retry_max_delay,
                        u32::try_from(attempts).unwrap_or(u32::MAX),
                    );
                    let next = done_at
                        + chrono::TimeDelta::from_std(delay).unwrap_or(chrono::TimeDelta::hours(1));
                    sqlx::query(
                        "update alert set next_attempt_at = $2, last_error = $3
                         where alert_id = $1 and delivered_at is null",
                    )
                    .bind(alert_id)
                    .bind(next)
                    .bind(&error)
                    .execute(&self.pool)
                    .await?;
                    report.failed += 1;
                    tracing::warn!(%alert_id, kind, %account_id, attempts, %error, retry_in_ms = delay.as_millis(), "alert delivery failed; will retry");
                }
            }
        }
        Ok(report)
    }
}

async fn insert_alert<D: Serialize>(
    tx: &mut Transaction<'_, Postgres>,
    alert_id: Uuid,
    kind: AlertKind,
    account_id: &str,
    lot_id: Option<Uuid>,
    body: &Envelope<'_, D>,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let payload =
        serde_json::to_value(body).map_err(|e| StoreError::Corrupt(format!("alert body: {e}")))?;
    // Any unique key (the id, or one expiry alert per lot) means another evaluator was first.
    let done = sqlx::query(
        "insert into alert (alert_id, kind, account_id, lot_id, payload, created_at, attempts, next_attempt_at)
         values ($1, $2, $3, $4, $5, $6, 0, $6)
         on conflict do nothing",
    )
    .bind(alert_id)
    .bind(kind.as_str())
    .bind(account_id)
    .bind(lot_id)
    .bind(payload)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// One delivery attempt. The error text is safe to store and log: no URL, no secret.
async fn post(
    client: &reqwest::Client,
    webhook: &Webhook,
    alert_id: Uuid,
    payload: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let body = serde_json::to_vec(payload).map_err(|e| format!("encoding the body: {e}"))?;
    let timestamp = now.timestamp();
    let signature = signature_header(webhook.secret.expose_secret().as_bytes(), timestamp, &body)
        .map_err(|e| format!("signing: {e}"))?;
    let response = client
        .post(webhook.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(ALERT_ID_HEADER, alert_id.to_string())
        .header(SIGNATURE_HEADER, signature)
        .body(body)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", response.status().as_u16()))
    }
}

/// Runs evaluation and (with a webhook) delivery every poll interval until `stop` changes.
pub fn spawn(
    engine: Arc<AlertEngine>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        match &engine.settings.webhook {
            Some(w) => tracing::info!(webhook = ?w, "alert webhook configured"),
            None => tracing::info!(
                "no alert webhook configured (TALLY_ALERT_WEBHOOK_URL): alerts are recorded and logged, not delivered"
            ),
        }
        tokio::join!(
            evaluate_loop(Arc::clone(&engine), stop.clone()),
            deliver_loop(Arc::clone(&engine), stop),
        );
        Ok(())
    })
}

async fn evaluate_loop(engine: Arc<AlertEngine>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(engine.settings.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = engine.evaluate().await {
            tracing::warn!(error = %e, "alert evaluation failed; retrying next interval");
        }
    }
}

async fn deliver_loop(engine: Arc<AlertEngine>, mut stop: watch::Receiver<bool>) {
    if engine.settings.webhook.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(engine.settings.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        // A full batch may mean more are due: go again at once rather than wait a tick.
        loop {
            match engine.deliver_due().await {
                Ok(r) if r.delivered + r.failed >= usize::try_from(DELIVERY_BATCH).unwrap_or(0) => {
                    if *stop.borrow() {
                        return;
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "alert delivery round failed; retrying next interval");
                    break;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// One alert of the outbox, with its delivery state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AlertView {
    pub alert_id: Uuid,
    pub kind: String,
    pub account_id: String,
    pub lot_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// The webhook body.
    pub payload: serde_json::Value,
}

/// Alerts newest first, of one account or of all.
pub async fn list(
    pool: &PgPool,
    account_id: Option<&str>,
    limit: i64,
) -> Result<Vec<AlertView>, StoreError> {
    Ok(sqlx::query_as(
        "select alert_id, kind, account_id, lot_id, created_at, attempts, next_attempt_at,
                delivered_at, last_error, payload
         from alert where ($1::text is null or account_id = $1)
         order by created_at desc, alert_id desc limit $2",
    )
    .bind(account_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(low: bool, exhausted: bool) -> BalanceObservation {
        BalanceObservation {
            low_balance: low,
            credits_exhausted: exhausted,
            threshold_set: true,
            ever_funded: true,
        }
    }

    /// Runs observations through `transition` and collects what each raised.
    fn run(steps: &[BalanceObservation]) -> Vec<Vec<AlertKind>> {
        let mut state = BalanceAlertState::default();
        steps
            .iter()
            .map(|o| {
                let (next, raised) = transition(state, o);
                state = next;
                raised
            })
            .collect()
    }

    #[test]
    fn each_crossing_alerts_once_and_rising_back_rearms() {
        use AlertKind::*;
        let got = run(&[
            obs(false, false),
            obs(true, false),
            obs(true, false),
            obs(true, true),
            obs(true, true),
            // A top-up back above the threshold re-arms both.
            obs(false, false),
            obs(true, false),
        ]);
        assert_eq!(
            got,
            vec![
                vec![],
                vec![LowBalance],
                vec![],
                vec![CreditsExhausted],
                vec![],
                vec![],
                vec![LowBalance],
            ]
        );
    }

    #[test]
    fn a_partial_top_up_rearms_only_what_cleared() {
        use AlertKind::*;
        let got = run(&[
            obs(false, false),
            obs(true, true),
            obs(true, false),
            obs(true, true),
        ]);
        assert_eq!(
            got,
            vec![
                vec![],
                vec![LowBalance, CreditsExhausted],
                vec![],
                vec![CreditsExhausted]
            ]
        );
    }

    #[test]
    fn never_funded_accounts_and_zero_thresholds_do_not_alert() {
        let unfunded = BalanceObservation {
            ever_funded: false,
            ..obs(true, true)
        };
        assert_eq!(run(&[unfunded, unfunded]), vec![vec![], vec![]]);
        let no_threshold = BalanceObservation {
            threshold_set: false,
            ..obs(true, true)
        };
        assert_eq!(
            run(&[obs(false, false), no_threshold]),
            vec![vec![], vec![AlertKind::CreditsExhausted]]
        );
    }

    #[test]
    fn counts_make_every_crossing_id_distinct_and_stable() {
        let mut state = BalanceAlertState::default();
        let mut ids = BTreeSet::new();
        for _ in 0..3 {
            let (s, _) = transition(state, &obs(true, false));
            let (s2, _) = transition(s, &obs(false, false));
            ids.insert(balance_alert_id(
                "acme",
                AlertKind::LowBalance,
                7,
                s.low_balance_count,
            ));
            state = s2;
        }
        assert_eq!(ids.len(), 3, "same seq, three crossings, three ids");
        assert_eq!(
            balance_alert_id("acme", AlertKind::LowBalance, 7, 1),
            balance_alert_id("acme", AlertKind::LowBalance, 7, 1)
        );
        assert_ne!(
            balance_alert_id("acme", AlertKind::LowBalance, 7, 1),
            balance_alert_id("acme", AlertKind::CreditsExhausted, 7, 1)
        );
        let lot = Uuid::from_u128(9);
        assert_eq!(lot_alert_id(lot), lot_alert_id(lot));
        assert_ne!(lot_alert_id(lot), lot_alert_id(Uuid::from_u128(10)));
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let secret = b"whsec-0123456789abcdef";
        let body = br#"{"id":"a"}"#;
        let header = signature_header(secret, 1_795_000_000, body).unwrap();
        // Computed independently: Python's hmac.new(secret, b'1795000000.' + body, sha256).
        assert_eq!(
            header,
            "t=1795000000,v1=091fdd8da5936f58b9802f9e9c95f80bb337a0211e32f517bfda109e8f23e31e"
        );
        assert_eq!(verify_signature(secret, &header, body), Some(1_795_000_000));
        assert_eq!(verify_signature(b"another secret!!", &header, body), None);
        assert_eq!(verify_signature(secret, &header, b"{}"), None);
        let moved = header.replace("t=1795000000", "t=1795000001");
        assert_eq!(verify_signature(secret, &moved, body), None);
        assert_eq!(verify_signature(secret, "v1=00", body), None);
        assert_eq!(verify_signature(secret, "t=1795000000,v1=zz", body), None);
    }

    #[test]
    fn retry_delays_grow_exponentially_and_are_capped() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempts in 1..=40 {
            let d = retry_delay(min, max, attempts);
            let base = min.saturating_mul(1 << (attempts - 1).min(20)).min(max);
            // backon computes in f32 seconds: allow a millisecond of rounding.
            let (d, base) = (d.as_millis(), base.as_millis());
            assert!(
                d + 1 >= base && d <= base * 2 + 1,
                "attempt {attempts}: {d}ms vs {base}ms"
            );
        }
        assert!(retry_delay(min, max, u32::MAX) <= max * 2);
    }

    #[test]
    fn the_webhook_debug_shows_no_secret_and_no_path() {
        let w = Webhook {
            url: "https://hooks.example.com/t/abc123token?sig=zzz"
                .parse()
                .unwrap(),
            secret: SecretString::from("s3cr3t-value-0123456789".to_string()),
        };
        let shown = format!("{w:?}");
        assert!(shown.contains("hooks.example.com"), "{shown}");
        for hidden in ["s3cr3t", "abc123token", "zzz"] {
            assert!(!shown.contains(hidden), "{shown}");
        }
    }
}
