//! A mock upstream LLM provider for tests, benchmarks and the demo, so nothing has to reach the
//! internet.
//!
//! It speaks enough of two APIs for the gateway to be exercised end to end:
//!
//! * **OpenAI**: `POST /v1/chat/completions` (auth `Authorization: Bearer <key>`), streaming
//!   (SSE, `data: {chunk}` … `data: [DONE]`, with a final usage chunk only when the request has
//!   `stream_options.include_usage: true`) and not; `GET /v1/models`.
//! * **Anthropic**: `POST /v1/messages` (auth `x-api-key: <key>`; `anthropic-version` accepted,
//!   not required), streaming (`message_start`, `content_block_start`, `ping`,
//!   `content_block_delta`…, `content_block_stop`, `message_delta`, `message_stop`) and not.
//!   `GET /v1/models` with `x-api-key` (and no `Authorization`) answers in Anthropic's shape.
//!
//! Errors come in each API's own shape: OpenAI `{"error":{"message","type","param","code"}}`,
//! Anthropic `{"type":"error","error":{"type","message"}}`.
//!
//! # Deterministic tokens
//!
//! * prompt tokens = for every message, 3 + the number of whitespace-separated words of its text
//!   (string content, or the `text` of its content parts); Anthropic's top-level `system`
//!   counts as one more message when present.
//! * completion tokens = [`MockBehavior::completion_tokens`] (default 16), capped by
//!   `max_tokens` / `max_completion_tokens` when given (the smaller wins). When the cap bites the
//!   finish reason is `length` (OpenAI) / `max_tokens` (Anthropic), otherwise `stop` /
//!   `end_turn`.
//! * the completion text is that many words (`lorem ipsum dolor …`) joined by single spaces;
//!   streams carry one word per content chunk (every word after the first has a leading space,
//!   so the chunks concatenate to the non-streaming text).
//! * cached and reasoning tokens are always reported as 0.
//! * Anthropic's `message_start` reports `output_tokens: 1` like the real API; the final,
//!   cumulative count is in `message_delta.usage.output_tokens`.
//!
//! # Behaviour per provider key
//!
//! [`MockBehavior`] is looked up by the request's API key (falling back to the default
//! behaviour) and can be changed at run time with [`MockState::set_behavior`],
//! [`MockState::set_default_behavior`] or the admin route `POST /mock/behavior`. Any non-empty
//! key is accepted unless its behaviour has `status: Some(401)` or an allow-list was set with
//! [`MockState::restrict_keys`]. A request without a key gets 401.
//!
//! Processing order of a completion request: count the call, record the request, sleep
//! `latency`, check the key (401), apply the `status` override (any non-2xx status answers with
//! that status in the API's error shape), validate the body (400), answer.
//!
//! # Admin routes
//!
//! * `POST /mock/behavior` with JSON `{"key": "k", "status": 429, "latency_ms": 100,
//!   "omit_usage": false, "abort_after_chunks": 3, "completion_tokens": 16}`; every field but
//!   `key` is optional (defaults as [`MockBehavior::default`]); a missing or `null` key sets the
//!   default behaviour.
//! * `DELETE /mock/behavior` removes all per-key behaviours and restores the default one.
//! * `GET /mock/calls` returns `{"total": n, "by_key": {"k": n}, "calls": [{"api": "openai",
//!   "key": "k", "count": n}]}`.
//! * `POST /mock/reset` zeroes the call counters and forgets the recorded requests.
//!
//! Only `POST /v1/chat/completions` and `POST /v1/messages` are counted and recorded
//! (`GET /v1/models` is not).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use futures_util::stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How many recent requests [`MockState::requests`] keeps.
pub const RECORDED_REQUESTS_CAP: usize = 1000;

/// The default number of completion tokens of a response.
pub const DEFAULT_COMPLETION_TOKENS: u32 = 16;

/// Models listed by `GET /v1/models` until [`MockState::set_models`] is called.
pub const DEFAULT_MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "o3-mini",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
];

const LOREM: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
];

/// Which provider API a request spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiShape {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
}

impl ApiShape {
    /// `"openai"` or `"anthropic"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiShape::OpenAi => "openai",
            ApiShape::Anthropic => "anthropic",
        }
    }
}

