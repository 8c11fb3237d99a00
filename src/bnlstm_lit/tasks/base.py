"""What every bnlstm_lit task shares: the network's settings (one :class:`~bnlstm_lit.nn.BNLSTMSettings` group,
``model.init_args.rnn``), the injected optimizer / LR scheduler, the evaluation-statistics protocol, and the metric
names a task logs (declared once: what the steps log and what the CLI lets a callback monitor).

What a fit logs besides the steps' metrics:

* with an LR scheduler and a logger, the learning rate as ``train/lr`` (``train/lr/pg<N>`` per parameter group when
  there are several), by a :class:`~lightning.pytorch.callbacks.LearningRateMonitor` that
  :meth:`BNLSTMTask.configure_callbacks` adds unless the trainer has one;
* for TensorBoard, ``hp_metric`` -- the value the HPARAMS tab shows beside each run's hyper-parameters -- is the best
  value so far of the task's headline validation metric (:meth:`BNLSTMTask.headline_metric`), logged after each
  validation; Lightning's placeholder ``hp_metric = -1`` at the start is not written.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from bnlstm_lit.console import info
from bnlstm_lit.metrics import WeightedMean
from bnlstm_lit.nn import BNLSTMSettings, batchnorm_sites, set_eval_statistics

EvalStatistics = Literal["population", "batch"]
#: which way a metric improves; None where it is not known
Mode = Literal["min", "max"] | None
#: a split's metric objects by the name each is logged under (a MetricCollection is one)
SplitMetrics = Mapping[str, Metric] | MetricCollection

#: the splits a fit logs: the metrics of these are what a callback or an LR scheduler can monitor
FIT_SPLITS = ("train", "val")
#: every task logs its loss in every split, in training per step as well as per epoch (``train/loss_step``,
#: ``train/loss_epoch`` and ``train/loss``)
LOSS = "loss"
#: what the learning rate of the LR scheduler's optimizer is logged as (per parameter group: ``train/lr/pg2``, ...)
LR = "train/lr"
#: the metric TensorBoard's HPARAMS tab shows beside a run's hyper-parameters
HP_METRIC = "hp_metric"


def drop_hp_metric_placeholder(trainer: L.Trainer) -> list[TensorBoardLogger]:
    """Stop the trainer's TensorBoard loggers from writing Lightning's placeholder ``hp_metric = -1`` when the
    hyper-parameters are logged (at the start of every fit, validate, test or predict): returns those that would have.

    Call it before the trainer runs (or from ``on_fit_start``). A logger made with ``default_hp_metric=False`` is
    left alone: whoever made it logs ``hp_metric`` (and the HPARAMS entry) themselves."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger) and lg._default_hp_metric]
    for logger in loggers:
        logger._default_hp_metric = False
    return loggers


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

    With an LR scheduler and a logger a fit logs the learning rate as ``train/lr`` (:meth:`configure_callbacks`); for
    TensorBoard, ``hp_metric`` is the best value so far of :meth:`headline_metric` (:meth:`on_validation_end`).
    """

    #: the best headline value of this fit so far (``hp_metric``), kept in checkpoints so a resumed run continues it
    _hp_best: float | None = None
    #: the TensorBoard loggers whose ``hp_metric`` this task writes in the current fit
    _hp_loggers: tuple[TensorBoardLogger, ...] = ()
    _hp_declared: bool = False

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
        # the evaluation losses, weighted by batch size and summed over DDP ranks at the end of the epoch (Lightning's
        # sync_dist mean divides the summed batch count by the number of ranks in integers: wrong for the uneven
        # shares of an unpadded evaluation); NaN is kept, not dropped. No state in checkpoints.
        self.eval_losses = torch.nn.ModuleDict({split: WeightedMean() for split in ("val", "test")})

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
        if split in self.eval_losses:  # weighted by batch size, exact under DDP (the metric objects sync themselves)
            mean = self.eval_losses[split]
            assert isinstance(mean, WeightedMean)
            mean.update(loss.detach(), batch_size)
            self.log(f"{split}/{LOSS}", mean, on_step=False, on_epoch=True, prog_bar=True)
        else:
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

    # ---- what a fit logs besides the metrics ------------------------------------------------------------------------
    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """For a fit with an LR scheduler and a logger, a :class:`~lightning.pytorch.callbacks.LearningRateMonitor`
        (the rate as ``train/lr``), unless the trainer has one already (a callback returned here would replace it).
        Subclasses that add callbacks extend this list."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or self.lr_scheduler is None:
            return []
        if not trainer.loggers or any(isinstance(cb, LearningRateMonitor) for cb in getattr(trainer, "callbacks", [])):
            return []
        return [LearningRateMonitor()]

    def headline_metric(self) -> tuple[str, Mode]:
        """The metric that sums up a run, and which way it improves: what ``hp_metric`` shows.

        The ``monitor`` of the trainer's first ModelCheckpoint, with its ``mode`` (every shipped config keeps the
        best checkpoint by ``val/acc``, ``val/bpc``, ``val/error`` or ``val/mse``); without one, the first validation
        metric of :meth:`split_metrics` (its way from torchmetrics' ``higher_is_better``, None where that is not
        set: then the latest value is shown); else ``val/loss``, lower is better."""
        trainer = self._trainer
        for callback in trainer.checkpoint_callbacks if trainer is not None else []:
            if isinstance(callback, ModelCheckpoint) and callback.monitor:
                return callback.monitor, "min" if callback.mode == "min" else "max"
        first = next(iter((self.split_metrics("val") or {}).items()), None)
        if first is None:
            return f"val/{LOSS}", "min"
        name, metric = first
        better = getattr(metric, "higher_is_better", None)
        return f"val/{name}", None if better is None else ("max" if better else "min")

    def on_fit_start(self) -> None:
        self._hp_loggers = tuple(drop_hp_metric_placeholder(self.trainer))
        self._hp_declared = False

    def on_validation_end(self) -> None:
        """Log ``hp_metric`` to the TensorBoard loggers: the best value so far of :meth:`headline_metric` (the latest
        where its way is not known; a non-finite value never counts). The first one also writes the HPARAMS entry
        (the hyper-parameters with ``hp_metric``), which Lightning's placeholder would otherwise have written."""
        trainer = self.trainer
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or not self._hp_loggers:
            return
        name, mode = self.headline_metric()
        logged = trainer.callback_metrics.get(name)
        if logged is None or not math.isfinite(value := float(logged)):
            return
        if self._hp_best is not None and mode is not None:
            value = min(value, self._hp_best) if mode == "min" else max(value, self._hp_best)
        self._hp_best = value
        # the step Lightning logged this validation's metrics at (that of the last training batch)
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in self._hp_loggers:
            if self._hp_declared:
                logger.log_metrics({HP_METRIC: value}, step=step)
            else:  # the logger's hyper-parameters: what Lightning logged at the start (task and data)
                logger.log_hyperparams(logger.hparams, {HP_METRIC: value}, step=step)
        self._hp_declared = True

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
        checkpoint["bnlstm_hp_metric"] = self._hp_best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # applied at the first training batch after the restore: between checkpoint and that batch, an
        # uninterrupted run draws nothing (loaders have their own generators), while a resumed one may (sanity check)
        self._pending_rng = checkpoint.get("bnlstm_rng")
        best = checkpoint.get("bnlstm_hp_metric")
        self._hp_best = float(best) if isinstance(best, (int, float)) else None

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
        # "name": what LearningRateMonitor logs the rate as (by default lr-<optimizer class>)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor, "name": LR}}
