-- Provider health also learns from the jobs' own calls: a check is a probe's or a job's.
alter table provider_health_checks add column if not exists origin text not null default 'probe'
    check (origin in ('probe', 'job'));
