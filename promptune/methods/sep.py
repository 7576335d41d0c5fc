"""SEP (Yao et al., arXiv 2405.15549): self-enhanced text and visual prompts for a frozen CLIP.

Learned: `n_ctx` text context tokens, `n_ctx_v` visual tokens appended after the patch tokens, and one Token Fusion
Module (TFM) per fusion layer and side. Before each fusion block the prompt slots are replaced by the TFM's fusion of
the current prompt states with representative pre-trained tokens of the same input:

- text: the `n_ctx` positions right after the context (class-name tokens, ".", EOT, padding), as the authors do;
- image: each image's own top-`n_ctx_v` CLS/patch tokens by mean squared activation.

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
from promptune.data import prompt_name
from promptune.errors import MethodError
from promptune.methods.base import TrainDefaults, run_block
from promptune.methods.clip_blocks import resblock_forward
from promptune.methods.coop import ClipPromptMethod


@dataclass
class SEPConfig:
    n_ctx: int = 6  # learned text context tokens; also how many tokens after the context feed the text fusion
    n_ctx_v: int = 4  # learned visual tokens appended after CLS + patches; also the top-k tokens fused per image
    fusion_layers: list[int] | None = None  # blocks preceded by a Token Fusion Module (None = every block but the first)
    template: str = "a photo of a {}."  # hand-crafted prompt of the frozen text branch and the text consistency loss
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
        prompts, reps = prompts.to(weight_dtype), reps.to(weight_dtype)
        attended = self.attn(self.ln_1(prompts), self.ln_1(reps)).to(weight_dtype)  # autocast computes it in bf16/fp16
        h = torch.lerp(attended, reps, self.gate_1)  # (N, K, D)
        update = self.mlp(self.ln_2(h).reshape(-1, h.shape[-1])).view_as(h).to(weight_dtype)  # MLP on (N·K, D) rows
        return torch.lerp(update, h, self.gate_2).to(dtype)


def select_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's own top-k tokens by mean squared activation over channels: x (N, T, D) -> (N, k, D), by score.

    The scores are compared in fp32 (the L2 norm ranks tokens exactly as the mean square does); the gathered tokens
    keep their gradient (only the choice is discrete).
    """
    with torch.no_grad():
        index = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).topk(k, dim=1).indices  # (N, k)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _vision_tower(model: nn.Module) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__ if visual is not None else "missing"
        raise MethodError(
            f"SEP needs a ViT image tower (open_clip VisionTransformer, e.g. ViT-B-16 or ViT-B-32), but this CLIP's "
            f"image tower is a {kind}; use a ViT CLIP or another method (coop)."
        )
    return visual


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
    description = "SEP: self-enhanced text + visual prompts with per-layer token fusion (open vocabulary)"
    defaults = TrainDefaults(
        epochs=50, lr=0.0025, weight_decay=5e-4, batch_size=32, shots=16,
        warmup_epochs=1, warmup="constant", warmup_lr=1e-5, optimizer="adam", eps=1e-3,
    )

    def __init__(self, backbone: Backbone, class_names: list[str], config: SEPConfig) -> None:
        super().__init__(backbone, class_names, config, config.n_ctx)
        self.visual = _vision_tower(self.clip)
        if self.text.context_length < 1 + 2 * config.n_ctx:
            raise MethodError(
                f"n_ctx={config.n_ctx} needs {1 + 2 * config.n_ctx} text positions but this CLIP's context holds "
                f"only {self.text.context_length}."
            )
        candidates = int(self.visual.positional_embedding.shape[0])
        if config.n_ctx_v > candidates:
            raise MethodError(f"n_ctx_v={config.n_ctx_v} exceeds the {candidates} CLS and patch tokens of this image tower.")
        text_width = self.text.width
        vision_width = int(self.visual.transformer.width)
        self.text_layers = _fusion_layers(config.fusion_layers, self.text.layers, "text")
        self.visual_layers = _fusion_layers(config.fusion_layers, len(self.visual.transformer.resblocks), "image")
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
        if not isinstance(config.template, str) or config.template.count("{}") != 1:
            raise error(f"template must contain '{{}}' exactly once (where the class name goes), got {config.template!r}.")
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
    def _template_features(self, names: list[str]) -> torch.Tensor:
        return self.text.encode_texts([self.config.template.format(prompt_name(n)) for n in names]).float()

    def set_classes(self, class_names: list[str]) -> None:
        """New class names: rebuilds the class prompts, the frozen template features and the (unsaved) prototypes."""
        super().set_classes(class_names)
        template = self._template_features(self.class_names)
        self.template_features = template
        self.prototypes = nn.Parameter(template.clone(), requires_grad=self.prototypes.requires_grad)

    # ----- text ------------------------------------------------------------------------------------------------------
    def _splice(self) -> torch.Tensor:
        emb = self.prompts.embeddings
        ctx = self.ctx.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
        return torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx :]], dim=1)

    def _text_hook(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Before a fusion block: the context slots become their fusion with the n_ctx tokens right after them."""
        slot = self._text_slot.get(index)
        if slot is None:
            return x
        n = self.n_ctx
        sos, prompts, reps, rest = x.split([1, n, n, x.shape[1] - 1 - 2 * n], dim=1)
        return torch.cat([sos, self.text_fusion[slot](prompts, reps), reps, rest], dim=1)

    def encode_text_prompted(self, length: int | None = None) -> torch.Tensor:
        """Unnormalised prompted text features (C, E) of the current classes; `length` overrides the trimming."""
        tokens = self.prompts.tokens
        if length is None:
            length = self.text.needed_length(tokens, min_length=1 + 2 * self.n_ctx)
        return self.text(self._splice(), tokens, self._text_hook, length)

    def compute_text_features(self) -> torch.Tensor:
        prompted = F.normalize(self.encode_text_prompted(), dim=-1)
        return F.normalize(prompted + self.template_features.to(prompted.dtype), dim=-1)

    # ----- image -----------------------------------------------------------------------------------------------------
    def _patch_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's VisionTransformer._embeds without ln_pre: (B, 1 + grid², D)."""
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.patch_dropout(x)

    def _visual_hook(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Before a fusion block: the visual prompts (the last n_ctx_v tokens) become their fusion with the image's
        own top-n_ctx_v CLS/patch tokens."""
        slot = self._visual_slot.get(index)
        if slot is None:
            return x
        n = self.config.n_ctx_v
        tokens, prompts = x.split([x.shape[1] - n, n], dim=1)
        return torch.cat([tokens, self.visual_fusion[slot](prompts, select_tokens(tokens, n))], dim=1)

    def encode_image_prompted(self, images: torch.Tensor, prompts: bool = True) -> torch.Tensor:
        """Unnormalised image features (B, E) with the visual prompts and fusion; prompts=False is plain CLIP."""
        visual = self.visual
        x = self._patch_embeds(images)
        n = self.config.n_ctx_v if prompts else 0
        if n:
            x = torch.cat([x, self.ctx_v.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = visual.ln_pre(x)
        transformer = visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        checkpointed = bool(n) and self.checkpointing_active()

        def segment(x: torch.Tensor, index: int, block: nn.Module) -> torch.Tensor:
            if n:
                x = self._visual_hook(index, x)
            return resblock_forward(block, x, None, batch_first)

        for index, block in enumerate(transformer.resblocks):
            x = run_block(checkpointed, segment, x, index, block)
        if n:
            x = x[:, :-n]
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ensembled prompted features, frozen features), both normalised (B, E)."""
        frozen = self.frozen_image_features(images)
        prompted = F.normalize(self.encode_image_prompted(images), dim=-1)
        return F.normalize(prompted + frozen.to(prompted.dtype), dim=-1), frozen

    # ----- forward and training --------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image, _ = self.image_features(images)
        return self.logit_scale * image @ self.text_features().t().to(image.dtype)

    def _prototype_logits(self, features: torch.Tensor) -> torch.Tensor:
        weights = F.normalize(self.prototypes, dim=-1)
        return self.config.proto_scale * features.to(weights.dtype) @ weights.t()

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        text = self.text_features()
        image, frozen = self.image_features(images)
        logits = self.logit_scale * image @ text.t().to(image.dtype)
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

    @torch.no_grad()
    def prepare(self, loader: Iterable, device: torch.device, seed: int) -> None:
        """Start the prototype classifier at the class means of the frozen image features (one pass, no grad)."""
        sums = torch.zeros_like(self.prototypes, dtype=torch.float32)
        counts = torch.zeros(sums.shape[0], dtype=torch.float32, device=sums.device)
        for batch in loader:
            if batch.images.numel() == 0:
                continue
            features = self.frozen_image_features(batch.images.to(device)).float().to(sums.device)
            labels = batch.labels.to(sums.device)
            sums.index_add_(0, labels, features)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float32))
            self._prepared(labels.shape[0])
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
