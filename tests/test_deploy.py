"""deploy/: every kustomization renders, every object is valid for KUBERNETES_VERSION, and what must agree
with the server (ports, probes, grace, threads, settings, metric names) does."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from recserve.client import service_config
from recserve.server.metrics import Metrics
from recserve.server.settings import ServerSettings
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc
from tests.support.fake_server import NOT_SERVING, SERVICE, SERVING, FakeInference, FakeServer

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# The schemas kubernetes-validate ships (offline); the manifests use features of 1.30+ (native preStop sleep).
KUBERNETES_VERSION = "1.31"
NAMESPACE = "recserve"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl (with its built-in kustomize) is not on PATH; CI and the dev machine have it",
)
Object = dict[str, Any]


def _kind_of(kustomization: Path) -> str:
    return str(yaml.safe_load(kustomization.read_text(encoding="utf-8")).get("kind", "Kustomization"))


def _dirs(kind: str) -> list[str]:
    found = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml") if _kind_of(p) == kind)
    return [str(p.relative_to(DEPLOY)) for p in found]


KUSTOMIZATIONS = _dirs("Kustomization")
COMPONENTS = _dirs("Component")
OVERLAYS = [d for d in KUSTOMIZATIONS if d.startswith("overlays/")]


def _kustomize(directory: Path) -> tuple[Object, ...]:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@functools.cache
def rendered(name: str) -> tuple[Object, ...]:
    """The objects of deploy/NAME, a kustomization, or a component layered on deploy/base."""
    if name not in COMPONENTS:
        return _kustomize(DEPLOY / name)
    # A component cannot be built alone; this builds base + it from a scratch directory.
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"recserve-kustomize-{os.getpid()}" / name
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": [os.path.relpath(DEPLOY / "base", scratch)],
                "components": [os.path.relpath(DEPLOY / name, scratch)],
            }
        ),
        encoding="utf-8",
    )
    try:
        return _kustomize(scratch)
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)


def one(objects: tuple[Object, ...], kind: str, name: str | None = None) -> Object:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects: tuple[Object, ...]) -> Object:
    pod = one(objects, "Deployment", "recserve")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "recserve")


def test_the_tree_is_what_the_tests_expect() -> None:
    assert {"base", "overlays/cpu", "overlays/gpu", "overlays/keda", "kserve"} <= set(KUSTOMIZATIONS)
    assert {"components/keda", "components/monitoring", "components/model-volume"} <= set(COMPONENTS)


# --- rendering and schemas ------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS + COMPONENTS)
def test_every_kustomization_and_component_renders(name: str) -> None:
    objects = rendered(name)
    assert objects, f"deploy/{name} rendered nothing"
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), f"deploy/{name} renders an object twice"


def _structural(obj: Object, shape: Any, where: str = "") -> list[str]:
    """Errors of `obj` against `shape`: a type, a tuple of allowed values, a one-element list (each item has
    that shape), or a dict of keys (a trailing `?` marks an optional one; other keys are errors)."""
    if isinstance(shape, dict):
        if not isinstance(obj, dict):
            return [f"{where}: expected a mapping"]
        errors = [f"{where}.{k}: unknown field" for k in obj if k not in {s.rstrip("?") for s in shape}]
        for key, sub in shape.items():
            name = key.rstrip("?")
            if name in obj:
                errors += _structural(obj[name], sub, f"{where}.{name}")
            elif not key.endswith("?"):
                errors.append(f"{where}.{name}: missing")
        return errors
    if isinstance(shape, list):
        if not isinstance(obj, list) or not obj:
            return [f"{where}: expected a non-empty list"]
        return [e for i, item in enumerate(obj) for e in _structural(item, shape[0], f"{where}[{i}]")]
    if isinstance(shape, tuple):
        return [] if obj in shape else [f"{where}: {obj!r} is not one of {shape}"]
    return [] if isinstance(obj, shape) else [f"{where}: expected {shape.__name__}, got {obj!r}"]


META = {"name": str, "namespace?": str, "labels?": dict, "annotations?": dict}
BEHAVIOR = dict  # checked with kubernetes-validate, inside a synthetic HPA
# NOTE: the CRD kinds are not in kubernetes-validate's schemas (they come with the Prometheus Operator, KEDA
# and KServe). These are hand-written shapes of the fields used here, from those projects' API types; a
# misspelt or misplaced field is an error. Pod templates inside them are validated as real Pods below.
CRD_SHAPES: dict[str, Any] = {
    "ServiceMonitor": {
        "apiVersion": ("monitoring.coreos.com/v1",),
        "kind": str,
        "metadata": META,
        "spec": {
            "selector": {"matchLabels": dict},
            "endpoints": [
                {
                    "port": str,
                    "path": str,
                    "scheme?": ("http", "https"),
                    "interval": str,
                    "scrapeTimeout?": str,
                }
            ],
        },
    },
    "PrometheusRule": {
        "apiVersion": ("monitoring.coreos.com/v1",),
        "kind": str,
        "metadata": META,
        "spec": {
            "groups": [
                {
                    "name": str,
                    "rules": [{"alert": str, "expr": str, "for": str, "labels": dict, "annotations": dict}],
                }
            ]
        },
    },
    "ScaledObject": {
        "apiVersion": ("keda.sh/v1alpha1",),
        "kind": str,
        "metadata": META,
        "spec": {
            "scaleTargetRef": {"apiVersion": str, "kind": ("Deployment",), "name": str},
            "minReplicaCount": int,
            "maxReplicaCount": int,
            "pollingInterval?": int,
            "cooldownPeriod?": int,
            "advanced?": {"horizontalPodAutoscalerConfig": {"name?": str, "behavior": BEHAVIOR}},
            "triggers": [
                {
                    "type": ("prometheus",),
                    "metricType": ("AverageValue", "Value"),
                    "metadata": {
                        "serverAddress": str,
                        "query": str,
                        "threshold": str,
                        "ignoreNullValues?": ("true", "false"),
                    },
                }
            ],
        },
    },
    "ServingRuntime": {
        "apiVersion": ("serving.kserve.io/v1alpha1",),
        "kind": str,
        "metadata": META,
        "spec": {
            "annotations?": dict,
            "supportedModelFormats": [{"name": str, "version?": str, "autoSelect?": bool}],
            # KServe's InferenceServiceProtocol names (pkg/constants).
            "protocolVersions": [("v1", "v2", "grpc-v1", "grpc-v2")],
            "containers": list,
            "volumes?": list,
            "nodeSelector?": dict,
            "tolerations?": list,
        },
    },
    "InferenceService": {
        "apiVersion": ("serving.kserve.io/v1beta1",),
        "kind": str,
        "metadata": META,
        "spec": {
            "predictor": {
                "minReplicas": int,
                "maxReplicas": int,
                "terminationGracePeriodSeconds?": int,
                "model": {
                    "runtime": str,
                    "modelFormat": {"name": str, "version?": str},
                    "storageUri": str,
                    "protocolVersion?": ("v1", "v2", "grpc-v1", "grpc-v2"),
                },
            }
        },
    },
}


def _validate(obj: Object) -> list[str]:
    """kubernetes-validate (strict: unknown fields are errors) for core kinds, CRD_SHAPES for the others."""
    if obj["kind"] in CRD_SHAPES:
        return _structural(obj, CRD_SHAPES[obj["kind"]], obj["kind"])
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {KUBERNETES_VERSION}"]
    return []


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS + COMPONENTS)
def test_every_rendered_object_is_valid(name: str) -> None:
    errors = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in rendered(name) for e in _validate(o)]
    assert not errors, f"deploy/{name} against Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(errors)


def test_the_validators_refuse_a_misspelt_field() -> None:
    """Neither check is vacuous: an unknown field fails both."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1, "targetPort": 1}], "clusterIp": "None"},
    }
    assert _validate(service)
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {}},
            "endpoints": [{"port": "m", "path": "/", "intervall": "1s"}],
        },
    }
    assert any("intervall" in e for e in _validate(monitor))


