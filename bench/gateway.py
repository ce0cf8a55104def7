"""Gateway benchmarks, printed as `name: value` lines.

python -m bench.gateway latency --broker B   the gateway's added latency to the first delta: time
                                             to the first chat.delta over HTTP minus the same through
                                             the SDK's own frame listener, alternating, p50 and p99
python -m bench.gateway streams --broker B   1,000 concurrent SSE streams held idle on one gateway
                                             process (their jobs wait: no chat worker yet), then the
                                             workers start and every stream must end with chat.done
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx

TTFT_S = 0.2
STREAMS = 1000
IDLE_HOLD_S = 12.0


def fleet_env(broker: str, sim_url: str) -> dict:
    from fleet.ops.processes import worker_env

    return worker_env(["chat"], 0) | {
        "FLEET_BROKER": broker,
        "CHAT_API_BASE": f"{sim_url}/v1",
        "CHAT_KEEPALIVE_S": "5",
        "GATEWAY_KEEPALIVE_S": "5",
        "GATEWAY_DEV": "true",
        # one client address sends every request of the benchmark
        "GATEWAY_CHAT_RATE_LIMIT_PER_MIN": "0",
        "GATEWAY_EMBED_RATE_LIMIT_PER_MIN": "0",
    }


def start_workers(env: dict, threads: int = 8) -> subprocess.Popen:
    from fleet.ops.processes import worker_command

    return subprocess.Popen(
        worker_command(["chat"], 1, threads, 0),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[max(0, int(len(values) * q) - 1)]


def first_delta_via_gateway(http: httpx.Client, url: str, i: int) -> float:
    """One client for all requests, as a browser or an agent keeps one (a new httpx client costs ~70 ms)."""
    t = time.perf_counter()
    body = {"session_id": f"bench-{uuid.uuid4()}", "content": f"question {i}"}
    with http.stream("POST", f"{url}/v1/chat", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("event: chat.delta"):
                first = time.perf_counter() - t
            if line.startswith("event: chat.done"):
                return first
    raise SystemExit("gateway latency benchmark: a stream ended without chat.done")


def first_delta_via_sdk(client, i: int) -> float:
    t = time.perf_counter()
    stream = client.stream_chat(f"bench-{uuid.uuid4()}", f"question {i}", timeout_s=60)
    first = None
    for _ in stream:
        first = first or time.perf_counter() - t
    if stream.status != "complete" or first is None:
        raise SystemExit(f"gateway latency benchmark: a chat ended {stream.status}")
    return first


def latency(broker: str, samples: int = 60) -> None:
    from fleet.ops.processes import start_simulator, stop_process
    from fleet.shared.client import FleetClient
    from fleet.shared.config import Settings
    from tests.gateway_process import GatewayProcess

    via_gw, via_sdk = [], []
    with ExitStack() as stack:  # whatever fails to start, what did start is stopped
        sim, sim_url = start_simulator({"ttft_ms": TTFT_S * 1000, "answer_tokens": 3})
        stack.callback(stop_process, sim, 5)
        env = fleet_env(broker, sim_url)
        workers = start_workers(env)
        stack.callback(stop_process, workers)
        gateway = stack.enter_context(GatewayProcess(env, Path(tempfile.mkdtemp(prefix="bench-gw-"))))
        client = FleetClient(settings=Settings(FLEET_BROKER=broker))
        stack.callback(client.broker.close)
        http = stack.enter_context(httpx.Client())
        first_delta_via_sdk(client, -1), first_delta_via_gateway(http, gateway.url, -1)  # warm up
        for i in range(samples):
            via_sdk.append(first_delta_via_sdk(client, i) * 1000)
            via_gw.append(first_delta_via_gateway(http, gateway.url, i) * 1000)
            time.sleep(0.05)
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        print(f"gateway_{broker}_first_delta_{name}_ms: {percentile(via_gw, q):.1f}")
        print(f"gateway_{broker}_sdk_first_delta_{name}_ms: {percentile(via_sdk, q):.1f}")
        print(f"gateway_{broker}_added_latency_{name}_ms: {percentile(via_gw, q) - percentile(via_sdk, q):.1f}")


async def hold_stream(client: httpx.AsyncClient, url: str, opened: asyncio.Event, counts: dict) -> str:
    body = {"session_id": f"bench-{uuid.uuid4()}", "content": "an idle question"}
    async with client.stream("POST", f"{url}/v1/chat", json=body) as r:
        if r.status_code != 200:
            counts["refused"] += 1
            return f"status {r.status_code}"
        counts["open"] += 1
        if counts["open"] == counts["want"]:
            opened.set()
        async for line in r.aiter_lines():
            if line.startswith(":"):
                counts["keepalives"] += 1
            elif line.startswith("data: "):
                frame = json.loads(line[6:])
                if frame["type"] in ("chat.done", "error"):
                    return frame["type"]
    return "cut"


async def many_streams(url: str, env: dict, n: int) -> dict:
    from fleet.ops.processes import stop_process

    counts = {"open": 0, "refused": 0, "keepalives": 0, "want": n}
    opened = asyncio.Event()
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300, connect=60)) as client:
        t = time.perf_counter()
        tasks = []
        for _ in range(n):
            tasks.append(asyncio.create_task(hold_stream(client, url, opened, counts)))
            await asyncio.sleep(0.002)
        await asyncio.wait_for(opened.wait(), 120)
        open_s = time.perf_counter() - t
        await asyncio.sleep(IDLE_HOLD_S)
        idle_keepalives = counts["keepalives"]
        with httpx.Client() as c:
            open_reported = c.get(f"{url}/readyz").json()["open_streams"]
        t = time.perf_counter()
        workers = start_workers(env, threads=16)
        try:
            ends = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            stop_process(workers)
        return {
            "open_s": open_s,
            "drain_s": time.perf_counter() - t,
            "idle_keepalives": idle_keepalives,
            "open_reported": open_reported,
            "done": sum(e == "chat.done" for e in ends),
            "errors": [repr(e) if isinstance(e, BaseException) else e for e in ends if e != "chat.done"],
        }


def streams(broker: str, n: int = STREAMS) -> None:
    from fleet.ops.processes import start_simulator, stop_process
    from tests.gateway_process import GatewayProcess

    with ExitStack() as stack:
        sim, sim_url = start_simulator({"answer_tokens": 3})
        stack.callback(stop_process, sim, 5)
        env = fleet_env(broker, sim_url)
        gateway = stack.enter_context(GatewayProcess(env, Path(tempfile.mkdtemp(prefix="bench-gw-"))))
        got = asyncio.run(many_streams(gateway.url, env, n))
    if got["errors"]:
        raise SystemExit(f"gateway streams benchmark: {len(got['errors'])} stream(s) failed: {got['errors'][:5]}")
    print(f"gateway_{broker}_idle_streams: {got['done']}")
    print(f"gateway_{broker}_idle_streams_reported_open: {got['open_reported']}")
    print(f"gateway_{broker}_streams_open_s: {got['open_s']:.2f}")
    print(f"gateway_{broker}_idle_keepalives_per_stream: {got['idle_keepalives'] / n:.2f}")
    print(f"gateway_{broker}_streams_drain_s: {got['drain_s']:.2f}")


def main() -> None:
    from fleet.shared.logs import configure_logging

    configure_logging("WARNING")
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["latency", "streams"])
    p.add_argument("--broker", choices=["pgmq", "redis"], default="pgmq")
    p.add_argument("--streams", type=int, default=STREAMS)
    a = p.parse_args()
    os.environ["FLEET_BROKER"] = a.broker
    latency(a.broker) if a.what == "latency" else streams(a.broker, a.streams)


if __name__ == "__main__":
    main()
