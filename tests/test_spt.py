"""SPT / VPT: prototype init, prompt placement, frozen backbone, batch independence, prompt file, a short training."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import promptune
import pytest
import timm
import torch
from torch import nn

from promptune.artifact import PromptFile, load_prompt_file, save_prompt_file
from promptune.backbones import Backbone, load_backbone
from promptune.data import (
    Batch, ImageDataset, ImageItem, Preprocess, build_transform, load_training_data, make_loader, scan_classes,
)
from promptune.errors import MethodError, PromptFileError
from promptune.methods import get_method
from promptune.methods.spt import SPT, VPT, TokenReservoir, pool_windows, window_index
from promptune.methods.vit_blocks import supports_span_skipping
from promptune.runtime import Runtime
from conftest import PrepareRecorder, assert_checkpointing_is_exact, loss_and_grads, make_shape_folder, make_vit_file, train_steps

CLASSES = ["a", "b", "c"]
CPU = Runtime(torch.device("cpu"))
PREPROCESS = Preprocess(size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def vit(vit_file: Path) -> Backbone:
    """test_vit (64-d, 6 blocks, CLS token, 'token' pool) through the user path: name + local weights file."""
    return load_backbone("test_vit", str(vit_file))


def wrap(model: nn.Module, name: str = "test_vit") -> Backbone:
    model.eval().requires_grad_(False)
    shape = {"embed_dim": int(getattr(model, "embed_dim", 0))}
    if hasattr(model, "blocks"):
        shape.update(depth=len(model.blocks), num_prefix_tokens=int(model.num_prefix_tokens))
    return Backbone(family="vit", name=name, weights=None, model=model, preprocess=PREPROCESS, shape=shape)


def timm_vit(name: str = "test_vit", seed: int = 0, **kwargs) -> Backbone:
    torch.manual_seed(seed)
    return wrap(timm.create_model(name, pretrained=False, num_classes=0, **kwargs), name)


def image_batches(count: int = 3, size: int = 4, pixels: int = 48, seed: int = 0) -> list[Batch]:
    """Batch-like objects of random images: 48 px -> 3x3 = 9 patch tokens for a patch-16 ViT."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        images = torch.randn(size, 3, pixels, pixels, generator=generator)
        labels = torch.randint(0, 3, (size,), generator=generator)
        indices = torch.arange(index * size, (index + 1) * size)
        batches.append(Batch(images=images, labels=labels, indices=indices, failed=[]))
    return batches


def spt(backbone: Backbone, seed: int = 0, cls: type[SPT] = SPT, **options) -> SPT:
    torch.manual_seed(seed)
    return cls(backbone, CLASSES, cls.make_config(options))


