"""The trainer's pieces: one TrainConfig from a method's defaults plus the user's overrides."""

from __future__ import annotations

import dataclasses

import pytest

from promptune.methods.registry import METHODS
from promptune.train import TrainConfig


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
