//! The admin API for an account's gateway API keys, provider keys and custom providers. Each
//! write commits, then reloads the [`KeyRing`], so the change is live on this gateway when the
//! response is sent (other gateways pick it up at their next periodic reload).
//!
//! Errors have the shape `{"error":{"code":"...","message":"..."}}`, bad JSON included. Provider
//! keys arrive as [`SecretString`] straight from the body, are sealed before they touch the
//! database, and are only ever returned masked; gateway tokens are returned once, at creation.
//! Nothing here logs a request body, and error messages never quote a JSON string value.

use std::fmt;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret as _, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use sqlx::PgPool;
use tally_ingest::StoreError;
use tally_ledger::DomainError;
use tally_ledger::event::validate_id;
use uuid::Uuid;

use crate::catalog::{self, ApiShape};
use crate::keys::{KeyRing, generate_token};
use crate::secrets::{self, SecretsError};

/// Admin bodies are small; a provider key is a few hundred bytes at most.
pub const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;
pub const MAX_DESCRIPTION_CHARS: usize = 512;
/// Serialized size of a key's metadata object.
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_PROVIDER_KEY_BYTES: usize = 4096;
pub const MAX_PROVIDER_ID_LEN: usize = 64;
pub const MAX_BASE_URL_BYTES: usize = 2048;
pub const MAX_POSITION: i32 = 10_000;
/// Live (not revoked) gateway API keys per account.
pub const MAX_API_KEYS_PER_ACCOUNT: i64 = 1000;
/// Live (not removed) provider keys per account.
pub const MAX_PROVIDER_KEYS_PER_ACCOUNT: i64 = 1000;
pub const MAX_CUSTOM_PROVIDERS_PER_ACCOUNT: i64 = 100;
/// First key of the two-key advisory locks taken per account by admin writes; the ledger uses
/// the one-key form, a separate lock space.
const ADMIN_LOCK_CLASS: i32 = 0x7461_6b31;

pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

#[derive(Clone)]
pub struct AdminState {
    pub pool: PgPool,
    /// Also holds the key-encryption key used to seal provider keys.
    pub keyring: Arc<KeyRing>,
    pub clock: Clock,
    /// Checks provider keys against their provider; absent where no gateway runs.
    pub gateway: Option<Arc<crate::proxy::Gateway>>,
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState")
            .field("pool", &self.pool)
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    pub fn new(pool: PgPool, keyring: Arc<KeyRing>, clock: Clock) -> AdminState {
        AdminState {
            pool,
            keyring,
            clock,
            gateway: None,
        }
    }

    /// Lets `POST .../provider-keys/validate` reach providers the way the gateway does.
    pub fn with_gateway(mut self, gateway: Arc<crate::proxy::Gateway>) -> AdminState {
        self.gateway = Some(gateway);
        self
    }

    fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// The write has committed whatever happens here; a failed reload only delays it until the
    /// next periodic reload, so the client still gets its success.
    async fn reload(&self) {
        if let Err(e) = self.keyring.reload(&self.pool).await {
            tracing::error!(error = %e, "key ring reload after an admin write failed; the change is live at the next reload");
        }
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/v1/accounts/{account_id}/keys",
            post(create_key).get(list_keys),
        )
        .route(
            "/v1/accounts/{account_id}/keys/{key_id}/revoke",
            post(revoke_key),
        )
        .route(
            "/v1/accounts/{account_id}/provider-keys",
            post(create_provider_key).get(list_provider_keys),
        )
        .route(
            "/v1/accounts/{account_id}/provider-keys/{credential_id}",
            put(rotate_provider_key).delete(remove_provider_key),
        )
        .route(
            "/v1/accounts/{account_id}/custom-providers",
            post(create_custom_provider).get(list_custom_providers),
        )
        .route(
            "/v1/accounts/{account_id}/provider-keys/validate",
            post(check_provider_key),
        )
        .route("/v1/accounts/{account_id}/routes", get(list_routes))
        .route(
            "/v1/accounts/{account_id}/routes/{name}",
            put(put_route).delete(delete_route),
        )
        .route(
            "/v1/accounts/{account_id}/gateway-policy",
            get(get_policy).put(put_policy),
        )
        .layer(DefaultBodyLimit::max(MAX_ADMIN_BODY_BYTES))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("expected a request body with content-type: application/json")]
    UnsupportedMediaType,
    #[error("the request body is larger than {MAX_ADMIN_BODY_BYTES} bytes")]
    PayloadTooLarge,
    #[error("{0}")]
    InvalidPath(String),
    #[error("account '{0}' does not exist")]
    AccountNotFound(String),
    #[error("gateway API key '{0}' does not exist")]
    KeyNotFound(String),
    #[error("gateway API key '{0}' is revoked")]
    KeyRevoked(String),
    #[error("provider key '{0}' does not exist")]
    CredentialNotFound(String),
    #[error("route '{0}' not found")]
    RouteNotFound(String),
    #[error("custom provider '{0}' already exists")]
    CustomProviderExists(String),
    #[error("an account may have at most {limit} {what}")]
    LimitReached { what: &'static str, limit: i64 },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("store: {0}")]
    Store(StoreError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

impl From<DomainError> for AdminError {
    fn from(e: DomainError) -> AdminError {
        match e {
            DomainError::Invalid { field, reason } => AdminError::InvalidField { field, reason },
            other => AdminError::InvalidRequest(other.to_string()),
        }
    }
}

impl AdminError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> AdminError {
        AdminError::InvalidField {
            field,
            reason: reason.into(),
        }
    }

    /// The status, the stable code, and the message the client sees.
    fn parts(&self) -> (StatusCode, &'static str, String) {
        use AdminError as E;
        let shown = || self.to_string();
        match self {
            E::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json", shown()),
            E::InvalidRequest(_) | E::InvalidField { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request", shown())
            }
            E::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                shown(),
            ),
            E::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", shown()),
            E::InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path", shown()),
            E::AccountNotFound(_) => (StatusCode::NOT_FOUND, "account_not_found", shown()),
            E::KeyNotFound(_) => (StatusCode::NOT_FOUND, "key_not_found", shown()),
            E::KeyRevoked(_) => (StatusCode::CONFLICT, "key_revoked", shown()),
            E::CredentialNotFound(_) => (StatusCode::NOT_FOUND, "credential_not_found", shown()),
            E::RouteNotFound(_) => (StatusCode::NOT_FOUND, "route_not_found", shown()),
            E::CustomProviderExists(_) => (StatusCode::CONFLICT, "custom_provider_exists", shown()),
            E::LimitReached { .. } => (StatusCode::CONFLICT, "limit_reached", shown()),
            E::Database(e) | E::Store(StoreError::Database(e)) if is_unavailable(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; retry later".to_string(),
            ),
            E::Database(_) | E::Store(_) | E::Secrets(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; it has been logged".to_string(),
            ),
        }
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    )
}

#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        // The one place an admin error is logged; no variant carries a request body.
        if status.is_server_error() {
            tracing::error!(error = %self, code, "admin request failed");
        } else {
            tracing::debug!(error = %self, code, "admin request refused");
        }
        (
            status,
            Json(ErrorBody {
                error: ErrorDetail { code, message },
            }),
        )
            .into_response()
    }
}

// ---------------------------------------------------------------------------------------------
// Extractors

/// `axum::Json`, but every rejection is an [`AdminError`], and serde's messages lose the JSON
/// string values they would quote (a misplaced provider key must not come back or be logged).
#[derive(Debug)]
pub struct AdminJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AdminJson<T> {
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AdminError> {
        if !is_json(req.headers()) {
            return Err(AdminError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AdminError::PayloadTooLarge
            } else {
                AdminError::InvalidRequest("the request body could not be read".to_string())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(AdminJson)
            .map_err(json_error)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5 && essence.to_ascii_lowercase().ends_with("+json"))
}

fn json_error(e: serde_json::Error) -> AdminError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => AdminError::MalformedJson(format!(
            "the request body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )),
        Category::Data => AdminError::InvalidRequest(scrub_quoted(&e.to_string())),
        Category::Io => AdminError::InvalidRequest("the request body could not be read".into()),
    }
}

/// Replaces every double-quoted string of a serde message with `"…"`: serde quotes offending
/// string values (`invalid type: string "sk-…", expected i32`), and those may be secrets.
/// Field and variant names stay, in serde's backticks.
fn scrub_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        out.push_str("\"…\"");
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => {}
            }
        }
    }
    out
}