def prototype_sources(model: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    """Per layer, every token its prompts may start from, over all images, from timm's own forward_features: layer 0
    the patch embeddings (the output of `patch_embed`, before any position), layer i >= 1 the patch tokens entering
    block i."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = [model.patch_embed.register_forward_hook(lambda _m, _args, out: captured[0].append(out))]
    hooks += [
        block.register_forward_pre_hook(lambda _m, args, i=i: captured[i].append(args[0][:, model.num_prefix_tokens :]))
        for i, block in enumerate(model.blocks)
        if i > 0
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model.forward_features(batch.images)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat([part.reshape(-1, model.embed_dim) for part in parts]) for parts in captured]


def rows_in(rows: torch.Tensor, pool: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """For each row, whether it equals some row of `pool` (exactly when atol=0)."""
    if atol == 0.0:
        return (rows[:, None, :] == pool[None, :, :]).all(-1).any(1)
    return ((rows[:, None, :] - pool[None, :, :]).abs() <= atol).all(-1).any(1)


# ------------------------------------------------------------------------------------------------- token reservoir


def test_reservoir_never_holds_more_than_its_budget():
    reservoir = TokenReservoir(budget=50, seed=0)
    assert reservoir.max_held == 50
    stream = torch.arange(20 * 37, dtype=torch.float32)[:, None].repeat(1, 8)  # token t = (t, t, ..., t)
    for chunk in stream.split(37):
        reservoir.add(chunk)
        assert reservoir.held <= reservoir.max_held
        assert reservoir.nbytes <= 50 * 8 * 4
        assert reservoir.tokens().shape[0] <= 50
    assert reservoir.seen == 740 and reservoir.held == 50
    held = reservoir.tokens()[:, 0].long()
    assert len(set(held.tolist())) == 50  # without replacement
    assert bool(rows_in(reservoir.tokens(), stream).all())
    assert held.max() >= 50  # later tokens do get in


def test_small_stream_keeps_all_tokens_and_small_storage():
    reservoir = TokenReservoir(budget=16384, seed=0)
    reservoir.add(torch.randn(30, 4))
    assert reservoir.held == 30 and reservoir.nbytes <= 60 * 4 * 4


def test_reservoir_is_uniform_and_independent_of_batching():
    stream = torch.arange(100, dtype=torch.float32)[:, None]
    counts = torch.zeros(100)
    for seed in range(300):
        reservoir = TokenReservoir(budget=10, seed=seed)
        for chunk in stream.split(7):
            reservoir.add(chunk)
        counts[reservoir.tokens()[:, 0].long()] += 1
        if seed < 5:
            other = TokenReservoir(budget=10, seed=seed)
            for chunk in stream.split(33):
                other.add(chunk)
            assert torch.equal(other.tokens(), reservoir.tokens())
    assert counts.sum() == 3000
    assert abs(counts[:50].mean() - counts[50:].mean()) < 4  # each token kept with probability 0.1 (30 of 300)
    assert counts.min() > 10 and counts.max() < 55


def test_pool_windows_of_a_given_size_run_along_the_sequence_with_a_short_last_run():
    tokens = torch.arange(2 * 9 * 3, dtype=torch.float32).reshape(2, 9, 3)
    pooled = pool_windows(tokens, "mean", window=4)
    assert pooled.shape == (2, 3, 3)
    assert torch.equal(pooled[1, 2], tokens[1, 8])
    assert torch.allclose(pooled[0, 1], tokens[0, 4:8].mean(0))
    assert torch.equal(pool_windows(tokens, "max", window=4)[0, 0], tokens[0, 3])
    assert window_index(196, window=10).bincount().tolist() == [10] * 19 + [6]


@pytest.mark.parametrize("prompts", [5, 8, 20, 50])
def test_default_windows_are_p_contiguous_near_equal_runs_on_196_tokens(prompts):
    """The authors' count (P windows per image), without their exact-division bug: for P = 5, 8 and 50 their window
    196 // (P - 1) divides 196, and their last window `x[:, -0:]` is the whole sequence."""
    index = window_index(196, count=prompts)
    sizes = index.bincount()
    assert len(sizes) == prompts and int(sizes.sum()) == 196
    assert int(sizes.max()) - int(sizes.min()) <= 1  # near-equal, so no window is the whole sequence
    assert bool((index[1:] - index[:-1] >= 0).all())  # contiguous runs in sequence order
    tokens = torch.randn(2, 196, 4, dtype=torch.float64)
    for mode, reduce in (("mean", lambda run: run.mean(1)), ("max", lambda run: run.amax(1))):
        pooled = pool_windows(tokens, mode, count=prompts)
        assert pooled.shape == (2, prompts, 4)
        expected = torch.stack([reduce(tokens[:, index == w]) for w in range(prompts)], 1)
        torch.testing.assert_close(pooled, expected)
        assert not torch.allclose(pooled[:, -1], reduce(tokens))  # the last window is not the global pool


def test_more_windows_than_tokens_gives_one_window_per_token():
    tokens = torch.randn(1, 9, 4)
    assert torch.equal(pool_windows(tokens, "max", count=100), tokens)


# -------------------------------------------------------------------------------------------------- prototype init


@pytest.mark.parametrize("depth", ["deep", "shallow"])
def test_random_init_prompts_are_collected_layer_tokens(vit, depth):
    batches = image_batches()
    method = spt(vit, depth=depth, prompts_per_layer=5, init="random")
    method.prepare(batches, CPU, seed=0)
    layers = prototype_sources(vit.model, batches)
    assert method.prompts.shape == ((6 if depth == "deep" else 1), 5, 64)
    assert method.init_summary["images"] == 12 and method.init_summary["tokens_seen_per_layer"] == 12 * 9
    for layer, prompts in enumerate(method.prompts.detach()):
        assert bool(rows_in(prompts, layers[layer]).all()), f"layer {layer}"
        assert len({tuple(row.tolist()) for row in prompts}) == 5  # sampled without replacement
    if depth == "deep":  # layers really differ: layer 1 prompts are not layer 0 tokens
        assert not bool(rows_in(method.prompts[1].detach(), layers[0]).any())


@pytest.mark.parametrize("depth", ["deep", "shallow"])
def test_layer_zero_prototypes_are_patch_embeddings_without_position(depth):
    """Hand-built images of flat 16-px patches: each patch's embedding is value * sum(conv weight) + bias, and the
    positional embedding is shifted by +1, so layer-0 prompts must be those embeddings and no post-position token."""
    backbone = timm_vit()
    model = backbone.model
    with torch.no_grad():
        model.pos_embed.add_(1.0)
    values = torch.arange(18, dtype=torch.float32).reshape(2, 1, 3, 3) / 10 - 0.8  # (image, 1, patch row, patch col)
    images = values.repeat_interleave(16, 2).repeat_interleave(16, 3).expand(2, 3, 48, 48).contiguous()
    conv = model.patch_embed.proj
    expected = values.reshape(-1, 1) * conv.weight.sum((1, 2, 3)) + conv.bias  # (18 patches, D), by hand
    method = spt(backbone, depth=depth, prompts_per_layer=8, init="random")
    method.prepare([images], CPU, seed=0)
    prompts = method.prompts[0].detach()
    with torch.no_grad():
        positioned = model.norm_pre(model._pos_embed(model.patch_embed(images)))[:, 1:].reshape(-1, 64)
    assert bool(rows_in(prompts, expected, atol=1e-5).all())
    assert not bool(rows_in(prompts, positioned, atol=0.5).any())
    assert len({tuple(row.tolist()) for row in prompts}) == 8


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_pooled_init_prompts_are_pooled_windows(vit, mode):
    batches = image_batches()
    method = spt(vit, prompts_per_layer=6, init=mode, pool_window=4)
    method.prepare(batches, CPU, seed=1)
    assert method.hparams()["pool_window"] == 4
    for layer, tokens in enumerate(prototype_sources(vit.model, batches)):
        per_image = tokens.reshape(-1, 9, 64)
        windows = []
        for image in per_image:
            for start in (0, 4, 8):  # 9 tokens, windows of 4: [0:4], [4:8], [8:9]
                run = image[start : start + 4]
                windows.append(run.mean(0) if mode == "mean" else run.max(0).values)
        assert bool(rows_in(method.prompts[layer].detach(), torch.stack(windows), atol=1e-6).all()), f"layer {layer}"


def within_cluster_error(points: torch.Tensor, centres: torch.Tensor) -> float:
    return float(torch.cdist(points, centres).min(1).values.pow(2).sum())


def test_kmeans_init_has_lower_within_cluster_error_than_random(vit):
    batches = image_batches(count=4)
    layers = prototype_sources(vit.model, batches)
    centres = spt(vit, prompts_per_layer=6, init="kmeans", kmeans_iters=10)
    centres.prepare(batches, CPU, seed=0)
    sampled = spt(vit, prompts_per_layer=6, init="random")
    sampled.prepare(batches, CPU, seed=0)
    for layer, tokens in enumerate(layers):
        assert within_cluster_error(tokens, centres.prompts[layer].detach()) < within_cluster_error(
            tokens, sampled.prompts[layer].detach()
        ), f"layer {layer}"


@pytest.mark.parametrize("init", ["random", "mean", "kmeans"])
def test_same_seed_same_init_other_seed_other_init(vit, init):
    batches = image_batches()

    def prompts(seed: int) -> torch.Tensor:
        method = spt(vit, seed=seed, prompts_per_layer=4, init=init, kmeans_iters=3)
        method.prepare(batches, CPU, seed=seed)
        return method.prompts.detach().clone()

    first = prompts(3)
    assert torch.equal(first, prompts(3))
    assert not torch.equal(first, prompts(4))


def test_init_images_asks_the_run_for_a_seeded_subset(vit, shape_folder):
    method = spt(vit, prompts_per_layer=4, init_images=5)
    subset = method.prepare_subset(36, seed=0)
    assert subset == sorted(set(subset)) and len(subset) == 5 and all(0 <= i < 36 for i in subset)
    assert method.prepare_subset(36, seed=0) == subset and method.prepare_subset(36, seed=1) != subset
    assert method.prepare_subset(5, seed=0) is None and method.prepare_subset(3, seed=0) is None  # all images
    assert spt(vit, prompts_per_layer=4).prepare_subset(36, seed=0) is None  # init_images unset: all images
    assert spt(vit, cls=VPT, prompts_per_layer=4).prepare_subset(36, seed=0) is None  # VPT reads no image

    classes = scan_classes(shape_folder)
    items = [ImageItem(path, label) for label, name in enumerate(sorted(classes)) for path in classes[name]]
    chosen = [items[i] for i in method.prepare_subset(len(items), seed=0)]
    loader = make_loader(ImageDataset(chosen, build_transform(PREPROCESS, train=False)), 8, shuffle=False, workers=0)
    method.prepare(loader, CPU, seed=0)
    assert method.init_summary["images"] == 5 and method.init_summary["tokens_seen_per_layer"] == 5 * 9
    plain = spt(vit, prompts_per_layer=4, init_images=6)  # any other stream: the first 6 images in stream order
    plain.prepare(image_batches(), CPU, seed=0)
    assert plain.init_summary["images"] == 6


def test_too_few_tokens_for_the_prompts_is_one_clear_error(vit):
    method = spt(vit, depth="shallow", prompts_per_layer=100)
    with pytest.raises(MethodError, match="at least 100 tokens"):
        method.prepare(image_batches(count=1, size=2), CPU, seed=0)


def test_vpt_init_matches_the_xavier_bound_and_prepare_keeps_it(vit):
    method = spt(vit, cls=VPT, prompts_per_layer=40)
    bound = math.sqrt(6 / (3 * 16 * 16 + 64))
    values = method.prompts.detach()
    assert method.xavier_bound() == pytest.approx(bound)
    assert values.abs().max() <= bound
    assert float(values.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    before = values.clone()
    method.prepare(image_batches(), CPU, seed=0)
    assert torch.equal(method.prompts.detach(), before)
    assert method.hparams()["init"] == "xavier"


# --------------------------------------------------------------------------------------------- placement, pooling


def test_prompts_go_after_all_prefix_tokens():
    backbone = timm_vit(reg_tokens=2)  # CLS + 2 register tokens
    model = backbone.model
    assert model.num_prefix_tokens == 3
    method = spt(backbone, prompts_per_layer=4)
    images = image_batches(count=1)[0].images
    with torch.no_grad():
        plain = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        tokens = method.embed(images)
    assert tokens.shape == (4, 3 + 4 + 9, 64)
    assert torch.equal(tokens[:, :3], plain[:, :3])
    assert torch.equal(tokens[:, 3:7], method.prompts[0].detach().expand(4, -1, -1))
    assert torch.equal(tokens[:, 7:], plain[:, 3:])
    seen: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for block in model.blocks]
    with torch.no_grad():
        method.forward_features(images)
    for hook in hooks:
        hook.remove()
    for layer, block_input in enumerate(seen):  # deep: every block gets its own layer's prompts in the same place
        assert torch.equal(block_input[:, 3:7], method.prompts[layer].detach().expand(4, -1, -1))


@pytest.mark.parametrize(
    ("name", "kwargs", "pool"),
    [("test_vit", {}, "token"), ("test_vit", {"reg_tokens": 2}, "token"), ("test_vit2", {}, "avg")],
)
def test_zero_prompts_reproduce_timm_exactly(name, kwargs, pool):
    backbone = timm_vit(name, **kwargs)
    model = backbone.model
    assert model.global_pool == pool
    method = spt(backbone, prompts_per_layer=0)
    images = image_batches(count=1)[0].images
    with torch.no_grad():
        features = method.forward_features(images)
        expected = model.forward_features(images)
        assert torch.equal(features, expected)
        assert torch.equal(method.pool(features), model.forward_head(expected, pre_logits=True))


def test_avg_pool_averages_patch_tokens_without_prompts_or_prefix():
    backbone = timm_vit("test_vit2")  # 'avg' pool, 1 register token, no CLS, fc_norm after pooling
    model = backbone.model
    method = spt(backbone, prompts_per_layer=3)
    with torch.no_grad():
        features = method.forward_features(image_batches(count=1)[0].images)
        expected = model.fc_norm(features[:, model.num_prefix_tokens + 3 :].mean(1))
        assert torch.allclose(method.pool(features), expected, atol=1e-6)


@pytest.mark.parametrize(("name", "kwargs"), [("test_vit", {}), ("test_vit", {"reg_tokens": 2}), ("test_vit2", {})])
def test_deep_blocks_skip_the_prompt_outputs_and_agree_with_whole_blocks(name, kwargs):
    """Deep prompts' block outputs are discarded, so they are never computed; logits and gradients stay the same."""
    backbone = timm_vit(name, **kwargs)
    method = spt(backbone, prompts_per_layer=4)
    assert all(supports_span_skipping(block) for block in backbone.model.blocks)  # the fast path is the one tested
    batch = image_batches(count=1)[0]
    whole_calls: list[int] = []
    hooks = [block.register_forward_pre_hook(lambda *_: whole_calls.append(1)) for block in backbone.model.blocks]
    method.eval()
    with torch.no_grad():
        fast = method(batch.images)
        assert not whole_calls  # no block ran whole
        reference = method.head(method.pool(method.forward_features(batch.images)))
        method.skip_prompt_outputs = False
        whole = method(batch.images)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=0)
    loss_whole, grads_whole = loss_and_grads(method, batch.images, batch.labels, checkpointing=False)
    method.skip_prompt_outputs = True
    loss_fast, grads_fast = loss_and_grads(method, batch.images, batch.labels, checkpointing=False)
    torch.testing.assert_close(loss_fast, loss_whole, atol=1e-6, rtol=0)
    for key, grad in grads_whole.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(grads_fast[key], grad, atol=1e-6, rtol=1e-5)


