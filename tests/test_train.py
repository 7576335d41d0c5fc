"""The trainer's pieces: one TrainConfig from a method's defaults plus the user's overrides; a step that never waits
for the device, and an epoch that reads the losses back only when it needs them."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import promptune.train as train_module
from promptune.backbones import load_backbone
from promptune.data import Batch
from promptune.errors import MethodError
from promptune.methods import get_method
from promptune.methods.registry import METHODS
from promptune.reporting import SilentReporter
from promptune.runtime import Runtime
from promptune.train import DIVERGED, Trainer, TrainConfig


def test_train_config_is_the_method_defaults_plus_the_overrides_given():
    defaults = METHODS["sep"].defaults
    plain = TrainConfig.from_defaults(defaults, seed=5)
    assert {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain) if f.name != "seed"} == {
        f.name: getattr(defaults, f.name) for f in dataclasses.fields(plain) if f.name != "seed"}
    assert plain.seed == 5 and plain.optimizer == "adam" and plain.eps == 1e-3

    chosen = TrainConfig.from_defaults(defaults, epochs=3, lr=0.1, batch_size=None, weight_decay=0.0)
    assert (chosen.epochs, chosen.lr, chosen.batch_size, chosen.weight_decay) == (3, 0.1, defaults.batch_size, 0.0)
    with pytest.raises(TypeError, match="no field"):
        TrainConfig.from_defaults(defaults, shots=4)  # shots choose images, they are not a training setting


# ------------------------------------------------------------------------------------- no host sync inside a step
# aten ops whose result the host must read (`.item()`, `float(t)`, `bool(t)`, data-dependent shapes): on a GPU each
# one makes the host wait until the device has finished everything queued before it
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "unique", "_unique2"}


class OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["sep", "coop", "spt", "vpt"])
def test_a_training_step_never_reads_a_device_value_on_the_host(method, clip_files, vit_file):
    if method in ("sep", "coop"):
        backbone = load_backbone(str(clip_files[0]), str(clip_files[1]))
    else:
        backbone = load_backbone("test_vit", str(vit_file))
    cls = get_method(method)
    model = cls(backbone, ["red square", "green circle", "blue triangle"], cls.make_config({}))
    size = backbone.preprocess.size
    images, labels = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    trainer = Trainer(model, TrainConfig(epochs=1, lr=1e-3, weight_decay=0.0, batch_size=4),
                      Runtime(torch.device("cpu")), steps_per_epoch=10)
    model.train()
    trainer.train_step(images, labels)  # the optimiser state exists from here on, as in every later step
    with OpNames() as ops:
        loss, hits = trainer.train_step(images, labels)
    assert sum(ops.names.values()) > 100  # the counter saw the whole step
    assert not {name: n for name, n in ops.names.items() if name in HOST_READS}
    assert loss.dim() == 0 and hits.dim() == 0 and 0 <= int(hits) <= 4


class TinyClassifier(nn.Module):
    """A linear classifier over the flattened images, with the few members a Trainer uses."""

    def __init__(self, nan_after: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 3)
        self.calls = 0
        self.nan_after = nan_after  # from this call on, the loss is NaN

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        logits = self.fc(images.flatten(1))  # (B, 3)
        loss = F.cross_entropy(logits, labels)
        if self.nan_after is not None and self.calls >= self.nan_after:
            loss = loss * math.nan
        return loss, logits

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]

    def has_unused_parameters(self) -> bool:
        return False


class Shown(SilentReporter):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def step(self, loss: float, acc: float, images_per_s: float) -> None:
        self.losses.append(loss)


def _batches(count: int = 5) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    return [Batch(torch.randn(4, 3, 2, 2, generator=generator), torch.randint(0, 3, (4,), generator=generator),
                  torch.arange(4), []) for _ in range(count)]


def _epoch(device: str, method: TinyClassifier | None = None) -> tuple[Trainer, Shown]:
    trainer = Trainer(method or TinyClassifier(), TrainConfig(epochs=1, lr=0.5, weight_decay=0.0, batch_size=4),
                      Runtime(torch.device(device)), steps_per_epoch=5)
    shown = Shown()
    trainer.run_epoch(_batches(), shown)
    return trainer, shown


@pytest.fixture()
def pretend_gpu(monkeypatch):
    """A runtime that says "cuda" while the tensors stay on the CPU, and a display refresh that never comes due."""
    monkeypatch.setattr(train_module, "_to_device", lambda batch, device: (batch.images, batch.labels))
    monkeypatch.setattr(train_module, "REFRESH_SECONDS", 1e9)


def _totals(trainer: Trainer) -> tuple:
    p = trainer.progress
    return p.loss_sum, p.correct, p.seen, p.step


def test_off_the_cpu_losses_are_read_back_late_with_the_same_totals(pretend_gpu):
    on_cpu, cpu_shown = _epoch("cpu")
    on_gpu, gpu_shown = _epoch("cuda")
    assert len(cpu_shown.losses) == len(gpu_shown.losses) == 5
    assert len(set(cpu_shown.losses)) == 5  # on the CPU every step's own loss is shown...
    assert gpu_shown.losses == [cpu_shown.losses[0]] * 5  # ...off it, the first step's until the next read-back
    assert _totals(on_gpu) == _totals(on_cpu)  # the epoch's totals, read at its end: bit for bit the same
    assert on_cpu.progress.seen == 20 and on_cpu.progress.loss_sum > 0
    for a, b in zip(on_gpu.method.parameters(), on_cpu.method.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device, steps_run", [("cpu", 3), ("cuda", 5)])
def test_a_diverged_loss_stops_the_run_with_one_sentence_also_when_read_back_late(device, steps_run, pretend_gpu):
    method = TinyClassifier(nan_after=3)
    with pytest.raises(MethodError) as error:
        _epoch(device, method)
    assert str(error.value) == DIVERGED
    assert method.calls == steps_run  # off the CPU the check runs at the next read-back: here, the epoch's end
