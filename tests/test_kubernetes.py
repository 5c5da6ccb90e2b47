"""conf/kubernetes: Kubernetes accepts every manifest, and they give llm-worker what it needs.

Offline: the Kubernetes kinds are checked against the JSON schemas kubernetes-validate
ships (strict: an unknown field is refused, as `kubectl apply` refuses it); the
PodMonitor, a custom resource those schemas lack, against a schema of the fields used
here. Then what matters to this service, read from the manifests: the environment
they give the container is loaded by llm-worker's own settings loader, the probes
reach the routes on the port it listens on, SIGTERM has time to drain, the pod is
non-root, WORKER_ID follows the node, and Prometheus finds the metrics.

Each check is a function that returns its problems, so that the tests can show it
on the manifests as shipped (no problem) and on a broken copy (the problem named).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from llm_worker.http.app import LIVE_STALE
from llm_worker.plugin.manager import DISABLE_ENV, EXTRA_ENV
from llm_worker.settings import config

try:
    import jsonschema
    import kubernetes_validate
    import yaml
    from kubernetes_validate.utils import all_versions
except ImportError as exc:  # the test extra: pip install -e '.[test]'
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"{exc.name} is not installed (pip install -e '.[test]')", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "conf" / "kubernetes"
# Pinned, so that a newer kubernetes-validate cannot change the verdict. The manifests
# use nothing newer than Kubernetes 1.25 (a DaemonSet's maxSurge); move this on with
# the clusters you support.
KUBERNETES_VERSION = "1.31"
# What the downward API gives the pod on a node (an EKS-style node name: a long one that fits WORKER_ID).
FIELD_VALUES = {"spec.nodeName": "ip-10-0-12-34.eu-west-1.compute.internal", "status.hostIP": "10.0.12.34"}
# The supervisor's own shutdown after the graceful timeout (kill stragglers, hand
# their jobs back, stop the HTTP process), as in tests/test_systemd_unit.py.
STOP_MARGIN_S = 10
# Environment variables llm-worker reads besides its settings.
OTHER_VARIABLES = {EXTRA_ENV, DISABLE_ENV}

Manifest = dict[str, Any]


# ---- reading the manifests ------------------------------------------------------------


def load_all() -> dict[Path, list[Manifest]]:
    """Every YAML file under conf/kubernetes, with its documents."""
    found = {path: [d for d in yaml.safe_load_all(path.read_text()) if d] for path in sorted(KUBE.rglob("*.yaml"))}
    assert found, f"no manifests in {KUBE}"
    return found


FILES = load_all()
RESOURCES = [(path, doc) for path, docs in FILES.items() for doc in docs if doc.get("kind") != "Kustomization"]


def named(path: Path) -> str:
    return str(path.relative_to(ROOT))


def the(kind: str) -> Manifest:
    found = [doc for _, doc in RESOURCES if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {named(KUBE)}, found {len(found)}"
    return found[0]


def kustomization(folder: Path) -> Manifest:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def container(daemonset: Manifest) -> Manifest:
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: llm-worker (its supervisor runs everything else)"
    return containers[0]


def secret_example() -> dict[str, str]:
    """The Secret's keys and example values: secret.env.example, as kustomize's secretGenerator reads secret.env."""
    pairs = {}
    for line in (KUBE / "secret.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def environment(daemonset: Manifest, configmap: Manifest, secret: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The container's environment as the kubelet builds it on a node, and the problems met building it.

    envFrom first, then env, later entries winning; $(NAME) in a value is replaced by
    a variable defined before it, $$ is a literal $. Values of fieldRef are those of
    FIELD_VALUES.
    """
    problems: list[str] = []
    (generator,) = kustomization(KUBE)["secretGenerator"]
    sources = {
        ("ConfigMap", configmap["metadata"]["name"]): configmap.get("data", {}),
        ("Secret", generator["name"]): secret,
    }
    env: dict[str, str] = {}
    spec = container(daemonset)
    for source in spec.get("envFrom", []):
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        ref = source["configMapRef" if kind == "ConfigMap" else "secretRef"]
        if (kind, ref["name"]) not in sources:
            problems.append(f"envFrom names {kind} {ref['name']!r}, which conf/kubernetes does not make")
            continue
        env.update({source.get("prefix", "") + k: v for k, v in sources[kind, ref["name"]].items()})

    def expand(value: str) -> str:
        def one(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name = match.group(1)
            if name not in env:
                problems.append(f"$({name}) refers to no variable defined before it")
                return match.group(0)
            return env[name]

        return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)

    for entry in spec.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(str(entry["value"]))
        elif "fieldRef" in entry.get("valueFrom", {}):
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in FIELD_VALUES:
                problems.append(f"{entry['name']} comes from {path}, which this test has no example value of")
                continue
            env[entry["name"]] = FIELD_VALUES[path]
        else:
            problems.append(f"{entry['name']}: a valueFrom this test cannot resolve: {entry.get('valueFrom')}")
    return env, problems


