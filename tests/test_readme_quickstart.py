"""The README's quickstart, as a newcomer runs it: its code blocks are read from README.md itself (each is
marked by an HTML comment, `<!-- quickstart: KIND -->`, right above it), and run in a fresh virtualenv
against a PostgreSQL this test starts. A job is enqueued from Python and its events are printed.

The virtualenv is a plain `python -m venv` with the README's own install command run in it (about 75 s
here, most of it pip resolving and unpacking the dependencies): no packages are borrowed from the venv
that runs the tests. The README's example connection string is replaced by the test database's; the
worker it starts is stopped by its PID, and so is any process it leaves behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARK = re.compile(r"<!--\s*quickstart:\s*(\w+)\s*-->\s*\n```(\w*)\n(.*?)\n```", re.S)
KINDS = ("install", "shell", "worker", "python", "events")


def quickstart_blocks(text: str) -> dict[str, list[tuple[str, str]]]:
    """KIND -> [(language, code)] of the marked blocks, in the README's order."""
    blocks: dict[str, list[tuple[str, str]]] = {}
    for kind, lang, code in MARK.findall(text):
        blocks.setdefault(kind, []).append((lang, code))
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(venv: Path, home: Path) -> dict[str, str]:
    """A newcomer's shell: the venv first on PATH, no fleet settings, no test-run settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEET_", "PYTEST", "PYTHON"))
        and k
        not in (
            "DATABASE_URL",
            "REDIS_URL",
            "PROMETHEUS_MULTIPROC_DIR",
            "VIRTUAL_ENV",
            "CHAT_API_BASE",
            "EMBEDDING_API_BASE",
            "LETTA_API_BASE_URL",
            "ZUPLO_BASE_URL",
        )
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["FLEET_HOME"] = str(home / "fleet-home")  # nothing of the test run's own services
    env["FLEET_METRICS_PORT"] = str(free_port())  # the README's default port may be taken on a shared host
    return env


def bash(script: str, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the worker's PID (running jobs finish), then SIGKILL to it and to each child still alive."""
    children = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_readme_marks_every_quickstart_step():
    blocks = quickstart_blocks(README.read_text())
    assert set(KINDS) <= set(blocks), f"README quickstart blocks found: {sorted(blocks)}"
    assert any("DATABASE_URL=" in code for _, code in blocks["shell"]), "the quickstart sets DATABASE_URL"
    assert [lang for lang, _ in blocks["python"]] == ["python"]


@pytest.mark.timeout(900)
def test_readme_quickstart_in_a_fresh_virtualenv(services, tmp_path):
    blocks = quickstart_blocks(README.read_text())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = clean_env(venv, tmp_path)
    work = tmp_path / "work"  # the newcomer's own directory, not the checkout (no .env of ours is read)
    work.mkdir()

    # Install: the README's pip lines, run in the checkout (the venv above stands for its `python3 -m venv`).
    pip_lines = [line for _, code in blocks["install"] for line in code.splitlines() if line.strip().startswith("pip ")]
    assert pip_lines, "the README's install block has a pip command"
    started = time.monotonic()
    done = bash("\n".join(pip_lines), env, REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"install: {time.monotonic() - started:.0f} s")

    # Step 1, with the test database in place of the README's example connection string.
    exports = []
    shell = []
    for _, code in blocks["shell"]:
        code = re.sub(r'DATABASE_URL=("[^"]*"|\'[^\']*\'|\S+)', f"DATABASE_URL='{services['dsn']}'", code)
        exports += [line for line in code.splitlines() if line.startswith("export ")]
        shell.append(code)
    prefix = "\n".join(exports) + "\n"  # what every terminal of the quickstart has set
    for code in shell:
        done = bash(code, env, work, timeout=180)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Step 2: the worker, in the background, stopped by its PID at the end.
    (worker_code,) = [code for _, code in blocks["worker"]]
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        ["bash", "-c", prefix + "exec " + worker_code.strip()], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        # Step 3: enqueue from Python; the script prints the job's trace id.
        (py_code,) = [code for _, code in blocks["python"]]
        script = work / "enqueue.py"
        script.write_text(py_code + "\n")
        done = bash(prefix + f"python {script}", env, work, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        trace_id = done.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"[0-9a-f-]{36}", trace_id), done.stdout

        # Step 4: the events, asked again until the job has finished (as a newcomer would).
        (events_code,) = [code for _, code in blocks["events"]]
        events_code = events_code.replace("TRACE_ID", trace_id)
        deadline = time.monotonic() + 120
        while True:
            done = bash(prefix + events_code, env, work, timeout=60)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            if "job.succeeded" in done.stdout or time.monotonic() > deadline:
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        print(done.stdout)
        lines = done.stdout.splitlines()
        types = [line.split()[2] for line in lines if len(line.split()) > 2]
        assert "job.started" in types and "job.succeeded" in types, (
            done.stdout + (tmp_path / "worker.log").read_text()[-3000:]
        )
        assert types.index("job.started") < types.index("job.succeeded")
        assert all(" echo " in line for line in lines if "job." in line)
    finally:
        stop(worker)
        log.close()
