-- Chat: sessions (who owns them) and messages, persisted as they stream.

-- The caller's user id from the JWT claims Supabase (PostgREST) sets per request; null elsewhere.
create or replace function fleet_jwt_sub() returns uuid language sql stable as $$
    select nullif(coalesce(
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
        current_setting('request.jwt.claim.sub', true)), '')::uuid
$$;

create table if not exists chat_sessions (
    id          text primary key,
    user_id     uuid,
    created_at  timestamptz not null default now()
);

create table if not exists messages (
    id                bigserial primary key,
    session_id        text not null references chat_sessions (id) on delete cascade,
    role              text not null check (role in ('system', 'user', 'assistant')),
    content           text not null default '',
    status            text not null default 'complete' check (status in ('streaming', 'complete', 'partial', 'error')),
    model             text,
    tokens_in         integer,
    tokens_out        integer,
    tokens_estimated  boolean not null default false,
    finish_reason     text,
    error             text,
    idempotency_key   text,
    job_id            text,
    trace_id          uuid,
    created_at        timestamptz not null default now(),
    completed_at      timestamptz
);
-- One user message and one answer per idempotency key and session.
create unique index if not exists messages_idempotency_idx on messages (session_id, role, idempotency_key)
    where idempotency_key is not null;
create index if not exists messages_history_idx on messages (session_id, id);
create index if not exists messages_job_idx on messages (job_id) where job_id is not null;

alter table chat_sessions enable row level security;
alter table messages enable row level security;
drop policy if exists chat_sessions_owner on chat_sessions;
create policy chat_sessions_owner on chat_sessions for select to authenticated using (user_id = fleet_jwt_sub());
drop policy if exists messages_owner on messages;
create policy messages_owner on messages for select to authenticated
    using (exists (select 1 from chat_sessions s where s.id = messages.session_id and s.user_id = fleet_jwt_sub()));
revoke all on chat_sessions, messages from anon;
grant select on chat_sessions, messages to authenticated;
grant select, insert, update, delete on chat_sessions, messages to fleet_worker;
grant usage, select on sequence messages_id_seq to fleet_worker;
