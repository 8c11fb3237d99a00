"""The LSTM baseline (``normalize=False``) through torch's own fused LSTM kernel (oneDNN on CPU, cuDNN on CUDA).

A leaf implementation of :mod:`bnlstm_lit.nn.dispatch`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["run"]


def run(
    x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor, weight_hh: Tensor, bias: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One plain LSTM layer (gate order i, f, g, o; one bias) through torch's fused kernel.

    x (T, B, I), state (h_0, c_0) each (B, H) -> outputs (T, B, H), (h_T, c_T). The states are made contiguous
    (the learned initial state arrives expanded over the batch; cuDNN requires contiguous ones).
    """
    h0, c0 = state
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if not _FLOAT32_ON_CPU.get(dtype, False):
            try:
                return _lstm(x, (h0, c0), weight_ih, weight_hh, bias)
            except RuntimeError as error:
                if "primitive descriptor" not in str(error):
                    raise
                _FLOAT32_ON_CPU[dtype] = True
        # oneDNN has no LSTM primitive for this dtype on this CPU (fp16 anywhere, bf16 without the CPU's bf16
        # instructions: "could not create a primitive descriptor"): this layer runs in float32
        with torch.autocast("cpu", enabled=False):
            return _lstm(x.float(), (h0.float(), c0.float()), weight_ih, weight_hh, bias)
    return _lstm(x, (h0, c0), weight_ih, weight_hh, bias)


#: autocast dtypes for which oneDNN's CPU LSTM was found to have no primitive here (fp16 has none anywhere)
_FLOAT32_ON_CPU: dict[torch.dtype, bool] = {torch.float16: True}


def _lstm(
    x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor, weight_hh: Tensor, bias: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    h0, c0 = state
    params = [weight_ih, weight_hh, bias, torch.zeros_like(bias)]  # torch's LSTM has two biases; ours is b_ih + 0
    hx = (h0[None].contiguous(), c0[None].contiguous())
    outputs, h_n, c_n = torch.lstm(x, hx, params, True, 1, 0.0, torch.is_grad_enabled(), False, False)
    return outputs, (h_n[0], c_n[0])
