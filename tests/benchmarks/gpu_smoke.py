"""The commands a user runs, on a CUDA device, end to end; prints one JSON (which commands ran, their exit codes).

    python tests/benchmarks/gpu_smoke.py [--device cuda] [--real]

Tiny random-weight backbones (the test suite's) saved to local files in a temporary folder and a generated shape
folder: `tune` with every method (bf16 autocast, and fp16 with its gradient scaler for SEP), a mid-run stop and
`--resume`, `eval --report`, `predict` (a file, a folder, `--classes` with new names), a one-process torchrun (nccl)
tune and eval, and the library's predict of one image against the same image in a batch. `--real` adds the whole
`predict` of one image with a ViT-B-16 SEP file (random weights in a local .safetensors): its wall time, import
included. Each command's exit code, wall time and last lines are reported; the run goes on past failures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))


PARTIAL: Path | None = None  # --out: the results so far are written here after every command


def _run(results: list[dict], name: str, command: list[str], env: dict[str, str], timeout: float = 300) -> int:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        rc, out = done.returncode, (done.stdout + done.stderr)
    except subprocess.TimeoutExpired as error:
        rc, out = 124, f"timeout after {timeout} s: {error}"
    results.append({"name": name, "rc": rc, "seconds": round(time.perf_counter() - start, 2),
                    "tail": out.strip().splitlines()[-6:]})
    print(f"{name}: rc {rc}", file=sys.stderr, flush=True)
    if PARTIAL is not None:  # a time limit that stops the run keeps what ran
        PARTIAL.write_text(json.dumps({"commands": results, "partial": True}, indent=1))
    return rc


def _files(root: Path) -> dict[str, Path]:
    from conftest import make_clip_files, make_shape_folder, make_vit_file

    config, weights = make_clip_files(root / "clip")
    return {"clip_config": config, "clip_weights": weights, "vit_weights": make_vit_file(root / "vit"),
            "data": make_shape_folder(root / "data", per_class=16)}


def _library_predict_agrees(prompts: Path, images: list[Path], device: str) -> dict:
    """The 4th image alone vs inside a batch of 8: the same top class, and the probabilities' largest difference."""
    import promptune

    model = promptune.load(prompts, device=device)
    alone, _ = model.predict([images[3]])
    batch, _ = model.predict(images[:8])
    diff = max(abs(a - b) for a, b in zip(alone[0].probabilities, batch[3].probabilities))
    return {"same_top1": alone[0].labels[0] == batch[3].labels[0], "max_probability_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--real", action="store_true", help="also time predict of one image with a ViT-B-16 SEP file")
    parser.add_argument("--out", type=Path, help="also write the results so far to this file after every command")
    args = parser.parse_args()
    global PARTIAL
    PARTIAL = args.out
    path = os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    cli = [sys.executable, "-m", "promptune"]
    results: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="promptune-gpu-smoke-"))
    try:
        f = _files(root)
        data, dev = str(f["data"]), ["--device", args.device]
        clip = ["--backbone", str(f["clip_config"]), "--weights", str(f["clip_weights"])]
        vit = ["--backbone", "test_vit", "--weights", str(f["vit_weights"])]
        out = {m: root / f"{m}.safetensors" for m in ("sep", "coop", "spt", "vpt", "sep16")}
        for method, backbone in (("sep", clip), ("coop", clip), ("spt", vit), ("vpt", vit)):
            _run(results, f"tune {method}", cli + ["tune", data, "--method", method, *backbone, *dev, "--epochs", "3",
                                                    "--out", str(out[method]), "--quiet"], env)
        _run(results, "tune sep fp16", cli + ["tune", data, "--method", "sep", *clip, *dev, "--precision", "fp16",
                                              "--epochs", "2", "--out", str(out["sep16"]), "--quiet"], env)
        resumed = root / "resumed.safetensors"
        _run(results, "tune spt, SIGTERM after the first checkpoint, then --resume",
             ["bash", "-c", " ".join(cli + ["tune", data, "--method", "spt", *vit, *dev, "--epochs", "60", "--out",
                                            str(resumed), "--quiet", "--checkpoint-dir", str(root / "ck")])
              + f" & for i in $(seq 240); do ls {root / 'ck'}/*.json >/dev/null 2>&1 && break; sleep 0.25; done;"
              + " kill -TERM $!; wait $!; echo exit $?; "
              + " ".join(cli + ["tune", data, "--method", "spt", *vit, *dev, "--epochs", "60", "--out", str(resumed),
                                "--quiet", "--checkpoint-dir", str(root / "ck"), "--resume"])], env)
        for method in ("sep", "spt", "sep16"):
            _run(results, f"eval {method} --report", cli + ["eval", data, "--prompts", str(out[method]), *dev,
                                                            "--report", str(root / f"report-{method}"), "--json"], env)
        image = next(Path(data).rglob("*.png"))
        _run(results, "predict sep file+folder", cli + ["predict", str(image), str(image.parent), "--prompts",
                                                        str(out["sep"]), *dev, "--json"], env)
        _run(results, "predict sep --classes new names", cli + ["predict", str(image), "--prompts", str(out["sep"]),
                                                                *dev, "--classes", "a tiger,a lorry,a violin"], env)
        _run(results, "predict spt --csv", cli + ["predict", str(image), "--prompts", str(out["spt"]), *dev, "--csv"],
             env)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                    "promptune"]
        _run(results, "torchrun 1 process tune spt (nccl)", torchrun + ["tune", data, "--method", "spt", *vit,
                                                                        "--epochs", "2", "--out",
                                                                        str(root / "ddp.safetensors"), "--quiet"], env)
        _run(results, "torchrun 1 process eval sep", torchrun + ["eval", data, "--prompts", str(out["sep"]), "--json"],
             env)
        _run(results, "tune --gpus 1 sep", cli + ["tune", data, "--method", "sep", *clip, "--gpus", "1", "--epochs",
                                                  "1", "--out", str(root / "gpus1.safetensors"), "--quiet"], env)
        # --compile: on one GPU the step is captured as CUDA graphs; batch 7 leaves a smaller last batch (a second
        # graph), and validation and checkpoints run between the replays.
        _run(results, "tune sep --compile (CUDA graphs)", cli + ["tune", data, "--method", "sep", *clip, *dev,
                                                                "--compile", "--batch-size", "7", "--epochs", "2",
                                                                "--out", str(root / "compiled.safetensors"), "--quiet"],
             env, timeout=400)
        agree = {}
        for method in ("sep", "spt"):
            try:
                agree[method] = _library_predict_agrees(out[method], sorted(Path(data).rglob("*.png")), args.device)
            except Exception as error:  # reported, not raised: the smoke run goes on
                agree[method] = {"error": repr(error)}
        if args.real:
            _real_predict(results, root, cli, env, dev)
        print(json.dumps({"device": args.device, "commands": results, "single_vs_batched": agree,
                          "failed": [r["name"] for r in results if r["rc"] != 0]}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _real_predict(results: list[dict], root: Path, cli: list[str], env: dict[str, str], dev: list[str]) -> None:
    """A ViT-B-16 SEP file (one epoch on 20 images), then `predict` of one image: the whole process, timed twice."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from conftest import make_shape_folder

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    weights = root / "vit-b-16.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    del model
    data = make_shape_folder(root / "data-b16", per_class=5, classes={"red square": ("square", (220, 30, 30)),
                                                                       "blue circle": ("circle", (30, 30, 220))})
    prompts = root / "sep-b16.safetensors"
    backbone = ["--backbone", "ViT-B-16", "--weights", str(weights)]
    _run(results, "tune sep ViT-B-16 (1 epoch)", cli + ["tune", str(data), *backbone, *dev, "--epochs", "1",
                                                        "--out", str(prompts), "--quiet"], env, timeout=600)
    image = next(Path(data).rglob("*.png"))
    _run(results, "python -c 'import torch, open_clip, timm'",
         [sys.executable, "-c", "import torch, open_clip, timm"], env)
    for attempt in (1, 2):
        _run(results, f"predict one image, ViT-B-16 SEP file (run {attempt})",
             cli + ["predict", str(image), "--prompts", str(prompts), *dev], env)


if __name__ == "__main__":
    main()
