"""The `promptune` command: tune / eval / predict. Each command parses options, calls one library function, prints."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import PIL.Image
import typer

from promptune import DISTRIBUTION, __version__
from promptune.backbones import FAMILIES
from promptune.errors import PromptuneError
from promptune.launch import launched_by_gpus, place, run_local
from promptune.methods.registry import METHOD_OPTIONS, RECIPES, default_summary, method_choices
from promptune.options import DEVICE_CHOICES, PRECISION_CHOICES, check_number
from promptune.reporting import SilentReporter
from promptune.stop import RunInterrupted


class Command(typer.core.TyperCommand):
    """Each promptune command. --help shows no Python types: options show their metavar (`--epochs N`,
    `--device [auto|cuda|...]`) and arguments their name only (typer would add `<path>` or `<list[str]>`). A reader
    that stops early (`promptune predict ... | head`) ends the command quietly with exit 0 (Click would exit 1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperArgument):
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]

    def invoke(self, ctx: Any) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not in Python's last flush at exit
            return result
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere, without a complaint
            raise typer.Exit(0) from None


app = typer.Typer(
    name="promptune",
    help="Adapt a frozen CLIP or ViT backbone to your own image classes by prompt tuning, from a folder of images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_AUTO = ", ".join(f"{spec.default_method} for {spec.label}" for spec in FAMILIES.values())
METHOD_HELP = f"auto: {_AUTO}."
BACKBONE_HELP = ("open_clip model name or config JSON (CLIP), or timm ViT name. Default: "
                 + " / ".join(f"{spec.default_backbone} ({spec.label})" for spec in FAMILIES.values()) + ".")
DEVICE_HELP = "auto: cuda, else mps, else cpu; cuda:N for one GPU of several."
PRECISION_HELP = "auto: bf16 (or fp16) autocast on CUDA, fp32 elsewhere."
MAX_PIXELS_HELP = (f"Images over this many pixels are skipped as decompression bombs. Default: Pillow's "
                   f"{PIL.Image.MAX_IMAGE_PIXELS} (e.g. {math.isqrt(PIL.Image.MAX_IMAGE_PIXELS)} px square).")
RECIPE_HELP = "Where the training settings you leave out come from. " + "; ".join(
    f"{name}: {text}" for name, text in RECIPES.items()) + "."
KEEP_HELP = ("Which epoch's prompts are written: last (as both papers) or best (the best validation accuracy; never an "
             "epoch that ends in the warm-up).")


def _choices(values: Sequence[str]) -> str:
    """A metavar listing an option's values: [auto|cuda|mps|cpu]."""
    return "[" + "|".join(values) + "]"


METHOD_METAVAR = _choices(method_choices())
DEVICE_METAVAR = _choices((*DEVICE_CHOICES[:2], "cuda:N", *DEVICE_CHOICES[2:]))
PRECISION_METAVAR = _choices(PRECISION_CHOICES)

# Options several commands share, declared once.
DeviceOption = Annotated[str, typer.Option(help=DEVICE_HELP, metavar=DEVICE_METAVAR)]
PrecisionOption = Annotated[str, typer.Option(help=PRECISION_HELP, metavar=PRECISION_METAVAR)]
MaxPixelsOption = Annotated[Optional[int], typer.Option(help=MAX_PIXELS_HELP, metavar="N", show_default=False)]
PromptsOption = Annotated[Path, typer.Option("--prompts", "-p", help="Prompt file written by `promptune tune`.",
                                             metavar="FILE", show_default=False)]
BackboneOverride = Annotated[Optional[str], typer.Option(
    help="Override the backbone named in the prompt file (must be the same).", metavar="NAME", show_default=False)]
WeightsOverride = Annotated[Optional[str], typer.Option(
    help="Local weights file, when the prompt file was tuned on one.", metavar="FILE", show_default=False)]
ReadWorkersOption = Annotated[Optional[int], typer.Option(
    help="Data-loading worker processes. Default: from the CPU count, none for a single batch.", metavar="N",
    show_default=False)]


def _method_option(field: str) -> Any:
    """The typer option of a method's own setting (--n-ctx, --depth, ...), help and values from the registry."""
    option = METHOD_OPTIONS[field]
    return typer.Option(option.flag, help=option.help_text(), metavar=option.metavar, show_default=False)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _set_max_image_pixels(limit: Optional[int]) -> None:
    from promptune.data import set_max_image_pixels

    check_number("--max-image-pixels", limit, 1)
    set_max_image_pixels(limit)


def _speaks() -> bool:
    """Of several processes (torchrun, --gpus), rank 0 alone prints; the others compute the same and stay silent."""
    return place().is_primary


def _silence_followers() -> None:
    if not _speaks():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process


def _warn(message: str) -> None:
    if _speaks():
        typer.echo(message, err=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    _warn(f"Error: {message}")
    return typer.Exit(code)


def _resume_hint() -> str:
    argv = [arg for arg in sys.argv[1:] if arg != "--resume"]
    if place().world_size > 1 and not launched_by_gpus():
        return f"torchrun (the same options) -m {shlex.join(['promptune', *argv, '--resume'])}"
    return shlex.join(["promptune", *argv, "--resume"])


def _guarded(action: Callable[[], Any]) -> Any:
    """User mistakes end in one sentence and a non-zero exit, never a traceback."""
    try:
        return action()
    except RunInterrupted as stopped:
        _warn(str(stopped))
        if stopped.checkpoint_dir is not None:
            _warn(f"Resume with: {_resume_hint()}")
        raise typer.Exit(stopped.exit_code) from None
    except PromptuneError as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted.", 130) from None


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() and _speaks()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"promptune {__version__} (PyPI package {DISTRIBUTION})")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    """promptune: prompt-tune CLIP (SEP, CoOp) or ViT (SPT, VPT) backbones on a folder of images."""


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")))


class ImageProgress:
    """A transient bar over images on stderr (only used on a TTY): `eval` / `predict` feed it through
    `TunedModel.on_progress`, `tune` through its reporter's `prepare_*` events."""

    def __init__(self, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                            TimeRemainingColumn(), console=_stderr_console(), transient=True)
        self.task = None

    def __call__(self, images: int, total: int) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("images", total=total)
        self.bar.update(self.task, advance=images)

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


class ProgressReporter:
    """A rich progress bar per epoch on stderr (only used on a TTY), and one over the images of a method's prepare."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(), console=_stderr_console(), transient=True,
        )
        self.task = None
        self.preparing = ImageProgress("initialising")
        self.prepare_total = 0

    def prepare_start(self, images: int) -> None:
        self.prepare_total = images
        self.preparing(0, images)  # shown from the start, before the first batch is decoded

    def prepare_step(self, images: int) -> None:
        self.preparing(images, self.prepare_total)

    def prepare_end(self) -> None:
        self.preparing.close()

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is None:
            self.progress.start()
        else:
            self.progress.remove_task(self.task)
        # no figures until the epoch's first step has some (never "loss 0.000  acc 0.0%  0 img/s")
        self.task = self.progress.add_task("train", total=steps, epoch=f"{epoch}/{epochs}", stats="")

    def step(self, loss: float, acc: float, images_per_s: float) -> None:
        stats = f"loss {loss:.3f}  acc {acc:.1%}  {images_per_s:.0f} img/s"
        self.progress.update(self.task, advance=1, stats=stats)

    def epoch_end(self, stats) -> None:
        val = f", val acc {stats.val_acc:.1%}" if stats.val_acc is not None else ""
        self.progress.console.print(
            f"epoch {stats.epoch}: loss {stats.train_loss:.4f}, train acc {stats.train_acc:.1%}{val}, "
            f"{stats.images_per_s:.0f} img/s"
        )

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


def _with_progress(model, quiet: bool, label: str, run: Callable[[], Any]) -> Any:
    """`run()` (through `_guarded`) with an image progress bar on a TTY unless --quiet."""
    progress = ImageProgress(label) if _show_progress(quiet) else None
    model.on_progress = progress
    try:
        return _guarded(run)
    finally:
        model.on_progress = None
        if progress is not None:
            progress.close()


class LineReporter(SilentReporter):
    """One line per epoch on stderr when there is no TTY (logs, CI) and not --quiet."""

    def epoch_end(self, stats) -> None:
        val = f", val acc {stats.val_acc:.1%}" if stats.val_acc is not None else ""
        _warn(f"epoch {stats.epoch}: loss {stats.train_loss:.4f}, train acc {stats.train_acc:.1%}{val}")

    def close(self) -> None:
        pass


def _parse_base_classes(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise PromptuneError(f"--base-classes must be a class count or a fraction like 0.5, got '{value}'.") from None
    return int(number) if number >= 1 and number.is_integer() else number


@app.command(cls=Command)
def tune(
    data_dir: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class (or train/ val/ test/ splits).", show_default=False, metavar="DATA_DIR")],
    method: Annotated[str, typer.Option(help=METHOD_HELP, metavar=METHOD_METAVAR)] = "auto",
    backbone: Annotated[Optional[str], typer.Option(help=BACKBONE_HELP, metavar="NAME", show_default=False)] = None,
    weights: Annotated[Optional[str], typer.Option(help="Pretrained tag (e.g. openai, laion2b_s34b_b88k) or a local weights file (.safetensors/.bin/.pt/.pth).", metavar="TAG|FILE", show_default=False)] = None,
    shots: Annotated[Optional[int], typer.Option(help=f"Training images per class (k-shot). Default: {default_summary('shots')}.", metavar="K", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Training epochs. Default: {default_summary('epochs')}.", metavar="N", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Images per step and process. Default: {default_summary('batch_size')}.", metavar="N", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate. Default: {default_summary('lr')}.", metavar="LR", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=f"Weight decay. Default: {default_summary('weight_decay')}.", metavar="WD", show_default=False)] = None,
    recipe: Annotated[str, typer.Option(help=RECIPE_HELP, metavar=_choices(tuple(RECIPES)))] = "default",
    keep: Annotated[str, typer.Option(help=KEEP_HELP, metavar="[last|best]")] = "last",
    ema_decay: Annotated[Optional[float], typer.Option(help="Validate and write a moving average of the learned tensors, updated after every step with this decay (e.g. 0.999). Default: 0 (off).", metavar="D", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling, initialisation and order.", metavar="S")] = 0,
    base_classes: Annotated[Optional[str], typer.Option(help="Train on the first N classes in sorted order (or a fraction, e.g. 0.5) for the base-to-new protocol.", metavar="N|FRACTION", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Prompt file to write (it may replace an earlier prompt file, never another file).", metavar="FILE")] = Path("prompts.safetensors"),
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Data-loading worker processes. Default: from the CPU count.", metavar="N", show_default=False)] = None,
    gpus: Annotated[Optional[int], typer.Option(help="Train in this many processes on this machine, one per GPU (with --device cpu: CPU processes), started through PyTorch's launcher; --batch-size is per process.", metavar="N", show_default=False)] = None,
    n_ctx: Annotated[Optional[int], _method_option("n_ctx")] = None,
    ctx_init: Annotated[Optional[str], _method_option("ctx_init")] = None,
    n_ctx_v: Annotated[Optional[int], _method_option("n_ctx_v")] = None,
    template: Annotated[Optional[list[str]], _method_option("template")] = None,
    depth: Annotated[Optional[str], _method_option("depth")] = None,
    prompts_per_layer: Annotated[Optional[int], _method_option("prompts_per_layer")] = None,
    init: Annotated[Optional[str], _method_option("init")] = None,
    init_images: Annotated[Optional[int], _method_option("init_images")] = None,
    pool_window: Annotated[Optional[int], _method_option("pool_window")] = None,
    pool: Annotated[Optional[str], _method_option("pool")] = None,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute the frozen blocks' activations in the backward pass: less memory, ~1.3x step time (large backbones).")] = False,
    compile_step: Annotated[bool, typer.Option("--compile", help="Compile the training step with torch.compile (one graph, no graph break). On one CUDA GPU its forward and backward are also captured as CUDA graphs (mode reduce-overhead), so steps of many small kernels (SEP) stop waiting on their launches; elsewhere the compiled kernels are fused only. The first step, and the first of each new batch size, waits for the compilation (30-60 s on a CPU even for tiny models, minutes for real backbones): worth it for long GPU runs only; a CPU step is no faster compiled.")] = False,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Folder for the per-epoch checkpoint. Default: beside --out (prompts.checkpoint/).", metavar="DIR", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run whose checkpoint is in --checkpoint-dir (same data and options).")] = False,
    no_checkpoint: Annotated[bool, typer.Option("--no-checkpoint", help="Do not save checkpoints (Ctrl-C then loses the run).")] = False,
    max_image_pixels: MaxPixelsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final summary.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run summary as one JSON object.")] = False,
) -> None:
    """Learn prompts for the classes in DATA_DIR and write them to one .safetensors prompt file.

    A checkpoint is saved after every epoch; Ctrl-C or SIGTERM saves one mid-epoch and exits (130 / 143), and
    the same command with --resume continues to the same result as an uninterrupted run.
    """
    from promptune.run import TuneOptions, TuneRun

    _silence_followers()
    _guarded(lambda: _set_max_image_pixels(max_image_pixels))
    templates = (template[0] if len(template) == 1 else template) if template else None  # one stays a plain string
    method_options = dict(n_ctx=n_ctx, ctx_init=ctx_init, n_ctx_v=n_ctx_v, template=templates, depth=depth,
                          prompts_per_layer=prompts_per_layer, init=init, init_images=init_images,
                          pool_window=pool_window, pool=pool)
    run_options = TuneOptions(
        data_dir, method=method, backbone=backbone, weights=weights, shots=shots, seed=seed, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, keep=keep, recipe=recipe, ema_decay=ema_decay,
        base_classes=_guarded(lambda: _parse_base_classes(base_classes)),
        device=device, precision=precision, workers=workers, out=out, checkpoint=not no_checkpoint,
        checkpoint_dir=checkpoint_dir, resume=resume, grad_checkpointing=grad_checkpointing, compile_step=compile_step,
        method_options={k: v for k, v in method_options.items() if v is not None},
    )
    if gpus is not None and not launched_by_gpus():
        _start_processes(gpus, run_options)
    reporter = ProgressReporter() if _show_progress(quiet) else (LineReporter() if not quiet and not json_output else None)
    log = (lambda m: None) if quiet else _warn

    def run() -> Any:
        try:
            return TuneRun(run_options, reporter, log).run()
        finally:  # the progress line ends before any message ("Interrupted by SIGINT ...", an error) is printed
            if reporter is not None:
                reporter.close()

    result = _guarded(run)
    summary = result.summary
    final = summary.final
    if json_output:
        typer.echo(json.dumps({
            "prompt_file": str(result.path), "method": result.method, "backbone": result.backbone,
            "classes": result.class_names, "train_per_class": result.train_per_class, "val_images": result.val_images,
            "skipped_files": len(result.skipped) + summary.skipped_images, "device": result.device,
            "processes": result.processes, "cpu_threads": result.cpu_threads, **summary.to_dict(),
        }))
        return
    counts = ", ".join(f"{name} {n}" for name, n in result.train_per_class.items())
    where = f"{result.device}, {result.cpu_threads} CPU threads"
    if result.processes > 1:
        where = f"{result.processes} processes on {result.device}, {result.cpu_threads} CPU threads each"
    typer.echo(f"Trained {result.method} on {result.backbone} ({where}) "
               f"for {_plural(len(summary.epochs), 'epoch')} in {summary.seconds:.1f} s.")
    typer.echo(f"Images per class: {counts}; validation images: {result.val_images}; "
               f"skipped files: {len(result.skipped) + summary.skipped_images}.")
    if final is not None:
        val = f"{summary.best_val_acc:.1%} (best, epoch {summary.best_epoch})" if summary.best_val_acc is not None else "n/a (no validation images)"
        typer.echo(f"Final train accuracy {final.train_acc:.1%}; validation accuracy {val}.")
        typer.echo(f"Kept the prompts of epoch {summary.kept_epoch}: {summary.kept}.")
    typer.echo(f"Wrote {result.path}")


def _start_processes(gpus: int, run_options) -> None:
    """`tune --gpus N`: check what can be checked here, then run the same command in N processes and exit as they do."""
    from promptune.run import TuneRun
    from promptune.runtime import check_processes

    if place().world_size > 1:
        raise _fail("--gpus starts its own processes; under torchrun leave it out (--nproc_per_node says how many).")
    _guarded(lambda: check_processes(gpus, run_options.device))
    if gpus > 1:
        _guarded(TuneRun(run_options).check)
        raise typer.Exit(run_local(gpus, sys.argv[1:]))


def _load(prompts: Path, backbone: Optional[str], weights: Optional[str], device: str, precision: str):
    from promptune.api import load

    model = _guarded(lambda: load(prompts, backbone=backbone, weights=weights, device=device, precision=precision))
    model.on_warning = lambda message: _warn(f"warning: {message}")
    return model


def _pct(value: Optional[float], decimals: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{decimals}%}"


@app.command("eval", cls=Command)
def evaluate(
    data_dir: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class (test/ used when present).", show_default=False, metavar="DATA_DIR")],
    prompts: PromptsOption,
    backbone: BackboneOverride = None,
    weights: WeightsOverride = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", metavar="N")] = 64,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    workers: ReadWorkersOption = None,
    zero_shot: Annotated[bool, typer.Option("--zero-shot/--no-zero-shot", help="Also report zero-shot CLIP for comparison, with the prompt file's templates (sep) or 'a photo of a {}.'.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    report_dir: Annotated[Optional[Path], typer.Option("--report", help="Write metrics.json, per_class.csv, confusion.png and misclassified.csv into this folder (new, or one of promptune's reports).", metavar="DIR", show_default=False)] = None,
    max_image_pixels: MaxPixelsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No header line, no progress bar.")] = False,
) -> None:
    """Accuracy of a prompt file on a labelled folder: top-1, balanced accuracy, the majority-class baseline, top-5
    (more than 5 classes), per class, and zero-shot CLIP for comparison."""
    from promptune.data import SPLIT_LABELS, load_eval_data
    from promptune.options import check_loader_options

    _silence_followers()
    _guarded(lambda: check_loader_options(batch_size, workers))
    _guarded(lambda: _set_max_image_pixels(max_image_pixels))
    if report_dir is not None:
        from promptune.report import prepare_report_dir

        _guarded(lambda: prepare_report_dir(report_dir))
    data = _guarded(lambda: load_eval_data(data_dir))  # a wrong folder fails before the backbone loads
    model = _load(prompts, backbone, weights, device, precision)
    if not quiet:
        _warn(model.describe(evaluating=data))
    report = _with_progress(model, quiet, "evaluating", lambda: model.evaluate(data, batch_size=batch_size, zero_shot=zero_shot, workers=workers))
    for path in report.skipped:
        _warn(f"warning: skipped unreadable image {path} ({report.skip_reasons.get(path, 'unreadable')})")
    if report_dir is not None:
        from promptune.report import write_report

        header = {"prompt_file": str(prompts), "description": model.describe(evaluating=data)}
        if _speaks():  # every process has the whole report; one writes it
            written = _guarded(lambda: write_report(report, report_dir, header))
            if not quiet:
                _warn(f"report written to {report_dir}/ ({', '.join(p.name for p in written)})")
    if json_output:
        typer.echo(json.dumps(report.to_dict()))
        return
    typer.echo(f"evaluated: {SPLIT_LABELS[report.split]}   images: {report.n_images}   classes: {len(report.class_names)}")
    top5 = f"   top-5: {report.top5:.2%}" if report.top5 is not None else ""
    typer.echo(f"top-1: {report.top1:.2%}   balanced: {_pct(report.balanced_accuracy, 2)}{top5}   "
               f"(majority-class baseline: {_pct(report.majority_baseline, 2)})")
    if report.zero_shot_top1 is not None:
        typer.echo(f"zero-shot CLIP top-1: {report.zero_shot_top1:.2%}   "
                   f"balanced: {_pct(report.zero_shot_balanced_accuracy, 2)}")
    if report.base_new is not None:
        bn, zs = report.base_new, report.zero_shot_base_new
        typer.echo(f"base: {_pct(bn.base)}   new: {_pct(bn.new)}   HM: {_pct(bn.hm)}")
        if zs is not None:
            typer.echo(f"zero-shot base: {_pct(zs.base)}   new: {_pct(zs.new)}   HM: {_pct(zs.hm)}")
    width = max(len(n) for n in report.class_names)
    typer.echo("per class:")
    for name, acc in report.per_class.items():
        typer.echo(f"  {name:<{width}}  {_pct(acc)}")


def _read_classes(classes: Optional[str], classes_file: Optional[Path]) -> Optional[list[str]]:
    if classes is not None and classes_file is not None:
        raise PromptuneError("Give either --classes or --classes-file, not both.")
    if classes_file is not None:
        try:
            lines = classes_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise PromptuneError(f"Cannot read --classes-file '{classes_file}': {getattr(error, 'strerror', None) or error}.") from None
        names = [line.strip() for line in lines if line.strip()]
        if not names:  # an empty list would silently mean "the trained classes"
            raise PromptuneError(f"--classes-file '{classes_file}' has no class names; give one name per line.")
        return names
    if classes is not None:
        return [name.strip() for name in classes.split(",") if name.strip()] or [""]
    return None


@app.command(cls=Command)
def predict(
    paths: Annotated[list[str], typer.Argument(help="Images, folders or glob patterns.", show_default=False, metavar="PATH")],
    prompts: PromptsOption,
    top_k: Annotated[int, typer.Option(help="How many classes to show per image.", metavar="K")] = 5,
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated class names to classify into instead of the trained ones (CLIP methods), at least two.", metavar="'A,B,...'", show_default=False)] = None,
    classes_file: Annotated[Optional[Path], typer.Option(help="File with one class name per line (CLIP methods).", metavar="FILE", show_default=False)] = None,
    backbone: BackboneOverride = None,
    weights: WeightsOverride = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", metavar="N")] = 32,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    workers: ReadWorkersOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="JSON lines: one object per image.")] = False,
    csv_output: Annotated[bool, typer.Option("--csv", help="CSV: path, rank, label, probability.")] = False,
    max_image_pixels: MaxPixelsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No header line, no progress bar.")] = False,
) -> None:
    """Top-k classes for each image. CLIP prompt files also accept class names never trained (--classes)."""
    from promptune.options import check_predict_options

    _silence_followers()
    if json_output and csv_output:
        raise _fail("give either --json or --csv, not both.")
    _guarded(lambda: check_predict_options(top_k, batch_size, workers))
    _guarded(lambda: _set_max_image_pixels(max_image_pixels))
    names = _guarded(lambda: _read_classes(classes, classes_file))
    model = _load(prompts, backbone, weights, device, precision)
    if not quiet:
        _warn(model.describe())
    predictions, problems = _with_progress(
        model, quiet, "predicting", lambda: model.predict(paths, top_k=top_k, classes=names, batch_size=batch_size, workers=workers)
    )
    if csv_output:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "label", "probability"])
    for prediction in predictions:
        if csv_output:
            for rank, (label, p) in enumerate(zip(prediction.labels, prediction.probabilities), start=1):
                writer.writerow([prediction.path, rank, label, f"{p:.6f}"])
        elif json_output:
            typer.echo(json.dumps(prediction.to_dict()))
        else:
            ranked = "  ".join(f"{label} {p:.1%}" for label, p in zip(prediction.labels, prediction.probabilities))
            typer.echo(f"{prediction.path}: {ranked}")
    for problem in problems:
        _warn(f"Error: {problem}")
    if problems:
        raise typer.Exit(1)


def main() -> None:
    app()
