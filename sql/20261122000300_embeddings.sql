-- Embeddings: two pgvector tables with a natural key, nearest-neighbour functions, and the trigger
-- helper for automatic embeddings. The dimension is 1024 (BAAI/bge-m3, DeepInfra's default); to use
-- another, add a follow-up migration as the README shows ("Embedding dimension").

create table if not exists vector_documents (
    id            bigserial primary key,
    source_id     text not null,
    chunk_index   integer not null default 0 check (chunk_index >= 0),
    content       text not null,
    metadata      jsonb not null default '{}'::jsonb,
    model         text not null,
    content_hash  text not null,
    embedding     vector(1024) not null,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    unique (source_id, chunk_index)
);
create index if not exists vector_documents_embedding_idx on vector_documents
    using hnsw (embedding vector_cosine_ops);
create index if not exists vector_documents_metadata_idx on vector_documents using gin (metadata jsonb_path_ops);

create table if not exists code_vectors (like vector_documents including all);
-- `like ... including all` copies the defaults but shares the sequence: give code_vectors its own.
create sequence if not exists code_vectors_id_seq owned by code_vectors.id;
alter table code_vectors alter column id set default nextval('code_vectors_id_seq');
create index if not exists code_vectors_embedding_idx on code_vectors using hnsw (embedding vector_cosine_ops);

-- The dimension of a table's `embedding` column (the worker checks what the provider returns against it).
create or replace function get_vector_dim(table_name text) returns integer language sql stable as $$
    select a.atttypmod from pg_attribute a
    where a.attrelid = to_regclass(table_name) and a.attname = 'embedding' and not a.attisdropped
$$;

create or replace function match_code_vectors(query_embedding vector, match_count integer default 10,
                                              filter jsonb default '{}'::jsonb)
returns table (id bigint, source_id text, chunk_index integer, content text, metadata jsonb, similarity double precision)
language sql stable as $$
    select c.id, c.source_id, c.chunk_index, c.content, c.metadata, 1 - (c.embedding <=> query_embedding)
    from code_vectors c
    where c.metadata @> filter
    order by c.embedding <=> query_embedding
    limit least(match_count, 200)
$$;

create or replace function match_agent_knowledge_vectors(query_embedding vector, match_count integer default 10,
                                                         filter jsonb default '{}'::jsonb,
                                                         min_similarity double precision default 0)
returns table (id bigint, source_id text, chunk_index integer, content text, metadata jsonb, similarity double precision)
language sql stable as $$
    select * from (
        select d.id, d.source_id, d.chunk_index, d.content, d.metadata, 1 - (d.embedding <=> query_embedding) as similarity
        from vector_documents d
        where d.metadata @> filter
        order by d.embedding <=> query_embedding
        limit least(match_count, 200)
    ) nearest
    where nearest.similarity >= min_similarity
$$;

-- Tenants may read the vectors (search), never write them; anon sees nothing.
alter table vector_documents enable row level security;
alter table code_vectors enable row level security;
drop policy if exists vector_documents_read on vector_documents;
create policy vector_documents_read on vector_documents for select to authenticated using (true);
drop policy if exists code_vectors_read on code_vectors;
create policy code_vectors_read on code_vectors for select to authenticated using (true);
revoke all on vector_documents, code_vectors from anon;
grant select on vector_documents, code_vectors to authenticated;
grant select, insert, update, delete on vector_documents, code_vectors to fleet_worker;
grant usage, select on sequence vector_documents_id_seq, code_vectors_id_seq to fleet_worker;

-- Automatic embeddings: attach to a content table whose source is registered in EMBED_SOURCES.
-- Statement-level, with a transition table, so a bulk insert enqueues one job per 100 rows:
--   create trigger docs_embed_insert after insert on docs referencing new table as new_rows
--       for each statement execute function fleet_enqueue_embedding('docs', 'id');
--   create trigger docs_embed_update after update on docs referencing new table as new_rows
--       for each statement execute function fleet_enqueue_embedding('docs', 'id');
-- Arguments: the source name, the id column (default id), the ids per job (default 100).
create or replace function fleet_enqueue_embedding() returns trigger language plpgsql as $$
declare
    source     text := tg_argv[0];
    id_column  text := coalesce(tg_argv[1], 'id');
    per_job    integer := coalesce(tg_argv[2]::integer, 100);
    ids        jsonb;
begin
    if source is null then
        raise exception 'fleet_enqueue_embedding needs the source name as its first argument';
    end if;
    for ids in execute format(
        'select jsonb_agg(k) from (select %I::text as k, (row_number() over () - 1) / %s as g from new_rows) s group by g',
        id_column, per_job)
    loop
        perform pgmq.send('embed', jsonb_build_object('source', source, 'ids', ids));
    end loop;
    return null;
end $$;
