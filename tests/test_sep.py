"""SEP on a tiny random CLIP: per-input fusion, the frozen branch, what trains, trimming, the prompt file, training."""

from __future__ import annotations

import copy
from pathlib import Path

import promptune
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from typer.testing import CliRunner

from conftest import TINY_CLIP_CONFIG, PrepareRecorder, assert_checkpointing_is_exact, make_clip_files, train_steps
from promptune.artifact import PromptFile, load_prompt_file, save_prompt_file
from promptune.backbones import load_backbone
from promptune.cli import app
from promptune.data import decode_image, load_eval_data, prompt_name
from promptune.errors import MethodError, PromptFileError
from promptune.methods import get_method
from promptune.methods.sep import SEP, select_tokens
from promptune.methods.zeroshot import ZeroShotCLIP
from promptune.runtime import Runtime

TRAINED = ["red_square", "green-circle", "blue_triangle"]
CPU = Runtime(torch.device("cpu"))
LONG_NAME = " ".join(["spotted"] * 20) + " dog"
CONTEXT_FILLING_NAME = " ".join(f"word{i}" for i in range(120))


@pytest.fixture(scope="module")
def backbone(clip_files):
    config_json, weights_file = clip_files
    return load_backbone(str(config_json), str(weights_file))


def make_sep(backbone, names=TRAINED, seed: int = 0, **options) -> SEP:
    torch.manual_seed(seed)
    return SEP(backbone, list(names), SEP.make_config(options))


def load_folder(root: Path, preprocess) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    transform = transforms.Compose(
        [
            transforms.Resize(preprocess.size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(preprocess.size),
            transforms.ToTensor(),
            transforms.Normalize(preprocess.mean, preprocess.std),
        ]
    )
    images, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).iterdir()):
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
            labels.append(label)
    return names, torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def train_set(backbone, shape_folder):
    return load_folder(shape_folder, backbone.preprocess)


@pytest.fixture(scope="module")
def test_set(backbone, shape_test_folder):
    return load_folder(shape_test_folder, backbone.preprocess)


class _Batch:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels


