"""Writes fleet.yaml, the Kubernetes objects for every worker type of the Procfile:
`python deploy/k8s/render.py`. For an application with job types of its own, give it your Procfile, whose
worker lines name your modules (`fleet worker --jobs myapp.jobs --queues summaries ...`), and your image:
`python deploy/k8s/render.py --procfile Procfile --image ghcr.io/you/myapp:1 --out myapp.yaml`. A worker
type the fleet does not know gets DEFAULT_TIME_LIMIT_S and DEFAULT_MAX_REPLICAS.

Per worker type: a Deployment (liveness /healthz, readiness /readyz on the metrics port, a termination
grace longer than its longest job), a KEDA ScaledObject with one trigger per queue it consumes (queue
depth read from pgmq), and a PodDisruptionBudget. Plus the scheduler (two replicas: the advisory lock
lets one lead), the shared ConfigMap, and a PodMonitor for the Prometheus Operator.
The HTTP gateway (the Procfile's `gateway`) is no queue consumer: a Deployment probed on its HTTP port,
a Service, a HorizontalPodAutoscaler on CPU and a PodDisruptionBudget.
Secrets (DATABASE_URL, provider keys, the gateway's GATEWAY_JWT_SECRET) come from a Secret named fleet-secrets that you create.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "ghcr.io/your-org/fleet:0.1.0"
LABEL = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
# Longest job per worker type (FLEET_TIME_LIMIT_MS); the pod's grace adds 30 s to drain.
TIME_LIMIT_S = {"echo": 60, "embed": 300, "chat": 300, "health": 60, "lifecycle": 600, "agents": 300,
                "maintenance": 600}
MAX_REPLICAS = {"echo": 10, "embed": 20, "chat": 20, "health": 2, "lifecycle": 2, "agents": 10, "maintenance": 2}
DEFAULT_TIME_LIMIT_S = 600  # FLEET_TIME_LIMIT_MS's default
DEFAULT_MAX_REPLICAS = 10
TARGET_DEPTH_PER_REPLICA = 100
GATEWAY_GRACE_S = 60  # the readiness probe fails first; uvicorn then closes open streams after 5 s (clients resume)
GATEWAY_MAX_REPLICAS = 10
GATEWAY_CPU_TARGET = 60
CONFIG = {"FLEET_BROKER": "pgmq", "FLEET_METRICS_HOST": "0.0.0.0", "FLEET_LOG_LEVEL": "INFO",
          "PROMETHEUS_MULTIPROC_DIR": "/tmp/fleet-metrics"}


def procfile(path: Path = ROOT / "Procfile") -> dict[str, list[str]]:
    """Worker type -> its `fleet` arguments, from the Procfile."""
    types = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            args = shlex.split(command)
            assert args[0] == "fleet", line
            types[name.strip()] = args[1:]
    return types


def option(args: list[str], name: str) -> list[str]:
    """The values following --name, up to the next option."""
    if name not in args:
        return []
    values = []
    for arg in args[args.index(name) + 1 :]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def labels(kind: str) -> dict:
    return {LABEL: "fleet", COMPONENT: kind}


def deployment(kind: str, args: list[str], image: str = IMAGE) -> dict:
    container = {
        "name": kind, "image": image, "args": args,
        "envFrom": [{"configMapRef": {"name": "fleet-config"}}, {"secretRef": {"name": "fleet-secrets"}}],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    grace = 30
    if args[0] == "worker":
        time_limit_s = TIME_LIMIT_S.get(kind, DEFAULT_TIME_LIMIT_S)
        grace = time_limit_s + 30
        port = int(option(args, "--metrics-port")[0])
        container["env"] = [{"name": "FLEET_TIME_LIMIT_MS", "value": str(time_limit_s * 1000)}]
        container["ports"] = [{"name": "metrics", "containerPort": port}]
        container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10,
                                      "failureThreshold": 3}
        container["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10,
                                       "failureThreshold": 2}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"fleet-{kind}", "labels": labels(kind)},
        "spec": {
            "replicas": 2 if kind == "scheduler" else 1,
            "selector": {"matchLabels": labels(kind)},
            "template": {
                "metadata": {"labels": labels(kind)},
                "spec": {
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def scaled_object(kind: str, queues: list[str]) -> dict:
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": f"fleet-{kind}", "labels": labels(kind)},
        "spec": {
            "scaleTargetRef": {"name": f"fleet-{kind}"},
            "minReplicaCount": 1, "maxReplicaCount": MAX_REPLICAS.get(kind, DEFAULT_MAX_REPLICAS),
            "pollingInterval": 15, "cooldownPeriod": 300,
            "triggers": [{
                "type": "postgresql", "name": f"queue-{q.replace('_', '-')}",
                "metadata": {
                    "connectionFromEnv": "DATABASE_URL",
                    # Depth (visible + in flight): replicas stay while the backlog is being worked.
                    "query": f"select coalesce((select queue_length from pgmq.metrics('{q}')), 0)::int",
                    "targetQueryValue": str(TARGET_DEPTH_PER_REPLICA),
                    "activationTargetQueryValue": "0",
                },
            } for q in queues],
        },
    }


def disruption_budget(kind: str) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": f"fleet-{kind}", "labels": labels(kind)},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(kind)}}}


def gateway_deployment(args: list[str], image: str = IMAGE) -> dict:
    """The gateway holds long SSE streams: a slow, surge-first rollout, and a grace that lets them end."""
    dep = deployment("gateway", args, image)
    dep["spec"]["replicas"] = 2
    dep["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    spec = dep["spec"]["template"]["spec"]
    spec["terminationGracePeriodSeconds"] = GATEWAY_GRACE_S
    container = spec["containers"][0]
    port = int(option(args, "--port")[0])
    container |= {
        # fail closed: GATEWAY_JWT_SECRET (or GATEWAY_JWKS_URL) comes from fleet-secrets (or fleet-config)
        "env": [{"name": "GATEWAY_HOST", "value": "0.0.0.0"}, {"name": "GATEWAY_DEV", "value": "false"},
                {"name": "GATEWAY_VERIFY_JWT", "value": "true"}],
        "ports": [{"name": "http", "containerPort": port}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 2},
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    return dep


def gateway_objects(args: list[str], image: str = IMAGE) -> list[dict]:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "fleet-gateway", "labels": labels("gateway")},
               "spec": {"selector": labels("gateway"), "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "fleet-gateway", "labels": labels("gateway")},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fleet-gateway"},
                    "minReplicas": 2, "maxReplicas": GATEWAY_MAX_REPLICAS,
                    "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                        "type": "Utilization", "averageUtilization": GATEWAY_CPU_TARGET}}}],
                    # streams are long: scale down slowly so that few clients have to reconnect
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600,
                                               "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}}}}
    return [gateway_deployment(args, image), service, hpa, disruption_budget("gateway")]


def objects(path: Path = ROOT / "Procfile", image: str = IMAGE) -> list[dict]:
    out = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fleet-config", "labels": labels("config")},
            "data": CONFIG}]
    for kind, args in procfile(path).items():
        if kind == "gateway":
            out.extend(gateway_objects(args, image))
            continue
        out.append(deployment(kind, args, image))
        if kind != "scheduler":
            out.append(scaled_object(kind, option(args, "--queues")))
        out.append(disruption_budget(kind))
    out.append({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
                "metadata": {"name": "fleet", "labels": labels("metrics")},
                "spec": {"selector": {"matchLabels": {LABEL: "fleet"}},
                         "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"},
                                                 {"port": "http", "path": "/metrics", "interval": "15s"}]}})
    return out


def render(path: Path = ROOT / "Procfile", image: str = IMAGE) -> str:
    header = "# Generated by deploy/k8s/render.py from the Procfile: edit those, then run it.\n"
    return header + yaml.safe_dump_all(objects(path, image), sort_keys=False, explicit_start=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Kubernetes objects for every worker type of a Procfile")
    parser.add_argument("--procfile", type=Path, default=ROOT / "Procfile")
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "fleet.yaml")
    args = parser.parse_args()
    args.out.write_text(render(args.procfile.resolve(), args.image))
    print(f"wrote {args.out}")
