"""Run an open_clip text tower block by block: learned context spliced in, features equal to `encode_text`.

Accepted layouts (open_clip's `TextTransformer`, also when unpacked onto `open_clip.CLIP`):

- causal mask, feature read at the end-of-text token ('argmax': OpenAI CLIP, EVA02, PE-Core, MobileCLIP-B; 'eos':
  the worldwide CLIPs). Positions after the last EOT never reach it, so the tower runs on the first
  L = max(last EOT + 1, positions the method reads) tokens only and gives the same features as the whole context.
- CoCa: a class token appended after the context, attending causally to the text with the padding masked out.
  Trimmed the same way; the class token keeps its own positional embedding (the last one) and its padding mask.
- no causal mask ('argmax': MobileCLIP-S*, MobileCLIP2; 'last': SigLIP, SigLIP2, CLIPA). Every position, padding
  included, reaches the feature, so the tower always runs on the whole context exactly as the tokenizer wrote it.

Hugging Face text towers (RoBERTa, XLM-R, mT5, NLLB) are refused: they are not open_clip transformers.
Where the tokens go is read off the tokenizer itself (`content_start`): 1 after a start token (CLIP's BPE, BERT),
0 for tokenizers without one (SigLIP's SentencePiece), so learned context lands where the placeholder words were.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptune.data import prompt_name
from promptune.errors import MethodError
from promptune.methods.base import run_block
from promptune.methods.clip_common import call_resblock

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]  # (block index, x (N, L, D)) -> x, called before the block
POOLS = ("argmax", "eos", "last", "cls")  # "cls": CoCa's appended class token
PLACEHOLDER = "X"


def _pool_type(tower: nn.Module) -> str:
    if getattr(tower, "cls_emb", None) is not None:
        return "cls"  # open_clip reads CoCa's appended class token whatever pool_type says
    return str(getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax")))


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/transformer/ln_final (the CLIP itself, or `.text` for CustomTextCLIP/CoCa)."""
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if tower is None or not all(hasattr(tower, n) for n in needed) or not hasattr(tower.transformer, "resblocks"):
        kind = type(getattr(model, "text", None)).__name__
        raise MethodError(
            f"This CLIP's text tower is a {kind}, not an open_clip text transformer; the CLIP methods (sep, coop) "
            f"need one (Hugging Face text towers such as RoBERTa, mT5 or NLLB are not supported)."
        )
    pool = _pool_type(tower)
    if pool not in POOLS:
        raise MethodError(f"This CLIP pools its text at '{pool}'; the CLIP methods support 'argmax', 'eos' and 'last'.")
    return tower


