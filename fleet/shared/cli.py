"""`fleet`: the command line for operators and producers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fleet.shared.config import get_settings


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


# -- services -----------------------------------------------------------------
def cmd_services(args) -> int:
    from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis
    from fleet.shared.redact import redact

    settings = get_settings()
    pg, rd = EmbeddedPostgres(settings.home), EmbeddedRedis(settings.home)
    want_redis = settings.broker == "redis" or args.redis
    if args.action == "up":
        if settings.database_url is None:
            print("postgres:", redact(pg.up()))
        else:
            print("postgres: DATABASE_URL is set; nothing to start")
        if want_redis:
            if settings.redis_url is None:
                print("redis:", redact(rd.up()))
            else:
                print("redis: REDIS_URL is set; nothing to start")
    elif args.action == "down":
        print("postgres:", "stopped" if pg.down() else "not running")
        print("redis:", "stopped" if rd.down() else "not running")
    else:
        print("postgres:", f"running ({redact(pg.dsn())})" if pg.running() else "not running")
        print("redis:", f"running ({redact(rd.url())})" if rd.running() else "not running")
    return 0


def cmd_migrate(args) -> int:
    from fleet.shared.db import connect
    from fleet.shared.migrate import MigrationError, migrate

    try:
        with connect() as conn:
            applied = migrate(conn)
    except MigrationError as e:
        print(f"fleet migrate: {e}", file=sys.stderr)
        return 2
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else " (up to date)"))
    return 0


# -- workers ------------------------------------------------------------------
def worker_command(queues: list[str] | None, processes: int, threads: int, metrics_port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "dramatiq", "fleet.workers", "--processes", str(processes), "--threads", str(threads),
           "--skip-logging"]
    if queues:
        cmd += ["--queues", *queues]
    if metrics_port != 0:
        cmd += ["--fork-function", "fleet.shared.metrics:serve"]
    return cmd


def worker_env(queues: list[str] | None, metrics_port: int | None = None) -> dict[str, str]:
    """Environment for worker processes: a resolved DATABASE_URL (so children never race to start
    the embedded server) and a fresh multiprocess metrics directory."""
    from fleet.shared.db import database_dsn, redis_url

    settings = get_settings()
    env = dict(os.environ)
    if settings.database_url is None:
        env["DATABASE_URL"] = database_dsn(settings)
        env.setdefault("FLEET_DB_POOLER", "false")
    if settings.broker == "redis" and settings.redis_url is None:
        env["REDIS_URL"] = redis_url(settings)
    # Wiped at start (prometheus_client's rule): files of processes from an earlier run would count.
    mdir = Path(env.get("PROMETHEUS_MULTIPROC_DIR") or settings.home / "metrics" / str(os.getpid())).resolve()
    mdir.mkdir(parents=True, exist_ok=True)
    for f in mdir.glob("*.db"):
        f.unlink()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)
    if metrics_port:
        env["FLEET_METRICS_PORT"] = str(metrics_port)
    env["FLEET_WORKER_QUEUES"] = ",".join(queues) if queues else "all"
    return env


def cmd_worker(args) -> int:
    from fleet.shared.registry import queues as known_queues

    for q in args.queues or []:
        if q not in known_queues():
            print(f"fleet worker: unknown queue {q!r}; known: {', '.join(known_queues())}", file=sys.stderr)
            return 2
    from fleet.shared.middleware.startup import missing_settings

    problems = missing_settings(get_settings(), set(args.queues) if args.queues else None)
    if problems:
        for p in problems:
            print(f"fleet worker: {p}", file=sys.stderr)
        return 2
    env = worker_env(args.queues, args.metrics_port)
    cmd = worker_command(args.queues, args.processes, args.threads, args.metrics_port)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def cmd_scheduler(args) -> int:
    import signal

    from fleet.shared.logs import configure_logging
    from fleet.shared.scheduler import Scheduler

    configure_logging(get_settings().log_level)
    scheduler = Scheduler(tick_s=args.tick)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    signal.signal(signal.SIGINT, lambda *_: scheduler.stop())
    scheduler.run()
    return 0


def cmd_metrics(args) -> int:
    from fleet.shared.metrics import serve

    return serve(args.host, args.port)


# -- producing ----------------------------------------------------------------
def _read_payloads(args) -> list:
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        payloads = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    payloads.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"fleet enqueue: {args.file}:{n}: not JSON: {e}")
        return payloads
    if args.payload is None:
        return [{}]
    try:
        return [json.loads(args.payload)]
    except json.JSONDecodeError as e:
        raise SystemExit(f"fleet enqueue: the payload is not JSON: {e}")


def _is_document(p) -> bool:
    return isinstance(p, dict) and "content" in p and "source_id" in p


def cmd_enqueue(args) -> int:
    from fleet.shared.client import FleetClient
    from fleet.shared.registry import UnknownJobType, job_type

    payloads = _read_payloads(args)
    keys = None
    if args.key:
        if len(payloads) != 1:
            raise SystemExit("fleet enqueue: --key goes with a single payload (use 'idempotency_key' per line in JSONL)")
        keys = [args.key]
    elif args.file and any(isinstance(p, dict) and "idempotency_key" in p for p in payloads):
        keys = [str(p.pop("idempotency_key")) for p in payloads]
    try:
        client = FleetClient()
        if job_type(args.job).name == "embed_documents" and args.file and all(_is_document(p) for p in payloads):
            # a JSONL file of documents: grouped into jobs
            done = client.embed_documents(payloads, table=args.table, trace_id=args.trace_id)
        else:
            done = client.enqueue_many(args.job, payloads, idempotency_keys=keys, trace_id=args.trace_id)
    except (UnknownJobType, ValueError) as e:
        print(f"fleet enqueue: {e}", file=sys.stderr)
        return 2
    new = [d for d in done if not d.duplicate]
    if len(done) == 1:
        d = done[0]
        print(json.dumps({"job_id": d.job_id, "trace_id": d.trace_id, "queue": d.queue, "duplicate": d.duplicate}))
    else:
        print(f"enqueued {len(new)} job(s) on {args.job}" + (f", {len(done) - len(new)} duplicate(s) skipped" if len(new) < len(done) else ""))
    return 0


def cmd_chat(args) -> int:
    from fleet.shared.client import FleetClient

    stream = FleetClient().stream_chat(args.session, args.question, model=args.model, max_tokens=args.max_tokens,
                                       idempotency_key=args.key, timeout_s=args.timeout)
    for delta in stream:
        print(delta, end="", flush=True)
    print()
    if stream.status != "complete":
        print(f"fleet chat: the answer is {stream.status}: {(stream.error or {}).get('message')}", file=sys.stderr)
        return 1
    if args.usage:
        print(json.dumps(stream.usage), file=sys.stderr)
    return 0


def cmd_lifecycle(args) -> int:
    from fleet.shared.client import FleetClient
    from fleet.shared.db import get_pool
    from fleet.shared.lifecycle import ACTIONS, undo_run

    if args.action == "undo":
        if not args.run:
            raise SystemExit("fleet lifecycle undo RUN_ID")
        print(f"restored {undo_run(args.run)} memory(ies)")
        return 0
    payload = {"dry_run": args.dry_run}
    if args.project:
        payload["project_id"] = args.project
    if args.actions:
        payload["actions"] = args.actions
    done = FleetClient().enqueue("memory_lifecycle", payload)
    print(f"enqueued lifecycle run (job {done.job_id}, trace {done.trace_id})", file=sys.stderr)
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    with get_pool().connection() as conn:
        while time.monotonic() < deadline:
            row = conn.execute("select type, payload from bus_events where trace_id = %s"
                               " and type in ('lifecycle.done', 'job.dead') order by id desc limit 1",
                               (done.trace_id,)).fetchone()
            if row:
                if row[0] == "job.dead":
                    print(f"fleet lifecycle: the run failed: {row[1].get('reason')}", file=sys.stderr)
                    return 1
                result = row[1]
                if args.json:
                    _print_json(result)
                else:
                    print(f"run {result['run_id']}{' (dry run)' if result['dry_run'] else ''}"
                          f" in {result['duration_ms']:.0f} ms")
                    for action in ACTIONS:
                        print(f"  {action:<8} {result['counts'].get(action, 0)}")
                return 0
            time.sleep(0.2)
    print("fleet lifecycle: no result yet (is a lifecycle worker running?)", file=sys.stderr)
    return 1


def cmd_templates(args) -> int:
    from fleet.shared import templates
    from fleet.shared.agentfile import InvalidAgentFile
    from fleet.shared.errors import FleetError
    from fleet.shared.semver import InvalidVersion

    try:
        if args.action == "publish":
            if not (args.file and args.name and args.version):
                raise SystemExit("fleet templates publish FILE --name N --version V")
            content = json.loads(Path(args.file).read_text())
            row = templates.publish(args.name, args.version, content)
            print(f"published {row['name']}@{row['version']} (sha256 {row['sha256'][:16]})")
        elif args.action == "list":
            rows = templates.list_templates(args.name)
            if args.json:
                _print_json(rows)
            else:
                print(_table(rows, ["name", "version", "sha256", "published_at"]))
        elif args.action == "export":
            return _export_template(args)
        else:
            if not (args.file and len(args.versions) == 2):
                raise SystemExit("fleet templates diff NAME V1 V2")
            _print_json(templates.diff_versions(args.file, *args.versions))
    except (InvalidAgentFile, InvalidVersion, templates.TemplateError, json.JSONDecodeError, FleetError) as e:
        print(f"fleet templates: {e}", file=sys.stderr)
        return 2
    return 0


def _export_template(args) -> int:
    """`fleet templates export NAME VERSION [-o FILE]`: an Agent File a Letta server imports."""
    from fleet.shared import templates
    from fleet.shared.config import get_settings
    from fleet.shared.providers.letta import LettaClient

    if not (args.file and len(args.versions) == 1):
        raise SystemExit("fleet templates export NAME VERSION [-o FILE]")
    find_tool = LettaClient().find_tool if get_settings().letta_api_base_url else None
    content = json.dumps(templates.export(args.file, args.versions[0], find_tool), indent=2)
    if args.output:
        Path(args.output).write_text(content + "\n")
        print(f"wrote {args.file}@{args.versions[0]} to {args.output}")
    else:
        print(content)
    return 0


def cmd_upgrade(args) -> int:
    from fleet.shared.db import get_pool
    from fleet.shared.upgrades import counts, halt

    if args.action == "run":
        if len(args.args) != 2:
            raise SystemExit("fleet upgrade run TEMPLATE VERSION [--dry-run] [--cohort JSON]")
        try:
            cohort = json.loads(args.cohort)
        except json.JSONDecodeError as e:
            raise SystemExit(f"fleet upgrade: --cohort is not JSON: {e}")
        from fleet.shared.client import FleetClient
        from fleet.shared.upgrades import start_run

        try:
            run = start_run(args.args[0], args.args[1], cohort, args.dry_run, FleetClient())
        except Exception as e:  # the database says why (unknown template version)
            print(f"fleet upgrade: {getattr(getattr(e, 'diag', None), 'message_primary', None) or e}", file=sys.stderr)
            return 2
        print(f"upgrade run {run} enqueued{' (dry run)' if args.dry_run else ''}")
        return 0
    if len(args.args) != 1:
        raise SystemExit(f"fleet upgrade {args.action} RUN_ID")
    run_id = args.args[0]
    if args.action == "halt":
        print(f"halted; {halt(run_id)} pending agent(s) cancelled")
        return 0
    with get_pool().connection() as conn:
        row = conn.execute("select template_name, to_version, dry_run, status, counts from upgrade_runs where id = %s",
                           (run_id,)).fetchone()
    if row is None:
        print(f"fleet upgrade: no run {run_id}", file=sys.stderr)
        return 2
    by_status = counts(run_id)
    total = (row[4] or {}).get("total", sum(by_status.values()))
    snapshot = {"run_id": run_id, "template": f"{row[0]}@{row[1]}", "dry_run": row[2], "status": row[3],
                "total": total, "by_status": by_status}
    if args.json:
        _print_json(snapshot)
    else:
        done = sum(n for s, n in by_status.items() if s in ("succeeded", "failed", "skipped", "cancelled"))
        print(f"run {run_id}: {snapshot['template']}{' (dry run)' if row[2] else ''}, {row[3]}, {done}/{total} done")
        for status, n in sorted(by_status.items()):
            print(f"  {status:<10} {n}")
    return 0


def cmd_search(args) -> int:
    from fleet.shared.embedding import search

    try:
        rows = search(args.text, table=args.table, k=args.k, filter=json.loads(args.filter))
    except ValueError as e:
        print(f"fleet search: {e}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['similarity']:.4f}  {r['source_id']}#{r['chunk_index']}  {r['content'][:100]!r}")
    return 0


# -- looking ------------------------------------------------------------------
def status_snapshot() -> dict:
    from fleet.shared.health import current_health
    from fleet.shared.scheduler import current_leader
    from fleet.shared.status import queue_stats

    return {"broker": get_settings().broker, "queues": queue_stats(with_recent=True), "scheduler_leader": current_leader(),
            "providers": current_health()}


HEALTH_COLUMNS = ["provider", "model", "kind", "status", "latency_ms", "consecutive_failures", "last_error_class",
                  "checked_at"]


def cmd_health(args) -> int:
    from fleet.shared.health import current_health, refresh

    if args.refresh:
        refresh()
    rows = current_health()
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, HEALTH_COLUMNS))
    return 0


def cmd_status(args) -> int:
    while True:
        snap = status_snapshot()
        if args.json:
            _print_json(snap)
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(f"broker: {snap['broker']}    scheduler leader: {snap['scheduler_leader'] or 'none'}")
            print(_table(snap["queues"], ["queue", "depth", "visible", "in_flight", "oldest_age_s",
                                          "succeeded_1m", "retried_1m", "failed_1m", "dead_letters"]))
            print()
            print("provider health:" if snap["providers"] else
                  "provider health: no probe yet (the scheduler runs them; or `fleet health --refresh`)")
            if snap["providers"]:
                print(_table(snap["providers"], HEALTH_COLUMNS))
        if not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_dlq(args) -> int:
    from fleet.shared import deadletters as dl
    from fleet.shared.client import FleetClient

    if args.action == "list":
        rows = dl.list_dead_letters(queue=args.queue, error_class=args.error_class, older_than_s=args.older_than,
                                    newer_than_s=args.newer_than, include_retried=args.all, limit=args.limit)
        if args.json:
            _print_json(rows)
        else:
            print(_table(rows, ["id", "queue", "actor", "error_class", "attempts", "created_at", "trace_id", "reason"]))
        return 0
    if args.action == "show":
        row = dl.get_dead_letter(args.id)
        if row is None:
            print(f"fleet dlq: no dead letter {args.id}", file=sys.stderr)
            return 2
        _print_json(row)
        return 0
    if args.action == "retry":
        if args.id:
            rows = [r for r in (dl.get_dead_letter(i) for i in args.id) if r]
        else:
            rows = [dl.get_dead_letter(r["id"]) for r in dl.list_dead_letters(
                queue=args.queue, error_class=args.error_class, older_than_s=args.older_than,
                newer_than_s=args.newer_than, limit=args.limit)]
        client = FleetClient()
        retried, refused = [], 0
        for row in rows:
            if row["retried_at"] is not None:
                continue
            _, actor, payload = dl.payload_of(row)
            masked = dl.masked_fields(payload)
            if masked:
                refused += 1
                print(f"fleet dlq: dead letter {row['id']} not retried: its payload was stored with masked values"
                      f" ({', '.join(masked)}); enqueue it again from its producer", file=sys.stderr)
                continue
            client.enqueue(actor or row["queue"], payload, trace_id=row["trace_id"])
            retried.append(row["id"])
        if retried:
            dl.mark_retried(retried)
        print(f"re-enqueued {len(retried)} dead letter(s)")
        return 1 if refused else 0
    if args.action == "purge":
        if not args.yes:
            print("fleet dlq purge deletes dead letters for good: add --yes", file=sys.stderr)
            return 2
        print(f"purged {dl.purge_dead_letters(queue=args.queue, older_than_s=args.older_than)} dead letter(s)")
        return 0
    return 2


def cmd_events(args) -> int:
    from psycopg.rows import dict_row

    from fleet.shared.db import get_pool

    where, params = [], []
    if args.trace:
        where.append("trace_id = %s"); params.append(args.trace)
    if args.job:
        where.append("job_id = %s"); params.append(args.job)
    if not where:
        print("fleet events: give --trace or --job", file=sys.stderr)
        return 2
    params.append(args.limit)
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"select created_at, type, queue, actor, job_id, payload from bus_events where {' and '.join(where)}"
            " order by id limit %s", params,
        ).fetchall()
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['created_at']:%Y-%m-%d %H:%M:%S.%f}  {r['type']:<16} {r['queue'] or '':<12} {r['job_id'] or ''}  {json.dumps(r['payload'])}")
    return 0


def cmd_demo(args) -> int:
    from fleet.shared.demo import run_demo

    return run_demo(jobs=args.jobs, processes=args.processes, threads=args.threads, keep_services=args.keep_services,
                    documents=args.documents)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet", description="Queue-driven worker fleet for AI-agent backends.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("services", help="embedded PostgreSQL (and Redis) for machines without DATABASE_URL/REDIS_URL")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--redis", action="store_true", help="start Redis too, whatever FLEET_BROKER says")
    s.set_defaults(func=cmd_services)

    s = sub.add_parser("migrate", help="apply pending SQL migrations from sql/")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("worker", help="run dramatiq worker processes for some or all queues")
    s.add_argument("--queues", nargs="*", help="queues to consume (default: all)")
    s.add_argument("--processes", type=int, default=1)
    s.add_argument("--threads", type=int, default=8)
    s.add_argument("--metrics-port", type=int, default=None, help="exporter port (FLEET_METRICS_PORT); 0 disables it")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("scheduler", help="enqueue periodic jobs (one leader at a time)")
    s.add_argument("--tick", type=float, default=1.0)
    s.set_defaults(func=cmd_scheduler)

    s = sub.add_parser("metrics", help="serve /metrics, /healthz, /readyz")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_metrics)

    s = sub.add_parser("gateway", help="the HTTP gateway: chat and embed jobs over HTTP, their frames as SSE")
    s.add_argument("--host", help="GATEWAY_HOST (127.0.0.1)")
    s.add_argument("--port", type=int, help="GATEWAY_PORT (8080); 0 picks a free port")
    s.set_defaults(func=lambda a: __import__("fleet.gateway.server", fromlist=["serve"]).serve(a.host, a.port))

    s = sub.add_parser("enqueue", help="enqueue a job: a JSON payload, or a JSONL file with --file")
    s.add_argument("job")
    s.add_argument("payload", nargs="?")
    s.add_argument("--file", help="JSONL file, one payload per line ('-' for stdin)")
    s.add_argument("--key", help="idempotency key: a repeated key enqueues nothing new")
    s.add_argument("--trace-id")
    s.add_argument("--table", choices=["vector_documents", "code_vectors"], help="embed: where a documents file goes")
    s.set_defaults(func=cmd_enqueue)

    s = sub.add_parser("chat", help="ask a question and print the answer as it streams")
    s.add_argument("question")
    s.add_argument("--session", required=True)
    s.add_argument("--model")
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--key", help="idempotency key: asking again returns the stored answer")
    s.add_argument("--timeout", type=float, default=300)
    s.add_argument("--usage", action="store_true", help="print the token usage on stderr")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("lifecycle", help="memory lifecycle: run (or dry-run) it now, or undo a run")
    s.add_argument("action", choices=["run", "undo"])
    s.add_argument("run", nargs="?", help="with undo: the run id")
    s.add_argument("--project")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--actions", nargs="*", help="a subset of expire archive decay evict merge reembed purge")
    s.add_argument("--no-wait", action="store_true")
    s.add_argument("--timeout", type=float, default=600)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lifecycle)

    s = sub.add_parser("templates", help="agent templates: publish FILE --name N --version V | list | diff N V1 V2"
                                         " | export N V [-o FILE]")
    s.add_argument("action", choices=["publish", "list", "diff", "export"])
    s.add_argument("file", nargs="?", help="publish: the .af file; diff, export: the template name")
    s.add_argument("versions", nargs="*", help="diff: two versions; export: one")
    s.add_argument("-o", "--output", help="export: the .af file to write (standard output otherwise)")
    s.add_argument("--name")
    s.add_argument("--version")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_templates)

    s = sub.add_parser("upgrade", help="cohort upgrades: run TEMPLATE VERSION | status RUN | halt RUN")
    s.add_argument("action", choices=["run", "status", "halt"])
    s.add_argument("args", nargs="*")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--cohort", default="{}", help='JSON: {"from_version": V} {"user_ids": [...]} {"percent": 5}')
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_upgrade)

    s = sub.add_parser("search", help="embed a query and return the nearest stored chunks")
    s.add_argument("text")
    s.add_argument("--table", choices=["vector_documents", "code_vectors"], default="vector_documents")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--filter", default="{}", help="JSON object the chunks' metadata must contain")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("simulator", help="run the provider simulator (OpenAI-compatible) on loopback")
    s.add_argument("--port", type=int, default=8900)
    s.add_argument("--config", default="{}", help="JSON object of simulator settings")
    s.set_defaults(func=lambda a: __import__("fleet.simulator", fromlist=["main"]).main(
        ["--port", str(a.port), "--config", a.config]))

    s = sub.add_parser("status", help="per queue: depth, oldest age, in flight, recent outcomes, dead letters")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, help="refresh every N seconds")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("health", help="provider health (the last probes); --refresh probes now")
    s.add_argument("--refresh", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_health)

    s = sub.add_parser("dlq", help="dead letters: list, show, retry, purge")
    s.add_argument("action", choices=["list", "show", "retry", "purge"])
    s.add_argument("id", nargs="*", type=int)
    s.add_argument("--queue")
    s.add_argument("--error-class")
    s.add_argument("--older-than", type=float, metavar="SECONDS")
    s.add_argument("--newer-than", type=float, metavar="SECONDS")
    s.add_argument("--all", action="store_true", help="include dead letters already retried")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--json", action="store_true")
    s.add_argument("--yes", action="store_true")
    s.set_defaults(func=lambda a: cmd_dlq(_one_id(a)))

    s = sub.add_parser("events", help="a job's whole story from bus_events")
    s.add_argument("--trace")
    s.add_argument("--job")
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_events)

    s = sub.add_parser("demo", help="start everything, run a mixed workload, show progress and a summary")
    s.add_argument("--jobs", type=int, default=5000, help="echo jobs")
    s.add_argument("--documents", type=int, default=3000, help="documents to embed")
    s.add_argument("--processes", type=int, default=2)
    s.add_argument("--threads", type=int, default=8)
    s.add_argument("--keep-services", action="store_true", help="leave the embedded services running afterwards")
    s.set_defaults(func=cmd_demo)
    return p


def _one_id(args):
    if args.action == "show":
        if len(args.id) != 1:
            raise SystemExit("fleet dlq show takes one id")
        args.id = args.id[0]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves an optional positional that follows an option unparsed (`enqueue echo --trace-id T '{}'`).
    if extra and getattr(args, "payload", "") is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.payload, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command not in ("worker",):
        from fleet.shared.logs import configure_logging

        configure_logging(os.environ.get("FLEET_LOG_LEVEL", "WARNING"))
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # `fleet events ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
