// hyperlaw dashboard charts: small SVG plots with log or linear axes, written for this page
// (no library). A chart is built from layers, then drawn into an <svg> element:
//
//   const c = new Chart({title: "loss", xlabel: "step", ylabel: "loss", xlog: true, ylog: true});
//   c.line(xs, ys, {color: "#1f77b4", label: "train"});
//   c.points(xs, ys, {marker: "star"});  c.band(xs, lows, highs);  c.cells(rects);
//   container.appendChild(c.figure("trial-17-loss"));   // the SVG with SVG/PNG buttons
//
// Non-finite or missing values are skipped (and, on log axes, values <= 0).
(function () {
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22"];
// viridis at 0, .25, .5, .75, 1
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function el(name, attrs, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function finite(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + f * (VIRIDIS[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function fmt(v) {
  if (!finite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) {
    const e = Math.floor(Math.log10(a));
    const m = v / 10 ** e;
    return `${Math.abs(m - Math.round(m)) < 1e-9 ? Math.round(m) : m.toFixed(2)}e${e}`;
  }
  return String(Number(v.toPrecision(4)));
}

function marker(l, px, py, r) {
  if (l.marker === "star") {
    const pts = [];
    for (let k = 0; k < 10; k++) {
      const rr = k % 2 ? r * 0.9 : r * 2.2;
      const a = -Math.PI / 2 + (k * Math.PI) / 5;
      pts.push(`${(px + rr * Math.cos(a)).toFixed(1)},${(py + rr * Math.sin(a)).toFixed(1)}`);
    }
    return el("polygon", {points: pts.join(" "), fill: l.color, stroke: "black", "stroke-width": 0.8});
  }
  if (l.marker === "triangle") {
    return el("polygon", {points: `${px},${py - r * 1.3} ${px - r * 1.2},${py + r} ${px + r * 1.2},${py + r}`,
      fill: l.open ? "white" : l.color, stroke: l.color});
  }
  if (l.marker === "diamond") {
    return el("polygon", {points: `${px},${py - r * 1.4} ${px + r * 1.4},${py} ${px},${py + r * 1.4} ${px - r * 1.4},${py}`,
      fill: l.open ? "white" : l.color, stroke: l.color});
  }
  return el("circle", {cx: px, cy: py, r, fill: l.open ? "none" : l.color, stroke: l.color,
    "stroke-width": l.open ? 2 : 1});
}

class Axis {
  constructor(log, lo, hi, pixels, flip) {
    this.log = log;
    if (!(hi > lo)) {
      const pad = log ? 2 : Math.abs(lo) * 0.1 || 1;
      [lo, hi] = log ? [lo / pad, hi * pad] : [lo - pad, hi + pad];
    }
    if (log) {  // a little air around the data, in decades
      const span = Math.log10(hi / lo);
      lo /= 10 ** (0.04 * span);
      hi *= 10 ** (0.04 * span);
    } else {
      const pad = 0.04 * (hi - lo);
      lo -= pad;
      hi += pad;
    }
    this.lo = lo;
    this.hi = hi;
    this.pixels = pixels;  // [start, end] in SVG units
    this.flip = flip;
  }

  pos(v) {
    const t = this.log
      ? (Math.log10(v) - Math.log10(this.lo)) / (Math.log10(this.hi) - Math.log10(this.lo))
      : (v - this.lo) / (this.hi - this.lo);
    const [a, b] = this.pixels;
    return this.flip ? b - t * (b - a) : a + t * (b - a);
  }

  ticks() {
    if (this.log) {
      const lo = Math.floor(Math.log10(this.lo));
      const hi = Math.ceil(Math.log10(this.hi));
      const step = Math.max(1, Math.ceil((hi - lo) / 7));
      const mult = hi - lo <= 1 ? [1, 2, 5] : hi - lo <= 2 ? [1, 3] : [1];
      const out = [];
      for (let e = lo; e <= hi; e += step) {
        for (const m of mult) {
          const v = m * 10 ** e;
          if (v >= this.lo && v <= this.hi) out.push(v);
        }
      }
      if (out.length >= 2) return out;
      const fine = [];  // less than a decade: every integer multiple
      for (let e = lo; e <= hi; e++) {
        for (let m = 1; m < 10; m++) if (m * 10 ** e >= this.lo && m * 10 ** e <= this.hi) fine.push(m * 10 ** e);
      }
      return fine.length >= 2 ? fine : [this.lo, this.hi];
    }
    const raw = (this.hi - this.lo) / 6;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(this.lo / step) * step; v <= this.hi; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return out;
  }
}

class Chart {
  constructor(opts) {
    this.opts = {width: 560, height: 320, xlog: false, ylog: false, ...opts};
    this.layers = [];
    this.nextColour = 0;
  }

  colour(opts) {
    return (opts && opts.color) || PALETTE[this.nextColour++ % PALETTE.length];
  }

  line(xs, ys, opts = {}) {
    this.layers.push({kind: "line", xs, ys, ...opts, color: this.colour(opts)});
    return this;
  }

  points(xs, ys, opts = {}) {
    this.layers.push({kind: "points", xs, ys, ...opts, color: this.colour(opts)});
    return this;
  }

  band(xs, lows, highs, opts = {}) {
    this.layers.push({kind: "band", xs, lows, highs, ...opts, color: opts.color || "#999"});
    return this;
  }

  vline(x, opts = {}) {
    this.layers.push({kind: "vline", x, ...opts, color: opts.color || "#555"});
    return this;
  }

  // rects: [{x0, x1, y0, y1, value, label}]; value in [0, 1] picks the colour (null: grey)
  cells(rects, opts = {}) {
    this.layers.push({kind: "cells", rects, ...opts});
    return this;
  }

  _usable(x, y) {
    return finite(x) && finite(y) && (!this.opts.xlog || x > 0) && (!this.opts.ylog || y > 0);
  }

  _inLimits(y) {
    const lim = this.opts.ylim;
    return !lim || (y >= lim[0] && y <= lim[1]);
  }

  _extent() {
    const xs = [];
    const ys = [];
    for (const l of this.layers) {
      if (l.kind === "line" || l.kind === "points") {
        l.xs.forEach((x, i) => {
          if (this._usable(x, l.ys[i]) && this._inLimits(l.ys[i])) { xs.push(x); ys.push(l.ys[i]); }
        });
      } else if (l.kind === "band") {
        l.xs.forEach((x, i) => {
          for (const y of [l.lows[i], l.highs[i]]) if (this._usable(x, y)) { xs.push(x); ys.push(y); }
        });
      } else if (l.kind === "cells") {
        for (const r of l.rects) { xs.push(r.x0, r.x1); ys.push(r.y0, r.y1); }
      } else if (l.kind === "vline" && finite(l.x)) {
        xs.push(l.x);
      }
    }
    return {xs, ys};
  }

  // The chart as an <svg> element (sized by width/height, scalable by viewBox).
  svg() {
    const {width, height, xlog, ylog} = this.opts;
    const legend = this.layers.some((l) => l.label);  // drawn right of the plot
    const m = {left: 64, right: legend ? 150 : 14, top: this.opts.title ? 26 : 10, bottom: 42};
    const svg = el("svg", {xmlns: SVG_NS, width, height, viewBox: `0 0 ${width} ${height}`,
      "font-family": "sans-serif", "font-size": 11, class: "chart"});
    svg.appendChild(el("rect", {x: 0, y: 0, width, height, fill: "white"}));
    const {xs, ys} = this._extent();
    if (!xs.length || !ys.length) {
      svg.appendChild(el("text", {x: width / 2, y: height / 2, "text-anchor": "middle",
        fill: "#777"}, this.opts.empty || "no data yet"));
      if (this.opts.title) svg.appendChild(el("text", {x: m.left, y: 16, "font-weight": "bold"}, this.opts.title));
      return svg;
    }
    const xa = new Axis(xlog, Math.min(...xs), Math.max(...xs), [m.left, width - m.right], false);
    const ya = new Axis(ylog, Math.min(...ys), Math.max(...ys), [m.top, height - m.bottom], true);
    const plot = el("g", {});
    const clipId = `clip${Math.random().toString(36).slice(2, 9)}`;
    const clip = el("clipPath", {id: clipId});
    clip.appendChild(el("rect", {x: m.left, y: m.top, width: width - m.left - m.right,
      height: height - m.top - m.bottom}));
    svg.appendChild(clip);
    plot.setAttribute("clip-path", `url(#${clipId})`);
    // grid and ticks
    for (const t of xa.ticks()) {
      const x = xa.pos(t);
      svg.appendChild(el("line", {x1: x, x2: x, y1: m.top, y2: height - m.bottom, stroke: "#eee"}));
      svg.appendChild(el("text", {x, y: height - m.bottom + 14, "text-anchor": "middle"}, fmt(t)));
    }
    for (const t of ya.ticks()) {
      const y = ya.pos(t);
      svg.appendChild(el("line", {x1: m.left, x2: width - m.right, y1: y, y2: y, stroke: "#eee"}));
      svg.appendChild(el("text", {x: m.left - 4, y: y + 4, "text-anchor": "end"}, fmt(t)));
    }
    svg.appendChild(el("rect", {x: m.left, y: m.top, width: width - m.left - m.right,
      height: height - m.top - m.bottom, fill: "none", stroke: "#888"}));
    for (const l of this.layers) this._draw(plot, l, xa, ya);
    svg.appendChild(plot);
    if (this.opts.title) {
      svg.appendChild(el("text", {x: m.left, y: 16, "font-weight": "bold"}, this.opts.title));
    }
    svg.appendChild(el("text", {x: (m.left + width - m.right) / 2, y: height - 6,
      "text-anchor": "middle"}, this.opts.xlabel || ""));
    svg.appendChild(el("text", {x: 12, y: (m.top + height - m.bottom) / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${(m.top + height - m.bottom) / 2})`}, this.opts.ylabel || ""));
    this._legend(svg, m, width);
    return svg;
  }

  _draw(g, l, xa, ya) {
    if (l.kind === "line") {
      // missing values are skipped, not gaps: an eval loss exists every few hundred steps
      let d = "";
      l.xs.forEach((x, i) => {
        if (!this._usable(x, l.ys[i])) return;
        d += `${d ? "L" : "M"}${xa.pos(x).toFixed(1)},${ya.pos(l.ys[i]).toFixed(1)}`;
      });
      if (d) g.appendChild(el("path", {d, fill: "none", stroke: l.color, "stroke-width": l.width || 1.6,
        "stroke-dasharray": l.dash || "none", class: l.cls || "series"}));
    } else if (l.kind === "band") {
      const upper = [];
      const lower = [];
      l.xs.forEach((x, i) => {
        if (this._usable(x, l.lows[i]) && this._usable(x, l.highs[i])) {
          upper.push(`${xa.pos(x).toFixed(1)},${ya.pos(l.highs[i]).toFixed(1)}`);
          lower.unshift(`${xa.pos(x).toFixed(1)},${ya.pos(l.lows[i]).toFixed(1)}`);
        }
      });
      if (upper.length > 1) g.appendChild(el("polygon", {points: upper.concat(lower).join(" "),
        fill: l.color, "fill-opacity": l.opacity || 0.15, stroke: "none"}));
    } else if (l.kind === "points") {
      l.xs.forEach((x, i) => {
        if (!this._usable(x, l.ys[i])) return;
        const px = xa.pos(x);
        const py = ya.pos(l.ys[i]);
        const node = marker(l, px, py, l.size || 3.5);
        node.setAttribute("class", l.cls || "marker");
        if (l.titles) node.appendChild(el("title", {}, l.titles[i]));
        if (l.onclick) { node.style.cursor = "pointer"; node.addEventListener("click", () => l.onclick(i)); }
        g.appendChild(node);
      });
    } else if (l.kind === "vline" && finite(l.x) && (!this.opts.xlog || l.x > 0)) {
      const x = xa.pos(l.x);
      g.appendChild(el("line", {x1: x, x2: x, y1: ya.pixels[0], y2: ya.pixels[1], stroke: l.color,
        "stroke-dasharray": l.dash || "4 3"}));
    } else if (l.kind === "cells") {
      for (const r of l.rects) {
        const x0 = xa.pos(r.x0);
        const x1 = xa.pos(r.x1);
        const y0 = ya.pos(r.y0);
        const y1 = ya.pos(r.y1);
        const rect = el("rect", {x: Math.min(x0, x1), y: Math.min(y0, y1), width: Math.abs(x1 - x0),
          height: Math.abs(y1 - y0), fill: r.value === null ? "#ccc" : viridis(r.value),
          stroke: "white", "stroke-width": 0.5, class: "cell"});
        if (r.label) rect.appendChild(el("title", {}, r.label));
        g.appendChild(rect);
      }
    }
  }

  _legend(svg, m, width) {
    const items = this.layers.filter((l) => l.label);
    let y = m.top + 12;
    for (const l of items) {
      const x = width - m.right + 8;
      if (l.kind === "line") {
        svg.appendChild(el("line", {x1: x, x2: x + 16, y1: y - 4, y2: y - 4, stroke: l.color,
          "stroke-width": 2, "stroke-dasharray": l.dash || "none"}));
      } else {
        svg.appendChild(marker(l, x + 8, y - 4, l.marker === "star" ? 3 : 3.5));
      }
      svg.appendChild(el("text", {x: x + 20, y}, String(l.label).slice(0, 22)));
      y += 13;
    }
  }

  // A <figure> with the chart and buttons that save it as SVG or PNG under `name`.
  figure(name) {
    const fig = document.createElement("figure");
    fig.className = "plot";
    fig.dataset.name = name;
    const svg = this.svg();
    fig.appendChild(svg);
    const bar = document.createElement("div");
    bar.className = "save";
    for (const kind of ["svg", "png"]) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = kind.toUpperCase();
      b.title = `save as ${name}.${kind}`;
      b.addEventListener("click", () => (kind === "svg" ? saveSVG(svg, name) : savePNG(svg, name)));
      bar.appendChild(b);
    }
    fig.appendChild(bar);
    return fig;
  }
}

function svgText(svg) {
  return new XMLSerializer().serializeToString(svg);
}

function download(href, filename) {
  const a = document.createElement("a");
  a.href = href;
  a.download = filename;
  document.body.appendChild(a);
  a.click();
  a.remove();
}

function saveSVG(svg, name) {
  const url = URL.createObjectURL(new Blob([svgText(svg)], {type: "image/svg+xml"}));
  download(url, `${name}.svg`);
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// PNG at twice the SVG's size, drawn by the browser from the SVG.
function svgToPNG(svg, scale = 2) {
  return new Promise((resolve, reject) => {
    const w = Number(svg.getAttribute("width"));
    const h = Number(svg.getAttribute("height"));
    const img = new Image();
    img.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = w * scale;
      canvas.height = h * scale;
      const ctx = canvas.getContext("2d");
      ctx.scale(scale, scale);
      ctx.drawImage(img, 0, 0);
      resolve(canvas.toDataURL("image/png"));
    };
    img.onerror = reject;
    img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svgText(svg));
  });
}

function savePNG(svg, name) {
  return svgToPNG(svg).then((url) => download(url, `${name}.png`));
}

window.hyperlawCharts = {Chart, fmt, finite, viridis, svgToPNG, PALETTE};
})();
