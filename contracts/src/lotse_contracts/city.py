"""Municipality configuration as data.

A city is a TOML file, not code: its Stadtbezirke (city districts) with their postcodes and
their Familienbüro (a district's family office), the offer modules the city runs and the
Träger (independent provider agencies) that deliver them. Dortmund and Hamm ship with this
package (``lotse_contracts/cities/*.toml``); a further city is loaded from an explicit path.

Everything is validated on load, and all problems of a file are reported at once so that
whoever maintains a city file can fix it in one pass.

Glossary (German terms are kept in field names because they are the names the city uses):

- *Stadtbezirk*: a city district with its own district council and Familienbüro.
- *Familienbüro*: the family office of one Stadtbezirk; its staff make the welcome visits.
- *Träger*: an independent provider agency (registered association, charity, gGmbH) that
  delivers offer modules on behalf of the city and receives referrals.
- *Bezirksteam*: the coordination team of one Stadtbezirk; it receives escalations.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from datetime import time
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

SLUG_PATTERN = r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$"
POSTCODE_PATTERN = r"^[0-9]{5}$"
#: A Träger serving every Stadtbezirk of its city lists this instead of Bezirk slugs.
ALL_BEZIRKE = "*"
#: Population shares are rounded in the files; this is how far their sum may miss 1.0.
SHARE_TOLERANCE = 0.01

_HHMM = re.compile(r"^(?:[01][0-9]|2[0-3]):[0-5][0-9]$")
_POSTCODE = re.compile(POSTCODE_PATTERN)
# IANA zone names only; resolving them needs tz data, which is checked lazily in zone().
_TZ_NAME = re.compile(r"^(?:UTC|[A-Z][A-Za-z_]+(?:/[A-Za-z0-9_+\-]+)+)$")


class CityConfigError(ValueError):
    """A city file is unreadable or invalid; ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"city configuration {source} is invalid:\n{lines}")


class UnknownCity(LookupError):
    """No packaged city of this name and no such file."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(
            f"unknown city {name!r}: packaged cities are {', '.join(available) or 'none'}; "
            "pass a path to a .toml file to load another city"
        )


class InvalidPostcode(ValueError):
    """The text is not a German postcode (five digits)."""

    def __init__(self, postcode: str) -> None:
        self.postcode = postcode
        super().__init__(f"postcode {postcode!r} is not five digits")


class PostcodeOutsideCity(LookupError):
    """A well-formed postcode that belongs to no Stadtbezirk of the city."""

    def __init__(self, postcode: str, city: str) -> None:
        self.postcode = postcode
        self.city = city
        super().__init__(
            f"postcode {postcode} is not in any Stadtbezirk of {city}; "
            "check the address or name the Stadtbezirk explicitly"
        )


class UnknownBezirk(LookupError):
    """No Stadtbezirk with this slug in the city."""

    def __init__(self, slug: str, city: str, known: list[str]) -> None:
        self.slug = slug
        self.city = city
        super().__init__(f"{city} has no Stadtbezirk {slug!r} (known: {', '.join(known)})")


class UnknownTraeger(LookupError):
    """No Träger with this slug in the city."""

    def __init__(self, slug: str, city: str, known: list[str]) -> None:
        self.slug = slug
        self.city = city
        super().__init__(f"{city} has no Träger {slug!r} (known: {', '.join(known)})")


class _Config(BaseModel):
    # Forbidding unknown keys turns a typo in a city file into an error instead of a
    # silently ignored setting.
    model_config = ConfigDict(frozen=True, extra="forbid")


class TimeWindow(_Config):
    """A recurring weekly time window, in the city's local time."""

    weekday: int = Field(ge=0, le=6, description="0 = Monday … 6 = Sunday, as date.weekday().")
    start: time = Field(description='Start, local time, written as "HH:MM".')
    end: time = Field(description='End (exclusive), local time, "HH:MM"; after start.')

    @field_validator("start", "end", mode="before")
    @classmethod
    def _hh_mm(cls, value: Any) -> Any:
        # Pydantic alone would also take "8:00:00.5" or ints; the files promise "HH:MM".
        if isinstance(value, str):
            if not _HHMM.match(value):
                raise ValueError(f"time {value!r} is not HH:MM (24-hour clock)")
            return time.fromisoformat(value)
        return value

    @model_validator(mode="after")
    def _end_after_start(self) -> TimeWindow:
        if self.end <= self.start:
            raise ValueError(
                f"ends at {self.end:%H:%M}, which is not after its start {self.start:%H:%M}"
            )
        return self

    @field_serializer("start", "end")
    def _dump_hh_mm(self, value: time) -> str:
        return value.strftime("%H:%M")

    def overlaps(self, other: TimeWindow) -> bool:
        """Whether both windows share a moment on the same weekday."""
        return self.weekday == other.weekday and self.start < other.end and other.start < self.end


