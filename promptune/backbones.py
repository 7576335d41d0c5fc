"""Frozen backbones: CLIP through open_clip, ViT through timm, from a hub tag or a local weights file."""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from promptune.data import Preprocess
from promptune.errors import BackboneError
from promptune.fileio import file_sha256

Family = Literal["clip", "vit"]
DEFAULT_CLIP_BACKBONE = "ViT-B-16"
DEFAULT_CLIP_WEIGHTS = "openai"
DEFAULT_VIT_BACKBONE = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pth.tar", ".ckpt", ".npz")


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


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """open_clip and timm log to the root logger; keep the user's terminal to promptune's own messages."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        root.setLevel(level)


def _clip_names() -> list[str]:
    import open_clip

    return open_clip.list_models()


def _is_timm_name(name: str) -> bool:
    import timm

    return timm.is_model(name)


def backbone_family(name: str) -> Family:
    """Which library a --backbone name belongs to; an error lists close matches when it is neither."""
    if name.lower().endswith(".json"):
        if not Path(name).is_file():
            raise BackboneError(f"Backbone config file '{name}' does not exist.")
        return "clip"
    if name in _clip_names():
        return "clip"
    if _is_timm_name(name):
        return "vit"
    import timm

    candidates = _clip_names() + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise BackboneError(
        f"Unknown backbone '{name}': it is neither an open_clip model (CLIP) nor a timm model (ViT){hint}."
    )


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.lower().endswith(WEIGHT_SUFFIXES)


def _local_weights(weights: str | None) -> Path | None:
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        return path.resolve()
    if _looks_like_path(weights):
        raise BackboneError(f"Weights file '{weights}' does not exist.")
    return None


def _offline_hint(name: str, tag: str) -> str:
    return (
        f"Could not download the '{tag}' weights for {name} (no network, or the hub is unreachable); "
        f"download them on a machine with internet or pass a local file with --weights PATH."
    )


def _register_clip_config(config_path: Path | None, stored: dict[str, Any] | None, name: str) -> str:
    """Make a config JSON (a file, or one stored in a prompt file) known to open_clip; returns its model name."""
    import open_clip

    model_name = Path(name).stem
    if config_path is not None and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BackboneError(f"Backbone config '{config_path}' is not valid JSON ({error}).") from None
    elif stored is not None:
        config = stored
    else:
        raise BackboneError(f"Backbone config file '{name}' does not exist.")
    if not isinstance(config, dict) or "vision_cfg" not in config or "text_cfg" not in config:
        raise BackboneError(f"Backbone config '{name}' is not an open_clip model config (needs vision_cfg and text_cfg).")
    open_clip.factory._MODEL_CONFIGS[model_name] = config
    return model_name


def _clip_shape(model: nn.Module) -> dict[str, int]:
    visual = model.visual
    text = model if hasattr(model, "token_embedding") else getattr(model, "text", model)
    shape = {"embed_dim": int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") and isinstance(model.text_projection, torch.Tensor) else 0}
    if hasattr(text, "transformer"):
        shape["text_width"] = int(text.transformer.width)
        shape["text_layers"] = len(text.transformer.resblocks)
    if hasattr(visual, "transformer"):
        shape["vision_width"] = int(visual.transformer.width)
        shape["vision_layers"] = len(visual.transformer.resblocks)
    return shape


def _clip_tokenizer(model_name: str, name: str) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for the model. SigLIP, CLIPA and the worldwide CLIPs name a Hugging Face tokenizer, which
    needs the `transformers` package and, once, the hub (it is cached after the first download)."""
    import open_clip

    try:
        with _quiet_libraries():
            return open_clip.get_tokenizer(model_name)
    except ImportError:
        raise BackboneError(
            f"{name} uses a Hugging Face tokenizer, which needs the transformers package; install it with "
            f"'pip install transformers'."
        ) from None
    except (OSError, ValueError) as error:
        hub_name = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {}).get("hf_tokenizer_name", "?")
        raise BackboneError(
            f"Could not load the tokenizer '{hub_name}' of {name} ({str(error).splitlines()[0]}); it is fetched from "
            f"the Hugging Face hub once, so run once on a machine with internet to cache it."
        ) from None


def _tag_preprocess(model_name: str) -> dict[str, Any]:
    """The mean, std and interpolation every published tag of the model agrees on ({} if none, or if they differ).

    A local weights file carries no tag, so open_clip falls back to OpenAI's mean and std, which are wrong for SigLIP,
    PE-Core (0.5) and MobileCLIP (no normalisation); the model's own tags say what its weights expect.
    """
    import open_clip

    keys = ("mean", "std", "interpolation")
    found = {
        tuple(open_clip.get_pretrained_cfg(model_name, tag).get(key) for key in keys)
        for tag in open_clip.list_pretrained_tags_by_model(model_name)
    }
    if len(found) != 1:
        return {}
    return {key: value for key, value in zip(keys, found.pop()) if value is not None}