/// `axum::extract::Path` whose rejection is an [`AdminError`].
#[derive(Debug)]
pub struct AdminPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for AdminPath<T> {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AdminError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| AdminPath(p.0))
            .map_err(|e| AdminError::InvalidPath(e.body_text()))
    }
}

/// Reads a JSON string straight into a [`SecretString`], so the plaintext never sits in a type
/// whose `Debug` would print it.
fn secret_string<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    String::deserialize(d).map(SecretString::from)
}

// ---------------------------------------------------------------------------------------------
// Shared checks

async fn ensure_account(pool: &PgPool, account_id: &str) -> Result<(), AdminError> {
    match tally_ingest::query::account_state(pool, account_id).await {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound(_)) => Err(AdminError::AccountNotFound(account_id.to_string())),
        Err(StoreError::Database(e)) => Err(AdminError::Database(e)),
        Err(e) => Err(AdminError::Store(e)),
    }
}

/// Serializes the admin writes of one account, so per-account limits and default positions
/// are exact under concurrent requests.
async fn lock_account(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    account_id: &str,
) -> Result<(), AdminError> {
    sqlx::query("select pg_advisory_xact_lock($1, hashtext($2))")
        .bind(ADMIN_LOCK_CLASS)
        .bind(account_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Provider ids are matched exactly against the `provider` of `provider:model`, so they are
/// lower case and never contain `:`; a BYOK key for `OpenAI` would otherwise never be used.
fn validate_provider_id(field: &'static str, id: &str) -> Result<(), AdminError> {
    let ok_len = !id.is_empty() && id.len() <= MAX_PROVIDER_ID_LEN;
    let ok_chars = id.bytes().enumerate().all(|(i, b)| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && matches!(b, b'-' | b'_' | b'.'))
    });
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(AdminError::invalid(
            field,
            format!(
                "must be 1 to {MAX_PROVIDER_ID_LEN} characters: lower-case letters, digits, and - _ . after the first"
            ),
        ))
    }
}

