"""LightningDataModules (download, verify, prepare) exposing the sizes the model needs."""

from bnlstm_lit.data.adding import AddingProblem
from bnlstm_lit.data.base import SequenceDataModule
from bnlstm_lit.data.mnist import PermutedMNIST, SequentialMNIST

__all__ = ["AddingProblem", "PermutedMNIST", "SequenceDataModule", "SequentialMNIST"]
