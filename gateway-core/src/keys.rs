//! Gateway API keys and provider credentials as the request path sees them: one immutable
//! [`Snapshot`] in memory, swapped whole by [`KeyRing::reload`], so authenticating a request and
//! choosing its provider keys do no IO and no cryptography.
//!
//! - Gateway API keys: tokens `tly_<key_id>_<secret>`; only sha256 of the secret is stored and
//!   compared in constant time. [`KeyRing::verify`] checks the key is live and scoped to the
//!   endpoint.
//! - Provider credentials: sealed in the database, opened once per reload.
//!   [`KeyRing::credentials_for`] returns them in lookup order: the keys attached to the gateway
//!   API key (most recently attached first), which fully replace BYOK for that provider, else the
//!   account's BYOK keys by position. Managed keys are the proxy's business.
//! - `last_used_at` is recorded in memory by [`KeyRing::touch`] and written by
//!   [`KeyRing::flush_last_used`] in one statement, so a request never waits for a write.
//!
//! Changes (revocation, rotation, removal) take effect at the next reload; a request that took a
//! credential's `Arc` before keeps using it until it finishes.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use rand::RngCore as _;
use secrecy::SecretString;
use secrecy::zeroize::Zeroizing;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq as _;
use tally_ledger::CredentialKind;

use crate::catalog::ApiShape;
use crate::secrets::{self, Kek, Sealed};

/// Marks tally tokens, so secret scanners and humans recognise them.
pub const TOKEN_PREFIX: &str = "tly_";
/// The public id: 8 random bytes as 16 lowercase hex characters.
pub const KEY_ID_BYTES: usize = 8;
pub const KEY_ID_LEN: usize = KEY_ID_BYTES * 2;
pub const SECRET_BYTES: usize = 32;
/// 32 bytes in unpadded base64url.
const SECRET_ENCODED_LEN: usize = 43;
pub const SECRET_HASH_LEN: usize = 32;

/// Why a token was refused. Everything but [`AuthError::WrongEndpoint`] looks the same to the
/// client, so probing cannot tell a revoked key from a forged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no gateway API key was presented")]
    Missing,
    #[error("the gateway API key is malformed")]
    Malformed,
    /// No such key id, or the secret does not match it.
    #[error("the gateway API key is not known")]
    Unknown,
    #[error("the gateway API key has been revoked")]
    Revoked,
    #[error("the gateway API key is not valid for this endpoint")]
    WrongEndpoint,
}

impl AuthError {
    pub fn status(self) -> StatusCode {
        match self {
            AuthError::WrongEndpoint => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            AuthError::WrongEndpoint => "wrong_endpoint",
            _ => "invalid_api_key",
        }
    }

