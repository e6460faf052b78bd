"""Sample diversity by MS-SSIM (`eval.msssim`): how different are the synthetic images from each other?

MS-SSIM is 1 for identical images and falls as structure differs; lower mean MS-SSIM = more diverse.
From sample.py's `synthetic.csv` the images are grouped by their source image (the `source` column, and
`source_b` for interpolations), and the summary reports

- within_source: mean MS-SSIM among variations of the same source (all pairs, up to 45 per source):
  near 1 means the model ignores the noise and returns one image per condition;
- random_pairs: random pairs of synthetic images from different sources: the diversity of the whole set;
- source_pairs: random pairs of the real source images: the level of genuinely different patients, the
  reference random_pairs should reach (much higher = mode collapse);
- to_source: each reconstruction against its source image (reconstruction similarity; interpolations,
  having two sources, are left out).
A plain folder of images gets random_pairs only (`diversity_report`). `diversity.csv` has the per-image
numbers, and `least_diverse.png` the sources whose variations are most alike (source, then its variations,
captioned with their MS-SSIM to the source), or for a folder the most similar random pairs.

Images are read as the data pipeline reads them (`data.transforms.preprocess_cxr`, at `--size`) and held
in memory (1 GB per 1,000 images of 512 px; a mean over ~1,000 pairs is stable to ~0.01). Below 161 px the
5-scale MS-SSIM does not fit: `--small scales` (default) drops the coarsest scales, `--small window` shrinks
the window (eval/msssim.py); the summary records which, so compare runs with the same settings only.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

import cli
import hub
from data import list_images, read_image
from data.readers import read_labels_csv
from data.transforms import preprocess_cxr
from eval.figures import caption_grid, chunks
from eval.metrics import describe
from eval.msssim import SMALL_MODES, ms_ssim, ms_ssim_settings


def random_pairs(n: int, count: int, generator: torch.Generator | None = None,
                 groups: torch.Tensor | None = None) -> torch.Tensor:
    """`count` distinct unordered pairs (i < j) of n items, uniformly drawn: [<= count, 2]. With `groups`
    [n], only pairs whose members are in different groups; all qualifying pairs when there are <= count."""
    if n * (n - 1) // 2 <= (4 * count if groups is not None else count):  # few: enumerate, then subsample
        pairs = torch.triu_indices(n, n, offset=1).T
        if groups is not None:
            pairs = pairs[groups[pairs[:, 0]] != groups[pairs[:, 1]]]
        return pairs if len(pairs) <= count else pairs[torch.randperm(len(pairs), generator=generator)[:count]]
    found: dict[tuple[int, int], None] = {}  # rejection sampling keeps the draw uniform; dict keeps order
    for _ in range(100):
        cand = torch.randint(n, (2 * count, 2), generator=generator).sort(1).values
        ok = cand[:, 0] != cand[:, 1]
        if groups is not None:
            ok &= groups[cand[:, 0]] != groups[cand[:, 1]]
        for i, j in cand[ok].tolist():
            found.setdefault((i, j))
            if len(found) == count:
                return torch.tensor(list(found))
    return torch.tensor(list(found), dtype=torch.long).view(-1, 2)


def pairwise_msssim(images: torch.Tensor, pairs: torch.Tensor, other: torch.Tensor | None = None, *,
                    small: str = "error", batch_size: int = 64, device=None) -> torch.Tensor:
    """MS-SSIM [P] of index pairs [P, 2] into `images` [N, C, H, W] in [0, 1] (into `images` and `other`),
    `batch_size` pairs at a time on `device` (default: where the images are)."""
    second = images if other is None else other
    device = images.device if device is None else torch.device(device)
    values = [ms_ssim(images[p[:, 0]].to(device), second[p[:, 1]].to(device), small=small).cpu()
              for p in pairs.split(batch_size)]
    return torch.cat(values) if values else torch.zeros(0)


class DiversityReport(NamedTuple):
    summary: dict  # JSON-ready: settings and one `describe` block per comparison
    to_source: torch.Tensor | None  # [N] MS-SSIM of each synthetic image to its source (nan: no source)
    within_source: torch.Tensor | None  # [N] mean MS-SSIM of each image to its siblings (nan: none)
    random_pairs: torch.Tensor  # [P, 2] the random pairs of synthetic images that were scored
    random_values: torch.Tensor  # [P] their MS-SSIM


def diversity_report(synthetic: torch.Tensor, groups=None, sources: torch.Tensor | None = None,
                     source_index=None, *, max_pairs: int = 1000, max_pairs_per_group: int = 45,
                     generator: torch.Generator | None = None, small: str = "error", batch_size: int = 64,
                     device=None) -> DiversityReport:
    """Diversity of synthetic images [N, C, H, W] by MS-SSIM (lower = more diverse; module docstring).

    groups: [N] ints, e.g. the source image each variation was generated from: "within_source" scores all
        pairs (up to `max_pairs_per_group`) inside each group, "random_pairs" then pairs across groups.
    sources [M, C, H, W] with source_index [N] (-1: none): "to_source" scores each image against its
        source, "source_pairs" `max_pairs` random pairs of sources (genuinely different real images).
    """
    n = len(synthetic)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    score = functools.partial(pairwise_msssim, small=small, batch_size=batch_size, device=device)
    groups = None if groups is None else torch.as_tensor(groups, dtype=torch.long)
    if groups is not None and groups.shape != (n,):
        raise ValueError(f"groups must have one entry per synthetic image ({n}), got {list(groups.shape)}")
    weights, win, sigma = ms_ssim_settings(min(synthetic.shape[-2:]), small=small)
    summary = {"n_synthetic": n, "image_size": list(synthetic.shape[-2:]),
               "ms_ssim": {"weights": list(weights), "win_size": win, "sigma": sigma, "small": small}}
    rand_pairs = random_pairs(n, max_pairs, gen, groups)
    rand_vals = score(synthetic, rand_pairs)
    summary["random_pairs"] = describe(rand_vals)

    within = None
    if groups is not None:
        members = [(groups == g).nonzero().flatten() for g in groups.unique()]
        pairs = torch.cat([m[random_pairs(len(m), max_pairs_per_group, gen)] for m in members])
        vals = score(synthetic, pairs).double()
        summary["within_source"], summary["n_groups"] = describe(vals), len(members)
        ends, both = pairs.flatten(), vals.repeat_interleave(2)  # [i0, j0, i1, j1, ...] and [v0, v0, v1, v1, ...]
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, ends, both)
        count = torch.zeros(n, dtype=torch.float64).index_add_(0, ends, torch.ones_like(both))
        within = total / count  # nan (0 / 0) for an image without siblings

    to_source = None
    if sources is not None:
        idx = torch.as_tensor(source_index, dtype=torch.long)
        has = (idx >= 0).nonzero().flatten()
        to_source = torch.full((n,), float("nan"), dtype=torch.float64)
        to_source[has] = score(synthetic, torch.stack([has, idx[has]], 1), sources).double()
        summary["to_source"] = describe(to_source)
        summary["source_pairs"] = describe(score(sources, random_pairs(len(sources), max_pairs, gen)))
    return DiversityReport(summary, to_source, within, rand_pairs, rand_vals)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--synthetic", required=True, help="sample.py's synthetic.csv, or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=cli.positive_int, default=None, help="image side (None: the first image's)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="3: MS-SSIM on RGB (colour runs)")
    p.add_argument("--max-pairs", type=cli.positive_int, default=1000,
                   help="random pairs scored, of synthetic images and of sources")
    p.add_argument("--small", choices=SMALL_MODES, default="scales",
                   help="images of 160 px or less: fewer scales, a smaller window, or an error")
    p.add_argument("--grid", type=cli.positive_int, default=8, help="rows in least_diverse.png")
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="image pairs per MS-SSIM batch")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the random pairs")
    p.add_argument("--device", default=None, help="cuda / cpu (None: cuda when available)")
    return p.parse_args(argv)


def load_images(paths, size: int, desc: str, channels: int = 1) -> torch.Tensor:
    """Image files -> float32 [N, channels, size, size] in [0, 1], preprocessed like the training data."""
    return torch.stack([preprocess_cxr(read_image(p, channels), size) for p in tqdm(paths, desc=desc, unit="img")])


def read_synthetic(source: Path) -> tuple[list[str], list[tuple[str, str]], list[int] | None]:
    """(image paths, (source, source_b) per image, group per image or None) of a synthetic.csv or folder.
    One group per (source, source_b); a row without a source is a group of its own."""
    if source.suffix.lower() == ".csv":
        paths, _, extras = read_labels_csv(source, labels=[])
        keys = list(zip(extras.get("source", [""] * len(paths)), extras.get("source_b", [""] * len(paths))))
    elif source.is_dir():
        paths = [str(p) for p in list_images(source)]
        keys = [("", "")] * len(paths)
    else:
        cli.fail(f"--synthetic {source}: expected a folder of images or sample.py's synthetic.csv")
    if len(paths) < 2:
        cli.fail(f"--synthetic {source}: need at least 2 images, found {len(paths)}")
    if not any(a for a, _ in keys):
        return paths, keys, None
    ids = {k: i for i, k in enumerate(dict.fromkeys(k for k in keys if k[0]))}
    return paths, keys, [ids[k] if k[0] else len(ids) + i for i, k in enumerate(keys)]


def load_sources(keys, csv_dir: Path, size: int, channels: int = 1):
    """(source images [M, C, S, S], source_index [N], -1: none) of the reconstructions (rows without
    source_b), found as given or relative to the CSV's folder; (None, None) if none is found."""
    wanted = list(dict.fromkeys(a for a, b in keys if a and not b))
    found = {s: next((f for f in (Path(s), csv_dir / s) if f.is_file()), None) for s in wanted}
    if missing := [s for s, f in found.items() if f is None]:
        warnings.warn(f"{len(missing)} source image(s) not found (e.g. {missing[:3]}); their variations get "
                      "no to_source value", stacklevel=1)
    where = {s: i for i, s in enumerate(s for s in wanted if found[s] is not None)}
    if not where:
        return None, None
    index = [where.get(a, -1) if not b else -1 for a, b in keys]
    return load_images([found[s] for s in where], size, "sources", channels), index


