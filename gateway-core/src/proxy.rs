//! The proxy: authenticate, resolve model candidates, choose credentials (attached → BYOK →
//! managed), enforce credits for managed keys, forward with failover, and meter every attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tally_ledger::event::{TokenCounts, TokenSource, Usage};
use tally_ledger::{CredentialKind, Event, EventBody};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::catalog::{self, ApiShape};
use crate::config::GatewayConfig;
use crate::decisions::DecisionCache;
use crate::egress::{EgressPolicy, GuardedResolver};
use crate::error::GatewayError;
use crate::metrics::{GlobalMetrics, ModelMetrics};
use crate::routes::CredentialChoice;
use crate::sink::EventSink;
use crate::strategy::{AUTO_MODEL, CandidateInfo, PreparedCache, Strategies, auto_candidates};
use crate::telemetry;
use crate::tokens;

/// The endpoint a request reaches when its path names none.
pub const DEFAULT_ENDPOINT: &str = "default";
/// Anthropic's API requires a version header; used when the client sends none.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";
/// Local metrics older than this are re-summarised before strategies read them.
const METRICS_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);
/// Request bodies larger than this are refused before parsing.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
/// SSE events buffered between upstream and a slow client.
const STREAM_BUFFER_EVENTS: usize = 64;

/// Who is calling: the verified gateway API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account_id: String,
    pub endpoint_id: String,
    pub api_key_id: String,
}

pub trait Authenticator: Send + Sync + std::fmt::Debug {
    /// Verifies a gateway token for an endpoint. Must do no IO: the request path is in memory.
    fn verify(&self, token: &str, endpoint_id: &str) -> Result<Caller, GatewayError>;
}

/// A provider key ready to use, decrypted in memory. Held by `Arc` so a rotation or removal
/// never changes the key of a request already in flight.
pub type UpstreamKey = crate::keys::Credential;

/// A customer's own OpenAI- or Anthropic-compatible server; BYOK only.
#[derive(Debug, Clone)]
pub struct CustomProvider {
    pub base_url: String,
    pub shape: ApiShape,
}

pub trait CredentialSource: Send + Sync + std::fmt::Debug {
    /// The customer's keys for `provider` in lookup order: attached keys of `api_key_id`
    /// (most recently attached first), or else the account's BYOK keys in list order.
    fn credentials_for(
        &self,
        account_id: &str,
        api_key_id: &str,
        provider: &str,
    ) -> Vec<Arc<UpstreamKey>>;
    fn custom_provider(&self, account_id: &str, provider: &str) -> Option<CustomProvider>;
    /// The account's BYOK failure policy: `false` (strict, the default) never uses managed keys
    /// for a provider the customer has keys for.
    fn byok_fallback_to_managed(&self, _account_id: &str) -> bool {
        false
    }
    /// The account's route of this logical model name, if it has one.
    fn route(&self, _account_id: &str, _name: &str) -> Option<Arc<crate::routes::Route>> {
        None
    }
}

pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

#[derive(Debug)]
pub struct Gateway {
    pub config: GatewayConfig,
    pub auth: Arc<dyn Authenticator>,
    pub credentials: Arc<dyn CredentialSource>,
    pub decisions: Arc<DecisionCache>,
    pub sink: Arc<dyn EventSink>,
    http: reqwest::Client,
    /// For custom providers only: resolves through the egress guard.
    custom_http: reqwest::Client,
    egress: Arc<EgressPolicy>,
    managed: Vec<(String, Vec<Arc<UpstreamKey>>)>,
    clock: ClockBox,
    /// Model selection strategies, compiled once when the gateway is built.
    strategies: Strategies,
    /// This gateway's own observations per provider and model (`m.metrics.local.*`).
    pub local_metrics: Arc<ModelMetrics>,
    /// The fleet-wide feed (`m.metrics.global.*`).
    pub global_metrics: Arc<GlobalMetrics>,
    /// Prepared `ai.models` for `tally/auto`, per API shape.
    auto_openai: PreparedCache,
    auto_anthropic: PreparedCache,
    /// Every request's attempts and every stream's forwarding: they can outlive the HTTP
    /// exchange (a client that hung up), and their usage must reach the sink before it stops.
    tasks: TaskTracker,
}

struct ClockBox(Clock);

