"""The character-level language model of the paper (Sec. 5.2-5.3), built from :mod:`bnlstm_lit.nn`; returns logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlstm_lit.nn import BNLSTM, DEFAULTS, BNLSTMSettings

#: the paper's Penn Treebank model: 1000 units, and the running-average rate of the original code for language
#: modelling; the other settings are :data:`~bnlstm_lit.nn.DEFAULTS`
CHAR_RNN_SETTINGS = DEFAULTS.replace(hidden_size=1000, momentum=0.05)


class CharRNN(nn.Module):
    """One-hot symbols -> (BN-)LSTM -> a linear softmax layer over the next symbol at every step.

    Shapes: tokens int64 (B, T) -> logits (B, T, output_size), and the final state (h_n, c_n) each
    (num_layers, B, H), which a stateful caller passes back as ``state`` with ``start_step`` the next time index.
    """

    def __init__(
        self, input_size: int, output_size: int, max_steps: int, rnn: BNLSTMSettings = CHAR_RNN_SETTINGS
    ) -> None:
        """``rnn``: the (BN-)LSTM's settings (:data:`CHAR_RNN_SETTINGS` by default)."""
        super().__init__()
        self.input_size = input_size
        self.rnn = BNLSTM.from_settings(input_size, rnn, max_steps=max_steps, batch_first=True)
        self.readout = nn.Linear(rnn.hidden_size, output_size)

    def forward(
        self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None, start_step: int = 0
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if tokens.dtype.is_floating_point or tokens.dim() != 2:
            raise ValueError(f"CharRNN expects int64 symbol ids (B, T), got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel() and tokens.device.type != "cpu":
            # on an accelerator a check read on the host would stall every forward: asserted on the device instead
            in_range = ((tokens >= 0) & (tokens < self.input_size)).all()
            torch._assert_async(in_range, f"CharRNN: symbol ids must be in [0, {self.input_size})")
        elif tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.input_size):
            raise ValueError(
                f"CharRNN: symbol ids must be in [0, {self.input_size}), got ids from {int(tokens.min())} to "
                f"{int(tokens.max())}; the data's vocabulary does not match the model's input_size"
            )
        x = F.one_hot(tokens, self.input_size).to(self.readout.weight.dtype)  # (B, T, V)
        outputs, state = self.rnn(x, state, start_step=start_step)  # (B, T, H)
        return self.readout(outputs), state  # (B, T, output_size)
