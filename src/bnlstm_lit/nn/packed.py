"""A masked batch as packed sequences: the runs of steps on which the unmasked fast paths apply as they are.

Used by :mod:`bnlstm_lit.nn.dispatch`; the planner synchronises with the device once per batch (it reads the
lengths), outside the recurrence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["PackedSteps"]


class PackedSteps:
    """A masked batch as packed sequences: sorted by length (longest first), the real sequences of every step are a
    prefix of the sorted batch -- for the forward direction and for both reversals of the backward direction (with
    ``backward_reversal="padded"`` the padding comes first, so the prefix grows instead of shrinking). The steps then
    run in runs of consecutive steps with the same number n of real sequences, each on the first n sorted rows: the
    unmasked fast paths apply to a run as they are (a step's batch statistics over its n rows are the masked
    statistics over the real positions), padded rows keep their state, and padded outputs are zero.

    Attributes: order (B,), the batch sorted by length; inverse (B,), its inverse permutation; runs, (t0, t1, n) for
    each run of steps t0 ... t1-1 with n real sequences.
    """

    def __init__(self, order: Tensor, inverse: Tensor, runs: list[tuple[int, int, int]]) -> None:
        self.order = order
        self.inverse = inverse
        self.runs = runs

    @classmethod
    def of(cls, mask: Tensor) -> PackedSteps | None:
        """The runs of a (T, B) mask; None if some step's real positions are not a prefix of the sorted batch."""
        T, B = mask.shape
        order = torch.argsort(mask.sum(0), descending=True, stable=True)
        sorted_mask = mask[:, order]
        counts = sorted_mask.sum(1)  # (T,)
        if not torch.equal(sorted_mask, torch.arange(B, device=mask.device)[None, :] < counts[:, None]):
            return None
        n = counts.tolist()
        runs: list[tuple[int, int, int]] = []
        t0 = 0
        for t in range(1, T + 1):
            if t == T or n[t] != n[t0]:
                runs.append((t0, t, n[t0]))
                t0 = t
        return cls(order, torch.argsort(order), runs)

    def pieces(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (T, B, C) with its batch sorted, split into the runs' steps: (t1 - t0, B, C) each (split, not one
        slice per run: the backward is one concatenation, not a zero-filled (T, B, C) gradient per run)."""
        return x.index_select(1, self.order).split([t1 - t0 for t0, t1, _ in self.runs])

    def run(
        self, step: Callable[[int, int, int, Tensor, Tensor], tuple[Tensor, tuple[Tensor, Tensor]]],
        state: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:  # fmt: skip
        """Run every run of steps: ``step(index, t0, n, h, c)`` with the (n, H) states of the first n sorted rows
        returns that run's outputs (t1 - t0, n, H) and final state; runs without a real sequence are skipped. Returns
        the outputs (T, B, H), zero at padded positions, and the final state, both in the input's batch order."""
        h, c = (s.index_select(0, self.order) for s in state)
        B, H = h.shape
        outputs = []
        for index, (t0, t1, n) in enumerate(self.runs):
            if n == 0:
                outputs.append(h.new_zeros(t1 - t0, B, H))
                continue
            out, (h_n, c_n) = step(index, t0, n, h[:n], c[:n])
            if n < B:  # the other rows keep their state and output zeros
                out = torch.cat([out, out.new_zeros(t1 - t0, B - n, H)], dim=1)
                h_n, c_n = torch.cat([h_n, h[n:].to(h_n.dtype)]), torch.cat([c_n, c[n:].to(c_n.dtype)])
            outputs.append(out)
            h, c = h_n, c_n
        out = outputs[0] if len(outputs) == 1 else torch.cat([o.to(outputs[-1].dtype) for o in outputs])
        return out.index_select(1, self.inverse), (h.index_select(0, self.inverse), c.index_select(0, self.inverse))
