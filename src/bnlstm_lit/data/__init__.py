"""LightningDataModules (download, verify, prepare) exposing the sizes the model needs."""

from bnlstm_lit.data.adding import AddingProblem
from bnlstm_lit.data.base import SequenceDataModule
from bnlstm_lit.data.cnn import CNNQuestions, QABatch, synthetic_corpus
from bnlstm_lit.data.mnist import PermutedMNIST, SequentialMNIST
from bnlstm_lit.data.text import CharCorpus, CharVocabulary, PTBChar, Text8, TextBatch, TextFiles

__all__ = [
    "AddingProblem",
    "CNNQuestions",
    "CharCorpus",
    "CharVocabulary",
    "PTBChar",
    "PermutedMNIST",
    "QABatch",
    "SequenceDataModule",
    "SequentialMNIST",
    "Text8",
    "TextBatch",
    "TextFiles",
    "synthetic_corpus",
]