def load_clip(name: str, weights: str | None, stored_config: dict[str, Any] | None = None) -> Backbone:
    import open_clip

    config_path = Path(name) if name.lower().endswith(".json") else None
    model_name = _register_clip_config(config_path, stored_config, name) if config_path or stored_config else name
    local = _local_weights(weights)
    if local is None:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if weights is None:
            if model_name == DEFAULT_CLIP_BACKBONE:
                weights = DEFAULT_CLIP_WEIGHTS
            elif tags:
                weights = tags[0]
            else:
                raise BackboneError(f"Backbone '{name}' has no published weights; pass a local file with --weights PATH.")
        if weights not in tags:
            valid = ", ".join(tags) if tags else "none (use --weights PATH)"
            raise BackboneError(f"Unknown weights tag '{weights}' for {name}; valid tags: {valid}.")
    pretrained = str(local) if local is not None else weights
    try:
        with _quiet_libraries():
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    except RuntimeError as error:
        if local is None and ("download" in str(error).lower() or "hub" in str(error).lower()):
            raise BackboneError(_offline_hint(name, str(weights))) from None
        raise BackboneError(f"Could not load weights '{weights}' into {name}: {str(error).splitlines()[0]}") from None
    except (OSError, ValueError, KeyError) as error:
        if local is None:
            raise BackboneError(_offline_hint(name, str(weights))) from None
        raise BackboneError(f"Could not read weights file '{local}': {str(error).splitlines()[0]}") from None
    freeze(model)
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    if local is not None:
        cfg = {**cfg, **_tag_preprocess(model_name)}
    size = cfg.get("size", 224)
    preprocess = Preprocess(
        size=int(size[0] if isinstance(size, (tuple, list)) else size),
        mean=tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=1.0,
    )
    return Backbone(
        family="clip",
        name=Path(name).name if config_path else name,
        weights=local.name if local else weights,
        model=model,
        preprocess=preprocess,
        tokenizer=_clip_tokenizer(model_name, name),
        weights_sha256=file_sha256(local) if local else None,
        weights_path=str(local) if local else None,
        clip_config=open_clip.get_model_config(model_name) if (config_path or stored_config) else None,
        shape=_clip_shape(model),
    )


def load_vit(name: str, weights: str | None) -> Backbone:
    import timm

    local = _local_weights(weights)
    model_name = name
    kwargs: dict[str, Any] = {"pretrained": True, "num_classes": 0}
    if local is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(local)}
    elif weights is not None:
        model_name = f"{name.split('.')[0]}.{weights}"
        if not timm.is_model_pretrained(model_name):
            valid = ", ".join(t.split(".", 1)[1] for t in timm.list_pretrained(f"{name.split('.')[0]}.*")) or "none"
            raise BackboneError(f"Unknown weights tag '{weights}' for {name}; valid tags: {valid}.")
    try:
        with _quiet_libraries():
            model = timm.create_model(model_name, **kwargs)
    except RuntimeError as error:
        if local is None:
            raise BackboneError(_offline_hint(name, weights or "default")) from None
        raise BackboneError(f"Could not load weights file '{local}' into {name}: {str(error).splitlines()[0]}") from None
    except (OSError, ValueError, KeyError) as error:
        if local is None:
            raise BackboneError(_offline_hint(name, weights or "default")) from None
        raise BackboneError(f"Could not read weights file '{local}': {str(error).splitlines()[0]}") from None
    freeze(model)
    config = timm.data.resolve_model_data_config(model)
    preprocess = Preprocess(
        size=int(config["input_size"][-1]),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=str(config.get("interpolation", "bicubic")),
        crop_pct=float(config.get("crop_pct", 1.0)),
    )
    shape = {"embed_dim": int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))}
    if hasattr(model, "blocks"):
        shape["depth"] = len(model.blocks)
        shape["num_prefix_tokens"] = int(getattr(model, "num_prefix_tokens", 1))
    return Backbone(
        family="vit",
        name=name,
        weights=local.name if local else weights,
        model=model,
        preprocess=preprocess,
        weights_sha256=file_sha256(local) if local else None,
        weights_path=str(local) if local else None,
        shape=shape,
    )


def load_backbone(
    name: str | None,
    weights: str | None = None,
    family: Family | None = None,
    stored_config: dict[str, Any] | None = None,
) -> Backbone:
    """Load a frozen backbone by name (default: CLIP ViT-B-16 openai, or a ViT-B/16 when family='vit')."""
    if name is None:
        name = DEFAULT_VIT_BACKBONE if family == "vit" else DEFAULT_CLIP_BACKBONE
    if stored_config is not None and not Path(name).is_file():
        return load_clip(name, weights, stored_config)
    detected = backbone_family(name)
    return load_clip(name, weights) if detected == "clip" else load_vit(name, weights)
