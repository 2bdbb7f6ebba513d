"""The dashboard over HTTP: ``outbox web`` in its own process on 127.0.0.1, asked with httpx.

Who may see it (a token or basic auth beyond loopback, the login cookie), what a POST must carry
(same origin, the CSRF token of its session), read-only mode, replays with both key choices, the
headers on every answer, and what never reaches a page: the Sockudo secret, the encryption key and
the plaintext of an encrypted channel. The browser tests are in test_web_browser.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import subprocess
import sys
import uuid
from urllib.parse import unquote

import httpx
import pytest
import sqlalchemy as sa

from outbox import enqueue
from outbox.cli import main
from outbox.database import normalize_url
from outbox.settings import ENVIRONMENT
from outbox.testing.soketi import free_port
from outbox.web.views import database_label
from tests.helpers.drivers import park_in
from tests.outbox_rows import EV, T, add, add_dead, add_in_flight, row, set_row
from tests.plugins.dashboard import OUTBOX, csrf_token

TOKEN = "t0ken-" + "x" * 26
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])  # HTTP rules, not database ones


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [v for v, _ in ENVIRONMENT.values()] + ["OUTBOX_WEB_TOKEN"]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("OUTBOX_WEB_BASIC_AUTH", raising=False)


def replay_form(csrf: str, **fields: str | list[str]) -> dict[str, str | list[str]]:
    return {"csrf": csrf, **fields}


# -- starting -----------------------------------------------------------------------------------


@sqlite_only
@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "example.internal"])
def test_refuses_to_start_beyond_loopback_without_credentials(
    database_url, host, capsys, monkeypatch
):
    code = main(["--database-url", database_url, "web", "--host", host])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"outbox: error: refusing to serve the dashboard on {host}")
    assert "OUTBOX_WEB_TOKEN" in err and err.count("\n") == 1

    monkeypatch.setenv("OUTBOX_WEB_TOKEN", "short-Secret")
    code = main(["--database-url", database_url, "web", "--host", host])
    err = capsys.readouterr().err
    assert code == 2 and "at least 16 characters" in err and "short-Secret" not in err

    monkeypatch.delenv("OUTBOX_WEB_TOKEN")
    monkeypatch.setenv("OUTBOX_WEB_BASIC_AUTH", "ops-only-a-user-no-password")
    code = main(["--database-url", database_url, "web", "--host", host])
    err = capsys.readouterr().err
    assert code == 2 and "user:password" in err and "ops-only" not in err


@sqlite_only
@pytest.mark.parametrize("refresh", ["inf", "nan", "0", "-1", "2160000"])
def test_a_refresh_out_of_bounds_is_refused_before_serving(database_url, refresh):
    """`--refresh inf` made every page a 500, 25 days (2160000 s) overflowed the browser's
    timer: both refused with exit 2 at once, as operators start the command (a process)."""
    command = [str(OUTBOX), "--database-url", database_url, "web", "--port", str(free_port())]
    done = subprocess.run(
        [*command, "--refresh", refresh], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"outbox: error: --refresh must be between 1 and 3600 seconds, got {refresh}\n"
    )


@sqlite_only
def test_without_the_web_extra_the_command_says_how_to_get_it(database_url, capsys, monkeypatch):
    import outbox

    for name in [m for m in sys.modules if m == "outbox.web" or m.startswith("outbox.web.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(outbox, "web", raising=False)
    # As if not installed: None in sys.modules makes an import fail. uvicorn too, so that a
    # regression fails this test (exit 1) instead of serving forever.
    for name in [m for m in sys.modules if m.split(".")[0] in ("starlette", "uvicorn")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette", None)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code = main(["--database-url", database_url, "web"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "outbox: error: outbox web needs the web extra (starlette is missing): "
        "pip install 'sockudo-outbox[web]'\n"
    )


# -- credentials --------------------------------------------------------------------------------


@sqlite_only
def test_beyond_loopback_every_request_needs_the_token(database_url, engine, serve_dashboard):
    dead = add_dead(engine)
    served = serve_dashboard(
        database_url, "--write", host="0.0.0.0", env={"OUTBOX_WEB_TOKEN": TOKEN}
    )
    with served.client() as client:
        # A browser is sent to the login form; anything else is refused outright.
        page = client.get("/", headers={"accept": "text/html"})
        assert (page.status_code, page.headers["location"]) == (303, "/login")
        for path in ("/", "/api/summary", f"/search?q={dead}"):
            assert client.get(path).status_code == 401, path
        for authorization in (f"Bearer {TOKEN}x", "Bearer x", TOKEN, _basic("ops", TOKEN)):
            assert client.get("/", headers={"authorization": authorization}).status_code == 401
        refused = client.post(
            "/replay",
            data={"scope": "ids", "ids": str(dead), "expected": "1"},
            headers=served.same_origin(),
        )
        assert refused.status_code == 401
        # Open to all, holding no data: the health check, the static files, the login form.
        assert client.get("/healthz").text == "ok"
        assert client.get("/static/dashboard.js").status_code == 200
        assert client.get("/login").status_code == 200

        bearer = {"authorization": f"Bearer {TOKEN}"}
        assert "Dead events" in client.get("/", headers=bearer).text
        assert client.get("/api/summary", headers=bearer).json()["counts"]["dead"] == 1
    assert row(engine, dead).status == "dead"
    assert TOKEN not in served.process.log


@sqlite_only
def test_the_login_form_sets_an_httponly_strict_cookie_and_only_for_the_token(
    database_url, serve_dashboard
):
    served = serve_dashboard(database_url, host="0.0.0.0", env={"OUTBOX_WEB_TOKEN": TOKEN})
    with served.client() as client:
        csrf = csrf_token(client.get("/login"))
        wrong = client.post(
            "/login", data={"csrf": csrf, "token": TOKEN[:-1]}, headers=served.same_origin()
        )
        assert wrong.status_code == 401 and "That is not the token" in wrong.text
        assert client.get("/api/summary").status_code == 401

        # A cookie of our own making is not a session: the signature is checked.
        forged = client.cookies["outbox_session"].split(".")
        forged[2] = "1"
        assert (
            httpx.get(
                f"{served.url}/api/summary",
                cookies={"outbox_session": ".".join(forged)},
                trust_env=False,
            ).status_code
            == 401
        )

        # Without the session's CSRF token, even the right token does not log in.
        stale = client.post(
            "/login", data={"csrf": "x" + csrf, "token": TOKEN}, headers=served.same_origin()
        )
        assert stale.status_code == 403

        answer = client.post(
            "/login", data={"csrf": csrf, "token": TOKEN}, headers=served.same_origin()
        )
        assert (answer.status_code, answer.headers["location"]) == (303, "/")
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith("outbox_session=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert client.get("/api/summary").status_code == 200
        logged_in = client.get("/")
        assert logged_in.status_code == 200 and "Log out" in logged_in.text

        out = client.post(
            "/logout", data={"csrf": csrf_token(logged_in)}, headers=served.same_origin()
        )
        assert out.status_code == 303
        assert client.get("/api/summary").status_code == 401
    assert TOKEN not in served.process.log


@sqlite_only
def test_basic_auth_credentials_beyond_loopback(database_url, serve_dashboard):
    password = "correct horse battery staple"
    served = serve_dashboard(
        database_url, host="0.0.0.0", env={"OUTBOX_WEB_BASIC_AUTH": f"ops:{password}"}
    )
    with served.client() as client:
        refused = client.get("/")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith('Basic realm="outbox"')
        for user, secret in (("ops", password + "!"), ("root", password), ("ops", "")):
            assert (
                client.get("/", headers={"authorization": _basic(user, secret)}).status_code == 401
            )
        assert client.get("/", auth=("ops", password)).status_code == 200
    assert password not in served.process.log


@sqlite_only
def test_without_credentials_only_loopback_host_names_are_served(database_url, serve_dashboard):
    served = serve_dashboard(database_url)
    port = served.url.rsplit(":", 1)[1]
    with served.client() as client:
        # A name rebound to 127.0.0.1 by another site's DNS: its pages must not read ours.
        assert client.get("/", headers={"host": f"rebound.example:{port}"}).status_code == 421
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert client.get("/", headers={"host": host}).status_code == 200, host


# -- requests that change something ------------------------------------------------------------


@sqlite_only
def test_a_cross_site_post_is_refused(database_url, engine, serve_dashboard):
    dead = add_dead(engine)
    served = serve_dashboard(database_url, "--write")
    with served.client() as client, served.client() as other:
        csrf = csrf_token(client.get("/"))
        fields = replay_form(csrf, scope="ids", ids=str(dead), expected="1")
        for headers in (
            {"origin": "http://evil.example"},
            {"origin": "null"},
            {"origin": served.url, "sec-fetch-site": "cross-site"},
            {"origin": served.url, "sec-fetch-site": "same-site"},
            {"sec-fetch-site": "cross-site"},
        ):
            for path in ("/replay/preview", "/replay"):
                answer = client.post(path, data=fields, headers=headers)
                assert answer.status_code == 403, (path, headers)
                assert "cross-site request refused" in answer.text
        # Same origin, but no token, another session's token, or no session at all.
        other_csrf = csrf_token(other.get("/"))
        for bad in ({**fields, "csrf": ""}, {**fields, "csrf": other_csrf}):
            answer = client.post("/replay", data=bad, headers=served.same_origin())
            assert answer.status_code == 403 and "token is missing or stale" in answer.text
        cookieless = httpx.post(
            f"{served.url}/replay", data=fields, headers=served.same_origin(), trust_env=False
        )
        assert cookieless.status_code == 403
        assert row(engine, dead).status == "dead"
        # The same request from our own page goes through: the refusals were about origin.
        answer = client.post("/replay", data=fields, headers=served.same_origin())
        assert answer.status_code == 200, answer.text
    assert row(engine, dead).status == "pending"


@sqlite_only
def test_read_only_mode_refuses_replay_and_offers_none(database_url, engine, serve_dashboard):
    dead = add_dead(engine)
    served = serve_dashboard(database_url)
    with served.client() as client:
        page = client.get("/")
        assert f'data-row-id="{dead}"' in page.text
        assert "Replay" not in page.text and 'name="ids"' not in page.text
        assert "read-only" in page.text
        fields = replay_form(csrf_token(page), scope="ids", ids=str(dead), expected="1")
        for path in ("/replay/preview", "/replay"):
            answer = client.post(path, data=fields, headers=served.same_origin())
            assert answer.status_code == 403 and "read-only" in answer.text
    assert row(engine, dead).status == "dead"


def test_replay_over_http_dry_run_first_then_fresh_or_kept_keys(
    database_url, engine, serve_dashboard
):
    fresh, kept = add_dead(engine, "orders"), add_dead(engine, "orders")
    audit = [add_dead(engine, "audit") for _ in range(3)]
    keys = {row_id: row(engine, row_id).idempotency_key for row_id in [fresh, kept, *audit]}
    served = serve_dashboard(database_url, "--write")
    with served.client() as client:
        csrf = csrf_token(client.get("/"))

        def post(path: str, **fields: str | list[str]) -> httpx.Response:
            answer = client.post(
                path, data=replay_form(csrf, **fields), headers=served.same_origin()
            )
            assert answer.status_code == 200, answer.text
            return answer

        # One event: the dry run counts it and changes nothing.
        preview = post("/replay/preview", one=str(fresh))
        assert dry_run_count(preview) == 1 and row(engine, fresh).status == "dead"
        done = post("/replay", scope="ids", ids=str(fresh), key="fresh", expected="1")
        assert 'data-count="1"' in done.text
        replayed = row(engine, fresh)
        assert replayed.status == "pending" and replayed.idempotency_key != keys[fresh]

        post("/replay", scope="ids", ids=str(kept), key="keep", expected="1")
        replayed = row(engine, kept)
        assert replayed.status == "pending" and replayed.idempotency_key == keys[kept]
        assert replayed.attempts == 1  # a kept key goes alone through /events

        # A filter: the dry run counts what matches; the replay moves at most that many.
        assert dry_run_count(post("/replay/preview", scope="filter", channel="audit")) == 3
        post("/replay", scope="filter", channel="audit", expected="2")
        assert [row(engine, i).status for i in audit] == ["pending", "pending", "dead"]

        # Nothing changes without a previewed count, or with a filter it cannot read.
        fields = replay_form(csrf, scope="filter", channel="audit")
        assert client.post("/replay", data=fields, headers=served.same_origin()).status_code == 400
        bad_time = replay_form(csrf, scope="filter", since="yesterday", expected="1")
        answer = client.post("/replay", data=bad_time, headers=served.same_origin())
        assert answer.status_code == 400 and "since: not an ISO 8601 time" in answer.text
        assert row(engine, audit[2]).status == "dead"


#: Filters an operator can type (or a link can carry) that no row can match, each with the start
#: of what the page says.
BAD_FILTERS = [
    ("error=%C2%B2", "error: an HTTP status is 100 to 999"),  # "²" is a digit, not a status
    ("error=" + "9" * 20, "error: an HTTP status is 100 to 999"),  # past any integer column
    ("error=" + "x" * 65, "error: an error code is 1 to 64 printable characters"),
    ("since=0001-01-01T00:00%2B01:00", "since: a time from 1970 to 9999"),  # year 0 in UTC
    ("until=9999-12-31T23:30-01:00", "until: a time from 1970 to 9999"),  # year 10000 in UTC
    ("since=0001-01-01T00:00", "since: a time from 1970 to 9999"),
    ("channel=a%00b", "channel: a NUL character matches nothing"),
]


def test_bad_filter_values_get_the_forms_message_not_an_error_page(
    database_url, engine, serve_dashboard
):
    """Every database: a filter value out of its column's or the calendar's range is the
    operator's to fix (400 and the form's message), never a 500 nor a database error."""
    dead = add_dead(engine, "orders")
    served = serve_dashboard(database_url, "--write")
    with served.client() as client:
        csrf = csrf_token(client.get("/"))
        for query, message in BAD_FILTERS:
            page = client.get(f"/?{query}")
            assert page.status_code == 400 and "<h1>Bad filter</h1>" in page.text, query
            assert f'<p id="message">{message}' in page.text, (query, page.text)
            # The same filter posted for a replay is refused the same way, and changes nothing.
            name, _, value = query.partition("=")
            fields = replay_form(csrf, scope="filter", expected="1", **{name: unquote(value)})
            for path in ("/replay/preview", "/replay"):
                answer = client.post(path, data=fields, headers=served.same_origin())
                assert answer.status_code == 400 and message in answer.text, (path, query)
        # A search for such text finds nothing, without asking the database to compare a NUL.
        assert client.get("/search?q=a%00b").status_code == 200
        # Good values still work, at the edges of the range too.
        for query in ("error=413", "error=payload_too_large", "since=1970-01-01T00:00"):
            page = client.get(f"/?{query}")
            assert page.status_code == 200 and f'data-row-id="{dead}"' in page.text, query
    assert row(engine, dead).status == "dead"
    log = served.process.log
    assert "database error" not in log and "Traceback" not in log, log


def dry_run_count(page: httpx.Response) -> int:
    found = re.search(r'id="dry-run" data-count="(\d+)"', page.text)
    assert found, page.text
    return int(found.group(1))


# -- what every page carries and never carries --------------------------------------------------


@sqlite_only
def test_every_answer_carries_the_security_headers(database_url, engine, serve_dashboard):
    add_dead(engine)
    served = serve_dashboard(database_url, "--write")
    with served.client() as client:
        for path in ("/", "/api/summary", "/search?q=orders", "/login", "/nowhere"):
            headers = client.get(path).headers
            csp = headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp, path
            assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
            assert headers["x-frame-options"] == "DENY"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["cache-control"] == "no-store", path
        assert client.get("/static/dashboard.js").headers["cache-control"] == "no-cache"
        page = client.get("/").text
        # The one script is a file: no inline script or handler for the policy to allow.
        assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/dashboard.js" defer>']
        assert not re.search(r"\son[a-z]+=", page) and "style=" not in page


@sqlite_only
def test_no_page_shows_the_sockudo_secret_the_master_key_or_an_encrypted_payload(
    database_url, engine, serve_dashboard
):
    secret = f"sockudo-secret-{uuid.uuid4().hex}"
    master_key = base64.b64encode(uuid.uuid4().bytes * 2).decode()
    plaintext = f"card-number-{uuid.uuid4().hex}"
    sealed = add_dead(engine, "private-encrypted-payments", data=plaintext)
    add(engine, "private-encrypted-payments", data=plaintext)
    env = {
        "SOCKUDO_URL": f"http://app-key:{secret}@127.0.0.1:6001/apps/app-id",
        "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64": master_key,
    }
    served = serve_dashboard(database_url, "--write", env=env)
    with served.client() as client:
        csrf = csrf_token(client.get("/"))
        pages = [
            client.get(path)
            for path in (
                "/",
                "/api/summary",
                "/search?q=private-encrypted-payments",
                f"/search?q={row(engine, sealed).event_id}",
                "/static/dashboard.js",
                "/static/dashboard.css",
                "/login",
            )
        ]
        fields = replay_form(csrf, one=str(sealed))
        pages.append(client.post("/replay/preview", data=fields, headers=served.same_origin()))
    assert all(page.status_code == 200 for page in pages)
    assert "encrypted channel: the payload is not shown" in pages[0].text
    for page in pages:
        for hidden in (secret, master_key, plaintext, "app-key"):
            assert hidden not in page.text, (page.url, hidden)
    for hidden in (secret, master_key, plaintext):
        assert hidden not in served.process.log


@sqlite_only
def test_a_database_error_is_a_503_page_not_a_traceback(database_url, engine, serve_dashboard):
    served = serve_dashboard(database_url)
    with served.client() as client:
        assert client.get("/api/summary").status_code == 200
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE outbox_events"))
        page, data = client.get("/"), client.get("/api/summary")
    assert page.status_code == 503 and "the database did not answer" in page.text
    assert page.headers["cache-control"] == "no-store" and "Traceback" not in page.text
    assert data.status_code == 503 and "error" in data.json()
    log = served.process.log
    assert "database error: no such table: outbox_events" in log and "Traceback" not in log


@sqlite_only
def test_event_text_is_escaped_in_the_html(database_url, engine, serve_dashboard):
    markup = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
    dead = add_dead(engine, "orders", "<b>event</b>", data=markup, last_error_message=markup)
    served = serve_dashboard(database_url, "--write")
    with served.client() as client:
        pages = [client.get("/"), client.get("/search?q=orders")]
        pages.append(
            client.post(
                "/replay/preview",
                data=replay_form(csrf_token(pages[0]), one=str(dead)),
                headers=served.same_origin(),
            )
        )
    for page in pages:
        assert "<script>window" not in page.text and "<img" not in page.text
        assert "<b>event" not in page.text and "&lt;b&gt;event&lt;/b&gt;" in page.text
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in pages[1].text


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# MariaDB refuses ordering keys (tested in test_ordering.py).
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_the_dashboard_lists_parked_keys_with_their_dead_heads(
    database_url, engine, serve_dashboard
):
    """A key parked behind a dead head shows with its waiting count and the head's reason; the
    key's text is escaped like every other value."""

    key = "<i>order-7</i>"
    with engine.begin() as conn:
        for n in range(3):
            enqueue(conn, "orders", "step", {"n": n}, ordering_key=key)
        head = conn.execute(sa.select(sa.func.min(T.c.id))).scalar_one()
    set_row(engine, head, status="dead", last_error_code="payload_too_large")
    with engine.begin() as conn:
        park_in(conn, T, [head])
    served = serve_dashboard(database_url)
    with served.client() as client:
        page = client.get("/")
    assert "Parked keys" in page.text
    assert "&lt;i&gt;order-7&lt;/i&gt;" in page.text and "<i>order-7" not in page.text
    assert f'<a href="/event/{head}">row {head}</a> orders step' in page.text
    assert "payload_too_large" in page.text


