"""text8 (Mahoney; paper Sec. 5.3): the first 10^8 bytes of English Wikipedia, read straight from the zip."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bnlstm_lit.data.charlm import CharCorpus
from bnlstm_lit.data.download import download_url

__all__ = ["TEXT8_ARCHIVE", "TEXT8_CRC32", "TEXT8_MIRRORS", "TEXT8_SIZE", "TEXT8_SYMBOLS", "Text8"]

#: text8: space and the 26 lowercase letters (27 symbols).
TEXT8_SYMBOLS = " abcdefghijklmnopqrstuvwxyz"

TEXT8_ARCHIVE = "text8.zip"
TEXT8_MIRRORS: tuple[str, ...] = ("http://mattmahoney.net/dc/text8.zip",)
TEXT8_CRC32 = 0x7D6BE66F
TEXT8_SIZE = 100_000_000


class Text8(CharCorpus):
    """text8 (Mahoney): the first 10^8 bytes of English Wikipedia, lowercased to ``a-z`` and space; 27 symbols.

    Read straight from the zip, decompressed in chunks into one uint8 array (no Python string of the corpus). Split
    in proportion ``train_fraction`` / ``valid_fraction`` / the rest, which for the full corpus is the paper's
    90M / 5M / 5M.

    Args:
        archive: the zip's file name in ``data_dir``; it must hold exactly one member.
        check_canonical: require the member to be the canonical text8 (CRC32 0x7d6be66f, 100,000,000 bytes); set it
            False to use a partial copy such as ``text8_prefix.zip`` (its own CRC is still checked while reading).
        train_fraction, valid_fraction: split proportions.
        **kwargs: the arguments of :class:`CharCorpus` (seq_length 180 and batch 128 in the paper).
    """

    symbols = TEXT8_SYMBOLS
    default_prime = " "
    mirrors: tuple[str, ...] = TEXT8_MIRRORS

    def __init__(
        self,
        data_dir: str = "data/text8",
        archive: str = TEXT8_ARCHIVE,
        check_canonical: bool = True,
        train_fraction: float = 0.9,
        valid_fraction: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if not (0 < train_fraction < 1 and 0 < valid_fraction < 1 and train_fraction + valid_fraction < 1):
            raise ValueError(
                "train_fraction and valid_fraction (data.init_args.*) must be in (0, 1) and leave a test split, got "
                f"{train_fraction} and {valid_fraction}"
            )
        super().__init__(data_dir, **kwargs)
        self.archive = archive
        self.check_canonical = check_canonical
        self.train_fraction = train_fraction
        self.valid_fraction = valid_fraction

    @property
    def archive_path(self) -> Path:
        return self.data_dir / self.archive

    def corpus_ready(self) -> bool:
        try:
            self._member(self.archive_path)
        except (OSError, ValueError, RuntimeError):
            return False
        return True

    def _member(self, path: Path) -> zipfile.ZipInfo:
        """The zip's only member, checked against the canonical text8 when ``check_canonical``."""
        if not path.is_file():
            raise FileNotFoundError(
                f"Text8: {path.resolve()} does not exist. Put text8.zip there, or set data.init_args.download=true "
                "(download=True) to download it."
            )
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except zipfile.BadZipFile as err:
            raise ValueError(f"{path} is not a readable zip file ({err}); it is corrupt or truncated") from err
        if len(infos) != 1:
            raise ValueError(f"{path} must hold exactly one member (the corpus), found {len(infos)}")
        info = infos[0]
        if self.check_canonical and (info.CRC != TEXT8_CRC32 or info.file_size != TEXT8_SIZE):
            raise ValueError(
                f"{path} holds {info.filename!r} with CRC32 0x{info.CRC:08x} and {info.file_size} bytes, not the "
                f"canonical text8 (CRC32 0x{TEXT8_CRC32:08x}, {TEXT8_SIZE} bytes). For a partial copy set "
                "data.init_args.check_canonical=false; otherwise delete it and download it again."
            )
        if info.file_size == 0:
            raise ValueError(f"{path}: the member {info.filename!r} is empty")
        return info

    def source_of(self, split: str) -> str:
        return f"{self.archive_path} ({split} split)"

    def download_corpus(self) -> None:
        download_url(list(self.mirrors), self.archive_path, md5=None, check=self._member)

    def read_splits(self) -> dict[str, np.ndarray]:
        path = self.archive_path
        info = self._member(path)
        data = np.empty(info.file_size, dtype=np.uint8)
        view = memoryview(data)  # type: ignore[arg-type]  # numpy arrays are buffers
        filled = 0
        try:
            with zipfile.ZipFile(path) as zf, zf.open(info) as member:  # the CRC is checked when the end is read
                while filled < info.file_size and (n := member.readinto(view[filled:])):  # type: ignore[attr-defined]
                    filled += n
                if member.read(1):
                    raise ValueError(f"{path}: member {info.filename!r} is longer than its header says")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
            raise ValueError(f"{path} is corrupt or truncated: {err}") from err
        if filled != info.file_size:
            raise ValueError(f"{path}: member {info.filename!r} ended after {filled} of {info.file_size} bytes")
        n_train = int(info.file_size * self.train_fraction)
        n_valid = int(info.file_size * self.valid_fraction)
        return {
            "train": data[:n_train],
            "valid": data[n_train : n_train + n_valid],
            "test": data[n_train + n_valid :],
        }
