"""Record tables from the three sources, NIH boxes, splits, undersampling and weights."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medlens.cli import main
from medlens.data.records import NIH_LABELS, RecordTable, detect_format, load_source, read_nih_boxes
from medlens.data.splits import (
    check_no_leakage,
    class_weights,
    patient_folds,
    patient_split,
    positive_weights,
    undersample,
)
from medlens.errors import DataSourceError, LeakageError

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
)


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def _write_nih(folder, rows, images=True):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{img},{findings},0,{pid},50,M,{view},2000,2000,0.14,0.14\n" for img, findings, pid, view in rows]
    (folder / "Data_Entry_2017_v2020.csv").write_text(NIH_HEADER + "".join(lines))
    if images:
        for img, *_ in rows:
            _png(folder / "images" / img)
    return folder


def test_class_folders_with_metadata_join_patient_ids(tmp_path):
    for name in ("a1.png", "a2.png"):
        _png(tmp_path / "alpha" / name)
    _png(tmp_path / "beta" / "b1.png")
    (tmp_path / "beta" / "notes.txt").write_text("not an image")
    pd.DataFrame({"path": ["alpha/a1.png", "alpha/a2.png"], "patient_id": ["p1", "p1"], "view": ["PA", "AP"]}).to_csv(
        tmp_path / "metadata.csv", index=False
    )
    table = load_source(tmp_path)
    assert table.kind == "folder" and table.task == "multiclass"
    assert table.label_names == ["alpha", "beta"]
    assert table.frame["path"].tolist() == ["alpha/a1.png", "alpha/a2.png", "beta/b1.png"]
    np.testing.assert_array_equal(table.labels, [[1, 0], [1, 0], [0, 1]])
    # The image without metadata is its own patient, never merged with another.
    assert table.patient_ids.tolist() == ["p1", "p1", "image:beta/b1.png"]
    assert table.frame["view"].tolist()[:2] == ["PA", "AP"]
    assert all(p.exists() for p in table.paths)


def test_generic_csv_multilabel_and_multiclass(tmp_path):
    pd.DataFrame(
        {
            "path": ["x.png", "y.png", "z.png"],
            "labels": ["nodule|effusion", "No Finding", ""],
            "patient_id": ["1", "2", "2"],
        }
    ).to_csv(tmp_path / "labels.csv", index=False)
    table = load_source(tmp_path / "labels.csv")
    assert table.kind == "csv" and table.task == "multilabel"
    assert table.label_names == ["effusion", "nodule"]
    np.testing.assert_array_equal(table.labels, [[1, 1], [0, 0], [0, 0]])

    single = tmp_path / "single.csv.gz"
    with gzip.open(single, "wt") as handle:
        pd.DataFrame({"path": ["x.png", "y.png"], "label": ["cat", "dog"]}).to_csv(handle, index=False)
    table = load_source(single)
    assert table.task == "multiclass" and table.label_names == ["cat", "dog"]
    assert table.patient_ids.tolist() == ["image:x.png", "image:y.png"]


def test_nih_csv_labels_views_and_official_lists(tmp_path):
    folder = _write_nih(
        tmp_path / "nih",
        [
            ("00000001_000.png", "Cardiomegaly|Effusion", 1, "PA"),
            ("00000001_001.png", "No Finding", 1, "AP"),
            ("00000002_000.png", "Hernia", 2, "PA"),
        ],
    )
    (folder / "test_list.txt").write_text("00000002_000.png\n")
    table = load_source(folder)
    assert table.kind == "nih" and table.label_names == list(NIH_LABELS)
    assert table.labels[0, NIH_LABELS.index("Cardiomegaly")] == 1 and table.labels[0].sum() == 2
    assert table.labels[1].sum() == 0
    assert table.frame["official_split"].tolist()[2] == "test"
    assert pd.isna(table.frame["official_split"].tolist()[0])
    assert all(p.exists() for p in table.paths)
    from medlens.data.records import read_nih

    pa_only = read_nih(folder / "Data_Entry_2017_v2020.csv", views=["PA"])
    assert len(pa_only) == 2 and set(pa_only.frame["view"]) == {"PA"}


def test_nih_unknown_finding_is_an_error(tmp_path):
    folder = _write_nih(tmp_path, [("a.png", "Cardiomegaly|Dragon", 1, "PA")], images=False)
    with pytest.raises(DataSourceError, match="Dragon"):
        load_source(folder)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "must be a .csv"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a data source"),
        (lambda p: (p / "bad.csv").write_text("a,b\n1,2\n") and p / "bad.csv", "needs a 'path' column"),
        (lambda p: (p / "nolab.csv").write_text("path\nx.png\n") and p / "nolab.csv", "'label'"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path, make, match):
    with pytest.raises(DataSourceError, match=match):
        load_source(make(tmp_path))


def test_unknown_format_names_valid_ones(tmp_path):
    with pytest.raises(DataSourceError, match="folder, nih, csv"):
        load_source(tmp_path, format="dicomdir")


def _synthetic_table(n_patients=300, seed=0):
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 5, n_patients)
    patients = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    labels = (rng.random((len(patients), 4)) < [0.3, 0.1, 0.05, 0.02]).astype(np.float32)
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(len(patients))], "patient_id": patients})
    return RecordTable(Path("."), frame, labels, list("abcd"), "multilabel", "csv")


def test_patient_split_is_grouped_stratified_and_reproducible():
    table = _synthetic_table()
    splits = patient_split(table, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    rows = np.concatenate(list(splits.values()))
    assert sorted(rows.tolist()) == list(range(len(table)))
    ids = table.patient_ids
    assert not set(ids[splits["train"]]) & set(ids[splits["test"]])
    assert abs(len(splits["test"]) / len(table) - 0.2) < 0.03
    # Stratified: the common label's rate is close in every split.
    rates = [table.labels[r, 0].mean() for r in splits.values()]
    assert max(rates) - min(rates) < 0.1
    again = patient_split(table, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    other = patient_split(table, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=4)
    assert not np.array_equal(splits["test"], other["test"])


def test_leakage_check_fails_loudly():
    table = _synthetic_table(20)
    ids = table.patient_ids
    first = np.flatnonzero(ids == ids[0])
    with pytest.raises(LeakageError, match=ids[0]):
        check_no_leakage(table, {"train": first, "test": first[:1]})


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        patient_split(_synthetic_table(10), {"train": 0.9, "test": 0.2})


def test_folds_are_patient_disjoint_and_cover_everything():
    table = _synthetic_table()
    folds = patient_folds(table, 5, seed=1)
    assert set(folds.tolist()) == set(range(5))
    for patient, group in pd.Series(folds).groupby(table.patient_ids):
        assert group.nunique() == 1, patient
    sizes = np.bincount(folds)
    assert sizes.min() > 0.6 * sizes.max()


def test_undersample_no_finding_and_weights():
    table = _synthetic_table()
    rows = np.arange(len(table))
    empty = np.all(table.labels == 0, axis=1)
    kept = undersample(table, rows, keep=0.2, seed=0)
    assert set(np.flatnonzero(~empty)) <= set(kept.tolist())
    kept_empty = empty[kept].sum()
    assert 0.1 * empty.sum() < kept_empty < 0.3 * empty.sum()
    with pytest.raises(ValueError, match="cannot undersample"):
        undersample(table, rows, label="zebra")

    labels = np.array([[1, 0], [0, 0], [0, np.nan], [0, 1]], dtype=np.float32)
    pos, neg = positive_weights(labels)
    np.testing.assert_allclose(pos, [0.75, 2 / 3])
    np.testing.assert_allclose(neg, [0.25, 1 / 3])
    one_hot = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    np.testing.assert_allclose(class_weights(one_hot), [4 / 6, 4 / 2, 0.0])


def test_cxr4_reads_as_four_classes(shared_data):
    table = load_source(shared_data / "cxr4")
    counts = dict(zip(table.label_names, table.labels.sum(axis=0).astype(int), strict=True))
    assert counts == {"covid19": 48, "normal": 44, "bacterial_pneumonia": 20, "viral_pneumonia": 13}
    assert len(table) == 125 and not table.frame["patient_id"].str.startswith("image:").any()
    assert all(p.exists() for p in table.paths)


def test_nih14_reads_with_the_csv_labels(shared_data):
    table = load_source(shared_data / "nih14")
    assert (len(table), len(set(table.patient_ids))) == (219, 171)
    raw = pd.read_csv(shared_data / "nih14" / "Data_Entry_2017_v2020.csv")
    for row, cell in zip(table.labels, raw["Finding Labels"], strict=True):
        expected = set() if cell == "No Finding" else set(cell.split("|"))
        assert {NIH_LABELS[j] for j in np.flatnonzero(row)} == expected
    assert all(p.exists() for p in table.paths)
    boxes = read_nih_boxes(shared_data / "nih14" / "BBox_List_2017.csv")
    assert len(boxes) == 17 and boxes["image"].nunique() == 13
    assert set(boxes["image"]) <= set(table.frame["image"])
    assert (boxes[["w", "h"]] > 0).all().all()


def test_full_nih_metadata_splits_without_overlap(shared_data):
    table = load_source(shared_data / "nih-metadata" / "Data_Entry_2017_v2020.csv.gz")
    assert detect_format(shared_data / "nih-metadata") == "nih"
    assert (len(table), len(set(table.patient_ids))) == (112_120, 30_805)
    splits = patient_split(table, seed=0)
    check_no_leakage(table, splits)
    assert sum(len(r) for r in splits.values()) == 112_120
    assert len(read_nih_boxes(shared_data / "nih-metadata" / "BBox_List_2017.csv.gz")) == 984


def test_inspect_cli_json(shared_data, capsys):
    assert main(["data", "inspect", str(shared_data / "nih-metadata"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 112_120 and summary["n_patients"] == 30_805
    assert summary["n_missing"] == 112_120  # metadata only: every image is absent
    assert summary["labels"]["Hernia"] == 227


def test_inspect_counts_missing_and_unreadable(tmp_path, capsys):
    for name in ("a.png", "b.png"):
        _png(tmp_path / "cls" / name)
    (tmp_path / "cls" / "c.png").write_text("text, not pixels")
    pd.DataFrame({"path": ["cls/a.png", "cls/gone.png"], "patient_id": ["1", "2"]}).to_csv(
        tmp_path / "metadata.csv", index=False
    )
    assert main(["data", "inspect", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 3 and summary["n_unreadable"] == 1 and summary["n_missing"] == 0
    csv = tmp_path / "list.csv"
    pd.DataFrame({"path": ["cls/a.png", "cls/gone.png"], "label": ["x", "y"]}).to_csv(csv, index=False)
    assert main(["data", "inspect", str(csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_missing"] == 1
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
