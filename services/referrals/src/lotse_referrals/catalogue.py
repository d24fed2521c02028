"""The offer catalogue's use cases: which Träger offers which module in which Stadtbezirk,
with capacity and this month's load; seeding it from the city configuration, reading,
changing and suggesting entries, and locking a Träger's places while a referral is made.

Each use case works in a transaction of its own (``ctx.db``) and knows nothing of HTTP: a
refusal is a :class:`~lotse_runtime.refusal.Refusal`, a caller without the right an
:class:`~lotse_runtime.identity.AccessDenied`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lotse_contracts.city import Municipality
from lotse_contracts.events.referrals import ReferralStatus
from lotse_runtime.identity import AccessDenied, Caller, Role
from lotse_runtime.refusal import Refusal
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_referrals import domain
from lotse_referrals.context import Context
from lotse_referrals.domain import Offer
from lotse_referrals.tables import CatalogueTraeger, Referral

#: A catalogue entry with the places it holds this month.
Listing = tuple[CatalogueTraeger, int]


# --- reading the catalogue ----------------------------------------------------------------


async def usage_this_month(session: AsyncSession, ctx: Context, now: datetime) -> dict[str, int]:
    """Referrals per Träger requested this month (city time) that hold a place: all but the
    rejected and the cancelled ones."""
    query = (
        select(col(Referral.traeger), func.count())
        .where(col(Referral.requested_at) >= ctx.month_start_utc(now))
        .where(
            col(Referral.status).not_in(
                [ReferralStatus.REJECTED.value, ReferralStatus.CANCELLED.value]
            )
        )
        .group_by(Referral.traeger)
    )
    return {slug: int(n) for slug, n in (await session.execute(query)).all()}


def offer_of(row: CatalogueTraeger, used: int) -> Offer:
    return Offer(
        traeger=row.slug,
        name=row.name,
        modules=tuple(row.modules),
        bezirke=tuple(row.bezirke),
        capacity_per_month=row.capacity_per_month,
        used_this_month=used,
        active=row.active,
    )


async def load_offers(session: AsyncSession, ctx: Context, now: datetime) -> dict[str, Offer]:
    used = await usage_this_month(session, ctx, now)
    rows = (
        await session.execute(select(CatalogueTraeger).execution_options(populate_existing=True))
    ).scalars()
    return {r.slug: offer_of(r, used.get(r.slug, 0)) for r in rows}


async def _listings(session: AsyncSession, ctx: Context, now: datetime) -> list[Listing]:
    used = await usage_this_month(session, ctx, now)
    rows = (
        await session.execute(select(CatalogueTraeger).order_by(col(CatalogueTraeger.slug)))
    ).scalars()
    return [(row, used.get(row.slug, 0)) for row in rows]


async def list_traeger(ctx: Context, *, module: str | None, bezirk: str | None) -> list[Listing]:
    """Every Träger of the catalogue (offering ``module``, serving ``bezirk``), by slug."""
    async with ctx.db.transaction() as session:
        listings = await _listings(session, ctx, ctx.clock())
    return [
        (row, used)
        for row, used in listings
        if (module is None or offer_of(row, used).offers(module))
        and (bezirk is None or offer_of(row, used).serves(bezirk))
    ]


async def _entry(session: AsyncSession, slug: str) -> CatalogueTraeger:
    row = await session.get(CatalogueTraeger, slug)
    if row is None:
        raise Refusal("slug", f"no Träger {slug} in the catalogue", status=404)
    return row


async def get_traeger(ctx: Context, slug: str) -> Listing:
    async with ctx.db.transaction() as session:
        row = await _entry(session, slug)
        used = await usage_this_month(session, ctx, ctx.clock())
    return row, used.get(slug, 0)


async def suggest_traeger(ctx: Context, *, bezirk: str, module: str) -> list[Listing]:
    """Träger offering ``module`` in ``bezirk``, free capacity first (domain.suggest)."""
    if bezirk not in ctx.city.bezirk_slugs:
        raise Refusal("bezirk", f"unknown Stadtbezirk {bezirk}")
    if module not in ctx.city.module_slugs:
        raise Refusal("module", f"unknown module {module}")
    async with ctx.db.transaction() as session:
        rows = {row.slug: (row, used) for row, used in await _listings(session, ctx, ctx.clock())}
    offers = [offer_of(row, used) for row, used in rows.values()]
    return [rows[o.traeger] for o in domain.suggest(offers, bezirk=bezirk, module=module)]


# --- changing the catalogue ---------------------------------------------------------------


def _check_change(caller: Caller, slug: str, changes: dict[str, Any], city: Municipality) -> None:
    """Who may change what (a Träger its own entry's contact, capacity and activity;
    coordination everything), and that named modules and Bezirke exist."""
    if caller.role is not Role.koordination:
        # The policy admits Träger and coordination only; a Träger edits its own entry.
        if caller.role is not Role.traeger or caller.traeger != slug:
            raise AccessDenied("a Träger may change only its own entry")
        if {"modules", "bezirke", "name"} & {k for k, v in changes.items() if v is not None}:
            raise AccessDenied("a Träger may change only contact, capacity and activity")
    modules = changes.get("modules")
    if modules is not None:
        unknown = [m for m in modules if m not in city.module_slugs]
        if unknown:
            raise Refusal("modules", f"unknown module(s) {', '.join(unknown)}")
    bezirke = changes.get("bezirke")
    if bezirke is not None and bezirke != ["*"]:
        unknown = [b for b in bezirke if b not in city.bezirk_slugs]
        if unknown:
            raise Refusal(
                "bezirke", f'unknown Stadtbezirk(e) {", ".join(unknown)}; use ["*"] for all'
            )


async def update_traeger(
    ctx: Context, caller: Caller, slug: str, changes: dict[str, Any]
) -> Listing:
    """Change a catalogue entry (fields given and not None); it is kept over restarts."""
    _check_change(caller, slug, changes, ctx.city)
    now = ctx.clock()
    async with ctx.db.transaction() as session:
        row = await _entry(session, slug)
        for key, value in changes.items():
            if value is not None:
                setattr(row, key, value)
        row.edited = True
        row.updated_at = now
        session.add(row)
        used = await usage_this_month(session, ctx, now)
    return row, used.get(slug, 0)


async def seed_catalogue(ctx: Context, now: datetime) -> int:
    """Bring the catalogue tables in line with the city configuration: new Träger are added,
    unedited ones follow the file, ones edited through the API keep their edits."""
    try:
        return await _seed_catalogue(ctx, now)
    except IntegrityError:
        # Another replica seeded the same rows at the same moment; its rows are as good.
        return await _seed_catalogue(ctx, now)


async def _seed_catalogue(ctx: Context, now: datetime) -> int:
    changed = 0
    async with ctx.db.transaction() as session:
        rows = {r.slug: r for r in (await session.execute(select(CatalogueTraeger))).scalars()}
        # In slug order, the order in which new referrals lock Träger rows (no deadlock).
        for traeger in sorted(ctx.city.traeger, key=lambda t: t.slug):
            row = rows.get(traeger.slug)
            if row is not None and row.edited:
                continue
            wanted: dict[str, Any] = {
                "name": traeger.name,
                "contact": traeger.contact,
                "modules": list(traeger.modules),
                "bezirke": list(traeger.bezirke),
                "capacity_per_month": traeger.capacity_per_month,
            }
            if row is None:
                session.add(CatalogueTraeger(slug=traeger.slug, **wanted, updated_at=now))
                changed += 1
            elif any(getattr(row, k) != v for k, v in wanted.items()):
                for key, value in wanted.items():
                    setattr(row, key, value)
                row.updated_at = now
                changed += 1
    return changed


# --- the places of a new referral ---------------------------------------------------------


async def lock_places(
    session: AsyncSession, *, traeger: str | None, module: str, bezirk: str
) -> list[str]:
    """Lock the catalogue rows of the Träger a new referral may go to (``traeger``, or every
    Träger offering ``module`` in ``bezirk``), in slug order, until the transaction ends.

    Whoever creates a referral holds these locks while it counts the places taken and
    inserts, so two requests for the last place of a Träger run one after the other and the
    second counts the first's referral (PostgreSQL, ``SELECT ... FOR UPDATE``; a statement
    after the lock sees everything committed before it). SQLite's transactions hold the
    database's write lock from their start, so nothing is needed there."""
    if traeger is not None:
        slugs = [traeger]
    else:
        rows = (await session.execute(select(CatalogueTraeger))).scalars()
        slugs = sorted(
            r.slug for r in rows if offer_of(r, 0).offers(module) and offer_of(r, 0).serves(bezirk)
        )
    if not slugs:
        return []
    locked = await session.execute(
        select(col(CatalogueTraeger.slug))
        .where(col(CatalogueTraeger.slug).in_(slugs))
        .order_by(col(CatalogueTraeger.slug))
        .with_for_update()
    )
    return list(locked.scalars())
