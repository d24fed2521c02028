"""``lotse``: run the platform locally.

``lotse up`` starts the embedded broker (unless ``LOTSE_KAFKA_BOOTSTRAP`` names a Kafka),
creates the topics, starts every installed service (entry point group ``lotse.services``)
with its SQLite database under ``var/`` (unless ``LOTSE_<SERVICE>_DATABASE_URL`` says
otherwise), waits until each is ready and prints where it listens. Ctrl-C stops everything.
Once all are ready it writes ``<data dir>/platform.json`` (the broker's bootstrap and each
service's URL; removed on stop) for the tools (lotse_tooling.platform_file).
``lotse broker`` runs only the embedded broker. Both stop their broker (and services) on
SIGTERM as on SIGINT (Ctrl-C).
``lotse republish --service NAME --since ISO`` publishes a service's retained outbox rows again
(after the broker lost its data; docs/operations.md).
``lotse acls`` renders the Kafka users (ACLs) and topics of deploy/k8s from the subscription
registry (``--check``: fail on drift; ``--create-topics``: create them on a running Kafka).
``lotse dev-secrets`` writes development secrets for docker compose and the dev cluster into
git-ignored files (lotse_tooling.dev_secrets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path

from lotse_contracts.city import load_city
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.auth import DevelopmentIssuer
from lotse_runtime.identity import Role
from lotse_runtime.kafka import KafkaConfig, ensure_topics, platform_topics, verify_topics
from lotse_runtime.settings import ServiceSettings

from lotse_tooling import acls as acls_command
from lotse_tooling import platform_file
from lotse_tooling.embedded import BrokerStartError, EmbeddedBroker, free_port

DEFAULT_PORTS = {
    "intake": 8001,
    "visits": 8002,
    "referrals": 8003,
    "reporting": 8004,
    "delivery": 8005,
}


@dataclass
class RunningService:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def _installed_services() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="lotse.services")}


def _port_for(name: str) -> int:
    configured = os.environ.get(f"LOTSE_{name.upper()}_HTTP_PORT")
    if configured:
        return int(configured)
    wanted = DEFAULT_PORTS.get(name, 0)
    return wanted if wanted and not _port_taken(wanted) else free_port()


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ready(port: int) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return True, response.read().decode()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode(errors="replace")
    except OSError as exc:
        return False, str(exc)


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM and SIGINT both become one KeyboardInterrupt, so that ``finally`` blocks stop
    the broker and the services (Python's default for SIGTERM ends the process at once and
    leaves the broker running); further signals during the shutdown are ignored."""
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if not received:
            received.append(signum)
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_broker(data_dir: Path) -> tuple[str, EmbeddedBroker | None]:
    external = os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
    if external:
        print(f"Kafka:     {external} (LOTSE_KAFKA_BOOTSTRAP)")
        return external, None
    port = 9092 if not _port_taken(9092) else None
    broker = EmbeddedBroker(port=port, log_path=data_dir / "tansu.log")
    bootstrap = broker.start()
    print(f"Kafka:     {bootstrap} (embedded Tansu, in memory; log {broker.log_path})")
    return bootstrap, broker


def up(args: argparse.Namespace) -> int:
    with _signals_stop():
        try:
            return _up(args)
        except KeyboardInterrupt:
            print("stopped", flush=True)
            return 130