def _fmt(values: torch.Tensor | None, i: int, digits: int = 6) -> str:
    """values[i] as text; "" when there are no values or it is nan."""
    return "" if values is None or math.isnan(float(values[i])) else f"{float(values[i]):.{digits}f}"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = Path(args.synthetic)
    paths, keys, groups = read_synthetic(source)
    size = args.size or min(read_image(paths[0]).shape)
    synthetic = load_images(paths, size, "synthetic", args.channels)
    sources = source_index = None
    if groups is not None:  # reconstructions (no source_b) are compared with their source image
        sources, source_index = load_sources(keys, source.parent, size, args.channels)

    report = diversity_report(synthetic, groups, sources, source_index, max_pairs=args.max_pairs,
                              generator=torch.Generator().manual_seed(args.seed), small=args.small,
                              batch_size=args.batch_size, device=device)
    summary = {"synthetic": str(source)} | report.summary
    hub.write_json_atomic(summary, out / "diversity.json")
    hub.write_csv_atomic(out / "diversity.csv", [
        {"path": p, "source": a, "source_b": b, "msssim_to_source": _fmt(report.to_source, i),
         "msssim_within_source": _fmt(report.within_source, i)} for i, (p, (a, b)) in enumerate(zip(paths, keys))])
    write_grid(report, synthetic, groups, sources, source_index, out / "least_diverse.png", args.grid)
    for name in ("within_source", "random_pairs", "source_pairs", "to_source"):
        if name in summary and summary[name]["n"]:
            print(f"{name:>14}: MS-SSIM {summary[name]['mean']:.4f} +- {summary[name]['std']:.4f} "
                  f"(n={summary[name]['n']})")
    print(f"wrote diversity.json, diversity.csv and least_diverse.png to {out}")
    return summary


