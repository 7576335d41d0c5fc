"""SPT (Self-Prompt Tuning) and VPT: visual prompt tokens around a frozen timm ViT, plus a linear head.

Both methods share one model. P prompt tokens are inserted after the prefix tokens (CLS and register tokens) and
before the patch tokens, after the positional embedding, with no position of their own (no rotary position either on
EVA-style backbones). In the deep variant the prompt positions are replaced by a fresh set before every block. The
prompts never enter the pooling. `vit_blocks` adapts each timm ViT class to this. The methods differ only in how the
prompts start:

- VPT (Jia et al., ECCV 2022): uniform noise U(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + D)).
- SPT (Wang et al., ICML 2024): "token prototypes" of the training images, from the frozen prompt-free backbone. As in
  the authors' code, layer-0 (and shallow) prompts start at patch embeddings without positional embedding (prompts
  get none), and the layer-i prompts (i >= 1) at the patch tokens entering block i. They are sampled at random, taken
  from mean/max-pooled runs of tokens, or found as k-means centres.

The authors stack every training image into one batch to collect those tokens (many GB for a few thousand images).
Here collection streams over the loader instead. Each layer feeds a seeded reservoir (`TokenReservoir`), so memory
stays bounded by a token budget whatever the number of images.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import nn

from promptune.backbones import Backbone
from promptune.errors import MethodError
from promptune.methods.base import PromptMethod, run_block
from promptune.methods.registry import DEPTHS, SPT_INITS
from promptune.methods.vit_blocks import POOLS, block_with_shared_prompts, drop_span, vit_layout
from promptune.runtime import Runtime

DEFAULT_PROMPTS = {"deep": 20, "shallow": 100}  # the authors' README defaults
MAX_PROMPTS = 1024  # prompt tokens per layer; attention cost grows with the square of the token count


@dataclasses.dataclass
class SPTConfig:
    depth: str = "deep"  # "deep": a new prompt set before every block; "shallow": prompts enter before block 0 only
    prompts_per_layer: int | None = None  # P prompt tokens per layer; None = 20 deep / 100 shallow; 0 = linear probe
    init: str = "random"  # prototype init: "random" tokens, "mean"/"max" pooled token runs, or "kmeans" centres
    init_images: int | None = None  # seeded sample of training images used for the init; None = all of them
    pool_window: int | None = None  # "mean"/"max" init: tokens per window; None = P windows per image (`window_index`)
    kmeans_iters: int = 20  # Lloyd iterations for "kmeans" init
    reservoir_size: int = 16384  # token budget per layer held while collecting (the "kmeans" sample size)
    head_weight_decay: float = 1.0  # AdamW decay on the head weight (the authors use a large 0.5-3.0)
    prompt_weight_decay: float = 1e-2  # AdamW decay on the prompt tokens
    pool: str | None = None  # the head's pooling: token | avg | max | avgmax | map | prr; None = the backbone's own


@dataclasses.dataclass
class VPTConfig:
    depth: str = "deep"  # "deep": a new prompt set before every block; "shallow": prompts enter before block 0 only
    prompts_per_layer: int | None = None  # P prompt tokens per layer; None = 20 deep / 100 shallow; 0 = linear probe
    init: str = "xavier"  # VPT always starts from uniform noise U(-v, v); the only accepted value
    head_weight_decay: float = 1.0  # AdamW decay on the head weight
    prompt_weight_decay: float = 1e-2  # AdamW decay on the prompt tokens
    pool: str | None = None  # the head's pooling: token | avg | max | avgmax | map | prr; None = the backbone's own


# ------------------------------------------------------------------------------------------------ token collection


class TokenReservoir:
    """A seeded, uniform sample without replacement of at most `budget` token vectors from a stream.

    This is Algorithm R, vectorised per `add` call. The first `budget` tokens fill the store. Token t (0-based) then
    replaces slot j, with j drawn uniformly from [0, t], when j < budget. One random draw is made per token beyond
    the fill, in stream order, so the sample depends on the seed and the token order but not on how the stream is
    cut into batches. Storage is one float32 tensor on the first tokens' device. It grows with the stream and never
    exceeds (budget, D).
    """

    def __init__(self, budget: int, seed: int) -> None:
        if budget < 1:
            raise ValueError(f"a token reservoir needs a budget of at least 1, not {budget}")
        self.budget = int(budget)
        self.seen = 0
        self._store: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def max_held(self) -> int:
        """The most token vectors this reservoir ever stores."""
        return self.budget

    @property
    def held(self) -> int:
        return min(self.seen, self.budget)

    @property
    def nbytes(self) -> int:
        """Bytes of token storage allocated now (at most budget x D x 4)."""
        return 0 if self._store is None else self._store.numel() * self._store.element_size()

    def _reserve(self, rows: int, tokens: torch.Tensor) -> None:
        """Grow the store (doubling, at most `budget` rows) so it holds `rows` tokens; small streams stay small."""
        have = 0 if self._store is None else self._store.shape[0]
        if rows <= have:
            return
        capacity = min(self.budget, max(rows, 2 * have))
        grown = torch.empty(capacity, tokens.shape[1], dtype=torch.float32, device=tokens.device)
        if self._store is not None:
            grown[: self.seen] = self._store[: self.seen]
        self._store = grown

    def add(self, tokens: torch.Tensor) -> None:
        """Offer (M, D) token vectors, in stream order."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (M, D), not {tuple(tokens.shape)}")
        count = tokens.shape[0]
        if count == 0:
            return
        fill = max(0, min(count, self.budget - self.seen))
        self._reserve(self.seen + fill, tokens)
        if fill:
            self._store[self.seen : self.seen + fill] = tokens[:fill].float()
        rest = count - fill
        if rest > 0:
            position = torch.arange(rest, dtype=torch.float64) + (self.seen + fill)
            draw = torch.rand(rest, generator=self._generator, dtype=torch.float64)
            slot = torch.floor(draw * (position + 1)).long()  # uniform over 0..position
            keep = slot < self.budget
            if bool(keep.any()):
                source = torch.nonzero(keep).squeeze(1) + fill
                # Sequentially a later token overwrites an earlier one in the same slot: keep the last per slot.
                last = torch.full((self.budget,), -1, dtype=torch.long)
                last.scatter_reduce_(0, slot[keep], source, reduce="amax")
                hit = torch.nonzero(last >= 0).squeeze(1)
                self._store[hit.to(self._store.device)] = tokens[last[hit].to(tokens.device)].float()
        self.seen += count

    def tokens(self) -> torch.Tensor:
        """The (held, D) sample; empty before any token arrived."""
        if self._store is None:
            return torch.empty(0, 0)
        return self._store[: self.held]