@needs_kubectl
@pytest.mark.parametrize("name", [*OVERLAYS, "kserve"])
def test_every_object_lands_in_the_namespace(name: str) -> None:
    stray = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in rendered(name)
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE
    ]
    assert not stray, f"deploy/{name}: not in namespace {NAMESPACE}: {stray}"


# --- the Deployment against the server ------------------------------------------------------------------


def _cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _env(spec: Object) -> dict[str, str]:
    """The container's environment as the server sees it: resourceFieldRef on limits.cpu resolved the way
    the kubelet does (rounded up to the divisor)."""
    env = {}
    for var in spec["env"]:
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and ref["containerName"] == spec["name"], var
        cores = _cpu_cores(spec["resources"]["limits"]["cpu"]) / _cpu_cores(str(ref.get("divisor", "1")))
        env[var["name"]] = str(math.ceil(cores))
    return env


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServerSettings:
    """ServerSettings as `recserve serve` would build it from `env` alone."""
    for name in list(os.environ):
        if name.startswith("RECSERVE_"):
            monkeypatch.delenv(name)
    fields = {name.upper() for name in ServerSettings.model_fields}
    unknown = [n for n in env if n.startswith("RECSERVE_") and n.removeprefix("RECSERVE_") not in fields]
    assert not unknown, f"not settings of recserve serve: {unknown}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return ServerSettings()  # type: ignore[call-arg]


