"""Operating a worker: /metrics, /healthz and /readyz of a real worker process through a drain, an
outage and refused credentials; JSON logs that never show the secret; the health server's
answers and the pure decisions behind them.

Workers are real subprocesses (``outbox worker``) against the in-process test server, whose fault
injection takes the endpoint down and up. Nothing is timed: every wait polls with a wide deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from outbox import OutboxEvent, enqueue_many, outbox_table
from outbox.database import create_engine
from outbox.health import readiness
from outbox.logs import JsonFormatter, TextFormatter, secrets_in
from outbox.settings import Settings, SettingsError
from outbox.sockudo.errors import (
    RESULT_BACKPRESSURE,
    RESULT_NETWORK,
    RESULT_OK,
    RESULT_RATE_LIMITED,
    RESULT_REFUSED,
    RESULT_UNAUTHORIZED,
    RESULT_UNAVAILABLE,
    ClientMisconfigured,
    EndpointUnavailable,
    EventRefused,
    request_result,
)
from outbox.testing.worker_process import WorkerProcess
from outbox.worker import Worker
from tests.helpers.waiting import wait_until
from tests.outbox_rows import EV

T = outbox_table()
#: How long a wait for a worker process may take: wide, since nothing here is timed.
WAIT = 60.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample; the table label is implied (every metric carries it)."""
    key = (name, frozenset({"table": "outbox_events", **labels}.items()))
    assert key in samples, f"{name}{labels} not exposed; have {sorted(n for n, _ in samples)}"
    return samples[key]


def ready(port: int) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
    return response.status_code, response.json()


def enqueue_events(engine: sa.Engine, n: int) -> None:
    with engine.begin() as conn:
        enqueue_many(conn, [OutboxEvent("orders", "created", {"n": i}) for i in range(n)])


def worker_process(
    database_url: str, sockudo_url: str, tmp_path: Path, port: int, **settings: object
) -> WorkerProcess:
    values: dict[str, object] = {
        "poll_interval": 0.05,
        "backoff_min_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "request_timeout": 5,
        "lease_seconds": 10,
        "retention_seconds": 0,
        "metrics_port": port,
    }
    return WorkerProcess(
        database_url, sockudo_url, tmp_path / "worker.log", **{**values, **settings}
    ).start()


# -- a real worker, scraped --------------------------------------------------------------------