def settings_problems(daemonset: Manifest, configmap: Manifest, secret: dict[str, str]) -> list[str]:
    """Why llm-worker would not take the environment the manifests give it: typos, unused names, bad values."""
    env, problems = environment(daemonset, configmap, secret)
    known = {decl.env for decl in config.declarations()}
    values = [str(e.get("value", "")) for e in container(daemonset).get("env", [])]
    # A helper such as HOST_IP is there only to build another value from (OLLAMA_BASE_URL).
    helpers = {name for value in values for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value)}
    for name in sorted(env):
        if name in config.UNUSED_SETTINGS:
            problems.extend(config.unused_settings({name: env[name]}))
        elif name not in known | OTHER_VARIABLES | helpers:
            close = difflib.get_close_matches(name, sorted(known | OTHER_VARIABLES), n=1)
            hint = f"; did you mean {close[0]}?" if close else " (see `llm-worker check-config --table`)"
            problems.append(f"{name} is not an llm-worker setting{hint}")
    if problems:
        return problems
    try:
        config.load(env)
    except config.SettingError as exc:
        return [str(exc)]
    return []


def loaded(daemonset: Manifest, configmap: Manifest, secret: dict[str, str]) -> config.Settings:
    env, problems = environment(daemonset, configmap, secret)
    assert not problems, problems
    return config.load(env).settings


def probe_port(spec: Manifest, probe: Manifest) -> int | None:
    """The container port a probe's httpGet reaches: by name or by number."""
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in spec.get("ports", []) if p.get("name") == port), None)


# ---- Kubernetes accepts them ---------------------------------------------------------------


def kubernetes_problems(doc: Manifest) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(top)"
        return [f"{doc['kind']}/{doc['metadata'].get('name')}: {where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


@pytest.mark.parametrize(
    "path, doc",
    [(path, doc) for path, doc in RESOURCES if doc["kind"] != "PodMonitor"],
    ids=lambda value: named(value) if isinstance(value, Path) else value["kind"],
)
def test_kubernetes_accepts_the_manifest(path: Path, doc: Manifest) -> None:
    bundled = {".".join(v.split(".")[:2]) for v in all_versions()}
    assert KUBERNETES_VERSION in bundled, (
        f"kubernetes-validate {kubernetes_validate.__version__}: no {KUBERNETES_VERSION}"
    )
    assert kubernetes_problems(doc) == [], named(path)


def test_the_schema_check_would_catch_a_mistake() -> None:
    # Worth something only if a misspelt field, a wrong type or a missing field shows up.
    daemonset = the("DaemonSet")
    mistakes = {
        "livenesProbe": lambda c: c.update(livenesProbe=c.pop("livenessProbe")),
        "'3008' is not of type 'integer'": lambda c: c["ports"][0].update(containerPort="3008"),
        "readOnlyRootFileSystem": lambda c: c["securityContext"].update(readOnlyRootFileSystem=True),
        "'name' is a required property": lambda c: c.pop("name"),
    }
    for expected, break_it in mistakes.items():
        broken = copy.deepcopy(daemonset)
        break_it(container(broken))
        problems = kubernetes_problems(broken)
        assert problems and expected in problems[0], (expected, problems)


# ---- the PodMonitor, a custom resource ---------------------------------------------------

DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$|^0$"}
STRINGS = {"type": "array", "items": {"type": "string"}}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": STRINGS,
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                form
                for action in ("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep")
                + ("lowercase", "uppercase", "keepequal", "dropequal")
                for form in (action, action.capitalize())
            ]
            + ["HashMod", "LabelMap", "LabelDrop", "LabelKeep", "KeepEqual", "DropEqual"]
        },
    },
}
# monitoring.coreos.com/v1 PodMonitor: the fields these manifests use and their close
# neighbours, with the CRD's types; a field outside them is refused, as an API server
# with strict field validation refuses one the CRD lacks. Add a field here when a
# manifest starts to use it.
PODMONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": LABELS,
                "annotations": LABELS,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": LABELS,
                        "matchExpressions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["key", "operator"],
                                "properties": {
                                    "key": {"type": "string"},
                                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                    "values": STRINGS,
                                },
                            },
                        },
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": STRINGS},
                },
                "jobLabel": {"type": "string"},
                "podTargetLabels": STRINGS,
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": RELABEL},
                            "metricRelabelings": {"type": "array", "items": RELABEL},
                        },
                    },
                },
            },
        },
    },
}


