"""The training loop every method shares: optimiser, warm-up + cosine schedule, AMP on CUDA, validation, keep-best."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from promptune.data import Batch
from promptune.devices import autocast
from promptune.errors import MethodError
from promptune.methods.base import PromptMethod

OPTIMIZERS = ("adam", "adamw", "sgd")


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
    seed: int = 0  # seeds python, torch and the loader order
    amp_dtype: torch.dtype = torch.float32  # autocast dtype; fp32 = no autocast


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
            "seconds": round(self.seconds, 2),
        }


class Reporter(Protocol):
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float, acc: float, images_per_s: float) -> None: ...
    def epoch_end(self, stats: EpochStats) -> None: ...


class SilentReporter:
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, loss: float, acc: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, stats: EpochStats) -> None:
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise MethodError("This method has no parameters to learn.")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adam":
        # Adam's weight_decay is L2 added to the gradient, as the SEP/CoOp (Dassl) code does
        return torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.eps)
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


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, cfg))


def _to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return batch.images.to(device, non_blocking=non_blocking), batch.labels.to(device, non_blocking=non_blocking)


@torch.no_grad()
def accuracy(method: nn.Module, loader: Iterable[Batch], device: torch.device, amp_dtype: torch.dtype) -> float | None:
    method.eval()
    correct = total = 0
    for batch in loader:
        if batch.labels.numel() == 0:
            continue
        images, labels = _to_device(batch, device)
        with autocast(device, amp_dtype):
            logits = method(images)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    return correct / total if total else None


def _snapshot(method: PromptMethod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.learned_state().items()}


class Trainer:
    """One training run. `fit` runs all epochs; the pieces are methods so checkpoint/resume can reuse them."""

    def __init__(self, method: PromptMethod, cfg: TrainConfig, device: torch.device, steps_per_epoch: int) -> None:
        self.method = method
        self.cfg = cfg
        self.device = device
        self.optimizer = build_optimizer(method.param_groups(cfg.weight_decay), cfg)
        self.schedule = build_schedule(self.optimizer, cfg, steps_per_epoch)
        use_scaler = device.type == "cuda" and cfg.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.summary = TrainSummary()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epoch = 0  # epochs completed

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        with autocast(self.device, self.cfg.amp_dtype):
            loss, logits = self.method.training_loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        if not torch.isfinite(loss):
            raise MethodError("Training diverged (the loss became NaN or infinite); try a lower --lr.")
        return float(loss.detach()), int((logits.detach().argmax(-1) == labels).sum())

    def run_epoch(self, loader: Iterable[Batch], reporter: Reporter) -> tuple[float, float, float, int, float]:
        self.method.train()
        loss_sum = seen = correct = 0.0
        wait = 0.0
        start = time.perf_counter()
        mark = start
        for batch in loader:
            wait += time.perf_counter() - mark
            self.summary.skipped_images += len(batch.failed)
            if batch.labels.numel() == 0:
                mark = time.perf_counter()
                continue
            images, labels = _to_device(batch, self.device)
            loss, hits = self.train_step(images, labels)
            n = labels.numel()
            loss_sum += loss * n
            correct += hits
            seen += n
            elapsed = time.perf_counter() - start
            reporter.step(loss, correct / seen, seen / max(elapsed, 1e-9))
            mark = time.perf_counter()
        seconds = time.perf_counter() - start
        return loss_sum / max(seen, 1), correct / max(seen, 1), seconds, int(seen), wait / max(seconds, 1e-9)

    def end_epoch(self, stats: EpochStats) -> None:
        self.summary.epochs.append(stats)
        self.epoch = stats.epoch
        score = stats.val_acc
        best = self.summary.best_val_acc
        if score is None or best is None or score >= best:
            self.summary.best_val_acc = score
            self.summary.best_epoch = stats.epoch
            self.best_state = _snapshot(self.method)

    def fit(self, train_loader: Iterable[Batch], val_loader: Iterable[Batch] | None, reporter: Reporter | None = None,
            on_epoch_end: Callable[["Trainer"], None] | None = None) -> TrainSummary:
        reporter = reporter or SilentReporter()
        started = time.perf_counter()
        steps = len(train_loader) if hasattr(train_loader, "__len__") else 0
        for epoch in range(self.epoch + 1, self.cfg.epochs + 1):
            reporter.epoch_start(epoch, self.cfg.epochs, steps)
            loss, acc, seconds, seen, wait_fraction = self.run_epoch(train_loader, reporter)
            val_acc = accuracy(self.method, val_loader, self.device, self.cfg.amp_dtype) if val_loader is not None else None
            stats = EpochStats(epoch, loss, acc, val_acc, seconds, seen / max(seconds, 1e-9), wait_fraction)
            self.end_epoch(stats)
            reporter.epoch_end(stats)
            if on_epoch_end is not None:
                on_epoch_end(self)
        if self.best_state is not None:
            self.method.load_learned_state(self.best_state)
        self.summary.seconds += time.perf_counter() - started
        self.method.eval()
        return self.summary
