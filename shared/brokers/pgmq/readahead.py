"""How many messages a consumer may hold: its prefetch, or more while its jobs finish fast.

With dramatiq's prefetch (2 x the worker threads), a worker of short jobs finishes the whole batch it
holds before its consumer thread, which waits for the GIL among busy worker threads, gets to ask for the
next one: every worker thread then idles for a round trip per batch. So a consumer may hold as many
messages as it settled (acked or rejected) in its last window of at least WINDOW_S, up to MAX_FACTOR x its
prefetch: what its worker finishes in about WINDOW_S, so no message read ahead waits much longer than that.

Jobs that take WINDOW_S or longer never raise the limit: each worker thread settles at most one of them
in a window, and the prefetch is already twice the threads. Long jobs are not hoarded by one worker
while another idles.
"""

from __future__ import annotations

WINDOW_S = 0.05
MAX_FACTOR = 8


class ReadAhead:
    def __init__(self, prefetch: int) -> None:
        self.prefetch = max(1, prefetch)
        self.limit = self.prefetch
        self._settled = 0
        self._since: float | None = None

    def settled(self, count: int, now: float) -> None:
        """`count` jobs were settled since the last call (the acks and rejects of one round trip)."""
        if self._since is None:
            self._since = now
            return
        self._settled += count
        elapsed = now - self._since
        if elapsed >= WINDOW_S:
            in_window = int(self._settled * WINDOW_S / elapsed)
            self.limit = max(self.prefetch, min(self.prefetch * MAX_FACTOR, in_window))
            self._settled, self._since = 0, now
