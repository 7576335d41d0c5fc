"""One table of bad inputs, each run through the real `promptune` command (issue 6, section 2).

Every case states the exit code and a key phrase. A fatal case must end with exactly one line `Error: <one sentence>`
on stderr and no traceback; a failing `tune` must fail before any training and leave an existing `--out` file
byte-for-byte as it was. A case that is not fatal by design (a bad image among good ones, a decompression bomb,
a huge --top-k, ...) must exit 0, warn on stderr naming the file and its reason, and count it as skipped.

Exit codes: 1 for a value the command understood but cannot use (promptune's own errors), 2 for what the
command-line parser itself rejects (not a number, a missing argument: Click's usage errors).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image, ImageFile
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from promptune.artifact import load_prompt_file
from promptune.cli import app
from promptune.train import Trainer

from conftest import TINY_CLIP_CONFIG, make_clip_files, make_shape_folder

runner = CliRunner()
TOP = 10**30  # an absurd number: parses as an int, far beyond any sensible value


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clip_args(clip_files) -> list[str]:
    config, weights = clip_files
    return ["--backbone", str(config), "--weights", str(weights)]


@dataclass
class Env:
    """What a case builds its command line from."""

    tmp: Path
    clip: list[str]  # --backbone/--weights of the tiny CLIP
    vit: list[str]  # --backbone/--weights of timm's test_vit
    prompts: Path  # a valid CoOp prompt file
    images: Path  # a folder of real images, class folder per shape
    monkeypatch: pytest.MonkeyPatch
    decoded: list[str] = field(default_factory=list)  # every file Pillow decoded pixels of
    restore: list[Callable[[], None]] = field(default_factory=list)

    def data(self, name: str = "data", per_class: int = 3) -> Path:
        """A fresh three-class folder of small shape images."""
        return make_shape_folder(self.tmp / name, per_class=per_class)

    def copy_prompts(self, name: str = "prompts.safetensors") -> Path:
        return Path(shutil.copy(self.prompts, self.tmp / name))

    def deny(self, path: Path) -> Path:
        """Make `path` unreadable; as root (which reads everything) the OS refusal is simulated at the same calls."""
        mode = path.stat().st_mode
        path.chmod(0)
        self.restore.append(lambda: path.chmod(mode))
        if os.geteuid() == 0:
            denied = str(path)
            real_scandir, real_open = os.scandir, builtins.open

            def refuse(target: Any) -> None:
                if isinstance(target, (str, os.PathLike)) and os.fspath(target) == denied:
                    raise PermissionError(errno.EACCES, "Permission denied", denied)

            def scandir(target: Any = ".") -> Any:
                refuse(target)
                return real_scandir(target)

            def open_(target: Any, *args: Any, **kwargs: Any) -> Any:
                refuse(target)
                return real_open(target, *args, **kwargs)

            self.monkeypatch.setattr(os, "scandir", scandir)
            self.monkeypatch.setattr(builtins, "open", open_)
        return path


@pytest.fixture()
def env(tmp_path, monkeypatch, clip_args, vit_file, coop_prompts) -> Env:
    monkeypatch.chdir(tmp_path)  # a command that wrongly falls back to ./prompts.safetensors writes here
    e = Env(tmp_path, clip_args, ["--backbone", "test_vit", "--weights", str(vit_file)], coop_prompts,
            make_shape_folder(tmp_path / "images", per_class=2), monkeypatch)
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: e.decoded.append(str(self.filename)) or real_load(self))
    yield e
    for undo in e.restore:
        undo()


# ---------------------------------------------------------------------------------------------- bad input makers


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height pixels: a decompression bomb, small on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_image(name: str, content: Callable[[Path], bytes]) -> Callable[[Env], list]:
    """tune on a good folder plus one bad file in red_square/."""

    def build(e: Env) -> list:
        data = e.data()
        target = data / "red_square" / name
        target.write_bytes(content(data / "red_square" / "000.png"))
        return ["tune", data]

    return build


def half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def rewrite_prompts(e: Env, **changes: str | None) -> Path:
    """A copy of the prompt file with metadata entries replaced (None drops one)."""
    with safe_open(str(e.prompts), framework="pt", device="cpu") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        meta = dict(handle.metadata())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path = e.tmp / "edited.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def prompt_file_with(content: Callable[[Env], bytes]) -> Callable[[Env], list]:
    def build(e: Env) -> list:
        path = e.tmp / "prompts.safetensors"
        path.write_bytes(content(e))
        return ["eval", e.images, "--prompts", path]

    return build


def edited_metadata(**changes: str | None) -> Callable[[Env], list]:
    return lambda e: ["eval", e.images, "--prompts", rewrite_prompts(e, **changes)]


def tune_with(*options: object, method: str = "coop") -> Callable[[Env], list]:
    def build(e: Env) -> list:
        backbone = e.vit if method in ("spt", "vpt") else e.clip
        return ["tune", e.images, "--method", method, *backbone, *options]

    return build


def eval_with(*options: object) -> Callable[[Env], list]:
    return lambda e: ["eval", e.images, "--prompts", e.prompts, *options]


def predict_with(*options: object) -> Callable[[Env], list]:
    return lambda e: ["predict", e.images / "red_square", "--prompts", e.prompts, *options]


def symlink_loop(e: Env) -> list:
    loop = e.tmp / "loop"
    os.symlink(loop, loop)
    return ["tune", loop]


def loop_inside_a_class(e: Env) -> list:
    data = e.data()
    os.symlink(data / "red_square", data / "red_square" / "again")  # a folder that contains itself
    os.symlink(data / "blue_triangle" / "self", data / "blue_triangle" / "self")  # a link to itself
    return ["tune", data]


def non_utf8_class(e: Env) -> list:
    data = e.data()
    os.rename(os.fsencode(data / "red_square"), os.fsencode(data) + b"/caf\xe9")  # Latin-1 bytes, not UTF-8
    return ["tune", data]


LONG_NAME = "_".join("abcdefghijklmnopqrstuvwxyz" * 5)[:255]  # 128 one-letter words: longer than CLIP's 77 tokens


def long_class_name(e: Env) -> list:
    data = e.data()
    (data / "red_square").rename(data / LONG_NAME)
    return ["tune", data]


def folded_duplicate(e: Env) -> list:
    data = e.data()
    (data / "green-circle").rename(data / "red square")  # "red square" and "red_square" are one class name
    return ["tune", data]


def case_duplicate(e: Env) -> list:
    data = e.data()
    (data / "green-circle").rename(data / "Red_Square")  # CLIP reads "Red Square" as "red square": one class name
    return ["tune", data]


def only_corrupt_class(e: Env) -> list:
    data = e.data()
    for image in (data / "green-circle").iterdir():
        image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return ["tune", data]


def empty_class(e: Env) -> list:
    data = e.data()
    for image in (data / "red_square").iterdir():
        image.unlink()
    return ["tune", data]


def one_class(e: Env) -> list:
    return ["tune", make_shape_folder(e.tmp / "one", per_class=2, classes={"red": ("square", (220, 40, 40))})]


def a_file(e: Env) -> Path:
    path = e.tmp / "images.zip"
    path.write_bytes(b"PK\x03\x04")
    return path


def empty_folder(e: Env) -> Path:
    (e.tmp / "empty").mkdir()
    return e.tmp / "empty"


def unreadable_folder(e: Env) -> list:
    return ["tune", e.deny(e.data())]


def unreadable_class(e: Env) -> list:
    data = e.data()
    e.deny(data / "blue_triangle")
    return ["tune", data]


def unreadable_image(e: Env) -> list:
    data = e.data()
    e.deny(data / "red_square" / "001.png")
    return ["tune", data]


def other_backbone(e: Env) -> list:
    """Same file name, another architecture: the stored shape facts must catch it."""
    wider = {**TINY_CLIP_CONFIG, "embed_dim": 48}
    config, weights = make_clip_files(e.tmp / "other", name="tiny-clip", config=wider)
    return ["eval", e.images, "--prompts", e.prompts, "--backbone", config, "--weights", weights]


def wider_weights(e: Env) -> Path:
    """Weights of the same architecture with a wider joint embedding: same key names, other shapes."""
    wider = {**TINY_CLIP_CONFIG, "embed_dim": 48}
    return make_clip_files(e.tmp / "wider", name="wider", config=wider)[1]


def other_weights(e: Env) -> list:
    _, weights = make_clip_files(e.tmp / "other", seed=1)
    return ["eval", e.images, "--prompts", e.prompts, "--weights", weights]


def predict_among_missing(e: Env) -> list:
    return ["predict", e.images / "red_square" / "000.png", e.tmp / "missing.png", e.images / "green-circle" / "001.png",
            "--prompts", e.prompts, "--json"]


def predict_among_unreadable(e: Env) -> list:
    broken = e.tmp / "broken.png"
    broken.write_bytes(b"<html>not found</html>")
    return ["predict", broken, e.images / "red_square" / "000.png", "--prompts", e.prompts, "--json"]


def predict_bomb(e: Env) -> list:
    bomb = e.tmp / "bomb.png"
    bomb.write_bytes(png_claiming(20_000, 20_000))
    return ["predict", e.images / "red_square" / "000.png", bomb, "--prompts", e.prompts, "--json"]


def classes_file(content: bytes) -> Callable[[Env], list]:
    def build(e: Env) -> list:
        path = e.tmp / "classes.txt"
        path.write_bytes(content)
        return ["predict", e.images / "red_square", "--prompts", e.prompts, "--classes-file", path]

    return build


def report_into_a_file(e: Env) -> list:
    target = e.tmp / "report"
    target.write_text("not a folder")
    return ["eval", e.images, "--prompts", e.prompts, "--report", target]


# ----------------------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    build: Callable[[Env], list]
    code: int
    words: tuple[str, ...] = ()  # phrases the Error line (or, for exit 0, the warning) must contain
    skipped: str | None = None  # exit 0 cases: the file that must be warned about and counted as skipped
    check: Callable[[Any, Env], None] | None = None  # anything else the case must prove


def predicted(*names: str) -> Callable[[Any, Env], None]:
    def check(result: Any, e: Env) -> None:
        paths = [json.loads(line)["path"] for line in result.stdout.splitlines() if line.strip()]
        assert [Path(p).name for p in paths] == list(names), result.stdout

    return check


def never_decoded(name: str, pixels: str) -> Callable[[Any, Env], None]:
    def check(result: Any, e: Env) -> None:
        bombs = [p for p in e.decoded if Path(p).name == name]
        assert bombs == [], f"{name} was decoded"
        assert pixels in result.stderr and f"limit of {Image.MAX_IMAGE_PIXELS} pixels" in result.stderr, result.stderr

    return check


def all_classes_listed(result: Any, e: Env) -> None:
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert lines and all(len(line["predictions"]) == 3 for line in lines)  # capped at the 3 trained classes


def long_name_trained(result: Any, e: Env) -> None:
    assert LONG_NAME in json.loads(result.stdout)["classes"]
    assert "is too long for the text encoder and is cut short in its text prompt" in result.stderr


def uses_all_images(result: Any, e: Env) -> None:
    summary = json.loads(result.stdout)
    assert summary["train_per_class"] == {"blue_triangle": 2, "green-circle": 2, "red_square": 2}
    assert "warning: 3 classes have fewer readable images than --shots" in result.stderr and "with 2)" in result.stderr


CASES = {
    # ---- data folders
    "missing-folder": Case(lambda e: ["tune", e.tmp / "nope"], 1, ("does not exist",)),
    "missing-folder-eval": Case(lambda e: ["eval", e.tmp / "nope", "--prompts", e.prompts], 1, ("does not exist",)),
    "empty-folder": Case(lambda e: ["tune", empty_folder(e)], 1, ("found 0 class folder(s)", "need at least 2")),
    "one-class-only": Case(one_class, 1, ("found 1 class folder(s)", "need at least 2")),
    "empty-class-folder": Case(empty_class, 1, ("red_square", "no image files")),
    "file-instead-of-folder": Case(lambda e: ["tune", a_file(e)], 1, ("images.zip", "is a file, not a folder")),
    "file-instead-of-folder-eval": Case(lambda e: ["eval", e.prompts, "--prompts", e.prompts], 1, ("is a file, not a folder",)),
    "class-of-only-corrupt-images": Case(only_corrupt_class, 1, ("class 'green-circle' has no readable images", "3 skipped")),
    "symlink-loop": Case(symlink_loop, 1, ("loop", "symbolic link that loops back on itself")),
    "symlink-loop-inside-a-class": Case(loop_inside_a_class, 0),
    "unreadable-data-folder": Case(unreadable_folder, 1, ("cannot read folder", "Permission denied")),
    "unreadable-class-folder": Case(unreadable_class, 1, ("cannot read class folder", "blue_triangle", "Permission denied")),
    "non-utf8-class-name": Case(non_utf8_class, 1, ("class folder 'caf\\xe9'", "not valid UTF-8")),
    "very-long-class-name": Case(long_class_name, 0, check=long_name_trained),
    "duplicate-after-folding": Case(folded_duplicate, 1, ("'red square' and 'red_square'", "both become the class name")),
    "duplicate-ignoring-case": Case(case_duplicate, 1, ("class folders 'Red_Square' and 'red_square' both become the "
                                                        "class name 'red square'; rename one",)),
    # ---- bad images among good ones: skipped with a warning, never fatal
    "zero-byte-image": Case(bad_image("zero.png", lambda good: b""), 0, ("empty file (0 bytes)",), skipped="zero.png"),
    "truncated-image": Case(bad_image("cut.png", half), 0, ("truncated image data",), skipped="cut.png"),
    "not-an-image-with-an-image-extension": Case(bad_image("notes.jpg", lambda good: b"shopping list\n"), 0,
                                                 ("not a recognised image format",), skipped="notes.jpg"),
    "decompression-bomb": Case(bad_image("bomb.png", lambda good: png_claiming(10_000, 10_000)), 0,
                               ("decompression-bomb limit", "--max-image-pixels raises it"), skipped="bomb.png",
                               check=never_decoded("bomb.png", "100000000 pixels")),
    "decompression-bomb-far-over-the-limit": Case(bad_image("huge.png", lambda good: png_claiming(40_000, 40_000)), 0,
                                                  ("decompression-bomb limit",), skipped="huge.png",
                                                  check=never_decoded("huge.png", "1600000000 pixels")),
    "unreadable-image": Case(unreadable_image, 0, ("permission denied",), skipped="001.png"),
    # ---- tune options
    "shots-larger-than-a-class": Case(tune_with("--shots", "5"), 0, check=uses_all_images),
    "shots-zero": Case(tune_with("--shots", "0"), 1, ("--shots must be at least 1",)),
    "shots-negative": Case(tune_with("--shots", "-3"), 1, ("--shots must be at least 1",)),
    "shots-absurd": Case(tune_with("--shots", TOP), 0, check=uses_all_images),
    "epochs-negative": Case(tune_with("--epochs", "-1"), 1, ("--epochs must be between 1 and 100000",)),
    "epochs-absurd": Case(tune_with("--epochs", TOP), 1, ("--epochs must be between 1 and 100000",)),
    "batch-size-negative": Case(tune_with("--batch-size", "-8"), 1, ("--batch-size must be between 1 and 65536",)),
    "batch-size-absurd": Case(tune_with("--batch-size", TOP), 1, ("--batch-size must be between 1 and 65536",)),
    "lr-negative": Case(tune_with("--lr", "-0.1"), 1, ("--lr must be between",)),
    "lr-zero": Case(tune_with("--lr", "0"), 1, ("--lr must be between",)),
    "lr-nan": Case(tune_with("--lr", "nan"), 1, ("--lr must be a finite number",)),
    "lr-absurd": Case(tune_with("--lr", "1e400"), 1, ("--lr must be a finite number",)),
    "weight-decay-negative": Case(tune_with("--weight-decay", "-1"), 1, ("--weight-decay must be between 0 and 100",)),
    "weight-decay-absurd": Case(tune_with("--weight-decay", "1e9"), 1, ("--weight-decay must be between 0 and 100",)),
    "keep-unknown": Case(tune_with("--keep", "first"), 1, ("Unknown --keep 'first'; choose one of: last, best",)),
    "recipe-unknown": Case(tune_with("--recipe", "authors", method="sep"), 1, ("Unknown --recipe 'authors'; choose one of: default, paper",)),
    "recipe-paper-for-coop": Case(tune_with("--recipe", "paper"), 1, ("--recipe paper is defined for sep, spt, vpt; coop runs its defaults",)),
    "ema-decay-one": Case(tune_with("--ema-decay", "1"), 1, ("--ema-decay must be below 1",)),
    "ema-decay-negative": Case(tune_with("--ema-decay", "-0.5"), 1, ("--ema-decay must be between 0 and 1",)),
    "seed-negative": Case(tune_with("--seed", "-1"), 1, ("--seed must be between 0 and 18446744073709551615",)),
    "seed-absurd": Case(tune_with("--seed", 2**70), 1, ("--seed must be between 0 and 18446744073709551615",)),
    "workers-negative": Case(tune_with("--workers", "-1"), 1, ("--workers must be between 0 and 256",)),
    "workers-absurd": Case(tune_with("--workers", TOP), 1, ("--workers must be between 0 and 256",)),
    "base-classes-negative": Case(tune_with("--base-classes", "-1"), 1, ("base-class fraction must be between 0 and 1",)),
    "base-classes-absurd": Case(tune_with("--base-classes", "1000000"), 1, ("base classes must be between 2 and the 3 classes",)),
    "base-classes-not-a-number": Case(tune_with("--base-classes", "half"), 1, ("--base-classes must be a class count",)),
    "n-ctx-negative": Case(tune_with("--n-ctx", "-1"), 1, ("--n-ctx must be between 1 and 64",)),
    "n-ctx-absurd": Case(tune_with("--n-ctx", TOP), 1, ("--n-ctx must be between 1 and 64",)),
    "n-ctx-negative-sep": Case(tune_with("--n-ctx", "-1", method="sep"), 1, ("--n-ctx must be a whole number from 1 to 32",)),
    "n-ctx-v-negative": Case(tune_with("--n-ctx-v", "-1", method="sep"), 1, ("--n-ctx-v must be a whole number from 1 to 32",)),
    "n-ctx-v-absurd": Case(tune_with("--n-ctx-v", TOP, method="sep"), 1, ("--n-ctx-v must be a whole number from 1 to 32",)),
    "prompts-per-layer-negative": Case(tune_with("--prompts-per-layer", "-1", method="spt"), 1,
                                       ("--prompts-per-layer must be a whole number from 0 to 1024",)),
    "prompts-per-layer-absurd": Case(tune_with("--prompts-per-layer", TOP, method="spt"), 1,
                                     ("--prompts-per-layer must be a whole number from 0 to 1024",)),
    "init-images-negative": Case(tune_with("--init-images", "-1", method="spt"), 1, ("--init-images must be a whole number >= 1",)),
    "init-images-zero": Case(tune_with("--init-images", "0", method="spt"), 1, ("--init-images must be a whole number >= 1",)),
    "init-images-absurd": Case(tune_with("--init-images", TOP, "--prompts-per-layer", "2", method="spt"), 0),  # = all
    "pool-unknown": Case(tune_with("--pool", "mean", method="spt"), 1, ("--pool must be one of token, avg",)),
    "pool-map-without-an-attention-pool": Case(tune_with("--pool", "map", method="vpt"), 1,
                                               ("--pool map uses the backbone's own attention pool",)),
    "pool-window-zero": Case(tune_with("--pool-window", "0", method="spt"), 1, ("--pool-window must be a whole number",)),
    "epochs-not-a-number": Case(tune_with("--epochs", "ten"), 2, ("Invalid value for '--epochs'",)),
    "unknown-device": Case(tune_with("--device", "tpu"), 1, ("Unknown device 'tpu'",)),
    "device-with-a-bad-index": Case(tune_with("--device", "cpu:abc"), 1, ("Unknown device 'cpu:abc'",)),
    "unknown-precision": Case(tune_with("--precision", "fp8"), 1, ("Unknown precision 'fp8'",)),
    "unknown-method": Case(tune_with(method="coopp"), 1, ("Unknown method 'coopp'", "coop")),
    "unknown-backbone": Case(lambda e: ["tune", e.images, "--backbone", "ViT-B-61"], 1, ("Unknown backbone 'ViT-B-61'", "ViT-B-16")),
    "missing-backbone-config": Case(lambda e: ["tune", e.images, "--backbone", e.tmp / "nope.json"], 1, ("does not exist",)),
    "blank-ctx-init": Case(tune_with("--ctx-init", " "), 1, ("--ctx-init is blank",)),
    "option-of-another-method": Case(tune_with("--depth", "deep"), 1, (
        "Method 'coop' has no option --depth (an option of spt, vpt); its options are --n-ctx, --ctx-init.",)),
    "option-of-another-method-sep": Case(tune_with("--init", "mean", method="sep"), 1, (
        "Method 'sep' has no option --init (an option of spt); its options are --n-ctx, --n-ctx-v, --template.",)),
    "ctx-init-and-another-n-ctx": Case(tune_with("--ctx-init", "a photo of a", "--n-ctx", "2"), 1, (
        "--n-ctx 2 does not match --ctx-init 'a photo of a', which is 4 tokens long; drop --n-ctx",)),
    "weights-of-another-model": Case(lambda e: ["tune", e.images, *e.clip[:2], "--weights", e.vit[3]], 1, (
        "Weights '", "do not fit tiny-clip.json: ", " keys missing (e.g. ", " keys unexpected (e.g. ",
        "check that --backbone names the model these weights are for")),
    "weights-of-another-shape": Case(lambda e: ["tune", e.images, *e.clip[:2], "--weights", wider_weights(e)], 1, (
        "do not fit tiny-clip.json: ", " of another shape (e.g. ")),
    "prompt-file-as-weights": Case(lambda e: ["tune", e.images, *e.clip[:2], "--weights", e.prompts], 1, (
        "is a promptune prompt file, not backbone weights; pass it with --prompts",)),
    "prompt-file-as-weights-eval": Case(lambda e: ["eval", e.images, "--prompts", e.prompts, "--weights", e.prompts], 1, (
        "is a promptune prompt file, not backbone weights",)),
    "missing-data-dir-argument": Case(lambda e: ["tune"], 2, ("Missing argument",)),
    # ---- eval / predict options
    "eval-batch-size-zero": Case(eval_with("--batch-size", "0"), 1, ("--batch-size must be between 1 and 65536",)),
    "eval-batch-size-negative": Case(eval_with("--batch-size", "-3"), 1, ("--batch-size must be between 1 and 65536",)),
    "eval-batch-size-absurd": Case(eval_with("--batch-size", TOP), 1, ("--batch-size must be between 1 and 65536",)),
    "eval-workers-negative": Case(eval_with("--workers", "-1"), 1, ("--workers must be between 0 and 256",)),
    "eval-workers-absurd": Case(eval_with("--workers", TOP), 1, ("--workers must be between 0 and 256",)),
    "eval-unknown-device": Case(eval_with("--device", "gpu"), 1, ("Unknown device 'gpu'",)),
    "eval-report-into-a-file": Case(report_into_a_file, 1, ("is a file; give a folder",)),
    "eval-missing-prompts-option": Case(lambda e: ["eval", e.images], 2, ("Missing option '--prompts'",)),
    "predict-top-k-zero": Case(predict_with("--top-k", "0"), 1, ("--top-k must be at least 1",)),
    "predict-top-k-negative": Case(predict_with("--top-k", "-5"), 1, ("--top-k must be at least 1",)),
    "predict-top-k-absurd": Case(predict_with("--top-k", TOP, "--json"), 0, check=all_classes_listed),
    "predict-batch-size-negative": Case(predict_with("--batch-size", "-1"), 1, ("--batch-size must be between 1 and 65536",)),
    "predict-batch-size-absurd": Case(predict_with("--batch-size", TOP), 1, ("--batch-size must be between 1 and 65536",)),
    "predict-workers-negative": Case(predict_with("--workers", "-2"), 1, ("--workers must be between 0 and 256",)),
    "predict-workers-absurd": Case(predict_with("--workers", TOP), 1, ("--workers must be between 0 and 256",)),
    "predict-json-and-csv": Case(predict_with("--json", "--csv"), 1, ("give either --json or --csv",)),
    "classes-empty": Case(predict_with("--classes", ""), 1, ("--classes is empty",)),
    "classes-one-name": Case(predict_with("--classes", "cat"), 1, (
        "--classes names one class ('cat'), which every image would get with 100%; give at least two",)),
    "classes-semicolons": Case(predict_with("--classes", "cat; dog; bird"), 1, (
        "--classes 'cat; dog; bird' is one class name, since names are separated by commas, not ';'; write "
        "'cat, dog, bird'.",)),
    "classes-file-one-name": Case(classes_file(b"cat\n"), 1, ("--classes names one class ('cat')",)),
    "classes-only-commas": Case(predict_with("--classes", " , "), 1, ("--classes is empty",)),
    "classes-duplicates": Case(predict_with("--classes", "cat,dog,cat"), 1, ("--classes has duplicate names: cat",)),
    "classes-duplicates-ignoring-case": Case(predict_with("--classes", "Cat,dog,cat"), 1, (
        "--classes names 'Cat' and 'cat' both become the class name 'cat'; give each class once",)),
    "classes-duplicates-after-folding": Case(predict_with("--classes", "golden_retriever,golden retriever"), 1, (
        "--classes names 'golden_retriever' and 'golden retriever' both become the class name 'golden retriever'",)),
    "classes-and-classes-file": Case(predict_with("--classes", "cat", "--classes-file", "x.txt"), 1, ("either --classes or --classes-file",)),
    "classes-file-empty": Case(classes_file(b"\n  \n"), 1, ("--classes-file", "has no class names")),
    "classes-file-not-utf8": Case(classes_file(b"caf\xe9\n"), 1, ("Cannot read --classes-file", "can't decode")),
    "classes-file-missing": Case(predict_with("--classes-file", "nope.txt"), 1, ("Cannot read --classes-file 'nope.txt'",)),
    "predict-missing-path-among-good-ones": Case(predict_among_missing, 1, ("missing.png: no such file or folder",),
                                                 check=predicted("000.png", "001.png")),
    "predict-unreadable-image-among-good-ones": Case(predict_among_unreadable, 1,
                                                     ("broken.png: unreadable image", "not a recognised image format"),
                                                     check=predicted("000.png")),
    "predict-decompression-bomb": Case(predict_bomb, 1, ("bomb.png: unreadable image", "decompression-bomb limit",
                                                         "--max-image-pixels raises it"),
                                       check=predicted("000.png")),
    # ---- prompt files
    "prompt-file-missing": Case(lambda e: ["predict", e.images, "--prompts", e.tmp / "nope.safetensors"], 1,
                                ("nope.safetensors", "does not exist")),
    "prompt-file-is-a-folder": Case(lambda e: ["eval", e.images, "--prompts", e.tmp], 1, ("is not a file",)),
    "prompt-file-empty": Case(prompt_file_with(lambda e: b""), 1, ("not a promptune prompt file", "too short")),
    "prompt-file-truncated": Case(prompt_file_with(lambda e: half(e.prompts)), 1, ("not a promptune prompt file",)),
    "prompt-file-not-safetensors": Case(prompt_file_with(lambda e: b"name,label\ncat,1\n" * 20), 1,
                                        ("not a promptune prompt file",)),
    "prompt-file-random-bytes": Case(prompt_file_with(lambda e: bytes(range(256)) * 4), 1, ("not a promptune prompt file",)),
    "prompt-file-unreadable": Case(lambda e: ["eval", e.images, "--prompts", e.deny(e.copy_prompts())], 1,
                                   ("cannot be read (permission denied)",)),
    "metadata-not-promptune": Case(edited_metadata(format=None), 1, ("safetensors file but not a promptune prompt file",)),
    "metadata-corrupt-json": Case(edited_metadata(class_names='["red_square", '), 1, ("corrupt 'class_names' metadata",)),
    "metadata-duplicate-classes": Case(edited_metadata(class_names='["a", "a"]'), 1, ("duplicate class names",)),
    "metadata-edited-hparams": Case(edited_metadata(hparams='{"n_ctx": 4, "ctx_init": ""}'), 1,
                                    ("Tensor 'ctx'", "has shape (16, 32)")),
    "metadata-unknown-method": Case(edited_metadata(method="coop2"), 1, ("unknown method 'coop2'",)),
    "metadata-missing-entry": Case(edited_metadata(preprocess=None), 1, ("missing metadata: preprocess",)),
    "newer-format-version": Case(edited_metadata(format_version="2"), 1, ("format version 2", "upgrade promptune")),
    "unreadable-format-version": Case(edited_metadata(format_version="one"), 1, ("unreadable format version",)),
    "prompt-file-from-another-backbone": Case(other_backbone, 1, ("tuned on backbone 'tiny-clip.json' with shape",)),
    "prompt-file-for-a-named-other-backbone": Case(eval_with("--backbone", "test_vit"), 1, ("tuned on backbone 'tiny-clip.json', not 'test_vit'",)),
    "prompt-file-from-other-weights": Case(other_weights, 1, ("sha256",)),
}


# ------------------------------------------------------------------------------------------------------- the test


def _args(e: Env, built: list) -> list[str]:
    """Cheap, quiet defaults first, so that the case's own options (given later) win."""
    command, *rest = (str(a) for a in built)
    defaults = ["--device", "cpu", "--workers", "0"]
    if command == "tune":
        defaults += ["--method", "coop", *e.clip, "--epochs", "1", "--batch-size", "8", "--shots", "2", "--json",
                     "--out", str(e.tmp / "out" / "prompts.safetensors")]
    elif command in ("eval", "predict"):
        defaults += ["--quiet"]
    return [command, *(defaults if rest else []), *rest]


