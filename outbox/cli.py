"""The ``outbox`` command: migrate, worker, status, replay, delete-dead, leases, keys, web, enqueue.

Exit codes: 0 success; 1 the operation failed (database unreachable, ...); 2 bad usage, settings or
input; 3 ``status --check`` found dead events; 4 ``status --check --max-age`` found an unsent event
older than that; 5 ``worker --once`` ended with the endpoint failing (down, or refusing the
credentials) and what was due unpublished; 6 ``replay`` or ``delete-dead`` matched no event.
Errors are one line on stderr, never a traceback, and never show a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from . import admin, logs, migrate, status_view
from .connections import UnfollowableEngine
from .database import DEFAULT_DATABASE_URL, DatabaseURLError, create_engine, display_url
from .enqueue import enqueue
from .progress import Progress
from .schema import DEFAULT_TABLE_NAME, Status, outbox_table
from .settings import ENVIRONMENT, LOG_FORMATS, SPECS, Settings, SettingsError, SettingSpec
from .sockudo.config import mask_url
from .sockudo.crypto import is_encrypted_channel
from .sockudo.errors import InvalidEvent

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DEAD, EXIT_TOO_OLD = 0, 1, 2, 3, 4
EXIT_UNAVAILABLE, EXIT_NO_MATCH = 5, 6

REPLAY_HELP = f"""\
Move dead events (or, with --published, published ones) back to pending with a fresh attempt
budget. Show what would be replayed with --dry-run first.

Keys: by default every replayed event gets a NEW idempotency key (and message_id). Sockudo
remembers keys for its idempotency window (IDEMPOTENCY_TTL_SECONDS, 120 s by default): an event
replayed with its old key inside that window is answered from the server's cache and NOT
delivered if it was published before, and gets "503 backpressure" until the window ends if its
last publish failed. A replay is an operator asking for a delivery, so it must not be silently
deduplicated away. --keep-key keeps the old key, for a replay that should be deduplicated
against an earlier delivery that may have happened.

Events are named by row id, event id or idempotency key. A replay (or a dry run) that matches
no event exits {EXIT_NO_MATCH} and says where the events named are, if they exist but are not
dead (or, with --published, not published).
"""


DELETE_DEAD_HELP = f"""\
Delete dead events for good: they can no longer be replayed. Show what would be deleted with
--dry-run first. The filters are replay's; without one, delete-dead refuses to run unless you
say --all.

A deleted event that is the dead head a parked ordering key waits behind lets its key go on
without it (as outbox keys --skip does): the key's later events are sent.

