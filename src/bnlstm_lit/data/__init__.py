"""LightningDataModules (download, verify, prepare) exposing the sizes the model needs."""

from bnlstm_lit.data.adding import AddingProblem
from bnlstm_lit.data.base import SequenceDataModule
from bnlstm_lit.data.charlm import CharCorpus, CharVocabulary, TextBatch
from bnlstm_lit.data.cnn import CNNQuestions, QABatch, synthetic_corpus
from bnlstm_lit.data.mnist import PermutedMNIST, SequentialMNIST
from bnlstm_lit.data.ptb import PTBChar
from bnlstm_lit.data.text8 import Text8
from bnlstm_lit.data.textfiles import TextFiles

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
