"""The BN-LSTM layer: owns the time loop and the learned initial state; API of torch.nn.LSTM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from bnlstm_lit.nn import kernel as native
from bnlstm_lit.nn.batchnorm import SequenceBatchNorm, deferred_statistics_updates, set_sync_statistics
from bnlstm_lit.nn.cell import BNLSTMCell, BNRNNCell
from bnlstm_lit.nn.settings import (
    DEFAULTS,
    BNLSTMSettings,
    CellType,
    GammaInit,
    Implementation,
    InputStatistics,
    RecurrentInit,
)
from bnlstm_lit.nn.fused import fused_recurrence, input_norm_recurrence, plain_lstm, population_recurrence

IMPLEMENTATIONS = get_args(Implementation)
BackwardReversal = Literal["unpadded", "padded"]
CELLS: dict[str, type[BNLSTMCell] | type[BNRNNCell]] = {"lstm": BNLSTMCell, "tanh": BNRNNCell}


class BNLSTM(nn.Module):
    """Multi-layer batch-normalized LSTM (Cooijmans et al. 2017), a drop-in for ``torch.nn.LSTM``.

    Per layer, W_x x_t is one matmul for all steps. The reference loop then normalizes it for all steps at once (one
    vectorized per-step reduction) and steps through the recurrent matmul, its BN, the gates and BN(c_t); the fast
    paths (``fused``, below) do the input term's per-step BN inside the native kernel's steps where it applies, and
    there compute W_x x_t one matmul per chunk of 8 steps (forward, and its gradients backward), so that neither
    W_x x nor its gradient exists as a (T, B, 4H) tensor.

    Args:
        input_size: I, features per step of the input.
        hidden_size: H.
        num_layers: stacked layers; layer l > 0 reads layer l-1's outputs.
        batch_first: inputs and outputs are (B, T, ·) instead of (T, B, ·); states stay (L, B, H) as in torch.
        max_steps: T_max, steps with their own population statistics (the longest training sequence); evaluation on
            longer sequences reuses the statistics of step T_max-1.
        normalize: False gives the plain LSTM baseline, numerically ``torch.nn.LSTM`` (b = b_ih + b_hh).
        gamma_init: initial γ of every BN site (0.1), or per site ``{"input": γ_x, "recurrent": γ_h, "cell": γ_c}``
            (missing sites 0.1; the tanh cell has no "cell" site).
        eps: BN ε (1e-5).
        momentum: running-average rate of the per-step statistics (None: cumulative average).
        forget_bias: initial forget-gate slice of b (1.0).
        recurrent_init: "orthogonal" or "identity_g" (identity on the candidate block of W_h, the paper's MNIST init).
        h0_noise_std: std of Gaussian noise added to the learned h_0 in training (0.1 for unpermuted sequential
            MNIST, whose first ~100 constant inputs otherwise give zero batch variance); 0 disables it.
        dropout: dropout on the outputs of every layer but the last, as torch.nn.LSTM.
        fused: use the fast paths where they apply (:mod:`bnlstm_lit.nn.fused`): in training, the BN-LSTM
            recurrence as one autograd Function with a hand-written backward; in evaluation with population
            statistics, each BN site folded into a per-step scale and shift; the plain LSTM (``normalize=False``)
            through torch's fused LSTM kernel. With ``lengths`` the fast paths run on the batch sorted by length,
            each run of steps with the same number of real sequences on those rows only (as packed sequences; for
            the BN-LSTM a step with one real sequence normalized with population statistics, the rule of
            :mod:`~bnlstm_lit.nn.batchnorm`), except with ``compile_steps`` or ``sync_statistics`` for the BN-LSTM.
            False always runs the reference loop (the two agree to float rounding; tested).
        compile_steps: in the fused BN-LSTM training path, run each chunk of steps through ``torch.compile``d code
            (needs a C++ compiler on CPU, Triton on CUDA; compiles once per batch and hidden size, some seconds on
            first use). Measured on CPU: faster at small steps (sequential-MNIST shape), slower at the PTB shape,
            where the compiled code's matmul is MKL's rather than oneDNN's.
        native_kernel: in the fused paths on float32 CPU tensors (training without ``compile_steps``, and evaluation
            with population statistics without gradients), run each step's pointwise and batch-norm work -- the input
            term's per-step batch norm included -- as one call into a small C kernel (:mod:`bnlstm_lit.nn.kernel`),
            forward and backward, instead of some 14 torch ops forward and 25 backward (and the input term's
            normalization as separate passes over a (T, B, 4H) tensor): the recurrent matmul stays torch's (oneDNN).
            The kernel runs on torch's intra-op threads (OpenMP, results independent of their number). It is
            compiled on first use with the system C compiler (``$CC``, else ``cc``; about a second) into a per-user
            cache (``$BNLSTM_LIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/bnlstm_lit`` or ``~/.cache/bnlstm_lit``). Where
            it cannot be built (no compiler; one warning per process), on other devices and dtypes (float64, CUDA),
            under autocast for the input term (the recurrence itself runs in float32 there, through the kernel), and
            with ``native_kernel=False`` or the environment variable ``BNLSTM_LIT_KERNEL=0``, the eager fused steps
            run; all compute the same to float rounding (tested).
        bidirectional: a second direction per layer reads each sequence backwards -- with ``lengths``, only its
            unpadded part is reversed, so the backward direction starts at each sequence's last real step -- and
            the outputs of both directions are concatenated: (T, B, 2H). States are (num_layers * 2, B, H), layer
            major, forward first (torch.nn.LSTM's layout); per-step statistics of the backward direction are indexed
            by its own step count.
        backward_reversal: ``"unpadded"`` (default; the paper's BN-e**): the backward direction reverses each
            sequence's real part, so its step t is every sequence's t-th last real position; ``"padded"``: it
            reverses the whole padded tensor, as the original code before BN-e** did -- the padding comes first and
            its per-step statistics mix sequences at different relative positions (states still skip the padding).
        input_statistics: ``"per_step"`` (the BN-LSTM) or ``"sequence"``: the input term is normalized with one
            mean and variance per feature over all real positions of the batch (shared over time, padding excluded;
            the paper's BN-e*), the recurrent term and the cell keep per-step statistics.
        sync_statistics: under ``torch.distributed`` with several processes, normalize over the global batch in
            training (:func:`~bnlstm_lit.nn.batchnorm.set_sync_statistics`; runs the reference loop).
        cell: ``"lstm"`` (the BN-LSTM) or ``"tanh"`` (the BN tanh RNN of the paper's Fig. 1,
            :class:`~bnlstm_lit.nn.cell.BNRNNCell`, reference loop only; its ``c`` state is carried unchanged and
            ``c0`` is a zero buffer, not a parameter).

    Diagnostics: with ``probe_hidden_grad = True`` (set by :class:`~bnlstm_lit.callbacks.GradientFlow`), a forward
    pass with gradients enabled runs the reference loop and adds a zero tensor ``probe`` (T, B, H) to every h_t,
    one per layer, kept in ``hidden_probes``; after ``backward``, ``probe.grad[t]`` is the total dloss/dh_t (through
    the output at t and through every later step). :meth:`hidden_grad_norms` gives its batch-mean norm per step.

    Shapes:
        input (T, B, I) [or (B, T, I)], optional state (h_0, c_0) each (num_layers, B, H), optional lengths (B,).
        Returns output (T, B, H) [or (B, T, H)] of the last layer and (h_n, c_n) each (num_layers, B, H). With
        ``lengths``, padded steps leave the state unchanged and give zero outputs, so h_n/c_n are the states at each
        sequence's last real step (as with packed sequences), and padding takes no part in any statistic.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = DEFAULTS.num_layers,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = DEFAULTS.dropout,
        bidirectional: bool = False,
        *,
        max_steps: int = 1000,
        normalize: bool = DEFAULTS.normalize,
        gamma_init: GammaInit = DEFAULTS.gamma_init,
        eps: float = DEFAULTS.eps,
        momentum: float | None = DEFAULTS.momentum,
        forget_bias: float = DEFAULTS.forget_bias,
        recurrent_init: RecurrentInit = DEFAULTS.recurrent_init,
        h0_noise_std: float = DEFAULTS.h0_noise_std,
        cell: CellType = DEFAULTS.cell,
        input_statistics: InputStatistics = DEFAULTS.input_statistics,
        sync_statistics: bool = DEFAULTS.sync_statistics,
        backward_reversal: BackwardReversal = "unpadded",
        implementation: Implementation = DEFAULTS.implementation,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"BNLSTM: num_layers must be at least 1, got {num_layers}")
        if h0_noise_std < 0:
            raise ValueError(f"BNLSTM: h0_noise_std must be non-negative, got {h0_noise_std}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BNLSTM: dropout must be in [0, 1), got {dropout}")
        if cell not in CELLS:
            raise ValueError(f"BNLSTM: cell must be one of {sorted(CELLS)}, got {cell!r}")
        if backward_reversal not in ("unpadded", "padded"):
            raise ValueError(f"BNLSTM: backward_reversal must be 'unpadded' or 'padded', got {backward_reversal!r}")
        if input_statistics not in ("per_step", "sequence"):
            raise ValueError(f"BNLSTM: input_statistics must be 'per_step' or 'sequence', got {input_statistics!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"BNLSTM: implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"BNLSTM: bias must be a bool (torch.nn.LSTM's 4th positional argument), got {bias!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.max_steps = max_steps
        self.normalize = normalize
        self.h0_noise_std = h0_noise_std
        self.dropout = dropout
        self.bias = bias
        self.implementation = implementation
        self.fused = implementation != "reference"  # interim
        self.native_kernel = implementation != "eager"  # interim
        self.compile_steps = False  # interim
        self.cell = cell
        self.bidirectional = bidirectional
        self.input_statistics = input_statistics
        self.backward_reversal = backward_reversal
        directions = 2 if bidirectional else 1
        self.probe_hidden_grad = False
        self.hidden_probes: list[Tensor] = []
        self.cells: nn.ModuleList = nn.ModuleList(  # layer-major, forward direction first
            CELLS[cell](
                input_size if index < directions else directions * hidden_size,
                hidden_size,
                max_steps,
                normalize=normalize,
                gamma_init=gamma_init,
                eps=eps,
                momentum=momentum,
                forget_bias=forget_bias,
                recurrent_init=recurrent_init,
                input_statistics=input_statistics,
                bias=bias,
            )
            for index in range(num_layers * directions)
        )
        set_sync_statistics(self, sync_statistics)
        self.h0 = nn.Parameter(torch.zeros(num_layers * directions, hidden_size))  # learned initial state
        if cell == "lstm":
            self.c0 = nn.Parameter(torch.zeros(num_layers * directions, hidden_size))
        else:  # no memory cell: a parameter nothing reads would break DDP (unused parameters)
            self.register_buffer("c0", torch.zeros(num_layers * directions, hidden_size))
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @classmethod
    def from_settings(
        cls,
        input_size: int,
        settings: BNLSTMSettings,
        *,
        max_steps: int,
        batch_first: bool = False,
        bidirectional: bool = False,
        **overrides: Any,
    ) -> BNLSTM:
        """The layer a task or model declares with one :class:`~bnlstm_lit.nn.settings.BNLSTMSettings` group;
        ``overrides`` replace single settings (e.g. a model whose variant fixes ``input_statistics``)."""
        arguments = {**settings.layer_arguments(), **overrides}
        return cls(
            input_size, settings.hidden_size, batch_first=batch_first, bidirectional=bidirectional,
            max_steps=max_steps, **arguments,
        )  # fmt: skip

    def reset_parameters(self) -> None:
        for cell in self.cells:
            cell.reset_parameters()  # type: ignore[operator]
        with torch.no_grad():
            self.h0.zero_()
            self.c0.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}, "
            f"max_steps={self.max_steps}, normalize={self.normalize}, h0_noise_std={self.h0_noise_std}, "
            f"dropout={self.dropout}, bias={self.bias}, implementation={self.implementation!r}, cell={self.cell!r}, "
            f"bidirectional={self.bidirectional}, input_statistics={self.input_statistics!r}"
        )

    def initial_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The learned (h_0, c_0), expanded to (num_layers, B, H); h_0 gets Gaussian noise in training if set."""
        h0 = self.h0[:, None].expand(-1, batch_size, -1)
        c0 = self.c0[:, None].expand(-1, batch_size, -1)
        if self.training and self.h0_noise_std > 0:
            h0 = h0 + self.h0_noise_std * torch.randn_like(h0)
        return h0, c0

    def forward(
        self,
        input: Tensor,
        state: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | Sequence[int] | None = None,
        start_step: int = 0,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = self._check_input(input)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"BNLSTM: start_step must be a non-negative integer, got {start_step!r}")
        if self.batch_first:
            x = x.transpose(0, 1)  # (T, B, I)
        T, B, _ = x.shape
        mask = None if lengths is None else self._mask(lengths, T, B, x.device)  # (T, B) bool
        if self.bidirectional and start_step != 0:
            raise ValueError("BNLSTM: a bidirectional layer reads whole sequences; start_step must be 0")
        h0, c0 = self.initial_state(B) if state is None else self._check_state(state, B)
        probing = self.probe_hidden_grad and torch.is_grad_enabled()
        self.hidden_probes = []
        directions = 2 if self.bidirectional else 1
        # the backward direction reads each sequence's real part reversed: index[t, b] = L_b - 1 - t for t < L_b
        reverse = torch.empty(0)
        reverse_mask = mask
        if directions == 2:
            reverse = _reversal_index(mask if self.backward_reversal == "unpadded" else None, T, B, x.device)  # (T, B)
            reverse_mask = None if mask is None else mask.gather(0, reverse)  # "padded": the padding comes first
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0:
                x = nn.functional.dropout(x, self.dropout, self.training)
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                cell = self.cells[index]
                x_in = x if direction == 0 else _gather_time(x, reverse)
                mask_in = mask if direction == 0 else reverse_mask
                state_in = (h0[index], c0[index])
                if probing:  # diagnostics: the reference loop with a zero probe on every h_t
                    probe = x.new_zeros(T, B, self.hidden_size, requires_grad=True)
                    self.hidden_probes.append(probe)
                    out, (h, c) = self._run_layer(cell, x_in, state_in, mask_in, start_step, probe)  # type: ignore[arg-type]
                else:
                    # with lengths: the fast paths run the batch sorted by length (_PackedSteps)
                    fast = self.fused and cell.fast_paths
                    run = self._run_layer_fused if fast else self._run_layer
                    out, (h, c) = run(cell, x_in, state_in, mask_in, start_step)  # type: ignore[arg-type]
                outputs.append(out if direction == 0 else _gather_time(out, reverse))  # back in input order
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)  # (T, B, directions * H)
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, (torch.stack(h_n), torch.stack(c_n))

    def hidden_grad_norms(self) -> list[Tensor]:
        """After a probed forward and ``backward``: per layer, the batch mean of ||dloss/dh_t||_2 for every step,
        a (T,) tensor each (see the class docstring). Raises if no probed backward has run."""
        if not self.hidden_probes or any(p.grad is None for p in self.hidden_probes):
            raise RuntimeError(
                "BNLSTM.hidden_grad_norms: no gradient recorded; set probe_hidden_grad = True, run a forward pass "
                "with gradients enabled and call backward on a loss that depends on the output"
            )
        return [p.grad.detach().norm(dim=-1).mean(dim=1) for p in self.hidden_probes]  # type: ignore[union-attr]

    def _run_layer_fused(
        self, cell: BNLSTMCell, x: Tensor, state: tuple[Tensor, Tensor], mask: Tensor | None, start: int = 0
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The fast paths of :mod:`bnlstm_lit.nn.fused` where they apply, else the reference loop.

        With a mask (``lengths``) the BN-LSTM runs as :class:`_PackedSteps`: the batch sorted by length, each run of
        steps with the same number of real sequences through the unmasked fast paths on those rows only. The
        reference loop runs instead with ``compile_steps`` (a compiled function per run shape would recompile for
        every batch) and with ``sync_statistics`` (as without a mask)."""
        if not cell.normalize:  # the plain LSTM: torch's fused kernel, with a mask once per run of steps
            if mask is None:
                return plain_lstm(x, state, cell.weight_ih, cell.weight_hh, cell.bias)
            packed_plain = _PackedSteps.of(mask)
            if packed_plain is None:
                return self._run_layer(cell, x, state, mask, start)
            xs = packed_plain.pieces(x)

            def run_plain(index: int, t0: int, n: int, h: Tensor, c: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                return plain_lstm(xs[index][:, :n], (h, c), cell.weight_ih, cell.weight_hh, cell.bias)

            return packed_plain.run(run_plain, state)
        bn_h, bn_c = cell.bn_h, cell.bn_c
        assert bn_h is not None and bn_c is not None and bn_h.weight is not None and bn_c.weight is not None
        if bn_c.bias is None or bn_h.eps != bn_c.eps:
            return self._run_layer(cell, x, state, mask, start)
        packed = None
        if mask is not None:
            packed = None if self.compile_steps else _PackedSteps.of(mask)
            if packed is None:
                return self._run_layer(cell, x, state, mask, start)
        if not (cell.training or bn_h.training or bn_c.training):
            if bn_h.eval_statistics != "population" or bn_c.eval_statistics != "population":
                return self._run_layer(cell, x, state, mask, start)  # batch statistics in evaluation
            return self._run_layer_population(cell, x, state, start, self.native_kernel, packed)
        if not (cell.training and bn_h.training and bn_c.training):
            return self._run_layer(cell, x, state, mask, start)  # sites in mixed modes
        if bn_h.syncing() or bn_c.syncing():
            return self._run_layer(cell, x, state, mask, start)  # statistics all-reduced over processes
        T, B, _ = x.shape
        bn_h.check_batch_statistics(start, T, B)
        if packed is not None:
            return self._run_layer_packed(cell, x, state, mask, start, packed)
        bn_x = cell.bn_x
        if self._kernel_input_norm(cell, x):  # the input term's batch norm inside the kernel's steps
            assert bn_x is not None and bn_x.weight is not None
            bn_x.check_batch_statistics(start, T, B)
            outputs, final, (mean_h, var_h, mean_c, var_c), (mean_x, var_x) = input_norm_recurrence(
                x, state, cell.weight_hh, bn_h.weight, bn_c.weight, bn_c.bias, bn_x.weight, cell.bias, bn_h.eps,
                bn_x.eps, cell.weight_ih,
            )  # fmt: skip
            bn_x._update_running_stats(start, mean_x, var_x, None)
            bn_h._update_running_stats(start, mean_h, var_h, None)
            bn_c._update_running_stats(start, mean_c, var_c, None)
            return outputs, final
        x_terms = cell.input_term(x, None, start)  # (T, B, 4H), its own statistics kept by bn_x
        outputs, final, (mean_h, var_h, mean_c, var_c) = fused_recurrence(
            x_terms, state, cell.weight_hh, bn_h.weight, bn_c.weight, bn_c.bias, bn_h.eps, self.compile_steps,
            self.native_kernel,
        )  # fmt: skip
        bn_h._update_running_stats(start, mean_h, var_h, None)
        bn_c._update_running_stats(start, mean_c, var_c, None)
        return outputs, final

    def _kernel_input_norm(self, cell: BNLSTMCell, x: Tensor) -> bool:
        """The training step can run the input term's per-step batch norm inside the native kernel: float32 CPU
        without autocast, per-step input statistics (not ``input_statistics="sequence"``), not synchronized."""
        bn_x = cell.bn_x
        if not self.native_kernel or self.compile_steps or bn_x is None or bn_x.weight is None:
            return False
        if bn_x.bias is not None or bn_x.shared_over_time or not bn_x.training or bn_x.syncing():
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        return native.usable(x, cell.weight_ih, cell.weight_hh, cell.bias, bn_x.weight)

    def _run_layer_packed(
        self,
        cell: BNLSTMCell,
        x: Tensor,
        state: tuple[Tensor, Tensor],
        mask: Tensor | None,
        start: int,
        packed: _PackedSteps,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Training with a mask: each run of steps with n >= 2 real sequences through the fused recurrence on those
        n rows (their batch statistics are the masked statistics of the step), and steps with one real sequence
        with population statistics, as :class:`SequenceBatchNorm` does, without updating them.

        The input term: where the native kernel normalizes it (:meth:`_kernel_input_norm`: float32 CPU, per-step
        input statistics), W_x x for the whole sequence up front and each run's BN_t(W_x x_t) + b inside the kernel's
        steps (:func:`input_norm_recurrence` on the run's n rows; population statistics for steps with one real
        sequence); else up front with masked statistics, as the reference loop computes it (the rule for steps with
        fewer than two real sequences and ``input_statistics="sequence"`` included)."""
        bn_x, bn_h, bn_c = cell.bn_x, cell.bn_h, cell.bn_c
        assert bn_h is not None and bn_c is not None and bn_c.weight is not None and bn_c.bias is not None
        assert bn_h.weight is not None
        gamma_h, gamma_c, beta_c = bn_h.weight, bn_c.weight, bn_c.bias
        input_norm = self._kernel_input_norm(cell, x)
        with deferred_statistics_updates(cell):
            if input_norm:  # the kernel computes and normalizes each run's input term W_x x_t
                assert bn_x is not None and bn_x.weight is not None
                bn_x.check_batch_statistics(start, x.shape[0], x.shape[1])
                gamma_x = bn_x.weight
                x_terms = packed.pieces(x)  # (K, B, I) per run, sorted
            else:
                x_terms = packed.pieces(cell.input_term(x, mask, start))

            def run(index: int, t0: int, n: int, h: Tensor, c: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                x_n = x_terms[index][:, :n]
                if n < 2:  # too few real sequences for batch statistics: population statistics (batchnorm.py)
                    if input_norm:
                        assert bn_x is not None
                        wx_n = x_n @ cell.weight_ih.t()
                        x_n = bn_x._normalize_with(wx_n, *bn_x._population(start + t0, x_n.shape[0])) + cell.bias
                    return _population_statistics_steps(cell, x_n, (h, c), start + t0)
                if input_norm:
                    assert bn_x is not None
                    outputs, final, (mean_h, var_h, mean_c, var_c), (mean_x, var_x) = input_norm_recurrence(
                        x_n, (h, c), cell.weight_hh, gamma_h, gamma_c, beta_c, gamma_x, cell.bias, bn_h.eps, bn_x.eps,
                        cell.weight_ih,
                    )  # fmt: skip
                    bn_x._update_running_stats(start + t0, mean_x, var_x, None)
                else:
                    outputs, final, (mean_h, var_h, mean_c, var_c) = fused_recurrence(
                        x_n, (h, c), cell.weight_hh, gamma_h, gamma_c, beta_c, bn_h.eps, False,
                        self.native_kernel,
                    )  # fmt: skip
                bn_h._update_running_stats(start + t0, mean_h, var_h, None)
                bn_c._update_running_stats(start + t0, mean_c, var_c, None)
                return outputs, final

            return packed.run(run, state)

    @staticmethod
    def _run_layer_population(
        cell: BNLSTMCell,
        x: Tensor,
        state: tuple[Tensor, Tensor],
        start: int,
        kernel: bool = True,
        packed: _PackedSteps | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Evaluation with population statistics, each BN site folded into a per-step scale and shift; with
        ``packed`` (a mask), each run of steps on its real rows of the batch sorted by length."""
        bn_x, bn_h, bn_c = cell.bn_x, cell.bn_h, cell.bn_c
        assert bn_x is not None and bn_h is not None and bn_c is not None
        T = x.shape[0]

        def scale_shift(bn: SequenceBatchNorm) -> tuple[Tensor, Tensor]:
            """BN_t(v) = v * scale_t + shift_t with population statistics: (T, C) each (rows beyond max_steps reuse
            the last step's statistics)."""
            mean, var = bn._population(start, T)
            scale = torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -mean * scale
            return scale, shift if bn.bias is None else shift + bn.bias

        scale_x, shift_x = scale_shift(bn_x)
        scale_h, shift_h = scale_shift(bn_h)
        scale_c, shift_c = scale_shift(bn_c)
        tensors = (x, cell.weight_ih, cell.weight_hh, scale_x, scale_h, scale_c, *state)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, cell.bias, shift_x, shift_h))
        if kernel and not grad and not torch.is_autocast_enabled(x.device.type) and native.usable(*tensors):
            # the input term folded into the kernel's steps too, W_x x_t computed a chunk of steps at a time: no
            # (T, B, 4H) tensor
            shift = shift_x + shift_h + cell.bias
            if packed is None:
                return native.population_kernel_recurrence(
                    x, *state, cell.weight_hh, scale_x, shift, scale_h, scale_c, shift_c, cell.weight_ih
                )
            xs = packed.pieces(x)

            def run_kernel(index: int, t0: int, n: int, h: Tensor, c: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                steps = slice(t0, t0 + xs[index].shape[0])
                return native.population_kernel_recurrence(
                    xs[index][:, :n], h, c, cell.weight_hh, scale_x[steps], shift[steps], scale_h[steps],
                    scale_c[steps], shift_c[steps], cell.weight_ih,
                )  # fmt: skip

            return packed.run(run_kernel, state)
        # BN_t(W_x x_t) + b + (the recurrent term's shift): one matmul and one fused pass over (T, B, 4H)
        x_terms = torch.addcmul((shift_x + shift_h + cell.bias)[:, None], x @ cell.weight_ih.t(), scale_x[:, None])
        if packed is None:
            return population_recurrence(x_terms, state, cell.weight_hh, scale_h, scale_c, shift_c, kernel)
        pieces = packed.pieces(x_terms)

        def run(index: int, t0: int, n: int, h: Tensor, c: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            steps = slice(t0, t0 + pieces[index].shape[0])
            return population_recurrence(
                pieces[index][:, :n], (h, c), cell.weight_hh, scale_h[steps], scale_c[steps], shift_c[steps], kernel
            )

        return packed.run(run, state)

    @staticmethod
    def _run_layer(
        cell: BNLSTMCell | BNRNNCell,
        x: Tensor,
        state: tuple[Tensor, Tensor],
        mask: Tensor | None,
        start: int = 0,
        probe: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The time loop of one layer: (T, B, I) -> output (T, B, H), final (h, c); row t is time step start + t.

        ``probe`` (T, B, H) of zeros, if given, is added to every h_t (diagnostics: its gradient is dloss/dh_t)."""
        # (T, B, 4H), hoisted out of the loop. unbind, not x_terms[t]: the backward of T separate index ops would
        # build T full-size zero gradients (O(T^2) memory traffic), unbind's is one stack.
        x_terms = cell.input_term(x, mask, start).unbind(0)
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

    # ---- input checks: clear errors that name the problem ------------------------------------------------------
    def _check_input(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"BNLSTM expects a tensor input, got {type(input).__name__}")
        layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
        if input.dim() != 3:
            raise ValueError(
                f"BNLSTM expects a 3-D input {layout} with I={self.input_size}, got a {input.dim()}-D tensor of "
                f"shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"BNLSTM was built with input_size={self.input_size}, but the input {layout} has "
                f"{input.shape[-1]} features (shape {tuple(input.shape)})"
            )
        if 0 in input.shape[:2]:
            raise ValueError(f"BNLSTM got an empty input of shape {tuple(input.shape)}")
        if not input.is_floating_point():
            raise TypeError(f"BNLSTM expects a floating-point input, got {input.dtype}")
        return input

    def _check_state(self, state: tuple[Tensor, Tensor], batch_size: int) -> tuple[Tensor, Tensor]:
        expected = (self.num_layers * (2 if self.bidirectional else 1), batch_size, self.hidden_size)
        h0, c0 = state
        if tuple(h0.shape) != expected or tuple(c0.shape) != expected:
            layers = "num_layers * 2" if self.bidirectional else "num_layers"
            raise ValueError(
                f"BNLSTM state must be (h_0, c_0) each of shape ({layers}, B, H) = {expected}, got "
                f"{tuple(h0.shape)} and {tuple(c0.shape)}"
            )
        return h0, c0

    @staticmethod
    def _mask(lengths: Tensor | Sequence[int], T: int, B: int, device: torch.device) -> Tensor:
        lengths = torch.as_tensor(lengths)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be integers, got {lengths.dtype}")
        if bool((lengths < 1).any()) or bool((lengths > T).any()):
            lo, hi = int(lengths.min()), int(lengths.max())
            raise ValueError(f"every length must be in [1, T={T}], got lengths from {lo} to {hi}")
        return torch.arange(T, device=device)[:, None] < lengths.to(device)[None, :]  # (T, B)


class _PackedSteps:
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
    def of(cls, mask: Tensor) -> _PackedSteps | None:
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


def _population_statistics_steps(
    cell: BNLSTMCell, x_terms: Tensor, state: tuple[Tensor, Tensor], t: int
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Training steps t, t+1, ... of fewer than two real sequences (x_terms (K, n, 4H), n < 2): the recurrent term and
    the cell normalized with their population statistics (SequenceBatchNorm's rule; no update), as the reference
    loop does, differentiable (plain torch ops)."""
    bn_h, bn_c = cell.bn_h, cell.bn_c
    assert bn_h is not None and bn_c is not None
    h, c = state
    outputs = []
    for k, x_t in enumerate(x_terms.unbind(0)):
        wh = bn_h._normalize_with((h @ cell.weight_hh.t())[None], *bn_h._population(t + k, 1))[0]
        i, f, g, o = (wh + x_t).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn_c._normalize_with(c[None], *bn_c._population(t + k, 1))[0])
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def _reversal_index(mask: Tensor | None, T: int, B: int, device: torch.device) -> Tensor:
    """(T, B) time indices that reverse each sequence's real part and leave its padding in place."""
    t = torch.arange(T, device=device)[:, None].expand(T, B)
    if mask is None:
        return (T - 1 - t).contiguous()
    lengths = mask.sum(0)[None, :]  # (1, B)
    return torch.where(t < lengths, lengths - 1 - t, t)


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    """x (T, B, C) reordered along time per sequence: out[t, b] = x[index[t, b], b] (an involution for reversals)."""
    return x.gather(0, index[:, :, None].expand(-1, -1, x.shape[-1]))