/// How the mock answers requests made with one provider key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockBehavior {
    /// Answer with this status (in the API's error shape) instead of a completion. A 2xx value
    /// means "no override"; a value that is not a valid HTTP status answers 500.
    pub status: Option<u16>,
    /// Sleep this long before answering (before the status override and the auth check too).
    pub latency: Duration,
    /// Report no usage at all, so the gateway has to estimate.
    pub omit_usage: bool,
    /// Streaming only: close the connection after this many content chunks, without the
    /// closing events (no finish chunk / usage / `[DONE]`, no `message_delta` / `message_stop`).
    /// When the completion has fewer chunks, all of them are sent and the stream is still cut.
    pub abort_after_chunks: Option<usize>,
    /// Completion tokens (words) of a response before the request's max-tokens cap.
    pub completion_tokens: u32,
}

impl Default for MockBehavior {
    fn default() -> Self {
        MockBehavior {
            status: None,
            latency: Duration::ZERO,
            omit_usage: false,
            abort_after_chunks: None,
            completion_tokens: DEFAULT_COMPLETION_TOKENS,
        }
    }
}

impl MockBehavior {
    /// A behaviour that answers with `status`.
    pub fn status(status: u16) -> Self {
        MockBehavior {
            status: Some(status),
            ..MockBehavior::default()
        }
    }

    /// A behaviour that waits `latency` before answering normally.
    pub fn latency(latency: Duration) -> Self {
        MockBehavior {
            latency,
            ..MockBehavior::default()
        }
    }
}

/// One completion request as the mock received it (bodies are kept in memory only, the last
/// [`RECORDED_REQUESTS_CAP`] of them).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// Which API was called.
    pub api: ApiShape,
    /// The provider key sent (empty when none).
    pub key: String,
    /// The `model` of the body, when there was one.
    pub model: Option<String>,
    /// Whether the body asked for a stream.
    pub stream: bool,
    /// The parsed body (`Value::Null` when it was not JSON).
    pub body: Value,
    /// The `anthropic-version` header, when sent.
    pub anthropic_version: Option<String>,
}

#[derive(Debug)]
struct Inner {
    behaviors: DashMap<String, MockBehavior>,
    default_behavior: RwLock<MockBehavior>,
    valid_keys: RwLock<Option<HashSet<String>>>,
    models: RwLock<Vec<String>>,
    calls: DashMap<(ApiShape, String), u64>,
    total: AtomicU64,
    requests: Mutex<VecDeque<RecordedRequest>>,
}

/// The mock's shared, run-time configurable state: behaviours per key, call counters and the
/// recorded requests. Cloning is cheap (an `Arc` inside); clones share everything.
#[derive(Debug, Clone)]
pub struct MockState {
    inner: Arc<Inner>,
}

impl Default for MockState {
    fn default() -> Self {
        MockState::new()
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|e| e.into_inner()) = value;
}

