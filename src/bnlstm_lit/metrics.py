"""torchmetrics metrics of bnlstm_lit."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["BitsPerCharacter", "WeightedMean"]


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


class WeightedMean(Metric):
    """The mean of values weighted by counts (e.g. per-batch losses by batch size): ``sum(w v) / sum(w)``, both sums
    float64 and summed across DDP processes, so uneven shares per process give the one-process value. NaN propagates
    (a NaN loss must show). (torchmetrics' ``MeanMetric(nan_strategy="disable")`` drops the weights.)

    ``update(value, weight)``: a scalar tensor and its weight (a number or scalar tensor).
    """

    is_differentiable = False
    full_state_update = False

    total: Tensor
    weight: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: float | Tensor = 1.0) -> None:
        w = torch.as_tensor(weight, dtype=torch.float64, device=self.total.device)
        self.total += value.detach().to(torch.float64).sum() * w
        self.weight += w

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()