def _check_server_container(spec: Object, pod: Object, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(_env(spec), monkeypatch)
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
    ports = {p["containerPort"] for p in spec["ports"]}
    assert settings.port in ports and (settings.metrics_port in ports or spec["name"] == "kserve-container")

    # Native gRPC probes on the server's port: the API for start-up and readiness, the server for liveness.
    for probe, service in (
        ("startupProbe", "recserve.v1.Inference"),
        ("readinessProbe", "recserve.v1.Inference"),
        ("livenessProbe", ""),
    ):
        assert spec[probe]["grpc"] == {"port": settings.port, "service": service}, probe
    liveness = spec["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.grace_period_s, (
        "a kubelet that still probes a draining pod would kill it before its grace period ends"
    )
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, (
        "too little time to load and warm up"
    )

    # The way out: preStop sleep, then SIGTERM and the server's drain, all inside the pod's grace period.
    pre_stop = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.grace_period_s + 5

    # Threads follow the CPU limit, a whole number of cores, requests = limits.
    resources = spec["resources"]
    assert {"cpu", "memory"} <= resources["limits"].keys()
    assert resources["requests"] == resources["limits"]
    cores = _cpu_cores(resources["limits"]["cpu"])
    assert cores == int(cores) and settings.intra_op_threads == int(cores)

    security = spec["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security.get("privileged", False) is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in spec["volumeMounts"]}


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_the_deployment_matches_the_server(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = rendered(name)
    deployment = one(objects, "Deployment", "recserve")
    pod = deployment["spec"]["template"]["spec"]
    spec = container(objects)
    _check_server_container(spec, pod, monkeypatch)
    assert pod["enableServiceLinks"] is False, "the Service `recserve` would inject RECSERVE_PORT=tcp://..."
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


@needs_kubectl
def test_the_overlays_differ_where_they_should(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = container(rendered("overlays/cpu")), container(rendered("overlays/gpu"))
    assert cpu["image"].endswith(":cpu") and gpu["image"].endswith(":gpu")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    gpu_settings = _settings(_env(gpu), monkeypatch)
    assert (gpu_settings.device, gpu_settings.precision) == ("cuda", "auto")  # auto = fp16 on CUDA
    pod = one(rendered("overlays/gpu"), "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]


@needs_kubectl
def test_the_model_volume_is_mounted_read_only_over_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = container(rendered("components/model-volume"))
    mount = next(m for m in spec["volumeMounts"] if m["name"] == "models")
    settings = _settings(_env(spec), monkeypatch)
    assert mount["readOnly"] is True and settings.model_repo.is_relative_to(mount["mountPath"])


# --- Services, budget, network policy, autoscaling ------------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_services_budget_and_policy_select_the_pods(name: str) -> None:
    objects = rendered(name)
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    headless, plain = one(objects, "Service", "recserve-headless"), one(objects, "Service", "recserve")
    assert headless["spec"]["clusterIP"] == "None"
    assert plain["spec"]["type"] == "ClusterIP" and "clusterIP" not in plain["spec"]
    port_names = {p["name"] for p in container(objects)["ports"]}
    for service in (headless, plain):
        assert _selects(service["spec"]["selector"], pod_labels)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert _selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)

    monitor = one(objects, "ServiceMonitor")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], headless["metadata"]["labels"])
    assert not _selects(monitor["spec"]["selector"]["matchLabels"], plain["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in headless["spec"]["ports"]}

    policy = one(objects, "NetworkPolicy")["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], pod_labels)
    assert policy["egress"] == []
    admitted = {port["port"]: rule["from"] for rule in policy["ingress"] for port in rule["ports"]}
    assert admitted.keys() == {"grpc", "metrics"}
    assert all(peer["podSelector"]["matchLabels"] for peer in admitted["grpc"]), "only labelled clients"


BACKLOG = "recserve_backlog_seconds"


def _check_behavior(behavior: Object) -> None:
    """Fast up, slow down; valid as an HPA's behavior."""
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "behavior"},
        "spec": {
            "scaleTargetRef": {"kind": "Deployment", "name": "x"},
            "maxReplicas": 2,
            "behavior": behavior,
        },
    }
    assert _validate(hpa) == []
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in behavior["scaleDown"]["policies"])


@needs_kubectl
def test_the_hpa_scales_the_deployment_on_the_backlog() -> None:
    objects = rendered("overlays/cpu")
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one(objects, "Deployment")["metadata"]["name"],
    }
    assert hpa["metrics"] == [
        {
            "type": "Pods",
            "pods": {"metric": {"name": BACKLOG}, "target": {"type": "AverageValue", "averageValue": "50m"}},
        }
    ]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    _check_behavior(hpa["behavior"])
    # The adapter serves the metric under the very name the HPA asks for.
    rule = _adapter_rules()[0]
    assert rule["name"]["as"] == BACKLOG and BACKLOG in rule["seriesQuery"]


@needs_kubectl
def test_keda_replaces_the_hpa_with_the_same_signal() -> None:
    objects = rendered("overlays/keda")
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"], "two autoscalers would fight"
    scaled = one(objects, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    _check_behavior(scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
    trigger = scaled["triggers"][0]
    assert BACKLOG in trigger["metadata"]["query"] and float(trigger["metadata"]["threshold"]) == 0.05
    # PromQL is not rewritten by kustomize: its namespace must be the one rendered.
    assert (
        f'namespace="{one(objects, "ScaledObject")["metadata"]["namespace"]}"' in trigger["metadata"]["query"]
    )


# --- every PromQL expression names real series ----------------------------------------------------------


@functools.cache
def exported_series() -> dict[str, frozenset[str]]:
    """Every sample name the server exposes, with its labels: counters as `_total`, histograms as `_bucket`
    (with `le`), `_sum` and `_count`, gauges as they are."""
    metrics = Metrics(CollectorRegistry())
    labels = {
        family.name: frozenset(wrapper._labelnames)
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
        for family in wrapper.describe()
    }
    series: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        own = labels[family.name]
        if family.type == "counter":
            series[f"{family.name}_total"] = own
        elif family.type == "histogram":
            series[f"{family.name}_bucket"] = own | {"le"}
            series[f"{family.name}_sum"] = series[f"{family.name}_count"] = own
        else:
            series[family.name] = own
    return series


# Labels Prometheus (through the operator's ServiceMonitor) puts on every scraped series.
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "service", "container", "endpoint"})
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or"}
_KEYWORDS |= {"unless", "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(series, labels) an expression names. A small scanner, not a parser: it drops Grafana variables and
    the adapter's <<templates>>, reads label names from matchers and grouping clauses, and calls every other
    bare identifier that is not a function call or a keyword a series."""
    text = re.sub(r"<<[^>]*>>", "", expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    labels: set[str] = set()
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", text)  # Grafana's variable query
    if match:
        text, label = match.groups()
        labels.add(label)
    for body in re.findall(r"\{([^}]*)\}", text):
        labels |= set(
            re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:[^"\\]|\\.)*"', '""', body))
        )
    text = re.sub(r"\{[^}]*\}", " ", text)
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    series = {
        m.group(1)
        for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text)
        if not m.group(2) and m.group(1) not in _KEYWORDS
    }
    return series, labels


def _adapter_rules() -> list[Object]:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text(encoding="utf-8"))
    rules: list[Object] = values["rules"]["custom"]
    return rules


def _dashboard() -> Object:
    dashboard: Object = json.loads(
        (DEPLOY / "base" / "dashboards" / "recserve.json").read_text(encoding="utf-8")
    )
    return dashboard


def every_expression() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for the dashboard, the adapter rule, the KEDA query and the alerts."""
    dashboard = _dashboard()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield f"dashboard panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"dashboard variable {variable['name']}", variable["query"]["query"]
    for rule in _adapter_rules():
        yield "adapter seriesQuery", rule["seriesQuery"]
        yield "adapter metricsQuery", rule["metricsQuery"]
    keda = yaml.safe_load(
        (DEPLOY / "components" / "keda" / "keda-scaledobject.yaml").read_text(encoding="utf-8")
    )
    for trigger in keda["spec"]["triggers"]:
        yield "KEDA query", trigger["metadata"]["query"]
    alerts = yaml.safe_load(
        (DEPLOY / "components" / "monitoring" / "prometheusrule.yaml").read_text(encoding="utf-8")
    )
    for group in alerts["spec"]["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


def test_the_promql_scanner_reads_series_and_labels() -> None:
    series, labels = promql_names(
        'histogram_quantile(0.99, sum by (le) (rate(recserve_x_bucket{namespace="$namespace",a=~"b{c}"}'
        "[$__rate_interval]))) / on (pod) group_left (d) recserve_y > 1e3"
    )
    assert series == {"recserve_x_bucket", "recserve_y"}
    assert labels == {"le", "namespace", "a", "pod", "d"}
    assert promql_names("avg by (<<.GroupBy>>) (avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m]))") == (
        set(),
        set(),
    )
    assert promql_names("label_values(recserve_model_info, namespace)") == (
        {"recserve_model_info"},
        {"namespace"},
    )


def test_every_expression_names_only_series_the_server_exports() -> None:
    exported = exported_series()
    problems, named = [], set()
    for where, expr in every_expression():
        series, labels = promql_names(expr)
        if "<<.Series>>" not in expr and not series:
            problems.append(f"{where}: names no series: {expr}")
        unknown = series - exported.keys()
        if unknown:
            problems.append(f"{where}: not exported by recserve/server/metrics.py: {sorted(unknown)}")
        allowed = TARGET_LABELS.union(*(exported.get(s, frozenset()) for s in series))
        if labels - allowed:
            problems.append(f"{where}: labels {sorted(labels - allowed)} are on none of {sorted(series)}")
        named |= series
    assert not problems, "\n".join(problems)
    assert BACKLOG in named and len(named) >= 10, "the dashboard should cover the server's families"


@needs_kubectl
def test_the_dashboard_configmap_carries_the_json() -> None:
    config_map = one(rendered("overlays/cpu"), "ConfigMap", "recserve-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["recserve.json"]) == _dashboard()
    assert all(
        panel["targets"] and panel["datasource"]["uid"] == "${datasource}" for panel in _dashboard()["panels"]
    )


# --- KServe ---------------------------------------------------------------------------------------------


@needs_kubectl
def test_the_kserve_runtime_serves_the_inference_service(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = rendered("kserve")
    runtime, isvc = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # The server answers inference.GRPCInferenceService on its port (docs/kserve.md) and no REST protocol;
    # KServe matches the InferenceService's protocol against the runtime's list.
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]

    # The runtime's containers are core containers: validate them inside a real Pod.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runtime"},
        "spec": {
            "containers": runtime["spec"]["containers"],
            "volumes": runtime["spec"]["volumes"],
            "terminationGracePeriodSeconds": isvc["spec"]["predictor"]["terminationGracePeriodSeconds"],
        },
    }
    assert _validate(pod) == []
    spec = runtime["spec"]["containers"][0]
    assert spec["name"] == "kserve-container" and spec["ports"][0]["name"] == "h2c"
    _check_server_container(spec, pod["spec"], monkeypatch)
    assert _settings(_env(spec), monkeypatch).model_repo == Path("/mnt/models")


# --- clients: deploy/client/service-config.json ---------------------------------------------------------


class _Draining(FakeInference):
    """A replica between SIGTERM and its health update reaching the client: every call is UNAVAILABLE."""

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        self.calls["Embed"] += 1
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry on another replica"
        )
        raise AssertionError("unreachable")


def _embed_on_two_replicas(
    b: FakeInference, b_status: int, options: list[tuple[str, Any]]
) -> tuple[int, int]:
    """40 Embed calls over one round_robin channel to replicas A (serving) and B; (calls A got, B got)."""
    a = FakeInference()
    serving, other = {"": SERVING, SERVICE: SERVING}, {"": b_status, SERVICE: b_status}
    with FakeServer(a, serving) as server_a, FakeServer(b, other) as server_b:
        target = f"ipv4:127.0.0.1:{server_a.port},127.0.0.1:{server_b.port}"
        with grpc.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.InferenceStub(channel)
            for _ in range(40):
                stub.Embed(pb.EmbedRequest(texts=["x"]), timeout=10, wait_for_ready=True)
    return a.calls["Embed"], b.calls["Embed"]


def test_the_client_service_config_is_the_bundled_clients() -> None:
    """Clients in other languages get the very config recserve.client uses for a fleet target."""
    shipped = json.loads((DEPLOY / "client" / "service-config.json").read_text(encoding="utf-8"))
    assert shipped == service_config(), "regenerate deploy/client/service-config.json from service_config()"


def test_the_client_service_config_keeps_calls_off_a_draining_replica() -> None:
    """What docs/deploy.md tells clients to use: round_robin, health checking, retries on UNAVAILABLE."""
    config = (DEPLOY / "client" / "service-config.json").read_text(encoding="utf-8")
    with_config = [("grpc.service_config", config)]
    # Plain round_robin sends about half the calls to a replica that says NOT_SERVING (not exactly half:
    # the first calls may go out before the second subchannel is connected)...
    plain = [("grpc.lb_policy_name", "round_robin")]
    serving_calls, draining_calls = _embed_on_two_replicas(FakeInference(), NOT_SERVING, plain)
    assert serving_calls + draining_calls == 40 and draining_calls >= 10
    # ...the health check takes it out of the rotation...
    assert _embed_on_two_replicas(FakeInference(), NOT_SERVING, with_config) == (40, 0)
    # ...and a call that reaches it before its health update does is retried on the other one (none failed).
    a_calls, _ = _embed_on_two_replicas(_Draining(), SERVING, with_config)
    assert a_calls == 40
