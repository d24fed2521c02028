// Lotse reporting dashboard: loads the published figures of one year, renders cards, the
// overview of the Stadtbezirke and monthly trend charts, and applies every newly published
// figure as it arrives over server-sent events. No build step, no libraries.
"use strict";

const CARDS = [
  "families_registered", "families_registered_clinic", "families_registered_move_in",
  "consent_rate", "visits_offered", "visits_completed", "visits_declined", "visits_missed",
  "reach_rate", "median_days_birth_to_visit", "referrals_requested", "referrals_accepted",
  "acceptance_rate", "median_days_to_warm_handover", "open_escalations", "contacts_per_family",
];
const OVERVIEW = [
  "families_registered", "visits_completed", "reach_rate", "median_days_birth_to_visit",
  "referrals_requested", "acceptance_rate", "open_escalations",
];
const TRENDS = [
  ["families_registered", "bars"], ["visits_completed", "bars"],
  ["reach_rate", "line"], ["referrals_requested", "bars"],
];
const MONTHS = ["Jan", "Feb", "Mär", "Apr", "Mai", "Jun", "Jul", "Aug", "Sep", "Okt", "Nov", "Dez"];
const SUPPRESSED = "•";

const state = {
  meta: null, year: null, years: [], area: null, period: null,
  cells: new Map(), revision: 0, source: null,
};
const params = new URLSearchParams(location.search);

function key(area, period, figure, dimension) {
  return `${area}/${period}/${figure}` + (dimension ? `/${dimension}` : "");
}

function cell(area, period, figure) {
  return state.cells.get(key(area, period, figure));
}

function format(c, figure) {
  if (!c) return "–";
  if (c.s || c.v === null) return SUPPRESSED;
  const unit = state.meta.figures[figure].unit;
  const de = (digits) => new Intl.NumberFormat("de-DE", {
    minimumFractionDigits: digits, maximumFractionDigits: digits,
  }).format(c.v);
  if (unit === "count") return de(0);
  if (unit === "percent") return de(1);
  if (unit === "per_family") return de(2);
  return new Intl.NumberFormat("de-DE", {maximumFractionDigits: 1}).format(c.v);
}

function unitText(figure) {
  return {percent: "%", days: "Tage", per_family: "je Familie", count: ""}[
    state.meta.figures[figure].unit];
}

function periods() {
  const months = new Set();
  for (const k of state.cells.keys()) {
    const period = k.split("/")[1];
    if (period.length === 7 && period.startsWith(String(state.year))) months.add(period);
  }
  return [...months].sort();
}

function periodName(period) {
  if (period.length === 4) return `Gesamtjahr ${period}`;
  return `${MONTHS[Number(period.slice(5, 7)) - 1]} ${period.slice(0, 4)}`;
}

function areaName(slug) {
  const found = state.meta.areas.find((a) => a.slug === slug);
  return found ? found.name : slug;
}

function fill(select, options, selected) {
  select.innerHTML = "";
  for (const [value, text] of options) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    option.selected = String(value) === String(selected);
    select.appendChild(option);
  }
}

function renderControls() {
  fill(document.getElementById("area"), state.meta.areas.map((a) => [a.slug, a.name]), state.area);
  fill(document.getElementById("year"), state.years.map((y) => [y, y]), state.year);
  const months = periods();
  if (!state.period || (!months.includes(state.period) && state.period !== String(state.year))) {
    state.period = months.length ? months[months.length - 1] : String(state.year);
  }
  fill(document.getElementById("period"),
    [...months.map((m) => [m, periodName(m)]), [String(state.year), periodName(String(state.year))]],
    state.period);
  const query = `?bezirk=${encodeURIComponent(state.area)}`;
  document.getElementById("report-html").href = `/dashboard/annual/${state.year}.html${query}`;
  document.getElementById("report-csv").href = `/dashboard/annual/${state.year}.csv${query}`;
}

function renderCards() {
  const box = document.getElementById("cards");
  document.getElementById("cards-title").textContent =
    `${areaName(state.area)} · ${periodName(state.period)}`;
  box.innerHTML = "";
  for (const figure of CARDS) {
    const c = cell(state.area, state.period, figure);
    const card = document.createElement("div");
    card.className = "card";
    card.title = state.meta.figures[figure].description;
    const value = format(c, figure);
    card.innerHTML = `<div class="label"></div><span class="v"></span><span class="u"></span>`;
    card.querySelector(".label").textContent = state.meta.figures[figure].label;
    const v = card.querySelector(".v");
    v.textContent = value;
    v.dataset.cell = key(state.area, state.period, figure);
    card.querySelector(".u").textContent = value === SUPPRESSED || value === "–" ? "" : unitText(figure);
    box.appendChild(card);
  }
}

