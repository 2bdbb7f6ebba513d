// The dashboard's one script: live counts and the throughput chart, redrawn from /api/summary
// without reloading the page; and the "tick all" box of the dead list and of a search. No
// inline script anywhere (the Content-Security-Policy forbids it). The summary holds numbers
// only, and everything is written with textContent, never as HTML.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const SERIES = ["published", "retried", "dead"];
  const WIDTH = 720;
  const HEIGHT = 200;
  const LEFT = 44;
  const RIGHT = 8;
  const TOP = 10;
  const BOTTOM = 22;

  function node(name, attributes, parent) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    parent.appendChild(element);
    return element;
  }

  function label(parent, x, y, text, anchor) {
    node("text", { x, y, "text-anchor": anchor, class: "axis-label" }, parent).textContent = text;
  }

  function drawChart(chart, buckets) {
    chart.replaceChildren();
    const plotWidth = WIDTH - LEFT - RIGHT;
    const plotHeight = HEIGHT - TOP - BOTTOM;
    const totals = { published: 0, retried: 0, dead: 0 };
    let peak = 1;
    for (const bucket of buckets) {
      let sum = 0;
      for (const series of SERIES) {
        totals[series] += bucket[series];
        sum += bucket[series];
      }
      peak = Math.max(peak, sum);
    }
    const baseline = TOP + plotHeight;
    node("line", { x1: LEFT, y1: baseline, x2: WIDTH - RIGHT, y2: baseline, class: "axis" }, chart);
    node("line", { x1: LEFT, y1: TOP, x2: WIDTH - RIGHT, y2: TOP, class: "grid" }, chart);
    label(chart, LEFT - 6, TOP + 4, String(peak), "end");
    label(chart, LEFT - 6, baseline, "0", "end");
    const slot = plotWidth / Math.max(1, buckets.length);
    buckets.forEach((bucket, index) => {
      const group = node("g", { class: "bucket", "data-start": bucket.start }, chart);
      let top = baseline;
      for (const series of SERIES) {
        if (bucket[series] === 0) continue;
        const height = Math.max(1, (bucket[series] / peak) * plotHeight);
        top -= height;
        node("rect", {
          class: series,
          x: (LEFT + index * slot + 1).toFixed(1),
          y: top.toFixed(1),
          width: Math.max(1, slot - 2).toFixed(1),
          height: height.toFixed(1),
        }, group);
      }
      const minute = bucket.start.slice(11, 16);
      node("title", {}, group).textContent =
        `${minute} UTC: ${bucket.published} published, ${bucket.retried} retried, ${bucket.dead} dead`;
    });
    const minutes = Math.round((buckets.length * slotSeconds(buckets)) / 60);
    label(chart, LEFT, HEIGHT - 6, `-${minutes} min`, "start");
    label(chart, LEFT + plotWidth / 2, HEIGHT - 6, `-${Math.round(minutes / 2)} min`, "middle");
    label(chart, WIDTH - RIGHT, HEIGHT - 6, "now", "end");
    for (const series of SERIES) {
      chart.dataset[series] = String(totals[series]);
      const total = document.getElementById(`total-${series}`);
      if (total) total.textContent = String(totals[series]);
    }
    chart.dataset.buckets = String(buckets.length);
  }

  function slotSeconds(buckets) {
    if (buckets.length < 2) return 60;
    return (Date.parse(buckets[1].start) - Date.parse(buckets[0].start)) / 1000;
  }

  function show(summary) {
    for (const [state, count] of Object.entries(summary.counts)) {
      const element = document.getElementById(`count-${state}`);
      if (element) element.textContent = String(count);
    }
    document.getElementById("oldest-pending").textContent = summary.oldest_pending;
    drawChart(document.getElementById("throughput"), summary.buckets);
  }

  // The live refresh, as the server gave it (data-refresh-ms), kept within 1 s to 1 h as
  // `outbox web --refresh` is: a timer above 2^31 - 1 ms fires at once, as does one of 0, and
  // either would send the summary request in a loop. Anything that is not a positive number
  // gets the default.
  const REFRESH_MIN_MS = 1000;
  const REFRESH_MAX_MS = 3600 * 1000;
  const REFRESH_DEFAULT_MS = 5000;

  function refreshInterval(text) {
    const value = Number(text);
    if (!Number.isFinite(value) || value <= 0) return REFRESH_DEFAULT_MS;
    return Math.min(REFRESH_MAX_MS, Math.max(REFRESH_MIN_MS, value));
  }

  function live(section) {
    const status = document.getElementById("live");
    const every = refreshInterval(document.body.dataset.refreshMs);
    let updates = 0;
    async function refresh() {
      try {
        const answer = await fetch(section.dataset.summaryUrl, {
          headers: { Accept: "application/json" },
          cache: "no-store",
          credentials: "same-origin",
        });
        if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
        show(await answer.json());
        updates += 1;
        document.body.dataset.updates = String(updates);
        status.textContent = `live: updated ${new Date().toLocaleTimeString()}, every ${every / 1000} s`;
        status.classList.remove("stale");
      } catch (error) {
        status.textContent = `live: the last update failed (${error.message}); trying again`;
        status.classList.add("stale");
      } finally {
        setTimeout(refresh, every);
      }
    }
    refresh();
  }

  const section = document.getElementById("now");
  if (section) live(section);

  // "Tick all" ticks every event of its own form (the dead list, or a search's dead rows).
  const tickAll = document.getElementById("tick-all");
  if (tickAll) {
    tickAll.addEventListener("change", () => {
      for (const box of tickAll.form.querySelectorAll('input[name="ids"]')) {
        box.checked = tickAll.checked;
      }
    });
  }
})();
