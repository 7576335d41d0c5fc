"""Classification metrics from a logits matrix: top-k, balanced accuracy, majority baseline, per-class accuracy,
confusion, base-to-new; and the rounding of every float promptune writes as JSON.

Accuracies are exact ratios of counts (Python floats), never float32 means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

TOP5_MIN_CLASSES = 6  # with 5 classes or fewer the true class is always among the top 5: top-5 would say nothing
JSON_DIGITS = 6  # significant digits of JSON floats: still tells one image in 100,000 apart


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    if labels.numel() == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return int(hits.sum()) / labels.numel()


def top5_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Top-5 accuracy, or None with 5 classes or fewer."""
    return topk_accuracy(logits, labels, 5) if logits.shape[1] >= TOP5_MIN_CLASSES else None


def balanced_accuracy(confusion: torch.Tensor) -> float | None:
    """Mean recall over the classes that have images: answering one class always scores 1 / classes, however
    many images that class has."""
    support = confusion.sum(dim=1)
    present = support > 0
    if not present.any():
        return None
    recalls = [int(confusion[i, i]) / int(support[i]) for i in present.nonzero().flatten().tolist()]
    return sum(recalls) / len(recalls)


def majority_baseline(confusion: torch.Tensor) -> float | None:
    """Top-1 of always answering the most frequent true class: the accuracy a useless model already gets."""
    support = confusion.sum(dim=1)
    total = int(support.sum())
    return int(support.max()) / total if total else None


def rounded(value: Any, digits: int = JSON_DIGITS) -> Any:
    """`value` with every float, also inside dicts, lists and tuples, rounded to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    flat = labels.long() * n_classes + predicted.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_accuracy(confusion: torch.Tensor, names: list[str]) -> dict[str, float | None]:
    support = confusion.sum(dim=1)
    return {
        name: (float(confusion[i, i]) / float(support[i]) if support[i] > 0 else None) for i, name in enumerate(names)
    }


def subset_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> float | None:
    """Accuracy on images of `classes`, classifying among those classes only (the base-to-new protocol)."""
    keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    if not keep.any():
        return None
    columns = torch.tensor(classes)
    remap = {c: i for i, c in enumerate(classes)}
    target = torch.tensor([remap[int(c)] for c in labels[keep]])
    return int((logits[keep][:, columns].argmax(dim=1) == target).sum()) / len(target)


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


@dataclass
class BaseNew:
    base: float | None  # accuracy on trained classes, among trained classes
    new: float | None  # accuracy on unseen classes, among unseen classes
    hm: float | None

    @classmethod
    def compute(cls, logits: torch.Tensor, labels: torch.Tensor, base: list[int], new: list[int]) -> "BaseNew":
        b, n = subset_accuracy(logits, labels, base), subset_accuracy(logits, labels, new)
        return cls(b, n, harmonic_mean(b, n))
