"""Everything the commands do, as plain Python calls: `tune`, `load`, and the loaded model's `evaluate`/`predict`."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from promptune import __version__
from promptune.artifact import PromptFile, load_prompt_file, save_prompt_file
from promptune.backbones import Backbone, backbone_family, load_backbone
from promptune.checkpoint import (
    Checkpoint,
    CheckpointError,
    default_checkpoint_dir,
    file_fingerprint,
    has_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    run_differences,
    save_checkpoint,
)
from promptune.data import (
    Batch,
    EvalData,
    ImageDataset,
    ImageItem,
    Preprocess,
    SkippedFile,
    TrainingData,
    build_transform,
    images_in,
    load_eval_data,
    load_training_data,
    make_loader,
    prompt_name,
    unreadable_reason,
)
from promptune.devices import autocast, configure_backend, resolve_device, resolve_precision
from promptune.errors import BackboneError, DataError, MethodError, PromptFileError, PromptuneError
from promptune.methods import get_method, resolve_method_name
from promptune.methods.base import PromptMethod
from promptune.metrics import BaseNew, confusion_matrix, per_class_accuracy, topk_accuracy
from promptune.stop import RunInterrupted, StopSignals, signal_name
from promptune.reporting import Reporter
from promptune.train import (
    Trainer,
    TrainConfig,
    TrainingStopped,
    TrainSummary,
    seed_everything,
    trainable_parameters,
)

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------------------ tune


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


def _check_positive(name: str, value: float | int | None, minimum: float = 1, maximum: float | None = None) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise PromptuneError(f"{name} must be a finite number, got {value}.")
    if value < minimum or (maximum is not None and value > maximum):
        low = _number(minimum)
        bound = f"between {low} and {_number(maximum)}" if maximum is not None else f"at least {low}"
        raise PromptuneError(f"{name} must be {bound}, got {_number(value)}.")


def _number(value: float | int) -> str:
    """Whole numbers in full (a seed of 2**64 must not read as 1.84467e+19), others short."""
    if isinstance(value, int) and abs(value) < 10**24:
        return str(value)
    return f"{value:g}"


MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 256


def check_loader_options(batch_size: int | None, workers: int | None) -> None:
    """The --batch-size and --workers every command shares; checked before anything is loaded."""
    _check_positive("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    _check_positive("--workers", workers, 0, MAX_WORKERS)


def _check_output(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise PromptuneError(f"--out '{out}' is a folder; give a file name such as prompts.safetensors.")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise PromptuneError(f"--out folder '{parent}' does not exist.")


def _family_for(method: str, backbone: str | None) -> str:
    if backbone is not None:
        return backbone_family(backbone)
    return "vit" if method in ("spt", "vpt") else "clip"


def _train_config(cls: type[PromptMethod], epochs, lr, batch_size, weight_decay, seed, amp_dtype) -> TrainConfig:
    d = cls.defaults
    return TrainConfig(
        epochs=epochs or d.epochs,
        lr=lr or d.lr,
        weight_decay=d.weight_decay if weight_decay is None else weight_decay,
        batch_size=batch_size or d.batch_size,
        warmup_epochs=d.warmup_epochs,
        warmup=d.warmup,
        warmup_lr=d.warmup_lr,
        optimizer=d.optimizer,
        eps=d.eps,
        seed=seed,
        amp_dtype=amp_dtype,
    )


def _writable(folder: Path) -> bool:
    """Could `folder` be written (or created under its nearest existing parent)?"""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.access(existing, os.W_OK | os.X_OK)


def _check_checkpoint_request(folder: Path, checkpoint: bool, resume: bool) -> None:
    """Refuse early what cannot work, before any image is scanned or weights are loaded."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"--checkpoint-dir '{folder}' is a file; give a folder.")
    if resume and not checkpoint:
        raise CheckpointError("--resume needs the run's checkpoint; drop --no-checkpoint.")
    if resume and not has_checkpoint(folder):
        raise CheckpointError(f"Nothing to resume: there is no checkpoint in '{folder}'.")
    if checkpoint and not _writable(folder):
        raise CheckpointError(
            f"Cannot write checkpoints in '{folder}' (permission denied); pass --checkpoint-dir DIR or --no-checkpoint."
        )
    if not resume and checkpoint and has_checkpoint(folder):
        raise CheckpointError(
            f"'{folder}' holds the checkpoint of an unfinished run; add --resume to continue it, or delete that folder "
            f"to start over."
        )


