"""The training loop every method shares: optimiser, warm-up + cosine schedule, AMP on CUDA, validation, which epoch
is kept (last or best), and an optional moving average of the learned tensors."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from promptune.data import Batch, derive_seed
from promptune.errors import MethodError
from promptune.methods.base import PromptMethod
from promptune.methods.registry import TrainDefaults
from promptune.reporting import Reporter, SilentReporter
from promptune.runtime import Runtime

OPTIMIZERS = ("adam", "adamw", "sgd")
DIVERGED = "Training diverged (the loss became NaN or infinite); try a lower --lr."
REFRESH_SECONDS = 0.5  # off the CPU: how often a step's loss and accuracy are read back for the progress display
MAX_UNREAD_STEPS = 256  # ... and after at most this many steps (the unread 0-d tensors are kept until then)


@dataclass
class TrainConfig:
    epochs: int  # passes over the training set
    lr: float  # peak learning rate
    weight_decay: float  # default decay; methods may set their own per group
    batch_size: int  # images per step
    warmup_epochs: float = 1.0  # warm-up length in epochs
    warmup: str = "linear"  # "linear" (0 -> lr) or "constant" (warmup_lr)
    warmup_lr: float = 1e-5  # lr during a constant warm-up
    optimizer: str = "adamw"  # "adam" | "adamw" | "sgd"
    eps: float = 1e-8  # Adam epsilon
    keep: str = "last"  # "last": the last epoch's tensors are kept; "best": the best validated one after the warm-up
    decay_every_tensor: bool = False  # weight_decay on every learned tensor, one group (else the method's groups)
    ema_decay: float = 0.0  # > 0: validate and keep a moving average of the learned tensors (see ParameterEMA)
    recipe: str = "default"  # the recipe these settings came from (promptune.methods.registry.RECIPES)
    seed: int = 0  # seeds python, torch and the loader order

    @classmethod
    def from_defaults(cls, defaults: TrainDefaults, seed: int = 0, **overrides: float | None) -> TrainConfig:
        """A method's training defaults, with each override that is not None (the user's --epochs, --lr, ...)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"seed"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"TrainConfig has no field(s) {', '.join(unknown)}")
        values = {name: getattr(defaults, name) for name in fields}
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values, seed=seed)


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_acc: float | None
    seconds: float
    images_per_s: float
    data_wait_fraction: float  # share of the epoch spent waiting for the loader


@dataclass
class TrainSummary:
    epochs: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float | None = None
    seconds: float = 0.0
    skipped_images: int = 0  # images the loader could not decode during training
    kept_epoch: int = 0  # the epoch whose tensors the run ended with (set when `fit` returns)
    kept: str = ""  # why that epoch, in words

    @property
    def final(self) -> EpochStats | None:
        return self.epochs[-1] if self.epochs else None

    def to_dict(self) -> dict[str, Any]:
        last = self.final
        return {
            "epochs_run": len(self.epochs),
            "best_epoch": self.best_epoch,
            "best_val_acc": self.best_val_acc,
            "final_train_acc": last.train_acc if last else None,
            "final_train_loss": last.train_loss if last else None,
            "kept_epoch": self.kept_epoch,
            "kept": self.kept,
            "seconds": round(self.seconds, 2),
        }

    def state(self) -> dict[str, Any]:
        return {
            "epochs": [dataclasses.asdict(stats) for stats in self.epochs],
            "best_epoch": self.best_epoch,
            "best_val_acc": self.best_val_acc,
            "seconds": self.seconds,
            "skipped_images": self.skipped_images,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TrainSummary:
        return cls(
            epochs=[EpochStats(**stats) for stats in state["epochs"]],
            best_epoch=state["best_epoch"],
            best_val_acc=state["best_val_acc"],
            seconds=state["seconds"],
            skipped_images=state["skipped_images"],
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser over `groups`. On CPU and CUDA it runs torch's fused kernel: one op per step for all parameters
    instead of about ten per parameter, the same update rule (L2 decay added to the gradient for Adam, decoupled for
    AdamW, eps inside the root as before); elsewhere torch picks its own kernel."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise MethodError("This method has no parameters to learn.")
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    kernel: dict[str, Any] = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, **kernel)
    if cfg.optimizer == "adam":
        # Adam's weight_decay is L2 added to the gradient, as the SEP/CoOp (Dassl) code does
        return torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.eps, **kernel)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.eps, **kernel)
    raise MethodError(f"Unknown optimizer '{cfg.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}.")


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: TrainConfig) -> float:
    """Multiplier on the peak lr at `step`: warm-up, then half-cycle cosine to zero."""
    if step < warmup_steps:
        if cfg.warmup == "constant":
            return cfg.warmup_lr / cfg.lr
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, warm-up steps): steps 0 .. warm-up - 1 run at the warm-up lr; at least the last step does not."""
    total = max(1, cfg.epochs * steps_per_epoch)
    return total, min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total, warmup = schedule_steps(cfg, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, cfg))


def optimizer_groups(method: PromptMethod, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The method's own parameter groups, or one group decaying every learned tensor (`cfg.decay_every_tensor`)."""
    if cfg.decay_every_tensor:
        return [{"params": list(trainable_parameters(method).values()), "weight_decay": cfg.weight_decay}]
    return method.param_groups(cfg.weight_decay)