impl std::fmt::Debug for ClockBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        auth: Arc<dyn Authenticator>,
        credentials: Arc<dyn CredentialSource>,
        decisions: Arc<DecisionCache>,
        sink: Arc<dyn EventSink>,
        clock: Clock,
    ) -> Result<Gateway, crate::config::GatewayConfigError> {
        config.validate()?;
        let managed = config
            .managed_keys
            .iter()
            .map(|(provider, keys)| {
                let keys = keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        Arc::new(UpstreamKey {
                            credential_id: format!("managed-{provider}-{}", i + 1),
                            account_id: String::new(),
                            provider: provider.clone(),
                            kind: CredentialKind::Managed,
                            api_key_id: None,
                            masked: crate::secrets::mask(k.expose_secret()),
                            api_key: k.clone(),
                        })
                    })
                    .collect();
                (provider.clone(), keys)
            })
            .collect();
        // Redirects are not followed: a provider answering with one is an error, and
        // following it could carry a key to an address nobody vetted.
        let client_error = |e: reqwest::Error| crate::config::GatewayConfigError::Invalid {
            field: "http client".into(),
            reason: e.to_string(),
        };
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(256)
            .build()
            .map_err(client_error)?;
        let egress = Arc::new(
            EgressPolicy::new(&config.custom_provider_allowlist).map_err(|e| {
                crate::config::GatewayConfigError::Invalid {
                    field: "custom_provider_allowlist".into(),
                    reason: e.to_string(),
                }
            })?,
        );
        let custom_http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver(Arc::clone(&egress))))
            .build()
            .map_err(client_error)?;
        let strategies = Strategies::compile(&config.strategies).map_err(|e| {
            crate::config::GatewayConfigError::Invalid {
                field: "strategies".into(),
                reason: e.to_string(),
            }
        })?;
        Ok(Gateway {
            strategies,
            local_metrics: Arc::new(ModelMetrics::new()),
            global_metrics: Arc::new(GlobalMetrics::new()),
            auto_openai: PreparedCache::new(),
            auto_anthropic: PreparedCache::new(),
            custom_http,
            egress,
            config,
            auth,
            credentials,
            decisions,
            sink,
            http,
            managed,
            clock: ClockBox(clock),
            tasks: TaskTracker::new(),
        })
    }

    /// For shutdown, once the server has stopped taking requests: waits up to `timeout` for the
    /// requests' upstream attempts and streams still running, so the usage they meter is in the
    /// sink before the sink stops. Returns how many were still running at the timeout.
    pub async fn wait_for_in_flight(&self, timeout: Duration) -> usize {
        self.tasks.close();
        match tokio::time::timeout(timeout, self.tasks.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tasks.len(),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        (self.clock.0)()
    }

    fn managed_keys(&self, provider: &str) -> &[Arc<UpstreamKey>] {
        self.managed
            .iter()
            .find(|(p, _)| p == provider)
            .map(|(_, k)| k.as_slice())
            .unwrap_or(&[])
    }
}

/// The outcome of checking a provider key against its provider.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyCheck {
    pub provider: String,
    /// `valid`, `invalid` (the provider refused the key) or `unreachable`.
    pub result: &'static str,
    /// The provider's HTTP status, when it answered.
    pub status: Option<u16>,
}

/// How long a key check may wait for the provider.
pub const KEY_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

impl Gateway {
    /// Lists the provider's models with `key`, through the same base URLs and egress guard as
    /// traffic. `Err` names why the provider cannot be checked at all.
    pub async fn check_key(
        &self,
        account_id: &str,
        provider: &str,
        key: &SecretString,
    ) -> Result<KeyCheck, String> {
        let (base, shape, client) = match catalog::provider(provider) {
            Some(p) => (
                self.config
                    .base_url(provider)
                    .unwrap_or_else(|| p.base_url.to_string()),
                p.shape,
                &self.http,
            ),
            None => match self.credentials.custom_provider(account_id, provider) {
                Some(c) => {
                    crate::egress::check_url(&self.egress, &c.base_url)?;
                    (c.base_url, c.shape, &self.custom_http)
                }
                None => return Err(format!("unknown provider '{provider}'")),
            },
        };
        let url = format!("{}/models", base.trim_end_matches('/'));
        let req = match shape {
            ApiShape::OpenAi => client.get(url).bearer_auth(key.expose_secret()),
            ApiShape::Anthropic => client
                .get(url)
                .header("x-api-key", key.expose_secret())
                .header("anthropic-version", DEFAULT_ANTHROPIC_VERSION),
        };
        let answered = tokio::time::timeout(KEY_CHECK_TIMEOUT, req.send()).await;
        let (result, status) = match answered {
            Ok(Ok(r)) => {
                let status = r.status().as_u16();
                let result = match status {
                    200..=299 => "valid",
                    401 | 403 => "invalid",
                    _ => "unreachable",
                };
                (result, Some(status))
            }
            Ok(Err(_)) | Err(_) => ("unreachable", None),
        };
        Ok(KeyCheck {
            provider: provider.to_string(),
            result,
            status,
        })
    }
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_default))
        .route("/v1/messages", post(messages_default))
        .route("/v1/models", get(models))
        .route("/e/{endpoint_id}/v1/chat/completions", post(chat_endpoint))
        .route("/e/{endpoint_id}/v1/messages", post(messages_endpoint))
        .route("/e/{endpoint_id}/v1/models", get(models_endpoint))
        .with_state(gateway)
}

async fn chat_default(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(
        gw,
        ApiShape::OpenAi,
        DEFAULT_ENDPOINT.to_string(),
        headers,
        body,
    )
    .await
}

async fn messages_default(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        gw,
        ApiShape::Anthropic,
        DEFAULT_ENDPOINT.to_string(),
        headers,
        body,
    )
    .await
}

