"""The annual report a committee receives: CSV of every cell of a year and a Stadtbezirk, and a
self-contained HTML document with tables and SVG charts (printable, no scripts, no external
files). Labels and descriptions come from the figures' declaration
(:mod:`lotse_contracts.figures`), as the dashboard's do.

Pure functions over published cells: the report can never show more than the reporting
stream does, suppressed cells included.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from lotse_contracts.events.referrals import ReferralStatus
from lotse_contracts.figures import DEFINITIONS, FIGURE_UNITS, FIGURES, KpiFigure, KpiUnit

from lotse_reporting.tables import KpiPublic

SUPPRESSED_MARK = "•"

STATUS_LABELS: dict[str, str] = {
    ReferralStatus.REQUESTED.value: "angefragt",
    ReferralStatus.RECEIVED.value: "eingegangen",
    ReferralStatus.ACCEPTED.value: "angenommen",
    ReferralStatus.REJECTED.value: "abgelehnt",
    ReferralStatus.IN_PROGRESS.value: "in Begleitung",
    ReferralStatus.COMPLETED.value: "abgeschlossen",
    ReferralStatus.CANCELLED.value: "storniert",
}

CONSENT_LABELS = {
    "scope:traeger_contact": "Einwilligung Weitergabe an Träger",
    "scope:screening_data_use": "Einwilligung Nutzung des Screenings",
}

MONTH_NAMES = ("Jan", "Feb", "Mär", "Apr", "Mai", "Jun", "Jul", "Aug", "Sep", "Okt", "Nov", "Dez")

#: The figures of the report's summary table: all, in the order they are declared.
SUMMARY = tuple(definition.figure for definition in FIGURES)
MONTHLY = (
    KpiFigure.FAMILIES_REGISTERED,
    KpiFigure.VISITS_COMPLETED,
    KpiFigure.REACH_RATE,
    KpiFigure.REFERRALS_REQUESTED,
    KpiFigure.ACCEPTANCE_RATE,
    KpiFigure.OPEN_ESCALATIONS,
)


def label(figure: KpiFigure, dimension: str | None = None) -> str:
    """German label of a figure (and breakdown)."""
    base = DEFINITIONS[figure].label
    if dimension is None:
        return base
    if dimension in CONSENT_LABELS:
        return CONSENT_LABELS[dimension]
    kind, _, value = dimension.partition(":")
    if kind == "status":
        return f"{base}: {STATUS_LABELS.get(value, value)}"
    return f"{base}: {value}"


def format_value(value: float | None, unit: KpiUnit, *, suppressed: bool = False) -> str:
    """A value as a German reader expects it (decimal comma, thousands dot)."""
    if suppressed or value is None:
        return SUPPRESSED_MARK
    match unit:
        case KpiUnit.COUNT:
            return f"{round(value):,}".replace(",", ".")
        case KpiUnit.PERCENT:
            return f"{value:.1f}".replace(".", ",") + " %"
        case KpiUnit.DAYS:
            return (f"{value:.1f}".replace(".", ",")).removesuffix(",0")
        case KpiUnit.PER_FAMILY:
            return f"{value:.2f}".replace(".", ",")


@dataclass(frozen=True)
class ReportContext:
    """What the report is about."""

    city: str
    year: int
    area: str
    area_name: str
    modules: Mapping[str, str]
    """Module slug → display name."""
    reach_reference: float | None
    """The reach rate the city reported (0…1), drawn as a reference line."""
    generated_at: datetime


CSV_COLUMNS = (
    "bezirk",
    "period",
    "figure",
    "dimension",
    "label",
    "value",
    "unit",
    "suppressed",
)


def annual_csv(cells: Sequence[KpiPublic]) -> str:
    """Every cell of the year and area: one row each, suppressed values left empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for cell in sorted(cells, key=_order):
        writer.writerow(
            [
                cell.bezirk,
                cell.period,
                cell.figure.value,
                cell.dimension or "",
                label(cell.figure, cell.dimension),
                "" if cell.value is None else _plain(cell.value),
                cell.unit.value,
                "true" if cell.suppressed else "false",
            ]
        )
    return out.getvalue()


