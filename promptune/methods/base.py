"""The contract every prompt-tuning method implements; the trainer, the prompt file and the CLI use only this."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.utils.checkpoint
from torch import nn

from promptune.backbones import Backbone, Family
from promptune.errors import MethodError, PromptFileError
from promptune.methods.registry import METHOD_OPTIONS, TrainDefaults, method_flags, method_spec
from promptune.runtime import Runtime


class _Registered:
    """A class attribute read from the method's entry in `promptune.methods.registry`, the one place it is set."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = name

    def __get__(self, instance: object, owner: type[PromptMethod]) -> Any:
        return getattr(method_spec(owner.name), self.field)


class PromptMethod(nn.Module):
    """A frozen backbone plus the few tensors a method learns.

    Subclasses have a line in `promptune.methods.registry`, set `name` to it, define a `Config` dataclass of
    hyper-parameters (all JSON-serialisable), and implement `forward` (logits over the current classes) and
    `learned_state`/`_load_tensors`.
    """

    name: ClassVar[str]  # its registry name; `family`, `defaults` and `description` come from its registry entry
    family: ClassVar[Family] = _Registered()
    defaults: ClassVar[TrainDefaults] = _Registered()
    description: ClassVar[str] = _Registered()
    open_vocabulary: ClassVar[bool] = False  # can classify into class names never trained
    Config: ClassVar[type]
    prepare_reads_shard: ClassVar[bool] = False  # with several processes, `prepare` reads each process's share only
    prepare_progress: Callable[[int], None] | None = None  # told each prepared batch's image count (progress bars)
    grad_checkpointing: bool = False  # recompute each block's activations in backward (see set_grad_checkpointing)

    def __init__(self, backbone: Backbone, class_names: list[str], config: Any) -> None:
        super().__init__()
        if backbone.family != self.family:
            raise MethodError(
                f"Method '{self.name}' needs a {self.family.upper()} backbone but '{backbone.name}' is a "
                f"{backbone.family.upper()} backbone."
            )
        self.backbone_info = backbone
        self.config = config
        self.class_names = list(class_names)
        self.trained_class_names = list(class_names)

    # ----- configuration -------------------------------------------------------------------------------------------
    @classmethod
    def make_config(cls, options: dict[str, Any], error: type[Exception] = MethodError) -> Any:
        """Build the Config from user options or stored hyper-parameters, rejecting unknown names."""
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise error(_unknown_options_message(cls.name, unknown))
        try:
            config = cls.Config(**options)
        except (TypeError, ValueError) as exc:
            raise error(f"Invalid options for method '{cls.name}': {exc}") from None
        cls.validate_config(config, error)
        return config

    @classmethod
    def validate_config(cls, config: Any, error: type[Exception]) -> None:
        """Raise `error` with one sentence when a hyper-parameter is out of range."""

    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    # ----- training hooks --------------------------------------------------------------------------------------------
    def prepare(self, loader: Iterable, runtime: Runtime, seed: int) -> None:
        """Data-dependent initialisation before the first step (SPT prototypes, SEP class centres). No-op by default.

        `loader` yields `promptune.data.Batch` objects over the training images with the deterministic eval transform
        (those of `prepare_subset`), to be moved to `runtime.device`. A method that reads images here overrides
        `prepare_images` (a run calls `prepare` only when it is above 0) and calls `_prepared(n)` after each batch.

        With several processes the result must be the same on every one of them. By default every process reads all
        the images (the same seeded sample); a method whose `prepare_reads_shard` is True gets each process's share
        and combines the shares itself through `runtime` (e.g. sums with `runtime.all_reduce`).
        """

    def prepare_images(self, available: int) -> int:
        """How many of the `available` training images `prepare` will read (0: it reads none)."""
        return 0

    def prepare_subset(self, available: int, seed: int) -> list[int] | None:
        """Ascending indices of the training images `prepare` reads when it samples some of them; None: all of them,
        in the run's seeded order. The run builds the loader over them."""
        return None

    def _prepared(self, images: int) -> None:
        if self.prepare_progress is not None:
            self.prepare_progress(images)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) for a training batch. Default: cross-entropy on `forward`."""
        logits = self(images)
        return nn.functional.cross_entropy(logits, labels), logits

    def has_unused_parameters(self) -> bool:
        """Whether some parameter that requires grad gets no gradient from `training_loss` (then DDP must look for
        such parameters at every step: find_unused_parameters)."""
        return False

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser groups over learned parameters only. Default: one group, no decay on 1-D tensors."""
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory while training: each frozen block (with the prompt replacement or token fusion that
        feeds it) keeps only its input and runs its forward again during backward.

        It applies only to training-mode forwards with autograd on; eval, `no_grad` and prediction are unaffected, and
        the loss and gradients are the same as without it (up to floating-point summation order).
        """
        self.grad_checkpointing = bool(enabled)

    def checkpointing_active(self) -> bool:
        """Whether forwards run now should checkpoint their blocks: flag on, training mode and autograd recording."""
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def train(self, mode: bool = True) -> "PromptMethod":
        """Learned modules follow `mode`; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone_info.model.eval()
        return self

    # ----- classes ---------------------------------------------------------------------------------------------------
    def set_classes(self, class_names: list[str]) -> None:
        """Classify into other class names (open-vocabulary methods only)."""
        if not self.open_vocabulary and list(class_names) != self.trained_class_names:
            raise MethodError(
                f"A '{self.name}' prompt file classifies only into the {len(self.trained_class_names)} classes it was "
                f"trained on (its head is bound to them); --classes and new class names need a CLIP method (sep, coop)."
            )
        self.class_names = list(class_names)

    def overlong_class_names(self) -> list[str]:
        """Class names cut short in the method's text prompts (CLIP methods: longer than the text context)."""
        return []

    # ----- the prompt file -------------------------------------------------------------------------------------------
    def learned_state(self) -> dict[str, torch.Tensor]:
        """The tensors that go into the prompt file: learned, class-independent where the method allows."""
        raise NotImplementedError

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.learned_state().items()}

    def load_learned_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors from a prompt file in, after checking names and shapes match this model exactly."""
        expected = self.expected_shapes()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing:
            raise PromptFileError(f"The prompt file is missing tensor(s) {', '.join(missing)} for method '{self.name}'.")
        if extra:
            raise PromptFileError(f"The prompt file has unexpected tensor(s) {', '.join(extra)} for method '{self.name}'.")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise PromptFileError(
                    f"Tensor '{key}' in the prompt file has shape {tuple(tensors[key].shape)} but this backbone needs "
                    f"{shape}; the file was made for another backbone."
                )
        with torch.no_grad():
            self._load_tensors(tensors)

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def _unknown_options_message(method: str, unknown: list[str]) -> str:
    """Names only flags that `tune` has: the method's own (its Config's internal fields have none), and for each
    unknown option that belongs to other methods, which ones."""
    def named(field: str) -> str:
        option = METHOD_OPTIONS.get(field)
        if option is None:
            return f"'{field}'"
        return f"{option.flag} (an option of {', '.join(option.methods)})"

    own = method_flags(method)
    takes = f"its options are {', '.join(own)}" if own else "it has no options of its own"
    return f"Method '{method}' has no option {', '.join(named(field) for field in unknown)}; {takes}."


def overlong_note(method: PromptMethod) -> str | None:
    """One sentence when class names are cut short in the text prompts (None when all fit)."""
    names = method.overlong_class_names()
    if not names:
        return None
    shown = names[0] if len(names[0]) <= 40 else names[0][:40] + "..."
    if len(names) == 1:
        return f"class name '{shown}' is too long for the text encoder and is cut short in its text prompt."
    return (f"{len(names)} class names are too long for the text encoder and are cut short in their text prompts "
            f"(e.g. '{shown}').")


def run_block(checkpointed: bool, segment: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """`segment(*args)`, under non-reentrant activation checkpointing when `checkpointed`.

    Non-reentrant checkpointing gives gradients to every parameter the segment uses, learned prompts and fusion
    modules included, even though they are not passed as arguments; the frozen blocks' parameters still get none.
    Only the tensor arguments are kept for the backward; the segment's inner activations are recomputed there.
    """
    if not checkpointed:
        return segment(*args)
    return torch.utils.checkpoint.checkpoint(segment, *args, use_reentrant=False)
