"""The data package split by concern keeps every old import path: the names of the former ``data/text.py`` and
``data/cnn.py`` modules, and the class paths the configs name, resolve to the objects of their new modules."""

from __future__ import annotations

import importlib

import pytest

# __all__ of the former single modules, as they were before the split
OLD_TEXT = [
    "PTB_SYMBOLS",
    "TEXT8_SYMBOLS",
    "CharCorpus",
    "CharVocabulary",
    "ExampleStarts",
    "PTBChar",
    "SampleRequest",
    "Text8",
    "TextBatch",
    "TextFiles",
    "TokenStream",
    "read_ptb_char_file",
    "read_ptb_word_file",
]
OLD_CNN = [
    "CNN_MIRRORS",
    "ENTITY_OFFSET",
    "OFFICIAL_TEST_COUNT",
    "OFFICIAL_TEST_DIGEST",
    "PAD",
    "PLACEHOLDER",
    "UNK",
    "BucketSampler",
    "CNNQuestions",
    "CompletenessReport",
    "QABatch",
    "Question",
    "QuestionFormatError",
    "TestList",
    "check_cnn_archive",
    "extract_questions",
    "format_question",
    "parse_question",
    "read_test_list",
    "select_sentences",
    "synthetic_corpus",
    "write_question",
    # used by tests and callers beyond __all__
    "names_digest",
    "split_sentences",
    "compare_test_names",
    "SPLIT_FOLDERS",
]
HOMES = {
    "bnlstm_lit.data.text": ["charlm", "ptb", "text8", "textfiles"],
    "bnlstm_lit.data.cnn": ["cnn.questions", "cnn.archive", "cnn.preprocess", "cnn.datamodule", "cnn.synthetic"],
}


@pytest.mark.parametrize(("module", "names"), [("bnlstm_lit.data.text", OLD_TEXT), ("bnlstm_lit.data.cnn", OLD_CNN)])
def test_old_module_paths_still_export_every_name(module: str, names: list[str]) -> None:
    old = importlib.import_module(module)
    homes = [importlib.import_module(f"bnlstm_lit.data.{home}") for home in HOMES[module]]
    for name in names:
        value = getattr(old, name)
        defined = [home for home in homes if getattr(home, name, None) is value]
        assert defined, f"{module}.{name} is not the object of any of its new modules"


@pytest.mark.parametrize(
    "name", ["AddingProblem", "CNNQuestions", "PTBChar", "Text8", "TextFiles", "SequentialMNIST", "PermutedMNIST"]
)
def test_config_class_paths_resolve(name: str) -> None:
    """configs/*.yaml name the DataModules as bnlstm_lit.data.<Class>."""
    data = importlib.import_module("bnlstm_lit.data")
    assert name in data.__all__ and isinstance(getattr(data, name), type)


def test_every_new_module_says_what_it_is_for() -> None:
    for module in ["charlm", "ptb", "text8", "textfiles", "text", *HOMES["bnlstm_lit.data.cnn"], "cnn"]:
        doc = importlib.import_module(f"bnlstm_lit.data.{module}").__doc__
        assert doc and len(doc.strip()) > 40, module
