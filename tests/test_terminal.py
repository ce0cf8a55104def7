"""Progress bars and tables: rich's at a terminal, plain lines in logs and pipes; a bar's total is fixed."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    from fleet.ops.terminal import print_table, progress_bar

    with progress_bar("documents", 12) as bar:
        for done in (3, 7, 12, 40):
            bar.update(done)
    print_table([{"queue": "echo", "depth": 3}], ["queue", "depth"])
""")


def run(stdout_is_a_terminal: bool) -> str:
    if not stdout_is_a_terminal:
        return subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=os.environ | {"COLUMNS": "100", "TERM": "xterm"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(60) == 0, proc.stderr.read()
    return b"".join(chunks).decode(errors="replace")


def test_plain_output_when_stdout_is_not_a_terminal():
    out = run(stdout_is_a_terminal=False)
    assert [line.rstrip() for line in out.splitlines()] == [
        "  documents: 0/12",
        "  documents: 12/12",
        "queue  depth",
        "echo   3",
    ]
    assert "\x1b[" not in out


def test_rich_bar_and_table_at_a_terminal_with_the_total_it_started_with():
    out = run(stdout_is_a_terminal=True)
    assert "\x1b[" in out and "documents" in out
    assert "12/12" in out and "40/12" not in out and "/40" not in out
    assert "│ echo  │ 3     │" in out  # a rich table
