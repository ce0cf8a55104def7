-- The worker role works through row-level security: every fleet table has RLS on (so anon and
-- authenticated see only what their own policies allow), and fleet_worker needs a policy of its own
-- on each to read and write the fleet's rows. A table added later gets its policy in its migration.
do $$
declare
    t record;
begin
    for t in
        select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'public' and c.relkind = 'r' and c.relrowsecurity
          and has_table_privilege('fleet_worker', c.oid, 'select')
          and not exists (select 1 from pg_policy p where p.polrelid = c.oid and p.polname = 'fleet_worker_all')
    loop
        execute format('create policy fleet_worker_all on public.%I to fleet_worker using (true) with check (true)',
                       t.relname);
    end loop;
end
$$;
