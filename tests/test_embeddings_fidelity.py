"""The simulator against the real servers' recorded answers (tests/fixtures/openai/, re-recorded with
`python -m conformance.record_openai`): same statuses, same body shapes, same way of ending a stream.
When the two disagree, the recording is right."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from .embedding_support import API_KEY

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "openai"
pytestmark = pytest.mark.usefixtures("fresh_sim")


def recorded(kind: str, name: str) -> dict:
    return json.loads((FIXTURES / kind / f"{name}.json").read_text())


def shape(value):
    """Keys and types, recursively: what a client can depend on (not the values)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def post(sim, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{sim.url}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


def stream_data(sim, body: dict) -> list:
    with httpx.stream(
        "POST", f"{sim.url}/v1/chat/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as r:
        return [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]


def configure(sim, **settings) -> None:
    httpx.post(f"{sim.url}/_sim/config", json=settings)


# -- infinity ------------------------------------------------------------------------------------------------
INFINITY = {"error_style": "infinity", "max_inputs": 2048, "max_input_chars": 122_880}


def test_an_oversized_input_is_refused_as_infinity_does(sim):
    configure(sim, **INFINITY)
    real = recorded("infinity", "input_too_long")
    ours = post(sim, "/v1/embeddings", {"model": "m", "input": ["ok", "x" * 122_881]})
    assert ours.status_code == real["status"] == 422
    assert [(d["type"], d["loc"], d["msg"]) for d in ours.json()["detail"]] == [
        (d["type"], d["loc"], d["msg"]) for d in real["body"]["detail"]
    ]


def test_an_oversized_batch_is_refused_as_infinity_does(sim):
    configure(sim, **INFINITY)
    real = recorded("infinity", "batch_too_large")
    ours = post(sim, "/v1/embeddings", {"model": "m", "input": ["a"] * 2049})
    assert ours.status_code == real["status"] == 422
    assert [(d["type"], d["loc"], d["msg"], d.get("ctx")) for d in ours.json()["detail"]] == [
        (d["type"], d["loc"], d["msg"], d.get("ctx")) for d in real["body"]["detail"]
    ]


def test_a_null_encoding_format_is_refused_as_infinity_does(sim):
    configure(sim, **INFINITY)
    real = recorded("infinity", "encoding_format_null")
    ours = post(sim, "/v1/embeddings", {"model": "m", "input": ["a"], "encoding_format": None})
    assert ours.status_code == real["status"] == 422
    assert (
        shape(ours.json()) == shape(real["body"])
        and ours.json()["detail"][0]["msg"] == real["body"]["detail"][0]["msg"]
    )


def test_embeddings_and_usage_have_infinitys_shape(sim):
    configure(sim, **INFINITY, embedding_dim=384)
    real = recorded("infinity", "embeddings")["body"]
    ours = post(
        sim, "/v1/embeddings", {"model": "m", "input": ["hello world", "second"], "encoding_format": "float"}
    ).json()
    assert shape(ours["data"]) == shape(real["data"]) and len(ours["data"][0]["embedding"]) == 384
    assert ours["usage"] == real["usage"]  # infinity counts characters: 11 + 6


def test_a_long_input_is_cut_silently_as_the_model_reads_no_more(sim):
    real = recorded("infinity", "truncation")
    assert real["identical_from_repeats"] is not None  # the real server cut it
    configure(sim, max_input_tokens=10)
    a, b = (
        post(sim, "/v1/embeddings", {"model": "m", "input": ["w " * 10 + end]}).json()["data"][0]["embedding"]
        for end in ("alpha", "omega zebra")
    )
    assert a == b


# -- llama.cpp (llama-cpp-python's server) ---------------------------------------------------------------------
LLAMA = {
    "send_usage": False,
    "tokenizer": True,
    "context_window": 2048,
    "interrupt_streams": True,
    "template_tokens_per_message": 5,  # SmolLM2's ChatML, with the system prompt it adds by itself
    "template_tokens": 25,
}
HELLO = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


def test_a_stream_has_llama_cpps_chunks_and_no_usage_chunk(sim):
    configure(sim, **LLAMA)
    real = recorded("llama-cpp", "stream")["data"]
    ours = stream_data(sim, HELLO | {"stream": True, "stream_options": {"include_usage": True}})
    assert ours[-1] == real[-1] == "[DONE]"
    ours = [json.loads(d) for d in ours[:-1]]
    assert [shape(c) for c in ours[:2]] == [shape(c) for c in real[:2]]  # the role chunk, then content
    assert ours[-1]["choices"][0]["finish_reason"] == real[-2]["choices"][0]["finish_reason"] == "length"
    assert not any("usage" in c for c in real[:-1]) and not any("usage" in c for c in ours)


def test_a_prompt_over_the_context_window_gets_200_and_an_empty_stream(sim):
    configure(sim, **LLAMA)
    real = recorded("llama-cpp", "stream_over_context")
    body = {"model": "m", "messages": [{"role": "user", "content": "word " * 2100}], "stream": True}
    assert real["status"] == 200 and real["data"] == []
    with httpx.stream(
        "POST", f"{sim.url}/v1/chat/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as r:
        assert r.status_code == 200 and list(r.iter_lines()) == []


def test_a_request_during_a_stream_ends_it_with_done_and_no_finish_reason(sim):
    real = recorded("llama-cpp", "stream_interrupted")["data"]
    assert real[-1] == "[DONE]" and all(c["choices"][0]["finish_reason"] is None for c in real[:-1])
    configure(sim, **LLAMA, tokens_per_s=50, answer_tokens=40)
    import threading

    result: list = []
    first = threading.Thread(target=lambda: result.extend(stream_data(sim, HELLO | {"stream": True, "max_tokens": 40})))
    first.start()
    while not any(r["path"] == "/v1/chat/completions" for r in httpx.get(f"{sim.url}/_sim/log").json()):
        pass
    post(sim, "/extras/tokenize/count", {"input": "hi"})  # any request that takes the model
    first.join(30)
    assert result[-1] == "[DONE]" and 1 < len(result) < 41
    assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in result[:-1])


def test_the_tokenizer_and_the_usage_count_as_llama_cpp_does(sim):
    configure(sim, **LLAMA)
    real = recorded("llama-cpp", "tokenize_count")
    assert shape(post(sim, "/extras/tokenize/count", {"input": "hello there"}).json()) == shape(real["body"])
    completion = recorded("llama-cpp", "completion")["body"]
    ours = post(sim, "/v1/chat/completions", HELLO).json()
    assert set(ours["usage"]) == set(completion["usage"])
    # the template's tokens are counted in the usage, not only the text's: as many as the server counts
    assert completion["usage"]["prompt_tokens"] > real["body"]["count"]
    assert ours["usage"]["prompt_tokens"] == completion["usage"]["prompt_tokens"] == 32


def digits_out(text: str) -> str:
    return re.sub(r"\d+", "N", text)


def test_a_prompt_over_the_context_window_not_streamed_gets_a_400_naming_the_window(sim):
    configure(sim, **LLAMA)
    real = recorded("llama-cpp", "completion_over_context")
    body = {"model": "m", "messages": [{"role": "user", "content": "word " * 2100}]}
    ours = post(sim, "/v1/chat/completions", body)
    assert ours.status_code == real["status"] == 400 and shape(ours.json()) == shape(real["body"])
    assert digits_out(ours.json()["error"]["message"]) == digits_out(real["body"]["error"]["message"])
    assert ours.json()["error"]["code"] == real["body"]["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in ours.json()["error"]["message"]


def test_the_model_list_reports_no_window_and_there_is_no_props(sim):
    """llama-cpp-python says its window nowhere: the fleet learns it from a refusal."""
    configure(sim, **LLAMA, models=["smollm2"])
    real = recorded("llama-cpp", "models")
    ours = httpx.get(f"{sim.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert ours.json() == real["body"]
    props = recorded("llama-cpp", "props")
    assert httpx.get(f"{sim.url}/props", timeout=30).status_code == props["status"] == 404
