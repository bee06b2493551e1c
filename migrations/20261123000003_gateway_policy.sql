-- Per-account gateway policy. Absent row: the defaults (strict).
create table gateway_policy (
    account_id          text        primary key,
    -- strict: a provider with BYOK or attached keys never falls back to managed keys, so the
    -- customer is never charged credits for traffic they meant to pay for themselves.
    -- fallback_to_managed: when every customer key of a provider fails, managed keys are tried
    -- (and charged, subject to credits).
    byok_failure_policy text        not null,
    updated_at          timestamptz not null,
    constraint gateway_policy_byok_failure_policy_check
        check (byok_failure_policy in ('strict', 'fallback_to_managed'))
);
