"""open_clip pieces every CLIP method shares: one residual-block call, and CLIP's classification logits."""

from __future__ import annotations

import torch
from torch import nn


def call_resblock(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """One open_clip residual attention block on batch-first tokens x (N, L, D), whatever the transformer's layout.

    open_clip's `Transformer` transposes to (L, N, D) itself when built with batch_first=False; promptune iterates the
    blocks one by one (to fuse or replace prompts between them), so it does the same here.
    """
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
