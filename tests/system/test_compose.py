"""Checks docker-compose.yml, the root Dockerfile (one builder stage, a target per image) and the
imgsearch_server.healthcheck probe the images use."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imgsearch_server import healthcheck
from tests.support import DOCKERFILE, ROOT, dockerfile_stage, dockerfile_stages

COMPOSE_FILE = ROOT / "docker-compose.yml"
SECURE_FILE = ROOT / "docker-compose.secure.yml"
HEALTHCHECK_MODULE = "imgsearch_server.healthcheck"
# service -> (the pip extra its image installs, the container port it listens on; None for the CLI)
SERVICES: dict[str, tuple[str, int | None]] = {
    "encoder": ("encoder", 50051),
    "index": ("index", 50052),
    "client": ("client", None),
    "web": ("web", 8080),  # HTTP; its image: test_web_dockerfile
}


def load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        loaded = yaml.safe_load(f)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE_FILE)


@pytest.fixture(scope="module")
def secure() -> dict[str, Any]:
    return load(SECURE_FILE)


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    spec = compose["services"][name]
    assert isinstance(spec, dict)
    return spec


def with_defaults(text: str) -> str:
    """Returns `text` with each ${VAR:-default} (or ${VAR-default}) replaced by its default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Returns `text` with each ${VAR:-default} replaced as Compose does: by env[VAR] when set and not
    empty, else by the default."""

    def value(match: re.Match[str]) -> str:
        return env.get(match.group(1)) or match.group(2)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", value, text)


def volume_mounts(spec: dict[str, Any]) -> set[tuple[str, str]]:
    """(source, target) of each of a service's volumes, short or long form."""
    mounts = set()
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            mounts.add((volume["source"], volume["target"]))
        else:
            source, target = with_defaults(str(volume)).split(":")[:2]
            mounts.add((source, target))
    return mounts


def build_target(spec: dict[str, Any]) -> tuple[Path, str]:
    """(the Dockerfile, its target) a service's image is built from: the root Dockerfile, context the root."""
    build = spec["build"]
    assert isinstance(build, dict), f"build: {build!r}: name the target"
    assert build.get("context") == ".", "the context is the repo root"
    assert "target" in build, "build: name the Dockerfile's target"
    return ROOT / build["context"] / build.get("dockerfile", "Dockerfile"), str(build["target"])


def exec_form(args: str) -> list[str]:
    """Returns the JSON array of an exec-form instruction; fails for shell form."""
    parsed = json.loads(args)
    assert isinstance(parsed, list) and parsed and all(isinstance(a, str) for a in parsed), args
    return parsed


def test_services_exist(compose: dict[str, Any]) -> None:
    assert set(SERVICES) <= set(compose["services"])


