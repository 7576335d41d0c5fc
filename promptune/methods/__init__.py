"""Method registry: name -> class, imported lazily so the CLI starts fast; `auto` picks by backbone family."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from promptune.errors import MethodError

if TYPE_CHECKING:
    from promptune.methods.base import PromptMethod

METHODS: dict[str, str] = {
    "sep": "promptune.methods.sep:SEP",
    "coop": "promptune.methods.coop:CoOp",
    "spt": "promptune.methods.spt:SPT",
    "vpt": "promptune.methods.spt:VPT",
}
DEFAULT_FOR_FAMILY = {"clip": "sep", "vit": "spt"}
METHOD_CHOICES = ("auto", *METHODS)


def get_method(name: str) -> type["PromptMethod"]:
    if name not in METHODS:
        raise MethodError(f"Unknown method '{name}'; choose one of: {', '.join(METHOD_CHOICES)}.")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def resolve_method_name(name: str, family: str) -> str:
    return DEFAULT_FOR_FAMILY[family] if name == "auto" else name
