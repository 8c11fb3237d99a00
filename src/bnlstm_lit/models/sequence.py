"""Task networks for whole-sequence prediction, built from :mod:`bnlstm_lit.nn`. They return logits, not losses."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from bnlstm_lit.nn import BNLSTM, DEFAULTS, BNLSTMSettings


class LastStateReadout(nn.Module):
    """A (BN-)LSTM over the sequence and a linear readout of the last layer's final hidden state.

    The paper's MNIST model: ``logits = W_o h_T + b_o`` (softmax on the last h). With ``lengths``, h_T is the state
    at each sequence's last real step.

    Shapes: inputs (B, T, input_size) -> (B, output_size).
    """

    def __init__(self, input_size: int, output_size: int, max_steps: int, rnn: BNLSTMSettings = DEFAULTS) -> None:
        """``rnn``: the (BN-)LSTM's settings (hidden_size 100 by default, the paper's MNIST model)."""
        super().__init__()
        self.rnn = BNLSTM.from_settings(input_size, rnn, max_steps=max_steps, batch_first=True)
        self.readout = nn.Linear(rnn.hidden_size, output_size)

    def forward(self, inputs: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        _, (h_n, _) = self.rnn(inputs, lengths=lengths)  # h_n: (num_layers, B, H)
        return self.readout(h_n[-1])  # (B, output_size)
