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

from promptune.reporting import SilentReporter

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


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    """promptune's user cache (weights hashes) in a temp folder, for this process and the commands it starts."""
    before = os.environ.get("PROMPTUNE_CACHE_DIR")
    os.environ["PROMPTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if before is None:
        del os.environ["PROMPTUNE_CACHE_DIR"]
    else:
        os.environ["PROMPTUNE_CACHE_DIR"] = before


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


@pytest.fixture(scope="session")
def coop_args(clip_files) -> list[str]:
    """`tune` options for CoOp on the tiny CLIP."""
    config, weights = clip_files
    return ["--method", "coop", "--backbone", str(config), "--weights", str(weights)]


@pytest.fixture(scope="session")
def coop_prompts(tmp_path_factory, clip_files, shape_folder) -> Path:
    """A CoOp prompt file tuned for one epoch on 2 shots a class of `shape_folder` (read it, never change it)."""
    import promptune

    config, weights = clip_files
    out = tmp_path_factory.mktemp("coop") / "coop.safetensors"
    promptune.tune(shape_folder, method="coop", backbone=str(config), weights=str(weights), epochs=1, shots=2,
                   batch_size=8, workers=0, device="cpu", out=out)
    return out


# ------------------------------------------------------------------------------------------ gradient checkpointing


class PrepareRecorder(SilentReporter):
    """A reporter that records the method's `prepare` pass: ("start", total), ("step", n)..., ("end", 0)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def prepare_start(self, images: int) -> None:
        self.events.append(("start", images))

    def prepare_step(self, images: int) -> None:
        self.events.append(("step", images))

    def prepare_end(self) -> None:
        self.events.append(("end", 0))


def train_steps(method, images: torch.Tensor, labels: torch.Tensor, optimizer, steps: int, batch: int = 12) -> None:
    """A bare seeded training loop over random mini-batches (no Trainer), for learnability tests."""
    generator = torch.Generator().manual_seed(0)
    method.train()
    for _ in range(steps):
        pick = torch.randperm(len(labels), generator=generator)[:batch]
        loss, _ = method.training_loss(images[pick], labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def loss_and_grads(method, images: torch.Tensor, labels: torch.Tensor, checkpointing: bool):
    """A training-mode loss and every learned parameter's gradient (None if it got none), checkpointing on or off."""
    method.set_grad_checkpointing(checkpointing)
    method.train()
    method.zero_grad(set_to_none=True)
    loss, _ = method.training_loss(images, labels)
    loss.backward()
    grads = {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in method.named_parameters()
        if p.requires_grad
    }
    method.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_checkpointing_is_exact(method, backbone_model, images, labels, calls: list, blocks: int) -> None:
    """Checkpointing on vs off: same loss and learned gradients, `blocks` checkpointed segments per training forward,
    no gradient on the frozen backbone, and eval-mode / no-grad forwards untouched (no segment checkpointed)."""
    loss_off, grads_off = loss_and_grads(method, images, labels, checkpointing=False)
    assert not calls
    loss_on, grads_on = loss_and_grads(method, images, labels, checkpointing=True)
    assert len(calls) == blocks
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=0)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name, grad in grads_off.items():
        assert grad is not None and grads_on[name] is not None, f"{name} got no gradient"
        assert grad.abs().sum() > 0, f"{name} got a zero gradient"
        torch.testing.assert_close(grads_on[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert all(not p.requires_grad and p.grad is None for p in backbone_model.parameters())
    assert not backbone_model.training

    calls.clear()
    method.train()
    with torch.no_grad():  # training mode without autograd (e.g. a method's `prepare` pass): nothing to save
        method.training_loss(images, labels)
    method.eval()
    with torch.no_grad():
        logits_on = method(images)
    logits_grad_on = method(images).detach()  # eval mode with autograd on: still not checkpointed
    assert not calls
    method.set_grad_checkpointing(False)
    with torch.no_grad():
        logits_off = method(images)
    logits_grad_off = method(images).detach()
    assert torch.equal(logits_on, logits_off) and torch.equal(logits_grad_on, logits_grad_off)


@pytest.fixture()
def checkpoint_calls(monkeypatch) -> list:
    """Records every torch.utils.checkpoint.checkpoint call (and checks it is non-reentrant), passing it through."""
    import torch.utils.checkpoint

    calls: list = []
    original = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        assert kwargs.get("use_reentrant") is False
        calls.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls
