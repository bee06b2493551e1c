//! `tally demo`: the whole ledger flow end to end over the real HTTP API, printed for a person.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context, bail};
use chrono::{DateTime, Duration, DurationRound, TimeDelta, Utc};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tally_gateway_core::config::GatewayConfig;
use tally_gateway_core::mock::{MockBehavior, MockState};

/// The platform's managed OpenAI key in the demo; the mock provider accepts it.
pub const DEMO_MANAGED_OPENAI_KEY: &str = "sk-demo-managed-openai-000000000001";
const BYOK_LIMITED: &str = "sk-ant-demo-rate-limited-0000000001";
const BYOK_GOOD: &str = "sk-ant-demo-customer-key-0000000002";

/// Points the catalog's OpenAI and Anthropic at the in-process mock provider and gives the
/// platform a managed OpenAI key there.
pub fn configure_gateway(config: &mut GatewayConfig, mock: SocketAddr) {
    for provider in ["openai", "anthropic"] {
        config
            .base_url_overrides
            .insert(provider.to_string(), format!("http://{mock}/v1"));
    }
    config.managed_keys.insert(
        "openai".to_string(),
        vec![secrecy::SecretString::from(DEMO_MANAGED_OPENAI_KEY)],
    );
}

/// Drives running ledger and gateway APIs (`http://host:port` each) against the mock provider
/// and returns the report.
pub async fn run_scenario(
    base: &str,
    gateway: &str,
    mock: &MockState,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    run_scenario_with(base, gateway, mock, now, None).await
}

