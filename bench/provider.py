"""The provider's own rate, measured directly: the same simulator, the same client concurrency as the
fleet's workers, no fleet in between. The end-to-end figures are compared with this, not with a rate
computed from the simulator's settings."""

from __future__ import annotations

import threading
import time

import httpx


def direct_rate(url: str, bodies: list[dict], threads: int, *, units_per_request: int) -> float:
    """Units (documents, chats) per second when `threads` clients POST `bodies` to `url` as fast as the
    provider answers; a streamed answer is read to its end."""
    pending = list(bodies)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with httpx.Client(timeout=120) as http:
                while True:
                    with lock:
                        if not pending:
                            return
                        body = pending.pop()
                    with http.stream("POST", url, json=body) as answer:
                        answer.raise_for_status()
                        for _ in answer.iter_bytes():
                            pass
        except BaseException as e:  # reported by the caller's thread
            errors.append(e)

    pool = [threading.Thread(target=client) for _ in range(threads)]
    t = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - t
    if errors:
        raise errors[0]
    return len(bodies) * units_per_request / elapsed
