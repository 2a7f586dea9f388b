"""Checks the Kubernetes manifests under deploy/k8s: every YAML document parses; selectors match the pod
labels; Services reach the container ports, which are the services' default ports; every probe is gRPC
health on the container port; every container has requests and limits; the encoder Service is headless;
each autoscaler targets an existing Deployment; the FAISS StatefulSet keeps its claim at the image's data
dir; the kustomization lists files that exist.

Each check is a function that returns the problems it finds, so the tests at the end can show that a
broken manifest (a label that does not match, a wrong port, ...) is caught. kubectl is not needed; where
it is on PATH, `kubectl kustomize` also builds the default deployment.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from encoder_service.service import DEFAULT_PORT as ENCODER_PORT
from imgsearch.v1 import encoder_pb2, index_pb2
from index_service.service import DEFAULT_PORT as INDEX_PORT
from tests.support import DOCKERFILE, ROOT, dockerfile_stage

K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = "kustomization.yaml"
COMPOSE_FILE = ROOT / "docker-compose.yml"


@dataclass(frozen=True)
class Component:
    """What a container runs: the port it listens on (None for the CLI), its gRPC API's service name, its
    image's target in the root Dockerfile, the env var that sets its port; its Prometheus metrics port and
    that port's env var (docker-compose.yml's)."""

    port: int | None
    grpc_service: str | None
    target: str
    port_env: str | None
    metrics_port: int | None = None
    metrics_env: str | None = None


# By container name, which is also the service's name in docker-compose.yml.
COMPONENTS = {
    "encoder": Component(
        ENCODER_PORT,
        encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name,
        "encoder",
        "IMGSEARCH_ENCODER_PORT",
        9101,
        "IMGSEARCH_ENCODER_METRICS_PORT",
    ),
    "index": Component(
        INDEX_PORT,
        index_pb2.DESCRIPTOR.services_by_name["Index"].full_name,
        "index",
        "IMGSEARCH_INDEX_PORT",
        9102,
        "IMGSEARCH_INDEX_METRICS_PORT",
    ),
    "client": Component(None, None, "client", None),
}
POD_KINDS = ("Deployment", "StatefulSet", "Job")  # the workloads here, each with spec.template
SERVER_KINDS = ("Deployment", "StatefulSet")  # long-running: probes required
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@dataclass
class Manifest:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.doc.get("metadata", {}).get("name", ""))

    def __str__(self) -> str:
        return f"{self.path.name}: {self.kind}/{self.name}"


def stage_text(target: str) -> str:
    """The target's stage of the root Dockerfile, one instruction a line (continuations joined, no
    comments)."""
    return "\n".join(f"{keyword} {args}" for keyword, args in dockerfile_stage(target))


def built_image(target: str) -> str:
    """The image name the root Dockerfile's header gives the target: `docker build --target T -t NAME`."""
    built = re.search(rf"docker build --target {re.escape(target)}\s+-t (\S+)", DOCKERFILE.read_text())
    assert built, f"{DOCKERFILE}: no `docker build --target {target} -t NAME` line"
    return built.group(1)


def load_manifests(directory: Path = K8S_DIR) -> list[Manifest]:
    """Every non-empty YAML document of every .yaml file but the kustomization, in file order."""
    manifests = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == KUSTOMIZATION:
            continue
        with path.open() as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
                    manifests.append(Manifest(path, doc))
    return manifests


@pytest.fixture(scope="module")
def manifests() -> list[Manifest]:
    return load_manifests()


# Accessors.


def of_kind(manifests: list[Manifest], *kinds: str) -> list[Manifest]:
    return [m for m in manifests if m.kind in kinds]


