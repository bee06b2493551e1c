//! The dashboards are real: with tally running and having served traffic, a real Prometheus
//! server (Debian's `prometheus`; its path from `TALLY_PROMETHEUS_BIN`) scrapes both listeners'
//! `/metrics`, and every PromQL expression of every dashboard parses and returns data; every
//! SQL panel runs against the real schema, Grafana's macros expanded, and returns rows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod traffic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{PgPool, Row};

const PROMETHEUS_UID: &str = "tally-prometheus";
const POSTGRES_UID: &str = "tally-postgres";

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// Every dashboard JSON of `dashboards/`, by file name.
fn dashboards() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dashboards_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            out.insert(path.file_name().unwrap().to_string_lossy().into_owned(), v);
        }
    }
    assert!(out.len() >= 2, "dashboards found: {:?}", out.keys());
    out
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// A target's datasource uid: its own, else its panel's.
fn datasource_uid<'a>(panel: &'a Value, target: &'a Value) -> &'a str {
    target["datasource"]["uid"]
        .as_str()
        .or_else(|| panel["datasource"]["uid"].as_str())
        .unwrap_or_else(|| panic!("panel {:?}: a target without a datasource", panel["title"]))
}

struct Query {
    dashboard: String,
    panel: String,
    text: String,
}

/// `(promql, sql)` of every target of every dashboard.
fn queries() -> (Vec<Query>, Vec<Query>) {
    let (mut promql, mut sql) = (Vec::new(), Vec::new());
    for (file, d) in dashboards() {
        for p in panels(&d) {
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap_or_default().to_string();
            let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            assert!(!targets.is_empty(), "{file}: panel {title:?} has no query");
            for t in targets {
                let q = |text: &str| Query {
                    dashboard: file.clone(),
                    panel: title.clone(),
                    text: text.to_string(),
                };
                match datasource_uid(p, t) {
                    PROMETHEUS_UID => promql.push(q(t["expr"].as_str().unwrap_or_else(|| {
                        panic!("{file}: panel {title:?}: a Prometheus target without expr")
                    }))),
                    POSTGRES_UID => sql.push(q(t["rawSql"].as_str().unwrap_or_else(|| {
                        panic!("{file}: panel {title:?}: a PostgreSQL target without rawSql")
                    }))),
                    other => panic!("{file}: panel {title:?}: unknown datasource {other}"),
                }
            }
        }
    }
    (promql, sql)
}

/// Grafana's PromQL variables, as Grafana would fill them for a recent time range.
fn expand_promql(expr: &str) -> String {
    let mut out = expr.to_string();
    for (var, value) in [
        ("${__rate_interval}", "1m"),
        ("$__rate_interval", "1m"),
        ("${__interval}", "15s"),
        ("$__interval", "15s"),
        ("${__range}", "1h"),
        ("$__range", "1h"),
    ] {
        out = out.replace(var, value);
    }
    assert!(!out.contains('$'), "an unknown variable in {expr}");
    out
}

/// The arguments of the macro call opening at `open` (just past its `(`), and where it ends.
fn macro_args(sql: &str, open: usize) -> (Vec<String>, usize) {
    let mut depth = 1;
    for (i, c) in sql[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    let args = sql[open..open + i]
                        .split(',')
                        .map(|a| a.trim().to_string())
                        .collect();
                    return (args, open + i + 1);
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced macro in {sql}")
}

/// Seconds of a Grafana interval such as `'1h'` or `'5m'`.
fn interval_secs(arg: &str) -> u64 {
    let a = arg.trim_matches('\'');
    let (n, unit) = a.split_at(a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("interval {arg}"));
    n * match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 604_800,
        other => panic!("interval unit {other:?} in {arg}"),
    }
}