def test_worker_is_scraped_through_a_drain_and_an_outage(database_url, sockudo_server, tmp_path):
    engine = create_engine(database_url)
    port = free_port()
    worker = worker_process(database_url, sockudo_server.url, tmp_path, port, batch_size=50)
    try:
        worker.wait_until_started()
        # Green on an empty queue, and alive.
        wait_until(lambda: ready(port)[0] == 200, "/readyz green on an empty queue", timeout=WAIT)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).text == "ok\n"
        before = scrape(port)
        assert value(before, "outbox_events_total", outcome="published") == 0
        assert value(before, "outbox_rows", state="pending") == 0
        assert value(before, "outbox_oldest_pending_age_seconds") == 0
        assert value(before, "outbox_parked_keys") == 0
        assert value(before, "outbox_database_up") == 1
        assert value(before, "outbox_breaker_state") == 0

        # A drain: the counters follow the events.
        sockudo_server.add_latency(0.05, stage="claimed")
        enqueue_events(engine, 300)
        published_seen = []

        def drained() -> bool:
            samples = scrape(port)
            published_seen.append(value(samples, "outbox_events_total", outcome="published"))
            return published_seen[-1] == 300

        wait_until(drained, "300 published in the metrics", timeout=WAIT)
        assert published_seen == sorted(published_seen)  # a counter only goes up
        after = scrape(port)
        assert value(after, "outbox_rows", state="pending") == 0
        assert value(after, "outbox_rows", state="in_flight") == 0
        ok_batches = value(
            after, "outbox_publish_requests_total", endpoint="batch_events", result="ok"
        )
        assert ok_batches == sockudo_server.request_count("batch_events") == 6  # 300 / 50
        assert value(after, "outbox_commit_to_ack_seconds_count") == 300
        assert value(after, "outbox_claim_batch_size_sum") == 300
        assert value(after, "outbox_ack_duration_seconds_count") == 6
        assert value(after, "outbox_claim_duration_seconds_count") >= 6
        assert sockudo_server.delivered_count() == 300

        # An outage: the oldest-age gauge rises, /readyz goes red and says why.
        sockudo_server.clear_faults()
        sockudo_server.go_down()
        enqueue_events(engine, 20)
        wait_until(
            lambda: ready(port)[0] == 503, "/readyz red while the endpoint is down", timeout=WAIT
        )
        problems = ready(port)[1]["problems"]
        assert any("publishing is paused" in p for p in problems), problems
        first_age = value(scrape(port), "outbox_oldest_pending_age_seconds")
        wait_until(
            lambda: value(scrape(port), "outbox_oldest_pending_age_seconds") > first_age + 1.0,
            "the oldest age to rise during the outage",
            timeout=WAIT,
        )
        down = scrape(port)
        assert (
            value(down, "outbox_rows", state="pending")
            + value(down, "outbox_rows", state="in_flight")
            == 20
        )
        assert (
            value(
                down,
                "outbox_publish_requests_total",
                endpoint="batch_events",
                result=RESULT_NETWORK,
            )
            >= 1
        )
        assert value(down, "outbox_pauses_total", reason="endpoint") >= 1
        assert value(down, "outbox_events_total", outcome="published") == 300
        assert value(down, "outbox_events_total", outcome="retried") >= 1

        # Back up: everything goes out, the age falls to nothing, /readyz is green again.
        sockudo_server.come_up()
        wait_until(lambda: ready(port)[0] == 200, "/readyz green after the outage", timeout=WAIT)
        wait_until(
            lambda: value(scrape(port), "outbox_events_total", outcome="published") == 320,
            "the outage's events published",
            timeout=WAIT,
        )
        # (The gauges may come from a snapshot up to a second old: wait for a fresh one.)
        wait_until(
            lambda: value(scrape(port), "outbox_oldest_pending_age_seconds") == 0,
            "the oldest age to fall after the outage",
            timeout=WAIT,
        )
        recovered = scrape(port)
        assert value(recovered, "outbox_rows", state="pending") == 0
        assert value(recovered, "outbox_breaker_state") == 0
        assert value(recovered, "outbox_events_total", outcome="dead") == 0
        assert worker.terminate() == 0
    finally:
        worker.close()
        engine.dispose()
    assert sockudo_server.delivered_count() == 320
    assert not sockudo_server.duplicates()


#: A secret with what breaks naive quoting: quotes, a backslash, URL delimiters, a percent sign,
#: non-ASCII and a JSON escape look-alike.
ODD_SECRET = 'p"a\\ss/wö%rd?#@x\\u0041'


def test_refused_credentials_turn_readyz_red_and_json_logs_never_show_the_secret(
    database_url, sockudo_server, tmp_path
):
    engine = create_engine(database_url)
    enqueue_events(engine, 3)
    port = free_port()
    wrong = f"http://app-key:{ODD_SECRET}@127.0.0.1:{sockudo_server.port}/apps/app-id"
    worker = worker_process(
        database_url,
        wrong,
        tmp_path,
        port,
        log_format="json",
        misconfigured_retry_seconds=60,
    )
    try:
        worker.wait_for_log("refused this worker's credentials")
        wait_until(
            lambda: ready(port)[0] == 503, "/readyz red on refused credentials", timeout=WAIT
        )
        body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).text
        assert "refused this worker's credentials" in body
        samples = scrape(port)
        assert value(samples, "outbox_pauses_total", reason="misconfigured") == 1
        assert value(samples, "outbox_breaker_state") == 1
        assert value(samples, "outbox_rows", state="pending") == 3  # nothing lost, nothing dead
        assert worker.terminate() == 0
    finally:
        worker.close()
        engine.dispose()
    log = worker.log_text()
    lines = log.splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any("***" in e["message"] for e in entries)
    assert any(e["level"] == "ERROR" and "credentials" in e["message"] for e in entries)
    for form in (ODD_SECRET, json.dumps(ODD_SECRET)[1:-1], "wö%rd", "wö", "\\u00f6%rd"):
        assert form not in log, form
        assert form not in body, form
    assert not any("wö%rd" in e["message"] for e in entries)


