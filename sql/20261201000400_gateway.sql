-- The HTTP gateway (`fleet gateway`): who asked for each job it enqueued (a user reads and streams
-- only their own jobs and traces), and the request signatures it has seen (a replayed signature is
-- refused by every gateway process, not only the one that saw it first).
create table if not exists gateway_jobs (
    job_id      text primary key,
    trace_id    uuid not null,
    kind        text not null check (kind in ('chat', 'embed')),
    user_id     uuid,
    session_id  text,
    created_at  timestamptz not null default now()
);
create index if not exists gateway_jobs_trace_idx on gateway_jobs (trace_id);

create table if not exists gateway_signatures (
    signature   text primary key,
    expires_at  timestamptz not null
);
create index if not exists gateway_signatures_expires_idx on gateway_signatures (expires_at);

alter table gateway_jobs enable row level security;
alter table gateway_signatures enable row level security;
revoke all on gateway_jobs, gateway_signatures from anon, authenticated;
do $$
begin
    if exists (select 1 from pg_roles where rolname = 'fleet_worker') then
        execute 'grant select, insert, update, delete on gateway_jobs, gateway_signatures to fleet_worker';
        if not exists (select 1 from pg_policy where polrelid = 'gateway_jobs'::regclass and polname = 'fleet_worker_all') then
            execute 'create policy fleet_worker_all on gateway_jobs to fleet_worker using (true) with check (true)';
        end if;
        if not exists (select 1 from pg_policy where polrelid = 'gateway_signatures'::regclass and polname = 'fleet_worker_all') then
            execute 'create policy fleet_worker_all on gateway_signatures to fleet_worker using (true) with check (true)';
        end if;
    end if;
end
$$;
