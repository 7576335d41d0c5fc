"""The method and backbone-family registries: one entry per method decides its family, class and training defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import promptune
from promptune.backbones import FAMILIES, detect_family
from promptune.errors import BackboneError, MethodError
from promptune.methods.registry import METHODS, MethodSpec, TrainDefaults, method_choices, resolve_method
from promptune.methods.sep import SEP
from promptune.methods.spt import VPT


class Probe(VPT):
    """A throwaway ViT method (VPT's model under another name), registered by the `probe` fixture only."""

    name = "probe"


@pytest.fixture()
def probe(monkeypatch):
    spec = MethodSpec("probe", "vit", f"{__name__}:Probe", TrainDefaults(epochs=2, lr=1e-2, batch_size=6), "test only")
    monkeypatch.setitem(METHODS, "probe", spec)
    return spec


def test_a_class_reads_family_defaults_and_description_from_its_registry_entry():
    assert SEP.family == "clip" and SEP.defaults is METHODS["sep"].defaults and SEP.description == METHODS["sep"].description
    assert VPT.family == "vit" and VPT.defaults == METHODS["spt"].defaults  # VPT shares SPT's recipe
    assert METHODS["coop"].load().name == "coop"


def test_the_family_follows_the_backbone_else_the_method(clip_files, vit_file):
    assert resolve_method("auto", None).name == FAMILIES["clip"].default_method == "sep"
    assert resolve_method("auto", "test_vit").name == FAMILIES["vit"].default_method == "spt"
    assert resolve_method("auto", str(clip_files[0])).name == "sep"
    assert resolve_method("vpt", None).family == "vit"
    assert resolve_method("coop", None).family == "clip"
    with pytest.raises(MethodError, match=r"Method 'spt' needs a VIT backbone, but '.*tiny-clip.json' is a CLIP backbone"):
        resolve_method("spt", str(clip_files[0]))
    with pytest.raises(MethodError, match=r"Unknown method 'nope'; choose one of: auto, sep, coop, spt, vpt\."):
        resolve_method("nope", None)
    with pytest.raises(BackboneError, match=r"neither an open_clip model \(CLIP\) nor a timm model \(ViT\)"):
        detect_family("no-such-backbone-anywhere")


def test_a_newly_registered_vit_method_without_backbone_uses_the_vit_family(probe):
    assert "probe" in method_choices()
    assert resolve_method("probe", None) is probe  # before the registry: "needs a VIT backbone, but 'None' is a CLIP"
    assert Probe.family == "vit" and Probe.defaults.epochs == 2


def test_a_newly_registered_method_tunes_and_loads_through_the_registry_alone(probe, monkeypatch, shape_folder, vit_file,
                                                                             tmp_path):
    # The default ViT backbone would come from the hub; point the ViT family's default at the tiny local test_vit.
    monkeypatch.setitem(FAMILIES, "vit", dataclasses.replace(FAMILIES["vit"], default_backbone="test_vit"))
    result = promptune.tune(shape_folder, method="probe", weights=str(vit_file), device="cpu", workers=0, seed=1,
                            out=tmp_path / "probe.safetensors", checkpoint=False)
    assert (result.method, result.backbone, len(result.summary.epochs)) == ("probe", "test_vit", 2)  # its own defaults
    model = promptune.load(result.path, weights=str(vit_file), device="cpu")
    assert isinstance(model.method, Probe) and model.prompt_file.training["batch_size"] == 6


def test_the_registries_do_not_import_torch():
    code = ("import sys, promptune.cli, promptune.methods.registry, promptune.backbones; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