function heat(c) {
  if (!c || c.s || c.v === null) return "";
  const t = Math.max(0, Math.min(1, (c.v - 50) / 50));  // 50 % pale … 100 % strong
  return `background: rgba(31, 90, 138, ${0.08 + 0.32 * t})`;
}

function renderOverview() {
  const table = document.getElementById("overview");
  document.getElementById("overview-title").textContent =
    `Die Stadtbezirke im Überblick · ${periodName(state.period)}`;
  table.tHead.innerHTML = "<tr><th>Stadtbezirk</th>" +
    OVERVIEW.map((f) => `<th>${state.meta.figures[f].label}</th>`).join("") + "</tr>";
  const body = table.tBodies[0];
  body.innerHTML = "";
  for (const area of state.meta.areas) {
    const row = document.createElement("tr");
    row.dataset.area = area.slug;
    if (area.slug === "stadt") row.classList.add("total");
    if (area.slug === state.area) row.classList.add("selected");
    const name = document.createElement("td");
    name.textContent = area.name;
    row.appendChild(name);
    for (const figure of OVERVIEW) {
      const c = cell(area.slug, state.period, figure);
      const td = document.createElement("td");
      td.textContent = format(c, figure);
      td.dataset.cell = key(area.slug, state.period, figure);
      if (figure === "reach_rate") td.setAttribute("style", heat(c));
      row.appendChild(td);
    }
    row.addEventListener("click", () => { state.area = area.slug; render(); });
    body.appendChild(row);
  }
}

function svg(tag, attrs, text) {
  const parts = Object.entries(attrs).map(([k, v]) => `${k}="${v}"`).join(" ");
  return `<${tag} ${parts}>${text || ""}</${tag}>`;
}

function chart(values, labels, kind, reference) {
  const W = 360, H = 170, L = 38, B = 22, T = 10, iw = W - L, ih = H - B - T;
  const known = values.filter((v) => v !== null);
  // Four grid steps of 1, 2, (2.5,) 5 × 10^n: whole numbers for counts.
  let top = 100;
  if (kind !== "line") {
    const raw = Math.max(1, Math.max(0, ...known) / 4);
    const m = 10 ** Math.floor(Math.log10(raw));
    const steps = m >= 10 ? [1, 2, 2.5, 5, 10] : [1, 2, 5, 10];
    top = 4 * steps.map((s) => s * m).find((s) => s >= raw);
  }
  const y = (v) => T + ih - ih * Math.min(Math.max(v, 0), top) / top;
  const slot = iw / Math.max(values.length, 1);
  let out = "";
  for (let i = 0; i <= 4; i++) {
    const v = top * i / 4, yy = y(v).toFixed(1);
    out += svg("line", {x1: L, x2: W, y1: yy, y2: yy, class: "grid"});
    out += svg("text", {x: L - 4, y: (Number(yy) + 3).toFixed(1), class: "tick ytick"},
      new Intl.NumberFormat("de-DE").format(v) + (kind === "line" ? " %" : ""));
  }
  if (reference !== null && kind === "line") {
    out += svg("line", {x1: L, x2: W, y1: y(reference).toFixed(1), y2: y(reference).toFixed(1),
      class: "ref"}, `<title>Referenz ${reference} %</title>`);
  }
  let segment = [];
  const flush = () => {
    if (segment.length > 1) out += svg("polyline", {points: segment.join(" "), class: "line"});
    segment = [];
  };
  values.forEach((v, i) => {
    const x = L + i * slot;
    if (v === null) {
      flush();
      out += svg("text", {x: (x + slot / 2).toFixed(1), y: T + ih - 3, class: "mark"}, SUPPRESSED);
    } else if (kind === "line") {
      const p = `${(x + slot / 2).toFixed(1)},${y(v).toFixed(1)}`;
      segment.push(p);
      out += svg("circle", {cx: (x + slot / 2).toFixed(1), cy: y(v).toFixed(1), r: 3, class: "pt"},
        `<title>${labels[i]}: ${v} %</title>`);
    } else {
      out += svg("rect", {x: (x + slot * 0.15).toFixed(1), y: y(v).toFixed(1),
        width: (slot * 0.7).toFixed(1), height: (T + ih - y(v)).toFixed(1), class: "bar"},
        `<title>${labels[i]}: ${v}</title>`);
    }
    out += svg("text", {x: (x + slot / 2).toFixed(1), y: H - 6, class: "tick xtick"}, labels[i]);
  });
  flush();
  return `<svg viewBox="0 0 ${W} ${H}" role="img">${out}</svg>`;
}

