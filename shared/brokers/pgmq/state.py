"""Per-queue bookkeeping shared by the consumers, the notifier and the heartbeat of one process."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class QueueState:
    wake: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    outstanding: set[int] = field(default_factory=set)  # read, not yet acked: the heartbeat keeps them invisible
    acks: list[int] = field(default_factory=list)
    nacks: list[int] = field(default_factory=list)
    durable: bool = False  # the pending acks include a failed attempt's: commit them synchronously
