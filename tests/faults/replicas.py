"""Several replicas of each service, as production runs them: the replica count read from the
prod overlay, a round-robin front per service (what a Kubernetes Service does: each new
connection to the next pod), and the checks of what replicas must never do: book a staff
member twice, give a family two open welcome visits, exceed a Träger's places, run a
run-once job on two replicas, publish an event twice or not at all; and a webhook receiver
that knows which delivery replica posted each request, for the checks of what the delivery
replicas must never do: lose an event, post one twice, overtake a case's earlier event."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import yaml
from lotse_tooling.embedded import free_port

from examples.webhook_receiver import Receiver
from tests.faults.processes import fetch
from tests.support import Record

ROOT = Path(__file__).resolve().parents[2]
PROD_OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "prod" / "kustomization.yaml"


def prod_replicas(overlay: Path = PROD_OVERLAY) -> int:
    """The replica count production gives every service Deployment (the overlay's patch of
    ``/spec/replicas`` on the Deployments of the platform)."""
    kustomization = yaml.safe_load(overlay.read_text())
    found: list[int] = []
    for patch in kustomization.get("patches", []):
        if patch.get("target", {}).get("kind") != "Deployment":
            continue
        for operation in yaml.safe_load(patch["patch"]):
            if operation.get("path") == "/spec/replicas" and operation.get("op") == "replace":
                found.append(int(operation["value"]))
    if len(found) != 1:
        raise AssertionError(f"{overlay}: expected one replica patch of the Deployments: {found}")
    return found[0]


class Balancer:
    """A front port that hands each new connection to the next of ``targets`` in turn."""

    def __init__(self, targets: list[int]) -> None:
        self.port = free_port()
        self._next = itertools.cycle(targets)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", next(self._next))
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


# -- invariants, read from the service databases -------------------------------------------------


async def double_bookings(visits_url: str) -> list[str]:
    """Pairs of visits of one staff member that overlap in time, among the visits that take
    or took that time (scheduled, completed, missed)."""
    rows = await fetch(
        visits_url,
        "SELECT a.visit_id AS first, b.visit_id AS second, a.staff_id, a.starts_at"
        " FROM visits_visit a JOIN visits_visit b"
        " ON a.staff_id = b.staff_id AND a.bezirk = b.bezirk AND a.visit_id < b.visit_id"
        " AND a.starts_at < b.ends_at AND b.starts_at < a.ends_at"
        " WHERE a.status IN ('scheduled', 'completed', 'missed')"
        " AND b.status IN ('scheduled', 'completed', 'missed')",
    )
    return [f"{r['staff_id']} at {r['starts_at']}: {r['first']} and {r['second']}" for r in rows]


async def families_with_two_open_visits(visits_url: str) -> list[str]:
    rows = await fetch(
        visits_url,
        "SELECT case_id, count(*) AS n FROM visits_visit WHERE status = 'scheduled'"
        " GROUP BY case_id HAVING count(*) > 1",
    )
    completed = await fetch(
        visits_url,
        "SELECT case_id, count(*) AS n FROM visits_visit WHERE status = 'completed'"
        " GROUP BY case_id HAVING count(*) > 1",
    )
    return [f"{r['case_id']}: {r['n']} scheduled" for r in rows] + [
        f"{r['case_id']}: {r['n']} completed" for r in completed
    ]


async def places_beyond_capacity(referrals_url: str, zone: str) -> list[str]:
    """Träger and months (city time) with more referrals holding a place (all but rejected
    and cancelled ones) than the Träger's places per month."""
    rows = await fetch(
        referrals_url,
        "SELECT r.traeger, to_char(r.requested_at AT TIME ZONE $1, 'YYYY-MM') AS month,"
        " count(*) AS taken, t.capacity_per_month AS places"
        " FROM referrals_referral r JOIN referrals_traeger t ON t.slug = r.traeger"
        " WHERE r.status NOT IN ('rejected', 'cancelled')"
        " GROUP BY r.traeger, month, t.capacity_per_month"
        " HAVING count(*) > t.capacity_per_month",
        zone,
    )
    return [f"{r['traeger']} {r['month']}: {r['taken']} of {r['places']} places" for r in rows]


async def unsent_outbox_rows(databases: Mapping[str, str]) -> dict[str, int]:
    found = {}
    for service, url in databases.items():
        [row] = await fetch(url, "SELECT count(*) AS n FROM outbox WHERE sent_at IS NULL")
        if row["n"]:
            found[service] = int(row["n"])
    return found


# -- run-once jobs -------------------------------------------------------------------------------


