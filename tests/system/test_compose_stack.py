"""The real stack: docker-compose.yml built, started, scaled, killed, taken down and restored on a Docker
engine, as a user would, through the client service and the host ports.

The tests run in file order over one project (`imgsearch-systest`, its own ports, images and models
folders), each step on the state the one before left; the project is taken down with its volumes at the
end, and its images are kept so the next run reuses their layers. Skipped, with the reason, when no Docker
engine answers (`../shared/tools/docker-engine up` starts one; `.ci/run` does). The same topology as
local processes is tests/system/test_replicas.py's; the file's static checks are tests/system/test_compose.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from imgsearch.client import IndexClient, ServiceError
from tests.support import ROOT, request, write_digits
from tools.local import free_port

PROJECT = "imgsearch-systest"
BASE = [ROOT / "docker-compose.yml"]
SECURE = [*BASE, ROOT / "docker-compose.secure.yml"]
FIRST = 60  # images indexed first (the self-match, scale and restart checks)
SECOND = 4000  # images indexed while the index is killed
TRAINED = "mine"  # the model folder under IMGSEARCH_MODELS_DIR the encoder serves

# Info from inside one encoder replica: its name and how many images it embedded since it started.
REPLICA_INFO = (
    "import grpc, json; from imgsearch.v1 import encoder_pb2 as p, encoder_pb2_grpc as g; "
    "i = g.EncoderStub(grpc.insecure_channel('localhost:50051')).Info(p.InfoRequest(), timeout=10); "
    "print(json.dumps({'replica': i.replica, 'images_embedded': i.images_embedded, "
    "'model_version': i.model_version}))"
)


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers with Compose v2."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (../shared/tools/docker-engine up installs and starts one)"
    for command in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` did not answer in 30 s"
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()[-300:]}"
    return None


@dataclass
class Stack:
    """One Compose project of the repo's files, with its own settings; commands run from the repo root."""

    root: Path
    env: dict[str, str]
    files: list[Path] = field(default_factory=lambda: list(BASE))

    def compose(
        self,
        *args: str,
        timeout_s: float = 300,
        stdin: bytes | None = None,
        check: bool = True,
        files: Sequence[Path] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        command = ["docker", "compose", *(a for f in files or self.files for a in ("-f", str(f))), *args]
        result = subprocess.run(
            command, cwd=ROOT, env=self.env, input=stdin, capture_output=True, timeout=timeout_s
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout.decode()[-3000:]}\n"
                f"{result.stderr.decode()[-3000:]}"
            )
        return result

    def client(self, *args: str, stdin: bytes | None = None, timeout_s: float = 300) -> str:
        """`docker compose run --rm --no-deps client ARGS`: the client never touches the services."""
        run = ["run", "--rm", "--no-deps", *(["-T"] if stdin is not None else []), "client", *args]
        return self.compose(*run, stdin=stdin, timeout_s=timeout_s).stdout.decode()

    def containers(self, service: str) -> list[str]:
        ids = self.compose("ps", "-q", service).stdout.decode().split()
        return sorted(ids)

    def inspect(self, container: str, template: str) -> str:
        result = subprocess.run(
            ["docker", "inspect", "-f", template, container], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def replica_infos(self) -> list[dict[str, object]]:
        """Info of every encoder replica, asked inside each one (the encoder has no host port)."""
        infos = []
        for n in range(1, len(self.containers("encoder")) + 1):
            out = self.compose("exec", "-T", "--index", str(n), "encoder", "python", "-c", REPLICA_INFO)
            infos.append(json.loads(out.stdout.decode()))
        return infos

    @property
    def index_address(self) -> str:
        return f"127.0.0.1:{self.env['IMGSEARCH_INDEX_HOST_PORT']}"

    def count(self) -> int:
        index = IndexClient(self.index_address, timeout_s=10)
        try:
            return index.stats().count
        finally:
            index.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    problem = engine_problem()
    if problem:
        pytest.skip(f"no Docker engine answers: {problem}")
    work = tmp_path_factory.mktemp("stack")
    images = work / "images"
    write_digits(images / "first", FIRST)
    write_digits(images / "second", SECOND, start=FIRST)
    models = work / "models"
    shutil.copytree(ROOT / "encoder_service" / "models" / "tutorial", models / TRAINED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGSEARCH_", "COMPOSE_"))}
    env |= {
        "COMPOSE_PROJECT_NAME": PROJECT,
        "IMGSEARCH_INDEX_HOST_PORT": str(free_port()),
        "IMGSEARCH_WEB_HOST_PORT": str(free_port()),
        "IMGSEARCH_IMAGES_DIR": str(images),
        "IMGSEARCH_MODELS_DIR": str(models),
        "IMGSEARCH_MODEL_DIR": f"/models/{TRAINED}",
        "IMGSEARCH_SECRETS_DIR": str(work / "secrets"),
    }
    stack = Stack(work, env)
    stack.compose("down", "-v", "--remove-orphans", check=False)  # what an interrupted run left
    try:
        yield stack
    finally:  # the containers and volumes, not the images: their layers serve the next run
        stack.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)


def test_the_images_build_and_the_stack_comes_up_healthy(stack: Stack) -> None:
    stack.compose("--profile", "client", "build", timeout_s=1500)
    started = time.monotonic()
    stack.compose("up", "-d", "--wait", timeout_s=300)
    print(f"up --wait: {time.monotonic() - started:.1f} s")
    for service in ("encoder", "index", "web"):
        (container,) = stack.containers(service)
        assert stack.inspect(container, "{{.State.Health.Status}}") == "healthy", service
    # The project's fixed name, unless COMPOSE_PROJECT_NAME says otherwise: volumes are predictable.
    volumes = subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True).stdout
    assert f"{PROJECT}_index-data" in volumes.split()


