-- The consumer's round trip decides how its own transaction commits, and nothing else's.
-- `synchronous_commit = off` was set per session; behind a transaction pooler (port 6543) a session is
-- shared, so it leaked into other clients' transactions, enqueues included. Now it is set with
-- set_config(..., is_local => true), which ends with this transaction, and only when `lazy` is true:
-- a batch of plain acks of succeeded jobs. A lost lazy ack (a crash before the WAL flush) means the job
-- runs again, which at-least-once delivery allows. Rejects and the acks of failed attempts (whose retry
-- is already enqueued, durably) commit synchronously: losing one would leave a second live copy of a
-- retried job, or a dead-lettered job that runs again.
drop function if exists fleet_ack_and_read(text, bigint[], bigint[], integer, integer, jsonb);

create or replace function fleet_ack_and_read(queue_name text, ack_ids bigint[], archive_ids bigint[],
                                              vt integer, qty integer, events jsonb, lazy boolean)
returns setof pgmq.message_record language plpgsql as $$
begin
    if lazy then
        perform set_config('synchronous_commit', 'off', true);
    end if;
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
