"""The in-process server: threads, sockets, the ``/_test`` control API and the public methods.

Two listeners: the Sockudo API port (which faults can take down) and a control port that stays up,
so a test can still inspect and heal a server that is "down". ``/_test/*`` is also answered on the
API port for convenience; control requests are never counted, rate-limited or faulted.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from .app import SockudoApp
from .config import ServerConfig
from .state import Clock, Delivery, DeliveryLog, Fault, Faults, Stats
from .wire import Response


class _Listener(ThreadingHTTPServer):
    # SO_REUSEADDR, so a server that went "down" can come back on the same port at once.
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut every open connection, as a server going down does (keep-alive ones included)."""
        with self._open_lock:
            connections, self._open = list(self._open), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or was killed hangs up while we answer: that is the normal
        # life of a fault test, not a server error worth a traceback on stderr.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sockudo-test-server"
    # Headers and body go out in two writes: with Nagle's algorithm on, a kept-alive
    # connection would wait for the client's delayed ACK (40 ms) before every body.
    disable_nagle_algorithm = True
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _dispatch(self) -> None:
        owner: TestServer = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path.startswith("/_test/") or self.path == "/_test":
            response = owner._control(self.command, self.path, body)
        elif self.server.control_only:  # type: ignore[attr-defined]
            response = Response(404, b"", "text/plain; charset=utf-8")
        else:
            response = owner.app.handle(
                self.command, self.path, headers, body, self.client_address[0]
            )
        keep_alive = self.server.owner.keep_alive and not response.drop  # type: ignore[attr-defined]
        # BaseHTTPRequestHandler keeps an HTTP/1.1 connection open unless told otherwise (or
        # the client sent "Connection: close").
        self.close_connection = self.close_connection or not keep_alive
        if response.drop:
            # Close without a byte of answer; RST so the client sees the drop at once.
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value).encode("utf-8"))


