"""A naive BN-LSTM written the way public ports usually write it, as the benchmark's second reference point.

Kept in the benchmark only (never imported by ``bnlstm_lit``). The math is exactly ``bnlstm_lit.nn.BNLSTM``'s in
training mode (SPEC §1; gate order i, f, g, o as torch):

    pre_t = BN_t(W_h h_{t-1}; γ_h) + BN_t(W_x x_t; γ_x) + b
    c_t   = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)
    h_t   = σ(o) ⊙ tanh(BN_t(c_t; γ_c, β_c))

but it is built the usual way: a Python loop over time, two ``nn.Linear`` without bias (W_x, W_h) plus a bias
parameter b, the input projection computed inside the loop step by step (not hoisted), and one ``nn.BatchNorm1d`` per
time step for each of the three BN sites, held in ``nn.ModuleList``. The per-step BatchNorm1d are ``affine=False``
(they own the per-step statistics) and the scale γ (and, for the cell, the shift β) is one parameter per site shared
over time, multiplied in after the normalization -- as in the paper and in ``BNLSTM``, so that the two models have the
same parameters and the same gradients.

Differences that do not matter for the benchmark: the running statistics follow ``nn.BatchNorm1d``'s rule (momentum
0.1 from mean 0 / variance 1, unbiased running variance) rather than ``SequenceBatchNorm``'s ``max(momentum, 1/n)``,
and the initial state is zero unless one is passed (``BNLSTM`` learns h_0 and c_0, zero at init).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlstm_lit.nn import DEFAULTS

__all__ = ["NaiveBNLSTM", "copy_from"]


class NaiveBNLSTM(nn.Module):
    """Single-layer BN-LSTM with a per-step Python loop and one ``nn.BatchNorm1d`` per step and site.

    Args:
        input_size: I.
        hidden_size: H.
        max_steps: number of per-step BatchNorm1d of each site; steps ``t >= max_steps`` reuse the last one.
        gamma_init, eps, momentum, forget_bias: as ``BNLSTM``'s (defaults :data:`bnlstm_lit.nn.DEFAULTS`): initial γ
            of the three sites, BN ε, running-average rate of every BatchNorm1d (None: cumulative), initial
            forget-gate slice of b.

    Shapes:
        input (T, B, I), optional state (h_0, c_0) each (1, B, H) (zeros when omitted).
        Returns output (T, B, H) and (h_n, c_n) each (1, B, H), as ``torch.nn.LSTM``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        gamma_init: float = DEFAULTS.gamma_init,  # type: ignore[assignment]  # a float: one γ for every site
        eps: float = DEFAULTS.eps,
        momentum: float | None = DEFAULTS.momentum,
        forget_bias: float = DEFAULTS.forget_bias,
    ) -> None:
        super().__init__()
        H = hidden_size
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.max_steps = max_steps
        self.W_x = nn.Linear(input_size, 4 * H, bias=False)
        self.W_h = nn.Linear(H, 4 * H, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * H))
        with torch.no_grad():
            self.bias[H : 2 * H].fill_(forget_bias)
        # per-step statistics: one BatchNorm1d per step and site; shared scale (and cell shift) parameters
        self.bn_x = nn.ModuleList(nn.BatchNorm1d(4 * H, eps, momentum, affine=False) for _ in range(max_steps))
        self.bn_h = nn.ModuleList(nn.BatchNorm1d(4 * H, eps, momentum, affine=False) for _ in range(max_steps))
        self.bn_c = nn.ModuleList(nn.BatchNorm1d(H, eps, momentum, affine=False) for _ in range(max_steps))
        self.gamma_x = nn.Parameter(torch.full((4 * H,), gamma_init))
        self.gamma_h = nn.Parameter(torch.full((4 * H,), gamma_init))
        self.gamma_c = nn.Parameter(torch.full((H,), gamma_init))
        self.beta_c = nn.Parameter(torch.zeros(H))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_steps={self.max_steps}"

    def forward(
        self, input: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        T, B, _ = input.shape
        if state is None:
            h = input.new_zeros(B, self.hidden_size)
            c = input.new_zeros(B, self.hidden_size)
        else:
            h, c = state[0][0], state[1][0]
        outputs = []
        for t in range(T):
            s = min(t, self.max_steps - 1)
            wx = self.bn_x[s](self.W_x(input[t])) * self.gamma_x
            wh = self.bn_h[s](self.W_h(h)) * self.gamma_h
            i, f, g, o = (wh + wx + self.bias).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.bn_c[s](c) * self.gamma_c + self.beta_c)
            outputs.append(h)
        return torch.stack(outputs), (h[None], c[None])


def copy_from(bnlstm: nn.Module, naive: NaiveBNLSTM) -> NaiveBNLSTM:
    """Load the parameters of a single-layer, normalized ``bnlstm_lit.nn.BNLSTM`` into ``naive`` (returned).

    The learned initial state is not copied (the naive model has none): pass ``bnlstm.initial_state(B)`` as the
    naive model's ``state`` to compare the two with a non-zero h_0 / c_0.
    """
    if getattr(bnlstm, "num_layers", None) != 1 or not getattr(bnlstm, "normalize", False):
        raise ValueError("copy_from needs a single-layer BNLSTM with normalize=True")
    if (bnlstm.input_size, bnlstm.hidden_size) != (naive.input_size, naive.hidden_size):
        raise ValueError(
            f"copy_from: BNLSTM is ({bnlstm.input_size}, {bnlstm.hidden_size}), the naive model is "
            f"({naive.input_size}, {naive.hidden_size})"
        )
    cell = bnlstm.cells[0]
    pairs = [
        (naive.W_x.weight, cell.weight_ih),
        (naive.W_h.weight, cell.weight_hh),
        (naive.bias, cell.bias),
        (naive.gamma_x, cell.bn_x.weight),
        (naive.gamma_h, cell.bn_h.weight),
        (naive.gamma_c, cell.bn_c.weight),
        (naive.beta_c, cell.bn_c.bias),
    ]
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)
    for site, bns in ((cell.bn_x, naive.bn_x), (cell.bn_h, naive.bn_h), (cell.bn_c, naive.bn_c)):
        if site.eps != bns[0].eps:
            for bn in bns:
                bn.eps = site.eps
    return naive