# Longer than 60 lines on purpose: the start-up sequence of the local platform (broker, topics,
# services, teardown) reads in order.
def _up(args: argparse.Namespace) -> int:
    data_dir = Path(os.environ.get("LOTSE_DATA_DIR", "var"))
    data_dir.mkdir(parents=True, exist_ok=True)
    services = _installed_services()
    if args.services:
        unknown = sorted(set(args.services) - set(services))
        if unknown:
            print(f"unknown service(s): {', '.join(unknown)}; installed: {', '.join(services)}")
            return 2
        services = {name: services[name] for name in args.services}
    if not services:
        print("no Lotse service is installed (run `uv sync` first)")
        return 2
    try:
        bootstrap, broker = _start_broker(data_dir)
    except BrokerStartError as exc:
        print(f"cannot start the embedded broker: {exc}", file=sys.stderr)
        return 1
    running: list[RunningService] = []
    try:
        city = load_city(os.environ.get("LOTSE_CITY", "dortmund"))
        shared = ServiceSettings(kafka_bootstrap=bootstrap)  # LOTSE_* as every service reads
        created = asyncio.run(
            ensure_topics(
                KafkaConfig(bootstrap=bootstrap, max_record_bytes=shared.kafka_max_record_bytes),
                platform_topics(
                    load_registry(city),
                    prefix=shared.topic_prefix,
                    partitions=shared.topic_partitions,
                    max_record_bytes=shared.kafka_max_record_bytes,
                ),
            )
        )
        print(f"Topics:    {len(created)} created for {city.name}")
        local_issuer = not (
            os.environ.get("LOTSE_AUTH_JWKS") or os.environ.get("LOTSE_AUTH_ISSUER")
        )
        if local_issuer:
            # Created once here so that all services trust the same local issuer.
            DevelopmentIssuer(data_dir / "dev-issuer-key.pem")
            print("Auth:      local development issuer; tokens: ./lotse token --role ROLE ...")
        ports = {name: _port_for(name) for name in sorted(services)}
        for name, target in sorted(services.items()):
            port = ports[name]
            log = data_dir / f"{name}.log"
            env = {
                **os.environ,
                "LOTSE_KAFKA_BOOTSTRAP": bootstrap,
                "LOTSE_DATA_DIR": str(data_dir),
            }
            if local_issuer:
                # A browser cannot present a token of the local issuer: on the developer's own
                # platform the dashboard (anonymised figures only) opens without one.
                env.setdefault("LOTSE_REPORTING_DASHBOARD_PUBLIC", "true")
                # Webhook receivers under development listen on this machine (http://127.0.0.1).
                env.setdefault("LOTSE_DELIVERY_SINK_POLICY", "development")
            if not os.environ.get("LOTSE_CONTRACTS_BASE_URL"):
                # Events name their schema below the address the service really listens on.
                env.setdefault(
                    f"LOTSE_{name.upper()}_CONTRACTS_BASE_URL",
                    f"http://127.0.0.1:{port}/contracts",
                )
            if "intake" in ports:
                # Services that open families' personal-data blocks fetch keys from intake.
                env.setdefault(
                    f"LOTSE_{name.upper()}_KEYRING_URL", f"http://127.0.0.1:{ports['intake']}"
                )
            command = [
                sys.executable,
                "-m",
                "lotse_runtime.serve",
                target,
                "--host",
                os.environ.get("LOTSE_HTTP_HOST", "127.0.0.1"),
                "--port",
                str(port),
                "--no-access-log",
            ]
            with log.open("wb") as handle:
                process = subprocess.Popen(
                    command, stdout=handle, stderr=subprocess.STDOUT, env=env
                )
            running.append(RunningService(name, port, process, log))
        if not _wait_ready(running, timeout_s=args.ready_timeout):
            return 1
        print()
        print(f"{'service':<11} {'API':<28} {'docs':<34} log")
        for svc in running:
            base = f"http://127.0.0.1:{svc.port}"
            print(f"{svc.name:<11} {base:<28} {base + '/docs':<34} {svc.log}")
        written = platform_file.write(
            data_dir,
            platform_file.PlatformInfo(
                bootstrap=bootstrap,
                services={svc.name: f"http://127.0.0.1:{svc.port}" for svc in running},
                topic_prefix=shared.topic_prefix,
                city=city.slug,
                pid=os.getpid(),
                started_at=datetime.now(UTC).isoformat(),
            ),
        )
        print(f"\nTools find broker and services in {written}.")
        print("Lotse is up. Ctrl-C stops it.", flush=True)
        if args.exit_when_ready:
            return 0
        return _supervise(running)
    finally:
        platform_file.remove(data_dir, pid=os.getpid())
        _stop_all(running)
        if broker is not None:
            broker.stop()


