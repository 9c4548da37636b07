"""Pareto plots as inline SVG: a score against a cost (parameters, memory, time per update), frontier marked.

SVG written here rather than by a plotting library, so a page carries its figures as text and opens from
disk with nothing else (no image files to keep in step, no script to draw them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Point:
    """One entry of a board: a method on a backbone, its score and one of its costs."""

    label: str
    cost: float
    score: float
    synthetic: bool = False


def pareto_front(points: list[Point], higher_is_better: bool = True) -> list[bool]:
    """Whether each point is on the frontier: no other point is at most as costly and at least as good,
    and strictly better in one of the two."""
    def better_or_equal(a: Point, b: Point) -> bool:
        return a.score >= b.score if higher_is_better else a.score <= b.score

    def strictly(a: Point, b: Point) -> bool:
        return a.score > b.score if higher_is_better else a.score < b.score

    out = []
    for p in points:
        dominated = any(q is not p and q.cost <= p.cost and better_or_equal(q, p)
                        and (q.cost < p.cost or strictly(q, p)) for q in points)
        out.append(not dominated)
    return out


def _ticks_log(lo: float, hi: float) -> list[float]:
    decades = [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    if sum(lo <= d <= hi for d in decades) >= 3:
        return decades
    return [d * m for d in decades for m in (1, 2, 5)]  # a narrow range needs ticks between the decades


def _ticks_lin(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


# Label geometry for the 11px font of site.css: a baseline's box spans ASCENT above it and DESCENT below
# (one LINE_HEIGHT in all), and a character's width is guessed on the wide side (no text metrics in Python:
# a guess too wide costs a little space, one too narrow lets labels touch).
LINE_HEIGHT = 13.0
ASCENT = 10.0
DESCENT = LINE_HEIGHT - ASCENT
CHAR_WIDTH = 6.3
LABEL_GAP = 8.0  # from a point's centre to its label's near end
POINT_RADIUS = 5.0
SIDE_COST = 4.0  # a label left of its point reads a little worse than one a few pixels lower


@dataclass(frozen=True)
class LabelSpot:
    """Where a point's label goes: its text's anchor ``x`` and baseline ``y``, the side of the point it is
    on (``anchor`` is SVG's text-anchor: "start" right of the point, "end" left of it), and whether it moved
    from beside its point (then a leader line joins them)."""

    x: float
    y: float
    anchor: str
    moved: bool


def label_width(label: str) -> float:
    """The width a label is assumed to take, in SVG pixels."""
    return CHAR_WIDTH * len(label)


def place_labels(anchors: list[tuple[float, float]], labels: list[str],
                 area: tuple[float, float, float, float]) -> list[LabelSpot]:
    """Spots for the labels of points at ``anchors`` (SVG pixels) so that no two label boxes overlap and
    none covers another point, every box inside ``area`` (x0, y0, x1, y1) where the room allows; the points
    themselves never move.

    Each label wants to sit level with its point, right of it (left when the right would leave ``area``).
    Labels are placed top to bottom (ties in the order of their text, so the result depends on the points
    alone): each takes, on either side of its point, of its own level and the levels just above or below
    every box already in its way, the free one nearest its point, the other side counting as SIDE_COST
    pixels further and the lower level winning a tie; when none is free, its own level (a board that
    crowded overlaps, but still renders).
    """
    x0, y0, x1, y1 = area
    lo, hi = y0 + ASCENT, y1 - DESCENT  # baselines that keep a box inside the area
    # obstacles: (left, top, right, bottom, owner); the points' circles first, labels as they are placed
    taken: list[tuple[float, float, float, float, int]] = [
        (cx - POINT_RADIUS, cy - POINT_RADIUS, cx + POINT_RADIUS, cy + POINT_RADIUS, i)
        for i, (cx, cy) in enumerate(anchors)]

    def span(i: int, anchor: str) -> tuple[float, float]:
        cx, w = anchors[i][0], label_width(labels[i])
        return (cx + LABEL_GAP, cx + LABEL_GAP + w) if anchor == "start" else (cx - LABEL_GAP - w, cx - LABEL_GAP)

    def free(i: int, left: float, right: float, base: float) -> bool:
        top, bottom = base - ASCENT, base + DESCENT
        return all(o == i or r <= left or l >= right or b <= top or t >= bottom for l, t, r, b, o in taken)

    spots: dict[int, LabelSpot] = {}
    for i in sorted(range(len(anchors)), key=lambda i: (anchors[i][1], anchors[i][0], labels[i])):
        cx, cy = anchors[i]
        want = min(max(cy + (ASCENT - DESCENT) / 2, lo), hi)  # the letters centred on the point
        sides = [s for s in ("start", "end") if x0 <= span(i, s)[0] and span(i, s)[1] <= x1] or ["start"]
        best: tuple[tuple[float, float, int], str, float] | None = None
        for rank, side in enumerate(sides):
            left, right = span(i, side)
            levels = {want}
            for l, t, r, b, o in taken:
                if o != i and r > left and l < right:
                    levels |= {b + ASCENT, t - DESCENT}
            for y in levels:
                cost = (abs(y - want) + rank * SIDE_COST, -y, rank)
                if lo <= y <= hi and free(i, left, right, y) and (best is None or cost < best[0]):
                    best = (cost, side, y)
        side, y = (best[1], best[2]) if best else (sides[0], want)
        left, right = span(i, side)
        taken.append((left, y - ASCENT, right, y + DESCENT, i))
        x = cx + LABEL_GAP if side == "start" else cx - LABEL_GAP
        spots[i] = LabelSpot(x, y, side, moved=abs(y - want) > 0.5)
    return [spots[i] for i in range(len(anchors))]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:.3g}"


def pareto_svg(points: list[Point], x_label: str, y_label: str, higher_is_better: bool = True,
               log_x: bool = True, title: str = "") -> str:
    """An SVG scatter of score against cost; frontier points filled and joined by a step line, the others
    hollow; synthetic entries drawn dashed and their labels marked "(synthetic)"."""
    width, height, left, right, top, bottom = 640, 400, 70, 110, 40, 50
    pts = [p for p in points if math.isfinite(p.cost) and math.isfinite(p.score)]
    if log_x:  # a cost of 0 (a linear probe has no parameters of its own) sits at 1, the axis's floor
        pts = [Point(p.label, max(p.cost, 1.0), p.score, p.synthetic) for p in pts]
    if not pts:
        return f'<p class="empty">No {escape(x_label)} recorded for this board.</p>'
    xs = [p.cost for p in pts]
    ys = [p.score for p in pts]
    if log_x:
        lo, hi = min(xs) / 1.5, max(xs) * 1.5
        fx = lambda v: math.log10(v)  # noqa: E731
        xticks = _ticks_log(lo, hi)
    else:
        pad = (max(xs) - min(xs)) * 0.1 or abs(max(xs)) * 0.1 or 1.0
        lo, hi = min(xs) - pad, max(xs) + pad
        fx = lambda v: v  # noqa: E731
        xticks = _ticks_lin(lo, hi)
    pad_y = (max(ys) - min(ys)) * 0.1 or abs(max(ys)) * 0.1 or 1.0
    ylo, yhi = min(ys) - pad_y, max(ys) + pad_y
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + (fx(v) - fx(lo)) / (fx(hi) - fx(lo)) * plot_w

    def py(v: float) -> float:
        return top + (1 - (v - ylo) / (yhi - ylo)) * plot_h

    front = pareto_front(pts, higher_is_better)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="pareto" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="{escape(title or y_label)}">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for t in xticks:
        if lo <= t <= hi:
            x = px(t)
            parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" class="grid"/>'
                         f'<text x="{x:.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
    for t in _ticks_lin(ylo, yhi):
        y = py(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" class="axis" text-anchor="middle">'
                 f'{escape(x_label)}{" (log scale)" if log_x else ""}</text>')
    parts.append(f'<text x="16" y="{top + plot_h / 2}" class="axis" text-anchor="middle" '
                 f'transform="rotate(-90 16 {top + plot_h / 2})">{escape(y_label)}</text>')
    # the frontier as a staircase: cost grows left to right, so does the best score reached so far
    on = sorted((p for p, f in zip(pts, front) if f), key=lambda p: p.cost)
    if len(on) > 1:
        path = [f"M{px(on[0].cost):.1f},{py(on[0].score):.1f}"]
        for a, b in zip(on, on[1:]):
            path.append(f"H{px(b.cost):.1f}V{py(b.score):.1f}")
        parts.append(f'<path d="{"".join(path)}" class="frontier"/>')
    labels = [p.label + (" (synthetic)" if p.synthetic else "") for p in pts]
    anchors = [(px(p.cost), py(p.score)) for p in pts]
    # labels stay within the frame's height and the figure's width (the right margin is there for them)
    spots = place_labels(anchors, labels, (left, top, width, top + plot_h))
    for p, f, label, (x, y), spot in zip(pts, front, labels, anchors, spots):
        cls = "point" + (" front" if f else "") + (" synthetic" if p.synthetic else "")
        leader = ""
        if spot.moved:  # from the circle's edge to the label's near end, halfway up its letters
            side = 1 if spot.anchor == "start" else -1
            leader = (f'<line x1="{x + side * POINT_RADIUS:.1f}" y1="{y:.1f}" x2="{spot.x - side * 2:.1f}" '
                      f'y2="{spot.y - (ASCENT - DESCENT) / 2:.1f}" class="leader"/>')
        end = ' text-anchor="end"' if spot.anchor == "end" else ""
        parts.append(f'<g class="{cls}"><title>{escape(label)}: {escape(y_label)} {p.score:.4g}, '
                     f'{escape(x_label)} {p.cost:.4g}{" (on the frontier)" if f else ""}</title>'
                     f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{POINT_RADIUS:g}"/>{leader}'
                     f'<text x="{spot.x:.1f}" y="{spot.y:.1f}" class="label"{end}>{escape(label)}</text></g>')
    parts.append(f'<g class="legend"><circle cx="{left + 8}" cy="14" r="5" class="front-key"/>'
                 f'<text x="{left + 18}" y="18">on the frontier</text>'
                 f'<circle cx="{left + 128}" cy="14" r="5" class="off-key"/>'
                 f'<text x="{left + 138}" y="18">dominated</text>'
                 + (f'<text x="{left + 230}" y="18">a cost of 0 is drawn at 1</text>' if log_x else "")
                 + "</g>")
    parts.append("</svg>")
    return "".join(parts)
