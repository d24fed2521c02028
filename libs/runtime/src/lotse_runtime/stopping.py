"""Bounded waits for shutdown.

A service that is asked to stop (Kubernetes sends SIGTERM, then SIGKILL after the grace
period) must not hang on one client that never answers: aiokafka's ``stop()`` waits for
the group coordinator, and a consumer caught in a rebalance while its topics are re-created
was seen waiting for it without end. Every step of a shutdown therefore gets a bound; a
step that overruns is logged with its name and left behind, so the remaining steps (the
outbox relay, the database pool) still run. What is left behind is harmless: offsets
commit only after their effects, and the inbox makes a redelivery a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

_log = logging.getLogger(__name__)

#: How long one shutdown step may take before it is abandoned (read at each call).
STEP_TIMEOUT_S = 10.0


async def within(step: Awaitable[object], what: str, timeout_s: float | None = None) -> bool:
    """Await ``step`` for at most ``timeout_s``; True when it finished (errors are logged
    and swallowed: a shutdown goes on), False when it was abandoned.

    Not ``asyncio.wait_for``: on its timeout it waits for the step to finish cancelling,
    and a step that swallows its cancellation would hang the shutdown there instead."""
    timeout_s = STEP_TIMEOUT_S if timeout_s is None else timeout_s
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        _log.warning("shutdown step abandoned", extra={"step": what, "timeout_s": timeout_s})
        return False
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.warning("shutdown step failed", extra={"step": what}, exc_info=error)
    return True


async def cancel_within(
    task: asyncio.Task[object] | None, what: str, timeout_s: float | None = None
) -> bool:
    """Cancel ``task`` and wait at most ``timeout_s`` for it to end (a task that swallows
    its cancellation is logged and left behind); True when it ended. A task that had
    already ended is only looked at: its error, if any, is retrieved and logged."""
    if task is None:
        return True
    timeout_s = STEP_TIMEOUT_S if timeout_s is None else timeout_s
    task.cancel()  # nothing, where it has ended
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        _log.warning(
            "task did not end when cancelled", extra={"step": what, "timeout_s": timeout_s}
        )
        return False
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.debug("%s ended with an error before it was cancelled", what, exc_info=error)
    return True
