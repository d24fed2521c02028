"""Example webhook receiver: how a Träger or a Bezirksteam receives Lotse events over HTTPS,
with nothing but the Python standard library (3.11+).

Lotse's delivery service posts every event of a subscription as a CloudEvent (HTTP binding;
binary mode by default: ``ce-*`` headers and the JSON data as the body, or structured mode:
``application/cloudevents+json``), signed per Standard Webhooks:

* ``webhook-id``: the CloudEvent id, the same on every retry: **deduplicate by it**;
* ``webhook-timestamp``: seconds since the epoch when this attempt was signed;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256(secret, id.timestamp.body)>``, several
  separated by spaces while a rotated secret is still valid (one must match).

The secret is the ``whsec_…`` value shown once when the subscription was created (or its
secret rotated); the bytes after ``whsec_`` are base64. Answer 2xx only after you stored
the event; anything else (or no answer within the timeout) makes Lotse try again later,
with backoff, in the same order. Before a subscription is stored, Lotse sends the
CloudEvents validation request (``OPTIONS`` with ``WebHook-Request-Origin``); this server
allows it (``WebHook-Allowed-Origin``).

Run it (behind a TLS-terminating proxy in production; plain HTTP on loopback only for
development)::

    LOTSE_WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 8080

Any library that implements Standard Webhooks (``standardwebhooks`` on PyPI, npm, NuGet, …)
verifies these requests too; this file shows the few lines it takes without one.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOLERANCE_S = 300
"""How far a ``webhook-timestamp`` may lie from our clock (replayed requests are older)."""


class InvalidSignature(Exception):
    """The request is not from Lotse (wrong secret), too old or too new, or incomplete."""


def _key(secret: str) -> bytes:
    raw = secret.removeprefix("whsec_")
    return base64.b64decode(raw + "=" * (-len(raw) % 4))


def verify(
    secrets: list[str], headers: dict[str, str], body: bytes, *, now: float | None = None
) -> str:
    """Check signature and timestamp; returns the webhook id, raises ``InvalidSignature``."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id")
    stamp = lower.get("webhook-timestamp")
    signatures = lower.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent = int(stamp)
    except ValueError:
        raise InvalidSignature("webhook-timestamp is not a number") from None
    if abs((time.time() if now is None else now) - sent) > TOLERANCE_S:
        raise InvalidSignature("webhook-timestamp outside the tolerance (replay?)")
    signed = f"{msg_id}.{stamp}.".encode() + body
    offered = [s.split(",", 1)[1] for s in signatures.split() if s.startswith("v1,")]
    for secret in secrets:
        expected = base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest())
        if any(hmac.compare_digest(expected, s.encode()) for s in offered):
            return msg_id
    raise InvalidSignature("no matching signature")


def read_event(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The CloudEvent of a request, as one dict (structured or binary mode)."""
    lower = {k.lower(): v for k, v in headers.items()}
    if lower.get("content-type", "").startswith("application/cloudevents+json"):
        event: dict[str, Any] = json.loads(body)
        return event
    event = {name[3:]: value for name, value in lower.items() if name.startswith("ce-")}
    event["data"] = json.loads(body) if body else None
    return event


class Receiver:
    """Verifies, deduplicates by ``webhook-id`` and hands each new event to ``on_event``.

    Store the ids you have seen where you store the events (here: in memory, the last
    100,000), so that a redelivery after your crash is recognised too.
    """

    def __init__(
        self,
        secrets: list[str],
        on_event: Callable[[dict[str, Any]], None] = lambda event: print(json.dumps(event)),
        *,
        keep_ids: int = 100_000,
    ) -> None:
        self.secrets = secrets
        self.on_event = on_event
        self.keep_ids = keep_ids
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()
        self.rejected = 0
        self.duplicates = 0

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        """The HTTP status to answer with."""
        try:
            msg_id = verify(self.secrets, headers, body)
        except InvalidSignature:
            with self.lock:
                self.rejected += 1
            return 401
        with self.lock:
            if msg_id in self.seen:
                self.duplicates += 1
                return 204  # delivered before: acknowledge, do nothing again
            self.on_event(read_event(headers, body))
            self.seen[msg_id] = None
            while len(self.seen) > self.keep_ids:
                self.seen.popitem(last=False)
        return 204

    def server(self, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_OPTIONS(self) -> None:  # CloudEvents webhook validation handshake
                self.send_response(200)
                origin = self.headers.get("WebHook-Request-Origin")
                if origin:
                    self.send_header("WebHook-Allowed-Origin", origin)
                self.send_header("Allow", "POST, OPTIONS")
                self.end_headers()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                status = receiver.handle(dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no request log: it would hold ids of families' cases

        return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    secrets = os.environ["LOTSE_WEBHOOK_SECRET"].split()  # two during a rotation
    Receiver(secrets).server(args.host, args.port).serve_forever()


if __name__ == "__main__":
    main()
