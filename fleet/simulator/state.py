"""The simulator's state: its settings, its request log, its faults and the Letta subset's agents."""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass, field


@dataclass
class SimConfig:
    embedding_dim: int = 1024
    latency_ms: float = 0.0  # per request
    latency_per_input_ms: float = 0.0  # per embedding input
    error_rate_5xx: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    timeout_rate: float = 0.0
    timeout_s: float = 30.0  # how long a "timed out" request hangs before answering 504
    malformed_rate: float = 0.0
    max_inputs: int | None = None  # more inputs in one request: 413, as providers do for oversized batches
    api_key: str | None = None  # when set, any other bearer token gets 401
    fail_next: list = field(default_factory=list)  # one-shot faults for the next requests: 429, 500, "cut", "malformed"
    seed: int = 0
    # chat
    ttft_ms: float = 0.0  # time to first token
    tokens_per_s: float = 0.0  # 0: as fast as possible
    answer_tokens: int = 12  # when the request sets no max_tokens
    cut_after_tokens: int = 3  # a "cut" stream stops after this many content chunks
    stream_cut_rate: float = 0.0
    malformed_chunk_rate: float = 0.0
    # What differs between real servers (tests/fixtures/openai/ holds their recorded answers):
    send_usage: bool = True  # False: the usage chunk never comes, whatever stream_options says (llama.cpp)
    tokenizer: bool = False  # POST /extras/tokenize/count, as llama.cpp's Python server has
    context_window: int | None = None  # a longer prompt: 200 and a stream with no token nor finish_reason
    # (streamed), 400 naming the window (not streamed), as llama-cpp-python answers
    report_window: str | None = None  # where the window is reported: "vllm" (max_model_len in /v1/models),
    # "openrouter" (context_length there), "llama.cpp" (/props); None: nowhere, as llama-cpp-python
    models: list = field(default_factory=list)  # the ids GET /v1/models lists
    # The chat template's tokens in the usage, per message and once (the reply's opening, and a system prompt
    # the template adds by itself). SmolLM2's ChatML on llama-cpp-python has 5 and 25 ("hello there" counts 32).
    template_tokens_per_message: int = 4
    template_tokens: int = 3
    interrupt_streams: bool = False  # a new request ends a running stream with [DONE], no finish_reason
    # embeddings
    error_style: str = "openai"  # "infinity": 422 with a pydantic `detail` list for oversized inputs/batches
    max_input_chars: int | None = None  # a longer input is refused (infinity: 122,880 characters)
    max_input_tokens: int | None = None  # what the model reads: the rest of a longer input is cut silently
    # letta
    alter_block_on_patch: bool = False  # a misbehaving server that rewrites memory during an upgrade
    letta_latency_ms: float = 0.0


class Simulator:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.random = random.Random(self.config.seed)
        self.agents: dict[str, dict] = {}  # the Letta subset's state, in memory
        self.patches: dict[str, int] = {}  # PATCH count per agent (one per agent per upgrade run)
        self.letta_tools: dict[str, dict] | None = None  # the Letta subset's tools by name, once first asked
        self.chat_requests = 0  # requests that take the model (llama.cpp serves one at a time)

    # -- faults ------------------------------------------------------------
    def next_fault(self) -> int | str | None:
        with self.lock:
            c = self.config
            if c.fail_next:
                return c.fail_next.pop(0)
            roll = self.random.random()
        for rate, fault in (
            (c.error_rate_5xx, 500),
            (c.rate_429, 429),
            (c.timeout_rate, "timeout"),
            (c.malformed_rate, "malformed"),
        ):
            if roll < rate:
                return fault
            roll -= rate
        return None

    def record(self, entry: dict) -> None:
        with self.lock:
            self.log.append(entry)

    # -- embeddings --------------------------------------------------------
    def _bytes(self, model: str, text: str) -> bytes:
        return hashlib.shake_256(f"{model}\x00{text}".encode()).digest(self.config.embedding_dim)

    def vector(self, model: str, text: str) -> list[float]:
        """Deterministic: the same model and text give the same vector (SHAKE-256 of both, each
        component one of 256 values in (-1, 1), exact in float32). Not normalised: cosine needs no norm."""
        return [_COMPONENTS[b] for b in self._bytes(model, text)]

    def vector_json(self, model: str, text: str) -> str:
        """The same vector as JSON text, built from a table (json.dumps of 1,024 floats costs 0.6 ms)."""
        return "[" + ",".join(_COMPONENT_TEXT[b] for b in self._bytes(model, text)) + "]"


_COMPONENTS = [(2 * b - 255) / 256 for b in range(256)]
_COMPONENT_TEXT = [repr(c) for c in _COMPONENTS]