def test_readyz_is_red_while_the_database_fails_and_green_after(tmp_path, sockudo_server):
    """An in-process worker whose table disappears (renamed away): its claims fail, /readyz
    says so; renamed back, it recovers."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    from outbox import migrate

    engine = create_engine(url)
    migrate.upgrade(engine)
    settings = Settings(
        database_url=url,
        sockudo_url=sockudo_server.url,
        poll_interval=0.05,
        retention_seconds=0,
        metrics_port=0,
    )
    worker = Worker(settings, engine=engine)

    def rename(old: str, new: str) -> None:
        with engine.begin() as conn:
            conn.execute(sa.text(f'ALTER TABLE "{old}" RENAME TO "{new}"'))

    async def scenario() -> None:
        run = asyncio.create_task(worker.run())
        try:
            port = await _health_port(worker)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

                async def status() -> int:
                    return (await http.get("/readyz")).status_code

                await _until_async(lambda: status(), 200)
                await asyncio.to_thread(rename, "outbox_events", "outbox_events_away")
                await _until_async(lambda: status(), 503)
                problems = (await http.get("/readyz")).json()["problems"]
                assert any("the database failed" in p for p in problems), problems
                metrics = (await http.get("/metrics")).text
                assert 'outbox_database_up{table="outbox_events"} 0.0' in metrics
                assert "outbox_oldest_pending_age_seconds" not in metrics.split("# HELP")[-1]
                await asyncio.to_thread(rename, "outbox_events_away", "outbox_events")
                await _until_async(lambda: status(), 200)
                assert (await http.get("/healthz")).text == "ok\n"
        finally:
            worker.stop()
            await run

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


async def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _health_port(worker: Worker) -> int:
    """The port the worker's health server opened (its settings ask for any free one: 0)."""
    await _until(lambda: (h := worker.observer.health) is not None and h.port != 0)
    return worker.observer.health.port  # type: ignore[union-attr]


async def _until_async(read: Callable[[], Any], expected: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await read()) != expected:
        assert time.monotonic() < deadline, f"still {got!r}, expected {expected!r}"
        await asyncio.sleep(0.05)


def test_health_server_answers_only_its_three_paths(tmp_path, sockudo_server):
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    settings = Settings(database_url=url, sockudo_url=sockudo_server.url, metrics_port=0)
    worker = Worker(settings)

    async def scenario() -> None:
        run = asyncio.create_task(worker.run())
        try:
            port = await _health_port(worker)
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/nope")).status_code == 404
                assert (await http.post("/metrics")).status_code == 405
                assert (await http.get("/healthz?x=1")).text == "ok\n"
            # A client that never finishes its request is dropped, and the server goes on.
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/healthz")).status_code == 200
            writer.close()
        finally:
            worker.stop()
            await run

    asyncio.run(scenario())
    worker.engine.dispose()


def test_a_metrics_port_without_prometheus_client_is_a_clear_settings_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_prometheus(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("prometheus_client"):
            raise ModuleNotFoundError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_prometheus)
    with pytest.raises(SettingsError, match=r"pip install 'sockudo-outbox\[metrics\]'"):
        Worker(Settings(database_url="sqlite://", metrics_port=9000))


# -- the decisions, without I/O ----------------------------------------------------------------


