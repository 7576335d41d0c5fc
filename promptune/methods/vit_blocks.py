"""A timm ViT block run for the image tokens only, with deep prompts serving as keys and values.

With deep prompts, every block's outputs at the prompt positions are thrown away: the next layer's prompts replace
them, and the head pools image tokens only. Their queries, attention output, projection and MLP are therefore wasted
work, about three quarters of what each prompt token costs. `block_without_span` computes only what is kept; it
equals `block(x)` with the prompt positions removed (same math, fp rounding aside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Attention
from timm.models.vision_transformer import Block

_ATTENTION_PARTS = ("qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop", "attn_drop", "num_heads", "head_dim")


def supports_span_skipping(block: nn.Module) -> bool:
    """Only timm's plain pre-norm `Block` with its standard `Attention`; any other block runs whole."""
    if type(block) is not Block or type(block.attn) is not Attention:
        return False
    attn = block.attn
    return all(hasattr(attn, part) for part in _ATTENTION_PARTS) and getattr(attn, "gate", None) is None


def drop_span(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(B, N, D) -> (B, N - (end - start), D) without tokens start..end-1."""
    return torch.cat([x[:, :start], x[:, end:]], 1)


def block_without_span(block: Block, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`drop_span(block(x), start, end)`, without computing the dropped tokens' outputs."""
    attn: Attention = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q = torch.cat([q[:, :, :start], q[:, :, end:]], 2)  # (B, heads, N - span, head_dim): kept tokens ask
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # every token, prompts included, answers
    out = out.transpose(1, 2).reshape(batch, q.shape[2], attn.num_heads * attn.head_dim)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    x = drop_span(x, start, end) + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
