-- What the Agent Management Service over HTTP needs: a run's own halt policy and id, and agent jobs in gateway_jobs.

-- A run may carry its own halt threshold (the gateway's POST /v1/upgrades, `fleet upgrade run`); a run
-- without one halts by UPGRADE_HALT_FAILURE_RATE after UPGRADE_HALT_MIN_SAMPLE finished agents.
alter table upgrade_runs add column if not exists halt_failure_rate real
    check (halt_failure_rate is null or (halt_failure_rate > 0 and halt_failure_rate <= 1));
alter table upgrade_runs add column if not exists halt_min_sample integer
    check (halt_min_sample is null or halt_min_sample >= 1);

-- The run's id may be given by the producer (an HTTP request's idempotency key names it): a run that exists
-- already is returned and its fan-out is not enqueued again.
drop function if exists ams_enqueue_upgrade(text, text, jsonb, boolean);
create or replace function ams_enqueue_upgrade(template text, version text, cohort jsonb default '{}'::jsonb,
                                               dry_run boolean default true, run_id uuid default null,
                                               halt_failure_rate real default null,
                                               halt_min_sample integer default null)
returns uuid language plpgsql as $$
declare
    run uuid;
begin
    if not exists (select 1 from agent_templates t where t.name = template and t.version = ams_enqueue_upgrade.version) then
        raise exception 'template %@% is not published', template, version using errcode = 'foreign_key_violation';
    end if;
    insert into upgrade_runs (id, template_name, to_version, dry_run, cohort, halt_failure_rate, halt_min_sample)
    values (coalesce(run_id, gen_random_uuid()), template, version, dry_run, coalesce(cohort, '{}'::jsonb),
            ams_enqueue_upgrade.halt_failure_rate, ams_enqueue_upgrade.halt_min_sample)
    on conflict (id) do nothing
    returning id into run;
    if run is null then
        return run_id;
    end if;
    perform fleet_ensure_queue('upgrade_jobs');
    perform pgmq.send('upgrade_jobs', jsonb_build_object('run_id', run));
    return run;
end $$;

-- The gateway streams agent-creation jobs too (POST /v1/agents).
alter table gateway_jobs drop constraint if exists gateway_jobs_kind_check;
alter table gateway_jobs add constraint gateway_jobs_kind_check check (kind in ('chat', 'embed', 'agents'));
