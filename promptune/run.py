"""One `tune` run, in stages: check -> build (data, backbone, method, loaders) -> prepare -> fit -> save.

`TuneRun.run` reads top to bottom as those stages. Everything that can be refused without reading an image (option
values, --device, --out, the checkpoint folder) is checked before the first image is scanned.

With several processes (torchrun, or `tune --gpus N`) every process runs the same stages on its own device. Rank 0
alone scans the images, reads the checkpoint, writes checkpoints and the prompt file and talks to the user; the other
processes get what it found and wait for what it writes. --batch-size is per process: a step trains on
batch size x processes images, split so that the ranks' batches together are one process's batch of that size.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from promptune import __version__
from promptune.artifact import PromptFile, save_prompt_file
from promptune.backbones import FAMILIES, Backbone, load_backbone
from promptune.checkpoint import Checkpoint, CheckpointPolicy, file_fingerprint
from promptune.data import (
    EpochLoader,
    ImageDataset,
    SkippedFile,
    TrainingData,
    build_transform,
    default_workers,
    load_training_data,
    make_loader,
    small_image_note,
)
from promptune.errors import PromptuneError
from promptune.fileio import content_id
from promptune.metrics import rounded
from promptune.methods.base import PromptMethod, overlong_note
from promptune.methods.registry import KEEP_CHOICES, MethodSpec, TrainDefaults, resolve_method
from promptune.options import check_choice, check_loader_options, check_number
from promptune.outputs import RunLock, check_out_target
from promptune.reporting import Reporter
from promptune.runtime import Runtime
from promptune.stop import RunInterrupted, StopSignals, signal_name
from promptune.train import Trainer, TrainConfig, TrainingStopped, TrainSummary, seed_everything, trainable_parameters
from promptune.train_images import DEFAULT_CACHE_BYTES, training_loader

Log = Callable[[str], None]


def quiet(_: str) -> None:
    pass


@dataclass
class TuneOptions:
    """Everything `promptune tune` (or `promptune.tune`) was asked for; None means the method's default."""

    data_dir: Path
    method: str = "auto"
    backbone: str | None = None
    weights: str | None = None
    shots: int | None = None
    seed: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    keep: str = "last"  # which epoch's prompts are written: last, or best (validation accuracy after the warm-up)
    recipe: str = "default"  # where the training settings the options leave out come from (registry.RECIPES)
    ema_decay: float | None = None  # validate and write a moving average of the learned tensors (0: off)
    base_classes: float | None = None
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    out: Path = Path("prompts.safetensors")
    checkpoint: bool = True
    checkpoint_dir: Path | None = None
    resume: bool = False
    handle_signals: bool = True
    grad_checkpointing: bool = False
    compile_step: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options (--n-ctx, --depth, ...)

    def check(self) -> None:
        """The option values, before anything is loaded."""
        check_number("--shots", self.shots)
        check_number("--epochs", self.epochs, 1, 100_000)
        check_loader_options(self.batch_size, self.workers)
        check_number("--lr", self.lr, 1e-12, 100.0)
        check_number("--weight-decay", self.weight_decay, 0.0, 100.0)
        check_number("--seed", self.seed, 0, 2**64 - 1)  # torch seeds are unsigned 64-bit
        check_choice("--keep", self.keep, KEEP_CHOICES)
        check_number("--ema-decay", self.ema_decay, 0.0, 1.0)
        if self.ema_decay == 1.0:
            raise PromptuneError("--ema-decay must be below 1 (1 would never move the average from its start), got 1.")

    def check_out(self) -> None:
        """--out names a new file, or a promptune prompt file, in a folder that exists and outside the data's classes."""
        check_out_target(self.out, self.data_dir)


@dataclass
class TuneResult:
    path: Path
    method: str
    backbone: str
    class_names: list[str]
    train_per_class: dict[str, int]
    val_images: int
    skipped: list[SkippedFile]
    summary: TrainSummary
    device: str
    cpu_threads: int
    processes: int = 1  # processes that trained together (each on its own device, with --batch-size images a step)

    def __repr__(self) -> str:
        """Counts and final figures only: never every epoch, class or skipped file."""
        final = self.summary.final
        return (f"TuneResult(path={str(self.path)!r}, method={self.method!r}, backbone={self.backbone!r}, "
                f"classes={len(self.class_names)}, train_images={sum(self.train_per_class.values())}, "
                f"val_images={self.val_images}, epochs={len(self.summary.epochs)}, "
                f"final_train_acc={rounded(final.train_acc if final else None, 4)}, "
                f"best_val_acc={rounded(self.summary.best_val_acc, 4)}, skipped={len(self.skipped)})")


