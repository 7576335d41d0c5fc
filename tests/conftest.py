"""Tiny random-weight backbones saved to local files, and generated image folders. No network, ever."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASS_SHAPES = {"red_square": ("square", (220, 40, 40)), "green-circle": ("circle", (40, 200, 60)), "blue_triangle": ("triangle", (40, 60, 220))}


def _save_state(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_clip_files(folder: Path, name: str = "tiny-clip", config: dict | None = None, seed: int = 0) -> tuple[Path, Path]:
    """An open_clip config JSON and a random-weight safetensors file for it."""
    import open_clip

    config = config or TINY_CLIP_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # trained CLIPs end at 100; random init is 1/0.07
    return config_path, _save_state(model, folder / f"{name}.safetensors")


def make_vit_file(folder: Path, name: str = "test_vit", seed: int = 0, **kwargs) -> Path:
    import timm

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return _save_state(model, folder / f"{name}-random.safetensors")


def draw_shape(kind: str, color: tuple[int, int, int], rng: random.Random, size: int = 40) -> Image.Image:
    background = tuple(rng.randint(150, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in color)
    if kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    return image


def make_shape_folder(root: Path, per_class: int = 12, seed: int = 0, classes: dict | None = None) -> Path:
    """One sub-folder per class of coloured shapes on noisy backgrounds; learnable by a tiny random backbone."""
    rng = random.Random(seed)
    for name, (kind, color) in (classes or CLASS_SHAPES).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, color, rng).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def clip_files(tmp_path_factory) -> tuple[Path, Path]:
    """(config JSON, weights file) of a tiny random CLIP: pass as --backbone CONFIG --weights FILE."""
    return make_clip_files(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def vit_file(tmp_path_factory) -> Path:
    """Random weights for timm's `test_vit`: pass as --backbone test_vit --weights FILE."""
    return make_vit_file(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="session")
def shape_folder(tmp_path_factory) -> Path:
    return make_shape_folder(tmp_path_factory.mktemp("shapes") / "train", per_class=12, seed=1)


@pytest.fixture(scope="session")
def shape_test_folder(tmp_path_factory) -> Path:
    return make_shape_folder(tmp_path_factory.mktemp("shapes_test") / "test", per_class=10, seed=2)