def _check_no_overlap(windows: list[TimeWindow], what: str) -> list[TimeWindow]:
    for i, first in enumerate(windows):
        for second in windows[i + 1 :]:
            if first.overlaps(second):
                raise ValueError(
                    f"{what} overlap on weekday {first.weekday}: "
                    f"{first.start:%H:%M}–{first.end:%H:%M} and "
                    f"{second.start:%H:%M}–{second.end:%H:%M}"
                )
    return windows


class Familienbuero(_Config):
    """The family office of one Stadtbezirk: where families can come, and who visits them."""

    slug: str = Field(
        pattern=SLUG_PATTERN,
        description='Identifier used in visit events; defaults to "familienbuero-<bezirk>".',
    )
    name: str = Field(min_length=1, description='Display name, e.g. "Familienbüro Hörde".')
    contact: str | None = Field(
        default=None, description="Office contact (functional mailbox or phone), never a person."
    )
    office_hours: list[TimeWindow] = Field(
        default_factory=list,
        description="Open consultation hours for walk-in families (outside: by appointment).",
    )
    visit_hours: list[TimeWindow] = Field(
        min_length=1,
        description="Working times in which the visits service may schedule welcome visits.",
    )
    staff: int = Field(ge=1, description="Number of staff making welcome visits.")
    visit_minutes: int = Field(default=60, ge=15, le=480, description="Length of one visit.")
    travel_buffer_minutes: int = Field(
        default=30, ge=0, le=240, description="Travel time kept free between two visits."
    )

    @field_validator("office_hours")
    @classmethod
    def _office_hours_disjoint(cls, value: list[TimeWindow]) -> list[TimeWindow]:
        return _check_no_overlap(value, "office hours")

    @field_validator("visit_hours")
    @classmethod
    def _visit_hours_disjoint(cls, value: list[TimeWindow]) -> list[TimeWindow]:
        return _check_no_overlap(value, "visit hours")


