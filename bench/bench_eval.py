"""Benchmark eval/ against its references on CPU (same random weights / same covariances).

Rows:
- frechet_distance D=2048 (full rank): ours (Cholesky + eigvalsh, float64 torch) vs pytorch-fid's
  `calculate_frechet_distance` (scipy.linalg.sqrtm of S1 S2); both FID values are reported.
- frechet_distance D=2048 (rank-deficient: 1024 and 512 samples): ours (eigh path) vs pytorch-fid (sqrtm of a
  singular product).
- xrv_densenet121 features (B=8, 224 px): `XRVDenseNetFeatures` vs torchxrayvision `DenseNet.features2`.
- inception_v3 pool3 (B=8, 299 px): `InceptionV3Features` vs pytorch-fid `InceptionV3([3])`.

`quick` uses D=512 covariances and fewer repeats. Run: `python -m bench.bench_eval [--quick]`.
"""

from __future__ import annotations

import argparse
from unittest import mock

import numpy as np
import torch

from bench.common import make_row, measure, print_table
from eval.densenet import XRVDenseNetFeatures
from eval.fid import frechet_distance
from eval.inception import InceptionV3Features
from tests.helpers import patch_torchvision

BATCH = 8


def _covariance(dim: int, samples: int, seed: int):
    """Mean and covariance of `samples` feature vectors with a decaying spectrum, like network features."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((samples, dim)) * np.linspace(1.0, 0.05, dim) + 0.3 * g.standard_normal(dim)
    return x.mean(0), np.cov(x, rowvar=False)


def _frechet_row(dim: int, label: str, n1: int, n2: int) -> dict:
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu1, s1 = _covariance(dim, n1, seed=0)
    mu2, s2 = _covariance(dim, n2, seed=1)
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    values = {}

    def ours():
        values["ours"] = frechet_distance(mu1, t1, mu2, t2)

    def ref():
        values["ref"] = float(calculate_frechet_distance(mu1, s1, mu2, s2))

    m = measure(ours, ref, repeats=1, warmup=0)  # nothing to warm up; scipy's sqrtm takes a minute at 2048-d
    rel = abs(values["ours"] - values["ref"]) / abs(values["ref"])
    return make_row(f"frechet_distance D={dim} ({label})", m, ours_value=values["ours"],
                    ref_value=values["ref"], rel_diff=rel)


def _xrv_row(repeats: int) -> dict:
    import torchxrayvision as xrv

    ref = xrv.models.DenseNet(weights=None).eval()  # 1 channel, 18 classes: densenet121-res224-all's shape
    ours = XRVDenseNetFeatures().eval()
    ours.net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(BATCH, 1, 224, 224)
    x_xrv = (2 * x - 1) * 1024  # XRV's normalisation; ours does it inside
    with torch.inference_mode():
        m = measure(lambda: ours(x), lambda: ref.features2(x_xrv), repeats=repeats)
    return make_row(f"xrv_densenet121 features (B={BATCH}, 224 px)", m)


def _inception_row(repeats: int) -> dict:
    import pytorch_fid.inception as pfi

    ours = InceptionV3Features().eval()
    state = ours.state_dict()
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: dict(state)):  # no download
        ref = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.rand(BATCH, 3, 299, 299)
    with torch.inference_mode():
        m = measure(lambda: ours(x), lambda: ref(x)[0], repeats=repeats)
    return make_row(f"inception_v3 pool3 (B={BATCH}, 299 px)", m)


def run(quick: bool) -> list[dict]:
    patch_torchvision()
    dim, repeats = (512, 2) if quick else (2048, 5)
    return [
        _frechet_row(dim, "full rank", 2 * dim, 3 * dim),
        _frechet_row(dim, "rank-deficient", dim // 2, dim // 4),
        _xrv_row(repeats),
        _inception_row(repeats),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512-d covariances, fewer repeats")
    rows = run(parser.parse_args().quick)
    print_table(rows)
    for r in rows:
        if "ours_value" in r:
            print(f"{r['name']}: ours {r['ours_value']:.6f}  pytorch-fid {r['ref_value']:.6f}  "
                  f"rel diff {r['rel_diff']:.1e}")
