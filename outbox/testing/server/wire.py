"""What a request of the test server ends in: an answer, a Sockudo error, an axum rejection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering

    def json(self) -> Any:
        return json.loads(self.body)


class ApiError(Exception):
    """Sockudo's ``AppError``: JSON body ``{"error", "code", "status"}``."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def response(self) -> Response:
        body = dumps({"error": self.message, "code": self.code, "status": self.status})
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return Response(self.status, body, headers=headers)


class Rejection(Exception):
    """An axum extractor rejection (bad JSON, wrong types): plain text, no error code."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class Dropped(Exception):
    """A fault asked to close the connection without an answer."""


def dumps(value: Any) -> bytes:
    # sonic_rs serializes compactly and writes non-ASCII as UTF-8, never \u escapes.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_input", message)


def auth_failed(message: str) -> ApiError:
    return ApiError(401, "auth_failed", message)


def backpressure(message: str) -> ApiError:
    return ApiError(503, "backpressure", message, retry_after=1)
