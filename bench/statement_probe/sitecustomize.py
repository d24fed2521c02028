"""Counts the SQL statements of a Python process and where in Lotse's code they come from.

Loaded by ``bench/statements.py`` for the services it starts (this directory on their
``PYTHONPATH``) and active only when ``BENCH_STATEMENT_PROBE`` names a directory: at exit
the process writes ``<pid>.json`` there. Not part of any service.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

_OUT = os.environ.get("BENCH_STATEMENT_PROBE")
#: Lotse frames named per statement, innermost first (the database layer left out).
_SITES = 3


def _sites(frame: FrameType | None) -> str:
    """The innermost Lotse frames above a statement. SQLAlchemy's asyncio layer runs it in
    a greenlet of its own, so the walk goes on in the frame that started the greenlet."""
    import greenlet

    current: Any = greenlet.getcurrent()
    found: list[str] = []
    for _ in range(300):
        if frame is None:
            current = current.parent
            if current is None:
                break
            frame = current.gr_frame
            continue
        name = frame.f_code.co_filename
        if "lotse_" in name and not name.endswith(("lotse_runtime/db.py", "sitecustomize.py")):
            module = name.rsplit("/", 2)
            found.append(f"{module[-2]}/{module[-1]}:{frame.f_code.co_name}:{frame.f_lineno}")
            if len(found) == _SITES:
                break
        frame = frame.f_back
    return " < ".join(found)


def _install(out: Path) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    @event.listens_for(Engine, "before_cursor_execute")
    def _count(*args: Any) -> None:
        statement = " ".join(str(args[2]).split())
        counts[(statement[:80], _sites(sys._getframe(1)))] += 1

    def _dump() -> None:
        if not counts:
            return
        rows = [
            {"statement": statement, "sites": sites, "count": n}
            for (statement, sites), n in counts.most_common()
        ]
        document = {"argv": sys.argv, "statements": rows}
        (out / f"{os.getpid()}.json").write_text(json.dumps(document, indent=1))
        counts.clear()

    def _stopped(signum: int, _frame: Any) -> None:
        # uvicorn handles SIGTERM itself and, once shut down, raises it again with the
        # handler it found (this one): written then, and the process ends as it would.
        _dump()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    atexit.register(_dump)
    signal.signal(signal.SIGTERM, _stopped)


if _OUT:
    _install(Path(_OUT))
