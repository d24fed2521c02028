"""The delivery service's use cases, one function each: load → decide (domain.py) → save,
with the audit entry in the same transaction. HTTP and Kafka stay outside (api.py,
consumers.py); the delivery worker (worker.py) posts what :func:`enqueue` stored."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from lotse_contracts import topics
from lotse_contracts.cloudevents import CloudEvent, InvalidCloudEvent, from_kafka, to_structured
from lotse_contracts.events.base import (
    CATALOGUE,
    EventDataInvalid,
    UnknownEventType,
    UnknownEventVersion,
)
from lotse_contracts.events.partner import PartnerReferralAnswer
from lotse_runtime import audit, inbox
from lotse_runtime.identity import AccessDenied, Caller, Role
from lotse_runtime.refusal import Conflict, Refusal
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_delivery import domain
from lotse_delivery.pinning import Resolver, pinned, pinned_client, system_resolver
from lotse_delivery.sealing import SecretBox
from lotse_delivery.settings import DeliveryRuntime
from lotse_delivery.tables import (
    AnswerAccepted,
    AttemptPublic,
    DeliveryAttempt,
    DeliveryPending,
    DeliverySubscription,
    HttpProtocolSettings,
    RedeliverAccepted,
    SecretRotated,
    SubscriptionChange,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPublic,
)

PURPOSE = "webhook subscription"
ANSWERS_CONSUMER = "delivery.http-answers"


@dataclass(frozen=True)
class Context:
    """What a use case needs of the request: runtime, caller, the route for audit entries."""

    runtime: DeliveryRuntime
    caller: Caller
    path: str
    box: SecretBox
    resolver: Resolver = system_resolver


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def check_sink(
    runtime: DeliveryRuntime, url: str, resolver: Resolver = system_resolver
) -> tuple[domain.Sink, list[str]]:
    """Parse, resolve (once) and judge a sink by the deployment's sink policy (Refusal if
    not); returns it with the addresses that were judged, for the connection to pin."""
    sink = domain.parse_sink(url)
    literal = domain.ip_literal(sink.host)
    addresses = [literal] if literal is not None else await resolver(sink.host, sink.port)
    domain.check_sink(sink, runtime.settings.sink_policy, addresses)
    return sink, addresses


async def validate_sink(runtime: DeliveryRuntime, sink: domain.Sink, addresses: list[str]) -> None:
    """The CloudEvents webhook validation handshake (abuse protection): OPTIONS with
    ``WebHook-Request-Origin``; the sink must answer 2xx with ``WebHook-Allowed-Origin``.
    Sent to the address just checked (pinned), like every delivery."""
    settings = runtime.settings
    origin = settings.webhook_origin
    try:
        async with pinned_client(settings.deliver_timeout_s) as client:
            with pinned(sink.host, addresses[0]):
                answer = await client.options(sink.url, headers={"WebHook-Request-Origin": origin})
    except httpx.HTTPError as exc:
        raise Refusal("sink", f"validation request failed: {type(exc).__name__}") from None
    if not 200 <= answer.status_code < 300:
        raise Refusal(
            "sink", f"validation request (OPTIONS) answered {answer.status_code}, not 2xx"
        )
    if not domain.webhook_origin_allowed(answer.headers.get("WebHook-Allowed-Origin"), origin):
        raise Refusal(
            "sink",
            f"validation request (OPTIONS) was not answered with WebHook-Allowed-Origin: "
            f"{origin} (or *)",
        )


def _audit(ctx: Context, session: AsyncSession, action: audit.AuditAction, what: str) -> None:
    audit.record(
        session,
        service=ctx.runtime.service,
        caller=ctx.caller,
        action=action,
        case_id=None,
        purpose=f"{PURPOSE} {what}",
        path=ctx.path,
    )


async def _pending(session: AsyncSession, subscription_id: str) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(DeliveryPending)
        .where(
            col(DeliveryPending.subscription_id) == subscription_id,
            col(DeliveryPending.state) == "pending",
        )
    )
    return int(count or 0)


def _public(sub: DeliverySubscription, pending: int) -> dict[str, Any]:
    return {
        "id": sub.id,
        "sink": sub.sink,
        "protocolsettings": HttpProtocolSettings.model_validate({"mode": sub.mode}),
        "types": list(sub.types),
        "filters": list(sub.filters),
        "fields": None if sub.fields is None else list(sub.fields),
        "description": sub.description,
        "status": sub.status,
        "paused_reason": sub.paused_reason,
        "paused_at": sub.paused_at,
        "consecutive_failures": sub.consecutive_failures,
        "pending": pending,
        "created_at": sub.created_at,
    }


async def _own(session: AsyncSession, ctx: Context, subscription_id: str) -> DeliverySubscription:
    """The caller's own subscription; a foreign or unknown one is the same 403."""
    owner = domain.owner_of(ctx.caller)
    sub = await session.get(DeliverySubscription, subscription_id, with_for_update=True)
    if sub is None or (sub.owner_kind, sub.owner) != (owner.kind, owner.member):
        raise AccessDenied("subscription unknown or of another owner")
    return sub


