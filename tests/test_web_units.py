"""The dashboard's pure decisions, without a server or a database: who may ask (outbox.web.security)
and what the pages show and the forms mean (outbox.web.views)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import math
import re
import uuid

import pytest
import sqlalchemy as sa

from outbox import admin
from outbox.admin import EventRecord, ReplayFilter, StatusReport, ThroughputBucket
from outbox.web import views
from outbox.web.security import (
    CONTENT_SECURITY_POLICY,
    Credentials,
    Sessions,
    WebConfigError,
    WebOptions,
    host_allowed,
    host_name,
    is_loopback,
    same_origin,
    security_headers,
)

TOKEN = "a-token-of-32-characters-exactly"
#: A secret with every character that could break naive masking or quoting.
ODD_SECRET = "p@ss:wörd \"'\\\n\t%s{}<>&=;" + "z" * 16
T0 = dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)


# -- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_host_name_and_host_allowed():
    assert host_name("127.0.0.1:8025") == "127.0.0.1"
    assert host_name("[::1]:8025") == "[::1]"
    assert host_name("localhost") == "localhost"
    none, token = Credentials(), Credentials(token=TOKEN)
    assert host_allowed("localhost:8025", none) and host_allowed("[::1]:1", none)
    assert not host_allowed("rebound.example:8025", none)
    assert not host_allowed(None, none) and not host_allowed("", none)
    assert host_allowed("dashboard.internal:8025", token)


# -- credentials and options --------------------------------------------------------------------


def test_credentials_from_the_environment():
    assert not Credentials.from_env({}).required
    assert not Credentials.from_env({"OUTBOX_WEB_TOKEN": ""}).required
    assert Credentials.from_env({"OUTBOX_WEB_TOKEN": TOKEN}).token == TOKEN
    basic = Credentials.from_env({"OUTBOX_WEB_BASIC_AUTH": f"ops:{ODD_SECRET}"})
    assert (basic.basic_user, basic.basic_password, basic.required) == ("ops", ODD_SECRET, True)
    for environ in (
        {"OUTBOX_WEB_TOKEN": "short-Secret-15"},
        {"OUTBOX_WEB_BASIC_AUTH": "ops"},
        {"OUTBOX_WEB_BASIC_AUTH": f":{ODD_SECRET}"},
        {"OUTBOX_WEB_BASIC_AUTH": "ops:short-Secret"},
    ):
        with pytest.raises(WebConfigError) as raised:
            Credentials.from_env(environ)
        assert "Secret" not in str(raised.value)


def test_credentials_never_show_a_secret_in_their_repr():
    both = Credentials(token=ODD_SECRET, basic_user="ops", basic_password=ODD_SECRET)
    for shown in (repr(both), str(both), both.kinds, repr(WebOptions(credentials=both))):
        assert ODD_SECRET not in shown and "wörd" not in shown
    assert both.kinds == "token, basic"
    assert Credentials(token=TOKEN).kinds == "token" and Credentials().kinds == "none"


def test_authorization_headers():
    token = Credentials(token=ODD_SECRET)
    assert token.accepts_authorization(f"Bearer {ODD_SECRET}")
    assert token.accepts_authorization(f"bearer {TOKEN}") is False
    assert token.accepts_token(ODD_SECRET) and not token.accepts_token(ODD_SECRET[:-1])
    assert not token.accepts_authorization(None) and not token.accepts_authorization("")
    assert not token.accepts_authorization(_basic("ops", ODD_SECRET))  # no basic configured
    assert not Credentials().accepts_authorization("Bearer ")
    assert not Credentials().accepts_token("")

    basic = Credentials(basic_user="ops", basic_password=ODD_SECRET)
    assert basic.accepts_authorization(_basic("ops", ODD_SECRET))
    assert basic.accepts_authorization(_basic("ops", ODD_SECRET).replace("Basic", "BASIC"))
    for header in (
        _basic("ops", ODD_SECRET + "x"),
        _basic("root", ODD_SECRET),
        _basic("ops", ""),
        "Basic not-base64!",
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        f"Bearer {ODD_SECRET}",
    ):
        assert not basic.accepts_authorization(header), header


def test_options_refuse_an_open_address_without_credentials():
    assert WebOptions().host == "127.0.0.1"
    WebOptions(host="localhost")
    WebOptions(host="0.0.0.0", credentials=Credentials(token=TOKEN))
    with pytest.raises(
        WebConfigError, match=re.escape("refusing to serve the dashboard on 0.0.0.0")
    ):
        WebOptions(host="0.0.0.0")
    with pytest.raises(WebConfigError, match="port"):
        WebOptions(port=70000)
    with pytest.raises(WebConfigError, match="refresh"):
        WebOptions(refresh_seconds=0)
    options = WebOptions.from_env({"OUTBOX_WEB_TOKEN": TOKEN}, host="::", write=True)
    assert (options.host, options.write, options.credentials.token) == ("::", True, TOKEN)


@pytest.mark.parametrize("seconds", [math.inf, math.nan, -1.0, 0.0, 0.5, 3601.0, 25 * 86400.0])
def test_the_live_refresh_is_bounded(seconds):
    # inf made every page a 500 (int(inf * 1000)); 25 days overflowed the browser's timer.
    with pytest.raises(WebConfigError) as raised:
        WebOptions(refresh_seconds=seconds)
    assert str(raised.value).startswith("--refresh must be between 1 and 3600 seconds, got ")


def test_the_live_refresh_bounds_themselves_are_accepted():
    assert WebOptions(refresh_seconds=1).refresh_seconds == 1
    assert WebOptions(refresh_seconds=3600.0).refresh_seconds == 3600.0


# -- sessions and CSRF --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_cookie_is_signed_and_expires():
    clock = Clock()
    sessions = Sessions(max_age=3600, clock=clock)
    session, cookie = sessions.issue(authenticated=True)
    assert sessions.read(cookie) == session and session.authenticated
    anonymous, anonymous_cookie = sessions.issue(authenticated=False)
    assert not sessions.read(anonymous_cookie).authenticated
    assert anonymous.id != session.id

    session_id, issued, _, mac = anonymous_cookie.split(".")
    for forged in (
        f"{session_id}.{issued}.1.{mac}",  # logged in by hand
        f"{session_id}.{int(issued) + 3600}.0.{mac}",  # made to last longer
        cookie[:-1] + ("A" if cookie[-1] != "A" else "B"),
        Sessions(clock=clock).issue(authenticated=True)[1],  # another key (another process)
        "",
        "a.b",
        "a.b.c.d.e",
        "x" * 5000,
        None,
    ):
        assert sessions.read(forged) is None, forged

    clock.now += 3599
    assert sessions.read(cookie) == session
    clock.now += 1
    assert sessions.read(cookie) is None
    clock.now -= 7200  # issued "in the future": a clock gone back, or a forgery
    assert sessions.read(cookie) is None


def test_the_csrf_token_is_bound_to_its_session():
    sessions = Sessions()
    first, _ = sessions.issue(authenticated=False)
    second, _ = sessions.issue(authenticated=False)
    token = sessions.csrf_token(first)
    assert sessions.accepts_csrf(first, token)
    assert not sessions.accepts_csrf(second, token)
    assert not sessions.accepts_csrf(first, token[:-1])
    assert not sessions.accepts_csrf(first, "") and not sessions.accepts_csrf(first, None)
    assert not sessions.accepts_csrf(None, token)
    assert not Sessions().accepts_csrf(first, token)  # a restart ends every session
    assert "key" not in repr(sessions).lower()


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, True),  # not a browser: the CSRF token guards it
        ({"host": "h:1", "origin": "http://h:1", "sec-fetch-site": "same-origin"}, True),
        ({"host": "h:1", "origin": "https://h:1"}, True),  # TLS ends at a proxy
        ({"host": "h:1", "sec-fetch-site": "none"}, True),  # typed by the user
        ({"host": "h:1", "origin": "http://evil:1"}, False),
        ({"host": "h:1", "origin": "http://h:2"}, False),
        ({"host": "h:1", "origin": "null"}, False),
        ({"origin": "http://h:1"}, False),  # no Host to compare with
        ({"host": "h:1", "origin": "http://h:1", "sec-fetch-site": "same-site"}, False),
        ({"host": "h:1", "origin": "http://h:1", "sec-fetch-site": "cross-site"}, False),
        ({"host": "h:1", "sec-fetch-site": "cross-site"}, False),
    ],
)
def test_same_origin(headers, allowed):
    assert same_origin(headers) is allowed


def test_security_headers():
    page, static = security_headers(static=False), security_headers(static=True)
    assert page["content-security-policy"] == static["content-security-policy"]
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    assert page["x-frame-options"] == "DENY" and page["cache-control"] == "no-store"
    assert page["referrer-policy"] == "same-origin"  # no-referrer makes Chrome send Origin: null
    assert static["cache-control"] == "no-cache"


# -- forms --------------------------------------------------------------------------------------


def test_the_dead_filter_from_a_form():
    query = views.DeadQuery.from_form(
        {"channel": ["  orders "], "event": [""], "error": ["413"], "since": ["2026-01-01T10:00"]}
    )
    assert query.fields() == {"channel": "orders", "error": "413", "since": "2026-01-01T10:00"}
    assert query.selection() == ReplayFilter(
        statuses=("dead",), channel="orders", error_code="413", since=T0
    )
    zoned = views.DeadQuery(until="2026-01-01T12:00+02:00").selection(limit=5)
    assert (zoned.until, zoned.limit) == (T0, 5)
    assert views.DeadQuery.from_form({"channel": ["x" * 5000]}).channel == "x" * views.FIELD_MAX
    with pytest.raises(views.FormError, match="since: not an ISO 8601 time: 'yesterday'"):
        views.DeadQuery(since="yesterday").selection()
    assert views.DeadQuery().selection() == ReplayFilter(statuses=("dead",))


@pytest.mark.parametrize(
    ("field", "text", "message"),
    [
        ("error", "²", "error: an HTTP status is 100 to 999 in ASCII digits, got '²'"),
        ("error", "٤١٣", "error: an HTTP status is 100 to 999"),  # Arabic-Indic digits
        ("error", "9" * 20, "error: an HTTP status is 100 to 999"),
        ("error", "99", "error: an HTTP status is 100 to 999"),
        ("error", "1000", "error: an HTTP status is 100 to 999"),
        ("error", "x" * 65, "error: an error code is 1 to 64 printable characters"),
        ("error", "bad\x7fcode", "error: an error code is 1 to 64 printable characters"),
        ("since", "0001-01-01T00:00+01:00", "since: a time from 1970 to 9999 (in UTC)"),
        ("since", "1969-12-31T23:59:59", "since: a time from 1970 to 9999"),
        ("until", "9999-12-31T23:30-01:00", "until: a time from 1970 to 9999"),
        ("channel", "a\x00b", "channel: a NUL character matches nothing"),
        ("event", "\x00", "event: a NUL character matches nothing"),
    ],
)
def test_a_filter_value_no_database_could_compare_is_the_forms_error(field, text, message):
    with pytest.raises(views.FormError) as raised:
        views.DeadQuery(**{field: text}).selection()
    assert str(raised.value).startswith(message)


def test_filter_values_at_the_edges_of_their_ranges_are_kept():
    for code in ("100", "999", "413", "payload_too_large", "x" * 64, "é-code"):
        assert views.DeadQuery(error=code).selection().error_code == code
    edges = views.DeadQuery(since="1970-01-01T00:00", until="9999-12-31T23:59:59.999999")
    selection = edges.selection()
    assert (selection.since, selection.until) == admin.FILTER_TIMES
    # Converted to UTC: 01:00 at +01:00 is the first moment of 1970.
    assert (
        views.DeadQuery(since="1970-01-01T01:00+01:00").selection().since == (admin.FILTER_TIMES[0])
    )


def test_a_replay_filter_made_in_code_is_checked_too():
    with pytest.raises(admin.FilterError, match="HTTP status"):
        ReplayFilter(error_code="²")
    with pytest.raises(admin.FilterError, match="1970 to 9999"):
        ReplayFilter(since=dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))))


def test_a_replay_request_from_a_form():
    one = views.ReplayRequest.from_form({"one": ["7"], "scope": ["ids"], "ids": ["8", "9"]})
    assert (one.ids, one.key, one.expected, one.scope) == ((7,), "fresh", None, "ids")
    assert one.selection() == ReplayFilter(statuses=("dead",), ids=(7,))

    ticked = views.ReplayRequest.from_form(
        {"scope": ["ids"], "ids": ["9", "8", "9"], "key": ["keep"], "expected": ["2"]}
    )
    assert (ticked.ids, ticked.key) == ((9, 8), admin.KEY_KEEP)
    assert ticked.selection() == ReplayFilter(statuses=("dead",), ids=(9, 8), limit=2)

    matching = views.ReplayRequest.from_form(
        {"scope": ["filter"], "channel": ["audit"], "ids": ["1"], "expected": ["3"]}
    )
    assert (matching.ids, matching.scope) == ((), "filter")
    assert matching.selection() == ReplayFilter(statuses=("dead",), channel="audit", limit=3)

    for form, message in (
        ({"scope": ["ids"]}, "tick at least one"),
        ({}, "say what to replay"),
        ({"scope": ["all"]}, "say what to replay"),
        ({"scope": ["ids"], "ids": ["1 OR 1=1"]}, "not a row id"),
        ({"one": ["-1"]}, "not a row id"),
        ({"one": ["1"], "key": ["reuse"]}, "key:"),
        ({"one": ["1"], "expected": ["many"]}, "not a row id"),
    ):
        with pytest.raises(views.FormError, match=message):
            views.ReplayRequest.from_form(form)
    assert views.parse_after("") == 0 and views.parse_after("42") == 42


def test_a_delete_request_from_a_form_picks_dead_events_as_a_replay_does():
    one = views.DeleteRequest.from_form({"one": ["7"], "key": ["ignored"]})
    assert (one.ids, one.expected, one.scope) == ((7,), None, "ids")
    assert one.selection() == ReplayFilter(statuses=("dead",), ids=(7,))
    ticked = views.DeleteRequest.from_form({"scope": ["ids"], "ids": ["9", "8"], "expected": ["2"]})
    assert ticked.selection() == ReplayFilter(statuses=("dead",), ids=(9, 8), limit=2)
    matching = views.DeleteRequest.from_form(
        {"scope": ["filter"], "error": ["413"], "expected": ["5"]}
    )
    assert matching.selection() == ReplayFilter(statuses=("dead",), error_code="413", limit=5)
    for form, message in (
        ({"scope": ["ids"]}, "tick at least one event to delete"),
        ({}, "say what to delete"),
        ({"one": ["1; DROP TABLE"]}, "not a row id"),
    ):
        with pytest.raises(views.FormError, match=message):
            views.DeleteRequest.from_form(form)


def test_an_ordering_key_from_a_form_is_taken_exactly_as_typed():
    assert views.ordering_key({"ordering_key": [" order 7 "]}) == " order 7 "
    assert views.ordering_key({"ordering_key": ["k" * 200]}) == "k" * 200
    for bad in ([], [""], ["k" * 201], ["a\x00b"]):
        with pytest.raises(views.FormError, match="ordering_key: 1 to 200 characters"):
            views.ordering_key({"ordering_key": bad})
    assert views.parse_before("") is None and views.parse_before("42") == 42
    with pytest.raises(views.FormError, match="not a row id"):
        views.parse_before("-1")


def test_relative_times_and_what_a_pending_row_waits_for():
    now = T0
    assert views.relative(None, now) == "—"
    assert views.relative(now, now) == "now"
    assert views.relative(minutes(1.5), now) == "in 1 min 30 s"
    assert views.relative(minutes(-125), now) == "2 h 5 min ago"

    def queued(**values: object) -> admin.QueuedEvent:
        base = {f.name: None for f in dataclasses.fields(admin.QueuedEvent)}
        row = {"next_attempt_at": now, "attempts": 0, "failures": 0, "state": "pending"}
        return admin.QueuedEvent(**{**base, **row, **values})  # type: ignore[arg-type]

    assert views.waits(queued(), now) == "due now"
    assert views.waits(queued(next_attempt_at=minutes(-3)), now) == "due now"
    assert views.waits(queued(next_attempt_at=minutes(2)), now) == "due in 2 min 0 s"
    assert views.waits(queued(waiting_for="key"), now) == "behind an earlier event of its key"
    assert views.waits(queued(waiting_for="message"), now) == "for its message to be published"


# -- formatting ---------------------------------------------------------------------------------


def record(**values: object) -> EventRecord:
    """A pending row that never failed, with ``values`` changed."""
    nothing_yet = {f.name: None for f in dataclasses.fields(EventRecord)}
    pending = {
        "id": 1,
        "event_id": uuid.UUID(int=1),
        "idempotency_key": "k",
        "channel": "orders",
        "event": "created",
        "status": "pending",
        "attempts": 0,
        "failures": 0,
        "created_at": T0,
        "queued_at": T0,
        "next_attempt_at": T0,
        "encrypted": False,
        "data": '{"n":1}',
    }
    return EventRecord(**{**nothing_yet, **pending, **values})  # type: ignore[arg-type]


def minutes(n: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=n)


def test_the_database_label_shows_no_password():
    for url, label in (
        (
            "postgresql+psycopg://ops:hunter2@db:5432/outbox",
            "postgresql+psycopg://ops:***@db:5432/outbox",
        ),
        (
            "postgresql+psycopg://ops@db/outbox?password=hunter2&sslmode=require",
            "postgresql+psycopg://ops@db/outbox",
        ),
        ("sqlite:////var/lib/outbox.db", "sqlite:////var/lib/outbox.db"),
    ):
        assert views.database_label(sa.make_url(url)) == label


def test_age_when_and_error_text():
    assert [views.age(s) for s in (None, 0, 59.9, 60, 3599, 3600, 47 * 3600 + 60, 50 * 3600)] == [
        "none",
        "0 s",
        "59 s",
        "1 min 0 s",
        "59 min 59 s",
        "1 h 0 min",
        "47 h 1 min",
        "2 d 2 h",
    ]
    assert views.when(None) == "—"
    assert views.when(dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))) == (
        "2026-01-01 10:00:00 UTC"
    )
    assert views.error_text(record()) == ""
    assert views.error_text(record(last_error_status=413)) == "413"
    assert views.error_text(record(last_error_message="boom")) == "boom"
    full = record(last_error_status=413, last_error_code="too_large", last_error_message="big")
    assert views.error_text(full) == "413 too_large: big"


def test_payload_is_never_shown_for_an_encrypted_channel():
    assert views.payload(record(data="abc")) == ("abc", "3 characters")
    assert views.payload(record(data="abcdef"), limit=4) == ("abcd", "first 4 of 6 characters")
    hidden = record(channel="private-encrypted-x", encrypted=True, data=None)
    assert views.payload(hidden) == (None, "encrypted channel: the payload is not shown")
    # Even if a row ever carried one: encrypted means not shown.
    assert views.payload(record(encrypted=True, data="plaintext"))[0] is None


def test_timeline_tells_a_rows_life_in_order():
    dead = record(
        status="dead",
        created_at=minutes(0),
        queued_at=minutes(0),
        last_error_at=minutes(2),
        last_error_status=413,
        last_error_code="too_large",
        last_error_message="big",
    )
    assert [step for _, step in views.timeline(dead)] == [
        "enqueued",
        "last failure (refused, dead): 413 too_large: big",
    ]
    published = record(
        status="published",
        queued_at=minutes(5),
        last_error_at=minutes(6),
        last_error_status=503,
        published_at=minutes(7),
        acknowledgement_id="ack-1",
    )
    assert views.timeline(published) == [
        (minutes(0), "enqueued"),
        (minutes(5), "queued again (replayed)"),
        (minutes(6), "last failure (failed, retried): 503"),
        (minutes(7), "published (acknowledgement ack-1)"),
    ]
    leased = record(status="in_flight", lease_expires_at=minutes(1))
    assert views.timeline(leased)[-1] == (minutes(1), "held by a worker: its lease ends")
    waiting = record(status="pending", next_attempt_at=minutes(3))
    assert views.timeline(waiting)[-1] == (minutes(3), "next attempt due")


def test_the_chart_window_is_made_of_whole_buckets():
    now = dt.datetime(2026, 1, 1, 10, 30, 20, 500, tzinfo=dt.UTC)
    assert views.window_start(now) == dt.datetime(2026, 1, 1, 9, 31, tzinfo=dt.UTC)
    on_edge = dt.datetime(2026, 1, 1, 10, 30, tzinfo=dt.UTC)
    assert views.window_start(on_edge) == dt.datetime(2026, 1, 1, 9, 31, tzinfo=dt.UTC)
    assert views.window_start(now, bucket_seconds=300, buckets=3) == minutes(20)


def test_the_summary_holds_numbers_only():
    report = StatusReport(
        {"pending": 2, "in_flight": 1, "published": 5, "dead": 1},
        oldest_pending_age_seconds=75.5,
        dead=1,
        last_errors=[{"last_error_message": "<script>"}],
    )
    shown = views.summary(report, [ThroughputBucket(T0, 3, 1, 0)])
    assert shown == {
        "counts": {"pending": 2, "in_flight": 1, "published": 5, "dead": 1},
        "oldest_pending_age_seconds": 75.5,
        "oldest_pending": "1 min 15 s",
        "bucket_seconds": 60,
        "buckets": [
            {"start": "2026-01-01T10:00:00+00:00", "published": 3, "retried": 1, "dead": 0}
        ],
    }


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