def _to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return batch.inputs(device, non_blocking), batch.labels.to(device, non_blocking=non_blocking)


@torch.no_grad()
def accuracy(method: nn.Module, loader: Iterable[Batch], runtime: Runtime) -> float | None:
    method.eval()
    correct = total = 0
    for batch in loader:
        if batch.labels.numel() == 0:
            continue
        images, labels = _to_device(batch, runtime.device)
        with runtime.autocast():
            logits = method(images)
        correct += (logits.argmax(-1) == labels).sum()  # stays on the device: no host sync per batch
        total += labels.numel()
    correct, total = runtime.all_sum([int(correct), total])  # each process saw its own share of the images
    return correct / total if total else None


# `torch.compile` mode of a compiled training step on one CUDA GPU: the compiled forward and backward are captured as
# CUDA graphs and replayed, so a step of many small kernels (SEP's fusion modules) no longer waits on their launches.
CAPTURE_MODE = "reduce-overhead"


def compile_mode(runtime: Runtime) -> str | None:
    """`torch.compile`'s mode for --compile: CUDA-graph capture on one CUDA GPU; elsewhere (CPU, MPS, several
    processes under DDP) the default mode, which fuses the step's kernels without capturing them."""
    return CAPTURE_MODE if runtime.device.type == "cuda" and not runtime.distributed else None


