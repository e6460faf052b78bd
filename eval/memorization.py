"""Memorisation check: is any synthetic image a copy of a training image?

Each synthetic image's nearest training image, by cosine similarity in a feature space, is compared with
how close genuinely new real images get to the training set:

1. Features. `pixel` (always computed): the image at 32 x 32 (antialiased), minus its mean, over its norm,
   so that cosine similarity is the normalised cross-correlation (Pearson r over pixels): blind to
   brightness/contrast and noise, tolerant of sub-pixel shifts, not of larger ones (that is what DINO is
   for). `dino` (default): the CLS token of a DINO ViT, the embedding Somepalli et al. (CVPR 2023,
   "Diffusion Art or Digital Forgery?") use for replication detection; `--dino-tokens glb` concatenates the
   L2-normalised tokens of c_GLB (what DiNO-Diffusion is conditioned on), so its cosine is the mean of the
   per-token cosines. `xrv`: the pooled features of torchxrayvision's CXR DenseNet-121 (`--xrv-weights`).
   Without `--dino` a random-init `DinoViT(DinoConfig.tiny())` (seed 0) keeps the CLI offline; the summary
   says so. Features are centred on the mean training feature first, which removes what all chest X-rays
   share (the average anatomy): copies still score 1, different patients much lower than uncentred
   (phantoms at 32 px: ~0.65 instead of ~0.93).
2. Nearest neighbours (`nearest_neighbors`): top-k of query @ reference^T block by block (100k x 100k in
   the memory of one block).
3. Threshold: the q-quantile (default 0.99) of the nearest-train similarities of real images of new
   patients; a synthetic image above it is flagged: "closer to a training image than 99 % of genuinely new
   real images are" (n held-out images resolve the quantile to ~1/n). They come from `--heldout` (use a
   patient-disjoint split) or, by default, a random 10 % of `--train` compared with the other 90 %
   (synthetic images see all of `--train`, so this errs on the side of flagging). One patient on both sides
   of the split raises the threshold and hides copies: prefer a patient-level split.

Outputs: `memorization.csv` (per synthetic image and space: nearest training image, similarity, flagged),
`memorization.json` (per space: threshold, flagged fraction, quantiles and histograms of the synthetic and
held-out similarities) and `closest_<space>.png` (synthetic | nearest training image).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import cli
import hub
from data.datasets import collate, open_dataset
from data.transforms import resize
from eval.figures import caption_grid, chunks
from eval.metrics import describe


def pixel_features(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Images [B, C, H, W] -> [B, C * size * size]: downsampled, zero mean, unit norm (cosine = NCC)."""
    x = resize(images.float(), size).flatten(1)  # [B, C*size*size]
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


def dino_features(dino, images: torch.Tensor, tokens: str = "cls") -> torch.Tensor:
    """Images [B, 1 or 3, H, W] in [0, 1] -> [B, D] (CLS token, `tokens="cls"`) or [B, G * D] (`"glb"`:
    c_GLB with each token L2-normalised, over sqrt(G) so the whole vector has unit norm)."""
    with torch.inference_mode():
        c = dino.global_tokens(dino.preprocess(images.float().clamp(0, 1))).float()  # [B, G, D]
    return c[:, 0] if tokens == "cls" else F.normalize(c, dim=-1).flatten(1) / c.shape[1] ** 0.5


def random_dino(seed: int = 0):
    """The offline stand-in: a random-init `DinoViT(DinoConfig.tiny())`, reproducible under `seed`."""
    from vit_dino import DinoConfig, DinoViT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DinoViT(DinoConfig.tiny()).eval().requires_grad_(False)


def _loader(dataset, args):  # the same batches for extract_features and images_at
    return torch.utils.data.DataLoader(dataset, args.batch_size, collate_fn=collate)


@torch.no_grad()
def extract_features(dataset, extractors: dict, args, device, desc: str) -> tuple[dict, list[str]]:
    """One pass over a dataset of items {"image" [C, S, S], "path"}: every extractor on every batch.
    Returns ({name: float32 features [N, D] on the CPU}, paths [N])."""
    feats, paths = {name: [] for name in extractors}, []
    for batch in tqdm(_loader(dataset, args), desc=desc, unit="batch"):
        for name, fn in extractors.items():
            feats[name].append(fn(batch["image"].to(device)).float().cpu())
        paths += batch["path"]
    return {name: torch.cat(f) for name, f in feats.items()}, paths