# -- #21: the login page, the queue's lists, compact search, deletion, skipping a key ----------


def test_the_login_page_tells_a_visitor_nothing_about_the_installation(
    database_url, serve_dashboard
):
    """A visitor who is not logged in sees the form, not the database's URL, the version or
    whether the dashboard may change anything; nor does any refusal they can provoke."""
    import outbox

    served = serve_dashboard(
        database_url, "--write", host="0.0.0.0", env={"OUTBOX_WEB_TOKEN": TOKEN}
    )
    label = database_label(normalize_url(database_url))  # as the page shows it
    with served.client() as client:
        login = client.get("/login")
        csrf = csrf_token(login)
        refused = client.post(
            "/login", data={"csrf": csrf, "token": "wrong"}, headers=served.same_origin()
        )
        stale = client.post(
            "/login", data={"csrf": "x", "token": "x"}, headers=served.same_origin()
        )
        not_found = client.get("/nowhere", headers={"accept": "text/html"})
        logged_in = client.post(
            "/login", data={"csrf": csrf, "token": TOKEN}, headers=served.same_origin()
        )
        dashboard = client.get("/")
    assert (login.status_code, refused.status_code, stale.status_code) == (200, 401, 403)
    assert logged_in.status_code == 303
    for page in (login, refused, stale, not_found):
        for detail in (
            label,
            make_display_host(database_url),
            f"sockudo-outbox {outbox.__version__}",
            "write access",
            "read-only",
            'action="/search"',
        ):
            assert detail not in page.text, (page.url, detail)
    # Once logged in, all of it is there.
    assert label in dashboard.text and "write access" in dashboard.text
    assert f"sockudo-outbox {outbox.__version__}" in dashboard.text


