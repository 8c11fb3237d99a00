"""Pure-PyTorch building blocks (never imports lightning): per-step batch norm, the BN-LSTM and BN tanh RNN cells,
the layer."""

from bnlstm_lit.nn.batchnorm import SequenceBatchNorm, batchnorm_sites, set_eval_statistics, set_sync_statistics
from bnlstm_lit.nn.cell import BNLSTMCell, BNRNNCell
from bnlstm_lit.nn.layer import BNLSTM
from bnlstm_lit.nn.settings import DEFAULTS, BNLSTMSettings
from bnlstm_lit.nn.statistics import estimate_population_statistics

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BNLSTMSettings",
    "DEFAULTS",
    "BNRNNCell",
    "SequenceBatchNorm",
    "batchnorm_sites",
    "estimate_population_statistics",
    "set_eval_statistics",
    "set_sync_statistics",
]
