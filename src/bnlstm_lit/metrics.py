"""torchmetrics metrics of bnlstm_lit."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["BitsPerCharacter"]


class BitsPerCharacter(Metric):
    """Bits per character: the cross-entropy in base 2, averaged over every predicted symbol (token-weighted).

    The state is the sum of the per-symbol negative log-likelihoods (nats, float64) and the number of symbols, both
    summed across DDP processes, so the value over a split is the same whatever the batching or the number of
    processes: ``bpc = sum(nats) / count / ln 2``.

    ``update(logits, targets)``: logits (..., V), targets (...) int64 class ids of the same leading shape.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    nats: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, targets: Tensor) -> None:
        if logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"BitsPerCharacter: logits (..., V) and targets (...) must share their leading shape, got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
        self.nats += nats.to(torch.float64)
        self.count += targets.numel()

    def compute(self) -> Tensor:
        return (self.nats / self.count / math.log(2)).to(torch.float32)
