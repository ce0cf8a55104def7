"""A mixed workload across the five job families, and the checks that read its outcome back from
the database: every job final, nothing lost, no effect applied twice.

Used by the chaos soak (`make soak`, bench/soak.py) and by the live Prometheus test. Everything a
workload creates carries its tag (document ids, chat sessions, memory projects, template names),
so several workloads can share one database.
"""

from __future__ import annotations

import copy
import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleet.ops.demo_families import DEMO_TEMPLATE
from fleet.shared.db import one

if TYPE_CHECKING:
    import psycopg

    from fleet.shared.client import FleetClient

FINAL = ("job.succeeded", "job.dead")


@dataclass
class Workload:
    client: FleetClient
    connect: Callable[[], psycopg.Connection[Any]]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    seed: int = 7
    trace_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    enqueued: Counter[str] = field(default_factory=Counter)  # actor -> jobs enqueued directly
    echo_dead: int = 0  # echo jobs asked to fail permanently
    documents: int = 0
    chat_keys: list[str] = field(default_factory=list)
    agent_users: list[str] = field(default_factory=list)
    upgrade_runs: list[str] = field(default_factory=list)
    job_ids: dict[str, list[str]] = field(default_factory=dict)  # actor -> ids of the jobs enqueued directly

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.template = f"soak-{self.tag}"
        self.published = False

    def _send(self, actor: str, payloads: list) -> None:
        if payloads:
            sent = self.client.enqueue_many(actor, payloads, trace_id=self.trace_id)
            self.job_ids.setdefault(actor, []).extend(e.job_id for e in sent)
            self.enqueued[actor] += len(payloads)

    # -- the families ------------------------------------------------------
    def echo(self, n: int) -> None:
        """Echo jobs: 2% fail permanently (dead letters), 5% fail once then succeed, some sleep."""
        payloads: list[dict[str, Any]] = []
        for i in range(n):
            if i % 50 == 0:
                payloads.append({"message": f"{self.tag} {i}", "fail": "permanent"})
                self.echo_dead += 1
            elif i % 20 == 1:
                payloads.append({"message": f"{self.tag} {i}", "fail": "transient", "fail_attempts": 1})
            else:
                payloads.append({"message": f"{self.tag} {i}", "sleep_ms": self.rng.choice((0, 0, 0, 5, 20))})
        self._send("echo", payloads)

    def embeddings(self, n: int, docs_per_job: int = 16) -> None:
        start = self.documents
        docs = [
            {
                "source_id": f"{self.tag}-doc-{i}",
                "chunk_index": 0,
                "content": f"{self.tag} document {i}",
                "metadata": {"workload": self.tag},
            }
            for i in range(start, start + n)
        ]
        self._send(
            "embed_documents", [{"documents": docs[i : i + docs_per_job]} for i in range(0, len(docs), docs_per_job)]
        )
        self.documents += n  # counted once enqueued: a producer may call again after a failure

    def chats(self, n: int) -> None:
        keys = [f"{self.tag}-chat-{len(self.chat_keys) + i}" for i in range(n)]
        self._send(
            "chat_completion",
            [
                {"session_id": f"{k}-session", "content": f"question {k}", "idempotency_key": k, "max_tokens": 8}
                for k in keys
            ],
        )
        self.chat_keys += keys

    def health(self, n: int = 1) -> None:
        self._send("refresh_provider_health", [{} for _ in range(n)])

    def lifecycle(self, projects: int, memories_per_project: int = 50) -> None:
        names = [f"{self.tag}-mem-{self.enqueued['memory_lifecycle'] + j}" for j in range(projects)]
        with self.connect() as conn:
            for project in names:
                conn.execute(
                    "with seeded as (insert into memories (project_id, type, expires_at, last_accessed_at, confidence)"
                    " select %s, 'semantic', case when g %% 5 = 0 then now() - interval '1 day' end,"
                    " now() - (g %% 90) * interval '1 day', 0.2 + (g %% 80) / 100.0"
                    " from generate_series(1, %s) g returning id)"
                    " insert into memory_payloads (memory_id, content) select id, 'memory ' || id from seeded",
                    (project, memories_per_project),
                )
        self._send("memory_lifecycle", [{"project_id": p} for p in names])

    def agents(self, n: int) -> None:
        """Publish the template's two versions (once) and create n agents on 1.0.0."""
        from fleet.workers.agents.templates import publish

        if not self.published:
            publish(self.template, "1.0.0", DEMO_TEMPLATE)
            newer = copy.deepcopy(DEMO_TEMPLATE)
            newer["agents"][0]["system"] = "You are the fleet's concierge. Answer in two sentences."
            publish(self.template, "1.1.0", newer)
            self.published = True
        users = [str(uuid.uuid4()) for _ in range(n)]
        self._send("create_agent", [{"user_id": u, "template": self.template, "version": "1.0.0"} for u in users])
        self.agent_users += users

    def agents_created(self) -> int:
        with self.connect() as conn:
            return one(
                conn.execute("select count(*) from user_profiles where template_name = %s", (self.template,)).fetchone()
            )[0]

    def upgrade(self, *, dry_run: bool = False) -> str:
        from fleet.workers.agents.upgrades import start_run

        run = start_run(self.template, "1.1.0", {}, dry_run, self.client)
        self.upgrade_runs.append(run)
        return run

    # -- outcome -----------------------------------------------------------
    def finished(self) -> Counter:
        """Jobs that reached a final state, per actor (directly enqueued actors only)."""
        with self.connect() as conn:
            rows = conn.execute(
                "select actor, count(distinct job_id) from bus_events where trace_id = %s and type = any(%s)"
                " group by actor",
                (self.trace_id, list(FINAL)),
            ).fetchall()
        return Counter({a: n for a, n in rows if a in self.enqueued})

    def unfinished(self, limit: int = 5) -> list[dict]:
        """Jobs enqueued here with no final event yet, and what the database knows of each."""
        from psycopg import sql

        from fleet.shared.registry import job_type

        ids = [(actor, j) for actor, actor_ids in self.job_ids.items() for j in actor_ids]
        with self.connect() as conn:
            final = {
                r[0]
                for r in conn.execute(
                    "select distinct job_id from bus_events where trace_id = %s and type = any(%s)",
                    (self.trace_id, list(FINAL)),
                )
            }
            out = []
            for actor, job_id in [(a, j) for a, j in ids if j not in final][:limit]:
                story = conn.execute(
                    "select type, created_at::text, payload from bus_events where job_id = %s order by id", (job_id,)
                ).fetchall()
                entry = {"job_id": job_id, "actor": actor, "events": [list(r) for r in story]}
                if self.client.settings.broker == "pgmq":
                    queue = job_type(actor).queue
                    for table in (f"q_{queue}", f"a_{queue}"):
                        entry[table] = [
                            list(r)
                            for r in conn.execute(
                                sql.SQL(
                                    "select msg_id, read_ct, enqueued_at::text, vt::text from pgmq.{} where "
                                    "message->>'message_id' = %s"
                                ).format(sql.Identifier(table)),
                                (job_id,),
                            )
                        ]
                out.append(entry)
        return out

    def runs_finished(self) -> bool:
        if not self.upgrade_runs:
            return True
        with self.connect() as conn:
            return one(
                conn.execute(
                    "select bool_and(finished_at is not null) from upgrade_runs where id = any(%s::uuid[])",
                    (self.upgrade_runs,),
                ).fetchone()
            )[0]

    def settled(self) -> bool:
        done = self.finished()
        return all(done[a] >= n for a, n in self.enqueued.items()) and self.runs_finished()

    def progress(self) -> tuple[int, int]:
        done = self.finished()
        return sum(min(done[a], n) for a, n in self.enqueued.items()), sum(self.enqueued.values())

    def _delivery_checks(self, conn) -> dict:
        """From each job's events (every job.started and job.retrying carries its attempt number):
        permanent_retried: a job run or retried again after the attempt that failed permanently (an earlier
          transient failure, a restart say, followed by a permanent one is not a retry of a permanent error);
        diverging_retries: a retried or deferred attempt started by two different deliveries (two live copies
          of one job: the second must be skipped, see middleware/attempts.py);
        dead_then_succeeded: a job that succeeded after its dead letter was written;
        duplicate_runs: attempts that ran more than once (at-least-once delivery allows it; reported)."""
        after_permanent = conn.execute(
            "select count(distinct d.id) from dead_letters d join bus_events e on e.job_id = d.message_id"
            " where d.trace_id = %s and d.reason like 'permanent error:%%' and e.trace_id = %s"
            " and ((e.type = 'job.retrying' and (e.payload->>'attempt')::int >= d.attempts)"
            "  or (e.type = 'job.started' and (e.payload->>'attempt')::int > d.attempts))",
            (self.trace_id, self.trace_id),
        ).fetchone()[0]
        diverging = conn.execute(  # a retried or deferred generation started by two different deliveries
            "select count(*) from (select 1 from bus_events where trace_id = %s and type = 'job.started'"
            " and ((payload->>'attempt')::int > 1 or coalesce((payload->>'deferrals')::int, 0) > 0)"
            " group by job_id, payload->>'attempt', payload->>'deferrals'"
            " having count(distinct payload->>'delivery') > 1) twice",
            (self.trace_id,),
        ).fetchone()[0]
        duplicate_runs = conn.execute(
            "select coalesce(sum(n - 1), 0) from (select count(*) as n from bus_events where trace_id = %s"
            " and type = 'job.started' group by job_id, payload->>'attempt', payload->>'deferrals') runs",
            (self.trace_id,),
        ).fetchone()[0]
        dead_then_succeeded = conn.execute(
            "select count(distinct d.id) from dead_letters d join bus_events e on e.job_id = d.message_id"
            " and e.type = 'job.succeeded' and e.created_at > d.created_at where d.trace_id = %s and e.trace_id = %s",
            (self.trace_id, self.trace_id),
        ).fetchone()[0]
        return {
            "permanent_retried": after_permanent,
            "diverging_retries": diverging,
            "dead_then_succeeded": dead_then_succeeded,
            "duplicate_runs": int(duplicate_runs),
        }

    def report(self, patches: dict[str, int] | None = None) -> dict:
        """What the database says: per family, final/lost/duplicated. `patches` is the simulator's PATCH count
        per agent id (GET /_sim/letta), to prove one PATCH per agent per applied run."""
        done = self.finished()
        out: dict = {
            "jobs": {
                a: {"enqueued": n, "final": done[a], "lost": max(0, n - done[a])}
                for a, n in sorted(self.enqueued.items())
            }
        }
        with self.connect() as conn:
            dead = dict(
                conn.execute(
                    "select actor, count(*) from dead_letters where trace_id = %s group by actor", (self.trace_id,)
                ).fetchall()
            )
            no_reason = one(
                conn.execute(
                    "select count(*) from dead_letters where trace_id = %s and coalesce(reason, '') = ''",
                    (self.trace_id,),
                ).fetchone()
            )[0]
            for actor, row in out["jobs"].items():
                row["dead"] = dead.get(actor, 0)
            out["dead_letters_without_reason"] = no_reason
            out.update(self._delivery_checks(conn))
            rows, distinct = one(
                conn.execute(
                    "select count(*), count(distinct (source_id, chunk_index)) from vector_documents where source_id "
                    "like %s",
                    (f"{self.tag}-doc-%",),
                ).fetchone()
            )
            out["embeddings"] = {"documents": self.documents, "rows": rows, "duplicated": rows - distinct}
            answers, keys, not_final = one(
                conn.execute(
                    "select count(*), count(distinct idempotency_key), count(*) filter (where status = 'streaming')"
                    " from messages where role = 'assistant' and idempotency_key = any(%s)",
                    (self.chat_keys,),
                ).fetchone()
            )
            out["chat"] = {
                "chats": len(self.chat_keys),
                "answers": answers,
                "duplicated": answers - keys,
                "still_streaming": not_final,
            }
            profiles = one(
                conn.execute("select count(*) from user_profiles where template_name = %s", (self.template,)).fetchone()
            )[0]
            out["agents"] = {"requested": len(self.agent_users), "created": profiles}
            runs = []
            for run in self.upgrade_runs:
                status, dry = one(
                    conn.execute("select status, dry_run from upgrade_runs where id = %s", (run,)).fetchone()
                )
                states = dict(
                    conn.execute(
                        "select status, count(*) from agent_upgrades where run_id = %s group by status", (run,)
                    ).fetchall()
                )
                agent_ids = [
                    r[0]
                    for r in conn.execute(
                        "select agent_id from agent_upgrades where run_id = %s and status = 'succeeded'", (run,)
                    )
                ]
                entry = {"run": run, "status": status, "dry_run": dry, "agents": states}
                if patches is not None and not dry:
                    entry["patched_twice"] = sum(1 for a in agent_ids if patches.get(a, 0) > 1)
                    entry["succeeded_without_patch"] = sum(1 for a in agent_ids if patches.get(a, 0) == 0)
                runs.append(entry)
            out["upgrades"] = runs
        return out