async fn chat_endpoint(
    State(gw): State<Arc<Gateway>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(gw, ApiShape::OpenAi, endpoint, headers, body).await
}

async fn messages_endpoint(
    State(gw): State<Arc<Gateway>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(gw, ApiShape::Anthropic, endpoint, headers, body).await
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    list_models(&gw, DEFAULT_ENDPOINT, &headers)
}

async fn models_endpoint(
    State(gw): State<Arc<Gateway>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
) -> Response {
    list_models(&gw, &endpoint, &headers)
}

fn list_models(gw: &Gateway, endpoint: &str, headers: &HeaderMap) -> Response {
    let started = Instant::now();
    let response = models_response(gw, endpoint, headers);
    telemetry::observe_request(
        "models",
        response.status().as_u16(),
        started.elapsed(),
        &telemetry::Attempts::default(),
    );
    response
}

fn models_response(gw: &Gateway, endpoint: &str, headers: &HeaderMap) -> Response {
    if let Err(e) = bearer(headers).and_then(|t| gw.auth.verify(t, endpoint)) {
        telemetry::observe_denial(&e);
        return e.into_response_for(ApiShape::OpenAi);
    }
    let data: Vec<Value> = catalog::PROVIDERS
        .iter()
        .filter(|p| provider_allowed(&gw.config, p.id))
        .flat_map(|p| p.models.iter().filter(|m| model_allowed(&gw.config, p.id, m)).map(move |m| (p.id, *m)))
        .map(|(p, m)| json!({"id": format!("{p}:{m}"), "object": "model", "owned_by": p, "created": 0}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

fn bearer(headers: &HeaderMap) -> Result<&str, GatewayError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| GatewayError::Unauthenticated)?;
        return v
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or(GatewayError::Unauthenticated);
    }
    if let Some(v) = headers.get("x-api-key") {
        return v
            .to_str()
            .map(str::trim)
            .map_err(|_| GatewayError::Unauthenticated);
    }
    Err(GatewayError::Unauthenticated)
}

fn provider_allowed(config: &GatewayConfig, provider: &str) -> bool {
    !config.only_allow_configured_providers || config.configured_providers.contains_key(provider)
}

fn model_allowed(config: &GatewayConfig, provider: &str, model: &str) -> bool {
    !config.only_allow_configured_models
        || config
            .configured_providers
            .get(provider)
            .is_some_and(|models| models.contains(model))
}

/// A model to try: provider, the provider's own model name, and how to reach it.
#[derive(Debug, Clone)]
struct Candidate {
    provider: String,
    model: String,
    base_url: String,
    shape: ApiShape,
    custom: bool,
    /// Pinned by a route target; `Any` otherwise.
    choice: CredentialChoice,
}

