"""Time per epoch of `promptune tune` in one process next to N processes (`--gpus N`), same global batch; one JSON.

    python tests/benchmarks/bench_ddp.py                                  # CPU: 1 x batch 16 vs 2 x batch 8 (gloo)
    python tests/benchmarks/bench_ddp.py --device cuda --gpus 4 --backbone vit_base_patch16_224 --batch 64

Both sides run the real command (`python -m promptune tune ... --json`) on the same generated JPEG folder, with the
same seed and the same images per step (one process: --batch-size B x N; N processes: --batch-size B each). Runs
alternate (1, N, 1, N, ...) so machine-load drift hits both alike. The figure per side is the median over repeats of
the run's training seconds per epoch (`TrainSummary.seconds / epochs`: the steps, validation and checkpoint of every
epoch), next to the whole command's wall time (process start, imports, rendezvous, image scan, prototype pass).
The backbone has random weights saved to a local file (no hub). On one CPU the processes share the same cores: the
2-process run checks correctness there, it cannot be faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
import torch  # noqa: E402


def _weights(name: str, folder: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    path = folder / f"{name}-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _tune(args: argparse.Namespace, data: Path, weights: Path, out: Path, processes: int, threads: int | None) -> dict:
    batch = args.batch if processes > 1 else args.batch * args.gpus
    command = [sys.executable, "-m", "promptune", "tune", str(data), "--method", "spt", "--backbone", args.backbone,
               "--weights", str(weights), "--epochs", str(args.epochs), "--batch-size", str(batch), "--seed", "0",
               "--device", args.device, "--workers", str(args.workers), "--out", str(out), "--no-checkpoint", "--json"]
    if processes > 1:
        command += ["--gpus", str(processes)]
    started = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(common.REPO_ROOT),
                          timeout=args.timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"epoch_s": summary["seconds"] / summary["epochs_run"], "wall_s": wall,
            "final_train_acc": summary["final_train_acc"], "cpu_threads": summary["cpu_threads"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT (random weights)")
    parser.add_argument("--gpus", type=int, default=2, help="processes of the many-process side")
    parser.add_argument("--batch", type=int, default=8, help="images per step and process (one process: x --gpus)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="loader processes (0: the first epoch of neither side "
                        "includes starting them)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)

    # (processes, OMP threads per process): one process as `tune` runs it (all cores), one process on one thread
    # (the per-process thread count of the other side), and N processes (each on cores / N threads).
    sides = {"1 process": (1, None), "1 process, 1 thread": (1, 1), f"{args.gpus} processes": (args.gpus, None)}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = common.make_jpeg_folder(folder / "data", args.classes, args.images_per_class)
        weights = _weights(args.backbone, folder)
        for _ in range(args.repeats):
            for name, (processes, threads) in sides.items():
                runs[name].append(_tune(args, data, weights, folder / "p.safetensors", processes, threads))
    figures = {
        name: {
            "epoch_s_median": round(statistics.median(r["epoch_s"] for r in results), 2),
            "wall_s_median": round(statistics.median(r["wall_s"] for r in results), 2),
            "epoch_s": [round(r["epoch_s"], 2) for r in results],
            "final_train_acc": [r["final_train_acc"] for r in results],
            "cpu_threads_per_process": results[0]["cpu_threads"],
        }
        for name, results in runs.items()
    }
    many = figures[f"{args.gpus} processes"]["epoch_s_median"]
    common.emit({
        "benchmark": "tune in 1 process vs --gpus N processes (same images per step)",
        "inputs": {**vars(args), "method": "spt", "batch_per_step": args.batch * args.gpus,
                   "data": f"{args.classes} classes x {args.images_per_class} generated JPEG files, 80% for training"},
        "results": {
            "sides": figures,
            "epoch_time_ratio_n_over_1": common.ratio(many, figures["1 process"]["epoch_s_median"]),
            "epoch_time_ratio_n_over_1_thread": common.ratio(many, figures["1 process, 1 thread"]["epoch_s_median"]),
        },
        "environment": {**common.environment(torch.device(args.device), torch.get_num_threads(), torch.float32),
                        "note": "CPU processes share the machine's cores (gloo): a correctness check, not a speed-up"},
    })


if __name__ == "__main__":
    main()
