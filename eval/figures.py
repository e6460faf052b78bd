"""A small line plot drawn with Pillow (no matplotlib in the runtime dependencies).

`line_plot` draws one line per series over categorical x positions (evenly spaced, e.g. the ratios 1:0,
1:1, 1:5, ...), with markers, optional +-error bars, y ticks at "nice" steps (1, 2, 2.5, 5 x 10^k), grid
lines, axis titles and a legend box: enough for the paper's "AUC vs real:synthetic ratio" figure.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Tableau-10 colours (matplotlib's default cycle), so the figure reads like the usual ones.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values covering [lo, hi], about `target` of them."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(1, target - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step - 1e-9)) + 1)]


def line_plot(series: dict[str, list[float]], xticklabels: list[str], path: str | Path, *,
              errors: dict[str, list[float]] | None = None, title: str = "", xlabel: str = "",
              ylabel: str = "", size: tuple[int, int] = (900, 600)) -> Path:
    """series: name -> y per x position (nan = missing point, the line breaks there). Saves a PNG."""
    errors = errors or {}
    width, height = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    left, right, top, bottom = 80, width - 190, 50, height - 70  # plot area; the legend lives on the right

    values = [v + s * e for name, ys in series.items() for v, e in zip(ys, errors.get(name, [0] * len(ys)))
              for s in (-1, 1) if not math.isnan(v) and not math.isnan(e)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05
    ticks = nice_ticks(lo - pad, hi + pad)
    y0, y1 = ticks[0], ticks[-1]
    n = len(xticklabels)
    x_at = lambda i: left + (right - left) * (i + 0.5) / max(n, 1)
    y_at = lambda v: bottom - (bottom - top) * (v - y0) / (y1 - y0)

    digits = max(0, -math.floor(math.log10(ticks[1] - ticks[0]))) if len(ticks) > 1 else 2
    for t in ticks:  # y grid + tick labels
        y = y_at(t)
        d.line([(left, y), (right, y)], fill="#e6e6e6")
        d.line([(left - 5, y), (left, y)], fill="black")
        d.text((left - 8, y), f"{t:.{digits}f}", fill="black", font=small, anchor="rm")
    for i, name in enumerate(xticklabels):  # x ticks
        x = x_at(i)
        d.line([(x, bottom), (x, bottom + 5)], fill="black")
        d.text((x, bottom + 8), name, fill="black", font=small, anchor="ma")
    d.rectangle([left, top, right, bottom], outline="black")
    d.text(((left + right) / 2, top - 12), title, fill="black", font=font, anchor="ms")
    d.text(((left + right) / 2, height - 18), xlabel, fill="black", font=font, anchor="ms")
    label = Image.new("RGB", (bottom - top, 24), "white")  # rotated y-axis title
    ImageDraw.Draw(label).text(((bottom - top) / 2, 12), ylabel, fill="black", font=font, anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, top))

    for k, (name, ys) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        pts = [(x_at(i), y_at(v)) if not math.isnan(v) else None for i, v in enumerate(ys)]
        for a, b in zip(pts, pts[1:]):
            if a is not None and b is not None:
                d.line([a, b], fill=color, width=3)
        for i, (p, e) in enumerate(zip(pts, errors.get(name, [math.nan] * len(ys)))):
            if p is None:
                continue
            if not math.isnan(e) and e > 0:
                ya, yb = y_at(ys[i] - e), y_at(ys[i] + e)
                d.line([(p[0], ya), (p[0], yb)], fill=color, width=1)
                d.line([(p[0] - 4, ya), (p[0] + 4, ya)], fill=color)
                d.line([(p[0] - 4, yb), (p[0] + 4, yb)], fill=color)
            d.ellipse([p[0] - 5, p[1] - 5, p[0] + 5, p[1] + 5], fill=color, outline="white")
        ly = top + 10 + 24 * k  # legend entry
        d.line([(right + 20, ly), (right + 50, ly)], fill=color, width=3)
        d.ellipse([right + 30, ly - 5, right + 40, ly + 5], fill=color)
        d.text((right + 58, ly), name, fill="black", font=small, anchor="lm")
    if series:
        d.rectangle([right + 12, top, width - 8, top + 20 + 24 * (len(series) - 1)], outline="#999999")
    path = Path(path)
    img.save(path)
    return path
