"""Schema revisions of the intake service (Alembic branch ``intake``).

Make one with ``python -m lotse_runtime.migrations revision intake -m "..."``; the service
applies them at start-up (see :mod:`lotse_runtime.migrations`).
"""
