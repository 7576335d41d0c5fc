"""aten ops of one training step under bf16 autocast, with the frozen backbone in fp32 vs cast once (prints one JSON).

    python tests/benchmarks/bench_cast_frozen.py                       # sep, coop (ViT-B-32), spt, vpt (vit_small)

On CUDA, `promptune tune` casts the frozen linear and convolution weights to the autocast dtype once
(`promptune.runtime.cast_frozen_weights`), because autocast re-casts frozen weights at every use. CPU autocast casts
the same way, so the CPU counts the copies a GPU step no longer launches: each case runs one warm-up step and then
counts the ops of one `Trainer.train_step` (forward, backward, fused optimiser step) under CPU bf16 autocast, with
fp32 frozen weights and on a copy of the model with them cast, in one process; both sides' loss before any update is
reported too (equal: the cast weights are the very tensors autocast made). `copies` counts the `_to_copy` and `copy_`
ops among them, `kernels` the ops that are not views (what launches a kernel on a GPU). Op counts do not depend on
the batch size or the machine's load.

The whole run keeps torch's MHA fast path off, as CUDA autocast does (`nn.MultiheadAttention` never takes its fused
path there); CPU autocast would otherwise take it in the no-grad passes and count ops no GPU step runs.

    PYTHONPATH=OLD_CHECKOUT python tests/benchmarks/bench_cast_frozen.py --method sep   # an older promptune's counts
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
import torch  # noqa: E402

COPY_OPS = ("_to_copy", "copy_")
VIEW_OPS = ("view", "_unsafe_view", "t", "transpose", "permute", "detach", "slice", "select", "split",
            "split_with_sizes", "unbind", "expand", "unsqueeze", "squeeze", "as_strided", "alias", "reshape", "unflatten",
            "chunk", "narrow", "view_as", "_reshape_alias")


def case(method_name: str, backbone_name: str, batch: int, classes: int) -> dict[str, Any]:
    import copy

    from promptune.runtime import Runtime, cast_frozen_weights
    from promptune.train import Trainer, TrainConfig

    torch.manual_seed(0)
    backbone = common.build_backbone(backbone_name)
    plain = common.build_method(method_name, backbone, common.class_names(classes))
    cast = copy.deepcopy(plain)
    result: dict[str, Any] = {"method": method_name, "backbone": backbone_name, "batch": batch, "classes": classes,
                              "tensors_cast": cast_frozen_weights(cast, torch.bfloat16)}
    runtime = Runtime(torch.device("cpu"), torch.bfloat16)
    config = TrainConfig(epochs=1, lr=1e-3, weight_decay=0.0, batch_size=batch, warmup_epochs=0, optimizer="adam")
    generator = torch.Generator().manual_seed(0)
    size = backbone.preprocess.size
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    for side, method in (("fp32_frozen", plain), ("cast_frozen", cast)):
        method.train()
        with torch.no_grad(), runtime.autocast():
            loss, _ = method.training_loss(images, labels)  # before any update: both sides' first loss
        trainer = Trainer(method, config, runtime, steps_per_epoch=10**6)
        trainer.train_step(images, labels)  # warm-up: the optimiser state exists as in every later step
        with common.OpCounter() as counter:
            trainer.train_step(images, labels)
        ops: Counter = counter.by_op
        result[side] = {"aten_ops_per_step": counter.total, "copies": sum(ops[name] for name in COPY_OPS),
                        "kernels": counter.total - sum(ops[name] for name in VIEW_OPS), "first_loss": float(loss)}
    result["same_first_loss"] = result["fp32_frozen"]["first_loss"] == result["cast_frozen"]["first_loss"]
    result["ops_over_fp32_frozen"] = common.ratio(result["cast_frozen"]["aten_ops_per_step"],
                                                  result["fp32_frozen"]["aten_ops_per_step"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", action="append", choices=("sep", "coop", "spt", "vpt"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    torch.backends.mha.set_fastpath_enabled(False)  # as under CUDA autocast
    import promptune

    report: dict[str, Any] = {
        "benchmark": "aten ops per training step under bf16 autocast: frozen weights fp32 vs cast once",
        "inputs": {"batch": args.batch, "classes": args.classes, "device": "cpu", "autocast": "bfloat16",
                   "backbones": {"clip": common.DEFAULT_CLIP, "vit": common.DEFAULT_VIT}, "mha_fast_path": False,
                   "promptune": str(Path(promptune.__file__).resolve().parent)},
        "results": {},
    }
    for name in args.method or ["sep", "coop", "spt", "vpt"]:
        backbone = common.DEFAULT_CLIP if name in common.CLIP_METHODS else common.DEFAULT_VIT
        report["results"][name] = case(name, backbone, args.batch, args.classes)
    report["environment"] = common.environment(torch.device("cpu"), torch.get_num_threads(), torch.bfloat16)
    common.emit(report)


if __name__ == "__main__":
    main()
