"""`fleet demo`."""

from __future__ import annotations


def cmd_demo(args) -> int:
    from fleet.ops.demo import run_demo

    return run_demo(
        jobs=args.jobs,
        processes=args.processes,
        threads=args.threads,
        keep_services=args.keep_services,
        documents=args.documents,
    )


def register(sub) -> None:
    s = sub.add_parser("demo", help="start everything, run a mixed workload, show progress and a summary")
    s.add_argument("--jobs", type=int, default=5000, help="echo jobs")
    s.add_argument("--documents", type=int, default=3000, help="documents to embed")
    s.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    s.add_argument("--threads", type=int, default=8, help="threads per worker process (default 8)")
    s.add_argument("--keep-services", action="store_true", help="leave the embedded services running afterwards")
    s.set_defaults(func=cmd_demo)
