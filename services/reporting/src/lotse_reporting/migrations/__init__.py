"""Schema revisions of the reporting service (Alembic branch ``reporting``).

Make one with ``python -m lotse_runtime.migrations revision reporting -m "..."``; the service
applies them at start-up (see :mod:`lotse_runtime.migrations`).
"""