/// Grafana's PostgreSQL macros, expanded as Grafana does, over a window of a day either side of
/// now; `$var` from `vars` (values quoted and joined, as for a multi-value variable).
fn expand_sql(sql: &str, vars: &BTreeMap<String, Vec<String>>) -> String {
    let mut out = sql.to_string();
    let from = "now() - interval '1 day'";
    let to = "now() + interval '1 day'";
    while let Some(at) = out.find("$__") {
        let name_len = out[at + 3..]
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(out.len() - at - 3);
        let name = out[at + 3..at + 3 + name_len].to_string();
        let open = at + 3 + name_len;
        assert_eq!(
            &out[open..open + 1],
            "(",
            "macro $__{name} without arguments"
        );
        let (args, end) = macro_args(&out, open + 1);
        let expansion = match name.as_str() {
            "timeFilter" => format!("{} between {from} and {to}", args[0]),
            "timeFrom" => format!("({from})"),
            "timeTo" => format!("({to})"),
            "timeGroup" | "timeGroupAlias" => {
                let secs = interval_secs(&args[1]);
                let group = format!("floor(extract(epoch from {})/{secs})*{secs}", args[0]);
                if name == "timeGroupAlias" {
                    format!("{group} AS \"time\"")
                } else {
                    group
                }
            }
            "unixEpochFilter" => format!(
                "{} >= extract(epoch from {from}) and {} <= extract(epoch from {to})",
                args[0], args[0]
            ),
            other => panic!("Grafana macro $__{other} not known to this test: {sql}"),
        };
        out.replace_range(at..end, &expansion);
    }
    for (name, values) in vars {
        let quoted: Vec<String> = values
            .iter()
            .map(|v| format!("'{}'", v.replace('\'', "''")))
            .collect();
        out = out
            .replace(&format!("${{{name}}}"), &quoted.join(","))
            .replace(&format!("${name}"), &quoted.join(","));
    }
    assert!(!out.contains('$'), "an unknown variable in {sql}");
    out
}

/// A Prometheus server of its own, killed when dropped (a failing test included).
struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[(&str, SocketAddr)]) -> Prometheus {
        let bin = std::env::var("TALLY_PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run Prometheus ({bin}): {e}. Install Debian's package \
                     (apt-get install prometheus) or set TALLY_PROMETHEUS_BIN; tests/run.sh does both"
                )
            });
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until every target was scraped healthy, then for `scrapes` more scrape rounds.
    async fn wait_scraped(&mut self, http: &reqwest::Client, targets: usize, scrapes: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("Prometheus exited ({status}):\n{}", self.log());
            }
            let up = match http
                .get(format!("{}/api/v1/targets", self.url))
                .send()
                .await
            {
                Ok(r) => {
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    let active = v["data"]["activeTargets"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    active.len() == targets && active.iter().all(|t| t["health"] == "up")
                }
                Err(_) => false,
            };
            if up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus never scraped every target:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Rates need two samples after the traffic's counters appeared.
        tokio::time::sleep(Duration::from_millis(1100) * scrapes).await;
    }

    async fn query(&self, http: &reqwest::Client, expr: &str) -> Value {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", self.url)).unwrap();
        url.query_pairs_mut().append_pair("query", expr);
        let r = http.get(url).send().await.unwrap();
        r.json().await.unwrap()
    }
}

/// Values of each dashboard variable: its SQL query's rows (asserting it returns some).
async fn sql_variables(pool: &PgPool) -> BTreeMap<String, Vec<String>> {
    let mut vars = BTreeMap::new();
    for (file, d) in dashboards() {
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap().to_string();
            assert_eq!(v["type"], "query", "{file}: variable {name} is not a query");
            assert_eq!(
                v["datasource"]["uid"], POSTGRES_UID,
                "{file}: variable {name}: only SQL variables are known to this test"
            );
            let sql = v["query"]
                .as_str()
                .or_else(|| v["query"]["rawSql"].as_str())
                .unwrap();
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .fetch_all(pool)
                .await
                .unwrap_or_else(|e| panic!("{file}: variable {name}: {e}\n{sql}"));
            assert!(!rows.is_empty(), "{file}: variable {name} has no values");
            let values = rows.iter().map(|r| r.get::<String, _>(0)).collect();
            vars.insert(name, values);
        }
    }
    vars
}

