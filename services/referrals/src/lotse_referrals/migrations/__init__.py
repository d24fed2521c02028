"""Schema revisions of the referrals service (Alembic branch ``referrals``).

Make one with ``python -m lotse_runtime.migrations revision referrals -m "..."``; the service
applies them at start-up (see :mod:`lotse_runtime.migrations`).
"""
