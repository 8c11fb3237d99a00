"""Any plain-text corpus as three files read as bytes: :class:`TextFiles`."""

from __future__ import annotations

from typing import Any

import numpy as np

from bnlstm_lit.data.charlm import SPLITS, CharCorpus, CharVocabulary, read_bytes

__all__ = ["TextFiles"]


class TextFiles(CharCorpus):
    """Any plain-text corpus: three files in ``data_dir``, read as bytes (one symbol per byte, newlines included).

    The vocabulary is the sorted set of the training file's bytes unless ``alphabet`` is given; a validation or
    test character outside it is an error that names the file and line.
    """

    def __init__(
        self,
        data_dir: str,
        train_file: str = "train.txt",
        valid_file: str = "valid.txt",
        test_file: str = "test.txt",
        alphabet: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        self.files = dict(zip(SPLITS, (train_file, valid_file, test_file), strict=True))
        if alphabet is not None:
            self._vocabulary = CharVocabulary(alphabet)

    def corpus_ready(self) -> bool:
        return all((self.data_dir / name).is_file() for name in self.files.values())

    def source_of(self, split: str) -> str:
        return f"{self.data_dir / self.files[split]} ({split} split)"

    def read_splits(self) -> dict[str, np.ndarray]:
        return {
            split: read_bytes(self.data_dir / name, f"{type(self).__name__} {split} file")
            for split, name in self.files.items()
        }
