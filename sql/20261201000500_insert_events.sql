-- One definition of how a batch of bus_events is written: fleet_insert_events(events), a JSON array of
-- [trace_id, job_id, queue, actor, type, payload] rows. The Python event writer calls it, and so does the
-- pgmq consumer's round trip (fleet_ack_and_read), which writes the finished jobs' events in its ack
-- transaction; before, each held its own copy of the insert.
create or replace function fleet_insert_events(events jsonb) returns void language sql as $$
    insert into bus_events (trace_id, job_id, queue, actor, type, payload)
    select (e->>0)::uuid, e->>1, e->>2, e->>3, e->>4, e->5 from jsonb_array_elements(events) e;
$$;

create or replace function fleet_ack_and_read(queue_name text, ack_ids bigint[], archive_ids bigint[],
                                              vt integer, qty integer, events jsonb, lazy boolean)
returns setof pgmq.message_record language plpgsql as $$
begin
    if lazy then
        perform set_config('synchronous_commit', 'off', true);
    end if;
    if events is not null then
        perform fleet_insert_events(events);
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
