"""CLIP image towers opened up for prompt tokens appended after the image's own tokens: one adapter per tower kind.

- `OpenClipViT`: open_clip's own VisionTransformer (OpenAI and LAION ViTs, CLIPA, CoCa's attention-pooled tower).
- `TimmViT`: an open_clip `TimmModel` over timm's VisionTransformer (SigLIP, SigLIP2, MobileCLIP-B, MobileCLIP2-L).
- `TimmEva`: a `TimmModel` over timm's Eva (EVA02-CLIP, PE-Core), whose rotary embedding covers the patch tokens.

Every adapter runs the same steps: the image's tokens with their positional embedding (class/register tokens, then
patches) -> prompts appended -> the tower's pre-norm -> its blocks, with a hook before each -> prompts dropped -> the
tower's own pooling, norms and projection. Dropping the prompts before the pooling keeps them out of token, average
and attention pooling exactly as the tower pools its own tokens. Prompts get no positional embedding (as in the
authors' SEP); on rotary towers they get the identity rotation (angle 0), so rotary positions apply to image tokens
only. Towers that take no extra tokens (ResNet, ConvNeXt, FastViT/MobileCLIP-S*, Swin, relative-position ViTs) are
refused with one sentence.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from promptune.errors import MethodError
from promptune.methods.base import run_block
from promptune.methods.clip_common import call_resblock
from promptune.methods.rotary import with_identity_rotations

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]  # (block index, x (B, T + P, D)) -> x, called before the block
BlockCall = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (block, x) -> x


class PromptableImageTower(nn.Module):
    """A frozen CLIP image tower that runs with P prompt tokens appended after its T image tokens.

    Subclasses set `blocks`, `width` and `image_tokens` and implement the four steps below.
    """

    blocks: nn.Module  # the transformer blocks, in order
    width: int  # token width D
    image_tokens: int  # T: class/register tokens + patch tokens

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> tokens with positional embedding, before the pre-norm (B, T, D), and rotary table or None."""
        raise NotImplementedError

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_call(self, rope: torch.Tensor | None, prompts: int, attn_mask: torch.Tensor | None) -> BlockCall:
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Final image tokens (B, T, D) -> projected image features (B, E), unnormalised."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None, hook: LayerHook | None = None,
                checkpointed: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image features (B, E) with prompts (P, D) appended; without prompts this is the tower's own forward.

        attn_mask: an optional additive (T + P, T + P) mask over image and prompt tokens (the tests mask the prompts
        out of the image tokens' attention to show that the prompts are the only change to the frozen tower).
        """
        x, rope = self.embed(images)
        count = x.shape[1]
        if prompts is not None:
            x = torch.cat([x, prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = self.pre_norm(x)
        call = self.block_call(rope, x.shape[1] - count, attn_mask)

        def segment(x: torch.Tensor, index: int, block: nn.Module) -> torch.Tensor:
            if hook is not None:
                x = hook(index, x)
            return call(block, x)

        for index, block in enumerate(self.blocks):
            x = run_block(checkpointed, segment, x, index, block)
        return self.pool(x[:, :count])


class OpenClipViT(PromptableImageTower):
    """open_clip.transformer.VisionTransformer: class token + patches; pools through its own `_pool` and `proj`."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__(visual)
        self.blocks = visual.transformer.resblocks
        self.width = int(visual.transformer.width)
        self.image_tokens = int(visual.positional_embedding.shape[0])

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, D, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid², D)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.patch_dropout(x), None

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_pre(x)

    def block_call(self, rope: None, prompts: int, attn_mask: torch.Tensor | None) -> BlockCall:
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        return lambda block, x: call_resblock(block, x, attn_mask, batch_first)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


class TimmViT(PromptableImageTower):
    """open_clip TimmModel over a timm VisionTransformer: `forward_features` step by step, then its head."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__(visual)
        trunk = visual.trunk
        self.blocks = trunk.blocks
        self.width = int(trunk.embed_dim)
        self.image_tokens = int(trunk.patch_embed.num_patches) + int(trunk.num_prefix_tokens)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        trunk = self.visual.trunk
        x = trunk._pos_embed(trunk.patch_embed(images))  # class/register tokens first, positional embedding added
        return trunk.patch_drop(x), None

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.trunk.norm_pre(x)

    def block_call(self, rope: None, prompts: int, attn_mask: torch.Tensor | None) -> BlockCall:
        if attn_mask is None:
            return lambda block, x: block(x)
        return lambda block, x: block(x, attn_mask=attn_mask)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        return self.visual.head(trunk.forward_head(trunk.norm(x)))  # timm's pooling (token/avg/map), open_clip's head


class TimmEva(TimmViT):
    """open_clip TimmModel over a timm Eva; the rotary table gets identity rows for the prompts."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__(visual)
        from timm.layers import RotaryEmbeddingCat

        rope = getattr(visual.trunk, "rope", None)
        mixed = getattr(visual.trunk, "rope_mixed", False)  # one table per block
        if rope is not None and (not isinstance(rope, RotaryEmbeddingCat) or mixed):
            raise MethodError(
                f"This CLIP's Eva image tower uses a {type(rope).__name__} rotary embedding; SEP supports Eva towers "
                f"with timm's RotaryEmbeddingCat (EVA02, PE-Core) or none; use --method coop with this one."
            )

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        trunk = self.visual.trunk
        return trunk._pos_embed(trunk.patch_embed(images))  # tokens (B, T, D), rotary table (patches, 2·head_dim)

    def block_call(self, rope: torch.Tensor | None, prompts: int, attn_mask: torch.Tensor | None) -> BlockCall:
        rope = with_identity_rotations(rope, prompts, first=False) if rope is not None else None
        return lambda block, x: block(x, rope=rope, attn_mask=attn_mask)



def image_tower(model: nn.Module) -> PromptableImageTower:
    """The adapter for this CLIP's image tower, or one sentence saying why prompts cannot go in and what works."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if isinstance(visual, OpenClipVisionTransformer):
        return OpenClipViT(visual)
    if isinstance(visual, TimmModel) and isinstance(visual.trunk, Eva):
        return TimmEva(visual)
    if isinstance(visual, TimmModel) and isinstance(visual.trunk, VisionTransformer):
        return TimmViT(visual)
    kind = f"timm {type(visual.trunk).__name__}" if isinstance(visual, TimmModel) else type(visual).__name__
    raise MethodError(
        f"SEP appends prompt tokens to a ViT's token sequence, but this CLIP's image tower is a {kind}, which takes "
        f"no extra tokens; SEP runs on ViT towers (open_clip ViTs, SigLIP, EVA02, PE-Core, MobileCLIP-B), and "
        f"--method coop (learned text context) works with this one."
    )