@contextlib.contextmanager
def _prepare_progress(model: PromptMethod, reporter: Reporter | None, total: int) -> Iterator[None]:
    """Show the method's one pass over the training images (SPT prototypes, SEP class means) on the reporter."""
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


def _run_identity(method: str, bb: Backbone, model: PromptMethod, cfg: TrainConfig, data: TrainingData,
                  data_dir: Path, shots: int | None, base_classes: float | None) -> dict[str, Any]:
    """What must be the same for a checkpoint to continue this run exactly (not --workers, not --device)."""
    return {
        "method": method,
        "backbone": bb.describe(),
        "hparams": model.hparams(),
        "train": {
            "epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "precision": str(cfg.amp_dtype).replace("torch.", ""), "optimizer": cfg.optimizer,
        },
        "shots": shots,
        "base_classes": base_classes,
        "classes": data.class_names,
        "train_files": file_fingerprint(data_dir, [item.path for item in data.train]),
        "val_files": file_fingerprint(data_dir, [item.path for item in data.val]),
    }


def _resume_state(folder: Path, run: dict[str, Any], model: PromptMethod) -> Checkpoint:
    saved = load_checkpoint(folder)
    differences = run_differences(saved.run, run)
    if differences:
        raise CheckpointError(
            f"Cannot resume from '{folder}': this run differs from the checkpoint's in {'; '.join(differences)}."
        )
    expected = {f"param.{name}" for name in trainable_parameters(model)}
    if not expected <= saved.tensors.keys():
        raise CheckpointError(f"The checkpoint in '{folder}' is damaged (learned tensors are missing); delete it.")
    return saved


def _where(stopped: TrainingStopped, steps_per_epoch: int) -> str:
    if stopped.step == 0:
        return f"before epoch {stopped.epoch}"
    return f"at epoch {stopped.epoch}, step {stopped.step} of {steps_per_epoch}"


