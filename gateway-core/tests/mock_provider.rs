//! The mock upstream provider over a real socket: usage numbers, streams, error shapes,
//! behaviours per key, counters.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tally_gateway_core::mock::{self, ApiShape, MockBehavior, MockState};

async fn start() -> (String, Arc<MockState>) {
    let (addr, state) = mock::spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    (format!("http://{addr}"), state)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// "Hello there" (2 words) + "How are you today" (4 words) + 3 per message = 12 prompt tokens.
fn openai_body() -> Value {
    json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Hello there"},
            {"role": "user", "content": [{"type": "text", "text": "How are you today"}]},
        ],
    })
}

/// "Be brief" system (2 + 3) + "What is the capital of France" (6 + 3) = 14 input tokens.
fn anthropic_body() -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": "Be brief",
        "messages": [{"role": "user", "content": "What is the capital of France"}],
    })
}

async fn openai(base: &str, key: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn anthropic(base: &str, key: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// `(event name, data)` pairs of an SSE body.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            (name, data)
        })
        .collect()
}

/// Reads a body stream to its end or first error; returns the text and whether it errored.
async fn read_stream(response: reqwest::Response) -> (String, bool) {
    let mut stream = response.bytes_stream();
    let mut buf = Vec::new();
    let mut errored = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => buf.extend_from_slice(&b),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    (String::from_utf8(buf).unwrap(), errored)
}

#[tokio::test]
async fn openai_non_streaming_usage() {
    let (base, _state) = start().await;
    let response = openai(&base, "sk-a", &openai_body()).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 16);
    assert!(content.starts_with("lorem ipsum"));
    assert_eq!(content, mock::completion_text(16));
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], 12);
    assert_eq!(usage["completion_tokens"], 16);
    assert_eq!(usage["total_tokens"], 28);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
}

#[tokio::test]
async fn openai_max_tokens_caps_completion() {
    let (base, state) = start().await;
    let mut body = openai_body();
    body["max_completion_tokens"] = json!(5);
    let response: Value = openai(&base, "sk-a", &body).await.json().await.unwrap();
    assert_eq!(response["usage"]["completion_tokens"], 5);
    assert_eq!(response["choices"][0]["finish_reason"], "length");

    // Legacy max_tokens too; the smaller cap wins.
    body["max_tokens"] = json!(3);
    let response: Value = openai(&base, "sk-a", &body).await.json().await.unwrap();
    assert_eq!(response["usage"]["completion_tokens"], 3);

    // A cap above the configured count changes nothing.
    state.set_behavior(
        "sk-b",
        MockBehavior {
            completion_tokens: 4,
            ..MockBehavior::default()
        },
    );
    let mut body = openai_body();
    body["max_tokens"] = json!(100);
    let response: Value = openai(&base, "sk-b", &body).await.json().await.unwrap();
    assert_eq!(response["usage"]["completion_tokens"], 4);
    assert_eq!(response["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        response["choices"][0]["message"]["content"],
        "lorem ipsum dolor sit"
    );
}

#[tokio::test]
async fn openai_streaming_without_include_usage() {
    let (base, _state) = start().await;
    let mut body = openai_body();
    body["stream"] = json!(true);
    let response = openai(&base, "sk-a", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let (text, errored) = read_stream(response).await;
    assert!(!errored);
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c.get("usage").is_none())
    );
    // role chunk + 16 words + finish chunk
    assert_eq!(chunks.len(), 18);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, mock::completion_text(16));
    assert_eq!(chunks[17]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn openai_streaming_with_include_usage() {
    let (base, _state) = start().await;
    let mut body = openai_body();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["max_tokens"] = json!(7);
    let (text, errored) = read_stream(openai(&base, "sk-a", &body).await).await;
    assert!(!errored);
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // role + 7 words + finish + usage
    assert_eq!(chunks.len(), 10);
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert_eq!(content_chunks, 7);
    assert_eq!(chunks[8]["choices"][0]["finish_reason"], "length");
    // Every chunk but the last carries usage: null.
    assert!(chunks[..9].iter().all(|c| c["usage"].is_null()));
    let last = &chunks[9];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 12);
    assert_eq!(last["usage"]["completion_tokens"], 7);
    assert_eq!(last["usage"]["total_tokens"], 19);
}

