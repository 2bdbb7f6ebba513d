"""The dashboard's ASGI app (Starlette): pages rendered on the server, one static script for the
live chart, every read and every change (replay, deletion of dead events, skipping a parked key)
through :mod:`outbox.admin`.

Read-only unless built with ``write=True``. Every answer carries the security headers; every
request passes :class:`Guard` (Host, credentials, session); every POST is checked for its origin
and CSRF token before anything else reads it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__, admin
from . import views
from .security import (
    SESSION_COOKIE,
    Session,
    Sessions,
    WebOptions,
    host_allowed,
    same_origin,
    security_headers,
)

log = logging.getLogger("outbox.web")
HERE = Path(__file__).resolve().parent
#: Paths served to anyone: the login form, the health check and the static files (no data).
OPEN_PATHS = ("/login", "/healthz")
#: Largest form body accepted (a page of ticked ids is a few kilobytes).
MAX_FORM_BYTES = 64 * 1024
T = TypeVar("T")
#: What a form asks to be done to dead events: a replay or a deletion.
Picked = TypeVar("Picked", views.ReplayRequest, views.DeleteRequest)


@dataclasses.dataclass(frozen=True)
class Dashboard:
    """What the routes share: the database, the options and the session keys."""

    engine: sa.Engine
    table: sa.Table
    options: WebOptions
    database: str
    sessions: Sessions
    templates: jinja2.Environment

    async def read(self, query: Callable[..., T], *args: Any) -> T:
        """Run ``admin.<query>(conn, table, *args)`` on a connection, off the event loop."""

        def run() -> T:
            with self.engine.connect() as conn:
                return query(conn, self.table, *args)

        return await run_in_threadpool(run)

    def page(
        self, request: Request, template: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        session: Session | None = request.state.session
        # A visitor who may not see the dashboard (the login form, a refusal) is told nothing
        # about the installation: not the database, the version nor the mode.
        authorized = bool(getattr(request.state, "authorized", False))
        html = self.templates.get_template(template).render(
            authorized=authorized,
            write=self.options.write and authorized,
            database=self.database if authorized else "",
            refresh_ms=int(self.options.refresh_seconds * 1000),
            csrf=self.sessions.csrf_token(session) if session else "",
            logged_in=bool(session and session.authenticated),
            version=__version__ if authorized else "",
            **context,
        )
        return HTMLResponse(html, status_code)


def create_app(engine: sa.Engine, table: sa.Table, options: WebOptions) -> Starlette:
    """The dashboard for one outbox table."""
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its name: events write attacker-controlled text
        undefined=jinja2.StrictUndefined,
    )
    templates.filters.update(when=views.when, age=views.age, error_text=views.error_text)
    templates.globals.update(
        payload=views.payload, timeline=views.timeline, relative=views.relative, waits=views.waits
    )
    database = views.database_label(engine.url)
    dash = Dashboard(engine, table, options, database, Sessions(), templates)
    routes = [
        Route("/", _bind(dash, dashboard)),
        Route("/api/summary", _bind(dash, summary)),
        Route("/pending", _bind(dash, queue_list)),
        Route("/in-flight", _bind(dash, queue_list)),
        Route("/search", _bind(dash, search)),
        Route("/event/{row_id:int}", _bind(dash, event_page)),
        Route("/replay/preview", _bind(dash, replay_preview), methods=["POST"]),
        Route("/replay", _bind(dash, replay), methods=["POST"]),
        Route("/delete/preview", _bind(dash, delete_preview), methods=["POST"]),
        Route("/delete", _bind(dash, delete), methods=["POST"]),
        Route("/keys/skip/preview", _bind(dash, skip_preview), methods=["POST"]),
        Route("/keys/skip", _bind(dash, skip), methods=["POST"]),
        Route("/login", _bind(dash, login), methods=["GET", "POST"]),
        Route("/logout", _bind(dash, logout), methods=["POST"]),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return dash.page(
            request, "message.html", exc.status_code, title="Refused", message=exc.detail
        )

    async def unavailable(request: Request, exc: Exception) -> Response:
        # One line for the log (no SQL parameters); the page says only what the operator can act on.
        log.error("database error: %s", _first_line(exc))
        message = "the database did not answer as expected; see the dashboard's log"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, 503)
        return dash.page(request, "message.html", 503, title="Database error", message=message)

    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, dashboard=dash)],
        exception_handlers={HTTPException: refused, sa.exc.SQLAlchemyError: unavailable},
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _bind(
    dash: Dashboard, endpoint: Callable[[Dashboard, Request], Any]
) -> Callable[[Request], Any]:
    async def bound(request: Request) -> Response:
        return await endpoint(dash, request)

    return bound


class Guard(BaseHTTPMiddleware):
    """Host check, session cookie, credentials and security headers, for every request."""

    def __init__(self, app: Any, dashboard: Dashboard) -> None:
        super().__init__(app)
        self.dash = dashboard

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        static = request.url.path.startswith("/static/")
        credentials = self.dash.options.credentials
        if not host_allowed(request.headers.get("host"), credentials):
            response: Response = PlainTextResponse(
                "this dashboard answers to 127.0.0.1 and localhost only", 421
            )
        else:
            sessions = self.dash.sessions
            session = sessions.read(request.cookies.get(SESSION_COOKIE))
            cookie = None
            if session is None and not static and request.url.path != "/healthz":
                session, cookie = sessions.issue(authenticated=False)
            request.state.session = session
            request.state.authorized = _authorized(self.dash, request, session)
            if static or request.url.path in OPEN_PATHS or request.state.authorized:
                response = await call_next(request)
            else:
                response = _ask_for_credentials(self.dash, request)
            if cookie is not None:
                _set_session_cookie(request, response, cookie, sessions.max_age)
        response.headers.update(security_headers(static))
        return response


def _authorized(dash: Dashboard, request: Request, session: Session | None) -> bool:
    credentials = dash.options.credentials
    if not credentials.required or (session is not None and session.authenticated):
        return True
    return credentials.accepts_authorization(request.headers.get("authorization"))


def _ask_for_credentials(dash: Dashboard, request: Request) -> Response:
    credentials = dash.options.credentials
    if (
        credentials.token
        and request.method == "GET"
        and "text/html" in request.headers.get("accept", "")
    ):
        return RedirectResponse("/login", 303)
    headers = (
        {"www-authenticate": 'Basic realm="outbox", charset="UTF-8"'}
        if credentials.basic_password
        else {}
    )
    return PlainTextResponse("credentials required", 401, headers=headers)


def _set_session_cookie(request: Request, response: Response, cookie: str, max_age: float) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(max_age),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def checked_form(dash: Dashboard, request: Request) -> views.Form:
    """The fields of a POST from one of our own pages; anything else is refused before use."""
    if not same_origin(request.headers):
        log.warning("cross-site %s %s refused", request.method, request.url.path)
        raise HTTPException(403, "cross-site request refused")
    if (
        request.headers.get("content-type", "").split(";")[0].strip()
        != "application/x-www-form-urlencoded"
    ):
        raise HTTPException(415, "a form post is expected")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    try:
        form = parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000, strict_parsing=False
        )
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "malformed form") from None
    if not dash.sessions.accepts_csrf(request.state.session, views.first(form, "csrf")):
        raise HTTPException(
            403, "the form's token is missing or stale: reload the page and try again"
        )
    return form


def _require_write(dash: Dashboard) -> None:
    if not dash.options.write:
        raise HTTPException(
            403,
            "this dashboard is read-only: start `outbox web --write` to replay, delete or skip",
        )


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


# -- pages --------------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def _query(request: Request) -> views.Form:
    params = request.query_params
    return {name: params.getlist(name) for name in params}


async def dashboard(dash: Dashboard, request: Request) -> Response:
    form = _query(request)
    query = views.DeadQuery.from_form(form)
    try:
        selection = query.selection()
        after = views.parse_after(views.first(form, "after"))
    except views.FormError as exc:
        return dash.page(request, "message.html", 400, title="Bad filter", message=str(exc))

    def read(conn: sa.Connection, table: sa.Table) -> tuple[Any, ...]:
        report = admin.status(conn, table, errors=0)
        matched = admin.count_for_replay(conn, table, selection)
        # One more than a page: whether there is a next one.
        rows = admin.dead_events(conn, table, selection, views.PAGE_SIZE + 1, after)
        parked = admin.parked_keys(conn, table, limit=views.PAGE_SIZE)
        return report, matched, rows, parked

    report, matched, rows, (parked_total, parked) = await dash.read(read)
    more = len(rows) > views.PAGE_SIZE
    rows = rows[: views.PAGE_SIZE]
    return dash.page(
        request,
        "dashboard.html",
        report=report,
        query=query,
        matched=matched,
        rows=rows,
        after=after,
        next_after=rows[-1].id if more else None,
        list_payload_chars=views.LIST_PAYLOAD_CHARS,
        parked_total=parked_total,
        parked=parked,
    )


async def summary(dash: Dashboard, request: Request) -> Response:
    def read(conn: sa.Connection, table: sa.Table) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        report = admin.status(conn, table, errors=0)
        since = views.window_start(now)
        buckets = admin.throughput(conn, table, since, views.BUCKET_SECONDS, now)
        return views.summary(report, buckets)

    return JSONResponse(await dash.read(read))


async def queue_list(dash: Dashboard, request: Request) -> Response:
    """A page of the pending or the in-flight rows, oldest first."""
    name = request.url.path.strip("/")
    state, title = views.QUEUE_LISTS[name]
    try:
        after = views.parse_after(views.first(_query(request), "after"))
    except views.FormError as exc:
        return dash.page(request, "message.html", 400, title="Bad page", message=str(exc))

    def read(conn: sa.Connection, table: sa.Table) -> tuple[Any, ...]:
        report = admin.snapshot(conn, table, published=False)
        rows = admin.queued_events(conn, table, state, views.QUEUE_PAGE_SIZE + 1, after)
        return report, rows, admin.database_now(conn)

    report, rows, now = await dash.read(read)
    more = len(rows) > views.QUEUE_PAGE_SIZE
    rows = rows[: views.QUEUE_PAGE_SIZE]
    return dash.page(
        request,
        "queue.html",
        name=name,
        state=state,
        title=title,
        report=report,
        rows=rows,
        now=now,
        after=after,
        next_after=rows[-1].id if more else None,
    )


async def search(dash: Dashboard, request: Request) -> Response:
    """One line per row the text names, newest first, a page at a time; a single row found is
    shown whole."""
    form = _query(request)
    text = views.first(form, "q")
    try:
        before = views.parse_before(views.first(form, "before"))
    except views.FormError as exc:
        return dash.page(request, "message.html", 400, title="Bad page", message=str(exc))
    records: list[admin.EventRecord] = []
    if text:
        records = await dash.read(admin.search_events, text, views.SEARCH_LIMIT + 1, before)
    more = len(records) > views.SEARCH_LIMIT
    records = records[: views.SEARCH_LIMIT]
    return dash.page(
        request,
        "search.html",
        q=text,
        records=records,
        before=before,
        next_before=records[-1].id if more else None,
        whole=records[0] if len(records) == 1 and before is None else None,
        any_dead=any(r.status == "dead" for r in records),
    )


async def event_page(dash: Dashboard, request: Request) -> Response:
    """One row's whole life, with what can be done about it."""
    record = await dash.read(admin.event_record, int(request.path_params["row_id"]))
    if record is None:
        raise HTTPException(404, "no such row (deleted, or trimmed by retention)")
    return dash.page(request, "event.html", r=record)


