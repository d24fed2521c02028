"""The example partner client's key fetch against a real local HTTP server: transient
trouble is tried again, a refusal is final, and nothing ends the client."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from lotse_contracts.events.referrals import ReferralRequested

from examples.partner_client import http_key_fetcher

KEY = bytes(range(32))


class Script:
    """What the fake Lotse answers, one entry per request: a status, or "hang"."""

    def __init__(self, answers: list[int | str]) -> None:
        self.answers = answers
        self.requests = 0


@pytest.fixture
def lotse() -> Iterator[tuple[str, Script]]:
    script = Script([])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = script.answers[min(script.requests, len(script.answers) - 1)]
            script.requests += 1
            if answer == "hang":
                time.sleep(0.6)  # longer than the client's time-out
                return
            assert isinstance(answer, int)
            self.send_response(answer)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if answer == 200:
                key = base64.urlsafe_b64encode(KEY).decode().rstrip("=")
                self.wfile.write(json.dumps({"key": key}).encode())
            else:
                self.wfile.write(b'{"detail": "no"}')

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", script
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("answers", "key", "requests"),
    [
        ([200], KEY, 1),
        (["hang", 503, 200], KEY, 3),  # a time-out and a busy database, then the key
        ([500, 500, 500, 200], None, 3),  # gives up after three tries, without raising
        (["hang"], None, 3),
        ([403], None, 1),  # a refusal is final
        ([404], None, 1),
    ],
    ids=["ok", "retried", "gives-up", "never-answers", "refused", "unknown"],
)
async def test_the_key_fetch_retries_transient_trouble_and_never_raises(
    lotse: tuple[str, Script], answers: list[int | str], key: bytes | None, requests: int
) -> None:
    url, script = lotse
    script.answers = answers
    fetch = http_key_fetcher(url, {"Authorization": "Bearer t"}, timeout_s=0.3, backoff_s=0.01)
    assert await fetch(ReferralRequested.example()) == key
    assert script.requests == requests


async def test_nothing_listening_is_no_key_either() -> None:
    fetch = http_key_fetcher("http://127.0.0.1:9", {}, timeout_s=0.3, backoff_s=0.01)
    assert await fetch(ReferralRequested.example()) is None