def podmonitor_problems(doc: Manifest) -> list[str]:
    validator = jsonschema.Draft202012Validator(PODMONITOR_SCHEMA)
    return [
        f"PodMonitor: {'.'.join(str(p) for p in error.path) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", duration))


def test_the_podmonitor_is_well_formed() -> None:
    podmonitor = the("PodMonitor")
    assert podmonitor_problems(podmonitor) == []
    for endpoint in podmonitor["spec"]["podMetricsEndpoints"]:
        # The operator refuses a scrape timeout longer than the interval.
        assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"]), endpoint

    broken = copy.deepcopy(podmonitor)
    broken["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    broken["spec"]["podMetricsEndpoints"][0]["scrapeTimeout"] = "10 seconds"
    problems = podmonitor_problems(broken)
    assert any("'intervall' was unexpected" in p for p in problems), problems
    assert any("scrapeTimeout" in p and "does not match" in p for p in problems), problems


def test_the_podmonitor_scrapes_the_daemonsets_pods_on_its_metrics_port() -> None:
    daemonset, podmonitor = the("DaemonSet"), the("PodMonitor")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    wanted = podmonitor["spec"]["selector"].get("matchLabels", {})
    assert wanted and wanted.items() <= pod_labels.items(), f"PodMonitor selects {wanted}; the pods carry {pod_labels}"
    assert "matchExpressions" not in podmonitor["spec"]["selector"], "check matchExpressions here before using them"
    assert "namespaceSelector" not in podmonitor["spec"], "the PodMonitor looks in its own namespace, the DaemonSet's"
    ports = {p["name"]: p["containerPort"] for p in container(daemonset)["ports"] if "name" in p}
    port = loaded(daemonset, the("ConfigMap"), secret_example()).http.port
    for endpoint in podmonitor["spec"]["podMetricsEndpoints"]:
        assert endpoint.get("port") in ports, f"PodMonitor port {endpoint.get('port')!r}; the container names {ports}"
        assert ports[endpoint["port"]] == port, f"it scrapes {ports[endpoint['port']]}; llm-worker listens on {port}"
        assert endpoint.get("path", "/metrics") == "/metrics"
    # The overlay puts the PodMonitor in the namespace of everything else.
    assert kustomization(KUBE / "prometheus-operator")["namespace"] == kustomization(KUBE)["namespace"]


def test_the_annotations_name_the_metrics_port_for_annotation_based_scraping() -> None:
    daemonset = the("DaemonSet")
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    port = loaded(daemonset, the("ConfigMap"), secret_example()).http.port
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port), f"annotation port {annotations['prometheus.io/port']}"
    assert annotations["prometheus.io/path"] == "/metrics"


# ---- kustomize -------------------------------------------------------------------------------


KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "secretGenerator", "images", "labels"}