async def replay_preview(dash: Dashboard, request: Request) -> Response:
    """The dry run: how many events the replay would move, and a sample; then the choice."""
    form, ask = await _dead_events_form(dash, request, views.ReplayRequest)
    matched, sample = await dash.read(_preview_sample, ask.selection())
    return dash.page(
        request,
        "preview.html",
        ask=ask,
        matched=matched,
        sample=sample,
        back=views.first(form, "q"),
    )


async def replay(dash: Dashboard, request: Request) -> Response:
    form, ask = await _previewed_dead_events_form(dash, request, views.ReplayRequest, "replay")
    selection = ask.selection()

    def run() -> int:
        # A page per transaction, as `outbox replay` does: short locks, flat memory.
        return sum(admin.replay_in_pages(dash.engine, dash.table, selection, key=ask.key))

    replayed = await run_in_threadpool(run)
    log.info(
        "replay from the dashboard by %s: %d of %d previewed dead event(s), %s keys",
        _client(request),
        replayed,
        ask.expected,
        ask.key,
    )
    return dash.page(
        request, "replayed.html", ask=ask, replayed=replayed, back=views.first(form, "q")
    )


def _preview_sample(
    conn: sa.Connection, table: sa.Table, selection: admin.ReplayFilter
) -> tuple[int, list[admin.EventRecord]]:
    """What the preview of a replay and of a deletion both show: how many dead rows it would
    touch, counted as the write will count them, and the first of them."""
    matched = admin.count_for_replay(conn, table, selection)
    return matched, admin.dead_events(conn, table, selection, views.SAMPLE)


