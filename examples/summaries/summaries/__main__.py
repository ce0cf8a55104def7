"""python -m summaries init | add DOCUMENT_ID TEXT | summarize DOCUMENT_ID | show DOCUMENT_ID"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fleet import FleetClient
from fleet.shared.db import get_pool
from summaries.jobs import SummarizeJob, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m summaries")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("init", help="create the example's tables")
    add = actions.add_parser("add", help="store a document")
    add.add_argument("document_id")
    add.add_argument("text")
    ask = actions.add_parser("summarize", help="enqueue its summary (once per document: the id is the key)")
    ask.add_argument("document_id")
    show = actions.add_parser("show", help="print the stored summary")
    show.add_argument("document_id")
    args = parser.parse_args(argv)
    with get_pool().connection() as conn:
        if args.action == "init":
            conn.execute((Path(__file__).with_name("schema.sql")).read_text())
        elif args.action == "add":
            conn.execute(
                "insert into summary_documents (document_id, body) values (%s, %s) on conflict (document_id)"
                " do update set body = excluded.body",
                (args.document_id, args.text),
            )
        elif args.action == "show":
            row = conn.execute(
                "select summary, job_id from document_summaries where document_id = %s", (args.document_id,)
            ).fetchone()
            print(json.dumps({"summary": row[0], "job_id": row[1]} if row else None))
    if args.action == "summarize":
        done = FleetClient().enqueue(
            summarize, SummarizeJob(document_id=args.document_id), idempotency_key=f"summary:{args.document_id}"
        )
        print(json.dumps({"job_id": done.job_id, "trace_id": done.trace_id, "duplicate": done.duplicate}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
