"""The simulated calendar, shared between the simulator and the services it runs.

The services take their "now" from a clock function (``create_app(clock=...)``). The
simulator's platform gives each service a :class:`FileClock`: the file holds a simulated
moment and the wall time at which it was set, and the clock runs on from there in real time,
so that timeouts and polling inside a service still work between two steps of the simulator.
The simulator moves it forward with :func:`advance` before each action; it never goes back.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def _read(path: Path) -> tuple[datetime, float]:
    moment, wall = path.read_text().split()
    return datetime.fromisoformat(moment), float(wall)


class FileClock:
    """A clock reading the simulated time from ``path`` on every call.

    Reading a 50-byte file from the page cache costs microseconds; checking its mtime
    instead is not safe, since a replaced file may reuse the inode within one timestamp tick
    and a missed step would leave the service days behind the simulator."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._text = ""
        self._base = datetime.now(UTC)
        self._wall = time.time()

    def __call__(self) -> datetime:
        try:
            text = self.path.read_text()
        except OSError:
            text = self._text
        if text != self._text:
            try:
                moment, wall = text.split()
                self._base, self._wall = datetime.fromisoformat(moment), float(wall)
                self._text = text
            except ValueError:
                pass  # never half-written (os.replace); keep the last reading regardless
        return self._base + timedelta(seconds=max(0.0, time.time() - self._wall))


def now(path: Path) -> datetime:
    """The simulated moment the services see now."""
    base, wall = _read(path)
    return base + timedelta(seconds=max(0.0, time.time() - wall))


def advance(path: Path, moment: datetime) -> datetime:
    """Move the simulated clock to ``moment`` (never back); returns the clock's new time."""
    target = moment.astimezone(UTC)
    if path.exists():
        target = max(target, now(path))
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(f"{target.isoformat()} {time.time()!r}\n")
    os.replace(scratch, path)
    return target