# -- subscriptions -------------------------------------------------------------------------------


async def create_subscription(ctx: Context, body: SubscriptionCreate) -> SubscriptionCreated:
    runtime = ctx.runtime
    owner = domain.owner_of(ctx.caller)
    domain.check_within_ceiling(runtime.registry, owner, body)
    sink, addresses = await check_sink(runtime, body.sink, ctx.resolver)
    if runtime.settings.verify_sinks:
        await validate_sink(runtime, sink, addresses)
    now = runtime.clock()
    secret = new_secret()
    async with runtime.db.transaction() as session:
        held = await session.scalar(
            select(func.count())
            .select_from(DeliverySubscription)
            .where(
                col(DeliverySubscription.owner_kind) == owner.kind,
                col(DeliverySubscription.owner) == owner.member,
            )
        )
        if int(held or 0) >= runtime.settings.max_subscriptions_per_owner:
            raise Conflict(
                "subscriptions",
                f"{owner.audience} holds {held} subscriptions, the most allowed; delete one",
            )
        subscription_id = str(uuid.uuid4())
        sub = DeliverySubscription(
            id=subscription_id,
            owner_kind=owner.kind,
            owner=owner.member,
            sink=sink.url,
            mode=body.protocolsettings.mode,
            types=list(body.types),
            filters=[f.model_dump() for f in body.filters],
            fields=None if body.fields is None else list(body.fields),
            description=body.description,
            status="active",
            secret=ctx.box.seal(secret, subscription_id=subscription_id, column="secret"),
            created_by=ctx.caller.subject,
            created_at=now,
            updated_at=now,
        )
        session.add(sub)
        _audit(ctx, session, audit.AuditAction.create, f"{sub.id} created")
    return SubscriptionCreated(**_public(sub, 0), secret=secret)


async def list_subscriptions(ctx: Context) -> list[SubscriptionPublic]:
    owner = domain.owner_of(ctx.caller)
    async with ctx.runtime.db.transaction() as session:
        subs = (
            await session.scalars(
                select(DeliverySubscription)
                .where(
                    col(DeliverySubscription.owner_kind) == owner.kind,
                    col(DeliverySubscription.owner) == owner.member,
                )
                .order_by(col(DeliverySubscription.created_at))
            )
        ).all()
        return [SubscriptionPublic(**_public(s, await _pending(session, s.id))) for s in subs]


async def get_subscription(ctx: Context, subscription_id: str) -> SubscriptionPublic:
    async with ctx.runtime.db.transaction() as session:
        sub = await _own(session, ctx, subscription_id)
        return SubscriptionPublic(**_public(sub, await _pending(session, sub.id)))


