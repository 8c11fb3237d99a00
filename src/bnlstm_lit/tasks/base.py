"""What every bnlstm_lit task shares: the network's settings (one :class:`~bnlstm_lit.nn.BNLSTMSettings` group,
``model.init_args.rnn``), the injected optimizer / LR scheduler, the evaluation-statistics protocol, and the metric
names a task logs (declared once: what the steps log and what the CLI lets a callback monitor)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from bnlstm_lit.console import info
from bnlstm_lit.nn import BNLSTMSettings, batchnorm_sites, set_eval_statistics

EvalStatistics = Literal["population", "batch"]
#: a split's metric objects by the name each is logged under (a MetricCollection is one)
SplitMetrics = Mapping[str, Metric] | MetricCollection

#: the splits a fit logs: the metrics of these are what a callback or an LR scheduler can monitor
FIT_SPLITS = ("train", "val")
#: every task logs its loss in every split, in training per step as well as per epoch (``train/loss_step``,
#: ``train/loss_epoch`` and ``train/loss``)
LOSS = "loss"


def check_sizes(**sizes: int) -> None:
    """Raise a ValueError naming ``model.init_args.<name>`` for every size that is not positive."""
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"model.init_args.{name} must be positive, got {value}")


def rnn_settings(rnn: BNLSTMSettings | Mapping[str, Any]) -> BNLSTMSettings:
    """A task's ``rnn`` argument as settings: a :class:`~bnlstm_lit.nn.BNLSTMSettings` (copied: a default instance is
    never shared), or a mapping of its fields (what a checkpoint's hyper-parameters hold); fields not given keep the
    defaults of :data:`~bnlstm_lit.nn.DEFAULTS`."""
    if isinstance(rnn, BNLSTMSettings):
        return dataclasses.replace(rnn)
    if not isinstance(rnn, Mapping):
        raise TypeError(
            f"model.init_args.rnn must be BNLSTMSettings or a mapping of its fields, got {type(rnn).__name__}"
        )
    known = {field.name for field in dataclasses.fields(BNLSTMSettings)}
    unknown = sorted(set(rnn) - known)
    if unknown:
        raise ValueError(f"model.init_args.rnn: unknown settings {unknown}; the settings are {sorted(known)}")
    return BNLSTMSettings(**rnn)


class BNLSTMTask(L.LightningModule):
    """Base LightningModule: optimization and which statistics the BN sites use in validation, test and predict.

    Subclasses take the network's settings as one argument, ``rnn: BNLSTMSettings`` (their default instance states
    only what differs from :data:`~bnlstm_lit.nn.DEFAULTS`), call ``save_hyperparameters(ignore=["optimizer",
    "lr_scheduler"])`` and then :meth:`use_rnn_settings` in their own ``__init__``, build their network and metrics,
    say which metric objects each split logs (:meth:`split_metrics`, logged by :meth:`log_split`) and define the
    steps.

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

    def use_rnn_settings(self, rnn: BNLSTMSettings | Mapping[str, Any]) -> BNLSTMSettings:
        """Keep a subclass's ``rnn`` argument as :attr:`rnn_settings`, and as a plain dict in ``hparams["rnn"]`` (a
        checkpoint stays loadable weights-only; ``load_from_checkpoint`` passes the dict back). Call it after
        ``save_hyperparameters``."""
        settings = rnn_settings(rnn)
        self.rnn_settings = settings
        # the saved hyper-parameters and their initial copy (what the loggers write to hparams.yaml)
        for hparams in (self.hparams, getattr(self, "_hparams_initial", None)):
            if hparams is not None and "rnn" in hparams:
                hparams["rnn"] = dataclasses.asdict(settings)
        return settings

    # ---- the metrics a task logs ----------------------------------------------------------------------------------
    def split_metrics(self, split: str) -> SplitMetrics | None:
        """The metric objects of ``split`` ("train", "val", "test"), by the name each is logged under (without the
        split: ``{"acc": ...}`` is logged as ``val/acc``); None where a subclass does not say (its metric names are
        then unknown and not checked). :meth:`log_split` logs them, :meth:`monitorable_metrics` derives from them."""
        return None

    def log_split(self, split: str, loss: Tensor, batch_size: int) -> None:
        """Log the loss of a batch (``{split}/loss``; in training per step and per epoch) and every metric object of
        the split (``{split}/{name}``, per epoch): the names :meth:`monitorable_metrics` derives."""
        training = split == "train"
        # evaluation losses averaged over DDP ranks; the metric objects sync themselves
        self.log(f"{split}/{LOSS}", loss, on_step=training, on_epoch=True, prog_bar=True, batch_size=batch_size,
                 sync_dist=not training)  # fmt: skip
        metrics = self.split_metrics(split)
        for name, metric in (metrics or {}).items():
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, prog_bar=True)

    def monitorable_metrics(self) -> set[str] | None:
        """The metric names a fit of this task logs and a callback or scheduler may monitor (checked by the CLI
        before any data is downloaded or any step runs), derived from :meth:`split_metrics` as :meth:`log_split`
        logs them; None when a subclass cannot say (nothing is checked)."""
        names: set[str] = set()
        for split in FIT_SPLITS:
            metrics = self.split_metrics(split)
            if metrics is None:
                return None
            names |= {f"{split}/{name}" for name in (LOSS, *metrics)}
        return names | {f"train/{LOSS}_step", f"train/{LOSS}_epoch"}  # logged per step and per epoch

    # ---- evaluation statistics ---------------------------------------------------------------------------------------
    def _use_eval_statistics(self, stage: str) -> None:
        set_eval_statistics(self, self.eval_statistics)
        if batchnorm_sites(self) and not (stage == "validation" and self.trainer.sanity_checking):
            info(f"[bnlstm_lit] {stage} uses {self.eval_statistics} statistics in every BN site")

    def on_validation_start(self) -> None:
        self._use_eval_statistics("validation")

    def on_test_start(self) -> None:
        self._use_eval_statistics("test")

    def on_predict_start(self) -> None:
        self._use_eval_statistics("predict")

    # ---- exact resume: the global random state (h_0 noise, dropout) travels with the checkpoint ---------------------
    _pending_rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the random state this process will continue from (torch CPU, this process's CUDA device, Python's
        ``random``), as tensors and plain Python values so the checkpoint still loads ``weights_only``.

        Only the current CUDA device's generator: the one this process draws from (under DDP each process drives one
        device), and one a machine with fewer visible devices can restore (a state per visible device could not be).
        Under DDP the checkpoint is rank 0's, so every process resumes from rank 0's states (per-rank states are
        not saved yet)."""
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
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
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per device visible then
                cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)] if len(cuda) else None
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)  # the current device's generator

    # ---- optimization -----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor}}
