"""Producing and reading jobs: `fleet enqueue`, `fleet chat`, `fleet search`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fleet.ops.cli.output import print_json


def _read_payloads(args) -> list:
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        payloads = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    payloads.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"fleet enqueue: {args.file}:{n}: not JSON: {e}") from None
        return payloads
    if args.payload is None:
        return [{}]
    try:
        return [json.loads(args.payload)]
    except json.JSONDecodeError as e:
        raise SystemExit(f"fleet enqueue: the payload is not JSON: {e}") from None


def _is_document(p) -> bool:
    return isinstance(p, dict) and "content" in p and "source_id" in p


def cmd_enqueue(args) -> int:
    from fleet.shared.client import FleetClient
    from fleet.shared.registry import UnknownJobType, job_type

    payloads = _read_payloads(args)
    keys = None
    if args.key:
        if len(payloads) != 1:
            raise SystemExit(
                "fleet enqueue: --key goes with a single payload (use 'idempotency_key' per line in JSONL)"
            )
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
        print(
            f"enqueued {len(new)} job(s) on {args.job}"
            + (f", {len(done) - len(new)} duplicate(s) skipped" if len(new) < len(done) else "")
        )
    return 0


def cmd_chat(args) -> int:
    from fleet.shared.client import FleetClient

    stream = FleetClient().stream_chat(
        args.session,
        args.question,
        model=args.model,
        max_tokens=args.max_tokens,
        idempotency_key=args.key,
        timeout_s=args.timeout,
    )
    for delta in stream:
        print(delta, end="", flush=True)
    print()
    if stream.status != "complete":
        print(f"fleet chat: the answer is {stream.status}: {(stream.error or {}).get('message')}", file=sys.stderr)
        return 1
    if args.usage:
        print(json.dumps(stream.usage), file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    from fleet.workers.embed.embedding import search

    try:
        rows = search(args.text, table=args.table, k=args.k, filter=json.loads(args.filter))
    except ValueError as e:
        print(f"fleet search: {e}", file=sys.stderr)
        return 2
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            print(f"{r['similarity']:.4f}  {r['source_id']}#{r['chunk_index']}  {r['content'][:100]!r}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("enqueue", help="enqueue a job: a JSON payload, or a JSONL file with --file")
    s.add_argument("job", help="the job type (its actor's name, e.g. echo, embed_documents)")
    s.add_argument("payload", nargs="?", help="the payload as JSON (default {}); or give --file")
    s.add_argument("--file", help="JSONL file, one payload per line ('-' for stdin)")
    s.add_argument("--key", help="idempotency key: a repeated key enqueues nothing new")
    s.add_argument("--trace-id", help="the trace the job(s) join (default: a new one)")
    s.add_argument("--table", choices=["vector_documents", "code_vectors"], help="embed: where a documents file goes")
    s.set_defaults(func=cmd_enqueue)

    s = sub.add_parser("chat", help="ask a question and print the answer as it streams")
    s.add_argument("question", help="the user's message")
    s.add_argument("--session", required=True, help="the session the message and answer are stored under")
    s.add_argument("--model", help="the model (default CHAT_MODEL_DEFAULT)")
    s.add_argument("--max-tokens", type=int, help="at most this many tokens in the answer")
    s.add_argument("--key", help="idempotency key: asking again returns the stored answer")
    s.add_argument("--timeout", type=float, default=300, help="give up waiting for the answer after N seconds")
    s.add_argument("--usage", action="store_true", help="print the token usage on stderr")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("search", help="embed a query and return the nearest stored chunks")
    s.add_argument("text", help="the query")
    s.add_argument(
        "--table",
        choices=["vector_documents", "code_vectors"],
        default="vector_documents",
        help="the table to search (default vector_documents)",
    )
    s.add_argument("-k", type=int, default=5, help="how many chunks (default 5)")
    s.add_argument("--filter", default="{}", help="JSON object the chunks' metadata must contain")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_search)
