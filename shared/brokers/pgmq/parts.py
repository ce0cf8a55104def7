"""What the pgmq broker's parts (the consumers, the notifier, the heartbeat, the bulk sender) need from the
broker that owns them: interfaces, so each part depends on these and not on PgmqBroker (which builds them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import psycopg

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from fleet.shared.brokers.pgmq.heartbeat import Heartbeat
    from fleet.shared.brokers.pgmq.notifier import Notifier
    from fleet.shared.brokers.pgmq.state import QueueState
    from fleet.shared.config import Settings


class Queues(Protocol):
    """The process's queues and their bookkeeping (the notifier and the heartbeat)."""

    dsn: str
    settings: Settings

    def state(self, queue_name: str) -> QueueState: ...

    def queue_states(self) -> list[tuple[str, QueueState]]: ...


class QueueCreator(Protocol):
    """Creating a queue once per process, on the broker's pool or a given connection (the bulk sender)."""

    @property
    def pool(self) -> ConnectionPool: ...

    def ensure_queue(self, queue_name: str, conn: psycopg.Connection | None = None) -> None: ...


class ConsumerHost(Queues, QueueCreator, Protocol):
    """What a consumer needs: its own connection, the process's notifier and heartbeat, and which actor a
    raw message of its queue is for."""

    def connect(self) -> psycopg.Connection: ...

    def notifier(self) -> Notifier | None: ...

    def heartbeat(self) -> Heartbeat: ...

    def actor_for_queue(self, queue_name: str, raw: Any) -> str: ...