impl MockState {
    /// Fresh state: default behaviour everywhere, any key accepted, no calls.
    pub fn new() -> Self {
        MockState {
            inner: Arc::new(Inner {
                behaviors: DashMap::new(),
                default_behavior: RwLock::new(MockBehavior::default()),
                valid_keys: RwLock::new(None),
                models: RwLock::new(DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect()),
                calls: DashMap::new(),
                total: AtomicU64::new(0),
                requests: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// Set the behaviour for requests made with provider key `key` (both APIs).
    pub fn set_behavior(&self, key: impl Into<String>, behavior: MockBehavior) {
        self.inner.behaviors.insert(key.into(), behavior);
    }

    /// Forget the behaviour of `key`, so it falls back to the default behaviour.
    pub fn remove_behavior(&self, key: &str) {
        self.inner.behaviors.remove(key);
    }

    /// Set the behaviour of keys without their own.
    pub fn set_default_behavior(&self, behavior: MockBehavior) {
        write(&self.inner.default_behavior, behavior);
    }

    /// Remove every per-key behaviour and restore [`MockBehavior::default`] as the default.
    pub fn clear_behaviors(&self) {
        self.inner.behaviors.clear();
        self.set_default_behavior(MockBehavior::default());
    }

    /// The behaviour that applies to `key`.
    pub fn behavior(&self, key: &str) -> MockBehavior {
        match self.inner.behaviors.get(key) {
            Some(b) => b.clone(),
            None => read(&self.inner.default_behavior),
        }
    }

    /// Mark `key` invalid: requests with it get 401 (same as a behaviour with status 401).
    pub fn invalidate_key(&self, key: impl Into<String>) {
        self.set_behavior(key, MockBehavior::status(401));
    }

    /// Accept only these keys from now on (others get 401).
    pub fn restrict_keys<I, S>(&self, keys: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        write(
            &self.inner.valid_keys,
            Some(keys.into_iter().map(Into::into).collect()),
        );
    }

    /// Accept any non-empty key again (the default).
    pub fn allow_any_key(&self) {
        write(&self.inner.valid_keys, None);
    }

    /// Whether a request with `key` passes authentication (ignoring the status override, except
    /// that a behaviour with status 401 marks the key invalid).
    pub fn is_valid_key(&self, key: &str) -> bool {
        if key.is_empty() || self.behavior(key).status == Some(401) {
            return false;
        }
        match &*self
            .inner
            .valid_keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some(keys) => keys.contains(key),
            None => true,
        }
    }

    /// Models listed by `GET /v1/models`.
    pub fn set_models<I, S>(&self, models: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        write(
            &self.inner.models,
            models.into_iter().map(Into::into).collect(),
        );
    }

    /// The models `GET /v1/models` lists.
    pub fn models(&self) -> Vec<String> {
        read(&self.inner.models)
    }

    /// Completion calls made with `key`, over both APIs.
    pub fn calls(&self, key: &str) -> u64 {
        self.inner
            .calls
            .iter()
            .filter(|e| e.key().1 == key)
            .map(|e| *e.value())
            .sum()
    }

    /// Completion calls made with `key` on one API.
    pub fn calls_for(&self, api: ApiShape, key: &str) -> u64 {
        self.inner
            .calls
            .get(&(api, key.to_owned()))
            .map(|v| *v)
            .unwrap_or(0)
    }

    /// All completion calls, any key, any API.
    pub fn total_calls(&self) -> u64 {
        self.inner.total.load(Ordering::SeqCst)
    }

    /// Every counter, sorted by (API, key).
    pub fn calls_snapshot(&self) -> BTreeMap<(ApiShape, String), u64> {
        self.inner
            .calls
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect()
    }

    /// Zero the call counters and forget the recorded requests (behaviours stay).
    pub fn reset(&self) {
        self.inner.calls.clear();
        self.inner.total.store(0, Ordering::SeqCst);
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The most recent completion requests, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The most recent completion request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .back()
            .cloned()
    }

    fn count(&self, api: ApiShape, key: &str) {
        *self.inner.calls.entry((api, key.to_owned())).or_insert(0) += 1;
        self.inner.total.fetch_add(1, Ordering::SeqCst);
    }

    fn record(&self, request: RecordedRequest) {
        let mut requests = self
            .inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if requests.len() >= RECORDED_REQUESTS_CAP {
            requests.pop_front();
        }
        requests.push_back(request);
    }
}

/// The mock provider's routes (see the module documentation).
/// Counts a call and records what it asked for; both APIs do it the same way.
fn note_call(
    state: &MockState,
    api: ApiShape,
    key: Option<&str>,
    parsed: Option<&Value>,
    anthropic_version: Option<String>,
) {
    let key = key.unwrap_or_default().to_string();
    state.count(api, &key);
    state.record(RecordedRequest {
        api,
        key,
        model: parsed
            .and_then(|b| b.get("model"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        stream: parsed
            .and_then(|b| b.get("stream"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        body: parsed.cloned().unwrap_or(Value::Null),
        anthropic_version,
    });
}

pub fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/models", get(list_models))
        .route(
            "/mock/behavior",
            post(admin_set_behavior).delete(admin_clear_behaviors),
        )
        .route("/mock/calls", get(admin_calls))
        .route("/mock/reset", post(admin_reset))
        .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(state)
}

/// Bind `addr` (use `127.0.0.1:0` in tests), serve the mock in a tokio task, and return the bound
/// address with the shared state.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<(SocketAddr, Arc<MockState>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let state = Arc::new(MockState::new());
    let app = router(state.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(
            axum::serve::ListenerExt::tap_io(listener, |tcp| {
                // Small SSE frames must leave at once, not wait for Nagle.
                let _ = tcp.set_nodelay(true);
            }),
            app,
        )
        .await
        {
            tracing::warn!(error = %e, "mock provider stopped");
        }
    });
    Ok((bound, state))
}

// ---------------------------------------------------------------------------------------------
// Errors

fn error_response(api: ApiShape, status: StatusCode, message: &str) -> Response {
    let code = status.as_u16();
    let body = match api {
        ApiShape::OpenAi => {
            let (kind, code_str): (&str, Option<&str>) = match code {
                400 => ("invalid_request_error", None),
                401 => ("invalid_request_error", Some("invalid_api_key")),
                403 => ("permission_error", Some("permission_denied")),
                404 => ("invalid_request_error", Some("model_not_found")),
                429 => ("requests", Some("rate_limit_exceeded")),
                500..=599 => ("server_error", None),
                _ => ("invalid_request_error", None),
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code_str}})
        }
        ApiShape::Anthropic => {
            let kind = match code {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                500..=599 => "api_error",
                _ => "invalid_request_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    let mut response = (status, Json(body)).into_response();
    add_request_id(api, response.headers_mut());
    response
}

fn status_message(code: u16) -> &'static str {
    match code {
        400 => "mock: bad request",
        401 => "mock: invalid API key",
        403 => "mock: permission denied",
        404 => "mock: not found",
        429 => "mock: rate limit reached, please retry later",
        529 => "mock: overloaded",
        500..=599 => "mock: internal server error",
        _ => "mock: error",
    }
}

fn add_request_id(api: ApiShape, headers: &mut HeaderMap) {
    let id = format!("req_mock_{}", uuid::Uuid::new_v4().simple());
    if let Ok(value) = HeaderValue::from_str(&id) {
        let name = match api {
            ApiShape::OpenAi => "x-request-id",
            ApiShape::Anthropic => "request-id",
        };
        headers.insert(name, value);
    }
}

// ---------------------------------------------------------------------------------------------
// Request helpers

fn bearer_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim().to_owned())
}

fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
}

/// Words of a message `content`: a string, or an array of parts whose `text` strings count.
fn content_words(content: &Value) -> u64 {
    match content {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.split_whitespace().count() as u64,
                Value::Object(o) => {
                    o.get("text")
                        .and_then(Value::as_str)
                        .map_or(0, |s| s.split_whitespace().count() as u64)
                        + o.get("content").map_or(0, content_words)
                }
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// The mock's deterministic prompt token count of a list of messages: 3 + words per message.
pub fn prompt_tokens_of(messages: &[Value]) -> u64 {
    messages
        .iter()
        .map(|m| 3 + m.get("content").map_or(0, content_words))
        .sum()
}

/// The mock's completion text of `n` tokens, one word per token.
pub fn completion_words(n: u32) -> Vec<&'static str> {
    (0..n as usize).map(|i| LOREM[i % LOREM.len()]).collect()
}

/// The completion text of `n` tokens, as the non-streaming response carries it.
pub fn completion_text(n: u32) -> String {
    completion_words(n).join(" ")
}

/// `(completion tokens, capped)` for a configured count and the request's caps.
fn completion_count(configured: u32, caps: &[Option<u64>]) -> (u32, bool) {
    let cap = caps.iter().flatten().min().copied();
    match cap {
        Some(c) if c < u64::from(configured) => (c as u32, true),
        _ => (configured, false),
    }
}

/// Content chunks: one word each, with a leading space after the first.
fn chunk_texts(n: u32) -> Vec<String> {
    completion_words(n)
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Common steps of a completion request; returns the behaviour to apply or the response.
async fn prelude(
    state: &MockState,
    api: ApiShape,
    key: Option<&str>,
) -> Result<MockBehavior, Response> {
    let key = key.unwrap_or("");
    let behavior = state.behavior(key);
    if !behavior.latency.is_zero() {
        tokio::time::sleep(behavior.latency).await;
    }
    if key.is_empty() {
        let message = match api {
            ApiShape::OpenAi => "mock: you didn't provide an API key (Authorization: Bearer <key>)",
            ApiShape::Anthropic => "mock: x-api-key header is required",
        };
        return Err(error_response(api, StatusCode::UNAUTHORIZED, message));
    }
    if !state.is_valid_key(key) {
        return Err(error_response(
            api,
            StatusCode::UNAUTHORIZED,
            status_message(401),
        ));
    }
    if let Some(code) = behavior.status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if !status.is_success() {
            return Err(error_response(api, status, status_message(status.as_u16())));
        }
    }
    Ok(behavior)
}

fn sse_response(api: ApiShape, frames: Vec<Bytes>, abort: bool) -> Response {
    let frames = stream::iter(frames.into_iter().map(Ok::<Bytes, std::io::Error>));
    let body = if abort {
        // Give hyper a chance to flush what was written before the connection is cut.
        let cut = stream::once(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(std::io::Error::other("mock: stream aborted"))
        });
        Body::from_stream(frames.chain(cut))
    } else {
        Body::from_stream(frames)
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    add_request_id(api, headers);
    response
}

/// Content frames cut to `abort_after_chunks`; returns whether the stream is aborted.
fn apply_abort(content: &mut Vec<Bytes>, behavior: &MockBehavior) -> bool {
    match behavior.abort_after_chunks {
        Some(n) => {
            content.truncate(n);
            true
        }
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAI

async fn openai_chat(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = ApiShape::OpenAi;
    let key = bearer_key(&headers);
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    note_call(&state, api, key.as_deref(), parsed.as_ref(), None);
    let behavior = match prelude(&state, api, key.as_deref()).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let Some(req) = parsed.filter(Value::is_object) else {
        return error_response(
            api,
            StatusCode::BAD_REQUEST,
            "mock: we could not parse the JSON body of your request",
        );
    };
    let Some(model) = req.get("model").and_then(Value::as_str) else {
        return error_response(
            api,
            StatusCode::BAD_REQUEST,
            "mock: you must provide a model parameter",
        );
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error_response(
            api,
            StatusCode::BAD_REQUEST,
            "mock: missing required parameter: 'messages'",
        );
    };
    let prompt_tokens = prompt_tokens_of(messages);
    let (completion_tokens, capped) = completion_count(
        behavior.completion_tokens,
        &[
            req.get("max_tokens").and_then(Value::as_u64),
            req.get("max_completion_tokens").and_then(Value::as_u64),
        ],
    );
    let finish_reason = if capped { "length" } else { "stop" };
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + u64::from(completion_tokens),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    });
    let id = format!("chatcmpl-mock{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);

    if !stream {
        let mut response = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": completion_text(completion_tokens),
                    "refusal": null,
                },
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        });
        if !behavior.omit_usage
            && let Some(obj) = response.as_object_mut()
        {
            obj.insert("usage".to_owned(), usage);
        }
        let mut response = Json(response).into_response();
        add_request_id(api, response.headers_mut());
        return response;
    }

    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chunk = |delta: Value, finish: Option<&str>| -> Bytes {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage && let Some(obj) = c.as_object_mut() {
            // Like OpenAI: with include_usage, every chunk but the last carries `usage: null`.
            obj.insert("usage".to_owned(), Value::Null);
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut frames = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    let mut content: Vec<Bytes> = chunk_texts(completion_tokens)
        .into_iter()
        .map(|t| chunk(json!({"content": t}), None))
        .collect();
    let abort = apply_abort(&mut content, &behavior);
    frames.append(&mut content);
    if !abort {
        frames.push(chunk(json!({}), Some(finish_reason)));
        if include_usage && !behavior.omit_usage {
            let last = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [],
                "usage": usage,
            });
            frames.push(Bytes::from(format!("data: {last}\n\n")));
        }
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    sse_response(api, frames, abort)
}

async fn list_models(State(state): State<Arc<MockState>>, headers: HeaderMap) -> Response {
    let bearer = bearer_key(&headers);
    let anthropic_key = header_string(&headers, "x-api-key");
    let (api, key) = match (bearer, anthropic_key) {
        (Some(k), _) => (ApiShape::OpenAi, Some(k)),
        (None, Some(k)) => (ApiShape::Anthropic, Some(k)),
        (None, None) if headers.contains_key("anthropic-version") => (ApiShape::Anthropic, None),
        (None, None) => (ApiShape::OpenAi, None),
    };
    if let Err(response) = prelude(&state, api, key.as_deref()).await {
        return response;
    }
    let models = state.models();
    let body = match api {
        ApiShape::OpenAi => json!({
            "object": "list",
            "data": models
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock"}))
                .collect::<Vec<_>>(),
        }),
        ApiShape::Anthropic => json!({
            "data": models
                .iter()
                .map(|m| json!({
                    "type": "model",
                    "id": m,
                    "display_name": m,
                    "created_at": "2025-01-01T00:00:00Z",
                }))
                .collect::<Vec<_>>(),
            "has_more": false,
            "first_id": models.first(),
            "last_id": models.last(),
        }),
    };
    let mut response = Json(body).into_response();
    add_request_id(api, response.headers_mut());
    response
}

// ---------------------------------------------------------------------------------------------
// Anthropic

async fn anthropic_messages(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = ApiShape::Anthropic;
    let key = header_string(&headers, "x-api-key");
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    note_call(
        &state,
        api,
        key.as_deref(),
        parsed.as_ref(),
        header_string(&headers, "anthropic-version"),
    );
    let behavior = match prelude(&state, api, key.as_deref()).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let Some(req) = parsed.filter(Value::is_object) else {
        return error_response(
            api,
            StatusCode::BAD_REQUEST,
            "mock: the request body is not valid JSON",
        );
    };
    let Some(model) = req.get("model").and_then(Value::as_str) else {
        return error_response(api, StatusCode::BAD_REQUEST, "mock: model: Field required");
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error_response(
            api,
            StatusCode::BAD_REQUEST,
            "mock: messages: Field required",
        );
    };
    let system_tokens = req.get("system").map_or(0, |s| 3 + content_words(s));
    let input_tokens = prompt_tokens_of(messages) + system_tokens;
    let (output_tokens, capped) = completion_count(
        behavior.completion_tokens,
        &[req.get("max_tokens").and_then(Value::as_u64)],
    );
    let stop_reason = if capped { "max_tokens" } else { "end_turn" };
    let id = format!("msg_mock{}", uuid::Uuid::new_v4().simple());
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);