def images_at(dataset, positions, args) -> dict[int, torch.Tensor]:
    """{position: image} for a few positions of a dataset: indexed directly when it is map-style, else
    (webdataset shards) by streaming it again with the loader settings `extract_features` used."""
    wanted = set(positions)
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        return {p: dataset[p]["image"] for p in wanted}
    found, pos = {}, 0
    for batch in _loader(dataset, args):
        found |= {pos + i: img for i, img in enumerate(batch["image"]) if pos + i in wanted}
        pos += len(batch["image"])
        if len(found) == len(wanted):
            break
    return found


def nearest_neighbors(query: torch.Tensor, reference: torch.Tensor, k: int = 1, chunk_size: int = 4096,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each query [Q, D] to its k nearest references [R, D] -> (sims, indices) [Q, k].

    Similarities are computed block by block (at most chunk_size x chunk_size at a time, on `device`,
    default the query's) and merged into a running top-k, so memory is O((Q + R) D + chunk_size^2).
    """
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"features must be [Q, D] and [R, D], got {list(query.shape)} and "
                         f"{list(reference.shape)}")
    device = query.device if device is None else torch.device(device)
    k = min(k, len(reference))
    ref = F.normalize(reference.float(), dim=1).to(device)
    sims, idx = [], []
    for q in query.split(chunk_size):
        q = F.normalize(q.float().to(device), dim=1)  # [q, D]
        best_s, best_i = q.new_empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long, device=device)
        for start in range(0, len(ref), chunk_size):
            block = q @ ref[start : start + chunk_size].T  # [q, r]
            s, i = block.topk(min(k, block.shape[1]), dim=1)
            best_s, pos = torch.cat([best_s, s], 1).topk(k, dim=1)  # merge with the running top-k
            best_i = torch.cat([best_i, i + start], 1).gather(1, pos)
        sims.append(best_s.cpu())
        idx.append(best_i.cpu())
    return torch.cat(sims), torch.cat(idx)


def histogram(values: dict[str, torch.Tensor], bins: int = 20) -> dict:
    """Counts of each named set of similarities over shared bins spanning [min of all, 1]."""
    everything = torch.cat([v.flatten().double() for v in values.values()])
    lo = min(float(everything.min()) if everything.numel() else 0.0, 1.0 - 1e-3)
    edges = torch.linspace(lo, 1.0, bins + 1, dtype=torch.float64)
    return {"edges": [round(float(e), 6) for e in edges]} | {
        name: torch.histogram(v.flatten().double().clamp(lo, 1.0), bins=edges).hist.long().tolist()
        for name, v in values.items()}


class MemorizationResult(NamedTuple):
    similarity: torch.Tensor  # [N] cosine similarity of each synthetic image to its nearest training image
    nearest: torch.Tensor  # [N] index of that training image
    flagged: torch.Tensor  # [N] bool: similarity > threshold
    threshold: float
    summary: dict  # JSON-ready


def memorization_check(synthetic: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor | None = None, *,
                       heldout_index=None, quantile: float = 0.99, chunk_size: int = 4096, device=None
                       ) -> MemorizationResult:
    """Nearest training neighbour of each synthetic feature vector and whether it is suspiciously close.

    synthetic [N, D], train [R, D]: features. Calibration (one of): `heldout` [H, D], real images unseen in
    `train`, compared with all of `train`; or `heldout_index`, indices into `train` compared with the rest
    of `train`. threshold = the `quantile` of the held-out nearest-train similarities.
    Every set is first centred on the mean training feature (module docstring).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    mean = train.float().mean(0)
    synthetic, train = synthetic.float() - mean, train.float() - mean
    heldout = None if heldout is None else heldout.float() - mean
    reference = train
    if heldout is None:
        if heldout_index is None:
            raise ValueError("memorization_check needs `heldout` or `heldout_index`")
        mask = torch.zeros(len(train), dtype=torch.bool)
        mask[torch.as_tensor(heldout_index, dtype=torch.long)] = True
        if mask.all() or not mask.any():
            raise ValueError("heldout_index must leave some training images on both sides")
        heldout, reference = train[mask], train[~mask]
    sim, nearest = (t[:, 0] for t in nearest_neighbors(synthetic, train, 1, chunk_size, device))
    held = nearest_neighbors(heldout, reference, 1, chunk_size, device)[0][:, 0]
    threshold = float(torch.quantile(held.double(), quantile))
    flagged = sim > threshold
    summary = {
        "n_synthetic": len(synthetic), "n_train": len(train), "n_heldout": len(held),
        "feature_dim": synthetic.shape[1], "centered": True, "threshold_quantile": quantile, "threshold": threshold,
        "flagged_count": int(flagged.sum()), "flagged_fraction": float(flagged.float().mean()),
        "heldout_above_threshold": float((held > threshold).float().mean()),
        "synthetic_similarity": describe(sim), "heldout_similarity": describe(held),
        "histogram": histogram({"synthetic": sim, "heldout": held}),
    }
    return MemorizationResult(sim, nearest, flagged, threshold, summary)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--train", required=True, help="training images: folder, CSV with a path column, shards")
    p.add_argument("--synthetic", required=True, help="synthetic images: folder or sample.py's synthetic.csv")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--heldout", default=None, help="real images never trained on (patient-disjoint)")
    p.add_argument("--heldout-fraction", type=cli.probability, default=0.1, help="else held out of --train")
    p.add_argument("--features", choices=["dino", "xrv", "pixel"], default="dino", help="(+ pixel, always)")
    p.add_argument("--dino", default=None, help="DINO Hub id or folder (None: random-init, a smoke test)")
    p.add_argument("--dino-tokens", choices=["cls", "glb"], default="cls",
                   help="cls: the CLS token; glb: all of c_GLB, per-token normalised")
    p.add_argument("--xrv-weights", default=None, help="XRV densenet121-res224-all state dict (eval/densenet.py)")
    p.add_argument("--threshold-quantile", type=cli.probability, default=0.99,
                   help="flag images closer to the training set than this quantile of the held-out ones")
    p.add_argument("--size", type=cli.positive_int, default=None, help="image size (None: the extractor's)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="3: images read as RGB (colour runs)")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="images per batch")
    p.add_argument("--chunk-size", type=cli.positive_int, default=4096, help="similarity block side")
    p.add_argument("--grid", type=cli.positive_int, default=16, help="closest pairs per closest_<space>.png")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="held-out split and random-init DINO")
    p.add_argument("--device", default=None, help="cuda / cpu (None: cuda when available)")
    return p.parse_args(argv)


def build_extractors(args, device) -> tuple[dict, dict[str, str], int]:
    """({space: features fn}, {space: description}, default image size) for the CLI arguments."""
    extractors = {"pixel": pixel_features}
    described = {"pixel": "pixel: 32x32 downsampled, zero-mean, unit-norm (cosine = normalised cross-correlation)"}
    if args.features == "pixel":
        return extractors, described, 64
    if args.features == "xrv":
        from eval.fid import load_extractor

        if args.xrv_weights is None:
            cli.fail("--features xrv needs --xrv-weights (torchxrayvision densenet121-res224-all state dict; "
                     "see eval/densenet.py)")
        model = load_extractor("xrv", args.xrv_weights, device)
        described["xrv"] = f"xrv: torchxrayvision DenseNet-121 pooled features ({args.xrv_weights})"
        return {"xrv": model} | extractors, described, model.resolution
    if args.dino:
        from vit_dino import DinoViT

        dino = DinoViT.from_pretrained(args.dino, device=device).eval().requires_grad_(False)
        what = f"DinoViT.from_pretrained({args.dino!r})"
    else:
        dino = random_dino(args.seed).to(device)
        what = (f"RANDOM-INIT DinoViT(DinoConfig.tiny()), seed {args.seed}: no --dino given, so these "
                "numbers only exercise the pipeline")
        warnings.warn(f"--dino not given: using a {what}", stacklevel=2)
    tokens = {"cls": "CLS token", "glb": "c_GLB tokens, per-token normalised, concatenated"}[args.dino_tokens]
    described["dino"] = f"dino: {tokens} of {what}"
    return {"dino": lambda x: dino_features(dino, x, args.dino_tokens)} | extractors, described, \
        dino.config.image_size


def heldout_split(args, n: int) -> tuple[torch.Tensor, str]:
    """Indices of the --train images held out for calibration (no --heldout given), and their description."""
    n_held = round(args.heldout_fraction * n)
    if not 1 <= n_held < n:
        cli.fail(f"--heldout-fraction {args.heldout_fraction} of {n} training images leaves no held-out or no "
                 "training images; give --heldout DIR")
    index = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:n_held].sort().values
    return index, (f"{n_held} of the {n} --train images (fraction {args.heldout_fraction}, seed {args.seed}) "
                   f"vs the other {n - n_held}")


def closest_grid(res: MemorizationResult, synth_ds, train_ds, args, space: str, path: Path):
    """closest_<space>.png: the args.grid closest pairs, synthetic | nearest train, 4 pairs per row."""
    order = res.similarity.argsort(descending=True)[: args.grid].tolist()
    syn_img = images_at(synth_ds, order, args)
    train_img = images_at(train_ds, res.nearest[order].tolist(), args)
    tiles = [t for i in order for t in (syn_img[i], train_img[int(res.nearest[i])])]
    captions = [t for i in order for t in (f"syn {res.similarity[i]:.3f}" + (" !" if res.flagged[i] else ""),
                                           "nearest train")]
    caption_grid(chunks(tiles, 8), captions=chunks(captions, 8),
                 title=f"{space}: closest pairs (synthetic | nearest train); ! = above {res.threshold:.3f}").save(path)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractors, described, default_size = build_extractors(args, device)
    size = args.size or default_size

    ds = lambda source: open_dataset(source, size, channels=args.channels)  # pixel and DINO features see RGB
    train_ds, synth_ds = ds(args.train), ds(args.synthetic)
    train, train_paths = extract_features(train_ds, extractors, args, device, "train")
    synth, synth_paths = extract_features(synth_ds, extractors, args, device, "synthetic")
    heldout, heldout_index = {}, None
    if args.heldout:
        heldout, _ = extract_features(ds(args.heldout), extractors, args, device, "held-out")
        heldout_desc, n_held = f"--heldout {args.heldout}", len(heldout["pixel"])
    else:
        heldout_index, heldout_desc = heldout_split(args, len(train_paths))
        n_held = len(heldout_index)
    if n_held < 100:
        warnings.warn(f"only {n_held} held-out images: the {args.threshold_quantile} quantile of their "
                      "similarities is close to their maximum; use more for a sharper threshold", stacklevel=1)

    summary = {"train": str(args.train), "synthetic": str(args.synthetic), "heldout": heldout_desc,
               "image_size": size, "spaces": {}}
    rows = [{"path": p} for p in synth_paths]
    for space in extractors:
        res = memorization_check(
            synth[space], train[space], heldout.get(space), heldout_index=heldout_index,
            quantile=args.threshold_quantile, chunk_size=args.chunk_size, device=device)
        summary["spaces"][space] = {"features": described[space]} | res.summary
        print(f"{space}: threshold {res.threshold:.4f} (q={args.threshold_quantile} of held-out), flagged "
              f"{res.summary['flagged_count']}/{len(res.flagged)} ({100 * res.summary['flagged_fraction']:.1f} %)")
        closest_grid(res, synth_ds, train_ds, args, space, out / f"closest_{space}.png")
        for row, sim, j, flag in zip(rows, res.similarity.tolist(), res.nearest.tolist(), res.flagged.tolist()):
            row |= {f"{space}_nearest": train_paths[j], f"{space}_similarity": f"{sim:.6f}",
                    f"{space}_flagged": int(flag)}
    hub.write_csv_atomic(out / "memorization.csv", rows)
    hub.write_json_atomic(summary, out / "memorization.json")
    print(f"wrote memorization.csv, memorization.json and closest_*.png to {out}")
    return summary


if __name__ == "__main__":
    cli.main_guard(main)
