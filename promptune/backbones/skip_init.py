"""Build a backbone whose weights load right away without first computing the random initialisation they replace.

For ViT-B-16 that initialisation takes about 1.5 s of a 2-core CPU, and copying 600 MB of weights over it most of a
second more: the larger part of a cold `predict`. `build_loaded(create)` runs the library's own create call (open_clip's
or timm's, so their checkpoint conversions, key handling and strict checks stay exactly theirs) under `SkipInit`, a
torch function mode that touches nn.Parameters only:

- their initialisation ops (`torch.nn.init.*`, and in-place random or arithmetic ops) are skipped until the parameter
  is first written, so it holds uninitialised memory until its weights arrive;
- that first write, `load_state_dict`'s `param.copy_(value)`, points the parameter at `value`'s memory instead of
  copying it, when dtype, device, shape and strides agree (tensors read from a safetensors file are private
  copy-on-write mappings of it, so nothing is copied, and writing to them never reaches the file).

Buffers (attention masks, position ids) are built as usual. A parameter whose initialisation was skipped and that no
weight overwrote would hold garbage; the model is then built again without the mode (the library's plain path), so
the result equals the plain path's, bit for bit, whichever way it was built.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

ModelT = TypeVar("ModelT", bound=nn.Module)

_INIT_FUNCTIONS = frozenset(name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_"))
_INIT_METHODS = frozenset({
    "uniform_", "normal_", "fill_", "zero_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_", "exponential_",
    "bernoulli_", "random_", "log_normal_", "cauchy_", "geometric_",
})  # what initialisers call on a parameter (timm's trunc_normal_: uniform_, erfinv_, mul_, add_, clamp_)


class SkipInit(TorchFunctionMode):
    """Skips the initialisation of parameters not written yet, and writes their first value by sharing its memory."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, nn.Parameter] = {}  # initialisation skipped, not written since: uninitialised memory
        self.written: dict[int, nn.Parameter] = {}  # written once: from then on every op runs as usual

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init functions pass their tensor by keyword
        if isinstance(target, nn.Parameter) and id(target) not in self.written:
            name = getattr(func, "__name__", "")
            if name in _INIT_METHODS or (name in _INIT_FUNCTIONS and getattr(func, "__module__", "") == nn.init.__name__):
                self.pending[id(target)] = target
                return target
            if name == "copy_":
                self.pending.pop(id(target), None)
                self.written[id(target)] = target
                value = args[1] if len(args) > 1 else kwargs["src"]
                if _shareable(value, target):
                    target.data = value
                    return target
        return func(*args, **kwargs)

    def left_uninitialised(self, model: nn.Module) -> bool:
        """Whether a parameter of `model` still holds the memory whose initialisation was skipped."""
        return any(id(parameter) in self.pending for parameter in model.parameters())


def _shareable(value: Any, target: torch.Tensor) -> bool:
    """Whether `target` may take `value`'s memory instead of a copy of it: the same values, layout and place."""
    return (type(value) is torch.Tensor and not value.requires_grad and value.dtype == target.dtype
            and value.device == target.device and value.shape == target.shape and value.stride() == target.stride())


def build_loaded(create: Callable[[], ModelT]) -> ModelT:
    """`create()`, a library call that builds a model and loads weights into every parameter, without initialising
    the parameters first; when the model it made has a parameter no weight reached, `create()` once more as usual
    (from the same random state)."""
    random_state = torch.get_rng_state()
    with SkipInit() as mode:
        model = create()
    if not mode.left_uninitialised(model):
        return model
    torch.set_rng_state(random_state)
    return create()
