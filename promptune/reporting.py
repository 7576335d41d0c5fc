"""What `tune` tells its caller while it works; torch-free, so the CLI can subclass it without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from promptune.train import EpochStats


class Reporter(Protocol):
    def prepare_start(self, images: int) -> None: ...
    def prepare_step(self, images: int) -> None: ...
    def prepare_end(self) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float, acc: float, images_per_s: float) -> None: ...
    def epoch_end(self, stats: EpochStats) -> None: ...


class SilentReporter:
    """Every event ignored; subclass it and override the events you care about."""

    def prepare_start(self, images: int) -> None:
        pass

    def prepare_step(self, images: int) -> None:
        pass

    def prepare_end(self) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, loss: float, acc: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, stats: EpochStats) -> None:
        pass
