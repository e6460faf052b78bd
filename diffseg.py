"""DiffSeg: zero-shot segmentation from the UNet's self-attention maps, the whole algorithm in one file.

Tian et al., "Diffuse, Attend, and Segment" (CVPR 2024, Sec. 3; reference google/diffseg, segmentor.py), used
by DiNO-Diffusion (arXiv 2407.11594, Sec. 2.4.4) to segment lungs with no training. A self-attention row
p_q = softmax(q_q . K / sqrt(d)) is a distribution over the locations query q looks at. Queries on one object
look at the same places, so their rows are close; DiffSeg clusters rows:

1. Attention aggregation (Sec. 3.2, Eq. 2; `AttentionAggregator`). One UNet forward (t = 300, no noise) gives
   16 head-averaged maps [B, h*w, h*w] on 64/32/16/8 grids for a 512-px image. Layers of one grid are
   averaged; each grid's KEY dims are upsampled bilinearly to the finest grid and renormalised to sum 1, its
   QUERY dims repeated (nearest), and grids summed with weights proportional to their side ([64, 32, 16, 8] /
   120). Result A [B, N, N], N = 64 * 64 (`self_attention`: the forward and the aggregation).
2. Anchors (Sec. 3.3, sampling grid; `anchor_grid`): M x M query locations (M = 16 on 64x64: 1, 5, ..., 61).
3. Iterative attention merging (Sec. 3.3, Eq. 3-4; `merge_attention`) with D(x, y) = (KL(x||y) + KL(y||x)) / 2
   (`symmetric_kl`). Iteration 0: each anchor's proposal = mean of ALL N rows of A within `threshold` of the
   anchor's row. Iterations 1, 2, ...: walk the proposals in order; each not yet matched one is replaced by the
   mean of every proposal within `threshold` of it (matched or not, exactly as the reference); those become
   matched. The survivors are K object maps, distributions over the N locations.
4. Non-maximum suppression (Sec. 3.4; `labels_from_objects`): upsample the object maps bilinearly to the
   output size, every pixel takes the index of the largest map there. Optional: the reference's k-means
   refinement from the object maps (`kmeans_refine`).

Threshold "auto" (`auto_threshold`). KL distances scale with how sharp a model's attention is: SD-size models
merge well at 0.05-1.1, but this repository's small models attend so smoothly that their anchor distances are
~0.001-0.01 and 0.05 merges everything into one segment (docs/results.md). "auto" is the AUTO_QUANTILE = 0.1
quantile of the distances between all pairs of the image's own anchors: "two places are one object when they
are as close as the closest 10 % of anchor pairs". With K similar-sized objects about 1/K of the pairs lie on
one object, so 0.1 keeps objects down to about a tenth of the image apart, at any distance scale (tiny
preset's phantoms: ~4-5 segments; 0.05 ~10, 0.3 mostly one).

Nothing [N, N]-sized is built beyond A itself (distances and upsampling go chunk by chunk), at any grid.
float32 throughout (the reference uses float16 for iteration 0, float64 after).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Smallest normal float32: the clamp only guards log(0), leaving every normal probability untouched (the
# reference has no clamp); log(KL_EPS) = -87.3 keeps products finite: mass where another map has none is far.
KL_EPS = torch.finfo(torch.float32).tiny
AUTO_QUANTILE = 0.1  # threshold="auto": this quantile of the anchor-anchor distances (module docstring)
AUTO_FLOOR = 1e-6  # the rounding of float32 KL of equal rows (merge_attention): smaller cannot be resolved
CHUNK_ROWS = 1024  # rows per chunk: 1024 x 4096 float32 = 16 MiB of temporaries at the 64x64 grid


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class AttentionAggregator:
    """Step 1 as `unet.capture_self_attention`'s callback: each `AttentionMap` (.name, .resolution (h, w),
    .probs [B, h*w, h*w]) joins one float32 running sum per grid. `result()` turns the finest grid's sum into
    the output in place, adds the coarser grids `chunk_rows` output queries at a time (peak at 512 px: about
    68 MiB + 20 MiB of temporaries per image) and empties the aggregator for the next batch. Upsampling the
    keys after averaging equals averaging the upsampled layers exactly: half-pixel bilinear upsampling by an
    integer factor r multiplies every row sum by r^2, so renormalising is linear.
    """

    def __init__(self, chunk_rows: int = CHUNK_ROWS):
        self.chunk_rows, self.resolution, self.sums = chunk_rows, None, {}  # resolution: the last result's grid

    def __call__(self, m):
        (h, w), probs = _pair(m.resolution), m.probs
        if probs.ndim != 3 or probs.shape[1:] != (h * w, h * w):
            raise ValueError(f"attention map {m.name!r}: probs {list(probs.shape)} is not "
                             f"[B, {h * w}, {h * w}] for resolution {(h, w)}")
        batch = {s.shape[0] for s in self.sums.values()}
        if batch and probs.shape[0] not in batch:
            raise ValueError(f"attention map {m.name!r} has batch {probs.shape[0]}, earlier maps {batch.pop()}")
        if (h, w) not in self.sums:
            self.sums[h, w] = torch.zeros(probs.shape, device=probs.device)  # (h, w) -> float32 sum [B, h*w, h*w]
        self.sums[h, w] += probs.detach()

    def grid_weights(self) -> dict[tuple[int, int], float]:
        """The reference's default `weight_ratio`: each grid's side sqrt(h*w) / the sum over the grids."""
        sides = {g: (g[0] * g[1]) ** 0.5 for g in self.sums}
        return {g: s / sum(sides.values()) for g, s in sides.items()}

    def result(self) -> torch.Tensor:
        """-> float32 [B, H*W, H*W] on the finest grid (H, W), every row a distribution (sums to 1)."""
        if not self.sums:
            raise ValueError("AttentionAggregator.result(): no attention maps were added")
        weights, sums, self.sums = self.grid_weights(), self.sums, {}
        out_h, out_w = self.resolution = max(sums, key=lambda g: g[0] * g[1])
        out, n_out = sums.pop((out_h, out_w)), out_h * out_w  # in place: the finest grid's sum becomes the output
        out /= out.sum(-1, keepdim=True)  # the mean of the layers, renormalised as the reference does
        out *= weights[out_h, out_w]
        for (h, w), s in sums.items():
            # the native query feeding each output query: nearest = repeat for integer ratios  [n_out]
            src = ((torch.arange(out_h, device=s.device) * h // out_h)[:, None] * w
                   + (torch.arange(out_w, device=s.device) * w // out_w)[None, :]).reshape(-1)
            for start in range(0, n_out, self.chunk_rows):
                rows, inverse = torch.unique(src[start:start + self.chunk_rows], return_inverse=True)
                keys = s[:, rows].reshape(-1, 1, h, w)  # [B * r, 1, h, w]
                up = F.interpolate(keys, size=(out_h, out_w), mode="bilinear", align_corners=False)
                up = up.reshape(s.shape[0], len(rows), n_out)
                up *= weights[h, w] / up.sum(-1, keepdim=True)  # renormalise, then weight
                out[:, start:start + self.chunk_rows] += up[:, inverse]
        return out


@torch.inference_mode()
def self_attention(unet, latents, context, timestep: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One UNet forward with capture -> aggregated attention [B, N, N] and its grid (h, w)."""
    agg = AttentionAggregator()
    with unet.capture_self_attention(callback=agg):
        unet(latents, timestep, context)
    return agg.result(), agg.resolution