def test_the_trained_model_in_the_models_folder_serves(stack: Stack) -> None:
    card = json.loads((stack.root / "models" / TRAINED / "card.json").read_text())
    infos = stack.replica_infos()
    assert [info["model_version"] for info in infos] == [card["model_version"]]


def test_index_a_folder_through_the_client_and_find_each_image_itself(stack: Stack) -> None:
    out = stack.client("index", "/images/first", "--no-progress")
    assert f"indexed {FIRST} images" in out, out
    assert stack.count() == FIRST
    query = sorted((stack.root / "images" / "first").rglob("*.png"))[7]
    name = query.relative_to(stack.root / "images" / "first").as_posix()
    (line,) = stack.client("search", f"/images/first/{name}", "-k", "1", "--json").splitlines()
    (top,) = json.loads(line)["results"]
    assert top["id"] == name and top["distance"] == pytest.approx(0.0, abs=1e-6)
    # A photo from the host, on stdin: the client container needs no mount for it.
    (line,) = stack.client("search", "-", "-k", "1", "--json", stdin=query.read_bytes()).splitlines()
    (top,) = json.loads(line)["results"]
    assert top["id"] == name and top["distance"] == pytest.approx(0.0, abs=1e-6)


def test_three_encoder_replicas_stay_three_after_a_client_run_and_all_serve(stack: Stack) -> None:
    scaled = Stack(stack.root, {**stack.env, "IMGSEARCH_ENCODER_REPLICAS": "3"})  # as the README has it
    scaled.compose("up", "-d", "--wait", timeout_s=300)
    before = {str(info["replica"]): int(str(info["images_embedded"])) for info in scaled.replica_infos()}
    assert len(before) == 3
    # Small batches, several in flight: the client's round robin spreads them over the replicas.
    scaled.client("index", "/images/first", "--no-progress", "--batch-size", "4", "--in-flight", "6")
    assert len(scaled.containers("encoder")) == 3  # the client run left the scale alone
    after = {str(info["replica"]): int(str(info["images_embedded"])) for info in scaled.replica_infos()}
    assert set(after) == set(before)  # the same three containers, none recreated
    served = {replica: after[replica] - before[replica] for replica in after}
    assert all(count > 0 for count in served.values()), served
    assert sum(served.values()) == FIRST
    assert stack.count() == FIRST  # the same ids again: replaced, not added


