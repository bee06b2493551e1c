//! Writing the projections of applied events. The live path and `rebuild` both go through
//! [`write_projections`], so they cannot drift apart.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};
use tally_ledger::{AccountState, Applied, Event, EventBody, PriceBasis};
use uuid::Uuid;

use crate::error::StoreError;

pub(crate) struct AppliedEvent<'a> {
    pub seq: i64,
    pub event: &'a Event,
    pub hash: [u8; 32],
    pub applied: Applied,
}

pub(crate) async fn record_conflicts(
    tx: &mut Transaction<'_, Postgres>,
    conflicts: &[(&Event, [u8; 32], Vec<u8>)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for (event, offered, existing) in conflicts {
        sqlx::query(
            "insert into event_conflict (event_id, offered_hash, existing_hash, offered_payload, first_seen_at)
             values ($1, $2, $3, $4, $5)
             on conflict (event_id, offered_hash) do update set times_seen = event_conflict.times_seen + 1",
        )
        .bind(event.event_id)
        .bind(offered.as_slice())
        .bind(existing.as_slice())
        .bind(sqlx::types::Json(event))
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

pub(crate) async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    items: &[AppliedEvent<'_>],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if items.is_empty() {
        return Ok(());
    }
    let mut seq = Vec::with_capacity(items.len());
    let mut event_id = Vec::with_capacity(items.len());
    let mut account_id = Vec::with_capacity(items.len());
    let mut kind = Vec::with_capacity(items.len());
    let mut occurred_at = Vec::with_capacity(items.len());
    let mut payload = Vec::with_capacity(items.len());
    let mut hash = Vec::with_capacity(items.len());
    for i in items {
        seq.push(i.seq);
        event_id.push(i.event.event_id);
        account_id.push(i.event.account_id.clone());
        kind.push(i.event.body.kind().to_string());
        occurred_at.push(i.event.occurred_at);
        // Serialized straight to text for PostgreSQL to parse once, not through a JSON tree.
        payload
            .push(serde_json::to_string(i.event).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        hash.push(i.hash.to_vec());
    }
    sqlx::query(
        "insert into event (seq, event_id, account_id, kind, occurred_at, recorded_at, payload, payload_hash)
         select s, e, a, k, o, $8, p::jsonb, h
         from unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::bytea[])
              as t(s, e, a, k, o, p, h)",
    )
    .bind(&seq)
    .bind(&event_id)
    .bind(&account_id)
    .bind(&kind)
    .bind(&occurred_at)
    .bind(&payload)
    .bind(&hash)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Key of one `usage_hourly` row.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct UsageKey {
    account_id: String,
    hour: DateTime<Utc>,
    endpoint_id: String,
    api_key_id: String,
    credential_kind: &'static str,
    credential_id: String,
    provider: String,
    model: String,
}

#[derive(Default)]
struct UsageSums {
    requests: i64,
    failed: i64,
    streaming: i64,
    estimated: i64,
    unpriced: i64,
    fallback: i64,
    input: i64,
    cached_input: i64,
    output: i64,
    reasoning: i64,
    upstream: Decimal,
    fee: Decimal,
    charged: Decimal,
    attributed: Decimal,
    upstream_ms: i64,
    total_ms: i64,
}

fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::hours(1)).unwrap_or(t)
}

/// Writes ledger entries, lots, accounts and usage rollups for `items`, whose accounts end in
/// `states`. Rollups are summed per batch in memory first: one upsert per distinct row.
pub(crate) async fn write_projections(
    tx: &mut Transaction<'_, Postgres>,
    items: &[AppliedEvent<'_>],
    states: &[&AccountState],
) -> Result<(), StoreError> {
    // Accounts first: lots reference them, and one batch may open an account and fund it.
    write_accounts(tx, items, states).await?;
    write_lots(tx, items, states).await?;
    write_entries(tx, items).await?;
    write_usage(tx, items).await?;
    Ok(())
}

async fn write_entries(
    tx: &mut Transaction<'_, Postgres>,
    items: &[AppliedEvent<'_>],
) -> Result<(), StoreError> {
    let mut seq = Vec::new();
    let mut line = Vec::new();
    let mut event_id = Vec::new();
    let mut account_id = Vec::new();
    let mut ledger_account = Vec::new();
    let mut amount = Vec::new();
    let mut lot_id: Vec<Option<Uuid>> = Vec::new();
    let mut version: Vec<Option<String>> = Vec::new();
    let mut occurred = Vec::new();
    for i in items {
        let v = i
            .applied
            .usage
            .as_ref()
            .and_then(|u| u.price_version.clone());
        for (n, p) in i.applied.postings.iter().enumerate() {
            seq.push(i.seq);
            line.push(i32::try_from(n).unwrap_or(i32::MAX));
            event_id.push(i.event.event_id);
            account_id.push(i.event.account_id.clone());
            ledger_account.push(p.ledger_account.as_str().to_string());
            amount.push(p.amount.as_decimal());
            lot_id.push(p.lot_id);
            version.push(v.clone());
            occurred.push(i.event.occurred_at);
        }
    }
    if seq.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into ledger_entry
         (event_seq, line_no, event_id, account_id, ledger_account, amount_usd, lot_id, price_version, occurred_at)
         select * from unnest($1::bigint[], $2::int[], $3::uuid[], $4::text[], $5::text[], $6::numeric[],
                              $7::uuid[], $8::text[], $9::timestamptz[])",
    )
    .bind(&seq)
    .bind(&line)
    .bind(&event_id)
    .bind(&account_id)
    .bind(&ledger_account)
    .bind(&amount)
    .bind(&lot_id)
    .bind(&version)
    .bind(&occurred)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_lots(
    tx: &mut Transaction<'_, Postgres>,
    items: &[AppliedEvent<'_>],
    states: &[&AccountState],
) -> Result<(), StoreError> {
    let by_account: HashMap<&str, &AccountState> =
        states.iter().map(|s| (s.account_id.as_str(), *s)).collect();
    let mut touched: BTreeMap<Uuid, &str> = BTreeMap::new();
    for i in items {
        for lot in &i.applied.touched_lots {
            touched.insert(*lot, i.event.account_id.as_str());
        }
    }
    let mut cols = LotColumns::default();
    for (lot_id, account) in touched {
        let lot = by_account
            .get(account)
            .and_then(|s| s.lots.iter().find(|l| l.lot_id == lot_id))
            .ok_or_else(|| {
                StoreError::Corrupt(format!("touched lot {lot_id} missing from state"))
            })?;
        cols.lot_id.push(lot.lot_id);
        cols.account_id.push(lot.account_id.clone());
        cols.source.push(lot.source.as_str().to_string());
        cols.amount.push(lot.amount.as_decimal());
        cols.remaining.push(lot.remaining.as_decimal());
        cols.burned.push(lot.burned.as_decimal());
        cols.expired.push(lot.expired.as_decimal());
        cols.voided.push(lot.voided.as_decimal());
        cols.priority.push(lot.priority);
        cols.granted_at.push(lot.granted_at);
        cols.expires_at.push(lot.expires_at);
        cols.status.push(lot.status.as_str().to_string());
        cols.closed_at.push(lot.closed_at);
    }
    if cols.lot_id.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into credit_lot (lot_id, account_id, source, amount_usd, remaining_usd, burned_usd, expired_usd,
                                 voided_usd, priority, granted_at, expires_at, status, closed_at)
         select * from unnest($1::uuid[], $2::text[], $3::text[], $4::numeric[], $5::numeric[], $6::numeric[],
                              $7::numeric[], $8::numeric[], $9::int[], $10::timestamptz[], $11::timestamptz[],
                              $12::text[], $13::timestamptz[])
         on conflict (lot_id) do update set
             remaining_usd = excluded.remaining_usd, burned_usd = excluded.burned_usd,
             expired_usd = excluded.expired_usd, voided_usd = excluded.voided_usd,
             status = excluded.status, closed_at = excluded.closed_at",
    )
    .bind(&cols.lot_id)
    .bind(&cols.account_id)
    .bind(&cols.source)
    .bind(&cols.amount)
    .bind(&cols.remaining)
    .bind(&cols.burned)
    .bind(&cols.expired)
    .bind(&cols.voided)
    .bind(&cols.priority)
    .bind(&cols.granted_at)
    .bind(&cols.expires_at)
    .bind(&cols.status)
    .bind(&cols.closed_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(Default)]
struct LotColumns {
    lot_id: Vec<Uuid>,
    account_id: Vec<String>,
    source: Vec<String>,
    amount: Vec<Decimal>,
    remaining: Vec<Decimal>,
    burned: Vec<Decimal>,
    expired: Vec<Decimal>,
    voided: Vec<Decimal>,
    priority: Vec<i32>,
    granted_at: Vec<DateTime<Utc>>,
    expires_at: Vec<DateTime<Utc>>,
    status: Vec<String>,
    closed_at: Vec<Option<DateTime<Utc>>>,
}

async fn write_accounts(
    tx: &mut Transaction<'_, Postgres>,
    items: &[AppliedEvent<'_>],
    states: &[&AccountState],
) -> Result<(), StoreError> {
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    for i in items {
        let e = last_seq.entry(i.event.account_id.as_str()).or_insert(i.seq);
        *e = (*e).max(i.seq);
    }
    let mut account_id = Vec::with_capacity(states.len());
    let mut name = Vec::with_capacity(states.len());
    let mut opened_at = Vec::with_capacity(states.len());
    let mut seq = Vec::with_capacity(states.len());
    let mut decs: [Vec<Decimal>; 12] = Default::default();
    for s in states {
        let Some(last) = last_seq.get(s.account_id.as_str()) else {
            continue;
        };
        let t = &s.totals;
        account_id.push(s.account_id.as_str());
        name.push(s.name.as_str());
        opened_at.push(s.opened_at);
        seq.push(*last);
        for (col, m) in decs.iter_mut().zip([
            s.low_balance_threshold,
            s.debt,
            t.purchased,
            t.granted,
            t.burned,
            t.expired,
            t.voided,
            t.debt_incurred,
            t.debt_settled,
            t.charged_upstream,
            t.charged_fee,
            t.byok_attributed,
        ]) {
            col.push(m.as_decimal());
        }
    }
    if account_id.is_empty() {
        return Ok(());
    }
    let [
        threshold,
        debt,
        purchased,
        granted,
        burned,
        expired,
        voided,
        debt_incurred,
        debt_settled,
        charged_upstream,
        charged_fee,
        byok_attributed,
    ] = decs;
    // One statement for every account of the batch, in account order.
    sqlx::query(
        "insert into account (account_id, name, low_balance_threshold_usd, opened_at, debt_usd, purchased_usd,
             granted_usd, burned_usd, expired_usd, voided_usd, debt_incurred_usd, debt_settled_usd,
             charged_upstream_usd, charged_fee_usd, byok_attributed_usd, last_event_seq)
         select * from unnest($1::text[], $2::text[], $3::numeric[], $4::timestamptz[], $5::numeric[],
             $6::numeric[], $7::numeric[], $8::numeric[], $9::numeric[], $10::numeric[], $11::numeric[],
             $12::numeric[], $13::numeric[], $14::numeric[], $15::numeric[], $16::bigint[])
         on conflict (account_id) do update set
             name = excluded.name, low_balance_threshold_usd = excluded.low_balance_threshold_usd,
             debt_usd = excluded.debt_usd, purchased_usd = excluded.purchased_usd,
             granted_usd = excluded.granted_usd, burned_usd = excluded.burned_usd,
             expired_usd = excluded.expired_usd, voided_usd = excluded.voided_usd,
             debt_incurred_usd = excluded.debt_incurred_usd, debt_settled_usd = excluded.debt_settled_usd,
             charged_upstream_usd = excluded.charged_upstream_usd, charged_fee_usd = excluded.charged_fee_usd,
             byok_attributed_usd = excluded.byok_attributed_usd, last_event_seq = excluded.last_event_seq",
    )
    .bind(&account_id)
    .bind(&name)
    .bind(&threshold)
    .bind(&opened_at)
    .bind(&debt)
    .bind(&purchased)
    .bind(&granted)
    .bind(&burned)
    .bind(&expired)
    .bind(&voided)
    .bind(&debt_incurred)
    .bind(&debt_settled)
    .bind(&charged_upstream)
    .bind(&charged_fee)
    .bind(&byok_attributed)
    .bind(&seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_usage(
    tx: &mut Transaction<'_, Postgres>,
    items: &[AppliedEvent<'_>],
) -> Result<(), StoreError> {
    let mut sums: BTreeMap<UsageKey, UsageSums> = BTreeMap::new();
    for i in items {
        let (EventBody::Usage(u), Some(charge)) = (&i.event.body, &i.applied.usage) else {
            continue;
        };
        let key = UsageKey {
            account_id: i.event.account_id.clone(),
            hour: hour_of(i.event.occurred_at),
            endpoint_id: u.endpoint_id.clone(),
            api_key_id: u.api_key_id.clone(),
            credential_kind: u.credential_kind.as_str(),
            credential_id: u.credential_id.clone(),
            provider: u.provider.clone(),
            model: u.model.clone(),
        };
        let s = sums.entry(key).or_default();
        s.requests += 1;
        s.failed += i64::from(!u.is_success());
        s.streaming += i64::from(u.streaming);
        s.estimated += i64::from(u.token_source == tally_ledger::TokenSource::Estimate);
        s.unpriced += i64::from(charge.price_basis == PriceBasis::Unpriced);
        s.fallback += i64::from(charge.price_basis == PriceBasis::Fallback);
        s.input += u.tokens.input;
        s.cached_input += u.tokens.cached_input;
        s.output += u.tokens.output;
        s.reasoning += u.tokens.reasoning;
        s.upstream += charge.upstream_cost.as_decimal();
        s.fee += charge.fee.as_decimal();
        if u.credential_kind.is_charged() {
            s.charged += charge.charged().as_decimal();
        }
        s.attributed += charge.attributed.as_decimal();
        s.upstream_ms += i64::try_from(u.upstream_latency_ms).unwrap_or(i64::MAX);
        s.total_ms += i64::try_from(u.total_latency_ms).unwrap_or(i64::MAX);
    }
    if sums.is_empty() {
        return Ok(());
    }
    let n = sums.len();
    let mut k_account = Vec::with_capacity(n);
    let mut k_hour = Vec::with_capacity(n);
    let mut k_endpoint = Vec::with_capacity(n);
    let mut k_key = Vec::with_capacity(n);
    let mut k_kind = Vec::with_capacity(n);
    let mut k_cred = Vec::with_capacity(n);
    let mut k_provider = Vec::with_capacity(n);
    let mut k_model = Vec::with_capacity(n);
    let mut ints: [Vec<i64>; 12] = Default::default();
    let mut decs: [Vec<Decimal>; 4] = Default::default();
    for (k, s) in sums {
        k_account.push(k.account_id);
        k_hour.push(k.hour);
        k_endpoint.push(k.endpoint_id);
        k_key.push(k.api_key_id);
        k_kind.push(k.credential_kind.to_string());
        k_cred.push(k.credential_id);
        k_provider.push(k.provider);
        k_model.push(k.model);
        for (col, v) in ints.iter_mut().zip([
            s.requests,
            s.failed,
            s.streaming,
            s.estimated,
            s.unpriced,
            s.fallback,
            s.input,
            s.cached_input,
            s.output,
            s.reasoning,
            s.upstream_ms,
            s.total_ms,
        ]) {
            col.push(v);
        }
        for (col, v) in decs
            .iter_mut()
            .zip([s.upstream, s.fee, s.charged, s.attributed])
        {
            col.push(v);
        }
    }
    let [
        requests,
        failed,
        streaming,
        estimated,
        unpriced,
        fallback,
        input,
        cached,
        output,
        reasoning,
        up_ms,
        total_ms,
    ] = ints;
    let [upstream, fee, charged, attributed] = decs;
    sqlx::query(
        "insert into usage_hourly (account_id, hour, endpoint_id, api_key_id, credential_kind, credential_id,
             provider, model, requests, failed_requests, streaming_requests, estimated_requests, unpriced_requests,
             fallback_priced_requests, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens,
             upstream_latency_ms_sum, total_latency_ms_sum, upstream_cost_usd, fee_usd, charged_usd, attributed_usd)
         select * from unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
             $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[],
             $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[], $18::bigint[], $19::bigint[],
             $20::bigint[], $21::numeric[], $22::numeric[], $23::numeric[], $24::numeric[])
         on conflict (account_id, hour, endpoint_id, api_key_id, credential_kind, credential_id, provider, model)
         do update set
             requests = usage_hourly.requests + excluded.requests,
             failed_requests = usage_hourly.failed_requests + excluded.failed_requests,
             streaming_requests = usage_hourly.streaming_requests + excluded.streaming_requests,
             estimated_requests = usage_hourly.estimated_requests + excluded.estimated_requests,
             unpriced_requests = usage_hourly.unpriced_requests + excluded.unpriced_requests,
             fallback_priced_requests = usage_hourly.fallback_priced_requests + excluded.fallback_priced_requests,
             input_tokens = usage_hourly.input_tokens + excluded.input_tokens,
             cached_input_tokens = usage_hourly.cached_input_tokens + excluded.cached_input_tokens,
             output_tokens = usage_hourly.output_tokens + excluded.output_tokens,
             reasoning_tokens = usage_hourly.reasoning_tokens + excluded.reasoning_tokens,
             upstream_latency_ms_sum = usage_hourly.upstream_latency_ms_sum + excluded.upstream_latency_ms_sum,
             total_latency_ms_sum = usage_hourly.total_latency_ms_sum + excluded.total_latency_ms_sum,
             upstream_cost_usd = usage_hourly.upstream_cost_usd + excluded.upstream_cost_usd,
             fee_usd = usage_hourly.fee_usd + excluded.fee_usd,
             charged_usd = usage_hourly.charged_usd + excluded.charged_usd,
             attributed_usd = usage_hourly.attributed_usd + excluded.attributed_usd",
    )
    .bind(&k_account)
    .bind(&k_hour)
    .bind(&k_endpoint)
    .bind(&k_key)
    .bind(&k_kind)
    .bind(&k_cred)
    .bind(&k_provider)
    .bind(&k_model)
    .bind(&requests)
    .bind(&failed)
    .bind(&streaming)
    .bind(&estimated)
    .bind(&unpriced)
    .bind(&fallback)
    .bind(&input)
    .bind(&cached)
    .bind(&output)
    .bind(&reasoning)
    .bind(&up_ms)
    .bind(&total_ms)
    .bind(&upstream)
    .bind(&fee)
    .bind(&charged)
    .bind(&attributed)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
