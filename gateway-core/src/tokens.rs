//! Token estimates with the tiktoken encodings bundled in the binary (no download at run
//! time). Estimates stand in only when the provider reports no usage.

use tiktoken_rs::CoreBPE;

fn encoding_for(model: &str) -> &'static CoreBPE {
    // o200k_base is the encoding of the gpt-4o/4.1/o-series families; cl100k_base is the
    // closest public approximation for everything else.
    if model.starts_with("gpt-4o")
        || model.starts_with("gpt-4.1")
        || model.starts_with("o1")
        || model.starts_with("o3")
    {
        tiktoken_rs::o200k_base_singleton()
    } else {
        tiktoken_rs::cl100k_base_singleton()
    }
}

pub fn count(model: &str, text: &str) -> i64 {
    i64::try_from(encoding_for(model).encode_ordinary(text).len()).unwrap_or(i64::MAX)
}

/// Tokens of a chat request's prompt: every text the messages (and system prompt) carry, plus
/// the per-message framing OpenAI documents (3 tokens per message, 3 to prime the reply).
pub fn estimate_prompt(model: &str, body: &serde_json::Value) -> i64 {
    let mut text = String::new();
    let mut messages = 0i64;
    if let Some(system) = body.get("system") {
        collect_text(system, &mut text);
        messages += 1;
    }
    if let Some(list) = body.get("messages").and_then(|m| m.as_array()) {
        for m in list {
            messages += 1;
            if let Some(content) = m.get("content") {
                collect_text(content, &mut text);
            }
        }
    }
    count(model, &text) + 3 * messages + 3
}

fn collect_text(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        serde_json::Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text") {
                    collect_text(t, out);
                } else if p.is_string() {
                    collect_text(p, out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_bundled_encodings() {
        assert_eq!(count("gpt-4o", "hello world"), 2);
        assert_eq!(count("claude-haiku-4-5", "hello world"), 2);
        let body = serde_json::json!({"messages": [{"role": "user", "content": "hello world"}]});
        assert_eq!(
            estimate_prompt("gpt-4o", &body),
            count("gpt-4o", "hello world\n") + 3 + 3
        );
        let parts = serde_json::json!({"system": "be brief", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]});
        assert!(estimate_prompt("claude-haiku-4-5", &parts) > 4);
    }
}