/// [`run_scenario`]; with `statement_dir`, the flow ends by writing the demo account's
/// statement of the current month there (CSV, from the statements API) and saying where.
pub async fn run_scenario_with(
    base: &str,
    gateway: &str,
    mock: &MockState,
    now: DateTime<Utc>,
    statement_dir: Option<&Path>,
) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let mut out = String::new();
    let account_id = format!("demo-{}", now.format("%Y%m%d%H%M%S%3f"));
    let c = Client { http: &http, base };

    c.post("/v1/accounts", &json!({"account_id": account_id, "name": "Acme Corp (demo)", "low_balance_threshold_usd": "5.00"}), None, 201).await?;
    writeln!(
        out,
        "tally demo — ledger API {base}, gateway {gateway}/v1, upstreams: the mock provider\n"
    )?;
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
        "Bought $20.00 of credits; the retried request with the same Idempotency-Key returned the same lot: {same}."
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
        "Granted $5.00 of promotional credit, expiring {} (burns first: priority 10).",
        expires.format("%Y-%m-%d")
    )?;

    // Gateway keys for two teams, and the backend team's own Anthropic keys (BYOK).
    let mut names: HashMap<String, String> = HashMap::new();
    let mut tokens: HashMap<&str, String> = HashMap::new();
    for team in ["frontend", "backend"] {
        let k = c
            .post(
                &format!("/v1/accounts/{account_id}/keys"),
                &json!({"endpoint_id": "default", "description": team}),
                None,
                201,
            )
            .await?;
        names.insert(str_of(&k["key_id"]), team.to_string());
        tokens.insert(team, str_of(&k["token"]));
    }
    for (key, position) in [(BYOK_LIMITED, 0), (BYOK_GOOD, 1)] {
        c.post(
            &format!("/v1/accounts/{account_id}/provider-keys"),
            &json!({"provider": "anthropic", "api_key": key, "kind": "byok", "position": position}),
            None,
            201,
        )
        .await?;
    }
    mock.set_behavior(BYOK_LIMITED, MockBehavior::status(429));
    writeln!(
        out,
        "Created gateway keys for the frontend and backend teams; the backend brought two Anthropic keys (BYOK), the first of them rate-limited upstream.\n"
    )?;

    let g = Gateway {
        http: &http,
        base: gateway,
    };
    for i in 0..12 {
        g.openai(&tokens["frontend"], "gpt-4o", i % 2 == 0, 200)
            .await?;
    }
    for _ in 0..6 {
        g.anthropic(&tokens["backend"], "anthropic:claude-sonnet-4-5", 200)
            .await?;
    }
    writeln!(
        out,
        "Sent 12 OpenAI chat completions (half of them streamed) with the frontend key on managed credentials, and 6 Anthropic messages with the backend key: each failed over from the rate-limited key to the next one.\n"
    )?;
    wait_for_requests(&c, &account_id, now, 12 + 6 * 2).await?;
    write_balance(&mut out, &c, &account_id).await?;
    write_usage(&mut out, &c, &account_id, now, &names).await?;
    write_decision(&mut out, &c, &account_id).await?;

    // Long answers on the managed key burn the credits down to nothing.
    mock.set_behavior(
        DEMO_MANAGED_OPENAI_KEY,
        MockBehavior {
            completion_tokens: 300_000,
            ..MockBehavior::default()
        },
    );
    let mut served = 0;
    let mut denied = false;
    for _ in 0..60 {
        match g.openai(&tokens["frontend"], "gpt-4o", false, 0).await? {
            200 => served += 1,
            403 => {
                denied = true;
                break;
            }
            other => bail!("unexpected gateway status {other}"),
        }
    }
    if !denied {
        bail!("the account was never denied");
    }
    let byok_status = g
        .anthropic(&tokens["backend"], "claude-sonnet-4-5", 200)
        .await?;
    writeln!(
        out,
        "\nThen {served} long managed answers used the credits up: the next managed request got HTTP 403 credits_exhausted, while a BYOK request still got HTTP {byok_status}.\n"
    )?;
    mock.remove_behavior(DEMO_MANAGED_OPENAI_KEY);
    wait_for_requests(&c, &account_id, now, 12 + 6 * 2 + served + 2).await?;
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
    let mut status = 0;
    for _ in 0..50 {
        status = g.openai(&tokens["frontend"], "gpt-4o", false, 0).await?;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    writeln!(
        out,
        "Managed requests are served again (HTTP {status}) as soon as the gateways see the new decision."
    )?;
    wait_for_requests(&c, &account_id, now, 12 + 6 * 2 + served + 3).await?;
    write_usage(&mut out, &c, &account_id, now, &names).await?;
    writeln!(
        out,
        "\nTry it: curl -s {base}/v1/accounts/{account_id}/balance ; curl -s '{base}/v1/accounts/{account_id}/ledger?limit=5'"
    )?;
    if let Some(dir) = statement_dir {
        write_statement(&mut out, &c, &account_id, now, dir).await?;
    }
    write_observability(&mut out, base, gateway)?;
    Ok(out)
}

/// Where this run's metrics are served and where the Grafana dashboards are kept.
fn write_observability(out: &mut String, base: &str, gateway: &str) -> anyhow::Result<()> {
    writeln!(
        out,
        "
Metrics (Prometheus text format): {base}/metrics (ledger listener) and {gateway}/metrics (gateway listener)."
    )?;
    // The checkout this binary was built from, when it is still there.
    let built_from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let dashboards = if built_from.is_dir() {
        built_from.display().to_string()
    } else {
        "dashboards/ in the tally repository".to_string()
    };
    writeln!(
        out,
        "Grafana dashboards: {dashboards} (JSON); provision them with dashboards/provisioning/ (Prometheus and PostgreSQL datasources), see dashboards/README.md."
    )?;
    Ok(())
}