/// Checks a provider key's shape without ever putting it in a message.
fn validate_provider_key(key: &SecretString) -> Result<(), AdminError> {
    let k = key.expose_secret();
    if k.is_empty() {
        return Err(AdminError::invalid("api_key", "must not be empty"));
    }
    if k.len() > MAX_PROVIDER_KEY_BYTES {
        return Err(AdminError::invalid(
            "api_key",
            format!("must be at most {MAX_PROVIDER_KEY_BYTES} bytes"),
        ));
    }
    if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
        // Usually a copy-paste accident; the upstream would refuse the key anyway.
        return Err(AdminError::invalid(
            "api_key",
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

fn validate_base_url(raw: &str) -> Result<reqwest::Url, AdminError> {
    let field = "base_url";
    if raw.len() > MAX_BASE_URL_BYTES {
        return Err(AdminError::invalid(
            field,
            format!("must be at most {MAX_BASE_URL_BYTES} bytes"),
        ));
    }
    let url = reqwest::Url::parse(raw)
        .map_err(|e| AdminError::invalid(field, format!("is not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(AdminError::invalid(field, "must be an http or https URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(AdminError::invalid(field, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // It would be stored and listed in clear; the key belongs in a provider key.
        return Err(AdminError::invalid(
            field,
            "must not contain credentials; add the key as a BYOK provider key",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(AdminError::invalid(
            field,
            "must not have a query or a fragment",
        ));
    }
    Ok(url)
}

async fn count_live(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sql: &'static str,
    account_id: &str,
) -> Result<i64, AdminError> {
    Ok(sqlx::query_scalar(sql)
        .bind(account_id)
        .fetch_one(&mut **tx)
        .await?)
}

// ---------------------------------------------------------------------------------------------
// Gateway API keys

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    endpoint_id: String,
    description: Option<String>,
    metadata: Option<Map<String, Value>>,
}

/// A gateway API key as listed: never its token or hash.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct KeyView {
    key_id: String,
    prefix: String,
    endpoint_id: String,
    description: String,
    metadata: Value,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

const KEY_VIEW_COLUMNS: &str =
    "key_id, prefix, endpoint_id, description, metadata, created_at, revoked_at, last_used_at";

#[derive(Serialize)]
struct CreatedKey {
    #[serde(flatten)]
    key: KeyView,
    /// The only time the token is shown.
    token: String,
}

#[derive(Debug, Serialize)]
struct KeyList {
    keys: Vec<KeyView>,
}

async fn create_key(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
    AdminJson(body): AdminJson<CreateKey>,
) -> Result<Response, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    validate_id("endpoint_id", &body.endpoint_id)?;
    let description = body.description.unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(AdminError::invalid(
            "description",
            format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    let metadata = Value::Object(body.metadata.unwrap_or_default());
    if metadata.to_string().len() > MAX_METADATA_BYTES {
        return Err(AdminError::invalid(
            "metadata",
            format!("must serialize to at most {MAX_METADATA_BYTES} bytes"),
        ));
    }

    let now = s.now();
    let new = generate_token();
    let mut tx = s.pool.begin().await?;
    lock_account(&mut tx, &account_id).await?;
    let live = count_live(
        &mut tx,
        "select count(*) from gateway_api_key where account_id = $1 and revoked_at is null",
        &account_id,
    )
    .await?;
    if live >= MAX_API_KEYS_PER_ACCOUNT {
        return Err(AdminError::LimitReached {
            what: "live gateway API keys",
            limit: MAX_API_KEYS_PER_ACCOUNT,
        });
    }
    let key: KeyView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into gateway_api_key
             (key_id, account_id, endpoint_id, prefix, secret_hash, description, metadata, created_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8)
         returning {KEY_VIEW_COLUMNS}"
    )))
    .bind(&new.key_id)
    .bind(&account_id)
    .bind(&body.endpoint_id)
    .bind(&new.prefix)
    .bind(new.secret_hash.as_slice())
    .bind(&description)
    .bind(&metadata)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    s.reload().await;
    tracing::info!(account_id = %account_id, key_id = %key.key_id, "gateway API key created");
    let created = CreatedKey {
        key,
        token: new.token.expose_secret().to_string(),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_keys(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
) -> Result<Json<KeyList>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    let mut keys: Vec<KeyView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {KEY_VIEW_COLUMNS} from gateway_api_key
         where account_id = $1
         order by created_at, key_id"
    )))
    .bind(&account_id)
    .fetch_all(&s.pool)
    .await?;
    // Uses not yet flushed are still uses.
    for key in &mut keys {
        if let Some(pending) = s.keyring.pending_last_used(&key.key_id) {
            key.last_used_at = key.last_used_at.max(Some(pending));
        }
    }
    Ok(Json(KeyList { keys }))
}

/// Revoking twice is not an error; the first revocation time stays.
async fn revoke_key(
    State(s): State<AdminState>,
    AdminPath((account_id, key_id)): AdminPath<(String, String)>,
) -> Result<Json<KeyView>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    let now = s.now();
    let key: Option<KeyView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update gateway_api_key
         set revoked_at = coalesce(revoked_at, greatest($3, created_at))
         where key_id = $1 and account_id = $2
         returning {KEY_VIEW_COLUMNS}"
    )))
    .bind(&key_id)
    .bind(&account_id)
    .bind(now)
    .fetch_optional(&s.pool)
    .await?;
    let key = key.ok_or(AdminError::KeyNotFound(key_id))?;
    s.reload().await;
    tracing::info!(account_id = %account_id, key_id = %key.key_id, "gateway API key revoked");
    Ok(Json(key))
}

// ---------------------------------------------------------------------------------------------
// Provider keys

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ProviderKeyKind {
    Byok,
    Attached,
}