class TestServer:
    """A Sockudo-faithful publish API on 127.0.0.1, with a delivery record and fault injection.

    >>> with TestServer() as server:
    ...     sockudo_url = server.url  # http://app-key:app-secret@127.0.0.1:PORT/apps/app-id
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app_id: str = "app-id",
        key: str = "app-key",
        secret: str = "app-secret",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        control_port: int = 0,
        max_batch_size: int = 100,
        max_payload_kb: int = 100,
        max_event_name_bytes: int = 100,
        max_channel_name_bytes: int = 100,
        max_channels_per_event: int = 100,
        namespaces: Iterable[str] = (),
        idempotency: bool = True,
        idempotency_ttl: float = 120.0,
        idempotency_max_key_bytes: int = 128,
        timestamp_window: int = 600,
        inflight_wait: float = 0.3,
        message_id_wait: float = 1.0,
        history: bool = False,
        versioned_messages: bool = False,
        presence_history: bool = False,
        annotations: bool = False,
        app_annotations: bool = False,
        history_max_page_size: int = 100,
        presence_history_max_page_size: int = 100,
        versioned_max_page_size: int = 100,
        node_id: str = "node",
        time_func: Callable[[], float] = time.time,
        keep_alive: bool = False,
    ) -> None:
        #: Keep connections open between requests, as Sockudo does (soketi closes every one).
        self.keep_alive = keep_alive
        self.config = ServerConfig(
            app_id=app_id,
            key=key,
            secret=secret,
            max_batch_size=max_batch_size,
            max_payload_kb=max_payload_kb,
            max_event_name_bytes=max_event_name_bytes,
            max_channel_name_bytes=max_channel_name_bytes,
            max_channels_per_event=max_channels_per_event,
            namespaces=frozenset(namespaces),
            idempotency=idempotency,
            idempotency_ttl=idempotency_ttl,
            idempotency_max_key_bytes=idempotency_max_key_bytes,
            timestamp_window=timestamp_window,
            inflight_wait=inflight_wait,
            message_id_wait=message_id_wait,
            history=history,
            versioned_messages=versioned_messages,
            presence_history=presence_history,
            annotations=annotations,
            app_annotations=app_annotations,
            history_max_page_size=history_max_page_size,
            presence_history_max_page_size=presence_history_max_page_size,
            versioned_max_page_size=versioned_max_page_size,
            node_id=node_id,
        )
        self.host = host
        self.clock = Clock(time_func)
        self._deliveries = DeliveryLog()
        self._faults = Faults()
        self._stats = Stats()
        self.app = SockudoApp(self.config, self.clock, self._deliveries, self._faults, self._stats)
        self._port = port
        self._control_port = control_port
        self._api: _Listener | None = None
        self._control_listener: _Listener | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._up_timer: threading.Timer | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> TestServer:
        self._control_listener = self._listen(self._control_port, control_only=True)
        self._control_port = self._control_listener.server_address[1]
        self.come_up()
        return self

    def stop(self) -> None:
        if self._up_timer is not None:
            self._up_timer.cancel()
        self.go_down()
        if self._control_listener is not None:
            self._control_listener.shutdown()
            self._control_listener.server_close()
            self._control_listener = None

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self, port: int, control_only: bool) -> _Listener:
        listener = _Listener((self.host, port), _Handler)
        listener.owner = self  # type: ignore[attr-defined]
        listener.control_only = control_only  # type: ignore[attr-defined]
        thread = threading.Thread(
            target=listener.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        self._threads.append(thread)
        return listener

    def go_down(self, seconds: float | None = None) -> None:
        """Stop listening on the API port (connection refused); back up after ``seconds`` if given."""
        with self._lock:
            if self._api is not None:
                self._api.shutdown()
                self._api.server_close()
                self._api.close_connections()
                self._api = None
            if seconds is not None:
                self._up_timer = threading.Timer(seconds, self.come_up)
                self._up_timer.daemon = True
                self._up_timer.start()

    def come_up(self) -> None:
        """Listen again on the same API port."""
        with self._lock:
            if self._api is None:
                self._api = self._listen(self._port, control_only=False)
                self._port = self._api.server_address[1]

    @property
    def is_up(self) -> bool:
        return self._api is not None

    # ----------------------------------------------------------------- addresses
    @property
    def port(self) -> int:
        return self._port

    @property
    def control_port(self) -> int:
        return self._control_port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The ``SOCKUDO_URL`` form: ``http://KEY:SECRET@HOST:PORT/apps/APP_ID``."""
        c = self.config
        return f"http://{c.key}:{c.secret}@{self.host}:{self.port}/apps/{c.app_id}"

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.control_port}/_test"

    # ----------------------------------------------------------------- clock
    def now(self) -> float:
        return self.clock.now()

    def advance_clock(self, seconds: float) -> float:
        """Move the server clock forward (TTL expiry, and the signature timestamp check)."""
        return self.clock.advance(seconds)

    # ----------------------------------------------------------------- inspection
    def deliveries(self, channel: str | None = None) -> list[Delivery]:
        return self._deliveries.list(channel)

    def delivered_count(self, channel: str | None = None) -> int:
        return len(self._deliveries.list(channel))

    def duplicates(self) -> dict[tuple[str, ...], int]:
        """Identities delivered more than once -> times delivered."""
        return self._deliveries.duplicates()

    def request_count(self, endpoint: str | None = None, status: int | None = None) -> int:
        return self._stats.count(endpoint, status)

    def requests(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self._stats.requests()]

    def stats(self) -> dict[str, Any]:
        summary = self._stats.summary()
        summary["delivered"] = self.delivered_count()
        summary["duplicates"] = sum(n - 1 for n in self.duplicates().values())
        return summary

    def idempotency_state(self, key: str) -> str | None:
        """``"processing"``, ``"done"`` or None for an app-scoped idempotency key."""
        value = self.app.keys.get(key)
        return None if value is None else ("processing" if isinstance(value, str) else "done")

    def reset(self, idempotency: bool = True) -> None:
        """Forget deliveries, counters, faults, history, messages, annotations and connections
        (and the idempotency caches unless told not to)."""
        self._deliveries.clear()
        self._stats.clear()
        self._faults.clear()
        self.app.stores.clear()
        if idempotency:
            for cache in (self.app.keys, self.app.batch_keys, self.app.ledger):
                cache.clear()

    # ----------------------------------------------------------------- features
    FEATURES = (
        "history",
        "versioned_messages",
        "presence_history",
        "annotations",
        "app_annotations",
    )

    def set_features(self, **switches: bool) -> dict[str, bool]:
        """Turn features on or off while running (``history=True``...); returns them all.

        What was stored stays: switching history off and on again finds the same streams.
        """
        unknown = set(switches) - set(self.FEATURES)
        if unknown:
            raise ValueError(f"unknown features: {sorted(unknown)}")
        self.config = replace(self.config, **switches)
        self.app.config = self.config
        return self.features()

    def features(self) -> dict[str, bool]:
        return {name: getattr(self.config, name) for name in self.FEATURES}

    # ----------------------------------------------------------------- limits
    LIMITS = (
        "max_batch_size",
        "max_payload_kb",
        "max_event_name_bytes",
        "max_channel_name_bytes",
        "max_channels_per_event",
    )

    def set_limits(self, **limits: int) -> dict[str, int]:
        """Change the app's limits while running (``max_payload_kb=100``...); returns them all,
        as an operator raising a limit in Sockudo's configuration and restarting it would."""
        unknown = set(limits) - set(self.LIMITS)
        if unknown:
            raise ValueError(f"unknown limits: {sorted(unknown)}")
        bad = {name: value for name, value in limits.items() if int(value) < 1}
        if bad:
            raise ValueError(f"limits must be at least 1: {bad}")
        self.config = replace(self.config, **{k: int(v) for k, v in limits.items()})
        self.app.config = self.config
        return self.limits()

    def limits(self) -> dict[str, int]:
        return {name: getattr(self.config, name) for name in self.LIMITS}

    # ----------------------------------------------------------------- connections
    def connect(
        self, channels: Iterable[str], user_id: str | None = None, user_info: Any = None
    ) -> str:
        """Simulate a subscriber on ``channels`` (presence channels need ``user_id``): it counts
        in channel state, and joining or leaving a presence channel is a presence-history event.
        Returns its socket id."""
        return self.app.api.connect(list(channels), user_id, user_info)

    def disconnect(self, socket_id: str) -> None:
        self.app.api.disconnect(socket_id)

    def connections(self) -> list[dict[str, Any]]:
        with self.app.stores.lock:
            return [
                {
                    "socket_id": c.socket_id,
                    "user_id": c.user_id,
                    "channels": sorted(c.channels),
                }
                for c in self.app.stores.connections.values()
            ]

    # ----------------------------------------------------------------- faults
    def fail_next(
        self,
        count: int | None = 1,
        status: int = 500,
        code: str = "internal_error",
        message: str = "Internal server error",
        retry_after: int | None = None,
        stage: str = "claimed",
        endpoints: Iterable[str] = ("events", "batch_events"),
    ) -> None:
        """Answer the next ``count`` publish requests reaching ``stage`` with this error."""
        self._faults.add(
            Fault(
                "fail",
                stage=stage,
                remaining=count,
                status=status,
                code=code,
                message=message,
                retry_after=retry_after,
                endpoints=tuple(endpoints),
            )
        )

    def add_latency(
        self,
        seconds: float,
        stage: str = "claimed",
        count: int | None = None,
        endpoints: Iterable[str] = ("events", "batch_events"),
    ) -> None:
        """Sleep ``seconds`` at ``stage`` (``claimed`` = before publishing, ``published`` = after)."""
        self._faults.add(
            Fault(
                "latency", stage=stage, remaining=count, seconds=seconds, endpoints=tuple(endpoints)
            )
        )

    def drop_next(
        self,
        count: int | None = 1,
        stage: str = "received",
        endpoints: Iterable[str] = ("events", "batch_events"),
    ) -> None:
        """Close the connection without answering. ``published`` = it went through, unanswered."""
        self._faults.add(Fault("drop", stage=stage, remaining=count, endpoints=tuple(endpoints)))

    def fail_batch_item(
        self,
        index: int,
        status: int = 413,
        code: str = "payload_too_large",
        message: str = "Event payload size exceeds limit",
        count: int | None = 1,
    ) -> None:
        """Make item ``index`` of the next batch fail (after its key is claimed); earlier items stay."""
        self._faults.add(
            Fault(
                "batch_item",
                remaining=count,
                status=status,
                code=code,
                message=message,
                index=index,
                endpoints=("batch_events",),
            )
        )

    def rate_limit(self, per_second: int | None, retry_after: int = 1) -> None:
        """Allow ``per_second`` API requests per client IP per second, then 429; None disables."""
        self._faults.set_rate_limit(per_second, retry_after)

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults(self) -> dict[str, Any]:
        return self._faults.describe()

    # ----------------------------------------------------------------- control API
    def _control(self, method: str, target: str, body: bytes) -> Response:
        path, _, query = target.partition("?")
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            payload = json.loads(body) if body else {}
            route = path.removeprefix("/_test").strip("/")
            return self._control_route(method, route, args, payload)
        except (ValueError, TypeError, KeyError) as error:
            return _json({"error": str(error)}, 400)

    def _control_route(
        self, method: str, route: str, args: dict[str, str], payload: dict[str, Any]
    ) -> Response:
        if method == "GET" and route == "deliveries":
            items = [d.to_dict() for d in self.deliveries(args.get("channel"))]
            return _json({"deliveries": items})
        if method == "GET" and route == "duplicates":
            dups = [{"identity": list(k), "count": n} for k, n in self.duplicates().items()]
            return _json({"duplicates": dups})
        if method == "GET" and route == "stats":
            return _json(self.stats())
        if method == "GET" and route == "requests":
            return _json({"requests": self.requests()})
        if method == "GET" and route == "idempotency":
            return _json({"key": args["key"], "state": self.idempotency_state(args["key"])})
        if method == "GET" and route == "config":
            config = asdict(replace(self.config, namespaces=frozenset()))
            config["namespaces"] = sorted(self.config.namespaces)
            config.update(url=self.url, control_url=self.control_url, up=self.is_up)
            return _json(config)
        if method == "GET" and route == "faults":
            return _json(self.faults())
        if route == "features" and method in ("GET", "POST"):
            return _json(self.set_features(**payload) if method == "POST" else self.features())
        if route == "limits" and method in ("GET", "POST"):
            return _json(self.set_limits(**payload) if method == "POST" else self.limits())
        if method == "GET" and route == "connections":
            return _json({"connections": self.connections()})
        if method == "POST" and route == "connections":
            socket_id = self.connect(
                payload["channels"], payload.get("user_id"), payload.get("user_info")
            )
            return _json({"socket_id": socket_id})
        if method == "DELETE" and route.startswith("connections/"):
            self.disconnect(route.removeprefix("connections/"))
            return _json({"ok": True})
        if method == "POST" and route == "reset":
            self.reset(idempotency=payload.get("idempotency", True))
        elif method == "POST" and route == "clock":
            return _json({"now": self.advance_clock(float(payload.get("advance", 0)))})
        elif method == "POST" and route == "down":
            self.go_down(payload.get("seconds"))
        elif method == "POST" and route == "up":
            self.come_up()
        elif method == "DELETE" and route == "faults":
            self.clear_faults()
        elif method == "POST" and route == "faults":
            self._apply_faults(payload)
        else:
            return _json({"error": f"no control route {method} /_test/{route}"}, 404)
        return _json({"ok": True})

    def _apply_faults(self, payload: dict[str, Any]) -> None:
        """``{"fail_next": {...}, "latency": {...}, "drop_next": {...}, ...}``: kwargs per knob."""
        if payload.get("clear"):
            self.clear_faults()
        knobs: dict[str, Callable[..., None]] = {
            "fail_next": self.fail_next,
            "latency": self.add_latency,
            "drop_next": self.drop_next,
            "fail_batch_item": self.fail_batch_item,
        }
        for name, knob in knobs.items():
            if name in payload:
                knob(**payload[name])
        if "rate_limit" in payload:
            self.rate_limit(**(payload["rate_limit"] or {"per_second": None}))