#[tokio::test]
async fn omit_usage_reports_none() {
    let (base, state) = start().await;
    state.set_behavior(
        "sk-quiet",
        MockBehavior {
            omit_usage: true,
            ..MockBehavior::default()
        },
    );
    let body: Value = openai(&base, "sk-quiet", &openai_body())
        .await
        .json()
        .await
        .unwrap();
    assert!(body.get("usage").is_none());
    assert_eq!(
        body["choices"][0]["message"]["content"],
        mock::completion_text(16)
    );

    let mut streaming = openai_body();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (text, _) = read_stream(openai(&base, "sk-quiet", &streaming).await).await;
    assert!(!text.contains("\"prompt_tokens\""));
    assert!(text.ends_with("data: [DONE]\n\n"));

    let body: Value = anthropic(&base, "sk-quiet", &anthropic_body())
        .await
        .json()
        .await
        .unwrap();
    assert!(body.get("usage").is_none());
}

#[tokio::test]
async fn anthropic_non_streaming() {
    let (base, state) = start().await;
    let response = anthropic(&base, "ak-1", &anthropic_body()).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(body["content"][0]["type"], "text");
    assert_eq!(body["content"][0]["text"], mock::completion_text(16));
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["usage"]["input_tokens"], 14);
    assert_eq!(body["usage"]["output_tokens"], 16);
    assert_eq!(body["usage"]["cache_read_input_tokens"], 0);

    let recorded = state.last_request().unwrap();
    assert_eq!(recorded.api, ApiShape::Anthropic);
    assert_eq!(recorded.key, "ak-1");
    assert_eq!(recorded.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!(recorded.anthropic_version.as_deref(), Some("2023-06-01"));
    assert!(!recorded.stream);

    let mut capped = anthropic_body();
    capped["max_tokens"] = json!(2);
    let body: Value = anthropic(&base, "ak-1", &capped)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["usage"]["output_tokens"], 2);
    assert_eq!(body["stop_reason"], "max_tokens");
    assert_eq!(body["content"][0]["text"], "lorem ipsum");
}

#[tokio::test]
async fn anthropic_streaming_event_sequence() {
    let (base, _state) = start().await;
    let mut body = anthropic_body();
    body["stream"] = json!(true);
    body["max_tokens"] = json!(3);
    let response = anthropic(&base, "ak-1", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let (text, errored) = read_stream(response).await;
    assert!(!errored);
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    let start = &events[0].1["message"];
    assert_eq!(start["type"], "message");
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["model"], "claude-sonnet-4-5");
    assert_eq!(start["usage"]["input_tokens"], 14);
    assert_eq!(events[1].1["content_block"]["type"], "text");
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, "lorem ipsum dolor");
    let delta = &events[7].1;
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 3);
}

