"""The downstream experiment (DiNO-Diffusion Sec. 2.4.2-2.4.3): does adding synthetic CXRs help a classifier?

1. A fixed real test set (--test, or a seeded 20 % of --real; patient-level with a `patient_id` column).
2. Nested, label-balanced regimes of N real images (paper: N = 50, 100, 500, 1000, 5000).
3. Real:synthetic ratios 1:k (paper: 1:0, 1:1, 1:5, 1:10, 1:50) from sample.py's synthetic.csv: round(k * n)
   rows for n real images, each made only from real training images of the same fold; --fully-synthetic
   trains on the synthetic rows alone (paper Sec. 2.4.3).
4. K-fold CV inside each regime, validation always real; fold f has the same real split and initialisation
   at every ratio, so ratios pair by fold.
5. DenseNet-121, BCE-with-logits, AdamW lr 1e-4, weight decay 1e-5, batch 64, at most 150 epochs,
   ReduceLROnPlateau (patience 10) on the validation mean AUC, early stop after 25 epochs without a gain
   (paper Sec. 3, implementation details); the best-validation weights get the per-label test AUC.
6. Mean test AUC +- std over folds per (regime, ratio), paired t-test over folds vs 1:0 (p < 0.05: *).

The rules of 1-4 and 6 are in classify_protocol.py; `run_cell` trains one (regime, ratio, fold). results.csv
gets a row per finished cell: a rerun with the same arguments skips those, other settings are refused.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import classify_protocol as ex
import cli
import hub
from data import LABELS
from data.readers import read_image
from data.transforms import preprocess_cxr
from eval.densenet import DenseNet121
from eval.figures import line_plot
from eval.metrics import roc_auc

NOT_CONFIG = ("out", "overwrite", "device", "num_workers")  # arguments that do not change the results
FIELDS = ["regime", "ratio", "fold", "n_real", "n_synthetic", "mean_auc", "epochs", "best_epoch", "best_val_auc"]


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--real", required=True, help="labelled CSV of real images (path + label columns)")
    p.add_argument("--synthetic", help="sample.py's synthetic.csv (default: none, only ratio 1:0 runs)")
    p.add_argument("--test", help="fixed test CSV (default: a seeded 20 %% of --real, whole patients)")
    p.add_argument("--labels", type=cli.comma_list(str), help="label columns (default: the 7 paper labels)")
    cli.add_data_flags(p, labels=True)  # --path-column, --image-root (for --real, --test), --uncertain
    p.add_argument("--regimes", type=cli.comma_list(cli.positive_int), default="50,100,500,1000,5000",
                   help="real training-set sizes N")
    p.add_argument("--ratios", type=cli.comma_list(ex.parse_ratio),
                   help="k of the real:synthetic ratios 1:k (default: 0,1,5,10,50 with --synthetic, else 0)")
    p.add_argument("--fully-synthetic", action="store_true", help="add synthetic-only ('inf', as many as the top k)")
    p.add_argument("--folds", type=cli.number(int, 2), default=5, help="cross-validation folds per regime")
    p.add_argument("--out", required=True, help="output folder (results.csv, summary.md, auc_vs_ratio.png)")
    p.add_argument("--overwrite", action="store_true", help="empty an --out of other settings, start clean")
    p.add_argument("--model", choices=("densenet121", "tiny"), default="densenet121", help="tiny: 30k parameters, CPU")
    p.add_argument("--weights", help="torchvision (ImageNet, 3 channels) or XRV (grey) DenseNet-121 state dict to "
                   "start from, inputs scaled as each expects (default: random init, inputs 2x-1)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 = grey; 3 = RGB (ImageNet-normalised)")
    p.add_argument("--image-size", type=cli.positive_int, default=224, help="square input size in pixels")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="training images per step (paper: 64)")
    p.add_argument("--lr", type=cli.positive_float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=cli.nonneg_float, default=1e-5, help="AdamW weight decay")
    p.add_argument("--patience", type=cli.nonneg_int, default=10, help="ReduceLROnPlateau patience (epochs)")
    p.add_argument("--early-stop", type=cli.positive_int, default=25, help="epochs without a val-AUC gain to stop")
    p.add_argument("--max-epochs", type=cli.positive_int, default=150, help="most epochs per cell (paper: 150)")
    p.add_argument("--num-workers", type=cli.nonneg_int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the test split, folds, subsets and networks")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data
class ImageBank:
    """Preprocessed images kept as uint8 [C, S, S], C = --channels (quantised the same way whether cached or not)."""

    def __init__(self, paths: list[str], size: int, threads: int, channels: int = 1):
        self.paths, self.size, self.threads, self.channels, self.images = paths, size, max(1, threads), channels, {}

    def _read(self, i: int) -> torch.Tensor:
        x = preprocess_cxr(read_image(self.paths[i], self.channels), self.size)  # float [C, S, S] in [0, 1]
        return (x * 255).round().to(torch.uint8)

    def load(self, ids):
        todo = sorted({int(i) for i in ids} - self.images.keys())
        with ThreadPoolExecutor(self.threads) as pool:
            for i, img in zip(todo, tqdm(pool.map(self._read, todo), total=len(todo), desc="images", leave=False)):
                self.images[i] = img

    def batch(self, ids) -> torch.Tensor:
        return torch.stack([self.images[int(i)] for i in ids]).float() / 255  # [B, C, S, S]


def split_real(args, names) -> tuple[ex.Table, ex.Table]:
    """-> (pool of real training candidates, fixed test set); patient-level when --real has a patient_id column."""
    csv_args = dict(uncertain=cli.UNCERTAIN[args.uncertain], path_column=args.path_column, image_root=args.image_root)
    real = ex.load_table(args.real, names, "patient_id", "--real", **csv_args)
    level = "patient" if "patient_id" in real.extras else "image"
    if args.test:  # drop real rows that are test images, or of test patients
        test = ex.load_table(args.test, names, "patient_id", "--test", **csv_args)
        seen = {str(Path(p).resolve()) for p in test.paths} | set(test.groups)  # its images and patients
        in_test = np.array([str(Path(p).resolve()) in seen or g in seen for p, g in zip(real.paths, real.groups)], bool)
    else:
        in_test = ex.holdout_split(real.groups, 0.2, args.seed)
        test = real.subset(in_test)
    for name, n_pos, n in zip(names, np.nansum(test.labels, 0), (~np.isnan(test.labels)).sum(0)):
        if n_pos in (0, n):  # n: the test images where the label is known (not ignored)
            warnings.warn(f"test label {name!r} has only one class ({int(n_pos)} of {n} "
                          "positive): its AUC is nan and left out of the mean", stacklevel=2)
    print(f"real pool {int((~in_test).sum())}, test {len(test.paths)} ({level}-level splits), labels {names}")
    return real.subset(~in_test), test


# ------------------------------------------------------------------------------------------------ model
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet stats


def build_model(args, num_labels: int) -> tuple[nn.Module, int, str]:
    """-> (DenseNet with a new head of `num_labels` outputs, input channels, input scaling): 'unit' (2x-1)
    without weights, 'imagenet' for 3-channel weights (grey images repeated) or colour (--channels 3), 'xrv'
    for torchxrayvision's 1-channel ones."""
    if args.weights is None:
        net = (DenseNet121.tiny if args.model == "tiny" else DenseNet121)(
            in_channels=args.channels, num_classes=num_labels)
        return net, args.channels, "imagenet" if args.channels == 3 else "unit"
    if args.model != "densenet121":
        cli.fail("--weights holds a DenseNet-121; use --model densenet121")
    net = DenseNet121.from_pretrained(args.weights)
    in_ch = net.config.in_channels
    if in_ch < args.channels:
        cli.fail(f"--weights {args.weights}: a grey ({in_ch}-channel) DenseNet cannot take --channels 3 images")
    net.classifier = nn.Linear(net.num_features, num_labels)
    return net, in_ch, "imagenet" if in_ch == 3 else "xrv"


