"""The worker image, started as users start it, without a container engine.

No Docker engine runs on these machines, so the test rebuilds what the ``Dockerfile`` builds by
reading it: a folder stands for the image's filesystem, its ``WORKDIR`` gets the files each
``COPY`` names (from this repository, minus what ``.dockerignore`` leaves out of the build
context), a fresh virtualenv runs the image's ``pip install`` there, and then the commands the
compose stack gives its services run in that folder as the image runs them: ``outbox migrate``
(the one-shot ``migrate`` service), the image's ``CMD`` (the ``worker`` service) with its
healthcheck, and the dashboard (the ``web`` service). Against PostgreSQL and the test server in
its own process, the worker must publish what was enqueued.

What cannot be rebuilt without an engine is left out, and said here: the base image (the host's
Python 3.11 stands in for ``python:3.11-slim``), ``useradd``/``USER`` (the commands run as the
test's user) and the container network (services reach PostgreSQL and the test server on
127.0.0.1, and the dashboard listens there instead of on every address).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from outbox import enqueue, outbox_table
from outbox.database import create_engine
from outbox.schema import published_table
from tests.plugins.databases import make_database
from tests.plugins.processes import Spawn, child_environment

pytestmark = [pytest.mark.package, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 600


@dataclass
class Dockerfile:
    """What a Dockerfile says, as far as these tests rebuild it."""

    workdir: str = "/"
    #: (sources, destination), relative to the build context and to the WORKDIR in force.
    copies: list[tuple[list[str], str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    #: The ``pip install`` commands of the RUN instructions, as argument lists.
    installs: list[list[str]] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        found = cls()
        for instruction, argument in _instructions(path.read_text()):
            if instruction == "WORKDIR":
                found.workdir = os.path.join(found.workdir, argument)
            elif instruction == "COPY":
                *sources, destination = shlex.split(argument)
                found.copies.append((sources, destination, found.workdir))
            elif instruction == "ENV":
                for pair in shlex.split(argument):
                    name, _, value = pair.partition("=")
                    found.env[name] = value
            elif instruction == "RUN":
                for command in argument.split("&&"):
                    words = shlex.split(command)
                    if words[:2] == ["pip", "install"]:
                        found.installs.append(words[2:])
            elif instruction == "CMD":
                found.cmd = json.loads(argument)
        return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs: comments dropped, continued lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, argument = (pending + line).partition(" ")
        out.append((instruction.upper(), argument.strip()))
        pending = ""
    return out


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` leaves ``relative`` (a path in the build context) out."""
    parts = relative.split("/")
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if fnmatch.fnmatch(relative, pattern) or any(fnmatch.fnmatch(p, bare) for p in parts):
            return True
    return False


def build_layout(dockerfile: Dockerfile, root: Path) -> Path:
    """The image's files under ``root`` (standing for ``/``); returns its WORKDIR there."""
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, destination, workdir in dockerfile.copies:
        target_dir = root / os.path.join(workdir, destination).lstrip("/")
        for source in sources:
            origin = REPO / source
            if origin.is_dir():  # its contents, as COPY copies a directory
                shutil.copytree(
                    origin,
                    target_dir,
                    ignore=lambda folder, names: [
                        n
                        for n in names
                        if _ignored(str((Path(folder) / n).relative_to(REPO)), ignore)
                    ],
                    dirs_exist_ok=True,
                )
            else:
                target_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target_dir / origin.name)
    workdir = root / dockerfile.workdir.lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


