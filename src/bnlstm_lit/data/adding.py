"""The adding problem (Hochreiter & Schmidhuber 1997), generated on the fly: no download, runs anywhere.

Each example is a sequence of T steps with two input channels: a value drawn uniformly from [0, 1], and a marker
that is 1 at exactly two steps (one in the first half of the sequence, one in the second) and 0 elsewhere. The
target is the sum of the two marked values. Predicting the mean, 1.0, gives a mean squared error of 1/6 ≈ 0.167
(the variance of a sum of two U(0, 1)); a model that solves the task goes far below it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from bnlstm_lit.data.base import EpochShuffle, SequenceDataModule, loader_generator

#: MSE of always predicting the mean target 1.0: Var(U1 + U2) = 2/12.
CHANCE_MSE = 1.0 / 6.0


def adding_problem(num_examples: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``num_examples`` sequences: inputs (N, T, 2) float32 (value, marker), targets (N,) float32."""
    if seq_len < 2:
        raise ValueError(f"the adding problem needs seq_len >= 2 (one marker in each half), got {seq_len}")
    values = torch.rand(num_examples, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (num_examples,), generator=generator)
    second = torch.randint(half, seq_len, (num_examples,), generator=generator)
    markers = torch.zeros(num_examples, seq_len)
    rows = torch.arange(num_examples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), targets


class AddingProblem(SequenceDataModule):
    """Seeded, synthetic adding-problem data; every split is its own fixed sample.

    Args:
        seq_len: T, steps per sequence (also ``max_steps``).
        train_size / val_size / test_size: examples per split.
        batch_size: examples per batch (at least 2: batch statistics need two sequences).
        num_workers: DataLoader worker processes.
        seed: the data seed; the same seed gives the same splits on every machine.
    """

    def __init__(
        self,
        seq_len: int = 50,
        train_size: int = 20000,
        val_size: int = 1000,
        test_size: int = 1000,
        batch_size: int = 50,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("seq_len", seq_len, 2),
            ("train_size", train_size, 2),
            ("val_size", val_size, 1),
            ("test_size", test_size, 1),
            ("batch_size", batch_size, 2),
            ("num_workers", num_workers, 0),
        ):
            if value < minimum:
                raise ValueError(f"data.init_args.{name} must be at least {minimum}, got {value}")
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, TensorDataset] = {}

    @property
    def input_size(self) -> int:
        return 2

    @property
    def output_size(self) -> int:
        return 1

    @property
    def max_steps(self) -> int:
        return self.seq_len

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return  # idempotent: the splits are fixed by the seed
        for offset, (split, size) in enumerate(self.sizes.items()):
            generator = torch.Generator().manual_seed(self.seed * 1000 + offset)  # one stream per split
            self.datasets[split] = TensorDataset(*adding_problem(size, self.seq_len, generator))

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"AddingProblem.setup() must run before the {split} dataloader is requested")
        sampler = None
        if shuffle:  # training: the order of epoch e from (seed, e), resumable mid-epoch
            sampler = EpochShuffle(len(self.datasets[split]), self.seed)
            self.prepare_train_sampler(sampler, self.batch_size)
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=shuffle,  # no size-1 tail batch in training (batch statistics need two sequences)
            num_workers=self.num_workers,
            generator=loader_generator(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
