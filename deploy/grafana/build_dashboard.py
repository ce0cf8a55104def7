"""Writes dashboards/fleet.json, the fleet's Grafana dashboard: `python deploy/grafana/build_dashboard.py`.

The panels are declared here so every query is in one readable list; tests check that the JSON
file matches this script and that every query returns data from a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
Q = 'queue=~"$queue"'


def quantiles(metric: str, by: str = "", selector: str = "", window: str = RATE) -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram, one target each."""
    group = f"{by}, le" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    series = f"{metric}_bucket{{{selector}}}" if selector else f"{metric}_bucket"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({series}[{window}])))",
             f"{legend}p{round(q * 100)}") for q in (0.5, 0.95, 0.99)]


ROWS: list[tuple[str, list[dict]]] = [
    ("Overview", [
        {"title": "Jobs finished per second, by queue", "unit": "ops", "targets": [
            (f'sum by (queue) (rate(fleet_jobs_total{{outcome=~"succeeded|dead", {Q}}}[{RATE}]))', "{{queue}}")]},
        {"title": "Error ratio (dead / finished), by queue", "unit": "percentunit", "targets": [
            (f'sum by (queue) (rate(fleet_jobs_total{{outcome="dead", {Q}}}[{RATE}]))'
             f' / sum by (queue) (rate(fleet_jobs_total{{outcome=~"succeeded|dead", {Q}}}[{RATE}]))', "{{queue}}")]},
        {"title": "Retries and deferrals per second", "unit": "ops", "targets": [
            (f'sum by (queue, outcome) (rate(fleet_jobs_total{{outcome=~"retried|deferred", {Q}}}[{RATE}]))',
             "{{queue}} {{outcome}}")]},
        {"title": "Queue depth", "unit": "short", "targets": [
            (f"max by (queue) (fleet_queue_depth{{{Q}}})", "{{queue}}")]},
        {"title": "In flight", "unit": "short", "targets": [
            (f"max by (queue) (fleet_queue_in_flight{{{Q}}})", "{{queue}}")]},
        {"title": "Oldest message age", "unit": "s", "targets": [
            (f"max by (queue) (fleet_queue_oldest_age_seconds{{{Q}}})", "{{queue}}")]},
        {"title": "Dead letters waiting", "unit": "short", "targets": [
            (f"max by (queue) (fleet_dead_letters{{{Q}}})", "{{queue}}")]},
        {"title": "Worker processes per queue", "unit": "short", "targets": [
            (f"sum by (queue) (fleet_queue_consumers{{{Q}}})", "{{queue}}")]},
        {"title": "Exporters up, broker reachable, scheduler leader", "unit": "short", "type": "stat", "targets": [
            ('sum(up{job="fleet"})', "exporters up"),
            ("min(fleet_broker_up)", "broker up"),
            ("max(fleet_scheduler_leader)", "scheduler leader")]},
        {"title": "Job duration p50 / p95 / p99", "unit": "s",
         "targets": quantiles("fleet_job_duration_seconds", "queue", Q)},
        {"title": "Jobs in progress", "unit": "short", "targets": [
            (f"sum by (queue_name) (dramatiq_messages_inprogress{{queue_name=~\"$queue\"}})", "{{queue_name}}")]},
        # Zero while no connection was lost: the series exists only from a process's first reconnect.
        {"title": "Database reconnects per second, by role", "unit": "ops", "targets": [
            (f"sum by (role) (rate(fleet_db_reconnects_total[{RATE}])) or on() vector(0)", "{{role}}")]},
    ]),
    ("Embeddings", [
        {"title": "Documents per second, by outcome", "unit": "ops", "targets": [
            (f"sum by (outcome) (rate(fleet_embed_documents_total[{RATE}]))", "{{outcome}}")]},
        {"title": "Batches stored per second", "unit": "ops", "targets": [
            (f"sum by (table) (rate(fleet_embed_batches_total[{RATE}]))", "{{table}}")]},
        {"title": "Provider latency (embeddings)", "unit": "s",
         "targets": quantiles("fleet_provider_request_seconds", selector='provider="embeddings"')},
        {"title": "Provider requests per second, by status", "unit": "reqps", "targets": [
            (f"sum by (provider, status) (rate(fleet_provider_requests_total[{RATE}]))", "{{provider}} {{status}}")]},
        {"title": "Provider tokens per second", "unit": "short", "targets": [
            (f"sum by (provider, kind) (rate(fleet_provider_tokens_total[{RATE}]))", "{{provider}} {{kind}}")]},
    ]),
    ("Chat", [
        {"title": "Time to first token", "unit": "s", "targets": quantiles("fleet_chat_time_to_first_token_seconds")},
        {"title": "Output tokens per second (median stream)", "unit": "short", "targets": [
            (f"histogram_quantile(0.5, sum by (le) (rate(fleet_chat_tokens_per_second_bucket[{RATE}])))", "p50")]},
        {"title": "Answers per second, by status", "unit": "ops", "targets": [
            (f"sum by (status) (rate(fleet_chat_completions_total[{RATE}]))", "{{status}}")]},
    ]),
    ("Agent upgrades", [
        {"title": "Unfinished runs: agents by status", "unit": "short", "stack": True, "targets": [
            ("max by (status) (fleet_upgrade_run_agents)", "{{status}}")]},
        {"title": "Upgrade runs in progress", "unit": "short", "type": "stat", "targets": [
            ("max(fleet_upgrade_runs_active)", "runs")]},
        {"title": "Agents finished per second", "unit": "ops", "targets": [
            (f"sum by (status, mode) (rate(fleet_upgrades_total[{RATE}]))", "{{mode}} {{status}}")]},
    ]),
    ("Provider health", [
        {"title": "Provider up (last probe)", "unit": "short", "type": "stat", "targets": [
            ("max by (provider, kind) (fleet_provider_up)", "{{provider}} {{kind}}")]},
        # Probes run every minute or so: a longer window keeps the line continuous.
        {"title": "Probe latency p95", "unit": "s", "targets": [
            ("histogram_quantile(0.95, sum by (provider, le) (rate(fleet_provider_probe_seconds_bucket[15m])))",
             "{{provider}}")]},
    ]),
    ("Memory lifecycle", [
        {"title": "Memories changed in the last hour, by action", "unit": "short", "targets": [
            ("sum by (action) (increase(fleet_lifecycle_actions_total[1h]))", "{{action}}")]},
    ]),
]


def panel(spec: dict, panel_id: int, x: int, y: int) -> dict:
    kind = spec.get("type", "timeseries")
    out = {
        "id": panel_id, "type": kind, "title": spec["title"], "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
        "targets": [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(spec["targets"])],
    }
    if kind == "timeseries" and spec.get("stack"):
        out["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}}
    return out


def dashboard() -> dict:
    panels, panel_id, y = [], 1, 0
    for title, specs in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y = panel_id + 1, y + 1
        for i, spec in enumerate(specs):
            panels.append(panel(spec, panel_id, (i % 3) * 8, y + (i // 3) * 8))
            panel_id += 1
        y += ((len(specs) + 2) // 3) * 8
    return {
        "uid": "fleet-overview", "title": "Fleet", "tags": ["fleet"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            {"name": "queue", "label": "Queue", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(fleet_queue_depth, queue)", "refId": "queues"},
             "definition": "label_values(fleet_queue_depth, queue)", "refresh": 2,
             "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "hide": 0, "sort": 1},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "dashboards" / "fleet.json"
    target.write_text(render())
    print(f"wrote {target}")
