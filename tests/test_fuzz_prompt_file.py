"""Fuzz the prompt-file loader: every mutated file either loads or is rejected with PromptFileError, quickly."""

from __future__ import annotations

import json
import random
import struct
import time

import pytest
import torch

from promptune.artifact import PromptFile, load_prompt_file, save_prompt_file
from promptune.errors import PromptFileError

CASES_PER_KIND = 600


def _valid_bytes(tmp_path) -> bytes:
    prompt_file = PromptFile(
        tensors={"ctx": torch.randn(4, 8), "head.bias": torch.zeros(3)},
        method="coop",
        backbone={"family": "clip", "name": "tiny-clip.json", "weights": "w.safetensors", "shape": {"text_width": 8}},
        class_names=["a", "b", "c"],
        hparams={"n_ctx": 4, "ctx_init": ""},
        preprocess={"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 1.0},
        training={"epochs": 1},
        promptune_version="0.1.0",
    )
    return save_prompt_file(tmp_path / "valid.safetensors", prompt_file).read_bytes()


def _flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def _header_lie(data: bytes, rng: random.Random) -> bytes:
    lie = rng.choice([0, 1, 2**63, 2**64 - 1, len(data), len(data) - 8, rng.randrange(2**40)])
    return struct.pack("<Q", lie) + data[8:]


def _metadata_edit(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header["__metadata__"]
    key = rng.choice(sorted(meta))
    meta[key] = rng.choice([
        "", "{", "[]", "null", "1e999", '{"a": [[[[[[[[[[]]]]]]]]]]}', "[" * 5000 + "]" * 5000, json.dumps(["a", "a"]),
        json.dumps({"size": -1}), "9" * 400, "\u0000", meta[key][::-1],
    ])
    if rng.random() < 0.2:
        meta.pop(rng.choice(sorted(meta)))
    if rng.random() < 0.2:
        name = rng.choice([k for k in header if k != "__metadata__"])
        header[name]["shape"] = [rng.randint(0, 10**9)]
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + n :]


@pytest.mark.parametrize("mutate", [_flip, _truncate, _header_lie, _metadata_edit])
def test_mutated_files_load_or_fail_cleanly(tmp_path, mutate):
    valid = _valid_bytes(tmp_path)
    rng = random.Random(mutate.__name__)
    path = tmp_path / "mutant.safetensors"
    outcomes = {"loaded": 0, "rejected": 0}
    for _ in range(CASES_PER_KIND):
        path.write_bytes(mutate(valid, rng))
        start = time.perf_counter()
        try:
            loaded = load_prompt_file(path)
        except PromptFileError as error:
            assert "\n" not in str(error)
            outcomes["rejected"] += 1
        else:
            assert all(torch.isfinite(t).all() for t in loaded.tensors.values())
            outcomes["loaded"] += 1
        assert time.perf_counter() - start < 2.0
    assert outcomes["rejected"] > 0
