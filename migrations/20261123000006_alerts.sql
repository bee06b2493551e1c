-- Alerts (low balance, credits exhausted, lot expiring): an outbox of signed webhook
-- deliveries, and per account what has already been alerted. Not projections of the event
-- log: `tally ledger rebuild` leaves them alone, so a replay does not alert twice.

create table alert (
    -- Deterministic (uuid v5 of the crossing or the lot): the id receivers dedupe on.
    alert_id        uuid        primary key,
    kind            text        not null,
    account_id      text        not null,
    -- The lot a lot_expiring alert is about; null for balance alerts.
    lot_id          uuid,
    -- The webhook body, as delivered.
    payload         jsonb       not null,
    created_at      timestamptz not null,
    attempts        integer     not null default 0,
    -- When delivery is next due. A delivering instance moves it past its request timeout,
    -- so a crashed delivery is retried by anyone once that passes.
    next_attempt_at timestamptz not null,
    delivered_at    timestamptz,
    -- Why the last attempt failed (an HTTP status or a transport error); never a secret.
    last_error      text,
    constraint alert_kind_check check (kind in ('low_balance', 'credits_exhausted', 'lot_expiring')),
    constraint alert_attempts_not_negative check (attempts >= 0),
    -- Exactly the expiry alerts name a lot.
    constraint alert_lot_shape check ((kind = 'lot_expiring') = (lot_id is not null))
);
-- One expiry alert per lot, whichever instance raises it first.
create unique index alert_lot_expiring_key on alert (lot_id) where kind = 'lot_expiring';
-- Delivery takes the due rows among the undelivered.
create index alert_due_idx on alert (next_attempt_at) where delivered_at is null;
create index alert_account_idx on alert (account_id, created_at);

-- Per account: which balance alerts have fired and not yet re-armed (the balance rising back
-- out of the condition re-arms it). Evaluators lock the row, so a crossing is recorded once.
create table alert_state (
    account_id               text        primary key,
    low_balance_active       boolean     not null,
    credits_exhausted_active boolean     not null,
    -- How many times each alert fired: part of the alert id, so every crossing has its own.
    low_balance_count        bigint      not null,
    credits_exhausted_count  bigint      not null,
    -- account.last_event_seq as last evaluated (-1: never).
    last_event_seq           bigint      not null,
    -- When the clock alone may change the account's decision (a lot expiring or starting).
    next_check_at            timestamptz,
    updated_at               timestamptz not null,
    constraint alert_state_counts_not_negative check (low_balance_count >= 0 and credits_exhausted_count >= 0)
);
create index alert_state_next_check_idx on alert_state (next_check_at) where next_check_at is not null;
