"""Webhook delivery: deliveries/s and delivery latency for many subscribers on loopback, next
to raw aiokafka consume measured in the same run on the same broker.

  raw consume     aiokafka, one consumer group, until all records are read (records/s;
                  --raw-events of the same kind, enough to time)
  delivery        the delivery service (a process of its own, as `lotse up` starts it) with S
                  subscriptions of one Träger, each its own sink URL and secret, all on one
                  loopback receiver in a process of its own that verifies every signature
                  (the partner kit's `verify`) and deduplicates by webhook-id; N
                  referral-requested events (each its own case) produced to lotse.referrals,
                  so N × S deliveries. Latency: produce → the receiver has it, per delivery.

Usage:  uv run --frozen python bench/delivery.py [--events N] [--subscribers S] [--database URL]
Starts the embedded broker unless LOTSE_KAFKA_BOOTSTRAP is set; SQLite file by default.
Prints a JSON document and writes it to bench/results/delivery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from lotse_contracts.city import load_city
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.common import EXAMPLE_TRAEGER
from lotse_contracts.events.referrals import ReferralRequested
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.auth import DevelopmentIssuer
from lotse_runtime.db import Database
from lotse_runtime.kafka import KafkaConfig, TopicSpec, ensure_topics, platform_topics
from lotse_runtime.logging import configure_logging
from lotse_tooling.embedded import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "delivery.json"
REQUESTED = ReferralRequested.event_type

# The receiver: a bare ASGI app under uvicorn, its own process (so it does not share the
# delivery worker's event loop). PUT /config takes {path: secret}; POST /hook/<n> verifies
# with the partner kit and records (path, webhook-id, arrival); GET /stats hands them back.
RECEIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import uvicorn
from examples.webhook_receiver import InvalidSignature, verify

secrets, seen, log = {}, {}, []
counts = {"rejected": 0, "duplicates": 0}

async def app(scope, receive, send):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    path, method, status, answer = scope["path"], scope["method"], 204, b""
    if method == "PUT" and path == "/config":
        secrets.update(json.loads(body))
    elif method == "GET" and path == "/stats":
        status, answer = 200, json.dumps({"log": log, **counts}).encode()
    elif method == "POST" and path in secrets:
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        arrived = time.time()
        try:
            msg_id = verify([secrets[path]], headers, body)
        except InvalidSignature:
            counts["rejected"] += 1
            status = 401
        else:
            ids = seen.setdefault(path, set())
            if msg_id in ids:
                counts["duplicates"] += 1
            else:
                ids.add(msg_id)
                log.append((path, msg_id, arrived))
    else:
        status = 404
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            lifespan="off", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def event(n: int) -> ReferralRequested:
    return ReferralRequested.example().model_copy(
        update={
            "referral_id": str(uuid.uuid4()),
            "case_id": str(uuid.uuid4()),
            "traeger": EXAMPLE_TRAEGER,
        }
    )


async def raw_consume(kafka: KafkaConfig, topic: str, n: int) -> float:
    """Produce N records (not timed), then time one plain consumer group reading them."""
    producer = kafka.producer()
    await producer.start()
    try:
        for i in range(n):
            record = to_kafka_binary(event(i).to_cloudevent())
            await producer.send(topic, value=record.value, key=record.key, headers=record.headers)
        await producer.flush()
    finally:
        await producer.stop()
    consumer: AIOKafkaConsumer = kafka.consumer(topic, group_id=f"bench-raw-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        seen = 0
        started: float | None = None
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
            if batch and started is None:
                started = time.perf_counter()
            seen += sum(len(records) for records in batch.values())
        assert started is not None
        return time.perf_counter() - started
    finally:
        await consumer.stop()


async def wait_for_receiver(base: str) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(f"{base}/stats")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the receiver did not start")
            await asyncio.sleep(0.1)


def launch_delivery(
    bootstrap: str, prefix: str, url: str, data_dir: Path, subscribers: int, concurrency: int
) -> tuple[subprocess.Popen[bytes], str]:
    """The delivery service as a process of its own, started the way ``lotse up`` does
    (its entry point under uvicorn, configured by its environment)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOTSE_")}
    env.update(
        {
            "LOTSE_KAFKA_BOOTSTRAP": bootstrap,
            "LOTSE_DATA_DIR": str(data_dir),
            "LOTSE_TOPIC_PREFIX": prefix,
            "LOTSE_CREATE_TOPICS": "false",
            "LOTSE_LOG_LEVEL": "WARNING",
            "LOTSE_OTLP_ENDPOINT": "",
            "LOTSE_CONSUMER_SESSION_TIMEOUT_MS": "6000",
            "LOTSE_CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
            "LOTSE_DELIVERY_DATABASE_URL": url,
            "LOTSE_DELIVERY_SINK_POLICY": "development",
            "LOTSE_DELIVERY_VERIFY_SINKS": "false",
            "LOTSE_DELIVERY_DELIVER_INTERVAL_S": "0.02",
            "LOTSE_DELIVERY_DELIVER_CONCURRENCY": str(concurrency),
            "LOTSE_DELIVERY_DELIVER_BATCH": "200",
            "LOTSE_DELIVERY_MAX_SUBSCRIPTIONS_PER_OWNER": str(subscribers),
        }
    )
    log = (data_dir / "delivery.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "lotse_delivery.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=data_dir,
    )
    return process, f"http://127.0.0.1:{port}"


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient() as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError("delivery exited:\n" + tail(log))
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("delivery not ready:\n" + tail(log))
            await asyncio.sleep(0.2)


