"""Evaluation of DiNO-Diffusion: FID (`eval.fid`, with the XRV DenseNet-121 of `eval.densenet` and the FID
Inception-v3 of `eval.inception`), ROC AUC, Dice and the paired t-test (`eval.metrics`), MS-SSIM diversity
(`eval.msssim`, `eval.diversity`), memorisation (`eval.memorization`), every figure (`eval.figures`) and what a
training run measures (`eval.training`). The lung selection rules live with segment.py (`segment_lungs`).

Submodules are imported explicitly (`from eval.fid import fid`), so `eval.metrics` stays light.
"""
