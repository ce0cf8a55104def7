"""Agent templates and upgrades: `fleet templates`, `fleet upgrade`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fleet.ops.cli.output import print_json, print_table
from fleet.shared.config import get_settings


def _template_errors(action):
    """A template action, with the errors a template's content or version can raise said in one line."""

    def run(args) -> int:
        from fleet.shared.errors import FleetError
        from fleet.workers.agents import templates
        from fleet.workers.agents.agentfile import InvalidAgentFile
        from fleet.workers.agents.semver import InvalidVersion

        try:
            return action(args) or 0
        except (InvalidAgentFile, InvalidVersion, templates.TemplateError, json.JSONDecodeError, FleetError) as e:
            print(f"fleet templates: {e}", file=sys.stderr)
            return 2

    return run


def cmd_templates_publish(args) -> int:
    from fleet.workers.agents import templates

    row = templates.publish(args.name, args.version, json.loads(Path(args.file).read_text()))
    print(f"published {row['name']}@{row['version']} (sha256 {row['sha256'][:16]})")
    return 0


def cmd_templates_list(args) -> int:
    from fleet.workers.agents import templates

    rows = templates.list_templates(args.name)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["name", "version", "sha256", "published_at"])
    return 0


def cmd_templates_diff(args) -> int:
    from fleet.workers.agents import templates

    print_json(templates.diff_versions(args.name, *args.versions))
    return 0


def cmd_templates_export(args) -> int:
    """An Agent File a Letta server imports."""
    from fleet.shared.providers.letta import LettaClient
    from fleet.workers.agents import templates

    find_tool = LettaClient().find_tool if get_settings().letta_api_base_url else None
    content = json.dumps(templates.export(args.name, args.version, find_tool), indent=2)
    if args.output:
        Path(args.output).write_text(content + "\n")
        print(f"wrote {args.name}@{args.version} to {args.output}")
    else:
        print(content)
    return 0


def cmd_upgrade_run(args) -> int:
    try:
        cohort = json.loads(args.cohort)
    except json.JSONDecodeError as e:
        raise SystemExit(f"fleet upgrade: --cohort is not JSON: {e}") from None
    from fleet.shared.client import FleetClient
    from fleet.workers.agents.upgrades import HaltPolicy, start_run

    try:
        agents = _cohort_size(args.template, cohort)
        run = start_run(
            args.template,
            args.version,
            cohort,
            args.dry_run,
            FleetClient(),
            halt=HaltPolicy(args.halt_failure_rate, args.halt_min_sample),
        )
    except Exception as e:  # noqa: BLE001  printed: the database says why (unknown template version)
        print(f"fleet upgrade: {getattr(getattr(e, 'diag', None), 'message_primary', None) or e}", file=sys.stderr)
        return 2
    print(f"upgrade run {run} enqueued{' (dry run)' if args.dry_run else ''}: {agents} agent(s) in the cohort")
    return _follow(run, args.timeout) if args.wait else 0


def cmd_upgrade_halt(args) -> int:
    from fleet.workers.agents.upgrades import halt

    print(f"halted; {halt(args.run_id)} pending agent(s) cancelled")
    return 0


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
        print(
            f"fleet upgrade: run {run_id} not finished after {timeout_s:.0f}s (fleet upgrade status {run_id})",
            file=sys.stderr,
        )
        return 1
    for status, n in sorted(by_status.items()):
        print(f"  {status:<10} {n}")
    return 1 if by_status.get("failed") else 0


def cmd_upgrade_status(args) -> int:
    from fleet.ops.queries import upgrade_run
    from fleet.workers.agents.upgrades import counts

    run_id, as_json = args.run_id, args.json

    row = upgrade_run(run_id)
    if row is None:
        print(f"fleet upgrade: no run {run_id}", file=sys.stderr)
        return 2
    by_status = counts(run_id)
    total = (row["counts"] or {}).get("total", sum(by_status.values()))
    snapshot = {
        "run_id": run_id,
        "template": f"{row['template_name']}@{row['to_version']}",
        "dry_run": row["dry_run"],
        "status": row["status"],
        "total": total,
        "by_status": by_status,
    }
    if as_json:
        print_json(snapshot)
    else:
        done = sum(n for s, n in by_status.items() if s in ("succeeded", "failed", "skipped", "cancelled"))
        print(
            f"run {run_id}: {snapshot['template']}{' (dry run)' if row['dry_run'] else ''}, {row['status']},"
            f" {done}/{total} done"
        )
        for status, n in sorted(by_status.items()):
            print(f"  {status:<10} {n}")
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "templates",
        help="agent templates: publish, list, diff, export",
        description="Agent templates: immutable, versioned (SemVer, increasing per name) Agent Files.",
    )
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("publish", help="publish an Agent File as a template version")
    p.add_argument("file", help="the Agent File (.af, JSON) to publish")
    p.add_argument("--name", required=True, help="the template's name")
    p.add_argument("--version", required=True, help="its version (SemVer, above every published one of the name)")
    p.set_defaults(func=_template_errors(cmd_templates_publish))
    p = actions.add_parser("list", help="published template versions")
    p.add_argument("--name", help="only this template's versions")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_template_errors(cmd_templates_list))
    p = actions.add_parser("diff", help="what changes from one version of a template to another, as JSON")
    p.add_argument("name", help="the template's name")
    p.add_argument("versions", nargs=2, metavar="VERSION", help="the two versions, older first")
    p.set_defaults(func=_template_errors(cmd_templates_diff))
    p = actions.add_parser("export", help="a template version as an Agent File a Letta server imports")
    p.add_argument("name", help="the template's name")
    p.add_argument("version", help="the version to export")
    p.add_argument("-o", "--output", help="the .af file to write (standard output otherwise)")
    p.set_defaults(func=_template_errors(cmd_templates_export))

    s = sub.add_parser(
        "upgrade",
        help="cohort upgrades: run, status, halt",
        description="Cohort upgrades: move the agents made from a template to another of its versions.",
    )
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("run", help="start an upgrade run (says how many agents its cohort selects)")
    p.add_argument("template", help="the template's name")
    p.add_argument("version", help="the version to upgrade to")
    p.add_argument("--dry-run", action="store_true", help="compute each agent's diff and change nothing")
    p.add_argument(
        "--cohort",
        default="{}",
        help="which agents (JSON, default all of the template's):"
        ' {"from_version": V} {"user_ids": [...]} {"percent": 5}',
    )
    p.add_argument(
        "--halt-failure-rate",
        type=float,
        metavar="RATE",
        help="halt above this share of failed agents (0 < RATE <= 1; UPGRADE_HALT_FAILURE_RATE if not given)",
    )
    p.add_argument(
        "--halt-min-sample",
        type=int,
        metavar="N",
        help="apply the halt rule after N finished agents (UPGRADE_HALT_MIN_SAMPLE if not given)",
    )
    p.add_argument("--wait", action="store_true", help="follow the run with a progress bar until it ends")
    p.add_argument("--timeout", type=float, default=3600, help="with --wait: give up following after N seconds")
    p.set_defaults(func=cmd_upgrade_run)
    p = actions.add_parser("status", help="a run's progress by status")
    p.add_argument("run_id", help="the run's id (fleet upgrade run prints it)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_upgrade_status)
    p = actions.add_parser("halt", help="stop a run: its pending agents are cancelled")
    p.add_argument("run_id", help="the run's id")
    p.set_defaults(func=cmd_upgrade_halt)
