"""Wall time and peak memory of SPT's prototype collection (`SPT.prepare`) against the number of images.

Each image count runs in a fresh child process, so every peak RSS belongs to one run alone. Inputs are random
tensors made batch by batch (no image decoding), so the figures are the backbone pass plus the reservoirs. The
ViT has random weights: nothing is downloaded. Prints one JSON object.

    python tests/benchmarks/bench_init.py --images 1000 5000 20000 [--model vit_small_patch16_224] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(args: argparse.Namespace, images: int) -> dict:
    import timm
    import torch

    from promptune.backbones import Backbone, freeze
    from promptune.data import Batch, Preprocess
    from promptune.methods.spt import SPT
    from promptune.runtime import Runtime

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = freeze(timm.create_model(args.model, pretrained=False, num_classes=0))
    size = int(model.patch_embed.img_size[0])
    backbone = Backbone(
        family="vit", name=args.model, weights=None, model=model,
        preprocess=Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    )
    config = SPT.make_config({"depth": args.depth, "prompts_per_layer": args.prompts, "init": args.init})
    method = SPT(backbone, [f"class{i}" for i in range(10)], config).to(device)

    def batches():
        generator = torch.Generator().manual_seed(1)
        for start in range(0, images, args.batch_size):
            count = min(args.batch_size, images - start)
            yield Batch(
                images=torch.randn(count, 3, size, size, generator=generator),
                labels=torch.zeros(count, dtype=torch.long),
                indices=torch.arange(start, start + count),
                failed=[],
            )

    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    method.prepare(batches(), Runtime(device), seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "rss_before_prepare_mb": round(rss_before, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "reservoir_bytes": method.init_summary["reservoir_bytes"],
        "tokens_seen_per_layer": method.init_summary["tokens_seen_per_layer"],
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depth", default="deep", choices=["deep", "shallow"])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--init", default="random", choices=["random", "mean", "max", "kmeans"])
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single is not None:
        print(json.dumps(run_one(args, args.single)))
        return

    import torch

    runs = []
    for count in args.images:
        command = [sys.executable, __file__, "--single", str(count)]
        for flag in ("model", "device", "batch_size", "depth", "prompts", "init"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(json.dumps({
        "benchmark": "spt_prototype_init",
        "model": args.model,
        "device": args.device,
        "depth": args.depth,
        "prompts_per_layer": args.prompts,
        "init": args.init,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
