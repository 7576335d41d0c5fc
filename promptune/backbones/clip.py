"""CLIP backbones through open_clip: a model name or config JSON, weights from a pretrained tag or a local file."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from promptune.backbones import FAMILIES, Backbone, freeze
from promptune.backbones.hub import HubWeights, hub_access
from promptune.backbones.loading import download_failed, local_weights, quiet_libraries, weights_mismatch
from promptune.backbones.skip_init import build_loaded
from promptune.data import Preprocess
from promptune.errors import BackboneError
from promptune.usercache import weights_sha256

DEFAULT_WEIGHTS = "openai"  # the weights of the default backbone when --weights is not given


def names() -> list[str]:
    import open_clip

    return open_clip.list_models()


def owns(name: str) -> bool:
    """An open_clip model name, or an open_clip config file (which must exist)."""
    if name.lower().endswith(".json"):
        if not Path(name).is_file():
            raise BackboneError(f"Backbone config file '{name}' does not exist.")
        return True
    return name in names()


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
        with quiet_libraries():
            return open_clip.get_tokenizer(model_name)
    except ImportError:
        raise BackboneError(
            f"{name} uses a Hugging Face tokenizer, which needs the transformers package; install it with "
            f"'pipx inject promptune-vision transformers' (or pip install 'promptune-vision[hf]')."
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


def _hub_weights(name: str, tag: str, tag_config: dict[str, Any]) -> HubWeights:
    """The hub file open_clip downloads for `tag` (its pretrained config's `hf_hub`, safetensors tried first)."""
    import open_clip

    label = f"{name} / {tag}"
    if not tag_config.get("hf_hub"):
        return HubWeights(label, None, url=tag_config.get("url", ""))
    repo_id, filename = os.path.split(tag_config["hf_hub"])  # "org/repo/" (the default file name) or "org/repo/file"
    filename = filename or open_clip.constants.HF_WEIGHTS_NAME
    safer = getattr(open_clip.pretrained, "_get_safe_alternatives", lambda _: ())(filename)
    return HubWeights(label, repo_id, (*safer, filename))


def load(name: str, weights: str | None, stored_config: dict[str, Any] | None = None) -> Backbone:
    import open_clip

    config_path = Path(name) if name.lower().endswith(".json") else None
    model_name = _register_clip_config(config_path, stored_config, name) if config_path or stored_config else name
    local = local_weights(weights)
    if local is None:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if weights is None:
            if model_name == FAMILIES["clip"].default_backbone:
                weights = DEFAULT_WEIGHTS
            elif tags:
                weights = tags[0]
            else:
                raise BackboneError(f"Backbone '{name}' has no published weights; pass a local file with --weights PATH.")
        if weights not in tags:
            valid = ", ".join(tags) if tags else "none (use --weights PATH)"
            raise BackboneError(f"Unknown weights tag '{weights}' for {name}; valid tags: {valid}.")
    pretrained = str(local) if local is not None else weights
    shown_name = Path(name).name if config_path else name
    tag_config = open_clip.get_pretrained_cfg(model_name, weights) if local is None else {}
    hub = _hub_weights(name, str(weights), tag_config) if local is None else None
    try:
        with quiet_libraries(), hub_access(hub) if hub is not None else contextlib.nullcontext():
            # A tag trained with QuickGELU (OpenAI's) gets it, as open_clip 2.x did; 3.x only warns about the mismatch.
            model = build_loaded(lambda: open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, force_quick_gelu=bool(tag_config.get("quick_gelu")))[0])
    except RuntimeError as error:
        if hub is not None and ("download" in str(error).lower() or "hub" in str(error).lower()):
            raise BackboneError(download_failed(hub, error)) from None
        raise BackboneError(weights_mismatch(str(weights), shown_name, error)) from None
    except AssertionError as error:  # open_clip's checkpoint conversions assert shapes ("text pos_embed width changed!")
        raise BackboneError(weights_mismatch(str(weights), shown_name, error)) from None
    except (OSError, ValueError, KeyError) as error:
        if hub is not None:
            raise BackboneError(download_failed(hub, error)) from None
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
        name=shown_name,
        weights=local.name if local else weights,
        model=model,
        preprocess=preprocess,
        tokenizer=_clip_tokenizer(model_name, name),
        weights_sha256=weights_sha256(local) if local else None,
        weights_path=str(local) if local else None,
        clip_config=open_clip.get_model_config(model_name) if (config_path or stored_config) else None,
        shape=_clip_shape(model),
    )
