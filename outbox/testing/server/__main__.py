"""``python -m outbox.testing.server``: run the test server until SIGTERM/SIGINT.

Prints exactly one line, ``READY <sockudo_url> <control_url>``, once both ports listen.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from .http import TestServer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m outbox.testing.server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="API port (0 = a free one)")
    p.add_argument("--control-port", type=int, default=0, help="control port (0 = a free one)")
    p.add_argument("--app-id", default="app-id")
    p.add_argument("--key", default="app-key")
    p.add_argument("--secret", default="app-secret")
    p.add_argument("--max-batch-size", type=int, default=100)
    p.add_argument("--max-payload-kb", type=int, default=100)
    p.add_argument("--max-event-name-bytes", type=int, default=100)
    p.add_argument("--max-channel-name-bytes", type=int, default=100)
    p.add_argument("--max-channels-per-event", type=int, default=100)
    p.add_argument("--namespaces", default="", help="comma-separated allowed channel namespaces")
    p.add_argument("--idempotency", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--idempotency-ttl", type=float, default=120.0)
    p.add_argument("--idempotency-max-key-bytes", type=int, default=128)
    p.add_argument("--timestamp-window", type=int, default=600)
    p.add_argument("--inflight-wait", type=float, default=0.3)
    p.add_argument("--message-id-wait", type=float, default=1.0)
    features = p.add_argument_group("features (all off by default, as in Sockudo)")
    for name in ("history", "versioned-messages", "presence-history", "annotations"):
        features.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=False)
    features.add_argument(
        "--app-annotations",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the app's annotation policy (SOCKUDO_DEFAULT_APP_ANNOTATIONS_ENABLED)",
    )
    features.add_argument(
        "--all-features",
        action="store_true",
        help="history, versioned messages, presence history and annotations, all on",
    )
    p.add_argument("--history-max-page-size", type=int, default=100)
    p.add_argument("--presence-history-max-page-size", type=int, default=100)
    p.add_argument("--versioned-max-page-size", type=int, default=100)
    p.add_argument("--node-id", default="node", help="INSTANCE_PROCESS_ID, in every serial")
    p.add_argument(
        "--keep-alive",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep connections open between requests (default: close after each answer)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = vars(args)
    options["namespaces"] = [n for n in options["namespaces"].split(",") if n]
    if options.pop("all_features"):
        for name in ("history", "versioned_messages", "presence_history", "annotations"):
            options[name] = True
        options["app_annotations"] = True
    try:
        server = TestServer(**options)
    except ValueError as exc:  # e.g. --annotations without --versioned-messages
        print(f"python -m outbox.testing.server: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(f"READY {server.url} {server.control_url}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
