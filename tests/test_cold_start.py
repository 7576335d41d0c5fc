"""What a cold `predict` no longer pays for (issue 14): the random initialisation of a backbone whose weights replace it
at once, hashing an unchanged weights file again, and a loader worker for a single batch. Each shortcut must give
exactly what the plain path gives."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from torch import nn

import promptune.api
import promptune.usercache as usercache
from conftest import make_shape_folder, make_vit_file
from promptune import __version__
from promptune.artifact import PromptFile, save_prompt_file
from promptune.backbones import freeze, load_backbone
from promptune.backbones.skip_init import SkipInit, build_loaded
from promptune.data import default_workers
from promptune.methods.coop import CoOp, CoOpConfig

# ----------------------------------------------------------------------------------------- no init before the load


def _assert_same_model(loaded: nn.Module, plain: nn.Module) -> None:
    """The same parameters and buffers (those outside the state dict too), bit for bit, with the same layout.

    Both sides frozen: whether parameters require grad picks nn.MultiheadAttention's fused or plain path."""
    for what in ("named_parameters", "named_buffers"):
        ours, theirs = dict(getattr(loaded, what)()), dict(getattr(plain, what)())
        assert list(ours) == list(theirs)
        for name, tensor in ours.items():
            assert tensor.dtype == theirs[name].dtype and tensor.stride() == theirs[name].stride(), name
            assert torch.equal(tensor, theirs[name]), name