def test_blocks_of_another_kind_run_whole():
    backbone = timm_vit()

    class CustomBlock(type(backbone.model.blocks[0])):
        pass

    block = backbone.model.blocks[0]
    block.__class__ = CustomBlock  # a subclass may change forward: no shortcut for it
    assert not supports_span_skipping(block)
    assert all(supports_span_skipping(other) for other in backbone.model.blocks[1:])
    method = spt(backbone, prompts_per_layer=4).eval()
    images = image_batches(count=1)[0].images
    with torch.no_grad():
        reference = method.head(method.pool(method.forward_features(images)))
        torch.testing.assert_close(method(images), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [SPT, VPT])
def test_a_non_vit_backbone_is_rejected(cls):
    backbone = timm_vit("test_resnet")
    with pytest.raises(MethodError, match=f"Method '{cls.name}' runs on timm's VisionTransformer and Eva.*ResNet"):
        cls(backbone, CLASSES, cls.make_config({}))


# ------------------------------------------------------------------------------------------- training invariants


def test_only_prompts_and_head_change_after_a_step(vit):
    method = spt(vit, prompts_per_layer=3)
    method.train()
    assert not vit.model.training
    frozen = {k: v.clone() for k, v in vit.model.state_dict().items()}
    learned = {k: v.clone() for k, v in method.learned_state().items()}
    optimizer = torch.optim.AdamW(method.param_groups(0.5), lr=1e-2)
    batch = image_batches(count=1)[0]
    loss, logits = method.training_loss(batch.images, batch.labels)
    assert logits.shape == (4, 3)
    loss.backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in vit.model.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in vit.model.state_dict().items())
    assert all(not torch.equal(v, learned[k]) for k, v in method.learned_state().items())
    assert {id(p) for p in method.parameters() if p.requires_grad} == {
        id(p) for group in method.param_groups(0.5) for p in group["params"]
    }


