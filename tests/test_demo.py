"""``outbox demo``: it runs by itself, ends by itself, and what it says it proved is true.

The command runs as users run it (a subprocess, its output in a pipe, then in a terminal); its
summary is parsed and checked against what it reported on the way, against the database it kept
(through ``outbox status``), and, against soketi, against a subscriber of the test's own. Its
checks are also fed wrong records (and a server that delivers twice) to show they fail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from outbox.demo import Facts, Refusal, Script, Seen, Transaction, prove, run
from outbox.demo.proof import latencies, percentile
from outbox.demo.scenario import ENCRYPTED_CHANNEL, PLAIN_CHANNEL, Snapshot
from outbox.demo.view import PlainView, RichView, make_view
from outbox.settings import ENVIRONMENT
from outbox.sockudo import auth
from outbox.sockudo.config import Config
from outbox.sockudo.crypto import seal
from outbox.testing.server import TestServer

OUTBOX = Path(sys.executable).with_name("outbox")
SCRIPT = Script()
#: The demo ends by itself well within this (about 10 s on a 2-core machine).
RUN_LIMIT = 120


def demo_environment(**extra: str) -> dict[str, str]:
    """The environment of a newcomer: no OUTBOX_* or SOCKUDO_* settings."""
    settings = {variable for variable, _ in ENVIRONMENT.values()}
    return {**{k: v for k, v in os.environ.items() if k not in settings}, **extra}


def summary(out: str) -> dict[str, re.Match[str]]:
    """The claims of the final summary, by what they are about."""
    text = out[out.index("What it proved:") :]
    patterns = {
        "committed": r"proved: committed (\d+) events in their transactions: each delivered "
        r"exactly once$",
        "rolled_back": r"proved: rolled back (\d+) transactions: none of their events was ever "
        r"delivered$",
        "refused": r"proved: refused 1 event \((.+)\): dead with the server's reason, then "
        r"delivered once after the replay$",
        "encrypted": rf"proved: (\d+) events to {ENCRYPTED_CHANNEL}: the server only ever had "
        r"ciphertext, which opens with the master key$",
        "settled": r"proved: the outbox ends with every committed event published \((\d+) "
        r"published, 0 pending, 0 in flight, 0 dead\)$",
        "latency": r"measured: commit to delivery: p50 \d+ ms, p95 \d+ ms, max \d+ ms over "
        r"(\d+) events; up to \d+ events/s$",
    }
    found = {name: re.search(p, text, re.M) for name, p in patterns.items()}
    return {name: m for name, m in found.items() if m is not None}


def expected_orders(*, oversized: bool) -> dict[str, list[int]]:
    """What the default script commits, per channel (the oversized order is plain)."""
    orders = range(1, SCRIPT.transactions + 1)
    committed = [o for o in orders if not SCRIPT.rolls_back(o)]
    return {
        PLAIN_CHANNEL: [o for o in committed if SCRIPT.channel(o) == PLAIN_CHANNEL],
        ENCRYPTED_CHANNEL: [o for o in committed if SCRIPT.channel(o) == ENCRYPTED_CHANNEL],
        "rolled_back": [o for o in orders if SCRIPT.rolls_back(o)],
    }


# -- the command, as users run it --------------------------------------------------------------


def test_outbox_demo_proves_what_it_says_and_it_is_true(tmp_path: Path) -> None:
    kept = tmp_path / "demo"
    done = subprocess.run(
        [OUTBOX, "demo", "--dir", str(kept)],
        env=demo_environment(),
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert done.stderr == ""
    assert "\x1b[" not in out  # a pipe gets plain lines, not the terminal view
    assert "NOT PROVED" not in out
    claims = summary(out)
    assert set(claims) == {
        "committed",
        "rolled_back",
        "refused",
        "encrypted",
        "settled",
        "latency",
    }, out
    committed = int(claims["committed"][1])
    rolled_back = int(claims["rolled_back"][1])
    expected = expected_orders(oversized=True)

    # The summary agrees with the script it announced and with what it reported on the way.
    assert f"producer: {SCRIPT.transactions} transactions" in out
    assert committed + rolled_back == SCRIPT.transactions
    assert committed == len(expected[PLAIN_CHANNEL]) + len(expected[ENCRYPTED_CHANNEL])
    assert rolled_back == len(expected["rolled_back"])
    assert int(claims["encrypted"][1]) == len(expected[ENCRYPTED_CHANNEL])
    assert int(claims["settled"][1]) == committed
    assert int(claims["latency"][1]) == committed - 1  # the oversized one waited for the replay
    reason = claims["refused"][1]
    assert reason.startswith("413 payload_too_large: ")
    assert f"order {SCRIPT.oversized_order} is dead, with the server's reason: {reason}\n" in out
    assert f"order {SCRIPT.oversized_order} delivered after the replay" in out
    assert out.index("is dead, with the server's reason") < out.index("the fix:")
    last_status = [line for line in out.splitlines() if "] done | outbox:" in line][-1]
    assert f"published {committed}, dead 0" in last_status
    assert f"delivered {committed}," in last_status

    # And the database it kept says the same, read by `outbox status` and by hand.
    database = kept / "outbox.db"
    status = subprocess.run(
        [OUTBOX, "--database-url", f"sqlite:///{database}", "status", "--json"],
        env=demo_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["counts"] == {"pending": 0, "in_flight": 0, "published": committed, "dead": 0}
    with sqlite3.connect(database) as conn:
        orders = sorted(n for (n,) in conn.execute("SELECT number FROM demo_orders"))
    assert orders == sorted(expected[PLAIN_CHANNEL] + expected[ENCRYPTED_CHANNEL])
    assert f"look around: outbox --database-url sqlite:///{database} status" in out


def test_outbox_demo_in_a_terminal_shows_the_live_table(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [OUTBOX, "demo"],
        env=demo_environment(COLUMNS="220", LINES="50", TERM="xterm-256color"),
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
    )
    os.close(secondary)
    output = bytearray()
    deadline = time.monotonic() + RUN_LIMIT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)
    text = output.decode("utf-8", "replace")
    assert code == 0, text[-3000:]
    assert "\x1b[" in text  # the live view, drawn with escape codes
    assert "outbox demo: done" in text  # the table's title at the end
    assert "commit to delivery" in text and "rolled back" in text
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert plain.count("✔ proved:") == 5 and "NOT PROVED" not in plain


@pytest.mark.soketi
async def test_outbox_demo_against_another_sockudo_delivers_what_it_says(soketi_factory) -> None:
    """With SOCKUDO_URL the demo uses that server, says so, and skips only the refused event;
    a subscriber of the test's own receives exactly what the demo says was delivered."""
    from outbox.testing.pusher_ws import PusherSubscriber

    soketi = soketi_factory(max_batch_size=10)  # soketi's own default, as OUTBOX_* says below
    config = Config.from_url(
        soketi.url, encryption_master_key_base64=base64.b64encode(b"k" * 32).decode()
    )
    async with PusherSubscriber(soketi.ws_url()) as ours:
        assert ours.socket_id is not None
        await ours.subscribe(PLAIN_CHANNEL)
        # (the channel authorization is the app secret's; the test has no master key of the demo's)
        await ours.subscribe(
            ENCRYPTED_CHANNEL, auth.authenticate(config, ours.socket_id, ENCRYPTED_CHANNEL)
        )
        process = await asyncio.create_subprocess_exec(
            OUTBOX,
            "demo",
            env=demo_environment(SOCKUDO_URL=soketi.url, OUTBOX_SERVER_BATCH_LIMIT="10"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), RUN_LIMIT)
        out = stdout.decode()
        assert process.returncode == 0, out + stderr.decode()
        expected = expected_orders(oversized=False)
        plain = await ours.wait_for(PLAIN_CHANNEL, len(expected[PLAIN_CHANNEL]), timeout=10)
        sealed = await ours.wait_for(ENCRYPTED_CHANNEL, len(expected[ENCRYPTED_CHANNEL]), 10)
        await ours.assert_no_more(PLAIN_CHANNEL, len(plain), quiet_for=0.5)
        await ours.assert_no_more(ENCRYPTED_CHANNEL, len(sealed), quiet_for=0)

    assert "server: the Sockudo at SOCKUDO_URL (http://app-key:***@" in out
    assert "app-secret" not in out
    assert "not shown against another Sockudo" in out
    claims = summary(out)
    assert set(claims) == {"committed", "rolled_back", "encrypted", "settled", "latency"}, out
    committed = int(claims["committed"][1])
    assert committed == len(plain) + len(sealed)
    assert int(claims["encrypted"][1]) == len(sealed)
    # What our own subscriber got: each committed order once, no rolled-back one, and on the
    # encrypted channel only sealed envelopes without the card numbers inside.
    assert sorted(e.json()["order"] for e in plain) == expected[PLAIN_CHANNEL]
    for event in sealed:
        assert set(json.loads(event.data)) == {"nonce", "ciphertext"}
        assert "4242" not in event.data and "card" not in event.data


