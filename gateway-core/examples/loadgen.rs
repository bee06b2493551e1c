#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]
//! Open-loop load generator: the gateway's *added* latency over calling the provider directly.
//!
//! One process, loopback only. It serves the mock provider (`mock::router`, or `mock::spawn`
//! with `--nodelay off`) on its own tokio runtime, the gateway (`proxy::router` over a real TCP
//! socket) on another, and drives both from a third: for each scenario in {non-streaming, streaming} × `--rates`, requests are
//! scheduled at fixed intervals (open loop: the next request never waits for a response) and
//! alternate in slices between the mock directly and the gateway (ABBA order, so both see the
//! same machine state). Latency is the time from sending a request to the end of its body (for
//! streams, the end of the stream), recorded in HDR histograms. CPU time, socket writes and
//! blocking context switches per request are read per runtime from `/proc/self/task`.
//!
//! The gateway runs with a static authenticator (one token), a static credential source (one
//! BYOK key for openai, so neither the decision cache nor the ledger is involved) and an event
//! sink that only counts events.
//!
//! ```text
//! cargo run --release -p tally-gateway-core --example loadgen -- --duration-secs 10
//! ```
//!
//! Options (defaults in brackets): `--duration-secs` [10] per target per scenario,
//! `--rates` [1000,5000], `--modes` [non-streaming,streaming], `--slice-ms` [1000],
//! `--warmup-ms` [1000], `--max-requests` [rate × duration], `--timeout-ms` [10000],
//! `--client-threads` [1], `--mock-threads` [1], `--gateway-threads` [2],
//! `--completion-tokens` [16], `--prompt-words` [32], `--nodelay` [on].
//!
//! `--nodelay on` sets `TCP_NODELAY` on the sockets the mock and the gateway accept (the client
//! sets it on its own). `axum::serve` does not, and neither does `mock::spawn`: with `off` the
//! mock is started by `mock::spawn` and the gateway by a plain `axum::serve`, and a server that
//! writes a response in several segments (every SSE stream) meets Nagle's algorithm and the
//! peer's delayed ACK, about 40 ms on Linux loopback.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use bytes::Bytes;
use hdrhistogram::Histogram;
use secrecy::SecretString;
use serde_json::json;
use tally_gateway_core::config::GatewayConfig;
use tally_gateway_core::decisions::DecisionCache;
use tally_gateway_core::error::GatewayError;
use tally_gateway_core::mock::{self, MockBehavior};
use tally_gateway_core::proxy::{
    self, Authenticator, Caller, CredentialSource, CustomProvider, Gateway, UpstreamKey,
};
use tally_gateway_core::sink::EventSink;
use tally_ledger::{CredentialKind, Event, EventBody};
use tokio::sync::mpsc;

const GATEWAY_TOKEN: &str = "tly_loadgen_token";
const BYOK_KEY: &str = "sk-loadgen-byok-openai";
const MODEL: &str = "gpt-4o";

// ---------------------------------------------------------------------------------------------
// Static gateway collaborators

#[derive(Debug)]
struct OneToken(Caller);

impl Authenticator for OneToken {
    fn verify(&self, token: &str, endpoint_id: &str) -> Result<Caller, GatewayError> {
        if token != GATEWAY_TOKEN {
            return Err(GatewayError::Unauthenticated);
        }
        if endpoint_id != self.0.endpoint_id {
            return Err(GatewayError::WrongEndpoint);
        }
        Ok(self.0.clone())
    }
}

#[derive(Debug)]
struct OneByokKey(Arc<UpstreamKey>);

impl CredentialSource for OneByokKey {
    fn credentials_for(
        &self,
        _account_id: &str,
        _api_key_id: &str,
        provider: &str,
    ) -> Vec<Arc<UpstreamKey>> {
        if provider == "openai" {
            vec![Arc::clone(&self.0)]
        } else {
            Vec::new()
        }
    }

