"""Reading comprehension on the CNN corpus (Cooijmans et al. 2017, Sec. 5.4): the Attentive Reader and its BN
variants, trained with cross-entropy over the document's candidate entities; accuracy and error per split."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection

from bnlstm_lit.data.cnn import QABatch
from bnlstm_lit.models.reader import READER_SETTINGS, Attention, AttentiveReader, Variant
from bnlstm_lit.nn import BNLSTMSettings
from bnlstm_lit.tasks.base import BNLSTMTask, EvalStatistics, SplitMetrics, check_sizes, rnn_settings


class ReadingComprehension(BNLSTMTask):
    """Cloze questions (:class:`~bnlstm_lit.data.CNNQuestions` batches): predict the answer entity.

    Logs ``{split}/loss``, ``{split}/acc`` and ``{split}/error`` (= 1 - acc; the paper reports error rates).
    ``predict`` returns ``{"example": (B,), "answer": (B,) predicted entity ids}``.

    Args:
        input_size: vocabulary size (linked from the DataModule).
        output_size: number of entity classes K (linked).
        max_steps: the longest training document: steps with their own BN statistics (linked).
        rnn: the encoders' settings (``rnn.hidden_size``: units per direction, 240 in the paper's setting; the
            variant decides ``normalize`` and ``input_statistics``): see :class:`~bnlstm_lit.models.AttentiveReader`.
        embedding_size: token embeddings (default: rnn.hidden_size).
        variant: "lstm", "bnlstm", "bn_everywhere", "bn_e_star" or "bn_e_star_star" (the paper's five).
        dropout, attention: see :class:`~bnlstm_lit.models.AttentiveReader`.
        optimizer, lr_scheduler, eval_statistics, monitor: see :class:`~bnlstm_lit.tasks.BNLSTMTask`.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        max_steps: int,
        rnn: BNLSTMSettings = READER_SETTINGS,
        embedding_size: int | None = None,
        variant: Variant = "bn_e_star_star",
        dropout: float = 0.0,
        attention: Attention = "additive",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_statistics: EvalStatistics = "population",
        monitor: str = "val/error",
    ) -> None:
        settings = rnn_settings(rnn)
        check_sizes(input_size=input_size, output_size=output_size, max_steps=max_steps,
                    **{"rnn.hidden_size": settings.hidden_size})  # fmt: skip
        super().__init__(optimizer, lr_scheduler, eval_statistics, monitor)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.use_rnn_settings(settings)
        self.net = AttentiveReader(
            input_size, output_size, max_steps, settings, embedding_size, variant, dropout, attention=attention
        )
        # per split (keys with a "_": "train" would shadow nn.Module.train) the fraction of questions answered right
        # and wrong (the paper reports error rates); no compute groups: the two would be merged whenever they agree
        self.accuracy = torch.nn.ModuleDict(
            {
                f"{split}_": MetricCollection({"acc": MeanMetric(), "error": MeanMetric()}, compute_groups=False)
                for split in ("train", "val", "test")
            }
        )

    def split_metrics(self, split: str) -> SplitMetrics:
        metrics = self.accuracy[f"{split}_"]
        assert isinstance(metrics, MetricCollection)
        return metrics

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
        metrics = self.split_metrics(split)
        metrics["acc"].update(correct)
        metrics["error"].update(1.0 - correct)
        self.log_split(split, loss, len(batch.answer))
        return loss

    def training_step(self, batch: QABatch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: QABatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: QABatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: QABatch, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return {"example": batch.example, "answer": self(batch).argmax(dim=1)}
