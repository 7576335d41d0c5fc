"""The shipped example (examples/fashion-mnist), the script that made it, the README's install and set-up lines, and
`eval` / `predict` on the example end to end with the tiny backbones: what was evaluated, the new figures, all-new
classes named in the header, rounded JSON everywhere."""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

import promptune

from test_cli import assert_ok, invoke

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fashion-mnist"
SCRIPT = ROOT / "examples" / "make_fashion_mnist.py"
DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
CLASSES = sorted(LABELS)  # class folders as listed; LABELS is Fashion-MNIST's label order (0-9)
PER_SPLIT = {"train": 16, "test": 10}


# ------------------------------------------------------------------------------------------------ the example folder


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def test_the_example_has_ten_classes_of_small_pngs_and_its_licence():
    for split, per_class in PER_SPLIT.items():
        assert sorted(p.name for p in (EXAMPLE / split).iterdir()) == CLASSES
        for name in CLASSES:
            images = _pngs(EXAMPLE / split / name)
            assert len(images) == per_class and all(re.fullmatch(r"\d{5}\.png", p.name) for p in images)
            for path in images:
                with Image.open(path) as image:
                    assert image.format == "PNG" and image.size == (28, 28) and image.mode == "L"
    assert sum(p.stat().st_size for p in EXAMPLE.rglob("*") if p.is_file()) < 1_000_000
    licence = (EXAMPLE / "LICENSE").read_text(encoding="utf-8")
    assert "MIT" in licence and "Zalando SE" in licence
    readme = (EXAMPLE / "README.md").read_text(encoding="utf-8")
    assert "Zalando Research" in readme and "arXiv:1708.07747" in readme and "make_fashion_mnist.py" in readme


def _write_idx(path: Path, dims: tuple[int, ...], payload: bytes) -> None:
    magic = (0x08 << 8) | len(dims)  # unsigned byte data, len(dims) dimensions
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(f">I{len(dims)}I", magic, *dims) + payload)


def _fake_source(folder: Path, per_class: int = 20) -> Path:
    """Idx files shaped like Fashion-MNIST's: `per_class` random 28x28 images per label, labels shuffled."""
    rng = random.Random(7)
    folder.mkdir()
    for prefix in ("train", "t10k"):
        labels = [label for label in range(10) for _ in range(per_class)]
        rng.shuffle(labels)
        pixels = bytes(rng.randrange(256) for _ in range(len(labels) * 28 * 28))
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", (len(labels), 28, 28), pixels)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (len(labels),), bytes(labels))
    return folder


def _make(source: Path, out: Path) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--source", str(source), "--out", str(out)], check=True,
                   capture_output=True)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in _pngs(folder)}


def test_the_script_picks_seeded_images_of_each_split_and_is_byte_reproducible(tmp_path):
    source = _fake_source(tmp_path / "idx")
    _make(source, tmp_path / "a")
    _make(source, tmp_path / "b")
    first = _contents(tmp_path / "a")
    assert first == _contents(tmp_path / "b")
    assert len(first) == 10 * (16 + 10)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        with gzip.open(source / f"{prefix}-labels-idx1-ubyte.gz") as handle:
            labels = handle.read()[8:]
        with gzip.open(source / f"{prefix}-images-idx3-ubyte.gz") as handle:
            pixels = handle.read()[16:]
        for path in _pngs(tmp_path / "a" / split):
            index = int(path.stem)  # named after its index in the official split
            assert path.parent.name == LABELS[labels[index]]
            with Image.open(path) as image:
                assert image.tobytes() == pixels[index * 784:(index + 1) * 784]
    _make(source, tmp_path / "a")  # a rerun over an existing folder leaves exactly the same files
    assert _contents(tmp_path / "a") == first


def _pixels(folder: Path) -> dict[str, bytes]:
    result = {}
    for path in _pngs(folder):
        with Image.open(path) as image:
            result[str(path.relative_to(folder))] = image.tobytes()
    return result


@pytest.mark.skipif(not DEBIAN_SOURCE.is_dir(), reason="needs Debian's dataset-fashion-mnist package")
def test_the_committed_images_are_what_the_script_makes_from_fashion_mnist(tmp_path):
    """Same files, same pixels (another Pillow or zlib may compress the PNGs into other bytes)."""
    _make(DEBIAN_SOURCE, tmp_path / "made")
    assert _pixels(tmp_path / "made") == _pixels(EXAMPLE)


# ----------------------------------------------------------------------------------------- install and set-up lines