class Stadtbezirk(_Config):
    """A city district: the unit that owns cases, a Familienbüro and a Bezirksteam."""

    slug: str = Field(
        pattern=SLUG_PATTERN,
        description='ASCII identifier used in topics and events, e.g. "luetgendortmund".',
    )
    name: str = Field(min_length=1, description='Display name, e.g. "Lütgendortmund".')
    postcodes: list[str] = Field(
        default_factory=list,
        description=(
            "Postcodes assigned to this Bezirk. A postcode spanning several Bezirke is assigned "
            "to its main Bezirk only; intake may override the derived Bezirk explicitly."
        ),
    )
    shared_postcodes: list[str] = Field(
        default_factory=list,
        description=(
            "Postcodes that partly lie in this Bezirk but are assigned to another one. They never "
            "decide the Bezirk; they tell intake forms when to suggest an override and let the "
            "simulator draw addresses for a Bezirk without a postcode of its own."
        ),
    )
    population_share: float = Field(
        gt=0, le=1, description="Share of the city's population (all shares sum to 1)."
    )
    familienbuero: Familienbuero = Field(description="The Bezirk's Familienbüro.")

    @field_validator("postcodes", "shared_postcodes")
    @classmethod
    def _postcodes_well_formed(cls, value: list[str]) -> list[str]:
        bad = [p for p in value if not _POSTCODE.match(p)]
        if bad:
            raise ValueError(f"malformed postcode(s) {', '.join(map(repr, bad))}: need 5 digits")
        dupes = sorted(p for p, n in Counter(value).items() if n > 1)
        if dupes:
            raise ValueError(f"postcode(s) listed twice: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _has_some_postcode(self) -> Stadtbezirk:
        if not self.postcodes and not self.shared_postcodes:
            raise ValueError("has neither postcodes nor shared_postcodes")
        overlap = sorted(set(self.postcodes) & set(self.shared_postcodes))
        if overlap:
            raise ValueError(f"postcode(s) both assigned and shared: {', '.join(overlap)}")
        return self


class OfferModule(_Config):
    """An offer module of the city's prevention chain, e.g. the Elternschule (parent school)."""

    slug: str = Field(pattern=SLUG_PATTERN, description='Identifier, e.g. "familienhebamme".')
    name: str = Field(min_length=1, description='Display name, e.g. "Familienhebamme".')
    description: str | None = Field(default=None, description="One sentence for staff.")


class Traeger(_Config):
    """A Träger (provider agency) and what it offers where."""

    slug: str = Field(pattern=SLUG_PATTERN, description="Identifier; names its partner topics.")
    name: str = Field(min_length=1, description="Registered name of the organisation.")
    modules: list[str] = Field(min_length=1, description="Slugs of the offer modules delivered.")
    bezirke: list[str] = Field(
        min_length=1,
        description=f'Slugs of the Stadtbezirke served, or ["{ALL_BEZIRKE}"] for all of them.',
    )
    capacity_per_month: int = Field(ge=0, description="New referrals it can take per month.")
    contact: str = Field(
        min_length=1,
        description="Organisation contact (functional mailbox or switchboard), never a person.",
    )

    @property
    def city_wide(self) -> bool:
        """Whether it serves every Stadtbezirk."""
        return ALL_BEZIRKE in self.bezirke

    def serves(self, bezirk_slug: str) -> bool:
        """Whether it takes families living in this Stadtbezirk."""
        return self.city_wide or bezirk_slug in self.bezirke

    def offers(self, module_slug: str) -> bool:
        """Whether it delivers this offer module."""
        return module_slug in self.modules


class _Problems(ValueError):
    """Several cross-reference problems of one city, kept apart for the error report."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Municipality(_Config):
    """One city's configuration: districts, family offices, offer modules and Träger."""

    slug: str = Field(pattern=SLUG_PATTERN, description='Identifier, e.g. "dortmund".')
    name: str = Field(min_length=1, description='Display name, e.g. "Dortmund".')
    state: str = Field(
        default="NW", pattern=r"^[A-Z]{2}$", description="Federal state code (NW = NRW)."
    )
    timezone: str = Field(
        default="Europe/Berlin", description="IANA time zone of office and visit hours."
    )
    welcome_visit_target_days: int = Field(
        default=14,
        ge=1,
        le=365,
        description="Days after registration by which the welcome visit should have happened.",
    )
    reach_rate_reported: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of families reached as the city last reported it (a baseline).",
    )
    modules: list[OfferModule] = Field(min_length=1, description="Offer modules of the city.")
    stadtbezirke: list[Stadtbezirk] = Field(min_length=1, description="The city's districts.")
    traeger: list[Traeger] = Field(default_factory=list, description="Provider agencies.")

    _by_postcode: dict[str, Stadtbezirk] = PrivateAttr(default_factory=dict)
    _by_bezirk: dict[str, Stadtbezirk] = PrivateAttr(default_factory=dict)
    _by_traeger: dict[str, Traeger] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _apply_familienbuero_defaults(cls, data: Any) -> Any:
        # Most cities run all offices alike; a defaults table keeps the files short and a
        # Bezirk only states where it differs. An office is named after its Bezirk (slug
        # and display name) unless the file says otherwise.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        defaults = data.pop("familienbuero_defaults", {})
        if not isinstance(defaults, dict):
            raise ValueError("familienbuero_defaults must be a table")
        bezirke = data.get("stadtbezirke")
        if isinstance(bezirke, list):
            merged: list[Any] = []
            for bezirk in bezirke:
                office = bezirk.get("familienbuero", {}) if isinstance(bezirk, dict) else None
                if isinstance(office, dict):
                    office = {**defaults, **office}
                    office.setdefault("name", f"Familienbüro {bezirk.get('name', '?')}")
                    office.setdefault("slug", f"familienbuero-{bezirk.get('slug', '')}")
                    bezirk = {**bezirk, "familienbuero": office}
                merged.append(bezirk)
            data["stadtbezirke"] = merged
        return data

    @field_validator("timezone")
    @classmethod
    def _timezone_name(cls, value: str) -> str:
        if not _TZ_NAME.match(value):
            raise ValueError(f"{value!r} is not an IANA time zone name such as Europe/Berlin")
        return value

    @model_validator(mode="after")
    def _cross_references(self) -> Municipality:
        problems: list[str] = []
        problems += _duplicates("Stadtbezirk", [b.slug for b in self.stadtbezirke])
        problems += _duplicates("Träger", [t.slug for t in self.traeger])
        problems += _duplicates("module", [m.slug for m in self.modules])
        problems += _duplicates("Familienbüro", [b.familienbuero.slug for b in self.stadtbezirke])

        owner: dict[str, str] = {}
        for bezirk in self.stadtbezirke:
            for postcode in bezirk.postcodes:
                if postcode in owner and owner[postcode] != bezirk.slug:
                    problems.append(
                        f"postcode {postcode} is in two Stadtbezirke: "
                        f"{owner[postcode]} and {bezirk.slug}"
                    )
                owner.setdefault(postcode, bezirk.slug)
        for bezirk in self.stadtbezirke:
            for postcode in bezirk.shared_postcodes:
                if postcode not in owner:
                    problems.append(
                        f"Stadtbezirk {bezirk.slug}: shared postcode {postcode} is not assigned "
                        "to any Stadtbezirk; list it under postcodes of its main Bezirk"
                    )

        total = sum(b.population_share for b in self.stadtbezirke)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            problems.append(f"population shares sum to {total:.3f}, not 1.0")

        bezirk_slugs = {b.slug for b in self.stadtbezirke}
        module_slugs = {m.slug for m in self.modules}
        for traeger in self.traeger:
            unknown_b = [b for b in traeger.bezirke if b != ALL_BEZIRKE and b not in bezirk_slugs]
            if unknown_b:
                problems.append(
                    f"Träger {traeger.slug}: unknown Stadtbezirk(e) {', '.join(unknown_b)}"
                )
            if traeger.city_wide and len(traeger.bezirke) > 1:
                problems.append(
                    f'Träger {traeger.slug}: "{ALL_BEZIRKE}" must be the only entry of bezirke'
                )
            unknown_m = [m for m in traeger.modules if m not in module_slugs]
            if unknown_m:
                problems.append(f"Träger {traeger.slug}: unknown module(s) {', '.join(unknown_m)}")
        if problems:
            raise _Problems(problems)

        self._by_postcode = {p: b for b in self.stadtbezirke for p in b.postcodes}
        self._by_bezirk = {b.slug: b for b in self.stadtbezirke}
        self._by_traeger = {t.slug: t for t in self.traeger}
        return self

    def zone(self) -> ZoneInfo:
        """The city's time zone (needs the system's or the tzdata package's zone data)."""
        return ZoneInfo(self.timezone)

    @property
    def bezirk_slugs(self) -> list[str]:
        """Slugs of all Stadtbezirke, in file order."""
        return [b.slug for b in self.stadtbezirke]

    @property
    def traeger_slugs(self) -> list[str]:
        """Slugs of all Träger, in file order."""
        return [t.slug for t in self.traeger]

    @property
    def module_slugs(self) -> list[str]:
        """Slugs of all offer modules, in file order."""
        return [m.slug for m in self.modules]

    def bezirk(self, slug: str) -> Stadtbezirk:
        """The Stadtbezirk with this slug; raises :class:`UnknownBezirk`."""
        try:
            return self._by_bezirk[slug]
        except KeyError:
            raise UnknownBezirk(slug, self.name, self.bezirk_slugs) from None

    def bezirk_for_postcode(self, postcode: str) -> Stadtbezirk:
        """The Stadtbezirk a postcode is assigned to.

        Raises :class:`InvalidPostcode` for text that is not five digits and
        :class:`PostcodeOutsideCity` for a postcode of another city.
        """
        normalised = postcode.strip()
        if not _POSTCODE.match(normalised):
            raise InvalidPostcode(postcode)
        try:
            return self._by_postcode[normalised]
        except KeyError:
            raise PostcodeOutsideCity(normalised, self.name) from None

    def traeger_by_slug(self, slug: str) -> Traeger:
        """The Träger with this slug; raises :class:`UnknownTraeger`."""
        try:
            return self._by_traeger[slug]
        except KeyError:
            raise UnknownTraeger(slug, self.name, self.traeger_slugs) from None

    def module(self, slug: str) -> OfferModule:
        """The offer module with this slug; raises ``LookupError``."""
        for module in self.modules:
            if module.slug == slug:
                return module
        raise LookupError(f"{self.name} has no offer module {slug!r}")

    def traeger_offering(self, module_slug: str, bezirk_slug: str) -> list[Traeger]:
        """Träger that deliver a module to families of a Stadtbezirk (the offer catalogue)."""
        self.bezirk(bezirk_slug)
        return [t for t in self.traeger if t.offers(module_slug) and t.serves(bezirk_slug)]