class TrainStep(nn.Module):
    """The forward of one training step, `(loss, logits)` of the method for a batch, as one module: what DDP and
    `torch.compile` wrap. It owns no state; the method's learned parameters are its parameters."""

    def __init__(self, method: PromptMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[0] == 0:  # other processes have images this step: take part in DDP's average with zeros
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return zero, images.new_zeros(0, 1)
        return self.method.training_loss(images, labels)


def _snapshot(method: PromptMethod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.learned_state().items()}


def trainable_parameters(method: nn.Module) -> dict[str, nn.Parameter]:
    """Everything the optimiser updates (a method's learned state plus any training-only parameters)."""
    return {name: p for name, p in method.named_parameters() if p.requires_grad}


class ParameterEMA:
    """An exponential moving average of parameters: after every optimiser step, for decay d,
    average <- d * average + (1 - d) * parameter (timm's ModelEmaV2 rule, applied to the learned tensors only).
    It starts at the parameters' values when it is made."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.decay = decay
        self.average = {name: p.detach().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        # one multi-tensor op, not one per tensor: it runs after every optimiser step (SEP has 267 learned tensors)
        torch._foreach_lerp_(list(self.average.values()), [p.detach() for p in self.parameters.values()],
                             1.0 - self.decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for name, p in self.parameters.items():
            p.copy_(self.average[name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the average; after it, their own values again."""
        own = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.copy_to_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(own[name])


@dataclass
class EpochProgress:
    """The running totals of the epoch in progress; a checkpoint taken mid-epoch stores them."""

    step: int = 0  # loader batches done in this epoch
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    wait: float = 0.0  # seconds spent waiting for the loader
    seconds: float = 0.0


@dataclass
class _Unread:
    """Steps whose loss and correct count are still on the device (0-d tensors), with their image counts."""

    losses: list[torch.Tensor] = field(default_factory=list)
    hits: list[torch.Tensor] = field(default_factory=list)
    here: list[int] = field(default_factory=list)  # this process's images per step
    images_per_step: list[int] = field(default_factory=list)  # all processes' images per step
    read_at: float | None = None  # when steps were last read back in this epoch (None: not yet)

    def add(self, loss: torch.Tensor, hits: torch.Tensor, here: int, images: int) -> None:
        self.losses.append(loss)
        self.hits.append(hits)
        self.here.append(here)
        self.images_per_step.append(images)

    def clear(self) -> None:
        """Forget the steps once read; `read_at` says when that was."""
        self.losses, self.hits, self.here, self.images_per_step = [], [], [], []
        self.read_at = time.perf_counter()


class TrainingStopped(Exception):
    """`fit` stopped early because `should_stop` said so; the trainer's state is consistent and resumable."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"stopped in epoch {epoch} after step {step}")
        self.epoch = epoch  # 1-based epoch that was running
        self.step = step  # its steps done


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _never() -> bool:
    return False


class Trainer:
    """One training run. `fit` runs the epochs left; `state`/`restore` make it resumable after any step.

    Which tensors a run ends with: those after the last epoch (`keep="last"`, as both papers), or after the epoch
    of best validation accuracy (`keep="best"`; ties go to the later epoch). A warm-up epoch, one whose last step
    still ran at the warm-up lr, is never chosen: on a small validation split it can score best by chance. With
    `ema_decay`, validation, the best snapshot and the final tensors are the moving average's.
    """

    def __init__(self, method: PromptMethod, cfg: TrainConfig, runtime: Runtime, steps_per_epoch: int,
                 compile_step: bool = False) -> None:
        self.method = method
        self.step = TrainStep(method)
        wrapped = runtime.wrap(self.step, find_unused_parameters=method.has_unused_parameters())
        self.compile_mode = compile_mode(runtime) if compile_step else None
        self.forward: nn.Module = torch.compile(wrapped, mode=self.compile_mode) if compile_step else wrapped
        self.cfg = cfg
        self.runtime = runtime
        self.optimizer = build_optimizer(optimizer_groups(method, cfg), cfg)
        self.schedule = build_schedule(self.optimizer, cfg, steps_per_epoch)
        self.warmup_steps = schedule_steps(cfg, steps_per_epoch)[1]
        self.ema: ParameterEMA | None = None
        if cfg.ema_decay > 0:
            self.ema = ParameterEMA(trainable_parameters(method), cfg.ema_decay)
            self.optimizer.register_step_post_hook(lambda *_: self.ema.update())  # a step the scaler skips is none
        use_scaler = runtime.device.type == "cuda" and runtime.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.summary = TrainSummary()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epoch = 0  # epochs completed
        self.progress = EpochProgress()  # of epoch `self.epoch + 1`
        self._shown_loss = math.nan  # the last step's loss that was read back (what the progress display shows)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on a batch: (its mean loss, its correct predictions) as 0-d tensors on the device, so the
        step never waits for the device (reading them is a host sync; `run_epoch` does it only when needed).

        `weight` scales this process's loss before backward. DDP averages the gradients of its processes; with
        weight = (this process's images x processes / images of all processes), that average is the gradient of the
        mean loss over all the step's images, also when the processes' batches differ in size.
        """
        self.optimizer.zero_grad(set_to_none=True)  # before the forward: no gradient of the last step is alive in it
        captured = self.compile_mode == CAPTURE_MODE
        if captured:
            torch.compiler.cudagraph_mark_step_begin()
        with self.runtime.autocast():
            loss, logits = self.forward(images, labels)
        self.scaler.scale(loss if weight == 1.0 else loss * weight).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        hits = (logits.detach().argmax(-1) == labels).sum()
        # A captured step's outputs live in CUDA-graph memory that its next replay overwrites: keep a copy of the loss.
        return (loss.detach().clone() if captured else loss.detach()), hits

    def run_epoch(self, loader: Iterable[Batch], reporter: Reporter, should_stop: Callable[[], bool] = _never) -> bool:
        """Train over `loader`, adding to `self.progress`; False when `should_stop` cut the epoch short.

        The steps' losses and hits stay on the device until the progress display needs them (every step on the CPU,
        where reading them costs nothing; otherwise every `REFRESH_SECONDS`), a stop, or the epoch's end: each reading
        is one host sync, and the divergence check runs on what it reads. With several processes the step's image
        counts, loss, accuracy, divergence and stop request are summed over them, so `self.progress` holds the totals
        of all processes and every process stops at the same step.
        """
        self.method.train()
        runtime, progress = self.runtime, self.progress
        unread = _Unread()
        seconds_before = progress.seconds
        start = mark = time.perf_counter()
        for batch in loader:
            progress.wait += time.perf_counter() - mark
            here = batch.labels.numel()
            images_total, failed_total = runtime.all_sum([here, len(batch.failed)])
            self.summary.skipped_images += int(failed_total)
            if images_total:
                images, labels = _to_device(batch, runtime.device)
                loss, hits = self.train_step(images, labels, weight=here * runtime.world_size / images_total)
                unread.add(loss, hits, here, int(images_total))
                if self._read_due(unread):
                    self._read(unread)
                elapsed = seconds_before + time.perf_counter() - start
                reporter.step(self._shown_loss, progress.correct / max(progress.seen, 1),
                              (progress.seen + sum(unread.images_per_step)) / max(elapsed, 1e-9))
            progress.step += 1
            progress.seconds = seconds_before + time.perf_counter() - start
            if runtime.any(should_stop()):
                self._read(unread)
                return False
            mark = time.perf_counter()
        self._read(unread)
        progress.seconds = seconds_before + time.perf_counter() - start
        return True

    def _read_due(self, unread: _Unread) -> bool:
        """Whether to read the unread steps now: always on the CPU and with several processes (whose collectives
        already wait every step), else on an epoch's first step and every `REFRESH_SECONDS` after."""
        if self.runtime.device.type == "cpu" or self.runtime.distributed or unread.read_at is None:
            return True
        return time.perf_counter() - unread.read_at >= REFRESH_SECONDS or len(unread.losses) >= MAX_UNREAD_STEPS

    def _read(self, unread: _Unread) -> None:
        """Add the unread steps to `self.progress` (one host sync, one collective), in step order as if each had been
        read on its own; a loss that is not finite stops the run with `DIVERGED`."""
        if not unread.losses:
            return
        steps = len(unread.losses)
        losses = torch.stack(unread.losses).tolist()
        hits = torch.stack(unread.hits).tolist()
        totals = self.runtime.all_sum([loss * here for loss, here in zip(losses, unread.here)] + hits
                                      + [sum(not math.isfinite(loss) for loss in losses)])
        if totals[-1]:
            raise MethodError(DIVERGED)
        progress = self.progress
        for step in range(steps):
            progress.loss_sum += totals[step]
            progress.correct += int(totals[steps + step])
            progress.seen += unread.images_per_step[step]
        self._shown_loss = totals[steps - 1] / unread.images_per_step[-1]
        unread.clear()

    def kept_weights(self) -> contextlib.AbstractContextManager:
        """The tensors a run validates and keeps: the moving average's with `ema_decay`, else the parameters'."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def validate(self, loader: Iterable[Batch] | None) -> float | None:
        if loader is None:
            return None
        with self.kept_weights():
            return accuracy(self.method, loader, self.runtime)

    def in_warmup(self) -> bool:
        """Whether the last optimiser step so far ran at the warm-up lr."""
        return self.schedule.last_epoch <= self.warmup_steps

    def end_epoch(self, stats: EpochStats) -> None:
        self.summary.epochs.append(stats)
        self.epoch = stats.epoch
        self.progress = EpochProgress()
        score, best = stats.val_acc, self.summary.best_val_acc
        if score is None or self.in_warmup() or (best is not None and score < best):
            return
        self.summary.best_val_acc = score
        self.summary.best_epoch = stats.epoch
        if self.cfg.keep == "best":
            with self.kept_weights():
                self.best_state = _snapshot(self.method)

    def _keep(self) -> None:
        """End on the kept epoch's tensors, and say which epoch that is and why."""
        summary, last = self.summary, self.epoch
        average = f", as the moving average of the learned tensors (decay {self.cfg.ema_decay:g})" if self.ema else ""
        if self.best_state is not None:
            self.method.load_learned_state(self.best_state)
            summary.kept_epoch = summary.best_epoch
            summary.kept = f"the best validation accuracy after the warm-up (--keep best){average}"
            return
        if self.ema is not None:
            self.ema.copy_to_parameters()
        summary.kept_epoch = last
        if self.cfg.keep == "best":
            summary.kept = f"the last epoch: --keep best had no validation accuracy after the warm-up{average}"
        else:
            summary.kept = f"the last epoch (--keep last){average}"

    def _start_epoch(self, epoch: int, loader: Iterable[Batch]) -> None:
        """Fresh epochs reseed from (seed, epoch); a resumed one keeps the RNG state its checkpoint restored."""
        if self.progress.step == 0:
            epoch_seed = derive_seed("train", self.cfg.seed, epoch)
            random.seed(epoch_seed)
            torch.manual_seed(epoch_seed)
        batches = getattr(loader, "batch_sampler", None)
        if hasattr(batches, "set_epoch"):  # SeededBatches; an EpochLoader's workers run on into the later epochs
            batches.set_epoch(epoch, self.progress.step, last=self.cfg.epochs)

    def fit(self, train_loader: Iterable[Batch], val_loader: Iterable[Batch] | None, reporter: Reporter | None = None,
            checkpoint: Callable[["Trainer"], None] | None = None,
            should_stop: Callable[[], bool] = _never) -> TrainSummary:
        """Run the epochs left. `checkpoint(self)` is called after every epoch and before stopping early;
        `should_stop()` is polled after every step and raises `TrainingStopped` (after the checkpoint) when true."""
        reporter = reporter or SilentReporter()
        started = time.perf_counter()
        for epoch in range(self.epoch + 1, self.cfg.epochs + 1):
            self._start_epoch(epoch, train_loader)
            reporter.epoch_start(epoch, self.cfg.epochs, len(train_loader) if hasattr(train_loader, "__len__") else 0)
            finished = self.run_epoch(train_loader, reporter, should_stop)
            if not finished:
                self.summary.seconds += time.perf_counter() - started
                if checkpoint is not None:
                    checkpoint(self)
                raise TrainingStopped(epoch, self.progress.step)
            val_acc = self.validate(val_loader)
            p = self.progress
            stats = EpochStats(epoch, p.loss_sum / max(p.seen, 1), p.correct / max(p.seen, 1), val_acc, p.seconds,
                               p.seen / max(p.seconds, 1e-9), p.wait / max(p.seconds, 1e-9))
            self.end_epoch(stats)
            reporter.epoch_end(stats)
            if checkpoint is not None:
                checkpoint(self)
            if self.runtime.any(should_stop()) and epoch < self.cfg.epochs:
                self.summary.seconds += time.perf_counter() - started
                raise TrainingStopped(epoch + 1, 0)
        self._keep()
        self.summary.seconds += time.perf_counter() - started
        self.method.eval()
        return self.summary

    # ----- checkpoint state ------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue exactly where this run is: (tensors, JSON-serialisable rest)."""
        tensors = {f"param.{name}": _cpu(p) for name, p in trainable_parameters(self.method).items()}
        for name, value in (self.best_state or {}).items():
            tensors[f"best.{name}"] = _cpu(value)
        for name, value in (self.ema.average if self.ema is not None else {}).items():
            tensors[f"ema.{name}"] = _cpu(value)
        optimizer = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, entries in optimizer["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = _cpu(value)
                else:
                    scalars.setdefault(str(index), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if self.runtime.device.type == "cuda" and self.runtime.distributed:  # rank 0's GPU continues on every rank
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        elif torch.cuda.is_available() and self.runtime.device.type == "cuda":
            for index, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{index}"] = rng
        schedule = {k: v for k, v in self.schedule.state_dict().items() if k != "lr_lambdas"}
        meta = {
            "epoch": self.epoch,
            "progress": dataclasses.asdict(self.progress),
            "summary": self.summary.state(),
            "has_best": self.best_state is not None,
            "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars},
            "schedule": schedule,
            "scaler": self.scaler.state_dict(),
            "python_rng": random.getstate(),
        }
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Load what `state` returned (from a checkpoint of the same run) into this freshly built trainer."""
        params = trainable_parameters(self.method)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"param.{name}"])
        if meta["has_best"]:
            self.best_state = {name: tensors[f"best.{name}"].to(self.runtime.device) for name in self.method.learned_state()}
        if self.ema is not None:
            with torch.no_grad():
                for name, average in self.ema.average.items():
                    average.copy_(tensors[f"ema.{name}"])
        optimizer_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        for index, entries in meta["optimizer"]["scalars"].items():
            optimizer_state.setdefault(int(index), {}).update(entries)
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": meta["optimizer"]["param_groups"]})
        self.schedule.load_state_dict({**meta["schedule"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.epoch = int(meta["epoch"])
        self.progress = EpochProgress(**meta["progress"])
        self.summary = TrainSummary.from_state(meta["summary"])
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
        if "rng.cuda" in tensors and self.runtime.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.runtime.device)
        elif cuda_states and self.runtime.device.type == "cuda":
            torch.cuda.set_rng_state_all(cuda_states)
