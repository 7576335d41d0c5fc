"""SEP's training step as promptune 0.1.0 computed it, written with torch's own modules.

Used by `test_sep_fusion.py` (the lean step must compute the same loss, logits and gradients) and by
`benchmarks/bench_tune.py --sep-reference` (both steps timed alternately in one process). Not collected by pytest.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch import nn

from promptune.methods import clip_image, clip_text
from promptune.methods.sep import SEP, QuickGELU, fusion_heads


class ReferenceTokenFusion(nn.Module):
    """The Token Fusion Module as promptune 0.1.0 computed it: nn.MultiheadAttention (batch_first), explicit gates."""

    def __init__(self, width: int, hidden: int, gate_init: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, fusion_heads(width), batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(fc=nn.Linear(width, hidden, bias=False), act=QuickGELU(), proj=nn.Linear(hidden, width, bias=False))
        )
        self.gate_1 = nn.Parameter(torch.tensor(float(gate_init)))
        self.gate_2 = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, prompts: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
        query, key = self.ln_1(prompts), self.ln_1(reps)
        attended = self.attn(query, key, key, need_weights=False)[0]
        h = self.gate_1 * reps + (1 - self.gate_1) * attended
        return self.gate_2 * h + (1 - self.gate_2) * self.mlp(self.ln_2(h))


def reference_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """promptune 0.1.0's token selection: top-k by x.float().pow(2).mean(-1), then gather."""
    with torch.no_grad():
        index = x.float().pow(2).mean(dim=-1).topk(k, dim=1).indices
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sharing_references(modules: nn.ModuleList) -> list[ReferenceTokenFusion]:
    """A reference module per fusion module, computing with that module's own parameter tensors (same names)."""
    references = []
    for module in modules:
        width, hidden = module.mlp.fc.weight.shape[1], module.mlp.fc.weight.shape[0]
        reference = ReferenceTokenFusion(width, hidden, 0.75).to(module.gate_1.device)
        shared = dict(module.named_parameters())
        assert shared.keys() == dict(reference.named_parameters()).keys()
        for name, parameter in shared.items():
            *path, leaf = name.split(".")
            owner = reference
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, leaf, parameter)
        references.append(reference)
    return references


def block_call(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """open_clip's residual block called as a module (nn.MultiheadAttention's own path)."""
    if batch_first:
        return block(x, attn_mask=mask)
    return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)


class PreviousImplementation:
    """promptune 0.1.0's step for `sep`: reference fusion modules over the same parameters, the previous token
    selection and splicing, and open_clip's blocks called as modules; `active()` swaps them in (built once)."""

    def __init__(self, sep: SEP) -> None:
        self.sep = sep
        self.text = sharing_references(sep.text_fusion)
        self.visual = sharing_references(sep.visual_fusion)

    def text_hook(self, index: int, x: torch.Tensor) -> torch.Tensor:
        slot = self.sep._text_slot.get(index)
        if slot is None:
            return x
        n = self.sep.n_ctx
        fused = self.text[slot](x[:, 1 : 1 + n], x[:, 1 + n : 1 + 2 * n])
        return torch.cat([x[:, :1], fused, x[:, 1 + n :]], dim=1)

    def visual_hook(self, index: int, x: torch.Tensor) -> torch.Tensor:
        slot = self.sep._visual_slot.get(index)
        if slot is None:
            return x
        n = self.sep.config.n_ctx_v
        reps = reference_select(x[:, :-n], n)
        return torch.cat([x[:, :-n], self.visual[slot](x[:, -n:], reps)], dim=1)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        patches: list[tuple[Any, str, Any]] = [
            (self.sep, "_text_hook", self.text_hook), (self.sep, "_visual_hook", self.visual_hook),
            (clip_image, "call_resblock", block_call), (clip_text, "call_resblock", block_call),
        ]
        saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
        for owner, name, value in patches:
            setattr(owner, name, value)
        try:
            yield
        finally:
            for owner, name, value in saved:
                if value is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)


def per_parameter_adam(groups: list[dict[str, Any]], lr: float, eps: float) -> torch.optim.Adam:
    """promptune 0.1.0's optimiser on CPU: torch's Adam with its per-parameter loop."""
    return torch.optim.Adam(groups, lr=lr, eps=eps, foreach=False, fused=False)
