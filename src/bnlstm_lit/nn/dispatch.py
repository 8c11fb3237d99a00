"""The one place that decides which implementation runs a layer, and runs it.

:func:`choose` looks at the cell, the input, the mode of the batch-norm sites and the layer's ``implementation``
setting once per layer call and returns a :class:`Plan`; :func:`run_layer` carries it out. The implementations are
leaves that never call back into the layer or each other:

========================  ===========================================================================================
``reference``             :mod:`bnlstm_lit.nn.reference`, the readable time loop (any cell, masks, synchronized
                          statistics, gradient probes, double backward); every fast path is tested against it
``plain``                 :mod:`bnlstm_lit.nn.plain`, torch's fused LSTM, for the baseline (``normalize=False``)
``eager``                 :mod:`bnlstm_lit.nn.eager`, the fused recurrence in torch ops (any device and dtype)
``native``                :mod:`bnlstm_lit.nn.native`, the C kernel as torch custom ops (float32 CPU)
``triton``                :mod:`bnlstm_lit.nn.triton_steps`, one Triton kernel per step forward and backward, for
                          batch statistics on CUDA (population statistics there run ``eager``)
========================  ===========================================================================================

Every mode of the BN sites has a fast path: ``"train"`` (batch statistics recorded into the running averages:
training, and the population-statistics estimation pass, which runs with no gradient), ``"batch"`` (evaluation with
batch statistics) and ``"population"`` (evaluation with population statistics, each site folded into a per-step
scale and shift). With a mask (``lengths``) the fast paths run as :class:`~bnlstm_lit.nn.packed.PackedSteps`: the
batch sorted by length, each run of steps with the same number n of real sequences on those n rows; steps with one
real sequence are normalized with population statistics (:class:`~bnlstm_lit.nn.batchnorm.SequenceBatchNorm`'s rule).

The reference loop runs where no fast path applies: the tanh cell, a gradient probe, BN sites in different modes,
synchronized statistics in training, a mask whose real positions are not a prefix of the sorted batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from bnlstm_lit.nn import eager, native, plain, reference, triton_steps
from bnlstm_lit.nn.batchnorm import SequenceBatchNorm, deferred_statistics_updates
from bnlstm_lit.nn.cell import BNLSTMCell
from bnlstm_lit.nn.packed import PackedSteps
from bnlstm_lit.nn.settings import Implementation

__all__ = ["Plan", "choose", "run_layer"]

Path = Literal["reference", "plain", "eager", "native", "triton"]
Statistics = Literal["train", "batch", "population", "none"]
State = tuple[Tensor, Tensor]
Result = tuple[Tensor, State]


@dataclass(frozen=True)
class Plan:
    """What runs one layer call.

    Attributes:
        path: the implementation (module docstring).
        statistics: the BN sites' statistics (``"none"`` for the plain LSTM and the reference loop, which the sites
            handle themselves).
        input_in_kernel: native path only: the input term's per-step batch norm inside the kernel's steps and W_x x_t
            computed one chunk of steps at a time (no (T, B, 4H) tensor); else the input term is computed up front.
        packed: the runs of a masked batch, or None.
        reason: why the reference loop runs (empty otherwise).
    """

    path: Path
    statistics: Statistics = "none"
    input_in_kernel: bool = False
    packed: PackedSteps | None = None
    reason: str = ""


def _reference(reason: str) -> Plan:
    return Plan("reference", reason=reason)


def choose(
    cell: nn.Module,
    x: Tensor,
    state: State,
    mask: Tensor | None,
    implementation: Implementation,
    probing: bool = False,
) -> Plan:
    """The plan for one layer call: x (T, B, I), state (h_0, c_0) (B, H) each, mask (T, B) bool or None."""
    if implementation == "reference":
        return _reference("implementation='reference'")
    if probing:
        return _reference("a gradient probe (diagnostics)")
    if not getattr(cell, "fast_paths", False):
        return _reference(f"{type(cell).__name__} has no fast path")
    assert isinstance(cell, BNLSTMCell)
    if not cell.normalize:
        packed = None if mask is None else PackedSteps.of(mask)
        if mask is not None and packed is None:
            return _reference("a mask whose real positions are not a prefix of the sorted batch")
        return Plan("plain", packed=packed)
    bn_x, bn_h, bn_c = cell.bn_x, cell.bn_h, cell.bn_c
    assert bn_x is not None and bn_h is not None and bn_c is not None
    if bn_c.bias is None or bn_h.weight is None or bn_c.weight is None or bn_h.eps != bn_c.eps:
        return _reference("batch-norm sites configured unlike the BN-LSTM's")
    statistics = bn_h.statistics()
    if bn_c.statistics() != statistics or bn_x.statistics() != statistics:
        return _reference("batch-norm sites in different modes")
    if statistics == "train" and (bn_x.syncing() or bn_h.syncing() or bn_c.syncing()):
        return _reference("statistics synchronized over processes")
    packed = None
    if mask is not None:
        packed = PackedSteps.of(mask)
        if packed is None:
            return _reference("a mask whose real positions are not a prefix of the sorted batch")
    autocast = torch.is_autocast_enabled(x.device.type)
    native_ok = _native_applies(cell, x, implementation)  # after the plain LSTM: it never needs the kernel built
    if statistics == "population":
        tensors = (x, *state, *cell.parameters())
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if native_ok and not grad and not autocast:
            return Plan("native", statistics, input_in_kernel=True, packed=packed)
        return Plan("eager", statistics, packed=packed)
    if native_ok:
        input_in_kernel = bn_x.weight is not None and bn_x.bias is None and not bn_x.shared_over_time
        return Plan("native", statistics, input_in_kernel=input_in_kernel and not autocast, packed=packed)
    if _triton_applies(x, implementation):
        return Plan("triton", statistics, packed=packed)
    return Plan("eager", statistics, packed=packed)


def _native_applies(cell: BNLSTMCell, x: Tensor, implementation: Implementation) -> bool:
    """The native kernel runs this layer: float32 CPU parameters and input (or autocast), the library available, and
    ``implementation`` "auto" or "native". ``implementation="native"`` where it cannot run is an error."""
    if implementation not in ("auto", "native"):
        return False
    floating = x.dtype == torch.float32 or torch.is_autocast_enabled(x.device.type)
    ok = x.device.type == "cpu" and floating and native.usable(cell.weight_ih, cell.weight_hh, cell.bias)
    if implementation == "native" and not ok:
        raise ValueError(
            f"BNLSTM(implementation='native'): the native kernel runs float32 CPU tensors with the kernel library "
            f"available, got a {x.dtype} input on {x.device} with {cell.weight_hh.dtype} parameters (library "
            f"available: {native.usable()}); use implementation='auto'"
        )
    return ok


def _triton_applies(x: Tensor, implementation: Implementation) -> bool:
    """The Triton steps run this layer's batch statistics: a CUDA input with triton available (``"auto"``), or
    ``implementation="triton"`` (which also runs under the Triton interpreter on CPU; where it cannot run, an
    error). B is bounded by one program's registers (``triton_steps.MAX_BATCH``)."""
    if implementation == "triton":
        if not triton_steps.available() or x.shape[1] > triton_steps.MAX_BATCH:
            raise ValueError(
                f"BNLSTM(implementation='triton'): needs triton with a CUDA device (or the Triton interpreter) and a "
                f"batch of at most {triton_steps.MAX_BATCH}, got a batch of {x.shape[1]} on {x.device} (triton "
                f"available: {triton_steps.available()}); use implementation='auto'"
            )
        return True
    if implementation != "auto" or x.device.type != "cuda" or x.shape[1] > triton_steps.MAX_BATCH:
        return False
    return triton_steps.available()


