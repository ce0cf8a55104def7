-- The job types workers serve, published by every worker at start (fleet.shared.registry.publish): a SQL
-- producer, `fleet status` and the docs read what exists, its queue, its payload's JSON schema and its
-- options (retries, backoff, time limit, rate limit, lease, dead letters). A row stays after the last
-- worker serving it stops; published_at says when a worker last started with it.
create table if not exists job_types (
    name text primary key,
    queue text not null,
    description text not null default '',
    payload_schema jsonb,
    options jsonb not null default '{}'::jsonb,
    module text not null default '',
    published_at timestamptz not null default now()
);
create index if not exists job_types_queue on job_types (queue);

-- A catalogue for the fleet's own roles: not for Supabase's anon and authenticated roles.
alter table job_types enable row level security;
revoke all on job_types from anon, authenticated;
do $$
begin
    if exists (select 1 from pg_roles where rolname = 'fleet_worker') then
        execute 'grant select, insert, update on job_types to fleet_worker';
        if not exists (select 1 from pg_policy where polrelid = 'job_types'::regclass and polname = 'fleet_worker_all') then
            execute 'create policy fleet_worker_all on job_types to fleet_worker using (true) with check (true)';
        end if;
    end if;
end
$$;
