"""Sockudo's publish path as a plain function: (method, target, headers, body) -> Response.

Routing, rate limit, faults and authentication are shared by every route; the non-publish
routes (channel state, history, messages, annotations) are answered by ``api.py``. Each rule cites where it lives in Sockudo 5.0.x so a reader can check it:
auth = ``sockudo-core/src/auth.rs`` + ``sockudo-server/src/middleware.rs``; endpoints =
``http_handler/events/mod.rs``; per-event validation and publish = ``events/processor.rs``;
the (channel, message_id) layer = ``sockudo-adapter/src/services.rs`` + ``sockudo-core/src/idempotency.rs``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from outbox.sockudo.signing import body_md5, hmac_sha256_hex, string_to_sign

from .api import ChannelApi
from .config import ServerConfig
from .request import parse_json, parse_query, validate_channel
from .state import PROCESSING, Clock, DeliveryLog, ExpiringCache, Faults, Stats
from .store import Stores
from .wire import ApiError, Dropped, Rejection, Response
from .wire import auth_failed as _auth_failed
from .wire import backpressure as _backpressure
from .wire import bad_request as _bad_request
from .wire import dumps as _dumps

_ROUTE = re.compile(r"^/apps/([^/]+)/(events|batch_events)$")

# Field types of PusherApiMessage; a mismatch is a serde error, i.e. a 422 from the Json extractor.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "channel": (str,),
    "socket_id": (str,),
    "info": (str,),
    "idempotency_key": (str,),
    "message_id": (str,),
    "delta": (bool,),
    "extras": (dict,),
    "tags": (dict,),
    "channels": (list,),
}


def _check_event_types(event: Any, where: str) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise Rejection(422, f"{where}invalid type: expected struct PusherApiMessage")
    for name, types in _FIELD_TYPES.items():
        value = event.get(name)
        if value is None:
            continue
        ok = isinstance(value, types)
        if ok and name == "channels":
            ok = all(isinstance(c, str) for c in value)
        if ok and name == "tags":
            ok = all(isinstance(v, str) for v in value.values())
        if ok and name == "extras":
            ok = _extras_typed(value)
        if not ok:
            raise Rejection(
                422,
                "Failed to deserialize the JSON body into the target type: "
                f"{where}{name}: invalid type",
            )
    return event


def _idempotency_keys(endpoint: str, body: bytes) -> tuple[str, ...]:
    """The keys a publish request carries, for the request log (never for deciding anything)."""
    if endpoint not in ("events", "batch_events"):
        return ()
    try:
        payload = json.loads(body)
    except ValueError:
        return ()
    items = payload.get("batch") if isinstance(payload, dict) else None
    events = items if isinstance(items, list) else [payload]
    return tuple(
        e["idempotency_key"]
        for e in events
        if isinstance(e, dict) and isinstance(e.get("idempotency_key"), str)
    )


def _extras_typed(extras: dict[str, Any]) -> bool:
    """``MessageExtras``'s typed fields (messages.rs): flat scalar headers, boolean flags, a
    string key, string maps under ``ai``; any other field is an opaque extension."""
    headers = extras.get("headers")
    if headers is not None and not (
        isinstance(headers, dict)
        and all(isinstance(v, str | int | float) for v in headers.values())
    ):
        return False
    if any(
        extras.get(f) is not None and not isinstance(extras[f], bool) for f in ("ephemeral", "echo")
    ):
        return False
    key = extras.get("idempotencyKey")
    if key is not None and not isinstance(key, str):
        return False
    ai = extras.get("ai")
    if ai is None:
        return True
    if not isinstance(ai, dict):
        return False
    parts = [ai.get("transport"), ai.get("codec")]
    return all(
        p is None or (isinstance(p, dict) and all(isinstance(v, str) for v in p.values()))
        for p in parts
    )


def _wants(info: str | None, what: str) -> bool:
    return info is not None and what in (part.strip() for part in info.split(","))


class SockudoApp:
    """The request logic. Shared state is passed in so the HTTP layer can reset or inspect it."""

    def __init__(
        self,
        config: ServerConfig,
        clock: Clock,
        deliveries: DeliveryLog,
        faults: Faults,
        stats: Stats,
    ) -> None:
        self.config = config
        self.clock = clock
        self.deliveries = deliveries
        self.faults = faults
        self.stats = stats
        #: App-scoped key -> "__processing__" or the stored response bytes (``idempotency_cache_key``).
        self.keys = ExpiringCache(clock)
        #: Batch header keys live apart from event keys (``batch_idempotency_cache_key``).
        self.batch_keys = ExpiringCache(clock)
        #: (channel, message_id) -> pending/committed record with a payload fingerprint.
        self.ledger = ExpiringCache(clock)
        #: History, versioned messages, annotations, connections and presence history.
        self.stores = Stores(config.node_id)
        self.api = ChannelApi(self)

    # ----------------------------------------------------------------- entry point
    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes, client: str
    ) -> Response:
        path, _, query = target.partition("?")
        if path == "/up" or (path.startswith("/up/") and path.count("/") == 2):
            found = path == "/up" or path[4:] == self.config.app_id
            text = "OK" if found else "NOT_FOUND"
            response = Response(200 if found else 404, text.encode(), "text/plain; charset=utf-8")
            response.headers["X-Health-Check"] = text
            self.stats.record("up", response.status, client)
            return response
        match = _ROUTE.match(path)
        if match is not None:
            endpoint, allowed = match.group(2), ("POST",)
        else:
            found = self.api.match(path)
            if found is None:
                self.stats.record("other", 404, client)
                return Response(404, b"", "text/plain; charset=utf-8")
            endpoint, routes = found
            allowed = tuple(routes)
            if method in routes:
                endpoint = routes[method].endpoint
        if method not in allowed:
            self.stats.record(endpoint, 405, client)
            return Response(405, b"", "text/plain; charset=utf-8")
        received = time.time()
        keys = _idempotency_keys(endpoint, body)
        try:
            response = self._api(endpoint, method, path, query, headers, body, client)
        except Dropped:
            self.stats.record(endpoint, 0, client, keys, received)
            return Response(0, drop=True)
        except ApiError as error:
            response = error.response()
        except Rejection as rejection:
            response = Response(
                rejection.status, rejection.text.encode(), "text/plain; charset=utf-8"
            )
        retry_after = response.headers.get("Retry-After")
        self.stats.record(
            endpoint,
            response.status,
            client,
            keys,
            received,
            int(retry_after) if retry_after is not None and retry_after.isdigit() else None,
        )
        return response

    def _api(
        self,
        endpoint: str,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        client: str,
    ) -> Response:
        # The rate limiter is a layer outside authentication (sockudo-rate-limiter middleware).
        retry_after = self.faults.over_rate_limit(client)
        if retry_after is not None:
            body_429 = _dumps(
                {
                    "error": "Too Many Requests",
                    "message": "Rate limit exceeded. Please try again later.",
                }
            )
            return Response(429, body_429, headers={"Retry-After": str(retry_after)})
        self._stage("received", endpoint)
        self._authenticate(method, path, query, body)
        if endpoint not in ("events", "batch_events"):
            route = self.api.match(path)[1][method]  # type: ignore[index]
            self._stage("claimed", endpoint)
            answer = route.answer(parse_query(query), body, headers)
            # Applied (a mutation, an annotation...): a "published" fault loses the answer.
            self._stage("published", endpoint)
            return answer
        payload = parse_json(headers, body)
        if endpoint == "events":
            return self._events(_check_event_types(payload, ""), headers)
        return self._batch_events(payload, headers)

    def _stage(self, stage: str, endpoint: str) -> None:
        """Apply armed faults at one point of a request: latency, then drop, then failure."""
        latency = self.faults.take("latency", stage, endpoint)
        if latency is not None:
            time.sleep(latency.seconds)
        if self.faults.take("drop", stage, endpoint) is not None:
            raise Dropped
        fail = self.faults.take("fail", stage, endpoint)
        if fail is not None:
            raise ApiError(fail.status, fail.code, fail.message, fail.retry_after)

    # ----------------------------------------------------------------- authentication
    def _authenticate(self, method: str, path: str, query: str, body: bytes) -> None:
        if not query:
            raise _bad_request("Missing authentication query parameters")
        pairs = parse_qsl(query, keep_blank_values=True)
        if not pairs:
            raise _bad_request("Query string is empty or invalid")
        params = {k: v for k, v in pairs if k != "auth_signature"}
        signature = dict(pairs).get("auth_signature", "")
        if params.get("auth_key", "") != self.config.key:
            raise ApiError(404, "app_not_found", "Application key not found or invalid")
        route_app_id = path.split("/")[2]
        if route_app_id != self.config.app_id:
            raise _auth_failed("Authenticated app does not match route app_id")
        timestamp = params.get("auth_timestamp", "")
        if not timestamp:
            raise _auth_failed("auth_timestamp is missing")
        try:
            skew = abs(int(self.clock.now()) - int(timestamp))
        except ValueError:
            raise _auth_failed("Invalid auth_timestamp format") from None
        if skew > self.config.timestamp_window:
            raise _auth_failed("Timestamp expired or too far in the future")
        lowered = {k.lower(): v for k, v in params.items()}
        sent_md5 = lowered.get("body_md5")
        if method == "POST" and body:
            if not sent_md5:
                raise _auth_failed(
                    "body_md5 is required and must be non-empty in query parameters "
                    "for POST requests with a non-empty body"
                )
            if not hmac.compare_digest(body_md5(body), sent_md5):
                raise _auth_failed("body_md5 mismatch")
        elif sent_md5 is not None:
            # Sockudo refuses body_md5 on GET, and also on a POST whose body is empty.
            raise _auth_failed(
                f"body_md5 must not be present in query parameters for {method} requests"
                + (" with an empty body" if method == "POST" else "")
            )
        expected = hmac_sha256_hex(self.config.secret, string_to_sign(method, path, lowered))
        if not hmac.compare_digest(expected, signature):
            raise _auth_failed("Invalid API signature")

    # ----------------------------------------------------------------- idempotency (layer 1)
    def _validate_key(self, key: str) -> None:
        if key == "":
            raise _bad_request("Idempotency key must not be empty")
        if len(key.encode("utf-8")) > self.config.idempotency_max_key_bytes:
            raise _bad_request(
                "Idempotency key exceeds maximum length of "
                f"{self.config.idempotency_max_key_bytes} characters"
            )

    def _claim(self, cache: ExpiringCache, key: str, in_progress: str) -> bytes | None:
        """Claim ``key`` (None) or return the stored response of an earlier request.

        A key another request holds is polled 6 x 50 ms, then refused with 503 backpressure,
        exactly as Sockudo does. A key left "processing" by a failed publish stays so until TTL.
        """
        cached = cache.get(key)
        if cached is not None and cached != PROCESSING:
            return cached
        if cached is None and cache.set_if_absent(key, PROCESSING, self.config.idempotency_ttl):
            return None
        deadline = time.monotonic() + self.config.inflight_wait
        while time.monotonic() < deadline:
            time.sleep(0.05)
            cached = cache.get(key)
            if cached is not None and cached != PROCESSING:
                return cached
        raise _backpressure(in_progress)

    # ----------------------------------------------------------------- /events
    def _events(self, event: dict[str, Any], headers: Mapping[str, str]) -> Response:
        key: str | None = None
        if self.config.idempotency:
            key = event.get("idempotency_key") or headers.get("x-idempotency-key")
            if event.get("idempotency_key") == "":
                key = ""
            if key is not None:
                self._validate_key(key)
        if key is not None:
            cached = self._claim(self.keys, key, "Idempotent publish is still in progress")
            if cached is not None:
                return Response(200, cached)
        # Everything from here runs with the key claimed: any error (a 413, a bad channel, an
        # injected fault) leaves it "processing" until the TTL, as in Sockudo.
        self._stage("claimed", "events")
        collect = event.get("info") is not None or event.get("message_id") is not None
        channels_info = self._process(event, collect, key, "events")
        body = _dumps({"channels": channels_info} if collect and channels_info else {"ok": True})
        if key is not None:
            self.keys.set(key, body, self.config.idempotency_ttl)
        self._stage("published", "events")
        return Response(200, body)

    # ----------------------------------------------------------------- /batch_events
    def _batch_events(self, payload: Any, headers: Mapping[str, str]) -> Response:
        if not isinstance(payload, dict) or not isinstance(payload.get("batch"), list):
            raise Rejection(
                422,
                "Failed to deserialize the JSON body into the target type: missing field `batch`",
            )
        batch = [
            _check_event_types(item, f"batch[{i}].") for i, item in enumerate(payload["batch"])
        ]
        if len(batch) > self.config.max_batch_size:
            raise ApiError(
                400,
                "limit_exceeded",
                f"Batch size ({len(batch)}) exceeds limit ({self.config.max_batch_size})",
            )
        header_key: str | None = None
        if self.config.idempotency:
            for item in batch:
                if item.get("idempotency_key") is not None:
                    self._validate_key(item["idempotency_key"])
            header_key = headers.get("x-idempotency-key")
            if header_key is not None:
                self._validate_key(header_key)
                cached = self._claim(
                    self.batch_keys, header_key, "Idempotent batch publish is still in progress"
                )
                if cached is not None:
                    return Response(200, cached)
        self._stage("claimed", "batch_events")
        any_info = any(
            item.get("info") is not None or item.get("message_id") is not None for item in batch
        )
        results: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for index, item in enumerate(batch):
            key = item.get("idempotency_key")
            # Present in ANY state, "processing" included: skipped, and the batch still
            # answers 200. A retried batch therefore loses the item that failed before.
            if (
                key is not None
                and self.config.idempotency
                and (
                    self.keys.get(key) is not None
                    or not self.keys.set_if_absent(key, PROCESSING, self.config.idempotency_ttl)
                )
            ):
                results.append((item, {}))
                continue
            fault = self.faults.take("batch_item", "claimed", "batch_events", index=index)
            if fault is not None:
                raise ApiError(fault.status, fault.code, fault.message, fault.retry_after)
            collect = item.get("info") is not None or item.get("message_id") is not None
            info = self._process(item, collect, key, "batch_events")
            if key is not None and self.config.idempotency:
                self.keys.set(key, b"1", self.config.idempotency_ttl)
            results.append((item, info))
        if any_info:
            entries = []
            for item, info in results:
                main = item.get("channel") or (item.get("channels") or [None])[0]
                entries.append(info.get(main, {}) if main is not None else {})
            body = _dumps({"batch": entries})
        else:
            body = _dumps({})
        if header_key is not None:
            self.batch_keys.set(header_key, body, self.config.idempotency_ttl)
        self._stage("published", "batch_events")
        return Response(200, body)

    # ----------------------------------------------------------------- one event
    def _process(
        self, event: dict[str, Any], collect: bool, key: str | None, endpoint: str
    ) -> dict[str, Any]:
        """``process_single_event_parallel``: validate, then publish to each channel."""
        cfg = self.config
        name = event.get("name")
        if name is None:
            raise _bad_request("Event name is required")
        if len(name.encode("utf-8")) > cfg.max_event_name_bytes:
            raise ApiError(
                400,
                "limit_exceeded",
                f"Event name '{name}' exceeds maximum length of {cfg.max_event_name_bytes}",
            )
        raw = event.get("data")
        data = raw if isinstance(raw, str) else _dumps(raw).decode("utf-8")
        size = len(data.encode("utf-8"))
        if size > cfg.max_payload_kb * 1024:
            raise ApiError(
                413,
                "payload_too_large",
                f"Event payload size ({size} bytes) for event '{name}' exceeds limit "
                f"({cfg.max_payload_kb}KB)",
            )
        channels = event.get("channels")
        if channels is not None:
            if not channels:  # an empty list is an error even when "channel" is set
                raise ApiError(
                    400,
                    "missing_channel_info",
                    "Request must contain 'channels' (list) or 'channel' (string)",
                )
            if len(channels) > cfg.max_channels_per_event:
                raise ApiError(
                    400,
                    "limit_exceeded",
                    f"Number of channels ({len(channels)}) exceeds limit "
                    f"({cfg.max_channels_per_event})",
                )
            targets = list(channels)
        elif event.get("channel") is not None:
            targets = [event["channel"]]
        else:
            raise ApiError(
                400,
                "missing_channel_info",
                "Request must contain 'channels' (list) or 'channel' (string)",
            )
        # Sockudo validates and publishes each channel concurrently, then reports the first
        # error: the valid channels of a partly invalid event ARE published.
        info_map: dict[str, Any] = {}
        first_error: ApiError | None = None
        for channel in targets:
            try:
                validate_channel(channel, self.config)
                receipt = self._publish(channel, event, name, data, key, endpoint)
            except ApiError as error:
                first_error = first_error or error
                continue
            if collect:
                entry: dict[str, Any] = dict(receipt)
                if channel.startswith("presence-") and _wants(event.get("info"), "user_count"):
                    entry["user_count"] = len(self.stores.members(channel))
                if _wants(event.get("info"), "subscription_count"):
                    entry["subscription_count"] = self.stores.subscribers(channel)
                info_map[channel] = entry
        if first_error is not None:
            raise first_error
        return info_map

    # ----------------------------------------------------------------- publish (layer 2)
    def _publish(
        self,
        channel: str,
        event: dict[str, Any],
        name: str,
        data: str,
        key: str | None,
        endpoint: str,
    ) -> dict[str, Any]:
        """Deliver to ``channel`` unless (channel, message_id) already went out; the receipt
        (``acknowledgement_id``, plus the serials when history and versioned messages are on)."""
        extras = event.get("extras")
        ledger_id = (
            event.get("message_id")
            or (extras or {}).get("idempotencyKey")
            or (key if key is not None else None)
        )
        if event.get("message_id") == "":
            ledger_id = ""
        claim_key: str | None = None
        record: tuple[str, str, Any] | None = None
        if self.config.idempotency and ledger_id is not None:
            if ledger_id == "":
                raise _bad_request("idempotency key must not be empty")
            if len(ledger_id.encode("utf-8")) > self.config.idempotency_max_key_bytes:
                raise _bad_request(
                    f"idempotency key exceeds {self.config.idempotency_max_key_bytes} bytes"
                )
            fingerprint = _fingerprint(channel, event, name, data)
            claim_key = f"{channel}\0{ledger_id}"
            record = ("pending", fingerprint, uuid.uuid4().hex)
            receipt = self._begin_ledger(claim_key, record)
            if receipt is not None:
                return receipt  # same payload already published: replay, not re-delivered
        # The history row and the create version are written before fan-out.
        serials = self.api.record_publish(channel, name, data, event)
        ack = serials.get("message_serial") or event.get("message_id") or str(uuid.uuid4())
        receipt = {"acknowledgement_id": ack, **serials}
        self.deliveries.record(
            self.clock,
            channel=channel,
            name=name,
            data=data,
            socket_id=event.get("socket_id"),
            message_id=event.get("message_id"),
            idempotency_key=key,
            tags=event.get("tags"),
            extras=extras,
            endpoint=endpoint,
        )
        if claim_key is not None and record is not None:
            self.ledger.set(
                claim_key, ("committed", record[1], receipt), self.config.idempotency_ttl
            )
        return receipt

    def _begin_ledger(self, claim_key: str, record: tuple[str, str, Any]) -> dict[str, Any] | None:
        ttl = max(self.config.idempotency_ttl, 1)
        if self.ledger.set_if_absent(claim_key, record, ttl):
            return None
        deadline = time.monotonic() + self.config.message_id_wait
        while time.monotonic() < deadline:
            existing = self.ledger.get(claim_key)
            if existing is None:
                if self.ledger.set_if_absent(claim_key, record, ttl):
                    return None
            elif existing[1] != record[1]:
                raise _bad_request("idempotency key was already used with a different payload")
            elif existing[0] == "committed":
                return existing[2]
            time.sleep(0.025)
        raise _backpressure("idempotent publish is still in progress")


def _fingerprint(channel: str, event: dict[str, Any], name: str, data: str) -> str:
    """Payload identity: what Sockudo hashes minus transport details (socket id, ack id)."""
    canonical = {
        "channel": channel,
        "event": name,
        "data": data,
        "tags": dict(sorted((event.get("tags") or {}).items())),
        "message_id": event.get("message_id"),
        "extras": event.get("extras"),
    }
    return hashlib.sha256(_dumps(canonical)).hexdigest()
