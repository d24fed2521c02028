"""Example: a Träger answers a referral over HTTP instead of Kafka (standard library only).

POST the same ``de.lotse.partner.referral-answer.v1`` CloudEvent you would write to
``lotse.partner.<slug>.responses``, in the CloudEvents HTTP binding (binary mode here;
structured mode, ``content-type: application/cloudevents+json``, works as well), to
``POST /traeger/<slug>/answers`` of the delivery service with your bearer token. Lotse
checks it as on Kafka (type, data, ``source`` = ``/partner/<slug>``, ``traeger`` = you) and
writes it to your responses topic; 202 means accepted, and sending the same id again is
answered ``duplicate`` (so retry with the same id after a timeout). Refusals say field and
reason (422), another Träger's slug is 403.

    python examples/answer_over_http.py --url http://127.0.0.1:8005 --token-file token.txt \\
        --traeger hebammenzentrum-dortmund --referral <id> --case <case id> --answer accepted
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def answer_request(
    url: str,
    token: str,
    *,
    traeger: str,
    referral_id: str,
    case_id: str,
    answer: str,
    reason: str | None = None,
    event_id: str | None = None,
) -> urllib.request.Request:
    """The HTTP request of one answer (binary mode)."""
    occurred_at = datetime.now(UTC).isoformat()
    data: dict[str, Any] = {
        "referral_id": referral_id,
        "case_id": case_id,
        "traeger": traeger,
        "answer": answer,
        "occurred_at": occurred_at,
    }
    if reason is not None:
        data["reason"] = reason
    headers = {
        "Authorization": f"Bearer {token}",
        "content-type": "application/json",
        "ce-specversion": "1.0",
        # A stable id per referral and answer: a retry is recognised as the same answer.
        "ce-id": event_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{referral_id}/{answer}")),
        "ce-source": f"/partner/{traeger}",
        "ce-type": "de.lotse.partner.referral-answer.v1",
        "ce-subject": case_id,
        "ce-time": occurred_at,
        "ce-traeger": traeger,
    }
    return urllib.request.Request(
        f"{url.rstrip('/')}/traeger/{traeger}/answers",
        data=json.dumps(data).encode(),
        headers=headers,
        method="POST",
    )


def send(request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8005")
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--traeger", required=True)
    parser.add_argument("--referral", required=True)
    parser.add_argument("--case", required=True)
    parser.add_argument("--answer", required=True)
    parser.add_argument("--reason")
    args = parser.parse_args()
    request = answer_request(
        args.url,
        args.token_file.read_text().strip(),
        traeger=args.traeger,
        referral_id=args.referral,
        case_id=args.case,
        answer=args.answer,
        reason=args.reason,
    )
    status, body = send(request)
    print(status, json.dumps(body))


if __name__ == "__main__":
    main()