    fn custom_provider(&self, _account_id: &str, _provider: &str) -> Option<CustomProvider> {
        None
    }
}

/// Discards events, counting them (and, by status, the ones that record a failed attempt).
#[derive(Debug, Default)]
struct CountingSink {
    events: AtomicU64,
    /// Status → events; touched only by failed attempts, so the lock is off the happy path.
    failed: Mutex<BTreeMap<u16, u64>>,
}

impl EventSink for CountingSink {
    fn send(&self, event: Event) {
        self.events.fetch_add(1, Ordering::Relaxed);
        if let EventBody::Usage(u) = &event.body
            && !(200..300).contains(&u.status)
        {
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            *failed.entry(u.status).or_insert(0) += 1;
        }
    }
}

impl CountingSink {
    fn failed(&self) -> BTreeMap<u16, u64> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NonStreaming,
    Streaming,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NonStreaming => "non-streaming",
            Mode::Streaming => "streaming",
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    duration: Duration,
    rates: Vec<u64>,
    modes: Vec<Mode>,
    slice: Duration,
    warmup: Duration,
    max_requests: Option<u64>,
    timeout: Duration,
    client_threads: usize,
    mock_threads: usize,
    gateway_threads: usize,
    completion_tokens: u32,
    prompt_words: usize,
    nodelay: bool,
}