def problems(report: dict) -> list[str]:
    """Everything in a report that breaks the promises: lost jobs, double effects, reasonless dead letters."""
    found = [
        f"{actor}: {row['lost']} job(s) never reached a final state"
        for actor, row in report["jobs"].items()
        if row["lost"]
    ]
    if report["permanent_retried"]:
        found.append(f"{report['permanent_retried']} job(s) ran or were retried after a permanent error")
    if report["diverging_retries"]:
        found.append(f"{report['diverging_retries']} retried attempt(s) ran in two live copies of a job")
    if report["dead_then_succeeded"]:
        found.append(f"{report['dead_then_succeeded']} dead letter(s) for a job that then succeeded")
    if report["dead_letters_without_reason"]:
        found.append(f"{report['dead_letters_without_reason']} dead letter(s) without a reason")

    def dead(actor: str) -> int:
        return report["jobs"].get(actor, {}).get("dead", 0)

    emb = report["embeddings"]  # fewer rows than documents only when an embedding job is a dead letter
    if (
        emb["duplicated"]
        or emb["rows"] > emb["documents"]
        or (emb["rows"] < emb["documents"] and not dead("embed_documents"))
    ):
        found.append(
            f"embeddings: {emb['rows']} rows for {emb['documents']} documents ({emb['duplicated']} duplicated)"
        )
    chat = report["chat"]
    if chat["duplicated"] or chat["still_streaming"]:
        found.append(f"chat: {chat['duplicated']} duplicated answer(s), {chat['still_streaming']} still streaming")
    if chat["answers"] + dead("chat_completion") < chat["chats"]:
        found.append(f"chat: {chat['answers']} answers for {chat['chats']} chats")
    if report["agents"]["created"] + dead("create_agent") < report["agents"]["requested"]:
        found.append(f"agents: {report['agents']['created']} created of {report['agents']['requested']}")
    for run in report["upgrades"]:
        if run.get("patched_twice") or run.get("succeeded_without_patch"):
            found.append(
                f"upgrade run {run['run']}: {run['patched_twice']} agent(s) patched twice,"
                f" {run['succeeded_without_patch']} succeeded without a PATCH"
            )
        if set(run["agents"]) - {"succeeded", "skipped", "failed", "cancelled"}:
            found.append(f"upgrade run {run['run']} left agents {run['agents']}")
    return found