@dataclass
class Built:
    """What the build stage makes: the chosen images, the frozen backbone, the method around it, and their loaders."""

    data: TrainingData
    backbone: Backbone
    model: PromptMethod
    train_loader: EpochLoader
    val_loader: DataLoader | None
    identity: dict[str, Any]  # what a checkpoint must match to continue this run (see `TuneRun.identity`)


class TuneRun:
    """Learn prompts for the classes of `options.data_dir` and write them to `options.out` (atomically)."""

    def __init__(self, options: TuneOptions, reporter: Reporter | None = None, log: Log = quiet) -> None:
        self.options = options
        self.reporter = reporter
        self.log = log
        self.policy = CheckpointPolicy.for_run(options.out, options.checkpoint_dir, options.checkpoint, options.resume)

    def check(self) -> None:
        """What can be refused before anything is loaded: the option values, --out and the checkpoint folder."""
        self.options.check()
        self.check_files()

    def check_files(self, lock: RunLock | None = None) -> None:
        """--out and the checkpoint folder; with `lock`, this run first claims --out (one run per prompt file)."""
        self.options.check_out()
        if lock is not None:
            lock.acquire()
        self.policy.check()

    def run(self) -> TuneResult:
        lock = RunLock(self.options.out, self.log)  # held from the checkpoint check to the last write
        try:
            self.setup(lock)
            with StopSignals(enabled=self.options.handle_signals) as self.stop:
                built = self.build()
                saved = self.resume_from(built) if self.options.resume else None
                if saved is None:
                    self.prepare(built)
                with self.stop.deferred():
                    summary = self.fit(built, saved)
                    path = self.save(built, summary)
        finally:
            lock.release()
        return self._result(built, path, summary)

    def setup(self, lock: RunLock | None = None) -> None:
        """The checks, this process's runtime (joining the other processes, if any), the method and its settings."""
        options = self.options
        options.check()
        self.runtime = Runtime.create(options.device, options.precision)
        self.runtime.on_primary(lambda: self.check_files(lock))  # rank 0 writes every file: its file system decides
        if not self.runtime.is_primary:
            self.reporter, self.log = None, quiet
        self.spec: MethodSpec = resolve_method(options.method, options.backbone)
        self.method_config = self.spec.load().make_config(options.method_options)
        self.defaults: TrainDefaults = self.spec.recipe(options.recipe, options.backbone, options.weights)
        self.train_config = TrainConfig.from_defaults(
            self.defaults, options.seed, epochs=options.epochs, lr=options.lr, batch_size=options.batch_size,
            weight_decay=options.weight_decay, keep=options.keep, ema_decay=options.ema_decay,
        )

    @property
    def shots(self) -> int | None:
        return self.options.shots or self.defaults.shots

    # ----- stages ----------------------------------------------------------------------------------------------------
    def build(self) -> Built:
        """Choose the images, load the backbone, build the method around it (seeded) and the loaders."""
        options, runtime = self.options, self.runtime
        data = runtime.on_primary(lambda: load_training_data(options.data_dir, shots=self.shots, seed=options.seed,
                                                             base_classes=options.base_classes))
        for skipped in data.skipped:
            self.log(f"warning: skipped {skipped.path} ({skipped.reason})")
        for warning in data.warnings:
            self.log(f"warning: {warning}")
        self.log(f"loading backbone {options.backbone or FAMILIES[self.spec.family].default_backbone} ...")
        backbone = load_backbone(options.backbone, options.weights, family=self.spec.family)
        small = small_image_note([item.path for item in data.train], backbone.preprocess.size)
        if small:
            self.log(f"warning: {small}")
        seed_everything(options.seed)
        model = self.spec.load()(backbone, data.class_names, self.method_config).to(runtime.device)
        model.set_grad_checkpointing(options.grad_checkpointing)
        runtime.cast_frozen(model)  # every forward of a tune runs under autocast: frozen weights in its dtype once
        note = overlong_note(model)
        if note:
            self.log(f"warning: {note}")
        # The machine's image cache is split between its training processes (each caches every training image).
        train_loader = training_loader(data.train, backbone.preprocess, self.train_config.batch_size, options.seed,
                                       self._workers(), pin_memory=runtime.device.type == "cuda", rank=runtime.rank,
                                       world=runtime.world_size,
                                       cache_bytes=DEFAULT_CACHE_BYTES // runtime.local_world_size)
        val_loader = None
        if data.val:
            val_loader = self._loader(ImageDataset(data.val, build_transform(backbone.preprocess, train=False)))
        return Built(data, backbone, model, train_loader, val_loader, self.identity(data, backbone, model))

    def resume_from(self, built: Built) -> Checkpoint:
        """The checkpoint to continue (rank 0 reads it; every process gets it), refused if it is another run's."""
        names = self._tensor_names(built.model)
        return self.runtime.on_primary(lambda: self.policy.load_for(built.identity, names))

    def prepare(self, built: Built) -> None:
        """The method's data-dependent initialisation (SPT prototypes, SEP class means): one pass, no gradients."""
        model, train, seed = built.model, built.data.train, self.options.seed
        total = model.prepare_images(len(train))
        if not total:
            return
        subset = model.prepare_subset(len(train), seed)
        items = train if subset is None else [train[index] for index in subset]
        eval_transform = build_transform(built.backbone.preprocess, train=False)
        loader = self._loader(ImageDataset(items, eval_transform), shuffle=subset is None, shard=model.prepare_reads_shard)
        self.log(f"initialising {self.spec.name} from {total} training images ...")
        with torch.no_grad(), self.runtime.autocast(), self._prepare_progress(model, total):
            model.prepare(loader, self.runtime, seed)

    def fit(self, built: Built, saved: Checkpoint | None) -> TrainSummary:
        """Train (continuing `saved` when resuming); a stop request saves a checkpoint and raises RunInterrupted."""
        runtime, batch_size = self.runtime, self.train_config.batch_size
        trainer = Trainer(built.model, self.train_config, runtime, steps_per_epoch=len(built.train_loader),
                          compile_step=self.options.compile_step)
        if runtime.distributed:
            self.log(f"{runtime.world_size} processes x batch {batch_size}: {runtime.world_size * batch_size} images "
                     f"per step")
        if saved is not None:
            trainer.restore(saved.tensors, saved.trainer)
            self.log(f"resuming from '{self.policy.folder}' at epoch {trainer.epoch + 1}, step {trainer.progress.step}")

        def save_state(t: Trainer) -> None:
            received = self._received_signal()

            def write() -> None:
                tensors, meta = t.state()
                self.policy.save(Checkpoint(run=built.identity, trainer=meta, tensors=tensors,
                                            stopped_by=signal_name(received)))

            runtime.on_primary(write)  # the others wait until it is written

        try:
            return trainer.fit(built.train_loader, built.val_loader, self.reporter,
                               checkpoint=save_state if self.policy.enabled else None,
                               should_stop=lambda: self.stop.requested)
        except TrainingStopped as stopped:
            steps = math.ceil(len(built.data.train) / (batch_size * runtime.world_size))
            where = f"before epoch {stopped.epoch}" if stopped.step == 0 else \
                f"at epoch {stopped.epoch}, step {stopped.step} of {steps}"
            folder = self.policy.folder if self.policy.enabled else None
            raise RunInterrupted(self._received_signal() or 0, folder, where) from None

    def _received_signal(self) -> int | None:
        """The stop signal a process received (every process stops when any one does, at the same step)."""
        return next((signum for signum in self.runtime.gather(self.stop.received) if signum), None)

    def save(self, built: Built, summary: TrainSummary) -> Path:
        """Rank 0 writes the prompt file (and removes the checkpoint); the others wait for it."""

        def write() -> Path:
            path = self.write_prompt_file(built, summary)
            self.policy.finish()
            return path

        return self.runtime.on_primary(write)

    def write_prompt_file(self, built: Built, summary: TrainSummary) -> Path:
        """The learned tensors plus what a later load needs and how they were trained."""
        cfg, data, runtime = self.train_config, built.data, self.runtime
        training = {
            **summary.to_dict(),
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "weight_decay": cfg.weight_decay,
            "decay_every_tensor": cfg.decay_every_tensor,
            "optimizer": cfg.optimizer,
            "warmup_epochs": cfg.warmup_epochs,
            "recipe": cfg.recipe,
            "keep": cfg.keep,
            "ema_decay": cfg.ema_decay,
            "shots": self.shots,
            "seed": cfg.seed,
            "train_images": len(data.train),
            # a few bytes per image (about 16 in the JSON), so that `eval` can say when it is shown training images
            "train_image_sha256": sorted(filter(None, (content_id(item.path) for item in data.train))),
            "val_images": len(data.val),
            "skipped_files": len(data.skipped) + summary.skipped_images,
            "data_dir": self.options.data_dir.name,
            "device": runtime.device.type,
            "processes": runtime.world_size,
            "precision": runtime.precision,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        prompt_file = PromptFile(
            tensors=built.model.learned_state(),
            method=self.spec.name,
            backbone=built.backbone.describe(),
            class_names=data.class_names,
            hparams=built.model.hparams(),
            preprocess=built.backbone.preprocess.to_dict(),
            training=training,
            promptune_version=__version__,
        )
        return save_prompt_file(self.options.out, prompt_file)

    # ----- helpers ---------------------------------------------------------------------------------------------------
    def identity(self, data: TrainingData, backbone: Backbone, model: PromptMethod) -> dict[str, Any]:
        """What must be the same for a checkpoint to continue this run exactly (not --workers, not --device)."""
        cfg, options = self.train_config, self.options
        return {
            "method": self.spec.name,
            "backbone": backbone.describe(),
            "hparams": model.hparams(),
            "train": {
                "epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
                "seed": cfg.seed, "precision": self.runtime.precision, "optimizer": cfg.optimizer,
                "recipe": cfg.recipe, "keep": cfg.keep, "ema_decay": cfg.ema_decay,
            },
            "shots": options.shots,
            "base_classes": options.base_classes,
            "processes": self.runtime.world_size,
            "classes": data.class_names,
            "train_files": file_fingerprint(options.data_dir, [item.path for item in data.train]),
            "val_files": file_fingerprint(options.data_dir, [item.path for item in data.val]),
        }

    @staticmethod
    def _tensor_names(model: PromptMethod) -> set[str]:
        return {f"param.{name}" for name in trainable_parameters(model)}

    def _workers(self) -> int:
        """Loader processes: --workers, else this process's share of the machine's cores."""
        workers = self.options.workers
        return default_workers(self.runtime.local_world_size) if workers is None else workers

    def _loader(self, dataset: ImageDataset, shuffle: bool = False, shard: bool = True) -> DataLoader | EpochLoader:
        """This process's loader: its share of the images (all of them when not `shard`)."""
        runtime = self.runtime
        return make_loader(dataset, self.train_config.batch_size, shuffle=shuffle, seed=self.options.seed,
                           workers=self._workers(), pin_memory=runtime.device.type == "cuda", rank=runtime.rank if shard else 0,
                           world=runtime.world_size if shard else 1)

    @contextlib.contextmanager
    def _prepare_progress(self, model: PromptMethod, total: int) -> Iterator[None]:
        """Show the method's pass over the training images on the reporter."""
        reporter = self.reporter
        if reporter is None or not total:
            yield
            return
        reporter.prepare_start(total)
        model.prepare_progress = reporter.prepare_step
        try:
            yield
        finally:
            model.prepare_progress = None
            reporter.prepare_end()

    def _result(self, built: Built, path: Path, summary: TrainSummary) -> TuneResult:
        data = built.data
        per_class = {name: 0 for name in data.class_names}
        for item in data.train:
            per_class[data.class_names[item.label]] += 1
        return TuneResult(path, self.spec.name, built.backbone.name, data.class_names, per_class, len(data.val),
                          data.skipped, summary, self.runtime.device.type, self.runtime.cpu_threads,
                          self.runtime.world_size)