def job_findings(views: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """``views``: replica → its ``GET /jobs`` answer's jobs, for the replicas of one service.

    A run-once job ran on exactly one replica (no restarts in this test, so the lease never
    moved): that one never stood by and ran on every one of its ticks; every other replica
    only stood by. Together they ran it no more often than one replica ticks (not doubled),
    and every replica names the same holder."""
    problems: list[str] = []
    by_job: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for replica, jobs in views.items():
        for job in jobs:
            by_job[job["name"]][replica] = job
    for name, seen in sorted(by_job.items()):
        once = {job["once"] for job in seen.values()}
        if once != {True}:
            if once == {False}:
                problems += [
                    f"{name}@{replica}: per-replica job did not run"
                    for replica, job in seen.items()
                    if job["runs"] == 0
                ]
            continue
        ran = [replica for replica, job in seen.items() if job["runs"] > 0]
        holders = {job["holder"] for job in seen.values()}
        if len(ran) != 1:
            problems.append(f"{name}: ran on {sorted(ran)} (expected exactly one replica)")
        if len(holders) != 1 or (ran and holders != set(ran)):
            problems.append(f"{name}: holders seen {sorted(map(str, holders))}, ran on {ran}")
        for replica, job in seen.items():
            if replica in ran and (job["standby"] or job["failures"]):
                problems.append(f"{name}@{replica}: holder skipped or failed ticks: {job}")
            if replica not in ran and not job["standby"]:
                problems.append(f"{name}@{replica}: neither ran nor stood by: {job}")
        ticks = max(job["runs"] + job["standby"] for job in seen.values())
        total = sum(job["runs"] for job in seen.values())
        if total > ticks + 1:
            problems.append(f"{name}: {total} runs in all, one replica ticks {ticks} times")
    return problems


def describe_views(views: Mapping[str, Mapping[str, list[dict[str, Any]]]]) -> str:
    return json.dumps(views, indent=1, default=str)[:6000]


# -- webhooks posted by the delivery replicas ----------------------------------------------------


class TracingReceiver(Receiver):
    """The partner kit's example receiver (signature, timestamp, dedup by webhook-id), also
    counting every POST per webhook-id (duplicates included) and naming the delivery replica
    that sent it: the process owning the request's source port (``senders``: replica → pid;
    the replicas are processes of this machine, so the kernel's socket table tells). It takes
    ``delay_s`` per request, as a receiver storing the event does, so that the replicas'
    rounds overlap; it answers its first ``unavailable`` POSTs 503 (a receiver briefly
    down), so that events pile up behind the backoff and the replicas then share a backlog
    in which a case has several events waiting."""

    def __init__(
        self, senders: Mapping[str, int], delay_s: float = 0.0, unavailable: int = 0
    ) -> None:
        self.events: list[dict[str, Any]] = []
        super().__init__([], self.events.append)
        self.senders = dict(senders)
        self.delay_s = delay_s
        self.unavailable = unavailable
        self.posts: Counter[str] = Counter()
        self.posted_by: Counter[str] = Counter()
        self._server: ThreadingHTTPServer | None = None

    def sender(self, port: int) -> str:
        for replica, pid in self.senders.items():
            try:
                connections = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.laddr and c.laddr.port == port for c in connections):
                return replica
        return "unknown"

    def handle_from(self, port: int, headers: dict[str, str], body: bytes) -> int:
        msg_id = {k.lower(): v for k, v in headers.items()}.get("webhook-id", "")
        sender = self.sender(port)
        with self.lock:
            self.posts[msg_id] += 1
            self.posted_by[sender] += 1
            down = self.unavailable > 0
            self.unavailable -= down
        time.sleep(self.delay_s)
        return 503 if down else self.handle(headers, body)

    def server(self, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
        server = super().server(host, port)
        receiver = self
        base: Any = server.RequestHandlerClass

        class Tracing(base):  # type: ignore[misc]
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                status = receiver.handle_from(
                    self.client_address[1], dict(self.headers.items()), body
                )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        server.RequestHandlerClass = Tracing
        return server

    def start(self) -> str:
        """Serve on a free loopback port (a thread); returns the sink URL."""
        self._server = self.server("127.0.0.1", 0)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class WebhookView:
    """What one subscriber should have received and what its receiver saw."""

    owner: str
    expected: list[str]
    """Event ids of the subscribed types on the subscriber's feed topic."""
    received: list[dict[str, Any]]
    """The events its receiver accepted, in arrival order (each once: it deduplicates)."""
    posts: Mapping[str, int]
    """POSTs per webhook-id, duplicates included."""
    reattempted: set[str] = field(default_factory=set)
    """Event ids delivery attempted more than once (a lapsed lease or a failed attempt: the
    documented ways a webhook-id may be posted again)."""


def topic_order(records: Iterable[Record]) -> dict[str, tuple[str, int, int]]:
    """Event id → (topic, partition, offset) of its first record on the domain topics."""
    order: dict[str, tuple[str, int, int]] = {}
    for record in records:
        event_id = record.header("ce_id")
        if event_id is not None and event_id not in order:
            order[event_id] = (record.topic, record.partition, record.offset)
    return order


def webhook_findings(view: WebhookView, order: Mapping[str, tuple[str, int, int]]) -> list[str]:
    """Every expected event arrived, nothing else did, no webhook-id was posted twice unless
    delivery documents a second attempt of it, and each case's events from one domain topic
    arrived in that topic's order (events of one case on two topics have no order between
    them: they come from different services)."""
    problems: list[str] = []
    got = [e.get("id") for e in view.received]
    missing = [i for i in view.expected if i not in set(got)]
    unexpected = sorted({str(i) for i in got} - set(view.expected))
    if missing:
        problems.append(f"{view.owner}: {len(missing)} events never arrived: {missing[:5]}")
    if unexpected:
        problems.append(f"{view.owner}: {len(unexpected)} events not on its feed: {unexpected[:5]}")
    twice = {i: n for i, n in view.posts.items() if n > 1 and i not in view.reattempted}
    if twice:
        problems.append(f"{view.owner}: posted more than once without a second attempt: {twice}")
    by_case: dict[tuple[str, str], list[tuple[int, int, str]]] = defaultdict(list)
    for event in view.received:
        event_id = str(event.get("id"))
        if event_id not in order:
            problems.append(f"{view.owner}: {event_id} is on no domain topic")
            continue
        topic, partition, offset = order[event_id]
        by_case[(str(event.get("subject")), topic)].append((partition, offset, event_id))
    for (case, topic), seen in sorted(by_case.items()):
        if seen != sorted(seen):
            problems.append(
                f"{view.owner}: case {case} out of {topic} order: {[s[2] for s in seen]}"
            )
    return problems
