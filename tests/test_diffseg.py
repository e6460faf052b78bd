"""DiffSeg (diffseg.py) on synthetic attention maps, and the lung evaluation rules (segment_lungs.py)."""

import functools
import itertools
import warnings
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from diffseg import (
    AttentionAggregator,
    anchor_grid,
    auto_threshold,
    diffseg,
    kmeans_refine,
    merge_attention,
    symmetric_kl,
)
from eval.metrics import dice
from segment_lungs import best_union_dice, hungarian_dice, lung_scores, nms_dice
from tests.support_segment import aggregate, diffseg_from_maps

AttentionMap = namedtuple("AttentionMap", "name resolution probs")  # the unet.AttentionMap contract


def random_maps(sides, batch=1, layers=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [AttentionMap(f"{s}.{i}", (s, s), (3 * torch.randn(batch, s * s, s * s, generator=g)).softmax(-1))
            for s in sides for i in range(layers)]


def naive_aggregate(maps, out):
    """Reference formula: full upsampling of every grid at once, no chunks, no in-place tricks."""
    by_res = {}
    for m in maps:
        by_res.setdefault(m.resolution, []).append(m.probs)
    total = sum(r[0] for r in by_res)
    result = 0
    for (h, w), probs in by_res.items():
        p = torch.stack(probs).mean(0)
        b = p.shape[0]
        up = F.interpolate(p.reshape(-1, 1, h, w), size=(out, out), mode="bilinear", align_corners=False)
        up = up.reshape(b, h, w, out * out)
        up = up / up.sum(-1, keepdim=True)
        up = up.repeat_interleave(out // h, 1).repeat_interleave(out // w, 2).reshape(b, out * out, out * out)
        result = result + up * h / total
    return result


def blob_partition(side=16):
    """4 regions on a side x side grid: background 0, two 'lungs' 1 and 2, a 'heart' 3."""
    y, x = torch.meshgrid((torch.arange(side) + 0.5) / side, (torch.arange(side) + 0.5) / side, indexing="ij")
    lab = torch.zeros(side, side, dtype=torch.long)
    lab[((x - 0.28) / 0.17) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1] = 1
    lab[((x - 0.72) / 0.17) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1] = 2
    lab[(x - 0.5) ** 2 + (y - 0.75) ** 2 < 0.14 ** 2] = 3
    return lab


def partition_maps(lab, sigma=0.15, floor=1e-3):
    """Each query attends to its own region (more to nearby pixels) plus a small floor everywhere."""
    s = lab.shape[0]
    y, x = torch.meshgrid(torch.arange(s) / s, torch.arange(s) / s, indexing="ij")
    pos = torch.stack([y.reshape(-1), x.reshape(-1)], 1)
    same = (lab.reshape(-1, 1) == lab.reshape(1, -1)).float()
    p = same * (1 + torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * sigma ** 2))) + floor
    return p / p.sum(1, keepdim=True)


@functools.lru_cache
def synthetic():
    """A 32x32 partition (from a 16x16 one) with maps at 32 (2 layers) and 16 (1 layer)."""
    lab16 = blob_partition(16)
    lab32 = lab16.repeat_interleave(2, 0).repeat_interleave(2, 1)
    a32, a16 = partition_maps(lab32)[None], partition_maps(lab16)[None]
    maps = [AttentionMap("up.0", (32, 32), a32), AttentionMap("mid", (16, 16), a16),
            AttentionMap("up.1", (32, 32), a32)]
    return lab32, maps


def region_dice(labels, truth):
    """Per-region Dice after matching regions to distinct predicted labels (the best matching, by search)."""
    ids = torch.unique(labels)
    d = torch.tensor([[2 * ((truth == r) & (labels == i)).sum().item()
                       / ((truth == r).sum() + (labels == i).sum()).item() for i in ids]
                      for r in torch.unique(truth)])
    rows = torch.arange(len(d))
    if len(ids) < len(d):  # fewer labels than regions: the unmatched regions score 0
        d = torch.cat([d, torch.zeros(len(d), len(d) - len(ids))], 1)
    cols = max(itertools.permutations(range(d.shape[1]), len(d)), key=lambda c: d[rows, list(c)].sum())
    return d[rows, list(cols)]


# ------------------------------------------------------------------------------------------ symmetric KL