@pytest.mark.parametrize("name", ["encoder", "index"])
def test_healthcheck_uses_grpc_health_probe(compose: dict[str, Any], name: str) -> None:
    test = service(compose, name)["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", test
    assert test[1:4] == ["python", "-m", HEALTHCHECK_MODULE], test
    assert test[4] == f"localhost:{SERVICES[name][1]}", test


def test_encoder_scales(compose: dict[str, Any]) -> None:
    encoder = service(compose, "encoder")
    assert "ports" not in encoder, "a host port would stop `--scale encoder=N`"
    assert "container_name" not in encoder, "a fixed name would stop `--scale encoder=N`"
    assert [str(p) for p in encoder["expose"]] == ["50051", "9101"]  # gRPC, metrics


def test_index_publishes_port_and_keeps_data_in_named_volume(compose: dict[str, Any]) -> None:
    index = service(compose, "index")
    published = set()
    for port in index["ports"]:
        if isinstance(port, dict):
            published.add((str(port.get("published")), str(port["target"])))
        else:
            host, _, container = with_defaults(str(port)).rpartition(":")
            published.add((host.rpartition(":")[2], container.split("/")[0]))
    assert ("50052", "50052") in published

    assert ("index-data", "/data") in volume_mounts(index)
    assert "index-data" in compose["volumes"]


# The milvus profile: Milvus standalone with its etcd and MinIO, and the index scaled over it.

# service -> its image: pinned upstream releases that go together (those of Milvus's own
# deployments/docker/standalone/docker-compose.yml for Milvus 2.5), never `latest`.
MILVUS_PROFILE = {
    "etcd": r"quay\.io/coreos/etcd:v3\.5\.\d+",
    "minio": r"minio/minio:RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z",
    "milvus": r"milvusdb/milvus:v2\.5\.\d+",
}


def test_the_default_project_is_unchanged(compose: dict[str, Any]) -> None:
    """`docker compose up` without a profile starts the two services and the web gateway, and none waits for
    a service that only a profile has (Compose would refuse the project)."""
    always = {name for name, spec in compose["services"].items() if not spec.get("profiles")}
    assert always == {"encoder", "index", "web"}
    for name in compose["services"]:
        spec = service(compose, name)
        if not spec.get("profiles"):
            assert set(spec.get("depends_on", {})) <= always, name
    index = service(compose, "index")
    assert with_defaults(index["environment"]["IMGSEARCH_INDEX_BACKEND"]) == "faiss"
    assert with_defaults(str(index["deploy"]["replicas"])) == "1"
    assert with_defaults(index["environment"]["IMGSEARCH_DATA_DIR"]) == "/data"


@pytest.mark.parametrize("name", list(MILVUS_PROFILE))
def test_milvus_profile_service(compose: dict[str, Any], name: str) -> None:
    spec = service(compose, name)
    assert spec["profiles"] == ["milvus"]
    assert re.fullmatch(MILVUS_PROFILE[name], spec["image"]), f"{name}: pin a release: {spec['image']}"
    assert "container_name" not in spec, "a fixed name clashes with another project's"
    test = spec["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", test
    mounts = volume_mounts(spec)
    assert mounts, f"{name}: keeps its data in a volume"
    assert {source for source, _ in mounts} <= set(compose["volumes"]), "named volumes, not host paths"
    assert spec["restart"] == "unless-stopped"


def test_milvus_runs_standalone_once_etcd_and_minio_are_healthy(compose: dict[str, Any]) -> None:
    milvus = service(compose, "milvus")
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert "http://localhost:9091/healthz" in milvus["healthcheck"]["test"]
    assert isinstance(milvus["depends_on"], dict), "list form cannot wait for health"
    assert {name: dep["condition"] for name, dep in milvus["depends_on"].items()} == {
        "etcd": "service_healthy",
        "minio": "service_healthy",
    }
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "minio:9000"
    assert "-listen-client-urls=http://0.0.0.0:2379" in service(compose, "etcd")["command"]
    assert ("milvus-data", "/var/lib/milvus") in volume_mounts(milvus)
    # Only Milvus is published, and on the host's loopback; MinIO and etcd stay on the project's network.
    assert [with_defaults(str(port)) for port in milvus["ports"]] == ["127.0.0.1:19530:19530"]
    assert "ports" not in service(compose, "etcd") and "ports" not in service(compose, "minio")


def test_index_scales_under_the_milvus_profile(compose: dict[str, Any]) -> None:
    index = service(compose, "index")
    assert "container_name" not in index, "a fixed name would stop `--scale index=N`"
    (port,) = index["ports"]
    assert interpolate(port, {}) == "127.0.0.1:50052:50052"
    # A range gives each replica one host port of it.
    assert interpolate(port, {"IMGSEARCH_INDEX_HOST_PORT": "50052-50054"}) == "127.0.0.1:50052-50054:50052"
    assert interpolate(str(index["deploy"]["replicas"]), {"IMGSEARCH_INDEX_REPLICAS": "3"}) == "3"
    # Named volumes only: every replica may mount them (with milvus nothing is written there).
    assert {source for source, _ in volume_mounts(index)} <= set(compose["volumes"])


@pytest.mark.parametrize(
    "variable,default",
    [
        ("IMGSEARCH_INDEX_BACKEND", "faiss"),
        ("IMGSEARCH_MILVUS_URI", "http://milvus:19530"),
        ("IMGSEARCH_MILVUS_COLLECTION", "imgsearch"),
    ],
)
def test_index_backend_settings_pass_through(compose: dict[str, Any], variable: str, default: str) -> None:
    environment = service(compose, "index")["environment"]
    assert environment[variable] == f"${{{variable}:-{default}}}"


def test_the_milvus_uri_names_the_profiles_milvus(compose: dict[str, Any]) -> None:
    uri = urlsplit(with_defaults(service(compose, "index")["environment"]["IMGSEARCH_MILVUS_URI"]))
    assert uri.hostname in compose["services"], f"{uri.hostname}: no such service"
    milvus = service(compose, str(uri.hostname))
    assert milvus["profiles"] == ["milvus"]
    assert str(uri.port) in [with_defaults(str(port)).rpartition(":")[2] for port in milvus["ports"]]


def test_the_header_says_how_to_run_the_milvus_profile() -> None:
    header = "\n".join(
        line for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#") or not line
    )
    for text in [
        "--profile milvus",
        "--scale index=3",
        "IMGSEARCH_INDEX_BACKEND=milvus",
        "IMGSEARCH_INDEX_HOST_PORT=50052-50054",
        "COMPOSE_PROFILES=milvus",
        "IMGSEARCH_INDEX_REPLICAS",
        "IMGSEARCH_MILVUS_URI",
        "IMGSEARCH_MILVUS_COLLECTION",
        "IMGSEARCH_MILVUS_HOST_PORT",
        "Start-up order",
    ]:
        assert text in header, text


def test_client_is_on_demand_and_waits_for_healthy_services(compose: dict[str, Any]) -> None:
    client = service(compose, "client")
    assert client["profiles"], "the client should start only when asked for"
    depends_on = client["depends_on"]
    assert isinstance(depends_on, dict), "list form cannot wait for health"
    for name in ("encoder", "index"):
        assert depends_on[name]["condition"] == "service_healthy"
    environment = client["environment"]
    assert environment["IMGSEARCH_ENCODER"] == "dns:///encoder:50051"
    assert environment["IMGSEARCH_INDEX"] == "dns:///index:50052", "round_robin over every index replica"
    targets = [with_defaults(str(v)).split(":")[1] for v in client["volumes"] if isinstance(v, str)]
    assert "/images" in targets


@pytest.mark.parametrize("name", list(SERVICES))
def test_each_image_is_a_target_of_the_root_dockerfile(compose: dict[str, Any], name: str) -> None:
    dockerfile, target = build_target(service(compose, name))
    assert dockerfile == DOCKERFILE and dockerfile.is_file(), dockerfile
    assert target == name
    steps = dockerfile_stage(target)
    assert steps[0] == ("FROM", f"python:3.11-slim AS {target}")
    # the wheels come from the shared builder stage, and only from there
    sources = {args.split()[0] for keyword, args in steps if keyword == "COPY" and args.startswith("--from=")}
    assert sources == {"--from=builder"}, sources


def test_the_builder_stage_is_shared() -> None:
    """One builder stage: the stubs, the project's wheel into /wheels and the client-only wheel into
    /client-wheels; the four images' targets after it."""
    stages = dockerfile_stages()
    assert list(stages) == ["builder", *SERVICES]
    builder = stages["builder"]
    assert builder[0] == ("FROM", "python:3.11-slim AS builder")
    run = " ".join(args for keyword, args in builder if keyword == "RUN")
    assert "grpc_tools.protoc" in run and "-c constraints.txt" in run
    assert "pip wheel --no-deps --wheel-dir /wheels ." in run
    assert "client/build_wheel.py --wheel-dir /client-wheels" in run
    runtime = [args for name in SERVICES for keyword, args in stages[name] if keyword == "RUN"]
    assert not any("protoc" in args or "pip wheel" in args for args in runtime), "built once, in the builder"


@pytest.mark.parametrize("name", [name for name in SERVICES if name != "web"])
def test_dockerfile(compose: dict[str, Any], name: str) -> None:
    extra, port = SERVICES[name]
    dockerfile, target = build_target(service(compose, name))
    assert dockerfile.is_file(), dockerfile
    steps = dockerfile_stage(target, dockerfile)
    keywords = [keyword for keyword, _ in steps]

    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, f"{dockerfile}: runs as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]

    entrypoints = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1, f"{dockerfile}: one ENTRYPOINT"
    entrypoint = exec_form(entrypoints[0])
    assert entrypoint == (["imgsearch"] if port is None else ["python", "-m", f"{name}_service"])

    run = " ".join(args for keyword, args in steps if keyword == "RUN")
    if port is None:
        # the client-only wheel (its dependencies: the base ones and the [client] extra's), not the
        # project's wheel with [client]: no server code, no models
        copies = [args for keyword, args in steps if keyword == "COPY" and args.startswith("--from=")]
        assert copies == ["--from=builder /client-wheels /tmp/wheels"], copies
        assert "/tmp/wheels/imgsearch_client-*.whl" in run and "[" not in run, run
        assert "-c " in run, f"{dockerfile}: install the client wheel, pinned"
    else:
        assert f"[{extra}]" in run and "-c " in run, f"{dockerfile}: install only [{extra}], pinned"
    assert "PYTHONUNBUFFERED=1" in " ".join(args for keyword, args in steps if keyword == "ENV")

    if port is None:
        return
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert str(port) in [args for keyword, args in steps if keyword == "EXPOSE"]
    healthchecks = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1, f"{dockerfile}: one HEALTHCHECK"
    _, _, command = healthchecks[0].partition("CMD ")
    assert exec_form(command) == ["python", "-m", HEALTHCHECK_MODULE, f"localhost:{port}"]


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


@pytest.mark.parametrize("name", list(SERVICES))
def test_no_image_installs_tensorflow(name: str) -> None:
    """What each target pip-installs: the project's base dependencies and its extra (the client: the
    client-only distribution's dependencies); TensorFlow and Keras are in none of them."""
    if name == "client":
        client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
        requirements = list(client["dependencies"])
    else:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        requirements = [*project["dependencies"], *project["optional-dependencies"][SERVICES[name][0]]]
    run = " ".join(args for keyword, args in dockerfile_stage(name) if keyword == "RUN")
    assert "tensorflow" not in run and "keras" not in run
    assert not requirement_names(requirements) & {"tensorflow", "keras", "tensorflow-cpu"}, name


def test_index_image_owns_its_volume() -> None:
    steps = dockerfile_stage("index")
    volumes = [args for keyword, args in steps if keyword == "VOLUME"]
    assert volumes and "/data" in volumes[0], "VOLUME /data"
    run = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert re.search(r"chown\s+\S+\s+/data", run), "/data should belong to the non-root user"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "imgsearch/v1"} <= patterns


# The web gateway: on with `docker compose up`, on host port 8080, once both services are healthy; its
# image holds the [web] extra only (no TensorFlow, no FAISS).

WEB_HEALTHCHECK = ["python", "-m", "web.healthcheck", "http://127.0.0.1:8080/healthz"]


def test_web_gateway_serves_the_page_once_both_services_are_healthy(compose: dict[str, Any]) -> None:
    web = service(compose, "web")
    assert not web.get("profiles"), "`docker compose up` must start the page"
    assert web["ports"] == ["${IMGSEARCH_PUBLISH_ADDRESS:-127.0.0.1}:${IMGSEARCH_WEB_HOST_PORT:-8080}:8080"]
    depends_on = web["depends_on"]
    assert isinstance(depends_on, dict), "list form cannot wait for health"
    for name in ("encoder", "index"):
        assert depends_on[name]["condition"] == "service_healthy"
    environment = web["environment"]
    client = service(compose, "client")["environment"]
    assert environment["IMGSEARCH_ENCODER"] == "dns:///encoder:50051"
    assert environment["IMGSEARCH_INDEX"] == client["IMGSEARCH_INDEX"]
    assert environment["IMGSEARCH_MEDIA_ROOT"] == "/images"
    # the images the client indexes are where the gateway looks for them, read-only
    images = ["${IMGSEARCH_IMAGES_DIR:-./images}:/images:ro"]
    assert service(compose, "client")["volumes"] == web["volumes"] == images
    for variable in ("IMGSEARCH_TLS_CA", "IMGSEARCH_TOKEN", "IMGSEARCH_TOKEN_FILE"):
        assert environment[variable] == f"${{{variable}:-}}", "off (read-only, plaintext) unless set"
    # the page's own read token and --show-source: off unless set
    for variable in (
        "IMGSEARCH_WEB_READ_TOKEN",
        "IMGSEARCH_WEB_READ_TOKEN_FILE",
        "IMGSEARCH_WEB_SHOW_SOURCE",
    ):
        assert environment[variable] == f"${{{variable}:-}}", variable
    assert environment["IMGSEARCH_WEB_ALLOW_INDEXING"] == "${IMGSEARCH_WEB_ALLOW_INDEXING:-}", "read-only"
    test = web["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == WEB_HEALTHCHECK


def test_web_dockerfile(compose: dict[str, Any]) -> None:
    dockerfile, target = build_target(service(compose, "web"))
    steps = dockerfile_stage(target, dockerfile)
    keywords = [keyword for keyword, _ in steps]
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile}: runs as root"
    entrypoints = [exec_form(args) for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoints == [["python", "-m", "web"]]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    run = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "[web]" in run and "-c " in run, f"{dockerfile}: install only [web], pinned"
    environment = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in environment and "IMGSEARCH_WEB_HOST=0.0.0.0" in environment
    assert "8080" in [args for keyword, args in steps if keyword == "EXPOSE"]
    healthchecks = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1, f"{dockerfile}: one HEALTHCHECK"
    assert exec_form(healthchecks[0].partition("CMD ")[2]) == WEB_HEALTHCHECK


def test_the_web_image_carries_no_tensorflow_and_no_faiss() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["web"]]
    names = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}
    assert {"fastapi", "uvicorn", "python-multipart", "pillow"} <= names
    assert not names & {"tensorflow", "keras", "faiss-cpu", "ai-edge-litert", "pymilvus", "matplotlib"}
    # and the gateway's code does not import them, nor the services' packages
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, web.app, web.server; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    heavy = {"tensorflow", "keras", "faiss", "ai_edge_litert", "matplotlib"}
    services = {"encoder_service", "index_service"}
    assert not (heavy | services) & {name.partition(".")[0] for name in loaded}


