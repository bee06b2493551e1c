-- Logical model names of an account that resolve to an ordered fallback chain or a weighted
-- split of targets, applied before credential selection.
create table model_route (
    account_id text        not null,
    name       text        not null,
    mode       text        not null,
    -- [{"model": "provider:model", "credential": "any|byok|managed", "priority": n, "weight": n}]
    targets    jsonb       not null,
    updated_at timestamptz not null,
    constraint model_route_pkey primary key (account_id, name),
    constraint model_route_mode_check check (mode in ('fallback', 'split')),
    constraint model_route_targets_array check (jsonb_typeof(targets) = 'array')
);