    /// What the client is told; the variant itself goes to traces only.
    pub fn public_message(self) -> &'static str {
        match self {
            AuthError::WrongEndpoint => "this gateway API key is not valid for this endpoint",
            _ => "missing or invalid gateway API key",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A freshly minted gateway API key; `token` exists only here and in the creation response.
#[derive(Debug)]
pub struct NewToken {
    pub key_id: String,
    pub prefix: String,
    pub token: SecretString,
    pub secret_hash: [u8; SECRET_HASH_LEN],
}

pub fn generate_token() -> NewToken {
    let mut rng = rand::rng();
    let mut id = [0u8; KEY_ID_BYTES];
    rng.fill_bytes(&mut id);
    let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
    rng.fill_bytes(secret.as_mut_slice());
    let key_id = hex::encode(id);
    let prefix = format!("{TOKEN_PREFIX}{key_id}");
    let encoded = Zeroizing::new(URL_SAFE_NO_PAD.encode(secret.as_slice()));
    NewToken {
        token: SecretString::from(format!("{prefix}_{}", encoded.as_str())),
        secret_hash: Sha256::digest(secret.as_slice()).into(),
        key_id,
        prefix,
    }
}

/// Splits a token into its key id and the hash of its secret. The key id never contains `_`;
/// the secret may, so only the first `_` after the prefix separates them.
pub fn parse_token(token: &str) -> Result<(&str, [u8; SECRET_HASH_LEN]), AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(AuthError::Malformed)?;
    let (key_id, secret) = rest.split_once('_').ok_or(AuthError::Malformed)?;
    if key_id.len() != KEY_ID_LEN
        || !key_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        || secret.len() != SECRET_ENCODED_LEN
    {
        return Err(AuthError::Malformed);
    }
    let bytes = Zeroizing::new(
        URL_SAFE_NO_PAD
            .decode(secret)
            .map_err(|_| AuthError::Malformed)?,
    );
    if bytes.len() != SECRET_BYTES {
        return Err(AuthError::Malformed);
    }
    Ok((key_id, Sha256::digest(bytes.as_slice()).into()))
}

/// The token a client presented: `Authorization: Bearer …` (OpenAI style) or `x-api-key`
/// (Anthropic style).
pub fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = v.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Who a verified request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKey {
    pub key_id: Arc<str>,
    pub account_id: Arc<str>,
    pub endpoint_id: Arc<str>,
}

#[derive(Debug)]
struct KeyEntry {
    key: VerifiedKey,
    secret_hash: [u8; SECRET_HASH_LEN],
    revoked: bool,
}

/// A provider key ready to use, opened when the snapshot was built.
#[derive(Debug)]
pub struct Credential {
    pub credential_id: String,
    pub account_id: String,
    pub provider: String,
    /// [`CredentialKind::Attached`] or [`CredentialKind::Byok`].
    pub kind: CredentialKind,
    /// The gateway API key an attached credential belongs to.
    pub api_key_id: Option<String>,
    pub masked: String,
    pub api_key: SecretString,
}

/// An account's own OpenAI- or Anthropic-compatible upstream; served with its BYOK or attached
/// keys only.
#[derive(Debug)]
pub struct CustomProvider {
    pub account_id: String,
    pub provider_id: String,
    pub base_url: reqwest::Url,
    pub api_shape: ApiShape,
}

#[derive(Debug, Default)]
struct AccountEntry {
    /// provider → BYOK keys by position.
    byok: HashMap<String, Vec<Arc<Credential>>>,
    /// gateway API key id → provider → attached keys, most recently attached first.
    attached: HashMap<String, HashMap<String, Vec<Arc<Credential>>>>,
    custom: HashMap<String, Arc<CustomProvider>>,
}

/// Everything the request path reads, as of one reload. A request should take one snapshot and
/// use it throughout, so authentication and credential choice agree.
#[derive(Debug, Default)]
pub struct Snapshot {
    keys: HashMap<String, KeyEntry>,
    accounts: HashMap<String, AccountEntry>,
    /// Accounts whose BYOK failure policy is `fallback_to_managed`; every other is strict.
    fallback_to_managed: std::collections::HashSet<String>,
    /// (account, logical name) → route.
    routes: HashMap<(String, String), Arc<crate::routes::Route>>,
}

impl Snapshot {
    /// Verifies a token for `endpoint_id`. A forged secret for a real key id is
    /// [`AuthError::Unknown`]; revocation and scope are only reported for the right secret.
    pub fn verify(&self, token: &str, endpoint_id: &str) -> Result<VerifiedKey, AuthError> {
        let (key_id, hash) = parse_token(token)?;
        let entry = self.keys.get(key_id).ok_or(AuthError::Unknown)?;
        if !bool::from(hash.ct_eq(&entry.secret_hash)) {
            return Err(AuthError::Unknown);
        }
        if entry.revoked {
            return Err(AuthError::Revoked);
        }
        if &*entry.key.endpoint_id != endpoint_id {
            return Err(AuthError::WrongEndpoint);
        }
        Ok(entry.key.clone())
    }

