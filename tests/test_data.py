"""promptune.data: discovery, k-shot sampling, splits, robust decoding, transforms, loaders, predict inputs."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from promptune.data import (
    IMAGE_EXTENSIONS,
    Batch,
    EvalData,
    ImageDataset,
    ImageItem,
    Preprocess,
    Sample,
    TrainingData,
    UnreadableImageError,
    build_transform,
    collate_skipping,
    decode_image,
    default_workers,
    find_layout,
    prediction_items,
    load_eval_data,
    load_training_data,
    make_loader,
    prompt_name,
    scan_classes,
)
from promptune.errors import DataError

SIZE = (24, 16)  # non-square, so a swapped width/height would show


def noise_image(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    image_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(suffix, suffix[1:].upper())
    noise_image(seed, size).save(path, format=image_format)
    return path


def make_classes(root: Path, counts: dict[str, int], suffix: str = ".png") -> dict[str, list[Path]]:
    return {
        name: [save_image(root / name / f"img{i:03d}{suffix}", seed=hash((name, i)) % 10_000) for i in range(count)]
        for name, count in counts.items()
    }


def encoded(image_format: str, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed).save(buffer, format=image_format)
    return buffer.getvalue()


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def corrupt_png_bytes() -> bytes:
    data = bytearray(encoded("PNG"))
    rng = random.Random(1)
    for position in range(len(data) // 3, len(data) - 20):  # keep the signature and header, garble the pixel data
        data[position] = rng.randrange(256)
    return bytes(data)


BAD_FILES: dict[str, bytes] = {
    "corrupt.png": corrupt_png_bytes(),
    "truncated.jpg": encoded("JPEG")[: len(encoded("JPEG")) // 2],
    "truncated.png": encoded("PNG")[: len(encoded("PNG")) // 2],
    "empty.jpg": b"",
    "text.jpg": b"this is not an image, just text in a file named .jpg\n",
}


def assert_one_sentence(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


def _paths_by_class(items: list[ImageItem], class_names: list[str]) -> dict[str, set[Path]]:
    return {name: {item.path for item in items if item.label == label} for label, name in enumerate(class_names)}


def train_paths(data: TrainingData) -> dict[str, set[Path]]:
    return _paths_by_class(data.train, data.class_names)


def val_paths(data: TrainingData) -> dict[str, set[Path]]:
    return _paths_by_class(data.val, data.class_names)


# ------------------------------------------------------------------------------------------------------- discovery


def test_scan_classes_sorts_ignores_hidden_and_non_images_and_finds_nested(tmp_path: Path) -> None:
    upper_jpg = save_image(tmp_path / "zebra" / "A.JPG")
    mixed_png = save_image(tmp_path / "zebra" / "b.Png")
    nested = save_image(tmp_path / "zebra" / "sub" / "deeper" / "c.jpeg")
    ant = save_image(tmp_path / "ant" / "ant.webp")
    save_image(tmp_path / "zebra" / ".hidden.jpg")
    save_image(tmp_path / "zebra" / ".cache" / "x.jpg")
    save_image(tmp_path / ".hidden_class" / "x.jpg")
    save_image(tmp_path / "loose_image_at_root.jpg")
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    (tmp_path / "zebra" / "labels.csv").write_text("a,b")

    classes = scan_classes(tmp_path)

    assert list(classes) == ["ant", "zebra"]
    assert classes["ant"] == [ant]
    assert classes["zebra"] == sorted([upper_jpg, mixed_png, nested])


def test_extensions_cover_the_documented_formats() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_scan_follows_symlinked_files_and_survives_directory_cycles(tmp_path: Path) -> None:
    outside = save_image(tmp_path / "elsewhere" / "linked_target.png")
    data = tmp_path / "data"
    make_classes(data, {"a": 1, "b": 1})
    (data / "a" / "linked.png").symlink_to(outside)
    (data / "a" / "loop").symlink_to(data / "a", target_is_directory=True)
    (data / "b" / "nested").mkdir()
    (data / "b" / "nested" / "back_up").symlink_to(data / "b", target_is_directory=True)

    classes = scan_classes(data)

    assert data / "a" / "linked.png" in classes["a"]
    assert len(classes["a"]) == len(set(classes["a"]))
    assert len(classes["b"]) == 1


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("golden_retriever", "golden retriever"),
        ("golden-retriever", "golden retriever"),
        ("  golden__retriever -- dog ", "golden retriever dog"),
        ("cat", "cat"),
    ],
)
def test_prompt_name(folder: str, expected: str) -> None:
    assert prompt_name(folder) == expected


def test_missing_folder_is_a_one_sentence_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_training_data(tmp_path / "nope")
    assert "nope" in assert_one_sentence(caught.value)


def test_file_instead_of_folder_is_a_one_sentence_error(tmp_path: Path) -> None:
    file = save_image(tmp_path / "image.png")
    with pytest.raises(DataError) as caught:
        scan_classes(file)
    assert str(file) in assert_one_sentence(caught.value)


def test_a_single_class_is_a_one_sentence_error(tmp_path: Path) -> None:
    make_classes(tmp_path, {"only": 3})
    with pytest.raises(DataError) as caught:
        load_training_data(tmp_path)
    message = assert_one_sentence(caught.value)
    assert "1 class folder" in message and "at least 2" in message


def test_an_empty_class_folder_is_named(tmp_path: Path) -> None:
    make_classes(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "empty_one").mkdir()
    (tmp_path / "empty_one" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as caught:
        scan_classes(tmp_path)
    assert "empty_one" in assert_one_sentence(caught.value)


def test_folders_with_the_same_prompt_name_are_both_named(tmp_path: Path) -> None:
    make_classes(tmp_path, {"golden_retriever": 1, "golden-retriever": 1, "cat": 1})
    with pytest.raises(DataError) as caught:
        scan_classes(tmp_path)
    message = assert_one_sentence(caught.value)
    assert "golden_retriever" in message and "golden-retriever" in message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads everything")
def test_unreadable_root_is_a_one_sentence_error(tmp_path: Path) -> None:
    make_classes(tmp_path / "data", {"a": 1, "b": 1})
    (tmp_path / "data").chmod(0)
    try:
        with pytest.raises(DataError) as caught:
            scan_classes(tmp_path / "data")
        assert_one_sentence(caught.value)
    finally:
        (tmp_path / "data").chmod(0o755)


# -------------------------------------------------------------------------------------------------------- sampling


def test_k_shot_takes_exact_counts_and_disjoint_validation(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 10, "b": 10, "c": 10})
    for shots, expected_val in [(1, 1), (3, 3), (5, 4)]:
        data = load_training_data(tmp_path, shots=shots, seed=0)
        assert data.class_names == ["a", "b", "c"]
        assert data.layout == "flat"
        for name in data.class_names:
            assert len(train_paths(data)[name]) == shots
            assert len(val_paths(data)[name]) == expected_val
            assert not train_paths(data)[name] & val_paths(data)[name]
            assert all(path.parent.name == name for path in train_paths(data)[name] | val_paths(data)[name])
        assert data.skipped == []


def test_same_seed_same_files_different_seed_different_files(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 20, "b": 20})
    first = load_training_data(tmp_path, shots=3, seed=7)
    again = load_training_data(tmp_path, shots=3, seed=7)
    assert first.train == again.train and first.val == again.val
    others = [load_training_data(tmp_path, shots=3, seed=seed).train for seed in (8, 9, 10)]
    assert any(other != first.train for other in others)


def test_adding_a_class_does_not_change_the_other_classes_picks(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 12, "b": 12})
    before = train_paths(load_training_data(tmp_path, shots=2, seed=3))
    make_classes(tmp_path, {"c": 12})
    after = train_paths(load_training_data(tmp_path, shots=2, seed=3))
    assert before["a"] == after["a"] and before["b"] == after["b"]


def test_shots_larger_than_a_class_takes_what_exists(tmp_path: Path) -> None:
    make_classes(tmp_path, {"small": 3, "large": 12})
    data = load_training_data(tmp_path, shots=10)
    assert len(train_paths(data)["small"]) == 3 and len(val_paths(data)["small"]) == 0
    assert len(train_paths(data)["large"]) == 10 and len(val_paths(data)["large"]) == 2
    assert data.warnings == ["class 'small' has 3 readable images, fewer than --shots 10; training on all 3."]


def test_many_short_classes_give_one_warning(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 4, "b": 2, "c": 5, "d": 20})
    data = load_training_data(tmp_path, shots=16)
    assert data.warnings == [
        "3 classes have fewer readable images than --shots 16 (fewest: 'b' with 2); training on all of their images."
    ]
    assert load_training_data(tmp_path, shots=None).warnings == []


def test_all_images_hold_out_a_validation_fraction(tmp_path: Path) -> None:
    make_classes(tmp_path, {"ten": 10, "two": 2, "one": 1})
    data = load_training_data(tmp_path, shots=None, val_fraction=0.2)
    train, val = train_paths(data), val_paths(data)
    assert (len(train["ten"]), len(val["ten"])) == (8, 2)
    assert (len(train["two"]), len(val["two"])) == (1, 1)
    assert (len(train["one"]), len(val["one"])) == (1, 0)
    assert all(not train[name] & val[name] for name in data.class_names)


def test_validation_can_be_empty(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 1, "b": 1})
    data = load_training_data(tmp_path)
    assert len(data.train) == 2 and data.val == []


@pytest.mark.parametrize("shots", [0, -2])
def test_shots_below_one_is_an_error(tmp_path: Path, shots: int) -> None:
    make_classes(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(DataError, match="--shots must be at least 1"):
        load_training_data(tmp_path, shots=shots)


def test_base_classes_keep_the_first_classes(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1})
    assert load_training_data(tmp_path, base_classes=3).class_names == ["a", "b", "c"]
    assert load_training_data(tmp_path, base_classes=0.5).class_names == ["a", "b", "c"]  # ceil(2.5)
    assert load_training_data(tmp_path, base_classes=0.1).class_names == ["a", "b"]  # at least 2
    labels = {item.label for item in load_training_data(tmp_path, base_classes=2).train}
    assert labels == {0, 1}


@pytest.mark.parametrize("base_classes", [1, 6, 0.0, 1.0, 1.5, -0.5])
def test_base_classes_out_of_range_is_an_error(tmp_path: Path, base_classes: float) -> None:
    make_classes(tmp_path, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1})
    with pytest.raises(DataError) as caught:
        load_training_data(tmp_path, base_classes=base_classes)
    assert_one_sentence(caught.value)


# ---------------------------------------------------------------------------------------------------------- splits


def test_split_layout_uses_train_and_val_folders(tmp_path: Path) -> None:
    train = make_classes(tmp_path / "train", {"a": 6, "b": 6})
    val = make_classes(tmp_path / "val", {"a": 2, "b": 3})
    test = make_classes(tmp_path / "test", {"a": 1, "b": 1})

    assert find_layout(tmp_path) == {"train": tmp_path / "train", "val": tmp_path / "val", "test": tmp_path / "test"}
    data = load_training_data(tmp_path, shots=None)
    assert data.layout == "split"
    assert train_paths(data) == {name: set(paths) for name, paths in train.items()}
    assert val_paths(data) == {name: set(paths) for name, paths in val.items()}

    evaluation = load_eval_data(tmp_path)
    assert isinstance(evaluation, EvalData) and evaluation.layout == "split"
    assert evaluation.class_names == ["a", "b"]
    assert {item.path for item in evaluation.items} == set(test["a"] + test["b"])
    assert all(evaluation.class_names[item.label] == item.path.parent.name for item in evaluation.items)


def test_eval_falls_back_to_val_then_to_the_flat_folder(tmp_path: Path) -> None:
    split = tmp_path / "split"
    make_classes(split / "train", {"a": 2, "b": 2})
    val = make_classes(split / "val", {"a": 1, "b": 1})
    assert find_layout(split) == {"train": split / "train", "val": split / "val"}
    assert {item.path for item in load_eval_data(split).items} == set(val["a"] + val["b"])

    flat = tmp_path / "flat"
    images = make_classes(flat, {"a": 2, "b": 1})
    assert find_layout(flat) == {"all": flat}
    evaluation = load_eval_data(flat)
    assert evaluation.layout == "flat"
    assert [item.path for item in evaluation.items] == images["a"] + images["b"]


def test_val_folder_classes_must_exist_in_train(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 2, "b": 2})
    make_classes(tmp_path / "val", {"a": 1, "stranger": 1})
    with pytest.raises(DataError) as caught:
        load_training_data(tmp_path)
    assert "stranger" in assert_one_sentence(caught.value)


def test_val_folder_with_base_classes_keeps_only_kept_classes(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    make_classes(tmp_path / "val", {"a": 1, "c": 1})
    data = load_training_data(tmp_path, base_classes=2)
    assert data.class_names == ["a", "b"]
    assert [item.path.parent.name for item in data.val] == ["a"]


# -------------------------------------------------------------------------------------------------------- decoding


def _mode_image(mode: str) -> Image.Image:
    if mode == "P":
        return noise_image(0).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode in ("I;16", "I"):
        return Image.linear_gradient("L").resize(SIZE).convert("I").point(lambda v: v * 200).convert(mode)
    if mode == "F":
        return Image.linear_gradient("L").resize(SIZE).convert("F").point(lambda v: v / 255)
    return noise_image(0).convert(mode)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("L", ".png"),
        ("LA", ".png"),
        ("P", ".png"),
        ("P", ".gif"),
        ("RGBA", ".png"),
        ("CMYK", ".jpg"),
        ("CMYK", ".tif"),
        ("I;16", ".png"),
        ("I", ".tif"),
        ("F", ".tif"),
        ("1", ".png"),
        ("1", ".bmp"),
        ("RGB", ".webp"),
    ],
)
def test_every_mode_decodes_to_rgb_of_the_right_size(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    _mode_image(mode).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds the mode under test
    decoded = decode_image(path)
    assert decoded.mode == "RGB" and decoded.size == SIZE


def test_palette_image_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", SIZE, 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.putpixel((0, 0), 0)
    path = tmp_path / "transparent.png"
    image.save(path, transparency=0)
    with Image.open(path) as stored:
        assert stored.mode == "P" and "transparency" in stored.info
    decoded = decode_image(path)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)  # transparent index on white
    assert decoded.getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_become_white(tmp_path: Path, mode: str) -> None:
    image = Image.new("RGBA", SIZE, (0, 0, 255, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    path = tmp_path / "alpha.png"
    image.convert(mode).save(path)
    decoded = decode_image(path)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((5, 5)) != (255, 255, 255)


@pytest.mark.parametrize(
    ("mode", "value", "suffix"),
    [("I;16", 32768, ".png"), ("I;16", 32768, ".tif"), ("I", 32768, ".tif"), ("F", 0.5, ".tif"), ("I", 100, ".tif")],
)
def test_high_bit_images_are_scaled_not_clipped(tmp_path: Path, mode: str, value: float, suffix: str) -> None:
    path = tmp_path / f"grey{suffix}"
    Image.new(mode, SIZE, value).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    expected = 100 if value == 100 else 128  # 8-bit data stored in a 32-bit image stays as it is
    red, green, blue = decode_image(path).getpixel((3, 3))
    assert red == green == blue
    assert abs(red - expected) <= 1


def test_dark_16_bit_image_stays_dark(tmp_path: Path) -> None:
    path = tmp_path / "dark.png"
    Image.new("I;16", SIZE, 4096).save(path)
    assert decode_image(path).getpixel((0, 0))[0] < 32


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    noise_image(0, (30, 20)).save(path, exif=exif)
    with Image.open(path) as stored:
        assert stored.size == (30, 20)
    assert decode_image(path).size == (20, 30)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_files_raise_with_a_reason(tmp_path: Path, name: str) -> None:
    path = write_bytes(tmp_path / name, BAD_FILES[name])
    with pytest.raises(UnreadableImageError) as caught:
        decode_image(path)
    assert isinstance(caught.value, DataError)
    assert caught.value.reason and caught.value.path == path
    assert str(path) in assert_one_sentence(caught.value)


def test_missing_file_and_folder_raise_unreadable(tmp_path: Path) -> None:
    for path in (tmp_path / "gone.jpg", tmp_path):
        with pytest.raises(UnreadableImageError):
            decode_image(path)


@pytest.mark.parametrize("limit", [3000, 4000])  # 4096 pixels: Pillow only warns in (limit, 2 * limit]
def test_decompression_bomb_is_refused_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    path = save_image(tmp_path / "bomb.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    loaded: list[object] = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self) or original_load(self))
    with pytest.raises(UnreadableImageError) as caught:
        decode_image(path)
    assert loaded == []
    assert "pixels" in caught.value.reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 * 2 + 1)
    assert decode_image(path).size == (64, 64)


def test_far_over_the_limit_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_image(tmp_path / "bomb.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: Pillow raises on open
    with pytest.raises(UnreadableImageError):
        decode_image(path)


def test_unreadable_error_survives_pickling(tmp_path: Path) -> None:
    import pickle

    error = UnreadableImageError(tmp_path / "x.jpg", "truncated image data")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, str(copy)) == (error.path, error.reason, str(error))


# ------------------------------------------------------------------------------------------ unreadable in training


def _class_with_bad_files(root: Path, good: int) -> list[Path]:
    make_classes(root, {"fine": 4})
    good_paths = make_classes(root, {"mixed": good})["mixed"]
    bad = [write_bytes(root / "mixed" / f"bad_{name}", data) for name, data in BAD_FILES.items()]
    return good_paths + bad


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _class_with_bad_files(tmp_path, good=4)
    save_image(tmp_path / "mixed" / "bad_bomb.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)

    data = load_training_data(tmp_path, shots=None)

    skipped_names = {skip.path.name for skip in data.skipped}
    assert skipped_names == {f"bad_{name}" for name in BAD_FILES} | {"bad_bomb.png"}
    assert all(skip.reason for skip in data.skipped)
    used = {item.path.name for item in data.train + data.val}
    assert not used & skipped_names
    assert len(train_paths(data)["mixed"]) + len(val_paths(data)["mixed"]) == 4


def test_unreadable_images_do_not_count_towards_shots(tmp_path: Path) -> None:
    _class_with_bad_files(tmp_path, good=4)
    for seed in range(3):
        data = load_training_data(tmp_path, shots=3, seed=seed)
        assert len(train_paths(data)["mixed"]) == 3
        assert len(val_paths(data)["mixed"]) == 1  # only one readable image left after the shots
        assert {skip.path.parent.name for skip in data.skipped} <= {"mixed"}
        assert all(skip.path.name.startswith("bad_") for skip in data.skipped)


def test_a_class_with_only_unreadable_images_is_named(tmp_path: Path) -> None:
    make_classes(tmp_path, {"fine": 2})
    for name, data in BAD_FILES.items():
        write_bytes(tmp_path / "broken_class" / name, data)
    with pytest.raises(DataError) as caught:
        load_training_data(tmp_path, shots=2)
    message = assert_one_sentence(caught.value)
    assert "broken_class" in message and f"{len(BAD_FILES)} skipped" in message


def test_unreadable_val_folder_images_are_skipped(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 2, "b": 2})
    good = make_classes(tmp_path / "val", {"a": 1, "b": 1})
    write_bytes(tmp_path / "val" / "a" / "bad.jpg", BAD_FILES["truncated.jpg"])
    data = load_training_data(tmp_path)
    assert {item.path for item in data.val} == set(good["a"] + good["b"])
    assert [skip.path.name for skip in data.skipped] == ["bad.jpg"]


# ----------------------------------------------------------------------------------------------- dataset and loader

PRE = Preprocess(size=20, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", crop_pct=0.875)


@pytest.mark.parametrize("train", [True, False])
def test_transforms_give_square_normalised_tensors(train: bool) -> None:
    tensor = build_transform(PRE, train=train)(noise_image(0, (37, 23)))
    assert tensor.shape == (3, PRE.size, PRE.size) and tensor.dtype == torch.float32
    assert tensor.min() < 0 < tensor.max()  # normalised around the mean


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_drops_unreadable_images_and_reports_their_indices(tmp_path: Path, workers: int) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    write_bytes(tmp_path / "a" / "zz_corrupt.png", BAD_FILES["corrupt.png"])
    evaluation = load_eval_data(tmp_path)
    bad_index = next(i for i, item in enumerate(evaluation.items) if item.path.name == "zz_corrupt.png")
    dataset = ImageDataset(evaluation.items, build_transform(PRE, train=False))

    reason = "corrupt image data"
    assert dataset[bad_index][:3] == (None, evaluation.items[bad_index].label, bad_index)
    assert dataset[bad_index].reason.startswith(reason)
    batches = list(make_loader(dataset, batch_size=4, shuffle=False, workers=workers))

    assert all(isinstance(batch, Batch) for batch in batches)
    failed = [entry for batch in batches for entry in batch.failed]  # the reason travels with the batch, from workers too
    assert [i for i, _ in failed] == [bad_index] and failed[0][1] == dataset[bad_index].reason
    indices = torch.cat([batch.indices for batch in batches]).tolist()
    assert sorted(indices) == [i for i in range(len(evaluation.items)) if i != bad_index]
    for batch in batches:
        assert batch.images.shape[1:] == (3, PRE.size, PRE.size)
        assert batch.labels.tolist() == [evaluation.items[i].label for i in batch.indices.tolist()]


def test_collate_when_every_sample_failed() -> None:
    batch = collate_skipping([Sample(None, 0, 5, "empty file (0 bytes)"), Sample(None, 1, 6, "file not found")])
    assert batch.failed == [(5, "empty file (0 bytes)"), (6, "file not found")]
    assert batch.images.numel() == 0 and batch.labels.numel() == 0 and batch.indices.numel() == 0


def test_shuffling_is_seeded(tmp_path: Path) -> None:
    items = [ImageItem(tmp_path / f"{i}.png", 0) for i in range(16)]
    dataset = ImageDataset(items, build_transform(PRE, train=False))

    def order(seed: int) -> list[int]:
        loader = make_loader(dataset, batch_size=16, shuffle=True, seed=seed, workers=0)
        return [i for batch in loader for i, _ in batch.failed]  # files do not exist: every index lands in .failed

    assert order(1) == order(1)
    assert order(1) != order(2) and sorted(order(1)) == list(range(16))


def test_default_workers_is_bounded() -> None:
    assert 0 <= default_workers() <= 8


def test_preprocess_round_trip_and_validation() -> None:
    assert Preprocess.from_dict(PRE.to_dict()) == PRE
    assert Preprocess.from_dict({"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]}).interpolation == "bicubic"
    for bad in (
        None,
        {"size": 8, "mean": [0, 0, 0]},
        {"size": 0, "mean": [0, 0, 0], "std": [1, 1, 1]},
        {"size": 8, "mean": [0, 0], "std": [1, 1, 1]},
        {"size": 8, "mean": [0, 0, 0], "std": [1, 0, 1]},
        {"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "lanczos"},
        {"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1], "crop_pct": 1.5},
        {"size": "8", "mean": [0, 0, 0], "std": [1, 1, 1]},
    ):
        with pytest.raises(DataError) as caught:
            Preprocess.from_dict(bad)
        assert_one_sentence(caught.value)


# --------------------------------------------------------------------------------------------------------- predict


def test_prediction_items_expand_files_folders_and_globs(tmp_path: Path) -> None:
    single = save_image(tmp_path / "single.png")
    folder = [save_image(tmp_path / "folder" / "b.jpg"), save_image(tmp_path / "folder" / "sub" / "a.PNG")]
    save_image(tmp_path / "folder" / ".hidden.png")
    (tmp_path / "folder" / "notes.txt").write_text("x")
    globbed = [save_image(tmp_path / "glob" / f"g{i}.jpg") for i in range(3)]
    (tmp_path / "glob" / "g.txt").write_text("x")

    arguments = [str(single), str(tmp_path / "folder"), str(tmp_path / "glob" / "*")]
    absent = [str(tmp_path / "missing.jpg"), str(tmp_path / "nomatch*.png")]

    items, problems = prediction_items([*arguments, *absent, str(single)])

    assert [item.path for item in items] == [single, *sorted(folder), *globbed]
    assert problems == [f"{absent[0]}: no such file or folder.", f"{absent[1]}: matches no image."]
