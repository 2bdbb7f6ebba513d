"""What ``outbox status`` prints, what ``--check`` exits with, and the ``--watch`` loop.

The report comes from :func:`outbox.admin.status`; everything here is formatting and decisions
on it (plain functions, tested without a database), except :func:`watch`, which refreshes it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import TextIO

from .admin import StatusReport

EXIT_OK, EXIT_DEAD, EXIT_TOO_OLD = 0, 3, 4
#: Clear the terminal and put the cursor home: the next frame replaces the last one in place.
CLEAR = "\x1b[H\x1b[J"


def check_exit(report: StatusReport, max_age: float | None = None) -> int:
    """``status --check``: 3 if any event is dead, else 4 if the oldest unsent event is older
    than ``max_age`` seconds, else 0. Dead events come first: they are lost until replayed,
    while an old event may still go out."""
    if report.dead:
        return EXIT_DEAD
    age = report.oldest_pending_age_seconds
    if max_age is not None and age is not None and age > max_age:
        return EXIT_TOO_OLD
    return EXIT_OK


def age_text(seconds: float | None) -> str:
    """``-`` for none, else seconds below two minutes, then minutes, hours, days."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def span_text(whole: int) -> str:
    """A span of whole seconds as people read it, two units at most: ``42 s``, ``3 min 5 s``,
    ``2 h 14 min``, ``3 d 4 h``. Shared by the command line and the dashboard so that both
    say an age the same way (each decides itself what a missing or negative span reads as)."""
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def render(report: StatusReport) -> str:
    """The text view: per state its count and the age of its oldest row (its lag), the oldest
    unsent event, the last minute's throughput, and the last errors of unsent rows."""
    lines = ["status       count   oldest"]
    for state, count in report.counts.items():
        oldest = age_text(report.oldest_age_seconds.get(state))
        lines.append(f"{state:<12} {count:>5}   {oldest}")
    lines.append(f"oldest pending: {age_text(report.oldest_pending_age_seconds)}")
    if report.published_last_minute is not None:
        n = report.published_last_minute
        lines.append(f"published in the last minute: {n} ({n / 60:.1f}/s)")
    if report.parked_keys:
        lines.append(
            f"parked keys: {report.parked_keys} (a dead head holds each; see: outbox keys)"
        )
    if report.waiting_for_key:
        lines.append(
            f"waiting behind an earlier event of their key: {report.waiting_for_key} (in pending)"
        )
    if report.waiting_mutations:
        lines.append(f"mutations waiting for their message: {report.waiting_mutations}")
    if report.last_errors:
        lines.append("last errors:")
        for e in report.last_errors:
            code = " ".join(str(x) for x in (e["last_error_status"], e["last_error_code"]) if x)
            lines.append(
                f"  row {e['id']} {e['status']} {e['channel']} {e['event']} "
                f"(attempts {e['attempts']}) [{code}] {e['last_error_message']}"
            )
    return "\n".join(lines)


def watch(
    read: Callable[[], StatusReport],
    out: TextIO,
    *,
    interval: float,
    title: str,
    frames: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Print a fresh report every ``interval`` seconds until interrupted (or ``frames`` shown).

    On a terminal each frame replaces the last in place; into a pipe or a file frames follow
    each other, separated by a blank line (a log of the incident).
    """
    in_place = out.isatty()
    shown = 0
    while frames is None or shown < frames:
        if shown:
            sleep(interval)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        frame = f"{title}  {now}  (every {interval:g} s, Ctrl-C to stop)\n\n{render(read())}\n"
        out.write(CLEAR + frame if in_place else frame + "\n")
        out.flush()
        shown += 1
