"""Training-step time, images/s and peak memory of each prompt method next to two frozen baselines; prints one JSON.

    python tests/benchmarks/bench_tune.py                                   # sep, coop (CLIP) and spt, vpt (ViT)
    python tests/benchmarks/bench_tune.py --method sep --untrimmed --classes 100 --batch 8

Each measurement runs in a fresh interpreter (`--single`), so every peak-RSS figure is that case's own. A step is
`promptune.train.Trainer.train_step` (the method's `training_loss`, its `param_groups`, Adam, the schedule and the
finite-loss check) on a synthetic tensor batch; no DataLoader is involved, so there is no data wait in these figures.
The baselines use the same backbone and batch: the frozen forward alone (no grad), and the frozen forward plus a
backward to the input (input requires grad, sum of the output) - the least work any first-layer prompt method does.
`--untrimmed` also times SEP/CoOp steps with the text tower forced onto all context positions (trimming off),
alternating trimmed and untrimmed steps in one process so machine-load drift hits both alike.
`--grad-checkpointing` also times steps with `set_grad_checkpointing(True)`, alternating with plain steps in the
method's process (the step-time ratio), and runs the checkpointed steps alone in one more process (their peak memory).

Every case also reports `aten_ops_per_step`: the aten ops dispatched by one whole step (forward, backward, optimiser
step, zero_grad), counted by a `TorchDispatchMode` after the warm-up. It does not depend on the batch size or the
number of classes, and it is the CPU-side proxy for a GPU's kernel launches and dispatch cost (an eager GPU step that
dispatches thousands of small ops leaves the GPU idle). Method cases add `aten_ops_breakdown` (the same step's ops by
part: each forward part, the backward of each part, AccumulateGrad, the optimiser step) and `aten_ops_top`.
`--before REV` runs every method case also on promptune as of git revision REV (exported with `git archive`),
alternating before/after processes for `--rounds` rounds, and reports both sides' op counts and step times.
`--sep-reference` also times promptune 0.1.0's SEP step (`tests/sep_reference.py` and per-parameter Adam) alternating
with the current step on the same model in SEP's own process, so machine-load drift hits both alike.

    python tests/benchmarks/bench_tune.py --before ca3efe7 --rounds 2                # before/after, all methods
    python tests/benchmarks/bench_tune.py --method sep --no-baselines --sep-reference --steps 6   # same-process ratio

`--data-wait` measures the real input pipeline instead: it writes a folder of JPEG files (`--data-classes` x
`--images-per-class`, `--image-size` px) to a temporary directory, wires it as `promptune.tune` does
(`load_training_data`, `ImageDataset`, `build_transform`, `make_loader` with the default worker count unless
`--workers`, pinned memory on CUDA, the method's `prepare`), runs `--epochs` epochs of `Trainer.fit` and reports each
epoch's share of time spent waiting for the loader and its images/s. Epoch 1 includes starting the worker processes;
the steady-state figures are the mean over the later epochs.

    python tests/benchmarks/bench_tune.py --data-wait --method spt --method sep --batch 16 --epochs 3
    python tests/benchmarks/bench_tune.py --grad-checkpointing --method spt --method sep --classes 10 --no-baselines

`--loader-only` times the training loader alone, with no model: over one generated JPEG folder, each path runs in a
fresh process and iterates `--epochs` epochs as `Trainer.fit` drives the loader (`set_epoch`), and reports the
images/s it delivers per epoch, the steady state (epochs 2+) and that per loader worker. The paths: `cache` (the
working tree's `training_loader`: decoded-image cache), `decode` (the same without cache: every epoch decodes every
file) and, with `--before REV`, that revision's own training loader; `--rounds` alternates them.

    python tests/benchmarks/bench_tune.py --loader-only --before ca3efe7 --images-per-class 64 --batch 32 --epochs 4

With `--step-ms` the consumer sleeps that long per full batch, as a host waiting for a device step, and each epoch
also reports its data-wait share. With one worker, `--batch 64 --step-ms 205` asks for 312 images/s per worker: the
demand on each of 8 workers of a GPU that trains SPT at 2,500 images/s, the CPU proxy of the data-wait target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve()
ALL_METHODS = ("sep", "coop", "spt", "vpt")
TRIM_TARGET = 0.6  # SEP trimmed step <= 0.6x untrimmed at 100 classes, ViT-B-32, batch 8, CPU


def _batch(backbone, batch: int, classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = backbone.preprocess.size
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return images, labels


def _forward(backbone):
    model = backbone.model
    return model.encode_image if backbone.family == "clip" else model


@contextlib.contextmanager
def _untrimmed(method):
    """The method's text tower runs all context positions (what the code did before trimming) inside the block."""
    prompts = method.prompts
    trimmed = prompts.length
    prompts.length = method.text.context_length
    try:
        yield
    finally:
        prompts.length = trimmed


