"""Two tiers of tests: ``pytest`` needs nothing but this checkout; ``pytest --full`` needs it all.

The self-contained tier (plain ``pytest``) runs on SQLite with the test server in process: no
database server, no browser, no download. The full tier adds what needs a service or the
network, each test marked for what it needs:

* ``postgres`` / ``mariadb``: the database servers. A test is marked for them by its ``backend``
  (or ``server``) parameter, by the database fixtures it takes, or by hand where it reaches a
  server itself. Outside ``--full``, a database runs when it is configured
  (``OUTBOX_TEST_POSTGRES_URL``, ``OUTBOX_TEST_MARIADB_URL``): a configured server that does not
  answer fails its tests, one that is not configured is named in the header, never skipped.
* ``soketi`` (npm), ``browser`` (Debian's chromium), ``package`` (PyPI, and Debian's
  docker-compose), ``faults`` (long crash suites): ``--full`` only.

``bash .ci/run`` provisions all of it on a Debian machine (installs and starts the database
servers, creates their databases, installs chromium) and runs ``pytest --full``.
"""

from __future__ import annotations

import os

import pytest

#: The markers of what a test needs beyond this checkout, and the name the header gives each.
NEEDS = {
    "postgres": "PostgreSQL",
    "mariadb": "MariaDB",
    "soketi": "soketi",
    "browser": "the browser",
    "package": "the package, image and compose builds",
    "faults": "the fault suites",
}
#: The database servers, by marker: the variable that configures each outside ``--full``.
DATABASES = {"postgres": "OUTBOX_TEST_POSTGRES_URL", "mariadb": "OUTBOX_TEST_MARIADB_URL"}
#: Backend names (as the database fixtures take them) -> marker.
BACKEND_MARKERS = {"postgresql": "postgres", "mariadb": "mariadb"}
#: Fixtures that reach a service, a registry or the browser.
FIXTURE_MARKERS = {
    "postgres_server": "postgres",
    "postgres_url": "postgres",
    "mariadb_server": "mariadb",
    "mariadb_url": "mariadb",
    "soketi_install": "soketi",
    "browser": "browser",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="the full tier: PostgreSQL and MariaDB (at OUTBOX_TEST_POSTGRES_URL and "
        "OUTBOX_TEST_MARIADB_URL, or their local defaults), soketi, chromium, the package and "
        "image builds and the fault suites (`bash .ci/run` provisions them and runs this)",
    )


#: Processes each tier runs on (pytest-xdist): the tests wait more than they compute (a
#: worker's backoff, a server's latency, a killed process's restart), so two keep both cores of
#: a small machine busy: the self-contained tier in about two minutes, the full tier in about
#: ten instead of twenty-seven on one. Every test owns its database, server and ports, and
#: timing-sensitive tests wait on conditions with margins, never on a quiet machine.
PROCESSES = 2
#: The full tier names its slowest tests at the end, so a run that grows shows where.
FULL_TIER_DURATIONS = 25


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Without ``-n``: either tier on :data:`PROCESSES` processes."""
    if hasattr(config, "workerinput"):
        return  # one of the processes themselves
    full = config.getoption("--full")
    if full and not config.getoption("durations", None):
        config.option.durations = FULL_TIER_DURATIONS
    if getattr(config.option, "numprocesses", "absent") is not None:
        return  # given on the command line, or pytest-xdist is not installed
    if config.getoption("usepdb", False) or config.getoption("collectonly", False):
        return
    config.option.numprocesses = PROCESSES


def enabled(config: pytest.Config) -> set[str]:
    """The markers this run runs."""
    if config.getoption("--full"):
        return set(NEEDS)
    return {marker for marker, variable in DATABASES.items() if os.environ.get(variable)}


def needs(item: pytest.Item) -> set[str]:
    """What ``item`` needs beyond this checkout (its markers, explicit or inferred)."""
    found = {m.name for m in item.iter_markers() if m.name in NEEDS}
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        for value in callspec.params.values():
            if isinstance(value, str) and value in BACKEND_MARKERS:
                found.add(BACKEND_MARKERS[value])
    for fixture in getattr(item, "fixturenames", ()):
        if fixture in FIXTURE_MARKERS:
            found.add(FIXTURE_MARKERS[fixture])
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runs = enabled(config)
    kept: list[pytest.Item] = []
    left: list[pytest.Item] = []
    for item in items:
        needed = needs(item)
        for marker in needed:
            item.add_marker(marker)
        (kept if needed <= runs else left).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept
    config.stash[_LEFT_OUT] = {m for item in left for m in needs(item)}


_LEFT_OUT = pytest.StashKey[set[str]]()


def pytest_report_header(config: pytest.Config) -> str:
    runs = enabled(config)
    if runs == set(NEEDS):
        return "tier: full (SQLite, PostgreSQL, MariaDB, soketi, chromium, builds, fault suites)"
    ran = ["SQLite"] + [NEEDS[m] for m in DATABASES if m in runs]
    missing = [
        f"{NEEDS[m]} (set {DATABASES[m]})" if m in DATABASES else NEEDS[m]
        for m in NEEDS
        if m not in runs
    ]
    return (
        f"tier: self-contained ({', '.join(ran)}, the test server in process); not run: "
        f"{', '.join(missing)}; `bash .ci/run` provisions and runs everything (`pytest --full`)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    left = terminalreporter.config.stash.get(_LEFT_OUT, set())
    if left:
        names = ", ".join(NEEDS[m] for m in NEEDS if m in left)
        terminalreporter.write_line(
            f"not run in this tier: the tests that need {names} (`bash .ci/run` runs them)"
        )