def _counting(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of `module.name` (still calling it)."""
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_clip_loads_bit_for_bit_as_open_clip_builds_it(clip_files, monkeypatch):
    config, weights = clip_files
    calls = _counting(monkeypatch, open_clip, "create_model_and_transforms")
    loaded = load_backbone(str(config), str(weights)).model
    assert len(calls) == 1  # built once: no parameter was left without its weights
    monkeypatch.undo()
    plain = freeze(open_clip.create_model_and_transforms(config.stem, pretrained=str(weights))[0])
    assert any(name not in plain.state_dict() for name, _ in plain.named_buffers())  # the text tower's attn_mask
    _assert_same_model(loaded, plain)
    images = torch.rand(2, 3, 32, 32)
    tokens = open_clip.get_tokenizer(config.stem)(["a red square", "a green circle"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), plain.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), plain.encode_text(tokens))


@pytest.mark.parametrize("name", ["test_vit", "test_vit_relpos"])  # relpos: buffers outside the state dict
def test_vit_loads_bit_for_bit_as_timm_builds_it(name, tmp_path, monkeypatch):
    weights = make_vit_file(tmp_path, name=name)
    calls = _counting(monkeypatch, timm, "create_model")
    loaded = load_backbone(name, str(weights)).model
    assert len(calls) == 1
    monkeypatch.undo()
    plain = freeze(timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(weights)}))
    _assert_same_model(loaded, plain)
    images = torch.rand(2, 3, *plain.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), plain.forward_features(images))


def test_skipped_init_takes_the_weights_memory_without_a_copy():
    torch.manual_seed(0)
    state = nn.Linear(6, 4).state_dict()
    with SkipInit() as mode:
        layer = nn.Linear(6, 4)
        assert mode.left_uninitialised(layer)
        layer.load_state_dict(state)
    assert not mode.left_uninitialised(layer)
    assert layer.weight.data_ptr() == state["weight"].data_ptr() and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.bias, state["bias"]) and layer.weight.requires_grad


def test_weights_of_another_dtype_are_copied_and_cast_as_load_state_dict_does():
    state = {name: value.half() for name, value in nn.Linear(6, 4).state_dict().items()}
    plain = nn.Linear(6, 4)
    plain.load_state_dict(state)
    with SkipInit():
        layer = nn.Linear(6, 4)
        layer.load_state_dict(state)
    assert layer.weight.dtype == torch.float32 and layer.weight.data_ptr() != state["weight"].data_ptr()
    _assert_same_model(layer, plain)


def test_ops_on_a_loaded_parameter_run_as_usual():
    state = nn.Linear(6, 4).state_dict()
    doubled = state["weight"] * 2.0
    with SkipInit():
        layer = nn.Linear(6, 4)
        layer.load_state_dict(state)
        with torch.no_grad():
            layer.weight.mul_(2.0)
            nn.init.zeros_(layer.bias)
    assert torch.equal(layer.weight, doubled) and not layer.bias.any()


def test_a_parameter_no_weight_reached_is_built_again_as_usual():
    calls = []

    def create() -> nn.Module:
        calls.append(1)
        return nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))  # nothing loads: every parameter keeps its init

    torch.manual_seed(3)
    built = build_loaded(create)
    torch.manual_seed(3)
    plain = create()
    assert len(calls) == 3  # skipped-init attempt, the plain rebuild, the reference
    _assert_same_model(built, plain)


@pytest.mark.parametrize("method", ["sep", "coop", "spt", "vpt"])
def test_a_prompt_files_method_is_built_without_initialising_what_the_file_replaces(method, clip_files, vit_file,
                                                                                   tmp_path, monkeypatch):
    """`promptune.load` builds the method under SkipInit (SEP's ~45 M fusion weights were initialised, then
    overwritten): the model equals the plain build plus `load_learned_state`, and no rebuild was needed."""
    from promptune.methods import get_method

    cls = get_method(method)
    backbone_args = (str(clip_files[0]), str(clip_files[1])) if cls.family == "clip" else ("test_vit", str(vit_file))
    names = ["red square", "green circle", "blue triangle"]
    torch.manual_seed(0)
    trained = cls(load_backbone(*backbone_args), names, cls.make_config({}))
    with torch.no_grad():
        for tensor in trained.learned_state().values():
            tensor.add_(torch.randn_like(tensor))  # unlike any initialisation
    loaded_backbone = load_backbone(*backbone_args)
    prompt_file = PromptFile(tensors={k: v.detach().clone() for k, v in trained.learned_state().items()},
                             method=method, backbone=loaded_backbone.describe(), class_names=names,
                             hparams=trained.hparams(), preprocess=loaded_backbone.preprocess.to_dict(),
                             training={}, promptune_version=__version__)
    path = save_prompt_file(tmp_path / f"{method}.safetensors", prompt_file)
    rebuilt = []
    original = SkipInit.left_uninitialised
    monkeypatch.setattr(SkipInit, "left_uninitialised", lambda self, model: rebuilt.append(original(self, model))
                        or rebuilt[-1])
    loaded = promptune.api.load(path, backbone=backbone_args[0], weights=backbone_args[1], device="cpu").method
    assert rebuilt[-1] is False  # the last build (the method's) left no parameter uninitialised: built once
    torch.manual_seed(0)
    plain = cls(load_backbone(*backbone_args), names, cls.make_config(trained.hparams()))
    plain.load_learned_state(prompt_file.tensors)
    _assert_same_model(loaded.eval(), plain.eval())


# ------------------------------------------------------------------------------------------ cached weights hashes


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(usercache.CACHE_DIR_ENV, str(folder))
    return folder


@pytest.fixture()
def hashes(monkeypatch) -> list[Path]:
    """The files actually read and hashed."""
    done: list[Path] = []
    original = usercache.file_sha256

    def counted(path: Path) -> str:
        done.append(path)
        return original(path)

    monkeypatch.setattr(usercache, "file_sha256", counted)
    return done


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unchanged_file_is_hashed_once(cache, hashes, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(4096))
    assert usercache.weights_sha256(weights) == _sha256(weights)
    assert usercache.weights_sha256(weights) == _sha256(weights)
    assert len(hashes) == 1
    assert str(weights.resolve()) in json.loads((cache / usercache.WEIGHTS_HASHES).read_text())


def test_a_file_rewritten_with_its_size_and_mtime_kept_is_hashed_again(cache, hashes, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"a" * 4096)
    usercache.weights_sha256(weights)
    stat = weights.stat()
    weights.write_bytes(b"b" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or rsync leave it
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns and weights.stat().st_size == stat.st_size
    assert usercache.weights_sha256(weights) == _sha256(weights)
    assert len(hashes) == 2


def test_a_replaced_file_is_hashed_again(cache, hashes, tmp_path):
    weights, other = tmp_path / "w.safetensors", tmp_path / "other"
    weights.write_bytes(b"a" * 4096)
    usercache.weights_sha256(weights)
    other.write_bytes(b"c" * 4096)
    other.replace(weights)
    assert usercache.weights_sha256(weights) == _sha256(weights)
    assert len(hashes) == 2


@pytest.mark.parametrize("content", [b"\x00\xff not json", b"[1, 2]", b'{"x": 1}', b"{\"KEY\": {\"stamp\": STAMP, \"sha256\": \"feed\"}}"])
def test_a_corrupt_cache_file_means_hashing_again(cache, hashes, tmp_path, content):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(4096))
    stat = weights.stat()
    stamp = json.dumps([stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]).encode()
    cache.mkdir()
    (cache / usercache.WEIGHTS_HASHES).write_bytes(content.replace(b"KEY", str(weights.resolve()).encode()).replace(b"STAMP", stamp))
    assert usercache.weights_sha256(weights) == _sha256(weights)
    assert usercache.weights_sha256(weights) == _sha256(weights)
    assert len(hashes) == 1  # the second call found the rewritten cache


def test_an_unwritable_cache_folder_never_breaks_a_load(tmp_path, monkeypatch, hashes):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(usercache.CACHE_DIR_ENV, str(blocker / "cache"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(4096))
    assert usercache.weights_sha256(weights) == usercache.weights_sha256(weights) == _sha256(weights)
    assert len(hashes) == 2


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(usercache.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert usercache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(usercache.CACHE_DIR_ENV)
    if os.name == "posix" and os.uname().sysname == "Linux":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert usercache.cache_dir() == tmp_path / "xdg" / "promptune"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert usercache.cache_dir() == Path.home() / ".cache" / "promptune"


# -------------------------------------------------------------------------------------------- loader workers


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, clip_files) -> Path:
    """An untrained CoOp prompt file on the tiny CLIP (its context at the init): enough to predict with."""
    config, weights = clip_files
    backbone = load_backbone(str(config), str(weights))
    model = CoOp(backbone, ["red_square", "green-circle", "blue_triangle"], CoOpConfig(n_ctx=4))
    prompt_file = PromptFile(tensors=model.learned_state(), method="coop", backbone=backbone.describe(),
                             class_names=model.class_names, hparams=model.hparams(),
                             preprocess=backbone.preprocess.to_dict(), promptune_version=__version__)
    return save_prompt_file(tmp_path_factory.mktemp("cold") / "coop.safetensors", prompt_file)


@pytest.fixture()
def asked_workers(monkeypatch) -> list[int]:
    """The worker counts promptune asks its loaders for (the loaders themselves run in this process)."""
    asked: list[int] = []
    original = promptune.api.make_loader

    def spy(dataset, batch_size, shuffle, *args, workers=None, **kwargs):
        asked.append(workers)
        return original(dataset, batch_size, shuffle, *args, workers=0, **kwargs)

    monkeypatch.setattr(promptune.api, "make_loader", spy)
    return asked


def test_a_single_batch_is_read_without_workers(prompts, tmp_path, asked_workers):
    images = sorted(make_shape_folder(tmp_path / "images", per_class=1).rglob("*.png"))
    model = promptune.load(prompts, device="cpu")
    one, _ = model.predict(images[0])
    batched, _ = model.predict(images, batch_size=2)
    chosen, _ = model.predict(images[0], workers=2)
    assert asked_workers == [0, default_workers(), 2]
    assert one[0].labels == batched[0].labels and one[0].probabilities == pytest.approx(batched[0].probabilities, abs=1e-5)
