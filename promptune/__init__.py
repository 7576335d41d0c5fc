"""promptune: adapt a frozen CLIP or ViT backbone to your own image classes by prompt tuning."""

__version__ = "0.1.0"
