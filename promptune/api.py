"""Everything the commands do, as plain Python calls: `tune`, `load`, and the loaded model's `evaluate`/`predict`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from promptune.artifact import PromptFile, load_prompt_file
from promptune.backbones import Backbone, load_backbone
from promptune.backbones.skip_init import build_loaded
from promptune.data import (
    Batch,
    EvalData,
    ImageDataset,
    ImageItem,
    Preprocess,
    build_transform,
    check_distinct_class_names,
    default_workers,
    load_eval_data,
    make_loader,
    prediction_items,
    prompt_name,
)
from promptune.errors import BackboneError, DataError, MethodError, PromptFileError
from promptune.fileio import content_id
from promptune.methods import get_method
from promptune.methods.base import PromptMethod, overlong_note
from promptune.metrics import (
    BaseNew,
    balanced_accuracy,
    confusion_matrix,
    majority_baseline,
    per_class_accuracy,
    rounded,
    top5_accuracy,
    topk_accuracy,
)
from promptune.options import check_loader_options, check_predict_options
from promptune.reporting import Reporter
from promptune.run import Log, TuneOptions, TuneResult, TuneRun, quiet
from promptune.runtime import Runtime

# ------------------------------------------------------------------------------------------------------------ tune


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
    keep: str = "last",
    recipe: str = "default",
    ema_decay: float | None = None,
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
    log: Log = quiet,
) -> TuneResult:
    """Learn prompts for the classes in `data_dir` and write them to `out` (atomically); see `promptune.run.TuneRun`.

    `grad_checkpointing` recomputes the frozen blocks' activations in the backward pass (less memory, ~1.3x the
    step time); `compile_step` runs the training step through `torch.compile`, captured as CUDA graphs on one CUDA
    GPU (`promptune.train.compile_mode`; the first step waits for the compilation, which only long runs repay).
    With `checkpoint`, the run's state is saved in `checkpoint_dir` (default: beside `out`) after every epoch and on
    SIGINT/SIGTERM (then `RunInterrupted` is raised); `resume` continues from it, ending with the same prompt tensors
    as an uninterrupted run. The checkpoint is removed once the prompt file is written.

    `keep` chooses the epoch whose tensors are written: "last" (as the papers) or "best" (validation accuracy, never a
    warm-up epoch). `recipe="paper"` takes the settings left as None from the authors' code instead of promptune's
    defaults (`promptune.methods.registry.RECIPES`). `ema_decay` > 0 validates and writes a moving average of the
    learned tensors, updated after every step.
    """
    run_options = TuneOptions(
        Path(data_dir), method=method, backbone=backbone, weights=weights, shots=shots, seed=seed, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, keep=keep, recipe=recipe, ema_decay=ema_decay,
        base_classes=base_classes, device=device,
        precision=precision, workers=workers, out=Path(out), checkpoint=checkpoint,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None, resume=resume,
        handle_signals=handle_signals, grad_checkpointing=grad_checkpointing, compile_step=compile_step,
        method_options={k: v for k, v in (options or {}).items() if v is not None},
    )
    return TuneRun(run_options, reporter, log).run()


# ------------------------------------------------------------------------------------------------------------ load


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]

    def to_dict(self) -> dict[str, Any]:
        """Probabilities rounded like every JSON float promptune writes (`metrics.rounded`)."""
        return {"path": self.path, "predictions": [{"label": l, "probability": rounded(p)} for l, p in zip(self.labels, self.probabilities)]}


@dataclass
class EvalReport:
    class_names: list[str]  # the classes classified into (columns of `confusion`)
    n_images: int
    top1: float
    top5: float | None  # None with 5 classes or fewer, where the true class is always among the top 5
    per_class: dict[str, float | None]
    confusion: list[list[int]]  # (true, predicted) counts
    zero_shot_top1: float | None = None
    base_new: BaseNew | None = None
    zero_shot_base_new: BaseNew | None = None
    skipped: list[str] = field(default_factory=list)
    skip_reasons: dict[str, str] = field(default_factory=dict)  # skipped path -> why it could not be decoded
    misclassified: list[dict[str, str]] = field(default_factory=list)
    zero_shot_balanced_accuracy: float | None = None
    split: str = "all"  # the images evaluated: "test" (test/), "val" (val/, no test/) or "all" (the whole folder)
    new_classes: list[str] = field(default_factory=list)  # evaluated classes the prompt file was not trained on
    training_images: int | None = None  # evaluated images it was trained on (None: the prompt file does not record them)

    @property
    def balanced_accuracy(self) -> float | None:
        """Mean per-class recall: low when a model answers the big classes only, however high top-1 is."""
        return balanced_accuracy(torch.tensor(self.confusion))

    @property
    def majority_baseline(self) -> float | None:
        """Top-1 of always answering the most frequent class: what top-1 has to beat."""
        return majority_baseline(torch.tensor(self.confusion))

    def __repr__(self) -> str:
        """Headline figures and counts only: never the per-class table, the matrix or every misclassified path."""
        figures = {"top1": self.top1, "balanced_accuracy": self.balanced_accuracy, "top5": self.top5,
                   "majority_baseline": self.majority_baseline, "zero_shot_top1": self.zero_shot_top1}
        shown = ", ".join(f"{name}={rounded(value, 4)}" for name, value in figures.items() if value is not None)
        return (f"EvalReport(split={self.split!r}, n_images={self.n_images}, n_classes={len(self.class_names)}, "
                f"{shown}, misclassified={len(self.misclassified)}, skipped={len(self.skipped)})")

    def to_dict(self) -> dict[str, Any]:
        """Everything `eval --json` prints and metrics.json holds; floats rounded (`metrics.rounded`)."""
        result: dict[str, Any] = {
            "split": self.split,
            "n_images": self.n_images,
            "n_classes": len(self.class_names),
            "top1": self.top1,
            "balanced_accuracy": self.balanced_accuracy,
            "majority_baseline": self.majority_baseline,
            "top5": self.top5,
            "per_class": self.per_class,
            "new_classes": self.new_classes,
            "training_images": self.training_images,
        }
        if self.zero_shot_top1 is not None:
            result.update(zero_shot_top1=self.zero_shot_top1,
                          zero_shot_balanced_accuracy=self.zero_shot_balanced_accuracy)
        if self.base_new is not None:
            result.update(base_top1=self.base_new.base, new_top1=self.base_new.new, hm=self.base_new.hm)
        if self.zero_shot_base_new is not None:
            zs = self.zero_shot_base_new
            result.update(zero_shot_base_top1=zs.base, zero_shot_new_top1=zs.new, zero_shot_hm=zs.hm)
        result["skipped"] = self.skipped
        return rounded(result)


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


@dataclass
class Scored:
    """What `TunedModel` computed over a list of images: the decoded ones' indices and outputs (rows in the same
    order), and the (index, reason) of those that could not be decoded."""

    indices: list[int]
    outputs: dict[str, torch.Tensor]
    failed: list[tuple[int, str]]

    @classmethod
    def merge(cls, shares: list[Scored]) -> Scored:
        """The shares of all processes as one, in index order."""
        indices = [index for share in shares for index in share.indices]
        order = torch.tensor(indices, dtype=torch.long).argsort()
        outputs = {name: torch.cat([share.outputs[name] for share in shares if share.indices])[order]
                   for name in next((share.outputs for share in shares if share.indices), {})}
        failed = sorted(entry for share in shares for entry in share.failed)
        return cls(sorted(indices), outputs, failed)


_SEPARATORS = (";", "|", "\t")  # what else people separate lists with


def _separator_in(name: str) -> str | None:
    return next((separator for separator in _SEPARATORS if separator in name), None)


def _check_class_list(names: list[str]) -> None:
    """One class name would be every image's answer with 100%: mostly a list written with the wrong separator."""
    if len(names) > 1:
        return
    separator = _separator_in(names[0])
    if separator:
        raise MethodError(f"--classes '{names[0]}' is one class name, since names are separated by commas, not "
                          f"'{separator}'; write '{names[0].replace(separator, ',')}'.")
    raise MethodError(f"--classes names one class ('{names[0]}'), which every image would get with 100%; give at "
                      f"least two, separated by commas.")


