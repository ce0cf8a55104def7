"""CPU time the PostgreSQL server spends, read from its processes in /proc (the postmaster and every child:
backends, WAL writer, checkpointer, autovacuum). pg_stat_statements would miss what is not a statement
(commits, WAL, vacuum), so the server's own accounting is read instead.

A child that exits during the window hands its CPU time to the postmaster's cutime/cstime when reaped, so
`postmaster (self + reaped children) + live children` only grows, and a difference of two readings is
the server's CPU in between. Needs the server on this machine (the embedded one is); None otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

TICKS = os.sysconf("SC_CLK_TCK")


def postmaster_pid(dsn: str) -> int | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = conn.execute("select pg_backend_pid()").fetchone()[0]
        try:
            status = Path(f"/proc/{backend}/status").read_text()  # while the backend lives
        except OSError:
            return None  # the server runs elsewhere
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # it exited: its time is in the postmaster's reaped-children counters now
    return text[text.rindex(")") + 2 :].split()  # fields from state on (the name may hold spaces)


def server_cpu_s(postmaster: int) -> float:
    """utime+stime+cutime+cstime of the postmaster plus utime+stime of its live children, in seconds."""
    own = _stat_fields(postmaster)
    if own is None:
        raise RuntimeError(f"postmaster {postmaster} is gone")
    ticks = sum(int(own[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime (stat fields 14-17)
    for child in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split():
        fields = _stat_fields(int(child))
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / TICKS


class ServerCpu:
    """with ServerCpu(dsn) as cpu: ...; then cpu.seconds (None when the server's processes are not here)."""

    def __init__(self, dsn: str) -> None:
        self.postmaster = postmaster_pid(dsn)
        self.seconds: float | None = None

    def __enter__(self) -> ServerCpu:
        self._start = server_cpu_s(self.postmaster) if self.postmaster else None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.seconds = server_cpu_s(self.postmaster) - self._start

    def per_1k_ms(self, jobs: int) -> float | None:
        return None if self.seconds is None else self.seconds * 1000 / jobs * 1000
