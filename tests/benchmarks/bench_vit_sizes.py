"""Parameter counts and prompt-file sizes of SPT on real-size timm ViTs, built on the meta device (no weights at all).

The backbone's parameters are counted without allocating them; SPT's own tensors (prompts, head) are real, so the
prompt file written is exactly what `tune` would write for that backbone, class count and prompt length (class names
from the benchmarks' word list). Prints one JSON object.

    python tests/benchmarks/bench_vit_sizes.py [--model NAME ...] [--prompts 20] [--classes 100] [--depth deep]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _common as common  # noqa: F401  (puts the repository on sys.path, sets HF_HUB_OFFLINE)
import timm
import torch

from promptune.artifact import PromptFile, save_prompt_file
from promptune.backbones import Backbone, freeze
from promptune.data import Preprocess
from promptune.methods.spt import SPT

MODELS = ("vit_base_patch16_224", "deit3_base_patch16_224", "vit_base_patch14_reg4_dinov2", "eva02_base_patch14_224")


def measure(name: str, prompts: int, classes: int, depth: str, folder: Path) -> dict:
    with torch.device("meta"):
        model = freeze(timm.create_model(name, pretrained=False, num_classes=0))
    config = timm.data.resolve_model_data_config(model)
    preprocess = Preprocess(size=int(config["input_size"][-1]), mean=tuple(config["mean"]), std=tuple(config["std"]))
    backbone = Backbone(family="vit", name=name, weights=None, model=model, preprocess=preprocess,
                        shape={"embed_dim": int(model.embed_dim), "depth": len(model.blocks),
                               "num_prefix_tokens": int(model.num_prefix_tokens)})
    names = common.class_names(classes)
    with torch.device("cpu"):
        method = SPT(backbone, names, SPT.make_config({"depth": depth, "prompts_per_layer": prompts}))
    state = method.learned_state()
    record = PromptFile(tensors=state, method="spt", backbone=backbone.describe(), class_names=names,
                        hparams=method.hparams(), preprocess=preprocess.to_dict())
    path = save_prompt_file(folder / f"{name}.safetensors", record)
    return {
        "class": type(model).__name__,
        "input_size": list(config["input_size"]),
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "pool": method.hparams()["pool"],
        "backbone_parameters": sum(p.numel() for p in model.parameters()),
        "learned_parameters": {key: int(value.numel()) for key, value in state.items()},
        "learned_total": sum(int(value.numel()) for value in state.values()),
        "prompt_file_bytes": path.stat().st_size,
        "skips_prompt_outputs": all(method.layout.skips_span(i) for i in range(method.num_blocks)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help=f"repeatable; default: {', '.join(MODELS)}")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--depth", choices=("deep", "shallow"), default="deep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = {name: measure(name, args.prompts, args.classes, args.depth, Path(folder)) for name in args.model or MODELS}
    print(json.dumps({"benchmark": "vit_sizes", "timm": timm.__version__, "prompts_per_layer": args.prompts,
                      "classes": args.classes, "depth": args.depth, "models": models}, indent=2))


if __name__ == "__main__":
    main()
