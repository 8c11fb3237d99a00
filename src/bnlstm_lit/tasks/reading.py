"""Reading comprehension on the CNN corpus (Cooijmans et al. 2017, Sec. 5.4): the Attentive Reader and its BN
variants, trained with cross-entropy over the document's candidate entities; accuracy and error per split."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from bnlstm_lit.data.cnn import QABatch
from bnlstm_lit.models.reader import Attention, AttentiveReader, Variant
from bnlstm_lit.nn.cell import GammaInit
from bnlstm_lit.tasks.base import BNLSTMTask, EvalStatistics, check_sizes


class ReadingComprehension(BNLSTMTask):
    """Cloze questions (:class:`~bnlstm_lit.data.CNNQuestions` batches): predict the answer entity.

    Logs ``{split}/loss``, ``{split}/acc`` and ``{split}/error`` (= 1 - acc; the paper reports error rates).
    ``predict`` returns ``{"example": (B,), "answer": (B,) predicted entity ids}``.

    Args:
        input_size: vocabulary size (linked from the DataModule).
        output_size: number of entity classes K (linked).
        max_steps: the longest training document: steps with their own BN statistics (linked).
        hidden_size: LSTM units per direction (240 in the paper's setting).
        embedding_size: token embeddings (default: hidden_size).
        variant: "lstm", "bnlstm", "bn_everywhere", "bn_e_star" or "bn_e_star_star" (the paper's five).
        gamma_init, momentum, dropout, attention: see :class:`~bnlstm_lit.models.AttentiveReader`.
        optimizer, lr_scheduler, eval_statistics, monitor: see :class:`~bnlstm_lit.tasks.BNLSTMTask`.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        max_steps: int,
        hidden_size: int = 240,
        embedding_size: int | None = None,
        variant: Variant = "bn_e_star_star",
        gamma_init: GammaInit = 0.1,
        momentum: float | None = 0.1,
        dropout: float = 0.0,
        attention: Attention = "additive",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_statistics: EvalStatistics = "population",
        monitor: str = "val/error",
    ) -> None:
        check_sizes(input_size=input_size, output_size=output_size, max_steps=max_steps, hidden_size=hidden_size)
        super().__init__(optimizer, lr_scheduler, eval_statistics, monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = AttentiveReader(
            input_size, output_size, max_steps, hidden_size, embedding_size, variant, gamma_init, momentum, dropout,
            attention=attention,
        )  # fmt: skip
        self.accuracy = torch.nn.ModuleDict({split: MeanMetric() for split in ("train_", "val_", "test_")})

    def monitorable_metrics(self) -> set[str]:
        names = {"loss", "acc", "error"}
        return {f"{split}/{name}" for split in ("train", "val") for name in names} | {
            "train/loss_step",
            "train/loss_epoch",
        }

    def forward(self, batch: QABatch) -> Tensor:
        logits, _ = self.net(batch.context, batch.context_lengths, batch.query, batch.query_lengths, batch.candidates)
        return logits

    def statistics_forward(self, batch: QABatch) -> None:
        """How :class:`~bnlstm_lit.callbacks.PopulationStatistics` runs a training batch through the network."""
        self(batch)

    def _step(self, batch: QABatch, split: str) -> Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch.answer)
        correct = (logits.argmax(dim=1) == batch.answer).float()
        metric = self.accuracy[f"{split}_"]
        assert isinstance(metric, MeanMetric)
        metric.update(correct)
        training = split == "train"
        size = len(batch.answer)
        self.log(f"{split}/loss", loss, on_step=training, on_epoch=True, prog_bar=True, batch_size=size,
                 sync_dist=not training)  # fmt: skip
        self.log(f"{split}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/error", 1.0 - correct.mean(), on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        return loss

    def training_step(self, batch: QABatch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: QABatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: QABatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: QABatch, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return {"example": batch.example, "answer": self(batch).argmax(dim=1)}