async def _dead_events_form(
    dash: Dashboard, request: Request, kind: type[Picked]
) -> tuple[views.Form, Picked]:
    """The checked form of a write on dead events and what it asks for (a replay or a
    deletion: they pick their rows alike). A form that cannot be used answers 400."""
    _require_write(dash)
    form = await checked_form(dash, request)
    try:
        ask = kind.from_form(form)
        ask.selection()  # a bad time in the filter is the operator's to fix
    except views.FormError as exc:
        raise HTTPException(400, str(exc)) from None
    return form, ask


async def _previewed_dead_events_form(
    dash: Dashboard, request: Request, kind: type[Picked], action: str
) -> tuple[views.Form, Picked]:
    """As :func:`_dead_events_form`, for the confirmation: it must carry the count its preview
    showed (``action`` names it in the 400 otherwise), so that no more rows than the operator
    saw are touched."""
    form, ask = await _dead_events_form(dash, request, kind)
    if ask.expected is None:
        raise HTTPException(400, f"preview the {action} first: its count is part of the request")
    return form, ask


async def delete_preview(dash: Dashboard, request: Request) -> Response:
    """The dry run of a deletion: how many dead events it would delete, a sample, and how many
    of them parked keys wait behind; then the confirmation."""
    form, ask = await _dead_events_form(dash, request, views.DeleteRequest)
    selection = ask.selection()

    def read(conn: sa.Connection, table: sa.Table) -> tuple[int, list[admin.EventRecord], int]:
        matched, sample = _preview_sample(conn, table, selection)
        return matched, sample, admin.parked_heads_among(conn, table, selection)

    matched, sample, heads = await dash.read(read)
    return dash.page(
        request,
        "delete_preview.html",
        ask=ask,
        matched=matched,
        sample=sample,
        parked_heads=heads,
        back=views.first(form, "q"),
    )


