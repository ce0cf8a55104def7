-- Memory store (MemCube style): memories, their payloads, links to tasks, and the lifecycle's
-- record of every action, which is what makes each action reversible.

create table if not exists project_members (
    project_id  text not null,
    user_id     uuid not null,
    primary key (project_id, user_id)
);

create table if not exists memories (
    id                    uuid primary key default gen_random_uuid(),
    project_id            text not null,
    label                 text,
    type                  text not null default 'semantic',
    status                text not null default 'activated'
                          check (status in ('activated', 'archived', 'expired', 'merged', 'deleted')),
    version               integer not null default 1,
    governance            jsonb not null default '{}'::jsonb,  -- e.g. {"ttl_s": 86400}
    metadata              jsonb not null default '{}'::jsonb,
    embedding             vector(1024),
    embedding_model       text,
    confidence            real not null default 1.0 check (confidence >= 0 and confidence <= 1),
    confidence_decayed_at timestamptz,
    pinned                boolean not null default false,
    expires_at            timestamptz,
    last_accessed_at      timestamptz not null default now(),
    merged_into           uuid references memories (id),
    created_by            text,
    created_at            timestamptz not null default now(),
    updated_at            timestamptz not null default now(),
    status_changed_at     timestamptz not null default now()
);
create index if not exists memories_project_status_idx on memories (project_id, status, type);
create index if not exists memories_active_access_idx on memories (last_accessed_at) where status = 'activated';
create index if not exists memories_expires_idx on memories (expires_at) where status in ('activated', 'archived');
-- the self-reference needs its own index, or deleting memories scans the table once per row
create index if not exists memories_merged_into_idx on memories (merged_into) where merged_into is not null;
create index if not exists memories_embedding_idx on memories using hnsw (embedding vector_cosine_ops)
    where status = 'activated';

create table if not exists memory_payloads (
    memory_id     uuid primary key references memories (id) on delete cascade,
    content       text,
    storage_mode  text not null default 'inline',
    size_bytes    integer,
    token_count   integer
);

create table if not exists memory_task_links (
    memory_id   uuid not null references memories (id) on delete cascade,
    task_id     text not null,
    role        text not null default 'context',
    created_at  timestamptz not null default now(),
    primary key (memory_id, task_id, role)
);

create table if not exists memory_lifecycle_actions (
    id               bigserial primary key,
    run_id           uuid not null,
    memory_id        uuid not null,
    action           text not null,  -- expire, archive, decay, evict, merge, reembed, purge
    from_status      text,
    to_status        text,
    from_confidence  real,
    to_confidence    real,
    merged_into      uuid,
    created_at       timestamptz not null default now()
);
create index if not exists memory_lifecycle_actions_run_idx on memory_lifecycle_actions (run_id);
create index if not exists memory_lifecycle_actions_memory_idx on memory_lifecycle_actions (memory_id);

alter table project_members enable row level security;
alter table memories enable row level security;
alter table memory_payloads enable row level security;
alter table memory_task_links enable row level security;
alter table memory_lifecycle_actions enable row level security;
drop policy if exists project_members_self on project_members;
create policy project_members_self on project_members for select to authenticated using (user_id = fleet_jwt_sub());
drop policy if exists memories_members on memories;
create policy memories_members on memories for select to authenticated using (
    exists (select 1 from project_members pm where pm.project_id = memories.project_id and pm.user_id = fleet_jwt_sub()));
drop policy if exists memory_payloads_members on memory_payloads;
create policy memory_payloads_members on memory_payloads for select to authenticated using (
    exists (select 1 from memories m join project_members pm on pm.project_id = m.project_id
            where m.id = memory_payloads.memory_id and pm.user_id = fleet_jwt_sub()));
drop policy if exists memory_task_links_members on memory_task_links;
create policy memory_task_links_members on memory_task_links for select to authenticated using (
    exists (select 1 from memories m join project_members pm on pm.project_id = m.project_id
            where m.id = memory_task_links.memory_id and pm.user_id = fleet_jwt_sub()));
revoke all on project_members, memories, memory_payloads, memory_task_links, memory_lifecycle_actions from anon;
revoke all on memory_lifecycle_actions from authenticated;
grant select on project_members, memories, memory_payloads, memory_task_links to authenticated;
grant select, insert, update, delete on project_members, memories, memory_payloads, memory_task_links,
    memory_lifecycle_actions to fleet_worker;
grant usage, select on sequence memory_lifecycle_actions_id_seq to fleet_worker;