const USAGE: &str = "usage: loadgen [--duration-secs N] [--rates 1000,5000] \
[--modes non-streaming,streaming] [--slice-ms N] [--warmup-ms N] [--max-requests N] \
[--timeout-ms N] [--client-threads N] [--mock-threads N] [--gateway-threads N] \
[--completion-tokens N] [--prompt-words N] [--nodelay on|off]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        duration: Duration::from_secs(10),
        rates: vec![1000, 5000],
        modes: vec![Mode::NonStreaming, Mode::Streaming],
        slice: Duration::from_millis(1000),
        warmup: Duration::from_millis(1000),
        max_requests: None,
        timeout: Duration::from_secs(10),
        client_threads: 1,
        mock_threads: 1,
        gateway_threads: 2,
        completion_tokens: mock::DEFAULT_COMPLETION_TOKENS,
        prompt_words: 32,
        nodelay: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let (flag, value) = match flag.split_once('=') {
            Some((f, v)) => (f.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
                (flag, v)
            }
        };
        let num = |v: &str| -> Result<u64, String> {
            v.trim()
                .parse::<u64>()
                .map_err(|e| format!("{flag}: {v:?}: {e}"))
        };
        match flag.as_str() {
            "--duration-secs" => a.duration = Duration::from_secs(num(&value)?),
            "--rates" => {
                a.rates = value
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(num)
                    .collect::<Result<_, _>>()?
            }
            "--modes" => {
                a.modes = value
                    .split(',')
                    .map(|m| match m.trim() {
                        "non-streaming" | "nonstreaming" | "plain" => Ok(Mode::NonStreaming),
                        "streaming" | "stream" => Ok(Mode::Streaming),
                        other => Err(format!("--modes: unknown mode {other:?}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--slice-ms" => a.slice = Duration::from_millis(num(&value)?.max(10)),
            "--warmup-ms" => a.warmup = Duration::from_millis(num(&value)?),
            "--max-requests" => a.max_requests = Some(num(&value)?),
            "--timeout-ms" => a.timeout = Duration::from_millis(num(&value)?.max(1)),
            "--client-threads" => a.client_threads = num(&value)?.max(1) as usize,
            "--mock-threads" => a.mock_threads = num(&value)?.max(1) as usize,
            "--gateway-threads" => a.gateway_threads = num(&value)?.max(1) as usize,
            "--completion-tokens" => a.completion_tokens = num(&value)? as u32,
            "--prompt-words" => a.prompt_words = num(&value)? as usize,
            "--nodelay" => {
                a.nodelay = match value.as_str() {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    other => return Err(format!("--nodelay: on or off, not {other:?}")),
                }
            }
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if a.rates.is_empty() || a.rates.contains(&0) {
        return Err("--rates must list positive rates".into());
    }
    if a.duration.is_zero() {
        return Err("--duration-secs must be positive".into());
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// Per-thread counters, from /proc (Linux only; zero elsewhere)

/// What the threads of one group (client, mock, gateway) used.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_ns: u64,
    /// write(2)-family calls: hyper writes sockets with writev, so one per flush. (Socket
    /// reads are recv(2), which /proc does not count.)
    syscw: u64,
    /// Times a thread blocked (parked with nothing to do, or waited in a syscall).
    voluntary_switches: u64,
}

impl Usage {
    fn add(&mut self, o: &Usage) {
        self.cpu_ns += o.cpu_ns;
        self.syscw += o.syscw;
        self.voluntary_switches += o.voluntary_switches;
    }

    fn minus(&self, o: &Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns.saturating_sub(o.cpu_ns),
            syscw: self.syscw.saturating_sub(o.syscw),
            voluntary_switches: self.voluntary_switches.saturating_sub(o.voluntary_switches),
        }
    }
}

const GROUPS: [&str; 3] = ["client", "mock", "gateway"];

fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
        .unwrap_or(0)
}

/// Usage so far of this process's threads, by group: [client, mock, gateway].
fn usage_by_group() -> [Usage; 3] {
    let mut out = [Usage::default(); 3];
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(i) = GROUPS
            .iter()
            .position(|g| comm.starts_with(&format!("lg-{g}")))
        else {
            continue;
        };
        let cpu_ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let io = std::fs::read_to_string(dir.join("io")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        out[i].add(&Usage {
            cpu_ns,
            syscw: field(&io, "syscw"),
            voluntary_switches: field(&status, "voluntary_ctxt_switches"),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Gateway,
}

/// What one target's request looks like.
#[derive(Debug, Clone)]
struct RequestSpec {
    url: String,
    authorization: String,
    body: Bytes,
    streaming: bool,
}

#[derive(Debug)]
struct Outcome {
    result: Result<(), String>,
    latency: Duration,
}

/// Everything measured for one target in one scenario.
#[derive(Debug)]
struct Stats {
    latency_us: Histogram<u64>,
    /// How late the dispatcher sent requests against their schedule.
    lag_us: Histogram<u64>,
    sent: u64,
    ok: u64,
    errors: u64,
    /// `errors` by cause.
    error_kinds: BTreeMap<String, u64>,
    /// Time spent sending and draining (the denominator of the achieved rate).
    active: Duration,
    usage: [Usage; 3],
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
            lag_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
            sent: 0,
            ok: 0,
            errors: 0,
            error_kinds: BTreeMap::new(),
            active: Duration::ZERO,
            usage: [Usage::default(); 3],
        }
    }

    fn achieved_rps(&self) -> f64 {
        let secs = self.active.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    fn p(&self, q: f64) -> f64 {
        if self.latency_us.is_empty() {
            f64::NAN
        } else {
            self.latency_us.value_at_quantile(q) as f64 / 1000.0
        }
    }

    fn per_req(&self, v: u64) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            v as f64 / self.sent as f64
        }
    }

    fn cpu_us_per_req(&self, group: usize) -> f64 {
        self.per_req(self.usage[group].cpu_ns) / 1000.0
    }
}

/// Why a request failed, for the error breakdown.
fn transport_error(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connect failed".into()
    } else if e.is_timeout() {
        "reqwest timeout".into()
    } else if e.is_body() || e.is_decode() {
        "body read failed".into()
    } else {
        "request failed".into()
    }
}

async fn one_request(client: &reqwest::Client, spec: &RequestSpec) -> Result<(), String> {
    let mut resp = client
        .post(&spec.url)
        .header(reqwest::header::AUTHORIZATION, &spec.authorization)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(spec.body.clone())
        .send()
        .await
        .map_err(|e| transport_error(&e))?;
    let status = resp.status();
    if !status.is_success() {
        // Name the failure by the error message the gateway (or the mock) gave.
        let body = resp.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        return Err(format!("HTTP {} {message:?}", status.as_u16()));
    }
    if !spec.streaming {
        let body = resp.bytes().await.map_err(|e| transport_error(&e))?;
        return if body.is_empty() {
            Err("empty body".into())
        } else {
            Ok(())
        };
    }
    // Streams: read to the end; the stream is whole when it closes with `[DONE]`.
    let mut tail: Vec<u8> = Vec::with_capacity(64);
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                tail.extend_from_slice(&c);
                if tail.len() > 64 {
                    tail.drain(..tail.len() - 64);
                }
            }
            Ok(None) => break,
            Err(e) => return Err(format!("stream broken ({})", transport_error(&e))),
        }
    }
    if !tail.ends_with(b"data: [DONE]\n\n") {
        Err("stream ended without [DONE]".into())
    } else {
        Ok(())
    }
}

