"""The built package works away from this repository.

``python -m build`` makes the sdist, then the wheel from the unpacked sdist, so a wheel that works
also proves the sdist holds everything the package needs. The wheel goes into a fresh virtualenv
(dependencies from the package index, through pip's cache) and, with a working directory outside
the repository so nothing is imported from here, the installed copy must: answer ``outbox
--help``, create the schema with ``outbox migrate`` from the migrations it ships, run the
test server, which must accept a signed publish, and run ``outbox demo`` without its extra.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

import outbox
from outbox import migrate
from outbox.migrate import VERSION_TABLE
from outbox.sockudo import Sockudo
from outbox.testing.server import TestServerProcess
from tests.plugins.processes import child_environment

pytestmark = [pytest.mark.package]

REPO = Path(__file__).resolve().parents[1]
#: Generous: pip may have to fetch the build backend and the dependencies on a cold cache.
INSTALL_TIMEOUT = 600
OUTPUT_TAIL = 6000


def tail(text: str) -> str:
    return text if len(text) <= OUTPUT_TAIL else "..." + text[-OUTPUT_TAIL:]


def clean_environment(**extra: str) -> dict[str, str]:
    """A child's environment without anything that would point Python at the repository."""
    env = child_environment(**extra)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def run(
    command: list[str], cwd: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``command``; fail the test with its output unless it exits 0."""
    done = subprocess.run(
        command,
        cwd=cwd,
        env=clean_environment(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {done.returncode}\n--- stdout ---\n{tail(done.stdout)}"
            f"\n--- stderr ---\n{tail(done.stderr)}",
            pytrace=False,
        )
    return done


def build(source: Path, out: Path, *options: str) -> None:
    """``python -m build`` of ``source`` into ``out``; fails on an error or a setuptools warning."""
    done = run(
        [sys.executable, "-m", "build", *options, "--outdir", str(out), str(source)],
        cwd=out,
        timeout=INSTALL_TIMEOUT,
    )
    output = done.stdout + done.stderr
    # setuptools frames its warnings in "!!" lines. One is a defect even when the build succeeds:
    # a package missing from pyproject.toml's list is shipped as "data" ("Package would be
    # ignored"), a missing license file is skipped; setuptools is turning both into errors.
    warnings = output.split("\n!!\n")[1::2]
    assert not warnings, f"python -m build of {source} warned:\n" + "\n".join(warnings)


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@dataclass(frozen=True)
class Installed:
    python: Path
    bin: Path
    #: A directory outside the repository, used as every command's working directory.
    workdir: Path


def checkout_copy(into: Path) -> Path:
    """The checkout's files (those git tracks, or would: new files count, ignored ones do not)
    copied to ``into``. The build writes its egg-info and build directories there, not into the
    checkout: two test processes each build this module's dist at once, and in one directory
    their builds overwrote each other's files list (a missing file failed one of them)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is not copied
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    build(checkout_copy(tmp_path_factory.mktemp("checkout")), out)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, (
        f"expected one wheel and one sdist: {wheels + sdists}"
    )
    return Dist(wheels[0], sdists[0])


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    workdir = root / "work"
    workdir.mkdir()
    run([sys.executable, "-m", "venv", str(venv)], cwd=workdir)
    python = venv / "bin" / "python"
    run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(dist.wheel)],
        cwd=workdir,
        timeout=INSTALL_TIMEOUT,
    )
    return Installed(python, venv / "bin", workdir)


def python_says(installed: Installed, code: str) -> str:
    """What ``code`` prints when the installed copy's Python runs it."""
    return run([str(installed.python), "-c", code], cwd=installed.workdir).stdout


def source_modules() -> set[str]:
    """Every file the wheel must carry, as wheel paths."""
    expected = {"outbox/py.typed", "outbox/_migrations/script.py.mako"}
    for path in (REPO / "outbox").rglob("*.py"):
        expected.add(path.relative_to(REPO).as_posix())
    # The dashboard's pages and its script and style (package data in pyproject.toml).
    for folder in ("templates", "static"):
        for path in (REPO / "outbox" / "web" / folder).iterdir():
            expected.add(path.relative_to(REPO).as_posix())
    return expected