def test_readiness_decision():
    fine = readiness(since_progress=0.5, window=15, database_errors_in_a_row=0, paused_because=None)
    assert fine.ready and fine.problems == []
    starting = readiness(
        since_progress=None, window=15, database_errors_in_a_row=0, paused_because=None
    )
    assert not starting.ready and "starting" in starting.problems[0]
    stuck = readiness(since_progress=16, window=15, database_errors_in_a_row=0, paused_because=None)
    assert stuck.problems == ["the claim loop made no progress for 16 s"]
    assert readiness(
        since_progress=15, window=15, database_errors_in_a_row=0, paused_because=None
    ).ready
    everything = readiness(
        since_progress=99, window=15, database_errors_in_a_row=2, paused_because="down"
    )
    assert len(everything.problems) == 3 and not everything.ready
    assert json.loads(everything.as_json())["problems"][2] == "publishing is paused: down"


@pytest.mark.parametrize(
    ("exc", "result"),
    [
        (None, RESULT_OK),
        (EventRefused("too big", status=413, code="payload_too_large"), RESULT_REFUSED),
        (ClientMisconfigured("bad signature", status=401), RESULT_UNAUTHORIZED),
        (EndpointUnavailable("slow down", status=429), RESULT_RATE_LIMITED),
        (EndpointUnavailable("busy", status=503, code="backpressure"), RESULT_BACKPRESSURE),
        (EndpointUnavailable("oops", status=500), RESULT_UNAVAILABLE),
        (EndpointUnavailable("connection refused", maybe_delivered=False), RESULT_NETWORK),
    ],
)
def test_request_result_classes(exc, result):
    assert request_result(exc) == result


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    record = logging.LogRecord("outbox.worker", logging.ERROR, __file__, 1, message, args, None)
    if exc:
        try:
            raise ValueError(f"boom {ODD_SECRET}")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
    return record


def test_log_formatters_mask_a_secret_in_every_form():
    secrets = secrets_in(
        {
            "SOCKUDO_URL": f"http://key:{ODD_SECRET}@host/apps/1",
            "OUTBOX_DATABASE_URL": "postgresql://u:db-pass-1@db/outbox",
            "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64": "bWFzdGVyLWtleQ==",
        }
    )
    assert set(secrets) == {ODD_SECRET, "db-pass-1", "bWFzdGVyLWtleQ=="}
    record = _record("url %s then %s and db-pass-1", ODD_SECRET, "bWFzdGVyLWtleQ==", exc=True)
    line = JsonFormatter(secrets).format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "url *** then *** and ***"
    assert ODD_SECRET not in entry["exception"] and "***" in entry["exception"]
    assert entry["level"] == "ERROR" and entry["logger"] == "outbox.worker"
    text = TextFormatter(secrets).format(_record("secret %s", ODD_SECRET))
    assert text.endswith("ERROR outbox.worker: secret ***")
    # Short values would blank out ordinary words: not treated as secrets.
    assert JsonFormatter(["ab"]).format(_record("ab cd")).count("ab cd") == 1


def test_a_metrics_port_in_use_stops_the_worker_with_one_line(database_url, tmp_path):
    """Before any claim: nothing is taken from the queue by a worker that cannot be watched."""
    engine = create_engine(database_url)
    enqueue_events(engine, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = WorkerProcess(
            database_url,
            "http://app-key:app-secret@127.0.0.1:9/apps/app-id",
            tmp_path / "worker.log",
            metrics_port=port,
        ).start()
        try:
            code = worker.wait(timeout=60)
        finally:
            worker.close()
    assert code == 1
    errors = [line for line in worker.log_text().splitlines() if line.startswith("outbox: error:")]
    assert errors == [
        f"outbox: error: cannot serve metrics on 127.0.0.1:{port} "
        "(OUTBOX_METRICS_HOST/OUTBOX_METRICS_PORT): Address already in use"
    ]
    assert "Traceback" not in worker.log_text()
    with engine.connect() as conn:
        assert conn.execute(sa.select(EV.c.status)).scalars().all() == ["pending"]
    engine.dispose()