def test_outbox_demo_refuses_a_folder_with_a_database_already(tmp_path: Path) -> None:
    (tmp_path / "outbox.db").write_bytes(b"")
    done = subprocess.run(
        [OUTBOX, "demo", "--dir", str(tmp_path)],
        env=demo_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert (
        done.stderr
        == f"outbox: error: {tmp_path / 'outbox.db'} exists: give a new or empty folder\n"
    )


def test_watching_another_sockudo_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from outbox.cli import main

    monkeypatch.setitem(sys.modules, "outbox.testing.pusher_ws", None)  # as if not installed
    monkeypatch.setenv("SOCKUDO_URL", "http://app-key:app-secret@127.0.0.1:9/apps/app-id")
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'sockudo-outbox[demo]'" in err and err.count("\n") == 1


def test_a_sockudo_url_without_websockets_there_is_exit_2_in_one_line(
    sockudo_server: TestServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from outbox.cli import main

    monkeypatch.setenv("SOCKUDO_URL", sockudo_server.url)  # HTTP only: no WebSocket endpoint
    assert main(["demo"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(
        f"outbox: error: cannot subscribe at ws://127.0.0.1:{sockudo_server.port}"
    )
    assert err.count("\n") == 1 and "app-secret" not in out + err
    assert "What it proved" not in out  # it stopped before claiming anything


# -- the checks fail when something is wrong ---------------------------------------------------


class Notes:
    """A view that keeps what it is told."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.snapshots: list[Snapshot] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def update(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)


async def test_the_demo_fails_when_the_server_delivers_an_event_twice() -> None:
    """A server without idempotency, and one answer lost after publishing: the worker's retry is
    delivered again, and the demo says so instead of claiming "exactly once"."""
    with TestServer(idempotency=False) as server:
        server.drop_next(count=1, stage="published")
        view = Notes()
        outcome = await run(view, server=server, script=Script(transactions=10, seconds=1.0))

    assert not outcome.proved
    committed, rolled_back, refused, _encrypted, settled = outcome.claims
    assert not committed.holds
    assert "delivered more than once: orders" in committed.text
    assert server.duplicates()
    # The outbox did its part: what it was told to roll back, refuse and replay, it did.
    assert rolled_back.holds and refused.holds and settled.holds


MASTER_KEY = bytes(range(32))


def sealed(order: int) -> str:
    plaintext = SCRIPT.data(order, oversized=False)
    return seal(ENCRYPTED_CHANNEL, plaintext, MASTER_KEY, bytes(24))


def good_facts(**changes: Any) -> Facts:
    """A run where everything held: 1 and 3 plain, 4 encrypted, 2 rolled back, 7 refused first."""
    transactions = [
        Transaction(1, PLAIN_CHANNEL, '{"order":1}', True, 10.0),
        Transaction(2, PLAIN_CHANNEL, '{"order":2}', False, 10.1),
        Transaction(4, ENCRYPTED_CHANNEL, SCRIPT.data(4, False), True, 10.2),
        Transaction(7, PLAIN_CHANNEL, '{"order":7,"big":"x"}', True, 10.3, oversized=True),
    ]
    seen = [
        Seen(PLAIN_CHANNEL, '{"order":1}', 10.05),
        Seen(ENCRYPTED_CHANNEL, sealed(4), 10.3),
        Seen(PLAIN_CHANNEL, '{"order":7,"big":"x"}', 21.0),
    ]
    values: dict[str, Any] = {
        "transactions": transactions,
        "seen": seen,
        "master_key": MASTER_KEY,
        "counts": {"pending": 0, "in_flight": 0, "published": 3, "dead": 0},
        "refusal": Refusal("413 payload_too_large: too big", 1, 20.0),
    }
    return Facts(**{**values, **changes})


def test_every_claim_holds_on_a_good_run() -> None:
    claims = prove(good_facts())
    assert [c.holds for c in claims] == [True] * 5
    assert claims[2].text.startswith("refused 1 event (413 payload_too_large: too big)")


GOOD = good_facts()
PLAIN_4 = SCRIPT.data(4, False)


@pytest.mark.parametrize(
    ("changes", "failing", "reason"),
    [
        ({"seen": [*GOOD.seen, GOOD.seen[0]]}, {0}, "delivered more than once: orders 1"),
        ({"seen": GOOD.seen[1:]}, {0}, "never delivered: orders 1"),
        (
            {"seen": [*GOOD.seen, Seen(PLAIN_CHANNEL, '{"order":99}', 11.0)]},
            {0},
            "1 deliveries of events the demo never committed",
        ),
        (
            {"seen": [Seen("elsewhere", '{"order":1}', 10.05), *GOOD.seen[1:]]},
            {0},
            "never delivered: orders 1",
        ),
        (
            {"seen": [*GOOD.seen, Seen(PLAIN_CHANNEL, '{"order":2}', 11.0)]},
            {1},
            "delivered orders 2",
        ),
        ({"transactions": [t for t in GOOD.transactions if t.committed]}, {1}, "nothing was"),
        (
            {"refusal": Refusal(None, 1, 20.0)},
            {2},
            "it was never seen dead",
        ),
        ({"refusal": Refusal("413 x", 0, 20.0)}, {2}, "the replay put back 0 events"),
        ({"refusal": Refusal("413 x", 1, 22.0)}, {2}, "delivered before the replay"),
        (
            {"seen": [GOOD.seen[0], Seen(ENCRYPTED_CHANNEL, PLAIN_4, 10.3), GOOD.seen[2]]},
            {0, 3},
            "plaintext of orders 4 seen",
        ),
        (
            {"seen": [*GOOD.seen, Seen(PLAIN_CHANNEL, f"copy: {PLAIN_4}", 10.4)]},
            {0, 3},
            "plaintext of orders 4 seen",
        ),
        (
            {"seen": [GOOD.seen[0], Seen(ENCRYPTED_CHANNEL, sealed(4)[:-8] + '"}', 10.3)]},
            {0, 2, 3},
            "1 do not open with the master key",
        ),
        (
            {"counts": {"pending": 1, "in_flight": 0, "published": 2, "dead": 0}},
            {4},
            "3 were committed",
        ),
        (
            {"counts": {"pending": 0, "in_flight": 0, "published": 3, "dead": 1}},
            {4},
            "0 in flight, 1 dead",
        ),
    ],
    ids=[
        "duplicate",
        "missing",
        "stranger",
        "wrong-channel",
        "rolled-back-delivered",
        "nothing-rolled-back",
        "never-dead",
        "not-replayed",
        "before-the-replay",
        "plaintext-on-encrypted-channel",
        "plaintext-elsewhere",
        "does-not-open",
        "outbox-not-drained",
        "outbox-has-dead",
    ],
)
def test_a_claim_fails_when_its_records_are_wrong(
    changes: dict[str, Any], failing: set[int], reason: str
) -> None:
    claims = prove(good_facts(**changes))
    assert {i for i, c in enumerate(claims) if not c.holds} == failing
    assert any(reason in c.text and " - NO: " in c.text for c in claims), claims


def test_latencies_leave_out_the_replayed_event_and_percentiles_are_nearest_rank() -> None:
    assert sorted(round(x, 3) for x in latencies(GOOD)) == [0.05, 0.1]
    assert percentile([0.4, 0.1, 0.3, 0.2], 0.5) == 0.2
    assert percentile([0.4, 0.1, 0.3, 0.2], 0.95) == 0.4
    assert percentile([], 0.5) is None


def test_the_script_keeps_its_oversized_order_among_the_committed_ones() -> None:
    assert not SCRIPT.rolls_back(SCRIPT.oversized_order)
    assert SCRIPT.channel(SCRIPT.oversized_order) == PLAIN_CHANNEL
    with pytest.raises(ValueError, match="must be one of the committed ones"):
        Script(oversized_order=SCRIPT.rollback_every)
    with pytest.raises(ValueError, match="must be one of the committed ones"):
        Script(transactions=5, oversized_order=7)


class Terminal:
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_the_view_is_live_on_a_terminal_with_rich_and_plain_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(make_view(Terminal()), RichView)  # type: ignore[arg-type]
    assert isinstance(make_view(open(os.devnull, "w")), PlainView)  # noqa: SIM115
    monkeypatch.setitem(sys.modules, "rich", None)  # the demo extra not installed
    assert isinstance(make_view(Terminal()), PlainView)  # type: ignore[arg-type]
