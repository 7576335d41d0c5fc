"""Cold start of `promptune predict` (issue 14): a fresh process that imports, loads a prompt file onto its backbone
and classifies one image, against a fresh process that only imports torch, open_clip and timm. Prints one JSON.

    python tests/benchmarks/bench_cold_start.py                       # ViT-B-16 CoOp file, 5 pairs
    python tests/benchmarks/bench_cold_start.py --tiny --pairs 9       # the tests' tiny CLIP: quick
    python tests/benchmarks/bench_cold_start.py --code /work/main --code .   # an older checkout and this one, one run
    python tests/benchmarks/bench_cold_start.py --profile 25           # also cProfile one predict process

Setup (once, in a temp folder; for ViT-B-16 about a minute and a few GB of RAM): random weights of the backbone saved
to a local .safetensors, a prompt file of `--method` for `--classes` classes written through promptune's own loading
path, and one 320x240 JPEG. Each round then runs, in fresh interpreters and in alternating order, the import-only
process and `python -m promptune predict IMG --prompts F --weights W --quiet` once per `--code` checkout (that folder
first on PYTHONPATH). One untimed round comes first (it fills the OS file cache and promptune's user cache, which
points into the temp folder). The figures: each side's median wall time, the difference and ratio of the medians,
and the median of the per-round differences; the same for each process's CPU time (user + system), which drifts less
on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

IMPORT_ONLY = "import torch, open_clip, timm"
TARGET_EXTRA_S = 1.0  # predict may take at most this much longer than the import alone (ViT-B-16, CPU)


def write_weights(folder: Path, tiny: bool, backbone: str) -> tuple[str, Path]:
    """(--backbone name, random-weights file) of the backbone, saved the way users save a downloaded copy."""
    if tiny:
        sys.path.insert(0, str(common.REPO_ROOT / "tests"))
        from conftest import make_clip_files

        config_path, weights = make_clip_files(folder)
        return str(config_path), weights
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(backbone, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    weights = folder / f"{backbone}-random.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(weights))
    return backbone, weights


def write_prompt_file(folder: Path, method: str, backbone: str, weights: Path, classes: int) -> Path:
    """An untrained prompt file of `method` for the backbone, as `tune` writes it (learned tensors at their init)."""
    from promptune import __version__
    from promptune.artifact import PromptFile, save_prompt_file
    from promptune.backbones import load_backbone
    from promptune.methods import get_method

    loaded = load_backbone(backbone, str(weights))
    cls = get_method(method)
    model = cls(loaded, common.class_names(classes), cls.make_config({}))
    prompt_file = PromptFile(
        tensors=model.learned_state(), method=method, backbone=loaded.describe(), class_names=model.class_names,
        hparams=model.hparams(), preprocess=loaded.preprocess.to_dict(), training={"note": "untrained, benchmark"},
        promptune_version=__version__,
    )
    return save_prompt_file(folder / f"{method}.safetensors", prompt_file)


def write_image(folder: Path) -> Path:
    images = common.make_jpeg_folder(folder / "images", classes=1, per_class=1)
    return next(images.rglob("*.jpg"))


def child_env(code: Path, cache: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))  # keeps e.g. installed wheels
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", PROMPTUNE_CACHE_DIR=str(cache))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(command: list[str], env: dict[str, str], folder: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of `command` in a fresh process; its CPU time (user + system, all its threads
    and children) is less disturbed by other work on a shared machine than its wall time. It runs in `folder`, not in
    a checkout: `python -m` puts the working folder first on sys.path, before PYTHONPATH."""
    cpu = _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(folder), timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or (command[1:3] == ["-m", "promptune"] and ":" not in done.stdout):
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise SystemExit(f"{' '.join(command[:4])}... failed (exit {done.returncode}): {tail}")
    return seconds, _children_cpu_s() - cpu


