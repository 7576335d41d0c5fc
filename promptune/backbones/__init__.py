"""Frozen backbones: one module per family (open_clip CLIPs in `clip.py`, timm ViTs in `vit.py`) and their registry.

Adding a family is its own module (with `owns(name)`, `names()` and `load(name, weights, stored_config)`) plus one
`FamilySpec` line in `FAMILIES`. Importing this package does not import torch, so the CLI can read the registry.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Literal

from promptune.errors import BackboneError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from promptune.data import Preprocess

Family = Literal["clip", "vit"]


@dataclass
class Backbone:
    family: Family
    name: str  # open_clip model name, open_clip config file name, or timm model name (with any pretrained tag)
    weights: str | None  # hub tag, or the local file's name
    model: nn.Module  # frozen (requires_grad False) and in eval mode
    preprocess: Preprocess
    tokenizer: Callable[..., torch.Tensor] | None = None  # CLIP only
    weights_sha256: str | None = None  # local weights file only
    weights_path: str | None = None  # absolute path of a local weights file, a hint for later loads
    clip_config: dict[str, Any] | None = None  # the open_clip model config when --backbone was a JSON file
    shape: dict[str, int] = field(default_factory=dict)  # widths and depths a prompt file must match

    def describe(self) -> dict[str, Any]:
        """What a prompt file records about its backbone."""
        info: dict[str, Any] = {
            "family": self.family,
            "name": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "weights_path": self.weights_path,
            "shape": self.shape,
        }
        if self.clip_config is not None:
            info["clip_config"] = self.clip_config
        return info


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class FamilySpec:
    name: Family
    label: str  # how the user reads it: "CLIP"
    owner: str  # what its names are, for messages: "an open_clip model"
    module: str  # the module that detects and loads this family's backbones
    default_backbone: str  # --backbone when none is given
    default_method: str  # what --method auto picks

    def loader(self) -> ModuleType:
        return importlib.import_module(self.module)


FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec("clip", "CLIP", "an open_clip model", "promptune.backbones.clip", "ViT-B-16", "sep"),
    FamilySpec("vit", "ViT", "a timm model", "promptune.backbones.vit", "vit_base_patch16_224.augreg2_in21k_ft_in1k", "spt"),
)}
DEFAULT_FAMILY: Family = "clip"  # the family of a run that names neither a backbone nor a method


def detect_family(name: str) -> Family:
    """Which family a --backbone name belongs to; an error lists close matches when it is none of them."""
    for spec in FAMILIES.values():
        if spec.loader().owns(name):
            return spec.name
    candidates = [known for spec in FAMILIES.values() for known in spec.loader().names()]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    owners = [f"{spec.owner} ({spec.label})" for spec in FAMILIES.values()]
    neither = ", ".join(owners[:-1]) + " nor " + owners[-1]
    raise BackboneError(f"Unknown backbone '{name}': it is neither {neither}{hint}.")


def load_backbone(
    name: str | None,
    weights: str | None = None,
    family: Family | None = None,
    stored_config: dict[str, Any] | None = None,
) -> Backbone:
    """Load a frozen backbone by name (default: the default backbone of `family`, CLIP when none is given).

    `stored_config` is the model config a prompt file kept for a backbone first named by a config file; it is used
    when that file is no longer at `name`.
    """
    if name is None:
        name = FAMILIES[family or DEFAULT_FAMILY].default_backbone
    if stored_config is not None and not Path(name).is_file():
        return FAMILIES[family or DEFAULT_FAMILY].loader().load(name, weights, stored_config)
    return FAMILIES[detect_family(name)].loader().load(name, weights)
