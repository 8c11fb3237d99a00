"""Task networks built from bnlstm_lit.nn (plain nn.Modules returning logits)."""

from bnlstm_lit.models.language import CharRNN
from bnlstm_lit.models.reader import AttentiveReader
from bnlstm_lit.models.sequence import LastStateReadout

__all__ = ["AttentiveReader", "CharRNN", "LastStateReadout"]
