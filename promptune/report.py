"""`eval --report DIR`: metrics.json, per_class.csv, confusion.png (drawn with Pillow) and misclassified.csv."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw

from promptune.data import SPLIT_LABELS, images_under
from promptune.errors import PromptuneError
from promptune.fileio import atomic_write, is_marked, mark_folder
from promptune.fonts import drawable, font_for
from promptune.metrics import rounded

if TYPE_CHECKING:
    from promptune.api import EvalReport

MAX_MATRIX_CLASSES = 50  # beyond this, the heat map shows the most-confused classes only
MATRIX_SPAN = 480  # the matrix aims at this many pixels across: big cells for few classes ...
MIN_CELL, MAX_CELL = 22, 56  # ... within these bounds (50 classes at 22 px: 1,100 px)
LABEL_CHARS = 24
TEXT_SIZE, TITLE_SIZE = 13, 16  # pixels
PAD = 8
GRID, INK, MUTED = (220, 220, 220), (0, 0, 0), (110, 110, 110)


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
        rows.append(rounded({"class": name, "support": int(support[i]), "accuracy": recall, "precision": precision,
                             "recall": recall, "f1": f1, "most_confused_with": confused}))
    return rows


def _most_confused(confusion: torch.Tensor, limit: int) -> list[int]:
    off = confusion.clone().float()
    off.fill_diagonal_(0)
    score = off.sum(dim=0) + off.sum(dim=1)
    return sorted(score.argsort(descending=True)[:limit].tolist())


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"


def _count_text(count: int) -> str:
    return str(count) if count < 1000 else f"{count // 1000}k"


def _rotated_label(label: str, font, length: int, height: int) -> Image.Image:
    """`label` written upwards, its start at the bottom edge (next to the matrix)."""
    strip = Image.new("RGBA", (length, height), (255, 255, 255, 0))
    ImageDraw.Draw(strip).text((0, height // 2), label, fill=INK, font=font, anchor="lm")
    return strip.rotate(90, expand=True)


def draw_confusion(confusion: torch.Tensor, names: list[str], path: Path, title: str) -> tuple[int, int]:
    """Row-normalised heat map under `title`, class names drawn with a system font that has their glyphs
    (`fonts.font_for`); cells grow for few classes. Returns the image size."""
    keep = list(range(len(names))) if len(names) <= MAX_MATRIX_CLASSES else _most_confused(confusion, MAX_MATRIX_CLASSES)
    matrix = confusion[keep][:, keep].float()  # (n, n)
    n = len(keep)
    cell = max(MIN_CELL, min(MAX_CELL, MATRIX_SPAN // n))
    label_fonts = [font_for(_short(names[i]), TEXT_SIZE) for i in keep]
    labels = [drawable(_short(names[i]), font) for i, font in zip(keep, label_fonts)]
    title_font = font_for(title, TITLE_SIZE)
    title = drawable(title, title_font)
    subtitle = "rows: true class, columns: predicted class, shade: share of the row"
    if n < len(names):
        subtitle += f"; the {n} most-confused of {len(names)} classes"
    subtitle_font = font_for(subtitle, TEXT_SIZE)

    label_length = int(max(font.getlength(label) for font, label in zip(label_fonts, labels))) + PAD
    header = PAD + TITLE_SIZE + PAD + TEXT_SIZE + 2 * PAD  # title and subtitle lines
    left, top = PAD + label_length, header + label_length  # matrix origin
    width = max(left + n * cell, PAD + int(max(title_font.getlength(title), subtitle_font.getlength(subtitle)))) + PAD
    image = Image.new("RGB", (width, top + n * cell + PAD), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill=INK, font=title_font)
    draw.text((PAD, PAD + TITLE_SIZE + PAD), subtitle, fill=MUTED, font=subtitle_font)
    _draw_cells(draw, matrix, (left, top), cell)
    for i, (label, font) in enumerate(zip(labels, label_fonts)):
        draw.text((left - PAD // 2, top + i * cell + cell // 2), label, fill=INK, font=font, anchor="rm")  # true
        column = _rotated_label(label, font, label_length - PAD // 2, cell)
        image.paste(column, (left + i * cell, header), column)  # predicted
    image.save(path, format="PNG")
    return image.size


def _draw_cells(draw: ImageDraw.ImageDraw, matrix: torch.Tensor, origin: tuple[int, int], cell: int) -> None:
    """One square per (true, predicted) pair, shaded by its share of the row, with its count."""
    shares = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)  # (n, n)
    font = font_for("0123456789k", max(9, min(TEXT_SIZE, cell // 3)))
    for r, c in itertools.product(range(len(matrix)), repeat=2):
        shade = int(255 * (1 - float(shares[r, c])))
        x, y = origin[0] + c * cell, origin[1] + r * cell
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=GRID)
        count = int(matrix[r, c])
        if count:
            draw.text((x + cell // 2, y + cell // 2), _count_text(count), font=font, anchor="mm",
                      fill=INK if shade > 120 else "white")


def prepare_report_dir(folder: str | Path) -> Path:
    """Create and mark the report folder up front, so a bad --report fails before a long evaluation, not after it.

    The marker (`fileio.mark_folder`) keeps `tune` and `eval` from reading the report as a class folder, so it may sit
    inside the evaluated folder. A folder of someone's images (a class folder) is refused: confusion.png would join them.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PromptuneError(f"--report '{folder}' is a file; give a folder.")
    if folder.is_dir() and not is_marked(folder):
        images = len(images_under(folder))
        if images:
            raise PromptuneError(
                f"--report '{folder}' holds {images} image{'s' if images != 1 else ''} (a class folder?); give a new or "
                f"empty folder, so that confusion.png never joins your images."
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mark_folder(folder, "report")
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


def confusion_title(report: "EvalReport", header: dict[str, object]) -> str:
    """The prompt file, top-1 and what was evaluated, e.g. 'prompts.safetensors: top-1 72.0% on test/ (100 images)'."""
    name = Path(str(header["prompt_file"])).name if header.get("prompt_file") else "prompts"
    return f"{name}: top-1 {report.top1:.1%} on {SPLIT_LABELS[report.split]} ({report.n_images} images)"


def write_report(report: "EvalReport", folder: str | Path, header: dict[str, object]) -> list[Path]:
    """Each file is replaced atomically: a report folder never holds a half-written file."""
    folder = prepare_report_dir(folder)
    try:
        metrics = json.dumps({**header, **report.to_dict()}, indent=2)
        atomic_write(folder / "metrics.json", lambda name: Path(name).write_text(metrics, encoding="utf-8"))
        rows = per_class_rows(report)
        _write_csv(folder / "per_class.csv", list(rows[0]), rows)
        atomic_write(folder / "confusion.png", lambda name: draw_confusion(
            torch.tensor(report.confusion), report.class_names, Path(name), confusion_title(report, header)))
        _write_csv(folder / "misclassified.csv", ["path", "true", "predicted"], report.misclassified)
    except OSError as error:
        raise PromptuneError(f"Cannot write the report into '{folder}': {error.strerror or error}.") from None
    return [folder / "metrics.json", folder / "per_class.csv", folder / "confusion.png", folder / "misclassified.csv"]