def make_display_host(database_url: str) -> str:
    """The part of a database URL that names where it is (a path, or a host and database)."""
    url = sa.make_url(database_url)
    return url.database if url.get_backend_name() == "sqlite" else f"{url.host}:{url.port or ''}"


def test_the_pending_and_in_flight_lists_page_through_the_queue_oldest_first(
    database_url, engine, serve_dashboard
):
    from outbox import OutboxEvent, enqueue_many
    from outbox.web.views import QUEUE_PAGE_SIZE

    now = dt.datetime.now(dt.UTC)
    first = add(engine, "orders", "created")
    retrying = add(
        engine,
        "orders",
        "retried",
        attempts=2,
        failures=1,
        last_error_status=503,
        last_error_code="backpressure",
        last_error_message="busy",
        next_attempt_at=now + dt.timedelta(minutes=10),
    )
    leased = add_in_flight(engine, "audit")
    add_dead(engine)
    with engine.begin() as conn:
        enqueue_many(
            conn, [OutboxEvent("bulk", "created", {"n": n}) for n in range(QUEUE_PAGE_SIZE)]
        )
    served = serve_dashboard(database_url)
    with served.client() as client:
        main_page = client.get("/").text
        pending = client.get("/pending")
        in_flight = client.get("/in-flight")
        after = listed(pending)[-1]
        second = client.get(f"/pending?after={after}")
        bad = client.get("/pending?after=soon")
    assert 'href="/pending"' in main_page and 'href="/in-flight"' in main_page
    assert pending.status_code == 200 and queue_count(pending) == QUEUE_PAGE_SIZE + 2
    rows = listed(pending)
    assert rows[:2] == [first, retrying] and len(rows) == QUEUE_PAGE_SIZE
    assert f'href="/pending?after={after}"' in pending.text
    assert listed(second) == [rows[-1] + 1, rows[-1] + 2] and 'id="next-page"' not in second.text
    retry_line = line_of(pending, retrying)
    assert "503 backpressure: busy" in retry_line and "(1 failed)" in retry_line
    assert re.search(r"due in (9 min \d+ s|10 min 0 s)", retry_line), retry_line
    assert "due now" in line_of(pending, first)
    assert listed(in_flight) == [leased] and queue_count(in_flight) == 1
    assert re.search(r"ends in \d+", line_of(in_flight, leased))
    assert bad.status_code == 400 and "not a row id" in bad.text


def listed(page: httpx.Response) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-row-id="(\d+)" data-state=', page.text)]


def queue_count(page: httpx.Response) -> int:
    found = re.search(r'id="queue-heading" data-state="\w+" data-count="(\d+)"', page.text)
    assert found, page.text
    return int(found.group(1))


def line_of(page: httpx.Response, row_id: int) -> str:
    found = re.search(rf'<tr data-row-id="{row_id}".*?</tr>', page.text, re.S)
    assert found, (row_id, page.text)
    return found.group(0)


def test_a_search_lists_one_line_per_row_a_page_at_a_time(database_url, engine, serve_dashboard):
    """A channel with many rows: compact lines (no expanded record), newest first, paged; a
    search that finds one row shows it whole; each line leads to its record."""
    from outbox import OutboxEvent, enqueue_many
    from outbox.web.views import SEARCH_LIMIT

    with engine.begin() as conn:
        enqueue_many(
            conn, [OutboxEvent("orders", "created", {"n": n}) for n in range(SEARCH_LIMIT + 5)]
        )
    one = add_dead(engine, "audit")
    served = serve_dashboard(database_url)
    with served.client() as client:
        first = client.get("/search?q=orders")
        older = re.search(r'id="next-page" href="([^"]+)"', first.text)
        assert older, first.text
        second = client.get(older.group(1).replace("&amp;", "&"))
        single = client.get("/search?q=audit")
        record = client.get(f"/event/{one}")
        missing = client.get("/event/999999999")
    lines = results(first)
    assert len(lines) == SEARCH_LIMIT and lines == sorted(lines, reverse=True)
    assert '<dl class="life">' not in first.text and "<article" not in first.text
    assert len(first.text) < 60_000, len(first.text)  # was 30,000 px of expanded records
    assert results(second) == list(range(lines[-1] - 1, lines[-1] - 6, -1))
    assert 'id="next-page"' not in second.text
    assert results(single) == [one]
    assert f'<article class="record" data-row-id="{one}" data-status="dead">' in single.text
    assert f'<a href="/event/{one}" class="details">details</a>' in single.text
    assert record.status_code == 200 and '<dl class="life">' in record.text
    assert "payload_too_large" in record.text and "last failure (refused, dead)" in record.text
    assert missing.status_code == 404 and "no such row" in missing.text


