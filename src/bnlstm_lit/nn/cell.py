"""The cells: one time step of the BN-LSTM (Cooijmans et al. 2017, eqs. 6-8) and of the BN tanh RNN (the
paper's Fig. 1 model).

Gate order along the 4H axis is torch.nn.LSTM's: input i, forget f, candidate g, output o, so weights copy 1:1.

    pre_t = BN_t(W_h h_{t-1}; γ_h) + BN_t(W_x x_t; γ_x) + b        (B, 4H)
    c_t   = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)
    h_t   = σ(o) ⊙ tanh(BN_t(c_t; γ_c, β_c))                        (the raw c_t is carried to t+1)

With ``normalize=False`` the three BN sites are absent and the cell is the plain LSTM, exactly
``torch.nn.LSTM``'s step with ``b = b_ih + b_hh`` (the original code kept β_c as an offset inside tanh; we drop it so
the baseline is the textbook LSTM and parity with cuDNN/oneDNN is exact).

The cell contract (one for every cell, the layer owns the time loop):

* :meth:`input_term` maps the whole input sequence ``(T, B, I) -> (T, B, 4H)`` (hoisted out of the loop: one matmul,
  one vectorized per-step BN);
* :meth:`forward` takes that step's input term, the state ``(h, c)`` and the time index, and returns the new state
  (a cell without a memory, the tanh RNN, returns its ``c`` unchanged);
* ``fast_paths`` says whether the dispatcher (:mod:`bnlstm_lit.nn.dispatch`) may run the fused BN-LSTM paths for it.

The equations themselves are the functions :func:`gates`, :func:`cell_update` and :func:`hidden`, which every
PyTorch implementation of the step calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from bnlstm_lit.nn.batchnorm import SequenceBatchNorm
from bnlstm_lit.nn.settings import DEFAULTS, GammaInit, InputStatistics, RecurrentInit

GAMMA_SITES = ("input", "recurrent", "cell")


def site_gammas(owner: str, gamma_init: GammaInit, sites: tuple[str, ...] = GAMMA_SITES) -> dict[str, float]:
    """The initial γ of each BN site: one number for all, or a mapping by site name (missing sites take the paper's
    0.1). An unknown site name or a γ that is not a positive number is an error naming ``owner``."""
    if isinstance(gamma_init, Mapping):
        unknown = sorted(set(gamma_init) - set(sites))
        if unknown:
            raise ValueError(f"{owner}: gamma_init keys must be among {list(sites)}, got {unknown}")
        default = DEFAULTS.gamma_init
        assert isinstance(default, float)
        values = {site: gamma_init.get(site, default) for site in sites}
    else:
        values = dict.fromkeys(sites, gamma_init)
    for site, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{owner}: gamma_init for the {site} site must be a positive number, got {value!r}")
    return {site: float(value) for site, value in values.items()}


# ---- the equations (Cooijmans et al. 2017, eqs. 6-8), written once: the reference loop, the eager fused path and
# the population-statistics steps all call these; the native kernel is their C transcription (bnlstm_kernel.c).


def gates(pre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eq. 6's activations of the pre-activations (B, 4H): σ(i), σ(f), tanh(g), σ(o), each (B, H) (gate order
    i, f, g, o, torch.nn.LSTM's)."""
    i, f, g, o = pre.chunk(4, dim=1)
    return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)


def cell_update(i: Tensor, f: Tensor, g: Tensor, c_prev: Tensor) -> Tensor:
    """Eq. 7: c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g), from the activations of :func:`gates`."""
    return f * c_prev + i * g


def hidden(o: Tensor, c_normalized: Tensor) -> Tensor:
    """Eq. 8: h_t = σ(o) ⊙ tanh(BN_t(c_t; γ_c, β_c)), given σ(o) and the normalized cell (the raw c_t is carried)."""
    return o * torch.tanh(c_normalized)


def _check_arguments(cell: str, input_size: int, hidden_size: int, recurrent_init: str, input_statistics: str) -> None:
    """The constructor checks every cell shares: clear errors naming the cell and the argument."""
    if input_size <= 0 or hidden_size <= 0:
        raise ValueError(f"{cell}: input_size and hidden_size must be positive, got {input_size} and {hidden_size}")
    if recurrent_init not in ("orthogonal", "identity_g"):
        raise ValueError(f"{cell}: recurrent_init must be 'orthogonal' or 'identity_g', got {recurrent_init!r}")
    if input_statistics not in ("per_step", "sequence"):
        raise ValueError(f"{cell}: input_statistics must be 'per_step' or 'sequence', got {input_statistics!r}")