function renderTrends() {
  const box = document.getElementById("trends");
  document.getElementById("trends-title").textContent =
    `Monatlicher Verlauf ${state.year} · ${areaName(state.area)}`;
  const months = periods();
  const labels = months.map((m) => MONTHS[Number(m.slice(5, 7)) - 1]);
  box.innerHTML = "";
  for (const [figure, kind] of TRENDS) {
    const values = months.map((m) => {
      const c = cell(state.area, m, figure);
      return !c || c.s || c.v === null ? null : c.v;
    });
    const figureBox = document.createElement("figure");
    figureBox.dataset.chart = figure;
    figureBox.innerHTML = chart(values, labels, kind, state.meta.reachReference) +
      `<figcaption>${state.meta.figures[figure].label}</figcaption>`;
    box.appendChild(figureBox);
  }
}

function render() {
  if (!state.meta || state.year === null) return;
  renderControls();
  renderCards();
  renderOverview();
  renderTrends();
}

function flash(keys) {
  for (const k of keys) {
    for (const element of document.querySelectorAll(`[data-cell="${k}"]`)) {
      const target = element.closest(".card") || element;
      target.classList.add("changed");
      setTimeout(() => target.classList.remove("changed"), 1500);
    }
  }
}

async function load(year) {
  const query = year ? `?year=${year}` : "";
  const response = await fetch(`/dashboard/data${query}`, {headers: {Accept: "application/json"}});
  if (!response.ok) throw new Error(`dashboard data: HTTP ${response.status}`);
  const data = await response.json();
  state.meta = data;
  state.years = data.years;
  state.year = data.year;
  state.revision = Math.max(state.revision, data.revision);
  state.cells = new Map(data.cells.map((c) => [key(c.b, c.p, c.f, c.d), c]));
  if (!state.area) {
    const wanted = params.get("bezirk");
    state.area = data.areas.some((a) => a.slug === wanted) ? wanted : "stadt";
  }
  document.getElementById("city").textContent = data.city;
  document.getElementById("note").textContent =
    `Alle Zahlen sind anonymisierte Summen. „${SUPPRESSED}“: weniger als ${data.k} Familien ` +
    "oder zurückrechenbar, daher unterdrückt. Quoten zu Registrierungen beziehen sich auf die " +
    "im Zeitraum registrierten Familien.";
  if (state.year === null) {
    document.getElementById("cards").innerHTML =
      '<p class="empty">Noch keine Kennzahlen veröffentlicht.</p>';
  }
  render();
}

function live(on, text) {
  document.getElementById("live-dot").className = on ? "dot on" : "dot";
  document.getElementById("live-text").textContent = text;
}

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource(`/dashboard/stream?after=${state.revision}`);
  state.source = source;
  source.onopen = () => live(true, "live");
  source.onerror = () => live(false, "Verbindung unterbrochen, verbinde neu …");
  source.addEventListener("kpis", async (event) => {
    const message = JSON.parse(event.data);
    state.revision = Math.max(state.revision, message.revision);
    const newYear = message.cells.some((c) => !state.years.includes(Number(c.p.slice(0, 4))));
    if (state.year === null || newYear) {
      await load(params.get("year") || null);
    } else {
      const changed = [];
      for (const c of message.cells) {
        if (c.p.startsWith(String(state.year))) {
          const k = key(c.b, c.p, c.f, c.d);
          state.cells.set(k, c);
          changed.push(k);
        }
      }
      render();
      flash(changed);
    }
    live(true, `live · aktualisiert ${new Date().toLocaleTimeString("de-DE")}`);
  });
}

document.getElementById("area").addEventListener("change", (e) => {
  state.area = e.target.value; render();
});
document.getElementById("period").addEventListener("change", (e) => {
  state.period = e.target.value; render();
});
document.getElementById("year").addEventListener("change", async (e) => {
  state.period = null;
  await load(e.target.value);
});

state.period = params.get("period");
load(params.get("year") || (state.period ? state.period.slice(0, 4) : null))
  .then(connect)
  .catch((error) => live(false, `Fehler: ${error.message}`));
