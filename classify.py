"""The downstream experiment (DiNO-Diffusion Sec. 2.5 / 3.2): does adding synthetic CXRs help a classifier?

Protocol, as in the paper:
1. A fixed test set of real images (--test CSV, or a seeded held-out split of --real, patient-level when
   the CSV has a patient column) that no training or validation set ever touches.
2. Training regimes of N real images (paper: N = 50, 100, 500, 1000, 5000), label-balanced and nested: the
   subset for N = 50 is inside the one for N = 100, and so on (eval/experiment.py `balanced_order` gives
   the exact greedy rule).
3. Real:synthetic ratios 1:k (paper: 1:0, 1:1, 1:5, 1:10, 1:50, plus fully synthetic with
   --fully-synthetic). The synthetic images come from sample.py's `synthetic.csv` and are used only when
   every real image they were generated from (`source`, `source_b`) is a training image of the same fold:
   no leakage from validation or test images, and none from real images outside the regime. A fold with
   n real training images gets round(k * n) synthetic ones, so the training set is exactly 1:k; when fewer
   are eligible we use them all (--synthetic-shortfall cap, the default) or repeat them (replace), and the
   count actually used is recorded. "Synthetic only" trains on the synthetic images of the largest ratio.
4. 5-fold cross-validation inside each regime's real images (patient-level when possible); validation is
   always real. Fold f has the same real split and model initialisation at every ratio, so ratios can be
   compared fold by fold.
5. DenseNet-121 (random init or --weights), multi-label BCE-with-logits on the labels (paper: Atelectasis,
   Cardiomegaly, Consolidation, Edema, Pleural Effusion, Pneumonia, Pneumothorax); AdamW lr 1e-4, weight
   decay 1e-5, batch 64, at most 150 epochs, ReduceLROnPlateau (patience 10) on the validation mean AUC,
   early stop after 25 epochs without a gain (all paper values, Sec. 3.2). The best-validation weights are
   evaluated on the test set: per-label ROC AUC and their mean (labels with one class skipped).
6. Mean test AUC +- std over folds per (regime, ratio), and a paired t-test over folds against the 1:0
   baseline of the same regime (p < 0.05 marked *).

Without --synthetic only the real-only regimes run (ratio 1:0: the baseline the paper measures first).

Outputs in --out: results.csv (one row per (regime, ratio, fold), appended as each finishes), summary.md,
auc_vs_ratio.png, config.json and settings.json (cli.claim_output). Every input is checked before --out is
touched, so a failed start leaves nothing behind. Rerunning with the same arguments skips the finished
cells, so an interrupted sweep resumes where it stopped; other settings are refused in one line naming
--overwrite (which empties the folder and starts clean).

Images are preprocessed once (data/transforms.py: border removal, centre square, resize to --image-size)
and kept in memory as uint8; --num-workers threads decode them. CheXpert's uncertain labels (-1) follow
--uncertain: zeros (negative, "U-Zeros", the default), ones ("U-Ones") or ignore ("U-Ignore": that label of
that image is left out of the loss and out of the AUC). --path-column and --image-root say how --real and
--test name their images (CheXpert's train.csv: `--path-column Path --image-root <folder above CheXpert-v1.0>`).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import cli
import hub
from data import LABELS
from data.readers import path_column_of, read_image, read_labels_csv
from data.transforms import augment, preprocess_cxr
from eval import experiment as ex
from eval.densenet import DenseLayer, DenseNet121
from eval.figures import line_plot
from eval.metrics import roc_auc

NOT_CONFIG = ("out", "overwrite", "device", "num_workers")  # arguments that do not change the results


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--real", required=True, help="labelled CSV of real images (path + label columns)")
    p.add_argument("--synthetic", help="synthetic.csv from sample.py (path, source, source_b, labels...); "
                   "default: none, only the real-only regimes (ratio 1:0) run")
    p.add_argument("--test", help="fixed test CSV; default: a held-out split of --real")
    p.add_argument("--test-fraction", type=_fraction, default=0.2, help="held-out share of --real (no --test)")
    p.add_argument("--labels", help="comma-separated label columns (default: the 7 paper labels)")
    cli.add_data_flags(p, labels=True)  # --path-column, --image-root (for --real, --test), --uncertain
    p.add_argument("--patient-column", help="column of patient ids for patient-level splits "
                   "(default: 'patient_id' when the CSV has it, else image-level splits)")
    p.add_argument("--regimes", type=cli.comma_list(cli.positive_int), default="50,100,500,1000,5000",
                   help="comma-separated real training-set sizes N")
    p.add_argument("--ratios", type=cli.comma_list(ex.parse_ratio), default=None,
                   help="comma-separated k of the real:synthetic ratios 1:k (default: 0,1,5,10,50 with "
                        "--synthetic, else 0)")
    p.add_argument("--fully-synthetic", action="store_true", help="add the synthetic-only setting ('inf')")
    p.add_argument("--synthetic-shortfall", choices=("cap", "replace"), default="cap",
                   help="too few eligible synthetic images: use them all (cap) or repeat them (replace)")
    p.add_argument("--folds", type=_folds, default=5, help="cross-validation folds per regime")
    p.add_argument("--out", required=True, help="output folder (results.csv, summary.md, plot)")
    p.add_argument("--overwrite", action="store_true",
                   help="empty an --out that holds results of other settings and start clean")
    p.add_argument("--model", choices=("densenet121", "tiny"), default="densenet121",
                   help="tiny: a ~30k-parameter DenseNet for CPU runs")
    p.add_argument("--weights", help="DenseNet-121 state dict to start from (torchvision ImageNet or XRV; "
                   "default: random init)")
    p.add_argument("--in-channels", type=cli.positive_int, help="input channels (default: the weights', else 1)")
    p.add_argument("--normalize", choices=("auto", "unit", "imagenet", "xrv"), default="auto",
                   help="input scaling: unit = 2x-1; auto = imagenet for 3-channel weights, xrv for "
                   "1-channel weights, unit without weights")
    p.add_argument("--drop-rate", type=_dropout, default=0.0, help="dropout probability after each dense layer")
    p.add_argument("--image-size", type=cli.positive_int, default=224, help="square input size in pixels")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="training images per step (paper: 64)")
    p.add_argument("--lr", type=cli.positive_float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=cli.nonneg_float, default=1e-5, help="AdamW weight decay")
    p.add_argument("--patience", type=cli.nonneg_int, default=10, help="ReduceLROnPlateau patience (epochs)")
    p.add_argument("--lr-factor", type=_fraction, default=0.1, help="ReduceLROnPlateau factor (torch default)")
    p.add_argument("--early-stop", type=cli.positive_int, default=25, help="stop after this many epochs "
                   "without a validation mean-AUC gain")
    p.add_argument("--max-epochs", type=cli.positive_int, default=150,
                   help="most epochs per cell (paper: 150)")
    p.add_argument("--augment", action="store_true", help="the paper's random sharpening + affine")
    p.add_argument("--num-workers", type=cli.nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="image decoding threads (0 = one)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the test split, folds, subsets and networks")
    return p.parse_args(argv)


_fraction = cli.number(float, 0.0, 1.0, lo_open=True, hi_open=True)  # in (0, 1)
_dropout = cli.number(float, 0.0, 1.0, hi_open=True)  # in [0, 1)
_folds = cli.number(int, 2)


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Table:
    paths: list[str]
    rel: list[str]  # paths as written in the CSV
    labels: np.ndarray  # float32 [N, C]
    groups: list[str]  # patient ids, or the image paths (image-level)
    extras: dict[str, list[str]]
    csv: Path

    def subset(self, keep: np.ndarray) -> Table:
        idx = np.flatnonzero(keep)
        return Table([self.paths[i] for i in idx], [self.rel[i] for i in idx], self.labels[idx],
                     [self.groups[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.extras.items()},
                     self.csv)


def load_table(path, labels, patient_column, flag, need=(), **csv_args) -> Table:
    """Read a labelled CSV (`csv_args`: uncertain, path_column, image_root of `read_labels_csv`); every
    problem becomes a SystemExit naming the flag, file and column."""
    try:
        paths, matrix, extras = read_labels_csv(path, labels, **csv_args)
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        path_col = path_column_of(list(rows[0]), csv_args.get("path_column"), path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"classify.py {flag}: {e}") from e
    for column in need:
        if column not in extras:
            raise SystemExit(f"classify.py {flag}: {path} has no {column!r} column "
                             f"(columns: {list(rows[0])})")
    rel = [(r.get(path_col) or "").strip() for r in rows]
    ids = extras.get(patient_column, [""] * len(paths))
    groups = [g.strip() or p for g, p in zip(ids, paths)]  # no patient id: the image is its own group
    return Table(paths, rel, matrix, groups, extras, Path(path))


def check_files(table: Table, rows, flag: str):
    missing = [table.paths[i] for i in rows if not os.path.isfile(table.paths[i])]
    if missing:
        raise SystemExit(f"classify.py {flag}: {len(missing)} image(s) listed in {table.csv} do not exist, "
                         f"e.g. {missing[:3]} (relative paths start from --image-root, default the CSV's folder)")


class ImageBank:
    """Preprocessed images kept as uint8 [1, S, S] (quantised the same way whether cached or not)."""

    def __init__(self, paths: list[str], size: int, threads: int):
        self.paths, self.size, self.threads, self.images = paths, size, max(1, threads), {}

    def _read(self, i: int) -> torch.Tensor:
        x = preprocess_cxr(read_image(self.paths[i]), self.size)  # float [1, S, S] in [0, 1]
        return (x * 255).round().to(torch.uint8)

    def load(self, ids):
        todo = sorted({int(i) for i in ids} - self.images.keys())
        if todo:
            with ThreadPoolExecutor(self.threads) as pool:
                for i, img in zip(todo, tqdm(pool.map(self._read, todo), total=len(todo), desc="images",
                                             leave=False)):
                    self.images[i] = img

    def batch(self, ids) -> torch.Tensor:
        return torch.stack([self.images[int(i)] for i in ids]).float() / 255  # [B, 1, S, S]


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the known labels: nan entries (--uncertain ignore) add no loss or gradient."""
    known = ~torch.isnan(y)
    loss = F.binary_cross_entropy_with_logits(logits, torch.where(known, y, 0.0), reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


# ------------------------------------------------------------------------------------------------ model
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet stats


def build_model(args, num_labels: int) -> tuple[nn.Module, int, str]:
    """-> (DenseNet, input channels, normalisation); a new classifier head of `num_labels` outputs."""
    if args.weights is None:
        in_ch, norm = args.in_channels or 1, "unit" if args.normalize == "auto" else args.normalize
        cfg = dict(in_channels=in_ch, num_classes=num_labels, drop_rate=args.drop_rate)
        net = DenseNet121.tiny(**cfg) if args.model == "tiny" else DenseNet121(**cfg)
        return net, in_ch, norm
    if args.model != "densenet121":
        raise SystemExit("classify.py: --weights holds a DenseNet-121; use --model densenet121")
    net = DenseNet121.from_pretrained(args.weights)
    w_in = net.config.in_channels
    in_ch = args.in_channels or w_in
    norm = ("imagenet" if w_in == 3 else "xrv") if args.normalize == "auto" else args.normalize
    if in_ch != w_in:  # average the stem filters over input channels, keeping their summed response
        w = net.features.conv0.weight.detach()  # [64, w_in, 7, 7]
        net.features.conv0 = nn.Conv2d(in_ch, w.shape[0], 7, stride=2, padding=3, bias=False)
        net.features.conv0.weight.data = w.mean(1, keepdim=True).repeat(1, in_ch, 1, 1) * (w_in / in_ch)
    net.classifier = nn.Linear(net.num_features, num_labels)
    for m in net.modules():
        if isinstance(m, DenseLayer):
            m.drop_rate = args.drop_rate
    return net, in_ch, norm


def model_input(x: torch.Tensor, in_ch: int, norm: str) -> torch.Tensor:
    """[B, 1, S, S] in [0, 1] -> the network's input [B, in_ch, S, S]."""
    x = x.expand(-1, in_ch, -1, -1)
    if norm == "unit":
        return 2 * x - 1
    if norm == "xrv":
        return (2 * x - 1) * 1024  # torchxrayvision's [-1024, 1024] range
    mean, std = (torch.tensor(v, device=x.device) for v in (IMAGENET_MEAN, IMAGENET_STD))
    if in_ch != 3:
        mean, std = mean.mean().expand(in_ch), std.mean().expand(in_ch)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


@torch.no_grad()
def predict(model, bank, ids, labels, args, in_ch, norm, device) -> tuple[np.ndarray, np.ndarray]:
    """-> (sigmoid scores [n, C], per-label AUC [C] against labels[ids], nan for one-class labels)."""
    model.eval()
    scores = []
    for b in range(0, len(ids), 2 * args.batch_size):
        x = model_input(bank.batch(ids[b : b + 2 * args.batch_size]).to(device), in_ch, norm)
        scores.append(torch.sigmoid(model(x).float()).cpu())
    scores = torch.cat(scores).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-class labels are nan; said once for the test set in main()
        aucs = roc_auc(labels[ids], scores).numpy()
    return scores, aucs


def train_and_evaluate(bank, labels, train_ids, val_ids, test_ids, args, seed, device, desc) -> dict:
    """Train one cell (best validation mean AUC kept in memory) and score it on the test set."""
    torch.manual_seed(seed)  # the same initialisation for every ratio of a (regime, fold)
    model, in_ch, norm = build_model(args, labels.shape[1])
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=args.lr_factor,
                                                       patience=args.patience)
    y_all = torch.from_numpy(labels)
    gen, aug_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    best = best_score = -math.inf
    best_state, best_epoch, stale, epoch = None, 0, 0, 0
    bar = tqdm(range(1, args.max_epochs + 1), desc=desc, leave=False)
    for epoch in bar:
        model.train()
        order = train_ids[torch.randperm(len(train_ids), generator=gen).numpy()]
        for b in range(0, len(order), args.batch_size):
            ids = order[b : b + args.batch_size]
            if len(ids) == 1 and len(order) > 1:
                continue  # BatchNorm cannot train on a batch of one
            x = bank.batch(ids).to(device)
            x = augment(x, aug_gen) if args.augment else x
            loss = masked_bce(model(model_input(x, in_ch, norm)), y_all[ids].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = ex.nanmean(predict(model, bank, val_ids, labels, args, in_ch, norm, device)[1])
        sched.step(val if not math.isnan(val) else -math.inf)
        bar.set_postfix(loss=f"{loss.item():.3f}", val_auc=f"{val:.3f}")
        score = -math.inf if math.isnan(val) else val  # nan: no label with both classes in val
        if best_state is None or score > best_score:
            best, best_score, best_epoch, stale = val, score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= args.early_stop:
                break
    model.load_state_dict(best_state)
    _, aucs = predict(model, bank, test_ids, labels, args, in_ch, norm, device)
    return dict(aucs=aucs, epochs=epoch, best_epoch=best_epoch, best_val_auc=best)


# ------------------------------------------------------------------------------------------------ outputs
def write_summary(out: Path, rows: list[dict]) -> str:
    stats, text = ex.summarize(rows)
    (out / "summary.md").write_text(text)
    ratios = sorted({s["ratio"] for s in stats})
    at = {(s["regime"], s["ratio"]): s for s in stats}
    regimes = sorted({s["regime"] for s in stats})
    series = {f"N = {n}": [at[(n, k)]["mean"] if (n, k) in at else math.nan for k in ratios] for n in regimes}
    errors = {f"N = {n}": [at[(n, k)]["std"] if (n, k) in at else math.nan for k in ratios] for n in regimes}
    line_plot(series, [ex.ratio_label(k) for k in ratios], out / "auc_vs_ratio.png", errors=errors,
              title="Mean test AUC vs real:synthetic ratio", xlabel="real:synthetic", ylabel="mean AUC")
    return text


# ------------------------------------------------------------------------------------------------ main
def split_real(args, names) -> tuple[Table, Table, str]:
    """-> (pool of real training candidates, fixed test set, 'patient' or 'image' level)."""
    patient = args.patient_column or "patient_id"
    csv_args = dict(uncertain=cli.UNCERTAIN[args.uncertain], path_column=args.path_column,
                    image_root=args.image_root)
    real = load_table(args.real, names, patient, "--real", **csv_args)
    if args.patient_column and args.patient_column not in real.extras:
        raise SystemExit(f"classify.py --patient-column: {args.real} has no {args.patient_column!r} column")
    level = "patient" if patient in real.extras else "image"
    if args.test:  # drop real rows that are test images, or of test patients
        test = load_table(args.test, names, patient, "--test", **csv_args)
        seen = {str(Path(p).resolve()) for p in test.paths}
        seen_patients = set(test.groups) if level == "patient" and patient in test.extras else set()
        in_test = np.array([str(Path(p).resolve()) in seen or g in seen_patients
                            for p, g in zip(real.paths, real.groups)], bool)
    else:
        in_test = ex.holdout_split(real.groups, args.test_fraction, args.seed)
        test = real.subset(in_test)
    for name, n_pos, n in zip(names, np.nansum(test.labels, 0), (~np.isnan(test.labels)).sum(0)):
        if n_pos in (0, n):  # n: the test images where the label is known (not ignored)
            warnings.warn(f"test label {name!r} has only one class ({int(n_pos)} of {n} "
                          "positive): its AUC is nan and left out of the mean", stacklevel=2)
    return real.subset(~in_test), test, level


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [s.strip() for s in args.labels.split(",")] if args.labels else list(LABELS)
    regimes = sorted(set(args.regimes))
    ratios = sorted(set(args.ratios or ([0.0, 1.0, 5.0, 10.0, 50.0] if args.synthetic else [0.0])))
    ratios += [math.inf] if args.fully_synthetic and math.inf not in ratios else []
    largest = max((k for k in ratios if not math.isinf(k)), default=0.0)
    if any(k > 0 for k in ratios) and not args.synthetic:
        raise SystemExit("classify.py: --ratios > 0 and --fully-synthetic need --synthetic")

    if regimes[0] < args.folds:
        raise SystemExit(f"classify.py --regimes: N = {regimes[0]} cannot be split into --folds {args.folds}")
    pool, test, level = split_real(args, names)
    if regimes[-1] > len(pool.paths):
        raise SystemExit(f"classify.py --regimes: N = {regimes[-1]} > {len(pool.paths)} real images left "
                         "after removing the test set")
    order = ex.balanced_order(pool.labels, regimes[-1], args.seed)  # regime N = order[:N]
    check_files(pool, order, "--real")
    check_files(test, range(len(test.paths)), "--test" if args.test else "--real")
    syn = Table([], [], np.zeros((0, len(names)), np.float32), [], {}, Path())
    syn_sources = np.zeros((0, 2), np.int64)  # [M, 2] pool index of source and source_b (-1: none)
    if args.synthetic:
        syn = load_table(args.synthetic, names, None, "--synthetic", need=("source",),
                         uncertain=cli.UNCERTAIN[args.uncertain])
        bases = [Path.cwd(), syn.csv.parent, Path(args.real).parent]
        syn_sources = np.stack([ex.match_sources(syn.extras.get(c, [""] * len(syn.paths)), pool.paths, bases,
                                                 pool.rel) for c in ("source", "source_b")], 1)
        usable = ex.synthetic_order(syn_sources, np.isin(np.arange(len(pool.paths)), order), args.seed)
        check_files(syn, usable, "--synthetic")
        print(f"synthetic: {len(usable)} of {len(syn.paths)} rows come from real images of the regimes")
    print(f"real pool {len(pool.paths)}, test {len(test.paths)} ({level}-level splits), labels {names}")

    # one bank for every image: pool rows, then synthetic rows, then test rows
    off_syn, off_test = len(pool.paths), len(pool.paths) + len(syn.paths)
    bank = ImageBank(pool.paths + syn.paths + test.paths, args.image_size, args.num_workers)
    labels = np.concatenate([pool.labels, syn.labels, test.labels]).astype(np.float32)
    test_ids = np.arange(off_test, off_test + len(test.paths))

    config = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG} | {"labels": names}
    config |= {"regimes": regimes, "ratios": [ex.format_ratio(k) for k in ratios]}
    for k in ("real", "synthetic", "test", "weights", "image_root"):
        config[k] = str(Path(config[k]).resolve()) if config[k] else None
    fields = ["regime", "ratio", "fold", "n_real", "n_synthetic", "mean_auc", *names, "epochs", "best_epoch",
              "best_val_auc"]
    results_path = out / "results.csv"
    # every input was checked above: only now is --out claimed (same settings: resume; other: refused). A
    # start that failed before its first result left only the two records: nothing to lose, so it is reused.
    unused = out.is_dir() and {p.name for p in out.iterdir()} <= {"settings.json", "config.json"}
    cli.claim_output(out, config, overwrite=args.overwrite or unused)
    hub.write_json_atomic(config, out / "config.json")
    try:
        rows = ex.read_results(results_path, fields)
    except ValueError as e:
        raise SystemExit(f"classify.py: {e}") from e
    done = {(r["regime"], r["ratio"], r["fold"]) for r in rows}
    if done:
        print(f"resuming: {len(done)} finished cell(s) in {results_path} are skipped")

    for n in regimes:
        subset = order[:n]
        folds = ex.assign_folds([pool.groups[i] for i in subset], args.folds, args.seed + n)
        for fold in range(args.folds):
            todo = [k for k in ratios if (n, k, fold) not in done]
            if not todo:
                continue
            train_real, val_ids = subset[folds != fold], subset[folds == fold]
            allowed = np.zeros(len(pool.paths), bool)
            allowed[train_real] = True
            syn_order = ex.synthetic_order(syn_sources, allowed, args.seed + n * 1000 + fold)
            seed = int(np.random.SeedSequence([args.seed, n, fold]).generate_state(1)[0])
            for k in todo:
                cell = f"N={n} {ex.ratio_label(k)} fold {fold}"
                picked, wanted = ex.synthetic_rows(k, largest, syn_order, len(train_real),
                                                   args.synthetic_shortfall == "replace")
                if len(picked) < wanted:
                    warnings.warn(f"{cell}: only {len(picked)} eligible synthetic images for {wanted} wanted",
                                  stacklevel=2)
                real_ids = train_real[:0] if math.isinf(k) else train_real
                train_ids = np.concatenate([real_ids, off_syn + picked]).astype(np.int64)
                row = dict(regime=n, ratio=k, fold=fold, n_real=len(real_ids), n_synthetic=len(picked))
                if len(train_ids) == 0:
                    warnings.warn(f"{cell}: no training image; recorded as nan", stacklevel=2)
                    res = dict(aucs=np.full(len(names), math.nan), epochs=0, best_epoch=0,
                               best_val_auc=math.nan)
                else:
                    bank.load(np.concatenate([train_ids, val_ids, test_ids]))
                    t0 = time.time()
                    res = train_and_evaluate(bank, labels, train_ids, val_ids, test_ids, args, seed, device,
                                             cell)
                    print(f"{cell}: {len(real_ids)} real + {len(picked)} synthetic, test mean AUC "
                          f"{ex.nanmean(res['aucs']):.4f} (best epoch {res['best_epoch']}/{res['epochs']}, "
                          f"{time.time() - t0:.0f}s)")
                row |= dict(mean_auc=ex.nanmean(res["aucs"]), **dict(zip(names, map(float, res["aucs"]))),
                            epochs=res["epochs"], best_epoch=res["best_epoch"],
                            best_val_auc=float(res["best_val_auc"]))
                ex.append_result(results_path, fields, row)
                rows.append(row)
                write_summary(out, rows)
    if not rows:
        raise SystemExit("classify.py: no results")
    print(write_summary(out, rows))
    return rows


if __name__ == "__main__":
    cli.main_guard(main)