def model_input(x: torch.Tensor, in_ch: int, norm: str) -> torch.Tensor:
    """[B, 1 or 3, S, S] in [0, 1] -> the network's input [B, in_ch, S, S]."""
    x = x.expand(-1, in_ch, -1, -1)
    if norm != "imagenet":
        return (2 * x - 1) * (1024 if norm == "xrv" else 1)  # xrv: torchxrayvision's [-1024, 1024] range
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the known labels: nan entries (--uncertain ignore) add no loss or gradient."""
    known = ~torch.isnan(y)
    loss = F.binary_cross_entropy_with_logits(logits, torch.where(known, y, 0.0), reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


def train_and_evaluate(bank, labels, train_ids, val_ids, test_ids, args, seed, device, desc) -> dict:
    """Train one cell (the best validation mean AUC's weights kept in memory) and score them on the test set."""
    torch.manual_seed(seed)  # the same initialisation for every ratio of a (regime, fold)
    model, in_ch, norm = build_model(args, labels.shape[1])
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=args.patience)
    gen = torch.Generator().manual_seed(seed)
    inputs = lambda ids: model_input(bank.batch(ids).to(device), in_ch, norm)  # bank[ids] -> the network's input

    @torch.no_grad()
    def aucs(ids) -> np.ndarray:  # per-label AUC [C] on bank[ids], nan for a one-class label
        model.eval()
        step = 2 * args.batch_size
        scores = torch.cat([torch.sigmoid(model(inputs(ids[b : b + step])).float()).cpu()
                            for b in range(0, len(ids), step)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one-class labels are nan; said once for the test set in split_real()
            return roc_auc(labels[ids], scores.numpy()).numpy()

    best_state, best_val, best_score, best_epoch = None, math.nan, -math.inf, 0
    for epoch in (bar := tqdm(range(1, args.max_epochs + 1), desc=desc, leave=False)):
        model.train()
        order = train_ids[torch.randperm(len(train_ids), generator=gen).numpy()]
        for b in range(0, len(order), args.batch_size):
            ids = order[b : b + args.batch_size]
            if len(ids) == 1 and len(order) > 1:
                continue  # BatchNorm cannot train on a batch of one
            loss = masked_bce(model(inputs(ids)), torch.from_numpy(labels[ids]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = ex.nanmean(aucs(val_ids))
        score = -math.inf if math.isnan(val) else val  # nan: no label with both classes in val
        sched.step(score)
        bar.set_postfix(loss=f"{loss.item():.3f}", val_auc=f"{val:.3f}")
        if best_state is None or score > best_score:
            best_state, best_val, best_score, best_epoch = copy.deepcopy(model.state_dict()), val, score, epoch
        elif epoch - best_epoch >= args.early_stop:
            break
    model.load_state_dict(best_state)
    return dict(aucs=aucs(test_ids), epochs=epoch, best_epoch=best_epoch, best_val_auc=best_val)


# ------------------------------------------------------------------------------------------------ main
def run_cell(cell: dict, wanted, train_ids, val_ids, test_ids, bank, labels, args, seed, device, names) -> dict:
    """Train and score one (regime, ratio, fold) -> its results.csv row (`wanted`: synthetic images asked)."""
    desc = f"N={cell['regime']} {ex.ratio_label(cell['ratio'])} fold {cell['fold']}"
    if cell["n_synthetic"] < wanted:
        warnings.warn(f"{desc}: only {cell['n_synthetic']} eligible synthetic images for {wanted} wanted", stacklevel=2)
    res = dict(aucs=np.full(len(names), math.nan), epochs=0, best_epoch=0, best_val_auc=math.nan)
    if len(train_ids) == 0:
        warnings.warn(f"{desc}: no training image; recorded as nan", stacklevel=2)
    else:
        bank.load(np.concatenate([train_ids, val_ids, test_ids]))
        t0 = time.time()
        res = train_and_evaluate(bank, labels, train_ids, val_ids, test_ids, args, seed, device, desc)
        print(f"{desc}: {cell['n_real']} real + {cell['n_synthetic']} synthetic, test mean AUC "
              f"{ex.nanmean(res['aucs']):.4f} (best epoch {res['best_epoch']}/{res['epochs']}, "
              f"{time.time() - t0:.0f}s)")
    aucs = res.pop("aucs")
    return cell | dict(mean_auc=ex.nanmean(aucs), **dict(zip(names, map(float, aucs))), **res)


def write_summary(out: Path, rows: list[dict]) -> str:
    """summary.md (classify_protocol.summarize) and auc_vs_ratio.png (one line per regime)."""
    stats, text = ex.summarize(rows)
    with hub.atomic_path(out / "summary.md") as tmp:
        tmp.write_text(text)
    ratios, regimes = sorted({s["ratio"] for s in stats}), sorted({s["regime"] for s in stats})
    at = {(s["regime"], s["ratio"]): s for s in stats}
    curve = lambda key: {f"N = {n}": [at[n, k][key] if (n, k) in at else math.nan for k in ratios] for n in regimes}
    line_plot(curve("mean"), [ex.ratio_label(k) for k in ratios], out / "auc_vs_ratio.png", errors=curve("std"),
              title="Mean test AUC vs real:synthetic ratio", xlabel="real:synthetic", ylabel="mean AUC")
    return text


def settings(args, names, regimes, ratios) -> dict:
    """What the results depend on (config.json, and settings.json that a rerun must match)."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    config |= {"labels": names, "regimes": regimes, "ratios": list(map(ex.format_ratio, ratios))}
    for k in ("real", "synthetic", "test", "weights", "image_root"):
        config[k] = str(Path(config[k]).resolve()) if config[k] else None
    return config


def main(argv=None):
    args = parse_args(argv)
    out, results = Path(args.out), Path(args.out) / "results.csv"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names, regimes = args.labels or list(LABELS), sorted(set(args.regimes))
    ratios = sorted(set(args.ratios or ([0.0, 1.0, 5.0, 10.0, 50.0] if args.synthetic else [0.0])))
    ratios += [math.inf] if args.fully_synthetic and math.inf not in ratios else []
    largest = max((k for k in ratios if not math.isinf(k)), default=0.0)
    if any(k > 0 for k in ratios) and not args.synthetic:
        cli.fail("--ratios > 0 and --fully-synthetic need --synthetic")
    if regimes[0] < args.folds:
        cli.fail(f"--regimes: N = {regimes[0]} cannot be split into --folds {args.folds}")
    pool, test = split_real(args, names)
    if regimes[-1] > len(pool.paths):
        cli.fail(f"--regimes: N = {regimes[-1]} > {len(pool.paths)} real images left after removing the test set")
    order = ex.balanced_order(pool.labels, regimes[-1], args.seed)  # regime N = order[:N]
    ex.check_files(pool, order, "--real")
    ex.check_files(test, range(len(test.paths)), "--test" if args.test else "--real")
    syn, syn_sources = ex.load_synthetic(args, names, pool, order)
    off_syn, off_test = len(pool.paths), len(pool.paths) + len(syn.paths)  # one bank: pool, synthetic, test
    bank = ImageBank(pool.paths + syn.paths + test.paths, args.image_size, args.num_workers, args.channels)
    labels = np.concatenate([pool.labels, syn.labels, test.labels]).astype(np.float32)
    test_ids = np.arange(off_test, off_test + len(test.paths))

    # every input was checked above: only now is --out claimed (same settings: resume; other: refused). A
    # start that failed before its first result left only the two records: nothing to lose, so it is reused.
    config, fields = settings(args, names, regimes, ratios), [*FIELDS[:6], *names, *FIELDS[6:]]
    unused = out.is_dir() and {p.name for p in out.iterdir()} <= {"settings.json", "config.json"}
    cli.claim_output(out, config, overwrite=args.overwrite or unused)
    hub.write_json_atomic(config, out / "config.json")
    rows = ex.read_results(results, fields)
    done = {(r["regime"], r["ratio"], r["fold"]) for r in rows}
    if done:
        print(f"resuming: {len(done)} finished cell(s) in {results} are skipped")
    for n in regimes:
        folds = ex.assign_folds([pool.groups[i] for i in order[:n]], args.folds, args.seed + n)
        for fold in range(args.folds):
            train_real, val_ids = order[:n][folds != fold], order[:n][folds == fold]
            syn_order = ex.synthetic_order(syn_sources, np.isin(np.arange(off_syn), train_real),
                                           args.seed + n * 1000 + fold)
            seed = int(np.random.SeedSequence([args.seed, n, fold]).generate_state(1)[0])
            for k in (k for k in ratios if (n, k, fold) not in done):
                picked, wanted = ex.take_synthetic(k, largest, syn_order, len(train_real))
                real_ids = train_real[:0] if math.isinf(k) else train_real
                cell = dict(regime=n, ratio=k, fold=fold, n_real=len(real_ids), n_synthetic=len(picked))
                train_ids = np.concatenate([real_ids, off_syn + picked]).astype(np.int64)
                rows.append(run_cell(cell, wanted, train_ids, val_ids, test_ids, bank, labels, args, seed, device,
                                     names))
                ex.write_results(results, fields, rows)
                write_summary(out, rows)
    print(write_summary(out, rows))
    return rows


if __name__ == "__main__":
    cli.main_guard(main)
