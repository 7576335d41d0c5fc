"""Rotary tables for prompt tokens: rows of angle 0, so timm's rotary attention leaves the prompts unrotated."""

from __future__ import annotations

import torch


def with_identity_rotations(rope: torch.Tensor, count: int, first: bool) -> torch.Tensor:
    """timm's concatenated [sin | cos] table (..., N, 2d) -> (..., count + N, 2d), `count` angle-0 rows first or last.

    timm's rotary attention rotates every token after the prefix tokens: `x * cos + rotate(x) * sin`. A row of sin 0 and
    cos 1 returns its token unchanged, exactly, so the prompts carry no rotary position while every image token keeps
    the rotation timm gives it: `first` for prompts placed right after the prefix (SPT), last for prompts appended
    after the image tokens (SEP).
    """
    if count == 0:
        return rope
    half = rope.shape[-1] // 2
    shape = (*rope.shape[:-2], count, half)
    identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)
    return torch.cat([identity, rope] if first else [rope, identity], dim=-2)
