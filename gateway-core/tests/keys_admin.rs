//! Gateway API keys, provider keys and custom providers through the admin API, in process,
//! against real PostgreSQL: tokens verify only as issued, secrets never come back or sit in the
//! database in clear, and the key ring serves credentials in lookup order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, TimeZone, Utc};
use http_body_util::BodyExt as _;
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use sqlx::PgPool;
use tally_gateway_core::admin::{AdminState, router};
use tally_gateway_core::keys::{AuthError, KeyRing};
use tally_gateway_core::secrets::{self, Kek, Sealed};
use tally_ingest::{BatchMode, Store};
use tally_ledger::event::AccountOpened;
use tally_ledger::{CredentialKind, Event, EventBody, Money};
use tower::ServiceExt as _;
use uuid::Uuid;

const KEK_BYTES: [u8; 32] = [42; 32];

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2028, 3, 1, 12, 0, 0).unwrap()
}

struct Harness {
    pool: PgPool,
    ring: Arc<KeyRing>,
    app: Router,
    clock: Arc<Mutex<DateTime<Utc>>>,
}

impl Harness {
    async fn new(pool: PgPool) -> Harness {
        let now = t0();
        let store = Store::open(pool.clone(), now).await.unwrap();
        for account in ["acme", "globex"] {
            let opened = Event {
                event_id: Uuid::new_v4(),
                occurred_at: now,
                account_id: account.to_string(),
                body: EventBody::AccountOpened(AccountOpened {
                    name: format!("{account} inc"),
                    low_balance_threshold_usd: Money::ZERO,
                }),
            };
            store
                .ingest(&[opened], BatchMode::AllOrNothing, now)
                .await
                .unwrap();
        }
        let kek = Arc::new(Kek::from_base64(&STANDARD.encode(KEK_BYTES)).unwrap());
        let ring = Arc::new(KeyRing::load(&pool, kek).await.unwrap());
        let clock = Arc::new(Mutex::new(now));
        let c = Arc::clone(&clock);
        let state = AdminState::new(
            pool.clone(),
            Arc::clone(&ring),
            Arc::new(move || *c.lock().unwrap()),
        );
        Harness {
            pool,
            ring,
            app: router(state),
            clock,
        }
    }

    fn advance(&self, by: Duration) {
        *self.clock.lock().unwrap() += by;
    }

    fn now(&self) -> DateTime<Utc> {
        *self.clock.lock().unwrap()
    }

    /// Sends a request; returns the status, the parsed body (Null when empty) and the raw text.
    async fn send(
        &self,
        method: Method,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value, String) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        self.send_request(req).await
    }

    async fn send_request(&self, req: Request<Body>) -> (StatusCode, Value, String) {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (status, value, text)
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value, String) {
        self.send(Method::POST, uri, Some(&body.to_string())).await
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value, String) {
        self.send(Method::GET, uri, None).await
    }

    /// Creates a gateway API key; returns (key_id, token).
    async fn create_key(&self, account: &str, endpoint: &str) -> (String, String) {
        let (status, body, _) = self
            .post(
                &format!("/v1/accounts/{account}/keys"),
                json!({"endpoint_id": endpoint}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["key_id"].as_str().unwrap().to_string(),
            body["token"].as_str().unwrap().to_string(),
        )
    }

    /// Adds a provider key; returns its credential id.
    async fn add_provider_key(&self, account: &str, body: Value) -> String {
        let (status, resp, _) = self
            .post(&format!("/v1/accounts/{account}/provider-keys"), body)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{resp}");
        resp["credential_id"].as_str().unwrap().to_string()
    }

    fn lookup(&self, account: &str, api_key_id: Option<&str>, provider: &str) -> Vec<String> {
        self.ring
            .credentials_for(account, api_key_id, provider)
            .iter()
            .map(|c| c.credential_id.clone())
            .collect()
    }
}

fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn canary() -> String {
    format!("sk-canary-{}", Uuid::new_v4().simple())
}

