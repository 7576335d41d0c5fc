"""Recipes and selection (issue 12): --keep last|best, --recipe default|paper, and the moving average of the learned
tensors (--ema-decay), in the trainer and through `tune` (the prompt file and --resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

from typer.testing import CliRunner

from promptune.api import tune
from promptune.checkpoint import CheckpointError
from promptune.cli import app
from promptune.data import Batch
from promptune.errors import MethodError
from promptune.methods.registry import METHODS, RECIPES, is_mae_backbone
from promptune.runtime import Runtime
from promptune.stop import RunInterrupted
from promptune.train import ParameterEMA, Trainer, TrainConfig, TrainingStopped, optimizer_groups

from conftest import make_shape_folder
from test_resume import SignalAt, assert_same_result

CPU = Runtime(torch.device("cpu"))


# --------------------------------------------------------------------------------------------- a toy method


class Toy(nn.Module):
    """A linear classifier on 4 features: a 2-d weight and a 1-d bias, with the PromptMethod calls the trainer makes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 4) * 0.1)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images @ self.weight.t() + self.bias  # (B, 3)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(images)
        return nn.functional.cross_entropy(logits, labels), logits

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [self.weight], "weight_decay": weight_decay}, {"params": [self.bias], "weight_decay": 0.0}]

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach(), "bias": self.bias.detach()}

    def load_learned_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.weight.copy_(tensors["weight"])
            self.bias.copy_(tensors["bias"])

    def has_unused_parameters(self) -> bool:
        return False


def toy_batches(steps: int, seed: int = 1) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [Batch(torch.randn(4, 4, generator=generator), torch.randint(0, 3, (4,), generator=generator),
                  torch.arange(4), []) for _ in range(steps)]


def toy_trainer(epochs: int = 4, warmup_epochs: float = 1.0, steps: int = 2, **settings: Any) -> Trainer:
    cfg = TrainConfig(epochs=epochs, lr=0.1, weight_decay=0.0, batch_size=4, warmup_epochs=warmup_epochs, **settings)
    return Trainer(Toy(), cfg, CPU, steps_per_epoch=steps)


def fit_scripted(trainer: Trainer, val_accs: list[float | None], steps: int = 2) -> list[dict[str, torch.Tensor]]:
    """Fit with validation accuracies `val_accs` (one per epoch); returns the kept-weights tensors after each epoch."""
    trainer.validate = lambda loader: val_accs[trainer.epoch]  # called before the epoch is counted
    after: list[dict[str, torch.Tensor]] = []

    def record(t: Trainer) -> None:
        with t.kept_weights():
            after.append({k: v.clone() for k, v in t.method.learned_state().items()})

    trainer.fit(toy_batches(steps), val_loader=[], checkpoint=record)
    return after


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------- --keep


def test_keep_last_ends_on_the_last_epoch_even_when_an_earlier_one_validated_better():
    trainer = toy_trainer()
    after = fit_scripted(trainer, [0.2, 0.9, 0.5, 0.4])
    assert_state_equal(trainer.method.learned_state(), after[-1])
    assert not torch.equal(after[1]["weight"], after[-1]["weight"])  # the best epoch's tensors were different
    summary = trainer.summary
    assert (summary.kept_epoch, summary.best_epoch, summary.best_val_acc) == (4, 2, 0.9)
    assert summary.kept == "the last epoch (--keep last)"
    assert trainer.best_state is None  # nothing is snapshotted that will not be written


def test_keep_best_ends_on_the_best_epoch_after_the_warm_up():
    trainer = toy_trainer(keep="best")
    after = fit_scripted(trainer, [0.95, 0.5, 0.75, 0.75])  # epoch 1 is the warm-up: never chosen; ties go later
    assert (trainer.summary.kept_epoch, trainer.summary.best_epoch, trainer.summary.best_val_acc) == (4, 4, 0.75)
    assert_state_equal(trainer.method.learned_state(), after[3])

    trainer = toy_trainer(keep="best")
    after = fit_scripted(trainer, [0.95, 0.5, 0.75, 0.25])
    assert trainer.summary.kept_epoch == 3
    assert trainer.summary.kept == "the best validation accuracy after the warm-up (--keep best)"
    assert_state_equal(trainer.method.learned_state(), after[2])


