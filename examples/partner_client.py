"""Example partner client: how a Träger (provider agency) answers Lotse referrals over Kafka.

It needs nothing of Lotse but the contracts package (``lotse-contracts[crypto]``) and a
Kafka client (aiokafka). It reads the referrals addressed to one Träger from
``lotse.partner.<traeger>.referrals`` and answers on ``lotse.partner.<traeger>.responses``:
received → accepted → first contact confirmed (the "warm handover") → in-progress →
completed. A real Träger takes these steps days or weeks apart, as things happen with the
family; this script takes them at once, as a demonstration and as a test of the integration
(see examples/README.md, the integration guide).

Run it against a Lotse platform started by ``lotse up``: the broker and the referrals API
are found in ``var/platform.json``, which ``lotse up`` writes (it picks other ports when the
usual ones are taken)::

    python examples/partner_client.py --traeger hebammenzentrum-dortmund --token-file token.txt

Against any other deployment name them: ``--bootstrap HOST:PORT --lotse-url URL`` (explicit
flags always win over the file).

Rules the script follows, which every partner implementation must follow too:

* Answer only referrals addressed to you, in the order of the lifecycle; Lotse refuses
  (dead-letters) anything else and changes nothing.
* Give every answer a stable CloudEvents id (here: derived from referral id and answer),
  so that an answer sent twice after a crash is recognised as the same one.
* Commit your consumer offset only after your answers are written.
* On ``referral-cancelled`` stop working with the family and delete what you received.
* On ``answer-refused`` (one of your answers was refused and changed nothing) log the code
  and reason and fix the answer; the notice names your refused event's id, topic, partition
  and offset. It says nothing about referrals that are not yours.
* Contact data comes only sealed, with exactly the fields the family consented to: as a
  compact JWE (``disclosure_jwe``; ``dir`` + ``A256GCM``, any JOSE library opens it) and,
  on events from before it existed, only as ``disclosure``. Fetch the key for one referral
  from Lotse when you need to open it; it opens that referral's disclosure and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from lotse_contracts import topics
from lotse_contracts.cloudevents import InvalidCloudEvent, KafkaRecord, from_kafka, to_kafka_binary
from lotse_contracts.events.partner import PartnerAnswer, PartnerReferralAnswer
from lotse_contracts.events.referrals import (
    AnswerRefused,
    ReferralCancelled,
    ReferralRequested,
    RejectionReason,
)
from lotse_contracts.personal import BlockUnreadable, open_block, open_jwe

log = logging.getLogger("partner-client")

#: Namespace of the answer ids: uuid5(namespace, "<referral id>/<answer>") is the same for
#: the same answer every time, so Lotse deduplicates a resent answer.
ANSWER_NAMESPACE = uuid.UUID("6f1c0a52-3d5e-4b8f-9a41-7c2e5d8b1f03")

#: What this demo does with every referral, in order.
HAPPY_PATH: tuple[PartnerAnswer, ...] = (
    PartnerAnswer.RECEIVED,
    PartnerAnswer.ACCEPTED,
    PartnerAnswer.FIRST_CONTACT,
    PartnerAnswer.IN_PROGRESS,
    PartnerAnswer.COMPLETED,
)

KeyFetcher = Callable[[ReferralRequested], Awaitable[bytes | None]]


def answer_id(referral_id: str, answer: PartnerAnswer) -> str:
    """A stable CloudEvents id for one answer to one referral."""
    return str(uuid.uuid5(ANSWER_NAMESPACE, f"{referral_id}/{answer.value}"))


def build_answer(
    referral: ReferralRequested,
    answer: PartnerAnswer,
    *,
    reason: RejectionReason | None = None,
    reason_code: str | None = None,
    at: datetime | None = None,
) -> KafkaRecord:
    """The Kafka record (binary-mode CloudEvent, key = case id) of one answer."""
    model = PartnerReferralAnswer(
        referral_id=referral.referral_id,
        case_id=referral.case_id,
        traeger=referral.traeger,
        answer=answer,
        reason=reason,
        reason_code=reason_code,
        occurred_at=at or datetime.now(UTC),
    )
    event = model.to_cloudevent(event_id=answer_id(referral.referral_id, answer))
    return to_kafka_binary(event)


def read_referral_event(
    value: bytes | None, headers: Sequence[tuple[str, bytes]]
) -> ReferralRequested | ReferralCancelled | AnswerRefused | None:
    """A referral event from the feed, validated against the contract; None for event types
    this client does not handle. Raises InvalidCloudEvent / ValueError for broken records."""
    event = from_kafka(value, list(headers))
    if event.type == ReferralRequested.event_type:
        return ReferralRequested.model_validate(event.data)
    if event.type == ReferralCancelled.event_type:
        return ReferralCancelled.model_validate(event.data)
    if event.type == AnswerRefused.event_type:
        return AnswerRefused.model_validate(event.data)
    return None


def open_disclosure(referral: ReferralRequested, key: bytes) -> dict[str, Any]:
    """The consented contact data of the family; raises BlockUnreadable (e.g. erased).
    The JWE where the event carries one, else the older EncryptedBlock form."""
    if referral.disclosure_jwe is not None:
        return open_jwe(referral.disclosure_jwe, key=key)
    if referral.disclosure is None:
        return {}
    return open_block(referral.disclosure, key=key, case_id=referral.case_id)


def http_key_fetcher(
    lotse_url: str,
    headers: dict[str, str],
    timeout_s: float = 10.0,
    *,
    tries: int = 3,
    backoff_s: float = 1.0,
) -> KeyFetcher:
    """Fetch a referral's disclosure key from Lotse (``GET /referrals/{id}/disclosure-key``);
    ``headers`` carry the Träger's credentials (``Authorization: Bearer <token>``).

    A time-out, a refused connection or a 5xx answer (503 when Lotse's database is busy) is
    tried again up to ``tries`` times; a 4xx is final. When no key comes, the referral is
    still answered, only without contact data: never let a key fetch stop the client."""

    def fetch_once(referral_id: str) -> bytes | None:
        request = urllib.request.Request(
            f"{lotse_url.rstrip('/')}/referrals/{referral_id}/disclosure-key", headers=headers
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.load(response)
        text = str(body["key"])
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    def fetch(referral_id: str) -> bytes | None:
        problem = ""
        for attempt in range(1, tries + 1):
            try:
                return fetch_once(referral_id)
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    log.warning("no disclosure key for %s: HTTP %s", referral_id, exc.code)
                    return None
                problem = f"HTTP {exc.code}"
            except (OSError, ValueError, KeyError) as exc:  # URLError and time-outs are OSErrors
                problem = type(exc).__name__
            if attempt < tries:
                time.sleep(backoff_s * 2 ** (attempt - 1))
        log.warning("no disclosure key for %s after %d tries: %s", referral_id, tries, problem)
        return None

    async def fetcher(referral: ReferralRequested) -> bytes | None:
        return await asyncio.to_thread(fetch, referral.referral_id)

    return fetcher


@dataclass
class Summary:
    """What one run did (for the demo output and for tests)."""

    answered: dict[str, list[str]] = field(default_factory=dict)
    disclosed_fields: dict[str, list[str]] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    skipped: int = 0
    #: Referrals that came with a sealed disclosure the client could not open, and why.
    undisclosed: dict[str, str] = field(default_factory=dict)
    #: Our answers Lotse refused (answer-refused): (refused event id, reason code).
    refused: list[tuple[str | None, str]] = field(default_factory=list)


class PartnerClient:
    """Consumes one Träger's referral feed and answers each referral along ``plan``."""

    def __init__(
        self,
        *,
        bootstrap: str,
        traeger: str,
        topic_prefix: str = "",
        group_id: str | None = None,
        plan: Sequence[PartnerAnswer] = HAPPY_PATH,
        reject_with: RejectionReason | None = None,
        key_fetcher: KeyFetcher | None = None,
        kafka_options: dict[str, Any] | None = None,
        answered_at: dict[str, datetime] | None = None,
    ) -> None:
        self.traeger = traeger
        # When each answer (by answer id) was first sent: a referral delivered again (after a
        # rebalance, say) is answered with the very same events, which Lotse skips as
        # redeliveries; a new time under the same id would be refused as a conflicting
        # duplicate. A real client keeps this in its case system; pass a dict to share it
        # across restarts.
        self.answered_at = {} if answered_at is None else answered_at
        self.bootstrap = bootstrap
        self.feed = topic_prefix + topics.partner_referrals(traeger)
        self.answers = topic_prefix + topics.partner_responses(traeger)
        # The group named in Lotse's subscription registry (the ACLs allow only that one).
        self.group_id = group_id or f"{topic_prefix}lotse-partner-{traeger}"
        self.plan = (PartnerAnswer.RECEIVED, PartnerAnswer.REJECTED) if reject_with else plan
        self.reject_with = reject_with
        self.key_fetcher = key_fetcher
        self.kafka_options = kafka_options or {}
        self.summary = Summary()

    async def run(
        self, *, max_referrals: int | None = None, idle_timeout_s: float | None = None
    ) -> Summary:
        """Answer referrals until ``max_referrals`` are answered or nothing arrived for
        ``idle_timeout_s`` seconds (both None: run until cancelled)."""
        consumer = AIOKafkaConsumer(
            self.feed,
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self.kafka_options,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", **self._producer_options()
        )
        await consumer.start()
        await producer.start()
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        try:
            while max_referrals is None or len(self.summary.answered) < max_referrals:
                batches = await consumer.getmany(timeout_ms=500, max_records=50)
                if not batches:
                    if idle_timeout_s is not None and loop.time() - last_seen > idle_timeout_s:
                        break
                    continue
                last_seen = loop.time()
                for records in batches.values():
                    for record in records:
                        await self._handle(producer, record.value, record.headers)
                # Answers are acknowledged by the broker (acks=all) before the offset moves.
                await consumer.commit()
        finally:
            await consumer.stop()
            await producer.stop()
        return self.summary

    def _producer_options(self) -> dict[str, Any]:
        keep = ("security_protocol", "ssl_context", "sasl_mechanism")
        return {k: v for k, v in self.kafka_options.items() if k in keep or k.startswith("sasl_")}

    async def _handle(
        self,
        producer: AIOKafkaProducer,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        try:
            event = read_referral_event(value, headers)
        except (InvalidCloudEvent, ValueError) as exc:
            log.error("unreadable record on %s: %s", self.feed, exc)
            self.summary.skipped += 1
            return
        if event is None:
            self.summary.skipped += 1
            return
        if isinstance(event, AnswerRefused):
            # One of our answers changed nothing: log it so that it gets fixed.
            log.error(
                "answer %s refused (%s): %s [%s/%d@%d]",
                event.refused_event_id,
                event.reason_code.value,
                event.reason,
                event.refused_topic,
                event.refused_partition,
                event.refused_offset,
            )
            self.summary.refused.append((event.refused_event_id, event.reason_code.value))
            return
        if isinstance(event, ReferralCancelled):
            # Stop, and delete what was received about the family (here: nothing kept).
            log.info("referral %s cancelled (%s)", event.referral_id, event.reason.value)
            self.summary.cancelled.append(event.referral_id)
            return
        if event.traeger != self.traeger:
            log.error("referral %s is for %s, not us", event.referral_id, event.traeger)
            return
        await self._read_disclosure(event)
        sent: list[str] = []
        for answer in self.plan:
            reason = self.reject_with if answer is PartnerAnswer.REJECTED else None
            at = self.answered_at.setdefault(
                answer_id(event.referral_id, answer), datetime.now(UTC)
            )
            record = build_answer(event, answer, reason=reason, at=at)
            await producer.send_and_wait(
                self.answers, value=record.value, key=record.key, headers=record.headers
            )
            sent.append(answer.value)
        log.info("referral %s (%s): answered %s", event.referral_id, event.module, sent)
        self.summary.answered[event.referral_id] = sent

    async def _read_disclosure(self, referral: ReferralRequested) -> None:
        if referral.disclosure is None or self.key_fetcher is None:
            return
        key = await self.key_fetcher(referral)
        if key is None:
            self.summary.undisclosed[referral.referral_id] = "no key"
            return
        try:
            contact = open_disclosure(referral, key)
        except BlockUnreadable as exc:
            log.warning("disclosure of %s does not open: %s", referral.referral_id, exc.reason)
            self.summary.undisclosed[referral.referral_id] = f"does not open: {exc.reason}"
            return
        # A real Träger stores the contact data in its own case system; the demo only
        # says which fields it got (never their values: no personal data in logs).
        self.summary.disclosed_fields[referral.referral_id] = sorted(contact)


#: What ``lotse up`` writes once its platform is ready (and removes when it stops).
LOCAL_PLATFORM_FILE = Path("var/platform.json")
FALLBACK_BOOTSTRAP = "127.0.0.1:9092"


def local_platform(path: Path = LOCAL_PLATFORM_FILE) -> dict[str, Any] | None:
    """Where a local ``lotse up`` platform listens (``bootstrap``, ``services``), read from
    its platform file; None when there is none, or its platform no longer runs."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: not a readable platform file ({exc})") from exc
    if not isinstance(found, dict) or not isinstance(found.get("bootstrap"), str):
        raise SystemExit(f"{path}: no bootstrap in the platform file")
    try:
        os.kill(int(found.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return None  # left behind by a platform that was killed
    except PermissionError:
        pass  # runs as another user
    return found


def with_platform_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in what the flags leave out from the local platform file: the bootstrap, the
    topic prefix and (with a token to present) the referrals API. Flags always win."""
    local = local_platform(args.platform_file) or {}
    args.bootstrap = args.bootstrap or local.get("bootstrap") or FALLBACK_BOOTSTRAP
    if args.topic_prefix is None:
        args.topic_prefix = str(local.get("topic_prefix", ""))
    if args.lotse_url is None and args.token_file is not None:
        args.lotse_url = (local.get("services") or {}).get("referrals")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traeger", required=True, help="your Träger slug")
    parser.add_argument(
        "--bootstrap",
        default=None,
        help=f"Kafka bootstrap (default: as --platform-file says, else {FALLBACK_BOOTSTRAP})",
    )
    parser.add_argument(
        "--platform-file",
        type=Path,
        default=LOCAL_PLATFORM_FILE,
        help="where `lotse up` says it runs (used for what --bootstrap/--lotse-url leave out)",
    )
    parser.add_argument("--topic-prefix", default=None, help="prefix of the deployment's topics")
    parser.add_argument("--group-id", default=None, help="consumer group (default from registry)")
    parser.add_argument(
        "--reject",
        choices=[r.value for r in RejectionReason],
        default=None,
        help="reject every referral with this reason instead of accepting it",
    )
    parser.add_argument("--max-referrals", type=int, default=None, help="stop after N referrals")
    parser.add_argument(
        "--idle-timeout", type=float, default=None, help="stop after S seconds without records"
    )
    parser.add_argument("--lotse-url", default=None, help="referrals API, to fetch disclosure keys")
    parser.add_argument("--token-file", type=Path, default=None, help="file with your bearer token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with_platform_defaults(args)
    fetcher = None
    if args.lotse_url:
        if args.token_file is None:
            parser.error("--lotse-url needs --token-file (your bearer token for the API)")
        credentials = {"Authorization": f"Bearer {args.token_file.read_text().strip()}"}
        fetcher = http_key_fetcher(args.lotse_url, credentials)
    client = PartnerClient(
        bootstrap=args.bootstrap,
        traeger=args.traeger,
        topic_prefix=args.topic_prefix,
        group_id=args.group_id,
        reject_with=RejectionReason(args.reject) if args.reject else None,
        key_fetcher=fetcher,
    )
    summary = asyncio.run(
        client.run(max_referrals=args.max_referrals, idle_timeout_s=args.idle_timeout)
    )
    print(
        json.dumps(
            {
                "answered": summary.answered,
                "disclosed_fields": summary.disclosed_fields,
                "cancelled": summary.cancelled,
                "skipped": summary.skipped,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
