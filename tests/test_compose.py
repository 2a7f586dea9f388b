"""Checks docker-compose.yml, the three Dockerfiles and the imgsearch.healthcheck probe they use."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

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

    mounts = set()
    for volume in index["volumes"]:
        if isinstance(volume, dict):
            mounts.add((volume["source"], volume["target"]))
        else:
            source, target = str(volume).split(":")[:2]
            mounts.add((source, target))
    assert ("index-data", "/data") in mounts
    assert "index-data" in compose["volumes"]


def test_client_is_on_demand_and_waits_for_healthy_services(compose: dict[str, Any]) -> None:
    client = service(compose, "client")
    assert client["profiles"], "the client should start only when asked for"
    depends_on = client["depends_on"]
    assert isinstance(depends_on, dict), "list form cannot wait for health"
    for name in ("encoder", "index"):
        assert depends_on[name]["condition"] == "service_healthy"
    environment = client["environment"]
    assert environment["IMGSEARCH_ENCODER"] == "dns:///encoder:50051"
    assert environment["IMGSEARCH_INDEX"] == "index:50052"
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


@pytest.mark.parametrize("files", [[COMPOSE_FILE], [COMPOSE_FILE, SECURE_FILE]], ids=["base", "secure"])
def test_docker_compose_accepts_the_file(files: list[Path]) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("no docker-compose on PATH")
    result = subprocess.run(
        [binary, *(arg for path in files for arg in ("-f", str(path))), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)
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
