"""SPT / VPT on every common timm ViT layout, each as a tiny random-weight model loaded through the local-file path.

Each layout is a real timm architecture (same class, blocks, pooling, prefix and position handling) shrunk to
embed_dim 32, depth 2, 2 heads and a 32 px (patch 8) or 42 px (patch 14) input. It is registered with timm under a
`promptune_tiny_*` name, its random weights are saved to a .safetensors file, and it is loaded with
`load_backbone(name, file)`, the path `--backbone NAME --weights FILE` takes. `dynamic_img_size` layouts get a
non-square input everywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import promptune
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import model_entrypoint, register_model
from typer.testing import CliRunner

from promptune.artifact import PromptFile, load_prompt_file, save_prompt_file
from promptune.backbones import Backbone, load_backbone
from promptune.cli import app
from promptune.errors import MethodError
from promptune.methods.spt import SPT, VPT
from promptune.runtime import Runtime

from conftest import make_vit_file

CPU = Runtime(torch.device("cpu"))

CLASSES = ["a", "b", "c"]
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@dataclasses.dataclass(frozen=True)
class Layout:
    id: str
    variant: str  # the timm model whose architecture is shrunk
    size: int = 32
    patch: int = 8
    extra: tuple[tuple[str, object], ...] = ()  # further timm kwargs

    @property
    def name(self) -> str:
        return f"promptune_tiny_{self.id}"

    def kwargs(self) -> dict:
        return {**TINY, "img_size": self.size, "patch_size": self.patch, **dict(self.extra)}


LAYOUTS = [
    Layout("vit", "vit_base_patch16_224"),  # class token, 'token' pool (also timm's layout of the MAE weights)
    Layout("vit_avg", "vit_base_patch16_224", extra=(("global_pool", "avg"),)),  # MAE fine-tuning: avg + fc_norm
    Layout("deit3", "deit3_base_patch16_224"),  # no_embed_class, LayerScale
    Layout("dinov2_reg4", "vit_base_patch14_reg4_dinov2", 42, 14),  # 4 registers, no_embed_class
    Layout("dinov2_reg4_dynamic", "vit_base_patch14_reg4_dinov2", 42, 14, (("dynamic_img_size", True),)),
    Layout("siglip_map", "vit_base_patch16_siglip_224"),  # no class token, attention pool ('map')
    Layout("clip_prenorm", "vit_base_patch16_clip_224"),  # norm_pre before the blocks
    Layout("eva02", "eva02_base_patch14_224", 42, 14),  # Eva: rotary embedding, SwiGLU, avg + fc_norm
    Layout("eva02_dynamic", "eva02_base_patch14_224", 42, 14, (("dynamic_img_size", True),)),
    Layout("dinov3", "vit_base_patch16_dinov3"),  # Eva: DINOv3 rotary (half rotation), 4 registers, dynamic size
    Layout("pe_core", "vit_pe_core_base_patch16_224"),  # Eva: rotary, norm_pre, attention pool
    Layout("rope_mixed", "vit_base_patch16_rope_mixed_224"),  # Eva: a rotary embedding per block
]


def register(name: str, variant: str, size: int, tiny: dict) -> str:
    """Register `name` with timm: the variant's own entry point with the `tiny` kwargs and a `size` px input."""
    if timm.is_model(name):
        return name
    create = model_entrypoint(variant)

    def entry(pretrained: bool = False, **kwargs):
        overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "input_size": (3, size, size)}
        return create(pretrained=pretrained, pretrained_cfg_overlay=overlay, **{**tiny, **kwargs})

    entry.__name__ = name
    entry.__module__ = __name__
    register_model(entry)
    return name


def register_tiny(layout: Layout) -> str:
    return register(layout.name, layout.variant, layout.size, layout.kwargs())


