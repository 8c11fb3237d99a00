"""A callback for multi-process tests: each rank saves what it saw, for the parent test process to compare.

Importable as ``ddp_probe`` in the processes Lightning's DDP launcher starts when ``tests/`` is on ``PYTHONPATH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class BatchProbe(Callback):
    """Saves, per rank, the inputs of the first ``num_batches`` training batches and the final callback metrics to
    ``{output_dir}/rank{r}.pt``."""

    def __init__(self, output_dir: str, num_batches: int = 2) -> None:
        self.output_dir = Path(output_dir)
        self.num_batches = num_batches
        self.inputs: list[torch.Tensor] = []
        self.carry: list[bool] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if len(self.inputs) < self.num_batches:
            self.inputs.append(batch.inputs.detach().cpu())
            self.carry.append(bool(batch.carry))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        record = {"inputs": self.inputs, "carry": self.carry, "metrics": metrics, "world_size": trainer.world_size}
        torch.save(record, self.output_dir / f"rank{trainer.global_rank}.pt")
