"""One open_clip residual attention block, run in few ops while autograd records through it.

open_clip's `ResidualAttentionBlock` attends through `nn.MultiheadAttention`. Without autograd that takes PyTorch's
fused fast path, but a prompted training forward needs the gradient with respect to the tokens, and then
`nn.MultiheadAttention` runs its generic path: about 50 ops forward and as many backward per block, mostly layout
shuffles around one `scaled_dot_product_attention`. `resblock_forward` runs the block's own parameters through the
same math in about half the ops (one packed in-projection, the same fused attention, the block's own norms, layer
scales and MLP), which halves the dispatch cost of every frozen block a prompt method trains through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resblock_forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """`block` (an open_clip residual attention block) on batch-first tokens x (N, L, D) -> (N, L, D).

    `batch_first` is the layout the block's transformer was built with; x is batch-first either way. Blocks this
    module does not know, and forwards that autograd does not record, run through the block itself.
    """
    if torch.is_grad_enabled() and x.requires_grad and _is_plain_resblock(block):
        return _lean_resblock(block, x, attn_mask)
    if batch_first:
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


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
    mask = attn_mask.to(x.dtype) if attn_mask is not None else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n * length, width)
    rows = rows + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    rows = rows + block.ls_2(block.mlp(block.ln_2(rows)))
    return rows.view(n, length, width)
