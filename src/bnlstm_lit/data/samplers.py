"""Evaluation under DDP without padding: :class:`EvaluationShard`, each example on exactly one rank.

Lightning's own DistributedSampler pads every rank's share to the same length by repeating examples, so validation
and test metrics under DDP count some examples twice. An :class:`EvaluationShard` is a DistributedSampler (Lightning
keeps one it is given) that shares an evaluation order out without repeats; ranks may read different numbers of
batches, which is safe because evaluation runs no per-batch collective: the metric objects and the ``sync_dist``
losses (logged per epoch only) are reduced once, at the end of the epoch, weighted by their counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import cast

from torch.utils.data import Dataset, DistributedSampler

__all__ = ["EvaluationShard", "shard_positions"]


def shard_positions(size: int, batch_size: int, num_replicas: int, rank: int) -> list[int]:
    """The positions in an evaluation order of ``size`` examples that ``rank`` of ``num_replicas`` reads.

    The order is cut into the batches one process would read, ``batch_size`` each (the last may be short); rank r
    reads batches r, r + W, r + 2W, ..., so every rank's batches are one-process batches (batch statistics, and a
    short last batch, are those of a one-process run). With fewer batches than ranks, rank r reads the r-th of W
    contiguous blocks of near-equal size instead, so that no rank is left without a batch (a rank with none would
    leave the others waiting in the first forward and in the end-of-epoch reduction); fewer examples than ranks
    raise a ValueError.
    """
    if size < num_replicas:
        raise ValueError(
            f"an evaluation split of {size} example{'s' if size != 1 else ''} cannot give each of {num_replicas} "
            "processes one; evaluate with fewer processes (trainer.devices) or a larger split"
        )
    if -(-size // batch_size) >= num_replicas:
        batches = range(rank * batch_size, size, num_replicas * batch_size)  # first position of each batch
        return [p for first in batches for p in range(first, min(first + batch_size, size))]
    return list(range(rank * size // num_replicas, (rank + 1) * size // num_replicas))


class EvaluationShard(DistributedSampler[int]):
    """Rank ``rank``'s share of the evaluation order ``order`` (a sampler or a sequence of dataset indices), unpadded:
    over the ranks every index of ``order`` is read exactly once, in whole one-process batches of ``batch_size``
    (:func:`shard_positions`). The order is read again at every iteration; an evaluation order must not change
    length.
    """

    def __init__(self, order: Iterable[int], batch_size: int, num_replicas: int, rank: int) -> None:
        if not isinstance(order, Sized):
            raise TypeError(f"an evaluation order must have a length, got {type(order).__name__}")
        super().__init__(cast(Dataset[int], range(len(order))), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.order = order
        self.batch_size = batch_size
        self.positions = shard_positions(len(order), batch_size, num_replicas, rank)
        self.num_samples = len(self.positions)  # this rank's count (DistributedSampler's padded count otherwise)
        self.total_size = len(order)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)
        if len(order) != self.total_size:
            raise RuntimeError(f"the evaluation order changed length: {len(order)} examples, {self.total_size} before")
        return iter([order[p] for p in self.positions])
