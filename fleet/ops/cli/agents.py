"""Agent templates and upgrades: `fleet templates`, `fleet upgrade`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fleet.ops.cli.output import print_json, print_table
from fleet.shared.config import get_settings


def cmd_templates(args) -> int:
    from fleet.workers.agents import templates
    from fleet.workers.agents.agentfile import InvalidAgentFile
    from fleet.shared.errors import FleetError
    from fleet.workers.agents.semver import InvalidVersion

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
                print_json(rows)
            else:
                print_table(rows, ["name", "version", "sha256", "published_at"])
        elif args.action == "export":
            return _export_template(args)
        else:
            if not (args.file and len(args.versions) == 2):
                raise SystemExit("fleet templates diff NAME V1 V2")
            print_json(templates.diff_versions(args.file, *args.versions))
    except (InvalidAgentFile, InvalidVersion, templates.TemplateError, json.JSONDecodeError, FleetError) as e:
        print(f"fleet templates: {e}", file=sys.stderr)
        return 2
    return 0


def _export_template(args) -> int:
    """`fleet templates export NAME VERSION [-o FILE]`: an Agent File a Letta server imports."""
    from fleet.workers.agents import templates
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
    from fleet.workers.agents.upgrades import halt

    if args.action == "run":
        if len(args.args) != 2:
            raise SystemExit("fleet upgrade run TEMPLATE VERSION [--dry-run] [--cohort JSON]")
        try:
            cohort = json.loads(args.cohort)
        except json.JSONDecodeError as e:
            raise SystemExit(f"fleet upgrade: --cohort is not JSON: {e}")
        from fleet.shared.client import FleetClient
        from fleet.workers.agents.upgrades import start_run

        try:
            agents = _cohort_size(args.args[0], cohort)
            run = start_run(args.args[0], args.args[1], cohort, args.dry_run, FleetClient())
        except Exception as e:  # the database says why (unknown template version)
            print(f"fleet upgrade: {getattr(getattr(e, 'diag', None), 'message_primary', None) or e}", file=sys.stderr)
            return 2
        print(f"upgrade run {run} enqueued{' (dry run)' if args.dry_run else ''}: {agents} agent(s) in the cohort")
        return _follow(run, args.timeout) if args.wait else 0
    if len(args.args) != 1:
        raise SystemExit(f"fleet upgrade {args.action} RUN_ID")
    run_id = args.args[0]
    if args.action == "halt":
        print(f"halted; {halt(run_id)} pending agent(s) cancelled")
        return 0
    return _show_run(run_id, as_json=args.json)


def _cohort_size(template: str, cohort: dict) -> int:
    """How many agents the run will touch, as its fan-out selects them (now; profiles may change before it runs)."""
    from fleet.shared.db import get_pool
    from fleet.workers.agents.upgrades import select_cohort

    with get_pool().connection() as conn:
        return len(select_cohort(conn, {"template_name": template, "cohort": cohort}))


def _follow(run_id: str, timeout_s: float) -> int:
    """`--wait`: a bar over the run's agents (its total known once the fan-out ran), then the outcome."""
    from fleet.ops.follow import follow_upgrade_run

    by_status = follow_upgrade_run(run_id, "agents upgraded", timeout_s)
    if by_status is None:
        print(f"fleet upgrade: run {run_id} not finished after {timeout_s:.0f}s (fleet upgrade status {run_id})",
              file=sys.stderr)
        return 1
    for status, n in sorted(by_status.items()):
        print(f"  {status:<10} {n}")
    return 1 if by_status.get("failed") else 0


def _show_run(run_id: str, *, as_json: bool) -> int:
    from fleet.ops.queries import upgrade_run
    from fleet.workers.agents.upgrades import counts

    row = upgrade_run(run_id)
    if row is None:
        print(f"fleet upgrade: no run {run_id}", file=sys.stderr)
        return 2
    by_status = counts(run_id)
    total = (row["counts"] or {}).get("total", sum(by_status.values()))
    snapshot = {"run_id": run_id, "template": f"{row['template_name']}@{row['to_version']}", "dry_run": row["dry_run"],
                "status": row["status"], "total": total, "by_status": by_status}
    if as_json:
        print_json(snapshot)
    else:
        done = sum(n for s, n in by_status.items() if s in ("succeeded", "failed", "skipped", "cancelled"))
        print(f"run {run_id}: {snapshot['template']}{' (dry run)' if row['dry_run'] else ''}, {row['status']},"
              f" {done}/{total} done")
        for status, n in sorted(by_status.items()):
            print(f"  {status:<10} {n}")
    return 0


def register(sub) -> None:
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
    s.add_argument("--wait", action="store_true", help="run: follow the run with a progress bar until it ends")
    s.add_argument("--timeout", type=float, default=3600, help="run --wait: give up following after N seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_upgrade)
