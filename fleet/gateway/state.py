"""What the routes share in one gateway process: settings, store, hubs, the SDK client."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fleet.gateway.auth import Authenticator
from fleet.gateway.hub import Hub
from fleet.gateway.limits import StreamCap
from fleet.gateway.metrics import gateway_metrics
from fleet.gateway.settings import GatewaySettings
from fleet.gateway.store import Store
from fleet.shared.client import FleetClient
from fleet.shared.config import Settings
from fleet.shared.frames import ended_frames


@dataclass
class Gateway:
    settings: Settings
    gw: GatewaySettings
    store: Store
    chat_hub: Hub
    embed_hub: Hub
    client: FleetClient
    auth: Authenticator
    agent_hub: Hub
    streams: StreamCap = field(init=False)
    ended_checks: EndedChecks = field(init=False)

    def __post_init__(self) -> None:
        self.streams = StreamCap(self.gw.max_streams_per_user)
        self.ended_checks = EndedChecks(min(max(self.gw.keepalive_s / 2, 0.05), 2.0))

    async def chat_ended(self, job_id: str, *, at_once: bool = False) -> list[dict] | None:
        """The stored answer's frames, or an `error` frame from the dead letters, once the job has ended
        (`at_once`: asked alone now, as a new stream does before it waits; else in the next batch)."""
        if at_once:
            return (await asyncio.to_thread(ended_frames, [job_id])).get(job_id)
        return await self.ended_checks.check(job_id)

    def hub(self, kind: str) -> Hub:
        return {"embed": self.embed_hub, "agents": self.agent_hub}.get(kind, self.chat_hub)


class EndedChecks:
    """Whether quiet chat streams' jobs ended unheard, asked for every stream that asks within `gather_s`
    in one pair of queries (fleet.shared.frames.ended_frames): a thousand quiet streams cost the database
    two queries per quiet spell, not two thousand. Streams answered together go quiet together, so after
    their first check they keep asking in the same batch."""

    def __init__(self, gather_s: float) -> None:
        self.gather_s = gather_s
        self._waiting: dict[str, list[asyncio.Future]] = {}
        self._task: asyncio.Task | None = None

    async def check(self, job_id: str) -> list[dict] | None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._answer_all(), name="gateway-ended-checks")
        return await future

    async def _answer_all(self) -> None:
        metrics = gateway_metrics()
        while self._waiting:
            await asyncio.sleep(self.gather_s)
            batch, self._waiting = self._waiting, {}
            metrics.ended_queries.inc()
            metrics.ended_checks.inc(sum(len(f) for f in batch.values()))
            try:
                ended = await asyncio.to_thread(ended_frames, list(batch))
            except Exception as e:  # noqa: BLE001  each stream that asked gets the error (and logs it as its own)
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(e)
                continue
            for job_id, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(ended.get(job_id))