def _plain(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _order(cell: KpiPublic) -> tuple[int, str, int, str]:
    return (
        0 if len(cell.period) == 4 else 1,
        cell.period,
        list(KpiFigure).index(cell.figure),
        cell.dimension or "",
    )


Cells = Mapping[tuple[str, str, str], KpiPublic]
"""(period, figure, dimension or "") → cell."""


def _index(cells: Sequence[KpiPublic]) -> Cells:
    return {(c.period, c.figure.value, c.dimension or ""): c for c in cells}


def _shown(cells: Cells, period: str, figure: KpiFigure, dimension: str = "") -> str:
    cell = cells.get((period, figure.value, dimension))
    if cell is None:
        return "–"
    return format_value(cell.value, cell.unit, suppressed=cell.suppressed)


# Over 60 lines: mostly the HTML document itself, one template read top to bottom.
def annual_html(
    context: ReportContext, cells: Sequence[KpiPublic], city_cells: Sequence[KpiPublic]
) -> str:
    """The annual report as one HTML document with inline SVG charts."""
    mine, city = _index(cells), _index(city_cells)
    year = str(context.year)
    months = sorted({c.period for c in cells if len(c.period) == 7})
    compare = context.area != "stadt"
    title = f"Jahresbericht {year} – {context.area_name}"
    parts: list[str] = [
        "<!doctype html>",
        '<html lang="de"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>",
        f"<p class='kicker'>Präventionskette {escape(context.city)} · Kennzahlen</p>",
        f"<h1>{escape(title)}</h1>",
        "<p class='sub'>Willkommensbesuche, Vermittlungen und Erreichung junger Familien. "
        f"Stand der Daten: {context.generated_at:%d.%m.%Y %H:%M} UTC.</p>",
        "</header>",
        "<section><h2>Kennzahlen des Jahres</h2>",
        "<table class='summary'><thead><tr><th>Kennzahl</th>",
        f"<th>{escape(context.area_name)}</th>",
        "<th>Stadt gesamt</th>" if compare else "",
        "</tr></thead><tbody>",
    ]
    for figure in SUMMARY:
        parts.append(
            f"<tr><th scope='row' title='{escape(DEFINITIONS[figure].description)}'>"
            f"{escape(label(figure))}</th>"
            f"<td data-cell='{escape(context.area)}/{year}/{figure.value}'>"
            f"{_shown(mine, year, figure)}</td>"
            + (f"<td>{_shown(city, year, figure)}</td>" if compare else "")
            + "</tr>"
        )
    parts.append("</tbody></table></section>")

    parts.append("<section><h2>Entwicklung im Jahresverlauf</h2><div class='charts'>")
    reference = None if context.reach_reference is None else 100 * context.reach_reference
    for figure, kind in (
        (KpiFigure.FAMILIES_REGISTERED, "bars"),
        (KpiFigure.VISITS_COMPLETED, "bars"),
        (KpiFigure.REACH_RATE, "line"),
        (KpiFigure.REFERRALS_REQUESTED, "bars"),
    ):
        series = [_series_value(mine, m, figure) for m in months]
        parts.append(
            "<figure>"
            + (
                line_chart(series, [_month_label(m) for m in months], reference=reference)
                if kind == "line"
                else bar_chart(series, [_month_label(m) for m in months])
            )
            + f"<figcaption>{escape(label(figure))}"
            + (" (in %)" if FIGURE_UNITS[figure] is KpiUnit.PERCENT else "")
            + "</figcaption></figure>"
        )
    parts.append("</div></section>")

    parts.append("<section><h2>Monatsübersicht</h2>")
    parts.append("<table class='monthly'><thead><tr><th>Monat</th>")
    parts.extend(f"<th>{escape(label(f))}</th>" for f in MONTHLY)
    parts.append("</tr></thead><tbody>")
    for month in months:
        parts.append(f"<tr><th scope='row'>{_month_label(month)} {month[:4]}</th>")
        parts.extend(f"<td>{_shown(mine, month, f)}</td>" for f in MONTHLY)
        parts.append("</tr>")
    parts.append("</tbody></table></section>")

    requested = KpiFigure.REFERRALS_REQUESTED
    parts.append("<section><h2>Vermittlungen nach Modul und Status</h2><div class='two'>")
    parts.append("<table><thead><tr><th>Modul</th><th>Vermittlungen</th></tr></thead><tbody>")
    for slug, name in context.modules.items():
        parts.append(
            f"<tr><th scope='row'>{escape(name)}</th>"
            f"<td>{_shown(mine, year, requested, f'module:{slug}')}</td></tr>"
        )
    parts.append("</tbody></table>")
    parts.append("<table><thead><tr><th>Status heute</th><th>Vermittlungen</th></tr></thead>")
    parts.append("<tbody>")
    for status, status_label in STATUS_LABELS.items():
        parts.append(
            f"<tr><th scope='row'>{escape(status_label)}</th>"
            f"<td>{_shown(mine, year, requested, f'status:{status}')}</td></tr>"
        )
    parts.append("</tbody></table></div>")
    parts.append("<table><thead><tr><th>Einwilligungen</th><th>Quote</th></tr></thead><tbody>")
    parts.append(
        f"<tr><th scope='row'>Willkommensbesuch</th>"
        f"<td>{_shown(mine, year, KpiFigure.CONSENT_RATE)}</td></tr>"
    )
    for dimension, consent_label in CONSENT_LABELS.items():
        parts.append(
            f"<tr><th scope='row'>{escape(consent_label)}</th>"
            f"<td>{_shown(mine, year, KpiFigure.CONSENT_RATE, dimension)}</td></tr>"
        )
    parts.append("</tbody></table></section>")

    parts.append("<section class='method'><h2>Methodik und Datenschutz</h2><dl>")
    for figure in SUMMARY:
        parts.append(
            f"<dt>{escape(label(figure))}</dt><dd>{escape(DEFINITIONS[figure].description)}</dd>"
        )
    parts.append(
        "</dl><p>Alle Zahlen sind anonymisierte Summen. Ein Feld, hinter dem weniger Familien "
        f"stehen als die Mindestfallzahl, wird mit „{SUPPRESSED_MARK}“ ausgewiesen; ebenso "
        "Felder, aus denen sich ein solches Feld über Summen (Stadt, Jahr, Kanal, Modul, "
        "Status) zurückrechnen ließe. Quoten werden nur gezeigt, wo ihre Basis gezeigt wird. "
        "Die Erreichungsquote bezieht sich auf die im jeweiligen Zeitraum registrierten "
        "Familien und kann sich durch spätere Besuche noch erhöhen.</p></section>"
    )
    parts.append("</body></html>")
    return "".join(parts)


def _series_value(cells: Cells, month: str, figure: KpiFigure) -> float | None:
    cell = cells.get((month, figure.value, ""))
    return None if cell is None or cell.suppressed else cell.value


def _month_label(month: str) -> str:
    return MONTH_NAMES[int(month[5:7]) - 1]


# --- SVG charts ------------------------------------------------------------------------------

_W, _H, _PAD_L, _PAD_B, _PAD_T = 360, 180, 40, 24, 12


def _scale(top: float) -> float:
    """A round upper bound for the axis: four grid steps of 1, 2, (2.5,) 5 × 10^n."""
    raw = max(top / 4, 1.0)
    magnitude = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 2.5, 5, 10) if magnitude >= 10 else (1, 2, 5, 10)  # whole-number ticks
    return float(4 * next(s * magnitude for s in steps if s * magnitude >= raw))