/// Every column of every row of `table`, as text.
async fn table_text(pool: &PgPool, table: &str) -> String {
    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select row_to_json(t)::text from {table} t"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.join("\n")
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn a_created_key_verifies_and_nothing_else_does(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (status, body, _) = h
        .post(
            "/v1/accounts/acme/keys",
            json!({"endpoint_id": "ep_main", "description": "team a", "metadata": {"team": "a"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let key_id = body["key_id"].as_str().unwrap().to_string();
    let token = body["token"].as_str().unwrap().to_string();
    let prefix = body["prefix"].as_str().unwrap().to_string();
    assert_eq!(prefix, format!("tly_{key_id}"));
    assert!(token.starts_with(&format!("{prefix}_")));
    assert_eq!(body["endpoint_id"], "ep_main");
    assert_eq!(body["description"], "team a");
    assert_eq!(body["metadata"], json!({"team": "a"}));
    assert_eq!(body["created_at"], json!(t0()));

    let verified = h.ring.verify(&token, "ep_main").unwrap();
    assert_eq!(&*verified.key_id, key_id);
    assert_eq!(&*verified.account_id, "acme");
    assert_eq!(&*verified.endpoint_id, "ep_main");
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    assert_eq!(h.ring.authenticate(&headers, "ep_main").unwrap(), verified);
    assert_eq!(
        h.ring.authenticate(&HeaderMap::new(), "ep_main"),
        Err(AuthError::Missing)
    );

    // A forged secret with the real key id never verifies.
    for n in 0..200u32 {
        let mut secret = [0u8; 32];
        secret[..4].copy_from_slice(&n.to_be_bytes());
        let forged = format!("{prefix}_{}", URL_SAFE_NO_PAD.encode(secret));
        assert_eq!(h.ring.verify(&forged, "ep_main"), Err(AuthError::Unknown));
    }
    let mut flipped = token.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'Q' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    assert!(h.ring.verify(&flipped, "ep_main").is_err());
    assert_eq!(
        h.ring.verify(
            "tly_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "ep_main"
        ),
        Err(AuthError::Unknown)
    );
    assert_eq!(
        h.ring.verify("sk-nope", "ep_main"),
        Err(AuthError::Malformed)
    );
    assert_eq!(h.ring.verify("", "ep_main"), Err(AuthError::Missing));

    // The right token on another endpoint is refused, distinctly.
    let wrong = h.ring.verify(&token, "ep_other").unwrap_err();
    assert_eq!(wrong, AuthError::WrongEndpoint);
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    assert_eq!(AuthError::Unknown.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(AuthError::Revoked.code(), AuthError::Unknown.code());

    // Revocation takes effect at the next verify.
    let (status, body, _) = h
        .post(
            &format!("/v1/accounts/acme/keys/{key_id}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked_at"], json!(t0()));
    assert_eq!(h.ring.verify(&token, "ep_main"), Err(AuthError::Revoked));
    h.advance(Duration::hours(1));
    let (status, body, _) = h
        .post(
            &format!("/v1/accounts/acme/keys/{key_id}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["revoked_at"],
        json!(t0()),
        "the first revocation time stays"
    );

    // Another account cannot revoke it, and unknown ids are 404.
    let (status, body, _) = h
        .post(
            &format!("/v1/accounts/globex/keys/{key_id}/revoke"),
            json!({}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "key_not_found");
    let (status, body, _) = h
        .post("/v1/accounts/acme/keys/0123456789abcdef/revoke", json!({}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "key_not_found");
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn listing_keys_never_shows_token_or_hash(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (key_id, token) = h.create_key("acme", "ep_main").await;
    let (_, token_b) = h.create_key("acme", "ep_batch").await;
    let secret = token.splitn(3, '_').nth(2).unwrap().to_string();
    let hash: Vec<u8> =
        sqlx::query_scalar("select secret_hash from gateway_api_key where key_id = $1")
            .bind(&key_id)
            .fetch_one(&h.pool)
            .await
            .unwrap();

    let (status, body, raw) = h.get("/v1/accounts/acme/keys").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys = body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    for k in keys {
        assert!(
            k.get("token").is_none() && k.get("secret_hash").is_none(),
            "{k}"
        );
    }
    for leak in [
        &token,
        &token_b,
        &secret,
        &hex::encode(&hash),
        &STANDARD.encode(&hash),
    ] {
        assert!(!raw.contains(leak.as_str()), "list leaked {leak}");
    }
    let (status, body, _) = h.get("/v1/accounts/globex/keys").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["keys"], json!([]));

    // The database holds the hash of the secret, never the token or the secret.
    let stored = table_text(&h.pool, "gateway_api_key").await;
    assert!(!stored.contains(&token) && !stored.contains(&secret));

    // Uses are recorded in memory, shown before they are flushed, then written in one go.
    let used_at = h.now() + Duration::minutes(5);
    h.ring.touch(&key_id, used_at);
    h.ring.touch(&key_id, used_at - Duration::minutes(1));
    h.ring.touch("ffffffffffffffff", used_at);
    let (_, body, _) = h.get("/v1/accounts/acme/keys").await;
    let listed = body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == key_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed["last_used_at"], json!(used_at));
    assert_eq!(h.ring.flush_last_used(&h.pool).await.unwrap(), 1);
    assert_eq!(h.ring.pending_last_used(&key_id), None);
    assert_eq!(h.ring.flush_last_used(&h.pool).await.unwrap(), 0);
    let stored: Option<DateTime<Utc>> =
        sqlx::query_scalar("select last_used_at from gateway_api_key where key_id = $1")
            .bind(&key_id)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(stored, Some(used_at));
    // An older use flushed later never moves it back.
    h.ring.touch(&key_id, used_at - Duration::hours(1));
    h.ring.flush_last_used(&h.pool).await.unwrap();
    let stored: Option<DateTime<Utc>> =
        sqlx::query_scalar("select last_used_at from gateway_api_key where key_id = $1")
            .bind(&key_id)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(stored, Some(used_at));
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn provider_keys_are_masked_sealed_and_bound_to_their_account(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (key_id, token) = h.create_key("acme", "ep_main").await;
    let byok = canary();
    let attached = canary();

    let (status, body, raw) = h
        .post(
            "/v1/accounts/acme/provider-keys",
            json!({"provider": "openai", "api_key": byok, "kind": "byok"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(!raw.contains(&byok));
    assert_eq!(body["masked"], secrets::mask(&byok));
    assert_eq!(
        body["masked"].as_str().unwrap(),
        format!("sk-…{}", &byok[byok.len() - 4..])
    );
    assert_eq!(body["kind"], "byok");
    assert_eq!(body["position"], 0);
    let byok_id = body["credential_id"].as_str().unwrap().to_string();
    assert!(byok_id.starts_with("cred_"));
    let attached_id = h
        .add_provider_key(
            "acme",
            json!({"provider": "openai", "api_key": attached, "kind": "attached", "api_key_id": key_id}),
        )
        .await;

    // Nothing shown after creation carries a key or the gateway token.
    let mut shown = String::new();
    for uri in [
        "/v1/accounts/acme/provider-keys",
        "/v1/accounts/acme/keys",
        "/v1/accounts/acme/custom-providers",
    ] {
        let (status, _, raw) = h.get(uri).await;
        assert_eq!(status, StatusCode::OK);
        shown.push_str(&raw);
    }
    let (_, listed, _) = h.get("/v1/accounts/acme/provider-keys").await;
    let listed = listed["provider_keys"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    for c in listed {
        assert!(
            c.get("api_key").is_none() && c.get("ciphertext").is_none(),
            "{c}"
        );
        assert!(c["masked"].as_str().unwrap().contains('…'));
    }
    for leak in [&byok, &attached, &token] {
        assert!(!shown.contains(leak.as_str()), "a response leaked {leak}");
    }

    // Nor does the database, in any column.
    let stored = format!(
        "{}\n{}",
        table_text(&h.pool, "provider_credential").await,
        table_text(&h.pool, "gateway_api_key").await
    );
    for leak in [&byok, &attached, &token] {
        assert!(!stored.contains(leak.as_str()));
    }
    let rows: Vec<(String, Vec<u8>, Vec<u8>)> =
        sqlx::query_as("select credential_id, nonce, ciphertext from provider_credential")
            .fetch_all(&h.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    let kek = Kek::from_base64(&STANDARD.encode(KEK_BYTES)).unwrap();
    for (credential_id, nonce, ciphertext) in rows {
        for leak in [&byok, &attached] {
            assert!(!contains_bytes(&ciphertext, leak.as_bytes()));
        }
        let sealed = Sealed::from_parts(&nonce, ciphertext).unwrap();
        // Moved to another account, or to another credential, it does not open.
        assert!(secrets::open(&kek, "globex", &credential_id, &sealed).is_err());
        let other = if credential_id == byok_id {
            &attached_id
        } else {
            &byok_id
        };
        assert!(secrets::open(&kek, "acme", other, &sealed).is_err());
        let opened = secrets::open(&kek, "acme", &credential_id, &sealed).unwrap();
        let want = if credential_id == byok_id {
            &byok
        } else {
            &attached
        };
        assert_eq!(opened.expose_secret(), want.as_str());
    }

    // The ring serves the opened keys, and their Debug is redacted.
    let creds = h.ring.credentials_for("acme", None, "openai");
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].api_key.expose_secret(), byok.as_str());
    assert_eq!(creds[0].kind, CredentialKind::Byok);
    assert!(!format!("{creds:?}").contains(&byok));
    let creds = h.ring.credentials_for("acme", Some(&key_id), "openai");
    assert_eq!(creds[0].api_key.expose_secret(), attached.as_str());
    assert_eq!(creds[0].kind, CredentialKind::Attached);
    assert!(h.ring.credentials_for("globex", None, "openai").is_empty());

    // A key in the wrong place is refused without being echoed.
    let (status, body, raw) = h
        .post(
            "/v1/accounts/acme/provider-keys",
            json!({"provider": "openai", "api_key": "x", "kind": "byok", "position": byok}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(!raw.contains(&byok), "{raw}");
    let (status, body, raw) = h
        .post(
            "/v1/accounts/acme/provider-keys",
            json!({"provider": "openai", "api_key": format!("{byok} "), "kind": "byok"}),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(!raw.contains(&byok), "{raw}");
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn rotation_and_removal_apply_at_the_next_snapshot_not_in_flight(pool: PgPool) {
    let h = Harness::new(pool).await;
    let old = canary();
    let new = canary();
    let id = h
        .add_provider_key(
            "acme",
            json!({"provider": "anthropic", "api_key": old, "kind": "byok"}),
        )
        .await;
    let in_flight = h.ring.credentials_for("acme", None, "anthropic")[0].clone();
    assert_eq!(in_flight.api_key.expose_secret(), old.as_str());

    h.advance(Duration::minutes(3));
    let (status, body, raw) = h
        .send(
            Method::PUT,
            &format!("/v1/accounts/acme/provider-keys/{id}"),
            Some(&json!({"api_key": new}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!raw.contains(&new) && !raw.contains(&old));
    assert_eq!(body["masked"], secrets::mask(&new));
    assert_eq!(body["credential_id"], id.as_str());
    assert_eq!(body["rotated_at"], json!(h.now()));

    let now_serving = h.ring.credentials_for("acme", None, "anthropic");
    assert_eq!(now_serving.len(), 1);
    assert_eq!(now_serving[0].credential_id, id);
    assert_eq!(now_serving[0].api_key.expose_secret(), new.as_str());
    assert_eq!(
        in_flight.api_key.expose_secret(),
        old.as_str(),
        "in-flight keeps its key"
    );

    let (status, body, _) = h
        .send(
            Method::DELETE,
            &format!("/v1/accounts/acme/provider-keys/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(h.ring.credentials_for("acme", None, "anthropic").is_empty());
    assert_eq!(now_serving[0].api_key.expose_secret(), new.as_str());
    let (_, listed, _) = h.get("/v1/accounts/acme/provider-keys").await;
    assert_eq!(listed["provider_keys"], json!([]));
    // Removal erases the sealed key; the masked form stays for audit.
    let (nonce, ciphertext, masked): (Option<Vec<u8>>, Option<Vec<u8>>, String) = sqlx::query_as(
        "select nonce, ciphertext, masked from provider_credential where credential_id = $1",
    )
    .bind(&id)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert!(nonce.is_none() && ciphertext.is_none());
    assert_eq!(masked, secrets::mask(&new));

    let (status, body, _) = h
        .send(
            Method::DELETE,
            &format!("/v1/accounts/acme/provider-keys/{id}"),
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "credential_not_found");
    let (status, body, _) = h
        .send(
            Method::PUT,
            &format!("/v1/accounts/acme/provider-keys/{id}"),
            Some(&json!({"api_key": canary()}).to_string()),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "credential_not_found");
    // Another account's credential id is not found either.
    let other = h
        .add_provider_key(
            "globex",
            json!({"provider": "openai", "api_key": canary(), "kind": "byok"}),
        )
        .await;
    let (status, body, _) = h
        .send(
            Method::DELETE,
            &format!("/v1/accounts/acme/provider-keys/{other}"),
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "credential_not_found");
    assert_eq!(h.lookup("globex", None, "openai"), vec![other]);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn lookup_order_is_attached_most_recent_first_then_byok_by_position(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (k1, _) = h.create_key("acme", "ep_main").await;
    let (k2, _) = h.create_key("acme", "ep_main").await;
    let byok = |position: Option<i32>| {
        let mut body = json!({"provider": "openai", "api_key": canary(), "kind": "byok"});
        if let Some(p) = position {
            body["position"] = json!(p);
        }
        body
    };
    let a = h.add_provider_key("acme", byok(Some(5))).await;
    let b = h.add_provider_key("acme", byok(Some(1))).await;
    let c = h.add_provider_key("acme", byok(None)).await; // appended: position 6
    let d = h.add_provider_key("acme", byok(Some(1))).await; // ties with b, added later

    let byok_order = vec![b.clone(), d.clone(), a.clone(), c.clone()];
    assert_eq!(h.lookup("acme", None, "openai"), byok_order);
    assert_eq!(h.lookup("acme", Some(&k1), "openai"), byok_order);

    let attach = |key: &str| json!({"provider": "openai", "api_key": canary(), "kind": "attached", "api_key_id": key});
    let x = h.add_provider_key("acme", attach(&k1)).await;
    h.advance(Duration::minutes(1));
    let y = h.add_provider_key("acme", attach(&k1)).await;
    let z = h.add_provider_key("acme", attach(&k1)).await; // same instant as y, added later

    // Attached keys replace BYOK for that provider, for that gateway key only.
    assert_eq!(h.lookup("acme", Some(&k1), "openai"), vec![z, y, x]);
    assert_eq!(h.lookup("acme", Some(&k2), "openai"), byok_order);
    assert_eq!(h.lookup("acme", None, "openai"), byok_order);
    // Other providers still fall back to BYOK (here: none at all).
    assert!(h.lookup("acme", Some(&k1), "anthropic").is_empty());
    let e = h
        .add_provider_key(
            "acme",
            json!({"provider": "anthropic", "api_key": canary(), "kind": "byok"}),
        )
        .await;
    assert_eq!(h.lookup("acme", Some(&k1), "anthropic"), vec![e]);

    // The listing follows the same order per provider.
    let (_, listed, _) = h.get("/v1/accounts/acme/provider-keys").await;
    let ids: Vec<&str> = listed["provider_keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["provider"] == "openai" && c["kind"] == "byok")
        .map(|c| c["credential_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        byok_order.iter().map(String::as_str).collect::<Vec<_>>()
    );

    // Attaching to a revoked key, or to another account's key, is refused.
    let (status, _, _) = h
        .post(&format!("/v1/accounts/acme/keys/{k2}/revoke"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, _) = h.post("/v1/accounts/acme/provider-keys", attach(&k2)).await;
    assert_error(status, &body, StatusCode::CONFLICT, "key_revoked");
    let (status, body, _) = h
        .post("/v1/accounts/globex/provider-keys", attach(&k1))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "key_not_found");

    // A reload from the database alone gives the same order (as another gateway would see).
    let kek = Arc::new(Kek::from_base64(&STANDARD.encode(KEK_BYTES)).unwrap());
    let fresh = KeyRing::load(&h.pool, kek).await.unwrap();
    let ids = |v: Vec<Arc<tally_gateway_core::keys::Credential>>| {
        v.iter()
            .map(|c| c.credential_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(fresh.credentials_for("acme", None, "openai")),
        byok_order
    );
    assert_eq!(
        ids(fresh.credentials_for("acme", Some(&k1), "openai")),
        h.lookup("acme", Some(&k1), "openai")
    );

    // Under another KEK nothing opens: those credentials are skipped, not served garbled.
    let wrong = Arc::new(Kek::from_bytes(&[1; 32]));
    let ring = KeyRing::new(wrong);
    let report = ring.reload(&h.pool).await.unwrap();
    assert_eq!(report.credentials, 0);
    assert_eq!(report.skipped.len(), 8);
    assert_eq!(report.keys, 2);
    assert!(ring.credentials_for("acme", None, "openai").is_empty());
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn custom_providers(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (status, body, _) = h
        .post(
            "/v1/accounts/acme/custom-providers",
            json!({"provider_id": "ollama", "base_url": "http://localhost:11434/v1", "api_shape": "openai"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["base_url"], "http://localhost:11434/v1");
    assert_eq!(body["api_shape"], "openai");
    let p = h.ring.custom_provider("acme", "ollama").unwrap();
    assert_eq!(p.base_url.as_str(), "http://localhost:11434/v1");
    assert!(h.ring.custom_provider("globex", "ollama").is_none());

    let (status, body, _) = h
        .post(
            "/v1/accounts/acme/custom-providers",
            json!({"provider_id": "ollama", "base_url": "https://other.example/v1", "api_shape": "anthropic"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::CONFLICT,
        "custom_provider_exists",
    );
    let (status, body, _) = h.get("/v1/accounts/acme/custom-providers").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["custom_providers"].as_array().unwrap().len(), 1);

    // Its keys are the account's own.
    let id = h
        .add_provider_key(
            "acme",
            json!({"provider": "ollama", "api_key": canary(), "kind": "byok"}),
        )
        .await;
    assert_eq!(h.lookup("acme", None, "ollama"), vec![id]);
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn bad_input_is_refused_with_a_code(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (key_id, _) = h.create_key("acme", "ep_main").await;
    let byok_naming_a_key = format!(
        r#"{{"provider":"openai","api_key":"sk-1234567890abcdef","kind":"byok","api_key_id":"{key_id}"}}"#
    );
    let cases: Vec<(&str, &str, StatusCode, &str)> = vec![
        (
            "/v1/accounts/acme/keys",
            r#"{"endpoint_id":"ep","colour":"red"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/keys",
            r#"{"endpoint_id":"ep""#,
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "/v1/accounts/acme/keys",
            "",
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "/v1/accounts/acme/keys",
            r#"{}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/keys",
            r#"{"endpoint_id":"has space"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/keys",
            r#"{"endpoint_id":"ep","metadata":[1]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/nobody/keys",
            r#"{"endpoint_id":"ep"}"#,
            StatusCode::NOT_FOUND,
            "account_not_found",
        ),
        (
            "/v1/accounts/nobody/provider-keys",
            r#"{"provider":"openai","api_key":"sk-1234567890abcdef","kind":"byok"}"#,
            StatusCode::NOT_FOUND,
            "account_not_found",
        ),
        (
            "/v1/accounts/acme/provider-keys",
            r#"{"provider":"openai","api_key":"sk-1234567890abcdef","kind":"attached"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/provider-keys",
            &byok_naming_a_key,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/provider-keys",
            r#"{"provider":"openai","api_key":"sk-1234567890abcdef","kind":"managed"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/provider-keys",
            r#"{"provider":"OpenAI","api_key":"sk-1234567890abcdef","kind":"byok"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/provider-keys",
            r#"{"provider":"openai","api_key":"","kind":"byok"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/provider-keys",
            r#"{"provider":"openai","api_key":"sk-1234567890abcdef","kind":"byok","position":-1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/provider-keys",
            r#"{"provider":"openai","api_key":"sk-1234567890abcdef","kind":"attached","api_key_id":"0000000000000000"}"#,
            StatusCode::NOT_FOUND,
            "key_not_found",
        ),
        (
            "/v1/accounts/acme/custom-providers",
            r#"{"provider_id":"vllm","base_url":"ftp://host/v1","api_shape":"openai"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/custom-providers",
            r#"{"provider_id":"vllm","base_url":"not a url","api_shape":"openai"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/custom-providers",
            r#"{"provider_id":"vllm","base_url":"https://u:p@host/v1","api_shape":"openai"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/custom-providers",
            r#"{"provider_id":"vllm","base_url":"https://host/v1","api_shape":"grpc"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/accounts/acme/custom-providers",
            r#"{"provider_id":"openai","base_url":"https://host/v1","api_shape":"openai"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (uri, body, status, code) in cases {
        let (got, resp, _) = h.send(Method::POST, uri, Some(body)).await;
        assert_eq!(got, status, "{uri} {body}: {resp}");
        assert_eq!(resp["error"]["code"], code, "{uri} {body}: {resp}");
        assert!(
            resp["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    let (status, body, _) = h
        .send(
            Method::PUT,
            "/v1/accounts/acme/provider-keys/cred_x",
            Some(r#"{"api_key":"sk-1234567890abcdef","kind":"byok"}"#),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body, _) = h.get("/v1/accounts/nobody/provider-keys").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "account_not_found");

    // JSON is required as such.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/accounts/acme/keys")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(r#"{"endpoint_id":"ep"}"#))
        .unwrap();
    let (status, body, _) = h.send_request(req).await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let huge = format!(
        r#"{{"endpoint_id":"ep","description":"{}"}}"#,
        "x".repeat(70_000)
    );
    let (status, body, _) = h
        .send(Method::POST, "/v1/accounts/acme/keys", Some(&huge))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // Nothing was half-applied by the refusals.
    let (_, keys, _) = h.get("/v1/accounts/acme/keys").await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    let (_, creds, _) = h.get("/v1/accounts/acme/provider-keys").await;
    assert_eq!(creds["provider_keys"], json!([]));
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn byok_failure_policy_is_strict_until_set(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (status, body, _) = h.get("/v1/accounts/acme/gateway-policy").await;
    assert_eq!(
        (status, body["byok_failure_policy"].as_str()),
        (StatusCode::OK, Some("strict")),
        "{body}"
    );
    assert!(!h.ring.byok_fallback_to_managed("acme"));
    let (status, body, _) = h
        .send(
            Method::PUT,
            "/v1/accounts/acme/gateway-policy",
            Some(&json!({"byok_failure_policy": "fallback_to_managed"}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        h.ring.byok_fallback_to_managed("acme"),
        "the snapshot follows at once"
    );
    assert!(!h.ring.byok_fallback_to_managed("globex"));
    let (status, body, _) = h
        .send(
            Method::PUT,
            "/v1/accounts/acme/gateway-policy",
            Some(&json!({"byok_failure_policy": "sometimes"}).to_string()),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body, _) = h
        .send(
            Method::PUT,
            "/v1/accounts/nobody/gateway-policy",
            Some(&json!({"byok_failure_policy": "strict"}).to_string()),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "account_not_found");
    assert!(
        h.ring.byok_fallback_to_managed("acme"),
        "refused writes change nothing"
    );
}

#[sqlx::test(migrator = "tally_ingest::db::MIGRATOR")]
async fn routes_are_stored_validated_and_served_from_the_snapshot(pool: PgPool) {
    let h = Harness::new(pool).await;
    let route = json!({"mode": "fallback", "targets": [
        {"model": "anthropic:claude-sonnet-4-5", "credential": "byok", "priority": 0},
        {"model": "openai:gpt-4o", "credential": "managed", "priority": 1}
    ]});
    let (status, body, _) = h
        .send(
            Method::PUT,
            "/v1/accounts/acme/routes/smart",
            Some(&route.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r = h
        .ring
        .route("acme", "smart")
        .expect("in the snapshot at once");
    assert_eq!(r.targets.len(), 2);
    assert!(h.ring.route("globex", "smart").is_none());
    let (status, body, _) = h.get("/v1/accounts/acme/routes").await;
    assert_eq!(
        (status, body["routes"][0]["name"].as_str()),
        (StatusCode::OK, Some("smart")),
        "{body}"
    );
    let dup = json!({"mode": "fallback", "targets": [{"model": "a:x"}, {"model": "b:y"}]});
    let (status, body, _) = h
        .send(
            Method::PUT,
            "/v1/accounts/acme/routes/bad",
            Some(&dup.to_string()),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body, _) = h
        .send(
            Method::PUT,
            "/v1/accounts/acme/routes/bad",
            Some(r#"{"mode":"fallback","targets":[],"x":1}"#),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, _, _) = h
        .send(Method::DELETE, "/v1/accounts/acme/routes/smart", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(h.ring.route("acme", "smart").is_none());
    let (status, body, _) = h
        .send(Method::DELETE, "/v1/accounts/acme/routes/smart", None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "route_not_found");
}