#[test]
fn provisioning_names_the_datasources_the_dashboards_use() {
    let text =
        std::fs::read_to_string(dashboards_dir().join("provisioning/datasources/tally.yaml"))
            .unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let provisioned: BTreeMap<String, String> = doc["datasources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["uid"].as_str().unwrap().to_string(),
                d["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        provisioned.get(PROMETHEUS_UID).map(String::as_str),
        Some("prometheus")
    );
    assert_eq!(
        provisioned.get(POSTGRES_UID).map(String::as_str),
        Some("postgres")
    );
    let text = std::fs::read_to_string(dashboards_dir().join("provisioning/dashboards/tally.yaml"))
        .unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    assert_eq!(doc["providers"][0]["type"].as_str(), Some("file"));
    let (promql, sql) = queries();
    assert!(promql.len() >= 15, "{} PromQL expressions", promql.len());
    assert!(sql.len() >= 12, "{} SQL panels", sql.len());
    let mut uids = std::collections::BTreeSet::new();
    for (file, d) in dashboards() {
        let uid = d["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no uid"));
        assert!(uids.insert(uid.to_string()), "{file}: uid {uid} used twice");
        let mut ids = std::collections::BTreeSet::new();
        for p in panels(&d) {
            assert!(
                ids.insert(p["id"].as_i64().unwrap()),
                "{file}: panel id twice"
            );
        }
    }
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn every_dashboard_query_returns_data(pool: PgPool) {
    let live = common::live_stack(&pool, |_, _| {}).await;
    every_query_returns_data(live, pool, false).await;
}

/// The same through Kafka, where the spool, consumer-lag, dead-letter and propagation panels
/// show the pipeline's own series rather than their zero start values.
#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn every_dashboard_query_returns_data_through_kafka(pool: PgPool) {
    let spool = tempfile::tempdir().unwrap();
    let live =
        common::live_stack_with(&pool, Some(common::kafka_settings(spool.path())), |_, _| {}).await;
    every_query_returns_data(live, pool, true).await;
}

async fn every_query_returns_data(live: common::LiveStack, pool: PgPool, kafka: bool) {
    let ledger_addr = live.stack.ledger_addr.unwrap();
    let gateway_addr = live.stack.gateway_addr.unwrap();
    // Started before the traffic, so counters are seen to rise.
    let mut prometheus = Prometheus::start(&[
        ("tally-ledger", ledger_addr),
        ("tally-gateway", gateway_addr),
    ]);
    let http = reqwest::Client::new();
    prometheus.wait_scraped(&http, 2, 0).await;
    traffic::serve(&live.ledger, &live.gateway, &live.mock, &pool).await;
    prometheus.wait_scraped(&http, 2, 3).await;

    let (promql, sql) = queries();
    let mut failures = Vec::new();
    for q in &promql {
        let expr = expand_promql(&q.text);
        let v = prometheus.query(&http, &expr).await;
        let result = v["data"]["result"].as_array();
        if v["status"] != "success" || result.is_none_or(Vec::is_empty) {
            failures.push(format!("{} / {:?}: {expr}\n  -> {v}", q.dashboard, q.panel));
        }
    }
    // The scrape reached both listeners: the same series under each job.
    for job in ["tally-ledger", "tally-gateway"] {
        let v = prometheus
            .query(
                &http,
                &format!("sum(tally_gateway_requests_total{{job=\"{job}\"}})"),
            )
            .await;
        let n: f64 = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        assert!(n > 0.0, "{job}: no requests seen: {v}");
    }

    if kafka {
        // Decisions came back over the decisions topic and were timed.
        let v = prometheus
            .query(&http, "sum(tally_decision_propagation_seconds_count)")
            .await;
        let n: f64 = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        assert!(n > 0.0, "no decision propagation observed: {v}");
    }

    let vars = sql_variables(&pool).await;
    for q in &sql {
        let expanded = expand_sql(&q.text, &vars);
        match sqlx::query(sqlx::AssertSqlSafe(expanded.clone()))
            .fetch_all(&pool)
            .await
        {
            Ok(rows) if rows.is_empty() => failures.push(format!(
                "{} / {:?}: no rows\n{expanded}",
                q.dashboard, q.panel
            )),
            Ok(_) => {}
            Err(e) => failures.push(format!("{} / {:?}: {e}\n{expanded}", q.dashboard, q.panel)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries failed:\n{}",
        failures.len(),
        promql.len() + sql.len(),
        failures.join("\n\n")
    );
    drop(prometheus);
    live.stack.stop().await.unwrap();
}