    if !stream {
        let mut response = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": completion_text(output_tokens)}],
            "stop_reason": stop_reason,
            "stop_sequence": null,
        });
        if !behavior.omit_usage
            && let Some(obj) = response.as_object_mut()
        {
            obj.insert(
                "usage".to_owned(),
                json!({
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "cache_read_input_tokens": 0,
                    "cache_creation_input_tokens": 0,
                }),
            );
        }
        let mut response = Json(response).into_response();
        add_request_id(api, response.headers_mut());
        return response;
    }

    let event = |name: &str, data: Value| -> Bytes {
        Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
    };
    let mut message = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null,
    });
    if !behavior.omit_usage
        && let Some(obj) = message.as_object_mut()
    {
        obj.insert(
            "usage".to_owned(),
            json!({
                "input_tokens": input_tokens,
                "output_tokens": 1,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            }),
        );
    }
    let mut frames = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": message}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    let mut content: Vec<Bytes> = chunk_texts(output_tokens)
        .into_iter()
        .map(|t| {
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": t}}),
            )
        })
        .collect();
    let abort = apply_abort(&mut content, &behavior);
    frames.append(&mut content);
    if !abort {
        frames.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        let mut delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        });
        if !behavior.omit_usage
            && let Some(obj) = delta.as_object_mut()
        {
            obj.insert("usage".to_owned(), json!({"output_tokens": output_tokens}));
        }
        frames.push(event("message_delta", delta));
        frames.push(event("message_stop", json!({"type": "message_stop"})));
    }
    sse_response(api, frames, abort)
}