def test_the_distribution_name_is_not_the_other_projects():
    """`promptune` on PyPI is an unrelated terminal prompt enhancer; `pipx install promptune` installed that."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == promptune.DISTRIBUTION == "promptune-vision"
    assert project["scripts"] == {"promptune": "promptune.cli:main"}  # the command keeps its name
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    installs = re.findall(r"\bpipx? install ((?:-[-\w]+ )*)('[^']+'|[^\s`]+)", readme)
    assert installs
    for _options, target in installs:
        assert target in ("promptune-vision", "'promptune-vision[hf]'", ".", "'.[test]'") or target.startswith("torch=="), target


def test_the_readme_set_up_runs_the_example_then_the_ci_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set-up (two commands)", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert len(commands) == 2
    assert "pip install -e '.[test]'" in commands[0]
    assert commands[0].endswith("promptune tune examples/fashion-mnist/train")
    ci_steps = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert commands[1] == ci_steps[-1] == "HF_HUB_OFFLINE=1 python -m pytest -q"


# ------------------------------------------------------------------------------------ the example, tuned and scored


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


QUICK = ["--shots", "4", "--epochs", "2", "--batch-size", "20", "--workers", "0", "--device", "cpu"]  # tiny models


@pytest.fixture(scope="module")
def clip_prompts(tmp_path_factory, clip_files) -> Path:
    config, weights = clip_files
    out = tmp_path_factory.mktemp("example") / "prompts.safetensors"
    assert_ok(invoke("tune", EXAMPLE / "train", "--backbone", config, "--weights", weights, *QUICK, "--out", out))
    return out


def _eval(*args: object):
    result = invoke("eval", *args, "--workers", "0", "--device", "cpu")
    assert_ok(result)
    return result


def _floats(value: object) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for item in value.values() for f in _floats(item)]
    if isinstance(value, list):
        return [f for item in value for f in _floats(item)]
    return []


def _assert_rounded(data: object) -> None:
    floats = _floats(data)
    assert floats and all(f == float(f"{f:.6g}") for f in floats), floats


def test_sep_on_the_example_shows_tuned_and_zero_shot_figures(clip_prompts):
    result = _eval(EXAMPLE / "test", "--prompts", clip_prompts)
    out = result.stdout
    assert "evaluated: the whole folder   images: 100   classes: 10" in out
    assert re.search(r"top-1: \d+\.\d\d%   balanced: \d+\.\d\d%   top-5: \d+\.\d\d%   "
                     r"\(majority-class baseline: 10\.00%\)", out), out
    assert re.search(r"zero-shot CLIP top-1: \d+\.\d\d%   balanced: \d+\.\d\d%", out), out
    assert "sep prompts on tiny-clip.json" in result.stderr and "10 classes, all trained" in result.stderr

    data = json.loads(_eval(EXAMPLE, "--prompts", clip_prompts, "--json").stdout)  # the split folder: its test/
    assert data["split"] == "test" and data["n_images"] == 100 and data["n_classes"] == 10
    assert data["majority_baseline"] == 0.1 and data["new_classes"] == []
    for key in ("top1", "balanced_accuracy", "top5", "zero_shot_top1", "zero_shot_balanced_accuracy"):
        assert 0.0 <= data[key] <= 1.0, key
    assert data["top5"] >= data["top1"]
    _assert_rounded(data)


def test_spt_on_the_example(vit_file, tmp_path):
    out = tmp_path / "spt.safetensors"
    assert_ok(invoke("tune", EXAMPLE / "train", "--backbone", "test_vit", "--weights", vit_file, *QUICK, "--epochs", "1",
                     "--prompts-per-layer", "4", "--out", out))
    data = json.loads(_eval(EXAMPLE / "test", "--prompts", out, "--json").stdout)
    assert data["split"] == "all" and data["n_images"] == 100 and data["top5"] is not None
    assert "zero_shot_top1" not in data  # a ViT has no text tower to compare with
    assert 0.0 <= data["balanced_accuracy"] <= 1.0 and data["majority_baseline"] == 0.1


def test_eval_header_says_when_no_class_was_trained(clip_prompts, shape_test_folder):
    result = _eval(shape_test_folder, "--prompts", clip_prompts, "--json")
    assert "3 classes, none of them trained (all new)" in result.stderr
    data = json.loads(result.stdout)
    assert sorted(data["new_classes"]) == ["blue_triangle", "green-circle", "red_square"]
    assert "base_top1" not in data  # no trained class among them: no base-to-new split to report


def test_eval_header_counts_trained_and_new_classes(clip_prompts, shape_test_folder, tmp_path):
    mixed = tmp_path / "mixed"
    for name in ("bag", "coat"):
        shutil.copytree(EXAMPLE / "test" / name, mixed / name)
    shutil.copytree(shape_test_folder / "red_square", mixed / "red_square")
    result = _eval(mixed, "--prompts", clip_prompts, "--json")
    assert "3 classes: 2 trained, 1 new" in result.stderr
    assert json.loads(result.stdout)["new_classes"] == ["red_square"]


def test_every_json_output_is_rounded(clip_prompts, tmp_path):
    """eval --json printed floats like 0.22499999403953552; metrics.json and predict --json follow one rule."""
    report = tmp_path / "report"
    _eval(EXAMPLE / "test", "--prompts", clip_prompts, "--report", report, "--quiet")
    _assert_rounded(json.loads((report / "metrics.json").read_text()))
    result = invoke("predict", EXAMPLE / "test" / "bag", "--prompts", clip_prompts, "--workers", "0", "--device", "cpu",
                    "--json")
    assert_ok(result)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 10
    _assert_rounded(lines)