/// Sends `count` requests at `rate` per second, open loop, and waits for them all (or the
/// timeout). Returns the wall time from the first send to the last response.
async fn run_slice(
    client: &reqwest::Client,
    spec: &Arc<RequestSpec>,
    rate: u64,
    count: u64,
    timeout: Duration,
    stats: Option<&mut Stats>,
) -> Duration {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let period_ns = 1_000_000_000f64 / rate as f64;
    let start = tokio::time::Instant::now();
    let mut lag: Vec<u64> = Vec::with_capacity(count as usize);
    let mut sent = 0u64;
    while sent < count {
        let now = tokio::time::Instant::now();
        // The timer wheel has a 1 ms resolution: send everything that is due by now.
        let elapsed_ns = now.duration_since(start).as_nanos() as f64;
        let due = ((elapsed_ns / period_ns) as u64 + 1).min(count);
        while sent < due {
            let intended = start + Duration::from_nanos((sent as f64 * period_ns) as u64);
            lag.push(now.saturating_duration_since(intended).as_micros() as u64);
            let client = client.clone();
            let spec = Arc::clone(spec);
            let tx = tx.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let result = tokio::time::timeout(timeout, one_request(&client, &spec))
                    .await
                    .unwrap_or_else(|_| Err("client timeout".into()));
                let _ = tx.send(Outcome {
                    result,
                    latency: t0.elapsed(),
                });
            });
            sent += 1;
        }
        if sent < count {
            let next = start + Duration::from_nanos((sent as f64 * period_ns) as u64);
            tokio::time::sleep_until(next).await;
        }
    }
    drop(tx);
    let mut received = 0u64;
    let mut outcomes = Vec::with_capacity(count as usize);
    // Every task ends within `timeout`; the margin only guards against a lost task.
    let drain_deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(2);
    while received < count {
        match tokio::time::timeout_at(drain_deadline, rx.recv()).await {
            Ok(Some(o)) => {
                received += 1;
                outcomes.push(o);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let active = start.elapsed();
    if let Some(stats) = stats {
        stats.sent += count;
        stats.active += active;
        if received < count {
            stats.errors += count - received;
            *stats.error_kinds.entry("lost".into()).or_insert(0) += count - received;
        }
        for o in outcomes {
            match o.result {
                Ok(()) => {
                    stats.ok += 1;
                    let us = (o.latency.as_micros() as u64).max(1);
                    let _ = stats.latency_us.record(us);
                }
                Err(kind) => {
                    stats.errors += 1;
                    *stats.error_kinds.entry(kind).or_insert(0) += 1;
                }
            }
        }
        for l in lag {
            let _ = stats.lag_us.record(l.max(1));
        }
    }
    active
}

struct ScenarioResult {
    mode: Mode,
    rate: u64,
    direct: Stats,
    gateway: Stats,
    events: u64,
    /// Status → events of failed attempts, as the gateway metered them.
    failed_events: BTreeMap<u16, u64>,
}

#[allow(clippy::too_many_arguments)]
async fn run_scenario(
    args: &Args,
    client: &reqwest::Client,
    direct: &Arc<RequestSpec>,
    gateway: &Arc<RequestSpec>,
    sink: &CountingSink,
    mode: Mode,
    rate: u64,
) -> ScenarioResult {
    // Warm-up: connections, allocator, caches; not recorded.
    if !args.warmup.is_zero() {
        let n = (rate as f64 * args.warmup.as_secs_f64() / 2.0).ceil() as u64;
        run_slice(client, direct, rate, n, args.timeout, None).await;
        run_slice(client, gateway, rate, n, args.timeout, None).await;
    }
    let total = args
        .max_requests
        .unwrap_or(u64::MAX)
        .min((rate as f64 * args.duration.as_secs_f64()).round() as u64)
        .max(1);
    let per_slice = ((rate as f64 * args.slice.as_secs_f64()).round() as u64).max(1);
    let mut d = Stats::new();
    let mut g = Stats::new();
    let events_before = sink.events.load(Ordering::Relaxed);
    let failed_before = sink.failed();
    let mut remaining = total;
    let mut i = 0u64;
    while remaining > 0 {
        let n = per_slice.min(remaining);
        // ABBA: direct first on even slices, gateway first on odd ones.
        let order = if i.is_multiple_of(2) {
            [Target::Direct, Target::Gateway]
        } else {
            [Target::Gateway, Target::Direct]
        };
        for t in order {
            let (spec, stats) = match t {
                Target::Direct => (direct, &mut d),
                Target::Gateway => (gateway, &mut g),
            };
            let before = usage_by_group();
            run_slice(client, spec, rate, n, args.timeout, Some(&mut *stats)).await;
            let after = usage_by_group();
            for g in 0..GROUPS.len() {
                stats.usage[g].add(&after[g].minus(&before[g]));
            }
        }
        remaining -= n;
        i += 1;
    }
    // A stream's event is emitted just after its last frame: let stragglers land.
    let expected = events_before + g.sent;
    let settle = Instant::now();
    while sink.events.load(Ordering::Relaxed) < expected
        && settle.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ScenarioResult {
        mode,
        rate,
        direct: d,
        gateway: g,
        events: sink.events.load(Ordering::Relaxed) - events_before,
        failed_events: sink
            .failed()
            .into_iter()
            .map(|(k, v)| (k, v - failed_before.get(&k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.3}")
    }
}

fn signed_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:+.3}")
    }
}

fn report(results: &[ScenarioResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | rate (rps) | achieved direct / gateway (rps) | direct p50 / p99 (ms) | \
gateway p50 / p99 (ms) | added p50 / p99 (ms) | p99 ratio gw/direct | errors direct / gateway | \
sink events / gateway requests |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let (d, g) = (&r.direct, &r.gateway);
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} / {:.0} | {} / {} | {} / {} | {} / {} | {:.2} | {} / {} | {} / {}{} |",
            r.mode.name(),
            r.rate,
            d.achieved_rps(),
            g.achieved_rps(),
            ms(d.p(0.5)),
            ms(d.p(0.99)),
            ms(g.p(0.5)),
            ms(g.p(0.99)),
            signed_ms(g.p(0.5) - d.p(0.5)),
            signed_ms(g.p(0.99) - d.p(0.99)),
            g.p(0.99) / d.p(0.99),
            d.errors,
            g.errors,
            r.events,
            g.sent,
            if r.events == g.sent { " ✓" } else { " ✗" },
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| scenario | rate | target | sent | ok | p90 (ms) | p99.9 (ms) | max (ms) | mean (ms) | \
dispatch lag p99 / max (ms) | CPU µs/req client / mock / gateway | socket writes / req mock / gateway | \
gateway blocking switches / req |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in results {
        for (name, st) in [("direct", &r.direct), ("gateway", &r.gateway)] {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {:.1} / {:.1} / {:.1} | \
{:.1} / {:.1} | {:.1} |",
                r.mode.name(),
                r.rate,
                name,
                st.sent,
                st.ok,
                ms(st.p(0.9)),
                ms(st.p(0.999)),
                ms(if st.latency_us.is_empty() {
                    f64::NAN
                } else {
                    st.latency_us.max() as f64 / 1000.0
                }),
                ms(if st.latency_us.is_empty() {
                    f64::NAN
                } else {
                    st.latency_us.mean() / 1000.0
                }),
                ms(st.lag_us.value_at_quantile(0.99) as f64 / 1000.0),
                ms(st.lag_us.max() as f64 / 1000.0),
                st.cpu_us_per_req(0),
                st.cpu_us_per_req(1),
                st.cpu_us_per_req(2),
                st.per_req(st.usage[1].syscw),
                st.per_req(st.usage[2].syscw),
                st.per_req(st.usage[2].voluntary_switches),
            );
        }
    }
    let _ = writeln!(s);
    for r in results {
        let kinds = |st: &Stats| {
            if st.error_kinds.is_empty() {
                "none".to_string()
            } else {
                st.error_kinds
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let metered = if r.failed_events.is_empty() {
            "none".to_string()
        } else {
            r.failed_events
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "- {} at {} rps: direct errors: {}; gateway errors: {}; failed attempts metered by \
the gateway, by status: {}",
            r.mode.name(),
            r.rate,
            kinds(&r.direct),
            kinds(&r.gateway),
            metered,
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------

fn runtime(name: &'static str, threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn set_nodelay(stream: &mut tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

fn request_body(args: &Args, streaming: bool) -> Bytes {
    let words: Vec<&str> = ["benchmark", "the", "gateway", "please"]
        .iter()
        .copied()
        .cycle()
        .take(args.prompt_words)
        .collect();
    let mut body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a load generator's friend."},
            {"role": "user", "content": words.join(" ")},
        ],
        "stream": streaming,
    });
    if streaming {
        // Asked on both paths, so the mock does the same work whichever way a request came;
        // the gateway asks for it upstream in any case.
        body["stream_options"] = json!({"include_usage": true});
    }
    Bytes::from(serde_json::to_vec(&body).expect("json body"))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            println!("{e}");
            std::process::exit(2);
        }
    };

    let mock_rt = runtime("lg-mock", args.mock_threads);
    let gateway_rt = runtime("lg-gateway", args.gateway_threads);
    let client_rt = runtime("lg-client", args.client_threads);

    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let (mock_addr, mock_state) = if args.nodelay {
        mock_rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(loopback)
                .await
                .expect("mock listener");
            let addr = listener.local_addr().expect("mock address");
            let state = Arc::new(mock::MockState::new());
            let app = mock::router(Arc::clone(&state));
            tokio::spawn(async move {
                let _ = axum::serve(listener.tap_io(set_nodelay), app).await;
            });
            (addr, state)
        })
    } else {
        mock_rt
            .block_on(mock::spawn(loopback))
            .expect("mock provider")
    };
    mock_state.set_default_behavior(MockBehavior {
        completion_tokens: args.completion_tokens,
        ..MockBehavior::default()
    });

    let sink = Arc::new(CountingSink::default());
    let mut config = GatewayConfig::default();
    config
        .base_url_overrides
        .insert("openai".into(), format!("http://{mock_addr}/v1"));
    config.per_request_timeout = args.timeout;
    config.total_timeout = args.timeout;
    let gateway = Gateway::new(
        config,
        Arc::new(OneToken(Caller {
            account_id: "acct_loadgen".into(),
            endpoint_id: proxy::DEFAULT_ENDPOINT.into(),
            api_key_id: "key_loadgen".into(),
        })),
        Arc::new(OneByokKey(Arc::new(UpstreamKey {
            credential_id: "cred_loadgen_byok".into(),
            account_id: "acct_loadgen".into(),
            provider: "openai".into(),
            kind: CredentialKind::Byok,
            api_key_id: None,
            masked: String::new(),
            api_key: SecretString::from(BYOK_KEY),
        }))),
        DecisionCache::new(),
        Arc::clone(&sink) as Arc<dyn EventSink>,
        Arc::new(chrono::Utc::now),
    )
    .expect("gateway config");
    // Served from its own runtime: its handlers, and so its upstream connections, run there.
    let nodelay = args.nodelay;
    let gateway_addr = gateway_rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(loopback)
            .await
            .expect("gateway listener");
        let addr = listener.local_addr().expect("gateway address");
        let app = proxy::router(Arc::new(gateway));
        tokio::spawn(async move {
            if nodelay {
                let _ = axum::serve(listener.tap_io(set_nodelay), app).await;
            } else {
                let _ = axum::serve(listener, app).await;
            }
        });
        addr
    });

    let started_at = chrono::Utc::now();
    println!(
        "loadgen: mock at {mock_addr}, gateway at {gateway_addr}; {} s per target per scenario, \
rates {:?}, slices of {} ms, threads client/mock/gateway {}/{}/{}, TCP_NODELAY {}, \
{} cores available",
        args.duration.as_secs(),
        args.rates,
        args.slice.as_millis(),
        args.client_threads,
        args.mock_threads,
        args.gateway_threads,
        if args.nodelay { "on" } else { "off" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    );

    let results = client_rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(4096)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .expect("reqwest client");
        // Fail fast when the wiring is wrong, rather than report 100 % errors.
        for (name, spec) in [
            (
                "direct",
                RequestSpec {
                    url: format!("http://{mock_addr}/v1/chat/completions"),
                    authorization: format!("Bearer {BYOK_KEY}"),
                    body: request_body(&args, false),
                    streaming: false,
                },
            ),
            (
                "gateway",
                RequestSpec {
                    url: format!("http://{gateway_addr}/v1/chat/completions"),
                    authorization: format!("Bearer {GATEWAY_TOKEN}"),
                    body: request_body(&args, false),
                    streaming: false,
                },
            ),
        ] {
            let r = client
                .post(&spec.url)
                .header(reqwest::header::AUTHORIZATION, &spec.authorization)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(spec.body.clone())
                .send()
                .await
                .expect("probe request");
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            assert!(
                status.is_success(),
                "{name} probe answered {status}: {text}"
            );
        }

        let mut results = Vec::new();
        for &mode in &args.modes {
            let streaming = mode == Mode::Streaming;
            let direct = Arc::new(RequestSpec {
                url: format!("http://{mock_addr}/v1/chat/completions"),
                authorization: format!("Bearer {BYOK_KEY}"),
                body: request_body(&args, streaming),
                streaming,
            });
            let gateway = Arc::new(RequestSpec {
                url: format!("http://{gateway_addr}/v1/chat/completions"),
                authorization: format!("Bearer {GATEWAY_TOKEN}"),
                body: request_body(&args, streaming),
                streaming,
            });
            for &rate in &args.rates {
                println!("running {} at {rate} rps …", mode.name());
                let r = run_scenario(&args, &client, &direct, &gateway, &sink, mode, rate).await;
                println!(
                    "  direct p50/p99 {}/{} ms, gateway p50/p99 {}/{} ms, errors {}/{}",
                    ms(r.direct.p(0.5)),
                    ms(r.direct.p(0.99)),
                    ms(r.gateway.p(0.5)),
                    ms(r.gateway.p(0.99)),
                    r.direct.errors,
                    r.gateway.errors
                );
                results.push(r);
            }
        }
        results
    });

    println!();
    println!(
        "started {} UTC, mock calls {}",
        started_at.format("%Y-%m-%d %H:%M:%S"),
        mock_state.total_calls()
    );
    println!();
    print!("{}", report(&results));

    // The servers' tasks never end on their own; drop the runtimes without waiting for them.
    client_rt.shutdown_background();
    gateway_rt.shutdown_background();
    mock_rt.shutdown_background();
}
