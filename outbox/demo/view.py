"""What ``outbox demo`` shows: a live table in a terminal (``rich``), plain lines anywhere else.

The plain view is what CI and pipes get (and a terminal without the ``demo`` extra): one line per
thing that happens, a status line every second, the same final summary.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .proof import percentile
from .scenario import Outcome, Snapshot

#: Seconds between two status lines of the plain view.
PLAIN_EVERY = 1.0


def make_view(stream: TextIO = sys.stdout) -> PlainView | RichView:
    """The live view on a terminal when ``rich`` is installed, else plain lines."""
    if stream.isatty():
        try:
            import rich  # noqa: F401  (the demo extra)
        except ImportError:
            pass
        else:
            return RichView(stream)
    return PlainView(stream)


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{state.replace('_', ' ')} {n}" for state, n in counts.items())


def latency_text(p50: float | None, p95: float | None) -> str:
    if p50 is None or p95 is None:
        return "-"
    return f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"


def summary_lines(outcome: Outcome) -> list[tuple[bool | None, str]]:
    """The closing report: (holds, text) per claim, then measurements (holds None)."""
    lines: list[tuple[bool | None, str]] = [(c.holds, c.text) for c in outcome.claims]
    waits = outcome.latencies
    if waits:
        p50, p95 = percentile(waits, 0.5), percentile(waits, 0.95)
        lines.append(
            (
                None,
                f"commit to delivery: {latency_text(p50, p95)}, max {max(waits) * 1000:.0f} ms "
                f"over {len(waits)} events; up to {outcome.peak_rate:.0f} events/s",
            )
        )
    if outcome.kept:
        lines.append((None, f"look around: outbox --database-url {outcome.database_url} status"))
    return lines


class PlainView:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self._last_status = -PLAIN_EVERY

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _elapsed(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f}s]"

    def note(self, text: str) -> None:
        self._print(f"{self._elapsed()} {text}")

    def update(self, snapshot: Snapshot) -> None:
        now = time.monotonic()
        if now - self._last_status < PLAIN_EVERY and snapshot.phase != "done":
            return
        self._last_status = now
        self._print(
            f"{self._elapsed()} {snapshot.phase} | outbox: {counts_text(snapshot.counts)} | "
            f"delivered {snapshot.delivered}, {snapshot.rate:.0f}/s | commit to delivery "
            f"{latency_text(snapshot.latency_p50, snapshot.latency_p95)}"
        )

    def finish(self, outcome: Outcome) -> None:
        self._print("What it proved:")
        for holds, text in summary_lines(outcome):
            mark = {True: "proved:", False: "NOT PROVED:", None: "measured:"}[holds]
            self._print(f"  {mark} {text}")


class RichView:
    """Notes scroll above a live table of counts, rate and latency."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=stream)
        self.started = time.monotonic()
        self.snapshot: Snapshot | None = None
        self.live = Live(
            self._render(), console=self.console, refresh_per_second=8, transient=False
        )

    def __enter__(self) -> RichView:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def note(self, text: str) -> None:
        from rich.markup import escape

        elapsed = time.monotonic() - self.started
        self.console.print(f"[dim]{elapsed:5.1f}s[/dim] {escape(text)}", highlight=False)

    def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.live.update(self._render())

    def _render(self) -> Any:
        from rich.table import Table

        s = self.snapshot
        table = Table(
            title=f"outbox demo: {s.phase if s else 'starting'}",
            title_justify="left",
            show_header=False,
            expand=False,
        )
        table.add_column(style="bold")
        table.add_column()
        if s is None:
            return table
        table.add_row("transactions", f"{s.committed} committed, {s.rolled_back} rolled back")
        for state, n in s.counts.items():
            style = "red" if state == "dead" and n else ""
            table.add_row(f"  {state.replace('_', ' ')}", f"[{style}]{n}[/]" if style else str(n))
        table.add_row("delivered", str(s.delivered))
        table.add_row("rate", f"{s.rate:.0f} events/s")
        table.add_row("commit to delivery", latency_text(s.latency_p50, s.latency_p95))
        table.add_row("elapsed", f"{s.elapsed:.1f} s")
        return table

    def finish(self, outcome: Outcome) -> None:
        from rich.markup import escape

        self.live.stop()
        self.console.print("[bold]What it proved:[/bold]")
        for holds, text in summary_lines(outcome):
            mark = {
                True: "[green]✔ proved:[/green]",
                False: "[bold red]✘ NOT PROVED:[/bold red]",
                None: "[cyan]measured:[/cyan]",
            }[holds]
            self.console.print(f"  {mark} {escape(text)}", highlight=False, soft_wrap=True)