def _duplicates(what: str, slugs: list[str]) -> list[str]:
    return [f"duplicate {what} slug {s!r}" for s, n in Counter(slugs).items() if n > 1]


def available_cities() -> list[str]:
    """Names of the cities packaged with lotse_contracts."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in _cities_folder().iterdir()
        if entry.name.endswith(".toml")
    )


def _cities_folder() -> Traversable:
    # The folder holds data only, so it is addressed through its parent package rather
    # than made a package of its own.
    return resources.files("lotse_contracts").joinpath("cities")


def load_city(name_or_path: str) -> Municipality:
    """Load a packaged city by name (``"dortmund"``) or any city file by path.

    Anything containing a path separator or ending in ``.toml`` is read as a file, so a
    further city needs only a TOML file. Raises :class:`UnknownCity` for an unknown name and
    :class:`CityConfigError` (listing every problem) for an unreadable or invalid file.
    """
    if "/" in name_or_path or "\\" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CityConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from exc
        return parse_city(text, source=str(path))
    available = available_cities()
    if name_or_path not in available:
        raise UnknownCity(name_or_path, available)
    resource = _cities_folder().joinpath(f"{name_or_path}.toml")
    return parse_city(resource.read_text(encoding="utf-8"), source=f"{name_or_path} (packaged)")


def parse_city(text: str, *, source: str = "<string>") -> Municipality:
    """Validate a city given as TOML text; ``source`` names it in error messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CityConfigError(source, [f"not valid TOML: {exc}"]) from exc
    try:
        return Municipality.model_validate(raw)
    except ValidationError as exc:
        raise CityConfigError(source, describe_errors(exc, raw)) from None


def describe_errors(exc: ValidationError, raw: Any) -> list[str]:
    """One line per problem, with list positions named by slug where the input has one."""
    problems: list[str] = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        prefix = _location(err["loc"], raw)
        if isinstance(cause, _Problems):
            problems += [f"{prefix}: {p}" if prefix else p for p in cause.problems]
            continue
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{prefix}: {message}" if prefix else message)
    return problems


_LABEL_KEYS = ("slug", "name", "type", "kind")


def _location(loc: tuple[int | str, ...], raw: Any) -> str:
    parts: list[str] = []
    node = raw
    for step in loc:
        if isinstance(step, int):
            label = f"[{step}]"
            node = node[step] if isinstance(node, list) and step < len(node) else None
            if isinstance(node, dict):
                # Name list items the way their authors think of them, not by position.
                key = next((k for k in _LABEL_KEYS if isinstance(node.get(k), str)), None)
                if key:
                    label += f" ({node[key]})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + step)
            node = node.get(step) if isinstance(node, dict) else None
    return "".join(parts)