@pytest.mark.parametrize("warmup_epochs, warm_epochs", [(0.0, 0), (1.0, 1), (1.5, 1), (2.0, 2), (3.5, 3)])
@pytest.mark.parametrize("warmup", ["linear", "constant"])
def test_keep_best_never_picks_an_epoch_that_ends_in_the_warm_up(warmup_epochs, warm_epochs, warmup):
    """An epoch whose last step still ran at the warm-up lr is never kept, however well it validates."""
    trainer = toy_trainer(epochs=5, warmup_epochs=warmup_epochs, keep="best", warmup=warmup)
    scores = [1.0 - 0.1 * epoch for epoch in range(5)]  # every earlier epoch validates better
    fit_scripted(trainer, scores)
    assert trainer.summary.kept_epoch == warm_epochs + 1
    assert trainer.summary.best_val_acc == scores[warm_epochs]


def test_keep_best_without_validation_keeps_the_last_epoch_and_says_why():
    trainer = toy_trainer(keep="best")
    after = fit_scripted(trainer, [None] * 4)
    assert trainer.summary.kept_epoch == 4 and trainer.summary.best_val_acc is None
    assert trainer.summary.kept == "the last epoch: --keep best had no validation accuracy after the warm-up"
    assert_state_equal(trainer.method.learned_state(), after[-1])


# --------------------------------------------------------------------------------------------- the moving average


def test_parameter_ema_is_the_exponential_moving_average_of_the_values_after_each_update():
    p = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    ema = ParameterEMA({"p": p}, decay=0.9)
    values = [torch.tensor([1.0, 0.0]), torch.tensor([4.0, 2.0]), torch.tensor([-3.0, 5.0])]
    for value in values:
        with torch.no_grad():
            p.copy_(value)
        ema.update()
    # closed form: d^n * start + sum_k (1 - d) * d^(n - k) * value_k
    expected = 0.9**3 * torch.tensor([2.0, -1.0], dtype=torch.float64)
    for k, value in enumerate(values, start=1):
        expected += 0.1 * 0.9 ** (3 - k) * value.double()
    torch.testing.assert_close(ema.average["p"], expected, rtol=0, atol=1e-12)

    with ema.applied():
        assert torch.equal(p.detach(), ema.average["p"])
    assert torch.equal(p.detach(), values[-1].double())  # the parameter's own value is back after the block


def test_the_trainer_averages_after_every_optimiser_step_and_validates_and_keeps_the_average():
    trainer = toy_trainer(epochs=2, ema_decay=0.5)
    start = {k: v.clone() for k, v in trainer.method.learned_state().items()}
    raw: list[dict[str, torch.Tensor]] = []
    trainer.optimizer.register_step_post_hook(lambda *_: raw.append(
        {k: v.clone() for k, v in trainer.method.learned_state().items()}))
    trainer.fit(toy_batches(2), val_loader=None)
    assert len(raw) == 4  # 2 epochs x 2 steps
    expected = start
    for values in raw:
        expected = {k: 0.5 * expected[k] + 0.5 * values[k] for k in values}
    for key, value in trainer.method.learned_state().items():  # the run ends on the average, not the raw tensors
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7)
        assert not torch.allclose(value, raw[-1][key])
    assert trainer.summary.kept == "the last epoch (--keep last), as the moving average of the learned tensors (decay 0.5)"

    trainer = toy_trainer(epochs=1, ema_decay=0.5)
    trainer.fit(toy_batches(2), val_loader=None)
    own = {k: v.clone() for k, v in trainer.method.learned_state().items()}
    with trainer.kept_weights():
        averaged = {k: v.clone() for k, v in trainer.method.learned_state().items()}
    assert_state_equal(own, averaged)  # fit already copied the average in


def test_validation_sees_the_average_and_training_continues_from_the_parameters():
    trainer = toy_trainer(epochs=2, ema_decay=0.9)
    seen: list[dict[str, torch.Tensor]] = []
    averages: list[dict[str, torch.Tensor]] = []
    raws: list[dict[str, torch.Tensor]] = []

    def watch(model, images):
        if not model.training:  # validation forwards only
            seen.append({"weight": model.weight.detach().clone()})
            averages.append({"weight": trainer.ema.average["weight"].clone()})

    trainer.method.register_forward_pre_hook(watch)
    trainer.optimizer.register_step_post_hook(lambda *_: raws.append({"weight": trainer.method.weight.detach().clone()}))
    validation = [Batch(torch.randn(2, 4), torch.tensor([0, 1]), torch.arange(2), [])]
    trainer.fit(toy_batches(2), val_loader=validation)
    assert len(seen) == 2
    for forward, average in zip(seen, averages):
        assert torch.equal(forward["weight"], average["weight"])
    assert not torch.equal(seen[0]["weight"], raws[1]["weight"])  # epoch 1 validated the average, not the parameters


