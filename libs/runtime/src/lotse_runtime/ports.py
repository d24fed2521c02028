"""What the runtime's request middlewares use of a service's runtime.

The access policy (policy.py) and the input guard (inputs.py) run inside every request and
write audit entries; they need the service's name, its database, its settings and its clock,
nothing else. They name this protocol rather than :class:`lotse_runtime.app.ServiceRuntime`,
so the import graph runs one way: app → policy / inputs → ports, never back to app.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from lotse_runtime.db import Database
from lotse_runtime.settings import ServiceSettings


class RequestRuntime(Protocol):
    """The part of ``ServiceRuntime`` a request middleware works with."""

    @property
    def service(self) -> str: ...

    @property
    def db(self) -> Database: ...

    @property
    def settings(self) -> ServiceSettings: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...
