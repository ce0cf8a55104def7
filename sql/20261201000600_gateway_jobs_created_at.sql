-- housekeeping deletes the gateway's job owner rows by age (GATEWAY_JOBS_RETENTION_DAYS): rows are written in
-- time order and never updated, so a BRIN index on created_at finds the old ones without a full scan.
create index if not exists gateway_jobs_created_at_idx on gateway_jobs using brin (created_at);
