"""The reference time loop: the readable implementation every fast path is tested against.

A leaf implementation of :mod:`bnlstm_lit.nn.dispatch`. It steps the cell (:mod:`bnlstm_lit.nn.cell`) through time
with autograd doing the backward, so it covers every case: any cell, masks, synchronized statistics, gradient probes,
double backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlstm_lit.nn.batchnorm import deferred_statistics_updates
from bnlstm_lit.nn.cell import BNLSTMCell, cell_update, gates, hidden

__all__ = ["population_steps", "run"]


def run(
    cell: nn.Module,
    x: Tensor,
    state: tuple[Tensor, Tensor],
    mask: Tensor | None,
    start: int = 0,
    probe: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The time loop of one layer: (T, B, I) -> output (T, B, H), final (h, c); row t is time step start + t.

    ``mask`` (T, B) bool marks real positions: padded steps keep the previous state and output zeros. ``probe``
    (T, B, H) of zeros, if given, is added to every h_t (diagnostics: its gradient is dloss/dh_t)."""
    # (T, B, 4H), hoisted out of the loop. unbind, not x_terms[t]: the backward of T separate index ops would
    # build T full-size zero gradients (O(T^2) memory traffic), unbind's is one stack.
    x_terms = cell.input_term(x, mask, start).unbind(0)  # type: ignore[operator]
    probes = [None] * len(x_terms) if probe is None else probe.unbind(0)
    h, c = state
    outputs = []
    with deferred_statistics_updates(cell):  # running statistics written once after the loop, not per step
        if mask is None:
            for t, (x_t, p_t) in enumerate(zip(x_terms, probes, strict=True), start):
                h, c = cell(x_t, (h, c), t)
                if p_t is not None:
                    h = h + p_t
                outputs.append(h)
            return torch.stack(outputs), (h, c)
        keep = mask[:, :, None]  # (T, B, 1): padded steps keep the previous state
        steps = zip(x_terms, mask.unbind(0), keep.unbind(0), probes, strict=True)
        for t, (x_t, m_t, keep_t, p_t) in enumerate(steps, start):
            h_new, c_new = cell(x_t, (h, c), t, m_t)
            h = torch.where(keep_t, h_new, h)
            c = torch.where(keep_t, c_new, c)
            if p_t is not None:
                h = h + p_t
            outputs.append(h)
        return torch.stack(outputs) * keep, (h, c)  # zero outputs at padded positions


def population_steps(
    cell: BNLSTMCell, x_terms: Tensor, state: tuple[Tensor, Tensor], t: int
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Steps t, t+1, ... with the recurrent term and the cell normalized with their population statistics, without
    updating them (x_terms (K, n, 4H): the input term, already normalized). :class:`SequenceBatchNorm`'s rule for
    steps with fewer than two real sequences in training, as the masked reference loop applies it; differentiable."""
    bn_h, bn_c = cell.bn_h, cell.bn_c
    assert bn_h is not None and bn_c is not None
    h, c = state
    outputs = []
    for k, x_t in enumerate(x_terms.unbind(0)):
        wh = bn_h.normalize_with((h @ cell.weight_hh.t())[None], *bn_h.population(t + k, 1))[0]
        i, f, g, o = gates(wh + x_t)  # eq. 6
        c = cell_update(i, f, g, c)  # eq. 7
        h = hidden(o, bn_c.normalize_with(c[None], *bn_c.population(t + k, 1))[0])  # eq. 8
        outputs.append(h)
    return torch.stack(outputs), (h, c)
