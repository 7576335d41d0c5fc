"""Zero-shot CLIP with hand-crafted templates: the baseline `eval` reports next to every CLIP method.

Several templates are averaged the usual CLIP way: each class's normalised text features under every template are
averaged and renormalised.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptune.backbones import Backbone
from promptune.methods.clip_common import clip_logits
from promptune.methods.clip_text import ClipTextRunner

DEFAULT_TEMPLATE = "a photo of a {}."


class ZeroShotCLIP(nn.Module):
    def __init__(self, backbone: Backbone, class_names: list[str],
                 templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> None:
        super().__init__()
        self.clip = backbone.model
        self.text = ClipTextRunner(backbone.model, backbone.tokenizer)
        self.templates = list(templates)
        self.set_classes(class_names)

    def set_classes(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        features = self.text.encode_templates(self.templates, self.class_names)
        self.register_buffer("text_features", features, persistent=False)  # (C, E)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.clip.encode_image(images), dim=-1)
        return clip_logits(self.clip, image, self.text_features)
