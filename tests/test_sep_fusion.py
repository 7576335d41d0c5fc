"""SEP's lean training step computes what the plain implementation computed.

The references (`sep_reference.py`) are written with torch's own modules: `nn.MultiheadAttention` for the Token Fusion
Module, the previous token selection and splicing, open_clip's residual blocks called as modules; the optimiser is
compared with torch's per-parameter loops.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from promptune.backbones import load_backbone
from promptune.methods import clip_common
from promptune.methods.clip_common import call_resblock
from promptune.methods.sep import SEP, FusionAttention, QuickGELU, TokenFusion, fusion_heads, select_tokens
from promptune.train import TrainConfig, build_optimizer
from sep_reference import PreviousImplementation, ReferenceTokenFusion, per_parameter_adam, reference_select


class OpNames(TorchDispatchMode):
    """The names of the aten ops dispatched while active, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def randomize(module: nn.Module, seed: int) -> None:
    """Move every learned parameter away from its initial value (gates off 0.75, biases off 0), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def fusion_inputs(n: int, k: int, width: int, seed: int) -> torch.Tensor:
    """A token sequence (n, 3 + 2k, width) whose slices feed the module, as the towers' hooks slice them."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3 + 2 * k, width, generator=generator) * 2).requires_grad_(True)


# ----------------------------------------------------------------------------------------------- Token Fusion Module