impl ProviderKeyKind {
    fn as_str(self) -> &'static str {
        match self {
            ProviderKeyKind::Byok => "byok",
            ProviderKeyKind::Attached => "attached",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProviderKey {
    provider: String,
    #[serde(deserialize_with = "secret_string")]
    api_key: SecretString,
    kind: ProviderKeyKind,
    /// The gateway API key to attach to; attached keys only.
    api_key_id: Option<String>,
    /// Place in the BYOK list (ascending); appended when absent. BYOK keys only.
    position: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateProviderKey {
    #[serde(deserialize_with = "secret_string")]
    api_key: SecretString,
}

/// A provider key as shown: masked, never the key nor its ciphertext.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct CredentialView {
    credential_id: String,
    provider: String,
    kind: String,
    api_key_id: Option<String>,
    position: Option<i32>,
    masked: String,
    created_at: DateTime<Utc>,
    attached_at: Option<DateTime<Utc>>,
    rotated_at: Option<DateTime<Utc>>,
}

const CREDENTIAL_VIEW_COLUMNS: &str = "credential_id, provider, kind, api_key_id, position, masked, created_at, attached_at, rotated_at";

#[derive(Debug, Serialize)]
struct CredentialList {
    provider_keys: Vec<CredentialView>,
}

async fn create_provider_key(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
    AdminJson(body): AdminJson<CreateProviderKey>,
) -> Result<Response, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    validate_provider_id("provider", &body.provider)?;
    validate_provider_key(&body.api_key)?;
    match body.kind {
        ProviderKeyKind::Byok => {
            if body.api_key_id.is_some() {
                return Err(AdminError::invalid(
                    "api_key_id",
                    "only attached provider keys name a gateway API key",
                ));
            }
            if let Some(p) = body.position
                && !(0..=MAX_POSITION).contains(&p)
            {
                return Err(AdminError::invalid(
                    "position",
                    format!("must be between 0 and {MAX_POSITION}"),
                ));
            }
        }
        ProviderKeyKind::Attached => {
            if body.api_key_id.is_none() {
                return Err(AdminError::invalid(
                    "api_key_id",
                    "is required for attached provider keys",
                ));
            }
            if body.position.is_some() {
                return Err(AdminError::invalid(
                    "position",
                    "attached provider keys are tried most recently attached first; position is for BYOK keys",
                ));
            }
        }
    }

    let now = s.now();
    let credential_id = format!("cred_{}", Uuid::new_v4().simple());
    let sealed = secrets::seal(s.keyring.kek(), &account_id, &credential_id, &body.api_key)?;
    let masked = secrets::mask(body.api_key.expose_secret());

    let mut tx = s.pool.begin().await?;
    lock_account(&mut tx, &account_id).await?;
    let live = count_live(
        &mut tx,
        "select count(*) from provider_credential where account_id = $1 and removed_at is null",
        &account_id,
    )
    .await?;
    if live >= MAX_PROVIDER_KEYS_PER_ACCOUNT {
        return Err(AdminError::LimitReached {
            what: "provider keys",
            limit: MAX_PROVIDER_KEYS_PER_ACCOUNT,
        });
    }
    let (position, attached_at) = match (body.kind, &body.api_key_id) {
        (ProviderKeyKind::Attached, Some(key_id)) => {
            let revoked: Option<bool> = sqlx::query_scalar(
                "select revoked_at is not null from gateway_api_key
                 where key_id = $1 and account_id = $2",
            )
            .bind(key_id)
            .bind(&account_id)
            .fetch_optional(&mut *tx)
            .await?;
            match revoked {
                None => return Err(AdminError::KeyNotFound(key_id.clone())),
                Some(true) => return Err(AdminError::KeyRevoked(key_id.clone())),
                Some(false) => (None, Some(now)),
            }
        }
        _ => {
            let position = match body.position {
                Some(p) => p,
                None => {
                    sqlx::query_scalar(
                        "select coalesce(max(position) + 1, 0) from provider_credential
                         where account_id = $1 and provider = $2 and kind = 'byok'
                           and removed_at is null",
                    )
                    .bind(&account_id)
                    .bind(&body.provider)
                    .fetch_one(&mut *tx)
                    .await?
                }
            };
            (Some(position), None)
        }
    };
    let view: CredentialView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into provider_credential
             (credential_id, account_id, provider, kind, api_key_id, position, nonce, ciphertext,
              masked, created_at, attached_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         returning {CREDENTIAL_VIEW_COLUMNS}"
    )))
    .bind(&credential_id)
    .bind(&account_id)
    .bind(&body.provider)
    .bind(body.kind.as_str())
    .bind(&body.api_key_id)
    .bind(position)
    .bind(sealed.nonce.as_slice())
    .bind(&sealed.ciphertext)
    .bind(&masked)
    .bind(now)
    .bind(attached_at)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| match constraint(&e) {
        Some("provider_credential_api_key_fkey") => {
            AdminError::KeyNotFound(body.api_key_id.clone().unwrap_or_default())
        }
        _ => e.into(),
    })?;
    tx.commit().await?;
    s.reload().await;
    tracing::info!(
        account_id = %account_id,
        credential_id = %view.credential_id,
        provider = %view.provider,
        kind = %view.kind,
        "provider key added"
    );
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list_provider_keys(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
) -> Result<Json<CredentialList>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    // The lookup order, per provider: attached per gateway key, then BYOK by position.
    let provider_keys: Vec<CredentialView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {CREDENTIAL_VIEW_COLUMNS} from provider_credential
         where account_id = $1 and removed_at is null
         order by provider, kind, api_key_id, position, attached_at desc, seq"
    )))
    .bind(&account_id)
    .fetch_all(&s.pool)
    .await?;
    Ok(Json(CredentialList { provider_keys }))
}

