"""Batch normalization with separate statistics for every time step (Cooijmans et al. 2017, §3-4).

One :class:`SequenceBatchNorm` is one "BN site" of the recurrent network (the input term W_x x_t, the recurrent term
W_h h_{t-1}, or the cell c_t). Its scale γ (and shift β, where the site has one) is shared over time; its statistics
are not: training normalizes step t with the current minibatch's mean and *biased* variance at step t, and evaluation
uses population statistics kept per step in one ``(max_steps, C)`` tensor per statistic. Steps ``t >= max_steps`` reuse
the statistics of step ``max_steps - 1`` (Cooijmans et al. 2017, §4), which is what lets a model trained on
length-T sequences run on longer ones.

Padding: an optional boolean mask (True = real position) excludes padded positions from every mean and variance.
Rule for a step where fewer than two sequences are real (only possible with a mask): the batch variance is undefined
(or zero), so that step is normalized with the population statistics of that step, and it does not update them.

Distributed training: by default each process normalizes with the statistics of its own batch. With
``sync_statistics`` (:func:`set_sync_statistics`) the per-step counts, sums and squared deviations are all-reduced in
training, so every process normalizes over the global batch -- the same numbers as one process with the whole batch
-- and gradients flow through the reduction (``torch.distributed.nn``). The running statistics are then identical on
every process as well.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

EvalStatistics = Literal["population", "batch"]

CONSTANT_VARIANCE = 1e-2
"""A channel whose population variance at a step is below ``CONSTANT_VARIANCE * ε`` is normalized to β in evaluation.

