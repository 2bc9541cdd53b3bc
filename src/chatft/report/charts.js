// The report's charts made interactive; inlined into report.html by markup.py, so it must stay self-contained
// (no import, no fetch). Each <figure data-chart> holds its points as JSON (svg.py). Hover names every series'
// value at the nearest step; dragging across a chart zooms into those steps with the y axis fitted to what is
// visible; a double-click or the "reset zoom" button goes back. Without this script the charts are the same
// SVG, with a <title> per point.
(function () {
  "use strict";
  var SVG_NS = "http://www.w3.org/2000/svg"; // a namespace name for createElementNS, never fetched

  // Python's "%.6g", as svg.fmt writes axis labels and titles, so hover and titles agree.
  function fmt(value) {
    if (value === 0) return "0";
    if (!isFinite(value)) return String(value);
    var rounded = Number(value.toPrecision(6));
    var exponent = Math.floor(Math.log10(Math.abs(rounded)));
    var trim = function (text) { return text.indexOf(".") < 0 ? text : text.replace(/0+$/, "").replace(/\.$/, ""); };
    if (exponent < -4 || exponent >= 6) {
      var parts = rounded.toExponential(5).split("e");
      var power = parseInt(parts[1], 10);
      return trim(parts[0]) + "e" + (power < 0 ? "-" : "+") + String(Math.abs(power)).padStart(2, "0");
    }
    return trim(rounded.toFixed(Math.max(0, 5 - exponent)));
  }

  // svg.nice_ticks: about `count` round values covering [low, high].
  function niceTicks(low, high, count) {
    count = count || 5;
    if (high <= low) return [low];
    var raw = (high - low) / Math.max(count - 1, 1);
    var magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 2.5, 5, 10].map(function (m) { return m * magnitude; }).find(function (s) { return s >= raw; });
    var first = Math.floor(low / step) * step, ticks = [];
    for (var i = 0; i < 4 * count; i++) {
      var value = Number((first + i * step).toPrecision(12));
      if (value >= low - step * 1e-9 && value <= high + step * 1e-9 && ticks.indexOf(value) < 0) ticks.push(value);
    }
    return ticks.length ? ticks : [low];
  }

  // svg._bounds: the values' range with a margin; a flat line sits in the middle of a small band.
  function bounds(values, pad) {
    var low = Math.min.apply(null, values), high = Math.max.apply(null, values);
    if (high === low) {
      var spread = Math.abs(low) * 0.05 || 1;
      return [low - spread, high + spread];
    }
    var margin = (high - low) * pad;
    return [low - margin, high + margin];
  }

  function el(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // The index of the first point whose x is >= x (points are in x order).
  function firstAtOrAfter(pts, x) {
    var lo = 0, hi = pts.length;
    while (lo < hi) {
      var mid = (lo + hi) >> 1;
      if (pts[mid][0] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  // The height of the line through `pts` at x (it joins neighbouring points straight), null outside its points.
  function lineAt(pts, x) {
    var i = firstAtOrAfter(pts, x);
    if (i >= pts.length || (i === 0 && pts[0][0] > x)) return null;
    if (pts[i][0] === x) return pts[i][1];
    var a = pts[i - 1], b = pts[i];
    return a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0]);
  }

  function Chart(figure) {
    var data = JSON.parse(figure.getAttribute("data-chart"));
    var svg = figure.querySelector("svg.chart");
    var area = svg.querySelector("svg.area");
    var axes = svg.querySelector("g.axes");
    var groups = svg.querySelectorAll("g.series");
    var left = data.box[0], top = data.box[1], width = data.box[2], height = data.box[3];
    var full = data.x.slice(), view = {x: data.x.slice(), y: data.y.slice()};
    var drag = null;

    // The script's hover replaces the per-point titles; the hidden markers would sit wrong once zoomed.
    svg.querySelectorAll("circle.pt:not(.dot)").forEach(function (c) { c.remove(); });
    svg.querySelectorAll("circle.pt.dot > title").forEach(function (t) { t.remove(); });
    var guide = area.appendChild(el("line", {"class": "guide", x1: 0, x2: 0, y1: top, y2: top + height}));
    var selection = area.appendChild(el("rect", {"class": "selection", x: 0, y: top, width: 0, height: height}));
    var marks = Array.prototype.map.call(groups, function (g) {
      return g.appendChild(el("circle", {"class": "hover", r: 4}));
    });
    var tip = figure.appendChild(document.createElement("div"));
    tip.className = "tip";
    var reset = figure.querySelector("figcaption").appendChild(document.createElement("button"));
    reset.type = "button";
    reset.className = "unzoom";
    reset.textContent = "reset zoom";
    figure.classList.add("live");

    function px(x) { return left + (x - view.x[0]) / (view.x[1] - view.x[0]) * width; }
    function py(y) { return top + (1 - (y - view.y[0]) / (view.y[1] - view.y[0])) * height; }
    function toX(sx) { return view.x[0] + (sx - left) / width * (view.x[1] - view.x[0]); }

    // The points of a series inside the view, with one neighbour each side so lines run to the plot's edge.
    function visible(pts, withNeighbours) {
      var start = firstAtOrAfter(pts, view.x[0]), end = firstAtOrAfter(pts, view.x[1] + 1e-9 * (full[1] - full[0]));
      if (withNeighbours) { start = Math.max(0, start - 1); end = Math.min(pts.length, end + 1); }
      return pts.slice(start, end);
    }

    function drawAxes() {
      while (axes.firstChild) axes.removeChild(axes.firstChild);
      var right = left + width, bottom = top + height, span = view.x[1] - view.x[0];
      niceTicks(view.y[0], view.y[1]).forEach(function (tick) {
        var y = py(tick).toFixed(1);
        axes.appendChild(el("line", {"class": "grid", x1: left, x2: right, y1: y, y2: y}));
        var label = {"class": "tick y", x: left - 6, y: (py(tick) + 4).toFixed(1), "text-anchor": "end"};
        axes.appendChild(el("text", label, fmt(tick)));
      });
      var xTicks = niceTicks(view.x[0], view.x[1]).filter(function (t) { return Number.isInteger(t) || span < 4; });
      xTicks.forEach(function (tick) {
        var x = px(tick).toFixed(1);
        axes.appendChild(el("line", {"class": "grid", x1: x, x2: x, y1: top, y2: bottom}));
        axes.appendChild(el("text", {"class": "tick x", x: x, y: bottom + 16, "text-anchor": "middle"}, fmt(tick)));
      });
    }

    function draw() {
      drawAxes();
      data.series.forEach(function (series, i) {
        var group = groups[i];
        var line = visible(series.pts, true).map(function (p) {
          return px(p[0]).toFixed(1) + "," + py(p[1]).toFixed(1);
        });
        group.querySelector("polyline").setAttribute("points", line.join(" "));
        if (series.dots) {
          group.querySelectorAll("circle.pt.dot").forEach(function (dot, k) {
            dot.setAttribute("cx", px(series.pts[k][0]).toFixed(1));
            dot.setAttribute("cy", py(series.pts[k][1]).toFixed(1));
          });
        }
      });
      svg.querySelectorAll("g.ref").forEach(function (ref, i) {
        var y = py(data.ref[i][0]);
        ref.querySelector("line").setAttribute("y1", y.toFixed(1));
        ref.querySelector("line").setAttribute("y2", y.toFixed(1));
        ref.querySelector("text").setAttribute("y", (y - 4).toFixed(1));
      });
      figure.classList.toggle("zoomed", view.x[0] !== full[0] || view.x[1] !== full[1]);
    }

    function zoomTo(low, high) {
      low = Math.max(low, full[0]);
      high = Math.min(high, full[1]);
      if (!(high > low)) return;
      view.x = [low, high];
      var ys = [];
      data.series.forEach(function (series) {
        visible(series.pts, false).forEach(function (p) { ys.push(p[1]); });
        [low, high].forEach(function (edge) { var y = lineAt(series.pts, edge); if (y !== null) ys.push(y); });
      });
      if (ys.length) view.y = bounds(ys.concat(data.ref.map(function (r) { return r[0]; })), 0.06);
      draw();
    }

    function unzoom() {
      view = {x: data.x.slice(), y: data.y.slice()};
      draw();
    }

    function local(event) {
      return new DOMPoint(event.clientX, event.clientY).matrixTransform(svg.getScreenCTM().inverse());
    }

    // The plot box, a few units wider so that the first and last step, on its edges, are easy to reach.
    function inside(p) { return p.x >= left - 4 && p.x <= left + width + 4 && p.y >= top && p.y <= top + height; }

    function hideHover() {
      figure.classList.remove("hovering");
      marks.forEach(function (m) { m.style.display = "none"; });
    }

    function nearest(pts, x) {
      var shown = visible(pts, false);
      if (!shown.length) return null;
      var i = firstAtOrAfter(shown, x);
      if (i >= shown.length) return shown[shown.length - 1];
      if (i > 0 && x - shown[i - 1][0] <= shown[i][0] - x) return shown[i - 1];
      return shown[i];
    }

    // Every series' value at the step nearest the pointer; a series without that step shows its nearest point.
    function hover(event, p) {
      var x = toX(p.x), at = null;
      data.series.forEach(function (series) {
        var point = nearest(series.pts, x);
        if (point && (at === null || Math.abs(point[0] - x) < Math.abs(at - x))) at = point[0];
      });
      if (at === null) return hideHover();
      while (tip.firstChild) tip.removeChild(tip.firstChild);
      var head = tip.appendChild(document.createElement("b"));
      head.textContent = data.xl + " " + fmt(at);
      data.series.forEach(function (series, i) {
        var point = nearest(series.pts, at);
        if (!point) { marks[i].style.display = "none"; return; }
        marks[i].setAttribute("cx", px(point[0]).toFixed(1));
        marks[i].setAttribute("cy", py(point[1]).toFixed(1));
        marks[i].style.display = "";
        var row = tip.appendChild(document.createElement("div"));
        row.className = "row " + series.css;
        var elsewhere = point[0] === at ? "" : " (" + data.xl + " " + fmt(point[0]) + ")";
        row.textContent = series.name + " " + fmt(point[1]) + elsewhere;
      });
      guide.setAttribute("x1", px(at).toFixed(1));
      guide.setAttribute("x2", px(at).toFixed(1));
      figure.classList.add("hovering");
      var box = figure.getBoundingClientRect();
      var tipX = event.clientX - box.left + 14, tipY = event.clientY - box.top + 10;
      if (tipX + tip.offsetWidth > box.width) tipX = event.clientX - box.left - tip.offsetWidth - 14;
      tip.style.left = Math.max(0, tipX) + "px";
      tip.style.top = tipY + "px";
    }

    svg.addEventListener("mousedown", function (event) {
      var p = local(event);
      if (event.button !== 0 || !inside(p)) return;
      drag = p.x;
      event.preventDefault();
    });
    svg.addEventListener("mousemove", function (event) {
      var p = local(event);
      if (drag !== null) {
        var a = Math.max(left, Math.min(drag, p.x)), b = Math.min(left + width, Math.max(drag, p.x));
        selection.setAttribute("x", a.toFixed(1));
        selection.setAttribute("width", (b - a).toFixed(1));
        figure.classList.add("selecting");
      }
      if (inside(p)) hover(event, p); else hideHover();
    });
    svg.addEventListener("mouseup", function (event) {
      if (drag === null) return;
      var p = local(event), a = Math.min(drag, p.x), b = Math.max(drag, p.x);
      drag = null;
      figure.classList.remove("selecting");
      if (b - a >= 4) zoomTo(toX(a), toX(b));
    });
    svg.addEventListener("mouseleave", function () {
      drag = null;
      figure.classList.remove("selecting");
      hideHover();
    });
    svg.addEventListener("dblclick", unzoom);
    reset.addEventListener("click", unzoom);
    hideHover();
  }

  function start() {
    document.querySelectorAll("figure[data-chart]").forEach(function (figure) { Chart(figure); });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
