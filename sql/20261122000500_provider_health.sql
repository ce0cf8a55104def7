-- Provider health: the current state per provider and model, and every probe (pruned by the job).

create table if not exists provider_health (
    provider              text not null,
    model                 text not null default '',
    kind                  text not null check (kind in ('chat', 'embedding', 'letta')),
    status                text not null check (status in ('healthy', 'degraded', 'down')),
    latency_ms            double precision,
    consecutive_failures  integer not null default 0,
    last_error_class      text,
    last_error            text,
    last_success_at       timestamptz,
    checked_at            timestamptz not null default now(),
    primary key (provider, model)
);

create table if not exists provider_health_checks (
    id           bigserial primary key,
    provider     text not null,
    model        text not null default '',
    kind         text not null,
    status       text not null,
    ok           boolean not null,
    latency_ms   double precision,
    error_class  text,
    error        text,
    checked_at   timestamptz not null default now()
);
create index if not exists provider_health_checks_checked_at_idx on provider_health_checks (checked_at);

alter table provider_health enable row level security;
alter table provider_health_checks enable row level security;
revoke all on provider_health, provider_health_checks from anon, authenticated;
grant select, insert, update, delete on provider_health, provider_health_checks to fleet_worker;
grant usage, select on sequence provider_health_checks_id_seq to fleet_worker;