def _axis(top: float, unit: str = "") -> str:
    inner_h = _H - _PAD_B - _PAD_T
    out = []
    for i in range(5):
        value = top * i / 4
        y = _PAD_T + inner_h - inner_h * i / 4
        text = f"{value:g}".replace(".", ",") + unit
        out.append(
            f"<line x1='{_PAD_L}' x2='{_W}' y1='{y:.1f}' y2='{y:.1f}' class='grid'/>"
            f"<text x='{_PAD_L - 4}' y='{y + 4:.1f}' class='ytick'>{text}</text>"
        )
    return "".join(out)


def bar_chart(values: Sequence[float | None], labels: Sequence[str]) -> str:
    """Bars per month; a suppressed month is marked instead of drawn."""
    top = _scale(max((v for v in values if v is not None), default=0.0))
    inner_w, inner_h = _W - _PAD_L, _H - _PAD_B - _PAD_T
    slot = inner_w / max(len(values), 1)
    out = [f"<svg viewBox='0 0 {_W} {_H}' role='img' class='chart'>", _axis(top)]
    for i, (value, name) in enumerate(zip(values, labels, strict=True)):
        x = _PAD_L + i * slot
        if value is None:
            out.append(
                f"<text x='{x + slot / 2:.1f}' y='{_PAD_T + inner_h - 4:.1f}' "
                f"class='mark'>{SUPPRESSED_MARK}</text>"
            )
        else:
            h = inner_h * value / top
            out.append(
                f"<rect x='{x + slot * 0.15:.1f}' y='{_PAD_T + inner_h - h:.1f}' "
                f"width='{slot * 0.7:.1f}' height='{h:.1f}' class='bar'>"
                f"<title>{escape(name)}: {value:g}</title></rect>"
            )
        out.append(f"<text x='{x + slot / 2:.1f}' y='{_H - 6}' class='xtick'>{escape(name)}</text>")
    out.append("</svg>")
    return "".join(out)


