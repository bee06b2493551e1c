//! `tally demo`: the whole ledger flow end to end over the real HTTP API, printed for a person.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context, bail};
use chrono::{DateTime, Duration, DurationRound, TimeDelta, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

/// Drives a running ledger API at `base` (e.g. `http://127.0.0.1:8787`) and returns the report.
pub async fn run_scenario(base: &str, now: DateTime<Utc>) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let mut out = String::new();
    let account_id = format!("demo-{}", now.format("%Y%m%d%H%M%S%3f"));
    let c = Client { http: &http, base };

    c.post("/v1/accounts", &json!({"account_id": account_id, "name": "Acme Corp (demo)", "low_balance_threshold_usd": "5.00"}), None, 201).await?;
    writeln!(out, "tally demo — ledger API at {base}\n")?;
    writeln!(
        out,
        "Account {account_id} opened (low-balance threshold $5.00)."
    )?;

    let purchase = json!({"amount_usd": "20.00", "payment_reference": "demo-card-0001"});
    let first = c
        .post(
            &format!("/v1/accounts/{account_id}/purchases"),
            &purchase,
            Some("demo-purchase-1"),
            201,
        )
        .await?;
    let retry = c
        .post(
            &format!("/v1/accounts/{account_id}/purchases"),
            &purchase,
            Some("demo-purchase-1"),
            201,
        )
        .await?;
    let same = first["lot"]["lot_id"] == retry["lot"]["lot_id"];
    writeln!(
        out,
        "Bought $20.00 of credits (lot {}); the retried request with the same Idempotency-Key returned the same lot: {same}.",
        str_of(&first["lot"]["lot_id"])
    )?;
    let expires = now + Duration::days(30);
    c.post(
        &format!("/v1/accounts/{account_id}/grants"),
        &json!({"amount_usd": "5.00", "expires_at": expires, "priority": 10, "reason": "welcome credit"}),
        None,
        201,
    )
    .await?;
    writeln!(
        out,
        "Granted $5.00 of promotional credit, expiring {} (burns first: priority 10).\n",
        expires.format("%Y-%m-%d")
    )?;

    // Usage happens after the credits were bought: a lot only pays for usage inside its
    // validity window, which starts at the purchase.
    let now = Utc::now();
    let mut events = Vec::new();
    for i in 0..40 {
        events.push(usage(
            &account_id,
            now,
            i,
            "key_frontend",
            "openai",
            "gpt-4o",
            "managed",
            "managed-openai",
            [12_000, 2_000, 3_000, 0],
        ));
    }
    for i in 0..25 {
        events.push(usage(
            &account_id,
            now,
            100 + i,
            "key_backend",
            "anthropic",
            "claude-sonnet-4-5",
            "byok",
            "byok-anthropic-1",
            [8_000, 0, 1_500, 0],
        ));
    }
    for i in 0..10 {
        events.push(usage(
            &account_id,
            now,
            200 + i,
            "key_batch",
            "openai",
            "gpt-4o-mini",
            "attached",
            "attached-openai-batch",
            [50_000, 0, 4_000, 0],
        ));
    }
    let posted = c
        .post("/v1/events", &json!({"events": events}), None, 200)
        .await?;
    let again = c
        .post("/v1/events", &json!({"events": events[..5]}), None, 200)
        .await?;
    writeln!(
        out,
        "Posted {} usage events (managed, BYOK and attached-key); re-sending 5 of them applied {} and absorbed {} duplicates.\n",
        posted["applied"],
        again["applied"],
        again["duplicates"].as_array().map_or(0, Vec::len)
    )?;

    write_balance(&mut out, &c, &account_id).await?;
    write_usage(&mut out, &c, &account_id, now).await?;
    write_decision(&mut out, &c, &account_id).await?;

    let now = Utc::now();
    let mut heavy = Vec::new();
    for i in 0..400 {
        heavy.push(usage(
            &account_id,
            now,
            1000 + i,
            "key_frontend",
            "openai",
            "gpt-4o",
            "managed",
            "managed-openai",
            [12_000, 2_000, 3_000, 0],
        ));
    }
    heavy.push(usage(
        &account_id,
        now,
        5000,
        "key_backend",
        "anthropic",
        "claude-sonnet-4-5",
        "byok",
        "byok-anthropic-1",
        [8_000, 0, 1_500, 0],
    ));
    c.post("/v1/events", &json!({"events": heavy}), None, 200)
        .await?;
    writeln!(
        out,
        "\nThen 400 more managed requests, more than the credits left, and one more BYOK request:\n"
    )?;
    write_balance(&mut out, &c, &account_id).await?;
    write_decision(&mut out, &c, &account_id).await?;
    let topup = c
        .post(
            &format!("/v1/accounts/{account_id}/purchases"),
            &json!({"amount_usd": "50.00"}),
            Some("demo-purchase-2"),
            201,
        )
        .await?;
    writeln!(
        out,
        "\nA $50.00 purchase pays the debt first: the new lot has {} left, balance {}.",
        usd(&topup["lot"]["remaining_usd"]),
        usd(&topup["balance_usd"])
    )?;
    write_decision(&mut out, &c, &account_id).await?;
    writeln!(
        out,
        "\nTry it: curl -s {base}/v1/accounts/{account_id}/balance ; curl -s '{base}/v1/accounts/{account_id}/ledger?limit=5'"
    )?;
    Ok(out)
}

struct Client<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
}

impl Client<'_> {
    async fn post(
        &self,
        path: &str,
        body: &Value,
        idempotency_key: Option<&str>,
        expect: u16,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req.send().await.with_context(|| format!("POST {path}"))?;
        check(resp, path, expect).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        check(resp, path, 200).await
    }
}

