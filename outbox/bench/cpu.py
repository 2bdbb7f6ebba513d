"""CPU time of processes, read from the kernel, for "CPU per event" figures."""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """User plus system CPU seconds a process has used so far (this one when ``pid`` is None).

    Another process is read from ``/proc/<pid>/stat`` (10 ms resolution); None once it is gone.
    """
    if pid is None:
        return time.process_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``: all but idle, iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS


def pids_named(name: str) -> list[int]:
    """The pids of every process whose command name is ``name`` (``postgres``: the server and
    every backend, whoever connected them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class CpuMeter:
    """CPU seconds used by groups of processes between :meth:`start` and :meth:`stop`.

    ``groups`` maps a name to pids (``None`` stands for this process); a group's figure is the
    sum over its processes that lived through the whole span (None if none did). ``"other"`` is
    what every other process on the machine used meanwhile: a run that shared the machine with
    somebody else's work says so.
    """

    def __init__(self, groups: dict[str, list[int | None]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self._start: dict[str, list[float | None]] = {}
        self._machine = 0.0
        self.used: dict[str, float | None] = {}

    def start(self) -> CpuMeter:
        self._start = {
            name: [process_cpu_seconds(pid) for pid in pids] for name, pids in self.groups.items()
        }
        self._machine = machine_busy_seconds()
        return self

    def stop(self) -> dict[str, float | None]:
        machine = machine_busy_seconds() - self._machine
        for name, pids in self.groups.items():
            spans = [
                after - before
                for before, after in zip(
                    self._start[name], [process_cpu_seconds(pid) for pid in pids], strict=True
                )
                if before is not None and after is not None
            ]
            self.used[name] = sum(spans) if spans else None
        ours = sum(v for v in self.used.values() if v is not None)
        self.used["other"] = max(0.0, machine - ours)
        return self.used