#[tokio::test]
async fn error_statuses_in_each_api_shape() {
    let (base, state) = start().await;
    state.set_behavior("limited", MockBehavior::status(429));
    state.set_behavior("broken", MockBehavior::status(500));
    state.invalidate_key("revoked");
    state.set_behavior("forbidden", MockBehavior::status(403));

    let cases = [
        (
            "limited",
            429,
            "requests",
            Some("rate_limit_exceeded"),
            "rate_limit_error",
        ),
        ("broken", 500, "server_error", None, "api_error"),
        (
            "revoked",
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "authentication_error",
        ),
        (
            "forbidden",
            403,
            "permission_error",
            Some("permission_denied"),
            "permission_error",
        ),
    ];
    for (key, status, openai_type, openai_code, anthropic_type) in cases {
        let response = openai(&base, key, &openai_body()).await;
        assert_eq!(response.status().as_u16(), status, "openai {key}");
        let body: Value = response.json().await.unwrap();
        let error = &body["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(error["type"], openai_type, "openai {key}");
        assert_eq!(error["code"], json!(openai_code), "openai {key}");

        let response = anthropic(&base, key, &anthropic_body()).await;
        assert_eq!(response.status().as_u16(), status, "anthropic {key}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], anthropic_type, "anthropic {key}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    // Streaming requests get the same error, not a stream.
    let mut streaming = openai_body();
    streaming["stream"] = json!(true);
    let response = openai(&base, "limited", &streaming).await;
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    // Other keys are unaffected.
    assert_eq!(openai(&base, "fine", &openai_body()).await.status(), 200);

    // Missing credentials: 401 in each shape.
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&openai_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let response = client()
        .post(format!("{base}/v1/messages"))
        .json(&anthropic_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");

    // Bad bodies: 400 in each shape.
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("fine")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let response = anthropic(&base, "fine", &json!({"model": "claude-sonnet-4-5"})).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // Behaviour removed: the key answers again.
    state.remove_behavior("limited");
    assert_eq!(openai(&base, "limited", &openai_body()).await.status(), 200);
}

#[tokio::test]
async fn restricted_key_set() {
    let (base, state) = start().await;
    state.restrict_keys(["good"]);
    assert_eq!(openai(&base, "good", &openai_body()).await.status(), 200);
    assert_eq!(openai(&base, "other", &openai_body()).await.status(), 401);
    state.allow_any_key();
    assert_eq!(openai(&base, "other", &openai_body()).await.status(), 200);
}

#[tokio::test]
async fn models_listing() {
    let (base, state) = start().await;
    state.invalidate_key("bad");
    let response = client()
        .get(format!("{base}/v1/models"))
        .bearer_auth("sk-a")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert!(!data.is_empty());
    assert!(data.iter().all(|m| m["object"] == "model"));
    assert!(data.iter().any(|m| m["id"] == "gpt-4o"));

    let response = client()
        .get(format!("{base}/v1/models"))
        .bearer_auth("bad")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");

    state.set_models(["claude-x"]);
    let response = client()
        .get(format!("{base}/v1/models"))
        .header("x-api-key", "ak")
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"][0]["type"], "model");
    assert_eq!(body["data"][0]["id"], "claude-x");

    // Listing models is not a counted call.
    assert_eq!(state.total_calls(), 0);
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let (base, state) = start().await;
    state.set_behavior("slow", MockBehavior::latency(Duration::from_millis(300)));

    let started = Instant::now();
    assert_eq!(openai(&base, "slow", &openai_body()).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let started = Instant::now();
    assert_eq!(openai(&base, "fast", &openai_body()).await.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(300));

    // A client timeout shorter than the latency fails, and the attempt was still counted.
    let result = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "slow")
        .json(&anthropic_body())
        .send()
        .await;
    assert!(result.unwrap_err().is_timeout());
    assert_eq!(state.calls("slow"), 2);

    // Latency also applies before an error status, and via the default behaviour.
    state.set_default_behavior(MockBehavior {
        status: Some(503),
        latency: Duration::from_millis(200),
        ..MockBehavior::default()
    });
    let started = Instant::now();
    let response = anthropic(&base, "anyone", &anthropic_body()).await;
    assert_eq!(response.status(), 503);
    assert!(started.elapsed() >= Duration::from_millis(200));
    state.clear_behaviors();
    assert_eq!(
        anthropic(&base, "anyone", &anthropic_body()).await.status(),
        200
    );
}

#[tokio::test]
async fn abort_mid_stream_openai() {
    let (base, state) = start().await;
    state.set_behavior(
        "flaky",
        MockBehavior {
            abort_after_chunks: Some(3),
            ..MockBehavior::default()
        },
    );
    let mut body = openai_body();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = openai(&base, "flaky", &body).await;
    assert_eq!(response.status(), 200);
    let (text, errored) = read_stream(response).await;
    assert!(errored, "the client must see the connection cut");
    assert!(!text.contains("[DONE]"));
    assert!(!text.contains("\"prompt_tokens\""));
    let chunks: Vec<Value> = sse_data(&text)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // role chunk + 3 content chunks, no finish chunk
    assert_eq!(chunks.len(), 4);
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "lorem ipsum dolor");
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );
}

#[tokio::test]
async fn abort_mid_stream_anthropic() {
    let (base, state) = start().await;
    state.set_behavior(
        "flaky",
        MockBehavior {
            abort_after_chunks: Some(2),
            ..MockBehavior::default()
        },
    );
    let mut body = anthropic_body();
    body["stream"] = json!(true);
    let (text, errored) = read_stream(anthropic(&base, "flaky", &body).await).await;
    assert!(errored, "the client must see the connection cut");
    let names: Vec<String> = sse_events(&text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
        ]
    );
}

#[tokio::test]
async fn counters_per_key_and_api() {
    let (base, state) = start().await;
    state.set_behavior("k2", MockBehavior::status(429));
    for _ in 0..3 {
        openai(&base, "k1", &openai_body()).await;
    }
    openai(&base, "k2", &openai_body()).await;
    anthropic(&base, "k1", &anthropic_body()).await;
    anthropic(&base, "k3", &anthropic_body()).await;

    assert_eq!(state.calls("k1"), 4);
    assert_eq!(state.calls_for(ApiShape::OpenAi, "k1"), 3);
    assert_eq!(state.calls_for(ApiShape::Anthropic, "k1"), 1);
    assert_eq!(state.calls("k2"), 1, "failed attempts are counted too");
    assert_eq!(state.calls("k3"), 1);
    assert_eq!(state.calls("nobody"), 0);
    assert_eq!(state.total_calls(), 6);
    assert_eq!(state.requests().len(), 6);

    let calls: Value = client()
        .get(format!("{base}/mock/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls["total"], 6);
    assert_eq!(calls["by_key"]["k1"], 4);
    assert_eq!(calls["by_key"]["k2"], 1);
    let entries = calls["calls"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["api"] == "openai" && e["key"] == "k1" && e["count"] == 3)
    );
    assert!(
        entries
            .iter()
            .any(|e| e["api"] == "anthropic" && e["key"] == "k3" && e["count"] == 1)
    );

    state.reset();
    assert_eq!(state.total_calls(), 0);
    assert_eq!(state.calls("k1"), 0);
    assert!(state.requests().is_empty());
    // Behaviours survive a counter reset.
    assert_eq!(openai(&base, "k2", &openai_body()).await.status(), 429);

    let reset = client()
        .post(format!("{base}/mock/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(state.total_calls(), 0);
}

#[tokio::test]
async fn admin_behavior_route() {
    let (base, state) = start().await;
    let set = |body: Value| {
        let base = base.clone();
        async move {
            client()
                .post(format!("{base}/mock/behavior"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(set(json!({"key": "k", "status": 500})).await.status(), 200);
    assert_eq!(openai(&base, "k", &openai_body()).await.status(), 500);
    assert_eq!(state.behavior("k").status, Some(500));

    set(json!({"key": "k", "completion_tokens": 2, "latency_ms": 10, "abort_after_chunks": 1, "omit_usage": true})).await;
    let b = state.behavior("k");
    assert_eq!(b.status, None);
    assert_eq!(b.completion_tokens, 2);
    assert_eq!(b.latency, Duration::from_millis(10));
    assert_eq!(b.abort_after_chunks, Some(1));
    assert!(b.omit_usage);
    let body: Value = openai(&base, "k", &openai_body())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "lorem ipsum");

    // No key: the default behaviour.
    set(json!({"status": 401})).await;
    assert_eq!(openai(&base, "anyone", &openai_body()).await.status(), 401);

    // Bad admin input is refused.
    assert_eq!(set(json!({"key": "k", "status": "x"})).await.status(), 400);

    let cleared = client()
        .delete(format!("{base}/mock/behavior"))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 200);
    assert_eq!(openai(&base, "anyone", &openai_body()).await.status(), 200);
    assert_eq!(state.behavior("k"), MockBehavior::default());
}

#[test]
fn behavior_defaults() {
    let b = MockBehavior::default();
    assert_eq!(b.status, None);
    assert_eq!(b.latency, Duration::ZERO);
    assert!(!b.omit_usage);
    assert_eq!(b.abort_after_chunks, None);
    assert_eq!(b.completion_tokens, 16);
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<MockState>();
}
