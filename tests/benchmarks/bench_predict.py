"""Predict throughput (images/s) of SEP vs open_clip zero-shot and SPT vs timm's plain forward; prints one JSON.

    python tests/benchmarks/bench_predict.py
    python tests/benchmarks/bench_predict.py --classes 10 --classes 1000 --batch 32 --steps 5

Predict = the method in eval mode under no_grad (and the device's autocast), on a synthetic image batch. The text
features are computed once per class list before timing (SEP caches them in eval; zero-shot holds them in a buffer),
so throughput excludes that one-off text pass; its time is reported separately. Within each class count the compared
models alternate batch by batch, so load drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
import torch  # noqa: E402

TARGETS = {"sep_1000_over_sep_10": 0.8, "sep_over_zero_shot": 0.4, "spt_over_timm": 0.85}


def _interleaved(runs: dict[str, Callable[[], Any]], steps: int, warmup: int, batch: int, device) -> dict[str, Any]:
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            times[name].append(common.timed(run, device))
    return {name: common.summary(values, batch) for name, values in times.items()}


def _cuda_peak(device, fn: Callable[[], Any]) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def bench_clip(args, device, amp_dtype) -> dict[str, Any]:
    from promptune.methods.zeroshot import ZeroShotCLIP

    sep_cls, why = common.load_method_class("sep")
    backbone = common.build_backbone(args.clip_backbone)
    backbone.model.to(device)
    size = backbone.preprocess.size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {"backbone": args.clip_backbone, "per_classes": {}}
    if sep_cls is None:
        out["sep"] = why
    for count in args.classes:
        names = common.class_names(count)
        entry: dict[str, Any] = {}
        started = time.perf_counter()
        zero_shot = ZeroShotCLIP(backbone, names).to(device)  # encodes the template texts once
        common.sync(device)
        entry["zero_shot_text_pass_s"] = round(time.perf_counter() - started, 3)

        def zs() -> None:
            with torch.no_grad(), common.runtime(device, amp_dtype).autocast():
                zero_shot(images)

        runs = {"zero_shot": zs}
        if sep_cls is not None:
            method = sep_cls(backbone, names, sep_cls.make_config({})).to(device).eval()
            with torch.no_grad(), common.runtime(device, amp_dtype).autocast():
                method._text_cache = None
                entry["sep_text_pass_s"] = round(common.timed(method.text_features, device), 3)

            def sep() -> None:
                with torch.no_grad(), common.runtime(device, amp_dtype).autocast():
                    method(images)

            runs["sep"] = sep
        timings = _interleaved(runs, args.steps, args.warmup, args.batch, device)
        entry.update(timings)
        if "sep" in timings:
            entry["sep_over_zero_shot"] = common.ratio(timings["sep"]["images_per_s"], timings["zero_shot"]["images_per_s"])
        if device.type == "cuda":
            entry["cuda_peak_mb"] = {name: _cuda_peak(device, run) for name, run in runs.items()}
        out["per_classes"][str(count)] = entry
        del zero_shot
    return out


def bench_vit(args, device, amp_dtype) -> dict[str, Any]:

    spt_cls, why = common.load_method_class("spt")
    backbone = common.build_backbone(args.vit_backbone)
    model = backbone.model.to(device)
    size = backbone.preprocess.size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {"backbone": args.vit_backbone, "spt_prompts_per_layer": args.prompts, "per_classes": {}}
    if spt_cls is None:
        out["spt"] = why

    def timm_forward() -> None:
        with torch.no_grad(), common.runtime(device, amp_dtype).autocast():
            model(images)

    for count in args.classes:
        runs = {"timm": timm_forward}
        if spt_cls is not None:
            method = spt_cls(backbone, common.class_names(count),
                             spt_cls.make_config({"depth": "deep", "prompts_per_layer": args.prompts})).to(device).eval()

            def spt() -> None:
                with torch.no_grad(), common.runtime(device, amp_dtype).autocast():
                    method(images)

            runs["spt"] = spt
        entry = _interleaved(runs, args.steps, args.warmup, args.batch, device)
        if "spt" in entry:
            entry["spt_over_timm"] = common.ratio(entry["spt"]["images_per_s"], entry["timm"]["images_per_s"])
        if device.type == "cuda":
            entry["cuda_peak_mb"] = {name: _cuda_peak(device, run) for name, run in runs.items()}
        out["per_classes"][str(count)] = entry
    return out


def _target(name: str, measured: float | None, at: str) -> dict[str, Any]:
    goal = TARGETS[name]
    return {"target": f">= {goal}", "measured": measured, "at": at, "met": None if measured is None else measured >= goal}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", choices=("sep", "spt"), help="repeatable; default: both")
    parser.add_argument("--backbone", action="append", default=None,
                        help=f"repeatable, one per family (default {common.DEFAULT_CLIP} for CLIP, {common.DEFAULT_VIT} for ViT)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, action="append", help="repeatable; default: 10, 100 and 1000")
    parser.add_argument("--prompts", type=int, default=20, help="SPT prompts per layer (deep)")
    parser.add_argument("--steps", type=int, default=3, help="timed batches per model and class count (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    args.classes = args.classes or [10, 100, 1000]
    args.clip_backbone, args.vit_backbone = common.DEFAULT_CLIP, common.DEFAULT_VIT
    for name in args.backbone or []:
        if common.family_of(name) == "clip":
            args.clip_backbone = name
        else:
            args.vit_backbone = name
    methods = args.method or ["sep", "spt"]

    device, amp_dtype, threads = common.setup_device(args.device)
    report: dict[str, Any] = {
        "benchmark": "predict throughput",
        "inputs": {"methods": methods, "batch": args.batch, "classes": args.classes, "steps": args.steps,
                   "warmup": args.warmup, "device": args.device, "spt_prompts_per_layer": args.prompts,
                   "data": "synthetic tensor batch; eval mode, no_grad, text features cached before timing"},
        "environment": common.environment(device, threads, amp_dtype),
        "results": {},
        "targets": {},
    }
    low, high = str(min(args.classes)), str(max(args.classes))
    if "sep" in methods:
        clip = bench_clip(args, device, amp_dtype)
        report["results"]["clip"] = clip
        per = clip["per_classes"]
        if "sep" in per[low]:
            report["targets"]["sep_1000_over_sep_10"] = _target(
                "sep_1000_over_sep_10", common.ratio(per[high]["sep"]["images_per_s"], per[low]["sep"]["images_per_s"]),
                f"SEP images/s at {high} over {low} classes")
            worst = min(per, key=lambda c: per[c]["sep_over_zero_shot"])
            report["targets"]["sep_over_zero_shot"] = _target(
                "sep_over_zero_shot", per[worst]["sep_over_zero_shot"], f"lowest over class counts ({worst} classes)")
    if "spt" in methods:
        vit = bench_vit(args, device, amp_dtype)
        report["results"]["vit"] = vit
        per = vit["per_classes"]
        if "spt_over_timm" in per[low]:
            worst = min(per, key=lambda c: per[c]["spt_over_timm"])
            report["targets"]["spt_over_timm"] = _target(
                "spt_over_timm", per[worst]["spt_over_timm"], f"P={args.prompts}, lowest over class counts ({worst} classes)")
    report["peak_rss_mb"] = common.peak_rss_mb()
    common.emit(report)


if __name__ == "__main__":
    main()
