"""Every open_clip CLIP family promptune accepts (or refuses), on tiny configs of the real layouts.

Each family is a tiny open_clip config JSON derived from the real config it names (same tower classes, pooling,
masks, norms, projection; width 32-64, 2 layers, 32-px images), saved with random weights and loaded through
promptune's normal path (config JSON + local weights file). timm image towers are tiny variants of the real timm
architectures, registered under `promptune_clip_tiny_*` names. Hugging Face tokenizers (SigLIP, CLIPA, the worldwide
CLIPs) need the hub, so those families use open_clip's own tokenizer on the same text layout; a start-token-free
variant of it checks the SigLIP token layout (text, EOS, padding) too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import register_model

import promptune
from promptune.artifact import PromptFile, save_prompt_file
from promptune.backbones import Backbone, load_backbone
from promptune.data import prompt_name
from promptune.errors import BackboneError, MethodError
from promptune.methods.rotary import with_identity_rotations
from promptune.methods.coop import CoOp
from promptune.methods.sep import SEP
from promptune.methods.zeroshot import ZeroShotCLIP

# ------------------------------------------------------------------------------------------- tiny timm image trunks

TINY_TIMM_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def _timm(real: str, **overrides):
    import timm

    return timm.create_model(real, pretrained=False, **overrides)


@register_model
def promptune_clip_tiny_siglip(pretrained: bool = False, **kwargs):
    """vit_base_patch16_siglip_224 (SigLIP, SigLIP2): no class token, attention-pool ('map') head."""
    return _timm("vit_base_patch16_siglip_224", **{**TINY_TIMM_VIT, **kwargs})


@register_model
def promptune_clip_tiny_eva02(pretrained: bool = False, **kwargs):
    """eva02_base_patch16_clip_224 (EVA02-CLIP): Eva, rotary embedding, SwiGLU, class-token pooling."""
    return _timm("eva02_base_patch16_clip_224", **{**TINY_TIMM_VIT, "ref_feat_shape": (4, 4), **kwargs})


@register_model
def promptune_clip_tiny_pe_core(pretrained: bool = False, **kwargs):
    """vit_pe_core_base_patch16_224 (PE-Core): Eva with AttentionRope, pre-transformer norm, attention-pool head."""
    shrunk = {**TINY_TIMM_VIT, "ref_feat_shape": (4, 4), "attn_pool_num_heads": 2}
    return _timm("vit_pe_core_base_patch16_224", **{**shrunk, **kwargs})


@register_model
def promptune_clip_tiny_vit_clip(pretrained: bool = False, **kwargs):
    """vit_large_patch14_clip_224 (MobileCLIP2-L-14): timm ViT with class token and pre-norm."""
    return _timm("vit_large_patch14_clip_224", **{**TINY_TIMM_VIT, **kwargs})


@register_model
def promptune_clip_tiny_mobileclip_b(pretrained: bool = False, **kwargs):
    """vit_base_mci_224 (MobileCLIP-B): timm hybrid ViT, convolutional stem, no position for the class token."""
    from timm.models.vision_transformer_hybrid import ConvStem, _create_vision_transformer_hybrid

    stem = ConvStem(channels=(16, 16, 64), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0, act_layer=torch.nn.GELU)
    return _create_vision_transformer_hybrid(
        "vit_base_mci_224", backbone=stem, embed_args=dict(proj=False), pretrained=False,
        **{"img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2, "no_embed_class": True, **kwargs},
    )


@register_model
def promptune_clip_tiny_fastvit_mci(pretrained: bool = False, **kwargs):
    """fastvit_mci1 (MobileCLIP-S1; S2 and MobileCLIP2-S* are the same kind): a convolutional FastViT."""
    return _timm("fastvit_mci1", **{"layers": (1, 1, 1, 1), "embed_dims": (8, 16, 32, 64), **kwargs})


def timm_tower(name: str, pool: str, proj: str | None) -> dict:
    return {"image_size": 32, "timm_model_name": name, "timm_model_pretrained": False, "timm_pool": pool,
            "timm_proj": proj}


# ----------------------------------------------------------------------------------------------------- families

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}  # causal, EOT (argmax) pool
VIT = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}  # open_clip VisionTransformer


@dataclass(frozen=True)
class Family:
    name: str  # the real open_clip config this tiny one mirrors
    config: dict
    sep: bool  # the image tower takes prompt tokens
    trims: bool  # the text tower may run on fewer positions (causal mask, EOT / class-token pooling)

    def __str__(self) -> str:
        return self.name


def clip(vision: dict, text: dict, embed_dim: int = 32, **extra) -> dict:
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text, **extra}


UNMASKED = {**TEXT, "no_causal_mask": True}  # bidirectional text, EOT (argmax) pool: MobileCLIP-S*, MobileCLIP2
CUSTOM = {"custom_text": True}  # open_clip's CustomTextCLIP (the text tower kept whole as `.text`)
FAMILIES = [
    Family("ViT-B-16", clip(VIT, TEXT), sep=True, trims=True),
    Family("ViT-H-14-worldwide", clip(VIT, {**TEXT, "pool_type": "eos", "eos_id": 49407}), sep=True, trims=True),
    Family("ViT-L-14-CLIPA", clip({**VIT, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
                                  {**TEXT, "context_length": 32, "pool_type": "last", "no_causal_mask": True}),
           sep=True, trims=False),
    Family("coca_ViT-B-32", clip({**VIT, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
                                 {**TEXT, "context_length": 76, "embed_cls": True, "output_tokens": True},
                                 multimodal_cfg={"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2,
                                                 "layers": 1, "attn_pooler_heads": 2}, **CUSTOM),
           sep=True, trims=True),
    Family("ViT-B-16-SigLIP2", clip(timm_tower("promptune_clip_tiny_siglip", "map", "none"),
                                    {**TEXT, "context_length": 64, "no_causal_mask": True, "proj_bias": True,
                                     "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                                     "act_kwargs": {"approximate": "tanh"}},
                                    embed_dim=64, init_logit_bias=-10, **CUSTOM),
           sep=True, trims=False),
    Family("EVA02-B-16", clip(timm_tower("promptune_clip_tiny_eva02", "token", None), TEXT, **CUSTOM), sep=True, trims=True),
    Family("PE-Core-B-16", clip(timm_tower("promptune_clip_tiny_pe_core", "map", None), {**TEXT, "context_length": 32},
                                **CUSTOM), sep=True, trims=True),
    Family("MobileCLIP-B", clip(timm_tower("promptune_clip_tiny_mobileclip_b", "token", None),
                                {**TEXT, "no_causal_mask": False}, **CUSTOM), sep=True, trims=True),
    Family("MobileCLIP2-L-14", clip(timm_tower("promptune_clip_tiny_vit_clip", "token", None), UNMASKED, **CUSTOM),
           sep=True, trims=False),
    Family("MobileCLIP-S1", clip(timm_tower("promptune_clip_tiny_fastvit_mci", "avg", None), UNMASKED, **CUSTOM),
           sep=False, trims=False),
    Family("convnext_base", clip(timm_tower("test_convnext", "", "linear"), TEXT), sep=False, trims=True),
    Family("RN50", clip({"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}, TEXT), sep=False, trims=True),
]
SEP_FAMILIES = [f for f in FAMILIES if f.sep]
NAMES = ["ox", "red_square", "golden-retriever", " ".join(f"word{i}" for i in range(120))]  # the last fills any context


def make_family_files(family: Family, folder: Path) -> tuple[Path, Path]:
    """The tiny config JSON and a random-weight safetensors file for it, built the way open_clip builds the config."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    stem = f"tiny-{family.name}".replace("SigLIP", "Sig_LIP")  # open_clip gives '*siglip*' names the hub tokenizer
    config_path = folder / f"{stem}.json"
    config_path.write_text(json.dumps(family.config))
    open_clip.factory._MODEL_CONFIGS[stem] = copy.deepcopy(family.config)
    torch.manual_seed(0)
    model = open_clip.create_model(stem)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    weights = folder / f"{stem}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config_path, weights


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """family -> its Backbone, loaded from files written on first use (one set of files per family and module)."""
    backbones: dict[str, Backbone] = {}

    def load(family: Family) -> Backbone:
        if family.name not in backbones:
            config, weights = make_family_files(family, tmp_path_factory.mktemp(family.name))
            backbones[family.name] = load_backbone(str(config), str(weights))
        return backbones[family.name]

    return load


