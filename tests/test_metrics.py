"""Honest evaluation figures: exact accuracies, no top-5 with 5 classes or fewer, balanced accuracy and the
majority-class baseline beside top-1, the evaluated split, rounded JSON floats, short reprs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from promptune.api import EvalReport, TuneResult
from promptune.data import load_eval_data
from promptune.metrics import (
    balanced_accuracy,
    confusion_matrix,
    majority_baseline,
    per_class_accuracy,
    rounded,
    subset_accuracy,
    top5_accuracy,
    topk_accuracy,
)
from promptune.train import EpochStats, TrainSummary

from conftest import make_shape_folder


def _logits_hitting(hits: int, total: int, n_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose top-1 is right for the first `hits` of `total` images."""
    labels = torch.arange(total) % n_classes
    predicted = torch.where(torch.arange(total) < hits, labels, (labels + 1) % n_classes)
    return torch.nn.functional.one_hot(predicted, n_classes).float(), labels


def test_accuracies_are_exact_ratios():
    """float32 means printed 9/40 as 0.22499999403953552."""
    logits, labels = _logits_hitting(9, 40)
    assert topk_accuracy(logits, labels, 1) == 9 / 40
    assert subset_accuracy(logits, labels, list(range(10))) == 9 / 40
    assert json.dumps(topk_accuracy(logits, labels, 1)) == "0.225"


@pytest.mark.parametrize("n_classes, has_top5", [(2, False), (5, False), (6, True), (100, True)])
def test_top5_only_with_more_than_five_classes(n_classes, has_top5):
    """With 5 classes or fewer the true class is always among the top 5: top-5 was always 100%."""
    logits, labels = _logits_hitting(3, 20, n_classes)
    top5 = top5_accuracy(logits, labels)
    assert (top5 is not None) == has_top5
    if has_top5:
        assert top5 == topk_accuracy(logits, labels, 5)


def test_a_model_answering_one_class_has_a_high_top1_but_not_a_high_balanced_accuracy():
    labels = torch.tensor([0] * 1900 + [1] * 100)
    predicted = torch.zeros(2000, dtype=torch.long)  # always class 0
    confusion = confusion_matrix(predicted, labels, 2)
    assert float((predicted == labels).double().mean()) == 0.95
    assert balanced_accuracy(confusion) == 0.5
    assert majority_baseline(confusion) == 0.95  # top-1 is no better than always answering the big class


def test_balanced_accuracy_averages_only_classes_with_images():
    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 1]])  # class 1 has no image
    assert balanced_accuracy(confusion) == (3 / 4 + 1 / 2) / 2
    assert majority_baseline(confusion) == 4 / 6
    assert balanced_accuracy(torch.zeros(3, 3, dtype=torch.long)) is None
    assert majority_baseline(torch.zeros(3, 3, dtype=torch.long)) is None


def test_rounded_keeps_six_significant_digits_everywhere():
    value = {"a": 2 / 3, "b": [1 / 3, {"c": 1.23456789e-9}], "n": 7, "flag": True, "none": None, "t": (0.1 + 0.2,)}
    assert rounded(value) == {"a": 0.666667, "b": [0.333333, {"c": 1.23457e-09}], "n": 7, "flag": True, "none": None,
                              "t": [0.3]}
    assert math.isnan(rounded(float("nan")))
    assert rounded(0.22499999403953552) == 0.225 and rounded(1.0) == 1.0


def _eval_report(n_classes: int, n_images: int, misclassified: int = 0) -> EvalReport:
    labels = torch.arange(n_images) % n_classes
    predicted = torch.where(torch.arange(n_images) < n_images - misclassified, labels, (labels + 1) % n_classes)
    names = [f"class_{i}" for i in range(n_classes)]
    confusion = confusion_matrix(predicted, labels, n_classes)
    return EvalReport(
        class_names=names, n_images=n_images, top1=float((predicted == labels).double().mean()), top5=None,
        per_class=per_class_accuracy(confusion, names), confusion=confusion.tolist(),
        misclassified=[{"path": f"/data/image_{i:05d}.png", "true": "a", "predicted": "b"} for i in range(misclassified)],
        split="test",
    )


def test_eval_report_json_has_the_new_figures_rounded():
    report = _eval_report(3, 30, misclassified=10)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["top5"] is None and data["split"] == "test" and data["new_classes"] == []
    assert data["top1"] == 0.666667 and data["balanced_accuracy"] == 0.666667 and data["majority_baseline"] == 0.333333
    assert report.balanced_accuracy == pytest.approx(2 / 3) and report.majority_baseline == pytest.approx(1 / 3)


def test_eval_report_repr_is_short():
    report = _eval_report(200, 20_000, misclassified=5_000)
    text = repr(report)
    assert len(text) < 300, text
    assert "top1=0.75" in text and "misclassified=5000" in text and "n_classes=200" in text
    assert "image_" not in text and "class_1" not in text


def test_tune_result_repr_is_short():
    epochs = [EpochStats(e, 0.5, 0.8, 0.7, 1.0, 10.0, 0.0) for e in range(1, 501)]
    summary = TrainSummary(epochs=epochs, best_epoch=3, best_val_acc=0.7123456)
    names = [f"class_{i}" for i in range(300)]
    result = TuneResult(Path("p.safetensors"), "sep", "ViT-B-16", names, {n: 16 for n in names}, 1200, [], summary,
                        "cpu", 2)
    text = repr(result)
    assert len(text) < 300, text
    assert "epochs=500" in text and "classes=300" in text and "train_images=4800" in text and "0.7123" in text
    assert "EpochStats" not in text and "class_1" not in text


def test_eval_data_says_which_split_it_is(tmp_path):
    split = tmp_path / "split"
    make_shape_folder(split / "train", per_class=2)
    make_shape_folder(split / "val", per_class=2, seed=1)
    assert load_eval_data(split).split == "val"  # no test/: val/
    make_shape_folder(split / "test", per_class=2, seed=2)
    evaluation = load_eval_data(split)
    assert evaluation.split == "test" and evaluation.root == split / "test"
    flat = make_shape_folder(tmp_path / "flat", per_class=2)
    evaluation = load_eval_data(flat)
    assert evaluation.split == "all" and evaluation.root == flat