def window_index(length: int, count: int | None = None, window: int | None = None) -> torch.Tensor:
    """(length,) window number of each token: contiguous 1-D runs along the flattened sequence (raster order).

    With `window`, runs of `window` tokens, the last one shorter when `length` is not a multiple. Otherwise `count`
    near-equal runs (at most one per token): token t goes to run floor(t * count / length), so runs differ by at most
    one token and every token is in exactly one run. With count = P this is the authors' number of windows per image
    (P, e.g. 9 or 10 tokens each for P = 20 on 196) without the two flaws of their formula (windows of
    N // (P - 1), then the last N mod that many tokens): an exact division (P = 5, 8, 50 on 196) makes that last
    window the whole sequence, and where N // window > P - 1 (P = 30) the tokens between are never pooled.
    """
    positions = torch.arange(length)
    if window is not None:
        return positions // window
    runs = min(int(count), length)
    return positions * runs // length


def pool_windows(tokens: torch.Tensor, mode: str, count: int | None = None, window: int | None = None) -> torch.Tensor:
    """(B, N, D) -> (B, windows, D): mean or max over each image's runs of `window_index(N, count, window)`."""
    batch, length, dim = tokens.shape
    index = window_index(length, count, window).to(tokens.device)
    runs = int(index[-1]) + 1
    if mode == "mean":
        sums = tokens.new_zeros(batch, runs, dim).index_add_(1, index, tokens)
        return sums / torch.bincount(index, minlength=runs).to(tokens.dtype).unsqueeze(1)
    lowest = tokens.new_full((batch, runs, dim), float("-inf"))
    return lowest.scatter_reduce_(1, index.view(1, length, 1).expand(batch, length, dim), tokens, reduce="amax")


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k centres of (N, D) points: Lloyd iterations from k distinct random points; an empty cluster keeps its centre."""
    start = torch.randperm(points.shape[0], generator=generator)[:k].to(points.device)
    centres = points[start].clone()
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled].unsqueeze(1).to(points.dtype)
    return centres


def _batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a `promptune.data.Batch`, an (images, labels, ...) tuple, or a bare tensor."""
    if isinstance(batch, torch.Tensor):
        return batch
    if hasattr(batch, "images"):
        return batch.images
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise MethodError(f"SPT's prototype init cannot read images from a {type(batch).__name__} batch.")