def test_param_groups_use_the_methods_own_decay(vit):
    method = spt(vit, head_weight_decay=2.0, prompt_weight_decay=0.01)
    groups = method.param_groups(weight_decay=0.5)
    assert [g["weight_decay"] for g in groups] == [0.01, 2.0, 0.0]
    assert groups[0]["params"][0] is method.prompts and groups[2]["params"][0] is method.head.bias


def test_an_image_alone_gets_the_logits_it_gets_in_a_batch(vit):
    method = spt(vit, prompts_per_layer=5)
    method.prepare(image_batches(), CPU, seed=0)
    images = image_batches(count=1, size=6, seed=9)[0].images
    with torch.no_grad():
        batched = method(images)
        for index in range(6):
            assert torch.allclose(method(images[index : index + 1])[0], batched[index], atol=1e-5)


# --------------------------------------------------------------------------------------------------- prompt file


def test_prompt_file_round_trip_and_wrong_backbone(vit, tmp_path):
    method = spt(vit, prompts_per_layer=5, init="mean")
    method.prepare(image_batches(), CPU, seed=0)
    with torch.no_grad():
        method.head.bias.add_(0.25)
    state = method.learned_state()
    assert set(state) == {"prompts", "head.weight", "head.bias"}
    record = PromptFile(
        tensors=state,
        method=method.name,
        backbone=vit.describe(),
        class_names=CLASSES,
        hparams=method.hparams(),
        preprocess=PREPROCESS.to_dict(),
    )
    path = save_prompt_file(tmp_path / "spt.safetensors", record)
    assert path.stat().st_size < 20_000  # learned tensors only, never the backbone
    loaded = load_prompt_file(path)
    assert loaded.hparams["prompts_per_layer"] == 5

    rebuilt = spt(vit, seed=123, **loaded.hparams)
    rebuilt.load_learned_state(loaded.tensors)
    images = image_batches(count=1, seed=5)[0].images
    with torch.no_grad():
        assert torch.equal(rebuilt(images), method(images))

    deeper = load_backbone("test_vit2", str(make_vit_file(tmp_path / "other", "test_vit2")))  # 8 blocks, not 6
    with pytest.raises(PromptFileError, match="another backbone"):
        spt(deeper, **{**loaded.hparams, "pool": None}).load_learned_state(loaded.tensors)  # test_vit2 has no CLS
    wider = timm_vit(embed_dim=96)
    with pytest.raises(PromptFileError, match="another backbone"):
        spt(wider, **loaded.hparams).load_learned_state(loaded.tensors)


