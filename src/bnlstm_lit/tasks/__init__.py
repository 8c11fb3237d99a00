"""LightningModules: loss, metrics, optimization and the statistics protocol, one file per task family."""

from bnlstm_lit.tasks.base import BNLSTMTask
from bnlstm_lit.tasks.language import CharLanguageModel
from bnlstm_lit.tasks.reading import ReadingComprehension
from bnlstm_lit.tasks.sequence import SequenceClassification, SequenceRegression, SequenceTask

__all__ = [
    "BNLSTMTask",
    "CharLanguageModel",
    "ReadingComprehension",
    "SequenceClassification",
    "SequenceRegression",
    "SequenceTask",
]
