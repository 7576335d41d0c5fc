"""ViT backbones through timm: a timm model name, weights from a pretrained tag or a local file."""

from __future__ import annotations

import contextlib
import os
from typing import Any
from urllib.parse import urlsplit

import torch

from promptune.backbones import Backbone, freeze
from promptune.backbones.hub import HubWeights, hub_access
from promptune.backbones.loading import download_failed, local_weights, quiet_libraries, weights_mismatch
from promptune.backbones.skip_init import build_loaded
from promptune.data import Preprocess
from promptune.errors import BackboneError
from promptune.usercache import weights_sha256


def names() -> list[str]:
    import timm

    return timm.list_models()


def owns(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _valid_tags(name: str) -> str:
    import timm

    return ", ".join(t.split(".", 1)[1] for t in timm.list_pretrained(f"{name.split('.')[0]}.*")) or "none"


def _hub_weights(model_name: str) -> HubWeights | None:
    """The hub file timm downloads for `model_name` (its default tag when it names none); None without weights."""
    from timm.models import get_pretrained_cfg
    from timm.models import _hub as timm_hub

    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError:  # a tag in the name that the architecture does not have: "vit_base_patch16_224.bogus"
        arch, _, tag = model_name.partition(".")
        raise BackboneError(f"Unknown weights tag '{tag}' for {arch}; valid tags: {_valid_tags(arch)}.") from None
    if cfg is None:
        return None
    label = f"{model_name.split('.')[0]} / {cfg.tag}"
    if not cfg.hf_hub_id:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlsplit(cfg.url or "").path))
        return HubWeights(label, None, url=cfg.url or "", url_cache=cache)
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    filename = cfg.hf_hub_filename or timm_hub.HF_WEIGHTS_NAME
    safer = () if filename.endswith(".safetensors") else tuple(getattr(timm_hub, "_get_safe_alternatives", lambda _: ())(filename))
    return HubWeights(label, repo_id, (*safer, filename), revision=revision or None)


def load(name: str, weights: str | None, stored_config: dict[str, Any] | None = None) -> Backbone:
    """`stored_config` is unused: a timm name alone says how to build the model."""
    import timm

    local = local_weights(weights)
    model_name = name
    kwargs: dict[str, Any] = {"pretrained": True, "num_classes": 0}
    if local is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(local)}
    elif weights is not None:
        model_name = f"{name.split('.')[0]}.{weights}"
        if not timm.is_model_pretrained(model_name):
            raise BackboneError(f"Unknown weights tag '{weights}' for {name}; valid tags: {_valid_tags(name)}.")
    hub = _hub_weights(model_name) if local is None else None
    try:
        with quiet_libraries(), hub_access(hub) if hub is not None else contextlib.nullcontext():
            model = build_loaded(lambda: timm.create_model(model_name, **kwargs))
    except RuntimeError as error:
        if hub is not None and "state_dict" not in str(error):
            raise BackboneError(download_failed(hub, error)) from None
        raise BackboneError(weights_mismatch(str(weights), name, error)) from None
    except (OSError, ValueError, KeyError) as error:
        if hub is not None:
            raise BackboneError(download_failed(hub, error)) from None
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
        weights_sha256=weights_sha256(local) if local else None,
        weights_path=str(local) if local else None,
        shape=shape,
    )
