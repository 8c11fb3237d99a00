"""What every bnlstm_lit task shares: the injected optimizer / LR scheduler and the evaluation-statistics protocol."""

from __future__ import annotations

import random
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from bnlstm_lit.nn import batchnorm_sites, set_eval_statistics

EvalStatistics = Literal["population", "batch"]


def check_sizes(**sizes: int) -> None:
    """Raise a ValueError naming ``model.init_args.<name>`` for every size that is not positive."""
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"model.init_args.{name} must be positive, got {value}")


class BNLSTMTask(L.LightningModule):
    """Base LightningModule: optimization and which statistics the BN sites use in validation, test and predict.

    Subclasses build their network and metrics, call ``save_hyperparameters(ignore=["optimizer", "lr_scheduler"])``
    in their own ``__init__`` and define the steps.

    Args:
        optimizer: optimizer factory, injected by the CLI (``model.init_args.optimizer``).
        lr_scheduler: optional LR-scheduler factory; ReduceLROnPlateau monitors ``monitor``.
        eval_statistics: "population" (the paper's test protocol) or "batch": the statistics every BN site uses
            in validation, test and predict. The choice is logged at the start of each evaluation.
        monitor: the metric an LR scheduler such as ReduceLROnPlateau follows.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        eval_statistics: EvalStatistics,
        monitor: str,
    ) -> None:
        super().__init__()
        if eval_statistics not in ("population", "batch"):
            raise ValueError(
                f"model.init_args.eval_statistics must be 'population' or 'batch', got {eval_statistics!r}"
            )
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.eval_statistics = eval_statistics
        self.monitor = monitor

    def monitorable_metrics(self) -> set[str] | None:
        """The metric names a fit of this task logs and a callback or scheduler may monitor (checked by the CLI
        before any data is downloaded or any step runs); None when a subclass cannot say (nothing is checked)."""
        return None

    # ---- evaluation statistics ---------------------------------------------------------------------------------------
    def _use_eval_statistics(self, stage: str) -> None:
        set_eval_statistics(self, self.eval_statistics)
        if batchnorm_sites(self) and not (stage == "validation" and self.trainer.sanity_checking):
            rank_zero_info(f"[bnlstm_lit] {stage} uses {self.eval_statistics} statistics in every BN site")

    def on_validation_start(self) -> None:
        self._use_eval_statistics("validation")

    def on_test_start(self) -> None:
        self._use_eval_statistics("test")

    def on_predict_start(self) -> None:
        self._use_eval_statistics("predict")

    # ---- exact resume: the global random state (h_0 noise, dropout) travels with the checkpoint ---------------------
    _pending_rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the random state this process will continue from (torch CPU, CUDA devices, Python's ``random``), as
        tensors and plain Python values so the checkpoint still loads ``weights_only``."""
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["bnlstm_rng"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # applied at the first training batch after the restore: between checkpoint and that batch, an
        # uninterrupted run draws nothing (loaders have their own generators), while a resumed one may (sanity check)
        self._pending_rng = checkpoint.get("bnlstm_rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        state, self._pending_rng = self._pending_rng, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        python = state.get("python")
        if python is not None:  # (version, tuple of ints, gauss) -- lists after some serializations
            version, internal, gauss = python
            random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    # ---- optimization -----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor}}
