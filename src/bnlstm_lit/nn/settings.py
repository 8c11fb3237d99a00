"""The BN-LSTM settings, declared once: one typed group used by the layer, every model and every task.

Every default of the recurrent network lives here (γ = 0.1 and the forget bias 1.0 from Cooijmans et al. 2017, §3-4;
the batch-norm ε; the running-average rate), and so do the names of the choices (``Literal`` types). The layer's
constructor, the cells and the tasks take their defaults from :data:`DEFAULTS`; a LightningCLI config sets them as
one group, ``model.init_args.rnn: {hidden_size: 1000, momentum: 0.05, ...}``, typed down to each field
(``--print_config`` shows every setting with its default).

This module imports nothing of the package (every other module of :mod:`bnlstm_lit.nn` may import it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

#: one γ for every BN site, or per site: ``{"input": γ_x, "recurrent": γ_h, "cell": γ_c}`` (missing sites: 0.1)
GammaInit = float | dict[str, float]
#: ``"orthogonal"``: each H×H block of W_h orthogonal; ``"identity_g"``: the candidate block is the identity (the
#: paper's sequential-MNIST init)
RecurrentInit = Literal["orthogonal", "identity_g"]
#: ``"per_step"`` (the BN-LSTM) or ``"sequence"`` (the input term's statistics shared over time: the paper's BN-e*)
InputStatistics = Literal["per_step", "sequence"]
#: ``"lstm"`` (the BN-LSTM) or ``"tanh"`` (the BN tanh RNN of the paper's Fig. 1)
CellType = Literal["lstm", "tanh"]
#: which implementation runs a layer (:mod:`bnlstm_lit.nn.dispatch`): ``"auto"`` the fastest that applies;
#: ``"reference"`` the readable time loop; ``"eager"`` the fused autograd Function of torch ops; ``"native"`` the
#: C kernel (float32 CPU only; anything else is an error); ``"triton"`` the Triton step kernels for batch statistics
#: (CUDA, or the Triton interpreter; anything else is an error)
Implementation = Literal["auto", "reference", "eager", "native", "triton"]


@dataclass
class BNLSTMSettings:
    """The settings of a (BN-)LSTM network, as a task or a model takes them (``model.init_args.rnn``).

    Attributes:
        hidden_size: H, units per layer and direction.
        num_layers: stacked layers.
        normalize: True for the BN-LSTM; False for the LSTM baseline (numerically ``torch.nn.LSTM``).
        gamma_init: initial γ of every BN site (0.1; ≤ 0.01 is unstable, 1.0 makes gradients vanish through time:
            the paper's Fig. 1), or per site ``{"input": γ_x, "recurrent": γ_h, "cell": γ_c}``.
        eps: ε of every batch norm.
        momentum: running-average rate of the per-step statistics (the original code used 0.01 for MNIST, 0.05 for
            language modelling); None keeps a cumulative average.
        forget_bias: initial forget-gate slice of the bias b.
        recurrent_init: see :data:`RecurrentInit`.
        h0_noise_std: std of Gaussian noise on the learned h_0 in training (0.1 for unpermuted sequential MNIST).
        dropout: on the outputs of every layer but the last.
        cell: see :data:`CellType`.
        input_statistics: see :data:`InputStatistics`.
        sync_statistics: under ``torch.distributed``, normalize over the global batch in training.
        implementation: see :data:`Implementation`.
    """

    hidden_size: int = 100
    num_layers: int = 1
    normalize: bool = True
    gamma_init: GammaInit = 0.1
    eps: float = 1e-5
    momentum: float | None = 0.1
    forget_bias: float = 1.0
    recurrent_init: RecurrentInit = "orthogonal"
    h0_noise_std: float = 0.0
    dropout: float = 0.0
    cell: CellType = "lstm"
    input_statistics: InputStatistics = "per_step"
    sync_statistics: bool = False
    implementation: Implementation = "auto"

    def layer_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~bnlstm_lit.nn.BNLSTM` these settings give (all but ``hidden_size``)."""
        arguments = dataclasses.asdict(self)
        del arguments["hidden_size"]
        return arguments

    def replace(self, **changes: Any) -> BNLSTMSettings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


DEFAULTS = BNLSTMSettings()
"""The defaults, for signatures that take single settings (the layer, the cells)."""
