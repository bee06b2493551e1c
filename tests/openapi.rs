#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `openapi.yaml` cannot drift from the code. One listener serves two routers, merged: the
//! ledger's (`src/api/mod.rs`) and the admin API's (`gateway-core/src/admin.rs`). Every route of
//! either is documented and every documented operation is routed, tagged with the router that
//! serves it; every error code either can answer is documented, with the status it is answered
//! with; request bodies refuse unknown fields; secrets appear in responses only where the
//! document says. Reads the sources; needs no database.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;

use serde_norway::Value;

const METHODS: [&str; 8] = [
    "get", "post", "put", "delete", "patch", "head", "options", "trace",
];

/// The routers merged into the one HTTP server (`server::run_with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Api {
    Ledger,
    Admin,
}

impl Api {
    const ALL: [Api; 2] = [Api::Ledger, Api::Admin];

    /// The file whose `.route(..)` calls build this API's router.
    fn router_file(self) -> &'static str {
        match self {
            Api::Ledger => "src/api/mod.rs",
            Api::Admin => "gateway-core/src/admin.rs",
        }
    }

    /// The tag every operation of this API carries.
    fn tag(self) -> &'static str {
        match self {
            Api::Ledger => "ledger",
            Api::Admin => "admin",
        }
    }

    /// Fewer routes than this means the source was misread.
    fn min_routes(self) -> usize {
        match self {
            Api::Ledger => 10,
            Api::Admin => 5,
        }
    }
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

