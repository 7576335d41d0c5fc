"""SEP's size and CPU training-step cost next to CoOp's; prints one JSON object.

- learned parameters and prompt-file bytes for ViT-B-16 (random weights, nothing downloaded);
- one training step (forward + backward + Adam step, fp32) at batch 8 on ViT-B-32: SEP and CoOp with 10 classes,
  SEP with 100 classes; median of `--repeats` steps after one warm-up step, all in the same process.

Run: HF_HUB_OFFLINE=1 python tests/benchmarks/bench_sep_step.py [--repeats 5] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ADJECTIVES = ["red", "small", "spotted", "golden", "wild", "striped", "giant", "northern", "common", "dwarf"]
NOUNS = ["fox", "retriever", "owl", "maple tree", "tulip", "sports car", "airliner", "mushroom", "beetle", "salamander"]


def class_names(count: int) -> list[str]:
    names = [f"{a} {n}" for n in NOUNS for a in ADJECTIVES]
    return names[:count]


def random_clip(name: str):
    import open_clip

    from promptune.backbones import Backbone, freeze
    from promptune.data import Preprocess

    torch.manual_seed(0)
    model = freeze(open_clip.create_model(name))  # pretrained=None: random weights, no download
    preprocess = Preprocess(size=224, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    return Backbone(
        family="clip", name=name, weights=None, model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name)
    )


def prompt_file_bytes(method, backbone) -> int:
    from promptune.artifact import PromptFile, save_prompt_file

    with tempfile.TemporaryDirectory() as folder:
        path = save_prompt_file(
            Path(folder) / "prompts.safetensors",
            PromptFile(
                tensors=dict(method.learned_state()),
                method=method.name,
                backbone=backbone.describe(),
                class_names=method.class_names,
                hparams=method.hparams(),
                preprocess=backbone.preprocess.to_dict(),
            ),
        )
        return path.stat().st_size


def size_report() -> dict:
    from promptune.methods.sep import SEP

    backbone = random_clip("ViT-B-16")
    sep = SEP(backbone, class_names(10), SEP.make_config({}))
    learned = sep.learned_state()
    text = sum(t.numel() for k, t in learned.items() if k.startswith("text_fusion."))
    visual = sum(t.numel() for k, t in learned.items() if k.startswith("visual_fusion."))
    return {
        "backbone": "ViT-B-16",
        "learned_parameters": sum(t.numel() for t in learned.values()),
        "text_fusion_parameters": text,
        "visual_fusion_parameters": visual,
        "ctx_parameters": learned["ctx"].numel() + learned["ctx_v"].numel(),
        "trainable_parameters_10_classes_incl_prototypes": sum(p.numel() for p in sep.parameters() if p.requires_grad),
        "tensor_bytes_fp32": sum(t.numel() * 4 for t in learned.values()),
        "prompt_file_bytes": prompt_file_bytes(sep, backbone),
    }


def step_seconds(method, batch: int, repeats: int) -> float:
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % len(method.class_names)
    optimizer = torch.optim.Adam(method.param_groups(5e-4), lr=1e-3)
    method.train()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss, _ = method.training_loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_report(batch: int, repeats: int) -> dict:
    from promptune.methods.coop import CoOp
    from promptune.methods.sep import SEP

    backbone = random_clip("ViT-B-32")
    report = {"backbone": "ViT-B-32", "batch": batch, "repeats": repeats, "statistic": "median seconds per step"}
    torch.manual_seed(0)
    report["coop_10_classes_s"] = step_seconds(CoOp(backbone, class_names(10), CoOp.make_config({})), batch, repeats)
    torch.manual_seed(0)
    report["sep_10_classes_s"] = step_seconds(SEP(backbone, class_names(10), SEP.make_config({})), batch, repeats)
    torch.manual_seed(0)
    report["sep_100_classes_s"] = step_seconds(SEP(backbone, class_names(100), SEP.make_config({})), batch, repeats)
    report["sep_over_coop_10_classes"] = report["sep_10_classes_s"] / report["coop_10_classes_s"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "precision": "fp32",
        "size": size_report(),
        "step": step_report(args.batch, args.repeats),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