    /// The account's keys for `provider` in the order to try them: the keys attached to
    /// `api_key_id` if it has any for this provider, else the BYOK keys. Empty means no customer
    /// key: the proxy falls back to managed keys where it has them.
    pub fn credentials_for(
        &self,
        account_id: &str,
        api_key_id: Option<&str>,
        provider: &str,
    ) -> Vec<Arc<Credential>> {
        let Some(account) = self.accounts.get(account_id) else {
            return Vec::new();
        };
        let attached = api_key_id
            .and_then(|k| account.attached.get(k))
            .and_then(|by_provider| by_provider.get(provider))
            .filter(|list| !list.is_empty());
        attached
            .or_else(|| account.byok.get(provider))
            .cloned()
            .unwrap_or_default()
    }

    pub fn custom_provider(
        &self,
        account_id: &str,
        provider_id: &str,
    ) -> Option<Arc<CustomProvider>> {
        self.accounts
            .get(account_id)
            .and_then(|a| a.custom.get(provider_id))
            .cloned()
    }

    pub fn has_key(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }
}

/// What a reload loaded, and which rows it had to leave out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub keys: usize,
    pub credentials: usize,
    pub custom_providers: usize,
    /// Ids of rows that could not be used (a credential that does not open under this KEK, a
    /// malformed row); each was logged.
    pub skipped: Vec<String>,
}

/// The gateway's live view of keys and credentials.
#[derive(Debug)]
pub struct KeyRing {
    kek: Arc<Kek>,
    current: ArcSwap<Snapshot>,
    /// Reloads run one at a time, so a reload that read older rows can never replace the
    /// snapshot of one that read newer rows.
    reload_lock: tokio::sync::Mutex<()>,
    /// key id → latest use not yet written. Only ids of the snapshot are admitted, so its size is
    /// bounded by the number of keys.
    last_used: DashMap<String, DateTime<Utc>>,
}

impl KeyRing {
    /// An empty ring; call [`KeyRing::reload`] before serving.
    pub fn new(kek: Arc<Kek>) -> KeyRing {
        KeyRing {
            kek,
            current: ArcSwap::from_pointee(Snapshot::default()),
            reload_lock: tokio::sync::Mutex::new(()),
            last_used: DashMap::new(),
        }
    }

    pub async fn load(pool: &PgPool, kek: Arc<Kek>) -> Result<KeyRing, KeyRingError> {
        let ring = KeyRing::new(kek);
        ring.reload(pool).await?;
        Ok(ring)
    }

    pub fn kek(&self) -> &Arc<Kek> {
        &self.kek
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// See [`Snapshot::verify`].
    pub fn verify(&self, token: &str, endpoint_id: &str) -> Result<VerifiedKey, AuthError> {
        self.current.load().verify(token, endpoint_id)
    }

    /// Verifies the token of a request's headers (see [`presented_token`]).
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        endpoint_id: &str,
    ) -> Result<VerifiedKey, AuthError> {
        let token = presented_token(headers).ok_or(AuthError::Missing)?;
        self.verify(token, endpoint_id)
    }

    /// See [`Snapshot::credentials_for`].
    pub fn credentials_for(
        &self,
        account_id: &str,
        api_key_id: Option<&str>,
        provider: &str,
    ) -> Vec<Arc<Credential>> {
        self.current
            .load()
            .credentials_for(account_id, api_key_id, provider)
    }

    pub fn custom_provider(
        &self,
        account_id: &str,
        provider_id: &str,
    ) -> Option<Arc<CustomProvider>> {
        self.current.load().custom_provider(account_id, provider_id)
    }

    pub fn route(&self, account_id: &str, name: &str) -> Option<Arc<crate::routes::Route>> {
        self.current
            .load()
            .routes
            .get(&(account_id.to_string(), name.to_string()))
            .cloned()
    }

