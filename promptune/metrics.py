"""Classification metrics from a logits matrix: top-k, per-class accuracy, confusion, base-to-new."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    if labels.numel() == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hits.float().mean())


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
    return float((logits[keep][:, columns].argmax(dim=1) == target).float().mean())


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