async fn check(resp: reqwest::Response, path: &str, expect: u16) -> anyhow::Result<Value> {
    let status = resp.status().as_u16();
    let body: Value = resp
        .json()
        .await
        .with_context(|| format!("{path}: body is not JSON"))?;
    if status != expect {
        bail!("{path}: expected HTTP {expect}, got {status}: {body}");
    }
    Ok(body)
}

#[allow(clippy::too_many_arguments)]
fn usage(
    account_id: &str,
    now: DateTime<Utc>,
    n: u32,
    key: &str,
    provider: &str,
    model: &str,
    kind: &str,
    credential: &str,
    [input, cached, output, reasoning]: [i64; 4],
) -> Value {
    json!({
        "event_id": Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{account_id}/{n}").as_bytes()),
        "occurred_at": now + Duration::milliseconds(i64::from(n % 1000)),
        "account_id": account_id,
        "type": "usage",
        "request_id": format!("req_{n:05}"),
        "attempt": 1,
        "endpoint_id": "default",
        "api_key_id": key,
        "provider": provider,
        "model": model,
        "credential_kind": kind,
        "credential_id": credential,
        "tokens": {"input": input, "cached_input": cached, "output": output, "reasoning": reasoning},
        "token_source": "provider",
        "upstream_latency_ms": 420 + n % 50,
        "total_latency_ms": 425 + n % 50,
        "status": 200,
        "streaming": n.is_multiple_of(3),
    })
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Dollar strings carry nine decimals; people read cents and a bit.
fn usd(v: &Value) -> String {
    let s = str_of(v);
    match s.parse::<rust_decimal::Decimal>() {
        Ok(d) if d.is_sign_negative() => format!("-${}", d.abs().round_dp(4)),
        Ok(d) => format!("${}", d.round_dp(4)),
        Err(_) => s,
    }
}

fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(
        out,
        "  {}",
        line(headers.iter().map(|h| h.to_string()).collect())
    )?;
    writeln!(
        out,
        "  {}",
        line(widths.iter().map(|w| "-".repeat(*w)).collect())
    )?;
    for r in rows {
        writeln!(out, "  {}", line(r.clone()))?;
    }
    Ok(())
}

async fn write_balance(out: &mut String, c: &Client<'_>, account_id: &str) -> anyhow::Result<()> {
    let b = c.get(&format!("/v1/accounts/{account_id}/balance")).await?;
    writeln!(
        out,
        "Balance: {} (remaining {}, debt {}, expiring in 30 days {})",
        usd(&b["balance_usd"]),
        usd(&b["remaining_usd"]),
        usd(&b["debt_usd"]),
        usd(&b["expiring_next_30_days_usd"])
    )?;
    let rows: Vec<Vec<String>> = b["lots"]
        .as_array()
        .map(|lots| {
            lots.iter()
                .map(|l| {
                    vec![
                        str_of(&l["source"]),
                        str_of(&l["priority"]),
                        usd(&l["amount_usd"]),
                        usd(&l["burned_usd"]),
                        usd(&l["remaining_usd"]),
                        str_of(&l["expires_at"]).chars().take(10).collect(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if rows.is_empty() {
        writeln!(out, "  (no open lots with credit left)")?;
    } else {
        table(
            out,
            &[
                "lot",
                "priority",
                "amount",
                "burned",
                "remaining",
                "expires",
            ],
            &rows,
        )?;
    }
    Ok(())
}

async fn write_usage(
    out: &mut String,
    c: &Client<'_>,
    account_id: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let to = now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now) + Duration::hours(1);
    let from = to - Duration::days(1);
    let path = format!(
        "/v1/usage?account_id={account_id}&from={}&to={}&group_by=api_key_id,credential_kind,provider,model",
        from.format("%Y-%m-%dT%H:%M:%SZ"),
        to.format("%Y-%m-%dT%H:%M:%SZ")
    );
    let u = c.get(&path).await?;
    writeln!(
        out,
        "\nUsage in the last 24 hours by key and credential kind:"
    )?;
    let rows: Vec<Vec<String>> = u["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    vec![
                        str_of(&r["api_key_id"]),
                        str_of(&r["credential_kind"]),
                        format!("{}:{}", str_of(&r["provider"]), str_of(&r["model"])),
                        str_of(&r["requests"]),
                        format!(
                            "{}",
                            r["input_tokens"].as_i64().unwrap_or(0)
                                + r["cached_input_tokens"].as_i64().unwrap_or(0)
                                + r["output_tokens"].as_i64().unwrap_or(0)
                                + r["reasoning_tokens"].as_i64().unwrap_or(0)
                        ),
                        usd(&r["upstream_cost_usd"]),
                        usd(&r["charged_usd"]),
                        usd(&r["attributed_usd"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        out,
        &[
            "api key",
            "credential",
            "model",
            "requests",
            "tokens",
            "upstream cost",
            "charged to credits",
            "BYOK attributed",
        ],
        &rows,
    )?;
    Ok(())
}

async fn write_decision(out: &mut String, c: &Client<'_>, account_id: &str) -> anyhow::Result<()> {
    let d = c.get(&format!("/v1/enforcement/{account_id}")).await?;
    let managed = if d["allow_managed"] == Value::Bool(true) {
        "allowed"
    } else {
        "DENIED (403 credits_exhausted)"
    };
    writeln!(
        out,
        "\nEnforcement: managed traffic {managed}; BYOK traffic allowed; reason {}, available {}.",
        str_of(&d["reason"]),
        usd(&d["available_usd"])
    )?;
    Ok(())
}

/// Writes the demo's report to standard output (the CLI's own output).
pub fn print(report: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(report.as_bytes())?;
    stdout.flush()
}