/// The candidates of a request, in order: the `models` array when given, else `model`.
fn candidates(
    gw: &Gateway,
    caller: &Caller,
    body: &Value,
    client_shape: ApiShape,
) -> Result<Vec<Candidate>, GatewayError> {
    let mut names: Vec<String> = Vec::new();
    if let Some(list) = body.get("models") {
        let list = list
            .as_array()
            .ok_or_else(|| GatewayError::bad_request("models must be an array of model names"))?;
        for m in list {
            names.push(
                m.as_str()
                    .ok_or_else(|| {
                        GatewayError::bad_request("models must be an array of model names")
                    })?
                    .to_string(),
            );
        }
    }
    if names.is_empty() {
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| GatewayError::bad_request("model is required"))?;
        names.push(model.to_string());
    }
    let names = select_models(gw, names, client_shape);
    let mut out: Vec<Candidate> = Vec::new();
    let mut first_error = None;
    let mut expanded: Vec<(String, CredentialChoice)> = Vec::new();
    for name in names {
        match gw.credentials.route(&caller.account_id, &name) {
            Some(route) => {
                let roll: f64 = rand::random();
                expanded.extend(
                    route
                        .order(roll)
                        .into_iter()
                        .map(|t| (t.model.clone(), t.credential)),
                );
            }
            None => expanded.push((name, CredentialChoice::Any)),
        }
    }
    for (name, choice) in expanded {
        match resolve(gw, caller, &name, client_shape) {
            Ok(mut c) => {
                c.choice = choice;
                if !out
                    .iter()
                    .any(|o| o.provider == c.provider && o.model == c.model && o.choice == c.choice)
                {
                    out.push(c);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match (out.is_empty(), first_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

/// Applies the selection strategies: `tally/auto` becomes the catalog's models of this API
/// that the first matching strategy returns (all of them, in catalog order, when none does); a
/// client's `models` list is narrowed and reordered the same way, and kept as sent when no
/// strategy returns any of its models.
fn select_models(gw: &Gateway, names: Vec<String>, shape: ApiShape) -> Vec<String> {
    let local = gw.local_metrics.snapshot_cached(METRICS_SNAPSHOT_MAX_AGE);
    let global = gw.global_metrics.load();
    if names.len() == 1 && names[0] == AUTO_MODEL {
        let candidates = auto_candidates(&gw.config, shape);
        let cache = match shape {
            ApiShape::OpenAi => &gw.auto_openai,
            ApiShape::Anthropic => &gw.auto_anthropic,
        };
        let prepared = cache.get(&gw.strategies, &candidates, &local, &global);
        let chosen = gw
            .strategies
            .select_prepared(&prepared)
            .unwrap_or_else(|| (0..candidates.len()).collect());
        return chosen
            .into_iter()
            .filter_map(|i| candidates.get(i))
            .map(CandidateInfo::id)
            .collect();
    }
    if names.len() < 2 || gw.strategies.is_empty() {
        return names;
    }
    let candidates: Vec<CandidateInfo> = names
        .iter()
        .map(|n| match n.split_once(':') {
            Some((p, m)) => CandidateInfo::from_catalog(p, m),
            None => match catalog::provider_of_model(n) {
                Some(p) => CandidateInfo::from_catalog(p.id, n),
                None => CandidateInfo::from_catalog("", n),
            },
        })
        .collect();
    match gw.strategies.select(&candidates, &local, &global) {
        Some(chosen) if !chosen.is_empty() => chosen
            .into_iter()
            .filter_map(|i| names.get(i).cloned())
            .collect(),
        _ => names,
    }
}

/// Model names end up in events, logs and SQL text columns: printable and bounded only.
fn check_model_name(name: &str) -> Result<(), GatewayError> {
    if name.is_empty()
        || name.len() > tally_ledger::event::MAX_ID_LEN
        || name.chars().any(char::is_control)
    {
        return Err(GatewayError::bad_request(format!(
            "model names are 1 to {} printable characters",
            tally_ledger::event::MAX_ID_LEN
        )));
    }
    Ok(())
}

fn resolve(
    gw: &Gateway,
    caller: &Caller,
    name: &str,
    client_shape: ApiShape,
) -> Result<Candidate, GatewayError> {
    check_model_name(name)?;
    let (provider, model) = match name.split_once(':') {
        Some((p, m)) if !p.is_empty() && !m.is_empty() => (p.to_string(), m.to_string()),
        _ => match catalog::provider_of_model(name) {
            Some(p) => (p.id.to_string(), name.to_string()),
            // Without a prefix only catalog models can be placed.
            None => return Err(GatewayError::ModelUnknown(name.to_string())),
        },
    };
    let (base_url, shape, custom) = match catalog::provider(&provider) {
        Some(p) => {
            if !provider_allowed(&gw.config, &provider) {
                return Err(GatewayError::ProviderNotAllowed(provider));
            }
            (
                gw.config
                    .base_url(&provider)
                    .unwrap_or_else(|| p.base_url.to_string()),
                p.shape,
                false,
            )
        }
        None => match gw
            .credentials
            .custom_provider(&caller.account_id, &provider)
        {
            Some(c)
                if provider_allowed(&gw.config, &provider)
                    || gw.config.configured_providers.is_empty() =>
            {
                crate::egress::check_url(&gw.egress, &c.base_url).map_err(|reason| {
                    GatewayError::EgressRefused(format!("{provider}: {reason}"))
                })?;
                (c.base_url, c.shape, true)
            }
            _ => return Err(GatewayError::ProviderNotAllowed(provider)),
        },
    };
    if !model_allowed(&gw.config, &provider, &model) {
        return Err(GatewayError::ModelUnknown(name.to_string()));
    }
    if shape != client_shape {
        return Err(GatewayError::bad_request(match client_shape {
            ApiShape::OpenAi => {
                format!("{provider}:{model} speaks the Anthropic API; send it to /v1/messages")
            }
            ApiShape::Anthropic => {
                format!("{provider}:{model} speaks the OpenAI API; send it to /v1/chat/completions")
            }
        }));
    }
    Ok(Candidate {
        provider,
        model,
        base_url,
        shape,
        custom,
        choice: CredentialChoice::Any,
    })
}

/// What one request is doing: shared by its attempts.
struct RequestCtx {
    caller: Caller,
    request_id: String,
    stream: bool,
    client_wants_usage: bool,
    started: Instant,
    deadline: Instant,
    body: Value,
    headers: HeaderMap,
}

enum AttemptOutcome {
    /// A response for the client (success, or an error that is the client's own).
    Done(Response),
    /// Try the next key or model.
    Failover(GatewayError),
}

async fn handle(
    gw: Arc<Gateway>,
    shape: ApiShape,
    endpoint: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The request's span continues the client's trace when it sent one; its context travels
    // with every usage event (Kafka headers) into the ingest span.
    let span = tracing::info_span!("gateway.request", api = ?shape, endpoint = %endpoint);
    crate::trace::continue_from_headers(&span, &headers);
    // On its own task: a client that hangs up while the provider works must not cancel the
    // attempt half-way, or an upstream call the provider bills would go unmetered.
    let started = Instant::now();
    let tasks = gw.tasks.clone();
    let task = tasks.spawn(
        async move {
            let mut attempts = telemetry::Attempts::default();
            let answer = handle_inner(&gw, shape, endpoint, headers, body, &mut attempts).await;
            (answer, attempts)
        }
        .instrument(span),
    );
    let (response, attempts) = match task.await {
        Ok((Ok(r), attempts)) => (r, attempts),
        Ok((Err(e), attempts)) => {
            telemetry::observe_denial(&e);
            (e.into_response_for(shape), attempts)
        }
        Err(_) => (
            GatewayError::Upstream {
                status: 500,
                message: "internal error".into(),
            }
            .into_response_for(shape),
            telemetry::Attempts::default(),
        ),
    };
    let api = match shape {
        ApiShape::OpenAi => "openai",
        ApiShape::Anthropic => "anthropic",
    };
    telemetry::observe_request(
        api,
        response.status().as_u16(),
        started.elapsed(),
        &attempts,
    );
    response
}

async fn handle_inner(
    gw: &Arc<Gateway>,
    shape: ApiShape,
    endpoint: String,
    headers: HeaderMap,
    body: Bytes,
    attempts: &mut telemetry::Attempts,
) -> Result<Response, GatewayError> {
    let started = Instant::now();
    let caller = gw.auth.verify(bearer(&headers)?, &endpoint)?;
    if body.len() > MAX_REQUEST_BYTES {
        return Err(GatewayError::bad_request(format!(
            "request body exceeds {MAX_REQUEST_BYTES} bytes"
        )));
    }
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| GatewayError::bad_request(format!("invalid JSON: {e}")))?;
    if !body.is_object() {
        return Err(GatewayError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let candidates = candidates(gw, &caller, &body, shape)?;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let client_wants_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ctx = RequestCtx {
        caller,
        request_id: format!("req_{}", Uuid::new_v4().simple()),
        stream,
        client_wants_usage,
        started,
        deadline: started + gw.config.total_timeout,
        body,
        headers,
    };
    let mut attempt = 0u32;
    let mut last_error: Option<GatewayError> = None;
    let mut denied_for_credits = false;
    let mut denied_for_metering = false;
    // A route and a plain name may both lead to the same model and key: never try one twice.
    let mut tried: std::collections::HashSet<(String, String, String)> =
        std::collections::HashSet::new();
    'candidates: for cand in &candidates {
        let keys: Vec<Arc<UpstreamKey>> = {
            let customer = gw.credentials.credentials_for(
                &ctx.caller.account_id,
                &ctx.caller.api_key_id,
                &cand.provider,
            );
            let (customer, managed_allowed) = match cand.choice {
                CredentialChoice::Any => {
                    let fallback = customer.is_empty()
                        || gw
                            .credentials
                            .byok_fallback_to_managed(&ctx.caller.account_id);
                    (customer, !cand.custom && fallback)
                }
                CredentialChoice::Byok => (customer, false),
                CredentialChoice::Managed => (Vec::new(), !cand.custom),
            };
            let mut keys = customer;
            if managed_allowed && !gw.managed_keys(&cand.provider).is_empty() {
                if !gw.sink.accepts_managed() {
                    // Usage on the operator's keys that could not be metered: refuse it.
                    denied_for_metering |= keys.is_empty();
                } else if gw.decisions.allow_managed(&ctx.caller.account_id, gw.now()) {
                    keys.extend(gw.managed_keys(&cand.provider).iter().cloned());
                } else if keys.is_empty() {
                    denied_for_credits = true;
                }
            }
            keys
        };
        if keys.is_empty() && !denied_for_credits && !denied_for_metering {
            last_error.get_or_insert(GatewayError::NoCredentials(cand.provider.clone()));
        }
        for key in keys {
            if !tried.insert((
                cand.provider.clone(),
                cand.model.clone(),
                key.credential_id.clone(),
            )) {
                continue;
            }
            if Instant::now() >= ctx.deadline {
                last_error = Some(GatewayError::Timeout);
                break 'candidates;
            }
            attempt += 1;
            let attempt_started = Instant::now();
            let outcome = try_once(gw, &ctx, cand, &key, attempt).await;
            attempts.record(
                &cand.provider,
                &cand.model,
                key.kind,
                attempt_started.elapsed(),
            );
            match outcome {
                AttemptOutcome::Done(r) => return Ok(r),
                AttemptOutcome::Failover(e) => {
                    telemetry::observe_failover(&cand.provider, &e);
                    tracing::info!(request_id = %ctx.request_id, provider = %cand.provider, model = %cand.model,
                        credential_kind = key.kind.as_str(), attempt, error = %e, "attempt failed; failing over");
                    last_error = Some(e);
                }
            }
        }
    }
    if attempt == 0 && denied_for_metering {
        return Err(GatewayError::MeteringUnavailable);
    }
    if attempt == 0 && denied_for_credits {
        return Err(GatewayError::CreditsExhausted);
    }
    Err(last_error.unwrap_or(GatewayError::Timeout))
}

fn upstream_request(
    gw: &Gateway,
    ctx: &RequestCtx,
    cand: &Candidate,
    key: &UpstreamKey,
) -> reqwest::RequestBuilder {
    let mut body = ctx.body.clone();
    if let Some(obj) = body.as_object_mut() {
        obj.insert("model".into(), Value::String(cand.model.clone()));
        obj.remove("models");
        if ctx.stream && cand.shape == ApiShape::OpenAi {
            // Ask for the usage chunk so streams are billed from provider counts.
            obj.insert("stream_options".into(), json!({"include_usage": true}));
        }
    }
    let base = cand.base_url.trim_end_matches('/');
    let client = if cand.custom {
        &gw.custom_http
    } else {
        &gw.http
    };
    let req = match cand.shape {
        ApiShape::OpenAi => client
            .post(format!("{base}/chat/completions"))
            .bearer_auth(key.api_key.expose_secret()),
        ApiShape::Anthropic => {
            let version = ctx
                .headers
                .get("anthropic-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or(DEFAULT_ANTHROPIC_VERSION)
                .to_string();
            let mut r = client
                .post(format!("{base}/messages"))
                .header("x-api-key", key.api_key.expose_secret())
                .header("anthropic-version", version);
            if let Some(beta) = ctx
                .headers
                .get("anthropic-beta")
                .and_then(|v| v.to_str().ok())
            {
                r = r.header("anthropic-beta", beta.to_string());
            }
            r
        }
    };
    req.json(&body)
}

/// Whether a status moves on to the next key or model: a dead key, a rate limit, or a
/// provider failure. Other client errors are the client's to see.
fn is_failover_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 408 | 429) || status >= 500
}

async fn try_once(
    gw: &Arc<Gateway>,
    ctx: &RequestCtx,
    cand: &Candidate,
    key: &Arc<UpstreamKey>,
    attempt: u32,
) -> AttemptOutcome {
    let attempt_at = gw.now();
    let attempt_started = Instant::now();
    let remaining = ctx.deadline.saturating_duration_since(attempt_started);
    let limit = gw.config.per_request_timeout.min(remaining);
    let meter = Meter {
        gw: Arc::clone(gw),
        caller: ctx.caller.clone(),
        request_id: ctx.request_id.clone(),
        attempt,
        at: attempt_at,
        provider: cand.provider.clone(),
        model: cand.model.clone(),
        key: Arc::clone(key),
        started: ctx.started,
        attempt_started,
        streaming: ctx.stream,
    };
    let sent = tokio::time::timeout(limit, upstream_request(gw, ctx, cand, key).send()).await;
    let resp = match sent {
        Err(_) => {
            meter.emit(504, TokenCounts::default(), TokenSource::Estimate);
            return AttemptOutcome::Failover(GatewayError::Timeout);
        }
        Ok(Err(e)) => {
            meter.emit(502, TokenCounts::default(), TokenSource::Estimate);
            // reqwest's error text may carry the URL but never headers, so no key leaks.
            return AttemptOutcome::Failover(GatewayError::Upstream {
                status: 502,
                message: format!("{} unreachable: {}", cand.provider, without_url(&e)),
            });
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status().as_u16();
    if is_failover_status(status) {
        let _ = tokio::time::timeout(Duration::from_secs(1), resp.bytes()).await;
        meter.emit(status, TokenCounts::default(), TokenSource::Estimate);
        return AttemptOutcome::Failover(GatewayError::Upstream {
            status,
            message: format!("{} answered {status}", cand.provider),
        });
    }
    if !(200..300).contains(&status) || !ctx.stream {
        let rest = limit.saturating_sub(attempt_started.elapsed());
        let bytes = match tokio::time::timeout(rest, resp.bytes()).await {
            Ok(Ok(b)) => b,
            failed => {
                // The provider answered and may bill the call even though its body never
                // arrived whole: meter the prompt estimate rather than nothing.
                let tokens = if (200..300).contains(&status) {
                    TokenCounts {
                        input: tokens::estimate_prompt(&cand.model, &ctx.body),
                        ..TokenCounts::default()
                    }
                } else {
                    TokenCounts::default()
                };
                let (code, err) = match failed {
                    Err(_) => (504, GatewayError::Timeout),
                    Ok(_) => (
                        502,
                        GatewayError::Upstream {
                            status: 502,
                            message: format!("{} broke off its answer", cand.provider),
                        },
                    ),
                };
                meter.emit(code, tokens, TokenSource::Estimate);
                return AttemptOutcome::Failover(err);
            }
        };
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        let (tokens, source) = if (200..300).contains(&status) {
            usage_of_response(cand, &ctx.body, parsed.as_ref())
        } else {
            (TokenCounts::default(), TokenSource::Estimate)
        };
        meter.emit(status, tokens, source);
        let mut r = Response::new(Body::from(bytes));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r.headers_mut()
            .insert("x-tally-request-id", header_value(&ctx.request_id));
        return AttemptOutcome::Done(r);
    }
    AttemptOutcome::Done(stream_response(resp, ctx, cand, meter))
}

/// A short reason for a failed upstream call. reqwest's text may name the URL, never headers,
/// but the reason is all the client needs.
fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        "request failed".into()
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Everything needed to meter one attempt, moved into the stream task for streams.
struct Meter {
    gw: Arc<Gateway>,
    caller: Caller,
    request_id: String,
    attempt: u32,
    at: DateTime<Utc>,
    provider: String,
    model: String,
    key: Arc<UpstreamKey>,
    started: Instant,
    attempt_started: Instant,
    streaming: bool,
}

impl Meter {
    fn emit(&self, status: u16, tokens: TokenCounts, token_source: TokenSource) {
        let upstream_ms =
            u64::try_from(self.attempt_started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.gw.local_metrics.record(
            &self.provider,
            &self.model,
            upstream_ms,
            (200..300).contains(&status),
            tokens.output + tokens.reasoning,
        );
        telemetry::observe_tokens(&self.provider, &self.model, self.key.kind, &tokens);
        let total_ms = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(upstream_ms);
        let event = Event {
            event_id: Uuid::new_v4(),
            occurred_at: self.at,
            account_id: self.caller.account_id.clone(),
            body: EventBody::Usage(Usage {
                request_id: self.request_id.clone(),
                attempt: self.attempt,
                endpoint_id: self.caller.endpoint_id.clone(),
                api_key_id: self.caller.api_key_id.clone(),
                provider: self.provider.clone(),
                model: self.model.clone(),
                credential_kind: self.key.kind,
                credential_id: self.key.credential_id.clone(),
                tokens,
                token_source,
                upstream_latency_ms: upstream_ms,
                total_latency_ms: total_ms,
                status,
                streaming: self.streaming,
            }),
        };
        self.gw.sink.send(event);
    }
}

fn as_i64(v: Option<&Value>) -> i64 {
    v.and_then(Value::as_i64).unwrap_or(0).max(0)
}

/// Disjoint token classes from OpenAI's usage object (cached ⊂ prompt, reasoning ⊂ completion).
fn openai_usage(u: &Value) -> TokenCounts {
    let prompt = as_i64(u.get("prompt_tokens"));
    let cached = as_i64(u.pointer("/prompt_tokens_details/cached_tokens")).min(prompt);
    let completion = as_i64(u.get("completion_tokens"));
    let reasoning =
        as_i64(u.pointer("/completion_tokens_details/reasoning_tokens")).min(completion);
    TokenCounts {
        input: prompt - cached,
        cached_input: cached,
        output: completion - reasoning,
        reasoning,
    }
}

/// Anthropic's input_tokens already excludes cache reads; cache writes are billed as input.
fn anthropic_usage(u: &Value) -> TokenCounts {
    TokenCounts {
        input: as_i64(u.get("input_tokens")) + as_i64(u.get("cache_creation_input_tokens")),
        cached_input: as_i64(u.get("cache_read_input_tokens")),
        output: as_i64(u.get("output_tokens")),
        reasoning: 0,
    }
}

fn usage_of_response(
    cand: &Candidate,
    request: &Value,
    response: Option<&Value>,
) -> (TokenCounts, TokenSource) {
    let reported = response
        .and_then(|r| r.get("usage"))
        .filter(|u| u.is_object());
    if let Some(u) = reported {
        let t = match cand.shape {
            ApiShape::OpenAi => openai_usage(u),
            ApiShape::Anthropic => anthropic_usage(u),
        };
        return (t, TokenSource::Provider);
    }
    let text = response
        .map(|r| response_text(cand.shape, r))
        .unwrap_or_default();
    (
        TokenCounts {
            input: tokens::estimate_prompt(&cand.model, request),
            output: tokens::count(&cand.model, &text),
            ..TokenCounts::default()
        },
        TokenSource::Estimate,
    )
}

fn response_text(shape: ApiShape, r: &Value) -> String {
    match shape {
        ApiShape::OpenAi => r
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        ApiShape::Anthropic => r
            .get("content")
            .and_then(Value::as_array)
            .map(|parts| {
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("")
            })
            .unwrap_or_default(),
    }
}

/// What a stream has shown so far, for metering when it ends or breaks.
#[derive(Default)]
struct StreamTally {
    reported: Option<TokenCounts>,
    anthropic_input: Option<Value>,
    text: String,
}

impl StreamTally {
    /// Reads one SSE event; returns false when the event is a usage-only chunk the client did
    /// not ask for.
    fn observe(&mut self, shape: ApiShape, data: &str, client_wants_usage: bool) -> bool {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return true;
        };
        match shape {
            ApiShape::OpenAi => {
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    self.reported = Some(openai_usage(u));
                    let only_usage = v
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty);
                    if only_usage && !client_wants_usage {
                        return false;
                    }
                }
                if let Some(t) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    self.text.push_str(t);
                }
            }
            ApiShape::Anthropic => match v.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    self.anthropic_input = v.pointer("/message/usage").cloned()
                }
                Some("content_block_delta") => {
                    if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
                        self.text.push_str(t);
                    }
                }
                Some("message_delta") => {
                    let mut u = self.anthropic_input.clone().unwrap_or_else(|| json!({}));
                    if let (Some(obj), Some(out)) =
                        (u.as_object_mut(), v.pointer("/usage/output_tokens"))
                    {
                        obj.insert("output_tokens".into(), out.clone());
                    }
                    self.reported = Some(anthropic_usage(&u));
                }
                _ => {}
            },
        }
        true
    }

    fn tokens(&self, model: &str, request: &Value) -> (TokenCounts, TokenSource) {
        match self.reported {
            Some(t) => (t, TokenSource::Provider),
            None => (
                TokenCounts {
                    input: tokens::estimate_prompt(model, request),
                    output: tokens::count(model, &self.text),
                    ..TokenCounts::default()
                },
                TokenSource::Estimate,
            ),
        }
    }
}

