"""CoOp: only the context learns, training works on the shapes, batching never changes an answer, open vocabulary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import promptune
from promptune.backbones import load_backbone
from promptune.data import decode_image, load_eval_data, load_training_data
from promptune.errors import MethodError
from promptune.methods.coop import CoOp, CoOpConfig
from promptune.methods.zeroshot import ZeroShotCLIP
from promptune.runtime import Runtime
from promptune.train import TrainConfig, Trainer
from promptune.train_images import training_loader
from conftest import assert_checkpointing_is_exact

PHRASE = "a photo of a"


@pytest.fixture(scope="module")
def backbone(clip_files):
    config, weights = clip_files
    return load_backbone(str(config), str(weights))


@pytest.fixture(scope="module")
def class_names(shape_folder) -> list[str]:
    return load_eval_data(shape_folder).class_names


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clip_files, shape_folder) -> Path:
    """CoOp tuned on the shapes.

    Settings measured on the tiny random CLIP: with the context started from "a photo of a", 20 epochs at CoOp's
    own lr (2e-3, SGD) reach 0.63-0.67 test top-1 for every seed tried (0-9), against 0.33-0.40 before training.
    A random-init context is seed-dependent (0.33-0.87), and lr ~1 blows the context up (norm in the thousands;
    the LayerNorm'd text tower then ignores its scale) and stays near chance.
    """
    config, weights = clip_files
    out = tmp_path_factory.mktemp("coop") / "coop.safetensors"
    promptune.tune(shape_folder, method="coop", backbone=str(config), weights=str(weights), epochs=20, lr=2e-3,
                   batch_size=12, workers=0, device="cpu", seed=0, out=out, options={"ctx_init": PHRASE})
    return out


@pytest.fixture()
def model(trained):
    return promptune.load(trained, device="cpu")


def test_images(model, folder: Path) -> torch.Tensor:
    return torch.stack([model.transform(decode_image(item.path)) for item in load_eval_data(folder).items])


test_images.__test__ = False  # a helper, not a test


# --------------------------------------------------------------------------------------------- what is learned


def test_a_training_step_changes_only_the_context(backbone, class_names, shape_folder):
    model = CoOp(backbone, class_names, CoOpConfig(n_ctx=4))
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["ctx"]
    assert list(model.learned_state()) == ["ctx"]
    frozen_before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    ctx_before = model.ctx.detach().clone()

    data = load_training_data(shape_folder, shots=4, seed=0)
    loader = training_loader(data.train, backbone.preprocess, 12, seed=0, workers=0)
    batch = next(iter(loader))
    cfg = TrainConfig(epochs=1, lr=0.01, weight_decay=5e-4, batch_size=12, warmup_epochs=0, optimizer="sgd")
    trainer = Trainer(model, cfg, Runtime(torch.device("cpu")), steps_per_epoch=1)
    model.train()
    loss, _ = trainer.train_step(batch.inputs(torch.device("cpu")), batch.labels)

    assert loss > 0
    assert model.ctx.grad is not None and model.ctx.grad.abs().sum() > 0
    assert not torch.equal(model.ctx.detach(), ctx_before)
    assert not backbone.model.training  # the frozen backbone stays in eval mode while the method trains
    for name, p in backbone.model.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
    frozen_after = backbone.model.state_dict()
    assert frozen_after.keys() == frozen_before.keys()
    for key, value in frozen_before.items():
        assert torch.equal(frozen_after[key], value), key


def test_training_beats_chance(model, shape_test_folder):
    report = model.evaluate(shape_test_folder, workers=0)
    assert report.n_images == 30
    assert report.top1 > 0.45, report.top1  # chance is 1/3
    assert report.top1 > report.zero_shot_top1 + 0.1  # the same prompt, untrained, is the zero-shot baseline


def test_training_summary_in_file(model):
    training = model.prompt_file.training
    assert training["epochs_run"] == 20
    assert training["final_train_loss"] < 1.05  # from ~4.3 with the untrained "a photo of a" context
    assert model.prompt_file.hparams == {"n_ctx": 4, "ctx_init": PHRASE}


# ------------------------------------------------------------------------------------------- batch independence


def test_single_image_logits_equal_its_row_in_a_batch(model, shape_test_folder):
    images = test_images(model, shape_test_folder)
    batched = model.logits(images)
    assert batched.shape == (30, 3)
    for index in (0, 7, 15, 29):
        single = model.logits(images[index : index + 1])
        torch.testing.assert_close(single[0], batched[index], atol=1e-5, rtol=0)


def test_predict_one_image_equals_batched_predict(model, shape_test_folder):
    batched, problems = model.predict([str(shape_test_folder)], top_k=3, batch_size=30, workers=0)
    assert problems == [] and len(batched) == 30
    for prediction in (batched[0], batched[13], batched[-1]):
        (single,), _ = model.predict([prediction.path], top_k=3, workers=0)
        assert single.labels == prediction.labels
        assert single.probabilities == pytest.approx(prediction.probabilities, abs=1e-5)


# ------------------------------------------------------------------------------------------------ open vocabulary


def test_new_class_names(model, shape_test_folder):
    images = test_images(model, shape_test_folder)[:6]
    assert model.set_classes(["cat", "dog"]) == ["cat", "dog"]
    two = model.logits(images)
    assert two.shape == (6, 2)
    # the context is class-independent: a class's column does not depend on which other classes are asked for
    model.set_classes(["dog", "red square", "cat"])
    three = model.logits(images)
    torch.testing.assert_close(three[:, [2, 0]], two, atol=1e-5, rtol=0)
    predictions, _ = model.predict([str(shape_test_folder / "red_square")], classes=["cat", "dog"], workers=0)
    assert all(set(p.labels) == {"cat", "dog"} for p in predictions)
    model.set_classes(None)
    assert model.logits(images).shape == (6, 3)


def test_class_names_too_long_for_the_text_context_are_named_once(model):
    long = " ".join(["word"] * 100)  # far beyond the 77-token context
    seen: list[str] = []
    model.on_warning = seen.append
    model.set_classes(["cat", long])
    model.set_classes(["cat", long])
    assert model.method.overlong_class_names() == [long]
    assert seen == ["class name 'word word word word word word word word ...' is too long for the text encoder and "
                    "is cut short in its text prompt."]
    model.set_classes(["cat", "dog"])
    assert model.method.overlong_class_names() == [] and len(seen) == 1
    model.set_classes(None)


def test_eval_and_predict_report_progress_over_every_image(model, shape_test_folder, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    seen: list[tuple[int, int]] = []
    model.on_progress = lambda images, total: seen.append((images, total))
    report = model.evaluate(shape_test_folder, batch_size=7, zero_shot=False, workers=0)
    assert sum(n for n, _ in seen) == report.n_images and {t for _, t in seen} == {report.n_images}
    seen.clear()
    paths = [str(shape_test_folder / "red_square"), str(broken)]
    predictions, problems = model.predict(paths, batch_size=4, workers=0)
    assert len(problems) == 1 and sum(n for n, _ in seen) == len(predictions) + 1  # the unreadable one counts too
    assert {t for _, t in seen} == {len(predictions) + 1}


def test_an_unreadable_image_is_decoded_once_and_its_reason_reported(model, shape_test_folder, tmp_path, monkeypatch):
    import promptune.data.loader  # where ImageDataset looks decode_image up

    folder = tmp_path / "test"
    shutil.copytree(shape_test_folder, folder)
    (folder / "red_square" / "broken.png").write_bytes(b"not a png")
    decoded: list[str] = []
    real_decode = promptune.data.loader.decode_image

    def counting(path):
        decoded.append(Path(path).name)
        return real_decode(path)

    monkeypatch.setattr(promptune.data.loader, "decode_image", counting)
    report = model.evaluate(folder, batch_size=5, zero_shot=False, workers=0)
    assert report.skip_reasons == {str(folder / "red_square" / "broken.png"): "not a recognised image format"}
    _, problems = model.predict([str(folder / "red_square" / "broken.png")], workers=0)
    assert problems == [f"{folder / 'red_square' / 'broken.png'}: unreadable image (not a recognised image format)."]
    assert decoded.count("broken.png") == 2  # once by evaluate, once by predict: never again to find out why


def test_text_features_are_cached_at_eval(model, shape_test_folder):
    method = model.method
    method.eval()
    with torch.no_grad():
        first = method.text_features()
        assert method.text_features() is first
    model.logits(test_images(model, shape_test_folder)[:2])
    with torch.no_grad():
        assert method.text_features() is first
    model.set_classes(["cat", "dog"])  # a new class list invalidates the cache
    with torch.no_grad():
        assert method.text_features() is not first and method.text_features().shape[0] == 2
    model.set_classes(None)
    with torch.no_grad():
        torch.testing.assert_close(method.text_features(), first, atol=0, rtol=0)


def test_text_features_are_recomputed_while_training(model):
    method = model.method
    method.train()
    a, b = method.text_features(), method.text_features()
    assert a is not b and a.requires_grad
    method.eval()


# --------------------------------------------------------------------------------------------------- configuration


def test_ctx_init_sets_n_ctx_and_the_phrase_embeddings(backbone, class_names):
    config = CoOp.make_config({"ctx_init": PHRASE})
    model = CoOp(backbone, class_names, config)
    assert model.n_ctx == 4 and model.hparams() == {"n_ctx": 4, "ctx_init": PHRASE}
    assert CoOp(backbone, class_names, CoOp.make_config({"ctx_init": PHRASE, "n_ctx": 4})).n_ctx == 4  # agrees
    for n_ctx in (16, 3):  # 16, the default when no phrase is given, is refused like any other mismatch
        with pytest.raises(MethodError, match=rf"--n-ctx {n_ctx} does not match --ctx-init 'a photo of a', which is 4 "):
            CoOp(backbone, class_names, CoOp.make_config({"ctx_init": PHRASE, "n_ctx": n_ctx}))
    plain = CoOp(backbone, class_names, CoOp.make_config({}))
    assert plain.n_ctx == 16 and plain.hparams() == {"n_ctx": 16, "ctx_init": ""}  # the file records the number
    tokens = backbone.tokenizer([PHRASE])
    assert int(tokens[0].argmax()) == 5  # [SOT] a photo of a [EOT]
    with torch.no_grad():
        expected = backbone.model.token_embedding(tokens)[0, 1:5]
    assert model.ctx.shape == expected.shape
    assert torch.equal(model.ctx.detach(), expected)


def test_ctx_init_starts_from_the_zero_shot_prompt(backbone, class_names):
    """'X X X X {name}.' with X = the phrase's embeddings is exactly 'a photo of a {name}.'."""
    model = CoOp(backbone, class_names, CoOp.make_config({"ctx_init": PHRASE})).eval()
    zero_shot = ZeroShotCLIP(backbone, class_names, [PHRASE + " {}."])
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(), zero_shot.text_features, atol=1e-5, rtol=0)