def tune(
    data_dir: str | Path,
    *,
    method: str = "auto",
    backbone: str | None = None,
    weights: str | None = None,
    shots: int | None = None,
    seed: int = 0,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    base_classes: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    out: str | Path = "prompts.safetensors",
    checkpoint: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    handle_signals: bool = True,
    grad_checkpointing: bool = False,
    compile_step: bool = False,
    options: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    log: Log = _quiet,
) -> TuneResult:
    """Learn prompts for the classes in `data_dir` and write them to `out` (atomically).

    `grad_checkpointing` recomputes the frozen blocks' activations in the backward pass (less memory, ~1.3x the
    step time); `compile_step` runs the training loss through `torch.compile` (worth it on CUDA for long runs).
    With `checkpoint`, the run's state is saved in `checkpoint_dir` (default: beside `out`) after every epoch and on
    SIGINT/SIGTERM (then `RunInterrupted` is raised); `resume` continues from it, ending with the same prompt tensors
    as an uninterrupted run. The checkpoint is removed once the prompt file is written.
    """
    _check_positive("--shots", shots)
    _check_positive("--epochs", epochs, 1, 100_000)
    check_loader_options(batch_size, workers)
    _check_positive("--lr", lr, 1e-12, 100.0)
    _check_positive("--weight-decay", weight_decay, 0.0, 100.0)
    _check_positive("--seed", seed, 0, 2**64 - 1)  # torch seeds are unsigned 64-bit
    out = Path(out)
    _check_output(out)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir(out)
    _check_checkpoint_request(folder, checkpoint, resume)
    torch_device = resolve_device(device)
    amp_dtype = resolve_precision(torch_device, precision)
    threads = configure_backend(torch_device)

    family = _family_for(method, backbone)
    method_name = resolve_method_name(method, family)
    cls = get_method(method_name)
    if cls.family != family:
        raise MethodError(f"Method '{method_name}' needs a {cls.family.upper()} backbone, but '{backbone}' is a {family.upper()} backbone.")
    config = cls.make_config({k: v for k, v in (options or {}).items() if v is not None})
    cfg = _train_config(cls, epochs, lr, batch_size, weight_decay, seed, amp_dtype)

    with StopSignals(enabled=handle_signals) as stop:
        data = load_training_data(Path(data_dir), shots=shots or cls.defaults.shots, seed=seed, base_classes=base_classes)
        for skipped in data.skipped:
            log(f"warning: skipped {skipped.path} ({skipped.reason})")
        for warning in data.warnings:
            log(f"warning: {warning}")
        log(f"loading backbone {backbone or '(default)'} ...")
        bb = load_backbone(backbone, weights, family=family)
        seed_everything(seed)
        model = cls(bb, data.class_names, config).to(torch_device)
        model.set_grad_checkpointing(grad_checkpointing)
        note = overlong_note(model)
        if note:
            log(f"warning: {note}")
        run = _run_identity(method_name, bb, model, cfg, data, Path(data_dir), shots, base_classes)
        saved = _resume_state(folder, run, model) if resume else None

        pin = torch_device.type == "cuda"
        train_set = ImageDataset(data.train, build_transform(bb.preprocess, train=True))
        eval_transform = build_transform(bb.preprocess, train=False)
        train_loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=seed, workers=workers, pin_memory=pin)
        val_loader = (
            make_loader(ImageDataset(data.val, eval_transform), cfg.batch_size, shuffle=False, workers=workers, pin_memory=pin)
            if data.val else None
        )
        if saved is None:
            prepare_loader = make_loader(ImageDataset(data.train, eval_transform), cfg.batch_size, shuffle=True,
                                         seed=seed, workers=workers, pin_memory=pin)
            total = model.prepare_images(len(data.train))
            if total:
                log(f"initialising {method_name} from {total} training images ...")
            with torch.no_grad(), autocast(torch_device, amp_dtype), _prepare_progress(model, reporter, total):
                model.prepare(prepare_loader, torch_device, seed)

        trainer = Trainer(model, cfg, torch_device, steps_per_epoch=len(train_loader), compile_step=compile_step)
        if saved is not None:
            trainer.restore(saved.tensors, saved.trainer)
            log(f"resuming from '{folder}' at epoch {trainer.epoch + 1}, step {trainer.progress.step}")

        def save_state(t: Trainer) -> None:
            tensors, meta = t.state()
            stopped_by = signal_name(stop.received) if stop.requested else None
            save_checkpoint(folder, Checkpoint(run=run, trainer=meta, tensors=tensors, stopped_by=stopped_by))

        with stop.deferred():
            try:
                summary = trainer.fit(train_loader, val_loader, reporter, checkpoint=save_state if checkpoint else None,
                                      should_stop=lambda: stop.requested)
            except TrainingStopped as stopped:
                where = _where(stopped, math.ceil(len(train_set) / cfg.batch_size))
                raise RunInterrupted(stop.received or 0, folder if checkpoint else None, where) from None
            path = _write_prompt_file(out, method_name, bb, model, data, cfg, summary, shots or cls.defaults.shots,
                                      Path(data_dir).name, torch_device, amp_dtype)
            if checkpoint:
                remove_checkpoint(folder)
    per_class = {name: 0 for name in data.class_names}
    for item in data.train:
        per_class[data.class_names[item.label]] += 1
    return TuneResult(path, method_name, bb.name, data.class_names, per_class, len(data.val), data.skipped, summary,
                      torch_device.type, threads)


