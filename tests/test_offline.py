"""Pretrained tags without a network (issue 10): one sentence at once instead of the hub's retries, and weights already
in the local Hugging Face cache load with no network at all. Nothing here touches the network: the probe is replaced
where a test needs the hub "down", sockets refuse where a test proves no request is made, and the cache is a folder
the test fills with a tiny weights file."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import promptune
import promptune.backbones.hub as hub
from promptune.backbones import load_backbone
from promptune.cli import app

from conftest import make_shape_folder

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def online(monkeypatch, tmp_path) -> Path:
    """HF_HUB_OFFLINE unset, and an empty Hugging Face cache of the test's own (returned)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


@pytest.fixture()
def no_network(monkeypatch) -> list[tuple[str, int]]:
    """The hub cannot be reached: the probe reports it (recording what it was asked), and any real download fails the test."""
    asked: list[tuple[str, int]] = []

    def probe(host: str, port: int) -> str:
        asked.append((host, port))
        return "cannot be resolved (no network?)"

    def download(*_args, **_kwargs):
        raise AssertionError("a download was attempted after the probe failed")

    monkeypatch.setattr(hub, "_probe", probe)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    return asked


@pytest.fixture()
def sockets_refused(monkeypatch) -> None:
    """Any attempt to resolve a name or open a connection fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _one_sentence(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[:-1] == [line for line in lines[:-1] if line.startswith("loading backbone")], result.stderr
    assert lines[-1].startswith("Error: ") and lines[-1].endswith(".") and not re.search(r"[.!?] [A-Z]", lines[-1])
    return lines[-1]


# ------------------------------------------------------------------------------------------------- no network


@pytest.mark.parametrize("backbone, expected", [
    (None, "The ViT-B-16 / openai weights (open_clip_model.safetensors of timm/vit_base_patch16_clip_224.openai)"),
    ("ViT-B-32", "The ViT-B-32 / openai weights (open_clip_model.safetensors of timm/vit_base_patch32_clip_224.openai)"),
    ("vit_base_patch16_224", "The vit_base_patch16_224 / augreg2_in21k_ft_in1k weights "
                             "(model.safetensors of timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)"),
])
def test_without_a_network_tune_fails_at_once_with_one_sentence(backbone, expected, online, no_network, shape_folder):
    """It printed 48 retry lines of the hub and failed after about 50 s."""
    args = ["tune", str(shape_folder), "--device", "cpu", "--epochs", "1", "--shots", "2"] + (["--backbone", backbone] if backbone else [])
    line = _one_sentence(runner.invoke(app, args))
    assert line == (f"Error: {expected} are not in the local Hugging Face cache and huggingface.co cannot be resolved "
                    f"(no network?); pass a downloaded copy with --weights FILE, or run once with internet so that the "
                    f"cache fills.")
    assert "(default)" not in runner.invoke(app, args).stderr
    assert no_network == [("huggingface.co", 443)] * 2


def test_hf_hub_offline_fails_without_probing(online, no_network, monkeypatch, shape_folder):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    line = _one_sentence(runner.invoke(app, ["tune", str(shape_folder), "--backbone", "ViT-B-32", "--weights",
                                             "laion2b_s34b_b79k", "--device", "cpu", "--shots", "2"]))
    assert "ViT-B-32 / laion2b_s34b_b79k weights" in line and "and HF_HUB_OFFLINE is set;" in line
    assert no_network == []


def test_eval_of_a_prompt_file_tuned_on_a_tag_fails_the_same_way(online, no_network, tmp_path, clip_files, shape_folder):
    """`load` reloads the tag the prompt file names: without a network, the same one sentence."""
    config, weights = clip_files
    out = tmp_path / "p.safetensors"
    promptune.tune(shape_folder, method="coop", backbone=str(config), weights=str(weights), epochs=1, shots=1,
                   batch_size=4, workers=0, device="cpu", out=out)
    from promptune.artifact import load_prompt_file, save_prompt_file

    prompt_file = load_prompt_file(out)
    prompt_file.backbone = {"family": "clip", "name": "ViT-B-32", "weights": "openai", "shape": {}}
    save_prompt_file(out, prompt_file)
    line = _one_sentence(runner.invoke(app, ["eval", str(shape_folder), "--prompts", str(out), "--device", "cpu"]))
    assert line.startswith("Error: The ViT-B-32 / openai weights (open_clip_model.safetensors")


# ---------------------------------------------------------------------------------------------------- the probe


def test_the_probe_connects_to_the_endpoint_and_names_what_failed(monkeypatch, online):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    weights = hub.HubWeights("x / y", "org/repo", ("model.safetensors",))
    try:
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")  # HF_ENDPOINT, e.g. a mirror
        assert hub.unreachable_reason(weights) is None
    finally:
        server.close()
    assert hub.unreachable_reason(weights).startswith("127.0.0.1 cannot be reached (")  # nothing listens any more

    def unresolvable(*_args, **_kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unresolvable)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "https://hub.example")
    assert hub.unreachable_reason(weights) == "hub.example cannot be resolved (no network?)"


def test_the_probe_gives_up_after_its_timeout(monkeypatch, online):
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.2)
    def hang(*_args, **_kwargs) -> socket.socket:  # a resolver that takes its time
        time.sleep(1)
        return socket.socket()

    monkeypatch.setattr(socket, "create_connection", hang)
    started = time.monotonic()
    reason = hub.unreachable_reason(hub.HubWeights("x / y", "org/repo", ("model.safetensors",)))
    assert reason == "huggingface.co did not answer within 0.2 s" and time.monotonic() - started < 2


def test_the_probe_goes_through_the_proxy(monkeypatch, online):
    asked: list[tuple[str, int]] = []
    monkeypatch.setattr(hub, "_probe", lambda host, port: asked.append((host, port)) or "did not answer within 3 s")
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    reason = hub.unreachable_reason(hub.HubWeights("x / y", "org/repo", ("model.safetensors",)))
    assert asked == [("proxy.example", 3128)] and reason == "its proxy proxy.example did not answer within 3 s"


# --------------------------------------------------------------------------------------------- weights in the cache


def _cache_file(cache: Path, repo_id: str, filename: str, tensors: dict[str, torch.Tensor]) -> Path:
    """What huggingface_hub leaves after downloading `filename` of `repo_id` at revision main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(snapshot / filename))
    return snapshot / filename