def batches(images: torch.Tensor, labels: torch.Tensor, size: int) -> list[_Batch]:
    return [_Batch(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def randomize_learned(sep: SEP, seed: int) -> None:
    """Move every learned tensor away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in sep.learned_state().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)


# ----------------------------------------------------------------------------------------------- per-input behaviour


def test_registry_and_defaults(backbone):
    assert get_method("sep") is SEP
    sep = make_sep(backbone)
    assert SEP.open_vocabulary and SEP.family == "clip"
    assert SEP.defaults.optimizer == "adam" and SEP.defaults.lr == 0.0025 and SEP.defaults.warmup == "constant"
    assert sep.text_layers == [1] and sep.visual_layers == [1]  # tiny CLIP: 2 blocks, fusion before all but block 0
    assert sep.ctx.shape == (6, 32) and sep.ctx_v.shape == (4, 64)
    assert sep.text_fusion[0].gate_1.item() == pytest.approx(0.75)
    assert sep.text_fusion[0].attn.heads == 1 and sep.visual_fusion[0].attn.heads == 1  # max(1, width // 64)


def test_image_logits_do_not_depend_on_the_batch(backbone, test_set):
    _, images, _ = test_set
    sep = make_sep(backbone)
    randomize_learned(sep, 1)
    sep.eval()
    with torch.no_grad():
        together = sep(images[:8])
        for i in range(8):
            alone = sep(images[i : i + 1])
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)
        reordered = sep(images[:8].flip(0))
    torch.testing.assert_close(reordered.flip(0), together, atol=1e-5, rtol=0)


def test_text_features_do_not_depend_on_the_other_classes(backbone):
    names = ["ox", "red_square", "golden-retriever", LONG_NAME]
    sep = make_sep(backbone)
    randomize_learned(sep, 2)
    sep.eval()
    with torch.no_grad():
        sep.set_classes(names)
        together = sep.text_features().clone()
        for i, name in enumerate(names):
            sep.set_classes([name])
            torch.testing.assert_close(sep.text_features()[0], together[i], atol=1e-5, rtol=0)


def test_token_selection_is_per_image():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 8) * 0.01
    wanted = [[5, 2], [7, 1], [0, 9]]  # each image's own high-energy tokens, largest first; CLS (0) may win
    for b, positions in enumerate(wanted):
        for rank, t in enumerate(positions):
            x[b, t] = (3.0 - rank) * torch.ones(8) * (1 if t % 2 else -1)  # sign must not matter
    picked = select_tokens(x, 2)
    assert picked.shape == (3, 2, 8)
    for b, positions in enumerate(wanted):
        torch.testing.assert_close(picked[b], x[b, positions], atol=0, rtol=0)
    alone = select_tokens(x[1:2], 2)  # the same picks without the other images
    torch.testing.assert_close(alone[0], picked[1], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ frozen branch


def test_frozen_branch_equals_open_clip(backbone, test_set):
    names, images, _ = test_set
    sep = make_sep(backbone, names)
    clip = backbone.model
    with torch.no_grad():
        reference_image = clip.encode_image(images[:6])
        torch.testing.assert_close(sep.frozen_image_features(images[:6]), F.normalize(reference_image, dim=-1), atol=1e-6, rtol=0)
        # The re-implemented image tower without prompts is plain CLIP.
        torch.testing.assert_close(sep.encode_image_prompted(images[:6], prompts=False), reference_image, atol=1e-6, rtol=0)
        texts = [f"a photo of a {prompt_name(n)}." for n in names]
        reference_text = F.normalize(clip.encode_text(backbone.tokenizer(texts)), dim=-1)
    torch.testing.assert_close(sep.template_features, reference_text, atol=1e-6, rtol=0)


TEMPLATES = ["a photo of a {}.", "a sketch of {}.", "a close-up photo of the {}."]


def test_several_templates_are_averaged_for_sep_and_zero_shot(backbone):
    """Per class: each template's normalised features, averaged, renormalised; for SEP and eval's zero-shot baseline."""
    sep = make_sep(backbone, template=TEMPLATES)
    per_template = []
    with torch.no_grad():
        for template in TEMPLATES:
            texts = [template.format(prompt_name(n)) for n in TRAINED]
            per_template.append(F.normalize(backbone.model.encode_text(backbone.tokenizer(texts)), dim=-1))
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    torch.testing.assert_close(sep.template_features, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(expected, per_template[0], atol=1e-3)  # averaging does change the features
    assert sep.zero_shot_templates() == TEMPLATES and sep.hparams()["template"] == TEMPLATES
    zero_shot = ZeroShotCLIP(backbone, TRAINED, sep.zero_shot_templates())
    torch.testing.assert_close(zero_shot.text_features, expected, atol=1e-6, rtol=0)
    single = make_sep(backbone)  # the default stays one plain string, as in every prompt file written before
    assert single.hparams()["template"] == "a photo of a {}." and single.zero_shot_templates() == ["a photo of a {}."]


def test_repeated_template_options_reach_the_prompt_file_and_the_eval_baseline(clip_files, shape_folder,
                                                                                shape_test_folder, tmp_path):
    config, weights = clip_files
    out = tmp_path / "sep.safetensors"
    arguments = ["tune", str(shape_folder), "--method", "sep", "--backbone", str(config), "--weights", str(weights),
                 "--epochs", "1", "--shots", "2", "--batch-size", "6", "--workers", "0", "--device", "cpu",
                 "--no-checkpoint", "--quiet", "--out", str(out)]
    for template in TEMPLATES[:2]:
        arguments += ["--template", template]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    model = promptune.load(out, device="cpu")
    assert model.prompt_file.hparams["template"] == TEMPLATES[:2]
    report = model.evaluate(shape_test_folder, workers=0)
    baseline = ZeroShotCLIP(model.backbone, report.class_names, TEMPLATES[:2])
    data = load_eval_data(shape_test_folder)
    pixels = torch.stack([model.transform(decode_image(item.path)) for item in data.items])
    labels = torch.tensor([item.label for item in data.items])
    expected = int((baseline(pixels).argmax(-1) == labels).sum()) / len(labels)
    assert report.zero_shot_top1 == pytest.approx(expected, abs=1e-9)


def test_template_is_configurable(backbone):
    sep = make_sep(backbone, template="a sketch of {}.")
    with torch.no_grad():
        reference = backbone.model.encode_text(backbone.tokenizer([f"a sketch of {prompt_name(n)}." for n in TRAINED]))
    torch.testing.assert_close(sep.template_features, F.normalize(reference, dim=-1), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- what trains


def test_optimizer_step_changes_only_the_learned_tensors(backbone, train_set):
    names, images, labels = train_set
    sep = make_sep(backbone, names)
    sep.prepare(batches(images, labels, 12), CPU, seed=0)
    backbone_before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    trainable = {name for name, p in sep.named_parameters() if p.requires_grad}
    assert trainable == set(sep.learned_state()) | {"prototypes"}
    before = {name: p.detach().clone() for name, p in sep.named_parameters() if p.requires_grad}

    sep.train()
    optimizer = torch.optim.Adam(sep.param_groups(5e-4), lr=1e-3)
    grouped = {id(p) for group in sep.param_groups(5e-4) for p in group["params"]}
    assert id(sep.prototypes) in grouped and grouped == {id(p) for p in sep.parameters() if p.requires_grad}
    loss, logits = sep.training_loss(images[::3], labels[::3])
    assert logits.shape == (len(images[::3]), 3) and torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    assert all(p.grad is None for p in backbone.model.parameters())
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, backbone_before[key]), f"backbone tensor {key} changed"
    changed = {name for name, p in sep.named_parameters() if p.requires_grad and not torch.equal(p, before[name])}
    assert {"ctx", "ctx_v", "prototypes"} <= changed
    for prefix, modules in (("text_fusion", sep.text_fusion), ("visual_fusion", sep.visual_fusion)):
        for i, module in enumerate(modules):
            for part in ("gate_1", "gate_2", "attn.in_proj_weight", "attn.out_proj.weight", "mlp.fc.weight", "mlp.proj.weight"):
                assert f"{prefix}.{i}.{part}" in changed


def test_learned_state_is_class_independent_and_excludes_the_backbone(backbone):
    sep = make_sep(backbone)
    state = sep.learned_state()
    assert "text_fusion.0.attn.in_proj_weight" in state and "visual_fusion.0.mlp.fc.weight" in state
    assert "prototypes" not in state
    backbone_ids = {id(p) for p in backbone.model.parameters()}
    assert not any(id(t) in backbone_ids for t in state.values())
    other = make_sep(backbone, ["a", "b", "c", "d", "e"])
    assert other.expected_shapes() == sep.expected_shapes()


def test_prepare_sets_prototypes_to_frozen_class_means(backbone, train_set):
    names, images, labels = train_set
    sep = make_sep(backbone, names)
    sep.prepare(batches(images, labels, 7), CPU, seed=0)
    with torch.no_grad():
        frozen = sep.frozen_image_features(images)
    for c in range(len(names)):
        mean = F.normalize(frozen[labels == c].mean(0), dim=-1)
        torch.testing.assert_close(sep.prototypes[c].detach(), mean, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- text trimming


def test_length_trimming_is_exact(backbone):
    sep = make_sep(backbone)
    randomize_learned(sep, 3)
    sep.eval()
    short = ["ox", "red_square"]
    mixed = ["ox", "red_square", LONG_NAME, CONTEXT_FILLING_NAME]
    with torch.no_grad():
        sep.set_classes(short)
        assert sep.text.needed_length(sep.prompts.tokens, 1 + 2 * sep.n_ctx) < 77  # trimming does trim
        torch.testing.assert_close(sep.encode_text_prompted(), sep.encode_text_prompted(length=77), atol=1e-5, rtol=0)
        sep.set_classes(mixed)
        assert int(sep.text.text_end(sep.prompts.tokens)[-1]) == 76  # the last name fills the context
        trimmed = F.normalize(sep.encode_text_prompted(), dim=-1)
        full = F.normalize(sep.encode_text_prompted(length=77), dim=-1)
        torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)
        sep.set_classes(short)
        torch.testing.assert_close(F.normalize(sep.encode_text_prompted(), dim=-1), full[:2], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------- prompt file


def test_prompt_file_round_trip(backbone, test_set, tmp_path):
    names, images, _ = test_set
    sep = make_sep(backbone, names, fusion_layers=[0, 1])
    randomize_learned(sep, 4)
    sep.eval()
    with torch.no_grad():
        expected = sep(images[:6])
    path = save_prompt_file(
        tmp_path / "sep.safetensors",
        PromptFile(
            tensors=dict(sep.learned_state()),
            method="sep",
            backbone=backbone.describe(),
            class_names=names,
            hparams=sep.hparams(),
            preprocess=backbone.preprocess.to_dict(),
        ),
    )
    stored = load_prompt_file(path)
    assert set(stored.tensors) == set(sep.learned_state())
    rebuilt = make_sep(backbone, stored.class_names, seed=99, **stored.hparams)
    rebuilt.load_learned_state(stored.tensors)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images[:6]), expected, atol=1e-6, rtol=0)

    wide_config = copy.deepcopy(TINY_CLIP_CONFIG)
    wide_config["vision_cfg"]["width"] = 96
    wide_config["text_cfg"]["width"] = 64
    wide = load_backbone(*map(str, make_clip_files(tmp_path / "wide", "wide-clip", wide_config)))
    other = make_sep(wide, stored.class_names, **stored.hparams)
    with pytest.raises(PromptFileError):
        other.load_learned_state(stored.tensors)


# ---------------------------------------------------------------------------------------------- classes and towers


def test_open_vocabulary_predicts_new_class_names(backbone, test_set):
    _, images, _ = test_set
    sep = make_sep(backbone, ["apple", "banana", "cherry"])
    sep.eval()
    with torch.no_grad():
        assert sep(images[:5]).shape == (5, 3)
        sep.set_classes(["dog", "elephant"])
        logits = sep(images[:5])
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()
    assert sep.template_features.shape[0] == 2


def test_non_vit_image_tower_is_refused(tmp_path):
    config = copy.deepcopy(TINY_CLIP_CONFIG)
    config["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}
    resnet = load_backbone(*map(str, make_clip_files(tmp_path, "tiny-rn", config)))
    with pytest.raises(MethodError, match="ModifiedResNet, which takes no extra tokens.*--method coop"):
        SEP(resnet, TRAINED, SEP.make_config({}))


@pytest.mark.parametrize(
    "options",
    [
        {"n_ctx": 0},
        {"n_ctx_v": 100},
        {"fusion_layers": []},
        {"fusion_layers": [1, 1]},
        {"fusion_layers": [-1]},
        {"template": "a photo"},
        {"template": []},
        {"template": ["a photo of a {}.", "a sketch"]},
        {"template": 3},
        {"text_weight": -1.0},
        {"proto_scale": 0},
        {"gate_init": 1.5},
        {"nonsense": 1},
    ],
)
def test_bad_options_are_one_sentence_errors(options):
    with pytest.raises(MethodError) as caught:
        SEP.make_config(options)
    message = str(caught.value)
    assert message.endswith(".") and "\n" not in message


def test_fusion_layers_beyond_the_towers_are_refused(backbone):
    with pytest.raises(MethodError, match="fusion_layers"):
        make_sep(backbone, fusion_layers=[1, 2])
    sep = make_sep(backbone, fusion_layers=[0])
    assert sep.text_layers == [0] and len(sep.visual_fusion) == 1


# ------------------------------------------------------------------------------------------------------- training


def accuracy(sep: SEP, images: torch.Tensor, labels: torch.Tensor) -> float:
    sep.eval()
    with torch.no_grad():
        return float((sep(images).argmax(-1) == labels).float().mean())


def test_training_beats_chance_and_the_untrained_start(backbone, train_set, test_set):
    names, images, labels = train_set
    test_names, test_images, test_labels = test_set
    assert test_names == names
    sep = make_sep(backbone, names)
    start = accuracy(sep, test_images, test_labels)
    sep.prepare(batches(images, labels, 12), CPU, seed=0)
    optimizer = torch.optim.Adam(sep.param_groups(5e-4), lr=5e-3)
    train_steps(sep, images, labels, optimizer, steps=80)
    final = accuracy(sep, test_images, test_labels)
    assert final > 1 / len(names) + 0.2, (start, final)
    assert final > start, (start, final)


# ------------------------------------------------------------------------------------------- gradient checkpointing


def test_grad_checkpointing_gives_the_same_loss_and_gradients(backbone, train_set, checkpoint_calls):
    """Both towers' blocks are checkpointed with their Token Fusion Modules inside; every learned tensor (ctx, ctx_v,
    every fusion parameter, the prototypes) still gets the same gradient."""
    names, images, labels = train_set
    sep = make_sep(backbone, names)
    sep.prepare(batches(images, labels, 12), CPU, seed=0)
    randomize_learned(sep, seed=1)
    blocks = len(backbone.model.visual.transformer.resblocks) + len(backbone.model.transformer.resblocks)
    assert_checkpointing_is_exact(sep, backbone.model, images[::4], labels[::4], checkpoint_calls, blocks)


def test_the_class_mean_pass_reports_its_progress_and_coop_has_none(clip_files, shape_folder, tmp_path):
    config, weights = clip_files
    for method, reads in (("sep", True), ("coop", False)):
        recorder, lines = PrepareRecorder(), []
        promptune.tune(shape_folder, method=method, backbone=str(config), weights=str(weights), epochs=1, shots=4,
                       batch_size=4, workers=0, device="cpu", out=tmp_path / f"{method}.safetensors", reporter=recorder,
                       log=lines.append, checkpoint=False)
        if not reads:
            assert recorder.events == []
            continue
        total = 4 * 3  # 4 shots x 3 classes
        steps = [n for kind, n in recorder.events if kind == "step"]
        assert recorder.events[0] == ("start", total) and recorder.events[-1] == ("end", 0) and sum(steps) == total
        assert f"initialising sep from {total} training images ..." in lines
