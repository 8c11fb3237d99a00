"""The official CNN test list and the published ``cnn.tgz``: is this the corpus the paper was tested on?

* :func:`read_test_list` / :class:`TestList` / :func:`compare_test_names`: the test split against the official list of
  its 3,198 file names. The list itself is not shipped: its SHA-256 (:data:`OFFICIAL_TEST_DIGEST`, over the sorted
  names, one per line) is enough to tell whether ``questions/test`` is exactly the official split; pass ``test_list``
  (the file, e.g. ``expected_cnn_test.txt``) to have the missing and extra names listed.
* :func:`check_cnn_archive` / :func:`extract_questions`: the published ``cnn.tgz`` (no md5 is published, so it is
  verified structurally: its test members must be the official test split), extracted member by member -- only
  regular files named ``[cnn/]questions/<split>/<40 hex>.question`` are written, to paths built from the split and
  the hex name alone, so no member can land outside ``data_dir``; links, devices and every other name are skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tarfile
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bnlstm_lit.data.cnn.questions import QUESTION_SUFFIX, SHA1_RE, SPLIT_FOLDERS, SPLITS
from bnlstm_lit.data.download import tar_member_name

__all__ = [
    "CNN_ARCHIVE",
    "CNN_MIRRORS",
    "OFFICIAL_COUNTS",
    "OFFICIAL_TEST_COUNT",
    "OFFICIAL_TEST_DIGEST",
    "CompletenessReport",
    "TestList",
    "check_cnn_archive",
    "compare_test_names",
    "extract_questions",
    "names_digest",
    "read_test_list",
]

log = logging.getLogger(__name__)

#: Questions per split of the official CNN corpus (paper Table 1 and the official lists).
OFFICIAL_COUNTS = {"train": 380_298, "valid": 3_924, "test": 3_198}
OFFICIAL_TEST_COUNT = OFFICIAL_COUNTS["test"]
#: SHA-256 of the official test list (``expected_cnn_test.txt``): the sorted file names, each followed by ``\n``.
OFFICIAL_TEST_DIGEST = "469725ac2776cb62710f472096cc132b4677a8aa19f82571b272606805d216d3"
#: The questions archive of the DMQA page (https://cs.nyu.edu/~kcho/DMQA/), hosted on Google Drive. Drive answers a
#: file this large with a confirmation page rather than the bytes, which fails the archive check with a clear error;
#: then download cnn.tgz by hand into ``data_dir`` and run again (an archive already there is checked and used).
CNN_MIRRORS: tuple[str, ...] = ("https://drive.google.com/uc?export=download&id=0BwmD_VLjROrfTTljRDVZMFJnVWM",)
CNN_ARCHIVE = "cnn.tgz"

_MEMBER_RE = re.compile(r"(?:cnn/)?questions/(training|validation|test)/([0-9a-f]{40})\.question")
_FOLDER_SPLITS = {folder: split for split, folder in SPLIT_FOLDERS.items()}
_EXTRACTING = ".extracting"  # present in questions/ while an extraction is under way
_EXTRACTED = ".extracted"  # written when an extraction finished


# ------------------------------------------------------------------------------------------------ official test list


@dataclass(frozen=True)
class TestList:
    """What the test split is checked against: the names when a list file is given, else only their digest."""

    __test__ = False  # not a pytest test class

    count: int
    digest: str
    names: frozenset[str] | None = None
    source: str = "the official CNN test list (3,198 names, checked by SHA-256)"

    @classmethod
    def official(cls) -> TestList:
        return cls(OFFICIAL_TEST_COUNT, OFFICIAL_TEST_DIGEST)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TestList:
        names = read_test_list(path)
        digest = names_digest(names)
        official = " (the official list)" if digest == OFFICIAL_TEST_DIGEST else " (not the official list)"
        return cls(len(names), digest, frozenset(names), f"{path}{official}")

    @property
    def is_official(self) -> bool:
        return self.digest == OFFICIAL_TEST_DIGEST


def names_digest(names: Iterable[str]) -> str:
    """SHA-256 of the sorted file names, each followed by ``\\n`` (the form of ``expected_cnn_test.txt``)."""
    return hashlib.sha256("".join(f"{n}\n" for n in sorted(names)).encode("utf-8")).hexdigest()


def read_test_list(path: str | os.PathLike[str]) -> list[str]:
    """A list of test file names (one per line, ``<sha1>.question`` or the bare SHA-1) -> the sorted file names."""
    path = Path(path)
    names: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        name = line if line.endswith(QUESTION_SUFFIX) else line + QUESTION_SUFFIX
        if SHA1_RE.fullmatch(name[: -len(QUESTION_SUFFIX)]) is None:
            raise ValueError(f"{path}: line {number} {line!r} is not a question file name <sha1>.question")
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: {len(names) - len(set(names))} names are listed twice")
    if not names:
        raise ValueError(f"{path}: no names")
    return sorted(names)


@dataclass(frozen=True)
class CompletenessReport:
    """The test split against the reference list. ``missing`` / ``extra`` are None when only the digest is known."""

    present: int
    expected: int
    complete: bool
    missing: list[str] | None
    extra: list[str] | None
    reference: str

    def describe(self, folder: Path) -> str:
        if self.complete:
            return f"{folder} holds the {self.expected} test questions of {self.reference}"
        text = f"{folder} holds {self.present} questions, but {self.reference} has {self.expected}"
        if self.missing is None or self.extra is None:
            return (
                f"{text}, and the names differ from it. Pass test_list (data.init_args.test_list) pointing to the list "
                "file (expected_cnn_test.txt) to see which names are missing or extra."
            )
        parts = [text]
        for what, names in (("missing", self.missing), ("extra", self.extra)):
            if names:
                more = f", ... ({len(names) - 5} more)" if len(names) > 5 else ""
                parts.append(f"{len(names)} {what}: {', '.join(names[:5])}{more}")
        return "; ".join(parts)


def compare_test_names(names: Iterable[str], reference: TestList) -> CompletenessReport:
    present = sorted(names)
    if reference.names is not None:
        missing = sorted(reference.names.difference(present))
        extra = sorted(set(present).difference(reference.names))
        complete = not missing and not extra
        return CompletenessReport(len(present), reference.count, complete, missing, extra, reference.source)
    complete = len(present) == reference.count and names_digest(present) == reference.digest
    return CompletenessReport(len(present), reference.count, complete, None, None, reference.source)


# ------------------------------------------------------------------------------------------------------ the archive


def _question_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str | None, str | None]]:
    """Every member of a tar opened in stream mode, with (split, file name) when it is a question file's name.

    The member list is emptied as it goes, so a 380k-member archive is read in constant memory.
    """
    while (member := tar.next()) is not None:
        tar.members = []  # type: ignore[attr-defined]  # exists at runtime; not in the stubs
        match = _MEMBER_RE.fullmatch(tar_member_name(member))
        if match is None:
            yield member, None, None
        else:
            yield member, _FOLDER_SPLITS[match.group(1)], f"{match.group(2)}{QUESTION_SUFFIX}"


def _open_stream(path: Path) -> tarfile.TarFile:
    return tarfile.open(path, "r|*")


def check_cnn_archive(path: str | os.PathLike[str], reference: TestList | None = None) -> dict[str, int]:
    """Check that an archive is the CNN question corpus; return its question count per split.

    The test members must be exactly the reference test split (the official one by default) and every split must
    have questions; the whole archive is read, so a truncated or corrupt one is caught. Counts of training and
    validation questions other than the official ones are logged, not refused.

    Raises:
        ValueError: not a readable tar archive, or not the expected corpus (what :func:`download_url` rejects).
    """
    path = Path(path)
    reference = reference or TestList.official()
    counts = dict.fromkeys(SPLITS, 0)
    test_names: list[str] = []
    try:
        with _open_stream(path) as tar:
            for member, split, name in _question_members(tar):
                if split is None or name is None or not member.isfile():
                    continue
                counts[split] += 1
                if split == "test":
                    test_names.append(name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable tar archive ({type(err).__name__}: {err})") from err
    empty = [SPLIT_FOLDERS[s] for s in SPLITS if counts[s] == 0]
    if empty:
        raise ValueError(
            f"{path} holds no question files under questions/{{{','.join(empty)}}}/ "
            "(expected members [cnn/]questions/<split>/<sha1>.question)"
        )
    report = compare_test_names(test_names, reference)
    if not report.complete:
        raise ValueError(f"the test questions of {path} are not the expected ones: " + report.describe(Path("test")))
    if reference.is_official:
        for split in ("train", "valid"):
            if counts[split] != OFFICIAL_COUNTS[split]:
                log.warning(
                    "%s holds %d %s questions; the official CNN corpus has %d",
                    path,
                    counts[split],
                    SPLIT_FOLDERS[split],
                    OFFICIAL_COUNTS[split],
                )
    return counts


def extract_questions(archive: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Extract the question files of a CNN archive into ``data_dir/questions/<split>/``; return counts.

    Only regular-file members named ``[cnn/]questions/{training,validation,test}/<40 hex>.question`` (after a
    leading ``./``) are written; the destination is built from the split folder and the hex name alone, so no member
    name becomes a path and nothing can be written outside ``data_dir``. Links, devices, folders and any other name
    are skipped and counted (``"skipped"``; with a question's name but not a regular file: ``"refused"``). Each file
    goes to a hidden temporary name and is renamed into place, so an interrupted extraction leaves no partial file.
    """
    archive, data_dir = Path(archive), Path(data_dir)
    root = data_dir / "questions"
    counts = {**dict.fromkeys(SPLITS, 0), "skipped": 0, "refused": 0}
    for folder in SPLIT_FOLDERS.values():
        (root / folder).mkdir(parents=True, exist_ok=True)
    with _open_stream(archive) as tar:
        for member, split, name in _question_members(tar):
            if split is None or name is None:
                if not member.isdir():
                    counts["skipped"] += 1
                    log.debug("extract_questions: skipped member %r", member.name)
                continue
            if not member.isfile():
                counts["refused"] += 1
                log.warning("extract_questions: refused %r (not a regular file)", member.name)
                continue
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            dest = root / SPLIT_FOLDERS[split] / name
            tmp = dest.with_name(f".{name}.{uuid.uuid4().hex[:8]}.part")
            try:
                with source, open(tmp, "xb") as out:
                    shutil.copyfileobj(source, out)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            counts[split] += 1
    if counts["skipped"] or counts["refused"]:
        log.info(
            "extract_questions: %d members skipped (other names), %d refused (links or devices with question names)",
            counts["skipped"],
            counts["refused"],
        )
    return counts
