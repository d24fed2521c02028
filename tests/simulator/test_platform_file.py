"""Tools find the platform ``lotse up`` started (issue 18): it writes the broker's actual
bootstrap and the services' URLs to ``<data dir>/platform.json``; the simulator and the
example partner client read it when no explicit flag names them; explicit flags, then
``LOTSE_KAFKA_BOOTSTRAP``, win; a file a killed platform left behind is ignored; a broken
file is an error naming it. (That ``lotse up`` writes and removes the file:
tests/e2e/test_platform_up.py.)"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lotse_simulator.cli import _endpoints, _platform_arguments
from lotse_tooling import platform_file
from lotse_tooling.platform_file import PlatformFileError, PlatformInfo

from examples.partner_client import local_platform, with_platform_defaults

RUNNING = PlatformInfo(
    bootstrap="127.0.0.1:40321",
    services={
        "intake": "http://127.0.0.1:41001",
        "visits": "http://127.0.0.1:41002",
        "referrals": "http://127.0.0.1:41003/",
        "reporting": "http://127.0.0.1:41004",
    },
    topic_prefix="dev.",
    city="hamm",
    pid=os.getpid(),
)


def _gone_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


def _simulator_args(data_dir: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _platform_arguments(parser)
    return parser.parse_args(["--data-dir", str(data_dir), *flags])


def test_the_file_round_trips_and_is_removed_only_by_its_platform(tmp_path: Path) -> None:
    path = platform_file.write(tmp_path, RUNNING)
    assert path == tmp_path / "platform.json"
    assert platform_file.read(tmp_path) == RUNNING
    platform_file.remove(tmp_path, pid=RUNNING.pid + 1)  # another platform's stop
    assert path.exists()
    platform_file.remove(tmp_path, pid=RUNNING.pid)
    assert not path.exists()
    assert platform_file.read(tmp_path) is None
    platform_file.remove(tmp_path)  # nothing to remove: no error


def test_a_file_left_by_a_killed_platform_is_ignored(tmp_path: Path) -> None:
    platform_file.write(tmp_path, PlatformInfo(bootstrap="127.0.0.1:1", pid=_gone_pid()))
    assert platform_file.read(tmp_path) is None
    assert platform_file.resolve_bootstrap(None, tmp_path, env={}) == ("127.0.0.1:9092", "default")
    assert local_platform(tmp_path / "platform.json") is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not a readable platform file"),
        ("[1, 2]", "not a JSON object"),
        ('{"bootstrap": "", "pid": 1}', "field bootstrap"),
        ('{"bootstrap": "h:1", "services": {"intake": 8001}}', "field services"),
    ],
)
def test_a_broken_file_is_an_error_naming_it(tmp_path: Path, content: str, reason: str) -> None:
    (tmp_path / "platform.json").write_text(content)
    with pytest.raises(PlatformFileError, match=reason) as raised:
        platform_file.read(tmp_path)
    assert str(tmp_path / "platform.json") in str(raised.value)
    with pytest.raises(SystemExit, match=r"lotse-simulator: .*platform\.json"):
        _endpoints(_simulator_args(tmp_path))


def test_explicit_flag_then_environment_then_file_then_default(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert platform_file.resolve_bootstrap(None, empty, env={}) == ("127.0.0.1:9092", "default")
    platform_file.write(tmp_path, RUNNING)
    from_file = platform_file.resolve_bootstrap(None, tmp_path, env={})
    assert from_file == ("127.0.0.1:40321", str(tmp_path / "platform.json"))
    env = {"LOTSE_KAFKA_BOOTSTRAP": "kafka.example:9093"}
    assert platform_file.resolve_bootstrap(None, tmp_path, env=env)[0] == "kafka.example:9093"
    assert platform_file.resolve_bootstrap("b:1", tmp_path, env=env) == ("b:1", "--bootstrap")


def test_the_simulator_drives_the_platform_the_file_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOTSE_KAFKA_BOOTSTRAP", raising=False)
    # Nothing running: the usual local addresses.
    usual = _endpoints(_simulator_args(tmp_path))
    assert (usual.bootstrap, usual.referrals) == ("127.0.0.1:9092", "http://127.0.0.1:8003")

    platform_file.write(tmp_path, RUNNING)
    found = _endpoints(_simulator_args(tmp_path))
    assert found.bootstrap == "127.0.0.1:40321"
    assert (found.intake, found.referrals) == ("http://127.0.0.1:41001", "http://127.0.0.1:41003")
    assert found.topic_prefix == "dev."

    explicit = _endpoints(
        _simulator_args(
            tmp_path, "--bootstrap", "10.0.0.5:9092", "--visits-url", "http://v:1/",
            "--topic-prefix", "",
        )
    )  # fmt: skip
    assert (explicit.bootstrap, explicit.visits, explicit.topic_prefix) == (
        "10.0.0.5:9092",
        "http://v:1",
        "",
    )
    assert explicit.reporting == "http://127.0.0.1:41004"  # what the flags leave out
    monkeypatch.setenv("LOTSE_KAFKA_BOOTSTRAP", "kafka.example:9093")
    assert _endpoints(_simulator_args(tmp_path)).bootstrap == "kafka.example:9093"


def test_the_example_partner_client_reads_the_same_file(tmp_path: Path) -> None:
    path = platform_file.write(tmp_path, RUNNING)
    found = local_platform(path)
    assert found is not None
    assert found["bootstrap"] == RUNNING.bootstrap
    assert found["services"]["referrals"] == RUNNING.services["referrals"]
    path.write_text(json.dumps({"services": {}}))
    with pytest.raises(SystemExit, match="no bootstrap"):
        local_platform(path)
    assert local_platform(tmp_path / "absent.json") is None


def test_the_example_partner_client_fills_in_what_its_flags_leave_out(tmp_path: Path) -> None:
    path = platform_file.write(tmp_path, RUNNING)

    def resolved(**flags: object) -> argparse.Namespace:
        values: dict[str, object] = {
            "bootstrap": None, "topic_prefix": None, "lotse_url": None, "token_file": None,
            "platform_file": path,
        }  # fmt: skip
        values.update(flags)
        return with_platform_defaults(argparse.Namespace(**values))

    found = resolved(token_file=tmp_path / "token")
    assert (found.bootstrap, found.topic_prefix) == (RUNNING.bootstrap, "dev.")
    assert found.lotse_url == RUNNING.services["referrals"]
    assert resolved().lotse_url is None  # no token: no API calls
    explicit = resolved(bootstrap="kafka:9093", topic_prefix="", lotse_url="https://l.example")
    assert (explicit.bootstrap, explicit.topic_prefix, explicit.lotse_url) == (
        "kafka:9093",
        "",
        "https://l.example",
    )
    nothing = resolved(platform_file=tmp_path / "absent.json")
    assert (nothing.bootstrap, nothing.topic_prefix) == ("127.0.0.1:9092", "")