def make_tiny_file(folder: Path, layout: Layout) -> Path:
    """Random weights for the registered tiny layout, scaled so every block really mixes the tokens.

    timm's init (linear weights of std 0.02, layer scales of 1e-5 / 1e-6) makes each block of an untrained model
    nearly the identity, so the prompts and even the image would barely move the class token. Here linear weights
    have std 1/sqrt(fan-in) and layer scales 0.5.
    """
    torch.manual_seed(0)
    model = timm.create_model(register_tiny(layout), pretrained=False, num_classes=0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2"):
                parameter.fill_(0.5)
    path = folder / f"{layout.name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, Backbone]:
    folder = tmp_path_factory.mktemp("layouts")
    return {layout.id: load_backbone(layout.name, str(make_tiny_file(folder, layout))) for layout in LAYOUTS}


def images_for(backbone: Backbone, layout: Layout, count: int = 4, seed: int = 0) -> torch.Tensor:
    """(count, 3, H, W) random images; W = H + one patch where the backbone takes any size (`dynamic_img_size`)."""
    width = layout.size + (layout.patch if backbone.model.dynamic_img_size else 0)
    return torch.randn(count, 3, layout.size, width, generator=torch.Generator().manual_seed(seed))


def build(backbone: Backbone, cls: type[SPT] = SPT, seed: int = 0, **options) -> SPT:
    torch.manual_seed(seed)
    return cls(backbone, CLASSES, cls.make_config(options)).eval()


def timm_pre_logits(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    model = backbone.model
    return model.forward_head(model.forward_features(images), pre_logits=True)


def method_pre_logits(method: SPT, images: torch.Tensor) -> torch.Tensor:
    return method._pool_image_tokens(method.image_tokens(images))


class PromptsMaskedOut:
    """Forward pre-hooks giving every block an attention mask under which no image token reads a prompt position
    (the prompts themselves attend to everything, so no row is empty): the prompts are present but inert."""

    def __init__(self, method: SPT) -> None:
        self.start, self.end = method.num_prefix, method.num_prefix + method.num_prompts
        self.hooks = [block.register_forward_pre_hook(self._mask, with_kwargs=True) for block in method.layout.blocks]
        self.calls = 0

    def _mask(self, _module, args, kwargs):
        length = args[0].shape[1]
        is_prompt = torch.zeros(length, dtype=torch.bool)
        is_prompt[self.start : self.end] = True
        allowed = ~(is_prompt.unsqueeze(0) & ~is_prompt.unsqueeze(1))  # (query, key): image query, prompt key -> no
        self.calls += 1
        return args, {**kwargs, "attn_mask": allowed}

    def __enter__(self) -> "PromptsMaskedOut":
        return self

    def __exit__(self, *_) -> None:
        for hook in self.hooks:
            hook.remove()


layouts = pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.id for layout in LAYOUTS])


# ---------------------------------------------------------------------------------------------- exactness vs timm