def test_an_index_killed_mid_ingest_keeps_every_acknowledged_image(stack: Stack) -> None:
    (container,) = stack.containers("index")
    restarts = int(stack.inspect(container, "{{.RestartCount}}"))
    result: dict[str, subprocess.CompletedProcess[bytes]] = {}

    def ingest() -> None:
        result["run"] = stack.compose(
            "run", "--rm", "--no-deps", "client", "index", "/images/second", "--no-progress",
            "--batch-size", "8", "--patience-s", "120",
            timeout_s=600, check=False,
        )  # fmt: skip

    thread = threading.Thread(target=ingest)
    thread.start()
    deadline = time.monotonic() + 300
    while stack.count() < FIRST + 100:  # under way: some acknowledged, most still to come
        assert thread.is_alive() and time.monotonic() < deadline, "the ingest ended before the kill"
        time.sleep(0.05)
    acknowledged = stack.count()
    os.kill(int(stack.inspect(container, "{{.State.Pid}}")), signal.SIGKILL)  # from the host, no warning
    thread.join(600)
    run = result["run"]
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert f"indexed {SECOND} images" in run.stdout.decode()
    assert int(stack.inspect(container, "{{.RestartCount}}")) == restarts + 1  # the engine restarted it
    assert acknowledged < FIRST + SECOND
    assert stack.count() == FIRST + SECOND
    folder = stack.root / "images" / "second"
    ids = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.png"))
    index = IndexClient(stack.index_address, timeout_s=30)
    try:
        found, missing = index.get(ids)
    finally:
        index.close()
    assert missing == [] and len(found) == SECOND


def test_down_and_up_again_keeps_the_data(stack: Stack) -> None:
    stack.compose("down", timeout_s=120)
    assert stack.containers("index") == []
    stack.compose("up", "-d", "--wait", timeout_s=300)
    assert stack.count() == FIRST + SECOND
    assert len(stack.containers("encoder")) == 1  # IMGSEARCH_ENCODER_REPLICAS (unset: 1), as documented


def test_the_web_page_searches_through_its_host_port(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.env['IMGSEARCH_WEB_HOST_PORT']}"
    page = request(f"{url}/")
    assert page.status == 200 and b"<html" in page.body.lower()
    query = sorted((stack.root / "images" / "first").rglob("*.png"))[3]
    reply = request(
        f"{url}/api/search", fields={"k": "1"}, files={"file": (query.name, query.read_bytes(), "image/png")}
    )
    assert reply.status == 200, reply.body
    (top,) = reply.json()["results"]
    assert top["id"] == query.relative_to(stack.root / "images" / "first").as_posix()
    assert top["distance"] == pytest.approx(0.0, abs=1e-6)


def port_pair() -> int:
    """A free port whose next one is free too: a host port range for two index replicas."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port
    raise AssertionError("no two free ports in a row")


def test_a_second_faiss_replica_refuses_naming_milvus_without_a_restart_loop(stack: Stack) -> None:
    first = port_pair()
    ranged = Stack(stack.root, {**stack.env, "IMGSEARCH_INDEX_HOST_PORT": f"{first}-{first + 1}"})
    ranged.compose("up", "-d", "--scale", "index=2", "index", timeout_s=300)
    containers = ranged.containers("index")
    assert len(containers) == 2

    def logs(container: str) -> str:
        result = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=30)
        return result.stdout + result.stderr

    deadline = time.monotonic() + 90
    while not any("refusing to serve" in logs(c) for c in containers):
        assert time.monotonic() < deadline, [logs(c)[-2000:] for c in containers]
        time.sleep(1)
    (standby,) = [c for c in containers if "refusing to serve" in logs(c)]
    (serving,) = [c for c in containers if c != standby]
    assert "--backend milvus" in logs(standby) and "IMGSEARCH_INDEX_BACKEND=milvus" in logs(standby)
    time.sleep(5)
    assert ranged.inspect(standby, "{{.State.Running}} {{.RestartCount}}") == "true 0"  # waits, no loop
    assert logs(standby).count("refusing to serve") == 1
    assert ranged.inspect(serving, "{{.RestartCount}}") == "0"
    ports = {
        ranged.inspect(c, '{{(index (index .NetworkSettings.Ports "50052/tcp") 0).HostPort}}')
        for c in containers
    }
    serving_port = ranged.inspect(
        serving, '{{(index (index .NetworkSettings.Ports "50052/tcp") 0).HostPort}}'
    )
    assert ports == {str(first), str(first + 1)}
    index = IndexClient(f"127.0.0.1:{serving_port}", timeout_s=10)
    try:
        assert index.stats().count == FIRST + SECOND  # the one that holds the data serves it
    finally:
        index.close()
    stack.compose("up", "-d", "--wait", timeout_s=300)  # back to one replica on the usual port
    assert len(stack.containers("index")) == 1
    assert stack.count() == FIRST + SECOND


def readme_block(marker: str) -> str:
    """The sh block of the README after `<!-- MARKER -->`: the commands the README gives, run as they are."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {re.escape(marker)} -->\s*```sh\n(.*?)```", text, re.S)
    assert found, f"README.md has no sh block after <!-- {marker} -->"
    return found.group(1)


