"""The matmuls of the fast paths: x @ W^T through oneDNN where the build has it, the weight optionally reordered once
per sequence into oneDNN's blocked layout. Shared by :mod:`~bnlstm_lit.nn.eager` and :mod:`~bnlstm_lit.nn.native`.

oneDNN's matmul is the one torch's fused CPU LSTM uses: on some CPUs (AMD, where MKL's sgemm takes a slow path) about
twice as fast as ``torch.mm`` at the BN-LSTM's shapes. It is a private op of x86 builds, so it is used only where it
exists, on float32 CPU tensors, and never under autograd (it has no derivative).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["linear", "step_matmul"]

_state: dict[str, bool] = {}  # "no_onednn": the private op refused these inputs once; "no_packing": likewise

#: Sequences of fewer steps keep the weight in the plain layout: the reorder costs about as much as some tens of small
#: step matmuls (measured ~100 us at B=32, H=64), more than its gain over a few steps (the runs of a masked batch).
PACK_MIN_STEPS = 16


_MKLDNN = getattr(torch.ops, "mkldnn", None)
_OPS = (getattr(_MKLDNN, "_linear_pointwise", None), getattr(_MKLDNN, "_reorder_linear_weight", None))


def _ops() -> tuple[object | None, object | None]:
    return _OPS


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T for 2-D tensors (strided views allowed); oneDNN's matmul on float32 CPU where the build has it."""
    op, _ = _ops()
    onednn = op is not None and not _state.get("no_onednn")
    if onednn and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
        try:
            return op(x, weight, None, "none", [], "")  # type: ignore[operator,misc]
        except RuntimeError:  # an op of another build that does not take these inputs: fall back for good
            _state["no_onednn"] = True
    return torch.mm(x, weight.t())


def step_matmul(weight: Tensor, batch: int, steps: int) -> Callable[[Tensor], Tensor]:
    """x -> x @ weight.T for the (batch, ·) x of every step: oneDNN's matmul with the weight reordered once into its
    blocked layout for this batch size (measured: 15-20% faster per step at the PTB shape than the plain layout,
    bit-identical), where the build has the private ops and there are at least ``PACK_MIN_STEPS`` steps; else
    :func:`linear`."""
    op, reorder = _ops()
    plain = lambda x: linear(x, weight)  # noqa: E731
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return plain
    if op is None or reorder is None or _state.get("no_packing") or steps < PACK_MIN_STEPS:
        return plain
    try:
        packed = reorder(weight.detach(), batch)  # type: ignore[operator]
        op(weight.new_zeros(batch, weight.shape[1]), packed, None, "none", [], "")  # type: ignore[operator]
    except Exception:  # another build's ops: the plain layout from now on
        _state["no_packing"] = True
        return plain
    return lambda x: op(x, packed, None, "none", [], "")  # type: ignore[operator,misc]
