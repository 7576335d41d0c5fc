"""CoOp (Zhou et al., IJCV 2022): learned text context in front of each class name; CLIP stays frozen.

The context is class-independent, so a CoOp prompt file classifies into any class names. Only the text side learns:
the image side is the frozen `encode_image`, so CoOp runs on every CLIP whose text tower is an open_clip
transformer, convolutional image towers (ResNet, ConvNeXt, MobileCLIP-S*) included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from promptune.backbones import Backbone
from promptune.data import prompt_name
from promptune.errors import MethodError
from promptune.methods.base import PromptMethod
from promptune.methods.clip_common import clip_logits
from promptune.methods.clip_text import ClipTextRunner, context_prompts
from promptune.methods.zeroshot import DEFAULT_TEMPLATE


@dataclass
class CoOpConfig:
    n_ctx: int | None = None  # learned context tokens in front of the class name (None: 16, or the --ctx-init phrase's)
    ctx_init: str = ""  # start the context from this phrase (e.g. "a photo of a"); sets n_ctx to its token count


DEFAULT_N_CTX = 16


class ClassPrompts(nn.Module):
    """Tokenised 'X .. X {name}.' prompts for the current class list; class-dependent, so never saved.

    The context occupies positions start..start+n_ctx-1 (start = 1 after a start token, 0 without one). `length` is
    how many positions the text tower runs for these prompts (at least `min_length`), worked out once here: reading it
    from the tokens in every forward would make each training step wait for the device.
    """

    def __init__(self, runner: ClipTextRunner, names: list[str], n_ctx: int, min_length: int = 0) -> None:
        super().__init__()
        tokens = runner.tokenize(context_prompts([prompt_name(n) for n in names], n_ctx))
        runner.check_placeholders(tokens, n_ctx)
        self.start = runner.content_start
        self.n_ctx = n_ctx
        self.length = runner.needed_length(tokens, min_length)
        self.register_buffer("tokens", tokens, persistent=False)  # (C, context_length)
        with torch.no_grad():
            self.register_buffer("embeddings", runner.embed(tokens), persistent=False)  # (C, context_length, D)

    def with_context(self, ctx: torch.Tensor) -> torch.Tensor:
        """The prompt embeddings (C, context_length, D) with the context slots replaced by ctx (n_ctx, D)."""
        emb = self.embeddings
        ctx = ctx.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
        return torch.cat([emb[:, : self.start], ctx, emb[:, self.start + self.n_ctx :]], dim=1)


class ClipPromptMethod(PromptMethod):
    """Shared CLIP plumbing: frozen image/text towers, class prompts, cached text features at eval."""

    open_vocabulary = True

    def __init__(self, backbone: Backbone, class_names: list[str], config, n_ctx: int) -> None:
        super().__init__(backbone, class_names, config)
        self.clip = backbone.model
        self.text = ClipTextRunner(backbone.model, backbone.tokenizer)
        self.n_ctx = n_ctx
        self.prompts = ClassPrompts(self.text, self.class_names, n_ctx, self.min_text_length())
        self._text_cache: torch.Tensor | None = None

    def min_text_length(self) -> int:
        """The fewest text positions the prompted text tower runs (what the method reads beyond the class names)."""
        return 0

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CLIP's own logits (scale·cos + bias where the model has one) of normalised features: (B, C)."""
        return clip_logits(self.clip, image, text)

    def zero_shot_templates(self) -> list[str]:
        """The hand-crafted templates of the zero-shot baseline that `eval` reports next to this method."""
        return [DEFAULT_TEMPLATE]

    def set_classes(self, class_names: list[str]) -> None:
        super().set_classes(class_names)
        device = self.prompts.tokens.device
        self.prompts = ClassPrompts(self.text, self.class_names, self.n_ctx, self.min_text_length()).to(device)
        self._text_cache = None

    def overlong_class_names(self) -> list[str]:
        texts = context_prompts([prompt_name(n) for n in self.class_names], self.n_ctx)
        return [name for name, cut in zip(self.class_names, self.text.overlong(texts)) if cut]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Also checkpoints the text tower's blocks (run by `self.text`, which is not a PromptMethod)."""
        super().set_grad_checkpointing(enabled)
        self.text.grad_checkpointing = self.grad_checkpointing

    def train(self, mode: bool = True) -> "ClipPromptMethod":
        self._text_cache = None
        return super().train(mode)

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in self.learned_state().items():
            value.copy_(tensors[name])
        self._text_cache = None

    def compute_text_features(self) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self) -> torch.Tensor:
        """(C, E) normalised; computed once per class list while not training."""
        if self.training or torch.is_grad_enabled():
            return self.compute_text_features()
        if self._text_cache is None:
            self._text_cache = self.compute_text_features()
        return self._text_cache

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.clip.encode_image(images), dim=-1)


class CoOp(ClipPromptMethod):
    name = "coop"
    Config = CoOpConfig

    def __init__(self, backbone: Backbone, class_names: list[str], config: CoOpConfig) -> None:
        runner = ClipTextRunner(backbone.model, backbone.tokenizer)
        init = self._phrase_embedding(runner, config.ctx_init) if config.ctx_init else None
        if init is not None:
            if not 1 <= init.shape[0] <= 64:
                raise MethodError(f"--ctx-init must be 1 to 64 tokens long, got {init.shape[0]}.")
            if config.n_ctx not in (None, init.shape[0]):
                raise MethodError(
                    f"--n-ctx {config.n_ctx} does not match --ctx-init '{config.ctx_init}', which is {init.shape[0]} "
                    f"tokens long; drop --n-ctx (the phrase sets the number of context tokens)."
                )
            config = CoOpConfig(n_ctx=init.shape[0], ctx_init=config.ctx_init)
        elif config.n_ctx is None:
            config = CoOpConfig(n_ctx=DEFAULT_N_CTX)  # what the prompt file records
        super().__init__(backbone, class_names, config, config.n_ctx)
        ctx = init if init is not None else torch.randn(config.n_ctx, runner.width) * 0.02
        self.ctx = nn.Parameter(ctx.clone())  # (n_ctx, D)

    @classmethod
    def validate_config(cls, config: CoOpConfig, error: type[Exception]) -> None:
        if not isinstance(config.ctx_init, str):
            raise error(f"--ctx-init must be a phrase, got {config.ctx_init!r}.")
        if config.ctx_init and not config.ctx_init.strip():
            raise error("--ctx-init is blank; give a phrase such as 'a photo of a'.")
        if config.n_ctx is None:
            return
        if isinstance(config.n_ctx, bool) or not isinstance(config.n_ctx, int):
            raise error(f"--n-ctx must be a whole number, got {config.n_ctx!r}.")
        if not config.ctx_init and not 1 <= config.n_ctx <= 64:
            raise error(f"--n-ctx must be between 1 and 64, got {config.n_ctx}.")

    @staticmethod
    def _phrase_embedding(runner: ClipTextRunner, phrase: str) -> torch.Tensor:
        """The embeddings of the phrase's own tokens (n, D): 'X X X X {name}.' then reads as '{phrase} {name}.'."""
        tokens = runner.tokenize([phrase])
        start, n = runner.content_start, runner.phrase_length(phrase)
        with torch.no_grad():
            return runner.embed(tokens)[0, start : start + n].float().cpu()

    def compute_text_features(self) -> torch.Tensor:
        prompts = self.prompts
        return F.normalize(self.text(prompts.with_context(self.ctx), prompts.tokens, length=prompts.length), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.frozen_image_features(images), self.text_features())

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx}