def _assert_error_line(result: Any, case: Case) -> None:
    assert result.exit_code == case.code, f"exit {result.exit_code}, wanted {case.code}\n{result.output}"
    assert isinstance(result.exception, SystemExit), f"crashed with {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert result.stderr.rstrip("\n").splitlines()[-1] == line, f"the error is not the last line\n{result.stderr}"
    if case.code == 1:  # promptune's own sentence (Click phrases its usage errors itself)
        assert line.endswith("."), line
        assert not re.search(r"[.!?] [A-Z]", line), f"more than one sentence: {line}"
    for word in case.words:
        assert word in line, f"{word!r} not in {line!r}"


def _assert_ok(result: Any, case: Case, e: Env, command: str, previous: bytes) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    assert "Error:" not in result.stderr, result.stderr
    if case.skipped is not None:
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:") and case.skipped in line]
        assert len(warnings) == 1, result.stderr
        for word in case.words:
            assert word in warnings[0], f"{word!r} not in {warnings[0]!r}"
        assert json.loads(result.stdout)["skipped_files"] == 1
    elif command == "tune":
        assert json.loads(result.stdout)["skipped_files"] == 0
    if command == "tune":
        out = e.tmp / "out" / "prompts.safetensors"
        load_prompt_file(out)  # the new file replaced the old one completely
        assert out.read_bytes() != previous


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, env: Env) -> None:
    case = CASES[name]
    out_folder = env.tmp / "out"
    out_folder.mkdir()
    previous = env.prompts.read_bytes()  # the user's earlier prompt file: only a successful tune may replace it
    (out_folder / "prompts.safetensors").write_bytes(previous)
    args = _args(env, case.build(env))
    if case.code != 0:
        def no_training(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("a tune that must fail went on to train")

        env.monkeypatch.setattr(Trainer, "fit", no_training)
    result = runner.invoke(app, args)
    if case.code == 0:
        _assert_ok(result, case, env, args[0], previous)
    else:
        _assert_error_line(result, case)
        if case.check is None:
            assert result.stdout == "", "a failed command printed results"
        if args[0] == "tune":
            assert (out_folder / "prompts.safetensors").read_bytes() == previous, "the existing --out file changed"
            assert sorted(p.name for p in out_folder.iterdir()) == ["prompts.safetensors"], "a stray file beside --out"
    if case.check is not None:
        case.check(result, env)


def test_the_battery_covers_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
