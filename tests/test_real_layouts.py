"""Real dataset layouts as they are shipped: CheXpert's train.csv and MIMIC-CXR-JPG (data/mimic.py).

Miniature trees are written by the tests in the exact official layouts (headers, folder names, gzip CSVs),
with JPEGs written by Pillow.
"""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import classify
from data import LABELS
from data.datasets import DataWarning, open_dataset
from data.readers import read_labels_csv

# CheXpert-v1.0 train.csv header, as shipped (Irvin et al., 2019; stanfordmlgroup.github.io/competitions/chexpert)
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                   "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
VALUES = ("1.0", "0.0", "-1.0", "")  # CheXpert's positive, negative, uncertain, not mentioned


def jpeg(path: Path, seed: int, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(30, 220, (size, size), dtype=np.uint8)).save(path)


def write_chexpert(parent: Path, n: int) -> Path:
    """parent/CheXpert-v1.0/train.csv + train/patientXXXXX/study1/view1_frontal.jpg; paths relative to parent."""
    g = np.random.default_rng(0)
    rows = []
    for i in range(n):
        rel = f"CheXpert-v1.0/train/patient{i + 1:05d}/study1/view1_frontal.jpg"
        jpeg(parent / rel, i)
        row = dict.fromkeys(CHEXPERT_HEADER, "")
        row |= {"Path": rel, "Sex": "Female", "Age": "68", "Frontal/Lateral": "Frontal", "AP/PA": "AP"}
        for name in CHEXPERT_HEADER[5:]:
            row[name] = VALUES[i % 4] if name == "Edema" else str(g.choice(VALUES))
        rows.append(row)
    csv_path = parent / "CheXpert-v1.0" / "train.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, CHEXPERT_HEADER)
        w.writeheader()
        w.writerows(rows)
    return csv_path


def test_chexpert_train_csv_as_shipped(tmp_path):
    table = write_chexpert(tmp_path, 8)
    edema = LABELS.index("Edema")
    for mode, uncertain in (("zeros", 0.0), ("ones", 1.0), ("ignore", math.nan)):
        ds = open_dataset(table, 32, path_column="Path", image_root=tmp_path, uncertain=uncertain)
        assert len(ds) == 8 and ds.label_names == list(LABELS)
        col = ds.labels[:, edema]  # rows cycle through 1.0, 0.0, -1.0, blank
        assert col[[0, 1, 3]].tolist() == [1.0, 0.0, 0.0]
        assert math.isnan(col[2]) if mode == "ignore" else col[2] == uncertain
        item = ds[5]
        assert item["image"].shape == (1, 32, 32) and item["path"] == str(
            tmp_path / "CheXpert-v1.0/train/patient00006/study1/view1_frontal.jpg")
    paths, matrix, extras = read_labels_csv(table, image_root=tmp_path)  # `Path` is found without the flag
    assert Path(paths[0]).is_file() and matrix.shape == (8, 7) and extras["Frontal/Lateral"][0] == "Frontal"
    with pytest.raises(ValueError, match=r"none of the 8 images .* see --image-root"):
        open_dataset(table, 32)  # the paths start from the folder above CheXpert-v1.0/, not the CSV's
    with pytest.raises(ValueError, match=r"train\.csv has no column 'path' \(--path-column; columns: \['Path'"):
        open_dataset(table, 32, path_column="path", image_root=tmp_path)


def test_mask_column_follows_image_root(tmp_path):
    for name in ("a", "b"):
        jpeg(tmp_path / "data" / f"{name}.jpg", 1)
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "data" / f"{name}_mask.png")
    (tmp_path / "list.csv").write_text("image,mask\ndata/a.jpg,data/a_mask.png\ndata/b.jpg,data/b_mask.png\n")
    (tmp_path / "csvs").mkdir()
    (tmp_path / "list.csv").rename(tmp_path / "csvs" / "list.csv")
    ds = open_dataset(tmp_path / "csvs" / "list.csv", 16, image_root=tmp_path)
    assert ds.masks[1] == str(tmp_path / "data" / "b_mask.png") and ds[1]["mask"].min() == 1


