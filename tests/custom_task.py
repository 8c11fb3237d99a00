"""A task and a DataModule defined outside the package, chosen through the CLI by ``class_path``.

``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path`` (rootdir / basedir insertion) and this module is
importable as ``custom_task``: ``--model=custom_task.ParityTask --data=custom_task.ToyParity``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from bnlstm_lit.data.base import SequenceDataModule
from bnlstm_lit.tasks import SequenceClassification


class ParityTask(SequenceClassification):
    """Sequence classification with label smoothing in the loss and a calibration metric (``{split}/ece``).

    Args:
        label_smoothing: the cross-entropy's label smoothing (0 = the plain loss of the base class).
        **kwargs: the arguments of :class:`~bnlstm_lit.tasks.SequenceTask`.
    """

    def __init__(self, label_smoothing: float = 0.1, **kwargs: Any) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.init_args.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing  # before super().__init__: nothing reads it there, but keep it simple
        super().__init__(**kwargs)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)

    def make_metrics(self) -> MetricCollection:
        classes = self.hparams["output_size"]
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=classes, average="micro"),
                "ece": MulticlassCalibrationError(num_classes=classes),
            }
        )


def parity_data(num_examples: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random bit strings and their parity.

    Inputs (N, T, 3) float32: one-hot bit in channels 0-1, channel 2 marks the last step. Targets (N,) int64.
    """
    bits = torch.randint(0, 2, (num_examples, seq_len), generator=generator)
    inputs = torch.cat([F.one_hot(bits, 2).float(), torch.zeros(num_examples, seq_len, 1)], dim=-1)
    inputs[:, -1, 2] = 1.0
    return inputs, bits.sum(dim=1) % 2


class ToyParity(SequenceDataModule):
    """Seeded parity of short bit strings: 3 input features, 2 classes, ``seq_len`` steps."""

    def __init__(self, seq_len: int = 5, size: int = 256, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        if seq_len < 1 or size < 2 or batch_size < 2:
            raise ValueError(f"ToyParity: bad arguments seq_len={seq_len}, size={size}, batch_size={batch_size}")
        self.seq_len, self.size, self.batch_size, self.seed = seq_len, size, batch_size, seed
        self.datasets: dict[str, TensorDataset] = {}

    @property
    def input_size(self) -> int:
        return 3

    @property
    def output_size(self) -> int:
        return 2

    @property
    def max_steps(self) -> int:
        return self.seq_len

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for offset, split in enumerate(("train", "val", "test")):
            generator = torch.Generator().manual_seed(self.seed * 10 + offset)
            self.datasets[split] = TensorDataset(*parity_data(self.size, self.seq_len, generator))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.datasets["train"], self.batch_size, shuffle=True, drop_last=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["test"], self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