/// Saves the account's statement of the month of `now` as CSV in `dir`, and summarises it.
async fn write_statement(
    out: &mut String,
    c: &Client<'_>,
    account_id: &str,
    now: DateTime<Utc>,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let period = tally_ledger::statement::Period::containing(now)?;
    let path = format!("/v1/accounts/{account_id}/statements/{period}");
    let s = c.get(&path).await?;
    let resp = c
        .http
        .get(format!("{}{path}?format=csv", c.base))
        .send()
        .await
        .with_context(|| format!("GET {path}?format=csv"))?;
    if !resp.status().is_success() {
        bail!("{path}?format=csv: HTTP {}", resp.status());
    }
    let csv = resp.bytes().await?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(format!(
        "tally-demo-statement-{}-{period}.csv",
        crate::api::exports::file_safe(account_id)
    ));
    std::fs::write(&file, &csv).with_context(|| format!("writing {}", file.display()))?;
    writeln!(
        out,
        "\nStatement of {period}: purchases {}, grants {}, managed usage {} (upstream {} + fee {}), BYOK attributed {} (not charged), closing balance {}.\nSample statement (CSV) written to {}",
        usd(&s["purchases_usd"]),
        usd(&s["grants_usd"]),
        usd(&s["managed_charged_usd"]),
        usd(&s["managed_upstream_cost_usd"]),
        usd(&s["managed_fee_usd"]),
        usd(&s["byok_attributed_usd"]),
        usd(&s["closing"]["balance_usd"]),
        file.display()
    )?;
    Ok(file)
}

/// Usage reaches the ledger a moment after the response; wait until it is all applied.
async fn wait_for_requests(
    c: &Client<'_>,
    account_id: &str,
    now: DateTime<Utc>,
    attempts: usize,
) -> anyhow::Result<()> {
    for _ in 0..100 {
        let u = c.get(&usage_path(account_id, now, "")).await?;
        let seen = u["rows"]
            .as_array()
            .and_then(|r| r.first())
            .and_then(|r| r["requests"].as_u64())
            .unwrap_or(0);
        if seen >= attempts as u64 {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!("the ledger did not receive {attempts} attempts in time")
}

fn usage_path(account_id: &str, now: DateTime<Utc>, group_by: &str) -> String {
    let to = now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now) + Duration::hours(2);
    let from = to - Duration::days(1);
    let mut p = format!(
        "/v1/usage?account_id={account_id}&from={}&to={}",
        from.format("%Y-%m-%dT%H:%M:%SZ"),
        to.format("%Y-%m-%dT%H:%M:%SZ")
    );
    if !group_by.is_empty() {
        p.push_str("&group_by=");
        p.push_str(group_by);
    }
    p
}

struct Gateway<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
}

impl Gateway<'_> {
    /// Returns the status; when `expect` is non-zero any other status is an error.
    async fn openai(
        &self,
        token: &str,
        model: &str,
        stream: bool,
        expect: u16,
    ) -> anyhow::Result<u16> {
        let body = json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Summarise our Q3 usage in one line."}]});
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        if expect != 0 && status != expect {
            bail!("gateway: expected HTTP {expect}, got {status}: {text}");
        }
        Ok(status)
    }

    async fn anthropic(&self, token: &str, model: &str, expect: u16) -> anyhow::Result<u16> {
        let body = json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "Draft a release note."}]});
        let resp = self
            .http
            .post(format!("{}/v1/messages", self.base))
            .header("x-api-key", token)
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        if expect != 0 && status != expect {
            bail!("gateway: expected HTTP {expect}, got {status}: {text}");
        }
        Ok(status)
    }
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
    names: &HashMap<String, String>,
) -> anyhow::Result<()> {
    let u = c
        .get(&usage_path(
            account_id,
            now,
            "api_key_id,credential_kind,provider,model",
        ))
        .await?;
    writeln!(
        out,
        "\nUsage by key and credential kind (attempts, including failed ones):"
    )?;
    let rows: Vec<Vec<String>> = u["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    let key = str_of(&r["api_key_id"]);
                    vec![
                        names.get(&key).cloned().unwrap_or(key),
                        str_of(&r["credential_kind"]),
                        format!("{}:{}", str_of(&r["provider"]), str_of(&r["model"])),
                        str_of(&r["requests"]),
                        str_of(&r["failed_requests"]),
                        format!(
                            "{}",
                            r["input_tokens"].as_i64().unwrap_or(0)
                                + r["cached_input_tokens"].as_i64().unwrap_or(0)
                                + r["output_tokens"].as_i64().unwrap_or(0)
                                + r["reasoning_tokens"].as_i64().unwrap_or(0)
                        ),
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
            "key",
            "credential",
            "model",
            "attempts",
            "failed",
            "tokens",
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