def same_file(manifests: list[Manifest], m: Manifest, *kinds: str) -> list[Manifest]:
    return [other for other in of_kind(manifests, *kinds) if other.path == m.path]


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec = workload.doc["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def pod_labels(workload: Manifest) -> dict[str, str]:
    return dict(workload.doc["spec"]["template"].get("metadata", {}).get("labels") or {})


def containers(workload: Manifest) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def container_ports(container: dict[str, Any]) -> list[dict[str, Any]]:
    return list(container.get("ports") or [])


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def seconds(duration: str) -> int:
    """Compose's "1m30s" style durations, in whole seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "2", "256Mi", "1Gi", "4G") as a number."""
    text = str(value)
    suffixes = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match and match.group(2) in ("", *suffixes), f"not a quantity: {text!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


# The checks: each returns a list of problems, empty when all is well.


def check_documents(manifests: list[Manifest]) -> list[str]:
    problems = []
    seen: set[tuple[Path, str, str]] = set()
    for m in manifests:
        if not m.doc.get("apiVersion") or not m.kind or not m.name:
            problems.append(f"{m}: needs apiVersion, kind and metadata.name")
        if (m.path, m.kind, m.name) in seen:
            problems.append(f"{m}: twice in one file")
        seen.add((m.path, m.kind, m.name))
        if "namespace" in m.doc.get("metadata", {}):
            problems.append(f"{m}: a fixed namespace (leave it to kubectl -n)")
    return problems


def check_selectors(manifests: list[Manifest]) -> list[str]:
    """Each Deployment's and StatefulSet's selector picks out its own pod template."""
    problems = []
    for workload in of_kind(manifests, *SERVER_KINDS):
        selector = workload.doc["spec"].get("selector") or {}
        if set(selector) - {"matchLabels"}:
            problems.append(f"{workload}: only matchLabels selectors are checked here")
        match_labels = selector.get("matchLabels") or {}
        if not selects(match_labels, pod_labels(workload)):
            problems.append(f"{workload}: selector {match_labels} does not match its pod labels")
    return problems


def services_targets(manifests: list[Manifest], service: Manifest) -> list[Manifest]:
    """The workloads of the Service's file whose pods it selects (the files are alternatives)."""
    selector = service.doc["spec"].get("selector") or {}
    return [w for w in same_file(manifests, service, *POD_KINDS) if selects(selector, pod_labels(w))]


def check_services(manifests: list[Manifest]) -> list[str]:
    """Each Service selects a workload of its file, is headless (so dns:/// round_robin sees every pod),
    and its ports lead to that workload's container port, the service's default port."""
    problems = []
    for service in of_kind(manifests, "Service"):
        spec = service.doc["spec"]
        targets = services_targets(manifests, service)
        if not targets:
            problems.append(f"{service}: selector {spec.get('selector')} matches no workload's pods")
        if spec.get("clusterIP") != "None":
            problems.append(f"{service}: not headless (clusterIP: None)")
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for workload in targets:
                matched = [
                    (container["name"], p["containerPort"])
                    for container in containers(workload)
                    for p in container_ports(container)
                    if target in (p["containerPort"], p.get("name"))
                ]
                if len(matched) != 1:
                    problems.append(f"{service}: targetPort {target!r} is not one port of {workload}")
                    continue
                container_name, container_port = matched[0]
                expected = COMPONENTS[container_name].port if container_name in COMPONENTS else None
                if port.get("port") != container_port or container_port != expected:
                    problems.append(
                        f"{service}: port {port.get('port')} -> {container_port} in {workload}; "
                        f"the {container_name} service listens on {expected}"
                    )
    return problems


def check_containers(manifests: list[Manifest]) -> list[str]:
    """Known containers, images as the Dockerfile's header names them, ports and port env vars as the services
    read them."""
    problems = []
    for workload in of_kind(manifests, *POD_KINDS):
        for container in containers(workload):
            name = container.get("name")
            component = COMPONENTS.get(str(name))
            if component is None:
                problems.append(f"{workload}: container {name!r} is none of {sorted(COMPONENTS)}")
                continue
            image = str(container.get("image", ""))
            repository, _, tag = image.rpartition(":")
            built = built_image(component.target)
            if repository.rpartition("/")[2] != built or not tag or tag == "latest":
                problems.append(f"{workload}: image {image!r}: want {built}:TAG, a pinned tag")
            ports = [p["containerPort"] for p in container_ports(container)]
            expected = [port for port in (component.port, component.metrics_port) if port is not None]
            if ports != expected:
                problems.append(f"{workload}: {name} ports {ports}, its service listens on {expected}")
            env = env_of(container)
            if component.port_env and env.get(component.port_env, str(component.port)) != str(component.port):
                problems.append(f"{workload}: {component.port_env}={env[component.port_env]}")
    return problems


def check_metrics(manifests: list[Manifest]) -> list[str]:
    """Each server container serves metrics on its port (the env var set, the port named `metrics`), and
    its pods carry the prometheus.io annotations that point a pod-discovering Prometheus at it."""
    problems = []
    for workload in of_kind(manifests, *SERVER_KINDS):
        annotations = workload.doc["spec"]["template"].get("metadata", {}).get("annotations") or {}
        for container in containers(workload):
            component = COMPONENTS.get(str(container.get("name")))
            if component is None or component.metrics_port is None:
                continue
            port = component.metrics_port
            if env_of(container).get(str(component.metrics_env)) != str(port):
                problems.append(f"{workload}: {container['name']} sets no {component.metrics_env}={port}")
            named = [p["containerPort"] for p in container_ports(container) if p.get("name") == "metrics"]
            if named != [port]:
                problems.append(f"{workload}: {container['name']} names no port `metrics` {port}")
            wanted = {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(port),
                "prometheus.io/path": "/metrics",
            }
            if {key: str(annotations.get(key)) for key in wanted} != wanted:
                problems.append(f"{workload}: pod annotations {annotations}, want {wanted}")
    return problems


def check_probes(manifests: list[Manifest]) -> list[str]:
    """Every server container has startup, readiness and liveness probes, each gRPC health on its port,
    asking for the whole server ("") or its API's service name."""
    problems = []
    for workload in of_kind(manifests, *SERVER_KINDS):
        for container in containers(workload):
            component = COMPONENTS.get(str(container.get("name")))
            if component is None or component.port is None:
                continue
            ports = {p["containerPort"] for p in container_ports(container)}
            for kind in PROBES:
                probe = container.get(kind)
                if probe is None:
                    problems.append(f"{workload}: {container['name']} has no {kind}")
                    continue
                handlers = set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"}
                if handlers != {"grpc"}:
                    problems.append(f"{workload}: {kind} uses {sorted(handlers)}, not grpc alone")
                    continue
                grpc = probe["grpc"]
                if grpc.get("port") not in ports or grpc.get("port") != component.port:
                    problems.append(f"{workload}: {kind} probes port {grpc.get('port')}, not {ports}")
                if grpc.get("service", "") not in ("", component.grpc_service):
                    problems.append(f"{workload}: {kind} asks for unknown service {grpc['service']!r}")
    return problems


def check_resources(manifests: list[Manifest]) -> list[str]:
    """Every container requests and limits CPU and memory, requests no more than its limits."""
    problems = []
    for workload in of_kind(manifests, *POD_KINDS):
        for container in containers(workload):
            resources = container.get("resources") or {}
            for resource in ("cpu", "memory"):
                request = (resources.get("requests") or {}).get(resource)
                limit = (resources.get("limits") or {}).get(resource)
                if request is None or limit is None:
                    problems.append(f"{workload}: {container['name']} lacks a {resource} request or limit")
                elif quantity(request) > quantity(limit):
                    problems.append(
                        f"{workload}: {container['name']} requests more {resource} than its limit"
                    )
    return problems


def check_security(manifests: list[Manifest]) -> list[str]:
    """Non-root as the images' user; no privilege escalation; a read-only root with a writable /tmp."""
    problems = []
    for workload in of_kind(manifests, *POD_KINDS):
        pod = pod_spec(workload).get("securityContext") or {}
        for container in containers(workload):
            component = COMPONENTS.get(str(container.get("name")))
            user = re.findall(r"^USER (\d+)", stage_text(component.target), re.M) if component else []
            context = {**pod, **(container.get("securityContext") or {})}
            if context.get("runAsNonRoot") is not True or [str(context.get("runAsUser"))] != user[-1:]:
                problems.append(f"{workload}: {container['name']} must run as non-root uid {user[-1:]}")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{workload}: {container['name']} allows privilege escalation")
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts") or []}
            if context.get("readOnlyRootFilesystem") and "/tmp" not in mounts:
                problems.append(f"{workload}: {container['name']} has a read-only root and no /tmp")
    return problems


def check_autoscalers(manifests: list[Manifest]) -> list[str]:
    """Each HPA (autoscaling/v2) scales a Deployment of its file whose containers request CPU."""
    problems = []
    for hpa in of_kind(manifests, "HorizontalPodAutoscaler"):
        spec = hpa.doc["spec"]
        ref = spec.get("scaleTargetRef") or {}
        targets = [
            d
            for d in same_file(manifests, hpa, "Deployment")
            if ref.get("kind") == "Deployment" and ref.get("name") == d.name
        ]
        if hpa.doc.get("apiVersion") != "autoscaling/v2":
            problems.append(f"{hpa}: apiVersion {hpa.doc.get('apiVersion')}, want autoscaling/v2")
        if not targets or ref.get("apiVersion") != "apps/v1":
            problems.append(f"{hpa}: scaleTargetRef {ref} names no Deployment here")
        if not 1 <= spec.get("minReplicas", 1) <= spec.get("maxReplicas", 0):
            problems.append(f"{hpa}: needs 1 <= minReplicas <= maxReplicas")
        for deployment in targets:
            for container in containers(deployment):
                if "cpu" not in (container.get("resources") or {}).get("requests", {}):
                    problems.append(f"{hpa}: {container['name']} requests no CPU to measure against")
    return problems


def image_data_dir() -> str:
    """The data dir the index image uses: its ENV IMGSEARCH_DATA_DIR, which is also its VOLUME."""
    text = stage_text(COMPONENTS["index"].target)
    env = re.findall(r"IMGSEARCH_DATA_DIR=(\S+)", text)
    assert env, "the index image sets no IMGSEARCH_DATA_DIR"
    assert re.search(rf"^VOLUME {re.escape(env[-1])}$", text, re.M), "its data dir is not its VOLUME"
    return env[-1]


def check_statefulsets(manifests: list[Manifest]) -> list[str]:
    """Each StatefulSet: one replica (FAISS owns its data dir), a headless governing Service, a claim
    mounted at the image's data dir, the volume writable by the image's group."""
    problems = []
    data_dir = image_data_dir()
    for sts in of_kind(manifests, "StatefulSet"):
        spec = sts.doc["spec"]
        if spec.get("replicas") != 1:
            problems.append(f"{sts}: replicas {spec.get('replicas')}, the FAISS index allows one")
        governing = [s for s in same_file(manifests, sts, "Service") if s.name == spec.get("serviceName")]
        if not governing or sts not in services_targets(manifests, governing[0]):
            problems.append(f"{sts}: serviceName {spec.get('serviceName')!r} is no Service of its pods")
        claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
        index = [c for c in containers(sts) if c.get("name") == "index"]
        mounts = {m["name"]: m["mountPath"] for c in index for m in c.get("volumeMounts") or []}
        if not any(mounts.get(claim) == data_dir for claim in claims):
            problems.append(f"{sts}: no volumeClaimTemplate mounted at {data_dir}")
        for container in index:
            env = env_of(container)
            if env.get("IMGSEARCH_DATA_DIR", data_dir) != data_dir:
                problems.append(f"{sts}: IMGSEARCH_DATA_DIR={env['IMGSEARCH_DATA_DIR']}, mounted {data_dir}")
            if env.get("IMGSEARCH_INDEX_BACKEND", "faiss") != "faiss":
                problems.append(f"{sts}: a StatefulSet is for the faiss backend")
        if pod_spec(sts).get("securityContext", {}).get("fsGroup") is None:
            problems.append(f"{sts}: no fsGroup, the volume may not be writable by the image's user")
    return problems


def check_grace_periods(manifests: list[Manifest]) -> list[str]:
    """Server pods get as long to stop as docker-compose.yml gives the same service."""
    with COMPOSE_FILE.open() as f:
        compose = yaml.safe_load(f)
    problems = []
    for workload in of_kind(manifests, *SERVER_KINDS):
        for container in containers(workload):
            name = container.get("name")
            grace = compose["services"].get(name, {}).get("stop_grace_period")
            if grace is None:
                continue
            got = pod_spec(workload).get("terminationGracePeriodSeconds")
            if got != seconds(grace):
                problems.append(f"{workload}: terminationGracePeriodSeconds {got}, compose gives {grace}")
    return problems


def check_kustomization(directory: Path = K8S_DIR) -> list[str]:
    """The default kustomization lists files that exist: the encoder and the FAISS index."""
    with (directory / KUSTOMIZATION).open() as f:
        kustomization = yaml.safe_load(f)
    resources = list(kustomization.get("resources") or [])
    problems = [f"{KUSTOMIZATION}: {r} does not exist" for r in resources if not (directory / r).is_file()]
    if sorted(resources) != ["encoder.yaml", "index-faiss.yaml"]:
        problems.append(f"{KUSTOMIZATION}: resources {resources}, want encoder.yaml and index-faiss.yaml")
    images = set()
    for workload in of_kind(load_manifests(directory), *POD_KINDS):
        images |= {str(c.get("image", "")).rpartition(":")[0] for c in containers(workload)}
    for entry in kustomization.get("images") or []:
        if entry.get("name") not in images:
            problems.append(f"{KUSTOMIZATION}: image {entry.get('name')} is used by no manifest")
    return problems


MANIFEST_CHECKS: list[Callable[[list[Manifest]], list[str]]] = [
    check_documents,
    check_selectors,
    check_services,
    check_containers,
    check_metrics,
    check_probes,
    check_resources,
    check_security,
    check_autoscalers,
    check_statefulsets,
    check_grace_periods,
]


# The manifests as they are.


def test_there_are_manifests(manifests: list[Manifest]) -> None:
    names = {path.name for path in K8S_DIR.glob("*.yaml")}
    assert {"encoder.yaml", "index-faiss.yaml", "index-milvus.yaml", KUSTOMIZATION} <= names
    kinds = {(m.path.name, m.kind) for m in manifests}
    assert {
        ("encoder.yaml", "Deployment"),
        ("encoder.yaml", "Service"),
        ("encoder.yaml", "HorizontalPodAutoscaler"),
        ("index-faiss.yaml", "StatefulSet"),
        ("index-faiss.yaml", "Service"),
        ("index-milvus.yaml", "Deployment"),
        ("index-milvus.yaml", "Service"),
        ("index-milvus.yaml", "HorizontalPodAutoscaler"),
    } <= kinds


@pytest.mark.parametrize("check", MANIFEST_CHECKS, ids=lambda check: check.__name__)
def test_manifests_pass(manifests: list[Manifest], check: Callable[[list[Manifest]], list[str]]) -> None:
    assert check(manifests) == []


def test_kustomization_lists_files_that_exist() -> None:
    assert check_kustomization() == []


def test_encoder_service_is_headless(manifests: list[Manifest]) -> None:
    encoder = [s for s in of_kind(manifests, "Service") if s.name == "encoder"]
    assert len(encoder) == 1 and encoder[0].doc["spec"]["clusterIP"] == "None"
    assert [w.kind for w in services_targets(manifests, encoder[0])] == ["Deployment"]


def test_index_variants_set_their_backend(manifests: list[Manifest]) -> None:
    (faiss,) = [m for m in of_kind(manifests, "StatefulSet") if m.path.name == "index-faiss.yaml"]
    (milvus,) = [m for m in of_kind(manifests, "Deployment") if m.path.name == "index-milvus.yaml"]
    assert env_of(next(containers(faiss)))["IMGSEARCH_INDEX_BACKEND"] == "faiss"
    env = env_of(next(containers(milvus)))
    assert env["IMGSEARCH_INDEX_BACKEND"] == "milvus"
    assert re.fullmatch(r"https?://[a-z0-9.-]+:19530", env["IMGSEARCH_MILVUS_URI"]), env
    assert env["IMGSEARCH_MILVUS_COLLECTION"]
    assert "volumeClaimTemplates" not in milvus.doc["spec"], "the milvus backend holds no state"
    # Both variants are reached the same way by clients: the Service `index`.
    assert {s.name for s in of_kind(manifests, "Service") if s.path.name.startswith("index-")} == {"index"}


def test_client_job_reaches_both_services(manifests: list[Manifest]) -> None:
    (job,) = of_kind(manifests, "Job")
    env = env_of(next(containers(job)))
    services = {s.name: s.doc["spec"]["ports"][0]["port"] for s in of_kind(manifests, "Service")}
    assert env["IMGSEARCH_ENCODER"] == f"dns:///encoder:{services['encoder']}"
    assert env["IMGSEARCH_INDEX"] == f"dns:///index:{services['index']}"


def test_readme_names_every_manifest() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    for path in K8S_DIR.glob("*.yaml"):
        assert f"`{path.name}`" in readme, path.name


def test_kubectl_kustomize_builds_the_default(manifests: list[Manifest]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout) if d}
    listed = {(m.kind, m.name) for m in manifests if m.path.name in ("encoder.yaml", "index-faiss.yaml")}
    assert built == listed