def line_chart(
    values: Sequence[float | None], labels: Sequence[str], *, reference: float | None = None
) -> str:
    """A percentage line per month (0–100 %), broken where a month is suppressed, with an
    optional dashed reference line (the rate the city reported)."""
    inner_w, inner_h = _W - _PAD_L, _H - _PAD_B - _PAD_T
    slot = inner_w / max(len(values), 1)
    out = [f"<svg viewBox='0 0 {_W} {_H}' role='img' class='chart'>", _axis(100.0, " %")]

    def y(value: float) -> float:
        return _PAD_T + inner_h - inner_h * min(max(value, 0.0), 100.0) / 100.0

    if reference is not None:
        out.append(
            f"<line x1='{_PAD_L}' x2='{_W}' y1='{y(reference):.1f}' y2='{y(reference):.1f}' "
            f"class='reference'><title>Referenz {reference:g} %</title></line>"
        )
    segment: list[str] = []
    for i, (value, name) in enumerate(zip(values, labels, strict=True)):
        x = _PAD_L + i * slot + slot / 2
        if value is None:
            if len(segment) > 1:
                out.append(f"<polyline points='{' '.join(segment)}' class='line'/>")
            segment = []
            out.append(f"<text x='{x:.1f}' y='{_PAD_T + inner_h - 4:.1f}' class='mark'>•</text>")
        else:
            segment.append(f"{x:.1f},{y(value):.1f}")
            out.append(
                f"<circle cx='{x:.1f}' cy='{y(value):.1f}' r='3' class='dot'>"
                f"<title>{escape(name)}: {value:g} %</title></circle>"
            )
        out.append(f"<text x='{x:.1f}' y='{_H - 6}' class='xtick'>{escape(name)}</text>")
    if len(segment) > 1:
        out.append(f"<polyline points='{' '.join(segment)}' class='line'/>")
    out.append("</svg>")
    return "".join(out)


_CSS = """
body{font-family:"Source Sans 3","Segoe UI",Arial,sans-serif;color:#1d2733;margin:2rem auto;
max-width:60rem;padding:0 1rem;line-height:1.4}
header{border-bottom:3px solid #1f5a8a;margin-bottom:1.5rem}
.kicker{text-transform:uppercase;letter-spacing:.08em;color:#1f5a8a;font-size:.8rem;margin:0}
h1{margin:.2rem 0}.sub{color:#555;margin-top:0}
h2{color:#1f5a8a;border-bottom:1px solid #d5dde5;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;min-width:20rem}
th,td{padding:.25rem .6rem;border-bottom:1px solid #e3e8ee;text-align:left}
td{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#eef3f8}
.charts{display:grid;grid-template-columns:repeat(2,1fr);gap:1rem}
figure{margin:0}figcaption{font-size:.9rem;color:#333;text-align:center}
.chart{width:100%;height:auto}.grid{stroke:#e3e8ee}.bar{fill:#1f5a8a}
.line{fill:none;stroke:#1f5a8a;stroke-width:2}.dot{fill:#1f5a8a}
.reference{stroke:#c0392b;stroke-dasharray:4 3}
.ytick{font-size:9px;text-anchor:end;fill:#555}.xtick{font-size:9px;text-anchor:middle;fill:#555}
.mark{font-size:12px;text-anchor:middle;fill:#999}
.two{display:flex;gap:2rem;flex-wrap:wrap}
.monthly{font-size:.85rem;width:100%}.monthly th,.monthly td{padding:.25rem .4rem}
.method dt{font-weight:600;margin-top:.4rem}.method dd{margin-left:0;color:#444}
@media print{body{margin:0;max-width:none}section{break-inside:avoid}}
"""