@pytest.mark.parametrize("width, hidden, n, k", [(32, 16, 5, 6), (128, 64, 3, 4), (192, 256, 2, 4), (80, 24, 4, 1)])
def test_token_fusion_equals_the_multihead_attention_reference(width, hidden, n, k):
    torch.manual_seed(3)
    new = TokenFusion(width, hidden, 0.75)
    torch.manual_seed(3)
    reference = ReferenceTokenFusion(width, hidden, 0.75)
    # Same parameter names, shapes and initial values from the same seed: old prompt files load as they are.
    assert new.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(new.state_dict()[name], value), name
    assert new.attn.heads == reference.attn.num_heads == fusion_heads(width)

    randomize(new, seed=width)
    reference.load_state_dict(new.state_dict())
    x_new, x_ref = fusion_inputs(n, k, width, seed=1), fusion_inputs(n, k, width, seed=1)
    # Non-contiguous slices of a longer sequence, as the text hook passes them.
    out_new = new(x_new[:, 1 : 1 + k], x_new[:, 1 + k : 1 + 2 * k])
    out_ref = reference(x_ref[:, 1 : 1 + k], x_ref[:, 1 + k : 1 + 2 * k])
    assert out_new.shape == (n, k, width)
    torch.testing.assert_close(out_new, out_ref, atol=1e-5, rtol=1e-5)

    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2))
    out_new.backward(upstream)
    out_ref.backward(upstream)
    torch.testing.assert_close(x_new.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    new_grads, ref_grads = grads(new), grads(reference)
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(new_grads[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_fusion_attention_is_cross_attention_over_each_inputs_own_context():
    torch.manual_seed(0)
    attention = FusionAttention(64, 2)
    reference = nn.MultiheadAttention(64, 2, batch_first=True)
    reference.load_state_dict(attention.state_dict())
    query, context = torch.randn(3, 5, 64), torch.randn(3, 7, 64)  # 5 queries over 7 context tokens
    expected = reference(query, context, context, need_weights=False)[0]
    torch.testing.assert_close(attention(query, context), expected, atol=1e-6, rtol=1e-5)
    alone = attention(query[1:2], context[1:2])  # no input sees another's context
    torch.testing.assert_close(alone[0], expected[1], atol=1e-6, rtol=1e-5)


def test_token_fusion_under_bf16_autocast_matches_the_reference():
    torch.manual_seed(0)
    new = TokenFusion(128, 64, 0.75)
    randomize(new, seed=1)
    reference = ReferenceTokenFusion(128, 64, 0.75)
    reference.load_state_dict(new.state_dict())
    x = fusion_inputs(4, 4, 128, seed=2).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_new = new(x[:, 1:5], x[:, 5:9])
        out_ref = reference(x[:, 1:5], x[:, 5:9])
    assert out_new.dtype == x.dtype  # the module returns its inputs' dtype
    torch.testing.assert_close(out_new.float(), out_ref.float(), atol=5e-2, rtol=5e-2)


def test_token_fusion_computes_in_fp32_under_autocast():
    """The TFM leaves autocast: the same fp32 result as without it, and not one dtype cast."""
    fusion = TokenFusion(128, 64, 0.75)
    randomize(fusion, seed=1)
    x = fusion_inputs(4, 4, 128, seed=2).detach()
    expected = fusion(x[:, 1:5], x[:, 5:9])
    with torch.autocast("cpu", dtype=torch.bfloat16), OpNames() as ops:
        out = fusion(x[:, 1:5], x[:, 5:9])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert ops.names and "_to_copy" not in ops.names
    half = fusion(x[:, 1:5].bfloat16(), x[:, 5:9].bfloat16())  # a low-precision token stream gets its dtype back
    assert half.dtype == torch.bfloat16


def test_token_selection_ranks_as_the_mean_square_did():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, 32, generator=generator) * torch.rand(6, 50, 1, generator=generator) * 3
    torch.testing.assert_close(select_tokens(x, 4), reference_select(x, 4), atol=0, rtol=0)
    half = x.to(torch.bfloat16)
    torch.testing.assert_close(select_tokens(half, 4), reference_select(half, 4), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ open_clip residual blocks


def _blocks(batch_first: bool, ls_init_value: float | None) -> list[nn.Module]:
    torch.manual_seed(0)
    blocks = [
        open_clip.transformer.ResidualAttentionBlock(64, 4, ls_init_value=ls_init_value, batch_first=batch_first),
        open_clip.transformer.ResidualAttentionBlock(64, 2, mlp_ratio=2.0, act_layer=QuickGELU, batch_first=batch_first),
    ]
    for block in blocks:
        randomize(block, seed=1)  # non-zero biases and layer scales
        block.eval().requires_grad_(False)
    return blocks


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_lean_resblock_equals_the_blocks_own_forward(batch_first, masked):
    causal = torch.full((9, 9), float("-inf")).triu(1) if masked else None  # open_clip's text mask
    for block in _blocks(batch_first, ls_init_value=0.5 if masked else None):
        x = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(4))
        lean_in, plain_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        lean = call_resblock(block, lean_in, causal, batch_first)
        if batch_first:
            plain = block(plain_in, attn_mask=causal)
        else:
            plain = block(plain_in.transpose(0, 1), attn_mask=causal).transpose(0, 1)
        torch.testing.assert_close(lean, plain, atol=1e-5, rtol=1e-5)
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        lean.backward(upstream)
        plain.backward(upstream)
        torch.testing.assert_close(lean_in.grad, plain_in.grad, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # no autograd: the block's own (fused fast-path) forward
            torch.testing.assert_close(call_resblock(block, x, causal, batch_first), plain.detach(), atol=1e-5, rtol=1e-5)


def test_lean_resblock_takes_a_per_input_mask_and_leaves_bool_masks_to_the_block():
    """CoCa's text tower passes an additive (N·heads, L, L) mask (causal + each input's padding)."""
    block = _blocks(True, None)[0]
    x = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(6))
    pad = torch.zeros(3, 1, 6, 6)
    pad[1, :, :, 4:] = float("-inf")  # input 1: its last two positions are padding
    mask = (torch.full((6, 6), float("-inf")).triu(1) + pad).expand(3, 4, 6, 6).reshape(12, 6, 6)
    lean_in, plain_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lean = call_resblock(block, lean_in, mask, True)
    plain = block(plain_in, attn_mask=mask)
    torch.testing.assert_close(lean, plain, atol=1e-5, rtol=1e-5)
    lean.sum().backward()
    plain.sum().backward()
    torch.testing.assert_close(lean_in.grad, plain_in.grad, atol=1e-5, rtol=1e-5)
    bool_mask = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = masked out, for nn.MultiheadAttention
    torch.testing.assert_close(call_resblock(block, lean_in, bool_mask, True), block(x, attn_mask=bool_mask),
                               atol=1e-5, rtol=1e-5)


def test_lean_resblock_takes_only_blocks_it_knows(monkeypatch):
    plain, custom = _blocks(True, None)[0], open_clip.transformer.CustomResidualAttentionBlock(64, 4)
    assert clip_common._is_plain_resblock(plain) and not clip_common._is_plain_resblock(custom)
    extra = copy.deepcopy(plain)
    extra.attn = nn.MultiheadAttention(64, 4, batch_first=True, add_bias_kv=True)
    assert not clip_common._is_plain_resblock(extra)
    calls = []
    monkeypatch.setattr(clip_common, "_lean_resblock", lambda *args: calls.append(args) or args[1])
    x = torch.randn(2, 5, 64, requires_grad=True)
    call_resblock(custom.eval(), x, None, True)
    call_resblock(plain, x.detach(), None, True)  # tokens without a gradient: the block's own fast path
    assert not calls
    call_resblock(plain, x, None, True)
    assert len(calls) == 1
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: True)  # CUDA autocast: no fused path to take
    call_resblock(plain, x.detach(), None, True)
    assert len(calls) == 2


def test_without_the_fused_path_a_no_grad_block_runs_lean_and_equal(monkeypatch):
    """With torch's MHA fast path off (as under CUDA autocast) nn.MultiheadAttention runs its generic path; the lean
    path gives the same tokens in fewer ops."""
    block = _blocks(True, None)[0]
    x = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    with torch.no_grad(), OpNames() as lean_ops:
        lean = call_resblock(block, x, None, True)
    with torch.no_grad(), OpNames() as generic_ops:
        generic = block(x)
    torch.testing.assert_close(lean, generic, atol=1e-5, rtol=1e-5)
    assert 0 < len(lean_ops.names) < len(generic_ops.names)


# --------------------------------------------------------------------------------------------------- the SEP model


@pytest.fixture(scope="module")
def backbone(clip_files):
    config_json, weights_file = clip_files
    return load_backbone(str(config_json), str(weights_file))


def loss_logits_grads(sep: SEP, images: torch.Tensor, labels: torch.Tensor):
    sep.train()
    sep.zero_grad(set_to_none=True)
    loss, logits = sep.training_loss(images, labels)
    loss.backward()
    learned = {name: p.grad.clone() for name, p in sep.named_parameters() if p.requires_grad}
    sep.eval()
    with torch.no_grad():
        eval_logits = sep(images)
    return loss.detach(), logits.detach(), learned, eval_logits


def test_sep_loss_logits_and_gradients_equal_the_previous_implementation(backbone):
    torch.manual_seed(0)
    sep = SEP(backbone, ["red square", "green circle", "blue triangle", "golden retriever"], SEP.make_config({}))
    randomize(sep, seed=7)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(5, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3, 1])
    new = loss_logits_grads(sep, images, labels)
    with PreviousImplementation(sep).active():
        old = loss_logits_grads(sep, images, labels)
    torch.testing.assert_close(new[0], old[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[1], old[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[3], old[3], atol=1e-5, rtol=1e-5)
    assert new[2].keys() == old[2].keys()
    for name, grad in old[2].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(new[2][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------------ optimiser


def _optimizers(name: str, eps: float, fused_groups: list, plain_groups: list):
    cfg = TrainConfig(epochs=1, lr=2.5e-3, weight_decay=5e-4, batch_size=4, optimizer=name, eps=eps)
    fused = build_optimizer(fused_groups, cfg)
    plain = {
        "adam": lambda: per_parameter_adam(plain_groups, lr=cfg.lr, eps=eps),
        "adamw": lambda: torch.optim.AdamW(plain_groups, lr=cfg.lr, eps=eps, foreach=False, fused=False),
        "sgd": lambda: torch.optim.SGD(plain_groups, lr=cfg.lr, momentum=0.9, foreach=False, fused=False),
    }[name]()
    return fused, plain


def _sep_pair(backbone) -> tuple[SEP, SEP]:
    torch.manual_seed(0)
    model = SEP(backbone, ["red square", "green circle", "blue triangle"], SEP.make_config({}))
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("name, eps", [("adam", 1e-3), ("adamw", 1e-8), ("sgd", 1e-8)])
def test_fused_optimizer_steps_equal_the_per_parameter_ones(backbone, name, eps):
    """Same gradients into both: the fused kernel applies the same update (with L2 or decoupled weight decay)."""
    fused_model, plain_model = _sep_pair(backbone)
    fused_groups, plain_groups = fused_model.param_groups(5e-4), plain_model.param_groups(5e-4)
    assert any(g["weight_decay"] > 0 for g in fused_groups) and any(g["weight_decay"] == 0 for g in fused_groups)
    fused, plain = _optimizers(name, eps, fused_groups, plain_groups)
    assert fused.defaults["fused"] is True  # CPU: one fused kernel per step
    initial = {key: p.detach().clone() for key, p in fused_model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        for fused_p, plain_p in zip(fused_model.parameters(), plain_model.parameters()):
            if fused_p.requires_grad:
                grad = torch.randn(fused_p.shape, generator=generator) * 0.01
                fused_p.grad, plain_p.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    for (key, value), (_, expected) in zip(fused_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        assert not value.requires_grad or not torch.equal(value, initial[key]), f"{key} did not move"


def test_sep_training_with_the_fused_adam_equals_the_per_parameter_adam(backbone):
    """SEP's own recipe (Adam, eps 1e-3, decay 5e-4 on matrices): three real training steps, same parameters after."""
    fused_model, plain_model = _sep_pair(backbone)
    fused, plain = _optimizers("adam", 1e-3, fused_model.param_groups(5e-4), plain_model.param_groups(5e-4))
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        images, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            model.training_loss(images, labels)[0].backward()
            optimizer.step()
    for (key, value), (_, expected) in zip(fused_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