Training normalizes with the batch's own statistics, β + γ (x - μ_B) / sqrt(σ_B² + ε). Where a channel is (almost)
the same for every sequence at a step -- the recurrent term W_h h_0 at t = 0 (the learned h_0 is shared), an input
position that always holds the same token, and the terms computed from those -- x - μ_B is of the order of σ_B, so
below this threshold training's output was β to within 0.1 γ (exactly β where the rows are identical). Its population
variance is then ≈ 0, and the population formula divides x - μ by ≈ sqrt(ε): the running mean, an average over
weights the optimizer has since moved, lags the current term, and γ / sqrt(ε) (≈ 300 γ at ε = 1e-5) turns that lag
into a large, wrong activation. So such a channel is given an infinite variance: every normalization with population
statistics (``F.batch_norm``, :meth:`SequenceBatchNorm.normalize_with`, the scale 0 and shift β of
:meth:`SequenceBatchNorm.affine` that the fused paths fold into their steps) returns β for it, the function training
computed, whatever the mean. This is the statistics' side, so it holds for any cause of a constant channel, on every
implementation, for running averages and estimated statistics alike, with no new buffer; a channel with a larger
variance is normalized exactly as before. (Not updating the running statistics at steps of zero batch variance would
leave the mean as stale as it was; folding W_h h_0 into the bias would cure t = 0 of the recurrent term only.)
"""


class SequenceBatchNorm(nn.Module):
    r"""Per-time-step batch normalization of a ``(B, C)`` step or a whole ``(T, B, C)`` sequence.

    .. math:: \mathrm{BN}_t(x; \gamma, \beta) = \beta + \gamma \odot (x - \mu_t) / \sqrt{\sigma_t^2 + \epsilon}

    Args:
        num_features: C, the size of the normalized axis.
        max_steps: T_max, how many steps keep their own population statistics (the longest training sequence).
        eps: ε added to the variance.
        momentum: rate of the running average of the per-step batch statistics kept during training:
            ``running = (1 - r) * running + r * batch`` with ``r = max(momentum, 1/n)``, n the number of batches
            that reached the step since the last :meth:`reset_running_stats`. So the average starts as the plain
            average of the batches seen (no bias toward the initial mean 0 / variance 1, which at rate 0.01 would
            still weigh 13% after 200 steps and make early validation meaningless) and becomes the usual
            exponential average once n > 1/momentum. ``None`` keeps the plain average for ever -- the paper's
            estimation protocol.
        affine: learn the scale γ (initialized to ``gamma_init``).
        bias: learn the shift β (initialized to 0). The BN-LSTM's input and recurrent terms have none: the LSTM
            bias does that job, and an unused parameter would break DDP.
        gamma_init: initial γ; 0.1 in the paper (1.0 makes gradients vanish through time, ≤ 0.01 is unstable).
        shared_over_time: one mean and variance per feature over every real (t, b) position of the batch instead of
            per step (the paper's BN-e* input term): the buffers have one row, ``max_steps`` is not a limit.

    Buffers (saved in checkpoints):
        ``running_mean``, ``running_var``: (max_steps, C) population mean and biased variance per step.
        ``num_batches_tracked``: (max_steps,) how many batches contributed to each step's statistics.

    Attributes:
        eval_statistics: ``"population"`` (default) or ``"batch"``: which statistics evaluation mode uses. Set it for
            a whole model with :func:`set_eval_statistics`.
        sync_statistics: in training under ``torch.distributed`` with more than one process, compute the per-step
            statistics over the global batch (all-reduced counts, sums and squared deviations; two collectives per
            call). Set it for a whole model with :func:`set_sync_statistics`. Evaluation with batch statistics stays
            per process (evaluation loaders may differ in length between processes).
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        bias: bool = True,
        gamma_init: float = 0.1,
        shared_over_time: bool = False,
    ) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"SequenceBatchNorm: num_features must be positive, got {num_features}")
        if max_steps <= 0:
            raise ValueError(f"SequenceBatchNorm: max_steps must be positive, got {max_steps}")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"SequenceBatchNorm: momentum must be in (0, 1] or None, got {momentum}")
        if eps <= 0:
            raise ValueError(f"SequenceBatchNorm: eps must be positive, got {eps}")
        self.num_features = num_features
        self.shared_over_time = shared_over_time
        max_steps = 1 if shared_over_time else max_steps
        self.max_steps = max_steps
        self.eps = eps
        self.momentum = momentum
        self.gamma_init = gamma_init
        self.eval_statistics: EvalStatistics = "population"
        self.sync_statistics = False
        # pending running-statistics updates while inside deferred_statistics_updates() (None: apply at once)
        self._deferred: list[tuple[int, Tensor, Tensor, Tensor | None]] | None = None
        self.weight = nn.Parameter(torch.empty(num_features)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features)) if bias else None
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features))
        self.register_buffer("running_var", torch.ones(max_steps, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(max_steps, dtype=torch.long))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Population statistics back to mean 0, variance 1, no batch tracked."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_steps={self.max_steps}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.weight is not None}, bias={self.bias is not None}, gamma_init={self.gamma_init}"
            + (", shared_over_time=True" if self.shared_over_time else "")
        )

    def forward(self, x: Tensor, t: int = 0, mask: Tensor | None = None) -> Tensor:
        """Normalize one step or a whole sequence.

        Args:
            x: ``(B, C)`` -- the input at time step ``t`` -- or ``(T, B, C)`` -- steps ``t … t+T-1`` at once, each with
                its own statistics (one vectorized reduction over the batch axis).
            t: the (first) time index.
            mask: optional bool, ``(B,)`` for a step or ``(T, B)`` for a sequence; True marks real positions.

        Returns:
            a tensor shaped like ``x``.
        """
        if x.dim() == 2:
            return self._normalize(x.unsqueeze(0), t, None if mask is None else mask.unsqueeze(0)).squeeze(0)
        if x.dim() == 3:
            return self._normalize(x, t, mask)
        raise ValueError(f"SequenceBatchNorm expects a (B, C) step or a (T, B, C) sequence, got shape {tuple(x.shape)}")

    def check_batch_statistics(self, start: int, T: int, B: int) -> None:
        """Raise a clear error where batch statistics cannot be computed or kept for steps start … start+T-1."""
        if self.training and not self.shared_over_time and start + T > self.max_steps:
            raise ValueError(
                f"time step {start + T - 1} reached in training, but population statistics are kept for "
                f"max_steps={self.max_steps} steps; set max_steps to at least the longest training sequence "
                f"({start + T})"
            )
        if B < 2:
            raise ValueError(
                f"batch normalization needs at least 2 sequences per batch to compute batch statistics, got a "
                f"batch of size {B} in {'training' if self.training else 'batch-statistics evaluation'}; use a "
                f"larger batch (or drop_last=True), or evaluate with population statistics"
            )

    # ------------------------------------------------------------------------------------------------------------
    def _normalize(self, x: Tensor, start: int, mask: Tensor | None) -> Tensor:  # x: (T, B, C), mask: (T, B)
        T, B, C = x.shape
        if C != self.num_features:
            raise ValueError(f"SequenceBatchNorm: expected {self.num_features} features, got {C}")
        if self.shared_over_time:
            return self._normalize_shared(x, mask)
        use_batch = self.training or self.eval_statistics == "batch"
        if not use_batch:
            mean, var = self.population(start, T)
            if T == 1:  # one fused kernel for the common case, a step of the time loop
                y = F.batch_norm(x[0], mean[0], var[0], self.weight, self.bias, False, 0.0, self.eps)
                return y.unsqueeze(0)
            return self.normalize_with(x, mean, var)
        syncing = self.training and self.syncing()
        self.check_batch_statistics(start, T, max(B, 2) if syncing else B)  # synced: the global batch counts
        if syncing:
            mean, var, global_valid = _synced_statistics(x, mask)  # over every process's batch, differentiable
            pop_mean, pop_var = self.population(start, T)
            mean = torch.where(global_valid[:, None], mean, pop_mean)
            var = torch.where(global_valid[:, None], var, pop_var)
            y = self.normalize_with(x, mean, var)
            self.record(start, mean.detach(), var.detach(), global_valid)
            return y
        valid: Tensor | None = None
        if mask is None:
            y, mean, var = self._batch_norm_unmasked(x)
        else:
            mean, var, valid = _masked_statistics(x, mask)  # (T, C), (T, C), (T,)
            # steps with < 2 real sequences: fall back to the population statistics (module docstring)
            pop_mean, pop_var = self.population(start, T)
            mean = torch.where(valid[:, None], mean, pop_mean)
            var = torch.where(valid[:, None], var, pop_var)
            y = self.normalize_with(x, mean, var)
        if self.training:
            self.record(start, mean, var, valid)
        return y

    def _normalize_shared(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Statistics shared over time: one (1, C) mean and variance over every real position of (T, B, C)."""
        T, B, C = x.shape
        if not (self.training or self.eval_statistics == "batch"):
            mean, var = self.population(0, T)
            return self.normalize_with(x, mean, var)
        syncing = self.training and self.syncing()
        self.check_batch_statistics(0, T, max(B, 2) if syncing else B)
        flat = x.reshape(1, T * B, C)
        flat_mask = torch.ones(1, T * B, dtype=torch.bool, device=x.device) if mask is None else mask.reshape(1, T * B)
        mean, var, valid = (_synced_statistics if syncing else _masked_statistics)(flat, flat_mask)  # (1, C), (1,)
        pop_mean, pop_var = self.population(0, 1)
        mean = torch.where(valid[:, None], mean, pop_mean)
        var = torch.where(valid[:, None], var, pop_var)
        y = self.normalize_with(x, mean.expand(T, -1), var.expand(T, -1))
        if self.training:
            self.record(0, mean.detach(), var.detach(), valid)
        return y

    def syncing(self) -> bool:
        """True when training statistics are all-reduced: ``sync_statistics`` on and more than one process."""
        return self.sync_statistics and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def normalize_with(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """γ (x - mean_t) / sqrt(var_t + ε) + β for x (T, B, C) and per-step statistics (T, C)."""
        y = (x - mean[:, None]) * torch.rsqrt(var[:, None] + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def _batch_norm_unmasked(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-step batch norm of (T, B, C) with one native kernel (forward and backward).

        The batch axis goes first and (step, feature) pairs become the channels, so the kernel's per-channel
        statistics are exactly the per-step statistics. Statistics are computed in float32 whatever the input dtype.
        Returns y (T, B, C) and the (detached) batch mean and biased variance, each (T, C).
        """
        T, B, C = x.shape
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bf16/fp16 under autocast: statistics stay in fp32
        x2 = x[0] if T == 1 else x.transpose(0, 1).reshape(B, T * C)  # (B, T*C)
        weight = self.weight if self.weight is None or T == 1 else self.weight.repeat(T)
        bias = self.bias if self.bias is None or T == 1 else self.bias.repeat(T)
        y, mean, invstd = torch.native_batch_norm(x2, weight, bias, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            var = (invstd.detach().pow(-2) - self.eps).clamp_(min=0.0)  # the biased batch variance
        y = y.unsqueeze(0) if T == 1 else y.view(B, T, C).transpose(0, 1)
        return y, mean.detach().view(T, C), var.view(T, C)

    def population(self, start: int, T: int) -> tuple[Tensor, Tensor]:
        """Population statistics for steps start … start+T-1, each step ≥ max_steps reusing step max_steps-1: the
        mean and variance every normalization with population statistics uses ((T, C) each).

        A channel whose variance is negligible against ε (below ``CONSTANT_VARIANCE * ε``) comes back with an
        infinite variance, so that it is normalized to exactly β, as training normalized it (see
        :data:`CONSTANT_VARIANCE`); every other channel is the buffers' value, untouched."""
        if self.shared_over_time:
            mean, var = self.running_mean[:1].expand(T, -1), self.running_var[:1].expand(T, -1)
        elif start + T <= self.max_steps:
            mean, var = self.running_mean[start : start + T], self.running_var[start : start + T]
        else:
            idx = torch.arange(start, start + T, device=self.running_mean.device).clamp_(max=self.max_steps - 1)
            mean, var = self.running_mean[idx], self.running_var[idx]
        return mean, var.masked_fill(var < CONSTANT_VARIANCE * self.eps, torch.inf)

    def affine(self, start: int, T: int) -> tuple[Tensor, Tensor]:
        """This site with population statistics as an affine map per step: BN_t(v) = v * scale_t + shift_t for
        steps start … start+T-1; (T, C) each (the fast paths fold it into their steps). A channel that was constant
        over the batch in training (:meth:`population`) gets scale 0 and shift β."""
        mean, var = self.population(start, T)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        return scale, shift if self.bias is None else shift + self.bias

    def statistics(self) -> Literal["train", "batch", "population"]:
        """Which statistics a forward uses now: ``"train"`` (batch statistics, recorded into the running statistics:
        training, and the population-statistics estimation pass), ``"batch"`` (batch statistics, nothing recorded:
        evaluation with ``eval_statistics="batch"``) or ``"population"``."""
        if self.training:
            return "train"
        return "batch" if self.eval_statistics == "batch" else "population"

    def record(self, start: int, mean: Tensor, var: Tensor, valid: Tensor | None = None) -> None:
        """Fold a batch's per-step statistics (T, C) for steps start … start+T-1 into the running statistics
        (``valid`` (T,) bool: steps to skip are False); collected and written later inside
        :func:`deferred_statistics_updates`."""
        if self._deferred is not None:
            self._deferred.append((start, mean.detach(), var.detach(), valid))
        else:
            self._apply_update(start, mean, var, valid)

    def _flush_deferred(self) -> None:
        """Apply the pending updates in order, each run of consecutive steps as one vectorized update."""
        pending, self._deferred = self._deferred, None
        run: list[tuple[int, Tensor, Tensor, Tensor | None]] = []
        for item in pending or []:
            if run and item[0] != run[-1][0] + run[-1][1].shape[0]:
                self._apply_run(run)
                run = []
            run.append(item)
        if run:
            self._apply_run(run)

    def _apply_run(self, run: list[tuple[int, Tensor, Tensor, Tensor | None]]) -> None:
        mean = torch.cat([m for _, m, _, _ in run])
        var = torch.cat([v for _, _, v, _ in run])
        valid = None
        if any(ok is not None for *_, ok in run):
            valid = torch.cat(
                [torch.ones(m.shape[0], dtype=torch.bool, device=m.device) if ok is None else ok for _, m, _, ok in run]
            )
        self._apply_update(run[0][0], mean, var, valid)

    @torch.no_grad()
    def _apply_update(self, start: int, mean: Tensor, var: Tensor, valid: Tensor | None) -> None:
        rows = slice(start, start + mean.shape[0])
        seen = torch.ones_like(self.num_batches_tracked[rows]) if valid is None else valid.long()
        self.num_batches_tracked[rows] += seen
        dtype = self.running_mean.dtype  # the rate in the buffers' precision (float64 modules stay exact)
        inverse_count = 1.0 / self.num_batches_tracked[rows].clamp(min=1).to(dtype)  # 1/n, n counting this batch
        if self.momentum is None:  # plain average over the batches seen since the reset
            rate = seen.to(dtype) * inverse_count
        else:  # max(momentum, 1/n): the plain average until n = 1/momentum, the exponential average after
            rate = seen.to(dtype) * inverse_count.clamp(min=self.momentum)
        rate = rate[:, None]  # (T, 1)
        # (1 - rate) * old + rate * new, not old + rate * (new - old): exact when rate == 1 (first batch after reset).
        # Steps not seen keep their value: what a masked batch passes for them is the population statistics, whose
        # variance may be infinite (population()), and inf * 0 is NaN.
        unseen = rate == 0
        mean = torch.where(unseen, 0.0, mean.to(dtype))
        var = torch.where(unseen, 0.0, var.to(dtype))
        self.running_mean[rows] = self.running_mean[rows] * (1 - rate) + mean * rate
        self.running_var[rows] = self.running_var[rows] * (1 - rate) + var * rate

    def fill_unseen_steps(self) -> None:
        """Give steps that no batch reached the statistics of the last step that one did (reuse T_max-1)."""
        seen = (self.num_batches_tracked > 0).nonzero()
        if seen.numel() == 0:
            return
        last = int(seen.max())
        self.running_mean[last + 1 :] = self.running_mean[last]
        self.running_var[last + 1 :] = self.running_var[last]


def _masked_statistics(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step mean and biased variance over the batch axis of ``x`` (T, B, C), padded positions excluded.

    The variance is the masked mean of the squared deviation. Returns (mean (T, C), var (T, C), valid (T,) bool),
    where valid marks steps with at least 2 real sequences. Statistics are computed in at least float32.
    """
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the (T, B) = {tuple(x.shape[:2])} input")
    keep = mask[:, :, None]  # (T, B, 1)
    count = keep.sum(dim=1).to(xs.dtype)  # (T, 1)
    # where, not a product with the mask: inf/NaN in padded positions must not leak into the statistics
    mean = torch.where(keep, xs, 0.0).sum(dim=1) / count.clamp(min=1.0)
    var = torch.where(keep, (xs - mean[:, None]).square(), 0.0).sum(dim=1) / count.clamp(min=1.0)
    return mean, var, count[:, 0] >= 2


def _synced_statistics(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step mean and biased variance over the batch axes of every process (the global batch), padding excluded.

    Two all-reduces (sums with counts, then sums of squared deviations from the global mean: the same two-pass
    arithmetic as one process with the whole batch). ``torch.distributed.nn.functional.all_reduce`` carries the
    gradient to every process's inputs. Returns (mean (T, C), var (T, C), valid (T,) bool: at least 2 real sequences
    in the global batch), in at least float32.
    """
    from torch.distributed.nn.functional import all_reduce as _all_reduce

    def all_reduce(tensor: Tensor) -> Tensor:
        # the autograd-aware collective; torch >= 2.9 marks it deprecated in favour of functional collectives whose
        # all_reduce has no autograd formula yet, so it stays, without the warning on every call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _all_reduce(tensor)

    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    T, B, C = xs.shape
    keep = torch.ones(T, B, 1, dtype=torch.bool, device=x.device) if mask is None else mask[:, :, None]
    if keep.shape[:2] != (T, B):
        raise ValueError(f"mask of shape {tuple(keep.shape[:2])} does not match the (T, B) = {(T, B)} input")
    count = keep.sum(dim=1).to(xs.dtype)  # (T, 1)
    sums = torch.where(keep, xs, 0.0).sum(dim=1)  # (T, C)
    totals = all_reduce(torch.cat([sums, count], dim=1))  # (T, C + 1), summed over processes
    total_count = totals[:, C:].detach()
    mean = totals[:, :C] / total_count.clamp(min=1.0)
    squares = torch.where(keep, (xs - mean[:, None]).square(), 0.0).sum(dim=1)
    var = all_reduce(squares) / total_count.clamp(min=1.0)
    return mean, var, total_count[:, 0] >= 2


@contextmanager
def deferred_statistics_updates(module: nn.Module) -> Iterator[None]:
    """Collect the running-statistics updates of every training SequenceBatchNorm in ``module`` and apply them on exit.

    A time loop calls each site once per step; updating a (max_steps, C) buffer row at every step costs a handful of
    small kernels per site and step (a third of a forward+backward at the sequential-MNIST shape on CPU). Inside this
    context the per-step statistics are kept and written once, as one vectorized update per run of consecutive
    steps, with the same result. Nested use keeps the outermost collection.
    """
    sites = [m for m in batchnorm_sites(module) if m.training and m._deferred is None]
    for site in sites:
        site._deferred = []
    try:
        yield
    finally:
        for site in sites:
            site._flush_deferred()


def set_eval_statistics(module: nn.Module, mode: EvalStatistics) -> None:
    """Choose which statistics every :class:`SequenceBatchNorm` in ``module`` uses in evaluation mode."""
    if mode not in ("population", "batch"):
        raise ValueError(f"eval statistics must be 'population' or 'batch', got {mode!r}")
    for site in batchnorm_sites(module):
        site.eval_statistics = mode


def set_sync_statistics(module: nn.Module, sync: bool) -> None:
    """Turn the all-reduce of training statistics over processes on or off for every site in ``module``."""
    for site in batchnorm_sites(module):
        site.sync_statistics = bool(sync)


def batchnorm_sites(module: nn.Module) -> list[SequenceBatchNorm]:
    """Every :class:`SequenceBatchNorm` inside ``module`` (itself included)."""
    return [m for m in module.modules() if isinstance(m, SequenceBatchNorm)]