/// Every operation of the document: `(path, method, operation)`.
fn operations(d: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in entries(&d["paths"]) {
        for (method, op) in entries(item) {
            if METHODS.contains(&method.as_str()) {
                out.push((path.clone(), method, op));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Reading Rust sources

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn read_text(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A Rust source file, lexed just enough to search its code.
struct Source {
    name: &'static str,
    text: String,
    /// `text` with every comment and the contents of every string and char literal blanked to
    /// spaces: searching it finds code only, at the byte offsets of `text`.
    code: String,
    /// The string literals: the byte range between their quotes, escapes not decoded.
    literals: Vec<Range<usize>>,
}

impl Source {
    /// The file, without its test modules.
    fn read(rel: &'static str) -> Source {
        Source::lex(rel, read_text(rel)).without_test_modules()
    }

    /// Blanks every `#[cfg(test)] mod .. { .. }` like a comment.
    fn without_test_modules(mut self) -> Source {
        let src = &mut self;
        let mut from = 0;
        while let Some(f) = src.code[from..].find("#[cfg(test)]") {
            let at = from + f;
            from = at + "#[cfg(test)]".len();
            if !src.code[from..].trim_start().starts_with("mod ") {
                continue;
            }
            let end = src.delimited(from, b'{', b'}').end + 1;
            let mut code = std::mem::take(&mut src.code).into_bytes();
            for c in &mut code[at..end] {
                if *c != b'\n' {
                    *c = b' ';
                }
            }
            src.code = String::from_utf8(code).expect("only ASCII was blanked");
            src.literals.retain(|r| r.start <= at || r.start > end);
            from = end;
        }
        self
    }

    /// Knows line and (nested) block comments, strings, byte strings, raw strings, char
    /// literals (so `'"'` opens no string) and lifetimes. Enough for the files read here.
    fn lex(name: &'static str, text: String) -> Source {
        let b = text.as_bytes();
        let mut code = b.to_vec();
        let mut literals = Vec::new();
        let blank = |code: &mut Vec<u8>, r: Range<usize>| {
            for c in &mut code[r] {
                if *c != b'\n' {
                    *c = b' ';
                }
            }
        };
        let find_from = |from: usize, needle: &str| {
            text[from.min(b.len())..]
                .find(needle)
                .map_or(b.len(), |f| from + f)
        };
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'/' if b.get(i + 1) == Some(&b'/') => {
                    let end = find_from(i, "\n");
                    blank(&mut code, i..end);
                    i = end;
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    let (mut depth, mut j) = (0usize, i);
                    while j < b.len() {
                        if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                            depth += 1;
                            j += 2;
                        } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                            depth -= 1;
                            j += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            j += 1;
                        }
                    }
                    let end = j.min(b.len());
                    blank(&mut code, i..end);
                    i = end;
                }
                b'r' if {
                    let prefix_ok = |at: usize| at == 0 || !is_ident_byte(b[at - 1]);
                    (prefix_ok(i) || (i > 0 && b[i - 1] == b'b' && prefix_ok(i - 1)))
                        && matches!(b.get(i + 1), Some(b'"' | b'#'))
                } =>
                {
                    let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
                    let open = i + 1 + hashes;
                    if b.get(open) != Some(&b'"') {
                        i += 1;
                        continue;
                    }
                    let close = format!("\"{}", "#".repeat(hashes));
                    let end = find_from(open + 1, &close);
                    literals.push(open + 1..end);
                    blank(&mut code, open + 1..end);
                    i = end + close.len();
                }
                b'"' => {
                    let mut j = i + 1;
                    while j < b.len() && b[j] != b'"' {
                        j += if b[j] == b'\\' { 2 } else { 1 };
                    }
                    let end = j.min(b.len());
                    literals.push(i + 1..end);
                    blank(&mut code, i + 1..end);
                    i = end + 1;
                }
                b'\'' => {
                    if b.get(i + 1) == Some(&b'\\') {
                        let end = find_from(i + 3, "'");
                        blank(&mut code, i + 1..end);
                        i = end + 1;
                    } else {
                        let len = text[i + 1..].chars().next().map_or(0, char::len_utf8);
                        if len > 0 && b.get(i + 1 + len) == Some(&b'\'') {
                            blank(&mut code, i + 1..i + 1 + len);
                            i += len + 2;
                        } else {
                            // A lifetime or a label.
                            i += 1;
                        }
                    }
                }
                _ => i += 1,
            }
        }
        let code = String::from_utf8(code).expect("blanking whole characters keeps UTF-8");
        Source {
            name,
            text,
            code,
            literals,
        }
    }

    /// The whole file.
    fn all(&self) -> Range<usize> {
        0..self.code.len()
    }

    /// The string literals that open inside `within`.
    fn literals_in(&self, within: &Range<usize>) -> impl Iterator<Item = (Range<usize>, &str)> {
        self.literals
            .iter()
            .filter(move |r| r.start > within.start && r.start <= within.end)
            .map(|r| (r.clone(), &self.text[r.clone()]))
    }

    /// The code between the bracket that opens at or after `from` and its match.
    fn delimited(&self, from: usize, open: u8, close: u8) -> Range<usize> {
        let code = self.code.as_bytes();
        let start = from
            + self.code[from..]
                .find(char::from(open))
                .unwrap_or_else(|| panic!("{}: no opening bracket after {from}", self.name));
        let mut depth = 0usize;
        for (i, &c) in code.iter().enumerate().skip(start) {
            if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return start + 1..i;
                }
            }
        }
        panic!("{}: unbalanced brackets after offset {from}", self.name)
    }

    /// The body of the one `fn name(..)` (or `fn name<..>(..)`) of the file.
    fn fn_body(&self, name: &str) -> Range<usize> {
        let needle = format!("fn {name}");
        let found: Vec<_> = self
            .code
            .match_indices(&needle)
            .map(|(at, _)| at)
            .filter(|at| {
                matches!(
                    self.code.as_bytes().get(at + needle.len()),
                    Some(b'(' | b'<')
                )
            })
            .collect();
        let [at] = found[..] else {
            panic!(
                "{}: expected one `fn {name}`, found {}",
                self.name,
                found.len()
            );
        };
        let params = self.delimited(at, b'(', b')');
        self.delimited(params.end, b'{', b'}')
    }

    /// Offsets of calls `name(` in `within`: `name` not preceded by an identifier character
    /// (nor by `.` when `free` is set: a free function, not a method).
    fn calls(&self, within: &Range<usize>, name: &str, free: bool) -> Vec<usize> {
        let code = &self.code[within.clone()];
        let needle = format!("{name}(");
        code.match_indices(&needle)
            .map(|(at, _)| at)
            .filter(|&at| {
                let prev = code.as_bytes()[..at].last().copied();
                !prev.is_some_and(|p| is_ident_byte(p) || (free && p == b'.'))
            })
            .map(|at| within.start + at)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Routes

/// `(path, method)` of every `.route("PATH", get(..).post(..))` of one router file, outside its
/// test module. Calls may span lines and chain methods.
fn routes_of(api: Api) -> BTreeSet<(String, String)> {
    let src = Source::read(api.router_file());
    let scope = src.all();
    for escape in [
        ".nest(",
        ".nest_service(",
        ".merge(",
        ".route_service(",
        ".on(",
    ] {
        assert!(
            !src.code[scope.clone()].contains(escape),
            "{} uses `{escape}`, which this test cannot read routes from; teach it",
            src.name
        );
    }
    for free in ["any", "on", "any_service", "on_service", "get_service"] {
        assert!(
            src.calls(&scope, free, true).is_empty(),
            "{} routes with `{free}(..)`, which this test cannot read methods from; teach it",
            src.name
        );
    }
    let mut out = BTreeSet::new();
    for at in src.calls(&scope, ".route", false) {
        let args = src.delimited(at, b'(', b')');
        let (path_range, path) = src
            .literals_in(&args)
            .next()
            .unwrap_or_else(|| panic!("{}: a .route(..) without a path literal", src.name));
        assert!(
            src.code[args.start..path_range.start - 1].trim().is_empty(),
            "{}: the path of .route({}) is not a literal",
            src.name,
            &src.text[args.clone()]
        );
        let handlers = path_range.end + 1..args.end;
        let mut methods = 0;
        for m in METHODS {
            for _ in src.calls(&handlers, m, false) {
                assert!(
                    out.insert((path.to_string(), m.to_string())),
                    "{}: {m} {path} routed twice",
                    src.name
                );
                methods += 1;
            }
        }
        assert!(
            methods > 0,
            "{}: no method found for route {path}: {}",
            src.name,
            &src.text[args]
        );
    }
    assert!(
        out.len() >= api.min_routes(),
        "{}: suspiciously few routes found: {out:?}",
        src.name
    );
    out
}

/// Every operation served, and the router that serves it. Merging routers that both route a
/// method on a path panics at startup, and so does this.
fn routes() -> BTreeMap<(String, String), Api> {
    let mut out = BTreeMap::new();
    for api in Api::ALL {
        for op in routes_of(api) {
            if let Some(other) = out.insert(op.clone(), api) {
                panic!("{} {} is routed by both {other:?} and {api:?}", op.1, op.0);
            }
        }
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
        read_text("openapi.yaml"),
        "the served document is the file"
    );
}

#[test]
fn routers_and_document_list_the_same_operations() {
    let routed = routes();
    let documented = documented_operations(&doc());
    let undocumented: Vec<_> = routed
        .iter()
        .filter(|(op, _)| !documented.contains(*op))
        .map(|((path, method), api)| format!("{method} {path} ({api:?} router)"))
        .collect();
    let unrouted: Vec<_> = documented
        .iter()
        .filter(|op| !routed.contains_key(*op))
        .collect();
    assert!(
        undocumented.is_empty(),
        "routed but not in openapi.yaml: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "in openapi.yaml but routed by neither router: {unrouted:?}"
    );
}

#[test]
fn route_reader_understands_multi_line_routes_and_method_chains() {
    let src = Source::lex(
        "example",
        r#"
        fn router() -> Router {
            // .route("/commented", get(nothing))
            Router::new()
                .route(
                    "/a/{id}",
                    put(x).delete(y),
                )
                .route("/b", get(b).post(c)) /* .route("/c", get(c)) */
                .route("/d(", patch(budget(d)))
        }
        fn other(c: char) -> bool { c == '"' || c == '\'' && "x".chars().any(|c| c == 'y') }
        fn after<'a>(s: &'a str) -> &'a str { s }
        #[cfg(test)]
        mod tests { fn t() { Router::new().route("/test-only", get(t)); } }
        "#
        .to_string(),
    )
    .without_test_modules();
    let scope = src.all();
    let found: Vec<_> = src
        .calls(&scope, ".route", false)
        .into_iter()
        .map(|at| {
            let args = src.delimited(at, b'(', b')');
            let (r, path) = src.literals_in(&args).next().unwrap();
            let handlers = r.end + 1..args.end;
            let methods: Vec<_> = METHODS
                .iter()
                .filter(|m| !src.calls(&handlers, m, false).is_empty())
                .collect();
            format!("{path} {methods:?}")
        })
        .collect();
    assert_eq!(
        found,
        [
            r#"/a/{id} ["put", "delete"]"#,
            r#"/b ["get", "post"]"#,
            r#"/d( ["patch"]"#
        ]
    );
    assert!(
        src.calls(&scope, "any", true).is_empty(),
        "`.any(` is a method"
    );
    assert_eq!(src.fn_body("after").len(), " s ".len());
}

