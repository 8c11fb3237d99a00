"""Whole-sequence tasks: classification (sequential / permuted MNIST) and regression (the adding problem).

Both read the last hidden state of a (BN-)LSTM (:class:`~bnlstm_lit.models.LastStateReadout`). The shared base,
:class:`SequenceTask`, owns what every task of this family has in common -- building the network from its typed
settings (``model.init_args.rnn``, the LightningCLI schema), the injected optimizer / LR scheduler, which statistics
evaluation uses, and one torchmetrics collection per split; subclasses only say what the loss and the metrics are.

Batches are ``(inputs, targets)`` or ``(inputs, targets, lengths)`` with inputs (B, T, input_size).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

from bnlstm_lit.models import LastStateReadout
from bnlstm_lit.nn import DEFAULTS, BNLSTMSettings
from bnlstm_lit.tasks.base import BNLSTMTask, EvalStatistics, SplitMetrics, check_sizes, rnn_settings


class SequenceTask(BNLSTMTask):
    """Base LightningModule of the sequence tasks.

    Args:
        input_size: features per step (linked from the DataModule by the CLI).
        output_size: classes, or regression targets (linked from the DataModule).
        max_steps: steps with their own BN statistics, the longest training sequence (linked from the DataModule).
        rnn: the (BN-)LSTM's settings, :class:`~bnlstm_lit.nn.BNLSTMSettings` (``model.init_args.rnn.hidden_size``,
            ``.normalize``, ``.gamma_init``, ...; defaults :data:`~bnlstm_lit.nn.DEFAULTS`: 100 units as for MNIST
            in the paper). The MNIST configs set ``momentum: 0.01`` (the original code's), ``recurrent_init:
            identity_g`` and, unpermuted, ``h0_noise_std: 0.1``; ``cell: tanh`` is the BN tanh RNN of Fig. 1.
        optimizer, lr_scheduler, eval_statistics, monitor: see :class:`~bnlstm_lit.tasks.BNLSTMTask`.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        max_steps: int,
        rnn: BNLSTMSettings = DEFAULTS,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_statistics: EvalStatistics = "population",
        monitor: str = "val/loss",
    ) -> None:
        settings = rnn_settings(rnn)
        check_sizes(input_size=input_size, output_size=output_size, max_steps=max_steps,
                    **{"rnn.hidden_size": settings.hidden_size})  # fmt: skip
        super().__init__(optimizer, lr_scheduler, eval_statistics, monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.use_rnn_settings(settings)
        self.net = LastStateReadout(input_size, output_size, max_steps, settings)
        # one metric object per split: their states must never mix (train accumulates while val runs).
        # Attributes, not ModuleDict keys: "train" would shadow nn.Module.train.
        self.train_metrics = self.make_metrics()
        self.val_metrics = self.make_metrics()
        self.test_metrics = self.make_metrics()

    # ---- what a subclass says ------------------------------------------------------------------------------------
    # (LightningModule is no ABC, so these raise instead of relying on @abstractmethod)
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Scalar training loss of the network's outputs (B, output_size)."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(outputs, targets)")

    def make_metrics(self) -> MetricCollection:
        """The metrics of one split, named without the split prefix (e.g. ``acc``): logged as ``{split}/acc``, and
        what a callback may monitor (:meth:`~bnlstm_lit.tasks.BNLSTMTask.monitorable_metrics`)."""
        raise NotImplementedError(f"{type(self).__name__} must define make_metrics()")

    def metric_inputs(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """What the metrics are updated with (by default the raw outputs and targets)."""
        return outputs, targets

    def split_metrics(self, split: str) -> SplitMetrics:
        metrics: MetricCollection = getattr(self, f"{split}_metrics")
        return metrics

    # ---- the network ------------------------------------------------------------------------------------------------
    def forward(self, inputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.net(inputs, lengths)

    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(inputs, targets[, lengths])`` -> inputs, targets, lengths (or None)."""
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError(
                "a batch must be a tuple (inputs, targets) or (inputs, targets, lengths), got "
                f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of {len(batch)}'}"
            )
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None

    def statistics_forward(self, batch: Any) -> None:
        """How :class:`~bnlstm_lit.callbacks.PopulationStatistics` runs a training batch through the network."""
        inputs, _, lengths = self.unpack(batch)
        self(inputs, lengths)

    # ---- steps ------------------------------------------------------------------------------------------------------
    def _shared_step(self, batch: Any, split: str) -> Tensor:
        inputs, targets, lengths = self.unpack(batch)
        outputs = self(inputs, lengths)
        loss = self.loss(outputs, targets)
        metrics: MetricCollection = getattr(self, f"{split}_metrics")
        metrics.update(*self.metric_inputs(outputs.detach(), targets))
        self.log_split(split, loss, len(targets))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        inputs, _, lengths = self.unpack(batch)
        return self(inputs, lengths)


class SequenceClassification(SequenceTask):
    """Cross-entropy on the last hidden state's logits; accuracy per split (``train/acc``, ``val/acc``, ``test/acc``).

    ``predict`` returns, per batch, a dict with the predicted class (B,) and the class probabilities (B, classes).
    """

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def make_metrics(self) -> MetricCollection:
        return MetricCollection({"acc": MulticlassAccuracy(num_classes=self.hparams["output_size"], average="micro")})

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        probs = super().predict_step(batch, batch_idx, dataloader_idx).softmax(dim=-1)
        return {"prediction": probs.argmax(dim=-1), "probabilities": probs}


class SequenceRegression(SequenceTask):
    """Mean squared error on the last hidden state's linear readout; ``{split}/mse`` per split.

    Targets are (B,) for one output or (B, output_size).
    """

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))

    def make_metrics(self) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError()})

    def metric_inputs(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return outputs.reshape(-1), targets.reshape(-1).to(outputs.dtype)
