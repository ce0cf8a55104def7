"""Progress bars and tables: rich's at a terminal, plain lines when stdout is not one (CI logs, pipes) or
when rich (the `tui` extra, `pip install 'fleet[tui]'`) is not installed.

A bar's total is fixed when it starts: whoever shows progress first finds out how much there is to do."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def interactive() -> bool:
    return sys.stdout.isatty() and importlib.util.find_spec("rich") is not None


class PlainBar:
    """For logs: a line when the work starts and one when it ends, nothing in between."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.completed = label, total, 0
        print(f"  {label}: 0/{total}", flush=True)

    def update(self, completed: int) -> None:
        self.completed = min(completed, self.total)

    def close(self) -> None:
        print(f"  {self.label}: {self.completed}/{self.total}", flush=True)


class RichBar:
    def __init__(self, progress, task, total: int) -> None:
        self.progress, self.task, self.total = progress, task, total

    def update(self, completed: int) -> None:
        self.progress.update(self.task, completed=min(completed, self.total))


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[PlainBar | RichBar]:
    """`with progress_bar("echo jobs", 5000) as bar: bar.update(done)`."""
    if not interactive():
        bar = PlainBar(label, total)
        try:
            yield bar
        finally:
            bar.close()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        yield RichBar(progress, progress.add_task(label, total=total), total)


def plain_table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict], columns: list[str], *, title: str | None = None) -> None:
    if not interactive():
        if title:
            print(title)
        print(plain_table(rows, columns))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    Console().print(table if rows else "(none)")