#[test]
fn operations_are_tagged_with_the_router_that_serves_them() {
    let d = doc();
    let declared: BTreeSet<&str> = d["tags"]
        .as_sequence()
        .expect("top-level tags")
        .iter()
        .map(|t| t["name"].as_str().expect("tag name"))
        .collect();
    for api in Api::ALL {
        assert!(
            declared.contains(api.tag()),
            "tag {} is not declared",
            api.tag()
        );
    }
    let routed = routes();
    for (path, method, op) in operations(&d) {
        let tags: Vec<&str> = op["tags"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{method} {path}: tags"))
            .iter()
            .map(|t| t.as_str().expect("tags are strings"))
            .collect();
        for t in &tags {
            assert!(declared.contains(t), "{method} {path}: undeclared tag {t}");
        }
        let Some(api) = routed.get(&(path.clone(), method.clone())) else {
            continue; // Reported by routers_and_document_list_the_same_operations.
        };
        let split: Vec<Api> = Api::ALL
            .into_iter()
            .filter(|a| tags.contains(&a.tag()))
            .collect();
        assert_eq!(
            split,
            [*api],
            "{method} {path} is served by the {api:?} router; its tags: {tags:?}"
        );
    }
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

// ---------------------------------------------------------------------------------------------
// Request and response bodies

/// Every property reachable from a schema through `$ref`, `allOf`/`anyOf`/`oneOf`,
/// `properties`, `items` and `additionalProperties`: its name and its schema.
fn properties<'a>(
    root: &'a Value,
    schema: &'a Value,
    seen: &mut BTreeSet<String>,
    out: &mut Vec<(String, &'a Value)>,
) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        if seen.insert(r.to_string()) {
            properties(root, resolve(root, schema), seen, out);
        }
        return;
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for s in schema
            .get(key)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            properties(root, s, seen, out);
        }
    }
    for (name, s) in entries(&schema["properties"]) {
        out.push((name, s));
        properties(root, s, seen, out);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(s) = schema.get(key).filter(|s| s.is_mapping()) {
            properties(root, s, seen, out);
        }
    }
}