def run_layer(
    cell: nn.Module,
    x: Tensor,
    state: State,
    mask: Tensor | None,
    start: int,
    implementation: Implementation,
    probe: Tensor | None = None,
) -> Result:
    """One layer (one direction) over x (T, B, I) from state (h_0, c_0) (B, H) each: outputs (T, B, H), zero at
    padded positions, and the final (h, c) (each sequence's state at its last real step). Row t is step start + t."""
    plan = choose(cell, x, state, mask, implementation, probing=probe is not None)
    if plan.path == "reference":
        return reference.run(cell, x, state, mask, start, probe)
    assert isinstance(cell, BNLSTMCell)
    if plan.path == "plain":
        return _plain(cell, x, state, plan.packed)
    if plan.statistics == "population":
        return _population(cell, x, state, start, plan)
    return _batch_statistics(cell, x, state, mask, start, plan)


def _runs(packed: PackedSteps | None, state: State, run: Callable[[int, int, int, Tensor, Tensor], Result]) -> Result:
    """``run(index, t0, n, h, c)`` over the whole batch, or over every run of a masked batch."""
    if packed is None:
        return run(0, 0, state[0].shape[0], *state)
    return packed.run(run, state)


def _pieces(packed: PackedSteps | None, x: Tensor) -> tuple[Tensor, ...]:
    return (x,) if packed is None else packed.pieces(x)


def _plain(cell: BNLSTMCell, x: Tensor, state: State, packed: PackedSteps | None) -> Result:
    xs = _pieces(packed, x)

    def run(index: int, t0: int, n: int, h: Tensor, c: Tensor) -> Result:
        return plain.run(xs[index][:, :n], (h, c), cell.weight_ih, cell.weight_hh, cell.bias)

    return _runs(packed, state, run)


