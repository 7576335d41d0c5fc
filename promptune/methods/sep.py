"""SEP (Yao et al., arXiv 2405.15549): self-enhanced text and visual prompts for a frozen CLIP.

Learned: `n_ctx` text context tokens, `n_ctx_v` visual tokens appended after the patch tokens, and one Token Fusion
Module (TFM) per fusion layer and side. Before each fusion block the prompt slots are replaced by the TFM's fusion of
the current prompt states with representative pre-trained tokens of the same input:

- text: the `n_ctx` positions right after the context (class-name tokens, ".", EOT, padding), as the authors do;
- image: each image's own top-`n_ctx_v` tokens by mean squared activation, among all its tokens (class and register
  tokens included, as the authors include CLS: high-norm tokens carry global information).

The image side runs on any ViT tower through `clip_image.PromptableImageTower` (open_clip ViTs, and timm ViT / Eva
towers: SigLIP, EVA02, PE-Core, MobileCLIP-B); the prompts never enter the tower's pooling and get no positional or
rotary embedding. The text side runs on every open_clip text transformer layout (`clip_text.ClipTextRunner`).

Unlike the authors' code, token selection and the TFM attention are strictly per input (the reference averages the
selection score over the batch and attends across the images of a batch), so an image's prediction never depends on
which other images share its batch. Both features are ensembled with frozen CLIP (hand-crafted template text, plain
image pass), and training adds consistency losses to them plus a cosine prototype classifier that is not saved.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from promptune.backbones import Backbone
from promptune.errors import MethodError
from promptune.methods.clip_image import image_tower
from promptune.methods.coop import ClipPromptMethod
from promptune.methods.zeroshot import DEFAULT_TEMPLATE
from promptune.runtime import Runtime


@dataclass
class SEPConfig:
    n_ctx: int = 6  # learned text context tokens; also how many tokens after the context feed the text fusion
    n_ctx_v: int = 4  # learned visual tokens appended after CLS + patches; also the top-k tokens fused per image
    fusion_layers: list[int] | None = None  # blocks preceded by a Token Fusion Module (None = every block but the first)
    # Hand-crafted template(s) of the frozen text branch, the text consistency loss and eval's zero-shot baseline: one
    # string, or a list whose normalised text features are averaged (and renormalised) per class.
    template: str | list[str] = DEFAULT_TEMPLATE
    text_weight: float = 8.0  # weight of 1 - cos(prompted text feature, hand-crafted text feature)
    image_weight: float = 6.0  # weight of 1 - cos(prompted image feature, frozen image feature)
    proto_weight: float = 0.5  # weight of the cosine prototype classifier's cross-entropy (training only)
    proto_scale: float = 10.0  # temperature (logit scale) of the cosine prototype classifier
    tfm_hidden: int = 256  # hidden width of each Token Fusion Module's bottleneck MLP
    gate_init: float = 0.75  # initial value of the two learnable residual gates of each Token Fusion Module


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def fusion_heads(width: int) -> int:
    """max(1, width // 64) heads, lowered to a divisor of `width` for widths that are not multiples of 64."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


class FusionAttention(nn.Module):
    """Cross-attention with nn.MultiheadAttention's parameters (names, shapes, initialisation) and math, written for
    the Token Fusion Module's tiny inputs in few ops: a query and a packed key/value in-projection over flattened rows,
    torch's fused `scaled_dot_product_attention`, one out-projection. No mask and no dropout (the TFM has neither)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # query, key, value projections stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # after out_proj's init, in nn.MultiheadAttention's RNG order
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query (N, Q, D), context (N, C, D) -> each input's queries attended over its own context: (N, Q, D)."""
        n, length, width = query.shape
        w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
        b_q, b_kv = self.in_proj_bias.split([width, 2 * width])
        q = F.linear(query.reshape(-1, width), w_q, b_q).view(n, length, self.heads, -1).transpose(1, 2)  # (N, H, Q, d)
        kv = F.linear(context.reshape(-1, width), w_kv, b_kv).view(n, -1, 2, self.heads, width // self.heads)
        k, v = kv.permute(2, 0, 3, 1, 4)  # 2 x (N, H, C, d)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, width)  # (N·Q, D)
        return self.out_proj(out).view(n, length, width)


class TokenFusion(nn.Module):
    """Token Fusion Module: prompt states attend over representative tokens of the same input (batch_first).

    h = g1·rep + (1 − g1)·MHA(LN1(prompt), LN1(rep), LN1(rep));  out = g2·h + (1 − g2)·MLP(LN2(h)).
    Slot j of the output is anchored on representative token j, so both inputs carry the same number of tokens.
    Each gated sum is one `torch.lerp`.

    It always computes in its parameters' dtype (fp32), autocast or not: its matmuls are a few rows wide, so mixed
    precision saves no time here, while casting its weights and activations to bf16 and back cost ~29 extra ops per
    module and step (forward and backward), a fifth of all its ops.
    """

    def __init__(self, width: int, hidden: int, gate_init: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = FusionAttention(width, fusion_heads(width))
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc=nn.Linear(width, hidden, bias=False),
                act=QuickGELU(),
                proj=nn.Linear(hidden, width, bias=False),
            )
        )
        self.gate_1 = nn.Parameter(torch.tensor(float(gate_init)))
        self.gate_2 = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, prompts: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
        """prompts, reps: (N, K, D) -> fused prompt states (N, K, D), in the inputs' dtype."""
        dtype = prompts.dtype
        weight_dtype = self.ln_1.weight.dtype
        with torch.autocast(prompts.device.type, enabled=False):
            prompts, reps = prompts.to(weight_dtype), reps.to(weight_dtype)
            h = torch.lerp(self.attn(self.ln_1(prompts), self.ln_1(reps)), reps, self.gate_1)  # (N, K, D)
            update = self.mlp(self.ln_2(h).reshape(-1, h.shape[-1])).view_as(h)  # the MLP on (N·K, D) rows
            return torch.lerp(update, h, self.gate_2).to(dtype)


def select_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's own top-k tokens by mean squared activation over channels: x (N, T, D) -> (N, k, D), by score.

    The scores are compared in fp32 (the L2 norm ranks tokens exactly as the mean square does); the gathered tokens
    keep their gradient (only the choice is discrete).
    """
    with torch.no_grad():
        index = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).topk(k, dim=1).indices  # (N, k)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def templates_of(template: str | list[str]) -> list[str]:
    """The template option as a list (a prompt file written before several templates were allowed holds a string)."""
    return [template] if isinstance(template, str) else list(template)


def _fusion_layers(requested: list[int] | None, depth: int, side: str) -> list[int]:
    if requested is None:
        return list(range(1, depth))
    too_deep = [i for i in requested if i >= depth]
    if too_deep:
        raise MethodError(
            f"fusion_layers {too_deep} do not exist in this CLIP's {side} tower, which has blocks 0..{depth - 1}."
        )
    return sorted(requested)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SEP(ClipPromptMethod):
    """Self-Enhanced Prompt tuning for CLIP ViTs: text + visual prompts refreshed per layer by Token Fusion Modules.

    Training defaults follow the authors' 16-shot recipe: Adam, lr 0.0025, weight decay 5e-4, batch 32, 50 epochs,
    one constant warm-up epoch at 1e-5, then cosine. 50 epochs of a 16-shot 10-class set are 250 steps (5 per epoch),
    a few minutes of ViT-B/16 on one GPU; the authors use 50 epochs on every small dataset and we keep their schedule.
    Adam's eps stays at the authors' 1e-3. promptune keeps fp32 master weights (autocast only touches activations),
    so the small eps would be numerically safe; but lr 0.0025 was tuned with eps 1e-3, under which weights whose
    gradients are far below 1e-3 (most of the ~45 M fusion weights) take damped, gradient-proportional steps instead of
    Adam's full ~lr sign-like step. eps 1e-8 would turn the same lr into a much more aggressive optimiser.
    """

    name = "sep"
    Config = SEPConfig
    prepare_reads_shard = True  # class sums and counts add up over the processes' shares

    def __init__(self, backbone: Backbone, class_names: list[str], config: SEPConfig) -> None:
        tower = image_tower(backbone.model)  # refuses towers that take no prompt tokens, before any text work
        super().__init__(backbone, class_names, config, config.n_ctx)
        self.image_tower = tower
        needed = self.text.content_start + 2 * config.n_ctx  # the context, then as many tokens to fuse with
        if self.text.context_length < needed:
            raise MethodError(
                f"--n-ctx {config.n_ctx} needs {needed} text positions but this CLIP's context holds only "
                f"{self.text.context_length}."
            )
        candidates = self.image_tower.image_tokens
        if config.n_ctx_v > candidates:
            raise MethodError(f"--n-ctx-v {config.n_ctx_v} exceeds the {candidates} image tokens of this image tower.")
        text_width = self.text.width
        vision_width = self.image_tower.width
        self.text_layers = _fusion_layers(config.fusion_layers, self.text.layers, "text")
        self.visual_layers = _fusion_layers(config.fusion_layers, len(self.image_tower.blocks), "image")
        self._text_slot = {layer: i for i, layer in enumerate(self.text_layers)}
        self._visual_slot = {layer: i for i, layer in enumerate(self.visual_layers)}

        self.ctx = nn.Parameter(torch.randn(config.n_ctx, text_width) * 0.02)  # (n_ctx, D_text)
        self.ctx_v = nn.Parameter(torch.randn(config.n_ctx_v, vision_width) * 0.02)  # (n_ctx_v, D_vision)
        self.text_fusion = nn.ModuleList(
            TokenFusion(text_width, config.tfm_hidden, config.gate_init) for _ in self.text_layers
        )
        self.visual_fusion = nn.ModuleList(
            TokenFusion(vision_width, config.tfm_hidden, config.gate_init) for _ in self.visual_layers
        )
        self.to(self.clip.logit_scale.device)
        template = self._template_features(self.class_names)
        self.register_buffer("template_features", template, persistent=False)  # (C, E), normalised, frozen
        # Cosine prototype classifier (training only, never saved): starts at the template features so the loss is
        # defined before `prepare`, which resets it to the class means of the frozen image features.
        self.prototypes = nn.Parameter(template.clone().float())

    # ----- configuration ---------------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: SEPConfig, error: type[Exception]) -> None:
        if not _is_int(config.n_ctx) or not 1 <= config.n_ctx <= 32:
            raise error(f"--n-ctx must be a whole number from 1 to 32, got {config.n_ctx!r}.")
        if not _is_int(config.n_ctx_v) or not 1 <= config.n_ctx_v <= 32:
            raise error(f"--n-ctx-v must be a whole number from 1 to 32, got {config.n_ctx_v!r}.")
        layers = config.fusion_layers
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(i) and i >= 0 for i in layers):
                raise error(f"fusion_layers must be a non-empty list of block indices (0 or more), got {layers!r}.")
            if len(set(layers)) != len(layers):
                raise error(f"fusion_layers must not repeat a block, got {list(layers)}.")
        templates = config.template
        if not isinstance(templates, (str, list, tuple)) or (not isinstance(templates, str) and not templates):
            raise error(f"--template must be one template or a list of them, got {templates!r}.")
        for template in templates_of(templates):
            if not isinstance(template, str) or template.count("{}") != 1:
                raise error(f"--template must contain '{{}}' exactly once (where the class name goes), "
                            f"got {template!r}.")
        for field in ("text_weight", "image_weight", "proto_weight"):
            value = getattr(config, field)
            if not _is_real(value) or value < 0:
                raise error(f"{field} must be a number of at least 0, got {value!r}.")
        if not _is_real(config.proto_scale) or config.proto_scale <= 0:
            raise error(f"proto_scale must be a positive number, got {config.proto_scale!r}.")
        if not _is_int(config.tfm_hidden) or config.tfm_hidden < 1:
            raise error(f"tfm_hidden must be a positive integer, got {config.tfm_hidden!r}.")
        if not _is_real(config.gate_init) or not 0 <= config.gate_init <= 1:
            raise error(f"gate_init must be between 0 and 1, got {config.gate_init!r}.")

    # ----- classes ---------------------------------------------------------------------------------------------------
    def zero_shot_templates(self) -> list[str]:
        return templates_of(self.config.template)

    def _template_features(self, names: list[str]) -> torch.Tensor:
        return self.text.encode_templates(self.zero_shot_templates(), names).float()

    def set_classes(self, class_names: list[str]) -> None:
        """New class names: rebuilds the class prompts, the frozen template features and the (unsaved) prototypes."""
        super().set_classes(class_names)
        template = self._template_features(self.class_names)
        self.template_features = template
        self.prototypes = nn.Parameter(template.clone(), requires_grad=self.prototypes.requires_grad)

    # ----- text ------------------------------------------------------------------------------------------------------
    def _text_hook(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Before a fusion block: the context slots become their fusion with the n_ctx tokens right after them."""
        slot = self._text_slot.get(index)
        if slot is None:
            return x
        s, n = self.prompts.start, self.n_ctx
        head, prompts, reps, rest = x.split([s, n, n, x.shape[1] - s - 2 * n], dim=1)
        return torch.cat([head, self.text_fusion[slot](prompts, reps), reps, rest], dim=1)

    def min_text_length(self) -> int:
        """The fusion blocks read the n_ctx tokens after the context: the start token, context and those must run."""
        return self.text.content_start + 2 * self.n_ctx

    def encode_text_prompted(self, length: int | None = None) -> torch.Tensor:
        """Unnormalised prompted text features (C, E) of the current classes; `length` overrides an exact trimming."""
        prompts = self.prompts
        return self.text(prompts.with_context(self.ctx), prompts.tokens, self._text_hook, length or prompts.length)

    def compute_text_features(self) -> torch.Tensor:
        prompted = F.normalize(self.encode_text_prompted(), dim=-1)
        return F.normalize(prompted + self.template_features.to(prompted.dtype), dim=-1)

    # ----- image -----------------------------------------------------------------------------------------------------
    def _visual_hook(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Before a fusion block: the prompts (the last n_ctx_v tokens) become their fusion with the image's own
        top-n_ctx_v tokens (candidates: every image token, class/register tokens included)."""
        slot = self._visual_slot.get(index)
        if slot is None:
            return x
        n = self.config.n_ctx_v
        tokens, prompts = x.split([x.shape[1] - n, n], dim=1)
        return torch.cat([tokens, self.visual_fusion[slot](prompts, select_tokens(tokens, n))], dim=1)

    def encode_image_prompted(self, images: torch.Tensor, prompts: bool = True,
                              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised image features (B, E) with the visual prompts and fusion; prompts=False is the frozen tower.

        attn_mask: optional additive mask over image + prompt tokens (see `PromptableImageTower.forward`).
        """
        if not prompts:
            return self.image_tower(images, attn_mask=attn_mask)
        return self.image_tower(images, self.ctx_v, self._visual_hook, self.checkpointing_active(), attn_mask)

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's own normalised image features (B, E), through the same tower adapter as the prompted pass: its
        blocks take the lean path wherever nn.MultiheadAttention's fused one is off (CUDA autocast)."""
        with torch.no_grad():
            return F.normalize(self.image_tower(images), dim=-1)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ensembled prompted features, frozen features), both normalised (B, E)."""
        frozen = self.frozen_image_features(images)
        prompted = F.normalize(self.encode_image_prompted(images), dim=-1)
        return F.normalize(prompted + frozen.to(prompted.dtype), dim=-1), frozen

    # ----- forward and training --------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image, _ = self.image_features(images)
        return self.logits(image, self.text_features())

    def _prototype_logits(self, features: torch.Tensor) -> torch.Tensor:
        weights = F.normalize(self.prototypes, dim=-1)
        return self.config.proto_scale * features.to(weights.dtype) @ weights.t()

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        text = self.text_features()
        image, frozen = self.image_features(images)
        logits = self.logits(image, text)
        loss = F.cross_entropy(logits.float(), labels)
        text_cos = (text.float() * self.template_features.float()).sum(-1).mean()
        image_cos = (image.float() * frozen.float()).sum(-1).mean()
        loss = loss + config.text_weight * (1 - text_cos) + config.image_weight * (1 - image_cos)
        if config.proto_weight:
            proto = F.cross_entropy(self._prototype_logits(image.float()), labels)
            proto = proto + F.cross_entropy(self._prototype_logits(frozen.float()), labels)
            loss = loss + config.proto_weight * proto
        return loss, logits

    def prepare_images(self, available: int) -> int:
        return available

    def has_unused_parameters(self) -> bool:
        return not self.config.proto_weight  # the prototypes then play no part in the loss

    @torch.no_grad()
    def prepare(self, loader: Iterable, runtime: Runtime, seed: int) -> None:
        """Start the prototype classifier at the class means of the frozen image features (one pass, no grad)."""
        sums = torch.zeros_like(self.prototypes, dtype=torch.float32)
        counts = torch.zeros(sums.shape[0], dtype=torch.float32, device=sums.device)
        for batch in loader:
            if batch.images.numel() == 0:
                continue
            features = self.frozen_image_features(batch.images.to(runtime.device)).float().to(sums.device)
            labels = batch.labels.to(sums.device)
            sums.index_add_(0, labels, features)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float32))
            self._prepared(labels.shape[0])
        runtime.all_reduce(sums)
        runtime.all_reduce(counts)
        seen = counts > 0
        means = sums[seen] / counts[seen].unsqueeze(-1)
        self.prototypes[seen] = F.normalize(means, dim=-1).to(self.prototypes.dtype)

    # ----- the prompt file -------------------------------------------------------------------------------------------
    def learned_state(self) -> dict[str, torch.Tensor]:
        """ctx, ctx_v and every Token Fusion Module parameter; class-independent (the prototypes are not saved)."""
        state: dict[str, torch.Tensor] = {"ctx": self.ctx, "ctx_v": self.ctx_v}
        for prefix in ("text_fusion", "visual_fusion"):
            for name, parameter in getattr(self, prefix).named_parameters():
                state[f"{prefix}.{name}"] = parameter
        return state