def test_symmetric_kl_matches_naive_and_is_symmetric():
    x = torch.randn(5, 20).softmax(-1)
    y = torch.randn(7, 20).softmax(-1)
    naive = 0.5 * ((x[:, None] - y[None]) * (x[:, None].log() - y[None].log())).sum(-1)
    d = symmetric_kl(x, y)
    assert d.dtype == torch.float32 and d.shape == (5, 7)
    torch.testing.assert_close(d, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(symmetric_kl(y, x), d.T, atol=1e-6, rtol=0)
    assert symmetric_kl(x, x).diagonal().abs().max() < 1e-6  # zero on equal inputs
    torch.testing.assert_close(symmetric_kl(x, y, chunk_rows=2), d, atol=1e-6, rtol=0)  # chunked == whole


def test_symmetric_kl_zero_entries_stay_finite():
    x = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    d = symmetric_kl(x, x)
    assert torch.isfinite(d).all() and d[0, 0].abs() < 1e-6 and d[0, 1] > 10  # mass on a zero: far
    with pytest.raises(ValueError, match=r"\[2, 3\].*\[2, 4\]"):
        symmetric_kl(x, torch.ones(2, 4) / 4)


# ------------------------------------------------------------------------------------------ aggregation


def test_aggregator_matches_naive_formula():
    maps = random_maps((8, 4, 2), batch=2, layers=2) + random_maps((8,), batch=2, seed=1)
    agg = aggregate(maps, chunk_rows=7)  # odd chunks cross grid rows; usable as capture_self_attention's callback
    torch.testing.assert_close(agg.grid_weights(), {(8, 8): 8 / 14, (4, 4): 4 / 14, (2, 2): 2 / 14})
    out = agg.result()
    assert out.shape == (2, 64, 64) and out.dtype == torch.float32 and agg.resolution == (8, 8)
    torch.testing.assert_close(out, naive_aggregate(maps, 8), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 64), atol=1e-5, rtol=0)  # rows are distributions
    assert not agg.sums  # emptied: ready for the next batch


def test_aggregator_bad_inputs():
    agg = AttentionAggregator()
    with pytest.raises(ValueError, match="no attention maps"):
        agg.result()
    with pytest.raises(ValueError, match=r"'bad'.*\[1, 16, 15\]"):
        agg(AttentionMap("bad", (4, 4), torch.ones(1, 16, 15)))
    agg(random_maps((4,), batch=2)[0])
    with pytest.raises(ValueError, match="batch 1"):
        agg(random_maps((2,), batch=1)[0])


# ------------------------------------------------------------------------------------------ DiffSeg


def test_anchor_grid_follows_reference():
    a = anchor_grid(64, 16)
    rows, cols = a // 64, a % 64
    assert len(a) == 256 and torch.equal(torch.unique(rows), torch.arange(1, 62, 4))
    assert torch.equal(rows[:16], torch.ones(16, dtype=torch.long)) and torch.equal(cols[:16], torch.arange(1, 62, 4))
    assert torch.equal(torch.unique(anchor_grid(32, 16) % 32), torch.arange(0, 31, 2))
    with pytest.raises(ValueError, match="grid 20"):
        anchor_grid(16, 20)


def test_diffseg_recovers_partition():
    truth, maps = synthetic()
    labels, objects = diffseg_from_maps(maps, grid=8, threshold=0.5, return_objects=True)
    assert labels.shape == (1, 32, 32) and labels.dtype == torch.long
    assert objects[0].shape == (4, 32, 32)
    torch.testing.assert_close(objects[0].sum((1, 2)), torch.ones(4))  # object maps are distributions
    assert region_dice(labels[0], truth).min() > 0.95
    again = diffseg_from_maps(maps, grid=8, threshold=[0.5, 0.5, 0.5])
    assert torch.equal(again, labels)  # deterministic; one threshold per iteration accepted
    # "nearest": argmax on the grid, then repeat -> exactly the repeated partition
    up = diffseg_from_maps(maps, grid=8, threshold=0.5, out_size=64, upsample="nearest")[0]
    assert region_dice(up, truth.repeat_interleave(2, 0).repeat_interleave(2, 1)).min() > 0.95
    # k-means refinement started at a correct solution keeps it
    refined = diffseg_from_maps(maps, grid=8, threshold=0.5, refine=True)
    assert region_dice(refined[0], truth).min() > 0.95


def test_auto_threshold_follows_the_models_distance_scale():
    """threshold="auto" (a quantile of the anchor-anchor KL) finds the 4 regions on sharp maps and on maps
    150x smoother (tempered: p^0.1), where the fixed 0.5 that suits the sharp ones merges everything."""
    truth, maps = synthetic()
    attn = aggregate(maps).result()
    smooth = attn ** 0.1
    smooth /= smooth.sum(-1, keepdim=True)
    for a, min_dice in ((attn, 0.95), (smooth, 0.85)):
        labels = diffseg(a, grid=8, threshold="auto")[0]
        assert labels.unique().numel() == 4 and region_dice(labels, truth).min() > min_dice
    assert auto_threshold(smooth[0], (32, 32), 8) < auto_threshold(attn[0], (32, 32), 8) / 100
    assert diffseg(smooth, grid=8, threshold=0.5)[0].unique().numel() == 1  # the fixed value: one segment
    assert auto_threshold(torch.ones(16, 16) / 16, 4, 2) > 0  # equal rows: the floor, still > 0


