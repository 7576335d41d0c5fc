"""The frozen backbone in the autocast dtype (`cast_frozen_weights`): learned parameters stay fp32, the step's outputs
and gradients are those of plain autocast, and only CUDA with bf16/fp16 autocast casts anything.

The steps here run with torch's MHA fast path off: CUDA autocast turns it off (`nn.MultiheadAttention` checks), and cast
weights are only ever used under CUDA autocast; CPU autocast would leave it on for fp32 weights only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from promptune.backbones import load_backbone
from promptune.methods import get_method
from promptune.runtime import Runtime, cast_frozen_weights

NAMES = ["red square", "green circle", "blue triangle"]
LOW = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@pytest.fixture(scope="module")
def backbones(clip_files, vit_file):
    config_json, weights_file = clip_files
    return {"clip": lambda: load_backbone(str(config_json), str(weights_file)),
            "vit": lambda: load_backbone("test_vit", str(vit_file))}


def build(method: str, backbones) -> nn.Module:
    cls = get_method(method)
    torch.manual_seed(0)
    return cls(backbones[cls.family](), NAMES, cls.make_config({}))


@pytest.fixture
def no_mha_fast_path():
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


def step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Loss and every parameter's gradient of one training forward + backward under CPU bf16 autocast."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.training_loss(images, labels)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def frozen_matmul_weights(model: nn.Module) -> list[torch.Tensor]:
    """Frozen weights and biases of linear and convolution layers, and nn.MultiheadAttention's input projections."""
    weights = [p for layer in model.modules() if isinstance(layer, LOW) for p in (layer.weight, layer.bias)]
    weights += [p for layer in model.modules() if isinstance(layer, nn.MultiheadAttention)
                for p in (layer.in_proj_weight, layer.in_proj_bias)]
    return [p for p in weights if p is not None and not p.requires_grad]


@pytest.mark.parametrize("method", ["sep", "coop", "spt", "vpt"])
def test_cast_frozen_weights_changes_dtypes_not_results(method: str, backbones, no_mha_fast_path) -> None:
    plain = build(method, backbones)
    cast = copy.deepcopy(plain)
    count = cast_frozen_weights(cast, torch.bfloat16)
    frozen = frozen_matmul_weights(cast)
    assert count == len(frozen) > 0 and all(p.dtype == torch.bfloat16 for p in frozen)
    learned = {name: p for name, p in cast.named_parameters() if p.requires_grad}
    assert learned and all(p.dtype == torch.float32 for p in learned.values())
    layer_norms = [m.weight for m in cast.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None]
    assert layer_norms and all(w.dtype == torch.float32 for w in layer_norms)  # autocast's fp32 ops keep fp32 weights

    generator = torch.Generator().manual_seed(1)
    size = plain.backbone.preprocess.size if hasattr(plain, "backbone") else 32
    images = torch.randn(4, 3, size, size, generator=generator)
    labels = torch.tensor([0, 1, 2, 0])
    loss_plain, grads_plain = step(plain, images, labels)
    loss_cast, grads_cast = step(cast, images, labels)
    assert torch.isfinite(loss_cast)
    torch.testing.assert_close(loss_cast, loss_plain, rtol=0, atol=0)  # autocast made exactly these bf16 weights
    for name, grad in grads_cast.items():
        if name in learned:
            assert grad is not None and grad.dtype == torch.float32, name
            torch.testing.assert_close(grad, grads_plain[name], rtol=0, atol=0)
        else:
            assert grad is None, name  # nothing flows into the frozen backbone


def test_only_cuda_autocast_casts_and_cpu_keeps_fp32(backbones) -> None:
    model = build("spt", backbones)
    assert Runtime(torch.device("cpu"), torch.bfloat16).cast_frozen(model) == 0
    assert Runtime(torch.device("cpu")).cast_frozen(model) == 0
    assert Runtime(torch.device("cuda"), torch.float32).cast_frozen(model) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The decision alone (the model itself stays on the CPU): CUDA with fp16 autocast casts, once.
    cast = Runtime(torch.device("cuda"), torch.float16).cast_frozen(model)
    assert cast == len(frozen_matmul_weights(model)) > 0
    assert {p.dtype for p in frozen_matmul_weights(model)} == {torch.float16}
    assert Runtime(torch.device("cuda"), torch.float16).cast_frozen(model) == 0  # already cast: nothing more