def results(page: httpx.Response) -> list[int]:
    return [int(i) for i in re.findall(r'<tr class="result" data-row-id="(\d+)"', page.text)]


def test_replay_from_search_results_after_a_dry_run(database_url, engine, serve_dashboard):
    ticked = [add_dead(engine, "orders") for _ in range(2)]
    untouched = add_dead(engine, "orders")
    pending = add(engine, "orders")
    served = serve_dashboard(database_url, "--write")
    with served.client() as client:
        found = client.get("/search?q=orders")
        # Only dead rows can be ticked.
        assert sorted(int(i) for i in re.findall(r'name="ids" value="(\d+)"', found.text)) == [
            *ticked,
            untouched,
        ]
        csrf = csrf_token(found)
        fields = {"csrf": csrf, "q": "orders", "scope": "ids", "ids": [str(i) for i in ticked]}
        preview = client.post("/replay/preview", data=fields, headers=served.same_origin())
        assert dry_run_count(preview) == 2
        assert {row(engine, i).status for i in ticked} == {"dead"}
        done = client.post(
            "/replay",
            data={**fields, "expected": "2", "key": "fresh"},
            headers=served.same_origin(),
        )
    assert done.status_code == 200 and 'data-count="2"' in done.text
    assert 'href="/search?q=orders">back to the search</a>' in done.text
    assert {row(engine, i).status for i in ticked} == {"pending"}
    assert row(engine, untouched).status == "dead" and row(engine, pending).status == "pending"