/// Replaces the key material; the credential keeps its id, kind and place in the lookup order.
async fn rotate_provider_key(
    State(s): State<AdminState>,
    AdminPath((account_id, credential_id)): AdminPath<(String, String)>,
    AdminJson(body): AdminJson<RotateProviderKey>,
) -> Result<Json<CredentialView>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    validate_provider_key(&body.api_key)?;
    let sealed = secrets::seal(s.keyring.kek(), &account_id, &credential_id, &body.api_key)?;
    let masked = secrets::mask(body.api_key.expose_secret());
    let view: Option<CredentialView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update provider_credential
         set nonce = $3, ciphertext = $4, masked = $5, rotated_at = $6
         where credential_id = $1 and account_id = $2 and removed_at is null
         returning {CREDENTIAL_VIEW_COLUMNS}"
    )))
    .bind(&credential_id)
    .bind(&account_id)
    .bind(sealed.nonce.as_slice())
    .bind(&sealed.ciphertext)
    .bind(&masked)
    .bind(s.now())
    .fetch_optional(&s.pool)
    .await?;
    let view = view.ok_or(AdminError::CredentialNotFound(credential_id))?;
    s.reload().await;
    tracing::info!(account_id = %account_id, credential_id = %view.credential_id, "provider key rotated");
    Ok(Json(view))
}

