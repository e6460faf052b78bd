"""Every figure the scripts write: captioned image grids and line plots.

`caption_grid(rows, row_labels, col_labels)`: tiles (images [H, W] / [C, H, W] in [0, 1]) in rows, each row
named at its left (e.g. "real" / "generated"), each column headed (e.g. "source", "variation 1", or "a",
"r=0.50", "b"), optional per-tile captions below. Small tiles are enlarged by an integer factor (nearest) so
that their captions are legible. Pillow only: a grid of images needs no plotting library. `overlay`: a
DiffSeg label map in colour over the CXR, with the ground-truth lung contour.

`line_plot`: one line per series over categorical x positions (the ratios 1:0, 1:1, 1:5, ...; training
steps), markers, +-error bars, axis titles and a legend. With matplotlib installed (optional:
`pip install -r requirements-plots.txt`) it draws the figure, legend below the axes and `bbox_inches="tight"`
so nothing is clipped; without it, a Pillow drawing that measures its legend and widens the canvas to fit.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Tableau-10 colours (matplotlib's default cycle), so the figure reads like the usual ones.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
MIN_TILE = 96  # px: tiles smaller than this are enlarged (integer factor) so a 12 px caption fits under them


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _text_width(text: str, font) -> int:
    return math.ceil(font.getlength(text))


def _fit(text: str, font, width: int) -> str:
    """`text`, shortened with '~' until it is at most `width` px wide (captions never overlap)."""
    while len(text) > 1 and _text_width(text, font) > width:
        text = text[:-2] + "~"
    return text


def _to_rgb(tile) -> Image.Image:
    """A tensor / array [H, W], [1, H, W] or [3, H, W] in [0, 1] (or uint8 [H, W(, 3)]) -> RGB image."""
    arr = tile.detach().cpu().float().numpy() if isinstance(tile, torch.Tensor) else np.asarray(tile)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    arr = arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    return Image.fromarray(arr).convert("RGB")


def caption_grid(rows, row_labels=None, col_labels=None, captions=None, title: str = "") -> Image.Image:
    """rows: list of rows, each a list of tiles (None = empty cell); every tile the size of the first.
    row_labels: one per row (left); col_labels: one per column (top); captions: per tile (below it).
    -> an RGB image: (title,) header, then one band per row of tiles (each with its caption line). Its
    `.info["boxes"]` maps (row, column) to the tile's (left, top, right, bottom) and `.info["text"]` lists every
    caption drawn (for tests and for callers that annotate further)."""
    if not rows or not any(rows):
        raise ValueError("caption_grid needs at least one tile")
    n_cols = max(len(r) for r in rows)
    for name, labels, n in (("row_labels", row_labels, len(rows)), ("col_labels", col_labels, n_cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"caption_grid: {len(labels)} {name} for {n} {name.split('_')[0]}s")
    first, pad = _to_rgb(next(t for r in rows for t in r if t is not None)), 4
    scale = max(1, math.ceil(MIN_TILE / max(first.size)))
    tw, th = first.width * scale, first.height * scale
    font, bold, line = _font(12), _font(14), 16  # line: px per caption line
    left = pad + max([_text_width(t, bold) for t in row_labels or []] + [0]) + (pad if row_labels else 0)
    top = pad + (line + 4 if title else 0) + (line if col_labels else 0)
    cap_h, width = line if captions else 0, max(left + n_cols * (tw + pad), _text_width(title, bold) + 2 * pad)
    grid = Image.new("RGB", (width, top + len(rows) * (th + cap_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    boxes, texts = {}, [t for t in [title, *(row_labels or []), *(col_labels or [])] if t]
    if title:
        draw.text((pad, pad), title, fill="black", font=bold)
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * (tw + pad) + tw / 2, top - 2), _fit(label, font, tw + pad), fill="black", font=font,
                  anchor="md")
    for r, tiles in enumerate(rows):
        y = top + r * (th + cap_h + pad)
        if row_labels:
            draw.text((pad, y + th / 2), row_labels[r], fill="black", font=bold, anchor="lm")
        for c, img in ((c, _to_rgb(t)) for c, t in enumerate(tiles) if t is not None):
            if img.size != first.size:
                raise ValueError(f"caption_grid: tile ({r}, {c}) is {img.size}, the first is {first.size}")
            x = left + c * (tw + pad)
            grid.paste(img.resize((tw, th), Image.NEAREST), (x, y))
            boxes[r, c] = (x, y, x + tw, y + th)
            if captions and captions[r][c]:
                draw.text((x + tw / 2, y + th + 1), _fit(captions[r][c], font, tw + pad), fill="black", font=font,
                          anchor="ma")
                texts.append(captions[r][c])
    grid.info.update(boxes=boxes, text=texts)
    return grid


def overlay(image: torch.Tensor, labels: torch.Tensor, gt: torch.Tensor | None) -> Image.Image:
    """CXR [S, S] in [0, 1] + label map [S, S] (+ lung mask) -> RGB: 45 % segment colour (golden-ratio hue
    steps), the GT contour (mask minus its erosion) in yellow."""
    colours = np.array([colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.7, 1.0) for i in range(int(labels.max()) + 1)])
    rgb = 0.55 * (image.float().numpy()[..., None] * 255) + 0.45 * (colours * 255)[labels.numpy()]
    if gt is not None:
        m = gt.float()[None, None]
        rgb[(m + F.max_pool2d(-m, 3, 1, 1))[0, 0].bool().numpy()] = (255, 255, 0)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))


def chunks(items: list, n: int) -> list[list]:
    """`items` in rows of `n` (the last row may be shorter), for `caption_grid`."""
    return [items[i : i + n] for i in range(0, len(items), n)]


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
              ylabel: str = "") -> Path:
    """series: name -> y per x position (nan = missing point, the line breaks there). Saves a 900 x 600 PNG."""
    path, errors = Path(path), errors or {}
    try:
        import matplotlib
    except ImportError:
        return _pillow_line_plot(series, xticklabels, path, errors, title, xlabel, ylabel)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=100)
    x = np.arange(len(xticklabels))
    for k, (name, ys) in enumerate(series.items()):
        ax.errorbar(x, ys, yerr=np.nan_to_num(errors[name]) if name in errors else None, marker="o", capsize=4,
                    color=COLORS[k % len(COLORS)], label=name, linewidth=2)
    ax.set_xticks(x, xticklabels, rotation=45 if len(xticklabels) > 12 else 0)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(axis="y", color="#e6e6e6")
    if series:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=min(3, len(series)), frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _pillow_line_plot(series, xticklabels, path, errors, title, xlabel, ylabel) -> Path:
    small, font = _font(13), _font(16)
    legend_w = max([_text_width(name, small) for name in series] + [0]) + 70  # line, marker, text, margins
    width, height = 900 + max(0, legend_w - 190), 600  # the canvas grows so the legend fits
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 80, width - legend_w, 50, height - 70  # plot area; the legend lives on the right

    values = [v + s * e for name, ys in series.items() for v, e in zip(ys, errors.get(name, [0] * len(ys)))
              for s in (-1, 1) if not math.isnan(v) and not math.isnan(e)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05
    ticks = nice_ticks(lo - pad, hi + pad)
    x_at = lambda i: left + (right - left) * (i + 0.5) / max(len(xticklabels), 1)
    y_at = lambda v: bottom - (bottom - top) * (v - ticks[0]) / (ticks[-1] - ticks[0])

    digits = max(0, -math.floor(math.log10(ticks[1] - ticks[0]))) if len(ticks) > 1 else 2
    for t in ticks:  # y grid + tick labels
        d.line([(left - 5, y_at(t)), (right, y_at(t))], fill="#e6e6e6")
        d.text((left - 8, y_at(t)), f"{t:.{digits}f}", fill="black", font=small, anchor="rm")
    for i, name in enumerate(xticklabels):  # x ticks
        d.line([(x_at(i), bottom), (x_at(i), bottom + 5)], fill="black")
        d.text((x_at(i), bottom + 8), name, fill="black", font=small, anchor="ma")
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
            if a and b:
                d.line([a, b], fill=color, width=3)
        for (x, y), v, e in ((p, v, e) for p, v, e in zip(pts, ys, errors.get(name, [0] * len(ys))) if p):
            if e > 0:  # an error bar with its two caps (nan > 0 is False)
                for yy in (y_at(v - e), y_at(v + e)):
                    d.line([(x - 4, yy), (x + 4, yy)], fill=color)
                d.line([(x, y_at(v - e)), (x, y_at(v + e))], fill=color)
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=color, outline="white")
        ly = top + 10 + 24 * k  # legend entry
        d.line([(right + 20, ly), (right + 50, ly)], fill=color, width=3)
        d.ellipse([right + 30, ly - 5, right + 40, ly + 5], fill=color)
        d.text((right + 58, ly), name, fill="black", font=small, anchor="lm")
    if series:
        d.rectangle([right + 12, top, width - 8, top + 20 + 24 * (len(series) - 1)], outline="#999999")
    img.save(path)
    return path