def test_delete_dead_over_http_dry_run_first_then_at_most_the_previewed_count(
    database_url, engine, serve_dashboard
):
    one = add_dead(engine, "orders")
    ticked = [add_dead(engine, "orders") for _ in range(2)]
    audit = [add_dead(engine, "audit") for _ in range(3)]
    pending = add(engine, "audit")
    served = serve_dashboard(database_url, "--write")
    with served.client() as client:
        page = client.get("/")
        assert 'formaction="/delete/preview"' in page.text and 'id="delete-filter"' in page.text
        csrf = csrf_token(page)

        def post(path: str, **fields: str | list[str]) -> httpx.Response:
            answer = client.post(path, data={"csrf": csrf, **fields}, headers=served.same_origin())
            assert answer.status_code == 200, answer.text
            return answer

        preview = post("/delete/preview", one=str(one))
        assert dry_run_count(preview) == 1 and row(engine, one).status == "dead"
        assert "cannot be replayed" in preview.text
        done = post("/delete", scope="ids", ids=str(one), expected="1")
        assert 'id="deleted" data-count="1"' in done.text
        assert gone(engine, one)

        ids = [str(i) for i in ticked]
        assert dry_run_count(post("/delete/preview", scope="ids", ids=ids)) == 2
        post("/delete", scope="ids", ids=ids, expected="2")
        assert all(gone(engine, i) for i in ticked)

        # A filter: at most the previewed count, oldest first.
        assert dry_run_count(post("/delete/preview", scope="filter", channel="audit")) == 3
        done = post("/delete", scope="filter", channel="audit", expected="2")
        assert 'data-count="2"' in done.text
        assert [gone(engine, i) for i in audit] == [True, True, False]

        # Nothing changes without a previewed count, or with a filter it cannot read.
        for fields in (
            {"scope": "filter", "channel": "audit"},
            {"scope": "filter", "since": "yesterday", "expected": "1"},
            {"scope": "ids", "expected": "1"},
        ):
            answer = client.post(
                "/delete", data={"csrf": csrf, **fields}, headers=served.same_origin()
            )
            assert answer.status_code == 400, fields
        nothing = post("/delete/preview", one=str(pending))
        assert dry_run_count(nothing) == 0 and "Nothing to delete" in nothing.text
    assert row(engine, audit[2]).status == "dead" and row(engine, pending).status == "pending"
    assert "deletion from the dashboard by 127.0.0.1: 2 of 2 previewed" in served.process.log


