"""Streams of jobs whose progress is their bus_events (embed jobs, agent creation): one task per hub
polls bus_events for every followed job and turns each event into a frame by the hub's rules.

Each frame gets a seq in bus_events order, so the frames can be rebuilt exactly from the table for a
client that resumes, on any gateway process.

- Embed: `ready` (the job started), `embed.status` per batch, then `embed.done` once the job has
  succeeded, or `error` if it went to the dead letters.
- Agent creation: `ready`, `agent.status` while it waits for another creator of the same user's agent
  or is retried, then `agent.done` with the agent id (created now or found), or `error`.
"""

from __future__ import annotations

import asyncio

import psycopg
import structlog

from fleet.gateway.hub import Hub
from fleet.gateway.store import Store

log = structlog.get_logger(__name__)

POLL_S = 0.2


class EventsHub(Hub):
    def __init__(self, store: Store, keep_frames_s: float, idle_drop_s: float) -> None:
        super().__init__(keep_frames_s, idle_drop_s)
        self.store = store
        self.seen: dict[str, set[int]] = {}  # job id -> bus_events ids already turned into frames
        self.result: dict[str, dict] = {}  # job id -> the family's result event, sent once the job has succeeded
        self.seqs: dict[str, int] = {}

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._poll_loop(), name=f"hub-{self.kind}-poll"))
        await super().start()

    async def _watch(self, job_id: str) -> None:
        self.seen[job_id], self.seqs[job_id] = set(), 0

    async def _unwatch(self, job_id: str) -> None:
        for table in (self.seen, self.seqs, self.result):
            table.pop(job_id, None)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            active = [j for j, f in self.feeds.items() if f.ended_at is None and j in self.seen]
            if not active:
                continue
            try:
                rows = await self.store.events(job_ids=active, limit=100_000)
            except psycopg.Error as e:
                log.warning("gateway.events_poll_failed", hub=self.kind, error=str(e))
                continue
            for row in rows:
                if row["id"] not in self.seen.get(row["job_id"], {row["id"]}):
                    self.seen[row["job_id"]].add(row["id"])
                    self._on_event(row["job_id"], row["type"], row["payload"] or {})

    def _on_event(self, job_id: str, kind: str, payload: dict) -> None:
        frame = self._frame(job_id, kind, payload)
        if frame is not None:
            self.seqs[job_id] += 1
            self.deliver(job_id, {"seq": self.seqs[job_id], "type": frame.pop("type"), "job_id": job_id} | frame)

    def _frame(self, job_id: str, kind: str, payload: dict) -> dict | None:
        """The frames every such job has: `ready` on its first start, `error` when it is dead."""
        if kind == "job.started" and self.seqs[job_id] == 0:
            return {"type": "ready", "attempt": payload.get("attempt")}
        if kind == "job.dead":
            return {
                "type": "error",
                "error_class": payload.get("error_class"),
                "message": payload.get("reason"),
                "status": "error",
            } | ({"done": self.result[job_id]} if job_id in self.result else {})
        return None


class EmbedHub(EventsHub):
    kind = "embed"
    finals = ("embed.done", "error")

    def _frame(self, job_id: str, kind: str, payload: dict) -> dict | None:
        if kind == "embed.status":
            return {"type": "embed.status"} | payload
        if kind == "embed.done":
            self.result[job_id] = payload
            return None
        if kind == "job.succeeded":
            return {"type": "embed.done"} | self.result.get(job_id, {})
        return super()._frame(job_id, kind, payload)


class AgentHub(EventsHub):
    kind = "agents"
    finals = ("agent.done", "error")

    def _frame(self, job_id: str, kind: str, payload: dict) -> dict | None:
        if kind in ("agent.created", "agent.exists"):
            self.result[job_id] = {
                "agent_id": payload.get("agent_id"),
                "template": payload.get("template"),
                "created": kind == "agent.created",
            }
            return None
        if kind == "job.succeeded":
            return {"type": "agent.done"} | self.result.get(job_id, {})
        if kind in ("job.deferred", "job.retrying"):
            return {
                "type": "agent.status",
                "state": kind.removeprefix("job."),
                "error": payload.get("error"),
                "delay_ms": payload.get("delay_ms"),
            }
        return super()._frame(job_id, kind, payload)
