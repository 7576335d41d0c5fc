"""Make examples/fashion-mnist/ (train/: 16 images per class, test/: 10 per class) from the Fashion-MNIST idx files.

The images are committed, so users need neither this script nor the raw data. It documents how the subset was made
and remakes it byte for byte: the picks are seeded, and PNGs written by the same Pillow are identical run to run.

    apt-get install dataset-fashion-mnist          # Debian: the idx files land in /usr/share/datasets/fashion-mnist
    python examples/make_fashion_mnist.py [--source DIR] [--out examples/fashion-mnist] [--seed 0]

Train images come from the official training split, test images from the official test split; each file is named
after its index in that split (train/coat/04127.png is image 4127 of train-images-idx3-ubyte).
"""

from __future__ import annotations

import argparse
import gzip
import random
import shutil
import struct
from pathlib import Path

from PIL import Image

CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
PER_CLASS = {"train": 16, "test": 10}
SOURCE_FILES = {"train": "train", "test": "t10k"}  # idx file prefix of each official split
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers of idx3 (uint8 images) and idx1 (uint8 labels) files


def read_idx(path: Path, magic: int) -> tuple[tuple[int, ...], bytes]:
    """(dimensions, raw uint8 payload) of a gzipped idx file."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    found, = struct.unpack(">I", data[:4])
    if found != magic:
        raise SystemExit(f"{path} is not an idx file of the expected kind (magic {found}, expected {magic}).")
    n_dims = magic & 0xFF
    dims = struct.unpack(f">{n_dims}I", data[4:4 + 4 * n_dims])
    return dims, data[4 + 4 * n_dims:]


def load_split(source: Path, split: str) -> tuple[list[bytes], bytes]:
    """(one 28x28 raw image per example, one label byte per example) of an official split."""
    prefix = SOURCE_FILES[split]
    (count, rows, cols), pixels = read_idx(source / f"{prefix}-images-idx3-ubyte.gz", IDX_IMAGES)
    (label_count,), labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", IDX_LABELS)
    if label_count != count:
        raise SystemExit(f"{prefix}: {count} images but {label_count} labels.")
    size = rows * cols
    return [pixels[i * size:(i + 1) * size] for i in range(count)], labels


def pick(labels: bytes, per_class: int, rng: random.Random) -> dict[int, list[int]]:
    """Seeded, sorted example indices per class label."""
    by_class: dict[int, list[int]] = {label: [] for label in range(len(CLASSES))}
    for index, label in enumerate(labels):
        by_class[label].append(index)
    return {label: sorted(rng.sample(indices, per_class)) for label, indices in by_class.items()}


def write_split(source: Path, out: Path, split: str, seed: int) -> int:
    images, labels = load_split(source, split)
    rng = random.Random(f"{seed}-{split}")  # a str seed hashes the same way in every Python version
    written = 0
    for label, indices in pick(labels, PER_CLASS[split], rng).items():
        folder = out / split / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        for index in indices:
            Image.frombytes("L", (28, 28), images[index]).save(folder / f"{index:05d}.png", optimize=True)
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the four *-idx?-ubyte.gz files")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split in PER_CLASS:
        shutil.rmtree(args.out / split, ignore_errors=True)  # a rerun leaves exactly the picked images
        print(f"{split}: {write_split(args.source, args.out, split, args.seed)} images")


if __name__ == "__main__":
    main()
