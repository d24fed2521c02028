"""Schema revisions of the visits service (Alembic branch ``visits``).

Make one with ``python -m lotse_runtime.migrations revision visits -m "..."``; the service
applies them at start-up (see :mod:`lotse_runtime.migrations`).
"""
