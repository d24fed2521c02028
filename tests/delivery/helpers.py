"""A real webhook receiver on loopback (the partner kit's example) with scripted faults."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lotse_contracts.events.common import EXAMPLE_TRAEGER
from lotse_contracts.events.referrals import ReferralCancelled, ReferralRequested

from examples.webhook_receiver import Receiver

TRAEGER = EXAMPLE_TRAEGER


class Scripted(Receiver):
    """The example receiver, answering the first requests as scripted: an int is a status,
    "timeout" sleeps past the sender's timeout, "ok" (and the end of the script) delivers."""

    def __init__(self, secrets: list[str], script: list[Any] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        super().__init__(secrets, self.events.append)
        self.script = list(script or [])
        self.requests = 0

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            self.requests += 1
            step = self.script.pop(0) if self.script else "ok"
        if step == "timeout":
            time.sleep(1.0)
            return 204
        if isinstance(step, int):
            return step
        return super().handle(headers, body)


@contextmanager
def receiver_running(receiver: Receiver) -> Iterator[str]:
    """Serve ``receiver`` on a free loopback port; yields its URL."""
    server = receiver.server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def referral(case_id: str | None = None, traeger: str = TRAEGER) -> ReferralRequested:
    base = ReferralRequested.example()
    return base.model_copy(
        update={
            "referral_id": str(uuid.uuid4()),
            "case_id": case_id or base.case_id,
            "traeger": traeger,
        }
    )


def cancelled(requested: ReferralRequested) -> ReferralCancelled:
    base = ReferralCancelled.example()
    return base.model_copy(
        update={
            "referral_id": requested.referral_id,
            "case_id": requested.case_id,
            "traeger": requested.traeger,
        }
    )