/// Every mapping key of a value, at any depth.
fn value_keys(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                out.insert(key_str(k));
                value_keys(child, out);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|child| value_keys(child, out)),
        _ => {}
    }
}

/// The example values of a media type object.
fn example_values<'a>(root: &'a Value, media: &'a Value) -> Vec<&'a Value> {
    let mut out: Vec<&Value> = media.get("example").into_iter().collect();
    for (_, example) in entries(&media["examples"]) {
        out.push(&resolve(root, example)["value"]);
    }
    out
}

#[test]
fn request_bodies_refuse_unknown_fields() {
    let d = doc();
    let mut bodies = 0;
    for (path, method, op) in operations(&d) {
        let Some(body) = op.get("requestBody") else {
            continue;
        };
        for (media_type, media) in entries(&resolve(&d, body)["content"]) {
            let schema = resolve(&d, &media["schema"]);
            let closed = [
                &schema["additionalProperties"],
                &schema["unevaluatedProperties"],
            ]
            .iter()
            .any(|v| v.as_bool() == Some(false));
            assert!(
                closed,
                "{method} {path} {media_type}: the body schema must refuse unknown properties, \
                 as the handler's deny_unknown_fields does"
            );
            bodies += 1;
        }
    }
    assert!(bodies >= 9, "suspiciously few request bodies: {bodies}");

    // And the handlers do: every JSON body type defined in a router file denies unknown fields.
    for api in Api::ALL {
        let src = Source::read(api.router_file());
        let scope = src.all();
        let mut checked = 0;
        for extractor in ["ApiJson", "AdminJson"] {
            // `ApiJson(x): ApiJson<Name>`; `AdminJson<T>` of the extractor's own impl is skipped
            // below, as `struct T` is defined nowhere.
            let needle = format!("{extractor}<");
            for (at, _) in src.code[scope.clone()].match_indices(&needle) {
                let name: String = src.code[at + needle.len()..]
                    .bytes()
                    .take_while(|b| is_ident_byte(*b))
                    .map(char::from)
                    .collect();
                let Some(def) = src.code[scope.clone()].find(&format!("struct {name} ")) else {
                    continue; // Generic, or defined in another crate.
                };
                let item_start = src.code[..def].rfind(['}', ';']).map_or(0, |p| p + 1);
                assert!(
                    src.code[item_start..def].contains("deny_unknown_fields"),
                    "{}: the request body {name} does not deny unknown fields",
                    src.name
                );
                checked += 1;
            }
        }
        assert!(
            checked > 0,
            "{}: no request body type found; teach this test",
            src.name
        );
    }
}

