"""What the routes share in one gateway process: settings, store, hubs, the SDK client."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fleet.gateway.auth import Authenticator
from fleet.gateway.hub import Hub
from fleet.gateway.limits import StreamCap
from fleet.gateway.settings import GatewaySettings
from fleet.gateway.store import Store
from fleet.shared.client import FleetClient
from fleet.shared.config import Settings
from fleet.shared.frames import dead_frame, stored_answer


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

    def __post_init__(self) -> None:
        self.streams = StreamCap(self.gw.max_streams_per_user)

    async def chat_ended(self, job_id: str) -> list[dict] | None:
        """The stored answer's frames, or an `error` frame from the dead letters, once the job has ended."""
        return await asyncio.to_thread(lambda: stored_answer(job_id) or dead_frame(job_id))

    def hub(self, kind: str) -> Hub:
        return {"embed": self.embed_hub, "agents": self.agent_hub}.get(kind, self.chat_hub)