def published_ports(spec: dict[str, Any]) -> set[tuple[str, str]]:
    """(host port or range, container port) pairs, from `docker compose config`: Compose v2's long form,
    or the HOST:PUBLISHED:TARGET/PROTOCOL string Compose v1 writes for a port with a host address."""
    pairs = set()
    for port in spec.get("ports", []):
        if isinstance(port, dict):
            pairs.add((str(port.get("published")), str(port["target"])))
        else:
            *_, published, target = str(port).split("/")[0].split(":")
            pairs.add((published, target))
    return pairs


# The settings of the milvus profile's three-replica example (the header of docker-compose.yml).
MILVUS_ENV = {
    "IMGSEARCH_INDEX_BACKEND": "milvus",
    "IMGSEARCH_INDEX_HOST_PORT": "50052-50054",
    "IMGSEARCH_INDEX_REPLICAS": "3",
}


@pytest.mark.parametrize(
    "files,profiles,settings",
    [
        ([COMPOSE_FILE], [], {}),
        ([COMPOSE_FILE, SECURE_FILE], [], {}),
        ([COMPOSE_FILE], ["milvus"], MILVUS_ENV),
        ([COMPOSE_FILE], ["monitoring"], {}),
    ],
    ids=["base", "secure", "milvus", "monitoring"],
)
def test_docker_compose_accepts_the_file(
    files: list[Path], profiles: list[str], settings: dict[str, str]
) -> None:
    merged = compose_config(files, profiles, settings)
    index = merged["services"]["index"]
    if "monitoring" in profiles:
        assert {"prometheus", "grafana"} <= set(merged["services"])
        for name, port in [("prometheus", "9090"), ("grafana", "3000")]:
            (published,) = merged["services"][name]["ports"]
            if isinstance(published, dict):  # Compose v2's long form
                published = f"{published['host_ip']}:{published['published']}:{published['target']}"
            assert str(published).removesuffix("/tcp") == f"127.0.0.1:{port}:{port}"
    if "milvus" in profiles:
        assert published_ports(index) == {("50052-50054", "50052")}
        assert index["environment"]["IMGSEARCH_INDEX_BACKEND"] == "milvus"
        assert index["environment"]["IMGSEARCH_MILVUS_URI"] == "http://milvus:19530"
        assert index["deploy"]["replicas"] == 3
        assert {"etcd", "minio", "milvus"} <= set(merged["services"])
    else:
        assert published_ports(index) == {("50052", "50052")}
        assert index["environment"]["IMGSEARCH_INDEX_BACKEND"] == "faiss"
        assert index["deploy"]["replicas"] == 1
    if SECURE_FILE in files:
        environment = merged["services"]["index"]["environment"]
        assert environment["IMGSEARCH_TLS_CERT"] == "/run/secrets/imgsearch_tls_cert"
        assert environment["IMGSEARCH_READ_TOKEN_FILE"] == "/run/secrets/imgsearch_read_token"
        assert environment["IMGSEARCH_DATA_DIR"] == "/data"  # the base's settings survive the merge
        assert {s["source"] for s in merged["services"]["encoder"]["secrets"]} >= {"imgsearch_tls_key"}
        web = merged["services"]["web"]
        assert {s["source"] for s in web["secrets"]} == {"imgsearch_read_token", "imgsearch_tls_ca"}
        assert web["environment"]["IMGSEARCH_TLS_CA"] == "/run/secrets/imgsearch_tls_ca"
        assert web["environment"]["IMGSEARCH_TOKEN_FILE"] == "/run/secrets/imgsearch_read_token"
        assert web["environment"]["IMGSEARCH_MEDIA_ROOT"] == "/images"


