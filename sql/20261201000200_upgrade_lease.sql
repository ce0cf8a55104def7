-- A per-agent upgrade attempt is exclusive: the attempt that sets `status = 'running'` writes its own
-- lease id, its heartbeat renews heartbeat_at only while the lease is still its own, and it checks the
-- lease again right before its PATCH. A second copy of the job (a redelivery, or a requeue by
-- requeue_stale) cannot take the agent while the lease is live (heartbeat_at within UPGRADE_STALE_AFTER_S);
-- requeue_stale clears the lease of an attempt whose heartbeat went quiet.
alter table agent_upgrades add column if not exists lease uuid;