def gone(engine: sa.Engine, row_id: int) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.select(EV.c.id).where(EV.c.id == row_id)).first() is None


def test_deleting_and_skipping_need_write_access_and_a_same_site_form(
    database_url, engine, serve_dashboard
):
    """Every database: the new actions are refused read-only, cross-site or without the
    session's token, before anything is read or changed."""
    dead = add_dead(engine)
    actions = {
        "/delete/preview": {"one": str(dead)},
        "/delete": {"scope": "ids", "ids": str(dead), "expected": "1"},
        "/keys/skip/preview": {"ordering_key": "k"},
        "/keys/skip": {"ordering_key": "k", "head": str(dead)},
    }
    read_only = serve_dashboard(database_url)
    with read_only.client() as client:
        page = client.get("/")
        assert "Delete" not in page.text and "/delete/preview" not in page.text
        assert "Delete" not in client.get(f"/event/{dead}").text
        assert 'name="ids"' not in client.get("/search?q=orders").text
        csrf = csrf_token(page)
        for path, fields in actions.items():
            answer = client.post(
                path, data={"csrf": csrf, **fields}, headers=read_only.same_origin()
            )
            assert answer.status_code == 403 and "read-only" in answer.text, path
    writable = serve_dashboard(database_url, "--write")
    with writable.client() as client, writable.client() as other:
        csrf = csrf_token(client.get("/"))
        other_csrf = csrf_token(other.get("/"))
        for path, fields in actions.items():
            for headers in (
                {"origin": "http://evil.example"},
                {"origin": writable.url, "sec-fetch-site": "cross-site"},
            ):
                answer = client.post(path, data={"csrf": csrf, **fields}, headers=headers)
                assert answer.status_code == 403, (path, headers)
                assert "cross-site request refused" in answer.text
            for token in ("", other_csrf):
                answer = client.post(
                    path, data={"csrf": token, **fields}, headers=writable.same_origin()
                )
                assert answer.status_code == 403 and "token is missing or stale" in answer.text
    assert row(engine, dead).status == "dead"


