"""eval --report: files exist, the PNG is a valid image of the expected size, CSV numbers match the JSON."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from promptune.api import EvalReport
from promptune.metrics import confusion_matrix, per_class_accuracy
from promptune.errors import PromptuneError
from promptune.report import CELL, MAX_MATRIX_CLASSES, prepare_report_dir, write_report


def _report(n_classes: int, n_images: int, seed: int = 0) -> EvalReport:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n_images,), generator=g)
    noise = torch.randint(0, n_classes, (n_images,), generator=g)
    predicted = torch.where(torch.rand(n_images, generator=g) < 0.6, labels, noise)
    names = [f"class_{i:03d}" for i in range(n_classes)]
    confusion = confusion_matrix(predicted, labels, n_classes)
    return EvalReport(
        class_names=names, n_images=n_images, top1=float((predicted == labels).float().mean()), top5=1.0,
        per_class=per_class_accuracy(confusion, names), confusion=confusion.tolist(),
        misclassified=[{"path": f"img{i}.png", "true": names[int(t)], "predicted": names[int(p)]}
                       for i, (t, p) in enumerate(zip(labels, predicted)) if t != p],
    )


def test_report_files_agree(tmp_path):
    report = _report(7, 300)
    write_report(report, tmp_path / "rep", {"prompt_file": "p.safetensors"})
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "rep" / "per_class.csv")))
    assert [r["class"] for r in rows] == report.class_names
    confusion = torch.tensor(report.confusion)
    for row in rows:
        i = report.class_names.index(row["class"])
        assert int(row["support"]) == int(confusion[i].sum())
        assert abs(float(row["accuracy"]) - metrics["per_class"][row["class"]]) < 1e-9
        precision = float(row["precision"])
        assert abs(precision - float(confusion[i, i]) / float(confusion[:, i].sum())) < 1e-9
        f1 = float(row["f1"])
        recall = float(row["recall"])
        assert abs(f1 - 2 * precision * recall / (precision + recall)) < 1e-9
        errors = confusion[i].clone()
        errors[i] = 0
        assert row["most_confused_with"] == report.class_names[int(errors.argmax())]
    misclassified = list(csv.DictReader(open(tmp_path / "rep" / "misclassified.csv")))
    assert len(misclassified) == report.n_images - int(confusion.diag().sum())
    with Image.open(tmp_path / "rep" / "confusion.png") as image:
        image.verify()
    with Image.open(tmp_path / "rep" / "confusion.png") as image:
        width, height = image.size
        assert width == height and width > 7 * CELL


def test_large_class_count_shows_most_confused_only(tmp_path):
    report = _report(80, 2000, seed=1)
    write_report(report, tmp_path, {})
    with Image.open(tmp_path / "confusion.png") as image:
        width, _ = image.size
    assert MAX_MATRIX_CLASSES * CELL < width < 60 * CELL + 300


def test_rewriting_a_report_replaces_every_file_and_leaves_no_temp_files(tmp_path):
    write_report(_report(5, 100, seed=2), tmp_path, {"run": 1})
    write_report(_report(3, 50, seed=3), tmp_path, {"run": 2})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"] == 2 and metrics["n_images"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "metrics.json", "misclassified.csv", "per_class.csv"]


def test_report_folder_that_is_a_file_is_refused_and_kept(tmp_path):
    target = tmp_path / "report"
    target.write_text("mine")
    with pytest.raises(PromptuneError, match="is a file; give a folder"):
        prepare_report_dir(target)
    assert target.read_text() == "mine"
