"""The development chat page in a real headless Chromium (Debian's `chromium`, installed by
`make system-deps`): type a question, see the answer stream into the page, keep a screenshot."""

from __future__ import annotations

import shutil

import httpx
import psycopg
import pytest

from .embedding_support import reset_sim
from .gateway_support import fleet_with_gateway

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_gw(services, sim, tmp_path_factory):
    with fleet_with_gateway(services, sim, "pgmq", tmp_path_factory.mktemp("gw-page"),
                            gateway_env={"GATEWAY_DEV": "true"}) as f:
        yield f


def test_the_chat_page_streams_an_answer_in_a_real_browser(page_gw, sim, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: run `make system-deps` (as root it installs it)"
    from playwright.sync_api import sync_playwright

    reset_sim(sim)
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 300, "tokens_per_s": 10, "answer_tokens": 12})
    screenshot = tmp_path / "chat-page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)  # a fresh profile each launch
        try:
            page = browser.new_page()
            page.goto(page_gw.url + "/")
            page.fill("input[name=q]", "What does the fleet do?")
            page.click("button[type=submit]")
            # part of the answer is on the page before the end: it streams
            page.wait_for_function("() => { const a = document.querySelector('p.assistant');"
                                   " return a && a.textContent.length > 0 && !a.dataset.done; }", timeout=15_000)
            page.wait_for_selector("p.assistant[data-done='1']", timeout=30_000)
            answer = page.inner_text("p.assistant")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot of the chat page: {screenshot}")
    with psycopg.connect(page_gw.fleet.dsn, autocommit=True) as conn:
        stored = conn.execute("select content from messages where role = 'assistant' and session_id like 'page-%%'"
                              " and status = 'complete' order by id desc limit 1").fetchone()[0]
    assert answer == stored and len(answer.split()) == 12
    assert screenshot.stat().st_size > 1000