def write_grid(report, synthetic, groups, sources, source_index, path: Path, max_rows: int, per_row: int = 8):
    """Least diverse sources (source | variations) or, without groups, the most similar random pairs."""
    tiles, captions = [], []
    if groups is not None:
        g = torch.as_tensor(groups)
        within = report.within_source.nan_to_num(-1.0)
        means = {int(k): float(within[g == k].mean()) for k in g.unique()}
        for k in sorted(means, key=means.get, reverse=True)[:max_rows]:
            members = (g == k).nonzero().flatten().tolist()[:per_row]
            s = source_index[members[0]] if source_index is not None else -1
            tiles.append(([sources[s]] if s >= 0 else []) + [synthetic[i] for i in members])
            captions.append(([f"source {means[k]:.3f}"] if s >= 0 else [])
                            + [_fmt(report.to_source, i, 3) for i in members])
        title = "least diverse sources: source (mean MS-SSIM among its variations) | variations (to source)"
    else:
        best = report.random_values.argsort(descending=True)[: 4 * max_rows].tolist()
        tiles = chunks([synthetic[i] for j in best for i in report.random_pairs[j].tolist()], per_row)
        captions = chunks([c for j in best for c in (f"{float(report.random_values[j]):.3f}", "")], per_row)
        title = "most similar random pairs (MS-SSIM)"
    caption_grid(tiles, captions=captions, title=title).save(path)


if __name__ == "__main__":
    cli.main_guard(main)
