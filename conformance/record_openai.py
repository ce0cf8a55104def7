"""Re-record the real OpenAI-compatible servers' answers the simulator is built from (tests/fixtures/openai/).

    bash conformance/install.sh && .venv/bin/python -m conformance.record_openai

starts llama-cpp-python's server and infinity from the conformance cache (or uses CHAT_API_BASE /
EMBEDDING_API_BASE), asks each what the fleet depends on, and writes one JSON file per answer. Long
echoes (infinity repeats the refused input in its 422) and vectors are shortened; nothing else is changed.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import httpx

from .conftest import CACHE
from .openai_servers import Server, given, start_infinity, start_llama

# A broken stream leaves its connection unusable: every request on a connection of its own.
FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "openai"


def shorten(value, key: str | None = None, keep: int = 40):
    """Echoed inputs and vectors cut to `keep` characters or items, marked with their real length."""
    if isinstance(value, str) and key == "input" and len(value) > keep:
        return f"{value[:keep]}...<{len(value)} characters>"
    if isinstance(value, list):
        items = [shorten(v, key) for v in value[:keep]]
        return items + ([f"...<{len(value)} items>"] if len(value) > keep else [])
    if isinstance(value, dict):
        return {k: shorten(v, k) for k, v in value.items()}
    return value


def answer(response: httpx.Response) -> dict:
    try:
        body = shorten(response.json())
    except ValueError:
        body = response.text
    return {"status": response.status_code, "content_type": response.headers.get("content-type"), "body": body}


def sse(response: httpx.Response) -> dict:
    """A stream as the lines of its `data:` events, and how it ended."""
    lines, ending = [], "closed"
    try:
        for line in response.iter_lines():
            if line.startswith("data:"):
                lines.append(line[5:].strip())
    except httpx.HTTPError as e:
        ending = f"{type(e).__name__}: {e}"
    return {
        "status": response.status_code,
        "content_type": response.headers.get("content-type"),
        "data": [json.loads(d) if d.startswith("{") else d for d in lines],
        "ending": ending,
    }


def record_chat(server: Server) -> dict[str, dict]:
    root = server.base.removesuffix("/v1")
    hello = [{"role": "user", "content": "hello there"}]
    out = {}
    with httpx.Client(timeout=120, limits=FRESH_CONNECTIONS) as c:
        out["models"] = answer(c.get(f"{server.base}/models"))
        out["props"] = answer(c.get(f"{root}/props"))  # llama.cpp's own server says its window there
        with c.stream(
            "POST",
            f"{server.base}/chat/completions",
            json={
                "model": server.model,
                "messages": hello,
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 8,
            },
        ) as r:
            out["stream"] = sse(r)
        out["completion"] = answer(
            c.post(f"{server.base}/chat/completions", json={"model": server.model, "messages": hello, "max_tokens": 8})
        )
        three = hello + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello there"}]
        out["completion_three_messages"] = answer(
            c.post(f"{server.base}/chat/completions", json={"model": server.model, "messages": three, "max_tokens": 1})
        )
        out["tokenize_count"] = answer(c.post(f"{root}/extras/tokenize/count", json={"input": "hello there"}))
        big = [{"role": "user", "content": "word " * 2100}]
        with c.stream(
            "POST", f"{server.base}/chat/completions", json={"model": server.model, "messages": big, "stream": True}
        ) as r:
            out["stream_over_context"] = sse(r)
        out["completion_over_context"] = answer(
            c.post(f"{server.base}/chat/completions", json={"model": server.model, "messages": big})
        )
    out["stream_interrupted"] = interrupted(server)
    return out


def interrupted(server: Server) -> dict:
    """A long stream, and meanwhile another request: what the first one receives."""
    result: dict = {}

    def first():
        with httpx.stream(
            "POST",
            f"{server.base}/chat/completions",
            timeout=120,
            json={
                "model": server.model,
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "stream": True,
                "max_tokens": 300,
            },
        ) as r:
            result.update(sse(r))

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(3)
    httpx.post(
        f"{server.base}/chat/completions",
        timeout=120,
        json={"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    thread.join(120)
    return result


def record_embeddings(server: Server) -> dict[str, dict]:
    out = {}
    url = f"{server.base}/embeddings"
    with httpx.Client(timeout=120, limits=FRESH_CONNECTIONS) as c:
        out["models"] = answer(c.get(f"{server.base}/models"))
        out["embeddings"] = answer(
            c.post(url, json={"model": server.model, "input": ["hello world", "second"], "encoding_format": "float"})
        )
        out["input_too_long"] = answer(c.post(url, json={"model": server.model, "input": ["ok", "x" * 122_881]}))
        out["batch_too_large"] = answer(c.post(url, json={"model": server.model, "input": ["a"] * 2049}))
        out["encoding_format_null"] = answer(
            c.post(url, json={"model": server.model, "input": ["a"], "encoding_format": None})
        )
        out["truncation"] = truncation(c, url, server.model)
    return out


def truncation(c: httpx.Client, url: str, model: str) -> dict:
    """From how many bytes on two texts differing only at their end embed identically."""
    sentence = "The fleet embeds documents into pgvector through an OpenAI compatible provider. "
    for n in range(1, 40):
        text = sentence * n
        a, b = (
            c.post(url, json={"model": model, "input": [text + end]}).json()["data"][0]["embedding"]
            for end in (" alpha", " omega zebra")
        )
        if a == b:
            return {"sentence": sentence, "identical_from_repeats": n, "identical_from_bytes": len(text.encode())}
    return {"sentence": sentence, "identical_from_repeats": None}


def write(kind: str, answers: dict[str, dict]) -> None:
    folder = FIXTURES / kind
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in answers.items():
        (folder / f"{name}.json").write_text(json.dumps(value, indent=1) + "\n")
        print(f"recorded {kind}/{name}.json")


def main() -> None:
    logs = Path(tempfile.mkdtemp(prefix="record-openai-"))
    chat = given("CHAT_API_BASE", "CHAT_MODEL_DEFAULT", "smollm2") or start_llama(CACHE, logs)
    embeddings = given("EMBEDDING_API_BASE", "EMBEDDING_MODEL_DEFAULT", "sentence-transformers/all-MiniLM-L6-v2")
    try:
        write("llama-cpp", record_chat(chat))
        embeddings = embeddings or start_infinity(CACHE, logs)
        write("infinity", record_embeddings(embeddings))
    finally:
        chat.stop()
        if embeddings is not None:
            embeddings.stop()


if __name__ == "__main__":
    main()