    /// Whether managed keys may follow an account's failed BYOK or attached keys.
    pub fn byok_fallback_to_managed(&self, account_id: &str) -> bool {
        self.current.load().fallback_to_managed.contains(account_id)
    }

    /// Rebuilds the snapshot from the database, in one read-only repeatable-read transaction so
    /// keys and credentials come from the same moment. Credentials are opened here, once.
    pub async fn reload(&self, pool: &PgPool) -> Result<ReloadReport, KeyRingError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let mut tx = pool.begin().await?;
        sqlx::query("set transaction isolation level repeatable read, read only")
            .execute(&mut *tx)
            .await?;
        let keys: Vec<KeyRow> = sqlx::query_as(
            "select key_id, account_id, endpoint_id, secret_hash, revoked_at is not null as revoked
             from gateway_api_key",
        )
        .fetch_all(&mut *tx)
        .await?;
        let credentials: Vec<CredentialRow> = sqlx::query_as(
            "select credential_id, seq, account_id, provider, kind, api_key_id, position, nonce,
                    ciphertext, masked, attached_at
             from provider_credential
             where removed_at is null",
        )
        .fetch_all(&mut *tx)
        .await?;
        let custom: Vec<CustomProviderRow> = sqlx::query_as(
            "select account_id, provider_id, base_url, api_shape from custom_provider",
        )
        .fetch_all(&mut *tx)
        .await?;
        let fallback: Vec<String> = sqlx::query_scalar(
            "select account_id from gateway_policy where byok_failure_policy = 'fallback_to_managed'",
        )
        .fetch_all(&mut *tx)
        .await?;
        let routes: Vec<(String, String, String, serde_json::Value)> =
            sqlx::query_as("select account_id, name, mode, targets from model_route")
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let (mut snapshot, report) = build_snapshot(&self.kek, keys, credentials, custom);
        snapshot.fallback_to_managed = fallback.into_iter().collect();
        for (account_id, name, mode, targets) in routes {
            let parsed = crate::routes::RouteMode::parse(&mode).and_then(|mode| {
                serde_json::from_value(targets)
                    .ok()
                    .map(|targets| crate::routes::Route { mode, targets })
            });
            match parsed {
                Some(route) => {
                    snapshot.routes.insert((account_id, name), Arc::new(route));
                }
                None => {
                    tracing::error!(account_id = %account_id, route = %name, "stored route does not parse; ignored")
                }
            }
        }
        self.current.store(Arc::new(snapshot));
        tracing::debug!(
            keys = report.keys,
            credentials = report.credentials,
            custom_providers = report.custom_providers,
            skipped = report.skipped.len(),
            "key ring reloaded"
        );
        Ok(report)
    }

    /// Records that `key_id` was used at `now`, in memory only. Unknown ids are ignored, which
    /// keeps the pending set bounded by the number of keys.
    pub fn touch(&self, key_id: &str, now: DateTime<Utc>) {
        if let Some(mut at) = self.last_used.get_mut(key_id) {
            if *at < now {
                *at = now;
            }
            return;
        }
        if !self.current.load().has_key(key_id) {
            return;
        }
        self.last_used
            .entry(key_id.to_string())
            .and_modify(|at| {
                if *at < now {
                    *at = now;
                }
            })
            .or_insert(now);
    }

    /// The use of `key_id` recorded by [`KeyRing::touch`] and not written yet.
    pub fn pending_last_used(&self, key_id: &str) -> Option<DateTime<Utc>> {
        self.last_used.get(key_id).map(|at| *at)
    }

    /// Writes every pending `last_used_at` in one statement; returns how many keys it covered.
    /// On failure nothing is forgotten: the next flush writes them.
    pub async fn flush_last_used(&self, pool: &PgPool) -> Result<usize, KeyRingError> {
        let pending: Vec<(String, DateTime<Utc>)> = self
            .last_used
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        let (ids, times): (Vec<String>, Vec<DateTime<Utc>>) = pending.iter().cloned().unzip();
        // Never moves last_used_at backwards, whichever gateway flushes last.
        sqlx::query(
            "update gateway_api_key as k
             set last_used_at = v.used_at
             from unnest($1::text[], $2::timestamptz[]) as v (key_id, used_at)
             where k.key_id = v.key_id
               and (k.last_used_at is null or k.last_used_at < v.used_at)",
        )
        .bind(&ids)
        .bind(&times)
        .execute(pool)
        .await?;
        for (id, written) in &pending {
            // A use recorded during the write is newer and stays pending.
            self.last_used.remove_if(id, |_, at| at <= written);
        }
        Ok(pending.len())
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    key_id: String,
    account_id: String,
    endpoint_id: String,
    secret_hash: Vec<u8>,
    revoked: bool,
}

