"""``var/platform.json``: where the platform ``lotse up`` started actually listens.

``lotse up`` picks free ports when the usual ones are taken (the embedded broker's 9092, the
services' 8001-8005), so tools must not assume them. Once every service is ready it writes
this file into its data directory, and removes it when it stops:

```json
{"bootstrap": "127.0.0.1:40321", "topic_prefix": "", "city": "dortmund", "pid": 4711,
 "started_at": "2026-12-06T23:00:00+00:00",
 "services": {"intake": "http://127.0.0.1:8001", "referrals": "http://127.0.0.1:8003"}}
```

The simulator (and whatever else drives a local platform) reads it when no explicit
``--bootstrap`` or service URL is given; an explicit flag, then ``LOTSE_KAFKA_BOOTSTRAP``,
win over it. A file left behind by a platform that was killed (its ``pid`` no longer runs)
is ignored. ``examples/partner_client.py`` reads the same file with the standard library
only (it is written for partners, who have no Lotse tooling).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

FILE_NAME = "platform.json"
#: What tools assume when nothing says otherwise (a Kafka of one's own on the usual port).
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


class PlatformFileError(ValueError):
    """The platform file exists but cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class PlatformInfo:
    """What ``lotse up`` started: the broker's bootstrap and each service's base URL."""

    bootstrap: str
    services: dict[str, str] = field(default_factory=dict)
    topic_prefix: str = ""
    city: str = ""
    pid: int = 0
    started_at: str = ""


def path_in(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def write(data_dir: Path, info: PlatformInfo) -> Path:
    """Write the file atomically (a reader never sees half of it); returns its path."""
    target = path_in(data_dir)
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    partial.replace(target)
    return target


def remove(data_dir: Path, *, pid: int | None = None) -> None:
    """Remove the file (only if it is ``pid``'s, when given: another platform's stays)."""
    target = path_in(data_dir)
    try:
        if pid is not None and json.loads(target.read_text(encoding="utf-8")).get("pid") != pid:
            return
        target.unlink()
    except (FileNotFoundError, ValueError):
        return


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True


def read(data_dir: Path) -> PlatformInfo | None:
    """The running platform's file, or None when there is none (or its platform is gone)."""
    target = path_in(data_dir)
    try:
        raw = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PlatformFileError(f"{target}: not a readable platform file: {exc}") from exc
    if not isinstance(raw, dict):
        raise PlatformFileError(f"{target}: not a JSON object")
    bootstrap, services = raw.get("bootstrap"), raw.get("services", {})
    if not isinstance(bootstrap, str) or not bootstrap.strip():
        raise PlatformFileError(f"{target}: field bootstrap must name host:port")
    if not isinstance(services, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in services.items()
    ):
        raise PlatformFileError(f"{target}: field services must map names to URLs")
    pid = raw.get("pid", 0)
    if not isinstance(pid, int) or not _running(pid):
        return None  # left behind by a platform that no longer runs
    return PlatformInfo(
        bootstrap=bootstrap.strip(),
        services=dict(services),
        topic_prefix=str(raw.get("topic_prefix", "")),
        city=str(raw.get("city", "")),
        pid=pid,
        started_at=str(raw.get("started_at", "")),
    )


def resolve_bootstrap(
    explicit: str | None, data_dir: Path, env: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The bootstrap to use and where it came from: the explicit flag, else
    ``LOTSE_KAFKA_BOOTSTRAP``, else the running platform's file, else the default."""
    if explicit:
        return explicit, "--bootstrap"
    environ = os.environ if env is None else env
    if environ.get("LOTSE_KAFKA_BOOTSTRAP"):
        return environ["LOTSE_KAFKA_BOOTSTRAP"], "LOTSE_KAFKA_BOOTSTRAP"
    info = read(data_dir)
    if info is not None:
        return info.bootstrap, str(path_in(data_dir))
    return DEFAULT_BOOTSTRAP, "default"


def service_url(explicit: str | None, name: str, data_dir: Path, default: str) -> str:
    """A service's base URL: the explicit flag, else the running platform's, else ``default``."""
    if explicit:
        return explicit.rstrip("/")
    info = read(data_dir)
    if info is not None and name in info.services:
        return info.services[name].rstrip("/")
    return default