def compose_v2() -> list[str]:
    """The Compose v2 command line (`docker compose`), or the test is skipped with the reason."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip(
            "no docker CLI on PATH, so no Compose v2 (../shared/tools/docker-engine up installs both)"
        )
    result = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"no Compose v2 plugin (`docker compose version`: {result.stderr.strip()})")
    return [docker, "compose"]


def compose_config(files: list[Path], profiles: list[str], settings: dict[str, str]) -> dict[str, Any]:
    """`docker compose config` (Compose v2) of the files under the profiles, with only these settings in
    its environment; skips the test without Compose v2 (`../shared/tools/docker-engine up` or Docker's
    own packages put it in place; Compose v1, Debian bookworm's docker-compose, reads no top-level
    `name:`)."""
    command = compose_v2()
    # Only the settings given here: none from the shell that runs the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGSEARCH_", "COMPOSE_"))}
    result = subprocess.run(
        [
            *command,
            *(arg for path in files for arg in ("-f", str(path))),
            *(arg for profile in profiles for arg in ("--profile", profile)),
            "config",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, **settings},
    )
    if profiles and "--profile" in result.stderr and result.returncode != 0:
        pytest.skip(f"this docker-compose has no profiles: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)
    assert isinstance(merged, dict)
    return merged


# Host ports: on the host's loopback unless IMGSEARCH_PUBLISH_ADDRESS opens the project's own services.

PUBLISH_ADDRESS = "IMGSEARCH_PUBLISH_ADDRESS"
OPENABLE = {"encoder", "index", "web"}  # what IMGSEARCH_PUBLISH_ADDRESS opens; the rest stays on loopback
EVERY_PROFILE = ["client", "milvus", "monitoring"]


def host_ips(spec: dict[str, Any]) -> list[str]:
    """The host address of each published port, from `docker compose config` (long form, or the short
    HOST:PUBLISHED:TARGET string an older one writes)."""
    found = []
    for port in spec.get("ports", []):
        if isinstance(port, dict):
            found.append(str(port.get("host_ip", "")))
        else:
            parts = str(port).split(":")
            found.append(parts[0] if len(parts) == 3 else "")
    return found


def test_every_host_port_binds_loopback_unless_opened(compose: dict[str, Any]) -> None:
    """Each published port names its host address: ${IMGSEARCH_PUBLISH_ADDRESS:-127.0.0.1} for the
    project's services, 127.0.0.1 always for Milvus, Prometheus and Grafana."""
    published = {name: spec["ports"] for name, spec in compose["services"].items() if spec.get("ports")}
    assert {"index", "web"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str), f"{name}: the short form names the host address: {port}"
            assert interpolate(port, {}).count(":") == 2, f"{name}: HOST:PUBLISHED:TARGET, {port}"
            assert interpolate(port, {}).startswith("127.0.0.1:"), (name, port)
            opened = interpolate(port, {PUBLISH_ADDRESS: "0.0.0.0"})
            assert opened.startswith("0.0.0.0:" if name in OPENABLE else "127.0.0.1:"), (name, port)
            if name in OPENABLE:
                assert port.startswith(f"${{{PUBLISH_ADDRESS}:-127.0.0.1}}:"), (name, port)


