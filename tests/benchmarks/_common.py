"""Shared helpers of the benchmark scripts: random-weight backbones, class names, timing, memory, isolated runs.

Not collected by pytest (no test_ prefix). Everything here works offline: backbones are built with random weights,
never fetched from a hub, so the figures measure speed and memory only, never accuracy.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CLIP = "ViT-B-32"
DEFAULT_VIT = "vit_small_patch16_224"
CLIP_METHODS = ("sep", "coop")
VIT_METHODS = ("spt", "vpt")

# ~100 words of everyday, fine-grained and rare categories: the BPE tokenizer splits them into 1 to 5 tokens, and the
# names below join 1 to 3 of them, so the class prompts have realistic, varied token lengths (the text trimming depends
# on the longest one).
WORDS = (
    "cat", "dog", "car", "tree", "house", "bird", "boat", "chair", "apple", "bridge",
    "golden", "retriever", "persian", "siamese", "tabby", "beagle", "poodle", "terrier", "spaniel", "shepherd",
    "boeing", "airbus", "cessna", "biplane", "helicopter", "sedan", "convertible", "minivan", "pickup", "hatchback",
    "sunflower", "orchid", "tulip", "daffodil", "hibiscus", "magnolia", "rhododendron", "bougainvillea", "lotus", "iris",
    "pizza", "sushi", "lasagna", "guacamole", "tiramisu", "baklava", "ramen", "croissant", "paella", "bibimbap",
    "red", "blue", "spotted", "striped", "giant", "dwarf", "northern", "mountain", "desert", "coastal",
    "warbler", "kingfisher", "cormorant", "albatross", "flycatcher", "grosbeak", "nuthatch", "sandpiper", "woodpecker", "oriole",
    "cathedral", "lighthouse", "skyscraper", "pagoda", "aqueduct", "windmill", "greenhouse", "amphitheater", "mosque", "castle",
    "volcano", "glacier", "canyon", "meadow", "swamp", "tundra", "savanna", "reef", "fjord", "archipelago",
    "keyboard", "stethoscope", "harmonica", "trombone", "xylophone", "typewriter", "microscope", "saxophone", "tripod", "kayak",
)


def class_names(count: int, seed: int = 0) -> list[str]:
    """`count` distinct folder-style names ("golden_retriever", "striped-warbler", "kayak"), seeded."""
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        words = rng.sample(WORDS, rng.choice((1, 2, 2, 3)))
        name = rng.choice(("_", "-", " ")).join(words)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def make_jpeg_folder(root: Path, classes: int, per_class: int, size: tuple[int, int] = (320, 240), seed: int = 0,
                     quality: int = 90) -> Path:
    """`classes` sub-folders of `per_class` real JPEG files (width x height `size`), seeded, under `root`.

    Each picture is a smooth colour gradient with a few filled shapes and per-pixel noise, so it decodes like a
    photo-sized JPEG of real detail (a flat picture would decode unrealistically fast).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    folders: list[str] = []
    for name in class_names(4 * classes, seed=seed):  # distinct after "_", "-" and " " all read as a space
        if len(folders) < classes and name.replace("-", " ").replace("_", " ") not in {f.replace("_", " ") for f in folders}:
            folders.append(name.replace("-", "_").replace(" ", "_"))
    for label, name in enumerate(folders):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            corner = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
            t = ((xs / width + ys / height) / 2)[..., None]
            pixels = corner[0] * (1 - t) + corner[1] * t + rng.normal(0, 12, size=(height, width, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
            draw = ImageDraw.Draw(image)
            for _ in range(3 + label % 4):
                x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
                r = int(rng.integers(10, min(width, height) // 3))
                colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
                (draw.ellipse if (label + index) % 2 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
            image.save(folder / f"{index:04d}.jpg", quality=quality)
    return root


def family_of(name: str) -> str:
    import open_clip

    return "clip" if name in open_clip.list_models() else "vit"


def build_backbone(name: str):
    """A frozen random-weight promptune Backbone: open_clip for CLIP model names, timm for anything else."""
    import math

    from promptune.backbones import Backbone
    from promptune.backbones.clip import _clip_shape
    from promptune.data import Preprocess

    torch.manual_seed(0)
    if family_of(name) == "clip":
        import open_clip

        model = open_clip.create_model(name, pretrained=None)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(100.0))  # a trained CLIP's scale; random init is 1/0.07
        model = model.eval().requires_grad_(False)
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        return Backbone(
            family="clip", name=name, weights=None, model=model,
            preprocess=Preprocess(size=size, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD),
            tokenizer=open_clip.get_tokenizer(name), shape=_clip_shape(model),
        )
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0).eval().requires_grad_(False)
    config = timm.data.resolve_model_data_config(model)
    shape = {"embed_dim": int(model.embed_dim)}
    if hasattr(model, "blocks"):
        shape["depth"] = len(model.blocks)
        shape["num_prefix_tokens"] = int(getattr(model, "num_prefix_tokens", 1))
    return Backbone(
        family="vit", name=name, weights=None, model=model,
        preprocess=Preprocess(size=int(config["input_size"][-1]), mean=tuple(config["mean"]), std=tuple(config["std"])),
        shape=shape,
    )


def load_method_class(name: str) -> tuple[type | None, str | None]:
    """(class, None), or (None, why) when the method's module does not import yet (being written elsewhere)."""
    try:
        from promptune.methods import get_method

        return get_method(name), None
    except Exception as error:  # noqa: BLE001 - any import failure means "skip with a note"
        return None, f"skipped: method '{name}' did not import ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"


def build_method(name: str, backbone, names: list[str], options: dict[str, Any] | None = None):
    cls, why = load_method_class(name)
    if cls is None:
        raise RuntimeError(why)
    return cls(backbone, names, cls.make_config(options or {}))


def setup_device(name: str) -> tuple[torch.device, torch.dtype, int]:
    """(device, autocast dtype, CPU threads) exactly as `promptune tune` chooses them."""
    from promptune.runtime import Runtime

    runtime = Runtime.create(name)
    return runtime.device, runtime.amp_dtype, runtime.cpu_threads


def runtime(device: torch.device, amp_dtype: torch.dtype):
    """The one-process `Runtime` of `device` and `amp_dtype` (its `autocast()` is the one `tune` uses)."""
    from promptune.runtime import Runtime

    return Runtime(device, amp_dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def summary(seconds: list[float], batch: int | None = None) -> dict[str, Any]:
    """Median (the figure to quote), min/max and the raw samples, in ms; images/s from the median."""
    median = statistics.median(seconds)
    out: dict[str, Any] = {
        "median_ms": round(median * 1e3, 2),
        "min_ms": round(min(seconds) * 1e3, 2),
        "max_ms": round(max(seconds) * 1e3, 2),
        "samples": len(seconds),
        "samples_ms": [round(value * 1e3, 2) for value in seconds],
    }
    if batch is not None:
        out["images_per_s"] = round(batch / median, 2)
    return out


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, digits)


def peak_rss_mb() -> float:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


class PeakMemory:
    """Peak memory of a phase: CUDA max_memory_allocated (reset at start), else the process's peak RSS.

    RSS peaks are process-lifetime, so a caller comparing phases must run each in its own process (see `run_isolated`);
    `setup_mb` (the peak before the phase) lets a reader see how much the phase itself added.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            sync(device)
            self.setup_mb = round(torch.cuda.memory_allocated(device) / 2**20, 1)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.setup_mb = peak_rss_mb()

    def report(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            sync(self.device)
            peak = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            kind = "cuda max_memory_allocated"
        else:
            peak = peak_rss_mb()
            kind = "peak RSS of an isolated process (ru_maxrss)"
        return {"kind": kind, "setup_mb": self.setup_mb, "peak_mb": peak, "added_by_steps_mb": round(peak - self.setup_mb, 1)}


def environment(device: torch.device, threads: int, amp_dtype: torch.dtype) -> dict[str, Any]:
    import open_clip
    import timm

    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "precision": str(amp_dtype).replace("torch.", ""),
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def run_isolated(script: Path, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run `script --single JSON` in a fresh interpreter (its own peak RSS) and return the JSON it prints last."""
    command = [sys.executable, str(script), "--single", json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def emit(result: dict[str, Any], compact: bool = False) -> None:
    """Print the one JSON object: indented for people, on one line for a parent process (`--single`)."""
    print(json.dumps(result) if compact else json.dumps(result, indent=2), flush=True)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (the CPU-side proxy for a GPU's kernel launches).

    Views, in-place ops and copies count like any other op. With `phases` set (a stack of labels that the caller
    pushes and pops around parts of the forward pass) each op is also charged to a part: a forward op to the innermost
    label, a backward op to the `phase` that `tag_graph` put into the metadata of the autograd node running it.
    """

    def __init__(self, phases: list[str] | None = None) -> None:
        super().__init__()
        self.phases = phases
        self.total = 0
        self.by_phase: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.by_op[func.overloadpacket.__name__] += 1
        if self.phases is not None:
            self.by_phase[self._phase()] += 1
        return func(*args, **(kwargs or {}))

    def _phase(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return self.phases[-1]
        return f"backward: {node.metadata.get('phase', type(node).__name__)}"


def grad_nodes(values: Any) -> list:
    """The autograd nodes that produced the tensors in `values` (a tensor, or a tuple/list/dict of them)."""
    if isinstance(values, torch.Tensor):
        return [values.grad_fn] if values.grad_fn is not None else []
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, (tuple, list)):
        return [node for value in values for node in grad_nodes(value)]
    return []


def graph_nodes(roots: list) -> set:
    """Every autograd node reachable from `roots`."""
    seen: set = set()
    pending = list(roots)
    while pending:
        node = pending.pop()
        if node is not None and node not in seen:
            seen.add(node)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return seen


def tag_graph(roots: list, phase: str, boundary: set) -> None:
    """Write `phase` into the metadata of the nodes reachable from `roots` that no inner part has tagged yet, stopping at
    `boundary` (the graph that existed when the part began); gradient accumulators belong to no forward part."""
    seen: set = set()
    pending = list(roots)
    while pending:
        node = pending.pop()
        if node is None or node in boundary or node in seen or type(node).__name__ == "AccumulateGrad":
            continue
        seen.add(node)
        node.metadata.setdefault("phase", phase)
        pending.extend(next_node for next_node, _ in node.next_functions)


def count_ops(run: Callable[[], Any]) -> int:
    """aten ops dispatched by one call of `run`."""
    with OpCounter() as counter:
        run()
    return counter.total