# Longer than 60 lines on purpose: one measurement from start to figures, in the order it runs.
async def delivery(
    args: argparse.Namespace, bootstrap: str, prefix: str, url: str, base: str
) -> dict[str, Any]:
    subscribers, n = args.subscribers, args.events
    data_dir = Path(tempfile.mkdtemp(prefix="lotse-bench-delivery-"))
    # The service trusts the development issuer whose key is in its data dir.
    issuer = DevelopmentIssuer(data_dir / "dev-issuer-key.pem")
    token = issuer.token(
        role="traeger", subject="bench", traeger=EXAMPLE_TRAEGER, ttl=timedelta(hours=4)
    )
    auth = {"Authorization": f"Bearer {token}"}
    process, service = launch_delivery(
        bootstrap, prefix, url, data_dir, subscribers, args.concurrency
    )
    try:
        await wait_ready(service, process, data_dir / "delivery.log")
        async with httpx.AsyncClient(timeout=60) as client:
            config = {}
            for i in range(subscribers):
                created = await client.post(
                    f"{service}/subscriptions",
                    json={"sink": f"{base}/hook/{i}", "types": [REQUESTED]},
                    headers=auth,
                )
                assert created.status_code == 201, created.text
                config[f"/hook/{i}"] = created.json()["secret"]
            assert (await client.put(f"{base}/config", json=config)).status_code == 204
            produced: dict[str, float] = {}
            producer = KafkaConfig(bootstrap=bootstrap).producer()
            await producer.start()
            try:
                for i in range(n):
                    cloudevent = event(i).to_cloudevent()
                    record = to_kafka_binary(cloudevent)
                    produced[cloudevent.id] = time.time()
                    await producer.send(
                        prefix + "lotse.referrals",
                        value=record.value,
                        key=record.key,
                        headers=record.headers,
                    )
                await producer.flush()
            finally:
                await producer.stop()
            expected = n * subscribers
            deadline = time.monotonic() + args.timeout
            while True:
                stats = (await client.get(f"{base}/stats")).json()
                if len(stats["log"]) >= expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
    finally:
        process.terminate()
        process.wait(timeout=30)
    log = stats["log"]
    latencies = sorted((arrived - produced[msg_id]) * 1000 for _, msg_id, arrived in log)
    first, last = min(produced.values()), max(arrived for _, _, arrived in log)
    per_subscriber: dict[str, set[str]] = {}
    for path, msg_id, _ in log:
        per_subscriber.setdefault(path, set()).add(msg_id)
    return {
        "deliveries": len(log),
        "expected": expected,
        "seconds": round(last - first, 2),
        "deliveries_per_s": round(len(log) / (last - first), 1),
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p99": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "max": round(latencies[-1], 1),
        },
        "receiver": {"rejected": stats["rejected"], "duplicates": stats["duplicates"]},
        "every_subscriber_got_every_event": len(per_subscriber) == subscribers
        and all(len(ids) == n for ids in per_subscriber.values()),
    }


async def run(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    kafka = KafkaConfig(bootstrap=bootstrap, session_timeout_ms=6000, heartbeat_interval_ms=500)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    # Every topic of the platform (the service checks that those it uses exist), and one more.
    specs = platform_topics(load_registry(load_city("dortmund")), prefix=prefix)
    await ensure_topics(kafka, [*specs, TopicSpec(prefix + "raw", partitions=3)])
    url = args.database or f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='lotse-bench-')}/d.db"
    consume_s = await raw_consume(kafka, prefix + "raw", args.raw_events)
    port = free_port()
    receiver = subprocess.Popen(  # noqa: ASYNC220 (started once, before anything is timed)
        [sys.executable, "-c", RECEIVER, str(port), str(ROOT)]
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_for_receiver(base)
        measured = await delivery(args, bootstrap, prefix, url, base)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    raw_per_s = round(args.raw_events / consume_s, 1)
    return {
        "benchmark": "delivery",
        "events": args.events,
        "subscribers": args.subscribers,
        "deliver_concurrency": args.concurrency,
        "database": Database(url).dialect,
        "broker": "external" if os.environ.get("LOTSE_KAFKA_BOOTSTRAP") else "embedded tansu",
        "raw_events": args.raw_events,
        "raw_consume_per_s": raw_per_s,
        **measured,
        "delivery_vs_raw_consume": round(measured["deliveries_per_s"] / raw_per_s, 4),
        "load_average_at_start": args.load,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100, help="events produced")
    parser.add_argument("--subscribers", type=int, default=100, help="webhook subscriptions")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="subscriptions delivered to at once (deliver_concurrency)",
    )
    parser.add_argument("--database", default=None, help="SQLAlchemy URL (default SQLite file)")
    parser.add_argument(
        "--raw-events", type=int, default=20_000, help="records for the raw aiokafka consume"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait at most")
    args = parser.parse_args()
    args.load = [round(x, 2) for x in os.getloadavg()]
    configure_logging("bench", "WARNING", stream=sys.stderr)
    external = os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
    broker = None if external else EmbeddedBroker()
    bootstrap = external or broker.start()  # type: ignore[union-attr]
    try:
        result = asyncio.run(run(args, bootstrap))
    finally:
        if broker is not None:
            broker.stop()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
