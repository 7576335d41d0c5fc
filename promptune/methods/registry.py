"""Every prompt-tuning method in one table: its name, backbone family, class, training defaults and the authors'
settings (`--recipe paper`).

Adding a method is its own module plus one `register(MethodSpec(...))` line here. This module does not import torch
(the classes are imported on first use), so the CLI shows each method's defaults in --help and starts fast.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from promptune.backbones import DEFAULT_FAMILY, FAMILIES, Family, detect_family
from promptune.errors import MethodError

if TYPE_CHECKING:
    from promptune.methods.base import PromptMethod


@dataclass(frozen=True)
class TrainDefaults:
    epochs: int = 10  # passes over the (k-shot) training set
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 5e-4  # default decay for learned tensors (methods may set per-group decay)
    batch_size: int = 32
    shots: int | None = None  # images per class when --shots is not given (None = all)
    warmup_epochs: float = 1.0  # warm-up length in epochs (fractions allowed)
    warmup: str = "linear"  # "linear" (0 -> lr) or "constant" (warmup_lr, as CoOp/SEP)
    warmup_lr: float = 1e-5  # learning rate during a constant warm-up
    optimizer: str = "adamw"  # "adam" | "adamw" | "sgd"
    eps: float = 1e-8  # Adam epsilon
    keep: str = "last"  # which epoch's prompts are written: "last" or "best" (validation accuracy, after the warm-up)
    decay_every_tensor: bool = False  # one group, --weight-decay on every learned tensor (else the method's groups)
    ema_decay: float = 0.0  # evaluate and write an EMA of the learned tensors with this per-step decay (0: off)
    recipe: str = "default"  # the RECIPES entry these settings are


RECIPES = {
    "default": "promptune's practical settings (each method's defaults, shown with each option)",
    "paper": "the settings of the authors' code: spt and vpt AdamW, 100 epochs with 10 warm-up, peak lr 5e-2 on MAE "
             "backbones ('mae' in --backbone or --weights) and 1e-3 otherwise; sep weight decay on every learned "
             "tensor, 50 epochs; coop has none. Explicit flags (--epochs, --lr, ...) still win",
}
KEEP_CHOICES = ("last", "best")


def is_mae_backbone(backbone: str, weights: str | None) -> bool:
    """MAE-pretrained, as far as a name tells: 'mae' is a word of the --backbone name or of --weights (timm's `.mae`
    tags such as vit_base_patch16_224.mae, MAE's own file mae_pretrain_vit_base.pth). Nothing in a loaded model says
    so reliably: timm's MAE ViTs keep token pooling and the ordinary layout."""
    words = re.split(r"[^a-z0-9]+", f"{backbone} {Path(weights).name if weights else ''}".lower())
    return "mae" in words


@dataclass(frozen=True)
class MethodSpec:
    name: str  # --method value and the prompt file's method name; the class's `name` attribute
    family: Family  # the backbone family it needs
    target: str  # "module:Class", imported on first use
    defaults: TrainDefaults  # what a run uses for every option the user leaves out
    description: str
    paper: Callable[[str, str | None], TrainDefaults] | None = None  # --recipe paper for (backbone name, --weights)

    def load(self) -> type[PromptMethod]:
        module_name, class_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), class_name)

    def recipe(self, name: str, backbone: str | None, weights: str | None) -> TrainDefaults:
        """The training settings of recipe `name` on `backbone` (None: the family's default backbone)."""
        if name not in RECIPES:
            raise MethodError(f"Unknown --recipe '{name}'; choose one of: {', '.join(RECIPES)}.")
        if name == "default":
            return self.defaults
        if self.paper is None:
            papers = ", ".join(spec.name for spec in METHODS.values() if spec.paper is not None)
            raise MethodError(f"--recipe paper is defined for {papers}; {self.name} runs its defaults (--recipe default).")
        return self.paper(backbone or FAMILIES[self.family].default_backbone, weights)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


