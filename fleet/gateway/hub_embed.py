"""Embed jobs' progress for streams: one task polls bus_events for every followed embed job.

Frames: `ready` (the job started), `embed.status` per batch, then `embed.done` once the job has
succeeded, or `error` if it went to the dead letters. Each gets a seq in bus_events order, so the
frames can be rebuilt exactly from the table for a client that resumes, on any gateway process.
"""

from __future__ import annotations

import asyncio

import psycopg
import structlog

from fleet.gateway.hub import Hub
from fleet.gateway.store import Store

log = structlog.get_logger(__name__)

POLL_S = 0.2


class EmbedHub(Hub):
    kind = "embed"
    finals = ("embed.done", "error")

    def __init__(self, store: Store, keep_frames_s: float, idle_drop_s: float) -> None:
        super().__init__(keep_frames_s, idle_drop_s)
        self.store = store
        self.seen: dict[str, set[int]] = {}  # job id -> bus_events ids already turned into frames
        self.done_payload: dict[str, dict] = {}
        self.seqs: dict[str, int] = {}

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="hub-embed-poll"))
        await super().start()

    async def _watch(self, job_id: str) -> None:
        self.seen[job_id], self.seqs[job_id] = set(), 0

    async def _unwatch(self, job_id: str) -> None:
        for table in (self.seen, self.seqs, self.done_payload):
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
                log.warning("gateway.embed_poll_failed", error=str(e))
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
        if kind == "job.started" and self.seqs[job_id] == 0:
            return {"type": "ready", "attempt": payload.get("attempt")}
        if kind == "embed.status":
            return {"type": "embed.status"} | payload
        if kind == "embed.done":
            self.done_payload[job_id] = payload  # sent once the job has succeeded
            return None
        if kind == "job.succeeded":
            return {"type": "embed.done"} | self.done_payload.get(job_id, {})
        if kind == "job.dead":
            return {"type": "error", "error_class": payload.get("error_class"), "message": payload.get("reason"),
                    "status": "error"} | ({"done": self.done_payload[job_id]} if job_id in self.done_payload else {})
        return None
