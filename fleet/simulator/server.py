"""The simulator's server: all protocols on one loopback port, in a thread or as its own process."""

from __future__ import annotations

import argparse
import json
import threading
from http.server import ThreadingHTTPServer
from typing import cast

from fleet.simulator.chat import ChatRoutes
from fleet.simulator.embeddings import EmbeddingRoutes
from fleet.simulator.letta import LettaRoutes
from fleet.simulator.state import SimConfig, Simulator


def make_handler(sim: Simulator) -> type:
    return type("Handler", (LettaRoutes, ChatRoutes, EmbeddingRoutes), {"sim": sim})


class SimulatorServer:
    """Runs the simulator in a thread of this process (tests) or as `fleet simulator` (demo, bench)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: SimConfig | None = None) -> None:
        self.sim = Simulator(config)
        self.httpd = ThreadingHTTPServer((host, port), make_handler(self.sim))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = cast(tuple[str, int], self.httpd.server_address[:2])  # an AF_INET server
        return f"http://{host}:{port}"

    def start(self) -> SimulatorServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="simulator", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fleet simulator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--config", default="{}", help="JSON object of SimConfig settings")
    a = p.parse_args(argv)
    server = SimulatorServer(a.host, a.port, SimConfig(**json.loads(a.config)))
    print(f"simulator listening on {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0
