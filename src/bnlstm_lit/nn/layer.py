"""The BN-LSTM layer: the API of ``torch.nn.LSTM``, the stack of layers and directions, the learned initial state.

Which implementation runs each layer is decided in one place, :mod:`bnlstm_lit.nn.dispatch`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from bnlstm_lit.nn import dispatch
from bnlstm_lit.nn.batchnorm import set_sync_statistics
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

IMPLEMENTATIONS = get_args(Implementation)
BackwardReversal = Literal["unpadded", "padded"]
CELLS: dict[str, type[BNLSTMCell] | type[BNRNNCell]] = {"lstm": BNLSTMCell, "tanh": BNRNNCell}


class BNLSTM(nn.Module):
    """Multi-layer batch-normalized LSTM (Cooijmans et al. 2017), a drop-in for ``torch.nn.LSTM``.

    Positional arguments in ``torch.nn.LSTM``'s order (``input_size, hidden_size, num_layers, bias, batch_first,
    dropout, bidirectional``), the batch-norm options keyword-only; ``device=``/``dtype=`` as torch's modules. A
    ``PackedSequence`` input gives a ``PackedSequence`` output; :meth:`from_lstm` builds the layer from an existing
    ``nn.LSTM`` (weights copied, the two biases summed), which with ``normalize=False`` computes what it computes.
    The settings a task declares come as one group, :class:`~bnlstm_lit.nn.settings.BNLSTMSettings`
    (:meth:`from_settings`); the defaults below are its defaults.

    Args:
        input_size: I, features per step of the input.
        hidden_size: H.
        num_layers: stacked layers; layer l > 0 reads layer l-1's outputs.
        bias: False: no bias b (fixed at 0, no forget bias), as ``torch.nn.LSTM(bias=False)``.
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
        implementation: ``"auto"`` (default) runs the fastest implementation that applies -- on float32 CPU the
            native kernel (:mod:`bnlstm_lit.nn.native`; compiled on first use with the system C compiler, about a
            second, into ``$BNLSTM_LIT_CACHE_DIR`` or ``~/.cache/bnlstm_lit``; ``BNLSTM_LIT_KERNEL=0`` turns it
            off), elsewhere the eager fused recurrence, torch's fused LSTM for ``normalize=False``, with ``lengths``
            on the batch sorted by length (:mod:`bnlstm_lit.nn.dispatch` says which runs when). ``"reference"``
            always runs the readable time loop, which every fast path equals to float rounding (tested), and which
            alone supports double backward; ``"eager"`` never the native kernel; ``"native"`` requires it.
        device, dtype: where and in which precision the parameters and buffers are created.

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

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, *, max_steps: int = 1000, normalize: bool = False, **options: Any) -> BNLSTM:
        """A layer with the architecture and the weights of an existing ``torch.nn.LSTM`` (each layer's two biases
        summed into b). With ``normalize=False`` (default) it computes what ``lstm`` computes, to float rounding;
        with ``normalize=True`` it is a BN-LSTM started from those weights. ``options``: further keyword
        arguments of the constructor (``max_steps`` included). ``proj_size`` is not supported."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"BNLSTM.from_lstm expects a torch.nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise ValueError(f"BNLSTM.from_lstm: an LSTM with projections (proj_size={lstm.proj_size}) is unsupported")
        weight: Tensor = lstm.weight_ih_l0  # type: ignore[assignment]
        layer = cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first, float(lstm.dropout),
            lstm.bidirectional, max_steps=max_steps, normalize=normalize, device=weight.device, dtype=weight.dtype,
            **options,
        )  # fmt: skip
        layer.load_lstm_state_dict(lstm.state_dict())
        return layer

    def load_lstm_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy the weights of a ``torch.nn.LSTM`` state dict (``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}``,
        ``bias_ih_l{k}`` + ``bias_hh_l{k}``) into this layer's cells; the learned initial state is set to zero (as
        ``nn.LSTM``'s default state). Shapes must match; missing or unexpected keys are an error naming them."""
        directions = 2 if self.bidirectional else 1
        expected = set()
        with torch.no_grad():
            for index, cell in enumerate(self.cells):
                layer, direction = divmod(index, directions)
                suffix = f"l{layer}" + ("_reverse" if direction else "")
                names = [f"weight_ih_{suffix}", f"weight_hh_{suffix}"]
                if self.bias:
                    names += [f"bias_ih_{suffix}", f"bias_hh_{suffix}"]
                expected.update(names)
                missing = [name for name in names if name not in state_dict]
                if missing:
                    raise KeyError(f"BNLSTM.load_lstm_state_dict: missing {missing}")
                targets: tuple[Tensor, Tensor] = (cell.weight_ih, cell.weight_hh)  # type: ignore[assignment]
                for name, target in zip(names[:2], targets, strict=True):
                    if tuple(state_dict[name].shape) != tuple(target.shape):
                        raise ValueError(
                            f"BNLSTM.load_lstm_state_dict: {name} has shape {tuple(state_dict[name].shape)}, this "
                            f"layer's is {tuple(target.shape)}"
                        )
                    target.copy_(state_dict[name])
                if self.bias:
                    bias: Tensor = cell.bias  # type: ignore[assignment]
                    bias.copy_(state_dict[names[2]] + state_dict[names[3]])
            unexpected = sorted(set(state_dict) - expected)
            if unexpected:
                raise KeyError(f"BNLSTM.load_lstm_state_dict: unexpected keys {unexpected}")
            self.h0.zero_()
            self.c0.zero_()

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
        input: Tensor | PackedSequence,
        state: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | Sequence[int] | None = None,
        start_step: int = 0,
    ) -> tuple[Any, tuple[Tensor, Tensor]]:
        """input (T, B, I) [or (B, T, I)] or a ``PackedSequence`` -> (output, (h_n, c_n)); see the class docstring."""
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, state, lengths, start_step)
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
                probe = None
                if probing:  # diagnostics: a zero probe on every h_t (the dispatcher runs the reference loop)
                    probe = x.new_zeros(T, B, self.hidden_size, requires_grad=True)
                    self.hidden_probes.append(probe)
                run = dispatch.run_layer
                out, (h, c) = run(cell, x_in, state_in, mask_in, start_step, self.implementation, probe)
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

    def _forward_packed(
        self,
        packed: PackedSequence,
        state: tuple[Tensor, Tensor] | None,
        lengths: Tensor | Sequence[int] | None,
        start_step: int,
    ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]:
        """A ``PackedSequence`` input, as ``torch.nn.LSTM``: the same packing out, states in the batch's order."""
        if lengths is not None:
            raise ValueError("BNLSTM: a PackedSequence carries its lengths; do not pass lengths as well")
        padded, packed_lengths = pad_packed_sequence(packed, batch_first=self.batch_first)  # batch in input order
        out, final = self.forward(padded, state, packed_lengths, start_step)
        batch_dim = 0 if self.batch_first else 1
        if packed.sorted_indices is not None:  # the packing's order: longest first
            out = out.index_select(batch_dim, packed.sorted_indices.to(out.device))
            packed_lengths = packed_lengths[packed.sorted_indices.cpu()]
        data = pack_padded_sequence(out, packed_lengths, batch_first=self.batch_first, enforce_sorted=True).data
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), final

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