def test_clip_weights_in_the_cache_load_with_no_network(online, sockets_refused, monkeypatch, clip_files, tmp_path):
    config, weights = clip_files
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-clip", {"test": {"hf_hub": "promptune-test/tiny-clip/"}})
    cached = _cache_file(online, "promptune-test/tiny-clip", "open_clip_model.safetensors", load_file(str(weights)))
    backbone = load_backbone(str(config), "test")
    assert backbone.weights == "test" and backbone.weights_sha256 is None
    expected = load_file(str(cached))
    for name, value in backbone.model.state_dict().items():
        if name in expected:
            assert torch.equal(value, expected[name]), name
    data = make_shape_folder(tmp_path / "data", per_class=2)
    result = promptune.tune(data, method="coop", backbone=str(config), weights="test", epochs=1, batch_size=6,
                            workers=0, device="cpu", out=tmp_path / "p.safetensors")
    assert promptune.load(result.path, device="cpu").prompt_file.backbone["weights"] == "test"


def test_timm_weights_in_the_cache_load_with_no_network(online, sockets_refused, tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("test_vit", pretrained=False, num_classes=0)
    _cache_file(online, "timm/test_vit.r160_in1k", "model.safetensors", reference.state_dict())
    backbone = load_backbone("test_vit", "r160_in1k")
    assert backbone.weights == "r160_in1k" and backbone.preprocess.size == 160  # the tag's own pretrained config
    for name, value in reference.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], value), name


def test_a_tag_the_architecture_lacks_is_named_not_downloaded(online, no_network, shape_folder):
    line = _one_sentence(runner.invoke(app, ["tune", str(shape_folder), "--backbone", "vit_base_patch16_224.bogus",
                                             "--device", "cpu", "--shots", "2"]))
    assert line.startswith("Error: Unknown weights tag 'bogus' for vit_base_patch16_224; valid tags: augreg2_in21k_ft_in1k")
    assert no_network == []