fn stream_response(
    resp: reqwest::Response,
    ctx: &RequestCtx,
    cand: &Candidate,
    meter: Meter,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(STREAM_BUFFER_EVENTS);
    let shape = cand.shape;
    let wants_usage = ctx.client_wants_usage;
    let request = ctx.body.clone();
    let model = cand.model.clone();
    let span = tracing::Span::current();
    let tasks = meter.gw.tasks.clone();
    tasks.spawn(
        async move {
            let mut events = resp.bytes_stream().eventsource();
            let mut tally = StreamTally::default();
            let mut status = 200u16;
            while let Some(next) = events.next().await {
                match next {
                    Ok(ev) => {
                        if ev.data != "[DONE]" && !tally.observe(shape, &ev.data, wants_usage) {
                            continue;
                        }
                        let mut frame = String::with_capacity(ev.data.len() + 16);
                        if !ev.event.is_empty() && ev.event != "message" {
                            frame.push_str("event: ");
                            frame.push_str(&ev.event);
                            frame.push('\n');
                        }
                        for line in ev.data.split('\n') {
                            frame.push_str("data: ");
                            frame.push_str(line);
                            frame.push('\n');
                        }
                        frame.push('\n');
                        if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                            // The client went away: bill what was produced so far.
                            status = 499;
                            break;
                        }
                    }
                    Err(_) => {
                        // The upstream broke mid-stream; the client sees the stream end early.
                        status = 502;
                        let _ = tx
                            .send(Err(std::io::Error::other("upstream stream aborted")))
                            .await;
                        break;
                    }
                }
            }
            let (tokens, source) = tally.tokens(&model, &request);
            meter.emit(status, tokens, source);
        }
        .instrument(span),
    );
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r.headers_mut()
        .insert("x-tally-request-id", header_value(&ctx.request_id));
    r
}