# The checks catch mistakes: each change below, made to a copy of the manifests, must be reported.


def find(manifests: list[Manifest], file: str, kind: str) -> dict[str, Any]:
    (match,) = [m.doc for m in manifests if m.path.name == file and m.kind == kind]
    return match


def first_container(doc: dict[str, Any]) -> dict[str, Any]:
    container = doc["spec"]["template"]["spec"]["containers"][0]
    assert isinstance(container, dict)
    return container


def relabel_encoder_pods(ms: list[Manifest]) -> None:
    find(ms, "encoder.yaml", "Deployment")["spec"]["template"]["metadata"]["labels"][
        "app.kubernetes.io/component"
    ] = "encoder-v2"


def retarget_index_service(ms: list[Manifest]) -> None:
    find(ms, "index-faiss.yaml", "Service")["spec"]["ports"][0]["targetPort"] = 50099


def move_index_port(ms: list[Manifest]) -> None:
    first_container(find(ms, "index-milvus.yaml", "Deployment"))["ports"][0]["containerPort"] = 50062


def http_probe(ms: list[Manifest]) -> None:
    first_container(find(ms, "encoder.yaml", "Deployment"))["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": 50051}
    }


def unannotated_index(ms: list[Manifest]) -> None:
    del find(ms, "index-milvus.yaml", "Deployment")["spec"]["template"]["metadata"]["annotations"]


