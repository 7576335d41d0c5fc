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
"""

from __future__ import annotations

import argparse
import json
import sys
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


def _untrimmed():
    """Context manager forcing ClipTextRunner onto all context positions (what the code did before trimming)."""
    import contextlib

    from promptune.methods.clip_text import ClipTextRunner

    @contextlib.contextmanager
    def patch():
        original = ClipTextRunner.needed_length
        ClipTextRunner.needed_length = lambda self, tokens, min_length=0: self.context_length
        try:
            yield
        finally:
            ClipTextRunner.needed_length = original

    return patch()


def single(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this (fresh) process: build, warm up, time `steps` steps, report time and memory."""
    device, amp_dtype, threads = common.setup_device(spec["device"])
    from promptune.devices import autocast

    backbone = common.build_backbone(spec["backbone"])
    backbone.model.to(device)
    batch, steps, warmup = spec["batch"], spec["steps"], spec["warmup"]
    images, labels = _batch(backbone, batch, spec["classes"], device)
    result: dict[str, Any] = {"case": spec["case"], "backbone": spec["backbone"]}

    if spec["case"] == "forward":
        forward = _forward(backbone)

        def step() -> None:
            with torch.no_grad(), autocast(device, amp_dtype):
                forward(images)

        runs = {"step": step}
    elif spec["case"] == "forward_backward_input":
        forward = _forward(backbone)

        def step() -> None:
            x = images.clone().requires_grad_(True)
            with autocast(device, amp_dtype):
                out = forward(x)
            out.float().sum().backward()

        runs = {"step": step}
    else:
        from promptune.train import Trainer, TrainConfig

        names = common.class_names(spec["classes"])
        method = common.build_method(spec["case"], backbone, names).to(device)
        method.train()
        config = TrainConfig(epochs=1, lr=1e-3, weight_decay=5e-4, batch_size=batch, warmup_epochs=0.0,
                             optimizer="adam", amp_dtype=amp_dtype)
        trainer = Trainer(method, config, device, steps_per_epoch=10**6)
        result["learned_parameters"] = sum(p.numel() for g in method.param_groups(5e-4) for p in g["params"])
        text = getattr(method, "text", None)
        if text is not None:
            tokens = method.prompts.tokens
            minimum = 1 + 2 * method.n_ctx if spec["case"] == "sep" else 0
            result["text_positions"] = {"trimmed": text.needed_length(tokens, minimum), "full": text.context_length}

        def step() -> None:
            trainer.train_step(images, labels)

        def step_untrimmed() -> None:
            with _untrimmed():
                trainer.train_step(images, labels)

        runs = {"step": step}
        if spec.get("untrimmed") and text is not None:
            runs["untrimmed_step"] = step_untrimmed

    memory = common.PeakMemory(device)
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):  # interleaved, so load drift on a shared machine hits every variant alike
        for name, run in runs.items():
            times[name].append(common.timed(run, device))
    result.update({name: common.summary(values, batch) for name, values in times.items()})
    if "untrimmed_step" in times:
        result["trimmed_over_untrimmed"] = common.ratio(result["step"]["median_ms"], result["untrimmed_step"]["median_ms"])
    result["memory"] = memory.report()
    if len(runs) > 1:
        result["memory"]["note"] = "peak over the trimmed and untrimmed steps together"
    result["environment"] = common.environment(device, threads, amp_dtype)
    return result


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
    base = {"batch": args.batch, "classes": args.classes, "steps": args.steps, "warmup": args.warmup, "device": args.device}
    families = [f for f in ("clip", "vit") if any((m in common.CLIP_METHODS) == (f == "clip") for m in methods)]

    report: dict[str, Any] = {
        "benchmark": "training step",
        "inputs": {**base, "methods": methods, "backbones": {f: backbones[f] for f in families},
                   "untrimmed": args.untrimmed,
                   "data": "synthetic tensor batch, no DataLoader (data-wait fraction not measured)",
                   "step": "promptune.train.Trainer.train_step with optimizer=adam, the method's training_loss and param_groups"},
        "results": {},
    }
    environment = None
    for family in families:
        cases: dict[str, Any] = {}
        for case in ("forward", "forward_backward_input"):
            cases[case] = common.run_isolated(SCRIPT, {**base, "case": case, "backbone": backbones[family]}, args.timeout)
        for method in methods:
            if (method in common.CLIP_METHODS) != (family == "clip"):
                continue
            cls, why = common.load_method_class(method)
            if cls is None:
                cases[method] = {"note": why}
                continue
            spec = {**base, "case": method, "backbone": backbones[family], "untrimmed": args.untrimmed}
            cases[method] = common.run_isolated(SCRIPT, spec, args.timeout)
        for name, case in cases.items():
            environment = case.pop("environment", environment) if isinstance(case, dict) else environment
        forward = cases["forward"].get("step", {}).get("median_ms")
        backward = cases["forward_backward_input"].get("step", {}).get("median_ms")
        ratios: dict[str, Any] = {"forward_backward_input_over_forward": common.ratio(backward, forward)}
        for method in methods:
            step = cases.get(method, {}).get("step", {}).get("median_ms") if method in cases else None
            if step is None:
                continue
            ratios[f"{method}_step_over_forward"] = common.ratio(step, forward)
            ratios[f"{method}_step_over_forward_backward_input"] = common.ratio(step, backward)
            if "trimmed_over_untrimmed" in cases[method]:
                ratios[f"{method}_trimmed_over_untrimmed"] = cases[method]["trimmed_over_untrimmed"]
        report["results"][family] = {"cases": cases, "ratios": ratios}
    sep = report["results"].get("clip", {}).get("ratios", {}).get("sep_trimmed_over_untrimmed")
    if sep is not None:
        report["targets"] = {"sep_trimmed_over_untrimmed": {
            "target": f"<= {TRIM_TARGET} (100 classes, ViT-B-32, batch 8, CPU)", "measured": sep, "met": sep <= TRIM_TARGET,
            "at_target_settings": args.classes == 100 and args.batch == 8 and backbones["clip"] == "ViT-B-32"}}
    report["environment"] = environment
    common.emit(report)


if __name__ == "__main__":
    main()
