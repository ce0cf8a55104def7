"""A chat model's facts, in this process against the simulator over real HTTP and real PostgreSQL: the
context window where servers report it or name it when they refuse a prompt, and the chat template's tokens
measured against the server's usage, kept for the other processes; the settings override both."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import psycopg
import pytest

from fleet.shared.config import Settings
from fleet.shared.errors import ProviderError
from fleet.shared.providers.chat import ChatClient, context_limit
from fleet.workers.chat import facts

from .embedding_support import API_KEY

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "openai"
pytestmark = pytest.mark.usefixtures("services", "fresh_sim")


def settings_for(sim, **extra) -> Settings:
    return Settings(CHAT_API_BASE=f"{sim.url}/v1", CHAT_API_KEY=API_KEY, HEALTH_PROBE_TIMEOUT_S=5, **extra)


def configure(sim, **settings) -> None:
    httpx.post(f"{sim.url}/_sim/config", json=settings).raise_for_status()


def sim_paths(sim) -> list[str]:
    return [r["path"] for r in httpx.get(f"{sim.url}/_sim/log").json()]


def test_the_recorded_llama_cpp_refusal_names_the_window_and_the_prompt():
    recorded = json.loads((FIXTURES / "llama-cpp" / "completion_over_context.json").read_text())
    error = ProviderError("chat", recorded["status"], recorded["body"]["error"]["message"])
    limit = context_limit(error)
    assert limit is not None and (limit.window, limit.prompt_tokens) == (2048, 2131)


@pytest.mark.parametrize(
    ("message", "window", "prompt"),
    [
        (  # vLLM
            "This model's maximum context length is 4096 tokens. However, your request has 5000 input tokens."
            " Please reduce the length of the input messages.",
            4096,
            5000,
        ),
        (  # llama.cpp's own server
            "request (2131 tokens) exceeds the available context size (2048 tokens), try increasing it",
            2048,
            2131,
        ),
    ],
)
def test_other_servers_refusals_name_the_window(message, window, prompt):
    limit = context_limit(ProviderError("chat", 400, message))
    assert limit is not None and (limit.window, limit.prompt_tokens) == (window, prompt)


def test_other_errors_name_no_window():
    assert context_limit(ProviderError("chat", 400, "messages must be a non-empty list")) is None
    assert context_limit(ProviderError("chat", 500, "maximum context length is 2048 tokens")) is None
    assert context_limit(RuntimeError("maximum context length is 2048 tokens")) is None


def test_measuring_a_prompt_over_the_window_gets_the_window_from_the_refusal(sim):
    configure(sim, context_window=100, template_tokens_per_message=5, template_tokens=25)
    client = ChatClient(settings_for(sim))
    over = client.measure([{"role": "user", "content": "word " * 80}], "m")
    assert over is not None and (over.window, over.prompt_tokens) == (100, 80 + 5 + 25)
    fits = client.measure([{"role": "user", "content": "word " * 10}], "m")
    assert fits is not None and (fits.window, fits.prompt_tokens) == (None, 10 + 5 + 25)


@pytest.mark.parametrize("style", ["vllm", "openrouter", "llama.cpp"])
def test_a_reported_window_is_read_and_settings_override_it(sim, style):
    model = f"facts-reported-{style}"
    configure(sim, context_window=4096, report_window=style, models=[model])
    facts.ask_window(settings_for(sim), model)
    assert facts.context_window(settings_for(sim), model) == 4096
    overridden = settings_for(sim, CHAT_CONTEXT_WINDOWS={f"{model}-set": 1000})
    facts.ask_window(overridden, f"{model}-set")
    assert facts.context_window(overridden, f"{model}-set") == 1000


def test_a_server_reporting_no_window_is_asked_once(sim):
    """llama-cpp-python: /v1/models has no window, /props does not exist. Asking again would cut streams."""
    configure(sim, context_window=4096, models=["facts-silent"])
    for _ in range(3):
        facts.ask_window(settings_for(sim), "facts-silent")
    assert facts.context_window(settings_for(sim), "facts-silent") is None
    assert sim_paths(sim) == ["/v1/models"]  # /props answered 404, which the log does not keep


def test_the_template_tokens_are_measured_once_against_the_servers_usage(sim):
    configure(sim, template_tokens_per_message=5, template_tokens=25, tokenizer=True)
    settings = settings_for(sim)
    assert facts.template_tokens(settings, "facts-template") == (4, 3)  # the defaults, until measured
    facts.calibrate_template(settings, "facts-template")
    facts.calibrate_template(settings, "facts-template")
    assert facts.template_tokens(settings, "facts-template") == (5, 25)
    assert sim_paths(sim).count("/v1/chat/completions") == 2


def test_the_template_settings_override_the_measure(sim):
    configure(sim, template_tokens_per_message=5, template_tokens=25)
    both = settings_for(sim, CHAT_TEMPLATE_TOKENS_PER_MESSAGE=7, CHAT_TEMPLATE_TOKENS=11)
    facts.calibrate_template(both, "facts-overridden")
    assert facts.template_tokens(both, "facts-overridden") == (7, 11)
    assert sim_paths(sim) == []  # nothing to measure
    one = settings_for(sim, CHAT_TEMPLATE_TOKENS=0)
    facts.calibrate_template(one, "facts-half")
    assert facts.template_tokens(one, "facts-half") == (5, 0)


def test_what_one_process_learned_another_finds_in_the_database(services, sim):
    """On llama-cpp-python learning costs a refused prompt and measuring calls that cut running streams: once
    for the fleet, not once per process."""
    configure(sim, context_window=4096, models=["facts-shared"], template_tokens_per_message=5, template_tokens=25)
    settings = settings_for(sim)
    facts.learn_window(settings, "facts-shared", 1000)
    facts.calibrate_template(settings, "facts-shared")
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        row = conn.execute(
            "select context_window, window_source, tokens_per_message, template_tokens from chat_model_facts"
            " where model = 'facts-shared'"
        ).fetchone()
    assert row == (1000, "refusal", 5, 25)
    httpx.post(f"{sim.url}/_sim/reset")
    facts._known.clear()  # as in a process that starts now
    facts.ask_window(settings, "facts-shared")
    facts.calibrate_template(settings, "facts-shared")
    assert facts.context_window(settings, "facts-shared") == 1000
    assert facts.template_tokens(settings, "facts-shared") == (5, 25)
    assert sim_paths(sim) == []  # the server was asked nothing
