"""bnlstm_lit: Recurrent Batch Normalization (Cooijmans et al., ICLR 2017) for PyTorch Lightning."""

from bnlstm_lit.nn import (
    BNLSTM,
    BNLSTMCell,
    BNRNNCell,
    SequenceBatchNorm,
    batchnorm_sites,
    estimate_population_statistics,
    set_eval_statistics,
)

__version__ = "0.1.0"

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BNRNNCell",
    "SequenceBatchNorm",
    "__version__",
    "batchnorm_sites",
    "estimate_population_statistics",
    "set_eval_statistics",
]