class TunedModel:
    """A prompt file loaded onto its backbone, ready to classify."""

    def __init__(self, prompt_file: PromptFile, method: PromptMethod, backbone: Backbone, runtime: Runtime) -> None:
        self.prompt_file = prompt_file
        self.method = method
        self.backbone = backbone
        self.runtime = runtime
        self.preprocess = Preprocess.from_dict(prompt_file.preprocess)
        self.transform = build_transform(self.preprocess, train=False)
        self.on_warning: Callable[[str], None] = lambda message: warnings.warn(message, stacklevel=3)
        self.on_progress: Callable[[int, int], None] | None = None  # (images done in this batch, images in all)
        self._warned: set[str] = set()

    @property
    def trained_classes(self) -> list[str]:
        return self.prompt_file.class_names

    def describe(self, evaluating: EvalData | None = None) -> str:
        """One line on the prompt file; with `evaluating`, also which images are evaluated and how many of their
        classes were trained (for CLIP prompt files, a folder may hold only new ones)."""
        pf = self.prompt_file
        t = pf.training
        trained = f"{t.get('train_images', '?')} images of '{t.get('data_dir', '?')}'"
        when = t.get("finished_at", "unknown date")
        line = (f"{pf.method} prompts on {pf.backbone.get('name')} ({pf.backbone.get('weights')}), "
                f"{len(pf.class_names)} classes, trained on {trained}, {when}")
        if evaluating is None:
            return line
        return (f"{line}; evaluating {len(evaluating.items)} images in '{evaluating.root}', "
                f"{self._overlap_note(evaluating.class_names)}")

    def _overlap_note(self, folder_classes: list[str]) -> str:
        new = self._new_classes(folder_classes)
        count = f"{len(folder_classes)} class{'es' if len(folder_classes) != 1 else ''}"
        if not new:
            return f"{count}, all trained"
        if len(new) == len(folder_classes):
            return f"{count}, none of them trained (all new)"
        return f"{count}: {len(folder_classes) - len(new)} trained, {len(new)} new"

    def _new_classes(self, folder_classes: list[str]) -> list[str]:
        trained = set(self.trained_classes)
        return [name for name in folder_classes if name not in trained]

    def set_classes(self, class_names: Sequence[str] | None) -> list[str]:
        """Classify into `class_names` (predict's --classes; CLIP methods), or the trained classes when None."""
        names = list(class_names) if class_names else self.trained_classes
        if not names or all(not prompt_name(n) for n in names):
            raise MethodError("--classes is empty; give at least two class names, separated by commas.")
        if any(not prompt_name(n) for n in names):
            raise MethodError("--classes has an empty class name; give every class a name.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MethodError(f"--classes has duplicate names: {', '.join(duplicates)}.")
        if class_names:
            _check_class_list(names)
            check_distinct_class_names(names, "--classes names", "give each class once", MethodError)
            for name in names:
                separator = _separator_in(name)
                if separator:
                    self._warn_once(f"class name '{name}' contains '{separator}'; --classes separates names with "
                                    f"commas, so if it is several classes, write '{name.replace(separator, ',')}'.")
        return self._use_classes(names)

    def _use_classes(self, names: list[str]) -> list[str]:
        self.method.set_classes(names)
        note = overlong_note(self.method)
        if note:
            self._warn_once(note)
        return names

    def _warn_once(self, message: str) -> None:
        """Once per message, not once per predict call."""
        if message not in self._warned:
            self._warned.add(message)
            self.on_warning(message)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return self.method(images.to(self.runtime.device)).float()

    def _loader(self, items: list[ImageItem], batch_size: int, workers: int | None):
        """This process's share of `items`: whole batches, every world-th one (all of them in a plain run).

        By default one batch is read in this process: a worker would have nothing to overlap with it, and would
        only add its start to the wait (with several batches, workers read the next ones while one is scored).
        """
        runtime = self.runtime
        if workers is None:
            workers = 0 if len(items) <= batch_size else default_workers(runtime.local_world_size)
        return make_loader(ImageDataset(items, self.transform), batch_size, shuffle=False, workers=workers,
                           pin_memory=runtime.device.type == "cuda", rank=runtime.rank, world=runtime.world_size)

    def _over_images(self, items: list[ImageItem], batch_size: int, workers: int | None,
                     score: Callable[[Batch], dict[str, torch.Tensor]]) -> Scored:
        """`score(batch)` over this process's batches of `items`, then every process's results in item order.

        Each process scores the very batches a single process would score, so the gathered outputs equal one
        process's, row for row.
        """
        loader = self._loader(items, batch_size, workers)
        total = sum(len(indices) for indices in loader.batch_sampler)  # the images this process reads
        indices: list[int] = []
        outputs: dict[str, list[torch.Tensor]] = {}
        failed: list[tuple[int, str]] = []
        for batch in loader:
            if self.on_progress is not None:
                self.on_progress(int(batch.labels.numel()) + len(batch.failed), total)
            failed += batch.failed
            if batch.labels.numel() == 0:
                continue
            indices += batch.indices.tolist()
            for name, value in score(batch).items():
                outputs.setdefault(name, []).append(value.cpu())
        share = Scored(indices, {name: torch.cat(values) for name, values in outputs.items()}, failed)
        return Scored.merge(self.runtime.gather(share))

    def predict(self, inputs: Any, top_k: int = 5, classes: Sequence[str] | None = None, batch_size: int = 32,
                workers: int | None = None) -> tuple[list[Prediction], list[str]]:
        """The top-k classes of each image.

        `inputs` is one input or a list of them: a path (str or Path) of an image file, a folder (its images,
        recursively) or a glob pattern; a PIL image; or an image tensor, (C, H, W) or a batch (B, C, H, W), RGB or one
        channel, uint8 in [0, 255] or float in [0, 1] and *not* normalised: tensors and PIL images get the same resize,
        crop and normalisation as image files (a float tensor is rounded to 8 bits first, as a saved PNG would be).
        Anything else is a `PromptuneError` naming its type.

        Returns `(predictions, problems)`. `predictions` holds one `Prediction` per readable image, in input order (a
        folder's images sorted): `path` (the file, or "<image N>" for the N-th in-memory image), `labels` (the top-k
        class names, best first) and `probabilities` (their softmax probabilities over all the classes classified
        into). `problems` holds one sentence per input that gave no prediction (no such file, a folder without images,
        an unreadable image).
        """
        check_predict_options(top_k, batch_size, workers)
        names = self.set_classes(classes)
        items, problems = prediction_items(inputs)
        if not items:
            return [], problems
        k = min(top_k, len(names))
        self.method.eval()

        def score(batch: Batch) -> dict[str, torch.Tensor]:
            top = self.logits(batch.images).softmax(dim=-1).topk(k, dim=-1)
            return {"probabilities": top.values, "labels": top.indices}

        scored = self._over_images(items, batch_size, workers, score)
        problems += [f"{items[i].path}: unreadable image ({reason})." for i, reason in scored.failed]
        rows = zip(scored.indices, scored.outputs.get("labels", []), scored.outputs.get("probabilities", []))
        predictions = [Prediction(str(items[index].path), [names[j] for j in labels.tolist()], values.tolist())
                       for index, labels, values in rows]
        return predictions, problems

    def evaluate(self, data_dir: str | Path | EvalData, batch_size: int = 64, zero_shot: bool = True,
                 workers: int | None = None) -> EvalReport:
        """Accuracy on a labelled folder (its test/, else val/, else the whole folder), or on `load_eval_data`'s
        result for that folder."""
        check_loader_options(batch_size, workers)
        data = data_dir if isinstance(data_dir, EvalData) else load_eval_data(Path(data_dir))
        names, labels_map = self._eval_classes(data.class_names)
        self.method.eval()
        baseline = self._zero_shot(names) if zero_shot and self.backbone.family == "clip" else None

        def score(batch: Batch) -> dict[str, torch.Tensor]:
            outputs = {"logits": self.logits(batch.images),
                       "labels": torch.tensor([labels_map[int(label)] for label in batch.labels])}
            if baseline is not None:
                with self.runtime.autocast():
                    outputs["zero_shot"] = baseline(batch.images.to(self.runtime.device)).float()
            return outputs

        scored = self._over_images(data.items, batch_size, workers, score)
        skip_reasons = {str(data.items[i].path): reason for i, reason in scored.failed}
        if not scored.indices:
            raise DataError(f"No readable images to evaluate in '{data.root}'.")
        logits, labels = scored.outputs["logits"], scored.outputs["labels"]
        predicted = logits.argmax(dim=1)
        confusion = confusion_matrix(predicted, labels, len(names))
        report = EvalReport(
            class_names=names, n_images=int(labels.numel()), top1=topk_accuracy(logits, labels, 1),
            top5=top5_accuracy(logits, labels), per_class=per_class_accuracy(confusion, names),
            confusion=confusion.tolist(), skipped=list(skip_reasons), skip_reasons=skip_reasons,
            misclassified=[{"path": str(data.items[i].path), "true": names[int(t)], "predicted": names[int(p)]}
                           for i, t, p in zip(scored.indices, labels, predicted) if t != p],
            split=data.split, new_classes=self._new_classes(data.class_names),
            training_images=self._training_images(data.items),
        )
        if report.training_images:
            self.on_warning(f"{report.training_images} of the {len(data.items)} evaluated images were used to train "
                            f"this prompt file, so these figures overstate its accuracy on new images.")
        zs_logits = scored.outputs.get("zero_shot")
        if zs_logits is not None:
            report.zero_shot_top1 = topk_accuracy(zs_logits, labels, 1)
            report.zero_shot_balanced_accuracy = balanced_accuracy(
                confusion_matrix(zs_logits.argmax(dim=1), labels, len(names)))
        base = [i for i, n in enumerate(names) if n in self.trained_classes]
        new = [i for i, n in enumerate(names) if n not in self.trained_classes]
        if base and new:
            report.base_new = BaseNew.compute(logits, labels, base, new)
            if zs_logits is not None:
                report.zero_shot_base_new = BaseNew.compute(zs_logits, labels, base, new)
        return report

    def _training_images(self, items: list[ImageItem]) -> int | None:
        """How many of `items` have the content of a training image (None: the prompt file does not record them)."""
        recorded = self.prompt_file.training.get("train_image_sha256")
        if not isinstance(recorded, list):
            return None
        trained = set(recorded)
        return sum(content_id(item.path) in trained for item in items)

    def _eval_classes(self, folder_classes: list[str]) -> tuple[list[str], dict[int, int]]:
        """Class list to classify into, and folder label -> column."""
        if self.method.open_vocabulary:
            self._use_classes(folder_classes)  # class folders: distinct and named, checked when they were read
            return folder_classes, {i: i for i in range(len(folder_classes))}
        unknown = [c for c in folder_classes if c not in self.trained_classes]
        if unknown:
            raise DataError(
                f"Class folder(s) {', '.join(unknown)} were not among the {len(self.trained_classes)} trained classes; "
                f"a '{self.prompt_file.method}' prompt file only knows its trained classes."
            )
        self._use_classes(self.trained_classes)
        return self.trained_classes, {i: self.trained_classes.index(c) for i, c in enumerate(folder_classes)}

    def _zero_shot(self, names: list[str]):
        from promptune.methods.zeroshot import ZeroShotCLIP

        return ZeroShotCLIP(self.backbone, names, self.method.zero_shot_templates()).to(self.runtime.device).eval()


def _with_learned_state(model: PromptMethod, tensors: dict[str, torch.Tensor]) -> PromptMethod:
    model.load_learned_state(tensors)
    return model


def load(prompts: str | Path, *, backbone: str | None = None, weights: str | None = None, device: str = "auto",
         precision: str = "auto") -> TunedModel:
    """Load a prompt file onto its backbone (from its hub tag, the stored local path, or `weights`)."""
    prompt_file = load_prompt_file(prompts)
    runtime = Runtime.create(device, precision)
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
    model = build_loaded(lambda: _with_learned_state(cls(bb, prompt_file.class_names, config), prompt_file.tensors))
    model.to(runtime.device).eval()
    return TunedModel(prompt_file, model, bb, runtime)