def symmetric_kl(x: torch.Tensor, y: torch.Tensor, eps: float = KL_EPS, chunk_rows: int = CHUNK_ROWS):
    """Pairwise D(x_i, y_j) = (KL(x_i||y_j) + KL(y_j||x_i)) / 2 of row distributions [M, D], [N, D] -> [M, N].

    KL(x||y) = sum x log x - sum x log y, so D = (sum x log x + sum y log y - x . log y - log x . y) / 2:
    two matrix products, log y built chunk by chunk over the rows of y (never [M, N, D]); x, the small set
    (anchors, proposals), is held whole. In x's dtype; log(clamp(p, eps)) guards log 0.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"symmetric_kl needs x [M, D] and y [N, D], got {list(x.shape)} and {list(y.shape)}")
    log_x = x.clamp_min(eps).log_()
    hx = (x[:, None, :] @ log_x[:, :, None]).reshape(-1)  # row-wise sum x log x, no [M, D] temporary
    out = x.new_empty(x.shape[0], y.shape[0])
    for start in range(0, y.shape[0], chunk_rows):
        yc = y[start:start + chunk_rows].to(x.dtype)
        log_yc = yc.clamp_min(eps).log_()  # the only [chunk, D] temporary
        hy = (yc[:, None, :] @ log_yc[:, :, None]).reshape(-1)
        out[:, start:start + chunk_rows] = 0.5 * (hx[:, None] + hy[None, :] - x @ log_yc.T - log_x @ yc.T)
    return out


def anchor_grid(resolution, grid: int = 16, device=None) -> torch.Tensor:
    """Step 2: query indices (row-major, y * w + x) of the M x M anchors: [M * M] LongTensor.

    Per axis of side s, as the reference's `generate_sampling_grid` (written there for s = 64):
    step = (s - 1) // (M - 1), points = start + step * arange(M), start = (s - 1 - step * (M - 1)) // 2.
    s = 64, M = 16: 1, 5, ..., 61;  s = 32, M = 16: 0, 2, ..., 30.
    """
    h, w = _pair(resolution)
    if not 2 <= grid <= min(h, w):
        raise ValueError(f"grid {grid} must be between 2 and the attention grid side {min(h, w)}")
    axis = lambda s, step: (s - 1 - step * (grid - 1)) // 2 + step * torch.arange(grid, device=device)
    return (axis(h, (h - 1) // (grid - 1))[:, None] * w + axis(w, (w - 1) // (grid - 1))[None, :]).reshape(-1)


def auto_threshold(attn: torch.Tensor, resolution, grid: int = 16, quantile: float = AUTO_QUANTILE) -> float:
    """The "auto" merge threshold of ONE image attn [N, N]: the `quantile` of the symmetric KL distances
    between its M x M anchors' attention rows, all pairs i != j (module docstring), in float64 (M*M rows only:
    float32 `symmetric_kl` rounds by ~1e-6, the whole scale of very smooth maps); never below AUTO_FLOOR, so
    that the threshold stays > 0."""
    rows = attn[anchor_grid(resolution, grid, device=attn.device)].double()
    d = symmetric_kl(rows, rows)  # [M*M, M*M]
    off = d[~torch.eye(len(rows), dtype=torch.bool, device=d.device)]
    return max(float(torch.quantile(off, quantile)), AUTO_FLOOR)


def merge_attention(attn: torch.Tensor, resolution, grid: int = 16, threshold=0.05, iterations: int = 3):
    """Steps 2-3 for ONE image: attn [N, N] (rows = queries) -> object maps [K, N] (rows sum to 1).

    threshold: one value, one per iteration (the reference takes a list) or "auto" (`auto_threshold`, for every
    iteration). A map is always within the threshold of itself (the expanded KL of equal rows may give ~1e-6).
    """
    attn = attn.float()
    if threshold == "auto":
        threshold = auto_threshold(attn, resolution, grid)
    ts = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold] * iterations
    if len(ts) != iterations or iterations < 1 or min(ts) <= 0:
        raise ValueError(f"threshold {threshold} must be > 0, one value or one per iteration (iterations={iterations})")
    anchors = anchor_grid(resolution, grid, device=attn.device)
    close = symmetric_kl(attn[anchors], attn) < ts[0]  # [M*M, N]
    close[torch.arange(len(anchors), device=attn.device), anchors] = True
    objects = (close.float() @ attn) / close.sum(1, keepdim=True)  # iteration 0: proposals [M*M, N]
    for t in ts[1:]:
        close = symmetric_kl(objects, objects) < t  # [K, K]
        close.fill_diagonal_(True)
        matched, groups = torch.zeros(len(objects), dtype=torch.bool), []
        for i, row in enumerate(close.cpu()):  # greedy, in proposal order
            if not matched[i]:
                matched |= row
                groups.append(row)
        groups = torch.stack(groups).to(objects)  # [K', K] membership
        objects = (groups @ objects) / groups.sum(1, keepdim=True)
    return objects


def kmeans_refine(attn: torch.Tensor, objects: torch.Tensor, max_iter: int = 300, tol: float = 1e-4):
    """The reference's optional refinement: k-means (Lloyd) over the N rows of attn [N, N], started at the
    object maps [K, N]; returns the means of the non-empty clusters [K', N].

    Stops as sklearn's KMeans(n_init=1): when no label changes or the squared center shift falls to
    tol * mean per-feature variance. An emptied cluster keeps its center (sklearn relocates it instead).
    """
    attn, centers = attn.float(), objects.float()
    tol = tol * attn.var(0, correction=0).mean()
    sq = (attn * attn).sum(1, keepdim=True)  # [N, 1]
    assign = lambda c: (sq - 2 * attn @ c.T + (c * c).sum(1)).argmin(1)  # the nearest center (squared Euclidean) [N]
    labels = assign(centers)
    for _ in range(max_iter):
        onehot = F.one_hot(labels, len(centers)).float()  # [N, K]
        counts = onehot.sum(0)
        new = torch.where(counts[:, None] > 0, (onehot.T @ attn) / counts.clamp_min(1)[:, None], centers)
        shift, centers, old = ((new - centers) ** 2).sum(), new, labels
        labels = assign(centers)
        if torch.equal(labels, old) or shift <= tol:
            break
    onehot = F.one_hot(labels, len(centers)).float()
    counts = onehot.sum(0)
    return (onehot.T @ attn)[counts > 0] / counts[counts > 0, None]


def labels_from_objects(objects: torch.Tensor, resolution, out_size=None, upsample: str = "bilinear",
                        chunk: int = 16) -> torch.Tensor:
    """Step 4: object maps [K, h*w] -> label map LongTensor [H, W] (values index the objects; ties -> lowest).

    "bilinear" (reference): upsample the maps (half-pixel, as Keras UpSampling2D) then argmax, `chunk` maps at
    a time with a running max (512 px: 16 x 1 MiB). "nearest": argmax on the h x w grid, then repeat.
    """
    h, w = _pair(resolution)
    size = (h, w) if out_size is None else _pair(out_size)
    maps = objects.float().reshape(-1, 1, h, w)
    if upsample == "nearest":
        return F.interpolate(maps[:, 0].argmax(0)[None, None].float(), size=size, mode="nearest")[0, 0].long()
    if upsample != "bilinear":
        raise ValueError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")
    best = torch.full(size, -torch.inf, device=maps.device)
    labels = torch.zeros(size, dtype=torch.long, device=maps.device)
    for start in range(0, len(maps), chunk):
        value, index = F.interpolate(maps[start:start + chunk], size=size, mode="bilinear",
                                     align_corners=False)[:, 0].max(0)
        better = value > best  # strict: earlier objects win ties
        best, labels = torch.where(better, value, best), torch.where(better, index + start, labels)
    return labels


def diffseg(attn: torch.Tensor, grid: int = 16, threshold=0.05, iterations: int = 3, out_size=None,
            resolution=None, upsample: str = "bilinear", refine: bool = False) -> torch.Tensor:
    """Aggregated attention [B, N, N] -> label maps LongTensor [B, H, W] (steps 2-4, image by image).

    resolution: the attention grid (h, w); default sqrt(N) square. out_size: int or (H, W), e.g. the image
    size; default the attention grid. Defaults (grid 16, threshold 0.05) are DiNO-Diffusion's; vanilla SD
    uses 32 and 0.5. Deterministic.
    """
    h, w = _pair(resolution or round(attn.shape[-1] ** 0.5))
    if attn.ndim != 3 or attn.shape[1:] != (h * w, h * w):
        raise ValueError(f"diffseg: attention {list(attn.shape)} is not [B, {h * w}, {h * w}] for the grid {(h, w)}"
                         + ("" if resolution else ": N is not a square grid, pass resolution=(h, w)"))
    objects = [(a, merge_attention(a, (h, w), grid, threshold, iterations)) for a in attn]
    return torch.stack([labels_from_objects(kmeans_refine(a, obj) if refine else obj, (h, w), out_size, upsample)
                        for a, obj in objects])