def test_trainer_state_restores_the_average_and_the_best_snapshot_exactly():
    """Stop mid-epoch, restore into a fresh trainer, finish: the same tensors as one uninterrupted fit."""
    settings = dict(epochs=3, keep="best", ema_decay=0.8)
    scores = [0.3, 0.9, 0.6]
    reference = toy_trainer(**settings)
    fit_scripted(reference, scores)

    first = toy_trainer(**settings)
    first.validate = lambda loader: scores[first.epoch]
    stops = iter([False] * 6 + [True])  # polled after every step and every epoch: stops after step 1 of epoch 3
    with pytest.raises(TrainingStopped):
        first.fit(toy_batches(2), val_loader=[], should_stop=lambda: next(stops, False))
    tensors, meta = first.state()
    assert {"ema.weight", "ema.bias", "best.weight", "best.bias"} <= tensors.keys() and meta["progress"]["step"] == 1
    meta = json.loads(json.dumps(meta))  # as a checkpoint stores it

    second = toy_trainer(**settings)
    second.restore(tensors, meta)
    torch.manual_seed(123)  # restore, not the global state, decides what happens next
    fit_scripted(second, scores)
    assert second.summary.kept_epoch == reference.summary.kept_epoch == 2
    assert_state_equal(second.method.learned_state(), reference.method.learned_state())


# --------------------------------------------------------------------------------------------- --recipe


def test_paper_recipe_settings_per_method_and_backbone():
    spt = METHODS["spt"]
    assert spt.recipe("default", None, None) == spt.defaults
    supervised = spt.recipe("paper", None, None)  # the default ViT: supervised IN-21k
    assert (supervised.optimizer, supervised.lr, supervised.epochs, supervised.warmup_epochs, supervised.warmup) == \
        ("adamw", 1e-3, 100, 10.0, "linear")
    assert (supervised.recipe, supervised.keep, supervised.ema_decay, supervised.decay_every_tensor) == \
        ("paper", "last", 0.0, False)
    for backbone, weights in [("vit_base_patch16_224.mae", None), ("vit_large_patch16_224", "mae"),
                              ("vit_base_patch16_224", "/models/mae_pretrain_vit_base.pth")]:
        mae = spt.recipe("paper", backbone, weights)
        assert mae.lr == 5e-2 and mae.epochs == 100 and mae.warmup_epochs == 10.0, (backbone, weights)
    assert METHODS["vpt"].recipe("paper", "vit_base_patch16_224.mae", None) == spt.recipe("paper", "vit_base_patch16_224.mae", None)

    sep = METHODS["sep"]
    paper = sep.recipe("paper", "ViT-B-16", "openai")
    assert paper.decay_every_tensor and paper.epochs == 50 and paper.recipe == "paper"
    differences = {name for name in vars(paper) if getattr(paper, name) != getattr(sep.defaults, name)}
    assert differences == {"decay_every_tensor", "recipe"}  # everything else already is the authors'

    with pytest.raises(MethodError, match=r"--recipe paper is defined for sep, spt, vpt; coop runs its defaults"):
        METHODS["coop"].recipe("paper", None, None)
    with pytest.raises(MethodError, match=r"Unknown --recipe 'papers'; choose one of: default, paper\."):
        spt.recipe("papers", None, None)
    assert set(RECIPES) == {"default", "paper"}


def test_tune_help_says_what_each_recipe_and_keep_choice_is():
    text = " ".join(CliRunner().invoke(app, ["tune", "--help"]).output.split())
    for name, description in RECIPES.items():
        assert f"{name}: {' '.join(description.split())}" in text
    assert "last (as both papers) or best" in text and "never an epoch that ends in the warm-up" in text
    assert "--ema-decay" in text


@pytest.mark.parametrize("backbone, weights, mae", [
    ("vit_base_patch16_224.mae", None, True),
    ("hf-hub:timm/vit_huge_patch14_224.mae", None, True),
    ("vit_base_patch16_224", "MAE_finetuned.safetensors", True),
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", None, False),
    ("vit_base_patch16_224", "/data/maestro/vit.safetensors", False),  # a folder name is not the file's name
    ("vit_base_patch16_224.dino", "samael.pth", False),
])
def test_mae_backbones_are_recognised_by_a_word_of_the_name_or_weights(backbone, weights, mae):
    assert is_mae_backbone(backbone, weights) is mae


