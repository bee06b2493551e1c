#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `openapi.yaml` cannot drift from the code: every route of the router is documented and every
//! documented operation is routed, and every error code the API can answer is documented, with
//! the status it is answered with. Reads the sources; needs no database.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_norway::Value;

const METHODS: [&str; 8] = [
    "get", "post", "put", "delete", "patch", "head", "options", "trace",
];

fn source(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The document exactly as the API serves it.
fn doc() -> Value {
    serde_norway::from_str(tally::api::OPENAPI_YAML).expect("openapi.yaml is valid YAML")
}

fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("unexpected mapping key {other:?}"),
    }
}

fn entries(v: &Value) -> Vec<(String, &Value)> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (key_str(k), v)).collect())
        .unwrap_or_default()
}

/// Follows a local `$ref` (`#/a/b/c`), repeatedly.
fn resolve<'a>(root: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let Some(r) = v.get("$ref").and_then(Value::as_str) else {
            return v;
        };
        let pointer = r
            .strip_prefix("#/")
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        v = pointer
            .split('/')
            .map(|seg| seg.replace("~1", "/").replace("~0", "~"))
            .try_fold(root, |node, seg| node.get(seg.as_str()))
            .unwrap_or_else(|| panic!("$ref {r} does not resolve"));
    }
    panic!("$ref chain too long")
}

/// The string literals of Rust source: byte offset of the opening quote, and the text between
/// the quotes as written (escapes not decoded). Skips `//` comments. Enough for the files read
/// here, which hold no raw strings and no quote characters in char literals.
fn string_literals(src: &str) -> Vec<(usize, &str)> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                // Both ends are ASCII quotes, so this is a valid slice.
                out.push((start, &src[start + 1..i.min(bytes.len())]));
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The text between the parenthesis or brace that opens at or after `from` and its match,
/// ignoring brackets inside string literals and comments.
fn delimited(src: &str, from: usize, open: u8, close: u8) -> &str {
    let bytes = src.as_bytes();
    let literals: BTreeMap<usize, usize> = string_literals(src)
        .into_iter()
        .map(|(at, s)| (at, at + s.len() + 1))
        .collect();
    let start = from + src[from..].find(char::from(open)).expect("opening bracket");
    let mut depth = 0usize;
    let mut i = start;
    while i < bytes.len() {
        if let Some(&end) = literals.get(&i) {
            i = end + 1;
            continue;
        }
        if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if bytes[i] == open {
            depth += 1;
        } else if bytes[i] == close {
            depth -= 1;
            if depth == 0 {
                return &src[start + 1..i];
            }
        }
        i += 1;
    }
    panic!("unbalanced brackets after offset {from}")
}

fn fn_body<'a>(src: &'a str, name: &str) -> &'a str {
    let at = src
        .find(&format!("fn {name}("))
        .unwrap_or_else(|| panic!("fn {name} not found"));
    delimited(
        src,
        at + src[at..].find(')').expect("signature"),
        b'{',
        b'}',
    )
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `(path, method)` of every `.route("PATH", get(..).post(..))` of the router.
fn routes() -> BTreeSet<(String, String)> {
    let src = source("src/api/mod.rs");
    for escape in [
        ".nest(",
        ".nest_service(",
        ".merge(",
        ".route_service(",
        "any(",
        ".on(",
    ] {
        assert!(
            !src.contains(escape),
            "src/api/mod.rs uses `{escape}`, which this test cannot read routes from; teach it"
        );
    }
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(found) = src[from..].find(".route(") {
        let at = from + found;
        let args = delimited(&src, at, b'(', b')');
        let (path_at, path) = string_literals(args)
            .into_iter()
            .next()
            .expect("route path literal");
        let handlers = &args[path_at + path.len() + 2..];
        let hb = handlers.as_bytes();
        let mut methods = 0;
        for m in METHODS {
            let call = format!("{m}(");
            let mut i = 0;
            while let Some(f) = handlers[i..].find(&call) {
                let pos = i + f;
                if pos == 0 || !is_ident_byte(hb[pos - 1]) {
                    assert!(
                        out.insert((path.to_string(), m.to_string())),
                        "{m} {path} routed twice"
                    );
                    methods += 1;
                }
                i = pos + call.len();
            }
        }
        assert!(methods > 0, "no method found for route {path}: {args}");
        from = at + ".route(".len() + args.len();
    }
    out
}

fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in entries(&doc["paths"]) {
        for (key, _) in entries(item) {
            if METHODS.contains(&key.as_str()) {
                out.insert((path.clone(), key));
            } else {
                assert!(
                    ["parameters", "summary", "description", "servers"].contains(&key.as_str())
                        || key.starts_with("x-"),
                    "unexpected key {key} under {path}"
                );
            }
        }
    }
    out
}

#[test]
fn document_is_openapi_3_and_served_verbatim() {
    let d = doc();
    let version = d["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3."), "openapi: {version}");
    assert!(d["info"]["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["info"]["version"].as_str().is_some_and(|v| !v.is_empty()));
    assert_eq!(
        tally::api::OPENAPI_YAML,
        source("openapi.yaml"),
        "the served document is the file"
    );
}

#[test]
fn router_and_document_list_the_same_operations() {
    let routed = routes();
    assert!(
        routed.len() >= 10,
        "suspiciously few routes found: {routed:?}"
    );
    let documented = documented_operations(&doc());
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routed but not in openapi.yaml: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "in openapi.yaml but not routed: {unrouted:?}"
    );
}

#[test]
fn path_parameters_match_the_path_templates() {
    let d = doc();
    let mut operation_ids = BTreeSet::new();
    for (path, item) in entries(&d["paths"]) {
        let template: BTreeSet<String> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_string)
            .collect();
        let shared = item
            .get("parameters")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for (method, op) in entries(item) {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let own = op
                .get("parameters")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            let mut declared = BTreeSet::new();
            for p in shared.iter().chain(own.iter()) {
                let p = resolve(&d, p);
                if p["in"].as_str() == Some("path") {
                    assert_eq!(
                        p["required"].as_bool(),
                        Some(true),
                        "{method} {path}: path params are required"
                    );
                    declared.insert(p["name"].as_str().expect("parameter name").to_string());
                }
            }
            assert_eq!(declared, template, "{method} {path}: path parameters");
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: operationId"));
            assert!(
                operation_ids.insert(id.to_string()),
                "operationId {id} used twice"
            );
            assert!(
                entries(&op["responses"])
                    .iter()
                    .any(|(status, _)| status.starts_with('2')),
                "{method} {path}: no success response"
            );
        }
    }
}

#[test]
fn every_reference_resolves() {
    fn walk(root: &Value, v: &Value, found: &mut usize) {
        match v {
            Value::Mapping(m) => {
                if v.get("$ref").is_some() {
                    resolve(root, v);
                    *found += 1;
                }
                for (_, child) in m {
                    walk(root, child, found);
                }
            }
            Value::Sequence(s) => s.iter().for_each(|child| walk(root, child, found)),
            _ => {}
        }
    }
    let d = doc();
    let mut found = 0;
    walk(&d, &d, &mut found);
    assert!(found > 0);
}

fn status_of(name: &str) -> u16 {
    match name {
        "BAD_REQUEST" => 400,
        "NOT_FOUND" => 404,
        "CONFLICT" => 409,
        "UNSUPPORTED_MEDIA_TYPE" => 415,
        "INTERNAL_SERVER_ERROR" => 500,
        "SERVICE_UNAVAILABLE" => 503,
        other => panic!("add StatusCode::{other} to status_of"),
    }
}

