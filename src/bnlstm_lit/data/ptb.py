"""Penn Treebank characters (Mikolov's split; paper Sec. 5.2): the file formats, the md5 checks and :class:`PTBChar`."""

from __future__ import annotations

import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from bnlstm_lit.data.charlm import SPLITS, CharCorpus, read_bytes
from bnlstm_lit.data.download import check_file, download_url, extract_members, file_md5, tar_member_name

__all__ = [
    "PTB_ARCHIVE",
    "PTB_CHAR_FILES",
    "PTB_MIRRORS",
    "PTB_SYMBOLS",
    "PTB_WORD_FILES",
    "PTBChar",
    "read_ptb_char_file",
    "read_ptb_word_file",
]

log = logging.getLogger(__name__)

#: The 49 characters of the Mikolov PTB character files plus end of line (50 symbols), in byte order.
PTB_SYMBOLS = "\n#$&'*-./0123456789<>N\\_abcdefghijklmnopqrstuvwxyz"


def read_ptb_char_file(path: str | os.PathLike[str]) -> np.ndarray:
    """A Mikolov ``ptb.char.*.txt`` file -> its symbols as bytes uint8 (N,), ``\\n`` ending every sentence.

    The file holds one sentence per line, each character followed by one space (``_`` marks word boundaries), so the
    symbols are exactly the file's bytes without the spaces.
    """
    path = Path(path)
    raw = read_bytes(path, "PTB character file")
    text = raw.tobytes()
    if (match := re.search(rb"[^ \n][^ \n]", text)) is not None:
        line = text.count(b"\n", 0, match.start()) + 1
        raise ValueError(
            f"{path} is not a character-level PTB file: line {line} has two adjacent non-space characters "
            f"{match.group().decode('latin-1')!r} (expected characters separated by single spaces)"
        )
    return np.frombuffer(text.replace(b" ", b""), dtype=np.uint8)


def read_ptb_word_file(path: str | os.PathLike[str]) -> np.ndarray:
    """A word-level ``ptb.*.txt`` file -> the symbols of its character-level twin, derived exactly.

    Every character line is ``' '.join(word_line.strip().replace(' ', '_'))``: each sentence's words joined by ``_``,
    then end of line.
    """
    raw = read_bytes(Path(path), "PTB word file").tobytes()
    lines = raw.split(b"\n")
    if lines[-1].strip() == b"":
        lines.pop()  # the file ends with a newline
    symbols = b"".join(b"_".join(line.split()) + b"\n" for line in lines)
    return np.frombuffer(symbols, dtype=np.uint8)


#: File name -> md5 of Mikolov's files.
PTB_CHAR_FILES: dict[str, str] = {
    "ptb.char.train.txt": "874909f99060142f6b88cc74c34baaa2",
    "ptb.char.valid.txt": "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
    "ptb.char.test.txt": "1f9a2d1afe00f76e8bfbe09a65439681",
}
PTB_WORD_FILES: dict[str, str] = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
}
PTB_CHAR_FILES_BY_SPLIT = dict(zip(SPLITS, PTB_CHAR_FILES, strict=True))
PTB_WORD_FILES_BY_SPLIT = dict(zip(SPLITS, PTB_WORD_FILES, strict=True))
#: Mikolov's "simple-examples" archive, holding both sets under simple-examples/data/.
PTB_ARCHIVE = "simple-examples.tgz"
PTB_MIRRORS: tuple[str, ...] = ("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",)


class PTBChar(CharCorpus):
    """Penn Treebank characters, Mikolov's split: 50 symbols (49 characters, ``_`` between words, and end of line).

    Reads ``ptb.char.{train,valid,test}.txt`` from ``data_dir``; where a character file is absent it derives the
    same symbols exactly from the word-level ``ptb.{train,valid,test}.txt``. Every file's md5 is checked.
    ``download=True`` fetches Mikolov's ``simple-examples.tgz`` and extracts only these six files (each checked
    against its md5, never written outside ``data_dir``). Splits: 5,017,482 / 393,042 / 442,423 symbols.

    Sampling primes are written as free text: spaces become ``_``, as in the corpus.
    """

    symbols = PTB_SYMBOLS
    default_prime = "\n"
    mirrors: tuple[str, ...] = PTB_MIRRORS

    def __init__(self, data_dir: str = "data/ptb", **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)

    def text_to_corpus(self, text: str) -> str:
        return text.replace(" ", "_")

    def corpus_to_text(self, text: str) -> str:
        return text.replace("_", " ")

    def source_of(self, split: str) -> str:
        char, word = (PTB_CHAR_FILES_BY_SPLIT[split], PTB_WORD_FILES_BY_SPLIT[split])
        name = char if (self.data_dir / char).is_file() else word
        return f"{self.data_dir / name} ({split} split)"

    def _has(self, name: str, md5: str) -> bool:
        return check_file(self.data_dir / name, md5)

    def corpus_ready(self) -> bool:
        return all(
            self._has(char, PTB_CHAR_FILES[char]) or self._has(word, PTB_WORD_FILES[word])
            for char, word in zip(PTB_CHAR_FILES, PTB_WORD_FILES, strict=True)
        )

    def read_splits(self) -> dict[str, np.ndarray]:
        splits = {}
        for split, char, word in zip(SPLITS, PTB_CHAR_FILES, PTB_WORD_FILES, strict=True):
            char_path, word_path = self.data_dir / char, self.data_dir / word
            if char_path.is_file():
                self._verify(char_path, PTB_CHAR_FILES[char])
                splits[split] = read_ptb_char_file(char_path)
            elif word_path.is_file():
                self._verify(word_path, PTB_WORD_FILES[word])
                log.info("PTBChar: %s not found, deriving the %s split from %s", char, split, word)
                splits[split] = read_ptb_word_file(word_path)
            else:
                raise FileNotFoundError(
                    f"PTBChar: neither {char} nor {word} is in {self.data_dir.resolve()}. Put Mikolov's PTB files "
                    "there, or set data.init_args.download=true (download=True) to download them."
                )
        return splits

    def _verify(self, path: Path, md5: str) -> None:
        actual = file_md5(path)
        if actual != md5:
            size = path.stat().st_size
            raise RuntimeError(
                f"{path} is corrupt, truncated or not the Mikolov file: its md5 is {actual} ({size} bytes), expected "
                f"{md5}. Delete it and put the original there, or set data.init_args.download=true (download=True)."
            )

    def download_corpus(self) -> None:
        archive = self.data_dir / PTB_ARCHIVE
        wanted = {**PTB_CHAR_FILES, **PTB_WORD_FILES}
        download_url(list(self.mirrors), archive, md5=None, check=lambda path: _check_ptb_archive(path, wanted))
        extract_members(
            archive, {f"simple-examples/data/{name}": (self.data_dir / name, md5) for name, md5 in wanted.items()}
        )


def _check_ptb_archive(path: Path, wanted: dict[str, str]) -> None:
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {tar_member_name(m) for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"not a readable tar archive ({err})") from err
    missing = [n for n in wanted if f"simple-examples/data/{n}" not in names]
    if missing:
        raise ValueError(f"the archive lacks {', '.join(missing)} under simple-examples/data/")
