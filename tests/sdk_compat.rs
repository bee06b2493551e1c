//! The official OpenAI and Anthropic Python SDKs, unchanged but for base URL and key, against
//! the whole stack over real sockets: client → gateway → mock provider → ledger. Runs
//! `tests/sdk/check_sdks.py` with the interpreter in `TALLY_SDK_PYTHON`, which
//! `bash tests/run.sh` sets up (a cached venv with `tests/sdk/requirements.txt`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;

const MANAGED_ANTHROPIC_KEY: &str = "sk-managed-anthropic";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

const HOW: &str = "run `bash tests/run.sh`, which installs tests/sdk/requirements.txt into a cached venv and exports TALLY_SDK_PYTHON (or point TALLY_SDK_PYTHON at a python with those packages)";
/// `check_sdks.py`'s exit status when it cannot import the SDKs.
const SETUP_EXIT: i32 = 3;

/// The interpreter meant to have the SDKs (the script itself reports when it has not).
fn sdk_python() -> String {
    match std::env::var("TALLY_SDK_PYTHON") {
        Ok(p) if !p.trim().is_empty() => p,
        _ => panic!(
            "TALLY_SDK_PYTHON is not set: the SDK compatibility test needs the official openai and anthropic Python packages; {HOW}"
        ),
    }
}

struct ScriptRun {
    success: bool,
    code: Option<i32>,
    status: String,
    stdout: String,
    stderr: String,
}

/// Runs the script without blocking the runtime the gateway is served on, killing it after
/// `timeout`.
async fn run_script(python: &str, args: &[String], timeout: Duration) -> ScriptRun {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_sdks.py");
    let mut child = Command::new(python)
        .arg(script)
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("TALLY_SDK_PYTHON={python} cannot be run ({e}); {HOW}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let (success, code, status) = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break (s.success(), s.code(), s.to_string());
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break (false, None, format!("killed after {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ScriptRun {
        success,
        code,
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// `upstream-requests openai=N anthropic=M`: the requests the script sent through to a provider.
fn upstream_requests(stdout: &str) -> (u64, u64) {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("upstream-requests "))
        .unwrap_or_else(|| panic!("no upstream-requests line in:\n{stdout}"));
    let count = |provider: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{provider}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {provider} count in {line:?}"))
    };
    (count("openai"), count("anthropic"))
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> Value {
    let resp = http.post(&url).json(&body).send().await.unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status.as_u16(), 201, "POST {url}: {body}");
    body
}

fn hour(t: DateTime<Utc>) -> String {
    t.duration_trunc(TimeDelta::hours(1))
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn official_sdks_work_against_the_gateway(pool: PgPool) {
    let python = sdk_python();
    let live = common::live_stack(&pool, |config, _| {
        config.managed_keys.insert(
            "anthropic".to_string(),
            vec![SecretString::from(MANAGED_ANTHROPIC_KEY)],
        );
    })
    .await;
    let (clock, mock_state, ledger, gateway, stack) =
        (live.clock, live.mock, live.ledger, live.gateway, live.stack);
    let started_at = clock.now();
    let http = reqwest::Client::new();

    let account = post(
        &http,
        format!("{ledger}/v1/accounts"),
        json!({"name": "SDK compatibility"}),
    )
    .await;
    let account_id = account["account_id"].as_str().unwrap().to_string();
    post(
        &http,
        format!("{ledger}/v1/accounts/{account_id}/purchases"),
        json!({"amount_usd": "50.00"}),
    )
    .await;
    let key = post(
        &http,
        format!("{ledger}/v1/accounts/{account_id}/keys"),
        json!({"endpoint_id": "default", "description": "sdk"}),
    )
    .await;
    let token = key["token"].as_str().unwrap().to_string();
    // The purchase reaches the gateway's credit decisions in process; make sure it has.
    let decisions = Arc::clone(&stack.runtime.as_ref().unwrap().decisions);
    for _ in 0..100 {
        if decisions.allow_managed(&account_id, clock.now()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        decisions.allow_managed(&account_id, clock.now()),
        "the gateway never allowed managed traffic after the purchase"
    );

    let run = run_script(
        &python,
        &[
            "--gateway".to_string(),
            gateway.clone(),
            "--token".to_string(),
            token,
        ],
        SCRIPT_TIMEOUT,
    )
    .await;
    if run.code == Some(SETUP_EXIT) {
        panic!(
            "TALLY_SDK_PYTHON={python} cannot import openai and anthropic:\n{}\n{HOW}",
            run.stderr
        );
    }
    assert!(
        run.success,
        "tests/sdk/check_sdks.py failed ({}).\n--- stdout ---\n{}\n--- stderr ---\n{}",
        run.status, run.stdout, run.stderr
    );
    // Shown with `cargo test --test sdk_compat -- --nocapture`: one line per SDK check.
    #[allow(clippy::print_stdout)]
    {
        println!("{}", run.stdout);
    }
    let (openai, anthropic) = upstream_requests(&run.stdout);
    assert!(openai > 0 && anthropic > 0, "{}", run.stdout);
    assert_eq!(
        mock_state.calls(tally::demo::DEMO_MANAGED_OPENAI_KEY),
        openai,
        "OpenAI requests that reached the provider\n{}",
        run.stdout
    );
    assert_eq!(
        mock_state.calls(MANAGED_ANTHROPIC_KEY),
        anthropic,
        "Anthropic requests that reached the provider\n{}",
        run.stdout
    );

    // Every request the SDKs made reaches the ledger, metered and charged to the credits.
    let from = hour(started_at - TimeDelta::hours(1));
    let mut rows = Vec::new();
    let mut metered = (0, 0);
    for _ in 0..200 {
        let to = hour(clock.now() + TimeDelta::hours(1));
        let url = format!(
            "{ledger}/v1/usage?account_id={account_id}&from={from}&to={to}&group_by=provider"
        );
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "GET {url}");
        let body: Value = resp.json().await.unwrap();
        rows = body["rows"].as_array().cloned().unwrap_or_default();
        let requests = |provider: &str| {
            rows.iter()
                .find(|r| r["provider"] == provider)
                .and_then(|r| r["requests"].as_u64())
                .unwrap_or(0)
        };
        metered = (requests("openai"), requests("anthropic"));
        if metered.0 >= openai && metered.1 >= anthropic {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metered,
        (openai, anthropic),
        "metered (openai, anthropic) requests; usage rows: {rows:#?}"
    );
    for row in &rows {
        assert_eq!(row["failed_requests"].as_u64(), Some(0), "{row}");
        let charged = match &row["charged_usd"] {
            Value::String(s) => Decimal::from_str(s).unwrap(),
            other => Decimal::from_str(&other.to_string()).unwrap(),
        };
        assert!(charged > Decimal::ZERO, "managed usage charged: {row}");
    }
    stack.stop().await.unwrap();
}
