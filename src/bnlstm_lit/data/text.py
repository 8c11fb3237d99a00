"""Where the character corpora used to live: their names, re-exported from the modules that now hold them.

* :mod:`bnlstm_lit.data.charlm` -- the shared machinery (:class:`CharCorpus`, :class:`CharVocabulary`,
  :class:`TextBatch`, the samplers and streams, the test protocols);
* :mod:`bnlstm_lit.data.ptb` -- :class:`PTBChar`; :mod:`bnlstm_lit.data.text8` -- :class:`Text8`;
  :mod:`bnlstm_lit.data.textfiles` -- :class:`TextFiles`.

New code imports from those modules (or from :mod:`bnlstm_lit.data`); this one keeps old imports working.
"""

from bnlstm_lit.data.charlm import (
    SPLITS,
    CharCorpus,
    CharVocabulary,
    ExampleCollate,
    ExampleDataset,
    ExampleStarts,
    Mode,
    SampleRequest,
    TestProtocol,
    TextBatch,
    TokenStream,
)
from bnlstm_lit.data.ptb import (
    PTB_ARCHIVE,
    PTB_CHAR_FILES,
    PTB_CHAR_FILES_BY_SPLIT,
    PTB_MIRRORS,
    PTB_SYMBOLS,
    PTB_WORD_FILES,
    PTB_WORD_FILES_BY_SPLIT,
    PTBChar,
    read_ptb_char_file,
    read_ptb_word_file,
)
from bnlstm_lit.data.text8 import TEXT8_ARCHIVE, TEXT8_CRC32, TEXT8_MIRRORS, TEXT8_SIZE, TEXT8_SYMBOLS, Text8
from bnlstm_lit.data.textfiles import TextFiles

__all__ = [
    "PTB_ARCHIVE",
    "PTB_CHAR_FILES",
    "PTB_CHAR_FILES_BY_SPLIT",
    "PTB_MIRRORS",
    "PTB_SYMBOLS",
    "PTB_WORD_FILES",
    "PTB_WORD_FILES_BY_SPLIT",
    "SPLITS",
    "TEXT8_ARCHIVE",
    "TEXT8_CRC32",
    "TEXT8_MIRRORS",
    "TEXT8_SIZE",
    "TEXT8_SYMBOLS",
    "CharCorpus",
    "CharVocabulary",
    "ExampleCollate",
    "ExampleDataset",
    "ExampleStarts",
    "Mode",
    "PTBChar",
    "SampleRequest",
    "TestProtocol",
    "Text8",
    "TextBatch",
    "TextFiles",
    "TokenStream",
    "read_ptb_char_file",
    "read_ptb_word_file",
]