// ---------------------------------------------------------------------------------------------
// Admin

fn default_completion_tokens() -> u32 {
    DEFAULT_COMPLETION_TOKENS
}

/// Body of `POST /mock/behavior`.
#[derive(Debug, Deserialize)]
struct BehaviorRequest {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    latency_ms: u64,
    #[serde(default)]
    omit_usage: bool,
    #[serde(default)]
    abort_after_chunks: Option<usize>,
    #[serde(default = "default_completion_tokens")]
    completion_tokens: u32,
}

async fn admin_set_behavior(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    let req: BehaviorRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("invalid behavior: {e}")})),
            )
                .into_response();
        }
    };
    let behavior = MockBehavior {
        status: req.status,
        latency: Duration::from_millis(req.latency_ms),
        omit_usage: req.omit_usage,
        abort_after_chunks: req.abort_after_chunks,
        completion_tokens: req.completion_tokens,
    };
    match req.key {
        Some(key) => state.set_behavior(key, behavior),
        None => state.set_default_behavior(behavior),
    }
    Json(json!({"ok": true})).into_response()
}

async fn admin_clear_behaviors(State(state): State<Arc<MockState>>) -> Response {
    state.clear_behaviors();
    Json(json!({"ok": true})).into_response()
}

async fn admin_calls(State(state): State<Arc<MockState>>) -> Response {
    let snapshot = state.calls_snapshot();
    let mut by_key: BTreeMap<String, u64> = BTreeMap::new();
    let calls: Vec<Value> = snapshot
        .into_iter()
        .map(|((api, key), count)| {
            *by_key.entry(key.clone()).or_insert(0) += count;
            json!({"api": api.as_str(), "key": key, "count": count})
        })
        .collect();
    Json(json!({"total": state.total_calls(), "by_key": by_key, "calls": calls})).into_response()
}

async fn admin_reset(State(state): State<Arc<MockState>>) -> Response {
    state.reset();
    Json(json!({"ok": true})).into_response()
}