# ------------------------------------------------------------------------------------------------------- config


def test_config_resolves_prompt_count_and_registry_names_the_classes(vit):
    assert get_method("spt") is SPT and get_method("vpt") is VPT
    assert spt(vit).hparams()["prompts_per_layer"] == 20
    shallow = spt(vit, depth="shallow")
    assert shallow.hparams()["prompts_per_layer"] == 100 and shallow.prompts.shape == (1, 100, 64)
    assert SPT.defaults.optimizer == "adamw" and SPT.defaults.lr == 1e-3 and not SPT.open_vocabulary
    with pytest.raises(MethodError, match="trained on"):
        shallow.set_classes(["x", "y"])


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (SPT, {"depth": "middle"}, "--depth"),
        (SPT, {"prompts_per_layer": -1}, "--prompts-per-layer"),
        (SPT, {"prompts_per_layer": 2.5}, "--prompts-per-layer"),
        (SPT, {"init": "xavier"}, "init"),
        (SPT, {"init_images": 0}, "--init-images"),
        (SPT, {"pool_window": 0}, "--pool-window"),
        (SPT, {"pool_window": 2.0}, "--pool-window"),
        (SPT, {"pool": "mean"}, "--pool must be one of token, avg"),
        (VPT, {"pool": "cls"}, "--pool"),
        (SPT, {"kmeans_iters": True}, "kmeans_iters"),
        (SPT, {"reservoir_size": 10}, "reservoir_size"),
        (SPT, {"head_weight_decay": -1.0}, "head_weight_decay"),
        (SPT, {"prompt_weight_decay": float("nan")}, "prompt_weight_decay"),
        (SPT, {"colour": 1}, "no option"),
        (VPT, {"init": "random"}, "init"),
        (VPT, {"pool_window": 4}, "no option"),
    ],
)
def test_bad_options_are_one_sentence_errors(cls, options, message):
    with pytest.raises(MethodError, match=message):
        cls.make_config(options)


