-- Request logs (GET /v1/request-logs) read usage events straight from the log, newest first,
-- instead of a table of their own, so ingest writes nothing extra per event but these index
-- entries. They serve the two filters a page is most often cut by: the account, and the
-- gateway API key (key ids are unique across accounts). Other filters ride on one of these or
-- on event_kind_occurred_idx.
create index event_usage_account_time_idx on event (account_id, occurred_at, seq)
    where kind = 'usage';
create index event_usage_api_key_time_idx on event ((payload ->> 'api_key_id'), occurred_at, seq)
    where kind = 'usage';
