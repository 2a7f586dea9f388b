"""Checks docker-compose.yml, the three Dockerfiles and the imgsearch.healthcheck probe they use."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imgsearch import healthcheck

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SECURE_FILE = ROOT / "docker-compose.secure.yml"
HEALTHCHECK_MODULE = "imgsearch.healthcheck"
# service -> (the pip extra its image installs, the container port it listens on; None for the CLI)
SERVICES: dict[str, tuple[str, int | None]] = {
    "encoder": ("encoder", 50051),
    "index": ("index", 50052),
    "client": ("client", None),
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


def dockerfile_path(spec: dict[str, Any]) -> Path:
    build = spec["build"]
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """Returns (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    starts = [i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"]
    assert starts, f"{dockerfile}: no FROM"
    return steps[starts[-1] :]


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
    assert [str(p) for p in encoder["expose"]] == ["50051"]


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
    """`docker compose up` without a profile starts the two services, and neither waits for a service that
    only a profile has (Compose would refuse the project)."""
    always = {name for name, spec in compose["services"].items() if not spec.get("profiles")}
    assert always == {"encoder", "index"}
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
    assert interpolate(port, {}) == "50052:50052"
    # A range gives each replica one host port of it.
    assert interpolate(port, {"IMGSEARCH_INDEX_HOST_PORT": "50052-50054"}) == "50052-50054:50052"
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
def test_dockerfile(compose: dict[str, Any], name: str) -> None:
    extra, port = SERVICES[name]
    dockerfile = dockerfile_path(service(compose, name))
    assert dockerfile.is_file(), dockerfile
    steps = final_stage(dockerfile)
    keywords = [keyword for keyword, _ in steps]

    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, f"{dockerfile}: runs as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]

    entrypoints = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1, f"{dockerfile}: one ENTRYPOINT"
    entrypoint = exec_form(entrypoints[0])
    assert entrypoint == (["imgsearch"] if port is None else ["python", "-m", f"{name}_service"])

    run = " ".join(args for keyword, args in steps if keyword == "RUN")
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


def test_index_image_owns_its_volume() -> None:
    steps = final_stage(ROOT / "index_service" / "Dockerfile")
    volumes = [args for keyword, args in steps if keyword == "VOLUME"]
    assert volumes and "/data" in volumes[0], "VOLUME /data"
    run = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert re.search(r"chown\s+\S+\s+/data", run), "/data should belong to the non-root user"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "imgsearch/v1"} <= patterns


def published_ports(spec: dict[str, Any]) -> set[tuple[str, str]]:
    """(host port or range, container port) pairs, from `docker-compose config`'s long form."""
    return {(str(port.get("published")), str(port["target"])) for port in spec.get("ports", [])}


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
    ],
    ids=["base", "secure", "milvus"],
)
def test_docker_compose_accepts_the_file(
    files: list[Path], profiles: list[str], settings: dict[str, str]
) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("no docker-compose on PATH")
    # Only the settings given here: none from the shell that runs the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGSEARCH_", "COMPOSE_"))}
    result = subprocess.run(
        [
            binary,
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
    index = merged["services"]["index"]
    if profiles:
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
        assert environment["IMGSEARCH_DATA_DIR"] == "/data"  # the base's settings survive the merge
        assert {s["source"] for s in merged["services"]["encoder"]["secrets"]} >= {"imgsearch_tls_key"}


# TLS, tokens and the bound on calls in flight: passed through empty (off) in the base file.

SERVER_PASS_THROUGH = [
    "IMGSEARCH_TLS_CERT",
    "IMGSEARCH_TLS_KEY",
    "IMGSEARCH_TLS_CA",
    "IMGSEARCH_TLS_SERVER_NAME",
    "IMGSEARCH_AUTH_TOKEN",
    "IMGSEARCH_AUTH_TOKEN_FILE",
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


# docker-compose.secure.yml: both services (and the client) get TLS and the token from Docker secrets.

SECRET_FILES = {
    "imgsearch_token": "./secrets/token",
    "imgsearch_tls_cert": "./secrets/tls.crt",
    "imgsearch_tls_key": "./secrets/tls.key",
    "imgsearch_tls_ca": "./secrets/ca.crt",
}


def mounted(spec: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in spec.get("secrets", [])}


def test_the_override_declares_its_secrets_from_files(secure: dict[str, Any]) -> None:
    assert {name: spec["file"] for name, spec in secure["secrets"].items()} == SECRET_FILES
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
    # the HEALTHCHECK probe in the container speaks TLS to localhost, checking the certificate's name
    assert environment["IMGSEARCH_TLS_CA"] == "/run/secrets/imgsearch_tls_ca"
    assert environment["IMGSEARCH_TLS_SERVER_NAME"] == name


def test_the_override_gives_the_client_the_ca_and_token(secure: dict[str, Any]) -> None:
    client = service(secure, "client")
    assert mounted(client) == {"imgsearch_token", "imgsearch_tls_ca"}, "the client needs no key"
    assert client["environment"]["IMGSEARCH_TLS_CA"] == "/run/secrets/imgsearch_tls_ca"
    assert client["environment"]["IMGSEARCH_TOKEN_FILE"] == "/run/secrets/imgsearch_token"


# imgsearch.healthcheck, against an in-process server.


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