async def change_subscription(
    ctx: Context, subscription_id: str, body: SubscriptionChange
) -> SubscriptionPublic:
    now = ctx.runtime.clock()
    async with ctx.runtime.db.transaction() as session:
        sub = await _own(session, ctx, subscription_id)
        if body.status == "paused" and sub.status != "paused":
            sub.status, sub.paused_at, sub.paused_reason = "paused", now, "paused by the owner"
        elif body.status == "active" and sub.status != "active":
            sub.status, sub.paused_at, sub.paused_reason = "active", None, None
            # A fresh failure budget; what waited is delivered from where it stopped.
            sub.consecutive_failures, sub.failing_since, sub.hold_until = 0, None, None
        sub.updated_at = now
        session.add(sub)
        _audit(ctx, session, audit.AuditAction.change, f"{sub.id} set {body.status}")
        return SubscriptionPublic(**_public(sub, await _pending(session, sub.id)))


async def delete_subscription(ctx: Context, subscription_id: str) -> None:
    async with ctx.runtime.db.transaction() as session:
        sub = await _own(session, ctx, subscription_id)
        await session.execute(
            delete(DeliveryPending).where(col(DeliveryPending.subscription_id) == sub.id)
        )
        await session.execute(
            delete(DeliveryAttempt).where(col(DeliveryAttempt.subscription_id) == sub.id)
        )
        await session.delete(sub)
        _audit(ctx, session, audit.AuditAction.change, f"{sub.id} deleted")


async def rotate_secret(ctx: Context, subscription_id: str) -> SecretRotated:
    now = ctx.runtime.clock()
    until = now + timedelta(seconds=ctx.runtime.settings.secret_rotation_grace_s)
    secret = new_secret()
    async with ctx.runtime.db.transaction() as session:
        sub = await _own(session, ctx, subscription_id)
        # Sealed per column: the old secret is opened and sealed again as the previous one.
        old = ctx.box.open(sub.secret, subscription_id=sub.id, column="secret")
        sub.previous_secret = ctx.box.seal(old, subscription_id=sub.id, column="previous_secret")
        sub.previous_secret_until = until
        sub.secret = ctx.box.seal(secret, subscription_id=sub.id, column="secret")
        sub.updated_at = now
        session.add(sub)
        _audit(ctx, session, audit.AuditAction.change, f"{sub.id} secret rotated")
    return SecretRotated(id=subscription_id, secret=secret, previous_valid_until=until)


async def delivery_log(ctx: Context, subscription_id: str, limit: int) -> list[AttemptPublic]:
    async with ctx.runtime.db.transaction() as session:
        sub = await _own(session, ctx, subscription_id)
        rows = (
            await session.scalars(
                select(DeliveryAttempt)
                .where(col(DeliveryAttempt.subscription_id) == sub.id)
                .order_by(col(DeliveryAttempt.id).desc())
                .limit(limit)
            )
        ).all()
    return [AttemptPublic.model_validate(r, from_attributes=True) for r in rows]


async def redeliver(ctx: Context, subscription_id: str, since: datetime) -> RedeliverAccepted:
    """Deliver again, in their original order, the kept events of the subscription that
    happened at or after ``since`` (with the same CloudEvent id, so webhook-id is the same)."""
    async with ctx.runtime.db.transaction() as session:
        sub = await _own(session, ctx, subscription_id)
        result = await session.execute(
            update(DeliveryPending)
            .where(
                col(DeliveryPending.subscription_id) == sub.id,
                col(DeliveryPending.state) == "delivered",
                col(DeliveryPending.event_time) >= since,
            )
            .values(
                state="pending", attempts=0, delivered_at=None, lease_until=None, lease_owner=None
            )
        )
        requeued = int(getattr(result, "rowcount", 0) or 0)
        _audit(ctx, session, audit.AuditAction.change, f"{sub.id} redelivery requested")
    return RedeliverAccepted(requeued=requeued)


# -- what the consumer stores --------------------------------------------------------------------