def metrics_port_elsewhere(ms: list[Manifest]) -> None:
    first_container(find(ms, "encoder.yaml", "Deployment"))["ports"][1]["containerPort"] = 9200


def probe_wrong_port(ms: list[Manifest]) -> None:
    first_container(find(ms, "index-faiss.yaml", "StatefulSet"))["readinessProbe"]["grpc"]["port"] = 50051


def drop_limits(ms: list[Manifest]) -> None:
    del first_container(find(ms, "index-milvus.yaml", "Deployment"))["resources"]["limits"]


def not_headless(ms: list[Manifest]) -> None:
    del find(ms, "encoder.yaml", "Service")["spec"]["clusterIP"]


def hpa_wrong_target(ms: list[Manifest]) -> None:
    find(ms, "encoder.yaml", "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] = "encoders"


def claim_elsewhere(ms: list[Manifest]) -> None:
    first_container(find(ms, "index-faiss.yaml", "StatefulSet"))["volumeMounts"][0]["mountPath"] = "/var/data"


def no_governing_service(ms: list[Manifest]) -> None:
    find(ms, "index-faiss.yaml", "StatefulSet")["spec"]["serviceName"] = "index-headless"


def run_as_root(ms: list[Manifest]) -> None:
    find(ms, "encoder.yaml", "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0


def short_grace(ms: list[Manifest]) -> None:
    find(ms, "index-faiss.yaml", "StatefulSet")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ] = 5


@pytest.mark.parametrize(
    "mutate,check",
    [
        (relabel_encoder_pods, check_selectors),
        (relabel_encoder_pods, check_services),
        (retarget_index_service, check_services),
        (move_index_port, check_containers),
        (move_index_port, check_services),
        (http_probe, check_probes),
        (unannotated_index, check_metrics),
        (metrics_port_elsewhere, check_metrics),
        (metrics_port_elsewhere, check_containers),
        (probe_wrong_port, check_probes),
        (drop_limits, check_resources),
        (not_headless, check_services),
        (hpa_wrong_target, check_autoscalers),
        (claim_elsewhere, check_statefulsets),
        (no_governing_service, check_statefulsets),
        (run_as_root, check_security),
        (short_grace, check_grace_periods),
    ],
    ids=lambda f: str(f.__name__),
)
def test_a_broken_manifest_is_caught(
    manifests: list[Manifest],
    mutate: Callable[[list[Manifest]], None],
    check: Callable[[list[Manifest]], list[str]],
) -> None:
    broken = copy.deepcopy(manifests)
    mutate(broken)
    assert check(broken), f"{check.__name__} missed {mutate.__name__}"


def test_a_missing_kustomization_resource_is_caught(tmp_path: Path) -> None:
    for path in K8S_DIR.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "index-faiss.yaml").unlink()
    assert any("does not exist" in problem for problem in check_kustomization(tmp_path))