fn is_code(s: &str) -> bool {
    !s.is_empty()
        && s.split('_')
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Every error code the API answers with, and its status where the source pairs them.
fn source_codes() -> (BTreeSet<String>, BTreeMap<String, u16>) {
    let error_rs = source("src/api/error.rs");
    let mut codes = BTreeSet::new();
    let mut statuses = BTreeMap::new();
    let mut bad_request_status = None;
    for name in ["domain_status", "parts"] {
        let body = fn_body(&error_rs, name);
        for (at, lit) in string_literals(body) {
            if is_code(lit) && !body[..at].trim_end().ends_with("starts_with(") {
                codes.insert(lit.to_string());
            }
        }
        // `StatusCode::NAME, "code"`: a status paired with a literal code.
        let mut from = 0;
        while let Some(f) = body[from..].find("StatusCode::") {
            let at = from + f + "StatusCode::".len();
            let name_len = body[at..].bytes().take_while(|b| is_ident_byte(*b)).count();
            let status = status_of(&body[at..at + name_len]);
            let rest = body[at + name_len..]
                .trim_start()
                .strip_prefix(',')
                .map(str::trim_start);
            let literal = rest
                .and_then(|r| r.strip_prefix('"'))
                .and_then(|r| r.split('"').next())
                .filter(|lit| is_code(lit));
            if let Some(lit) = literal {
                assert_eq!(
                    *statuses.entry(lit.to_string()).or_insert(status),
                    status,
                    "{lit}: two statuses"
                );
            }
            from = at;
        }
        // The arm of `ApiError::BadRequest` gives the status of every `bad_request(..)` code.
        if let Some(arm) = body.find("ApiError::BadRequest") {
            let at = arm
                + body[arm..]
                    .find("StatusCode::")
                    .expect("a status in the BadRequest arm");
            let name: String = body[at + "StatusCode::".len()..]
                .bytes()
                .take_while(|b| is_ident_byte(*b))
                .map(char::from)
                .collect();
            bad_request_status = Some(status_of(&name));
        }
    }
    let bad_request_status =
        bad_request_status.expect("the status of ApiError::BadRequest in parts()");
    // Codes passed to `ApiError::bad_request(...)` anywhere in the API module.
    for file in ["src/api/mod.rs", "src/api/extract.rs", "src/api/error.rs"] {
        let src = source(file);
        for (at, lit) in string_literals(&src) {
            if src[..at].trim_end().ends_with("bad_request(") {
                assert!(is_code(lit), "{file}: bad_request code {lit:?}");
                statuses.insert(lit.to_string(), bad_request_status);
                codes.insert(lit.to_string());
            }
        }
    }
    assert!(
        codes.len() >= 15,
        "suspiciously few error codes found: {codes:?}"
    );
    (codes, statuses)
}

fn documented_codes(d: &Value) -> BTreeSet<String> {
    d["components"]["schemas"]["ErrorCode"]["enum"]
        .as_sequence()
        .expect("components.schemas.ErrorCode.enum")
        .iter()
        .map(|v| {
            v.as_str()
                .expect("ErrorCode values are strings")
                .to_string()
        })
        .collect()
}

#[test]
fn every_error_code_of_the_source_is_documented() {
    let (codes, _) = source_codes();
    let text = tally::api::OPENAPI_YAML;
    let missing_text: Vec<_> = codes
        .iter()
        .filter(|c| !text.contains(c.as_str()))
        .collect();
    assert!(
        missing_text.is_empty(),
        "error codes absent from openapi.yaml: {missing_text:?}"
    );
    let documented = documented_codes(&doc());
    let missing: Vec<_> = codes.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&codes).collect();
    assert!(
        missing.is_empty(),
        "error codes missing from ErrorCode: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "ErrorCode lists codes the API never answers: {stale:?}"
    );
}

#[test]
fn error_examples_use_documented_codes_with_their_statuses() {
    let d = doc();
    let (codes, statuses) = source_codes();
    let documented = documented_codes(&d);
    let mut used = BTreeSet::new();
    for (path, item) in entries(&d["paths"]) {
        for (method, op) in entries(item) {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            for (status, response) in entries(&op["responses"]) {
                let response = resolve(&d, response);
                let is_error = status.starts_with('4') || status.starts_with('5');
                for (_, media) in entries(&response["content"]) {
                    for (name, example) in entries(&media["examples"]) {
                        let value = &resolve(&d, example)["value"];
                        let Some(code) = value["error"]["code"].as_str() else {
                            assert!(
                                !is_error,
                                "{method} {path} {status}: example {name} is not an error"
                            );
                            continue;
                        };
                        assert!(is_error, "{method} {path} {status}: error example {name}");
                        assert_eq!(
                            code, name,
                            "{method} {path} {status}: examples are named by their code"
                        );
                        assert!(
                            documented.contains(code),
                            "{method} {path}: {code} is not in ErrorCode"
                        );
                        if let Some(expected) = statuses.get(code) {
                            assert_eq!(
                                status,
                                expected.to_string(),
                                "{method} {path}: {code} is answered with"
                            );
                        }
                        used.insert(code.to_string());
                    }
                }
            }
        }
    }
    // `not_found` is answered only by the router's fallback, for paths the document does not have.
    let unused: Vec<_> = codes
        .iter()
        .filter(|c| !used.contains(*c) && c.as_str() != "not_found")
        .collect();
    assert!(
        unused.is_empty(),
        "error codes no operation documents: {unused:?}"
    );
}
