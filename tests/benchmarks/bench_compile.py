"""`tune --compile` on the CPU: what compiling the training step costs and what a compiled step gives (one JSON).

    python tests/benchmarks/bench_compile.py                       # spt on test_vit, sep on a tiny CLIP

For each method, on a tiny random-weight backbone (the test suite's, one copy each), two `Trainer`s over the same
weights and batch (batch 8): one eager, one with `compile_step=True` (`torch.compile` of the training forward; the backward comes from
the same compiled graph). The compiled trainer's first step is the compilation, from an empty inductor cache (a fresh
`TORCHINDUCTOR_CACHE_DIR`, as on a first run; later runs on the same machine reuse that cache); its second step is
reported too. Then the two trainers alternate `--steps` steps (medians), so machine-load drift hits both alike.
`torch._dynamo.explain` reports the graph breaks of the training forward: none means dynamo captures it whole.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the suite's tiny backbones

import _common as common  # noqa: E402
import torch  # noqa: E402

NAMES = ["red square", "green circle", "blue triangle"]


def tiny_backbone(family: str, folder: Path):
    from conftest import make_clip_files, make_vit_file

    from promptune.backbones import load_backbone

    if family == "vit":
        return load_backbone("test_vit", str(make_vit_file(folder)))
    config_json, weights = make_clip_files(folder)
    return load_backbone(str(config_json), str(weights))


def timed_step(trainer, images: torch.Tensor, labels: torch.Tensor) -> float:
    started = time.perf_counter()
    loss, _ = trainer.train_step(images, labels)
    float(loss)
    return time.perf_counter() - started


def case(name: str, steps: int, folder: Path) -> dict[str, Any]:
    from promptune.methods import get_method
    from promptune.runtime import Runtime
    from promptune.train import Trainer, TrainConfig, TrainStep

    cls = get_method(name)
    backbones = {side: tiny_backbone(cls.family, folder / side) for side in ("eager", "compiled")}  # nothing shared
    size = backbones["eager"].preprocess.size
    images = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    config = TrainConfig(epochs=1, lr=0.01, weight_decay=0.0, batch_size=8, warmup_epochs=0, optimizer="adam")
    result: dict[str, Any] = {"method": name, "backbone": backbones["eager"].name, "batch": 8}
    trainers = {}
    for side in ("eager", "compiled"):
        torch.manual_seed(0)
        method = cls(backbones[side], NAMES, cls.make_config({}))
        method.train()
        if side == "eager":
            explained = torch._dynamo.explain(TrainStep(method))(images, labels)
            result["dynamo"] = {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count}
        trainers[side] = Trainer(method, config, Runtime(torch.device("cpu")), steps_per_epoch=10**6,
                                 compile_step=side == "compiled")
        result[f"{side}_first_two_steps_s"] = [round(timed_step(trainers[side], images, labels), 3) for _ in range(2)]
    times: dict[str, list[float]] = {side: [] for side in trainers}
    for _ in range(steps):
        for side, trainer in trainers.items():
            times[side].append(timed_step(trainer, images, labels))
    for side, values in times.items():
        result[f"{side}_step_median_ms"] = round(statistics.median(values) * 1e3, 2)
    result["compiled_over_eager"] = common.ratio(result["compiled_step_median_ms"], result["eager_step_median_ms"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", choices=("sep", "coop", "spt", "vpt"))
    parser.add_argument("--steps", type=int, default=10, help="alternating timed steps per trainer")
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "tune --compile on the CPU: compile time and step time, tiny backbones",
                              "inputs": {"steps": args.steps, "batch": 8, "device": "cpu", "precision": "fp32"},
                              "results": {}}
    with tempfile.TemporaryDirectory(prefix="promptune-bench-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # a first run's empty cache
        for name in args.method or ["spt", "sep"]:
            report["results"][name] = case(name, args.steps, Path(tmp) / name)
            torch._dynamo.reset()
    report["environment"] = common.environment(torch.device("cpu"), torch.get_num_threads(), torch.float32)
    common.emit(report)


if __name__ == "__main__":
    main()