# ------------------------------------------------------------------------------------------------------ learning


def test_short_spt_training_beats_chance_on_held_out_images(vit, tmp_path):
    train_root = make_shape_folder(tmp_path / "train", per_class=16, seed=1)
    test_root = make_shape_folder(tmp_path / "test", per_class=10, seed=2)
    preprocess = dataclasses.replace(vit.preprocess, size=48)
    transform = build_transform(preprocess, train=False)

    def load(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        classes = scan_classes(root)
        items = [ImageItem(path, label) for label, name in enumerate(sorted(classes)) for path in classes[name]]
        dataset = ImageDataset(items, transform)
        images, labels, _, _ = zip(*(dataset[i] for i in range(len(dataset))))
        return torch.stack(images), torch.tensor(labels)

    train_images, train_labels = load(train_root)
    test_images, test_labels = load(test_root)
    method = spt(vit, prompts_per_layer=4)
    batches = [
        Batch(train_images[i : i + 12], train_labels[i : i + 12], torch.arange(i, i + 12), []) for i in range(0, 48, 12)
    ]
    method.prepare(batches, CPU, seed=0)
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2)
    train_steps(method, train_images, train_labels, optimizer, steps=60)
    method.eval()
    with torch.no_grad():
        accuracy = float((method(test_images).argmax(1) == test_labels).float().mean())
    assert accuracy > 0.5, accuracy


