"""The DeepMind CNN question corpus (Hermann et al. 2015) as it is distributed, for the reading task of paper Sec. 5.4.

Layout: ``<data_dir>/questions/{training,validation,test}/<sha1>.question``, one cloze question per file. The package
is split by concern; every name is importable from here as well:

* :mod:`~bnlstm_lit.data.cnn.questions` -- the file format, strictly validated (:func:`parse_question`,
  :func:`format_question`, :func:`write_question`, :class:`QuestionFormatError`) and the fixed token ids;
* :mod:`~bnlstm_lit.data.cnn.archive` -- the official test list (:class:`TestList`, :func:`read_test_list`) and the
  published ``cnn.tgz`` (:func:`check_cnn_archive`, :func:`extract_questions`);
* :mod:`~bnlstm_lit.data.cnn.preprocess` -- sentence selection (:func:`select_sentences`) and the preprocessing cache
  (parse once, vocabulary, int32 token arrays);
* :mod:`~bnlstm_lit.data.cnn.datamodule` -- :class:`CNNQuestions`, the DataModule, with its dataset, collate and
  samplers (:class:`QABatch`, :class:`BucketSampler`);
* :mod:`~bnlstm_lit.data.cnn.synthetic` -- :func:`synthetic_corpus`, a small learnable corpus in the same format.

Token ids (``CNNQuestions.vocab_size`` of them): ``0`` padding, ``1`` unknown word, ``2`` ``@placeholder``,
``3 .. 3+K-1`` the entity markers ``@entity0 .. @entity{K-1}`` (``K = num_entities``), then the words of the training
vocabulary, most frequent first. Entity ``k`` has token id ``ENTITY_OFFSET + k``.
"""

from bnlstm_lit.data.cnn.archive import (
    CNN_ARCHIVE,
    CNN_MIRRORS,
    OFFICIAL_COUNTS,
    OFFICIAL_TEST_COUNT,
    OFFICIAL_TEST_DIGEST,
    CompletenessReport,
    TestList,
    check_cnn_archive,
    compare_test_names,
    extract_questions,
    names_digest,
    read_test_list,
)
from bnlstm_lit.data.cnn.datamodule import (
    BucketSampler,
    CNNQuestionDataset,
    CNNQuestions,
    Completeness,
    LongContexts,
    QABatch,
    QACollate,
    QuestionExample,
    entity_permutation,
)
from bnlstm_lit.data.cnn.preprocess import CACHE_VERSION, Listing, select_sentences, split_sentences
from bnlstm_lit.data.cnn.questions import (
    ENTITY_OFFSET,
    ENTITY_RE,
    MAX_ENTITY_INDEX,
    PAD,
    PLACEHOLDER,
    PLACEHOLDER_TOKEN,
    QUESTION_SUFFIX,
    SHA1_RE,
    SPLIT_FOLDERS,
    SPLITS,
    UNK,
    Question,
    QuestionFormatError,
    format_question,
    parse_question,
    write_question,
)
from bnlstm_lit.data.cnn.synthetic import synthetic_corpus

__all__ = [
    "CACHE_VERSION",
    "CNN_ARCHIVE",
    "CNN_MIRRORS",
    "ENTITY_OFFSET",
    "ENTITY_RE",
    "MAX_ENTITY_INDEX",
    "OFFICIAL_COUNTS",
    "OFFICIAL_TEST_COUNT",
    "OFFICIAL_TEST_DIGEST",
    "PAD",
    "PLACEHOLDER",
    "PLACEHOLDER_TOKEN",
    "QUESTION_SUFFIX",
    "SHA1_RE",
    "SPLITS",
    "SPLIT_FOLDERS",
    "UNK",
    "BucketSampler",
    "CNNQuestionDataset",
    "CNNQuestions",
    "Completeness",
    "CompletenessReport",
    "Listing",
    "LongContexts",
    "QABatch",
    "QACollate",
    "Question",
    "QuestionExample",
    "QuestionFormatError",
    "TestList",
    "check_cnn_archive",
    "compare_test_names",
    "entity_permutation",
    "extract_questions",
    "format_question",
    "names_digest",
    "parse_question",
    "read_test_list",
    "select_sentences",
    "split_sentences",
    "synthetic_corpus",
    "write_question",
]