def run_readme_block(stack: Stack, marker: str) -> None:
    script = readme_block(marker)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=stack.root,  # the commands name files relative to where they run; compose finds the project by -f
        env={**stack.env, "COMPOSE_FILE": str(ROOT / "docker-compose.yml")},
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{marker}:\n{script}\n{result.stderr.decode()[-3000:]}"


def test_back_up_and_restore_with_the_readmes_commands(stack: Stack) -> None:
    run_readme_block(stack, "compose backup")
    backup = stack.root / "index-data.tgz"
    assert backup.stat().st_size > 1000
    assert stack.count() == FIRST + SECOND  # the backup started the index again
    stack.compose("down", "-v", timeout_s=120)  # the volume is gone
    stack.compose("up", "-d", "--wait", timeout_s=300)
    assert stack.count() == 0
    run_readme_block(stack, "compose restore")
    (container,) = stack.containers("index")
    assert stack.inspect(container, "{{.State.Health.Status}}") == "healthy"
    assert stack.count() == FIRST + SECOND


def make_secrets(folder: Path) -> None:
    """A CA, the services' certificate (encoder, index, localhost) and two tokens, readable by uid 10001."""
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(
        "req", "-x509", *curve, "-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.crt"
    )
    openssl("req", *curve, "-subj", "/CN=imgsearch", "-keyout", "tls.key", "-out", "tls.csr")
    (folder / "san.ext").write_text("subjectAltName=DNS:encoder,DNS:index,DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "tls.crt",
    )  # fmt: skip
    (folder / "token").write_text("systest-token-" + os.urandom(8).hex() + "\n")
    (folder / "read_token").write_text("systest-read-" + os.urandom(8).hex() + "\n")
    for name in ("ca.crt", "tls.crt", "tls.key", "token", "read_token"):
        os.chown(folder / name, 10001, 10001)
        (folder / name).chmod(0o400)


def test_the_secure_overlay_refuses_plaintext(stack: Stack) -> None:
    if os.geteuid() != 0:
        pytest.skip("the secrets must be owned by uid 10001, which takes root here")
    make_secrets(stack.root / "secrets")
    stack.compose("up", "-d", "--wait", files=SECURE, timeout_s=300)
    index = IndexClient(stack.index_address, timeout_s=5)
    try:
        with pytest.raises(ServiceError) as refused:
            index.stats()
    finally:
        index.close()
    assert getattr(refused.value, "code", None) == grpc.StatusCode.UNAVAILABLE, refused.value
    # The client service, with the CA and the token from the secrets, still gets through.
    out = stack.compose("run", "--rm", "--no-deps", "client", "stats", "--json", files=SECURE).stdout
    assert json.loads(out)["count"] == FIRST + SECOND
    # And from the host with TLS but no token: UNAUTHENTICATED.
    ca = stack.root / "secrets" / "ca.crt"
    index = IndexClient(stack.index_address.replace("127.0.0.1", "localhost"), timeout_s=10, tls_ca=ca)
    try:
        with pytest.raises(ServiceError) as unauthenticated:
            index.stats()
    finally:
        index.close()
    assert getattr(unauthenticated.value, "code", None) == grpc.StatusCode.UNAUTHENTICATED