# Parts of a method's forward pass that the op breakdown names: instance methods, then sub-modules (if present).
PHASE_METHODS = {"frozen_image_features": "frozen image pass", "encode_image_prompted": "prompted image tower"}
PHASE_MODULES = {"text": "text tower", "text_fusion": "text TFMs", "visual_fusion": "image TFMs"}


@contextlib.contextmanager
def _phase_labels(trainer, method, phases: list[str]):
    """While each named part of the step runs, its label is on top of `phases` (forward ops); when it returns, the
    autograd nodes it created are tagged with the label (their backward ops). Everything is restored on exit."""

    def enter(label: str, inputs: Any) -> set:
        phases.append(label)
        return common.graph_nodes(common.grad_nodes(inputs))

    def leave(label: str, outputs: Any, boundary: set) -> None:
        phases.pop()
        common.tag_graph(common.grad_nodes(outputs), label.removeprefix("forward: "), boundary)

    def labelled(function, label: str):
        def run(*args, **kwargs):
            boundary = enter(label, [args, kwargs])
            outputs = None
            try:
                outputs = function(*args, **kwargs)
                return outputs
            finally:
                leave(label, outputs, boundary)

        return run

    def hooks(module: torch.nn.Module, label: str) -> list:
        boundaries: list[set] = []
        pre = module.register_forward_pre_hook(lambda _, args: boundaries.append(enter(label, args)))
        post = module.register_forward_hook(lambda _, args, outputs: leave(label, outputs, boundaries.pop()))
        return [pre, post]

    patched = [(trainer, "forward", "forward: rest of the loss"), (trainer.optimizer, "step", "optimizer step"),
               (trainer.optimizer, "zero_grad", "zero_grad")]
    patched += [(method, name, f"forward: {label}") for name, label in PHASE_METHODS.items() if hasattr(method, name)]
    originals = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patched]
    for owner, name, label in patched:
        setattr(owner, name, labelled(getattr(owner, name), label))
    handles = []
    for name, label in PHASE_MODULES.items():
        module = getattr(method, name, None)
        if isinstance(module, torch.nn.Module):
            parts = list(module.children()) if isinstance(module, torch.nn.ModuleList) else [module]
            handles += [handle for part in parts for handle in hooks(part, f"forward: {label}")]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, original in originals:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def count_step_ops(step, trainer, method) -> dict[str, Any]:
    """aten ops of one step, and (for a method) the same step's ops by part: forward parts, the backward of each part
    (charged by autograd node), the optimiser step and zero_grad; `other` is the backward seed, schedule and checks."""
    result: dict[str, Any] = {"aten_ops_per_step": common.count_ops(step)}
    if trainer is None:
        return result
    phases = ["other"]
    with _phase_labels(trainer, method, phases), common.OpCounter(phases) as counter:
        step()
    result["aten_ops_breakdown"] = dict(counter.by_phase.most_common())
    result["aten_ops_breakdown_total"] = counter.total  # equals aten_ops_per_step unless the labelling changed a path
    result["aten_ops_top"] = dict(counter.by_op.most_common(15))
    return result


def _reference_step(method, config, device: torch.device, images: torch.Tensor, labels: torch.Tensor):
    """A step of promptune 0.1.0's SEP on the same model (tests/sep_reference.py: nn.MultiheadAttention fusion modules,
    the previous token shuffling, open_clip blocks as modules) with its per-parameter Adam, in its own Trainer."""
    sys.path.insert(0, str(SCRIPT.parents[1]))
    from sep_reference import PreviousImplementation, per_parameter_adam

    from promptune.train import Trainer, build_schedule

    trainer = Trainer(method, config, device, steps_per_epoch=10**6)
    trainer.optimizer = per_parameter_adam(method.param_groups(config.weight_decay), config.lr, config.eps)
    trainer.schedule = build_schedule(trainer.optimizer, config, steps_per_epoch=10**6)

    previous = PreviousImplementation(method)

    def step() -> None:
        with previous.active():
            trainer.train_step(images, labels)

    return step