async def enqueue(runtime: DeliveryRuntime, session: AsyncSession, event: CloudEvent) -> int:
    """Store one pending delivery per matching subscription, in the consumer's transaction
    (with its inbox entry). The copy is the subscription registry's projection for the
    subscriber's audience (``registry.route``, the very function that fills the audience
    topics), further limited to the subscriber's own ``fields``. Paused subscriptions keep
    collecting, so that resuming delivers without a gap."""
    stored = 0
    now = runtime.clock()
    for topic, copy in runtime.registry.route(event):
        owner = domain.feed_owner(topic)
        if owner is None:
            continue
        subs = (
            await session.scalars(
                select(DeliverySubscription).where(
                    col(DeliverySubscription.owner_kind) == owner.kind,
                    col(DeliverySubscription.owner) == owner.member,
                )
            )
        ).all()
        for sub in subs:
            if event.type not in sub.types or not domain.matches(sub.filters, copy):
                continue
            projected = domain.limit_fields(copy, sub.fields)
            session.add(
                DeliveryPending(
                    subscription_id=sub.id,
                    ordering_key=event.subject or event.id,
                    event_id=event.id,
                    event_type=event.type,
                    event_time=event.time,
                    cloudevent=json.loads(to_structured(projected)),
                    state="pending",
                    created_at=now,
                )
            )
            stored += 1
    return stored


# -- answers over HTTP ---------------------------------------------------------------------------


def kafka_headers(headers: dict[str, str]) -> list[tuple[str, bytes]]:
    """HTTP binding → Kafka binding: ``ce-<name>`` becomes ``ce_<name>``, content-type stays,
    so the one envelope parser of the Kafka path (``from_kafka``) reads HTTP answers too."""
    result: list[tuple[str, bytes]] = []
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("ce-"):
            result.append(("ce_" + lower[3:], value.encode()))
        elif lower == "content-type":
            result.append((lower, value.encode()))
    return result


async def accept_answer(
    ctx: Context, traeger: str, headers: dict[str, str], body: bytes
) -> AnswerAccepted:
    """A Träger's referral answer over HTTP: checked as on its Kafka topic (envelope, type,
    data against ``PartnerReferralAnswer``, source ``/partner/<slug>``, its own Träger) and
    written to ``lotse.partner.<slug>.responses`` through the outbox. The referrals service
    then applies it exactly as an answer from Kafka (state rules, dead letter on refusal)."""
    runtime, caller = ctx.runtime, ctx.caller
    if caller.role is not Role.traeger or caller.traeger != traeger:
        raise AccessDenied("an answer for another Träger")
    try:
        event = from_kafka(body, kafka_headers(headers), max_bytes=runtime.settings.max_event_bytes)
    except InvalidCloudEvent as exc:
        raise Refusal("body", f"not a CloudEvent: {exc.reason}") from None
    if event.type != PartnerReferralAnswer.event_type:
        raise Refusal(
            "type", f"{event.type} is not accepted here; send {PartnerReferralAnswer.event_type}"
        )
    try:
        data = CATALOGUE.parse(event)
    except EventDataInvalid as exc:
        raise Refusal("data", f"data does not match {event.type}: {exc.reason}") from None
    except (UnknownEventType, UnknownEventVersion) as exc:
        raise Refusal("type", str(exc)) from None
    assert isinstance(data, PartnerReferralAnswer)
    if data.traeger != traeger:
        raise Refusal(
            "data.traeger", f"answer names Träger {data.traeger}, but you answer as {traeger}"
        )
    if event.source != data.partner_source():
        raise Refusal(
            "source",
            f"source {event.source} does not match Träger {data.traeger} "
            f"(expected {data.partner_source()})",
        )
    topic = topics.partner_responses(traeger)
    async with runtime.db.transaction() as session:
        claim = await inbox.claim(
            session, consumer=ANSWERS_CONSUMER, event=event, topic=topic, partition=-1, offset=-1
        )
        if claim is inbox.Claim.duplicate:
            return AnswerAccepted(id=event.id, status="duplicate", topic=topic)
        if claim is inbox.Claim.conflict:
            raise Conflict("id", f"{inbox.CONFLICTING_DUPLICATE}: this id was sent with other data")
        runtime.outbox.add_cloudevent(session, event, topic)
        audit.record(
            session,
            service=runtime.service,
            caller=caller,
            action=audit.AuditAction.create,
            case_id=data.case_id,
            purpose="referral answer over HTTP",
            path=ctx.path,
        )
    return AnswerAccepted(id=event.id, status="accepted", topic=topic)