def test_mask_column_named_or_default(tmp_path):
    """`mask` by default (blank cells refused); a named mask_column: blank cells are None, that item skipped."""
    for name in ("a", "b"):
        jpeg(tmp_path / f"{name}.jpg", 1)
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / f"{name}_lung.png")
    (tmp_path / "list.csv").write_text("image,mask,lung\na.jpg,a_lung.png,a_lung.png\nb.jpg,,\n")
    with pytest.raises(ValueError, match=r"list\.csv: empty 'mask' on line\(s\) \[3\]"):
        open_dataset(tmp_path / "list.csv", 16)
    ds = open_dataset(tmp_path / "list.csv", 16, mask_column="lung")
    assert ds.masks == [str(tmp_path / "a_lung.png"), None] and ds[0]["mask"].min() == 1
    with pytest.warns(DataWarning, match=r"b\.jpg has no mask"):
        assert ds[1]["path"] == str(tmp_path / "a.jpg")  # the next readable item
    with pytest.raises(ValueError, match=r"list\.csv has no column 'heart' \(--mask-column"):
        open_dataset(tmp_path / "list.csv", 16, mask_column="heart")
    with pytest.raises(ValueError, match=r"is not a CSV: it has no column 'lung' \(--mask-column\)"):
        open_dataset(tmp_path, 16, mask_column="lung")


def test_masked_bce_ignores_nan_labels():
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([[1.0, math.nan, 0.0], [0.0, 1.0, math.nan], [1.0, 1.0, 1.0], [math.nan] * 3])
    loss = classify.masked_bce(logits, y)
    known = ~torch.isnan(y)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits[known], y[known]))
    loss.backward()
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()
    full = torch.rand(4, 3).round()
    assert torch.allclose(classify.masked_bce(logits, full), F.binary_cross_entropy_with_logits(logits, full))


@pytest.mark.filterwarnings("ignore:test label")
def test_classify_on_chexpert_with_uncertain_ignore(tmp_path, monkeypatch):
    table = write_chexpert(tmp_path / "chexpert", 24)
    seen = []
    real = classify.train_and_evaluate

    def spy(bank, labels, *rest, **kw):
        seen.append(labels)
        return real(bank, labels, *rest, **kw)

    monkeypatch.setattr(classify, "train_and_evaluate", spy)
    rows = classify.main(["--real", str(table), "--path-column", "Path", "--image-root", str(tmp_path / "chexpert"),
                          "--uncertain", "ignore", "--regimes", "8", "--ratios", "0", "--folds", "2",
                          "--max-epochs", "1", "--model", "tiny", "--image-size", "32",
                          "--batch-size", "4", "--num-workers", "1", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert len(rows) == 2 and len(seen) == 2
    labels = seen[0]
    assert np.isnan(labels[:, LABELS.index("Edema")]).any() and not np.isnan(labels).all()
    assert all(0 <= r["mean_auc"] <= 1 or math.isnan(r["mean_auc"]) for r in rows)
    assert (tmp_path / "out" / "results.csv").is_file()


def test_missing_csv_images_warn(tmp_path):
    table = write_chexpert(tmp_path, 3)
    (tmp_path / "CheXpert-v1.0/train/patient00002/study1/view1_frontal.jpg").unlink()
    with pytest.warns(DataWarning, match="1 image"):
        open_dataset(table, 16, image_root=tmp_path)


# ------------------------------------------------------------------------------------------------ MIMIC-CXR-JPG
# The official headers of MIMIC-CXR-JPG 2.0.0/2.1.0 (physionet.org/content/mimic-cxr-jpg)
MIMIC_META = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
              "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
              "PatientOrientationCodeSequence_CodeMeaning"]
MIMIC_CHEXPERT = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                  "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                  "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
# (dicom_id, subject, study, ViewPosition, on disk)
MIMIC_IMAGES = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", True),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", True),  # dropped
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", True),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "15000393", "52000001", "AP", True),  # no CheXpert row
    ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", "11000011", "51000002", "PA", False),  # not downloaded
    ("fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818", "12000012", "51000003", "", True),  # no ViewPosition
    ("4b9bb5a8-0a3a8d5b-5a4bb0b8-32a8d2b0-5e0a4d38", "19000019", "59000004", "PA", True),  # p19: test
]