def data_wait(spec: dict[str, Any]) -> dict[str, Any]:
    """`Trainer.fit` on a generated JPEG folder through the real loader; per-epoch data-wait fraction and images/s."""
    import tempfile

    from promptune.data import ImageDataset, build_transform, default_workers, load_training_data, make_loader
    from promptune.train import Trainer, TrainConfig, seed_everything
    from promptune.train_images import training_loader

    device, amp_dtype, threads = common.setup_device(spec["device"])
    backbone = common.build_backbone(spec["backbone"])
    width, height = spec["image_size"]
    batch, seed = spec["batch"], 0
    workers = spec.get("workers")
    result: dict[str, Any] = {"case": "data_wait", "method": spec["method"], "backbone": spec["backbone"]}
    with tempfile.TemporaryDirectory(prefix="promptune-bench-") as tmp:
        root = Path(tmp) / "data"
        started = time.perf_counter()
        common.make_jpeg_folder(root, spec["data_classes"], spec["images_per_class"], (width, height), seed=seed)
        result["generate_s"] = round(time.perf_counter() - started, 2)
        # The wiring of promptune.api.tune: all images for training (no held-out split, so no validation pass).
        data = load_training_data(root, shots=None, seed=seed, val_fraction=0.0)
        cls, why = common.load_method_class(spec["method"])
        if cls is None:
            raise RuntimeError(why)
        seed_everything(seed)
        method = cls(backbone, data.class_names, cls.make_config({})).to(device)
        result["frozen_tensors_cast"] = _cast_frozen(method, device, amp_dtype)
        method.set_grad_checkpointing(bool(spec.get("grad_checkpointing")))
        defaults = cls.defaults
        cfg = TrainConfig(epochs=spec["epochs"], lr=defaults.lr, weight_decay=defaults.weight_decay, batch_size=batch,
                          warmup_epochs=defaults.warmup_epochs, warmup=defaults.warmup, warmup_lr=defaults.warmup_lr,
                          optimizer=defaults.optimizer, eps=defaults.eps, seed=seed)
        pin = device.type == "cuda"
        workers = default_workers() if workers is None else workers
        started = time.perf_counter()
        train_loader = training_loader(data.train, backbone.preprocess, batch, seed, workers, pin_memory=pin)
        result["cache_s"] = round(time.perf_counter() - started, 2)
        result["cached"] = train_loader.loader.dataset.cache is not None
        prepare_loader = make_loader(ImageDataset(data.train, build_transform(backbone.preprocess, train=False)), batch,
                                     shuffle=True, seed=seed, workers=workers, pin_memory=pin)
        started = time.perf_counter()
        with torch.no_grad(), common.runtime(device, amp_dtype).autocast():
            method.prepare(prepare_loader, common.runtime(device, amp_dtype), seed)
        result["prepare_s"] = round(time.perf_counter() - started, 2)
        trainer = Trainer(method, cfg, common.runtime(device, amp_dtype), steps_per_epoch=len(train_loader))
        summary = trainer.fit(train_loader, None)
    epochs = [
        {"epoch": e.epoch, "seconds": round(e.seconds, 2), "images_per_s": round(e.images_per_s, 2),
         "data_wait_fraction": round(e.data_wait_fraction, 4), "train_loss": round(e.train_loss, 4)}
        for e in summary.epochs
    ]
    steady = epochs[1:]
    result.update({
        "grad_checkpointing": method.grad_checkpointing,
        "images": len(data.train),
        "classes": len(data.class_names),
        "batch": batch,
        "steps_per_epoch": len(train_loader),
        "workers": train_loader.loader.num_workers,
        "default_workers": default_workers(),
        "persistent_workers": train_loader.loader.persistent_workers,
        "pin_memory": train_loader.loader.pin_memory,
        "skipped_images": summary.skipped_images,
        "epochs": epochs,
        "steady_state": None if not steady else {
            "epochs": [e["epoch"] for e in steady],
            "data_wait_fraction": round(sum(e["data_wait_fraction"] for e in steady) / len(steady), 4),
            "images_per_s": round(sum(e["images_per_s"] for e in steady) / len(steady), 2),
        },
        "memory": {"kind": "peak RSS of an isolated process (ru_maxrss)", "peak_mb": common.peak_rss_mb()}
        if device.type != "cuda" else {"kind": "cuda max_memory_allocated",
                                       "peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)},
        "environment": common.environment(device, threads, amp_dtype),
    })
    return result


def loader_only(spec: dict[str, Any]) -> dict[str, Any]:
    """The training loader alone (no model) over an existing JPEG folder: images/s per epoch, as the trainer drives it.

    `path` "cache" and "decode" are the working tree's `training_loader` with the default image cache and with none
    (every epoch decodes and bounds every file); a `code_root` revision is timed as that revision built its training
    loader (`ImageDataset` over `build_transform(train=True)`, `make_loader(shuffle=True)`, restarted every epoch).
    """
    from promptune.data import Preprocess, default_workers, load_training_data, make_loader

    torch.set_num_threads(1)  # the main process only receives batches, as in training, where the model has the cores
    pre = Preprocess(size=spec["size"], mean=(0.48145466, 0.4578275, 0.40821073),
                     std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic")
    workers = default_workers() if spec.get("workers") is None else spec["workers"]
    batch, epochs, seed = spec["batch"], spec["epochs"], 0
    data = load_training_data(Path(spec["folder"]), shots=None, seed=seed, val_fraction=0.0)
    started = time.perf_counter()
    if spec.get("code_root"):
        from promptune.data import ImageDataset, build_transform

        loader = make_loader(ImageDataset(data.train, build_transform(pre, train=True)), batch, shuffle=True, seed=seed,
                             workers=workers)
        cached = False
    else:
        from promptune.train_images import DEFAULT_CACHE_BYTES, training_loader

        cache_bytes = DEFAULT_CACHE_BYTES if spec["path"] == "cache" else 0
        loader = training_loader(data.train, pre, batch, seed, workers, cache_bytes=cache_bytes)
        cached = loader.loader.dataset.cache is not None
    setup_s = time.perf_counter() - started
    per_epoch = []
    for epoch in range(1, epochs + 1):
        sampler = loader.batch_sampler
        if spec.get("code_root"):
            sampler.set_epoch(epoch)
        else:
            sampler.set_epoch(epoch, last=epochs)
        images, waited, step_s = 0, 0.0, spec.get("step_ms", 0) / 1e3
        started = mark = time.perf_counter()
        for batch_ in loader:
            waited += time.perf_counter() - mark
            images += batch_.labels.numel()
            if step_s:  # a device step: the host waits for it, the loader's workers run on
                time.sleep(step_s * batch_.labels.numel() / batch)
            mark = time.perf_counter()
        seconds = time.perf_counter() - started
        per_epoch.append({"epoch": epoch, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
                          "data_wait_fraction": round(waited / seconds, 4)})
    steady = per_epoch[1:]
    steady_rate = sum(e["images_per_s"] for e in steady) / len(steady) if steady else None
    steady_wait = sum(e["data_wait_fraction"] for e in steady) / len(steady) if steady else None
    return {
        "case": "loader_only", "path": spec["path"], "code": spec.get("code", "working tree"), "cached": cached,
        "workers": workers, "images": len(data.train), "batch": batch, "setup_s": round(setup_s, 3),
        "epochs": per_epoch,
        "steady_state": None if not steady else {
            "epochs": [e["epoch"] for e in steady], "images_per_s": round(steady_rate, 1),
            "images_per_s_per_worker": round(steady_rate / max(workers, 1), 1),
            "data_wait_fraction": round(steady_wait, 4)},
        "memory": {"kind": "peak RSS of the main process (ru_maxrss)", "peak_mb": common.peak_rss_mb()},
        "environment": common.environment(torch.device("cpu"), torch.get_num_threads(), torch.float32),
    }


def loader_only_report(args: argparse.Namespace) -> dict[str, Any]:
    """`--loader-only`: the paths in alternating fresh processes for `--rounds` rounds over one generated folder."""
    import tempfile

    width, height = _image_size(args)
    paths = ["cache", "decode"]
    before = _export_revision(args.before) if args.before else None
    if before is not None:
        paths.append(f"before {before['code']}")
    base = {"case": "loader_only", "batch": args.batch, "epochs": args.epochs, "workers": args.workers, "size": args.size,
            "step_ms": args.step_ms}
    report: dict[str, Any] = {
        "benchmark": "training loader alone",
        "inputs": {**base, "rounds": args.rounds, "paths": paths,
                   "data": f"{args.data_classes} classes x {args.images_per_class} generated JPEG files of {width}x{height} px",
                   "what": "images/s the training loader delivers to a consumer that does nothing else (with "
                           "--step-ms: that sleeps step_ms per full batch, a device step), per epoch, and the share of "
                           "the epoch spent waiting for the loader; steady state = mean of epochs 2+; per worker = "
                           "images/s / loader workers",
                   "path_meaning": {"cache": "training_loader, decoded-image cache (default budget)",
                             "decode": "training_loader without cache: decode + bound + tensor augmentation every epoch",
                             "before": "the revision's own training loader: PIL RandomResizedCrop + flip + ToTensor + "
                                       "Normalize per image, DataLoader restarted every epoch"}},
        "results": {path: [] for path in paths},
    }
    environment = None
    with tempfile.TemporaryDirectory(prefix="promptune-bench-") as tmp:
        folder = Path(tmp) / "data"
        common.make_jpeg_folder(folder, args.data_classes, args.images_per_class, (width, height), seed=0)
        for _ in range(args.rounds):
            for path in paths:
                spec = {**base, "folder": str(folder), "path": path}
                if path.startswith("before"):
                    spec.update(before)
                result = common.run_isolated(SCRIPT, spec, args.timeout)
                environment = result.pop("environment", environment)
                report["results"][path].append(result)
    rates = {path: [r["steady_state"]["images_per_s_per_worker"] for r in runs if r.get("steady_state")]
             for path, runs in report["results"].items()}
    waits = {path: [r["steady_state"]["data_wait_fraction"] for r in runs if r.get("steady_state")]
             for path, runs in report["results"].items()}
    medians = {path: (round(statistics.median(values), 1) if values else None) for path, values in rates.items()}
    report["summary"] = {"steady_images_per_s_per_worker": rates, "median": medians,
                         "ratios": {f"{path}_over_{paths[-1]}": common.ratio(medians[path], medians[paths[-1]])
                                    for path in paths[:-1]},
                         "steady_data_wait_fraction": waits,
                         "median_data_wait_fraction": {path: (round(statistics.median(values), 4) if values else None)
                                                       for path, values in waits.items()}}
    report["environment"] = environment
    return report


def _cast_frozen(method: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype) -> int:
    """What `tune` does before training: on CUDA under bf16/fp16 autocast, the method's frozen weights in that dtype
    (the frozen-backbone baselines stay as they are). Revisions from before the cast have no `cast_frozen`: 0."""
    runtime = common.runtime(device, amp_dtype)
    return runtime.cast_frozen(method) if hasattr(runtime, "cast_frozen") else 0


def single(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this (fresh) process: build, warm up, time `steps` steps, report time and memory."""
    if spec.get("code_root"):  # --before: import promptune from that revision's exported tree
        sys.path.insert(0, spec["code_root"])
    if spec["case"] == "data_wait":
        return data_wait(spec)
    if spec["case"] == "loader_only":
        return loader_only(spec)
    device, amp_dtype, threads = common.setup_device(spec["device"])

    backbone = common.build_backbone(spec["backbone"])
    backbone.model.to(device)
    batch, steps, warmup = spec["batch"], spec["steps"], spec["warmup"]
    images, labels = _batch(backbone, batch, spec["classes"], device)
    result: dict[str, Any] = {"case": spec["case"], "backbone": spec["backbone"], "code": spec.get("code", "working tree")}

    if spec["case"] == "forward":
        forward = _forward(backbone)

        def step() -> None:
            with torch.no_grad(), common.runtime(device, amp_dtype).autocast():
                forward(images)

        runs = {"step": step}
        counted = (step, None, None)
    elif spec["case"] == "forward_backward_input":
        forward = _forward(backbone)

        def step() -> None:
            x = images.clone().requires_grad_(True)
            with common.runtime(device, amp_dtype).autocast():
                out = forward(x)
            out.float().sum().backward()

        runs = {"step": step}
        counted = (step, None, None)
    else:
        from promptune.train import Trainer, TrainConfig

        names = common.class_names(spec["classes"])
        method = common.build_method(spec["case"], backbone, names).to(device)
        result["frozen_tensors_cast"] = _cast_frozen(method, device, amp_dtype)
        method.set_grad_checkpointing(bool(spec.get("grad_checkpointing")))
        result["grad_checkpointing"] = method.grad_checkpointing
        method.train()
        config = TrainConfig(epochs=1, lr=1e-3, weight_decay=5e-4, batch_size=batch, warmup_epochs=0.0,
                             optimizer="adam")
        trainer = Trainer(method, config, common.runtime(device, amp_dtype), steps_per_epoch=10**6)
        result["learned_parameters"] = sum(p.numel() for g in method.param_groups(5e-4) for p in g["params"])
        text = getattr(method, "text", None)
        if text is not None:
            result["text_positions"] = {"trimmed": method.prompts.length, "full": text.context_length}

        def step() -> None:
            trainer.train_step(images, labels)

        def step_untrimmed() -> None:
            with _untrimmed(method):
                trainer.train_step(images, labels)

        def step_checkpointed() -> None:
            method.set_grad_checkpointing(True)
            try:
                trainer.train_step(images, labels)
            finally:
                method.set_grad_checkpointing(bool(spec.get("grad_checkpointing")))

        runs = {"step": step}
        counted = (step, trainer, method)
        if spec.get("compile"):  # a second trainer over the same parameters, its step compiled (captured on CUDA)
            compiled = Trainer(method, config, common.runtime(device, amp_dtype), steps_per_epoch=10**6,
                               compile_step=True)
            result["compile_mode"] = getattr(compiled, "compile_mode", "default")

            def step_compiled() -> None:
                compiled.train_step(images, labels)

            runs["compiled_step"] = step_compiled
        if spec.get("untrimmed") and text is not None:
            runs["untrimmed_step"] = step_untrimmed
        if spec.get("interleave_checkpointing"):
            runs["grad_checkpointing_step"] = step_checkpointed
        if spec.get("sep_reference") and spec["case"] == "sep":
            runs["reference_step"] = _reference_step(method, config, device, images, labels)

    memory = common.PeakMemory(device)
    first_call_s = {}
    for name, run in runs.items():
        for index in range(max(warmup, 1) if counted is not None else warmup):
            seconds = common.timed(run, device)
            if index == 0:
                first_call_s[name] = round(seconds, 3)  # a compiled step's first call is its compilation
    if "compiled_step" in runs:
        result["first_call_s"] = first_call_s
    if counted is not None:  # after a warm-up step, so the optimiser state exists as in every later step
        result.update(count_step_ops(*counted))
    if "reference_step" in runs:
        result["reference_aten_ops_per_step"] = common.count_ops(runs["reference_step"])
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):  # interleaved, so load drift on a shared machine hits every variant alike
        for name, run in runs.items():
            started = time.process_time()
            times[name].append(common.timed(run, device))
            cpu_times[name].append(time.process_time() - started)
    result.update({name: common.summary(values, batch) for name, values in times.items()})
    # This process's CPU time per step (all its threads, in ms): on a shared machine it drifts far less than wall time.
    result["cpu_time"] = {name: common.summary(values) for name, values in cpu_times.items()}
    if "untrimmed_step" in times:
        result["trimmed_over_untrimmed"] = common.ratio(result["step"]["median_ms"], result["untrimmed_step"]["median_ms"])
    if "reference_step" in times:
        result["step_over_reference_step"] = common.ratio(result["step"]["median_ms"], result["reference_step"]["median_ms"])
        result["step_cpu_over_reference_step_cpu"] = common.ratio(
            result["cpu_time"]["step"]["median_ms"], result["cpu_time"]["reference_step"]["median_ms"])
    if "compiled_step" in times:
        result["compiled_over_eager"] = common.ratio(result["compiled_step"]["median_ms"], result["step"]["median_ms"])
    if "grad_checkpointing_step" in times:
        result["grad_checkpointing_over_plain"] = common.ratio(
            result["grad_checkpointing_step"]["median_ms"], result["step"]["median_ms"])
    result["memory"] = memory.report()
    if len(runs) > 1:
        result["memory"]["note"] = f"peak over the {', '.join(runs)} runs together"
    result["environment"] = common.environment(device, threads, amp_dtype)
    return result


def _export_revision(revision: str) -> dict[str, str]:
    """`promptune/` of a git revision, exported into a temporary folder (the repository itself is only read).

    REV may also be a folder that holds an exported tree (`promptune/` inside it, and a REVISION file naming it), for
    machines without the repository's history, e.g. a GPU machine that receives only the working tree. The step cases
    drive the revision through today's `Runtime` and `Trainer`, so REV must have them (d209f4e or later)."""
    import subprocess
    import tempfile

    folder = Path(revision)
    if (folder / "promptune").is_dir():
        named = folder / "REVISION"
        return {"code_root": str(folder.resolve()),
                "code": named.read_text().strip() if named.is_file() else folder.name}
    commit = subprocess.run(["git", "-C", str(common.REPO_ROOT), "rev-parse", "--short", revision],
                            capture_output=True, text=True, check=True).stdout.strip()
    folder = tempfile.mkdtemp(prefix="promptune-before-")
    archive = subprocess.run(["git", "-C", str(common.REPO_ROOT), "archive", commit, "promptune"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return {"code_root": folder, "code": commit}


def _before_and_after(spec: dict[str, Any], before: dict[str, str], rounds: int,
                      timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The case on the working tree and on `before`, alternating processes for `rounds` rounds; step times pooled."""
    runs: dict[str, list[dict[str, Any]]] = {"after": [], "before": []}
    for _ in range(rounds):
        runs["before"].append(common.run_isolated(SCRIPT, {**spec, **before, "compile": False}, timeout))
        runs["after"].append(common.run_isolated(SCRIPT, spec, timeout))
    merged = {}
    for side, results in runs.items():
        result = dict(results[0])
        samples = [ms / 1e3 for r in results for ms in r.get("step", {}).get("samples_ms", [])]
        if samples:
            result["step"] = common.summary(samples, spec["batch"])
        result["rounds"] = len(results)
        merged[side] = result
    return merged["after"], merged["before"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", choices=ALL_METHODS, help="repeatable; default: all four")
    parser.add_argument("--backbone", action="append", default=None,
                        help=f"repeatable, one per family (default {common.DEFAULT_CLIP} for CLIP, {common.DEFAULT_VIT} for ViT)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--untrimmed", action="store_true", help="also time SEP/CoOp with text trimming off")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="step mode: also run each method with gradient checkpointing on; --data-wait: train with it on")
    parser.add_argument("--compile", action="store_true",
                        help="step mode: also time each method's step through `tune --compile` (CUDA graphs on one "
                             "GPU), alternating with the eager step; its first call (the compilation) is reported")
    parser.add_argument("--no-baselines", action="store_true", help="step mode: skip the two frozen-backbone baselines")
    parser.add_argument("--data-wait", action="store_true",
                        help="measure the data-wait fraction of Trainer.fit over a generated JPEG folder instead")
    parser.add_argument("--loader-only", action="store_true",
                        help="time the training loader alone (no model) over a generated JPEG folder: with the image "
                             "cache, without it, and with --before REV that revision's loader, alternating processes")
    parser.add_argument("--size", type=int, default=224, help="--loader-only: the model input size")
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="--loader-only: the consumer sleeps this long per full batch (a device step)")
    parser.add_argument("--data-classes", type=int, default=10, help="--data-wait: class folders to generate")
    parser.add_argument("--images-per-class", type=int, default=16, help="--data-wait: JPEG files per class")
    parser.add_argument("--image-size", default="320x240", help="--data-wait: WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--epochs", type=int, default=3, help="--data-wait, --loader-only: epochs (>= 2 for a steady state)")
    parser.add_argument("--workers", type=int, default=None, help="--data-wait, --loader-only: loader workers (default: promptune's)")
    parser.add_argument("--sep-reference", action="store_true",
                        help="step mode: also time promptune 0.1.0's SEP step (tests/sep_reference.py) alternating "
                             "with the current one in SEP's process: the step-time ratio without process-to-process drift")
    parser.add_argument("--before", metavar="REV",
                        help="step mode: also run every method case on promptune as of git revision REV (alternating "
                             "processes with the working tree), for before/after op counts and step times in one run")
    parser.add_argument("--rounds", type=int, default=2, help="--before, --loader-only: alternating rounds (per method)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per isolated case")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        common.emit(single(json.loads(args.single)), compact=True)
        return

    backbones = {"clip": common.DEFAULT_CLIP, "vit": common.DEFAULT_VIT}
    for name in args.backbone or []:
        backbones[common.family_of(name)] = name
    methods = args.method or list(ALL_METHODS)
    if args.data_wait:
        common.emit(data_wait_report(args, backbones, methods))
        return
    if args.loader_only:
        common.emit(loader_only_report(args))
        return
    base = {"batch": args.batch, "classes": args.classes, "steps": args.steps, "warmup": args.warmup, "device": args.device}
    families = [f for f in ("clip", "vit") if any((m in common.CLIP_METHODS) == (f == "clip") for m in methods)]

    report: dict[str, Any] = {
        "benchmark": "training step",
        "inputs": {**base, "methods": methods, "backbones": {f: backbones[f] for f in families},
                   "untrimmed": args.untrimmed, "grad_checkpointing": args.grad_checkpointing,
                   "baselines": not args.no_baselines,
                   "data": "synthetic tensor batch, no DataLoader (data-wait fraction not measured)",
                   "step": "promptune.train.Trainer.train_step with optimizer=adam, the method's training_loss and param_groups"},
        "results": {},
    }
    environment = None
    before = _export_revision(args.before) if args.before else None
    if before is not None:
        report["inputs"]["before"] = {"revision": before["code"], "rounds": args.rounds,
                                      "how": "each method case runs on the exported revision and on the working tree "
                                             "in alternating processes, --rounds times; step times pool all rounds"}
    for family in families:
        cases: dict[str, Any] = {}
        before_cases: dict[str, Any] = {}
        for case in () if args.no_baselines else ("forward", "forward_backward_input"):
            cases[case] = common.run_isolated(SCRIPT, {**base, "case": case, "backbone": backbones[family]}, args.timeout)
        for method in methods:
            if (method in common.CLIP_METHODS) != (family == "clip"):
                continue
            cls, why = common.load_method_class(method)
            if cls is None:
                cases[method] = {"note": why}
                continue
            spec = {**base, "case": method, "backbone": backbones[family], "untrimmed": args.untrimmed,
                    "interleave_checkpointing": args.grad_checkpointing, "sep_reference": args.sep_reference,
                    "compile": args.compile}
            if before is not None:
                cases[method], before_cases[method] = _before_and_after(spec, before, args.rounds, args.timeout)
            else:
                cases[method] = common.run_isolated(SCRIPT, spec, args.timeout)
            if args.grad_checkpointing:  # its own process, so its peak memory is the checkpointed steps' alone
                spec = {**spec, "untrimmed": False, "interleave_checkpointing": False, "grad_checkpointing": True}
                cases[f"{method}+grad_checkpointing"] = common.run_isolated(SCRIPT, spec, args.timeout)
        for name, case in cases.items():
            environment = case.pop("environment", environment) if isinstance(case, dict) else environment
        forward = cases.get("forward", {}).get("step", {}).get("median_ms")
        backward = cases.get("forward_backward_input", {}).get("step", {}).get("median_ms")
        ratios: dict[str, Any] = {}
        if not args.no_baselines:
            ratios["forward_backward_input_over_forward"] = common.ratio(backward, forward)
        for method in methods:
            step = cases.get(method, {}).get("step", {}).get("median_ms") if method in cases else None
            if step is None:
                continue
            if not args.no_baselines:
                ratios[f"{method}_step_over_forward"] = common.ratio(step, forward)
                ratios[f"{method}_step_over_forward_backward_input"] = common.ratio(step, backward)
            if "compiled_over_eager" in cases[method]:  # alternating steps in one process
                ratios[f"{method}_compiled_step_over_step"] = cases[method]["compiled_over_eager"]
                if not args.no_baselines:
                    ratios[f"{method}_compiled_step_over_forward_backward_input"] = common.ratio(
                        cases[method]["compiled_step"]["median_ms"], backward)
            if "trimmed_over_untrimmed" in cases[method]:
                ratios[f"{method}_trimmed_over_untrimmed"] = cases[method]["trimmed_over_untrimmed"]
            if "step_over_reference_step" in cases[method]:  # alternating steps in one process
                ratios[f"{method}_step_over_reference_step"] = cases[method]["step_over_reference_step"]
                ratios[f"{method}_step_cpu_over_reference_step_cpu"] = cases[method]["step_cpu_over_reference_step_cpu"]
            if "grad_checkpointing_over_plain" in cases[method]:  # interleaved in one process: drift hits both
                ratios[f"{method}_grad_checkpointing_step_over_step"] = cases[method]["grad_checkpointing_over_plain"]
            checkpointed = cases.get(f"{method}+grad_checkpointing", {})
            if "step" in checkpointed:
                plain_memory, checkpointed_memory = cases[method]["memory"], checkpointed["memory"]
                ratios[f"{method}_grad_checkpointing_peak_over_peak"] = common.ratio(
                    checkpointed_memory["peak_mb"], plain_memory["peak_mb"])
                ratios[f"{method}_grad_checkpointing_added_by_steps_over_added_by_steps"] = common.ratio(
                    checkpointed_memory["added_by_steps_mb"], plain_memory["added_by_steps_mb"])
            if method in before_cases:
                old = before_cases[method]
                ratios[f"{method}_aten_ops_over_before"] = common.ratio(
                    cases[method].get("aten_ops_per_step"), old.get("aten_ops_per_step"))
                ratios[f"{method}_step_over_before"] = common.ratio(step, old.get("step", {}).get("median_ms"))
                if not args.no_baselines:
                    ratios[f"{method}_before_step_over_forward_backward_input"] = common.ratio(
                        old.get("step", {}).get("median_ms"), backward)
        report["results"][family] = {"cases": cases, "ratios": ratios}
        if before_cases:
            for case in before_cases.values():
                case.pop("environment", None)
            report["results"][family]["before"] = before_cases
    sep = report["results"].get("clip", {}).get("ratios", {}).get("sep_trimmed_over_untrimmed")
    if sep is not None:
        report["targets"] = {"sep_trimmed_over_untrimmed": {
            "target": f"<= {TRIM_TARGET} (100 classes, ViT-B-32, batch 8, CPU)", "measured": sep, "met": sep <= TRIM_TARGET,
            "at_target_settings": args.classes == 100 and args.batch == 8 and backbones["clip"] == "ViT-B-32"}}
    report["environment"] = environment
    common.emit(report)


def _image_size(args: argparse.Namespace) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size must be WIDTHxHEIGHT, such as 320x240, not {args.image_size!r}") from None
    return width, height


def data_wait_report(args: argparse.Namespace, backbones: dict[str, str], methods: list[str]) -> dict[str, Any]:
    """The `--data-wait` report: one isolated `Trainer.fit` run per method over the same generated JPEG folder spec."""
    width, height = _image_size(args)
    base = {"case": "data_wait", "batch": args.batch, "epochs": args.epochs, "device": args.device,
            "data_classes": args.data_classes, "images_per_class": args.images_per_class, "image_size": [width, height],
            "workers": args.workers, "grad_checkpointing": args.grad_checkpointing}
    report: dict[str, Any] = {
        "benchmark": "data wait in training",
        "inputs": {**base, "methods": methods,
                   "data": f"{args.data_classes} classes x {args.images_per_class} generated JPEG files of {width}x{height} px "
                           "(gradient + shapes + noise), all used for training, no validation pass",
                   "pipeline": "load_training_data, ImageDataset, build_transform(train=True), make_loader "
                               "(persistent workers, pinned memory on CUDA), method.prepare, Trainer.fit",
                   "data_wait_fraction": "EpochStats.data_wait_fraction: time blocked on the loader / epoch time; "
                                         "epoch 1 includes worker start-up, steady_state averages the later epochs"},
        "results": {},
    }
    environment = None
    for method in methods:
        family = "clip" if method in common.CLIP_METHODS else "vit"
        result = common.run_isolated(SCRIPT, {**base, "method": method, "backbone": backbones[family]}, args.timeout)
        environment = result.pop("environment", environment)
        report["results"][method] = result
    report["environment"] = environment
    return report


if __name__ == "__main__":
    main()
