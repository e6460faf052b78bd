"""Test-only helpers for diffseg.py / segment.py (no script uses them)."""

from diffseg import AttentionAggregator, diffseg, merge_attention


def aggregate(maps, chunk_rows=None):
    """AttentionMaps (e.g. the list `unet.capture_self_attention()` yields) -> the aggregator after adding all."""
    agg = AttentionAggregator() if chunk_rows is None else AttentionAggregator(chunk_rows)
    for m in maps:
        agg(m)
    return agg


def diffseg_from_maps(maps, grid=16, threshold=0.05, iterations=3, out_size=None, upsample="bilinear",
                      refine=False, return_objects=False):
    """AttentionMaps -> label maps [B, H, W] (steps 1-4); with return_objects, also each image's object maps
    [K, h, w] (before refinement), whose indices the labels hold."""
    agg = aggregate(maps)
    attn = agg.result()
    labels = diffseg(attn, grid, threshold, iterations, out_size, agg.resolution, upsample, refine)
    if not return_objects:
        return labels
    return labels, [merge_attention(a, agg.resolution, grid, threshold, iterations).reshape(-1, *agg.resolution)
                    for a in attn]
