"""promptune: adapt a frozen CLIP or ViT backbone to your own image classes by prompt tuning."""

__version__ = "0.1.0"
DISTRIBUTION = "promptune-vision"  # the PyPI name: `promptune` there is another project

from promptune.errors import PromptuneError  # noqa: E402


def __getattr__(name: str):
    """Keep `import promptune` light: the library entry points import torch only when first used."""
    if name in ("tune", "load", "TunedModel", "TuneResult", "EvalReport", "Prediction"):
        from promptune import api

        return getattr(api, name)
    raise AttributeError(f"module 'promptune' has no attribute {name!r}")


__all__ = ["__version__", "tune", "load", "TunedModel", "TuneResult", "EvalReport", "Prediction", "PromptuneError"]