#[derive(sqlx::FromRow)]
struct CredentialRow {
    credential_id: String,
    seq: i64,
    account_id: String,
    provider: String,
    kind: String,
    api_key_id: Option<String>,
    position: Option<i32>,
    nonce: Option<Vec<u8>>,
    ciphertext: Option<Vec<u8>>,
    masked: String,
    attached_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct CustomProviderRow {
    account_id: String,
    provider_id: String,
    base_url: String,
    api_shape: String,
}

/// Orders within one lookup list: BYOK by (position, insertion), attached by most recent
/// attachment, newest insertion first among equal times.
type SortKey = (i32, Reverse<Option<DateTime<Utc>>>, i64);
type Ordered = Vec<(SortKey, Arc<Credential>)>;

fn in_order(mut list: Ordered) -> Vec<Arc<Credential>> {
    list.sort_by_key(|(key, _)| *key);
    list.into_iter().map(|(_, c)| c).collect()
}

fn build_snapshot(
    kek: &Kek,
    keys: Vec<KeyRow>,
    credentials: Vec<CredentialRow>,
    custom: Vec<CustomProviderRow>,
) -> (Snapshot, ReloadReport) {
    let mut report = ReloadReport::default();
    let mut snapshot = Snapshot::default();

    for row in keys {
        let Ok(secret_hash) = <[u8; SECRET_HASH_LEN]>::try_from(row.secret_hash.as_slice()) else {
            tracing::error!(key_id = %row.key_id, "gateway API key has a malformed hash; skipped");
            report.skipped.push(row.key_id);
            continue;
        };
        let key = VerifiedKey {
            key_id: Arc::from(row.key_id.as_str()),
            account_id: Arc::from(row.account_id),
            endpoint_id: Arc::from(row.endpoint_id),
        };
        snapshot.keys.insert(
            row.key_id,
            KeyEntry {
                key,
                secret_hash,
                revoked: row.revoked,
            },
        );
        report.keys += 1;
    }

    // (account, provider) and (account, gateway key, provider) → credentials in any order.
    let mut byok: HashMap<(String, String), Ordered> = HashMap::new();
    let mut attached: HashMap<(String, String, String), Ordered> = HashMap::new();
    for row in credentials {
        let credential_id = row.credential_id.clone();
        match open_credential(kek, row) {
            Ok((sort, credential)) => {
                let credential = Arc::new(credential);
                let account = credential.account_id.clone();
                let provider = credential.provider.clone();
                match credential.api_key_id.clone() {
                    Some(api_key_id) => attached
                        .entry((account, api_key_id, provider))
                        .or_default()
                        .push((sort, credential)),
                    None => byok
                        .entry((account, provider))
                        .or_default()
                        .push((sort, credential)),
                }
                report.credentials += 1;
            }
            Err(why) => {
                tracing::error!(credential_id = %credential_id, error = why, "provider credential skipped");
                report.skipped.push(credential_id);
            }
        }
    }
    for ((account, provider), list) in byok {
        snapshot
            .accounts
            .entry(account)
            .or_default()
            .byok
            .insert(provider, in_order(list));
    }
    for ((account, api_key_id, provider), list) in attached {
        snapshot
            .accounts
            .entry(account)
            .or_default()
            .attached
            .entry(api_key_id)
            .or_default()
            .insert(provider, in_order(list));
    }

    for row in custom {
        let id = format!("{}/{}", row.account_id, row.provider_id);
        let (Ok(base_url), Some(api_shape)) = (
            reqwest::Url::parse(&row.base_url),
            ApiShape::parse(&row.api_shape),
        ) else {
            tracing::error!(custom_provider = %id, "custom provider row is malformed; skipped");
            report.skipped.push(id);
            continue;
        };
        let provider = Arc::new(CustomProvider {
            account_id: row.account_id.clone(),
            provider_id: row.provider_id.clone(),
            base_url,
            api_shape,
        });
        snapshot
            .accounts
            .entry(row.account_id)
            .or_default()
            .custom
            .insert(row.provider_id, provider);
        report.custom_providers += 1;
    }
    (snapshot, report)
}

/// Opens one credential row. The error is a static reason, safe to log.
fn open_credential(kek: &Kek, row: CredentialRow) -> Result<(SortKey, Credential), &'static str> {
    let kind = match (row.kind.as_str(), &row.api_key_id, row.position) {
        ("byok", None, Some(_)) => CredentialKind::Byok,
        ("attached", Some(_), None) => CredentialKind::Attached,
        _ => return Err("kind, api_key_id and position disagree"),
    };
    let (Some(nonce), Some(ciphertext)) = (row.nonce, row.ciphertext) else {
        return Err("no sealed key");
    };
    let sealed = Sealed::from_parts(&nonce, ciphertext).map_err(|_| "malformed nonce")?;
    let api_key = secrets::open(kek, &row.account_id, &row.credential_id, &sealed)
        .map_err(|_| "does not open under this key-encryption key")?;
    let sort = match kind {
        CredentialKind::Attached => (0, Reverse(row.attached_at), -row.seq),
        _ => (row.position.unwrap_or(0), Reverse(None), row.seq),
    };
    Ok((
        sort,
        Credential {
            credential_id: row.credential_id,
            account_id: row.account_id,
            provider: row.provider,
            kind,
            api_key_id: row.api_key_id,
            masked: row.masked,
            api_key,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_to_their_id_and_hash() {
        let t = generate_token();
        assert_eq!(t.key_id.len(), KEY_ID_LEN);
        assert_eq!(t.prefix, format!("tly_{}", t.key_id));
        let token = secrecy::ExposeSecret::expose_secret(&t.token).to_string();
        assert!(token.starts_with(&t.prefix));
        let (id, hash) = parse_token(&token).unwrap();
        assert_eq!(id, t.key_id);
        assert_eq!(hash, t.secret_hash);
        assert!(!format!("{t:?}").contains(&token));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let t = generate_token();
        let token = secrecy::ExposeSecret::expose_secret(&t.token).to_string();
        assert_eq!(parse_token(""), Err(AuthError::Missing));
        for bad in [
            "sk-abc",
            "tly_",
            "tly_abc_def",
            &token[..token.len() - 1],
            &format!("{token}A"),
            &token.replacen("tly_", "TLY_", 1),
            &format!("tly_{}_{}", "G".repeat(16), &token[21..]),
        ] {
            assert_eq!(parse_token(bad), Err(AuthError::Malformed), "{bad}");
        }
    }

    #[test]
    fn presented_token_reads_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h), None);
        h.insert("x-api-key", "tly_x".parse().unwrap());
        assert_eq!(presented_token(&h), Some("tly_x"));
        h.insert(header::AUTHORIZATION, "bearer tly_y".parse().unwrap());
        assert_eq!(presented_token(&h), Some("tly_y"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(presented_token(&h), None);
    }
}