def _population(cell: BNLSTMCell, x: Tensor, state: State, start: int, plan: Plan) -> Result:
    """Population statistics: each BN site an affine map per step, folded into the steps."""
    bn_x, bn_h, bn_c = _sites(cell)
    T = x.shape[0]
    scale_x, shift_x = bn_x.affine(start, T)
    scale_h, shift_h = bn_h.affine(start, T)
    scale_c, shift_c = bn_c.affine(start, T)
    shift = shift_x + shift_h + cell.bias  # the input term's shift, b and the recurrent term's shift: (T, 4H)
    if plan.path == "native":  # W_x x_t computed a chunk of steps at a time inside: no (T, B, 4H) tensor
        xs = _pieces(plan.packed, x)

        def run_native(index: int, t0: int, n: int, h: Tensor, c: Tensor) -> Result:
            steps = slice(t0, t0 + xs[index].shape[0])
            return native.population(
                xs[index][:, :n], h, c, cell.weight_hh, scale_x[steps], shift[steps], scale_h[steps],
                scale_c[steps], shift_c[steps], cell.weight_ih,
            )  # fmt: skip

        return _runs(plan.packed, state, run_native)
    # BN_t(W_x x_t) + b + the recurrent term's shift: one matmul and one fused pass over (T, B, 4H)
    x_terms = _pieces(plan.packed, torch.addcmul(shift[:, None], x @ cell.weight_ih.t(), scale_x[:, None]))

    def run_eager(index: int, t0: int, n: int, h: Tensor, c: Tensor) -> Result:
        steps = slice(t0, t0 + x_terms[index].shape[0])
        return eager.population(
            x_terms[index][:, :n], (h, c), cell.weight_hh, scale_h[steps], scale_c[steps], shift_c[steps]
        )

    return _runs(plan.packed, state, run_eager)


def _batch_statistics(cell: BNLSTMCell, x: Tensor, state: State, mask: Tensor | None, start: int, plan: Plan) -> Result:
    """Batch statistics (``"train"``: recorded into the running statistics; ``"batch"``: not)."""
    bn_x, bn_h, bn_c = _sites(cell)
    T, B, _ = x.shape
    record = plan.statistics == "train"
    bn_h.check_batch_statistics(start, T, B)
    with deferred_statistics_updates(cell):  # a masked batch's runs recorded in order, once
        if plan.input_in_kernel:  # the kernel normalizes each run's input term W_x x_t itself
            bn_x.check_batch_statistics(start, T, B)
            x_terms = _pieces(plan.packed, x)  # (K, B, I) per run
        else:  # the input term up front, its statistics kept by bn_x (masked, as the reference loop)
            x_terms = _pieces(plan.packed, cell.input_term(x, mask, start))

        def run(index: int, t0: int, n: int, h: Tensor, c: Tensor) -> Result:
            x_n = x_terms[index][:, :n]
            if n < 2:  # too few real sequences for batch statistics: population statistics (batchnorm.py)
                if plan.input_in_kernel:
                    wx = x_n @ cell.weight_ih.t()
                    x_n = bn_x.normalize_with(wx, *bn_x.population(start + t0, x_n.shape[0])) + cell.bias
                return reference.population_steps(cell, x_n, (h, c), start + t0)
            if plan.path == "native":
                outputs, c_last, stats = _native_recurrence(cell, x_n, h, c, plan.input_in_kernel)
            elif plan.path == "triton":
                outputs, c_last, stats = triton_steps.recurrence(
                    x_n, h, c, cell.weight_hh, *_bn_parameters(cell), bn_h.eps
                )
            else:
                outputs, c_last, stats = eager.recurrence(x_n, h, c, cell.weight_hh, *_bn_parameters(cell), bn_h.eps)
            if record:
                bn_h.record(start + t0, stats[0], stats[1])
                bn_c.record(start + t0, stats[2], stats[3])
                if plan.input_in_kernel:
                    bn_x.record(start + t0, stats[4], stats[5])
            return outputs, (outputs[-1], c_last)

        return _runs(plan.packed, state, run)


def _native_recurrence(
    cell: BNLSTMCell, x_n: Tensor, h: Tensor, c: Tensor, input_in_kernel: bool
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    bn_x, bn_h, _ = _sites(cell)
    if input_in_kernel:
        return native.recurrence(
            x_n, h, c, cell.weight_hh, *_bn_parameters(cell), bn_h.eps, gamma_x=bn_x.weight, bias=cell.bias,
            eps_x=bn_x.eps, weight_ih=cell.weight_ih,
        )  # fmt: skip
    # the input term given (shared-over-time statistics, or autocast): the recurrence in float32
    with torch.autocast(x_n.device.type, enabled=False):
        return native.recurrence(x_n.float(), h.float(), c.float(), cell.weight_hh, *_bn_parameters(cell), bn_h.eps)


def _sites(cell: BNLSTMCell) -> tuple[SequenceBatchNorm, SequenceBatchNorm, SequenceBatchNorm]:
    bn_x, bn_h, bn_c = cell.bn_x, cell.bn_h, cell.bn_c
    assert bn_x is not None and bn_h is not None and bn_c is not None
    return bn_x, bn_h, bn_c


def _bn_parameters(cell: BNLSTMCell) -> tuple[Tensor, Tensor, Tensor]:
    """γ_h, γ_c, β_c."""
    _, bn_h, bn_c = _sites(cell)
    assert bn_h.weight is not None and bn_c.weight is not None and bn_c.bias is not None
    return bn_h.weight, bn_c.weight, bn_c.bias
