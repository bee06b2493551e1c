-- The event log is append-only: an applied event is never changed or removed (a correction is a
-- new event). Since 20261123000008 the ledger lines' reference to their event is checked per
-- statement, without row locks, so the log itself refuses every change instead: no ledger line
-- can lose its event, and the log stays the source every projection is rebuilt from.
create function event_is_append_only() returns trigger
language plpgsql as $$
begin
    raise exception 'the event log is append-only: % on event is not allowed', tg_op
        using errcode = 'restrict_violation';
end
$$;

create trigger event_append_only_row before update or delete on event
    for each row execute function event_is_append_only();
create trigger event_append_only_truncate before truncate on event
    for each statement execute function event_is_append_only();