#[test]
fn secrets_are_returned_only_where_documented() {
    let d = doc();
    let mut token_shown = Vec::new();
    let mut provider_key_written = 0;
    for (path, method, op) in operations(&d) {
        for (status, response) in entries(&op["responses"]) {
            for (_, media) in entries(&resolve(&d, response)["content"]) {
                let mut props = Vec::new();
                properties(&d, &media["schema"], &mut BTreeSet::new(), &mut props);
                let mut names: BTreeSet<String> = props.into_iter().map(|(n, _)| n).collect();
                for example in example_values(&d, media) {
                    value_keys(example, &mut names);
                }
                assert!(
                    !names.contains("api_key"),
                    "{method} {path} {status}: provider keys are write-only; only `masked` is returned"
                );
                if names.contains("token") {
                    token_shown.push(format!("{method} {path} {status}"));
                }
            }
        }
        if let Some(body) = op.get("requestBody") {
            for (_, media) in entries(&resolve(&d, body)["content"]) {
                let mut props = Vec::new();
                properties(&d, &media["schema"], &mut BTreeSet::new(), &mut props);
                for (name, schema) in props {
                    if name == "api_key" {
                        assert_eq!(
                            resolve(&d, schema)["writeOnly"].as_bool(),
                            Some(true),
                            "{method} {path}: api_key is writeOnly"
                        );
                        provider_key_written += 1;
                    }
                }
            }
        }
    }
    assert_eq!(
        token_shown,
        ["post /v1/accounts/{account_id}/keys 201"],
        "a gateway API key's token is shown once, by the response that creates the key"
    );
    assert!(
        provider_key_written >= 2,
        "adding and rotating take api_key"
    );
}

// ---------------------------------------------------------------------------------------------
// Error codes

