"""The seam between SPT/VPT and timm: one small adapter per timm ViT class, and blocks run for the image tokens only.

A prompted ViT needs five things from its backbone: the raw patch embeddings (layer-0 prototypes), the tokens
entering block 0 (prefix tokens first, positional embedding added), one block at a time with whatever else that
block reads, the final norm, and the backbone's pooling. `vit_layout` picks the adapter for a timm model:

- `TimmViT`: timm's `VisionTransformer` (ViT, DeiT III, DINOv2 with registers, MAE, SigLIP, CLIP-style pre-norm ViTs;
  token / avg / max / map pooling; `dynamic_img_size`).
- `TimmEva`: timm's `Eva` (EVA02, DINOv3, PE-Core, RoPE-ViT). Its attention applies the rotary embedding to every token
  after the prefix tokens, so the prompts (placed right after the prefix) get identity rotations: the patches keep
  exactly the rotations timm gives them and the prompts receive none.

Any other timm model is refused in one sentence (`unsupported_backbone`).

With deep prompts every block's outputs at the prompt positions are thrown away: the next layer's prompts replace
them, and the head pools image tokens only. Their queries, attention output, projection and MLP are wasted work, about
three quarters of what each prompt token costs. A deep prompt set enters block i as the same tensor for every
image. `block_with_shared_prompts` runs timm's plain `Block` for the image tokens only, with the prompts appended for
their keys and values; it equals `block(x)` with the prompts inserted and their outputs removed (same math, fp
rounding aside). Other blocks (EVA's included, whose attention has several variants: fused or split qkv, gates,
grouped keys) run whole.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Attention, global_pool_nlc
from timm.models.eva import Eva
from timm.models.vision_transformer import Block, VisionTransformer

from promptune.errors import MethodError
from promptune.methods.rotary import with_identity_rotations

REDUCTION_POOLS = ("token", "avg", "max", "avgmax")  # computed from the tokens, valid on any backbone
ATTENTION_POOLS = ("map", "prr")  # the backbone's own learned attention pool, valid only where it has one
POOLS = (*REDUCTION_POOLS, *ATTENTION_POOLS)
SUPPORTED = "timm's VisionTransformer and Eva models (ViT, DeiT III, DINOv2, MAE, SigLIP, EVA02, DINOv3, PE-Core)"
_ATTENTION_PARTS = ("qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop", "attn_drop", "num_heads", "head_dim")


# ------------------------------------------------------------------------------------------------ adapters


class TimmViT:
    """timm's `VisionTransformer`: blocks read the token sequence alone."""

    model_class: ClassVar[type[nn.Module]] = VisionTransformer

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name
        self.num_prefix = int(model.num_prefix_tokens)
        self.blocks: list[nn.Module] = list(model.blocks)

    @property
    def own_pool(self) -> str:
        """The pooling timm built the backbone with ('' when it has none)."""
        return str(self.model.global_pool)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch embeddings, (B, N, D) or (B, h, w, D) for `dynamic_img_size` models."""
        return self.model.patch_embed(images)

    def patch_prototypes(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch embeddings with no position, as prompts see the sequence (after `norm_pre`, if any)."""
        return self.model.norm_pre(patches.reshape(patches.shape[0], -1, patches.shape[-1]))

    def embed(self, patches: torch.Tensor, prompts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens entering block 0, (B, prefix + N, D); what every block reads besides them, for `prompts` prompts
        after the prefix tokens). timm's own order: position + prefix tokens, patch dropout, `norm_pre`."""
        x = self.model.patch_drop(self.model._pos_embed(patches))
        return self.model.norm_pre(x), None

    def run_block(self, index: int, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self.blocks[index](x)

    def skips_span(self, index: int) -> bool:
        """Whether block `index` can leave out the prompts' outputs (`block_with_shared_prompts`)."""
        return supports_span_skipping(self.blocks[index])

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def check_pool(self, pool: str) -> None:
        """One sentence when `pool` cannot run on this backbone."""
        if pool in ATTENTION_POOLS and pool != self.own_pool:
            raise MethodError(
                f"--pool {pool} uses the backbone's own attention pool, but '{self.name}' pools with "
                f"'{self.own_pool or 'nothing'}'; choose one of {', '.join(REDUCTION_POOLS)}."
            )
        if pool == "token" and not self.has_class_token():
            raise MethodError(
                f"--pool token reads the class token, but '{self.name}' has none; choose avg, max or avgmax."
            )

    def pool(self, tokens: torch.Tensor, pool: str) -> torch.Tensor:
        """(B, prefix + N, D) image tokens after the final norm -> (B, D): `pool`, then the backbone's `fc_norm`.

        The backbone's own pooling runs through timm's `pool` itself; another reduction is timm's `global_pool_nlc`
        with the backbone's prefix handling, i.e. what timm computes for the same weights built with that pooling and
        the same norm placement (`reset_classifier(global_pool=...)`).
        """
        if pool == self.own_pool:
            pooled = self.model.pool(tokens)
        else:
            include_prefix = bool(getattr(self.model, "pool_include_prefix", False))
            pooled = global_pool_nlc(tokens, pool, self.num_prefix, reduce_include_prefix=include_prefix)
        return self.model.fc_norm(pooled)


class TimmEva(TimmViT):
    """timm's `Eva`: blocks also read a rotary embedding for the patch tokens (None without rotary embeddings)."""

    model_class: ClassVar[type[nn.Module]] = Eva

    def embed(self, patches: torch.Tensor, prompts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, rope = self.model._pos_embed(patches)  # patch dropout (training only) is inside, as in timm
        if rope is not None and prompts:
            rope = with_identity_rotations(rope, prompts, first=True)
        return self.model.norm_pre(x), rope

    def run_block(self, index: int, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        rope = context[index] if context is not None and self.model.rope_mixed else context  # per-depth rotations
        return self.blocks[index](x, rope=rope)

    def skips_span(self, index: int) -> bool:
        return False


LAYOUTS: tuple[type[TimmViT], ...] = (TimmViT, TimmEva)


def unsupported_backbone(method: str, name: str, model: nn.Module) -> MethodError:
    return MethodError(
        f"Method '{method}' runs on {SUPPORTED}, whose blocks read a plain token sequence to put prompts in; "
        f"'{name}' builds a timm {type(model).__name__}, which it does not support."
    )


def vit_layout(model: nn.Module, name: str, method: str) -> TimmViT:
    """The adapter for exactly this timm class (a subclass may change the forward, so it is not assumed to fit)."""
    for layout in LAYOUTS:
        if type(model) is layout.model_class:
            return layout(model, name)
    raise unsupported_backbone(method, name, model)


# ------------------------------------------------------------------------------------- skipping the prompt outputs


def supports_span_skipping(block: nn.Module) -> bool:
    """Only timm's plain pre-norm `Block` with its standard `Attention`; any other block runs whole."""
    if type(block) is not Block or type(block.attn) is not Attention:
        return False
    attn = block.attn
    return all(hasattr(attn, part) for part in _ATTENTION_PARTS) and getattr(attn, "gate", None) is None


def drop_span(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(B, N, D) -> (B, N - (end - start), D) without tokens start..end-1."""
    return torch.cat([x[:, :start], x[:, end:]], 1)


def block_with_shared_prompts(block: Block, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """(B, N, D) image tokens -> (B, N, D): `block` run on the image tokens and `prompts` (P, D), prompts' outputs
    left out.

    Attention does not depend on where tokens sit in the sequence (positions were added before block 0), so the
    prompts go after the image tokens: the queries kept are a plain slice, and the one copy per block is a contiguous
    concatenation. Only the prompts' keys and values are used; their queries, attention output, projection and MLP
    are never computed. Everything else is timm's `Block` op for op (fused attention included).
    """
    attn: Attention = block.attn
    batch, tokens, _ = x.shape
    both = torch.cat([x, prompts.expand(batch, -1, -1)], 1)  # (B, N + P, D)
    qkv = attn.qkv(block.norm1(both)).reshape(batch, both.shape[1], 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N + P, head_dim)
    q, k = attn.q_norm(q[:, :, :tokens]), attn.k_norm(k)  # the image tokens ask, every token answers
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, heads, N, head_dim)
    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(out)))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
