"""The Alembic environment every Lotse service shares (see :mod:`lotse_runtime.migrations`).

It runs online only, on the connection it is given in ``config.attributes["connection"]``
(the async engine's connection, inside ``run_sync``), and compares against the tables in
``config.attributes["tables"]``: the service's own and the runtime's, never another
service's.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from lotse_runtime.migrations import context_options

config = context.config
connection = config.attributes.get("connection")
if context.is_offline_mode() or not isinstance(connection, Connection):
    raise RuntimeError(
        "Lotse migrations run online on a connection passed as config.attributes['connection']; "
        "use lotse_runtime.migrations (or python -m lotse_runtime.migrations), not alembic"
    )

context.configure(connection=connection, **context_options(connection, config.attributes["tables"]))

with context.begin_transaction():
    context.run_migrations()