async def delete(dash: Dashboard, request: Request) -> Response:
    form, ask = await _previewed_dead_events_form(dash, request, views.DeleteRequest, "deletion")
    selection = ask.selection()

    def run() -> int:
        # A page per transaction, as `outbox delete-dead` does: short locks, flat memory.
        return sum(admin.delete_dead_in_pages(dash.engine, dash.table, selection))

    deleted = await run_in_threadpool(run)
    log.info(
        "deletion from the dashboard by %s: %d of %d previewed dead event(s)",
        _client(request),
        deleted,
        ask.expected,
    )
    return dash.page(request, "deleted.html", ask=ask, deleted=deleted, back=views.first(form, "q"))


async def skip_preview(dash: Dashboard, request: Request) -> Response:
    """What letting a parked key go on without its dead head means, before it is done."""
    _require_write(dash)
    form = await checked_form(dash, request)
    key = _ordering_key(form)
    parked = await dash.read(admin.parked_key, key)
    return dash.page(request, "skip_preview.html", key=key, parked=parked)


async def skip(dash: Dashboard, request: Request) -> Response:
    """``outbox keys --skip KEY``, for the key still parked behind the head the preview showed
    (a key parked again since, behind another head, waits for a preview of its own)."""
    _require_write(dash)
    form = await checked_form(dash, request)
    key = _ordering_key(form)
    try:
        head = views.parse_ids([views.first(form, "head")])[0]
    except views.FormError:
        raise HTTPException(
            400, "preview the skip first: its dead head is part of the request"
        ) from None

    def run() -> int:
        with dash.engine.begin() as conn:
            parked = admin.parked_key(conn, dash.table, key)
            if parked is None or parked.head_id != head:
                return 0
            return admin.skip_parked(conn, dash.table, [key])

    skipped = await run_in_threadpool(run)
    log.info(
        "skip from the dashboard by %s: ordering key %r behind row %d: %s",
        _client(request),
        key,
        head,
        "goes on" if skipped else "not parked behind that row any more, left as it is",
    )
    return dash.page(request, "skipped.html", key=key, head=head, skipped=skipped)


def _ordering_key(form: views.Form) -> str:
    try:
        return views.ordering_key(form)
    except views.FormError as exc:
        raise HTTPException(400, str(exc)) from None


async def login(dash: Dashboard, request: Request) -> Response:
    credentials = dash.options.credentials
    if request.method == "GET":
        return dash.page(request, "login.html", failed=False, token_login=bool(credentials.token))
    form = await checked_form(dash, request)
    if not credentials.accepts_token(views.first_secret(form, "token")):
        log.warning(
            "dashboard login refused from %s", request.client.host if request.client else "?"
        )
        return dash.page(
            request, "login.html", 401, failed=True, token_login=bool(credentials.token)
        )
    _, cookie = dash.sessions.issue(authenticated=True)
    response = RedirectResponse("/", 303)
    _set_session_cookie(request, response, cookie, dash.sessions.max_age)
    return response


async def logout(dash: Dashboard, request: Request) -> Response:
    await checked_form(dash, request)
    response = RedirectResponse("/login" if dash.options.credentials.token else "/", 303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
