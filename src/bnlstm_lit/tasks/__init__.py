"""LightningModules: loss, metrics, optimization and the statistics protocol, one file per task family."""

from bnlstm_lit.tasks.sequence import SequenceClassification, SequenceRegression, SequenceTask

__all__ = ["SequenceClassification", "SequenceRegression", "SequenceTask"]
