"""The house rules of the layout (README "Layout"), read from the source with ast, nothing imported:
no import cycle between the modules of `fleet`; the platform (fleet.shared) imports no family and no tool;
a family imports no other family; no function over 80 lines in fleet/ and bench/. A module is as long as its
one concern needs: there is no cap on its length."""

from __future__ import annotations

import ast
import os
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80
TOOLS = ("fleet.ops", "fleet.simulator", "fleet.gateway")
FAMILY_COMMON = {"fleet.workers", "fleet.workers.actor"}  # the assembly point and the job decorator


def python_files(folder: Path) -> list[Path]:
    """The modules under `folder`, through links (fleet/shared and fleet/workers link to shared/ and workers/;
    Path.rglob does not follow links before Python 3.13)."""
    return sorted(
        Path(top) / name
        for top, dirs, files in os.walk(folder, followlinks=True)
        if "__pycache__" not in Path(top).parts
        for name in files
        if name.endswith(".py")
    )


def modules(root: Path, package: str = "fleet") -> dict[str, Path]:
    found = {}
    for path in python_files(root / package):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _typing_only(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST):
    """Every import statement, at any depth (a function's lazy import is a dependency too), except those
    under `if TYPE_CHECKING:` (annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _typing_only(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (`from a import b` is a.b when a.b is a module)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_package else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def family_of(name: str) -> str | None:
    if not _within(name, "fleet.workers") or name in FAMILY_COMMON:
        return None
    return ".".join(name.split(".")[:3])


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Arrows that point the wrong way: platform -> family or tool, family -> another family or a tool."""
    wrong = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _within(source, "fleet.shared") and (family_of(target) or any(_within(target, t) for t in TOOLS)):
                wrong.append(f"{source} -> {target} (the platform imports no family or tool)")
            elif family_of(source) and any(_within(target, t) for t in TOOLS):
                wrong.append(f"{source} -> {target} (a family imports no tool)")
            elif family_of(source) and family_of(target) and family_of(source) != family_of(target):
                wrong.append(f"{source} -> {target} (a family imports no other family)")
    return wrong


