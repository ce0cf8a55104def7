-- Searches filter after the HNSW index: by row-level security (a tenant's own rows) and by the metadata
-- filter. An index scan hands back hnsw.ef_search (40) candidates, so a user whose rows are not among the
-- 40 nearest of everyone's got nothing. An iterative scan (pgvector 0.8) goes on until the rows that pass
-- the filters fill match_count, in exact distance order, up to hnsw.max_scan_tuples.
do $$
begin
    if string_to_array((select extversion from pg_extension where extname = 'vector'), '.')::int[] >= '{0,8}' then
        alter function match_code_vectors(vector, integer, jsonb) set hnsw.iterative_scan = strict_order;
        alter function match_agent_knowledge_vectors(vector, integer, jsonb, double precision)
            set hnsw.iterative_scan = strict_order;
    else
        raise warning 'pgvector % has no iterative index scans: a filtered search may return fewer rows than'
            ' asked for; pgvector 0.8 or later fixes it', (select extversion from pg_extension where extname = 'vector');
    end if;
end
$$;