def test_the_header_says_how_to_open_the_ports() -> None:
    header = "\n".join(line for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#"))
    assert PUBLISH_ADDRESS in header and "127.0.0.1" in header and "0.0.0.0" in header


@pytest.mark.parametrize(
    "files,settings,expected",
    [
        ([COMPOSE_FILE], MILVUS_ENV, "127.0.0.1"),
        ([COMPOSE_FILE, SECURE_FILE], {}, "127.0.0.1"),
        ([COMPOSE_FILE], {**MILVUS_ENV, PUBLISH_ADDRESS: "0.0.0.0"}, "0.0.0.0"),
    ],
    ids=["default", "secure", "opened"],
)
def test_docker_compose_publishes_on_loopback_unless_opened(
    files: list[Path], settings: dict[str, str], expected: str
) -> None:
    merged = compose_config(files, EVERY_PROFILE, settings)
    services = merged["services"]
    assert {"index", "web", "milvus", "prometheus", "grafana"} <= set(services)
    for name, spec in services.items():
        ips = host_ips(spec)
        want = expected if name in OPENABLE else "127.0.0.1"
        assert ips == [want] * len(ips), (name, spec.get("ports"))
    assert host_ips(services["index"]) and host_ips(services["web"])


# TLS, tokens and the bound on calls in flight: passed through empty (off) in the base file.

SERVER_PASS_THROUGH = [
    "IMGSEARCH_TLS_CERT",
    "IMGSEARCH_TLS_KEY",
    "IMGSEARCH_TLS_CA",
    "IMGSEARCH_TLS_SERVER_NAME",
    "IMGSEARCH_AUTH_TOKEN",
    "IMGSEARCH_AUTH_TOKEN_FILE",
    "IMGSEARCH_READ_TOKEN",
    "IMGSEARCH_READ_TOKEN_FILE",
    "IMGSEARCH_MAX_CONCURRENT_RPCS",
]


@pytest.mark.parametrize(
    "name,variables",
    [
        ("encoder", SERVER_PASS_THROUGH),
        ("index", SERVER_PASS_THROUGH),
        ("client", ["IMGSEARCH_TLS_CA", "IMGSEARCH_TOKEN", "IMGSEARCH_TOKEN_FILE"]),
    ],
)
def test_security_settings_pass_through_empty(
    compose: dict[str, Any], name: str, variables: list[str]
) -> None:
    environment = service(compose, name)["environment"]
    for variable in variables:
        assert environment[variable] == f"${{{variable}:-}}", variable
        assert with_defaults(environment[variable]) == ""


# docker-compose.secure.yml: both services get TLS and the token from Docker secrets; the callers (the
# client, the web gateway) the CA and the token.

SECRET_FILES = {
    "imgsearch_token": "./secrets/token",
    "imgsearch_read_token": "./secrets/read_token",
    "imgsearch_tls_cert": "./secrets/tls.crt",
    "imgsearch_tls_key": "./secrets/tls.key",
    "imgsearch_tls_ca": "./secrets/ca.crt",
}


def mounted(spec: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in spec.get("secrets", [])}


def test_the_override_declares_its_secrets_from_files(secure: dict[str, Any]) -> None:
    assert {name: with_defaults(spec["file"]) for name, spec in secure["secrets"].items()} == SECRET_FILES
    assert set(secure["services"]) <= set(SERVICES)
    assert (
        "secrets" in (ROOT / ".gitignore").read_text() and "secrets" in (ROOT / ".dockerignore").read_text()
    )


@pytest.mark.parametrize("name", ["encoder", "index"])
def test_the_override_turns_on_tls_and_the_token(secure: dict[str, Any], name: str) -> None:
    spec = service(secure, name)
    assert mounted(spec) == set(SECRET_FILES)
    environment = spec["environment"]
    assert environment["IMGSEARCH_TLS_CERT"] == "/run/secrets/imgsearch_tls_cert"
    assert environment["IMGSEARCH_TLS_KEY"] == "/run/secrets/imgsearch_tls_key"
    assert environment["IMGSEARCH_AUTH_TOKEN_FILE"] == "/run/secrets/imgsearch_token"
    assert environment["IMGSEARCH_AUTH_TOKEN"] == "", "a shell token and the file would clash"
    # the read-only token: reads only (the web gateway's, unless it adds images)
    assert environment["IMGSEARCH_READ_TOKEN_FILE"] == "/run/secrets/imgsearch_read_token"
    assert environment["IMGSEARCH_READ_TOKEN"] == ""
    # the HEALTHCHECK probe in the container speaks TLS to localhost, checking the certificate's name
    assert environment["IMGSEARCH_TLS_CA"] == "/run/secrets/imgsearch_tls_ca"
    assert environment["IMGSEARCH_TLS_SERVER_NAME"] == name


@pytest.mark.parametrize(
    "name,settings,token",
    [
        ("client", {}, "imgsearch_token"),
        # the gateway reads only, with the services' read-only token, unless it may add images
        ("web", {}, "imgsearch_read_token"),
        ("web", {"IMGSEARCH_WEB_TOKEN_SECRET": "imgsearch_token"}, "imgsearch_token"),
    ],
    ids=["client", "web", "web-indexing"],
)
def test_the_override_gives_the_callers_the_ca_and_token(
    secure: dict[str, Any], name: str, settings: dict[str, str], token: str
) -> None:
    caller = service(secure, name)
    secrets = {interpolate(secret, settings) for secret in mounted(caller)}
    assert secrets == {token, "imgsearch_tls_ca"}, f"the {name} needs no key and one token"
    environment = {key: interpolate(str(value), settings) for key, value in caller["environment"].items()}
    assert environment["IMGSEARCH_TLS_CA"] == "/run/secrets/imgsearch_tls_ca"
    assert environment["IMGSEARCH_TOKEN_FILE"] == f"/run/secrets/{token}"
    # IMGSEARCH_TOKEN comes before the file (the CLI's and the gateway's order): never one from the shell
    assert environment["IMGSEARCH_TOKEN"] == ""


def test_the_gateway_reads_the_overrides_ca_and_token(
    secure: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's own settings (web/settings.py), given the override's environment, with the secrets
    where Compose mounts them moved to a temporary folder: TLS to the services and the token."""
    from web.settings import parse_settings

    (tmp_path / "imgsearch_read_token").write_text("  s3cret-from-file\n")
    (tmp_path / "imgsearch_tls_ca").write_text("-----BEGIN CERTIFICATE-----\n")
    for variable in list(os.environ):
        if variable.startswith("IMGSEARCH_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("IMGSEARCH_TOKEN", "from-the-shell")  # the override empties it
    for variable, value in service(secure, "web")["environment"].items():
        monkeypatch.setenv(variable, with_defaults(str(value)).replace("/run/secrets", str(tmp_path)))
    settings = parse_settings([])
    assert settings.tls_ca == str(tmp_path / "imgsearch_tls_ca")
    assert settings.token is not None and settings.token.value == "s3cret-from-file"
    assert "TLS on, token set" in settings.summary()


# The monitoring profile: Prometheus scrapes every service, Grafana shows the dashboard.

MONITORING_PROFILE = {
    "prometheus": r"prom/prometheus:v3\.\d+\.\d+",
    "grafana": r"grafana/grafana:\d+\.\d+\.\d+",
}
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "imgsearch.json"
# service -> (the env var of its metrics port, the port); the web gateway serves /metrics on its own port
METRICS_PORTS = {
    "encoder": ("IMGSEARCH_ENCODER_METRICS_PORT", 9101),
    "index": ("IMGSEARCH_INDEX_METRICS_PORT", 9102),
}
WEB_METRICS_TARGET = "web:8080"


def bind_mounts(spec: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """container path -> (host path, mode) of a service's host-path volumes (short form)."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target, *mode = with_defaults(str(volume)).split(":")
        if source.startswith("."):
            mounts[target] = (ROOT / source, mode[0] if mode else "rw")
    return mounts


@pytest.mark.parametrize("name", list(MONITORING_PROFILE))
def test_monitoring_profile_service(compose: dict[str, Any], name: str) -> None:
    spec = service(compose, name)
    assert spec["profiles"] == ["monitoring"]
    assert re.fullmatch(MONITORING_PROFILE[name], spec["image"]), f"{name}: pin a release: {spec['image']}"
    assert "container_name" not in spec
    assert all(with_defaults(str(port)).startswith("127.0.0.1:") for port in spec["ports"]), "loopback only"
    for host, mode in bind_mounts(spec).values():
        assert host.exists() and mode == "ro", (host, mode)
    named = {source for source, _ in volume_mounts(spec) if not source.startswith(".")}
    assert named and named <= set(compose["volumes"]), "its data in a named volume"


@pytest.mark.parametrize("name", list(METRICS_PORTS))
def test_services_serve_metrics_on_the_network_only(compose: dict[str, Any], name: str) -> None:
    spec = service(compose, name)
    variable, port = METRICS_PORTS[name]
    assert spec["environment"][variable] == str(port)
    assert str(port) in [str(p) for p in spec["expose"]]
    published = [with_defaults(str(p)).rpartition(":")[2] for p in spec.get("ports", [])]
    assert str(port) not in published, "the metrics stay on the project's network"


def test_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    prometheus = service(compose, "prometheus")
    assert bind_mounts(prometheus)["/etc/prometheus/prometheus.yml"][0] == PROMETHEUS_CONFIG
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = load(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, (_, port) in METRICS_PORTS.items():
        # DNS service discovery: every replica of a scaled service, not one of them
        (discovery,) = jobs[name]["dns_sd_configs"]
        assert discovery["names"] == [name] and discovery["type"] == "A" and discovery["port"] == port
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    (web,) = jobs["web"]["static_configs"]
    assert web["targets"] == [WEB_METRICS_TARGET]
    assert jobs["web"].get("metrics_path", "/metrics") == "/metrics"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = service(compose, "grafana")
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"][0] == GRAFANA_DIR / "provisioning"
    (datasource,) = load(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.port == 9090 and datasource["type"] == "prometheus"
    assert "127.0.0.1:${IMGSEARCH_PROMETHEUS_HOST_PORT:-9090}:9090" in service(compose, "prometheus")["ports"]
    (provider,) = load(GRAFANA_DIR / "provisioning" / "dashboards" / "imgsearch.yml")["providers"]
    assert mounts[provider["options"]["path"]][0] == DASHBOARD.parent
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    for panel in dashboard["panels"]:
        for source in [panel["datasource"], *(target["datasource"] for target in panel["targets"])]:
            assert source == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_the_dashboard_queries_what_the_services_export() -> None:
    """Each metric a panel names is one the services export (imgsearch_server/metrics.py's shared names and
    each service's metrics.py's own; tests/service/test_metrics.py checks those
    names against a live scrape of both services) or one the web gateway's registry holds, and the panels
    the issue asks for are there."""
    from encoder_service import metrics as encoder_metrics
    from imgsearch_server import metrics
    from index_service import metrics as index_metrics
    from web.metrics import GatewayMetrics

    gateway = {family.name for family in GatewayMetrics().registry.collect()}
    exported_by_services = {*metrics.EXPORTED, *encoder_metrics.EXPORTED, *index_metrics.EXPORTED}
    families = {*exported_by_services, *gateway, *(f"{name}_total" for name in gateway)}
    exported = families | {f"{name}_{suffix}" for name in families for suffix in ("bucket", "sum", "count")}
    queries = dashboard_queries()
    named = {name for query in queries for name in re.findall(r"\b(imgsearch_[a-z_]+)", query)}
    assert named and named <= exported, named - exported
    text = "\n".join(queries)
    assert "rate(imgsearch_grpc_requests_total[" in text  # request rate
    assert 'imgsearch_grpc_requests_total{code!="OK"}' in text  # errors
    assert "histogram_quantile(0.5, " in text and "histogram_quantile(0.99, " in text  # latency p50, p99
    assert "imgsearch_grpc_request_seconds_bucket" in text
    assert {index_metrics.INDEX_VECTORS, encoder_metrics.ENCODER_IMAGES, metrics.GRPC_REJECTED} <= named
    assert any(name.startswith("imgsearch_http_") for name in named), "the gateway's requests"


def test_the_header_says_how_to_run_the_monitoring_profile() -> None:
    header = "\n".join(line for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#"))
    for text in ["--profile monitoring", "localhost:3000", "localhost:9090", "9101", "9102"]:
        assert text in header, text


# imgsearch_server.healthcheck, against an in-process server.


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_probe_passes_when_serving(health_server: tuple[health.HealthServicer, int]) -> None:
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([f"127.0.0.1:{port}"]) == 0


def test_probe_fails_when_not_serving(
    health_server: tuple[health.HealthServicer, int], capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([f"127.0.0.1:{port}", "--timeout-s", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NOT_SERVING" in err


def test_probe_fails_fast_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    assert healthcheck.main([f"127.0.0.1:{port}", "--timeout-s", "3"]) == 1
    assert time.monotonic() - start < 3
    assert capsys.readouterr().err.count("\n") == 1
