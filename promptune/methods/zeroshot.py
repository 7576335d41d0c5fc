"""Zero-shot CLIP with one hand-crafted template: the baseline `eval` reports next to every CLIP method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptune.backbones import Backbone
from promptune.data import prompt_name
from promptune.methods.clip_text import ClipTextRunner

DEFAULT_TEMPLATE = "a photo of a {}."


class ZeroShotCLIP(nn.Module):
    def __init__(self, backbone: Backbone, class_names: list[str], template: str = DEFAULT_TEMPLATE) -> None:
        super().__init__()
        self.clip = backbone.model
        self.text = ClipTextRunner(backbone.model, backbone.tokenizer)
        self.template = template
        self.set_classes(class_names)

    def set_classes(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        texts = [self.template.format(prompt_name(n)) for n in self.class_names]
        self.register_buffer("text_features", self.text.encode_texts(texts), persistent=False)  # (C, E)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.clip.encode_image(images), dim=-1)
        return self.clip.logit_scale.exp() * image @ self.text_features.t().to(image.dtype)