def test_decay_every_tensor_puts_1d_tensors_in_the_decayed_group():
    toy = Toy()
    default = optimizer_groups(toy, TrainConfig(epochs=1, lr=0.1, weight_decay=0.5, batch_size=1))
    assert [(len(g["params"]), g["weight_decay"]) for g in default] == [(1, 0.5), (1, 0.0)]  # the bias is exempt
    every = optimizer_groups(toy, TrainConfig(epochs=1, lr=0.1, weight_decay=0.5, batch_size=1, decay_every_tensor=True))
    assert len(every) == 1 and every[0]["weight_decay"] == 0.5
    assert {id(p) for p in every[0]["params"]} == {id(toy.weight), id(toy.bias)}


# --------------------------------------------------------------------------------------------- through `tune`


def training_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["training"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_shape_folder(tmp_path_factory.mktemp("recipes") / "data", per_class=8, seed=5)


def _vit(vit_file: Path) -> dict[str, Any]:
    return dict(method="spt", backbone="test_vit", weights=str(vit_file), batch_size=4, workers=0, device="cpu",
                seed=2, options={"prompts_per_layer": 2})


def test_the_prompt_file_records_the_recipe_and_the_kept_epoch(folder, vit_file, clip_files, tmp_path):
    mae_weights = tmp_path / "mae-test_vit.safetensors"  # the same random weights, named as an MAE checkpoint
    shutil.copy(vit_file, mae_weights)
    result = tune(folder, out=tmp_path / "mae.safetensors", recipe="paper", epochs=2,
                  **{**_vit(vit_file), "weights": str(mae_weights)})
    training = training_metadata(result.path)
    assert {k: training[k] for k in ("recipe", "lr", "epochs", "warmup_epochs", "optimizer", "keep", "kept_epoch",
                                     "ema_decay", "decay_every_tensor")} == {
        "recipe": "paper", "lr": 5e-2, "epochs": 2, "warmup_epochs": 10.0, "optimizer": "adamw", "keep": "last",
        "kept_epoch": 2, "ema_decay": 0.0, "decay_every_tensor": False}  # --epochs overrides the recipe's 100
    assert training["kept"] == "the last epoch (--keep last)"

    result = tune(folder, out=tmp_path / "sep.safetensors", method="sep", backbone=str(clip_files[0]),
                  weights=str(clip_files[1]), shots=4, epochs=1, batch_size=4, workers=0, device="cpu",
                  recipe="paper", keep="best", ema_decay=0.99)
    training = training_metadata(result.path)
    assert {k: training[k] for k in ("recipe", "lr", "epochs", "optimizer", "keep", "ema_decay", "decay_every_tensor")} == {
        "recipe": "paper", "lr": 0.0025, "epochs": 1, "optimizer": "adam", "keep": "best", "ema_decay": 0.99,
        "decay_every_tensor": True}
    assert training["kept_epoch"] == 1


def test_resume_with_keep_best_and_the_average_equals_the_uninterrupted_run(folder, vit_file, tmp_path):
    options = dict(**_vit(vit_file), epochs=3, keep="best", ema_decay=0.9)
    options["options"] = {**options["options"], "init": "random"}
    reference = tune(folder, out=tmp_path / "reference.safetensors", **options)
    assert reference.val_images > 0 and reference.summary.best_val_acc is not None

    out = tmp_path / "prompts.safetensors"
    with pytest.raises(RunInterrupted):
        tune(folder, out=out, reporter=SignalAt(2, 2), **options)
    with pytest.raises(CheckpointError, match=r"--keep \(best in the checkpoint, last now\)"):
        tune(folder, out=out, resume=True, **{**options, "keep": "last"})
    with pytest.raises(CheckpointError, match=r"--ema-decay \(0.9 in the checkpoint, 0.5 now\)"):
        tune(folder, out=out, resume=True, **{**options, "ema_decay": 0.5})
    tune(folder, out=out, resume=True, **options)
    assert_same_result(reference.path, out)
    training = training_metadata(out)
    assert (training["keep"], training["kept_epoch"]) == ("best", reference.summary.kept_epoch)
