"""Writing what ``predict`` returns to disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Save the predictions of a ``predict`` run as one ``torch.save`` file.

    Each rank writes ``predictions.pt`` (``predictions-rank{r}.pt`` under DDP) in ``output_dir`` -- by default the
    run's log directory -- holding the per-batch outputs of ``predict_step`` concatenated along the batch axis
    (dicts key by key; lists, such as sampled texts, one after the other). The file is written to a temporary name
    and renamed into place, so an interrupted run never leaves a half-written file.

    Args:
        output_dir: folder for the file (created if needed); None: ``trainer.log_dir``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.last_path: Path | None = None

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = "predictions.pt" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.pt"
        path = folder / name
        tmp = path.with_name(f".{name}.part")
        try:
            torch.save(_concatenate(predictions, len(trainer.num_predict_batches) > 1), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # only left if saving failed
        self.last_path = path
        rank_zero_info(f"[bnlstm_lit] predictions written to {path}")


def _concatenate(batches: list[Any], several_dataloaders: bool) -> Any:
    """Per-batch outputs of ``predict`` -> one object with the batch axis concatenated (a list of such objects, one
    per dataloader, when there are several)."""
    return [_join(b) for b in batches] if several_dataloaders else _join(batches)


def _join(batches: list[Any]) -> Any:
    """Tensors are concatenated along dim 0, dicts key by key, lists (e.g. of sampled strings) one after the other."""
    if not batches:
        return batches
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {key: _join([b[key] for b in batches]) for key in first}
    if isinstance(first, list):
        return [item for batch in batches for item in batch]
    return batches