# ------------------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("cls, depth", [(SPT, "deep"), (SPT, "shallow"), (VPT, "deep")])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(vit, checkpoint_calls, cls, depth):
    method = spt(vit, cls=cls, depth=depth, prompts_per_layer=3)
    assert not method.grad_checkpointing
    batch = image_batches(count=1)[0]
    assert_checkpointing_is_exact(method, vit.model, batch.images, batch.labels, checkpoint_calls, len(vit.model.blocks))


def test_grad_checkpointing_skips_a_linear_probe(vit, checkpoint_calls):
    """With no prompts nothing inside the blocks learns, so there is nothing to checkpoint."""
    method = spt(vit, prompts_per_layer=0)
    batch = image_batches(count=1)[0]
    loss_off, grads_off = loss_and_grads(method, batch.images, batch.labels, checkpointing=False)
    loss_on, grads_on = loss_and_grads(method, batch.images, batch.labels, checkpointing=True)
    assert not checkpoint_calls and torch.equal(loss_on, loss_off)
    assert grads_off["head.weight"] is not None and grads_off["prompts"] is None  # the empty prompt tensor is unused
    assert all(grads_on[k] is None if v is None else torch.equal(grads_on[k], v) for k, v in grads_off.items())


# ------------------------------------------------------------------------------------------- prepare progress


@pytest.mark.parametrize(("method", "options", "expected"), [
    ("spt", {}, "all"), ("spt", {"init_images": 5}, 5), ("vpt", {}, 0),
])
def test_the_prototype_pass_reports_its_progress(vit_file, shape_folder, tmp_path, method, options, expected):
    recorder = PrepareRecorder()
    lines: list[str] = []
    promptune.tune(shape_folder, method=method, backbone="test_vit", weights=str(vit_file), epochs=1, batch_size=4,
                   workers=0, device="cpu", out=tmp_path / "p.safetensors", options=options, reporter=recorder,
                   log=lines.append, checkpoint=False)
    available = len(load_training_data(shape_folder, shots=None).train)
    total = available if expected == "all" else expected
    if total == 0:
        assert recorder.events == [] and not any("initialising" in line for line in lines)
        return
    assert recorder.events[0] == ("start", total) and recorder.events[-1] == ("end", 0)
    steps = [n for kind, n in recorder.events if kind == "step"]
    assert sum(steps) == total and all(0 < n <= 4 for n in steps)
    assert f"initialising {method} from {total} training images ..." in lines