class BNLSTMCell(nn.Module):
    """One BN-LSTM step.

    Args:
        input_size: I, features of x_t.
        hidden_size: H.
        max_steps: number of time steps with their own population statistics (longest training sequence).
        normalize: False gives the plain LSTM baseline (no BN sites, no γ/β).
        gamma_init: initial γ of every BN site (0.1, the paper's value), or per site ``{"input": γ_x, "recurrent": γ_h,
            "cell": γ_c}`` (missing sites 0.1).
        eps: BN ε.
        momentum: rate of the running average of per-step statistics (0.01 MNIST, 0.05 language modelling in the
            original code); None keeps the cumulative average.
        forget_bias: initial value of the forget-gate slice of b (the rest of b starts at 0).
        recurrent_init: ``"orthogonal"`` (each of the four H×H blocks of W_h orthogonal) or ``"identity_g"``
            (the candidate block g is the identity, the other three orthogonal: the paper's sequential-MNIST init).
        input_statistics: ``"per_step"``, or ``"sequence"``: the input term's statistics are shared over time
            (masked over every real position; the paper's BN-e*).

    Attributes:
        weight_ih: W_x, (4H, I).
        weight_hh: W_h, (4H, H).
        bias: b, (4H,) (a zero buffer with ``bias=False``).
        bn_x: with normalization, the input term's batch norm: ``bn_x.weight`` (4H,) = γ_x; else None.
        bn_h: the recurrent term's: ``bn_h.weight`` (4H,) = γ_h; else None.
        bn_c: the cell's: ``bn_c.weight`` / ``bn_c.bias`` (H,) = γ_c / β_c; else None.
    """

    fast_paths: ClassVar[bool] = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        normalize: bool = DEFAULTS.normalize,
        gamma_init: GammaInit = DEFAULTS.gamma_init,
        eps: float = DEFAULTS.eps,
        momentum: float | None = DEFAULTS.momentum,
        forget_bias: float = DEFAULTS.forget_bias,
        recurrent_init: RecurrentInit = DEFAULTS.recurrent_init,
        input_statistics: InputStatistics = DEFAULTS.input_statistics,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_arguments("BNLSTMCell", input_size, hidden_size, recurrent_init, input_statistics)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.normalize = normalize
        self.forget_bias = forget_bias
        self.recurrent_init = recurrent_init
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias: Tensor
        if bias:
            self.bias = nn.Parameter(torch.empty(4 * H))
        else:  # torch.nn.LSTM(bias=False): b fixed at 0, no forget bias
            self.register_buffer("bias", torch.zeros(4 * H))
        self.bn_x: SequenceBatchNorm | None = None
        self.bn_h: SequenceBatchNorm | None = None
        self.bn_c: SequenceBatchNorm | None = None
        gammas = site_gammas("BNLSTMCell", gamma_init)
        if normalize:
            # input and recurrent terms: scale only (their shift would duplicate b); the cell: scale and shift
            self.bn_x = SequenceBatchNorm(
                4 * H, max_steps, eps, momentum, bias=False, gamma_init=gammas["input"],
                shared_over_time=input_statistics == "sequence",
            )  # fmt: skip
            self.bn_h = SequenceBatchNorm(4 * H, max_steps, eps, momentum, bias=False, gamma_init=gammas["recurrent"])
            self.bn_c = SequenceBatchNorm(H, max_steps, eps, momentum, bias=True, gamma_init=gammas["cell"])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.hidden_size
        with torch.no_grad():
            for k in range(4):  # each gate block orthogonal on its own
                nn.init.orthogonal_(self.weight_ih[k * H : (k + 1) * H])
                nn.init.orthogonal_(self.weight_hh[k * H : (k + 1) * H])
            if self.recurrent_init == "identity_g":
                self.weight_hh[2 * H : 3 * H].copy_(torch.eye(H))
            self.bias.zero_()
            if isinstance(self.bias, nn.Parameter):  # without a bias (bias=False) b stays 0
                self.bias[H : 2 * H].fill_(self.forget_bias)  # forget-gate slice
        for bn in (self.bn_x, self.bn_h, self.bn_c):
            if bn is not None:
                bn.reset_parameters()

    def input_term(self, x: Tensor, mask: Tensor | None = None, start: int = 0) -> Tensor:
        """BN_t(W_x x_t; γ_x) + b for all steps at once: ``(T, B, I) -> (T, B, 4H)``; row t is time step start + t."""
        wx = x @ self.weight_ih.t()  # (T, B, 4H): one matmul for the whole sequence
        if self.bn_x is not None:
            wx = self.bn_x(wx, start, mask)  # per-step statistics, one reduction over the batch axis
        return wx + self.bias

    def forward(
        self, x_term: Tensor, state: tuple[Tensor, Tensor], t: int, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One step.

        Args:
            x_term: (B, 4H), row t of :meth:`input_term`.
            state: (h_{t-1}, c_{t-1}), each (B, H).
            t: time index (selects the per-step statistics).
            mask: optional (B,) bool, True where step t is real (statistics only; the layer keeps padded states).

        Returns:
            (h_t, c_t), each (B, H); c_t is the un-normalized cell.
        """
        h, c = state
        wh = h @ self.weight_hh.t()  # (B, 4H)
        if self.bn_h is not None:
            wh = self.bn_h(wh, t, mask)
        i, f, g, o = gates(wh + x_term)  # eq. 6
        c = cell_update(i, f, g, c)  # eq. 7
        c_out = c if self.bn_c is None else self.bn_c(c, t, mask)  # BN(c) on the output path only
        return hidden(o, c_out), c  # eq. 8


class BNRNNCell(nn.Module):
    """One step of the batch-normalized tanh RNN of the paper's Fig. 1:

        h_t = tanh(BN_t(W_h h_{t-1}; γ_h) + BN_t(W_x x_t; γ_x) + b)        (B, H)

    It shares the LSTM cell's contract (state ``(h, c)``; ``c`` is passed through untouched) so the same
    :class:`~bnlstm_lit.nn.BNLSTM` layer runs it (``cell="tanh"``), always on the reference loop.

    Args:
        input_size: as :class:`BNLSTMCell`.
        hidden_size: as :class:`BNLSTMCell`.
        max_steps: as :class:`BNLSTMCell`.
        normalize: as :class:`BNLSTMCell`.
        gamma_init: as :class:`BNLSTMCell` (the sites ``input`` and ``recurrent``).
        eps: as :class:`BNLSTMCell`.
        momentum: as :class:`BNLSTMCell`.
        forget_bias: ignored (no gates); accepted so the layer passes one set of arguments to every cell.
        recurrent_init: ``"orthogonal"`` or ``"identity_g"`` (W_h is the identity).

    Attributes:
        weight_ih: W_x, (H, I).
        weight_hh: W_h, (H, H).
        bias: b, (H,), starting at 0.
        bn_x: with normalization, the input term's batch norm: ``bn_x.weight`` (H,) = γ_x; else None.
        bn_h: the recurrent term's: ``bn_h.weight`` (H,) = γ_h; else None.
        bn_c: always None (no cell); present so code can ask every cell.
    """

    fast_paths: ClassVar[bool] = False

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        normalize: bool = DEFAULTS.normalize,
        gamma_init: GammaInit = DEFAULTS.gamma_init,
        eps: float = DEFAULTS.eps,
        momentum: float | None = DEFAULTS.momentum,
        forget_bias: float = DEFAULTS.forget_bias,
        recurrent_init: RecurrentInit = DEFAULTS.recurrent_init,
        input_statistics: InputStatistics = DEFAULTS.input_statistics,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_arguments("BNRNNCell", input_size, hidden_size, recurrent_init, input_statistics)
        del forget_bias
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.normalize = normalize
        self.recurrent_init = recurrent_init
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias: Tensor
        if bias:
            self.bias = nn.Parameter(torch.empty(hidden_size))
        else:
            self.register_buffer("bias", torch.zeros(hidden_size))
        self.bn_x: SequenceBatchNorm | None = None
        self.bn_h: SequenceBatchNorm | None = None
        self.bn_c: SequenceBatchNorm | None = None  # no cell: the attribute exists so code can ask every cell
        gammas = site_gammas("BNRNNCell", gamma_init, GAMMA_SITES[:2])
        if normalize:
            self.bn_x = SequenceBatchNorm(
                hidden_size, max_steps, eps, momentum, bias=False, gamma_init=gammas["input"],
                shared_over_time=input_statistics == "sequence",
            )  # fmt: skip
            self.bn_h = SequenceBatchNorm(
                hidden_size, max_steps, eps, momentum, bias=False, gamma_init=gammas["recurrent"]
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.orthogonal_(self.weight_ih)
            if self.recurrent_init == "identity_g":
                self.weight_hh.copy_(torch.eye(self.hidden_size))
            else:
                nn.init.orthogonal_(self.weight_hh)
            self.bias.zero_()
        for bn in (self.bn_x, self.bn_h):
            if bn is not None:
                bn.reset_parameters()

    def input_term(self, x: Tensor, mask: Tensor | None = None, start: int = 0) -> Tensor:
        """BN_t(W_x x_t; γ_x) + b for all steps at once: ``(T, B, I) -> (T, B, H)``."""
        wx = x @ self.weight_ih.t()  # (T, B, H)
        if self.bn_x is not None:
            wx = self.bn_x(wx, start, mask)
        return wx + self.bias

    def forward(
        self, x_term: Tensor, state: tuple[Tensor, Tensor], t: int, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One step: x_term (B, H), state (h_{t-1}, c) -> (h_t, c) with c unchanged."""
        h, c = state
        wh = h @ self.weight_hh.t()  # (B, H)
        if self.bn_h is not None:
            wh = self.bn_h(wh, t, mask)
        return torch.tanh(wh + x_term), c
