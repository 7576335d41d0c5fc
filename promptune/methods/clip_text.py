"""Run an open_clip text tower block by block, on only as many positions as the class prompts need.

With the causal mask, positions after a prompt's EOT cannot change anything before it, so running the tower on the
first `L = max(EOT position + 1, positions the method reads)` tokens gives the same features as all 77 positions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from promptune.errors import MethodError
from promptune.methods.base import run_block
from promptune.methods.clip_blocks import resblock_forward

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]  # (block index, x (N, L, D)) -> x, called before the block


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/transformer/ln_final (the CLIP itself, or `.text` for CustomTextCLIP)."""
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if tower is None or not all(hasattr(tower, n) for n in needed) or not hasattr(tower.transformer, "resblocks"):
        raise MethodError("This CLIP's text tower is not an open_clip text transformer; text prompts need one.")
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool not in ("argmax", "eos"):
        raise MethodError(f"This CLIP pools its text at '{pool}'; prompt methods support EOT pooling ('argmax'/'eos') only.")
    return tower


class ClipTextRunner(nn.Module):
    """Frozen text tower with a per-layer hook seam and exact length trimming.

    With `grad_checkpointing` set (the owning method's `set_grad_checkpointing` sets it), a training-mode forward with
    autograd on checkpoints each block together with the hook that runs before it.
    """

    grad_checkpointing: bool = False

    def __init__(self, model: nn.Module, tokenizer: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.tower = text_tower(model)
        self.tokenizer = tokenizer
        self.width = int(self.tower.transformer.width)
        self.context_length = int(self.tower.positional_embedding.shape[0])
        self.eos_id = getattr(self.tower, "text_eos_id", None)
        self.pool = getattr(self.tower, "text_pool_type", getattr(self.tower, "pool_type", "argmax"))

    @property
    def layers(self) -> int:
        return len(self.tower.transformer.resblocks)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        device = self.tower.positional_embedding.device
        return self.tokenizer(texts).to(device)  # (N, context_length)

    def overlong(self, texts: list[str]) -> list[bool]:
        """Per text: does it need more tokens than the context holds (so `tokenize` cuts it short)?"""
        try:
            tokens = self.tokenizer(texts, context_length=4 * self.context_length)
        except TypeError:  # a tokenizer without a context_length argument: nothing to tell
            return [False] * len(texts)
        return (self.eot_positions(tokens) >= self.context_length).tolist()

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool == "eos" and self.eos_id is not None:
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def needed_length(self, tokens: torch.Tensor, min_length: int = 0) -> int:
        return min(self.context_length, max(int(self.eot_positions(tokens).max()) + 1, min_length))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.token_embedding(tokens)  # (N, context_length, D)

    def causal_mask(self, length: int) -> torch.Tensor | None:
        mask = getattr(self.tower, "attn_mask", None)
        return None if mask is None else mask[:length, :length]

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, hook: LayerHook | None = None, length: int | None = None) -> torch.Tensor:
        """Token embeddings (N, ≥L, D) -> projected EOT features (N, E), unnormalised."""
        length = length or self.needed_length(tokens)
        x = x[:, :length] + self.tower.positional_embedding[:length].to(x.dtype)
        mask = self.causal_mask(length)
        transformer = self.tower.transformer
        batch_first = getattr(transformer, "batch_first", True)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()

        def segment(x: torch.Tensor, index: int, block: nn.Module) -> torch.Tensor:
            if hook is not None:
                x = hook(index, x)
            return resblock_forward(block, x, mask, batch_first)

        for index, block in enumerate(transformer.resblocks):
            x = run_block(checkpointed, segment, x, index, block)
        x = self.tower.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(tokens)]
        projection = self.tower.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    @torch.no_grad()
    def encode_texts(self, texts: list[str], chunk: int = 256) -> torch.Tensor:
        """Normalised frozen features of plain texts (templates, zero-shot prompts): (N, E)."""
        features = []
        for start in range(0, len(texts), chunk):
            tokens = self.tokenize(texts[start : start + chunk])
            features.append(self(self.embed(tokens), tokens))
        return F.normalize(torch.cat(features), dim=-1)


def context_prompts(names: list[str], n_ctx: int) -> list[str]:
    """'X X X ... X {name}.': the placeholder words are replaced by learned context vectors."""
    placeholder = " ".join(["X"] * n_ctx)
    return [f"{placeholder} {name}." if n_ctx else f"{name}." for name in names]