class ClipTextRunner(nn.Module):
    """Frozen text tower with a per-layer hook seam, trimmed to the needed length only where that is exact.

    With `grad_checkpointing` set (the owning method's `set_grad_checkpointing` sets it), a training-mode forward with
    autograd on checkpoints each block together with the hook that runs before it.
    """

    grad_checkpointing: bool = False

    def __init__(self, model: nn.Module, tokenizer: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.tower = text_tower(model)
        self.tokenizer = tokenizer
        tower = self.tower
        self.width = int(tower.transformer.width)
        self.context_length = int(getattr(tower, "context_length", tower.positional_embedding.shape[0]))
        self.pool = _pool_type(tower)
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.pad_id = int(getattr(tower, "pad_id", 0))
        causal = getattr(tower, "attn_mask", None) is not None
        self.trims = causal and self.pool in ("argmax", "eos", "cls")  # exact only under a causal mask
        self.masks_padding = self.pool == "cls" or bool(getattr(tower, "use_pad_mask", False))
        empty, word = tokenizer(["", PLACEHOLDER])  # (context_length,) each: where does content start and end?
        differs = torch.nonzero(empty != word).flatten()
        self.content_start = int(differs[0]) if len(differs) else 0
        self.placeholder_id = int(word[self.content_start])
        self.end_id = int(word[self.content_start + 1])  # what follows the last content token: EOT / EOS / padding

    @property
    def layers(self) -> int:
        return len(self.tower.transformer.resblocks)

    # ----- tokens ----------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        device = self.tower.positional_embedding.device
        return self.tokenizer(texts).to(device)  # (N, context_length)

    def text_end(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per row, the position right after the last content token (where EOT/EOS or the padding starts): (N,)."""
        after = tokens[:, self.content_start :] == self.end_id
        return self.content_start + after.int().argmax(dim=-1)

    def overlong(self, texts: list[str]) -> list[bool]:
        """Per text: does it need more tokens than the context holds (so `tokenize` cuts it short)?"""
        try:
            tokens = self.tokenizer(texts, context_length=4 * self.context_length)
        except TypeError:  # a tokenizer without a context_length argument: nothing to tell
            return [False] * len(texts)
        return (self.text_end(tokens) >= self.context_length).tolist()

    def check_placeholders(self, tokens: torch.Tensor, n_ctx: int) -> None:
        """The n_ctx placeholder words must sit, one token each, at content_start of every prompt."""
        span = tokens[:, self.content_start : self.content_start + n_ctx]
        if span.shape[1] != n_ctx or not bool((span == self.placeholder_id).all()):
            raise MethodError(
                f"{n_ctx} context tokens do not fit this CLIP's {self.context_length}-token text context (or its "
                f"tokenizer merges the placeholder words), so learned context cannot be placed; use a smaller --n-ctx."
            )

    def phrase_length(self, phrase: str) -> int:
        """How many tokens the phrase's own words take (start/end tokens and padding not counted)."""
        return int(self.text_end(self.tokenizer([phrase]))[0]) - self.content_start

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.token_embedding(tokens)  # (N, context_length, D)

    # ----- the tower -------------------------------------------------------------------------------------------------
    def needed_length(self, tokens: torch.Tensor, min_length: int = 0) -> int:
        """Positions to run (the whole context where trimming is inexact)."""
        if not self.trims:
            return self.context_length
        if self.pool == "cls":
            # CoCa's legacy padding mask is shifted one position right, so the class token can see one position past
            # the last real token; keeping that one too stays exact under either mask convention.
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            last = int(((tokens != self.pad_id) * positions).max()) + 2
        else:
            last = int(self._pooled_positions(tokens, self.context_length).max()) + 1
        return min(self.context_length, max(last, min_length))

    def _pooled_positions(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Per row, the position whose final state is the text feature: (N,), in a sequence of `length` positions."""
        if self.pool == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return torch.full((tokens.shape[0],), length - 1, dtype=torch.long, device=tokens.device)  # last / cls

    def _attention_mask(self, tokens: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """open_clip's text mask restricted to `positions`: causal (L, L), plus the padding mask (N·heads, L, L)."""
        causal = getattr(self.tower, "attn_mask", None)
        mask = None if causal is None else causal[positions][:, positions]
        if not self.masks_padding:
            return mask
        valid = tokens != self.pad_id  # (N, context_length)
        if self.pool == "cls":
            always = torch.ones_like(valid[:, :1])
            legacy = not getattr(self.tower, "correct_cls_mask", False)  # open_clip's CoCa weights use the legacy order
            valid = torch.cat([always, valid] if legacy else [valid, always], dim=1)  # (N, context_length + 1)
        keys = valid[:, positions]  # (N, L)
        padding = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, float("-inf"))
        padding = padding.unsqueeze(1).expand(-1, len(positions), -1).repeat_interleave(self.tower.heads, 0)
        return padding if mask is None else mask.to(dtype).unsqueeze(0) + padding

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        projection = getattr(self.tower, "text_projection", None)
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, hook: LayerHook | None = None,
                length: int | None = None) -> torch.Tensor:
        """Token embeddings (N, context_length, D) -> projected text features (N, E), unnormalised.

        `length` overrides the trimmed length where trimming is exact; elsewhere the whole context always runs.
        """
        length = (length or self.needed_length(tokens)) if self.trims else self.context_length
        positions = torch.arange(length, device=x.device)
        x = x[:, :length]
        if self.pool == "cls":
            cls = self.tower.cls_emb.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
            x = torch.cat([x, cls], dim=1)
            positions = torch.cat([positions, positions.new_tensor([self.context_length])])
        x = x + self.tower.positional_embedding[positions].to(x.dtype)
        mask = self._attention_mask(tokens, positions, x.dtype)
        transformer = self.tower.transformer
        batch_first = getattr(transformer, "batch_first", True)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()

        def segment(x: torch.Tensor, index: int, block: nn.Module) -> torch.Tensor:
            if hook is not None:
                x = hook(index, x)
            return call_resblock(block, x, mask, batch_first)

        for index, block in enumerate(transformer.resblocks):
            x = run_block(checkpointed, segment, x, index, block)
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = self.tower.ln_final(x[rows, self._pooled_positions(tokens, x.shape[1])])  # LN is per position
        return self._project(pooled)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], chunk: int = 256) -> torch.Tensor:
        """Normalised frozen features of plain texts: (N, E)."""
        features = []
        for start in range(0, len(texts), chunk):
            tokens = self.tokenize(texts[start : start + chunk])
            features.append(self(self.embed(tokens), tokens))
        return F.normalize(torch.cat(features), dim=-1)

    @torch.no_grad()
    def encode_templates(self, templates: Sequence[str], names: Sequence[str]) -> torch.Tensor:
        """Per class, its normalised features under each template, averaged and renormalised: (C, E)."""
        per_template = [self.encode_texts([t.format(prompt_name(n)) for n in names]) for t in templates]
        return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)


def context_prompts(names: list[str], n_ctx: int) -> list[str]:
    """'X X X ... X {name}.': the placeholder words are replaced by learned context vectors."""
    placeholder = " ".join([PLACEHOLDER] * n_ctx)
    return [f"{placeholder} {name}." if n_ctx else f"{name}." for name in names]