def _write_prompt_file(out: Path, method_name: str, bb: Backbone, model: PromptMethod, data: TrainingData,
                       cfg: TrainConfig, summary: TrainSummary, shots: int | None, data_name: str,
                       device: torch.device, amp_dtype: torch.dtype) -> Path:
    training = {
        **summary.to_dict(),
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "weight_decay": cfg.weight_decay,
        "optimizer": cfg.optimizer,
        "shots": shots,
        "seed": cfg.seed,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "skipped_files": len(data.skipped) + summary.skipped_images,
        "data_dir": data_name,
        "device": device.type,
        "precision": str(amp_dtype).replace("torch.", ""),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    prompt_file = PromptFile(
        tensors=model.learned_state(),
        method=method_name,
        backbone=bb.describe(),
        class_names=data.class_names,
        hparams=model.hparams(),
        preprocess=bb.preprocess.to_dict(),
        training=training,
        promptune_version=__version__,
    )
    return save_prompt_file(out, prompt_file)


# ------------------------------------------------------------------------------------------------------------ load


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "predictions": [{"label": l, "probability": round(p, 6)} for l, p in zip(self.labels, self.probabilities)]}


@dataclass
class EvalReport:
    class_names: list[str]
    n_images: int
    top1: float
    top5: float
    per_class: dict[str, float | None]
    confusion: list[list[int]]
    zero_shot_top1: float | None = None
    base_new: BaseNew | None = None
    zero_shot_base_new: BaseNew | None = None
    skipped: list[str] = field(default_factory=list)
    skip_reasons: dict[str, str] = field(default_factory=dict)  # skipped path -> why it could not be decoded
    misclassified: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "n_images": self.n_images,
            "n_classes": len(self.class_names),
            "top1": self.top1,
            "top5": self.top5,
            "per_class": self.per_class,
        }
        if self.zero_shot_top1 is not None:
            result["zero_shot_top1"] = self.zero_shot_top1
        if self.base_new is not None:
            result.update(base_top1=self.base_new.base, new_top1=self.base_new.new, hm=self.base_new.hm)
        if self.zero_shot_base_new is not None:
            zs = self.zero_shot_base_new
            result.update(zero_shot_base_top1=zs.base, zero_shot_new_top1=zs.new, zero_shot_hm=zs.hm)
        result["skipped"] = self.skipped
        return result


def check_predict_options(top_k: int, batch_size: int, workers: int | None) -> None:
    if top_k < 1:
        raise PromptuneError(f"--top-k must be at least 1, got {top_k}.")
    check_loader_options(batch_size, workers)


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


def _check_backbone_matches(stored: dict[str, Any], loaded: Backbone) -> None:
    if stored.get("shape") and stored["shape"] != loaded.shape:
        raise PromptFileError(
            f"The prompt file was tuned on backbone '{stored.get('name')}' with shape {stored['shape']}, "
            f"but '{loaded.name}' has shape {loaded.shape}."
        )
    if stored.get("weights_sha256") and loaded.weights_sha256 and stored["weights_sha256"] != loaded.weights_sha256:
        raise PromptFileError(
            f"The prompt file was tuned on weights '{stored.get('weights')}' (sha256 {stored['weights_sha256'][:12]}...), "
            f"but '{loaded.weights}' differs (sha256 {loaded.weights_sha256[:12]}...)."
        )


def _resolve_weights(stored: dict[str, Any], weights: str | None) -> str | None:
    if weights is not None:
        return weights
    if not stored.get("weights_sha256"):
        return stored.get("weights")
    hint = stored.get("weights_path")
    if hint and Path(hint).is_file():
        return hint
    raise PromptFileError(
        f"The prompt file was tuned on the local weights file '{stored.get('weights')}'; pass it with --weights PATH."
    )