def test_merge_iterations_reduce_proposals():
    truth, maps = synthetic()
    attn = aggregate(maps).result()[0]
    one = merge_attention(attn, (32, 32), grid=8, threshold=0.5, iterations=1)
    assert one.shape == (64, 1024)  # iteration 0: one proposal per anchor
    assert merge_attention(attn, (32, 32), grid=8, threshold=0.5).shape == (4, 1024)
    obj = kmeans_refine(attn, one[:4])  # from a poor start: still rows that sum to 1
    torch.testing.assert_close(obj.sum(1), torch.ones(len(obj)))


def test_kmeans_refine_matches_sklearn():
    KMeans = pytest.importorskip("sklearn.cluster").KMeans
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 30, generator=g)[torch.randint(0, 5, (300,), generator=g)] + 0.3 * torch.rand(300, 30, generator=g)
    init = x[:5].clone()  # a poor start: k-means must move the centers
    labels = KMeans(n_clusters=5, init=init.double().numpy(), n_init=1).fit(x.double().numpy()).labels_
    ref = torch.stack([x[torch.from_numpy(labels == i)].mean(0) for i in range(5)])
    torch.testing.assert_close(kmeans_refine(x, init), ref, atol=1e-5, rtol=1e-5)


def test_shapes_512px_input():
    maps = random_maps((64, 32, 16, 8))  # latent 64x64: the SD v1 grids
    agg = aggregate(maps)
    torch.testing.assert_close(agg.grid_weights(), {(s, s): s / 120 for s in (64, 32, 16, 8)})
    attn = agg.result()
    assert attn.shape == (1, 4096, 4096)
    labels = diffseg(attn, grid=4, out_size=512)
    assert labels.shape == (1, 512, 512) and labels.dtype == torch.long


def test_shapes_256px_input():
    maps = random_maps((32, 16, 8, 4), batch=2)
    labels, objects = diffseg_from_maps(maps, grid=8, out_size=256, return_objects=True)
    assert labels.shape == (2, 256, 256) and len(objects) == 2 and objects[0].shape[1:] == (32, 32)
    assert all(lab.max() < len(obj) for lab, obj in zip(labels, objects))  # labels index the object maps


def test_diffseg_bad_inputs():
    with pytest.raises(ValueError, match="not a square grid"):
        diffseg(torch.ones(1, 12, 12) / 12)
    with pytest.raises(ValueError, match="iterations=3"):
        diffseg(torch.ones(1, 16, 16) / 16, grid=2, threshold=[0.1, 0.1])
    with pytest.raises(ValueError, match="upsample"):
        diffseg(torch.ones(1, 16, 16) / 16, grid=2, upsample="cubic")


# ------------------------------------------------------------------------------------------ evaluation


