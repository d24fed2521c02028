"""Reporting's data classes and how long they are kept (see docs/operations.md, "Retention").

The anonymised projections and key figures are kept for good: they are the city's
statistics, hold no person, and a replay rebuilds them anyway. Only the runtime's own
classes (inbox entries, sent outbox rows) are purged.
"""

from __future__ import annotations

from typing import Any

from lotse_runtime.app import PeriodicJob, ServiceRuntime
from lotse_runtime.retention import add_retention_job


def install(runtime: ServiceRuntime[Any]) -> PeriodicJob:
    """The retention job of reporting: runtime data classes only."""
    return add_retention_job(runtime)