def test_random_init_context(backbone, class_names):
    torch.manual_seed(0)
    model = CoOp(backbone, class_names, CoOp.make_config({"n_ctx": 6}))
    assert model.ctx.shape == (6, 32) and model.ctx.requires_grad
    assert 0.005 < float(model.ctx.detach().std()) < 0.05


@pytest.mark.parametrize("options", [{"n_ctx": 0}, {"n_ctx": 65}, {"depth": "deep"}, {"n_ctx": "many"}, {"n_ctx": 2.5},
                                     {"ctx_init": 3}])
def test_bad_options(options):
    with pytest.raises(MethodError) as info:
        CoOp.make_config(options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("phrase", ["   ", " ".join(["word"] * 80)])
def test_bad_ctx_init(backbone, class_names, phrase):
    with pytest.raises(MethodError) as info:
        CoOp(backbone, class_names, CoOp.make_config({"ctx_init": phrase}))
    assert "--ctx-init" in str(info.value) and "\n" not in str(info.value)


def test_eval_mode_logits_have_no_grad(model, shape_test_folder):
    logits = model.logits(test_images(model, shape_test_folder)[:3])
    assert not logits.requires_grad
    assert torch.allclose(F.softmax(logits, -1).sum(-1), torch.ones(3))


def test_grad_checkpointing_gives_the_same_loss_and_gradients(backbone, class_names, checkpoint_calls):
    """The text tower's blocks are checkpointed; the context still gets the same gradient, the tower none."""
    torch.manual_seed(0)
    model = CoOp(backbone, class_names, CoOpConfig(n_ctx=4))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, backbone.preprocess.size, backbone.preprocess.size, generator=generator)
    labels = torch.arange(6) % len(class_names)
    blocks = len(backbone.model.transformer.resblocks)
    assert_checkpointing_is_exact(model, backbone.model, images, labels, checkpoint_calls, blocks)