@pytest.fixture(params=FAMILIES, ids=str)
def family(request) -> Family:
    return request.param


@pytest.fixture(params=SEP_FAMILIES, ids=str)
def sep_family(request) -> Family:
    return request.param


@pytest.fixture()
def backbone(family, loaded) -> Backbone:
    return loaded(family)


@pytest.fixture()
def sep_backbone(sep_family, loaded) -> Backbone:
    return loaded(sep_family)


METHOD_CASES = [(f, m) for f in FAMILIES for m in (("sep", "coop") if f.sep else ("coop",))]


@pytest.fixture(params=METHOD_CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def method_case(request, loaded):
    """(backbone, a fresh method on it): SEP and CoOp on every family that takes prompt tokens, CoOp on the rest."""
    family, name = request.param
    backbone = loaded(family)
    if name == "sep":
        return backbone, make_sep(backbone)
    torch.manual_seed(0)
    return backbone, CoOp(backbone, NAMES[:3], CoOp.make_config({"n_ctx": 4}))


def family_named(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def make_sep(backbone: Backbone, names=NAMES[:3], seed: int = 0, **options) -> SEP:
    torch.manual_seed(seed)
    return SEP(backbone, list(names), SEP.make_config(options))


def randomize_learned(method, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in method.learned_state().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)


def encode_text(backbone: Backbone, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(backbone.model.encode_text(backbone.tokenizer(texts)), dim=-1)


def encode_image(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(backbone.model.encode_image(pixels), dim=-1)


# ------------------------------------------------------------------------------------------------------ text towers


def test_frozen_text_features_equal_encode_text_trimmed_and_untrimmed(family, backbone):
    zero_shot = ZeroShotCLIP(backbone, NAMES)
    runner = zero_shot.text
    texts = [f"a photo of a {prompt_name(n)}." for n in NAMES]
    expected = encode_text(backbone, texts)
    torch.testing.assert_close(zero_shot.text_features, expected, atol=1e-5, rtol=0)
    tokens = runner.tokenize(texts[:3])  # short texts: trimming, where exact, runs fewer positions
    assert runner.trims is family.trims
    assert (runner.needed_length(tokens) < runner.context_length) is family.trims
    with torch.no_grad():
        trimmed = F.normalize(runner(runner.embed(tokens), tokens), dim=-1)
        full = F.normalize(runner(runner.embed(tokens), tokens, length=runner.context_length), dim=-1)
    torch.testing.assert_close(trimmed, expected[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(full, expected[:3], atol=1e-5, rtol=0)


def test_coop_context_started_from_a_phrase_is_the_zero_shot_prompt(family, backbone):
    """'X X X X {name}.' with X = the embeddings of 'a photo of a' is exactly 'a photo of a {name}.' in every layout."""
    coop = CoOp(backbone, NAMES[:3], CoOp.make_config({"ctx_init": "a photo of a"})).eval()
    expected = encode_text(backbone, [f"a photo of a {prompt_name(n)}." for n in NAMES[:3]])
    with torch.no_grad():
        torch.testing.assert_close(coop.text_features(), expected, atol=1e-5, rtol=0)


def test_context_longer_than_a_short_text_context_is_one_sentence(loaded):
    backbone = loaded(family_named("PE-Core-B-16"))  # 32 text positions
    with pytest.raises(MethodError, match="--n-ctx") as caught:
        CoOp(backbone, NAMES[:3], CoOp.make_config({"n_ctx": 40}))
    assert "\n" not in str(caught.value)
    with pytest.raises(MethodError, match="--n-ctx 16 needs 33 text positions"):
        make_sep(backbone, n_ctx=16)  # 16 context tokens plus the 16 after them that feed the fusion


class NoStartTokenizer:
    """open_clip's BPE tokens without the start token: SigLIP's SentencePiece layout (text, EOS, padding)."""

    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.inner = SimpleTokenizer()
        self.context_length = context_length

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        return self.inner(texts, context_length=(context_length or self.context_length) + 1)[:, 1:]


def test_a_tokenizer_without_a_start_token_puts_the_context_first(loaded):
    backbone = dataclasses.replace(loaded(family_named("ViT-B-16-SigLIP2")), tokenizer=NoStartTokenizer(64))
    coop = CoOp(backbone, NAMES[:3], CoOp.make_config({"ctx_init": "a photo of a"})).eval()
    assert coop.text.content_start == 0 and coop.prompts.start == 0
    expected = encode_text(backbone, [f"a photo of a {prompt_name(n)}." for n in NAMES[:3]])
    with torch.no_grad():
        torch.testing.assert_close(coop.text_features(), expected, atol=1e-5, rtol=0)
    sep = make_sep(backbone)
    torch.testing.assert_close(sep.template_features, expected, atol=1e-5, rtol=0)
    assert sep.overlong_class_names() == [] and coop.text.overlong([NAMES[-1]]) == [True]


def test_a_hugging_face_tokenizer_that_cannot_load_is_one_sentence(tmp_path):
    siglip = family_named("ViT-B-16-SigLIP2")
    config = copy.deepcopy(siglip.config)
    config["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP2"  # needs transformers and the hub
    config_path = tmp_path / "siglip-hub.json"
    config_path.write_text(json.dumps(config))
    _, weights = make_family_files(siglip, tmp_path)
    with pytest.raises(BackboneError, match="tokenizer") as caught:
        load_backbone(str(config_path), str(weights))
    assert "\n" not in str(caught.value) and str(caught.value).endswith(".")


# ----------------------------------------------------------------------------------------------------- image towers


@pytest.mark.parametrize("name", [f.name for f in FAMILIES if not f.sep])
def test_sep_refuses_towers_that_take_no_prompt_tokens_and_coop_runs_there(name, loaded):
    backbone = loaded(family_named(name))
    with pytest.raises(MethodError) as caught:
        make_sep(backbone)
    message = str(caught.value)
    assert "takes no extra tokens" in message and "--method coop" in message and "\n" not in message
    coop = CoOp(backbone, NAMES[:3], CoOp.make_config({"n_ctx": 4})).eval()
    with torch.no_grad():
        assert coop(images(2)).shape == (2, 3)


def test_frozen_branch_equals_open_clip(sep_family, sep_backbone):
    sep = make_sep(sep_backbone)
    pixels = images(3)
    expected = encode_image(sep_backbone, pixels)
    with torch.no_grad():
        torch.testing.assert_close(sep.frozen_image_features(pixels), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(F.normalize(sep.encode_image_prompted(pixels, prompts=False), dim=-1), expected,
                                   atol=1e-5, rtol=0)
    texts = [f"a photo of a {prompt_name(n)}." for n in NAMES[:3]]
    torch.testing.assert_close(sep.template_features, encode_text(sep_backbone, texts), atol=1e-5, rtol=0)


def test_prompts_masked_out_of_attention_leave_the_frozen_features(sep_family, sep_backbone):
    """With the image tokens unable to attend to the prompts, the prompted tower is the frozen one: the prompts reach
    the features only through attention, never through pooling, positions or rotary embedding."""
    sep = make_sep(sep_backbone)
    randomize_learned(sep, 1)
    sep.eval()
    tower, n = sep.image_tower, sep.config.n_ctx_v
    length = tower.image_tokens + n
    mask = torch.zeros(length, length)
    mask[: tower.image_tokens, tower.image_tokens :] = float("-inf")  # image queries never see prompt keys
    pixels = images(3)
    with torch.no_grad():
        frozen = F.normalize(sep.encode_image_prompted(pixels, prompts=False), dim=-1)
        masked = F.normalize(sep.encode_image_prompted(pixels, attn_mask=mask), dim=-1)
        prompted = F.normalize(sep.encode_image_prompted(pixels), dim=-1)
    torch.testing.assert_close(masked, frozen, atol=1e-5, rtol=0)
    assert (prompted - frozen).abs().max() > 1e-3  # unmasked, the prompts do change the features


def test_single_image_logits_equal_batched_logits(sep_family, sep_backbone):
    sep = make_sep(sep_backbone)
    randomize_learned(sep, 2)
    sep.eval()
    pixels = images(4)
    with torch.no_grad():
        together = sep(pixels)
        for i in range(len(pixels)):
            # logits are 100·cos: 1e-5 absolute plus 1e-5 relative is fp32 summation-order noise, nothing more
            torch.testing.assert_close(sep(pixels[i : i + 1])[0], together[i], atol=1e-5, rtol=1e-5)


def test_a_few_training_steps_lower_the_loss(method_case):
    backbone, method = method_case
    pixels, labels = images(6, seed=3), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(method.param_groups(0.0), lr=3e-3)
    method.train()
    losses = []
    for _ in range(6):
        loss, _ = method.training_loss(pixels, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for p in backbone.model.parameters())


def test_bf16_autocast_runs_forward_and_backward(method_case):
    _, method = method_case
    method.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = method.training_loss(images(2), torch.tensor([0, 2]))
    loss.backward()
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    for name, tensor in method.learned_state().items():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name


def test_prompt_file_round_trips_through_promptune_load(method_case, tmp_path):
    backbone, method = method_case
    randomize_learned(method, 4)
    method.eval()
    pixels = images(3)
    with torch.no_grad():
        expected = method(pixels)
    path = save_prompt_file(tmp_path / "prompts.safetensors", PromptFile(
        tensors=dict(method.learned_state()), method=method.name, backbone=backbone.describe(),
        class_names=list(method.class_names), hparams=method.hparams(), preprocess=backbone.preprocess.to_dict(),
    ))
    loaded = promptune.load(path, device="cpu")  # rebuilds the backbone from the stored config + weights file
    torch.testing.assert_close(loaded.logits(pixels), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- logits and rotary rows


def test_zero_shot_logits_are_the_models_own_with_its_logit_bias(family, backbone):
    zero_shot = ZeroShotCLIP(backbone, NAMES[:3])
    pixels = images(2)
    image = encode_image(backbone, pixels)
    text = encode_text(backbone, [f"a photo of a {prompt_name(n)}." for n in NAMES[:3]])
    model = backbone.model
    cosine_logits = model.logit_scale.exp() * image @ text.t()
    bias = getattr(model, "logit_bias", None)
    assert (bias is not None) is (family.name == "ViT-B-16-SigLIP2")
    logits = zero_shot(pixels)
    torch.testing.assert_close(logits, cosine_logits + (bias if bias is not None else 0), atol=1e-4, rtol=0)
    # the bias is one number for every class: softmax (training loss, predict's probabilities) and argmax ignore it
    torch.testing.assert_close(logits.softmax(-1), cosine_logits.softmax(-1), atol=1e-5, rtol=0)


def test_identity_rotation_rows_leave_prompts_unrotated():
    from timm.layers import apply_rot_embed_cat

    angles = torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) * 6.0  # 5 patches, 4 frequencies
    rope = torch.cat([angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)], -1)  # (5, 16)
    extended = with_identity_rotations(rope, 3, first=False)
    assert extended.shape == (8, 16)
    x = torch.randn(2, 2, 8, 8)  # (B, heads, 5 image + 3 prompt tokens, head_dim)
    rotated = apply_rot_embed_cat(x, extended)
    torch.testing.assert_close(rotated[:, :, :5], apply_rot_embed_cat(x[:, :, :5], rope), atol=0, rtol=0)
    torch.testing.assert_close(rotated[:, :, 5:], x[:, :, 5:], atol=0, rtol=0)
    assert not torch.allclose(rotated[:, :, :5], x[:, :, :5])


def test_a_local_weights_file_gets_the_preprocessing_of_the_models_tags():
    """A file carries no tag; the model's published tags say its mean/std (open_clip alone would use OpenAI's)."""
    from promptune.backbones.clip import _tag_preprocess

    siglip = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    assert _tag_preprocess("ViT-B-16-SigLIP2") == siglip
    assert _tag_preprocess("MobileCLIP-S1")["std"] == (1.0, 1.0, 1.0)
    assert _tag_preprocess("ViT-L-14") == {}  # its tags disagree (OpenAI vs 0.5): open_clip's default stays
    assert _tag_preprocess("tiny-not-a-published-model") == {}


def test_a_hugging_face_text_tower_is_refused_by_every_clip_method(loaded):
    """roberta / xlm-roberta / mt5 / nllb CLIPs keep a `transformers` model as `.text`; a stand-in does the same."""

    class HuggingFaceTextCLIP(torch.nn.Module):
        def __init__(self, visual: torch.nn.Module) -> None:
            super().__init__()
            self.visual = visual
            self.text = torch.nn.Linear(8, 8)  # stands in for open_clip's HFTextEncoder
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))

    vit = loaded(family_named("ViT-B-16"))
    backbone = dataclasses.replace(vit, model=HuggingFaceTextCLIP(vit.model.visual))
    for build in (lambda: make_sep(backbone), lambda: CoOp(backbone, NAMES[:3], CoOp.make_config({})),
                  lambda: ZeroShotCLIP(backbone, NAMES[:3])):
        with pytest.raises(MethodError, match="not an open_clip text transformer") as caught:
            build()
        assert "\n" not in str(caught.value)
