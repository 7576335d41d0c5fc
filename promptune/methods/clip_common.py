"""open_clip pieces every CLIP method shares: one residual-block call, and CLIP's classification logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def call_resblock(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """One open_clip residual attention block on batch-first tokens x (N, L, D) -> (N, L, D), whatever the
    transformer's layout.

    open_clip's `Transformer` transposes to (L, N, D) itself when built with batch_first=False; promptune iterates the
    blocks one by one (to fuse or replace prompts between them), so it does the same here. While autograd records
    through the block (a prompted training forward), `nn.MultiheadAttention` leaves its fused fast path for a generic
    one of about 50 ops forward and as many backward, mostly layout shuffles around one
    `scaled_dot_product_attention`; open_clip's plain `ResidualAttentionBlock` then runs its own parameters through the
    same math in about half the ops (`_lean_resblock`). So does a forward without autograd when the fused path is
    off: under CUDA autocast (nn.MultiheadAttention never takes it there) or with torch's MHA fast path disabled.
    Other blocks, and the forwards that can take the fused path, run the block.
    """
    plain_mask = attn_mask is None or attn_mask.is_floating_point()  # nn.MultiheadAttention reads bool masks inverted
    generic = (torch.is_grad_enabled() and x.requires_grad) or not _fast_path_possible()
    if generic and plain_mask and _is_plain_resblock(block):
        return _lean_resblock(block, x, attn_mask)
    if batch_first:
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


def clip_logits(clip: nn.Module, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """logit_scale·cos(image, text) + logit_bias, as open_clip's `get_logits`: (B, E) x (C, E) normalised -> (B, C).

    Sigmoid-trained CLIPs (SigLIP) carry a `logit_bias`. It is one number added to every class's logit, so it changes
    neither the softmax over classes (training loss, `predict` probabilities) nor the argmax (`eval`); it is kept so
    promptune's logits are the model's own.
    """
    logits = clip.logit_scale.exp() * image @ text.t().to(image.dtype)
    bias = getattr(clip, "logit_bias", None)
    return logits if bias is None else logits + bias.to(logits.dtype)


def _fast_path_possible() -> bool:
    """Whether nn.MultiheadAttention may take its fused inference path: not when torch's MHA fast path is disabled, nor
    under CUDA autocast (`torch.is_autocast_enabled()` without a device asks about CUDA, as nn.MultiheadAttention does)."""
    return torch.backends.mha.get_fastpath_enabled() and not torch.is_autocast_enabled()


def _is_plain_resblock(block: nn.Module) -> bool:
    """open_clip's ResidualAttentionBlock forward over an nn.MultiheadAttention with packed biased projections and
    no extras (no separate q/k/v weights, bias_k/bias_v, zero attention or active dropout)."""
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (
        isinstance(block, ResidualAttentionBlock)
        and type(block).forward is ResidualAttentionBlock.forward
        and type(block).attention is ResidualAttentionBlock.attention
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and (attn.dropout == 0.0 or not attn.training)
    )


def _lean_resblock(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """x + ls_1(attention(ln_1(x))), then + ls_2(mlp(ln_2(·))), with nn.MultiheadAttention's math (additive float
    mask, as open_clip passes it after casting it to the tokens' dtype). Norms, projections and the MLP see the
    tokens as one (N·L, D) matrix, so each projection is one matrix product with no reshapes around it."""
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    rows = x.reshape(n * length, width)
    qkv = F.linear(block.ln_1(rows), attn.in_proj_weight, attn.in_proj_bias)  # (N·L, 3D)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 x (N, H, L, d)
    mask = attn_mask.to(x.dtype) if attn_mask is not None else None  # (L, L), or (N·H, L, L) per input (CoCa)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(n, heads, length, length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n * length, width)
    rows = rows + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    rows = rows + block.ls_2(block.mlp(block.ln_2(rows)))
    return rows.view(n, length, width)
