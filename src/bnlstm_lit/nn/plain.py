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
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16:
        # oneDNN has no fp16 LSTM on CPU ("could not create a primitive descriptor"): run this layer in float32
        with torch.autocast("cpu", enabled=False):
            return run(x.float(), (h0.float(), c0.float()), weight_ih, weight_hh, bias)
    params = [weight_ih, weight_hh, bias, torch.zeros_like(bias)]  # torch's LSTM has two biases; ours is b_ih + 0
    hx = (h0[None].contiguous(), c0[None].contiguous())
    outputs, h_n, c_n = torch.lstm(x, hx, params, True, 1, 0.0, torch.is_grad_enabled(), False, False)
    return outputs, (h_n[0], c_n[0])