fn status_of(name: &str) -> u16 {
    match name {
        "BAD_REQUEST" => 400,
        "NOT_FOUND" => 404,
        "CONFLICT" => 409,
        "PAYLOAD_TOO_LARGE" => 413,
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

/// The error codes one API answers with, and the status of each where the source pairs them.
#[derive(Debug, Default)]
struct Codes {
    codes: BTreeSet<String>,
    statuses: BTreeMap<String, u16>,
}

impl Codes {
    fn pair(&mut self, src: &Source, code: &str, status: u16) {
        assert_eq!(
            *self.statuses.entry(code.to_string()).or_insert(status),
            status,
            "{}: {code} has two statuses",
            src.name
        );
    }

    /// The code literals of a function body (not those of `starts_with(..)`), and the
    /// statuses of `StatusCode::NAME, "code"` pairs.
    fn read_fn(&mut self, src: &Source, name: &str) {
        let body = src.fn_body(name);
        for (range, lit) in src.literals_in(&body) {
            if is_code(lit)
                && !src.code[..range.start - 1]
                    .trim_end()
                    .ends_with("starts_with(")
            {
                self.codes.insert(lit.to_string());
            }
        }
        let text = &src.text[body.clone()];
        let mut from = 0;
        while let Some(f) = src.code[body.start + from..body.end].find("StatusCode::") {
            let at = from + f + "StatusCode::".len();
            let name_len = text[at..].bytes().take_while(|b| is_ident_byte(*b)).count();
            let status = status_of(&text[at..at + name_len]);
            let literal = text[at + name_len..]
                .trim_start()
                .strip_prefix(',')
                .map(str::trim_start)
                .and_then(|r| r.strip_prefix('"'))
                .and_then(|r| r.split('"').next())
                .filter(|lit| is_code(lit));
            if let Some(lit) = literal {
                self.pair(src, lit, status);
            }
            from = at;
        }
    }
}

/// The ledger: `domain_status` and `ApiError::parts`, and every `ApiError::bad_request(..)`.
fn ledger_codes() -> Codes {
    let error_rs = Source::read("src/api/error.rs");
    let mut c = Codes::default();
    c.read_fn(&error_rs, "domain_status");
    c.read_fn(&error_rs, "parts");
    // The arm of `ApiError::BadRequest` gives the status of every `bad_request(..)` code.
    let parts = error_rs.fn_body("parts");
    let arm = parts.start
        + error_rs.code[parts.clone()]
            .find("ApiError::BadRequest")
            .expect("the ApiError::BadRequest arm of parts()");
    let at = arm
        + error_rs.code[arm..]
            .find("StatusCode::")
            .expect("a status in the BadRequest arm")
        + "StatusCode::".len();
    let name: String = error_rs.code[at..]
        .bytes()
        .take_while(|b| is_ident_byte(*b))
        .map(char::from)
        .collect();
    let bad_request_status = status_of(&name);
    // Codes passed to `ApiError::bad_request(...)` anywhere in the API module.
    for file in ["src/api/mod.rs", "src/api/extract.rs", "src/api/error.rs"] {
        let src = Source::read(file);
        for (range, lit) in src.literals_in(&src.all()) {
            if src.code[..range.start - 1]
                .trim_end()
                .ends_with("bad_request(")
            {
                assert!(is_code(lit), "{file}: bad_request code {lit:?}");
                c.pair(&src, lit, bad_request_status);
                c.codes.insert(lit.to_string());
            }
        }
    }
    assert!(
        c.codes.len() >= 15,
        "ledger: suspiciously few error codes found: {:?}",
        c.codes
    );
    c
}

/// The admin API: `AdminError::parts`, where every code is paired with its status.
fn admin_codes() -> Codes {
    let src = Source::read(Api::Admin.router_file());
    let mut c = Codes::default();
    c.read_fn(&src, "parts");
    let unpaired: Vec<_> = c
        .codes
        .iter()
        .filter(|code| !c.statuses.contains_key(*code))
        .collect();
    assert!(
        unpaired.is_empty(),
        "{}: codes of AdminError::parts without a `StatusCode::X, \"code\"` pair: {unpaired:?}",
        src.name
    );
    assert!(
        c.codes.len() >= 10,
        "admin: suspiciously few error codes found: {:?}",
        c.codes
    );
    c
}

fn source_codes() -> BTreeMap<Api, Codes> {
    Api::ALL
        .into_iter()
        .map(|api| {
            let codes = match api {
                Api::Ledger => ledger_codes(),
                Api::Admin => admin_codes(),
            };
            (api, codes)
        })
        .collect()
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
    let by_api = source_codes();
    let text = tally::api::OPENAPI_YAML;
    let documented = documented_codes(&doc());
    let mut all = BTreeSet::new();
    for (api, c) in &by_api {
        let missing_text: Vec<_> = c
            .codes
            .iter()
            .filter(|code| !text.contains(code.as_str()))
            .collect();
        assert!(
            missing_text.is_empty(),
            "{api:?} error codes absent from openapi.yaml: {missing_text:?}"
        );
        let missing: Vec<_> = c.codes.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "{api:?} error codes missing from ErrorCode: {missing:?}"
        );
        all.extend(c.codes.iter().cloned());
    }
    let stale: Vec<_> = documented.difference(&all).collect();
    assert!(
        stale.is_empty(),
        "ErrorCode lists codes neither API answers: {stale:?}"
    );
}

/// `ErrorCode`'s description has one table row per code, `| `code` | status | meaning |`, and
/// the status is the one every API that answers the code pairs it with.
#[test]
fn error_code_table_gives_each_code_its_status() {
    let d = doc();
    let description = d["components"]["schemas"]["ErrorCode"]["description"]
        .as_str()
        .expect("ErrorCode.description");
    let mut table = BTreeMap::new();
    for row in description.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let code = cells[1].trim_matches('`').to_string();
        let status: u16 = cells[2]
            .parse()
            .unwrap_or_else(|_| panic!("ErrorCode table: status of {code}"));
        assert!(
            table.insert(code.clone(), status).is_none(),
            "ErrorCode table: {code} twice"
        );
    }
    let documented = documented_codes(&d);
    assert_eq!(
        table.keys().cloned().collect::<BTreeSet<_>>(),
        documented,
        "ErrorCode table rows vs enum"
    );
    for (api, c) in source_codes() {
        for (code, status) in &c.statuses {
            assert_eq!(
                table.get(code),
                Some(status),
                "ErrorCode table: the {api:?} API answers {code} with {status}"
            );
        }
    }
}