@dataclass(frozen=True)
class Image:
    workdir: Path
    #: The environment every command of the image gets (its ENV, its virtualenv first on PATH).
    env: dict[str, str]
    dockerfile: Dockerfile


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The image rebuilt: its files, and the packages its RUN installs into a fresh virtualenv."""
    dockerfile = Dockerfile.read(REPO / "Dockerfile")
    root = tmp_path_factory.mktemp("image")
    workdir = build_layout(dockerfile, root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = child_environment(**dockerfile.env)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # Pip's cache is kept for the test's own install (it only makes it faster); the image's
    # PIP_NO_CACHE_DIR is about the image's size.
    install_env = {k: v for k, v in env.items() if k != "PIP_NO_CACHE_DIR"}
    assert dockerfile.installs, "the Dockerfile installs nothing with pip"
    for arguments in dockerfile.installs:
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *arguments],
            cwd=workdir,
            env=install_env,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"pip install {arguments} failed:\n{done.stderr[-4000:]}"
    return Image(workdir, env, dockerfile)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_the_dockerfile_is_read_as_the_image_is_built(image: Image) -> None:
    """The reading this test relies on: the worker's start command, the files it needs, and
    no repository file the image leaves out (tests, docs)."""
    assert image.dockerfile.cmd == ["python", "worker.py"]
    assert (image.workdir / "worker.py").is_file()
    assert (image.workdir / "outbox" / "__init__.py").is_file()
    assert not (image.workdir / "tests").exists()
    assert not list(image.workdir.rglob("__pycache__"))


def test_the_stack_runs_from_the_image(
    image: Image,
    compose: dict[str, Any],
    sockudo_server_process,
    spawn: Spawn,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """``migrate``, then the image's ``CMD`` (the worker service, healthy by its own check),
    publish what was enqueued; the dashboard service answers its health check."""
    database_url = make_database("postgresql", tmp_path, request)
    services = compose["services"]
    env = {
        **image.env,
        "OUTBOX_DATABASE_URL": database_url,
        "SOCKUDO_URL": sockudo_server_process.url,
        "OUTBOX_POLL_INTERVAL": "0.1",
    }
    migrate = subprocess.run(
        services["migrate"]["command"],
        cwd=image.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr

    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            for n in range(20):
                enqueue(conn, "orders", "order-created", {"id": n})
        worker_env = {**env, **_service_env(services["worker"], image.env)}
        metrics_port = _free_port()
        worker_env.update(OUTBOX_METRICS_PORT=str(metrics_port), OUTBOX_METRICS_HOST="127.0.0.1")
        assert services["worker"]["command"] == image.dockerfile.cmd
        worker = spawn("worker", image.dockerfile.cmd, env=worker_env, cwd=image.workdir)
        deadline = time.monotonic() + 60
        while _published(engine) < 20:
            worker.check_alive()
            assert time.monotonic() < deadline, f"not published in 60 s:\n{worker.log}"
            time.sleep(0.1)
        assert sockudo_server_process.delivered_count("orders") == 20
        # The compose healthcheck, run as the image runs it (its port is the worker's).
        health = [
            part.replace("9464", str(metrics_port))
            for part in services["worker"]["healthcheck"]["test"][1:]
        ]
        checked = subprocess.run(health, cwd=image.workdir, env=env, timeout=30, check=False)
        assert checked.returncode == 0
        assert worker.stop() == 0, worker.log
    finally:
        engine.dispose()

    web_port = _free_port()
    command = [
        {"0.0.0.0": "127.0.0.1", "8025": str(web_port)}.get(part, part)
        for part in services["web"]["command"]
    ]
    web_env = {**env, "OUTBOX_WEB_TOKEN": "t" * 40}
    web = spawn("web", command, env=web_env, cwd=image.workdir)
    web.wait_for_http(f"http://127.0.0.1:{web_port}/healthz", timeout=60)


def _service_env(service: dict[str, Any], image_env: dict[str, str]) -> dict[str, str]:
    """A compose service's environment, less what points at the stack's own hosts."""
    values = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    for name in ("OUTBOX_DATABASE_URL", "SOCKUDO_URL"):
        values.pop(name, None)
    return values


def _published(engine: sa.Engine) -> int:
    log = published_table(outbox_table())
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(log)).scalar_one()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_python_worker_py_from_a_clone_with_a_plain_install(
    image: Image, sockudo_server_process, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``pip install .`` then ``python worker.py --once`` in the clone (the source next to the
    installed package, shadowing it): the worker starts, creates its SQLite default, and then
    publishes what ``outbox enqueue`` added."""
    env = {**image.env, "SOCKUDO_URL": sockudo_server_process.url}
    env.pop("OUTBOX_DATABASE_URL", None)
    clone = tmp_path / "clone"
    shutil.copytree(image.workdir, clone)
    done = subprocess.run(
        ["python", "-c", "import outbox; print(outbox.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == str(clone / "outbox" / "__init__.py")  # the source shadows it

    def worker_once() -> None:
        once = subprocess.run(
            ["python", "worker.py", "--once"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert once.returncode == 0, once.stdout + once.stderr

    worker_once()  # creates the SQLite schema, as the quick start's first run does
    enqueued = subprocess.run(
        ["python", "-m", "outbox", "enqueue", "orders", "order-created", '{"id": 1}'],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert enqueued.returncode == 0, enqueued.stdout + enqueued.stderr
    worker_once()
    assert sockudo_server_process.delivered_count("orders") == 1