def oversized(root: Path, folders=("fleet", "bench")) -> list[str]:
    found = []
    for folder in folders:
        for path in python_files(root / folder):
            text = path.read_text()
            rel = path.relative_to(root)
            for node in ast.walk(ast.parse(text, str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(f"{rel}:{node.lineno} {node.name}: {length} lines (function)")
    return found


def test_no_import_cycle_between_modules_of_fleet():
    assert cycles(import_graph(ROOT)) == []


def test_arrows_point_down_only():
    assert crossings(import_graph(ROOT)) == []


def test_no_long_function():
    assert oversized(ROOT) == []


def test_the_checks_find_a_cycle_a_crossing_and_a_long_function(tmp_path):
    """The checks above can fail: on a small tree with each fault they name it."""
    files = {  # laid out as the repository is: shared/ and workers/ at the top, linked from fleet/
        "fleet/__init__.py": "",
        "shared/__init__.py": "",
        "shared/metrics.py": "def leader():\n    from fleet.shared import scheduler\n",
        "shared/scheduler.py": "from fleet.shared.metrics import leader\nfrom fleet.workers.chat import tokens\n",
        "workers/__init__.py": "",
        "workers/chat/__init__.py": "",
        "workers/chat/tokens.py": "from fleet.workers.embed.embedding import chunk\n",
        "workers/embed/__init__.py": "",
        "workers/embed/embedding.py": "def chunk():\n" + "    pass\n" * 90,
        "bench/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    for folder in ("shared", "workers"):
        (tmp_path / "fleet" / folder).symlink_to(Path("..") / folder)
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["fleet.shared.metrics", "fleet.shared.scheduler"]]
    assert crossings(graph) == [
        "fleet.shared.scheduler -> fleet.workers.chat.tokens (the platform imports no family or tool)",
        "fleet.workers.chat.tokens -> fleet.workers.embed.embedding (a family imports no other family)",
    ]
    assert oversized(tmp_path) == ["fleet/workers/embed/embedding.py:1 chunk: 91 lines (function)"]


# A table whose statements sit in several modules is a protocol with several owners: each of these has one.
TABLE_OWNERS = {
    "request_dedup": {"fleet.shared.claims", "fleet.workers.housekeeping"},  # housekeeping deletes expired rows
    "agent_templates": {"fleet.workers.agents.templates"},
    "chat_model_facts": {"fleet.workers.chat.facts"},
    "gateway_jobs": {"fleet.gateway.store"},
    "gateway_signatures": {"fleet.gateway.store"},
    "job_types": {"fleet.shared.registry"},
    "memory_lifecycle_actions": {"fleet.workers.lifecycle.actions"},
    "provider_health": {"fleet.shared.health"},
    "provider_health_checks": {"fleet.shared.health"},
    "rate_limit_counters": {"fleet.shared.ratelimit"},
    "scheduler_runs": {"fleet.shared.scheduler"},
}


def table_users(root: Path, table: str) -> set[str]:
    """The modules of `fleet` with a string literal (not a docstring) that names `table` in a statement."""
    pattern = re.compile(rf"\b(from|into|update|join)\s+{table}\b", re.IGNORECASE)
    found = set()
    for name, path in modules(root).items():
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if pattern.search(node.value):
                    found.add(name)
    return found


def test_each_shared_table_has_one_owner():
    for table, owners in TABLE_OWNERS.items():
        assert table_users(ROOT, table) <= owners, table


def test_the_owner_check_finds_a_second_writer(tmp_path):
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "__init__.py").write_text("")
    (tmp_path / "fleet" / "other.py").write_text('Q = "delete from request_dedup where scope = %s"\n')
    assert table_users(tmp_path, "request_dedup") == {"fleet.other"}


def test_the_pgmq_brokers_parts_depend_on_interfaces_not_on_the_broker():
    """The consumers, notifier, heartbeat and sender know the broker through fleet.shared.brokers.pgmq.parts,
    not by importing it, not even for annotations (the broker builds them: the arrow points one way)."""
    package = ROOT / "shared" / "brokers" / "pgmq"
    importers = []
    for path in sorted(package.glob("*.py")):
        if path.name in ("broker.py", "__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "fleet.shared.brokers.pgmq.broker":
                importers.append(path.name)
    assert importers == []


BROKER_CLASSES = {"PgmqBroker", "RedisBroker", "FleetRedisBroker"}


def broker_branches(root: Path) -> list[str]:
    """Code that asks which broker is configured (`settings.broker == "redis"`, isinstance of a broker class)
    instead of what it can do (fleet.shared.capabilities)."""
    found = []
    for name, path in modules(root).items():
        if name == "fleet.shared.capabilities":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                names_broker = any(isinstance(s, ast.Attribute) and s.attr == "broker" for s in sides)
                names_kind = any(isinstance(s, ast.Constant) and s.value in ("pgmq", "redis") for s in sides)
                if names_broker and names_kind:
                    found.append(f"{name}:{node.lineno}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                if any(getattr(c, "id", getattr(c, "attr", None)) in BROKER_CLASSES for c in classes):
                    found.append(f"{name}:{node.lineno}")
    return found


def test_the_broker_is_a_setting_not_a_code_path():
    assert broker_branches(ROOT) == []


def test_the_broker_check_finds_a_branch(tmp_path):
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "__init__.py").write_text("")
    (tmp_path / "fleet" / "a.py").write_text('def f(settings):\n    return settings.broker == "redis"\n')
    (tmp_path / "fleet" / "b.py").write_text("def g(broker):\n    return isinstance(broker, PgmqBroker)\n")
    assert broker_branches(tmp_path) == ["fleet.a:2", "fleet.b:2"]
