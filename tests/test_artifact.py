"""The prompt file: what it holds, a bit-exact round trip, atomic saves, and one clear sentence for every mismatch."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import promptune
import promptune.artifact as artifact
from promptune.artifact import FORMAT_NAME, FORMAT_VERSION, PromptFile, load_prompt_file, save_prompt_file
from promptune.backbones import load_backbone
from promptune.data import build_transform, decode_image, load_eval_data
from promptune.errors import PromptFileError
from promptune.methods.coop import CoOp, CoOpConfig

from conftest import TINY_CLIP_CONFIG, make_clip_files

N_CTX = 8


# ------------------------------------------------------------------------------------------------------- helpers


def assert_one_sentence(message: str) -> None:
    """One line, one sentence: no newline, ends with a full stop, no second sentence starting after it."""
    assert "\n" not in message, message
    assert message.endswith("."), message
    assert not re.search(r"[.!?] [A-Z]", message), f"more than one sentence: {message}"
    assert "Traceback" not in message


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata() or {})


def rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None, **meta_changes: str | None) -> Path:
    """Copy a prompt file with some tensors and metadata entries replaced (None drops the entry)."""
    old_tensors, meta = read_file(src)
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(old_tensors if tensors is None else tensors, str(dst), metadata=meta)
    return dst


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(PromptFileError) as info:
        promptune.load(path, device="cpu", **kwargs)
    message = str(info.value)
    assert_one_sentence(message)
    return message


def eval_images(folder: Path, transform, n: int = 9) -> torch.Tensor:
    items = load_eval_data(folder).items
    picked = items[:: max(1, len(items) // n)][:n]
    return torch.stack([transform(decode_image(item.path)) for item in picked])


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, clip_files, shape_folder) -> Path:
    """A CoOp prompt file written by `promptune.tune` (one short epoch)."""
    config, weights = clip_files
    out = tmp_path_factory.mktemp("artifact") / "coop.safetensors"
    promptune.tune(shape_folder, method="coop", backbone=str(config), weights=str(weights), epochs=1, shots=4,
                   batch_size=12, workers=0, device="cpu", out=out, options={"n_ctx": N_CTX})
    return out


@pytest.fixture()
def copy(tuned, tmp_path) -> Path:
    return Path(shutil.copy(tuned, tmp_path / "copy.safetensors"))


# ------------------------------------------------------------------------------------------------- what is stored


def test_round_trip_gives_bit_identical_logits(clip_files, shape_test_folder, tmp_path):
    config, weights = clip_files
    backbone = load_backbone(str(config), str(weights))
    names = load_eval_data(shape_test_folder).class_names
    torch.manual_seed(7)
    model = CoOp(backbone, names, CoOpConfig(n_ctx=N_CTX))
    with torch.no_grad():
        model.ctx.normal_(0.0, 0.5)  # far from the init, so a load that silently kept the init would show
    model.eval()
    images = eval_images(shape_test_folder, build_transform(backbone.preprocess, train=False))
    with torch.no_grad():
        expected = model(images)
    path = tmp_path / "roundtrip.safetensors"
    save_prompt_file(path, PromptFile(
        tensors=model.learned_state(), method="coop", backbone=backbone.describe(), class_names=names,
        hparams=model.hparams(), preprocess=backbone.preprocess.to_dict(), training={"epochs": 0},
        promptune_version=promptune.__version__,
    ))

    loaded = promptune.load(path, device="cpu")
    assert loaded.trained_classes == names
    assert loaded.preprocess == backbone.preprocess
    assert torch.equal(loaded.method.ctx.detach(), model.ctx.detach())
    assert torch.equal(loaded.logits(images), expected)
    # the loaded model's own preprocessing gives the same input tensors
    assert torch.equal(eval_images(shape_test_folder, loaded.transform), images)


def test_tuned_file_loads_its_exact_tensors(tuned):
    tensors, _ = read_file(tuned)
    loaded = promptune.load(tuned, device="cpu")
    assert torch.equal(loaded.method.ctx.detach(), tensors["ctx"])


def test_file_holds_only_the_learned_context(tuned, clip_files):
    tensors, _ = read_file(tuned)
    assert list(tensors) == ["ctx"]
    assert tensors["ctx"].shape == (N_CTX, TINY_CLIP_CONFIG["text_cfg"]["width"])
    assert tensors["ctx"].dtype == torch.float32
    # no backbone tensor hides in the file: it is a few KB while the tiny backbone alone is MBs
    assert tuned.stat().st_size < 16_384 < clip_files[1].stat().st_size


def test_metadata_describes_everything_needed_to_rebuild(tuned, clip_files, shape_folder):
    config, weights = clip_files
    _, meta = read_file(tuned)
    assert meta["format"] == FORMAT_NAME
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert meta["method"] == "coop"
    assert meta["promptune_version"] == promptune.__version__

    backbone = json.loads(meta["backbone"])
    assert backbone["family"] == "clip"
    assert backbone["name"] == config.name
    assert backbone["weights"] == weights.name
    assert backbone["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert backbone["shape"]["text_width"] == TINY_CLIP_CONFIG["text_cfg"]["width"]

    assert json.loads(meta["class_names"]) == sorted(p.name for p in shape_folder.iterdir() if p.is_dir())
    assert json.loads(meta["hparams"]) == {"n_ctx": N_CTX, "ctx_init": ""}

    preprocess = json.loads(meta["preprocess"])
    assert preprocess["size"] == TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    assert len(preprocess["mean"]) == len(preprocess["std"]) == 3
    assert preprocess["interpolation"] in ("bicubic", "bilinear", "nearest")

    training = json.loads(meta["training"])
    assert training["epochs"] == training["epochs_run"] == 1
    assert training["shots"] == 4 and training["seed"] == 0 and training["batch_size"] == 12
    assert training["train_images"] == 12
    assert 0.0 <= training["final_train_acc"] <= 1.0
    assert training["final_train_loss"] > 0


def test_file_is_never_pickled(tuned):
    raw = tuned.read_bytes()
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor a torch zip archive
    load_prompt_file(tuned)  # the validated reader accepts it


# -------------------------------------------------------------------------------------------- backbone mismatches


def test_another_backbone_is_refused(tuned, tmp_path):
    wider = json.loads(json.dumps(TINY_CLIP_CONFIG))
    wider["text_cfg"]["width"] = 48
    wider["embed_dim"] = 48
    config, weights = make_clip_files(tmp_path / "wide", name="wide-clip", config=wider)
    message = load_error(tuned, backbone=str(config), weights=str(weights))
    assert "tiny-clip.json" in message and "wide-clip" in message


def test_same_name_but_other_shape_is_refused(tuned, tmp_path):
    wider = json.loads(json.dumps(TINY_CLIP_CONFIG))
    wider["text_cfg"]["width"] = 48
    wider["embed_dim"] = 48
    config, weights = make_clip_files(tmp_path / "wide", name="tiny-clip", config=wider)  # same file name
    message = load_error(tuned, backbone=str(config), weights=str(weights))
    assert "shape" in message


def test_other_weights_of_the_same_architecture_are_refused(tuned, tmp_path):
    _, other_weights = make_clip_files(tmp_path / "other", seed=1)
    message = load_error(tuned, weights=str(other_weights))
    assert "sha256" in message and "differs" in message


def test_weights_rewritten_in_place_are_refused_though_their_hash_was_cached(tuned, clip_files, tmp_path):
    local = Path(shutil.copy(clip_files[1], tmp_path / "weights.safetensors"))
    promptune.load(tuned, weights=str(local), device="cpu")  # the same weights: loads, and caches their hash
    stat = local.stat()
    _, other = make_clip_files(tmp_path / "other", seed=1)
    local.write_bytes(other.read_bytes())  # same architecture, so the same size
    os.utime(local, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime, as `cp -p` leaves it
    message = load_error(tuned, weights=str(local))
    assert "sha256" in message and "differs" in message


def test_missing_local_weights_file_is_reported(copy, tmp_path):
    backbone = json.loads(read_file(copy)[1]["backbone"])
    backbone["weights_path"] = str(tmp_path / "gone.safetensors")
    rewrite(copy, copy, backbone=json.dumps(backbone))
    message = load_error(copy)
    assert "--weights" in message


# --------------------------------------------------------------------------------------------- content mismatches


def test_another_method_is_refused(copy):
    rewrite(copy, copy, method="spt")
    assert "spt" in load_error(copy)


def test_another_method_with_matching_options_is_refused(copy):
    # a file claiming an image-only method for a CLIP backbone, with nothing else to trip over
    rewrite(copy, copy, method="spt", hparams="{}")
    assert "spt" in load_error(copy)


@pytest.mark.parametrize("hparams", ['{"n_ctx": "many", "ctx_init": ""}', '{"n_ctx": 0, "ctx_init": ""}',
                                     '{"n_ctx": 8, "ctx_init": 3}', '{"n_ctx": 8, "depth": "deep"}'])
def test_bad_hparams_are_refused(copy, hparams):
    load_error(rewrite(copy, copy, hparams=hparams))


def test_unknown_method_is_refused(copy):
    assert "no-such-method" in load_error(rewrite(copy, copy, method="no-such-method"))


def test_missing_tensor_is_refused(copy):
    tensors, _ = read_file(copy)
    rewrite(copy, copy, tensors={"context": tensors["ctx"]})
    assert "missing tensor" in load_error(copy)
    rewrite(copy, copy, tensors={})
    assert "missing tensor" in load_error(copy)


def test_unexpected_tensor_is_refused(copy):
    tensors, _ = read_file(copy)
    rewrite(copy, copy, tensors={**tensors, "extra": torch.zeros(3)})
    assert "extra" in load_error(copy)


@pytest.mark.parametrize("shape", [(N_CTX + 1, 32), (N_CTX, 48), (N_CTX * 32,)])
def test_wrong_tensor_shape_is_refused(copy, shape):
    rewrite(copy, copy, tensors={"ctx": torch.zeros(shape)})
    assert "shape" in load_error(copy)


def test_non_finite_tensor_is_refused(copy):
    tensors, _ = read_file(copy)
    tensors["ctx"][0, 0] = float("nan")
    rewrite(copy, copy, tensors=tensors)
    assert "corrupt tensor" in load_error(copy)


@pytest.mark.parametrize("version, words", [("2", "newer"), ("999", "newer"), ("0", "unknown format version"),
                                            ("v1", "unreadable format version")])
def test_unknown_or_newer_format_version_is_refused(copy, version, words):
    assert words in load_error(rewrite(copy, copy, format_version=version))


def test_missing_metadata_entry_is_refused(copy):
    assert "class_names" in load_error(rewrite(copy, copy, class_names=None))


@pytest.mark.parametrize("key", ["backbone", "class_names", "hparams", "preprocess", "training"])
def test_corrupt_json_metadata_is_refused(copy, key):
    assert key in load_error(rewrite(copy, copy, **{key: '{"not json'}))


@pytest.mark.parametrize("names", ['"blue_triangle"', "[]", '["a", "a"]', '["a", 3]'])
def test_corrupt_class_names_are_refused(copy, names):
    assert "class names" in load_error(rewrite(copy, copy, class_names=names))


# ------------------------------------------------------------------------------------------------ not a prompt file


@pytest.mark.parametrize("content", [
    pytest.param(bytes(range(256)) * 8, id="random-bytes"),
    pytest.param(b"\xff" * 64, id="huge-header-length"),
    pytest.param(b"label,path\ncat,cat.jpg\n", id="text-file"),
    pytest.param(b"", id="empty-file"),
    pytest.param(b"\x00" * 4, id="four-bytes"),
])
def test_not_a_safetensors_file_is_refused(tmp_path, content):
    path = tmp_path / "prompts.safetensors"
    path.write_bytes(content)
    assert "not a promptune prompt file" in load_error(path)


def test_random_bytes_are_refused(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for i in range(5):
        path = tmp_path / f"random{i}.safetensors"
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8).tolist()))
        load_error(path)


def test_truncated_copies_are_refused(tuned, tmp_path):
    raw = tuned.read_bytes()
    for keep in (1, 8, 9, 100, len(raw) // 2, len(raw) - 4, len(raw) - 1):
        path = tmp_path / f"truncated-{keep}.safetensors"
        path.write_bytes(raw[:keep])
        assert "not a promptune prompt file" in load_error(path), keep


def test_plain_safetensors_without_promptune_metadata_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"ctx": torch.zeros(N_CTX, 32)}, str(path))
    assert "not a promptune prompt file" in load_error(path)
    save_file({"ctx": torch.zeros(N_CTX, 32)}, str(path), metadata={"format": "pt"})
    assert "not a promptune prompt file" in load_error(path)


def test_missing_path_and_folder_are_refused(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope.safetensors")
    assert "not a file" in load_error(tmp_path)


# ------------------------------------------------------------------------------------------------------ atomic save


def _prompt_file(value: float) -> PromptFile:
    return PromptFile(tensors={"ctx": torch.full((2, 4), value)}, method="coop",
                      backbone={"family": "clip", "name": "x"}, class_names=["a", "b"], hparams={"n_ctx": 2},
                      preprocess={"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt(), RuntimeError("boom")])
def test_failed_save_leaves_previous_file_untouched(tmp_path, monkeypatch, failure):
    path = tmp_path / "prompts.safetensors"
    save_prompt_file(path, _prompt_file(1.0))
    before = path.read_bytes()
    real_save = artifact.save_file

    def half_write(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # a partial write, then the process "dies"
        raise failure

    monkeypatch.setattr(artifact, "save_file", half_write)
    expected = PromptFileError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected) as info:
        save_prompt_file(path, _prompt_file(2.0))
    if expected is PromptFileError:
        assert_one_sentence(str(info.value))
        assert "No space left on device" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    assert torch.equal(load_prompt_file(path).tensors["ctx"], torch.full((2, 4), 1.0))


def test_save_replaces_the_previous_file_completely(tmp_path):
    path = tmp_path / "prompts.safetensors"
    save_prompt_file(path, _prompt_file(1.0))
    save_prompt_file(path, _prompt_file(2.0))
    assert torch.equal(load_prompt_file(path).tensors["ctx"], torch.full((2, 4), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.safetensors"]


def test_save_into_a_folder_or_missing_folder_is_refused(tmp_path):
    for target in (tmp_path, tmp_path / "missing" / "prompts.safetensors"):
        with pytest.raises(PromptFileError) as info:
            save_prompt_file(target, _prompt_file(1.0))
        assert_one_sentence(str(info.value))
    assert list(tmp_path.iterdir()) == []