# The training defaults are each method's recipe; the method classes' docstrings say where each value comes from.
_VIT_RECIPE = TrainDefaults(epochs=30, lr=1e-3, weight_decay=1e-2, batch_size=32, shots=None, warmup_epochs=3.0,
                            warmup="linear", optimizer="adamw")  # SPT's; VPT shares it so the two compare on init alone
_SEP_RECIPE = TrainDefaults(epochs=50, lr=0.0025, weight_decay=5e-4, batch_size=32, shots=16, warmup_epochs=1,
                            warmup="constant", warmup_lr=1e-5, optimizer="adam", eps=1e-3)


def _spt_paper(backbone: str, weights: str | None) -> TrainDefaults:
    """The SPT authors' README runs (reference/spt.md section 4): 100 epochs, 10 of them warm-up, peak lr 5e-2 for
    MAE and 1e-3 for supervised ViT-B. Their model EMA (decay 0.9999) is saved but never evaluated, so it is not
    part of what their numbers measure, and stays off."""
    lr = 5e-2 if is_mae_backbone(backbone, weights) else 1e-3
    return dataclasses.replace(_VIT_RECIPE, epochs=100, warmup_epochs=10.0, lr=lr, recipe="paper")


def _sep_paper(backbone: str, weights: str | None) -> TrainDefaults:
    """The SEP authors' configs (reference/sep.md section 6): Dassl's Adam decays every parameter it is given,
    gates and LayerNorm weights included; 50 epochs (their 9-dataset base-to-new config)."""
    return dataclasses.replace(_SEP_RECIPE, epochs=50, decay_every_tensor=True, recipe="paper")


register(MethodSpec(
    "sep", "clip", "promptune.methods.sep:SEP", _SEP_RECIPE,
    "SEP: self-enhanced text + visual prompts with per-layer token fusion (open vocabulary)",
    paper=_sep_paper,
))
register(MethodSpec(
    "coop", "clip", "promptune.methods.coop:CoOp",
    TrainDefaults(epochs=50, lr=2e-3, weight_decay=5e-4, batch_size=32, shots=16, warmup_epochs=1, warmup="constant",
                  warmup_lr=1e-5, optimizer="sgd"),
    "CoOp: learned text context (the classic CLIP prompt-tuning baseline)",
))
register(MethodSpec(
    "spt", "vit", "promptune.methods.spt:SPT", _VIT_RECIPE,
    "Self-Prompt Tuning: deep visual prompts initialised from the data's own tokens + a linear head (timm ViT).",
    paper=_spt_paper,
))
register(MethodSpec(
    "vpt", "vit", "promptune.methods.spt:VPT", _VIT_RECIPE,
    "Visual Prompt Tuning: deep visual prompts from uniform noise + a linear head (timm ViT).",
    paper=_spt_paper,  # SPT's under both recipes, so the two still compare on initialisation alone
))


def method_choices() -> tuple[str, ...]:
    return ("auto", *METHODS)


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MethodError(f"Unknown method '{name}'; choose one of: {', '.join(method_choices())}.")
    return METHODS[name]


def get_method(name: str) -> type[PromptMethod]:
    return method_spec(name).load()


def resolve_method(method: str, backbone: str | None) -> MethodSpec:
    """The method a run uses: the one place where --method and --backbone decide the backbone family.

    A named backbone decides the family (and `auto` picks that family's default method); with no backbone, a named
    method brings its own family, and `auto` means the default family.
    """
    if backbone is not None:
        family = detect_family(backbone)
    else:
        family = DEFAULT_FAMILY if method == "auto" else method_spec(method).family
    spec = method_spec(FAMILIES[family].default_method if method == "auto" else method)
    if spec.family != family:
        raise MethodError(
            f"Method '{spec.name}' needs a {spec.family.upper()} backbone, but '{backbone}' is a {family.upper()} backbone."
        )
    return spec


