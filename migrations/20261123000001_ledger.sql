-- The event log and every projection of it. Projections (account, credit_lot, ledger_entry,
-- usage_hourly) are rebuilt from event by `tally ledger rebuild`; event, event_conflict,
-- price_version and idempotency_record are the sources of truth.

create sequence event_seq as bigint;

create table event (
    -- Log order. Events of one account are appended under that account's lock, so their seq
    -- order is their application order.
    seq          bigint      primary key,
    event_id     uuid        not null,
    account_id   text        not null,
    kind         text        not null,
    occurred_at  timestamptz not null,
    recorded_at  timestamptz not null,
    payload      jsonb       not null,
    payload_hash bytea       not null,
    -- The duplicate detector: an event id is applied at most once.
    constraint event_event_id_key unique (event_id)
);
create index event_account_seq_idx on event (account_id, seq);
create index event_kind_occurred_idx on event (kind, occurred_at);

-- Same event id offered with a different payload: kept for inspection, never applied.
create table event_conflict (
    event_id        uuid        not null,
    offered_hash    bytea       not null,
    existing_hash   bytea       not null,
    offered_payload jsonb       not null,
    first_seen_at   timestamptz not null,
    times_seen      bigint      not null default 1,
    constraint event_conflict_pkey primary key (event_id, offered_hash)
);

create table price_version (
    version        text        primary key,
    effective_from timestamptz not null,
    document       jsonb       not null,
    published_at   timestamptz not null,
    constraint price_version_effective_from_key unique (effective_from)
);

create table idempotency_record (
    scope           text        not null,
    idempotency_key text        not null,
    request_hash    bytea       not null,
    response_status smallint    not null,
    response_body   jsonb       not null,
    created_at      timestamptz not null,
    constraint idempotency_record_pkey primary key (scope, idempotency_key)
);

create table account (
    account_id                text           primary key,
    name                      text           not null,
    low_balance_threshold_usd numeric(30, 9) not null,
    opened_at                 timestamptz    not null,
    debt_usd                  numeric(30, 9) not null,
    purchased_usd             numeric(30, 9) not null,
    granted_usd               numeric(30, 9) not null,
    burned_usd                numeric(30, 9) not null,
    expired_usd               numeric(30, 9) not null,
    voided_usd                numeric(30, 9) not null,
    debt_incurred_usd         numeric(30, 9) not null,
    debt_settled_usd          numeric(30, 9) not null,
    charged_upstream_usd      numeric(30, 9) not null,
    charged_fee_usd           numeric(30, 9) not null,
    byok_attributed_usd       numeric(30, 9) not null,
    last_event_seq            bigint         not null,
    -- Debt is what usage took beyond the credits; it is never negative.
    constraint account_debt_not_negative check (debt_usd >= 0),
    constraint account_debt_identity check (debt_usd = debt_incurred_usd - debt_settled_usd)
);

create table credit_lot (
    lot_id        uuid           primary key,
    account_id    text           not null references account (account_id),
    source        text           not null,
    amount_usd    numeric(30, 9) not null,
    remaining_usd numeric(30, 9) not null,
    burned_usd    numeric(30, 9) not null,
    expired_usd   numeric(30, 9) not null,
    voided_usd    numeric(30, 9) not null,
    priority      integer        not null,
    granted_at    timestamptz    not null,
    expires_at    timestamptz    not null,
    status        text           not null,
    closed_at     timestamptz,
    constraint credit_lot_source_check check (source in ('purchase', 'grant')),
    constraint credit_lot_status_check check (status in ('open', 'expired', 'voided')),
    constraint credit_lot_amount_positive check (amount_usd > 0),
    constraint credit_lot_remaining_not_negative check (remaining_usd >= 0),
    -- Every cent of a lot is accounted for.
    constraint credit_lot_conserved check (amount_usd = burned_usd + expired_usd + voided_usd + remaining_usd),
    constraint credit_lot_window check (expires_at > granted_at)
);
create index credit_lot_open_idx on credit_lot (account_id) where status = 'open';
create index credit_lot_due_idx on credit_lot (expires_at) where status = 'open';

-- Double-entry lines; the lines of one event sum to zero. Debits positive, credits negative.
create table ledger_entry (
    event_seq      bigint         not null references event (seq),
    line_no        integer        not null,
    event_id       uuid           not null,
    account_id     text           not null,
    ledger_account text           not null,
    amount_usd     numeric(30, 9) not null,
    lot_id         uuid,
    price_version  text,
    occurred_at    timestamptz    not null,
    constraint ledger_entry_pkey primary key (event_seq, line_no),
    constraint ledger_entry_amount_not_zero check (amount_usd <> 0)
);
create index ledger_entry_account_idx on ledger_entry (account_id, event_seq);

-- Usage per hour of event time and every dimension a report groups by. Sums only, so the
-- order in which events are applied cannot change a row.
create table usage_hourly (
    account_id              text           not null,
    hour                    timestamptz    not null,
    endpoint_id             text           not null,
    api_key_id              text           not null,
    credential_kind         text           not null,
    credential_id           text           not null,
    provider                text           not null,
    model                   text           not null,
    requests                bigint         not null,
    failed_requests         bigint         not null,
    streaming_requests      bigint         not null,
    estimated_requests      bigint         not null,
    unpriced_requests       bigint         not null,
    fallback_priced_requests bigint        not null,
    input_tokens            bigint         not null,
    cached_input_tokens     bigint         not null,
    output_tokens           bigint         not null,
    reasoning_tokens        bigint         not null,
    upstream_cost_usd       numeric(30, 9) not null,
    fee_usd                 numeric(30, 9) not null,
    charged_usd             numeric(30, 9) not null,
    attributed_usd          numeric(30, 9) not null,
    upstream_latency_ms_sum bigint         not null,
    total_latency_ms_sum    bigint         not null,
    constraint usage_hourly_pkey primary key
        (account_id, hour, endpoint_id, api_key_id, credential_kind, credential_id, provider, model),
    constraint usage_hourly_credential_kind_check check (credential_kind in ('attached', 'byok', 'managed'))
);