def test_the_kustomizations_apply_every_manifest_and_make_the_secret() -> None:
    base = kustomization(KUBE)
    overlay = kustomization(KUBE / "prometheus-operator")
    for k in (base, overlay):
        assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
        assert set(k) <= KUSTOMIZATION_KEYS, f"check {set(k) - KUSTOMIZATION_KEYS} here before using them"
    in_base = {path.name for path in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(base["resources"]) == sorted(in_base), "kustomization.yaml must list every manifest beside it"
    assert overlay["resources"] == ["..", "podmonitor.yaml"]

    # The Secret the DaemonSet reads is generated from secret.env, which stays out of git.
    (generator,) = base["secretGenerator"]
    refs = {e["secretRef"]["name"] for e in container(the("DaemonSet"))["envFrom"] if "secretRef" in e}
    assert refs == {generator["name"]}
    assert generator["envs"] == ["secret.env"] and (KUBE / "secret.env.example").is_file()
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "conf/kubernetes/secret.env" in ignored, "secret.env holds passwords: .gitignore must keep it out"

    # The image the kustomization sets is the one the DaemonSet names.
    image = container(the("DaemonSet"))["image"]
    assert image.rsplit(":", 1)[0] in {entry["name"] for entry in base["images"]}
    assert not image.endswith(":latest") and ":" in image, "a tag, so that a node pulls the image it was told"


# ---- llm-worker's settings ---------------------------------------------------------------------


def test_every_variable_the_manifests_set_is_an_llm_worker_setting_with_a_valid_value() -> None:
    assert settings_problems(the("DaemonSet"), the("ConfigMap"), secret_example()) == []


def test_a_misspelt_setting_or_a_bad_value_is_named() -> None:
    daemonset, configmap, secret = the("DaemonSet"), the("ConfigMap"), secret_example()

    def with_data(**changes: str) -> Manifest:
        broken = copy.deepcopy(configmap)
        broken["data"].update(changes)
        return broken

    assert settings_problems(daemonset, with_data(WORKER_POOL="llm-chat=2"), secret) == [
        "WORKER_POOL is not an llm-worker setting; did you mean WORKER_POOLS?"
    ]
    assert settings_problems(daemonset, with_data(HEALTH_CHECK_PORT="30o8"), secret) == [
        "HEALTH_CHECK_PORT='30o8': expected an integer from 0 to 65535"
    ]
    assert settings_problems(daemonset, with_data(METRICS_ENABLED="true"), secret) == config.unused_settings(
        {"METRICS_ENABLED": "true"}
    )
    broken = copy.deepcopy(daemonset)
    url = next(e for e in container(broken)["env"] if e["name"] == "OLLAMA_BASE_URL")
    url["value"] = "http://$(HOSTIP):11434"
    assert "$(HOSTIP) refers to no variable defined before it" in settings_problems(broken, configmap, secret)


def secret_problems(configmap: Manifest) -> list[str]:
    """Secret settings in the ConfigMap: only a URL (REDIS_URL) that leaves its password to REDIS_PASSWORD."""
    problems = []
    for decl in config.declarations():
        value = configmap["data"].get(decl.env)
        if not decl.secret or value is None:
            continue
        parts = urlsplit(value)
        if not parts.scheme or (not parts.netloc and parts.scheme != "unix"):
            problems.append(f"{decl.env} is a secret: put it in secret.env, not the ConfigMap")
        elif parts.password or "password=" in parts.query.lower():
            problems.append(f"{decl.env} carries a password: leave it out, and put it in secret.env as REDIS_PASSWORD")
    return problems


def test_secrets_come_from_the_secret_and_nothing_else_does() -> None:
    assert secret_problems(the("ConfigMap")) == []
    leaky = copy.deepcopy(the("ConfigMap"))
    leaky["data"].update(REDIS_URL="redis://:hunter2@redis:6379/0", ADMIN_TOKEN="hunter2")
    assert secret_problems(leaky) == [
        "REDIS_URL carries a password: leave it out, and put it in secret.env as REDIS_PASSWORD",
        "ADMIN_TOKEN is a secret: put it in secret.env, not the ConfigMap",
    ]
    secret_names = {decl.env for decl in config.declarations() if decl.secret}
    not_secret = set(secret_example()) - secret_names
    assert not not_secret, f"{sorted(not_secret)} are not secrets: put them in the ConfigMap"
    assert not secret_names & {e["name"] for e in container(the("DaemonSet")).get("env", []) if "value" in e}


def test_service_links_are_off() -> None:
    # A Service named "redis" in the namespace would set REDIS_PORT=tcp://...: a bad value for a setting.
    assert the("DaemonSet")["spec"]["template"]["spec"].get("enableServiceLinks") is False


def test_worker_id_is_the_node_name_and_one_pod_runs_per_node() -> None:
    daemonset = the("DaemonSet")
    env = {e["name"]: e for e in container(daemonset)["env"]}
    assert env["WORKER_ID"].get("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert "WORKER_ID" not in the("ConfigMap")["data"], "one WORKER_ID for all hosts: they would recover each other"
    settings = loaded(daemonset, the("ConfigMap"), secret_example())
    assert settings.worker.id == FIELD_VALUES["spec.nodeName"]  # a usual node name fits WORKER_ID's pattern
    # A surge would start a second supervisor under the node's WORKER_ID: it is refused, and two would share Ollama.
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0


def test_ollama_is_the_one_on_this_node() -> None:
    settings = loaded(the("DaemonSet"), the("ConfigMap"), secret_example())
    assert settings.ollama.base_url == f"http://{FIELD_VALUES['status.hostIP']}:11434"
    assert "OLLAMA_BASE_URL" not in the("ConfigMap")["data"], "each node has its own Ollama"


# ---- probes, draining, resources ----------------------------------------------------------------


def probe_problems(daemonset: Manifest, configmap: Manifest) -> list[str]:
    spec = container(daemonset)
    settings = loaded(daemonset, configmap, secret_example())
    problems = []
    ports = [p["containerPort"] for p in spec["ports"]]
    if settings.http.port not in ports:
        problems.append(f"HEALTH_CHECK_PORT is {settings.http.port}; the container's ports are {ports}")
    if settings.http.host not in ("0.0.0.0", "::"):
        problems.append(f"HEALTH_CHECK_HOST={settings.http.host}: the kubelet probes the pod's address")
    wanted = {"startupProbe": "/health/live", "livenessProbe": "/health/live", "readinessProbe": "/health/ready"}
    for kind, path in wanted.items():
        probe = spec.get(kind)
        if probe is None or "httpGet" not in probe:
            problems.append(f"{kind}: none, or not an httpGet")
            continue
        if probe["httpGet"].get("path") != path:
            problems.append(f"{kind} asks {probe['httpGet'].get('path')}; it must ask {path}")
        if probe_port(spec, probe) != settings.http.port:
            problems.append(f"{kind} asks port {probe['httpGet']['port']}; llm-worker listens on {settings.http.port}")
    live = spec.get("livenessProbe", {})
    # /health/live already waits LIVE_STALE seconds of a still loop before it says 503;
    # restarting after less than two such spans would kill a host on a passing stall.
    window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
    if window < 2 * LIVE_STALE:
        problems.append(f"liveness restarts after {window} s of failures; at least {2 * LIVE_STALE:g} s")
    return problems


def test_the_probes_ask_the_health_routes_on_the_port_llm_worker_listens_on() -> None:
    assert probe_problems(the("DaemonSet"), the("ConfigMap")) == []


def test_a_probe_on_the_wrong_port_or_route_is_named() -> None:
    daemonset, configmap = the("DaemonSet"), the("ConfigMap")
    moved = copy.deepcopy(configmap)
    moved["data"]["HEALTH_CHECK_PORT"] = "9100"
    problems = probe_problems(daemonset, moved)
    assert "HEALTH_CHECK_PORT is 9100; the container's ports are [3008]" in problems
    assert "livenessProbe asks port http-metrics; llm-worker listens on 9100" in problems

    broken = copy.deepcopy(daemonset)
    container(broken)["livenessProbe"]["httpGet"]["path"] = "/health/ready"  # would restart a host whose Redis is down
    container(broken)["livenessProbe"]["failureThreshold"] = 1
    assert probe_problems(broken, configmap) == [
        "livenessProbe asks /health/ready; it must ask /health/live",
        "liveness restarts after 10 s of failures; at least 20 s",
    ]


def grace_problems(daemonset: Manifest, configmap: Manifest) -> list[str]:
    pod = daemonset["spec"]["template"]["spec"]
    graceful_ms = loaded(daemonset, configmap, secret_example()).worker.graceful_timeout
    grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes's default
    needed = graceful_ms / 1000 + STOP_MARGIN_S
    problems = []
    if grace < needed:
        problems.append(
            f"terminationGracePeriodSeconds is {grace}; WORKER_GRACEFUL_TIMEOUT={graceful_ms} ms needs at least "
            f"{needed:g} s, or jobs in hand are SIGKILLed"
        )
    if "preStop" in container(daemonset).get("lifecycle", {}):
        problems.append("a preStop hook spends the grace period before SIGTERM reaches the supervisor")
    return problems


def test_sigterm_has_time_to_drain() -> None:
    assert grace_problems(the("DaemonSet"), the("ConfigMap")) == []
    longer = copy.deepcopy(the("ConfigMap"))
    longer["data"]["WORKER_GRACEFUL_TIMEOUT"] = "60000"
    assert grace_problems(the("DaemonSet"), longer) == [
        "terminationGracePeriodSeconds is 45; WORKER_GRACEFUL_TIMEOUT=60000 ms needs at least 70 s, "
        "or jobs in hand are SIGKILLed"
    ]


QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
SCALE: dict[str | None, float] = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
SCALE.update({f"{prefix}i": 2 ** (10 * n) for n, prefix in enumerate("KMGT", start=1)})


def quantity(text: str | int) -> float:
    match = QUANTITY.match(str(text))
    assert match, f"{text!r} is not a Kubernetes quantity of the forms used here (250m, 2, 256Mi)"
    return float(match.group(1)) * SCALE[match.group(2)]


def test_it_asks_for_cpu_and_memory_and_no_gpu() -> None:
    resources = container(the("DaemonSet"))["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, f"{kind}: {resources[kind]} (the GPUs are Ollama's)"
    for name in ("cpu", "memory"):
        assert quantity(resources["requests"][name]) <= quantity(resources["limits"][name]), name


# ---- non-root, and the Pod Security "restricted" profile ----------------------------------------


def test_it_runs_as_the_images_unprivileged_user() -> None:
    pod = the("DaemonSet")["spec"]["template"]["spec"]
    uid = re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid, "the Dockerfile makes its user with a fixed --uid"
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == int(uid.group(1)), "the Dockerfile's user, by number (runAsNonRoot needs one)"
    assert context["runAsGroup"] != 0


def test_the_pod_meets_the_restricted_pod_security_profile() -> None:
    namespace = the("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace["metadata"]["name"] == kustomization(KUBE)["namespace"]
    pod = the("DaemonSet")["spec"]["template"]["spec"]
    for shared in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(shared), f"{shared}: Ollama is reached at the node's address instead"
    assert all("hostPath" not in volume for volume in pod.get("volumes", []))
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False, "llm-worker never calls the Kubernetes API"
    assert the("ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == the("ServiceAccount")["metadata"]["name"]
    spec = container(the("DaemonSet"))
    context = spec["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and not context.get("privileged")
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    assert all("hostPort" not in port for port in spec["ports"])


def test_the_read_only_root_leaves_tmp_writable() -> None:
    # The host's cross-process lock is a temporary file (llm_worker/host/shm.py, tempfile.mkstemp).
    daemonset = the("DaemonSet")
    empty = {v["name"] for v in daemonset["spec"]["template"]["spec"]["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container(daemonset)["volumeMounts"]}
    assert mounts.get("/tmp") in empty, "an emptyDir on /tmp"


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from walk(child)


def test_no_manifest_holds_a_secret_value() -> None:
    secret_names = {decl.env for decl in config.declarations() if decl.secret}
    for path, doc in RESOURCES:
        for node in walk(doc):
            if isinstance(node, dict) and node.get("name") in secret_names:
                assert "value" not in node, f"{named(path)}: {node['name']} has a value; secrets go in secret.env"