def default_summary(field: str) -> str:
    """Each method's default for a training option, e.g. 'sep 50, coop 50, spt 30, vpt 30', or '32' if all agree."""
    def shown(value: object) -> str:
        return "all" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    values = {spec.name: shown(getattr(spec.defaults, field)) for spec in METHODS.values()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{name} {value}" for name, value in values.items())



# ----------------------------------------------------------------------------------------------- method options


@dataclass(frozen=True)
class MethodOption:
    """A `tune` option that only some methods take (--n-ctx, --depth, ...): the Config field it sets, the methods
    that take it, its values and each method's default (the Config's own, which a test keeps equal), for --help and
    for messages that name only flags that exist. A method's other Config fields are internal: they have no flag."""

    field: str  # the methods' Config field; the flag is --field-with-dashes
    methods: tuple[str, ...]
    help: str
    metavar: str  # how --help shows the value: "N", "PHRASE", or the choices
    defaults: tuple[object, ...]  # per method, in `methods` order (None: see `unset`)
    unset: str = ""  # what a None default means, e.g. "20 deep, 100 shallow"
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def help_text(self) -> str:
        """'[sep, coop] Learned text context tokens. Default: sep 6, coop 16.'"""
        shown = [self._shown(value) for value in self.defaults]
        default = shown[0] if len(set(shown)) == 1 else ", ".join(f"{m} {v}" for m, v in zip(self.methods, shown))
        return f"[{', '.join(self.methods)}] {self.help} Default: {default}."

    def _shown(self, value: object) -> str:
        if value is None:
            return self.unset
        if value == "":
            return "none"
        return repr(value) if isinstance(value, str) and not self.choices else str(value)


def _choices(values: tuple[str, ...]) -> str:
    return "[" + "|".join(values) + "]"


DEPTHS = ("deep", "shallow")
SPT_INITS = ("random", "mean", "max", "kmeans")
POOLS = ("token", "avg", "max", "avgmax", "map", "prr")  # reductions, then the backbone's own attention pools

METHOD_OPTIONS: dict[str, MethodOption] = {option.field: option for option in (
    MethodOption("n_ctx", ("sep", "coop"), "Learned text context tokens.", "N", (6, 16)),
    MethodOption("ctx_init", ("coop",), "Initialise the context from a phrase, e.g. 'a photo of a' (its length sets "
                 "--n-ctx).", "PHRASE", ("",)),
    MethodOption("n_ctx_v", ("sep",), "Learned visual prompt tokens.", "N", (4,)),
    MethodOption("template", ("sep",), "Hand-crafted template of the frozen text branch and of eval's zero-shot "
                 "baseline, '{}' where the class name goes; repeat the option to average several templates' text "
                 "features.", "TEMPLATE", ("a photo of a {}.",)),
    MethodOption("depth", ("spt", "vpt"), "deep: prompts before every block; shallow: before the first only.",
                 _choices(DEPTHS), ("deep", "deep"), choices=DEPTHS),
    MethodOption("prompts_per_layer", ("spt", "vpt"), "Prompt tokens per layer (0: a linear probe).", "P",
                 (None, None), unset="20 deep, 100 shallow"),
    MethodOption("init", ("spt",), "Prompt initialisation: random tokens, or mean, max or kmeans token prototypes.",
                 _choices(SPT_INITS), ("random",), choices=SPT_INITS),
    MethodOption("init_images", ("spt",), "Training images sampled for the prototype initialisation.", "N", (None,),
                 unset="all"),
    MethodOption("pool_window", ("spt",), "Tokens per window for --init mean / max.", "W", (None,),
                 unset="P near-equal windows per image"),
    MethodOption("pool", ("spt", "vpt"), "Head pooling; map and prr are the backbone's own attention pool.",
                 _choices(POOLS), (None, None), unset="the backbone's own", choices=POOLS),
)}


def method_flags(method: str) -> list[str]:
    """The `tune` flags of `method`'s own options, e.g. ['--n-ctx', '--n-ctx-v', '--template'] for sep."""
    return [option.flag for option in METHOD_OPTIONS.values() if method in option.methods]
