"""The paper's population-statistics protocol (Cooijmans et al. 2017, §4)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bnlstm_lit.nn.batchnorm import batchnorm_sites


@torch.no_grad()
def estimate_population_statistics(
    module: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
    distributed: bool = False,
) -> int:
    """Set every BN site's population statistics to the plain average of its per-step batch statistics.

    The paper's protocol: after training, reset the statistics, then run the model over (one pass of) the training
    set and average, for every site and every time step, the batch mean and biased batch variance -- with no
    gradient and no parameter update. Steps that no batch reached (sequences shorter than ``max_steps``) get the
    statistics of the last step that one did. Only the BN sites run in training mode during the pass (no dropout,
    no h_0 noise); every module's mode and every site's momentum are restored afterwards, also on error.

    Args:
        module: the model (any nn.Module containing SequenceBatchNorm sites).
        batches: an iterable of inputs; by default each is passed as ``module(batch)``.
        forward: optional ``forward(module, batch)`` to call the model on a batch of another form, e.g. a
            ``(inputs, targets)`` tuple from a DataLoader.
        max_batches: stop after this many batches (None: the whole iterable).
        distributed: under ``torch.distributed`` with several processes, each process has read its own batches;
            combine the per-process averages into the average over all their batches (weighted by each step's
            batch count), the same on every process. Every process must call this. Statistics are never
            all-reduced per batch during the pass (``sync_statistics`` is off for it), so the processes may read
            different numbers of batches.

    Returns:
        the number of batches used (by this process).

    Raises:
        ValueError: if ``module`` has no SequenceBatchNorm, or ``batches`` is empty.
    """
    sites = batchnorm_sites(module)
    if not sites:
        raise ValueError(f"{type(module).__name__} has no SequenceBatchNorm to estimate statistics for")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be positive or None, got {max_batches}")
    modes = {m: m.training for m in module.modules()}
    momenta = {site: site.momentum for site in sites}
    syncs = {site: site.sync_statistics for site in sites}
    previous = [{name: buf.clone() for name, buf in site.named_buffers(recurse=False)} for site in sites]
    used = 0
    try:
        module.eval()
        for site in sites:
            site.reset_running_stats()
            site.momentum = None  # cumulative (plain) average
            site.sync_statistics = False  # per-batch statistics, as in one process; combined at the end
            site.train()
        for batch in itertools.islice(batches, max_batches):
            if forward is None:
                module(batch)
            else:
                forward(module, batch)
            used += 1
        reduce = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if reduce:
            _combine_over_processes(sites)
        elif used == 0:
            raise ValueError("estimate_population_statistics got no batches: the iterable was empty")
    except BaseException:
        # a failed estimation must not leave reset or half-estimated statistics behind
        for site, buffers in zip(sites, previous, strict=True):
            for name, value in buffers.items():
                getattr(site, name).copy_(value)
        raise
    finally:
        for m, training in modes.items():
            m.training = training
        for site, momentum in momenta.items():
            site.momentum = momentum
            site.sync_statistics = syncs[site]
    for site in sites:
        site.fill_unseen_steps()
    return used


def _combine_over_processes(sites: list[Any]) -> None:
    """Every site's per-step plain averages -> the average over all processes' batches (sum of count-weighted
    averages over the sum of counts), on every process. One all-reduce for all sites."""
    parts = []
    for site in sites:
        count = site.num_batches_tracked.to(site.running_mean.dtype)[:, None]  # (T, 1)
        parts += [site.running_mean * count, site.running_var * count, count]
    flat = torch.cat([p.flatten() for p in parts])
    dist.all_reduce(flat)
    offset = 0
    for site in sites:
        shape = site.running_mean.shape
        size = shape.numel()
        mean_sum = flat[offset : offset + size].view(shape)
        var_sum = flat[offset + size : offset + 2 * size].view(shape)
        count = flat[offset + 2 * size : offset + 2 * size + shape[0]].view(shape[0], 1)
        offset += 2 * size + shape[0]
        if int(count.max()) == 0:
            raise ValueError("estimate_population_statistics got no batches on any process")
        seen = count > 0
        site.running_mean.copy_(torch.where(seen, mean_sum / count.clamp(min=1), site.running_mean))
        site.running_var.copy_(torch.where(seen, var_sum / count.clamp(min=1), site.running_var))
        site.num_batches_tracked.copy_(count[:, 0].round().to(site.num_batches_tracked.dtype))