def _wait_ready(running: list[RunningService], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    pending = {svc.name: svc for svc in running}
    last: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for name, svc in list(pending.items()):
            if svc.process.poll() is not None:
                print(f"{name} exited with status {svc.process.returncode}; see {svc.log}:")
                print(svc.log.read_text(errors="replace")[-2000:])
                return False
            ok, body = _ready(svc.port)
            last[name] = body
            if ok:
                print(f"ready:     {name} on port {svc.port}")
                del pending[name]
        time.sleep(0.3)
    for name in pending:
        detail = last.get(name, "")
        with contextlib.suppress(ValueError):
            detail = json.dumps(json.loads(detail).get("checks", detail))
        print(f"{name} not ready after {timeout_s:.0f} s: {detail}")
    return not pending


def _supervise(running: list[RunningService]) -> int:
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            for svc in running:
                if svc.process.poll() is not None:
                    print(f"{svc.name} stopped with status {svc.process.returncode}; see {svc.log}")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("stopping ...")
    return 0


def _stop_all(running: list[RunningService]) -> None:
    for svc in running:
        if svc.process.poll() is None:
            svc.process.terminate()
    for svc in running:
        try:
            svc.process.wait(10)
        except subprocess.TimeoutExpired:
            svc.process.kill()


def broker(args: argparse.Namespace) -> int:
    try:
        with (
            _signals_stop(),
            contextlib.suppress(KeyboardInterrupt),
            EmbeddedBroker(port=args.port) as embedded,
        ):
            print(f"embedded broker listening on {embedded.bootstrap}; Ctrl-C stops it", flush=True)
            while embedded.running:
                time.sleep(0.5)
    except BrokerStartError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


# Longer than 60 lines on purpose: argument checks and the operator's messages, in order.
def republish(args: argparse.Namespace) -> int:
    """Publish a service's retained outbox rows from a point in time again."""
    from lotse_runtime.db import Database
    from lotse_runtime.outbox import republish as republish_rows

    services = _installed_services()
    if args.service not in services:
        print(
            f"unknown service {args.service!r}; installed: {', '.join(services)}", file=sys.stderr
        )
        return 2
    try:
        since = datetime.fromisoformat(args.since)
        until = datetime.fromisoformat(args.until) if args.until else None
    except ValueError as exc:
        print(f"--since/--until: not an ISO 8601 date-time: {exc}", file=sys.stderr)
        return 2
    if since.tzinfo is None or (until is not None and until.tzinfo is None):
        print("--since/--until: give a time-zone offset (e.g. 2026-11-24T08:00:00+01:00)",
              file=sys.stderr)  # fmt: skip
        return 2
    settings_class = type(
        f"{args.service.title()}Settings", (ServiceSettings,), {"service_name": args.service}
    )
    settings: ServiceSettings = settings_class()
    kafka = KafkaConfig(
        bootstrap=settings.kafka_bootstrap,
        client_id=f"lotse-{args.service}-republish",
        max_record_bytes=settings.kafka_max_record_bytes,
        extra=settings.kafka_client_options(),
    )
    topics = [settings.topic(name) for name in args.topic]

    async def run() -> int:
        if not args.dry_run:
            # Never let a publish auto-create a lost topic with the broker's partition count.
            registry = load_registry(load_city(settings.city), settings.subscriptions_file)
            specs = platform_topics(
                registry,
                prefix=settings.topic_prefix,
                partitions=settings.topic_partitions,
                replication=settings.topic_replication,
                max_record_bytes=settings.kafka_max_record_bytes,
            )
            report = await verify_topics(kafka, specs, create=settings.create_topics)
            if report.problems:
                print("refused, topics not as planned: " + "; ".join(report.problems),
                      file=sys.stderr)  # fmt: skip
                return 1
        db = Database(settings.resolved_database_url())
        try:
            count = await republish_rows(
                db, kafka, since=since, until=until, topics=topics, dry_run=args.dry_run
            )
        finally:
            await db.dispose()
        verb = "would republish" if args.dry_run else "republished"
        print(f"{args.service}: {verb} {count} outbox rows created since {since.isoformat()}")
        return 0

    return asyncio.run(run())


def token(args: argparse.Namespace) -> int:
    from datetime import timedelta

    if args.key_file is not None:
        if not args.key_file.is_file():
            # A new key here would sign tokens that no running service trusts.
            print(
                f"{args.key_file} does not exist (./lotse dev-secrets creates it)", file=sys.stderr
            )
            return 2
        issuer = DevelopmentIssuer(args.key_file)
    else:
        data_dir = Path(os.environ.get("LOTSE_DATA_DIR", "var"))
        issuer = DevelopmentIssuer(data_dir / "dev-issuer-key.pem")
    print(
        issuer.token(
            role=args.role,
            subject=args.subject,
            bezirk=args.bezirk,
            traeger=args.traeger,
            clinic=args.clinic,
            ttl=timedelta(minutes=args.ttl_minutes),
        )
    )
    return 0


def dev_secrets(args: argparse.Namespace) -> int:
    from lotse_tooling import dev_secrets as generator

    try:
        result = generator.write(args.root, force=args.force)
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    drawn = ", ".join(result.created) if result.created else "nothing new, existing values kept"
    print(f"development secrets ({drawn}):")
    for path in result.files:
        print(f"  {path}")
    print(
        f"tokens for docker compose and the dev cluster: ./lotse token --key-file "
        f"{generator.ISSUER_KEY_FILE} --role ROLE ..."
    )
    if args.force:
        print("new passwords: remove the old database volume (docker compose down -v)")
    return 0


# Longer than 60 lines on purpose: the command table: one parser per sub-command.
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lotse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start broker, topics and every service")
    up_parser.add_argument("services", nargs="*", help="only these services")
    up_parser.add_argument("--ready-timeout", type=float, default=90.0)
    up_parser.add_argument(
        "--exit-when-ready", action="store_true", help="stop again once all are ready (smoke test)"
    )
    up_parser.set_defaults(func=up)
    broker_parser = commands.add_parser("broker", help="run only the embedded broker")
    broker_parser.add_argument("--port", type=int, default=None)
    broker_parser.set_defaults(func=broker)
    republish_parser = commands.add_parser(
        "republish",
        help="publish a service's retained outbox rows from a point in time again "
        "(after broker data loss)",
    )
    republish_parser.add_argument("--service", required=True, help="e.g. intake, visits")
    republish_parser.add_argument(
        "--since", required=True, help="ISO 8601 date-time with offset: rows created from then"
    )
    republish_parser.add_argument("--until", help="ISO 8601 date-time: rows created before")
    republish_parser.add_argument(
        "--topic", action="append", default=[], help="only rows for this topic (repeatable)"
    )
    republish_parser.add_argument(
        "--dry-run", action="store_true", help="count the rows, publish nothing"
    )
    republish_parser.set_defaults(func=republish)
    token_parser = commands.add_parser(
        "token", help="print a bearer token of the local development issuer (`lotse up`)"
    )
    token_parser.add_argument("--role", required=True, choices=[role.value for role in Role])
    token_parser.add_argument("--subject", default="dev-user")
    token_parser.add_argument("--bezirk")
    token_parser.add_argument("--traeger")
    token_parser.add_argument("--clinic")
    token_parser.add_argument("--ttl-minutes", type=int, default=480)
    token_parser.add_argument(
        "--key-file",
        type=Path,
        help="sign with this issuer key instead of <LOTSE_DATA_DIR>/dev-issuer-key.pem "
        "(docker compose, dev cluster: deploy/dev-issuer-key.pem from `lotse dev-secrets`)",
    )
    token_parser.set_defaults(func=token)
    secrets_parser = commands.add_parser(
        "dev-secrets",
        help="generate development secrets for docker compose and the dev cluster (git-ignored)",
    )
    secrets_parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root")
    secrets_parser.add_argument(
        "--force", action="store_true", help="draw new values instead of keeping existing ones"
    )
    secrets_parser.set_defaults(func=dev_secrets)
    acls_parser = commands.add_parser(
        "acls",
        help="render Strimzi KafkaUsers (ACLs) and KafkaTopics from the subscription registry",
        description=acls_command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    acls_command.add_arguments(acls_parser)
    acls_parser.set_defaults(func=acls_command.run)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
