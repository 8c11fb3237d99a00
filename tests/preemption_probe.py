"""Callbacks for the preemption tests: a run that sends itself SIGTERM at the end of a chosen training step, and a
population-statistics pass slowed down and announced by a marker file, so that a test can send SIGTERM during it.
Importable as ``preemption_probe`` when ``tests/`` is on ``PYTHONPATH``."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L


class TermAfter(L.Callback):
    """``kill -TERM`` this process at the end of training step ``step`` (once), as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and not trainer.received_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)


class _SlowBatches:
    """The training batches over and over, ``delay`` seconds apart; ``marker`` is written before the second."""

    def __init__(self, loader: Any, delay: float, marker: Path) -> None:
        self.loader, self.delay, self.marker = loader, delay, marker
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return 10**6

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(itertools.chain.from_iterable(itertools.repeat(self.loader))):
            if index == 1:
                self.marker.write_text(str(time.time()))
            yield batch
            time.sleep(self.delay)


class SlowStatisticsPass(L.Callback):
    """Make the DataModule's training loader, which the population-statistics pass reads, repeat its batches
    ``delay`` seconds apart, and write ``marker`` once the pass is under way (``setup`` runs before the pass, which
    comes with ``on_{validation,test,predict}_start``). When the run is stopped by an exception, the time is written
    to ``marker`` + ``.stopped``."""

    def __init__(self, marker: str, delay: float = 0.2) -> None:
        self.marker = Path(marker)
        self.delay = delay

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        train_dataloader = datamodule.train_dataloader
        datamodule.train_dataloader = lambda: _SlowBatches(train_dataloader(), self.delay, self.marker)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.marker.with_suffix(".stopped").write_text(f"{time.time()!r} {type(exception).__name__}")
