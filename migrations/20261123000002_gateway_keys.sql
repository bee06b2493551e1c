-- Gateway API keys, provider credentials and custom providers: the gateway's configuration,
-- sources of truth of their own (not projections of the event log). They name accounts but have
-- no foreign key to `account`, because that projection is truncated and rebuilt by replay; the
-- admin API checks that the account exists before writing.

-- A key authenticates clients to one endpoint of an account. The token (`tly_<key_id>_<secret>`)
-- is shown once at creation; only the hash of its secret is kept.
create table gateway_api_key (
    key_id       text        primary key,
    account_id   text        not null,
    endpoint_id  text        not null,
    -- The part of the token safe to show again (`tly_<key_id>`), so users can tell keys apart.
    prefix       text        not null,
    secret_hash  bytea       not null,
    description  text        not null default '',
    metadata     jsonb       not null default '{}',
    created_at   timestamptz not null,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    -- Lets provider_credential refer to a key *of the same account*.
    constraint gateway_api_key_account_key unique (key_id, account_id),
    -- sha256 of the 32-byte secret.
    constraint gateway_api_key_secret_hash_len check (octet_length(secret_hash) = 32),
    constraint gateway_api_key_metadata_object check (jsonb_typeof(metadata) = 'object'),
    constraint gateway_api_key_revoked_after_created check (revoked_at is null or revoked_at >= created_at)
);
create index gateway_api_key_account_idx on gateway_api_key (account_id, created_at);

-- A customer's key for an upstream provider, sealed with ChaCha20-Poly1305 under the
-- key-encryption key, with the account id and credential id as associated data.
create table provider_credential (
    credential_id text        primary key,
    -- Insertion order: breaks ties between equal positions or equal attach times, so the lookup
    -- order is total and the same on every gateway.
    seq           bigint      generated always as identity,
    account_id    text        not null,
    provider      text        not null,
    kind          text        not null,
    -- The gateway API key an attached credential belongs to; null for BYOK.
    api_key_id    text,
    -- BYOK keys are tried in ascending position; attached keys by most recent attached_at.
    position      integer,
    -- Both null once removed: the key material is erased, the masked form stays for audit.
    nonce         bytea,
    ciphertext    bytea,
    masked        text        not null,
    created_at    timestamptz not null,
    attached_at   timestamptz,
    rotated_at    timestamptz,
    removed_at    timestamptz,
    constraint provider_credential_kind_check check (kind in ('byok', 'attached')),
    constraint provider_credential_api_key_fkey foreign key (api_key_id, account_id)
        references gateway_api_key (key_id, account_id),
    -- Attached keys belong to a gateway API key and have an attach time; BYOK keys a position.
    constraint provider_credential_attached_shape check (
        (kind = 'attached' and api_key_id is not null and attached_at is not null and position is null)
        or (kind = 'byok' and api_key_id is null and attached_at is null and position is not null)
    ),
    constraint provider_credential_position_not_negative check (position >= 0),
    -- A live credential always has its sealed key; 12 bytes is the ChaCha20-Poly1305 nonce.
    constraint provider_credential_sealed check (
        (removed_at is null and octet_length(nonce) = 12 and ciphertext is not null)
        or (removed_at is not null and nonce is null and ciphertext is null)
    )
);
create index provider_credential_account_idx on provider_credential (account_id, provider)
    where removed_at is null;

-- An OpenAI- or Anthropic-compatible upstream of one account (Ollama, vLLM, ...). Served with the
-- account's own keys only: the platform has no managed key for it.
create table custom_provider (
    account_id  text        not null,
    provider_id text        not null,
    base_url    text        not null,
    api_shape   text        not null,
    created_at  timestamptz not null,
    -- A second registration of the same id is refused, not merged.
    constraint custom_provider_pkey primary key (account_id, provider_id),
    constraint custom_provider_api_shape_check check (api_shape in ('openai', 'anthropic')),
    constraint custom_provider_base_url_http check (base_url ~ '^https?://')
);
