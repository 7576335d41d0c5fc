"""ViT backbones through timm: a timm model name, weights from a pretrained tag or a local file."""

from __future__ import annotations

from typing import Any

from promptune.backbones import Backbone, freeze
from promptune.backbones.loading import local_weights, offline_hint, quiet_libraries
from promptune.data import Preprocess
from promptune.errors import BackboneError
from promptune.fileio import file_sha256


def names() -> list[str]:
    import timm

    return timm.list_models()


def owns(name: str) -> bool:
    import timm

    return timm.is_model(name)


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
            valid = ", ".join(t.split(".", 1)[1] for t in timm.list_pretrained(f"{name.split('.')[0]}.*")) or "none"
            raise BackboneError(f"Unknown weights tag '{weights}' for {name}; valid tags: {valid}.")
    try:
        with quiet_libraries():
            model = timm.create_model(model_name, **kwargs)
    except RuntimeError as error:
        if local is None:
            raise BackboneError(offline_hint(name, weights or "default")) from None
        raise BackboneError(f"Could not load weights file '{local}' into {name}: {str(error).splitlines()[0]}") from None
    except (OSError, ValueError, KeyError) as error:
        if local is None:
            raise BackboneError(offline_hint(name, weights or "default")) from None
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