/// The key ring is the production [`Authenticator`]: verification in memory, and the key's use
/// recorded in memory for the periodic `last_used_at` flush.
impl Authenticator for crate::keys::KeyRing {
    fn verify(&self, token: &str, endpoint_id: &str) -> Result<Caller, GatewayError> {
        match crate::keys::KeyRing::verify(self, token, endpoint_id) {
            Ok(k) => {
                self.touch(&k.key_id, Utc::now());
                Ok(Caller {
                    account_id: k.account_id.to_string(),
                    endpoint_id: k.endpoint_id.to_string(),
                    api_key_id: k.key_id.to_string(),
                })
            }
            Err(crate::keys::AuthError::WrongEndpoint) => Err(GatewayError::WrongEndpoint),
            Err(_) => Err(GatewayError::Unauthenticated),
        }
    }
}

impl CredentialSource for crate::keys::KeyRing {
    fn route(&self, account_id: &str, name: &str) -> Option<Arc<crate::routes::Route>> {
        crate::keys::KeyRing::route(self, account_id, name)
    }

    fn byok_fallback_to_managed(&self, account_id: &str) -> bool {
        crate::keys::KeyRing::byok_fallback_to_managed(self, account_id)
    }

    fn credentials_for(
        &self,
        account_id: &str,
        api_key_id: &str,
        provider: &str,
    ) -> Vec<Arc<UpstreamKey>> {
        crate::keys::KeyRing::credentials_for(self, account_id, Some(api_key_id), provider)
    }

    fn custom_provider(&self, account_id: &str, provider: &str) -> Option<CustomProvider> {
        crate::keys::KeyRing::custom_provider(self, account_id, provider).map(|c| CustomProvider {
            base_url: c.base_url.to_string(),
            shape: c.api_shape,
        })
    }
}

#[cfg(test)]
mod tests_tls {
    /// Real providers are https; a client built without TLS would refuse the scheme outright.
    #[tokio::test]
    async fn the_upstream_client_speaks_https() {
        let client = reqwest::Client::builder().build().unwrap();
        let err = client.get("https://127.0.0.1:9/").send().await.unwrap_err();
        assert!(!err.is_builder(), "https must be supported: {err}");
    }
}