@layouts
def test_frozen_branch_equals_timm(backbones, layout):
    backbone = backbones[layout.id]
    method = build(backbone, prompts_per_layer=0)
    assert method.hparams()["pool"] == backbone.model.global_pool
    images = images_for(backbone, layout)
    with torch.no_grad():
        torch.testing.assert_close(method.forward_features(images), backbone.model.forward_features(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(method_pre_logits(method, images), timm_pre_logits(backbone, images), atol=1e-5, rtol=0)


@layouts
@pytest.mark.parametrize("depth", ["deep", "shallow"])
def test_prompts_masked_out_of_attention_leave_the_frozen_features(backbones, layout, depth):
    """Prompts after the prefix, with no position and (on rotary layouts) no rotation: masked out of every image
    token's attention they change nothing, so the patches keep exactly their positions and rotations."""
    backbone = backbones[layout.id]
    method = build(backbone, depth=depth, prompts_per_layer=3)
    method.skip_prompt_outputs = False  # whole blocks, so the hooks see every block call
    images = images_for(backbone, layout)
    with torch.no_grad(), PromptsMaskedOut(method) as masked:
        inert_tokens = method.image_tokens(images)
        inert = method._pool_image_tokens(inert_tokens)
    assert masked.calls == len(method.layout.blocks)
    with torch.no_grad():
        torch.testing.assert_close(inert_tokens, backbone.model.forward_features(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(inert, timm_pre_logits(backbone, images), atol=1e-5, rtol=0)
        assert not torch.allclose(method.image_tokens(images), inert_tokens, atol=1e-3)  # unmasked, prompts do act


@layouts
def test_skipping_the_prompt_outputs_is_exact_where_it_applies(backbones, layout):
    backbone = backbones[layout.id]
    method = build(backbone, prompts_per_layer=4)
    images = images_for(backbone, layout)
    skipped = [method.layout.skips_span(index) for index in range(method.num_blocks)]
    assert all(skipped) == (layout.variant not in EVA_VARIANTS) and any(skipped) == all(skipped)
    with torch.no_grad():
        fast = method(images)
        method.skip_prompt_outputs = False
        torch.testing.assert_close(fast, method(images), atol=1e-5, rtol=0)


EVA_VARIANTS = {"eva02_base_patch14_224", "vit_base_patch16_dinov3", "vit_pe_core_base_patch16_224",
                "vit_base_patch16_rope_mixed_224"}


@layouts
def test_an_image_alone_gets_its_batched_logits(backbones, layout):
    backbone = backbones[layout.id]
    method = build(backbone, prompts_per_layer=4, init="mean")
    method.prepare([images_for(backbone, layout, seed=1)], CPU, seed=0)
    images = images_for(backbone, layout, count=3, seed=2)
    with torch.no_grad():
        batched = method(images)
        for index in range(3):
            torch.testing.assert_close(method(images[index : index + 1])[0], batched[index], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ training, file, dtype


@layouts
@pytest.mark.parametrize("cls", [SPT, VPT])
def test_a_few_steps_lower_the_loss_and_touch_only_prompts_and_head(backbones, layout, cls):
    backbone = backbones[layout.id]
    method = build(backbone, cls=cls, prompts_per_layer=4)
    images = images_for(backbone, layout, count=6, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    method.prepare([images], CPU, seed=0)
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2)
    method.train()
    losses = []
    for _ in range(6):
        loss, _ = method.training_loss(images, labels)
        optimizer.zero_grad()
        loss.backward()
        assert method.prompts.grad is not None and method.prompts.grad.abs().sum() > 0
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in backbone.model.parameters())


@layouts
def test_prompt_file_round_trips_through_load(backbones, layout, tmp_path):
    backbone = backbones[layout.id]
    method = build(backbone, prompts_per_layer=3, init="max")
    method.prepare([images_for(backbone, layout, seed=4)], CPU, seed=0)
    with torch.no_grad():
        method.head.bias.add_(0.5)
    record = PromptFile(tensors=method.learned_state(), method="spt", backbone=backbone.describe(),
                        class_names=CLASSES, hparams=method.hparams(), preprocess=backbone.preprocess.to_dict())
    path = save_prompt_file(tmp_path / "p.safetensors", record)
    loaded = promptune.load(path, device="cpu", precision="fp32")
    assert loaded.method.hparams() == method.hparams()
    images = images_for(backbone, layout, count=2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(images), method(images), atol=1e-6, rtol=0)


@layouts
@pytest.mark.parametrize("depth", ["deep", "shallow"])
def test_bf16_autocast_runs_forward_and_backward(backbones, layout, depth):
    backbone = backbones[layout.id]
    method = build(backbone, depth=depth, prompts_per_layer=3).train()
    images = images_for(backbone, layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = method.training_loss(images, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert logits.shape == (4, 3) and torch.isfinite(loss)
    for parameter in (method.prompts, method.head.weight):
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ pooling


def test_avg_pool_on_a_token_pool_backbone_is_timms_avg_pool_and_ignores_the_prompts(backbones):
    """The MAE layout: timm builds `vit_base_patch16_224.mae` with a class token, a final norm and 'token' pooling.
    --pool avg gives timm's own average for those weights (final norm on each token, then the mean over the patch
    tokens), never counts the prompts, and is stored in the prompt file."""
    backbone = backbones["vit"]
    layout = LAYOUTS[0]
    avg_timm = timm.create_model(layout.variant, pretrained=False, num_classes=0, global_pool="avg", fc_norm=False,
                                 **layout.kwargs()).eval()
    avg_timm.load_state_dict(backbone.model.state_dict())
    images = images_for(backbone, layout)
    frozen = build(backbone, prompts_per_layer=0, pool="avg")
    prompted = build(backbone, prompts_per_layer=5, pool="avg")
    assert frozen.hparams()["pool"] == "avg" and build(backbone).hparams()["pool"] == "token"
    with torch.no_grad():
        expected = avg_timm.forward_head(avg_timm.forward_features(images), pre_logits=True)
        torch.testing.assert_close(method_pre_logits(frozen, images), expected, atol=1e-5, rtol=0)
        features = prompted.forward_features(images)  # (B, 1 + 5 + 16, D), prompts at 1..5
        torch.testing.assert_close(prompted.pool(features), features[:, 6:].mean(1), atol=1e-6, rtol=0)
        with PromptsMaskedOut(prompted):
            prompted.skip_prompt_outputs = False
            torch.testing.assert_close(method_pre_logits(prompted, images), expected, atol=1e-5, rtol=0)


def test_the_mae_fine_tuning_layout_averages_the_patches_without_the_prompts(backbones):
    backbone = backbones["vit_avg"]  # class token, 'avg' pool, no final norm, fc_norm after the mean
    method = build(backbone, prompts_per_layer=5)
    assert method.hparams()["pool"] == "avg"
    with torch.no_grad():
        features = method.forward_features(images_for(backbone, LAYOUTS[1]))
        expected = backbone.model.fc_norm(features[:, 6:].mean(1))
        torch.testing.assert_close(method.pool(features), expected, atol=1e-6, rtol=0)


def test_pool_and_pool_window_reach_the_prompt_file_from_the_command_line(vit_file, shape_folder, tmp_path):
    out = tmp_path / "p.safetensors"
    result = CliRunner().invoke(app, [
        "tune", str(shape_folder), "--method", "spt", "--backbone", "test_vit", "--weights", str(vit_file),
        "--pool", "avg", "--init", "mean", "--pool-window", "3", "--prompts-per-layer", "2", "--epochs", "1",
        "--batch-size", "12", "--workers", "0", "--device", "cpu", "--out", str(out), "--no-checkpoint", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    hparams = load_prompt_file(out).hparams
    assert (hparams["pool"], hparams["pool_window"], hparams["init"]) == ("avg", 3, "mean")
    assert promptune.load(out, device="cpu").method.config.pool == "avg"


def test_a_reduction_pool_on_an_attention_pool_backbone(backbones):
    backbone = backbones["siglip_map"]
    method = build(backbone, prompts_per_layer=2, pool="avg")
    images = images_for(backbone, LAYOUTS[5])
    with torch.no_grad():
        features = method.forward_features(images)
        torch.testing.assert_close(method.pool(features), features[:, 2:].mean(1), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("layout_id", "pool", "message"),
    [
        ("vit", "map", "--pool map uses the backbone's own attention pool, but 'promptune_tiny_vit' pools with 'token'"),
        ("siglip_map", "token", "--pool token reads the class token, but 'promptune_tiny_siglip_map' has none"),
        ("pe_core", "prr", "--pool prr uses the backbone's own attention pool"),
    ],
)
def test_a_pool_the_backbone_cannot_run_is_one_sentence(backbones, layout_id, pool, message):
    with pytest.raises(MethodError, match=message):
        build(backbones[layout_id], pool=pool)


def test_a_backbone_without_pooling_asks_for_pool(tmp_path):
    backbone = load_backbone("test_vit", str(make_vit_file(tmp_path, "test_vit")))
    backbone.model.reset_classifier(0, global_pool="")
    with pytest.raises(MethodError, match="has no pooling.*--pool"):
        build(backbone)
    assert build(backbone, pool="avg").hparams()["pool"] == "avg"


# ------------------------------------------------------------------------------------------------------ refusals


TINY_FASTVIT = register("promptune_tiny_fastvit", "fastvit_t8", 32, {"layers": (1, 1, 1, 1), "embed_dims": (8, 16, 32, 64)})


@pytest.mark.parametrize(("name", "kind"), [
    ("test_convnext", "ConvNeXt"),
    ("test_resnet", "ResNet"),
    (TINY_FASTVIT, "FastVit"),
    ("test_vit_relpos", "VisionTransformerRelPos"),  # tokens, but blocks that read relative-position tables
])
def test_a_model_without_a_plain_token_sequence_is_refused_in_one_sentence(tmp_path, name, kind):
    backbone = load_backbone(name, str(make_vit_file(tmp_path, name)))
    for cls in (SPT, VPT):
        with pytest.raises(MethodError) as refused:
            build(backbone, cls=cls)
        message = str(refused.value)
        assert message.count(". ") == 0 and message.endswith(".")
        assert f"Method '{cls.name}' runs on timm's VisionTransformer and Eva models (ViT, DeiT III, DINOv2" in message
        assert f"'{name}' builds a timm {kind}," in message


def test_every_tested_layout_is_listed_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### ViT backbones (timm)", 1)[1].split("\n#", 1)[0]
    for layout in LAYOUTS:
        assert f"`{layout.variant}`" in section, layout.variant
