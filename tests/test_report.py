"""eval --report: files exist, CSV numbers match the JSON, floats are rounded; confusion.png has a title, grows
with the class count within bounds, and draws class names in any script with a system font that has their glyphs
(or falls back without one)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image, ImageFont, ImageOps

import promptune.fonts as fonts
from promptune.api import EvalReport
from promptune.metrics import confusion_matrix, per_class_accuracy
from promptune.errors import PromptuneError
from promptune.report import (
    MAX_CELL,
    MAX_MATRIX_CLASSES,
    MIN_CELL,
    PAD,
    TITLE_SIZE,
    draw_confusion,
    prepare_report_dir,
    write_report,
)


def _confusion(n_classes: int, n_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, predicted, confusion) of a model that is right 60% of the time, else guesses."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n_images,), generator=g)
    noise = torch.randint(0, n_classes, (n_images,), generator=g)
    predicted = torch.where(torch.rand(n_images, generator=g) < 0.6, labels, noise)
    return labels, predicted, confusion_matrix(predicted, labels, n_classes)


def _report(n_classes: int, n_images: int, seed: int = 0) -> EvalReport:
    labels, predicted, confusion = _confusion(n_classes, n_images, seed)
    names = [f"class_{i:03d}" for i in range(n_classes)]
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
        assert float(row["accuracy"]) == metrics["per_class"][row["class"]]  # both rounded the same way
        precision = float(row["precision"])
        assert precision == pytest.approx(float(confusion[i, i]) / float(confusion[:, i].sum()), rel=1e-5)
        f1 = float(row["f1"])
        recall = float(row["recall"])
        assert f1 == pytest.approx(2 * precision * recall / (precision + recall), rel=1e-5)
        for column in ("accuracy", "precision", "recall", "f1"):
            value = float(row[column])
            assert value == float(f"{value:.6g}"), row  # 6 significant digits at most, like metrics.json
        errors = confusion[i].clone()
        errors[i] = 0
        assert row["most_confused_with"] == report.class_names[int(errors.argmax())]
    misclassified = list(csv.DictReader(open(tmp_path / "rep" / "misclassified.csv")))
    assert len(misclassified) == report.n_images - int(confusion.diag().sum())
    with Image.open(tmp_path / "rep" / "confusion.png") as image:
        image.verify()
    with Image.open(tmp_path / "rep" / "confusion.png") as image:
        width, height = image.size
        assert width > 7 * MIN_CELL and height > 7 * MIN_CELL


def test_large_class_count_shows_most_confused_only(tmp_path):
    report = _report(80, 2000, seed=1)
    write_report(report, tmp_path, {})
    with Image.open(tmp_path / "confusion.png") as image:
        width, _ = image.size
    assert MAX_MATRIX_CLASSES * MIN_CELL < width < 60 * MIN_CELL + 300


def test_rewriting_a_report_replaces_every_file_and_leaves_no_temp_files(tmp_path):
    write_report(_report(5, 100, seed=2), tmp_path, {"run": 1})
    write_report(_report(3, 50, seed=3), tmp_path, {"run": 2})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"] == 2 and metrics["n_images"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".promptune", "confusion.png", "metrics.json", "misclassified.csv", "per_class.csv"]


def test_report_folder_that_is_a_file_is_refused_and_kept(tmp_path):
    target = tmp_path / "report"
    target.write_text("mine")
    with pytest.raises(PromptuneError, match="is a file; give a folder"):
        prepare_report_dir(target)
    assert target.read_text() == "mine"


# ---------------------------------------------------------------------------------------------------- confusion.png


def _draw(tmp_path, n_classes: int, title: str = "p.safetensors: top-1 60.0% on test/ (300 images)",
          names: list[str] | None = None) -> Image.Image:
    _, _, confusion = _confusion(n_classes, 300)
    path = tmp_path / f"confusion_{n_classes}.png"
    draw_confusion(confusion, names or [f"class_{i:03d}" for i in range(n_classes)], path, title)
    with Image.open(path) as image:
        return image.convert("RGB")


def _ink_columns(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int] | None:
    """(first, last) x with dark pixels inside `box`, or None where it is blank."""
    dark = ImageOps.invert(image.crop(box).convert("L")).point(lambda v: 255 if v > 96 else 0)
    bbox = dark.getbbox()
    return None if bbox is None else (box[0] + bbox[0], box[0] + bbox[2])


def test_confusion_png_is_readable_for_few_classes_and_bounded_for_many(tmp_path):
    """3 classes made a 170 px picture; the cells now grow for few classes and shrink (to a floor) for many."""
    sizes = {n: _draw(tmp_path, n).size for n in (3, 10, 60)}
    assert sizes[3][0] >= 3 * 40 + 100 and sizes[3][1] >= 3 * 40 + 100
    assert sizes[3][0] < sizes[10][0] < sizes[60][0] and sizes[3][1] < sizes[10][1] < sizes[60][1]
    label_room = 300  # row labels (24 characters at most) and margins
    assert sizes[10][0] <= 10 * MAX_CELL + label_room
    assert sizes[60][0] <= MAX_MATRIX_CLASSES * MIN_CELL + label_room  # 50 of the 60 classes shown, at the floor


def test_confusion_png_has_its_title_across_the_top(tmp_path):
    title = "prompts.safetensors: top-1 72.5% on test/ (100 images)"
    image = _draw(tmp_path, 3, title=title)
    band = (0, 0, image.width, PAD + TITLE_SIZE + 2)
    ink = _ink_columns(image, band)
    assert ink is not None, "no title drawn"
    length = fonts.font_for(title, TITLE_SIZE).getlength(title)
    assert ink[0] <= PAD + 2 and ink[1] - ink[0] == pytest.approx(length, abs=4)
    longer = _draw(tmp_path, 3, title=title + " and a much longer tail that needs a wider picture")
    assert longer.width > image.width  # the picture widens to fit its title rather than cut it


@pytest.fixture()
def no_system_fonts(monkeypatch):
    """As on a bare CI machine: no font files anywhere."""
    monkeypatch.setattr(fonts, "FONT_DIRS", ())
    fonts.font_files.cache_clear()
    fonts._best_font.cache_clear()
    yield
    fonts.font_files.cache_clear()
    fonts._best_font.cache_clear()


@pytest.fixture()
def one_system_font(tmp_path, monkeypatch):
    """A font folder holding one file: Pillow's own built-in TrueType face (basic Latin only)."""
    folder = tmp_path / "fonts"
    folder.mkdir()
    (folder / "Builtin.ttf").write_bytes(ImageFont.load_default(12).path.getvalue())
    monkeypatch.setattr(fonts, "FONT_DIRS", (str(folder),))
    fonts.font_files.cache_clear()
    fonts._best_font.cache_clear()
    yield folder / "Builtin.ttf"
    fonts.font_files.cache_clear()
    fonts._best_font.cache_clear()


