-- Vectors are read per owner. A row's owner is named by its key (source_id), the key spaces the
-- gateway and the embed worker already write:
--   u:{user uuid}:...     a user's own documents: readable by that user only;
--   p:{project id}:  ...  a project's documents: readable by the project's members (project_members);
--   {source}:{row id}     a registered source's rows: readable as the source's row in
--                         vector_shared_sources says (every authenticated user, or one project's members);
--                         a source with no row there is readable by no tenant.
-- Any other key is the operator's and no tenant reads it. The search functions (match_*) run as
-- their caller, so they return only what these policies let the caller read.

create table if not exists vector_shared_sources (
    source      text primary key check (source <> '' and position(':' in source) = 0),
    project_id  text,  -- null: every authenticated user; else only that project's members (project_members)
    created_at  timestamptz not null default now()
);
comment on table vector_shared_sources is
    'Registered embed sources (EMBED_SOURCES names) whose vectors tenants may read; null project_id: every authenticated user';

alter table vector_shared_sources enable row level security;
revoke all on vector_shared_sources from anon, authenticated;
do $$
begin
    if exists (select 1 from pg_roles where rolname = 'fleet_worker') then
        execute 'grant select, insert, update, delete on vector_shared_sources to fleet_worker';
        if not exists (select 1 from pg_policy where polrelid = 'vector_shared_sources'::regclass
                       and polname = 'fleet_worker_all') then
            execute 'create policy fleet_worker_all on vector_shared_sources to fleet_worker using (true) with check (true)';
        end if;
    end if;
end
$$;

-- Whether the caller (fleet_jwt_sub()) may read a vector row with this key. security definer: it
-- reads project_members and vector_shared_sources, which tenants cannot read themselves.
create or replace function fleet_may_read_vector(source_id text) returns boolean
language sql stable security definer set search_path = public, pg_temp as $$
    select case split_part(source_id, ':', 1)
        when 'u' then split_part(source_id, ':', 2) = fleet_jwt_sub()::text
        when 'p' then exists (select 1 from project_members pm
                              where pm.project_id = split_part(source_id, ':', 2)
                                and pm.user_id = fleet_jwt_sub())
        else exists (select 1 from vector_shared_sources s
                     where s.source = split_part(source_id, ':', 1)
                       and position(':' in source_id) > 0
                       and (s.project_id is null
                            or exists (select 1 from project_members pm
                                       where pm.project_id = s.project_id and pm.user_id = fleet_jwt_sub())))
    end and fleet_jwt_sub() is not null
$$;
revoke all on function fleet_may_read_vector(text) from public;
grant execute on function fleet_may_read_vector(text) to authenticated;

drop policy if exists vector_documents_read on vector_documents;
create policy vector_documents_read on vector_documents for select to authenticated
    using (fleet_may_read_vector(source_id));
drop policy if exists code_vectors_read on code_vectors;
create policy code_vectors_read on code_vectors for select to authenticated
    using (fleet_may_read_vector(source_id));
