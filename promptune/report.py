"""`eval --report DIR`: metrics.json, per_class.csv, confusion.png (drawn with Pillow) and misclassified.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont

from promptune.errors import PromptuneError
from promptune.fileio import atomic_write

if TYPE_CHECKING:
    from promptune.api import EvalReport

MAX_MATRIX_CLASSES = 50  # beyond this, the heat map shows the most-confused classes only
CELL = 22
LABEL_CHARS = 24


def per_class_rows(report: "EvalReport") -> list[dict[str, object]]:
    """support, accuracy, precision, recall, F1 and the most-confused class, per class."""
    confusion = torch.tensor(report.confusion, dtype=torch.float64)
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    rows = []
    for i, name in enumerate(report.class_names):
        tp = float(confusion[i, i])
        recall = tp / float(support[i]) if support[i] > 0 else None
        precision = tp / float(predicted[i]) if predicted[i] > 0 else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if precision is not None and recall is not None else None)
        errors = confusion[i].clone()
        errors[i] = 0
        confused = report.class_names[int(errors.argmax())] if errors.sum() > 0 else ""
        rows.append({"class": name, "support": int(support[i]), "accuracy": recall, "precision": precision,
                     "recall": recall, "f1": f1, "most_confused_with": confused})
    return rows


def _most_confused(confusion: torch.Tensor, limit: int) -> list[int]:
    off = confusion.clone().float()
    off.fill_diagonal_(0)
    score = off.sum(dim=0) + off.sum(dim=1)
    return sorted(score.argsort(descending=True)[:limit].tolist())


def draw_confusion(confusion: torch.Tensor, names: list[str], path: Path) -> tuple[int, int]:
    """Row-normalised heat map with class labels; returns the image size."""
    keep = list(range(len(names))) if len(names) <= MAX_MATRIX_CLASSES else _most_confused(confusion, MAX_MATRIX_CLASSES)
    matrix = confusion[keep][:, keep].float()
    rows = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    labels = [names[i][:LABEL_CHARS] for i in keep]
    font = ImageFont.load_default()
    margin = max(96, 8 + 7 * max(len(label) for label in labels))  # also room for the axis legend
    n = len(keep)
    size = (margin + n * CELL + 10, margin + n * CELL + 10)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for r in range(n):
        for c in range(n):
            shade = int(255 * (1 - float(rows[r, c])))
            x, y = margin + c * CELL, margin + r * CELL
            draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=(shade, shade, 255), outline=(220, 220, 220))
            count = int(matrix[r, c])
            if count:
                draw.text((x + 3, y + 5), str(count) if count < 1000 else "1k+", fill="black" if shade > 120 else "white", font=font)
    for i, label in enumerate(labels):
        draw.text((4, margin + i * CELL + 5), label, fill="black", font=font)  # true class (rows)
        column = Image.new("RGBA", (margin - 4, CELL), (255, 255, 255, 0))
        ImageDraw.Draw(column).text((2, 5), label, fill="black", font=font)
        rotated = column.rotate(90, expand=True)
        image.paste(rotated, (margin + i * CELL, 2), rotated)  # predicted class (columns)
    draw.text((4, 4), "rows: true class", fill="gray", font=font)
    draw.text((4, 16), "columns: predicted", fill="gray", font=font)
    image.save(path, format="PNG")
    return size


def prepare_report_dir(folder: str | Path) -> Path:
    """Create the report folder up front, so a bad --report fails before a long evaluation, not after it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PromptuneError(f"--report '{folder}' is a file; give a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PromptuneError(f"Cannot create report folder '{folder}': {error.strerror or error}.") from None
    return folder


def _write_csv(path: Path, fieldnames: list[str], rows: list[dict[str, object]]) -> None:
    def write(name: str) -> None:
        with open(name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def write_report(report: "EvalReport", folder: str | Path, header: dict[str, object]) -> list[Path]:
    """Each file is replaced atomically: a report folder never holds a half-written file."""
    folder = prepare_report_dir(folder)
    try:
        metrics = json.dumps({**header, **report.to_dict()}, indent=2)
        atomic_write(folder / "metrics.json", lambda name: Path(name).write_text(metrics, encoding="utf-8"))
        rows = per_class_rows(report)
        _write_csv(folder / "per_class.csv", list(rows[0]), rows)
        atomic_write(folder / "confusion.png",
                     lambda name: draw_confusion(torch.tensor(report.confusion), report.class_names, Path(name)))
        _write_csv(folder / "misclassified.csv", ["path", "true", "predicted"], report.misclassified)
    except OSError as error:
        raise PromptuneError(f"Cannot write the report into '{folder}': {error.strerror or error}.") from None
    return [folder / "metrics.json", folder / "per_class.csv", folder / "confusion.png", folder / "misclassified.csv"]