def write_mimic(root: Path):
    import gzip

    root.mkdir(parents=True, exist_ok=True)
    meta = [dict(zip(MIMIC_META, [d, s, st, "CHEST (PA AND LAT)", v, "3056", "2544", "21800506", "213014.531",
                                  "CHEST (PA AND LAT)", "postero-anterior" if v == "PA" else "", "Erect"]))
            for d, s, st, v, _ in MIMIC_IMAGES]
    labels = {("10000032", "50414267"): {"Atelectasis": "1.0", "Edema": "-1.0", "Pneumothorax": "0.0"},
              ("10000032", "53189527"): {"Cardiomegaly": "-1.0", "Pleural Effusion": "1.0"},
              ("11000011", "51000002"): {}, ("12000012", "51000003"): {"No Finding": "1.0"},
              ("19000019", "59000004"): {"Pneumonia": "1.0", "Consolidation": "0.0"}}
    chexpert = [dict.fromkeys(MIMIC_CHEXPERT, "") | {"subject_id": s, "study_id": st} | v
                for (s, st), v in labels.items()]
    for name, header, rows in (("metadata", MIMIC_META, meta), ("chexpert", MIMIC_CHEXPERT, chexpert)):
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", newline="") as f:
            w = csv.DictWriter(f, header)
            w.writeheader()
            w.writerows(rows)
    for k, (d, s, st, _, on_disk) in enumerate(MIMIC_IMAGES):
        if on_disk:
            jpeg(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg", k)


def test_mimic_official_layout_to_train_and_test_csv(tmp_path, capsys):
    from data import mimic

    write_mimic(tmp_path / "mimic-cxr-jpg")
    counts = mimic.main(["--root", str(tmp_path / "mimic-cxr-jpg"), "--out", str(tmp_path / "csv")])
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "2 non-frontal" in line and "1 not on disk" in line and "1 kept without" in line
    assert counts == dict(train=3, test=1, not_frontal=2, other_folders=0, missing_files=1, unlabelled=1)
    train = list(csv.DictReader(open(tmp_path / "csv" / "train.csv")))
    test = list(csv.DictReader(open(tmp_path / "csv" / "test.csv")))
    assert list(train[0]) == ["path", "patient_id", "study_id", *LABELS]
    assert [r["path"].split("/")[-1][:8] for r in train] == ["02aa804e", "2a2277a9", "68b5c4b1"]
    assert train[0]["path"] == str((tmp_path / "mimic-cxr-jpg" / "files/p10/p10000032/s50414267/"
                                    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg").resolve())
    assert (train[0]["Atelectasis"], train[0]["Edema"], train[0]["Pneumothorax"], train[0]["Cardiomegaly"]) == (
        "1", "-1", "0", "")  # uncertain kept as -1, blank stays blank
    assert all(train[2][k] == "" for k in LABELS)  # study without a CheXpert row
    assert [(r["patient_id"], r["study_id"], r["Pneumonia"]) for r in test] == [("19000019", "59000004", "1")]
    ds = open_dataset(tmp_path / "csv" / "train.csv", 32, uncertain=math.nan)  # absolute paths: no --image-root
    assert len(ds) == 3 and math.isnan(ds.labels[0, LABELS.index("Edema")]) and ds.columns["patient_id"][0] == "10000032"


def test_mimic_errors_are_one_line(tmp_path):
    from data import mimic

    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-chexpert.csv.gz not found .*--root"):
        mimic.main(["--root", str(tmp_path), "--out", str(tmp_path / "csv")])
    write_mimic(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "files")
    with pytest.raises(ValueError, match="no frontal p10-p19 image .* on disk .*5 listed but missing"):
        mimic.main(["--root", str(tmp_path), "--out", str(tmp_path / "csv")])
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "data.mimic", "--root", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "csv")], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "metadata" not in done.stdout
    assert "mimic-cxr-2.0.0-chexpert.csv.gz not found" in done.stderr


@pytest.mark.parametrize("script,labels", [("classify", True), ("sample", True), ("segment", False)])
def test_scripts_take_the_data_flags(script, labels, capsys):
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        (module.main if script == "segment" else module.parse_args)(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--path-column" in text and "--image-root" in text
    assert ("--uncertain {ignore,ones,zeros}" in text and "(default: zeros)" in text) == labels
    assert text.count("(default: zeros)") <= 1