/// Soft delete: the row stays for audit with its masked form, the sealed key is erased.
async fn remove_provider_key(
    State(s): State<AdminState>,
    AdminPath((account_id, credential_id)): AdminPath<(String, String)>,
) -> Result<StatusCode, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    let done = sqlx::query(
        "update provider_credential
         set removed_at = $3, nonce = null, ciphertext = null
         where credential_id = $1 and account_id = $2 and removed_at is null",
    )
    .bind(&credential_id)
    .bind(&account_id)
    .bind(s.now())
    .execute(&s.pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(AdminError::CredentialNotFound(credential_id));
    }
    s.reload().await;
    tracing::info!(account_id = %account_id, credential_id = %credential_id, "provider key removed");
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Custom providers

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCustomProvider {
    provider_id: String,
    base_url: String,
    /// `openai` or `anthropic`.
    api_shape: String,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct CustomProviderView {
    provider_id: String,
    base_url: String,
    api_shape: String,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
struct CustomProviderList {
    custom_providers: Vec<CustomProviderView>,
}

async fn create_custom_provider(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
    AdminJson(body): AdminJson<CreateCustomProvider>,
) -> Result<Response, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    validate_provider_id("provider_id", &body.provider_id)?;
    if catalog::provider(&body.provider_id).is_some() {
        return Err(AdminError::invalid(
            "provider_id",
            "names a built-in provider; choose another id",
        ));
    }
    let base_url = validate_base_url(&body.base_url)?;
    if ApiShape::parse(&body.api_shape).is_none() {
        return Err(AdminError::invalid(
            "api_shape",
            "must be \"openai\" or \"anthropic\"",
        ));
    }

    let mut tx = s.pool.begin().await?;
    lock_account(&mut tx, &account_id).await?;
    let live = count_live(
        &mut tx,
        "select count(*) from custom_provider where account_id = $1",
        &account_id,
    )
    .await?;
    if live >= MAX_CUSTOM_PROVIDERS_PER_ACCOUNT {
        return Err(AdminError::LimitReached {
            what: "custom providers",
            limit: MAX_CUSTOM_PROVIDERS_PER_ACCOUNT,
        });
    }
    let view: CustomProviderView = sqlx::query_as(
        "insert into custom_provider (account_id, provider_id, base_url, api_shape, created_at)
         values ($1, $2, $3, $4, $5)
         returning provider_id, base_url, api_shape, created_at",
    )
    .bind(&account_id)
    .bind(&body.provider_id)
    .bind(base_url.as_str())
    .bind(&body.api_shape)
    .bind(s.now())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| match constraint(&e) {
        Some("custom_provider_pkey") => AdminError::CustomProviderExists(body.provider_id.clone()),
        _ => e.into(),
    })?;
    tx.commit().await?;
    s.reload().await;
    tracing::info!(account_id = %account_id, provider_id = %view.provider_id, "custom provider added");
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list_custom_providers(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
) -> Result<Json<CustomProviderList>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    let custom_providers: Vec<CustomProviderView> = sqlx::query_as(
        "select provider_id, base_url, api_shape, created_at from custom_provider
         where account_id = $1
         order by provider_id",
    )
    .bind(&account_id)
    .fetch_all(&s.pool)
    .await?;
    Ok(Json(CustomProviderList { custom_providers }))
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct RouteView {
    name: String,
    mode: String,
    targets: Value,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
struct RouteList {
    routes: Vec<RouteView>,
}

async fn list_routes(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
) -> Result<Json<RouteList>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    let routes: Vec<RouteView> = sqlx::query_as(
        "select name, mode, targets, updated_at from model_route where account_id = $1 order by name",
    )
    .bind(&account_id)
    .fetch_all(&s.pool)
    .await?;
    Ok(Json(RouteList { routes }))
}

/// Creates or replaces a route; it applies to the next request.
async fn put_route(
    State(s): State<AdminState>,
    AdminPath((account_id, name)): AdminPath<(String, String)>,
    AdminJson(route): AdminJson<crate::routes::Route>,
) -> Result<Json<RouteView>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    route
        .validate(&name)
        .map_err(|reason| AdminError::invalid("route", reason))?;
    let targets = serde_json::to_value(&route.targets)
        .map_err(|e| AdminError::InvalidRequest(e.to_string()))?;
    let view: RouteView = sqlx::query_as(
        "insert into model_route (account_id, name, mode, targets, updated_at) values ($1, $2, $3, $4, $5)
         on conflict (account_id, name) do update
             set mode = excluded.mode, targets = excluded.targets, updated_at = excluded.updated_at
         returning name, mode, targets, updated_at",
    )
    .bind(&account_id)
    .bind(&name)
    .bind(route.mode.as_str())
    .bind(&targets)
    .bind(s.now())
    .fetch_one(&s.pool)
    .await?;
    s.reload().await;
    tracing::info!(account_id = %account_id, route = %name, "route set");
    Ok(Json(view))
}

async fn delete_route(
    State(s): State<AdminState>,
    AdminPath((account_id, name)): AdminPath<(String, String)>,
) -> Result<StatusCode, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    let deleted = sqlx::query("delete from model_route where account_id = $1 and name = $2")
        .bind(&account_id)
        .bind(&name)
        .execute(&s.pool)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(AdminError::RouteNotFound(name));
    }
    s.reload().await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateProviderKey {
    provider: String,
    #[serde(deserialize_with = "secret_string")]
    api_key: SecretString,
}

