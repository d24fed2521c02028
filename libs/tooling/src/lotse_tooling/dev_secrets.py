"""Development secrets for docker compose and the Kubernetes dev overlay (``lotse dev-secrets``).

Nothing secret is committed: this writes random values into files that ``.gitignore`` keeps
out of the repository, relative to the repository root:

    .env                                   read by docker compose itself (``${VAR}`` in
                                           docker-compose.yml); other lines in it are kept
    deploy/dev-issuer-key.pem              the development token issuer's EC key
                                           (``lotse token --key-file deploy/dev-issuer-key.pem``)
    deploy/k8s/overlays/dev/secrets/*.env  read by the dev overlay's secretGenerator and
                                           configMapGenerator

Compose and the dev cluster share one set of values. Existing values are kept, so running it
again changes nothing; ``force`` draws new ones (a PostgreSQL volume initialised with the old
passwords then has to go: ``docker compose down -v``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lotse_contracts.topics import SERVICES
from lotse_runtime.auth import DevelopmentIssuer

ENV_FILE = Path(".env")
ISSUER_KEY_FILE = Path("deploy/dev-issuer-key.pem")
K8S_SECRETS_DIR = Path("deploy/k8s/overlays/dev/secrets")
K8S_POSTGRES_HOST = "lotse-postgres"
SECRET_BYTES = 32

POSTGRES_PASSWORD = "POSTGRES_PASSWORD"
KEY_ENCRYPTION_KEY = "INTAKE_KEY_ENCRYPTION_KEY"
MATCH_KEY_SECRET = "INTAKE_MATCH_KEY_SECRET"
ISSUER_JWKS = "DEV_ISSUER_JWKS"
DELIVERY_SECRET_KEY = "DELIVERY_SECRET_KEY"

_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][\w.-]*)\s*=(.*)$")


def database_password_variable(service: str) -> str:
    """The ``.env`` variable holding a service's PostgreSQL password."""
    return f"{service.upper()}_DB_PASSWORD"


def _password() -> str:
    # URL-safe: it goes into database URLs and env files unquoted.
    return secrets.token_urlsafe(24)


def _key() -> str:
    # The format intake expects: 32 random bytes, base64url without padding.
    return base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()


def _generators() -> dict[str, str]:
    values = {POSTGRES_PASSWORD: _password()}
    values.update({database_password_variable(service): _password() for service in SERVICES})
    values[KEY_ENCRYPTION_KEY] = _key()
    values[MATCH_KEY_SECRET] = _key()
    values[DELIVERY_SECRET_KEY] = _key()
    return values


@dataclass(frozen=True)
class DevSecrets:
    """What ``write`` left in place (paths relative to the root)."""

    values: dict[str, str]
    files: list[Path]
    created: list[str]
    """Names of values drawn new in this run (empty: everything was there already)."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (single or double quotes around a value removed)."""
    if not path.exists():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _ENV_LINE.match(line)
        if match is None or line.lstrip().startswith("#"):
            continue
        name, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def _compose_line(name: str, value: str) -> str:
    # Single quotes: compose takes the value literally (the JWKS is JSON with double quotes).
    return f"{name}='{value}'" if any(c in value for c in "\"'{} #$") else f"{name}={value}"


def _write_private(path: Path, text: str) -> None:
    """Replaces a file atomically, readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    # Two runs at once (parallel test workers) must not write two different sets of values.
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write(root: Path, *, force: bool = False) -> DevSecrets:
    """Creates (or, with ``force``, replaces) the development secrets under ``root``."""
    root = root.resolve()
    if not (root / "docker-compose.yml").is_file():
        raise FileNotFoundError(f"{root} is not the Lotse repository root (no docker-compose.yml)")
    with _exclusive(root):
        env_path = root / ENV_FILE
        existing = {} if force else read_env_file(env_path)
        key_path = root / ISSUER_KEY_FILE
        if force:
            key_path.unlink(missing_ok=True)
        values: dict[str, str] = {}
        created: list[str] = []
        for name, fresh in _generators().items():
            if existing.get(name):
                values[name] = existing[name]
            else:
                values[name] = fresh
                created.append(name)
        if not key_path.exists():
            created.append(str(ISSUER_KEY_FILE))
        issuer = DevelopmentIssuer(key_path)
        values[ISSUER_JWKS] = json.dumps(issuer.jwks(), separators=(",", ":"), sort_keys=True)

        files = [ENV_FILE, ISSUER_KEY_FILE]
        _write_private(env_path, _merged_env(env_path, values))
        for name, text in _k8s_files(values).items():
            _write_private(root / K8S_SECRETS_DIR / name, text)
            files.append(K8S_SECRETS_DIR / name)
        return DevSecrets(values=values, files=files, created=created)


def _merged_env(path: Path, values: dict[str, str]) -> str:
    header = (
        "# Development secrets for docker compose, written by `./lotse dev-secrets`.\n"
        "# Never commit this file (.gitignore); a new set: ./lotse dev-secrets --force\n"
    )
    lines: list[str] = []
    pending = dict(values)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            match = _ENV_LINE.match(line)
            if match is not None and not line.lstrip().startswith("#"):
                name = match.group(1)
                if name in values:
                    if name in pending:
                        lines.append(_compose_line(name, pending.pop(name)))
                    continue
            lines.append(line)
    if not lines:
        lines = header.splitlines()
    lines.extend(_compose_line(name, value) for name, value in pending.items())
    return "\n".join(lines) + "\n"


def _k8s_files(values: dict[str, str]) -> dict[str, str]:
    """The dev overlay's generator inputs: one env file per Secret (key=value)."""
    files = {
        "postgres-admin.env": f"password={values[POSTGRES_PASSWORD]}\n",
        # The environment of the dev PostgreSQL's init script (postgres-init.sh).
        "postgres-roles.env": "".join(
            f"{database_password_variable(s)}={values[database_password_variable(s)]}\n"
            for s in SERVICES
        ),
        "intake-secrets.env": (
            f"key-encryption-key={values[KEY_ENCRYPTION_KEY]}\n"
            f"match-key-secret={values[MATCH_KEY_SECRET]}\n"
        ),
        # Seals delivery's webhook secrets at rest; mounted as a file (secret_key_file).
        "delivery-secrets.env": f"secret-key={values[DELIVERY_SECRET_KEY]}\n",
        # Merged into the ConfigMap lotse-config (AUTH_ISSUER is in the kustomization): the
        # services trust the development issuer's key.
        "auth.env": f"AUTH_JWKS={values[ISSUER_JWKS]}\n",
    }
    for service in SERVICES:
        password = values[database_password_variable(service)]
        files[f"{service}-db.env"] = (
            f"url=postgresql://{service}:{password}@{K8S_POSTGRES_HOST}:5432/{service}\n"
        )
    return files
