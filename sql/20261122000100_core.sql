-- Core of the fleet: the event log, dead letters, idempotency records and the roles.

create extension if not exists vector;

create table if not exists bus_events (
    id          bigserial primary key,
    trace_id    uuid,
    job_id      text,
    queue       text,
    actor       text,
    type        text not null,
    payload     jsonb not null default '{}'::jsonb,
    created_at  timestamptz not null default now()
);
create index if not exists bus_events_trace_id_idx on bus_events (trace_id);
create index if not exists bus_events_created_at_idx on bus_events using brin (created_at);
create index if not exists bus_events_job_id_idx on bus_events (job_id);

-- Append-only: the log is history.
create or replace function fleet_refuse_change() returns trigger language plpgsql as $$
begin
    raise exception '% is append-only: % is not allowed', tg_table_name, tg_op
        using errcode = 'insufficient_privilege';
end $$;
drop trigger if exists bus_events_append_only on bus_events;
create trigger bus_events_append_only before update on bus_events
    for each row execute function fleet_refuse_change();

create table if not exists dead_letters (
    id           bigserial primary key,
    queue        text not null,
    actor        text,
    message_id   text,
    message      jsonb,
    raw          text,
    reason       text not null,
    error_class  text,
    error        text,
    attempts     integer not null default 0,
    trace_id     uuid,
    created_at   timestamptz not null default now(),
    retried_at   timestamptz
);
create index if not exists dead_letters_queue_idx on dead_letters (queue, created_at);
create index if not exists dead_letters_trace_id_idx on dead_letters (trace_id);

create table if not exists request_dedup (
    scope       text not null,
    key         text not null,
    result      jsonb,
    created_at  timestamptz not null default now(),
    expires_at  timestamptz,
    primary key (scope, key)
);
create index if not exists request_dedup_expires_idx on request_dedup (expires_at);

-- Wake-ups for pgmq consumers: one NOTIFY per INSERT statement on a queue table (a send_batch of
-- 1,000 rows notifies once), on the channel pgmq itself uses. pgmq's own row-level trigger costs
-- a throttle-table UPDATE per row, which cut send_batch throughput tenfold.
create or replace function fleet_notify_queue_insert() returns trigger language plpgsql as $$
begin
    perform pg_notify('pgmq.' || tg_table_name || '.INSERT', null);
    return null;
end $$;

-- Creates a queue (idempotent) with its insert notification. The names are checked before use.
create or replace function fleet_ensure_queue(queue_name text) returns void language plpgsql as $$
begin
    if queue_name !~ '^[a-z][a-z0-9_]{0,46}$' then
        raise exception 'invalid queue name %: lowercase letters, digits and _ (max 47), starting with a letter', queue_name
            using errcode = 'invalid_parameter_value';
    end if;
    perform pgmq.create(queue_name);
    if not exists (select 1 from pg_trigger t join pg_class c on c.oid = t.tgrelid
                   join pg_namespace n on n.oid = c.relnamespace
                   where n.nspname = 'pgmq' and c.relname = 'q_' || queue_name and t.tgname = 'fleet_notify_insert') then
        execute format('create trigger fleet_notify_insert after insert on pgmq.%I for each statement '
                       'execute function fleet_notify_queue_insert()', 'q_' || queue_name);
    end if;
end $$;

-- A consumer's round trip, in one call and one transaction: record the finished jobs' events,
-- acknowledge (delete), reject (archive), and read the next batch.
create or replace function fleet_ack_and_read(queue_name text, ack_ids bigint[], archive_ids bigint[],
                                              vt integer, qty integer, events jsonb default null)
returns setof pgmq.message_record language plpgsql as $$
begin
    if events is not null then
        insert into bus_events (trace_id, job_id, queue, actor, type, payload)
        select (e->>0)::uuid, e->>1, e->>2, e->>3, e->>4, e->5 from jsonb_array_elements(events) e;
    end if;
    if cardinality(ack_ids) > 0 then
        perform pgmq.delete(queue_name, ack_ids);
    end if;
    if cardinality(archive_ids) > 0 then
        perform pgmq.archive(queue_name, archive_ids);
    end if;
    if qty > 0 then
        return query select * from pgmq.read(queue_name, vt, qty);
    end if;
end $$;

-- Roles. Supabase already has anon and authenticated; plain Postgres gets them here.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'anon') then
        create role anon nologin;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then
        create role authenticated nologin;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'fleet_worker') then
        -- Workers connect as (or SET ROLE to) this role: data, not schema.
        create role fleet_worker nologin;
    end if;
end $$;

grant usage on schema public to fleet_worker;
grant select, insert, update, delete on all tables in schema public to fleet_worker;
grant usage, select on all sequences in schema public to fleet_worker;
alter default privileges in schema public grant select, insert, update, delete on tables to fleet_worker;
alter default privileges in schema public grant usage, select on sequences to fleet_worker;
revoke create on schema public from fleet_worker;
do $$
begin
    if exists (select 1 from pg_namespace where nspname = 'pgmq') then
        execute 'grant usage on schema pgmq to fleet_worker';
        execute 'grant select, insert, update, delete on all tables in schema pgmq to fleet_worker';
        execute 'grant usage, select on all sequences in schema pgmq to fleet_worker';
        execute 'grant execute on all functions in schema pgmq to fleet_worker';
        execute 'alter default privileges in schema pgmq grant select, insert, update, delete on tables to fleet_worker';
        execute 'alter default privileges in schema pgmq grant usage, select on sequences to fleet_worker';
    end if;
end $$;

-- Tenants see none of the fleet's internals.
alter table bus_events enable row level security;
alter table dead_letters enable row level security;
alter table request_dedup enable row level security;
revoke all on bus_events, dead_letters, request_dedup from anon, authenticated;

-- The scheduler's memory: when each periodic job was last enqueued, so a new leader does not repeat it.
create table if not exists scheduler_runs (
    name             text primary key,
    last_enqueued_at timestamptz not null
);
alter table scheduler_runs enable row level security;
revoke all on scheduler_runs from anon, authenticated;
grant select, insert, update, delete on scheduler_runs to fleet_worker;
