"""Starts service processes for the fault tests quickly: this process imports every service
once, then forks a child per request, which runs uvicorn with the service's app factory as
`lotse up` does. A child is a process of its own (SIGKILL takes it down alone); forking from
a parent that has already imported the stack makes a restart cost well under a second
instead of a fresh interpreter's imports, which keeps the fault tests within their time.

Protocol: one JSON object per line on stdin ({"service", "port", "env", "log"}, optionally
"clock_file": the service then takes its time from the city simulator's clock file), answered by
one line on stdout: the child's pid. The parent ignores SIGCHLD, so the kernel reaps children;
when stdin closes it kills every child it started, and a child dies with its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from importlib import import_module
from importlib.metadata import entry_points

PR_SET_PDEATHSIG = 1


def _factories() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="lotse.services")}


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL when the zygote ends, so no service outlives a test
    run that was itself killed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _run_child(
    target: str, port: int, env: dict[str, str], log: str, clock_file: str | None = None
) -> None:
    import uvicorn

    os.setsid()
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.environ.clear()
    os.environ.update(env)
    try:
        if clock_file is None:
            uvicorn.run(target, factory=True, host="127.0.0.1", port=port, access_log=False)
        else:
            from pathlib import Path

            from lotse_simulator.clock import FileClock

            module, _, name = target.partition(":")
            app = getattr(import_module(module), name)(clock=FileClock(Path(clock_file)))
            uvicorn.run(app, host="127.0.0.1", port=port, access_log=False)
    finally:
        os._exit(0)


def main() -> None:
    factories = _factories()
    import uvicorn  # noqa: F401  (imported before forking, as is each service below)

    for target in factories.values():
        import_module(target.split(":")[0])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    children: list[int] = []
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _run_child(
                    factories[request["service"]],
                    request["port"],
                    request["env"],
                    request["log"],
                    request.get("clock_file"),
                )
            children.append(pid)
            print(pid, flush=True)
    finally:
        # The test run is over (stdin closed): no service is left behind.
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
