"""MIMIC-CXR-JPG -> the paper's classification CSVs: `python -m data.mimic --root MIMIC_CXR_JPG_DIR --out DIR`.

The paper evaluates classification on MIMIC-CXR (DiNO-Diffusion Sec. 3.2): frontal views, the 7 labels of
`data.LABELS`, patients of folders p10-p18 for training and p19 as the test set. The split is by folder, so
the official split file is not needed. Read from `--root` (the MIMIC-CXR-JPG v2.0.0/2.1.0 folder, as
downloaded from PhysioNet):

- `mimic-cxr-2.0.0-metadata.csv.gz`: one row per image (dicom_id, subject_id, study_id, ..., ViewPosition, ...);
  only frontal views (ViewPosition PA or AP) are kept;
- `mimic-cxr-2.0.0-chexpert.csv.gz`: one row per study (subject_id, study_id, 14 CheXpert labels: 1.0, 0.0,
  -1.0 = uncertain, blank = not mentioned). A study missing from it gets blank labels (read as 0);
- `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`, XX = the first two digits of the subject id.

Written: `DIR/train.csv` (p10-p18) and `DIR/test.csv` (p19), columns `path` (absolute, so the CSVs work from
anywhere without --image-root), `patient_id`, `study_id` and the 7 labels in paper order, written as 1, 0,
-1 (uncertain, kept for `--uncertain` to decide) or blank. Images listed but not on disk (a partial download)
are left out and counted; one summary line is printed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
from pathlib import Path

import cli
import hub

from .readers import LABELS, parse_label

METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
FRONTAL = ("PA", "AP")  # ViewPosition of frontal views (the paper's "frontal views only")
TRAIN_GROUPS = tuple(str(g) for g in range(10, 19))  # folders p10..p18 (paper's training patients)
TEST_GROUPS = ("19",)  # folder p19 (paper's test patients)
COLUMNS = ["path", "patient_id", "study_id", *LABELS]


def read_gz_csv(path: Path, need: list[str]) -> list[dict]:
    """Rows of a gzip CSV; a missing file or column is one error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (--root must be the MIMIC-CXR-JPG folder that holds files/ "
                                f"and {METADATA})")
    with gzip.open(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing} (columns: {reader.fieldnames})")
        return list(reader)


def label_value(text: str | None, where: str) -> str:
    """A CheXpert value -> '1', '0', '-1' or '' (blank: not mentioned), checked by readers.parse_label."""
    text = (text or "").strip()
    return "" if not text else str(int(parse_label(text, where, uncertain=-1.0)))


def study_labels(root: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(subject_id, study_id) -> {label: '1' / '0' / '-1' / ''} from the CheXpert file."""
    rows = read_gz_csv(root / CHEXPERT, ["subject_id", "study_id", *LABELS])
    return {(r["subject_id"].strip(), r["study_id"].strip()):
            {k: label_value(r[k], f"{root / CHEXPERT}, line {i + 2}, column {k!r}") for k in LABELS}
            for i, r in enumerate(rows)}


def image_path(root: Path, subject: str, study: str, dicom_id: str) -> Path:
    """MIMIC-CXR-JPG's layout: files/p10/p10000032/s50414267/02aa804e-....jpg."""
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"


def build_splits(root: Path) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """-> ({'train': rows, 'test': rows}, counts of what was dropped or left unlabelled)."""
    root = root.resolve()
    labels = study_labels(root)
    meta = read_gz_csv(root / METADATA, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    splits = {"train": [], "test": []}
    counts = dict(not_frontal=0, other_folders=0, missing_files=0, unlabelled=0)
    for r in meta:
        subject, study, dicom_id = (r[k].strip() for k in ("subject_id", "study_id", "dicom_id"))
        split = "train" if subject[:2] in TRAIN_GROUPS else "test" if subject[:2] in TEST_GROUPS else None
        path = image_path(root, subject, study, dicom_id)
        dropped = ("not_frontal" if (r["ViewPosition"] or "").strip().upper() not in FRONTAL else
                   "other_folders" if split is None else "missing_files" if not path.is_file() else None)
        if dropped:
            counts[dropped] += 1
            continue
        found = labels.get((subject, study))
        counts["unlabelled"] += found is None
        splits[split].append({"path": str(path), "patient_id": subject, "study_id": study}
                             | (found or dict.fromkeys(LABELS, "")))
    return splits, counts


def main(argv=None) -> dict[str, int]:
    p = argparse.ArgumentParser(prog="python -m data.mimic", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, metavar="MIMIC_CXR_JPG_DIR",
                   help=f"the MIMIC-CXR-JPG folder (holds files/, {METADATA} and {CHEXPERT})")
    p.add_argument("--out", required=True, metavar="DIR", help="where train.csv (p10-p18) and test.csv (p19) go")
    args = p.parse_args(argv)
    splits, counts = build_splits(Path(args.root))
    if not splits["train"] and not splits["test"]:
        raise ValueError(f"no frontal p10-p19 image of {Path(args.root) / METADATA} is on disk under "
                         f"{Path(args.root) / 'files'} ({counts['missing_files']} listed but missing)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        hub.write_csv_atomic(out / f"{name}.csv", rows, COLUMNS)
    print(f"mimic: wrote {out / 'train.csv'} ({len(splits['train'])} frontal images, p10-p18) and "
          f"{out / 'test.csv'} ({len(splits['test'])}, p19); left out: {counts['not_frontal']} non-frontal, "
          f"{counts['other_folders']} outside p10-p19, {counts['missing_files']} not on disk; "
          f"{counts['unlabelled']} kept without CheXpert labels (blank)")
    return {"train": len(splits["train"]), "test": len(splits["test"])} | counts


if __name__ == "__main__":
    cli.main_guard(main)
