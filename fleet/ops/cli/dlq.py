"""Dead letters: `fleet dlq list|show|retry|purge`."""

from __future__ import annotations

import sys

from fleet.ops.cli.output import print_json, print_table


def cmd_dlq(args) -> int:
    from fleet.shared import deadletters as dl
    from fleet.shared.client import FleetClient

    if args.action == "list":
        rows = dl.list_dead_letters(queue=args.queue, error_class=args.error_class, older_than_s=args.older_than,
                                    newer_than_s=args.newer_than, include_retried=args.all, limit=args.limit)
        if args.json:
            print_json(rows)
        else:
            print_table(rows, ["id", "queue", "actor", "error_class", "attempts", "created_at", "trace_id", "reason"])
        return 0
    if args.action == "show":
        row = dl.get_dead_letter(args.id)
        if row is None:
            print(f"fleet dlq: no dead letter {args.id}", file=sys.stderr)
            return 2
        print_json(row)
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


def _one_id(args):
    if args.action == "show":
        if len(args.id) != 1:
            raise SystemExit("fleet dlq show takes one id")
        args.id = args.id[0]
    return args


def register(sub) -> None:
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