def test_hungarian_matches_scipy_assignment():
    """The two-class rule of hungarian_dice finds an optimal assignment of hist [2, K], as scipy's
    linear_sum_assignment: the same matched total always, the same lung segment when the optimum is unique."""
    scipy_lsa = pytest.importorskip("scipy.optimize").linear_sum_assignment
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        k, side = 1 + trial % 5, 2 + trial % 4
        labels = torch.randint(0, k, (side, side), generator=g) * 3
        gt = torch.rand(side, side, generator=g) < (0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0)[trial % 7]  # + no/all lung
        ids = torch.unique(labels)
        sizes = torch.stack([(labels == i).sum() for i in ids]).double()
        for criterion in ("overlap", "iou"):
            h = torch.stack([torch.stack([((labels == i) & (gt == c)).sum() for i in ids]) for c in (0, 1)]).double()
            h = h / (h.sum(1, keepdim=True) + sizes - h) if criterion == "iou" else h
            present = [c for c in (0, 1) if (gt == c).any()]
            rows, cols = scipy_lsa(h[present].numpy(), maximize=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # empty gt
                ours = [int((ids == s).nonzero()) for s in hungarian_dice(labels, gt, criterion).segments]
            bg = [j for j in range(len(ids)) if j not in ours] if 0 in present else []
            total = sum(float(h[1, j]) for j in ours) + max([float(h[0, j]) for j in bg], default=0.0)
            assert total == pytest.approx(float(h[present].numpy()[rows, cols].sum()), abs=1e-12)
            lung = [int(c) for r, c in zip(rows, cols) if present[r] == 1]
            pairs = [float(h[0, a] + h[1, b]) for a in range(len(ids)) for b in range(len(ids)) if a != b]
            assert ours == lung or len(present) < 2 or len(ids) < 2 or pairs.count(max(pairs)) > 1


def greedy_union(labels, gt):
    """Forward selection: best single segment, then add the segment that most improves Dice."""
    ids, chosen, best = torch.unique(labels).tolist(), [], 0.0
    while True:
        options = [(float(dice(torch.isin(labels, torch.tensor(chosen + [i])), gt)), i)
                   for i in ids if i not in chosen]
        if not options or max(options)[0] <= best:
            return best
        best, i = max(options)
        chosen.append(i)


def test_best_union_is_exact():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        labels = torch.randint(0, 7, (4, 4), generator=g).repeat_interleave(3, 0).repeat_interleave(3, 1)
        gt = torch.rand(12, 12, generator=g) < 0.4
        ids = torch.unique(labels).tolist()
        brute = max(2 * (torch.isin(labels, torch.tensor(s)) & gt).sum().item()
                    / (torch.isin(labels, torch.tensor(s)).sum() + gt.sum()).item()
                    for n in range(1, len(ids) + 1) for s in itertools.combinations(ids, n))
        assert best_union_dice(labels, gt).dice == pytest.approx(brute, abs=1e-12)
    # greedy forward selection cannot drop its first pick: 5 pure lung segments beat the best single one
    labels = torch.cat([torch.arange(1, 6).repeat_interleave(12), torch.full((200,), 6), torch.zeros(140)])
    gt = torch.cat([torch.ones(60), torch.ones(40), torch.zeros(300)]).bool()
    labels, gt = labels.long().reshape(20, 20), gt.reshape(20, 20)
    exact = best_union_dice(labels, gt)
    assert exact.dice == pytest.approx(0.75) and exact.segments == (1, 2, 3, 4, 5)
    assert greedy_union(labels, gt) == pytest.approx(200 / 360)


def test_nms_hungarian_and_scores():
    labels = torch.zeros(10, 10, dtype=torch.long)
    labels[2:8, 1:4], labels[2:8, 6:9], labels[8:10, :] = 1, 2, 3  # left lung, right lung, a mixed strip
    gt = (labels == 1) | (labels == 2)
    gt[9, :] = True  # half of segment 3 is lung: not a majority
    nms, hung, best = nms_dice(labels, gt), hungarian_dice(labels, gt), best_union_dice(labels, gt)
    assert nms.segments == (1, 2) and nms.mask.equal((labels == 1) | (labels == 2))
    assert hung.segments in {(1,), (2,)}  # one segment per class: background takes 0, lung one of the lungs
    assert hungarian_dice(labels, gt, criterion="iou").segments in {(1,), (2,)}
    assert best.dice >= max(nms.dice, hung.dice) and best.segments == (1, 2, 3)
    scores = lung_scores(labels, gt)
    assert scores == {"dice_best_union": best.dice, "dice_nms": nms.dice, "dice_hungarian": hung.dice,
                      "num_segments": 4}


def test_evaluation_bad_inputs_and_empty_gt():
    labels = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels \[4, 4\] and gt \[5, 5\]"):
        best_union_dice(labels, torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer"):
        nms_dice(labels.float(), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="mask > 127"):
        hungarian_dice(labels, torch.full((4, 4), 255))
    with pytest.raises(ValueError, match="criterion"):
        hungarian_dice(labels, torch.ones(4, 4), criterion="dice")
    labels[:2] = 1
    with pytest.warns(UserWarning, match="empty"):
        scores = lung_scores(labels, torch.zeros(4, 4, dtype=torch.bool))
    assert scores["dice_best_union"] == scores["dice_nms"] == scores["dice_hungarian"] == 1.0
    with pytest.warns(UserWarning, match="empty"):
        assert hungarian_dice(labels, torch.zeros(4, 4)).segments == ()


def test_mask_baselines():
    from segment_lungs import mask_baselines

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 12, 12, generator=g) > 0.4
    base = mask_baselines(masks)
    assert torch.allclose(base["all_foreground"], dice(torch.ones_like(masks), masks))
    for i in range(5):  # leave-one-out: the prior of image i is the majority vote of the other four
        others = torch.cat([masks[:i], masks[i + 1 :]]).float().mean(0) >= 0.5
        assert base["prior"][i] == pytest.approx(dice(others, masks[i]).item())
    with pytest.raises(ValueError, match="N >= 2"):
        mask_baselines(masks[:1])


def test_block_partition():
    from segment_lungs import block_partition

    blocks = block_partition(10, 12, 9)  # round(sqrt(10)) = 3 -> 3 x 3 blocks
    assert blocks.shape == (12, 9) and blocks.unique().tolist() == list(range(9))
    assert (blocks[:4, :3] == 0).all() and (blocks[8:, 6:] == 8).all()
    assert block_partition(1, 5, 5).unique().tolist() == [0]