class TunedModel:
    """A prompt file loaded onto its backbone, ready to classify."""

    def __init__(self, prompt_file: PromptFile, method: PromptMethod, backbone: Backbone, device: torch.device,
                 amp_dtype: torch.dtype) -> None:
        self.prompt_file = prompt_file
        self.method = method
        self.backbone = backbone
        self.device = device
        self.amp_dtype = amp_dtype
        self.preprocess = Preprocess.from_dict(prompt_file.preprocess)
        self.transform = build_transform(self.preprocess, train=False)
        self.on_warning: Callable[[str], None] = lambda message: warnings.warn(message, stacklevel=3)
        self.on_progress: Callable[[int, int], None] | None = None  # (images done in this batch, images in all)
        self._warned: set[str] = set()

    @property
    def trained_classes(self) -> list[str]:
        return self.prompt_file.class_names

    def describe(self) -> str:
        pf = self.prompt_file
        t = pf.training
        trained = f"{t.get('train_images', '?')} images of '{t.get('data_dir', '?')}'"
        when = t.get("finished_at", "unknown date")
        return (f"{pf.method} prompts on {pf.backbone.get('name')} ({pf.backbone.get('weights')}), "
                f"{len(pf.class_names)} classes, trained on {trained}, {when}")

    def set_classes(self, class_names: Sequence[str] | None) -> list[str]:
        names = list(class_names) if class_names else self.trained_classes
        if not names or all(not prompt_name(n) for n in names):
            raise MethodError("--classes is empty; give at least one class name.")
        if any(not prompt_name(n) for n in names):
            raise MethodError("--classes has an empty class name; give every class a name.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MethodError(f"--classes has duplicate names: {', '.join(duplicates)}.")
        self.method.set_classes(names)
        note = overlong_note(self.method)
        if note and note not in self._warned:  # once per message, not once per predict call
            self._warned.add(note)
            self.on_warning(note)
        return names

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return self.method(images.to(self.device)).float()

    def _loader(self, items: list[ImageItem], batch_size: int, workers: int | None):
        pin = self.device.type == "cuda"
        return make_loader(ImageDataset(items, self.transform), batch_size, shuffle=False, workers=workers, pin_memory=pin)

    def predict(self, paths: Sequence[str], top_k: int = 5, classes: Sequence[str] | None = None, batch_size: int = 32,
                workers: int | None = None) -> tuple[list[Prediction], list[str]]:
        """Top-k predictions for images, folders or globs; returns (predictions, problems)."""
        check_predict_options(top_k, batch_size, workers)
        names = self.set_classes(classes)
        found, missing = images_in(paths)
        problems = [f"{m}: no such file or image." for m in missing]
        items = [ImageItem(path, 0) for path in found]
        predictions: list[Prediction] = []
        if items:
            k = min(top_k, len(names))
            self.method.eval()
            for batch in self._loader(items, batch_size, workers):
                self._advance(batch, len(items))
                for i in batch.failed:
                    problems.append(f"{items[i].path}: unreadable image ({unreadable_reason(items[i].path)}).")
                if batch.labels.numel() == 0:
                    continue
                probs = self.logits(batch.images).softmax(dim=-1)
                top = probs.topk(k, dim=-1)
                for row, index in enumerate(batch.indices.tolist()):
                    predictions.append(Prediction(str(items[index].path), [names[j] for j in top.indices[row].tolist()],
                                                  top.values[row].tolist()))
        return predictions, problems

    def evaluate(self, data_dir: str | Path, batch_size: int = 64, zero_shot: bool = True, workers: int | None = None) -> EvalReport:
        check_loader_options(batch_size, workers)
        data: EvalData = load_eval_data(Path(data_dir))
        names, labels_map = self._eval_classes(data.class_names)
        self.method.eval()
        baseline = self._zero_shot(names) if zero_shot and self.backbone.family == "clip" else None
        all_logits, all_zs, all_labels, all_index, skipped = [], [], [], [], []
        for batch in self._loader(data.items, batch_size, workers):
            self._advance(batch, len(data.items))
            skipped += [str(data.items[i].path) for i in batch.failed]
            if batch.labels.numel() == 0:
                continue
            all_logits.append(self.logits(batch.images).cpu())
            if baseline is not None:
                with autocast(self.device, self.amp_dtype):
                    all_zs.append(baseline(batch.images.to(self.device)).float().cpu())
            all_labels.append(torch.tensor([labels_map[int(l)] for l in batch.labels]))
            all_index += batch.indices.tolist()
        if not all_labels:
            raise DataError(f"No readable images to evaluate in '{data_dir}'.")
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        predicted = logits.argmax(dim=1)
        confusion = confusion_matrix(predicted, labels, len(names))
        report = EvalReport(
            class_names=names, n_images=int(labels.numel()), top1=topk_accuracy(logits, labels, 1),
            top5=topk_accuracy(logits, labels, 5), per_class=per_class_accuracy(confusion, names),
            confusion=confusion.tolist(), skipped=skipped,
            skip_reasons={path: unreadable_reason(Path(path)) for path in skipped},
            misclassified=[{"path": str(data.items[i].path), "true": names[int(t)], "predicted": names[int(p)]}
                           for i, t, p in zip(all_index, labels, predicted) if t != p],
        )
        zs_logits = torch.cat(all_zs) if all_zs else None
        if zs_logits is not None:
            report.zero_shot_top1 = topk_accuracy(zs_logits, labels, 1)
        base = [i for i, n in enumerate(names) if n in self.trained_classes]
        new = [i for i, n in enumerate(names) if n not in self.trained_classes]
        if base and new:
            report.base_new = BaseNew.compute(logits, labels, base, new)
            if zs_logits is not None:
                report.zero_shot_base_new = BaseNew.compute(zs_logits, labels, base, new)
        return report

    def _advance(self, batch: Batch, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(int(batch.labels.numel()) + len(batch.failed), total)

    def _eval_classes(self, folder_classes: list[str]) -> tuple[list[str], dict[int, int]]:
        """Class list to classify into, and folder label -> column."""
        if self.method.open_vocabulary:
            self.set_classes(folder_classes)
            return folder_classes, {i: i for i in range(len(folder_classes))}
        unknown = [c for c in folder_classes if c not in self.trained_classes]
        if unknown:
            raise DataError(
                f"Class folder(s) {', '.join(unknown)} were not among the {len(self.trained_classes)} trained classes; "
                f"a '{self.prompt_file.method}' prompt file only knows its trained classes."
            )
        self.set_classes(None)
        return self.trained_classes, {i: self.trained_classes.index(c) for i, c in enumerate(folder_classes)}

    def _zero_shot(self, names: list[str]):
        from promptune.methods.zeroshot import ZeroShotCLIP

        return ZeroShotCLIP(self.backbone, names, self.method.zero_shot_templates()).to(self.device).eval()


def load(prompts: str | Path, *, backbone: str | None = None, weights: str | None = None, device: str = "auto",
         precision: str = "auto") -> TunedModel:
    """Load a prompt file onto its backbone (from its hub tag, the stored local path, or `weights`)."""
    prompt_file = load_prompt_file(prompts)
    torch_device = resolve_device(device)
    amp_dtype = resolve_precision(torch_device, precision)
    configure_backend(torch_device)
    try:
        cls = get_method(prompt_file.method)
    except MethodError:
        raise PromptFileError(f"Prompt file '{prompts}' uses unknown method '{prompt_file.method}'.") from None
    stored = prompt_file.backbone
    if stored.get("family") is not None and stored.get("family") != cls.family:
        raise PromptFileError(
            f"Prompt file '{prompts}' names method '{prompt_file.method}' (for {cls.family.upper()} backbones) but a "
            f"{str(stored.get('family')).upper()} backbone '{stored.get('name')}'; the file is corrupt."
        )
    name = backbone or stored.get("name")
    if not isinstance(name, str) or not name:
        raise PromptFileError(f"Prompt file '{prompts}' does not name its backbone.")
    if backbone is not None and backbone != stored.get("name") and Path(backbone).name != stored.get("name"):
        raise PromptFileError(f"Prompt file '{prompts}' was tuned on backbone '{stored.get('name')}', not '{backbone}'.")
    try:
        bb = load_backbone(name, _resolve_weights(stored, weights), family=cls.family,
                           stored_config=stored.get("clip_config") if backbone is None else None)
    except BackboneError as error:
        raise error
    _check_backbone_matches(stored, bb)
    config = cls.make_config(prompt_file.hparams, error=PromptFileError)
    model = cls(bb, prompt_file.class_names, config)
    model.load_learned_state(prompt_file.tensors)
    model.to(torch_device).eval()
    return TunedModel(prompt_file, model, bb, torch_device, amp_dtype)
