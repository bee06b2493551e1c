-- Ingest write cost (issue 4, performance).
--
-- ledger_entry → event: the row-level foreign key ran one `select ... for key share` per ledger
-- line (three lines per usage event), which locked (and so rewrote) every event row the batch
-- had just inserted. The same rule is now checked once per statement over all the rows the
-- statement wrote. Events are never deleted or renumbered; the event-side triggers keep that
-- from happening under a ledger line all the same.
alter table ledger_entry drop constraint ledger_entry_event_seq_fkey;

create function ledger_entry_check_event() returns trigger
language plpgsql as $$
declare
    missing bigint;
begin
    select n.event_seq into missing
      from (select distinct event_seq from new_entries) as n
     where not exists (select 1 from event e where e.seq = n.event_seq)
     limit 1;
    if found then
        raise exception 'insert or update on table "ledger_entry" violates foreign key constraint "ledger_entry_event_seq_fkey"'
            using errcode = 'foreign_key_violation',
                  detail = format('Key (event_seq)=(%s) is not present in table "event".', missing),
                  table = 'ledger_entry', constraint = 'ledger_entry_event_seq_fkey';
    end if;
    return null;
end
$$;

create trigger ledger_entry_event_insert after insert on ledger_entry
    referencing new table as new_entries for each statement execute function ledger_entry_check_event();
create trigger ledger_entry_event_update after update on ledger_entry
    referencing new table as new_entries for each statement execute function ledger_entry_check_event();

create function event_check_ledger_entry() returns trigger
language plpgsql as $$
declare
    orphan bigint;
begin
    select o.seq into orphan
      from old_events o
     where exists (select 1 from ledger_entry l where l.event_seq = o.seq)
       and not exists (select 1 from event e where e.seq = o.seq)
     limit 1;
    if found then
        raise exception 'update or delete on table "event" violates foreign key constraint "ledger_entry_event_seq_fkey" on table "ledger_entry"'
            using errcode = 'foreign_key_violation',
                  detail = format('Key (seq)=(%s) is still referenced from table "ledger_entry".', orphan),
                  table = 'event', constraint = 'ledger_entry_event_seq_fkey';
    end if;
    return null;
end
$$;

create trigger event_ledger_entry_delete after delete on event
    referencing old table as old_events for each statement execute function event_check_ledger_entry();
create trigger event_ledger_entry_update after update on event
    referencing old table as old_events for each statement execute function event_check_ledger_entry();

-- The projections updated in place on every batch: room on each page for the new row version
-- makes those updates HOT (no index entry per update).
alter table usage_hourly set (fillfactor = 70);
alter table account set (fillfactor = 50);
alter table credit_lot set (fillfactor = 70);
