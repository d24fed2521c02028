"""Where the platform answers, and the tokens the simulator presents to it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from lotse_runtime.auth import DevelopmentIssuer


@dataclass(frozen=True)
class Endpoints:
    intake: str = "http://127.0.0.1:8001"
    visits: str = "http://127.0.0.1:8002"
    referrals: str = "http://127.0.0.1:8003"
    reporting: str = "http://127.0.0.1:8004"
    bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = ""


class Tokens:
    """Signs bearer tokens per role with the issuer key the platform trusts (the local
    development issuer's ``<data_dir>/dev-issuer-key.pem``, or a key given explicitly)."""

    def __init__(self, key_file: Path) -> None:
        if not key_file.exists():
            raise FileNotFoundError(
                f"{key_file}: no issuer key; start the platform first or pass --jwks-key"
            )
        self._issuer = DevelopmentIssuer(key_file)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one Tokens per run; few callers
    def headers(
        self,
        role: str,
        *,
        bezirk: str | None = None,
        clinic: str | None = None,
        traeger: str | None = None,
        subject: str | None = None,
    ) -> dict[str, str]:
        """A token for `role` in its scope; `subject` names a service (role ``service``: the
        services admit one only by name) or a second person of the same role."""
        subject = subject or "-".join(p for p in ("sim", role, bezirk, clinic, traeger) if p)
        token = self._issuer.token(
            role=role,
            subject=subject,
            bezirk=bezirk,
            clinic=clinic,
            traeger=traeger,
            ttl=timedelta(hours=12),
        )
        return {"Authorization": f"Bearer {token}"}
