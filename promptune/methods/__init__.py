"""Prompt-tuning methods: one module each, all listed in `registry` (imported lazily so the CLI starts fast)."""

from promptune.methods.registry import METHODS, MethodSpec, get_method, method_choices, method_spec, resolve_method

__all__ = ["METHODS", "MethodSpec", "get_method", "method_choices", "method_spec", "resolve_method"]
