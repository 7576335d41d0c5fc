"""SEP on today's CLIP towers: learned size and prompt-file bytes per backbone, and a training step next to ViT-B-16.

- size: SEP's learned tensors and prompt-file bytes on ViT-B-16, ViT-B-16-SigLIP2, EVA02-B-16 and PE-Core-B-16, built
  with random weights (same architectures as the real ones, nothing downloaded), default options, 10 classes;
- step: one SEP training step (forward + backward + Adam step, fp32, CPU) on ViT-B-16-SigLIP2 and on ViT-B-16, the two
  alternating in one process (median of `--repeats` steps each after one warm-up step), so their ratio is fair on a
  shared machine. Each step's wall time and the CPU time this process spent on it are both reported, as medians and
  minima: on a machine shared with other jobs, single steps swing by 2x, and the least-disturbed step (the minimum) is
  the steadiest measure of the work a step takes.

SigLIP2's real tokenizer is a Hugging Face (Gemma) tokenizer fetched from the hub; offline it is replaced by open_clip's
own BPE tokenizer with SigLIP2's context length (64). Its text tower has no causal mask, so it runs all 64 positions
whatever the tokenizer; the token ids differ, the cost does not.

Run: HF_HUB_OFFLINE=1 python tests/benchmarks/bench_clip_towers.py [--batch 4] [--classes 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import class_names, emit, environment, ratio, setup_device, timed

SIZE_BACKBONES = ("ViT-B-16", "ViT-B-16-SigLIP2", "EVA02-B-16", "PE-Core-B-16")
STEP_BACKBONES = ("ViT-B-16-SigLIP2", "ViT-B-16")


def random_clip(name: str):
    """A frozen random-weight Backbone; a hub tokenizer is replaced by open_clip's BPE one at the same context length."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from promptune.backbones import Backbone, _clip_shape, freeze
    from promptune.data import Preprocess

    torch.manual_seed(0)
    model = freeze(open_clip.create_model(name, pretrained=None))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    text_cfg = open_clip.get_model_config(name)["text_cfg"]
    hub_tokenizer = "hf_tokenizer_name" in text_cfg or "siglip" in name.lower()
    context = int(text_cfg.get("context_length", 77))
    tokenizer = SimpleTokenizer(context_length=context) if hub_tokenizer else open_clip.get_tokenizer(name)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    backbone = Backbone(family="clip", name=name, weights=None, model=model, tokenizer=tokenizer, shape=_clip_shape(model),
                        preprocess=Preprocess(size=size, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD))
    return backbone, ("open_clip BPE (substitute)" if hub_tokenizer else "open_clip BPE")


def make_sep(backbone, classes: int):
    from promptune.methods.sep import SEP

    torch.manual_seed(0)
    return SEP(backbone, class_names(classes), SEP.make_config({}))


def prompt_file_bytes(method, backbone) -> int:
    from promptune.artifact import PromptFile, save_prompt_file

    with tempfile.TemporaryDirectory() as folder:
        path = save_prompt_file(Path(folder) / "prompts.safetensors", PromptFile(
            tensors=dict(method.learned_state()), method=method.name, backbone=backbone.describe(),
            class_names=method.class_names, hparams=method.hparams(), preprocess=backbone.preprocess.to_dict(),
        ))
        return path.stat().st_size


def size_report(name: str, classes: int) -> dict:
    backbone, tokenizer = random_clip(name)
    sep = make_sep(backbone, classes)
    learned = sep.learned_state()
    count = lambda prefix: sum(t.numel() for k, t in learned.items() if k.startswith(prefix))  # noqa: E731
    tokens = sep.prompts.tokens
    return {
        "backbone": name,
        "image_tower": type(sep.image_tower).__name__,
        "image_tokens": sep.image_tower.image_tokens,
        "vision_width": sep.image_tower.width,
        "text_width": sep.text.width,
        "fusion_layers": {"text": len(sep.text_layers), "image": len(sep.visual_layers)},
        "tokenizer": tokenizer,
        "text_positions_run": {"run": sep.text.needed_length(tokens, sep.prompts.start + 2 * sep.n_ctx),
                               "context": sep.text.context_length, "trimmed": sep.text.trims},
        "backbone_parameters": sum(p.numel() for p in backbone.model.parameters()),
        "learned_parameters": sum(t.numel() for t in learned.values()),
        "text_fusion_parameters": count("text_fusion."),
        "visual_fusion_parameters": count("visual_fusion."),
        "ctx_parameters": learned["ctx"].numel() + learned["ctx_v"].numel(),
        "prompt_file_bytes": prompt_file_bytes(sep, backbone),
    }


def step_report(batch: int, classes: int, repeats: int, device: torch.device) -> dict:
    methods = {}
    for name in STEP_BACKBONES:
        backbone, tokenizer = random_clip(name)
        sep = make_sep(backbone, classes).to(device).train()
        size = backbone.preprocess.size
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        labels = (torch.arange(batch) % classes).to(device)
        methods[name] = (sep, torch.optim.Adam(sep.param_groups(5e-4), lr=1e-3, eps=1e-3), pixels, labels, tokenizer)

    def step(name: str) -> None:
        sep, optimizer, pixels, labels, _ = methods[name]
        loss, _ = sep.training_loss(pixels, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    wall: dict[str, list[float]] = {name: [] for name in STEP_BACKBONES}
    cpu: dict[str, list[float]] = {name: [] for name in STEP_BACKBONES}
    for repeat in range(repeats + 1):  # alternate the two so both see the same machine load
        for name in STEP_BACKBONES:
            cpu_start = time.process_time()
            elapsed = timed(lambda: step(name), device)
            if repeat:  # the first round is a warm-up
                wall[name].append(elapsed)
                cpu[name].append(time.process_time() - cpu_start)
    report: dict = {"batch": batch, "classes": classes, "repeats": repeats, "statistic": "median seconds per step"}
    for name in STEP_BACKBONES:
        report[name] = {"tokenizer": methods[name][4]}
        for kind, samples in (("wall", wall[name]), ("cpu", cpu[name])):
            report[name].update({f"{kind}_median_s": round(statistics.median(samples), 3),
                                 f"{kind}_min_s": round(min(samples), 3),
                                 f"{kind}_samples_s": [round(s, 3) for s in samples]})
    first, second = STEP_BACKBONES
    for kind in ("wall_median", "wall_min", "cpu_median", "cpu_min"):
        report[f"{first}_over_{second}_{kind}"] = ratio(report[first][f"{kind}_s"], report[second][f"{kind}_s"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-step", action="store_true", help="sizes only")
    args = parser.parse_args()
    device, amp_dtype, threads = setup_device(args.device)
    result: dict = {"environment": environment(device, threads, amp_dtype), "size": []}
    for name in SIZE_BACKBONES:
        result["size"].append(size_report(name, args.classes))
        gc.collect()
    if not args.no_step:
        result["step"] = step_report(args.batch, args.classes, args.repeats, device)
    emit(result)


if __name__ == "__main__":
    main()