def profile_predict(predict: list[str], env: dict[str, str], folder: Path, top: int) -> dict[str, Any]:
    """cProfile of one predict process: the `top` functions by cumulative time, and by own time."""
    out = folder / "predict.prof"
    run_timed([sys.executable, "-m", "cProfile", "-o", str(out), *predict[1:]], env, folder)
    stats = pstats.Stats(str(out))

    def rows(key: int) -> list[str]:
        ranked = sorted(stats.stats.items(), key=lambda item: item[1][key], reverse=True)[:top]
        return [f"{entry[key]:7.3f}  {Path(file).name}:{line}({name})" for (file, line, name), entry in ranked]

    return {"by_cumulative_s": rows(3), "by_own_s": rows(2), "total_s": round(stats.total_tt, 3)}


def summary(seconds: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3), "samples_s": [round(value, 3) for value in seconds]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-16", help="open_clip model (ignored with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny random CLIP instead (quick)")
    parser.add_argument("--method", default="coop", choices=("coop", "sep"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--code", action="append", type=Path, help="a promptune checkout (repeatable; default: this one)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP", help="cProfile one predict process too")
    args = parser.parse_args(argv)
    codes = [code.resolve() for code in (args.code or [common.REPO_ROOT])]

    with tempfile.TemporaryDirectory(prefix="promptune-cold-") as temp:
        folder = Path(temp)
        started = time.perf_counter()
        backbone, weights = write_weights(folder, args.tiny, args.backbone)
        prompts = write_prompt_file(folder, args.method, backbone, weights, args.classes)
        image = write_image(folder)
        setup_s = time.perf_counter() - started
        predict = [sys.executable, "-m", "promptune", "predict", str(image), "--prompts", str(prompts),
                   "--weights", str(weights), "--device", args.device, "--quiet"]
        importing = [sys.executable, "-c", IMPORT_ONLY]
        sides = {"import": (importing, codes[0])} | {f"predict {code}": (predict, code) for code in codes}
        times: dict[str, list[float]] = {side: [] for side in sides}
        cpu_times: dict[str, list[float]] = {side: [] for side in sides}
        first: dict[str, float] = {}
        for round_index in range(args.pairs + 1):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for side in order:
                command, code = sides[side]
                seconds, cpu = run_timed(command, child_env(code, folder / "cache"), folder)
                if round_index == 0:
                    first[side] = round(seconds, 3)
                else:
                    times[side].append(seconds)
                    cpu_times[side].append(cpu)
        profile = profile_predict(predict, child_env(codes[-1], folder / "cache"), folder, args.profile) if args.profile else None
        weights_mb = round(weights.stat().st_size / 2**20, 1)

    base, base_cpu = statistics.median(times["import"]), statistics.median(cpu_times["import"])
    results: dict[str, Any] = {"import": {**summary(times["import"]), "cpu_median_s": round(base_cpu, 3)}}
    for code in codes:
        side, cpu = times[f"predict {code}"], statistics.median(cpu_times[f"predict {code}"])
        median = statistics.median(side)
        results[f"predict {code}"] = {
            **summary(side),
            "first_run_s": first[f"predict {code}"],
            "extra_over_import_s": round(median - base, 3),
            "median_of_round_differences_s": round(statistics.median(p - i for p, i in zip(side, times["import"])), 3),
            "ratio_over_import": round(median / base, 3),
            "cpu_median_s": round(cpu, 3),
            "cpu_extra_over_import_s": round(cpu - base_cpu, 3),
        }
    final = results[f"predict {codes[-1]}"]["extra_over_import_s"]
    device, amp_dtype, threads = common.setup_device(args.device)
    report: dict[str, Any] = {
        "benchmark": "predict cold start",
        "inputs": {"backbone": "tiny test CLIP" if args.tiny else args.backbone, "method": args.method,
                   "classes": args.classes, "pairs": args.pairs, "device": args.device, "weights_mb": weights_mb,
                   "setup_s": round(setup_s, 1), "import_only": f"python -c '{IMPORT_ONLY}'",
                   "predict": "python -m promptune predict ONE.jpg --prompts F --weights W --quiet",
                   "codes": [str(code) for code in codes]},
        "environment": common.environment(device, threads, amp_dtype),
        "results": results,
        "targets": {} if args.tiny else {"extra_over_import_s": {
            "target": f"<= {TARGET_EXTRA_S}", "measured": final, "met": final <= TARGET_EXTRA_S}},
    }
    if profile is not None:
        report["profile"] = profile
    common.emit(report)


if __name__ == "__main__":
    main()