#[test]
fn error_examples_use_documented_codes_with_their_statuses() {
    let d = doc();
    let by_api = source_codes();
    let routed = routes();
    let documented = documented_codes(&d);
    let mut used: BTreeMap<Api, BTreeSet<String>> = BTreeMap::new();
    for (path, method, op) in operations(&d) {
        let Some(&api) = routed.get(&(path.clone(), method.clone())) else {
            continue; // Reported by routers_and_document_list_the_same_operations.
        };
        let source = &by_api[&api];
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
                    assert!(
                        source.codes.contains(code),
                        "{method} {path}: the {api:?} API never answers {code}"
                    );
                    if let Some(expected) = source.statuses.get(code) {
                        assert_eq!(
                            status,
                            expected.to_string(),
                            "{method} {path}: the {api:?} API answers {code} with"
                        );
                    }
                    used.entry(api).or_default().insert(code.to_string());
                }
            }
        }
    }
    // The ledger answers `not_found` only from the router's fallback, for paths the document
    // does not have.
    let fallback_only = |api: Api, code: &str| api == Api::Ledger && code == "not_found";
    for (api, source) in &by_api {
        let used = used.get(api).cloned().unwrap_or_default();
        let unused: Vec<_> = source
            .codes
            .iter()
            .filter(|c| !used.contains(*c) && !fallback_only(*api, c))
            .collect();
        assert!(
            unused.is_empty(),
            "{api:?} error codes no {api:?} operation documents: {unused:?}"
        );
    }
}
