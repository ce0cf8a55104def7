-- Agent management: immutable, SemVer-versioned agent templates (Letta Agent Files), user profiles,
-- and the records of cohort upgrade runs.

-- SemVer 2.0 precedence in SQL (the same rules as shared/semver.py): -1, 0 or 1.
create or replace function fleet_semver_parse(v text, out major numeric, out minor numeric, out patch numeric,
                                              out pre text[])
language plpgsql immutable as $$
declare
    m text[];
begin
    m := regexp_match(v, '^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)'
                         '(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$');
    if m is null then
        raise exception '% is not a SemVer 2.0 version (MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD])', v
            using errcode = 'invalid_parameter_value';
    end if;
    major := m[1]; minor := m[2]; patch := m[3];
    pre := case when m[4] is null then null else string_to_array(m[4], '.') end;
end $$;

create or replace function fleet_semver_cmp(a text, b text) returns integer language plpgsql immutable as $$
declare
    x record;
    y record;
    pa text;
    pb text;
begin
    select * into x from fleet_semver_parse(a);
    select * into y from fleet_semver_parse(b);
    if (x.major, x.minor, x.patch) <> (y.major, y.minor, y.patch) then
        return case when (x.major, x.minor, x.patch) < (y.major, y.minor, y.patch) then -1 else 1 end;
    end if;
    if x.pre is null and y.pre is null then return 0; end if;
    if x.pre is null then return 1; end if;   -- a release follows its pre-releases
    if y.pre is null then return -1; end if;
    for i in 1 .. greatest(cardinality(x.pre), cardinality(y.pre)) loop
        if i > cardinality(x.pre) then return -1; end if;
        if i > cardinality(y.pre) then return 1; end if;
        pa := x.pre[i];
        pb := y.pre[i];
        continue when pa = pb;
        if pa ~ '^[0-9]+$' and pb ~ '^[0-9]+$' then
            return case when pa::numeric < pb::numeric then -1 else 1 end;
        end if;
        if pa ~ '^[0-9]+$' then return -1; end if;  -- numeric identifiers sort first
        if pb ~ '^[0-9]+$' then return 1; end if;
        return case when pa < pb collate "C" then -1 else 1 end;
    end loop;
    return 0;
end $$;

create table if not exists agent_templates (
    name          text not null check (name ~ '^[a-z0-9][a-z0-9_.-]{0,99}$'),
    version       text not null,
    content       jsonb not null,
    sha256        text not null,
    published_at  timestamptz not null default now(),
    primary key (name, version)
);

create or replace function fleet_agent_templates_immutable() returns trigger language plpgsql as $$
begin
    raise exception 'agent template %@% is immutable: publish a new version instead of changing or deleting it',
        old.name, old.version using errcode = 'insufficient_privilege';
end $$;
drop trigger if exists agent_templates_immutable on agent_templates;
create trigger agent_templates_immutable before update or delete on agent_templates
    for each row execute function fleet_agent_templates_immutable();

-- A new version must be greater than every published version of that name, under SemVer precedence.
create or replace function fleet_agent_templates_monotonic() returns trigger language plpgsql as $$
declare
    highest text;
    v text;
begin
    perform pg_advisory_xact_lock(hashtext('agent_templates:' || new.name));  -- one publisher per name at a time
    perform fleet_semver_parse(new.version);
    for v in select version from agent_templates where name = new.name loop
        if highest is null or fleet_semver_cmp(v, highest) > 0 then
            highest := v;
        end if;
    end loop;
    if highest is not null and fleet_semver_cmp(new.version, highest) <= 0 then
        raise exception 'version % of template % must be greater than the highest published version, %',
            new.version, new.name, highest using errcode = 'check_violation';
    end if;
    new.sha256 := encode(sha256(convert_to(new.content::text, 'UTF8')), 'hex');
    return new;
end $$;
drop trigger if exists agent_templates_monotonic on agent_templates;
create trigger agent_templates_monotonic before insert on agent_templates
    for each row execute function fleet_agent_templates_monotonic();

create table if not exists user_profiles (
    user_id           uuid primary key,
    letta_agent_id    text unique,
    template_name     text,
    template_version  text,
    updated_at        timestamptz not null default now()
);
create index if not exists user_profiles_template_idx on user_profiles (template_name, template_version);

create table if not exists upgrade_runs (
    id             uuid primary key default gen_random_uuid(),
    template_name  text not null,
    to_version     text not null,
    dry_run        boolean not null default true,
    cohort         jsonb not null default '{}'::jsonb,
    status         text not null default 'pending'
                   check (status in ('pending', 'running', 'completed', 'halted')),
    counts         jsonb not null default '{}'::jsonb,
    created_at     timestamptz not null default now(),
    finished_at    timestamptz,
    foreign key (template_name, to_version) references agent_templates (name, version)
);

create table if not exists agent_upgrades (
    run_id        uuid not null references upgrade_runs (id),
    agent_id      text not null,
    user_id       uuid,
    from_version  text,
    to_version    text not null,
    dry_run       boolean not null,
    status        text not null default 'pending'
                  check (status in ('pending', 'running', 'succeeded', 'failed', 'skipped', 'cancelled')),
    diff          jsonb,
    error         text,
    attempts      integer not null default 0,
    heartbeat_at  timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    primary key (run_id, agent_id)
);
create index if not exists agent_upgrades_status_idx on agent_upgrades (run_id, status);
create index if not exists agent_upgrades_heartbeat_idx on agent_upgrades (heartbeat_at) where status = 'running';

-- Creates an upgrade run and enqueues its fan-out on pgmq (for SQL and pg_cron producers).
create or replace function ams_enqueue_upgrade(template text, version text, cohort jsonb default '{}'::jsonb,
                                               dry_run boolean default true)
returns uuid language plpgsql as $$
declare
    run uuid;
begin
    if not exists (select 1 from agent_templates t where t.name = template and t.version = ams_enqueue_upgrade.version) then
        raise exception 'template %@% is not published', template, version using errcode = 'foreign_key_violation';
    end if;
    insert into upgrade_runs (template_name, to_version, dry_run, cohort)
    values (template, version, dry_run, coalesce(cohort, '{}'::jsonb)) returning id into run;
    perform fleet_ensure_queue('upgrade_jobs');
    perform pgmq.send('upgrade_jobs', jsonb_build_object('run_id', run));
    return run;
end $$;

alter table agent_templates enable row level security;
alter table user_profiles enable row level security;
alter table upgrade_runs enable row level security;
alter table agent_upgrades enable row level security;
revoke all on agent_templates, user_profiles, upgrade_runs, agent_upgrades from anon, authenticated;
grant select, insert on agent_templates to fleet_worker;
grant select, insert, update, delete on user_profiles, upgrade_runs, agent_upgrades to fleet_worker;
