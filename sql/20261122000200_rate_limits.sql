-- Shared state for dramatiq's rate limiters when Postgres is the only dependency
-- (shared/ratelimit.py implements dramatiq's RateLimiterBackend on it). Unlogged: counters are
-- disposable, and a crash that empties them only lets one window's worth through early.
create unlogged table if not exists rate_limit_counters (
    key         text primary key,
    value       bigint not null,
    expires_at  timestamptz not null
);
alter table rate_limit_counters enable row level security;
revoke all on rate_limit_counters from anon, authenticated;
grant select, insert, update, delete on rate_limit_counters to fleet_worker;