NON_LATIN = ["café", "Über", "日本", "ελληνικά", "кошка"]


def test_system_font_files_are_found_and_used(one_system_font):
    assert fonts.font_files() == (one_system_font,)
    font = fonts.font_for("plain", 13)
    assert isinstance(font, ImageFont.FreeTypeFont) and font.path == str(one_system_font) and font.size == 13
    assert fonts.missing_glyphs(font, "plain") == []
    assert fonts.missing_glyphs(font, "日本 café") == ["日", "本", "é"]


def test_labels_fall_back_gracefully_without_their_glyphs(no_system_fonts, tmp_path):
    font = fonts.font_for("café", 13)  # Pillow's built-in face: no é
    assert fonts.missing_glyphs(font, "café") == ["é"]
    assert fonts.drawable("café Über", font) == "cafe Uber"  # accents dropped rather than boxes drawn
    assert fonts.drawable("日本", font) == "日本"  # nothing better to draw: left as it is
    image = _draw(tmp_path, 5, names=NON_LATIN, title="prompts-日本.safetensors: top-1 50.0%")
    assert image.width > 5 * MIN_CELL


def test_labels_in_any_script_use_a_font_with_their_glyphs(tmp_path):
    """é, Ü and 日本 drew as empty boxes with Pillow's default font. Each label now gets a system font that has all its
    glyphs wherever this machine has one (CI machines may have none: then the fallback above applies)."""
    for label in NON_LATIN:
        some_font_has_them = any(
            not fonts.missing_glyphs(face, label)
            for face in (fonts._sized(path, fonts.PROBE_SIZE) for path in fonts.font_files()) if face is not None
        )
        chosen = fonts.font_for(label, 13)
        assert (fonts.missing_glyphs(chosen, label) == []) == some_font_has_them, label
    image = _draw(tmp_path, 5, names=NON_LATIN)
    assert image.width > 5 * MIN_CELL