Events are named by row id, event id or idempotency key. A deletion (or a dry run) that
matches no dead event exits {EXIT_NO_MATCH} and says where the events named are, if they exist but
are not dead.
"""


class CommandError(Exception):
    """A failure to report as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        # The harness has its own options (python -m outbox.bench --help).
        from .bench import main as bench_main

        return bench_main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.log_format not in LOG_FORMATS:
        _fail(f"OUTBOX_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {args.log_format!r}")
        return EXIT_USAGE
    logs.configure(args.log_level, args.log_format)
    # Alembic announces every schema check and httpx every request at INFO: the worker's own
    # lines say what matters (one per batch, one per failure).
    for noisy in ("alembic", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    if logging.getLogger().level > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(PoolErrorsInOneLine())
    try:
        return int(args.handler(args) or EXIT_OK)
    except CommandError as exc:
        _fail(str(exc))
        return exc.code
    except (SettingsError, DatabaseURLError, InvalidEvent, ValueError) as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except sa.exc.SQLAlchemyError as exc:
        _fail(f"database error: {_first_line(exc)}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for the operator; the traceback for --log-level DEBUG
        logging.getLogger("outbox").debug("unexpected error", exc_info=True)
        _fail(f"unexpected {type(exc).__name__}: {_first_line(exc)}")
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox", description="Transactional outbox publisher for Sockudo."
    )
    _add_global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("migrate", help="create or upgrade the outbox schema")
    p.add_argument("--revision", default="heads")
    p.set_defaults(handler=cmd_migrate)

    p = commands.add_parser(
        "worker",
        help="run the worker (publishes pending events)",
        description="Every setting comes from its environment variable; a flag overrides it. "
        "Each shows its default: the value taken when neither is given.",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help=f"drain what is due, then exit: 0 when done, {EXIT_UNAVAILABLE} when the endpoint "
        "is down or refuses the credentials (what is due waits for the next run)",
    )
    p.add_argument(
        "--stats-file",
        type=Path,
        default=os.environ.get("OUTBOX_STATS_FILE"),
        help="keep this worker's counts there as JSON, updated every second and at exit "
        "(env OUTBOX_STATS_FILE, default none)",
    )
    for spec in WORKER_FLAGS:
        p.add_argument(
            spec.flag,
            dest=spec.name,
            type=_flag_parser(spec),
            metavar=spec.flag.removeprefix("--").upper().replace("-", "_"),
            help=f"{spec.help} (env {spec.variable}, default {_setting_default(spec)})",
        )
    p.set_defaults(handler=cmd_worker)

    p = commands.add_parser(
        "status", help="counts and lag per status, throughput, last errors (--watch: live)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--errors", type=int, default=5, help="how many recent errors to show")
    p.add_argument(
        "--check",
        action="store_true",
        help=f"exit {EXIT_DEAD} if any event is dead, else {EXIT_TOO_OLD} if one is older than "
        "--max-age",
    )
    p.add_argument(
        "--max-age",
        type=_positive_float,
        metavar="SECONDS",
        help=f"with --check: exit {EXIT_TOO_OLD} if the oldest unsent event is older than this",
    )
    p.add_argument(
        "--watch", action="store_true", help="refresh in place until Ctrl-C (an incident view)"
    )
    p.add_argument(
        "--interval", type=_positive_float, default=2.0, help="seconds between refreshes (2)"
    )
    p.set_defaults(handler=cmd_status)

    p = _add_ids_command(
        commands,
        "replay",
        help="put dead (or published) events back in line",
        description=REPLAY_HELP,
    )
    p.add_argument("--published", action="store_true", help="replay published events instead")
    _add_selection_filters(p, verb="replay", action="a replay")
    p.add_argument("--keep-key", action="store_true", help="keep each event's idempotency key")
    p.add_argument("--dry-run", action="store_true", help="show the count and a sample only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_replay)

    p = _add_ids_command(
        commands,
        "delete-dead",
        help="delete dead events for good (after a dry run)",
        description=DELETE_DEAD_HELP,
    )
    _add_selection_filters(p, verb="delete", action="a deletion")
    p.add_argument("--dry-run", action="store_true", help="show the count and a sample only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_delete_dead)

    p = commands.add_parser(
        "leases",
        help="rows workers hold (in flight): list them, release expired ones",
        description="List the rows workers hold. A lease that expired belongs to a worker that "
        "died; the next worker run takes it back by itself, --release-expired does it now. "
        "Released rows keep their attempt count: they may have been sent, so they go alone.",
    )
    release = p.add_mutually_exclusive_group()
    release.add_argument(
        "--release-expired", action="store_true", help="put rows whose lease expired back"
    )
    release.add_argument(
        "--release-all",
        action="store_true",
        help="put every leased row back, live leases too (only when no worker is running)",
    )
    p.add_argument("--limit", type=_positive_int, default=20, help="leases to list (default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output (ISO times)")
    p.set_defaults(handler=cmd_leases)

    p = commands.add_parser(
        "keys",
        help="ordering keys parked behind a dead head: list them, or let them go on",
        description="With OUTBOX_DEAD_HEAD=park (the default) a keyed event that goes dead parks "
        "its key: the key's later events wait, in order, until the dead head is replayed "
        "(outbox replay ID: it goes first again) or the key is skipped here (the rest go on "
        "without it; the head stays dead).",
    )
    skip = p.add_mutually_exclusive_group()
    skip.add_argument(
        "--skip", metavar="KEY", action="append", help="let this key go on without its head"
    )
    skip.add_argument("--skip-all", action="store_true", help="let every parked key go on")
    p.add_argument("--limit", type=_positive_int, default=20, help="keys to list (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_keys)

    p = commands.add_parser(
        "web",
        help="serve the operator's dashboard (needs the web extra)",
        description="Serve a dashboard for the outbox database: counts, a live chart of the last "
        "hour, the pending, in-flight and dead events, parked keys and a search. Read-only "
        "unless --write (replay and delete dead events, skip a parked key's dead head). Bound to "
        "127.0.0.1 by default; any other address needs OUTBOX_WEB_TOKEN or "
        "OUTBOX_WEB_BASIC_AUTH=user:password (environment only). Reads no SOCKUDO_* setting.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8025, help="port (default 8025)")
    p.add_argument(
        "--write",
        action="store_true",
        help="allow replays and deletions of dead events and skips of parked keys from the page",
    )
    p.add_argument(
        "--refresh",
        type=float,
        default=5.0,
        help="seconds between live updates, 1 to 3600 (default 5)",
    )
    p.set_defaults(handler=cmd_web)

    commands.add_parser("bench", help="the benchmark harness (see `outbox bench --help`)")

    p = commands.add_parser(
        "enqueue",
        help="write one event (operators, smoke tests)",
        description="Write one event, committed at once. DATA must be JSON text (sent exactly "
        "as typed); --raw sends any text as a plain string instead.",
    )
    p.add_argument("channel")
    p.add_argument("event")
    p.add_argument("data", help="JSON text, sent exactly as typed (any text with --raw)")
    p.add_argument(
        "--raw", action="store_true", help="send DATA as a plain string, without the JSON check"
    )
    p.add_argument("--idempotency-key")
    p.add_argument("--socket-id")
    p.set_defaults(handler=cmd_enqueue)

    p = commands.add_parser(
        "demo",
        help="see it work: commits, rollbacks, a refusal and its replay, live (about 10 s)",
        description="Run the whole path with nothing else running: its own SQLite database in a "
        "temporary folder, the bundled test server in this process (or the Sockudo at "
        "SOCKUDO_URL, watched by a WebSocket subscriber), a producer committing events in "
        "transactions, the worker, a live view, and at the end what the run proved. Exits 0 "
        "when every claim held, 1 when one did not.",
    )
    p.add_argument(
        "--dir", type=Path, help="keep the database in this folder (default: a temporary one)"
    )
    p.set_defaults(handler=cmd_demo)
    for command in commands.choices.values():
        # After the command too (`outbox web --database-url X`), as the README writes them.
        _add_global_options(command, defaults=False)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after its name.

    Only the top-level parser has defaults: a command's copies default to nothing at all
    (``SUPPRESS``), so ``outbox --database-url X status`` keeps X, and a copy given after the
    command wins (``outbox --table a status --table b`` reads table b).
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    options = parser.add_argument_group(
        "global options", "given before or after the command's name"
    )
    options.add_argument(
        "--database-url",
        default=default(None),
        help=f"database URL (env OUTBOX_DATABASE_URL, default {DEFAULT_DATABASE_URL})",
    )
    options.add_argument(
        "--table",
        default=default(None),
        help=f"outbox table name (env OUTBOX_TABLE, default {DEFAULT_TABLE_NAME})",
    )
    options.add_argument(
        "--log-level",
        default=default(os.environ.get("OUTBOX_LOG_LEVEL") or "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (env OUTBOX_LOG_LEVEL, default INFO)",
    )
    options.add_argument(
        "--log-format",
        default=default(os.environ.get("OUTBOX_LOG_FORMAT") or "text"),
        help="text, or json: one object per line (env OUTBOX_LOG_FORMAT, default text)",
    )


def _add_ids_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A command that names events as ``replay`` and ``delete-dead`` do: by the ids the worker's
    log shows, its long help kept as written (it is laid out by hand)."""
    p: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "ids",
        nargs="*",
        help="row ids, event ids or idempotency keys (as the worker's log shows them)",
    )
    return p


def _add_selection_filters(p: argparse.ArgumentParser, *, verb: str, action: str) -> None:
    """The filter options ``replay`` and ``delete-dead`` share (read by
    :func:`_selection_from_args`): one list, so the two commands cannot drift apart."""
    p.add_argument("--channel")
    p.add_argument("--event", help="event name")
    p.add_argument(
        "--error-code", type=_error_code, help="last error code or HTTP status, e.g. 413"
    )
    p.add_argument("--since", type=_timestamp, help="created at or after (ISO 8601)")
    p.add_argument("--until", type=_timestamp, help="created before (ISO 8601)")
    p.add_argument("--limit", type=_positive_int, help=f"{verb} at most this many (oldest first)")
    p.add_argument("--all", action="store_true", help=f"allow {action} without any filter")


# -- commands -------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    with _outbox(args, require_schema=False) as (settings, engine, _table):
        before = migrate.current_revision(engine)
        migrate.upgrade(engine, args.revision, settings.table_name)
        after = migrate.current_revision(engine)
    where = display_url(settings.database_url)
    if before == after:
        print(f"{where}: schema already at {after}")
    else:
        print(f"{where}: schema upgraded {before or 'empty'} -> {after}")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from .health import PortUnavailable
    from .worker import SideTaskFailed, Worker

    overrides = {spec.name: getattr(args, spec.name) for spec in WORKER_FLAGS}
    with _outbox(args, worker=True, **overrides) as (settings, engine, _table):
        worker = Worker(settings, engine=engine)
        try:
            asyncio.run(_run_with_signals(worker, once=args.once, stats_file=args.stats_file))
        except SideTaskFailed as exc:
            raise CommandError(f"the worker stopped: {exc}") from None
        except PortUnavailable as exc:
            raise CommandError(str(exc)) from None
        except UnfollowableEngine as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
    if worker.unavailable_reason is not None:
        # Said as an error, so that cron (and whoever reads its mail) notices: the run did not
        # publish what was due, and the next one will not either until the endpoint answers.
        raise CommandError(
            f"publishing stopped: {worker.unavailable_reason}; what is due waits for the next run",
            EXIT_UNAVAILABLE,
        )
    return EXIT_OK


async def _run_with_signals(worker: Any, once: bool, stats_file: Path | None = None) -> None:
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logging.getLogger("outbox.worker").info(
                "%s: finishing in-flight batches (send it again to exit at once)",
                signal.Signals(signum).name,
            )
            worker.stop()
        else:
            # Leases left behind expire and another worker takes the rows over.
            os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if stats_file is None:
        await worker.run(once=once)
        return
    reporter = asyncio.create_task(_report_stats(worker, stats_file))
    try:
        await worker.run(once=once)
    finally:
        reporter.cancel()
        _write_stats(worker, stats_file, running=False)


async def _report_stats(worker: Any, path: Path) -> None:
    while True:
        _write_stats(worker, path, running=True)
        await asyncio.sleep(STATS_INTERVAL)


def _write_stats(worker: Any, path: Path, running: bool) -> None:
    """The worker's counts as JSON, replaced atomically (a reader never sees half a file)."""
    report = {"pid": os.getpid(), "running": running, "time": time.time()}
    report |= worker.stats.as_dict()
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report))
    partial.replace(path)


def cmd_status(args: argparse.Namespace) -> int:
    if args.max_age is not None and not args.check:
        raise CommandError("--max-age goes with --check", EXIT_USAGE)
    if args.watch and (args.check or args.json):
        raise CommandError("--watch is a view: not with --check or --json", EXIT_USAGE)
    with _outbox(args) as (settings, engine, table):

        def read() -> admin.StatusReport:
            with engine.connect() as conn:
                return admin.status(conn, table, errors=args.errors)

        if args.watch:
            title = f"outbox status: {display_url(settings.database_url)} {table.name}"
            with contextlib.suppress(KeyboardInterrupt):
                status_view.watch(read, sys.stdout, interval=args.interval, title=title)
            return EXIT_OK
        report = read()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(status_view.render(report))
    return status_view.check_exit(report, args.max_age) if args.check else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    selection = _selection_from_args(
        args,
        Status.PUBLISHED.value if args.published else Status.DEAD.value,
        refusal="refusing to replay every event without a filter: add ids or --channel/--event/"
        "--error-code/--since/--until/--limit, or --all (try --dry-run first)",
    )
    key = admin.KEY_KEEP if args.keep_key else admin.KEY_FRESH
    with _outbox(args) as (_settings, engine, table):
        with engine.connect() as conn:
            matched = admin.count_for_replay(conn, table, selection)
            sample = admin.select_for_replay(conn, table, selection, limit=_SAMPLE)
            elsewhere = {} if matched else admin.count_elsewhere(conn, table, selection)
        if not matched:
            # Not a success: an id mistyped, or an event that is not dead (yet), must not look
            # like a replay that went well.
            if args.json:
                _print_replay(0, [], True, dry_run=args.dry_run, key=key)
            raise CommandError(_nothing_to_replay(args.published, elsewhere), EXIT_NO_MATCH)
        replayed = 0
        if not args.dry_run:
            replayed = _count_pages(
                "replayed", matched, admin.replay_in_pages(engine, table, selection, key=key)
            )
    _print_replay(matched, sample, args.json, dry_run=args.dry_run, replayed=replayed, key=key)
    return EXIT_OK


def cmd_delete_dead(args: argparse.Namespace) -> int:
    selection = _selection_from_args(
        args,
        Status.DEAD.value,
        refusal="refusing to delete every dead event without a filter: add ids or --channel/"
        "--event/--error-code/--since/--until/--limit, or --all (try --dry-run first)",
    )
    with _outbox(args) as (_settings, engine, table):
        with engine.connect() as conn:
            matched = admin.count_for_replay(conn, table, selection)
            sample = admin.select_for_replay(conn, table, selection, limit=_SAMPLE)
            heads = admin.parked_heads_among(conn, table, selection) if matched else 0
            elsewhere = {} if matched else admin.count_elsewhere(conn, table, selection)
        if not matched:
            if args.json:
                _print_deletion(0, [], 0, as_json=True, dry_run=args.dry_run)
            raise CommandError(_nothing_to_delete(elsewhere), EXIT_NO_MATCH)
        deleted = 0
        if not args.dry_run:
            deleted = _count_pages(
                "deleted", matched, admin.delete_dead_in_pages(engine, table, selection)
            )
    _print_deletion(
        matched, sample, heads, as_json=args.json, dry_run=args.dry_run, deleted=deleted
    )
    return EXIT_OK


def _selection_from_args(
    args: argparse.Namespace, status: str, *, refusal: str
) -> admin.ReplayFilter:
    """The rows in ``status`` that ``replay`` or ``delete-dead`` names by its ids and filter
    options (the two take the same ones). Without any of them the command refuses with
    ``refusal``, unless ``--all`` or ``--dry-run`` says every row is meant: acting on a whole
    state is never what a forgotten option should do."""
    row_ids, event_ids, keys = _split_ids(args.ids)
    selection = admin.ReplayFilter(
        statuses=(status,),
        ids=row_ids,
        event_ids=event_ids,
        keys=keys,
        channel=args.channel,
        event=args.event,
        error_code=args.error_code,
        since=args.since,
        until=args.until,
        limit=args.limit,
    )
    filtered = any(
        (args.ids, args.channel, args.event, args.error_code, args.since, args.until, args.limit)
    )
    if not filtered and not args.all and not args.dry_run:
        raise CommandError(refusal, EXIT_USAGE)
    return selection


def _count_pages(verb: str, matched: int, pages: Iterator[int]) -> int:
    """Sum the counts of ``pages``, each committed in its own transaction by admin (flat memory
    and short locks however many rows match); more than a page of ``matched`` rows shows its
    progress on stderr as it goes, as ``verb`` (``replayed``, ``deleted``)."""
    done = 0
    progress = Progress(verb, matched) if matched > admin.REPLAY_PAGE else None
    for page in pages:
        done += page
        if progress is not None:
            progress.update(done)
    if progress is not None:
        progress.done()
    return done


def _nothing_to_delete(elsewhere: dict[str, int]) -> str:
    """Why a deletion found nothing, and where the events it named are if they exist."""
    message = "nothing to delete: no dead event matches"
    if elsewhere:
        found = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in elsewhere.items())
        verb = "does" if sum(elsewhere.values()) == 1 else "do"
        message += f" ({found} {verb}); only dead events are deleted"
    return message


def _print_deletion(
    matched: int,
    sample: list[dict[str, Any]],
    parked_heads: int,
    *,
    as_json: bool,
    dry_run: bool,
    deleted: int = 0,
) -> None:
    if as_json:
        payload = {
            "matched": matched,
            "sample": sample,
            "parked_heads": parked_heads,
            "dry_run": dry_run,
        }
        if not dry_run:
            payload["deleted"] = deleted
        print(json.dumps(payload, indent=2))
        return
    verb = "would delete" if dry_run else f"deleted {deleted} of"
    print(f"{verb} {matched} dead event(s)")
    _print_first([_sample_line(row, with_status=False) for row in sample], matched)
    if parked_heads:
        one = parked_heads == 1
        if dry_run:
            print(
                f"{parked_heads} of them {'is the dead head' if one else 'are the dead heads'} of "
                f"a parked ordering key: deleting {'it lets its key' if one else 'them lets their keys'}"
                " go on (as outbox keys --skip)"
            )
        else:
            print(
                f"{parked_heads} of them {'was the dead head' if one else 'were the dead heads'} "
                f"of a parked ordering key: {'its key goes' if one else 'their keys go'} on"
            )


def cmd_leases(args: argparse.Namespace) -> int:
    with _outbox(args) as (_settings, engine, table):
        if args.release_expired or args.release_all:
            with engine.begin() as conn:
                released = admin.release_leases(conn, table, expired_only=not args.release_all)
            what = "expired lease(s)" if args.release_expired else "lease(s)"
            print(f"released {released} {what}")
            return EXIT_OK
        with engine.connect() as conn:
            total, expired, listed = admin.leases(conn, table, limit=args.limit)
            now = admin.database_now(conn)
    if args.json:
        leases = [
            {**dataclasses.asdict(lease), "lease_expires_at": lease.lease_expires_at.isoformat()}
            for lease in listed
        ]
        print(json.dumps({"leased": total, "expired": expired, "leases": leases}, indent=2))
        return EXIT_OK
    print(f"{total} leased row(s), {expired} expired")
    lines = []
    for lease in listed:
        # Against the database's clock, which set the lease: this host's may differ.
        left = (lease.lease_expires_at - now).total_seconds()
        when = (
            f"EXPIRED {_duration(-left)} ago" if lease.expired else f"expires in {_duration(left)}"
        )
        lines.append(
            f"row {lease.id} {lease.channel} {lease.event} (attempts {lease.attempts}) lease {when}"
        )
    _print_first(lines, total)
    if expired:
        print("release them with: outbox leases --release-expired")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    with _outbox(args) as (_settings, engine, table):
        if args.skip or args.skip_all:
            with engine.begin() as conn:
                skipped = admin.skip_parked(conn, table, None if args.skip_all else args.skip)
            print(f"{skipped} key(s) go on without their dead head")
            return EXIT_OK
        with engine.connect() as conn:
            total, listed = admin.parked_keys(conn, table, limit=args.limit)
            now = admin.database_now(conn)
    if args.json:
        keys = [k.as_dict() for k in listed]
        print(json.dumps({"parked": total, "keys": keys}, indent=2))
        return EXIT_OK
    print(f"{total} parked key(s)")
    lines = []
    for key in listed:
        reason = " ".join(x for x in (key.last_error_code, key.last_error_message) if x)
        lines.append(
            f"{key.ordering_key!r}: {key.waiting} waiting behind dead row {key.head_id} "
            f"({key.channel} {key.event}), parked {_duration((now - key.parked_at).total_seconds())}"
            f" ago: {reason}"
        )
    _print_first(lines, total)
    if total:
        print("replay a head with: outbox replay ID   or let its key go on: outbox keys --skip KEY")
    return EXIT_OK


def cmd_web(args: argparse.Namespace) -> int:
    try:
        from . import web
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in ("starlette", "uvicorn", "jinja2"):
            raise
        raise CommandError(
            f"outbox web needs the web extra ({missing} is missing): "
            "pip install 'sockudo-outbox[web]'",
            EXIT_USAGE,
        ) from None
    # Credentials from the environment, and only the database settings beside them: the page
    # has no business with the Sockudo secret or the encryption key, so they are never read.
    options = web.WebOptions.from_env(
        os.environ, host=args.host, port=args.port, write=args.write, refresh_seconds=args.refresh
    )
    with _outbox(args) as (_settings, engine, table):
        web.serve(engine, table, options)
    return EXIT_OK


def cmd_enqueue(args: argparse.Namespace) -> int:
    if not args.raw:
        # A typo in JSON would otherwise be stored, and delivered, as a string that no
        # subscriber expecting JSON can read.
        problem = _json_problem(args.data)
        if problem is not None:
            raise CommandError(
                f"DATA is not valid JSON ({problem}): fix it, or pass --raw to send it as a "
                "plain string",
                EXIT_USAGE,
            )
    if is_encrypted_channel(args.channel) and not os.environ.get(MASTER_KEY_VARIABLE):
        # This shell is where a worker would read its settings: without the key there, no
        # worker started from it could ever send the event.
        raise CommandError(
            f"{args.channel} is an encrypted channel and {MASTER_KEY_VARIABLE} is not set: "
            "a worker needs it to send the event",
            EXIT_USAGE,
        )
    with _outbox(args) as (_settings, engine, table):
        try:
            with engine.begin() as conn:
                event_id = enqueue(
                    conn,
                    args.channel,
                    args.event,
                    args.data,
                    idempotency_key=args.idempotency_key,
                    socket_id=args.socket_id,
                    table=table,
                )
        except sa.exc.IntegrityError as exc:
            raise CommandError(f"not enqueued: {_first_line(exc)}", EXIT_USAGE) from None
    print(event_id)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(directory=args.dir)


# -- helpers --------------------------------------------------------------------------------


MASTER_KEY_VARIABLE = ENVIRONMENT["encryption_master_key_base64"][0]
#: Settings ``outbox worker`` takes as flags: all but the global ones (the database, the table
#: and the log format) and secrets (a flag shows in the process list).
WORKER_FLAGS = tuple(
    s for s in SPECS if s.name not in ("database_url", "table_name", "log_format") and not s.secret
)
#: Seconds between two writes of ``--stats-file``.
STATS_INTERVAL = 1.0
#: What the commands that never publish read from the environment.
_DATABASE_VARIABLES = ("OUTBOX_DATABASE_URL", "OUTBOX_TABLE")


@contextlib.contextmanager
def _outbox(
    args: argparse.Namespace,
    *,
    worker: bool = False,
    require_schema: bool = True,
    **overrides: object,
) -> Iterator[tuple[Settings, sa.Engine, sa.Table]]:
    """The settings, an engine (disposed after) and the table of one command."""
    overrides |= {"database_url": args.database_url, "table_name": args.table}
    if worker:
        settings = Settings.from_env(log_format=args.log_format, **overrides)
    else:
        # Commands that never publish only need the database: a malformed SOCKUDO_URL or worker
        # tuning variable must not stop an operator from looking at (or fixing) the outbox.
        environ = {k: v for k, v in os.environ.items() if k in _DATABASE_VARIABLES}
        settings = Settings.from_env(environ, **overrides)
    engine = create_engine(settings.database_url)
    try:
        if require_schema:
            _require_schema(engine, settings, upgrade_embedded=worker)
        yield settings, engine, outbox_table(settings.table_name)
    finally:
        engine.dispose()


def _require_schema(
    engine: sa.Engine, settings: Settings, *, upgrade_embedded: bool = False
) -> None:
    """Refuse a database whose schema is not the latest; ``upgrade_embedded`` (the worker)
    upgrades an embedded one (SQLite) instead, see :func:`outbox.migrate.is_embedded`."""
    current = migrate.current_revision(engine)
    head = migrate.head_revision()
    if current == head:
        return
    where = display_url(settings.database_url)
    if upgrade_embedded and migrate.is_embedded(engine):
        before, after = migrate.ensure_latest(engine, settings.table_name)
        if before != after:
            logging.getLogger("outbox.migrate").info(
                "%s: schema upgraded %s -> %s", where, before or "empty", after
            )
        return
    state = "has no outbox schema" if current is None else f"is at schema {current}"
    only_embedded = " (the worker does it by itself on SQLite only)" if upgrade_embedded else ""
    raise CommandError(
        f"{where} {state}, expected {head}: run `outbox migrate`{only_embedded}", EXIT_USAGE
    )


def _split_ids(values: Sequence[str]) -> tuple[list[int], list[uuid.UUID], list[str]]:
    """Each value as all it may name: a row id (digits), an event id (a UUID) and an
    idempotency key (any text; a row's key is a UUID too, which is why both are tried)."""
    row_ids: list[int] = []
    event_ids: list[uuid.UUID] = []
    keys: list[str] = []
    for value in values:
        keys.append(value)
        if value.isascii() and value.isdigit() and int(value) <= admin.MAX_ROW_ID:
            row_ids.append(int(value))
        with contextlib.suppress(ValueError):
            event_id = uuid.UUID(value)
            event_ids.append(event_id)
            keys.append(str(event_id))  # the form keys are stored in (lower case, dashes)
    return row_ids, event_ids, list(dict.fromkeys(keys))


def _nothing_to_replay(published: bool, elsewhere: dict[str, int]) -> str:
    """Why a replay found nothing, and where the events it named are if they exist."""
    wanted = Status.PUBLISHED.value if published else Status.DEAD.value
    message = f"nothing to replay: no {wanted} event matches"
    if not elsewhere:
        return message
    found = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in elsewhere.items())
    message += f" ({found} {'does' if sum(elsewhere.values()) == 1 else 'do'})"
    if Status.PENDING.value in elsewhere or Status.IN_FLIGHT.value in elsewhere:
        message += "; pending and in-flight events are still the worker's to send"
    if Status.PUBLISHED.value in elsewhere:
        message += "; --published replays published events"
    if Status.DEAD.value in elsewhere:
        message += "; without --published, dead events are replayed"
    return message


def _duration(seconds: float) -> str:
    """A time span as people read it: ``0 s``, ``42 s``, ``3 min 5 s``, ``2 h 14 min``,
    ``3 d 4 h`` (two units at most; a negative span, from clocks that differ, reads as 0 s)."""
    return status_view.span_text(max(0, int(seconds)))


def _json_problem(text: str) -> str | None:
    """What makes ``text`` not JSON (RFC 8259: no NaN or Infinity), or None when it is."""

    def refuse_constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:
        return str(exc)
    return None


#: Rows shown by a replay (and its dry run) before "... and N more".
_SAMPLE = 10


#: How ``outbox worker --help`` says a default that is not a plain value.
_DEFAULTS_IN_WORDS = {
    "batch_size": "the server's batch limit",
    "metrics_port": "off",
}


def _setting_default(spec: SettingSpec) -> str:
    """A setting's default as ``outbox worker --help`` shows it: the value ``Settings`` takes
    when neither the variable nor the flag is given (a URL with its secret masked)."""
    if spec.name in _DEFAULTS_IN_WORDS:
        return _DEFAULTS_IN_WORDS[spec.name]
    value = next(f.default for f in dataclasses.fields(Settings) if f.name == spec.name)
    if value is None:
        return "unset"
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _flag_parser(spec: SettingSpec) -> Callable[[str], object]:
    """A flag's value read and range-checked as its variable's would be; the error names both
    (argparse puts the flag first: ``argument --retention-seconds: OUTBOX_RETENTION_SECONDS
    must be 0 (keep forever) or positive, got -1``)."""

    def parse(text: str) -> object:
        try:
            return spec.parse(text)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 < number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def _timestamp(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    try:
        return admin.filter_time("time", parsed)
    except admin.FilterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _error_code(value: str) -> str:
    try:
        return admin.filter_error_code(value)
    except admin.FilterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_replay(
    matched: int,
    sample: list[dict[str, Any]],
    as_json: bool,
    dry_run: bool,
    replayed: int = 0,
    key: str = admin.KEY_FRESH,
) -> None:
    if as_json:
        payload = {"matched": matched, "sample": sample, "dry_run": dry_run}
        if not dry_run:
            payload |= {"replayed": replayed, "keys": key}
        print(json.dumps(payload, indent=2))
        return
    verb = "would replay" if dry_run else f"replayed {replayed} of"
    print(f"{verb} {matched} event(s)")
    _print_first([_sample_line(row, with_status=True) for row in sample], matched)


def _sample_line(row: dict[str, Any], *, with_status: bool) -> str:
    """A row of a replay's or a deletion's sample: which event, and its last error (a deletion
    leaves out the status, which is always dead there)."""
    status = f" {row['status']}" if with_status else ""
    return (
        f"row {row['id']} {row['channel']} {row['event']}{status} "
        f"[{row['last_error_status'] or ''} {row['last_error_code'] or ''}] "
        f"{row['last_error_message'] or ''}"
    )


def _print_first(lines: Sequence[str], total: int) -> None:
    """The first ``lines`` of a list of ``total`` items, indented, then how many were left out:
    every listing the commands print is cut at its limit the same way."""
    for line in lines:
        print(f"  {line}")
    if total > len(lines):
        print(f"  ... and {total - len(lines)} more")


class PoolErrorsInOneLine(logging.Filter):
    """SQLAlchemy's pool logs a connection that the server dropped (killed, restarted) while it
    was being reset with a whole traceback. The worker already says in one line what failed and
    carries on, the pool discards the connection: its record becomes one line too, with the
    driver's error (the traceback stays for ``--log-level debug``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("sqlalchemy.pool") and record.exc_info:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {_first_line(error) if error else '?'}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


def _fail(message: str) -> None:
    print(f"outbox: error: {message}", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