@sqlite_only
def test_hostile_names_are_escaped_on_every_new_page(database_url, engine, serve_dashboard):
    markup = '<img src=x onerror="window.pwned=1">'
    key = "<script>window.pwned=2</script>"
    with engine.begin() as conn:
        for n in range(2):
            enqueue(conn, "orders", "step", {"n": n}, ordering_key=key)
        head = conn.execute(sa.select(sa.func.min(T.c.id))).scalar_one()
    set_row(engine, head, status="dead", channel=markup, event=markup, last_error_message=markup)
    with engine.begin() as conn:
        park_in(conn, T, [head])
    leased = add_in_flight(engine)
    set_row(engine, leased, channel=markup, event=markup)
    served = serve_dashboard(database_url, "--write")
    with served.client() as client:
        csrf = csrf_token(client.get("/"))
        pages = [
            client.get("/pending"),
            client.get("/in-flight"),
            client.get("/search", params={"q": markup}),
            client.get(f"/event/{head}"),
        ]
        for path, fields in (
            ("/delete/preview", {"one": str(head)}),
            ("/keys/skip/preview", {"ordering_key": key}),
            ("/keys/skip", {"ordering_key": key, "head": str(head + 1000)}),
        ):
            pages.append(
                client.post(path, data={"csrf": csrf, **fields}, headers=served.same_origin())
            )
    for page in pages:
        assert page.status_code == 200, page.url
        assert "<img" not in page.text and "<script>window" not in page.text, page.url
    assert "&lt;script&gt;window.pwned=2&lt;/script&gt;" in pages[0].text  # the key, waiting
    assert "&lt;img src=x" in pages[1].text and "&lt;img src=x" in pages[2].text
    assert 'value="&lt;script&gt;window.pwned=2&lt;/script&gt;"' in pages[5].text


# MariaDB refuses ordering keys (tested in test_ordering.py).
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_skip_a_parked_key_from_the_page_after_a_preview(database_url, engine, serve_dashboard):
    key = "order 7 "  # spaces kept: a key is matched exactly as stored
    with engine.begin() as conn:
        for n in range(3):
            enqueue(conn, "orders", "step", {"n": n}, ordering_key=key)
        head = conn.execute(sa.select(sa.func.min(T.c.id))).scalar_one()
    set_row(engine, head, status="dead", last_error_code="payload_too_large")
    with engine.begin() as conn:
        park_in(conn, T, [head])
    served = serve_dashboard(database_url, "--write")
    with served.client() as client:
        page = client.get("/")
        assert 'name="ordering_key" value="order 7 "' in page.text
        csrf = csrf_token(page)

        def post(path: str, **fields: str) -> httpx.Response:
            answer = client.post(path, data={"csrf": csrf, **fields}, headers=served.same_origin())
            assert answer.status_code == 200, answer.text
            return answer

        preview = post("/keys/skip/preview", ordering_key=key)
        assert 'id="skip-preview" data-waiting="2"' in preview.text
        assert f'name="head" value="{head}"' in preview.text
        assert parked(engine) == {key: head}  # the preview changed nothing
        # A head other than the previewed one: nothing is skipped.
        stale = post("/keys/skip", ordering_key=key, head=str(head + 1))
        assert 'id="skipped" data-count="0"' in stale.text and parked(engine) == {key: head}
        done = post("/keys/skip", ordering_key=key, head=str(head))
        assert 'id="skipped" data-count="1"' in done.text
        assert parked(engine) == {}
        again = post("/keys/skip/preview", ordering_key=key)
        assert 'data-waiting="0"' in again.text and "is not parked" in again.text
        for bad in ("", "k" * 201):
            answer = client.post(
                "/keys/skip/preview",
                data={"csrf": csrf, "ordering_key": bad},
                headers=served.same_origin(),
            )
            assert answer.status_code == 400 and "ordering_key" in answer.text
    assert row(engine, head).status == "dead"  # the head stays dead
    with engine.connect() as conn:  # the key's next event is due: the worker sends it next
        [due] = conn.execute(
            sa.select(T.c.id).where(T.c.ordering_key == key, T.c.next_attempt_at < FAR)
        ).scalars()
    assert due == head + 1
    assert "skip from the dashboard by 127.0.0.1: ordering key 'order 7 '" in served.process.log


FAR = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)


def parked(engine: sa.Engine) -> dict[str, int]:
    from outbox.schema import parked_table

    table = parked_table(T)
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(table.c.ordering_key, table.c.row_id)).all())