def _layer_seed(seed: int, layer: int, stream: int) -> int:
    return (int(seed) * 1_000_003 + layer * 7919 + stream) % (2**62)


# ------------------------------------------------------------------------------------------------------- the model


class SPT(PromptMethod):
    """Self-Prompt Tuning: prompts start at the training data's own token prototypes, then train with a linear head.

    Defaults: AdamW, peak lr 1e-3 (the authors' value for supervised ViT-B), a linear warm-up over 3 of 30 epochs
    (the authors warm up 10 of 100; 30 is enough for the small folders promptune targets), batch 32, and all images.
    Weight decay is per group and set by the config: prompt tokens `prompt_weight_decay` (1e-2, as the authors),
    head weight `head_weight_decay` (1.0, within the authors' 0.5-3.0), head bias none. The trainer's global weight
    decay is ignored, because the method's own per-group values are part of the recipe.
    """

    name: ClassVar[str] = "spt"
    open_vocabulary: ClassVar[bool] = False
    Config: ClassVar[type] = SPTConfig
    init_choices: ClassVar[tuple[str, ...]] = SPT_INITS

    def __init__(self, backbone: Backbone, class_names: list[str], config: Any = None) -> None:
        super().__init__(backbone, class_names, config if config is not None else self.Config())
        self.validate_config(self.config, MethodError)
        model = backbone.model
        self.layout = vit_layout(model, backbone.name, self.name)
        pool = self.config.pool or self.layout.own_pool
        if not pool:
            raise MethodError(
                f"Backbone '{backbone.name}' has no pooling (global_pool=''); choose one for the head with --pool "
                f"(token, avg, max or avgmax)."
            )
        self.layout.check_pool(pool)
        depth = self.config.depth
        count = DEFAULT_PROMPTS[depth] if self.config.prompts_per_layer is None else int(self.config.prompts_per_layer)
        self.config = dataclasses.replace(self.config, prompts_per_layer=count, pool=pool)

        self.vit = model  # registered, so .to(device) moves it; frozen and in eval mode (PromptMethod.train keeps it so)
        self.num_prefix = self.layout.num_prefix
        self.num_prompts = count
        self.deep = depth == "deep"
        self.num_blocks = len(model.blocks)
        self.skip_prompt_outputs = True  # deep: never compute the outputs the next layer's prompts replace
        width = int(model.embed_dim)
        self.prompts = nn.Parameter(torch.empty(self.num_blocks if self.deep else 1, count, width))
        with torch.no_grad():
            bound = self.xavier_bound()
            self.prompts.uniform_(-bound, bound)  # VPT's init; SPT.prepare replaces it with prototypes
        self.head = nn.Linear(int(getattr(model, "head_hidden_size", width)), len(class_names))
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.head.bias)
        self.init_summary: dict[str, Any] = {}

    # ----- configuration -------------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: Any, error: type[Exception]) -> None:
        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def rate(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

        if config.depth not in DEPTHS:
            raise error(f"--depth must be 'deep' or 'shallow', not {config.depth!r}.")
        if config.pool is not None and config.pool not in POOLS:
            raise error(f"--pool must be one of {', '.join(POOLS)} (or unset for the backbone's own), not {config.pool!r}.")
        count = config.prompts_per_layer
        if count is not None and (not whole(count) or not 0 <= count <= MAX_PROMPTS):
            raise error(
                f"--prompts-per-layer must be a whole number from 0 to {MAX_PROMPTS}, not {count!r}."
            )
        if config.init not in cls.init_choices:
            raise error(f"--init for {cls.name} must be one of {', '.join(cls.init_choices)}, not {config.init!r}.")
        for field in ("head_weight_decay", "prompt_weight_decay"):
            if not rate(getattr(config, field)):
                raise error(f"Method '{cls.name}' {field} must be a number >= 0, not {getattr(config, field)!r}.")
        if not hasattr(config, "reservoir_size"):
            return
        if config.init_images is not None and (not whole(config.init_images) or config.init_images < 1):
            raise error(
                f"--init-images must be a whole number >= 1 (or unset for all images), "
                f"not {config.init_images!r}."
            )
        if config.pool_window is not None and (not whole(config.pool_window) or config.pool_window < 1):
            raise error(
                f"--pool-window must be a whole number of tokens >= 1 (or unset for P windows per image), "
                f"not {config.pool_window!r}."
            )
        for field in ("kmeans_iters", "reservoir_size"):
            value = getattr(config, field)
            if not whole(value) or value < 1:
                raise error(f"Method '{cls.name}' {field} must be a whole number >= 1, not {value!r}.")
        resolved = DEFAULT_PROMPTS[config.depth] if count is None else count
        if config.reservoir_size < resolved:
            raise error(
                f"Method '{cls.name}' reservoir_size ({config.reservoir_size}) must be at least "
                f"prompts_per_layer ({resolved})."
            )

    def xavier_bound(self) -> float:
        """VPT's init bound v = sqrt(6 / (3 * patch_h * patch_w + D))."""
        patch = self.vit.patch_embed.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
        return math.sqrt(6.0 / (3 * patch_h * patch_w + self.vit.embed_dim))

    # ----- forward seams -------------------------------------------------------------------------------------------
    def _with_prompts(self, tokens: torch.Tensor, layer: int, replace: bool) -> torch.Tensor:
        """Put layer `layer`'s prompts right after the prefix tokens (replacing the previous ones when `replace`)."""
        if self.num_prompts == 0:
            return tokens
        prompts = self.prompts[layer].to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        rest = self.num_prefix + (self.num_prompts if replace else 0)
        return torch.cat([tokens[:, : self.num_prefix], prompts, tokens[:, rest:]], 1)

    def _tokens(self, images: torch.Tensor, prompts: int) -> tuple[torch.Tensor, Any]:
        """The frozen backbone's tokens entering block 0 (timm's own order) and what its blocks read besides them."""
        return self.layout.embed(self.layout.patches(images), prompts)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, prefix + P + patches, D): the input of block 0 with the first prompt set inserted."""
        return self._with_prompts(self._tokens(images, self.num_prompts)[0], 0, replace=False)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, prompts included at positions prefix..prefix+P."""
        x, context = self._tokens(images, self.num_prompts)
        x = self._with_prompts(x, 0, replace=False)
        checkpointed = self.num_prompts > 0 and self.checkpointing_active()  # no prompts: nothing in the blocks learns

        def segment(x: torch.Tensor, index: int) -> torch.Tensor:
            if self.deep and index > 0:
                x = self._with_prompts(x, index, replace=True)
            return self.layout.run_block(index, x, context)

        for index in range(self.num_blocks):
            x = run_block(checkpointed, segment, x, index)
        return self.layout.norm(x)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, prefix + patches, D) after the final norm, prompts left out: the tokens the head pools.

        Deep prompts enter before each block and leave after it. Where the block allows (timm's plain `Block`), only
        their keys and values are computed, never their outputs (`vit_blocks.block_with_shared_prompts`); other blocks
        run whole.
        """
        if not self.deep or self.num_prompts == 0:
            return self._without_prompts(self.forward_features(images))
        x, context = self._tokens(images, self.num_prompts)
        checkpointed = self.checkpointing_active()

        def segment(x: torch.Tensor, index: int) -> torch.Tensor:
            if self.skip_prompt_outputs and self.layout.skips_span(index):
                return block_with_shared_prompts(self.layout.blocks[index], x, self.prompts[index].to(x.dtype))
            x = self._with_prompts(x, index, replace=False)
            return drop_span(self.layout.run_block(index, x, context), self.num_prefix, self.num_prefix + self.num_prompts)

        for index in range(self.num_blocks):
            x = run_block(checkpointed, segment, x, index)
        return self.layout.norm(x)

    def _without_prompts(self, features: torch.Tensor) -> torch.Tensor:
        start, end = self.num_prefix, self.num_prefix + self.num_prompts
        return drop_span(features, start, end) if end > start else features

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The image feature the head sees: `--pool` (default the backbone's own) over the tokens without the prompts.

        'token' gives the CLS token after the final norm; 'avg' / 'max' reduce over the patch tokens (no prefix tokens,
        no prompts); 'map' runs the backbone's attention pool; then `fc_norm` where the backbone has one. With P = 0
        this is exactly timm's pre-logits feature. The prompts act only through attention, as in VPT. The authors'
        MAE code also averages the prompts in; then the feature would depend on P and on the prompts' own scale
        instead of the image's tokens.
        """
        return self._pool_image_tokens(self._without_prompts(features))

    def _pool_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + patches, D) -> (B, D) with the configured pooling and the backbone's `fc_norm`."""
        return self.layout.pool(tokens, self.config.pool)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._pool_image_tokens(self.image_tokens(images)))

    # ----- prototype init ------------------------------------------------------------------------------------------
    def _collected_layers(self) -> int:
        return self.num_blocks if self.deep else 1

    def _layer_inputs(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Prompt-free pass: yields, per prompted layer i, the (B, patches, D) tokens layer i's prompts start from.

        Layer 0: the patch embeddings without positional embedding (after `norm_pre` where the backbone has one), as
        the authors take them; prompts get no position. Layer i >= 1: the patch tokens entering block i.
        """
        patches = self.layout.patches(images)
        yield self.layout.patch_prototypes(patches)
        layers = self._collected_layers()
        if layers == 1:
            return
        x, context = self.layout.embed(patches, 0)
        for index in range(layers - 1):
            x = self.layout.run_block(index, x, context)
            yield x[:, self.num_prefix :]

    def collect(self, loader: Iterable, device: torch.device, seed: int, budget: int) -> list[TokenReservoir]:
        """One no-grad, prompt-free pass over the loader, streaming each layer's input tokens into its reservoir."""
        pool_mode = self.config.init if self.config.init in ("mean", "max") else None
        reservoirs = [TokenReservoir(budget, _layer_seed(seed, layer, 1)) for layer in range(self._collected_layers())]
        cap = self.config.init_images  # the run passes `prepare_subset`'s images; any other stream is cut here
        images_used = 0
        with torch.no_grad():
            for batch in loader:
                images = _batch_images(batch)
                if cap is not None:
                    images = images[: cap - images_used]
                if images.shape[0] == 0:
                    if cap is not None and images_used >= cap:
                        break
                    continue
                images = images.to(device, torch.float32, non_blocking=True)
                for reservoir, tokens in zip(reservoirs, self._layer_inputs(images)):
                    if pool_mode is not None:
                        tokens = pool_windows(tokens, pool_mode, self.num_prompts, self.config.pool_window)
                    reservoir.add(tokens.reshape(-1, tokens.shape[-1]))
                images_used += images.shape[0]
                self._prepared(images.shape[0])
                if cap is not None and images_used >= cap:
                    break
        self.init_summary = {
            "init": self.config.init,
            "images": images_used,
            "tokens_seen_per_layer": reservoirs[0].seen,
            "tokens_held_per_layer": reservoirs[0].held,
            "reservoir_bytes": sum(r.nbytes for r in reservoirs),
        }
        return reservoirs

    def prepare_images(self, available: int) -> int:
        if self.num_prompts == 0:
            return 0
        wanted = self.config.init_images
        return available if wanted is None else min(wanted, available)

    def prepare_subset(self, available: int, seed: int) -> list[int] | None:
        """With `init_images` below the number of training images, a seeded sample of them (so no unused image is
        decoded); otherwise all of them."""
        wanted = self.prepare_images(available)
        if wanted in (0, available):
            return None
        generator = torch.Generator().manual_seed(_layer_seed(seed, -1, 0))
        return torch.randperm(available, generator=generator)[:wanted].sort().values.tolist()

    def prepare(self, loader: Iterable, runtime: Runtime, seed: int) -> None:
        """Start every prompt set at token prototypes of the training images (see the module docstring).

        `random` samples P of a layer's tokens uniformly without replacement; `mean`/`max` sample P of the pooled
        windows; `kmeans` clusters a `reservoir_size` sample into P centres. Only `kmeans` needs a large sample; the
        others keep a reservoir of exactly P, which already is a uniform P-subset of the whole stream. The same
        seed and loader order give the same prompts.
        """
        if self.num_prompts == 0:
            return
        device = runtime.device
        self.to(device)  # collect where training will run
        count = self.num_prompts
        budget = self.config.reservoir_size if self.config.init == "kmeans" else count
        reservoirs = self.collect(loader, device, seed, budget)
        held = reservoirs[0].held
        if held < count:
            what = "pooled windows" if self.config.init in ("mean", "max") else "tokens"
            raise MethodError(
                f"SPT needs at least {count} {what} per layer to start {count} prompts, but the "
                f"{self.init_summary['images']} training image(s) gave only {held}; "
                f"lower --prompts-per-layer or use more images."
            )
        initial = []
        for layer, reservoir in enumerate(reservoirs):
            generator = torch.Generator().manual_seed(_layer_seed(seed, layer, 2))
            tokens = reservoir.tokens()
            if self.config.init == "kmeans":
                initial.append(kmeans(tokens, count, self.config.kmeans_iters, generator))
            else:
                pick = torch.randperm(tokens.shape[0], generator=generator)[:count].to(tokens.device)
                initial.append(tokens[pick])
        with torch.no_grad():
            self.prompts.copy_(torch.stack(initial).to(self.prompts.device, self.prompts.dtype))

    # ----- optimisation and the prompt file --------------------------------------------------------------------------
    def has_unused_parameters(self) -> bool:
        return self.num_prompts == 0  # a linear probe: the (empty) prompts play no part in the loss

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Prompts, head weight, head bias, each with the config's own decay; the trainer's global `weight_decay` is
        not used (per-group decay is part of the recipe: a large one on the head, a small one on the prompts)."""
        return [
            {"params": [self.prompts], "weight_decay": float(self.config.prompt_weight_decay)},
            {"params": [self.head.weight], "weight_decay": float(self.config.head_weight_decay)},
            {"params": [self.head.bias], "weight_decay": 0.0},
        ]

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {
            "prompts": self.prompts.detach(),
            "head.weight": self.head.weight.detach(),
            "head.bias": self.head.bias.detach(),
        }

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for target, key in ((self.prompts, "prompts"), (self.head.weight, "head.weight"), (self.head.bias, "head.bias")):
            target.copy_(tensors[key].to(target.device, target.dtype))


class VPT(SPT):
    """Visual Prompt Tuning: the same prompted ViT and head as SPT, prompts started from VPT's uniform noise.

    This is SPT's baseline. It uses the same training defaults so the two compare on init alone.
    """

    name: ClassVar[str] = "vpt"
    Config: ClassVar[type] = VPTConfig
    init_choices: ClassVar[tuple[str, ...]] = ("xavier",)

    def prepare_images(self, available: int) -> int:
        return 0

    def prepare(self, loader: Iterable, runtime: Runtime, seed: int) -> None:
        """Nothing to do: the prompts were drawn from U(-v, v) when the model was built."""
