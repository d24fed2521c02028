"""HTTP API of the delivery service: webhook subscriptions (shaped after the CloudEvents
Subscriptions API), their delivery log and redelivery, and referral answers over HTTP
(the CloudEvents HTTP binding). Each route hands its inputs to its use case in
operations.py; refusals are answered by the runtime (field and reason)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from lotse_runtime.app import ServiceRuntime, current_runtime
from lotse_runtime.identity import CallerDep

from lotse_delivery import operations
from lotse_delivery.operations import Context
from lotse_delivery.settings import DeliverySettings
from lotse_delivery.tables import (
    AnswerAccepted,
    AttemptPublic,
    RedeliverAccepted,
    RedeliverRequest,
    SecretRotated,
    SubscriptionChange,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPublic,
)

SubscriptionId = Annotated[str, Path(max_length=36, description="Id of the subscription.")]
TraegerSlug = Annotated[
    str, Path(max_length=64, pattern=r"^[a-z0-9]+(?:-[a-z0-9]+)*$", description="Your slug.")
]
DeliveryRuntimeDep = Annotated[ServiceRuntime[DeliverySettings], Depends(current_runtime)]

REFUSALS: dict[int | str, dict[str, object]] = {
    403: {"description": "Not permitted (also for unknown ids)."},
    422: {"description": "Refused; the reason names the field."},
}


async def context(request: Request, runtime: DeliveryRuntimeDep, caller: CallerDep) -> Context:
    route = request.scope.get("route")
    return Context(
        runtime=runtime,
        caller=caller,
        path=getattr(route, "path", request.url.path),
        box=request.app.state.secret_box,
        resolver=request.app.state.resolver,
    )


ContextDep = Annotated[Context, Depends(context)]

router = APIRouter(tags=["subscriptions"])


@router.post(
    "/subscriptions",
    response_model=SubscriptionCreated,
    status_code=201,
    summary="Subscribe a webhook to events of your audience (the secret is shown only now)",
    responses={**REFUSALS, 409: {"description": "Too many subscriptions."}},
)
async def create(ctx: ContextDep, body: SubscriptionCreate) -> SubscriptionCreated:
    return await operations.create_subscription(ctx, body)


@router.get("/subscriptions", response_model=list[SubscriptionPublic], summary="Your subscriptions")
async def list_all(ctx: ContextDep) -> list[SubscriptionPublic]:
    return await operations.list_subscriptions(ctx)


@router.get(
    "/subscriptions/{subscription_id}",
    response_model=SubscriptionPublic,
    summary="One of your subscriptions",
    responses=REFUSALS,
)
async def get_one(ctx: ContextDep, subscription_id: SubscriptionId) -> SubscriptionPublic:
    return await operations.get_subscription(ctx, subscription_id)


@router.patch(
    "/subscriptions/{subscription_id}",
    response_model=SubscriptionPublic,
    summary="Pause or resume (resuming delivers what waited, in order, with a fresh budget)",
    responses=REFUSALS,
)
async def change(
    ctx: ContextDep, subscription_id: SubscriptionId, body: SubscriptionChange
) -> SubscriptionPublic:
    return await operations.change_subscription(ctx, subscription_id, body)


@router.delete(
    "/subscriptions/{subscription_id}",
    status_code=204,
    summary="Delete a subscription and what waits for it",
    responses=REFUSALS,
)
async def remove(ctx: ContextDep, subscription_id: SubscriptionId) -> Response:
    await operations.delete_subscription(ctx, subscription_id)
    return Response(status_code=204)


@router.post(
    "/subscriptions/{subscription_id}/secret",
    response_model=SecretRotated,
    summary="Rotate the signing secret (the old one signs too for a grace period)",
    responses=REFUSALS,
)
async def rotate(ctx: ContextDep, subscription_id: SubscriptionId) -> SecretRotated:
    return await operations.rotate_secret(ctx, subscription_id)


@router.get(
    "/subscriptions/{subscription_id}/deliveries",
    response_model=list[AttemptPublic],
    summary="Delivery log: attempts, status codes, latency (no payload), newest first",
    responses=REFUSALS,
)
async def deliveries(
    ctx: ContextDep,
    subscription_id: SubscriptionId,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AttemptPublic]:
    return await operations.delivery_log(ctx, subscription_id, limit)


@router.post(
    "/subscriptions/{subscription_id}/redeliver",
    response_model=RedeliverAccepted,
    status_code=202,
    summary="Deliver again the kept events since a moment, in their order, same ids",
    responses=REFUSALS,
)
async def redeliver(
    ctx: ContextDep, subscription_id: SubscriptionId, body: RedeliverRequest
) -> RedeliverAccepted:
    return await operations.redeliver(ctx, subscription_id, body.since)


ANSWER_BODY = {
    "requestBody": {
        "required": True,
        "description": "A de.lotse.partner.referral-answer.v1 CloudEvent in the HTTP binding: "
        "binary mode (ce-* headers, JSON data as body, content-type application/json) or "
        "structured mode (content-type application/cloudevents+json).",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/cloudevents+json": {"schema": {"type": "object"}},
        },
    }
}


@router.post(
    "/traeger/{traeger}/answers",
    response_model=AnswerAccepted,
    status_code=202,
    tags=["answers"],
    summary="Answer a referral over HTTP (as on lotse.partner.<slug>.responses)",
    responses={**REFUSALS, 409: {"description": "This id was sent before with other data."}},
    openapi_extra=ANSWER_BODY,
)
async def answer(ctx: ContextDep, request: Request, traeger: TraegerSlug) -> AnswerAccepted:
    return await operations.accept_answer(ctx, traeger, dict(request.headers), await request.body())


# -- what Lotse sends: the webhook itself (OpenAPI "webhooks", for receivers) -------------------


def _header(name: str, description: str, *, required: bool = True) -> dict[str, object]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "schema": {"type": "string"},
        "description": description,
    }


WEBHOOK_HEADERS = [
    _header(
        "webhook-id",
        "The CloudEvent id; the same on every retry and redelivery: deduplicate by it.",
    ),
    _header("webhook-timestamp", "Seconds since the epoch when this attempt was signed."),
    _header(
        "webhook-signature",
        "Standard Webhooks: 'v1,' and base64 HMAC-SHA256 of '<webhook-id>.<webhook-timestamp>."
        "<body>' under the secret after 'whsec_' (base64); during a rotation's grace period "
        "two, separated by a space: one must match.",
    ),
    _header(
        "ce-specversion",
        "1.0 (binary mode only; structured mode has it in the body).",
        required=False,
    ),
    _header("ce-id", "CloudEvent id (binary mode).", required=False),
    _header("ce-source", "/lotse/<service> (binary mode).", required=False),
    _header(
        "ce-type", "e.g. de.lotse.referrals.referral-requested.v1 (binary mode).", required=False
    ),
    _header("ce-subject", "The pseudonymous case id: the order key (binary mode).", required=False),
    _header("ce-time", "When it happened, RFC 3339 (binary mode).", required=False),
    _header(
        "ce-dataschema",
        "The type's JSON Schema, where the projection keeps every field it requires (binary mode).",
        required=False,
    ),
    _header(
        "ce-bezirk", "Stadtbezirk slug, where the event has one (binary mode).", required=False
    ),
    _header("ce-traeger", "Träger slug, where the event has one (binary mode).", required=False),
]

WEBHOOK = {
    "parameters": WEBHOOK_HEADERS,
    "requestBody": {
        "required": True,
        "description": "One event of your subscription, projected by the subscription registry "
        "for your audience (only the fields it allows; the type's full JSON Schema is "
        "contracts/schemas/<type>.json, fields beyond your projection absent).",
        "content": {
            "application/json": {
                "schema": {"type": "object", "description": "Binary mode: the event's data."}
            },
            "application/cloudevents+json": {
                "schema": {
                    "type": "object",
                    "required": ["specversion", "id", "source", "type", "data"],
                    "description": "Structured mode: the whole CloudEvent (attributes and "
                    "data) in one JSON document.",
                }
            },
        },
    },
    "responses": {
        "2XX": {"description": "Stored: delivered. Answer only after you stored the event."},
        "default": {
            "description": "Anything else, or no answer within 10 s: tried again later with "
            "exponential backoff and jitter (Retry-After honoured), in the same order; after "
            "the failure budget the subscription is paused."
        },
    },
}


def document_webhooks(app: FastAPI) -> None:
    """Describe in the OpenAPI document what the delivery service posts to a sink."""

    @app.webhooks.post(
        "lotse-event",
        summary="An event of your subscription (signed CloudEvent over HTTP)",
        openapi_extra=WEBHOOK,
        tags=["subscriptions"],
    )
    def lotse_event() -> None:
        """Posted to your subscription's sink for every event, in order per case, at least
        once: deduplicate by ``webhook-id``. Verify the signature first."""
