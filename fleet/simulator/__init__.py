"""The provider simulator: an OpenAI-compatible HTTP server on loopback with settable latency and faults.

The demo, the tests and the benchmarks talk to it over real HTTP, so the client code under test is
the production code. Faithful where clients depend on it: DeepInfra's 400 for a null
`encoding_format`, OpenAI's error body shape, `Retry-After` on 429, base64 embeddings on request.

Control endpoints (not part of any provider's API):
  POST /_sim/config   merge a JSON object into the settings (see SimConfig)
  POST /_sim/reset    clear the request log and the one-shot faults
  GET  /_sim/log      every request so far: path, time, status, inputs, options
"""

from fleet.simulator.server import SimulatorServer, main, make_handler
from fleet.simulator.state import SimConfig, Simulator

__all__ = ["SimConfig", "Simulator", "SimulatorServer", "main", "make_handler"]
