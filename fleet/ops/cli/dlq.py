"""Dead letters: `fleet dlq list|show|retry|purge`.

`list`, `retry` and `purge` take one selection (ids and filters, all of which must match), so what
`fleet dlq list` shows with some filters is exactly what `retry` and `purge` with the same filters touch."""

from __future__ import annotations

import argparse
import sys

from fleet.ops.cli.output import print_json, print_table, report_cut

COLUMNS = ["id", "queue", "actor", "error_class", "attempts", "created_at", "trace_id", "reason"]
RETRY_PAGE = 100  # dead letters claimed and re-enqueued per round trip


def _selection(args):
    from fleet.shared.deadletters import Selection

    return Selection(
        ids=tuple(args.id),
        queue=args.queue,
        error_class=args.error_class,
        older_than_s=args.older_than,
        newer_than_s=args.newer_than,
        include_retried=getattr(args, "all", False),
    )


def _missing_ids(args, found: list[int]) -> None:
    """Names the ids given that the selection does not hold (unknown, retried already, or filtered out)."""
    missing = sorted(set(args.id) - set(found))
    if missing:
        print(
            f"fleet dlq: no {'' if args.all else 'unretried '}dead letter matching the filters with id"
            f" {', '.join(map(str, missing))}",
            file=sys.stderr,
        )


def cmd_list(args) -> int:
    from fleet.shared import deadletters as dl

    selection = _selection(args)
    rows = dl.list_dead_letters(selection, limit=args.limit)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, COLUMNS)
    if len(rows) == args.limit:
        report_cut("fleet dlq list", len(rows), dl.count_dead_letters(selection), "dead letter(s)")
    return 0


def cmd_show(args) -> int:
    from fleet.shared import deadletters as dl

    row = dl.get_dead_letter(args.id)
    if row is None:
        print(f"fleet dlq: no dead letter {args.id}", file=sys.stderr)
        return 2
    print_json(row)
    return 0


def cmd_retry(args) -> int:
    from fleet.shared import deadletters as dl
    from fleet.shared.client import FleetClient

    args.all = False  # a dead letter is re-enqueued once; the one that fails again is a new dead letter
    selection = _selection(args)
    ids = dl.selected_ids(selection, limit=args.limit)
    if args.id:
        _missing_ids(args, ids)
    if args.limit is not None and len(ids) == args.limit:
        report_cut("fleet dlq retry", len(ids), dl.count_dead_letters(selection), "dead letter(s)")
    if args.dry_run:
        print(f"would re-enqueue {len(ids)} dead letter(s)" + (f": {', '.join(map(str, ids))}" if ids else ""))
        return 0
    client = FleetClient()
    retried = refused = 0
    for start in range(0, len(ids), RETRY_PAGE):
        claimed = dl.claim_for_retry(ids[start : start + RETRY_PAGE])
        pending = [row["id"] for row in claimed]
        try:
            for row in claimed:
                _, actor, payload = dl.payload_of(row)
                masked = dl.masked_fields(payload)
                if masked:
                    refused += 1
                    print(
                        f"fleet dlq: dead letter {row['id']} not retried: its payload was stored with masked"
                        f" values ({', '.join(masked)}); enqueue it again from its producer",
                        file=sys.stderr,
                    )
                    continue
                client.enqueue(actor or row["queue"], payload, trace_id=row["trace_id"])
                retried += 1
                pending.remove(row["id"])
        finally:
            dl.release(pending)  # refused ones, and on an error the ones not re-enqueued yet
    print(f"re-enqueued {retried} dead letter(s)")
    return 1 if refused else 0


def cmd_purge(args) -> int:
    from fleet.shared import deadletters as dl

    selection = _selection(args)
    matching = dl.count_dead_letters(selection)
    if args.id:
        _missing_ids(args, dl.selected_ids(selection))
    if args.dry_run:
        rows = dl.list_dead_letters(selection, limit=args.limit)
        print_table(rows, COLUMNS)
        report_cut("fleet dlq purge --dry-run", len(rows), matching, "dead letter(s)")
        print(f"would purge {matching} dead letter(s)")
        return 0
    if not args.yes:
        print(
            f"fleet dlq purge would delete {matching} dead letter(s) for good: add --yes to delete them,"
            " or --dry-run to list them",
            file=sys.stderr,
        )
        return 2
    print(f"purged {dl.purge_dead_letters(selection)} dead letter(s)")
    return 0


def _add_selection(p: argparse.ArgumentParser, *, retried: bool = True) -> None:
    p.add_argument("id", nargs="*", type=int, help="dead letter ids (with filters, each must match them too)")
    p.add_argument("--queue", help="only dead letters of this queue")
    p.add_argument("--error-class", help="only this error class (as `fleet dlq list` shows it, e.g. PermanentError)")
    p.add_argument("--older-than", type=float, metavar="SECONDS", help="only dead letters older than this")
    p.add_argument("--newer-than", type=float, metavar="SECONDS", help="only dead letters from the last SECONDS")
    if retried:
        p.add_argument("--all", action="store_true", help="include dead letters already retried")


def register(sub) -> None:
    s = sub.add_parser(
        "dlq",
        help="dead letters: list, show, retry, purge",
        description="Dead letters: jobs that will not succeed, with the reason. list, retry and purge"
        " select the same dead letters for the same ids and filters.",
    )
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("list", help="the selected dead letters, newest first")
    _add_selection(p)
    p.add_argument("--limit", type=int, default=100, help="show at most N (default 100); a cut is reported")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("show", help="one dead letter, whole, as JSON")
    p.add_argument("id", type=int, help="the dead letter's id")
    p.set_defaults(func=cmd_show)

    p = actions.add_parser("retry", help="re-enqueue the selected dead letters (each once)")
    _add_selection(p, retried=False)
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="re-enqueue at most N, oldest first (default: all selected); a cut is reported",
    )
    p.add_argument("--dry-run", action="store_true", help="say which dead letters would be re-enqueued, and stop")
    p.set_defaults(func=cmd_retry)

    p = actions.add_parser("purge", help="delete the selected dead letters for good (needs --yes)")
    _add_selection(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, and delete nothing")
    p.add_argument("--limit", type=int, default=100, help="--dry-run: list at most N (default 100)")
    p.add_argument("--yes", action="store_true", help="delete without asking")
    p.set_defaults(func=cmd_purge)