/// Asks the provider (its models list) whether a key works, before the customer saves it.
async fn check_provider_key(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
    AdminJson(body): AdminJson<ValidateProviderKey>,
) -> Result<Json<crate::proxy::KeyCheck>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    validate_provider_id("provider", &body.provider)?;
    validate_provider_key(&body.api_key)?;
    let Some(gateway) = &s.gateway else {
        return Err(AdminError::invalid(
            "provider",
            "key validation needs the gateway role in this process",
        ));
    };
    let check = gateway
        .check_key(&account_id, &body.provider, &body.api_key)
        .await
        .map_err(|reason| AdminError::invalid("provider", reason))?;
    Ok(Json(check))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    byok_failure_policy: String,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct PolicyView {
    account_id: String,
    byok_failure_policy: String,
    updated_at: Option<DateTime<Utc>>,
}

async fn get_policy(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
) -> Result<Json<PolicyView>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    let row: Option<PolicyView> = sqlx::query_as(
        "select account_id, byok_failure_policy, updated_at from gateway_policy where account_id = $1",
    )
    .bind(&account_id)
    .fetch_optional(&s.pool)
    .await?;
    Ok(Json(row.unwrap_or(PolicyView {
        account_id,
        byok_failure_policy: "strict".into(),
        updated_at: None,
    })))
}

async fn put_policy(
    State(s): State<AdminState>,
    AdminPath(account_id): AdminPath<String>,
    AdminJson(body): AdminJson<PolicyBody>,
) -> Result<Json<PolicyView>, AdminError> {
    ensure_account(&s.pool, &account_id).await?;
    if !matches!(
        body.byok_failure_policy.as_str(),
        "strict" | "fallback_to_managed"
    ) {
        return Err(AdminError::invalid(
            "byok_failure_policy",
            "must be \"strict\" or \"fallback_to_managed\"",
        ));
    }
    let view: PolicyView = sqlx::query_as(
        "insert into gateway_policy (account_id, byok_failure_policy, updated_at) values ($1, $2, $3)
         on conflict (account_id) do update
             set byok_failure_policy = excluded.byok_failure_policy, updated_at = excluded.updated_at
         returning account_id, byok_failure_policy, updated_at",
    )
    .bind(&account_id)
    .bind(&body.byok_failure_policy)
    .bind(s.now())
    .fetch_one(&s.pool)
    .await?;
    s.reload().await;
    tracing::info!(account_id = %account_id, policy = %view.byok_failure_policy, "gateway policy set");
    Ok(Json(view))
}

fn constraint(e: &sqlx::Error) -> Option<&str> {
    e.as_database_error().and_then(|d| d.constraint())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_quoted_values_only() {
        let m = r#"invalid type: string "sk-canary-\"x\"-1", expected i32 at line 1 column 40"#;
        let s = scrub_quoted(m);
        assert!(!s.contains("canary"), "{s}");
        assert_eq!(
            s,
            r#"invalid type: string "…", expected i32 at line 1 column 40"#
        );
        assert_eq!(
            scrub_quoted("unknown field `x`, expected `a`"),
            "unknown field `x`, expected `a`"
        );
    }

    #[test]
    fn base_urls() {
        assert!(validate_base_url("http://localhost:11434/v1").is_ok());
        assert!(validate_base_url("https://vllm.internal/v1/").is_ok());
        for bad in [
            "ftp://host/x",
            "not a url",
            "https://user:pw@host/v1",
            "https://host/v1?x=1",
            "file:///etc/passwd",
        ] {
            assert!(validate_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn provider_ids() {
        assert!(validate_provider_id("p", "openai").is_ok());
        assert!(validate_provider_id("p", "my-ollama.1").is_ok());
        for bad in ["", "OpenAI", "a:b", "-x", "a/b"] {
            assert!(validate_provider_id("p", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(!is_json(&h));
    }
}