def test_the_wheel_carries_every_module_and_the_migrations_but_no_tests(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
    missing = sorted(source_modules() - names)
    assert not missing, (
        f"the wheel lacks {missing}: add the package to [tool.setuptools] packages in pyproject.toml"
    )
    top_level = {PurePosixPath(name).parts[0] for name in names}
    dist_info = {part for part in top_level if part.endswith(".dist-info")}
    assert top_level - dist_info == {"outbox"}, f"unexpected top-level entries: {top_level}"
    [info] = dist_info
    assert f"{info}/licenses/LICENSE" in names


def test_the_sdist_carries_the_migrations_tests_docs_and_examples(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as sdist:
        names = {
            PurePosixPath(*PurePosixPath(name).parts[1:]).as_posix() for name in sdist.getnames()
        }
    wanted = {"pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in"}
    for folder in ("outbox", "tests", "docs", "examples"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".db":
                wanted.add(path.relative_to(REPO).as_posix())
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing} (see MANIFEST.in)"


def test_one_version_number(dist: Dist, installed: Installed) -> None:
    shown = run(
        [
            str(installed.python),
            "-c",
            "import importlib.metadata as m, outbox; "
            "print(outbox.__version__, m.version('sockudo-outbox'), outbox.__file__)",
        ],
        cwd=installed.workdir,
    ).stdout.split()
    assert shown[0] == shown[1] == outbox.__version__, shown
    assert dist.wheel.name.startswith(f"sockudo_outbox-{outbox.__version__}-")
    # The installed copy, not this repository's, answered.
    assert Path(shown[2]).is_relative_to(installed.python.parent.parent), shown[2]


def test_outbox_help(installed: Installed) -> None:
    shown = run([str(installed.bin / "outbox"), "--help"], cwd=installed.workdir).stdout
    for command in ("migrate", "worker", "status", "replay", "enqueue", "demo", "web"):
        assert command in shown, shown


def test_outbox_migrate_uses_the_shipped_migrations(installed: Installed) -> None:
    database = installed.workdir / "outbox.db"
    url = f"sqlite:///{database}"
    for _ in range(2):  # and again on a schema that is already current
        run(
            [str(installed.bin / "outbox"), "migrate"],
            cwd=installed.workdir,
            OUTBOX_DATABASE_URL=url,
        )
    with sqlite3.connect(database) as conn:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        [(revision,)] = conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
    assert "outbox_events" in tables
    assert revision == migrate.head_revision()
    shown = python_says(installed, "from outbox.migrate import migrations_path as p; print(p())")
    assert Path(shown.strip()).is_relative_to(installed.python.parent.parent), shown


def test_the_installed_test_server_starts_and_accepts_a_signed_publish(
    installed: Installed,
) -> None:
    process = TestServerProcess(python=installed.python, cwd=installed.workdir)
    server = process.start()
    try:
        with Sockudo.from_url(server.url) as client:
            client.trigger("orders", "order-created", {"id": 1}, message_id="installed-1")
        [delivery] = server.deliveries("orders")
        assert (delivery.name, delivery.data) == ("order-created", '{"id":1}')
    finally:
        process.stop()
    assert process.process is not None and process.process.returncode == 0


def test_outbox_demo_runs_on_the_core_install_in_plain_lines(installed: Installed) -> None:
    """Without the demo extra (no rich, no websockets) the demo runs on the bundled server."""
    found = python_says(
        installed,
        "import importlib.util as u; print(u.find_spec('rich'), u.find_spec('websockets'))",
    )
    assert found.split() == ["None", "None"], found
    shown = run([str(installed.bin / "outbox"), "demo"], cwd=installed.workdir).stdout
    assert shown.count("  proved: ") == 5 and "NOT PROVED" not in shown, shown


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """The ``COPY`` lines of the Dockerfile: (sources, destination relative to WORKDIR)."""
    copies = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            assert not any(w.startswith("--") for w in words), f"unsupported COPY flags: {line}"
            copies.append((words[1:-1], words[-1]))
    return copies


def test_the_dockerfile_copies_everything_pip_install_needs(tmp_path: Path) -> None:
    # No Docker engine here: rebuild the image's /app from its COPY lines and build the wheel
    # there, as the image's `pip install .` does. A file the build needs (LICENSE, README.md,
    # the migrations) but the Dockerfile forgets fails here instead of in `docker compose build`.
    app = tmp_path / "app"
    app.mkdir()
    for sources, destination in dockerfile_copies():
        for source in sources:
            origin = REPO / source
            target = app / destination / (origin.name if destination.endswith("/") else "")
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    out = tmp_path / "dist"
    out.mkdir()
    build(app, out, "--wheel")
    [wheel] = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert source_modules() <= set(archive.namelist())
