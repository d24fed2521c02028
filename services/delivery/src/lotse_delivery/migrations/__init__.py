"""Schema revisions of the delivery service (Alembic branch ``delivery``).

Make one with ``python -m lotse_runtime.migrations revision delivery -m "..."``; the service
applies them at start-up (see :mod:`lotse_runtime.migrations`).
"""
