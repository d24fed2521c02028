"""Run a service's app factory under uvicorn: ``python -m lotse_runtime.serve <factory>``.

The same as ``python -m uvicorn --factory <factory>``, except for uvicorn's housekeeping
tick: its server wakes ten times a second to notice a stop signal and to refresh the Date
header once a second. On a virtual machine every wake-up of an idle process costs ~0.14 ms
of CPU, so the tick alone was 0.14 % of a core per service, a quarter of what the idle
platform used (``bench/idle.py``). Here the server wakes once a second (the Date header
still changes every second), and a stop signal wakes it at once.

It runs on uvloop with httptools' HTTP parser, named here rather than left to uvicorn's
"auto" so a missing wheel fails the start instead of silently falling back. Measured in
``bench/pipeline.py``: asyncio's pure-Python loop and h11's parser were the largest shares of
a service's CPU after the database (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from types import FrameType

import uvicorn

#: How often the idle server refreshes its Date header and looks at its stop flags.
TICK_S = 1.0


class QuietServer(uvicorn.Server):
    """uvicorn's server with a one-second tick, woken by a stop signal."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # on_tick does its once-a-second work when the counter is a multiple of ten, which
        # here is every tick.
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            # The signal handler runs in the loop's thread between two steps of it; the
            # thread-safe call also wakes the selector the loop may be waiting in.
            loop.call_soon_threadsafe(wake.set)


def serve(
    factory: str,
    *,
    host: str,
    port: int,
    access_log: bool = False,
    log_level: str | None = None,
) -> None:
    """Serve the app ``factory`` ("module:function") builds until a stop signal."""
    config = uvicorn.Config(
        factory,
        factory=True,
        loop="uvloop",
        http="httptools",
        host=host,
        port=port,
        access_log=access_log,
        log_level=log_level,
    )
    QuietServer(config).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lotse_runtime.serve",
        description="Serve a Lotse service's app factory (module:function) under uvicorn.",
    )
    parser.add_argument("factory", help="the app factory, e.g. lotse_visits.app:create_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="log every request (off by default: paths can carry case ids)",
    )
    parser.add_argument("--log-level", default=None, help="uvicorn's own log level")
    args = parser.parse_args(argv)
    serve(
        args.factory,
        host=args.host,
        port=args.port,
        access_log=args.access_log,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
