"""The DeepMind CNN question corpus (Hermann et al. 2015) as it is distributed, for the reading task of paper Sec. 5.4.

Layout: ``<data_dir>/questions/{training,validation,test}/<sha1>.question``, one cloze question per file, five fields
separated by blank lines -- URL, context, question (one ``@placeholder``), answer (``@entityN``) and the entity map
(``@entityN:surface form`` lines, no newline after the last). ``<sha1>`` is the SHA-1 of the whole file content
(rc-data's ``generate_questions.py`` hashes the string it writes), so every file checks itself:
:func:`parse_question` verifies it by default.

Pieces:

* :func:`parse_question` / :func:`format_question` / :func:`write_question`: the file format, strictly validated; a
  bad file raises :class:`QuestionFormatError` naming the file and the problem.
* :func:`read_test_list` / :meth:`CNNQuestions.check_complete`: the test split against the official list of its
  3,198 file names. The list itself is not shipped: its SHA-256 (:data:`OFFICIAL_TEST_DIGEST`, over the sorted names,
  one per line) is enough to tell whether ``questions/test`` is exactly the official split; pass ``test_list`` (the
  file, e.g. ``expected_cnn_test.txt``) to have the missing and extra names listed.
* :func:`check_cnn_archive` / :func:`extract_questions`: the published ``cnn.tgz`` (no md5 is published, so it is
  verified structurally: its test members must be the official test split), extracted member by member -- only
  regular files named ``[cnn/]questions/<split>/<40 hex>.question`` are written, to paths built from the split and
  the hex name alone, so no member can land outside ``data_dir``; links, devices and every other name are skipped.
* :class:`CNNQuestions`: the DataModule. Preprocessing (parse, vocabulary, ids) runs once and is cached on disk;
  training batches are bucketed by length and get the paper's entity-id shuffling.
* :func:`synthetic_corpus`: a small learnable corpus in the same file format (see its docstring for the rule).

Token ids (``CNNQuestions.vocab_size`` of them): ``0`` padding, ``1`` unknown word, ``2`` ``@placeholder``,
``3 .. 3+K-1`` the entity markers ``@entity0 .. @entity{K-1}`` (``K = num_entities``), then the words of the training
vocabulary, most frequent first. Entity ``k`` has token id ``ENTITY_OFFSET + k``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tarfile
import uuid
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from bnlstm_lit.data.base import EpochPosition, SequenceDataModule, check_int, loader_generator
from bnlstm_lit.data.download import check_file, download_url, tar_member_name

__all__ = [
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
]

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
#: Split -> its folder under ``questions/``.
SPLIT_FOLDERS = {"train": "training", "valid": "validation", "test": "test"}

PAD, UNK, PLACEHOLDER, ENTITY_OFFSET = 0, 1, 2, 3
PLACEHOLDER_TOKEN = "@placeholder"
ENTITY_RE = re.compile(r"@entity(\d+)")
SHA1_RE = re.compile(r"[0-9a-f]{40}")
QUESTION_SUFFIX = ".question"
#: Entity indices above this are refused (the real corpus stays below a thousand; ids index a K-way softmax).
MAX_ENTITY_INDEX = 99_999

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

#: Bump when the cache layout or the preprocessing changes: old caches are then rebuilt, never misread.
CACHE_VERSION = 1

_MEMBER_RE = re.compile(r"(?:cnn/)?questions/(training|validation|test)/([0-9a-f]{40})\.question")
_FOLDER_SPLITS = {folder: split for split, folder in SPLIT_FOLDERS.items()}
_FIELDS = ("URL", "context", "question", "answer", "entity mapping")
_EXTRACTING = ".extracting"  # present in questions/ while an extraction is under way
_EXTRACTED = ".extracted"  # written when an extraction finished


# ------------------------------------------------------------------------------------------------------ the file format


class QuestionFormatError(ValueError):
    """A ``.question`` file that does not follow the format; ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class Question:
    """One parsed question file.

    Attributes:
        name: the file name without ``.question`` (the SHA-1 of the content in genuine files).
        url: the article's Wayback Machine URL.
        context: the document's tokens (lowercased, entities as ``@entityN``).
        query: the question's tokens, exactly one of them ``@placeholder``.
        answer: the entity marker the placeholder stands for (``@entityN``); it occurs in the context.
        entities: ``@entityN`` -> surface form, in the file's order.
    """

    name: str
    url: str
    context: tuple[str, ...]
    query: tuple[str, ...]
    answer: str
    entities: dict[str, str] = field(default_factory=dict)

    @property
    def answer_index(self) -> int:
        """N of the answer's ``@entityN``."""
        return _entity_index(self.answer)

    def candidates(self) -> list[int]:
        """The indices of the entities occurring in the context (the answer is one of them), ascending."""
        return sorted({_entity_index(t) for t in self.context if ENTITY_RE.fullmatch(t)})


def _entity_index(token: str) -> int:
    match = ENTITY_RE.fullmatch(token)
    if match is None:
        raise ValueError(f"{token!r} is not an entity marker @entityN")
    return int(match.group(1))


def format_question(question: Question) -> str:
    """The file content of ``question``, exactly as rc-data writes it (no newline after the last mapping line)."""
    mapping = "\n".join(f"{key}:{value}" for key, value in question.entities.items())
    return "\n\n".join([question.url, " ".join(question.context), " ".join(question.query), question.answer, mapping])


def write_question(question: Question, folder: str | os.PathLike[str]) -> Path:
    """Write ``question`` into ``folder`` as ``<sha1 of the content>.question`` (``question.name`` is not used);
    return the path."""
    data = format_question(question).encode("utf-8")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(data).hexdigest()}{QUESTION_SUFFIX}"
    path.write_bytes(data)
    return path


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(token for token in text.split(" ") if token)


def parse_question(path: str | os.PathLike[str], *, verify_name: bool = True) -> Question:
    """Read and validate one ``.question`` file.

    Checks: UTF-8 text; five non-empty fields separated by blank lines, the first four on one line each; exactly one
    ``@placeholder`` in the question and none in the context; the answer an ``@entityN`` that occurs in the context;
    mapping lines ``@entityN:surface``, each entity once, and one for every entity of the context, question and
    answer; and with ``verify_name``, the file name is the SHA-1 of the content. A trailing newline after the last
    mapping line is tolerated by the parser (a genuine file has none, so its name check then fails).

    Raises:
        QuestionFormatError: the file breaks the format; the message names the file and the problem.
        OSError: the file cannot be read.
    """
    path = Path(path)
    raw = path.read_bytes()

    def fail(problem: str) -> QuestionFormatError:
        return QuestionFormatError(path, problem)

    if not raw.strip():
        raise fail("the file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise fail(f"not UTF-8 text (byte offset {err.start})") from None
    if "\r" in text:
        raise fail("carriage return found (Windows line endings?); fields are separated by blank lines of '\\n'")
    parts = text.rstrip("\n").split("\n\n")
    if len(parts) != len(_FIELDS):
        raise fail(
            f"{len(parts)} fields separated by blank lines, expected {len(_FIELDS)} "
            f"({', '.join(_FIELDS)}); a field is missing or one has a blank line inside"
        )
    for name, part in zip(_FIELDS, parts, strict=True):
        if not part.strip():
            raise fail(f"the {name} field is empty")
        if name != "entity mapping" and "\n" in part:
            raise fail(f"the {name} field spans {part.count(chr(10)) + 1} lines, it must be one line")
    url, context_text, query_text, answer, mapping = parts
    context, query = _tokens(context_text), _tokens(query_text)
    placeholders = query.count(PLACEHOLDER_TOKEN)
    if placeholders != 1:
        found = "no @placeholder" if placeholders == 0 else f"{placeholders} @placeholder tokens"
        raise fail(f"the question has {found}, it must have exactly one: {query_text!r}")
    if PLACEHOLDER_TOKEN in context:
        raise fail("the context contains @placeholder")
    answer = answer.strip()
    if ENTITY_RE.fullmatch(answer) is None:
        raise fail(f"the answer {answer!r} is not an entity marker @entityN")
    if answer not in context:
        raise fail(f"the answer {answer} does not occur in the document (context)")
    entities: dict[str, str] = {}
    for number, line in enumerate(mapping.split("\n"), start=1):
        key, colon, value = line.partition(":")
        if not colon or ENTITY_RE.fullmatch(key) is None:
            raise fail(f"entity mapping line {number} {line!r} is not '@entityN:surface form'")
        if key in entities:
            raise fail(f"{key} is mapped twice in the entity mapping")
        entities[key] = value
    for where, tokens in (("context", context), ("question", query), ("answer", (answer,))):
        for token in tokens:
            if ENTITY_RE.fullmatch(token) is not None:
                if token not in entities:
                    raise fail(f"{token} occurs in the {where} but has no line in the entity mapping")
                if _entity_index(token) > MAX_ENTITY_INDEX:
                    raise fail(f"{token}: entity index above the limit of {MAX_ENTITY_INDEX}")
    name = path.name.removesuffix(QUESTION_SUFFIX)
    if verify_name:
        if SHA1_RE.fullmatch(name) is None or not path.name.endswith(QUESTION_SUFFIX):
            raise fail("the file name is not <40 lowercase hex digits>.question (the SHA-1 of the content)")
        actual = hashlib.sha1(raw).hexdigest()
        if actual != name:
            raise fail(
                f"the name is not the SHA-1 of the file's content ({actual}): the file was modified or truncated "
                "(verify_names=False skips this check)"
            )
    return Question(name, url, context, query, answer, entities)


# ------------------------------------------------------------------------------------------------ relevant sentences

_SENTENCE_ENDS = frozenset({".", "!", "?"})
#: Function words that do not make a sentence relevant to a query (plus every token without a letter or digit).
_STOP_WORDS = frozenset(
    "a an and are as at be been but by for from had has have he her his i in is it its of on or she so that the "  # noqa: SIM905
    "their they this to was were will with 's said".split()
)


def _content_words(tokens: Iterable[str]) -> set[str]:
    return {t for t in tokens if t != PLACEHOLDER_TOKEN and t not in _STOP_WORDS and any(ch.isalnum() for ch in t)}


def split_sentences(tokens: Sequence[str]) -> list[list[str]]:
    """Cut a tokenized document after every ``.``, ``!`` and ``?`` token (a tail without one is a sentence too)."""
    sentences: list[list[str]] = []
    current: list[str] = []
    for token in tokens:
        current.append(token)
        if token in _SENTENCE_ENDS:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def select_sentences(context: Sequence[str], query: Sequence[str], k: int) -> list[str]:
    """The paper's reduced documents: the ``k`` sentences most relevant to the query, in document order.

    A sentence's relevance is the number of distinct query words it contains, not counting ``@placeholder``,
    punctuation and common function words (entity markers count); ties go to the earlier sentence. Documents with
    at most ``k`` sentences are returned whole.
    """
    sentences = split_sentences(context)
    if len(sentences) <= k:
        return list(context)
    words = _content_words(query)
    scores = [len(words.intersection(sentence)) for sentence in sentences]
    keep = sorted(sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:k])
    return [token for i in keep for token in sentences[i]]


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


# ------------------------------------------------------------------------------------------------------ the cache


class _ProvisionalIds(dict[str, int]):
    """Token -> provisional id while parsing: words 0, 1, ... in order of first sight; ``@placeholder`` -1;
    ``@entityN`` -(N + 2). Remapped to the final ids once the training counts are known."""

    def __init__(self) -> None:
        super().__init__()
        self.words: list[str] = []

    def __missing__(self, token: str) -> int:
        match = ENTITY_RE.fullmatch(token)
        if match is not None:
            value = -2 - int(match.group(1))
        elif token == PLACEHOLDER_TOKEN:
            value = -1
        else:
            value = len(self.words)
            self.words.append(token)
        self[token] = value
        return value


def _write_ints(out: IO[bytes], values: Sequence[int]) -> None:
    out.write(np.asarray(values, dtype=np.int32).tobytes())


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    return offsets


def _remap(raw: Path, out: Path, table: np.ndarray, chunk: int = 1 << 24) -> None:
    """Provisional ids (raw int32 file) -> final ids (.npy int32), chunk by chunk (memory stays flat)."""
    source = np.fromfile(raw, dtype=np.int32) if raw.stat().st_size < 4 * chunk else np.memmap(raw, np.int32, "r")
    target = np.lib.format.open_memmap(out, mode="w+", dtype=np.int32, shape=(len(source),))
    for start in range(0, len(source), chunk):
        p = np.asarray(source[start : start + chunk])
        words = table[np.maximum(p, 0)]
        target[start : start + chunk] = np.where(p >= 0, words, np.where(p == -1, PLACEHOLDER, ENTITY_OFFSET - 2 - p))
    target.flush()
    del target


def _count_words(raws: Sequence[Path], num_words: int, chunk: int = 1 << 24) -> np.ndarray:
    counts = np.zeros(num_words, dtype=np.int64)
    for raw in raws:
        source = np.memmap(raw, np.int32, "r") if raw.stat().st_size else np.zeros(0, np.int32)
        for start in range(0, len(source), chunk):
            p = np.asarray(source[start : start + chunk])
            counts += np.bincount(p[p >= 0], minlength=num_words)
    return counts


@dataclass
class _Settings:
    """Everything besides the files that changes the preprocessing (part of the cache key)."""

    relevant_sentences: int | None
    max_context_tokens: int | None
    long_contexts: str
    max_vocab_words: int | None
    min_count: int
    skip_malformed: bool
    verify_names: bool

    def as_dict(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, **self.__dict__}


Listing = dict[str, list[tuple[str, int, int]]]  # split -> [(file name, size, mtime_ns)], sorted by name


def _build_cache(root: Path, listing: Listing, settings: _Settings, folder: Path, key_info: dict[str, Any]) -> None:
    """Parse every question file once and write the cache into ``folder`` (built in a temporary sibling folder and
    renamed into place, so a cache folder is always complete)."""
    tmp = folder.with_name(f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        meta = _write_cache(root, listing, settings, tmp)
        meta.update(key_info)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, folder)  # atomic publication
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            log.info("CNNQuestions: another process wrote the cache %s first; using it", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_cache(root: Path, listing: Listing, settings: _Settings, out: Path) -> dict[str, Any]:
    ids = _ProvisionalIds()
    stats: dict[str, dict[str, Any]] = {}
    total = sum(len(files) for files in listing.values())
    seen = 0
    for split in SPLITS:
        folder = root / SPLIT_FOLDERS[split]
        context_lengths: list[int] = []
        query_lengths: list[int] = []
        candidate_counts: list[int] = []
        candidates = array("i")
        answers: list[int] = []
        names: list[str] = []
        skipped: list[str] = []
        skipped_long = truncated = answer_outside = 0
        with open(out / f"{split}.context.raw", "wb") as ctx_out, open(out / f"{split}.query.raw", "wb") as q_out:
            for name, _size, _mtime in listing[split]:
                seen += 1
                if seen % 50_000 == 0:
                    log.info("CNNQuestions: preprocessed %d of %d question files", seen, total)
                try:
                    question = parse_question(folder / name, verify_name=settings.verify_names)
                except QuestionFormatError as err:
                    if not settings.skip_malformed:
                        raise
                    skipped.append(name)
                    log.debug("CNNQuestions: skipping %s", err)
                    continue
                full = [ids[t] for t in question.context]
                context = full
                if settings.relevant_sentences is not None:
                    kept = select_sentences(question.context, question.query, settings.relevant_sentences)
                    context = [ids[t] for t in kept]
                limit = settings.max_context_tokens
                if limit is not None and len(context) > limit:
                    if split == "train" and settings.long_contexts == "skip":
                        skipped_long += 1
                        continue
                    context = context[:limit]
                    truncated += 1
                answer = question.answer_index
                if -2 - answer not in context:
                    answer_outside += 1
                query = [ids[t] for t in question.query]
                entities = sorted({-2 - code for code in full if code <= -2})
                _write_ints(ctx_out, context)
                _write_ints(q_out, query)
                context_lengths.append(len(context))
                query_lengths.append(len(query))
                candidates.extend(entities)
                candidate_counts.append(len(entities))
                answers.append(answer)
                names.append(name)
        if not names:
            raise ValueError(
                f"{folder}: no usable questions ({len(listing[split])} files, {len(skipped)} malformed, "
                f"{skipped_long} too long)"
            )
        np.save(out / f"{split}.context_offsets.npy", _offsets(context_lengths))
        np.save(out / f"{split}.query_offsets.npy", _offsets(query_lengths))
        np.save(out / f"{split}.candidates.npy", np.frombuffer(candidates, dtype=np.int32).copy())
        np.save(out / f"{split}.candidate_offsets.npy", _offsets(candidate_counts))
        np.save(out / f"{split}.answer.npy", np.asarray(answers, dtype=np.int64))
        (out / f"{split}.names.json").write_text(json.dumps(names), encoding="utf-8")
        stats[split] = {
            "questions": len(names),
            "files": len(listing[split]),
            "skipped_malformed": len(skipped),
            "skipped_malformed_names": skipped[:20],
            "skipped_long": skipped_long,
            "truncated": truncated,
            "answer_outside_context": answer_outside,
            "max_context": max(context_lengths),
            "max_query": max(query_lengths),
            "mean_context": float(np.mean(context_lengths)),
        }
    # sizes: K entity ids cover every entity seen in any split; the words come from the training split only
    num_entities = 1 + max((-2 - code for code in ids.values() if code <= -2), default=0)
    counts = _count_words([out / "train.context.raw", out / "train.query.raw"], len(ids.words))
    # most frequent first, ties alphabetical (the vocabulary does not depend on the order files were read in)
    order = sorted(
        (i for i in range(len(ids.words)) if counts[i] >= settings.min_count), key=lambda i: (-counts[i], ids.words[i])
    )
    if settings.max_vocab_words is not None:
        order = order[: settings.max_vocab_words]
    words = [ids.words[i] for i in order]
    table = np.full(max(len(ids.words), 1), UNK, dtype=np.int32)
    table[np.asarray(order, dtype=np.int64)] = ENTITY_OFFSET + num_entities + np.arange(len(order), dtype=np.int32)
    for split in SPLITS:
        for part in ("context", "query"):
            raw = out / f"{split}.{part}.raw"
            _remap(raw, out / f"{split}.{part}.npy", table)
            raw.unlink()
    (out / "vocab.json").write_text(json.dumps(words), encoding="utf-8")
    return {
        "num_entities": num_entities,
        "num_words": len(words),
        "vocab_size": ENTITY_OFFSET + num_entities + len(words),
        "vocab_digest": hashlib.sha256(json.dumps(words).encode("utf-8")).hexdigest(),
        "splits": stats,
    }


# ------------------------------------------------------------------------------------------------ dataset and batches


class QABatch(NamedTuple):
    """A batch of cloze questions (padding id 0; rows need not be sorted by length).

    Attributes:
        context: int64 (B, Td) token ids of the documents, padded to the longest in the batch.
        context_lengths: int64 (B,) tokens per document.
        query: int64 (B, Tq) token ids of the questions (one ``PLACEHOLDER`` each), padded.
        query_lengths: int64 (B,).
        candidates: bool (B, K) over the entity ids: entity k occurs in the document (the softmax's support).
        answer: int64 (B,) the answer's entity id in [0, K) (its token id is ``ENTITY_OFFSET + answer``).
        example: int64 (B,) the examples' positions in their split (``CNNQuestions.names(split)[i]`` names the
            file of example i).
    """

    context: Tensor
    context_lengths: Tensor
    query: Tensor
    query_lengths: Tensor
    candidates: Tensor
    answer: Tensor
    example: Tensor


class QuestionExample(NamedTuple):
    context: np.ndarray  # int64 (Td,)
    query: np.ndarray  # int64 (Tq,)
    candidates: np.ndarray  # int64 (Nc,) entity ids
    answer: int
    example: int


def entity_permutation(num_entities: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """The entity relabelling of example ``index`` in ``epoch``: a permutation of ``range(num_entities)``."""
    return np.random.default_rng((seed, epoch, index)).permutation(num_entities)


class CNNQuestionDataset(Dataset[QuestionExample]):
    """One split of the cache. Items are looked up by index, or by ``(index, epoch)`` from :class:`BucketSampler`:
    with ``shuffle_entities`` the example's entity ids then go through :func:`entity_permutation` (context, query,
    candidates and answer alike), a function of (seed, epoch, index) only."""

    def __init__(self, folder: Path, split: str, num_entities: int, shuffle_entities: bool, seed: int) -> None:
        self.folder = folder
        self.split = split
        self.num_entities = num_entities
        self.shuffle_entities = shuffle_entities
        self.seed = seed
        load = np.load
        self.context_offsets = load(folder / f"{split}.context_offsets.npy")
        self.query_offsets = load(folder / f"{split}.query_offsets.npy")
        self.candidate_offsets = load(folder / f"{split}.candidate_offsets.npy")
        self.answers = load(folder / f"{split}.answer.npy")
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # memory-mapped, opened per process

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # workers map the files themselves instead of receiving copies
        return state

    @property
    def context_lengths(self) -> np.ndarray:
        return np.diff(self.context_offsets)

    @property
    def query_lengths(self) -> np.ndarray:
        return np.diff(self.query_offsets)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The split's context tokens, query tokens and candidates, flat (memory-mapped)."""
        if self._arrays is None:
            self._arrays = tuple(  # type: ignore[assignment]
                np.load(self.folder / f"{self.split}.{part}.npy", mmap_mode="r")
                for part in ("context", "query", "candidates")
            )
        assert self._arrays is not None
        return self._arrays

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, key: int | tuple[int, int]) -> QuestionExample:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
        contexts, queries, all_candidates = self.arrays()
        context = np.array(contexts[self.context_offsets[index] : self.context_offsets[index + 1]], dtype=np.int64)
        query = np.array(queries[self.query_offsets[index] : self.query_offsets[index + 1]], dtype=np.int64)
        offsets = self.candidate_offsets
        candidates = np.array(all_candidates[offsets[index] : offsets[index + 1]], dtype=np.int64)
        answer = int(self.answers[index])
        if self.shuffle_entities and epoch is not None:
            perm = entity_permutation(self.num_entities, self.seed, epoch, index)
            for tokens in (context, query):
                entity = (tokens >= ENTITY_OFFSET) & (tokens < ENTITY_OFFSET + self.num_entities)
                tokens[entity] = ENTITY_OFFSET + perm[tokens[entity] - ENTITY_OFFSET]
            candidates = perm[candidates]
            answer = int(perm[answer])
        return QuestionExample(context, query, candidates, answer, index)


def _pad(rows: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    out = torch.zeros(len(rows), int(lengths.max()), dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.from_numpy(row)
    return out, lengths


class QACollate:
    """QuestionExamples -> a :class:`QABatch`."""

    def __init__(self, num_entities: int) -> None:
        self.num_entities = num_entities

    def __call__(self, items: Sequence[QuestionExample]) -> QABatch:
        context, context_lengths = _pad([item.context for item in items])
        query, query_lengths = _pad([item.query for item in items])
        candidates = torch.zeros(len(items), self.num_entities, dtype=torch.bool)
        for i, item in enumerate(items):
            candidates[i, torch.from_numpy(item.candidates)] = True
        answer = torch.tensor([item.answer for item in items], dtype=torch.int64)
        example = torch.tensor([item.example for item in items], dtype=torch.int64)
        return QABatch(context, context_lengths, query, query_lengths, candidates, answer, example)


class BucketSampler(EpochPosition, Sampler[tuple[int, int]]):
    """Training order with little padding: yields ``(index, epoch)``, read in consecutive groups of ``batch_size``.

    Each epoch: a random permutation drawn from (seed, epoch); its first ``N - N % batch_size`` examples are cut into
    chunks of ``bucket_batches`` batches, each chunk sorted by length (so a batch holds similar lengths) and cut into
    batches; the batches are shuffled and the ``N % batch_size`` leftover examples come last (a DataLoader with
    ``drop_last=True`` drops them; other epochs draw other leftovers). ``bucket_batches=1``: plain shuffled batches.
    :meth:`skip` starts the next iteration ``count`` examples into the epoch (a run resumed mid-epoch).
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, batch_size: int, bucket_batches: int, seed: int) -> None:
        super().__init__(seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.bucket_batches = bucket_batches

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's example order (int64 (N,))."""
        generator = self.epoch_generator(epoch)
        perm = torch.randperm(len(self.lengths), generator=generator).numpy()
        B = self.batch_size
        full = len(perm) - len(perm) % B
        chunk = B * self.bucket_batches
        batches: list[np.ndarray] = []
        for start in range(0, full, chunk):
            part = perm[start : min(start + chunk, full)]
            if self.bucket_batches > 1:
                part = part[np.argsort(self.lengths[part], kind="stable")]
            batches.extend(part[i : i + B] for i in range(0, len(part), B))
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return np.concatenate([*(batches[i] for i in shuffle), perm[full:]]).astype(np.int64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, epoch = self.take_start(), self.epoch
        for index in self.order(epoch)[start:].tolist():
            yield (index, epoch)


class _FixedOrder(Sampler[int]):
    def __init__(self, order: Sequence[int]) -> None:
        self.order = list(order)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)


# ------------------------------------------------------------------------------------------------------ DataModule

LongContexts = Literal["truncate", "skip"]
Completeness = Literal["error", "warn", "off"]


class CNNQuestions(SequenceDataModule):
    """The CNN cloze questions for an Attentive Reader (entity prediction over the document's entities).

    Preprocessing -- parse and validate every file, select sentences, truncate, build the vocabulary, turn tokens into
    ids -- runs once and is cached in ``cache_dir/<key>/`` (int32 token arrays, memory-mapped when read). The key
    hashes every question file's name, size and modification time (nanoseconds) with every setting that changes the
    preprocessing, so a changed, added or removed file or setting builds a new cache, and a run with the same files
    and settings reads the cache without opening a single question file. The cache is written into a temporary
    folder and renamed into place, so concurrent runs never see half a cache. (A file rewritten with the same size
    and the same mtime would go unnoticed.) Caches of other keys are left in place.

    Sizes (``input_size = vocab_size``, ``output_size = num_entities``, ``max_steps`` the longest training context
    after selection/truncation, ``max_query_steps``) come from the cache, so reading them before ``setup`` (the CLI
    does, at instantiation) builds or loads it then -- downloading first when ``download`` is set.

    Candidates are the entities occurring in the whole document (before sentence selection or truncation, which may
    drop the answer from the text the model reads: the cache counts such questions as ``answer_outside_context``);
    ``K = num_entities`` is one more than the largest entity index of any split. Word vocabulary: the words of the
    training text as the model reads it (documents after sentence selection and truncation, and questions) with at
    least ``min_count`` occurrences, the ``max_vocab_words`` most frequent (ties alphabetical); others read as
    ``UNK``.

    Args:
        data_dir: the folder holding ``questions/{training,validation,test}/``.
        download: in ``prepare_data``, fetch ``cnn.tgz`` (``mirrors``) unless the corpus is there, check it (its test
            members must be the reference test split; ``archive_md5`` too when given) and extract the question files.
        mirrors: URLs of the archive, tried in order.
        archive: the archive's file name in ``data_dir`` (an archive already there is checked and used).
        archive_md5: the archive's md5 when known (none is published).
        test_list: a file listing the test file names (``expected_cnn_test.txt``); None: the official list's digest.
        completeness: at ``setup``, the test split against the reference list: raise (``"error"``), log a warning
            (``"warn"``) or skip the check (``"off"``, e.g. for :func:`synthetic_corpus` corpora).
        batch_size: training batch (64 in the paper).
        eval_batch_size: validation / test batch; None: ``batch_size``.
        max_context_tokens: documents longer than this are truncated to their first tokens (None: no limit).
        long_contexts: ``"truncate"``, or ``"skip"``: training questions with longer documents are left out (counted;
            validation and test questions are always kept, truncated).
        relevant_sentences: keep only the k sentences most relevant to the question (:func:`select_sentences`).
        max_vocab_words: at most this many words in the vocabulary (None: all).
        min_count: words seen fewer times in training are unknown.
        shuffle_entities: training augmentation: relabel every example's entities by a random permutation, drawn
            from (seed, epoch, example), applied to context, question, candidates and answer alike.
        skip_malformed: leave out malformed files (counted and logged) instead of raising on the first one.
        verify_names: check that every file's name is the SHA-1 of its content.
        bucket_batches: training batches are cut from chunks of this many batches sorted by length
            (:class:`BucketSampler`); 1 turns bucketing off. Validation and test are read sorted by length.
        cache_dir: where the caches go; None: ``data_dir/.cache``.
        num_workers: DataLoader workers.
        pin_memory: page-locked batches.
        seed: seeds the training order and the entity permutations.
    """

    def __init__(
        self,
        data_dir: str = "data/cnn",
        download: bool = False,
        mirrors: Sequence[str] = CNN_MIRRORS,
        archive: str = CNN_ARCHIVE,
        archive_md5: str | None = None,
        test_list: str | None = None,
        completeness: Completeness = "error",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        max_context_tokens: int | None = None,
        long_contexts: LongContexts = "truncate",
        relevant_sentences: int | None = None,
        max_vocab_words: int | None = None,
        min_count: int = 1,
        shuffle_entities: bool = True,
        skip_malformed: bool = False,
        verify_names: bool = True,
        bucket_batches: int = 50,
        cache_dir: str | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("eval_batch_size", eval_batch_size, 1, optional=True)
        check_int("max_context_tokens", max_context_tokens, 1, optional=True)
        check_int("relevant_sentences", relevant_sentences, 1, optional=True)
        check_int("max_vocab_words", max_vocab_words, 0, optional=True)
        check_int("min_count", min_count, 1)
        check_int("bucket_batches", bucket_batches, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        if long_contexts not in ("truncate", "skip"):
            raise ValueError(
                f"long_contexts (data.init_args.long_contexts) must be 'truncate' or 'skip', got {long_contexts!r}"
            )
        if completeness not in ("error", "warn", "off"):
            raise ValueError(
                f"completeness (data.init_args.completeness) must be 'error', 'warn' or 'off', got {completeness!r}"
            )
        if isinstance(mirrors, str):
            mirrors = [mirrors]
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.mirrors = list(mirrors)
        self.archive = archive
        self.archive_md5 = archive_md5
        self.test_list = test_list
        self.completeness = completeness
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.settings = _Settings(
            relevant_sentences,
            max_context_tokens,
            long_contexts,
            max_vocab_words,
            min_count,
            skip_malformed,
            verify_names,
        )
        self.shuffle_entities = shuffle_entities
        self.bucket_batches = bucket_batches
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else self.data_dir / ".cache"
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.cache_path: Path | None = None
        self.meta: dict[str, Any] = {}
        self.datasets: dict[str, CNNQuestionDataset] = {}
        self._words: list[str] | None = None
        self._checked = False

    # ---- corpus ---------------------------------------------------------------------------------------------------
    @property
    def questions_dir(self) -> Path:
        return self.data_dir / "questions"

    def corpus_ready(self) -> bool:
        """The three split folders hold question files and no extraction was left unfinished."""
        if (self.questions_dir / _EXTRACTING).exists():
            return False
        for folder_name in SPLIT_FOLDERS.values():
            folder = self.questions_dir / folder_name
            if not folder.is_dir():
                return False
            with os.scandir(folder) as it:
                if not any(entry.name.endswith(QUESTION_SUFFIX) for entry in it):
                    return False
        return True

    def reference(self) -> TestList:
        """The test list the test split is checked against."""
        return TestList.from_file(self.test_list) if self.test_list is not None else TestList.official()

    def download_corpus(self) -> None:
        """Fetch (unless a valid archive is already in ``data_dir``), check and extract the archive."""
        archive = self.data_dir / self.archive
        reference = self.reference()

        def check(path: Path) -> None:
            counts = check_cnn_archive(path, reference)
            log.info(
                "CNNQuestions: %s holds %s questions (train/valid/test)", path, "/".join(map(str, counts.values()))
            )

        usable = False
        if archive.is_file() and check_file(archive, self.archive_md5):
            try:
                check(archive)
                usable = True
            except ValueError as err:
                log.warning("CNNQuestions: %s is not usable (%s); downloading it again", archive, err)
        if not usable:
            download_url(self.mirrors, archive, self.archive_md5, check=check)
        self.questions_dir.mkdir(parents=True, exist_ok=True)
        marker = self.questions_dir / _EXTRACTING
        marker.touch()
        counts = extract_questions(archive, self.data_dir)
        (self.questions_dir / _EXTRACTED).write_text(json.dumps({"archive": archive.name, **counts}), encoding="utf-8")
        marker.unlink()

    def _listing(self) -> Listing:
        listing: Listing = {}
        for split, folder_name in SPLIT_FOLDERS.items():
            folder = self.questions_dir / folder_name
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"CNNQuestions: {folder.resolve()} does not exist. Put the CNN corpus (questions/training, "
                    "questions/validation, questions/test) in data_dir, or set data.init_args.download=true "
                    "(download=True)."
                )
            entries = []
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.endswith(QUESTION_SUFFIX) and not entry.name.startswith("."):
                        stat = entry.stat()
                        entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
            if not entries:
                raise FileNotFoundError(f"CNNQuestions: {folder.resolve()} holds no .question files")
            listing[split] = sorted(entries)
        return listing

    def check_complete(self, raise_error: bool = True) -> CompletenessReport:
        """Compare the names in ``questions/test`` with the reference test list (:meth:`reference`).

        Raises:
            RuntimeError: with ``raise_error``, when they differ; the message says how many names are missing and
                extra (and the first few, when the list file is given).
        """
        folder = self.questions_dir / SPLIT_FOLDERS["test"]
        names = [p.name for p in folder.iterdir() if p.name.endswith(QUESTION_SUFFIX)] if folder.is_dir() else []
        report = compare_test_names(names, self.reference())
        if raise_error and not report.complete:
            raise RuntimeError(f"CNNQuestions: incomplete test split: {report.describe(folder)}")
        return report

    # ---- cache ----------------------------------------------------------------------------------------------------
    def _ensure_cache(self) -> Path:
        if self.cache_path is not None:
            return self.cache_path
        if self.download and not self.corpus_ready():
            self.download_corpus()
        listing = self._listing()
        listing_digest = hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
        settings = self.settings.as_dict()
        key = hashlib.sha256(json.dumps([listing_digest, settings], sort_keys=True).encode("utf-8")).hexdigest()[:20]
        folder = self.cache_dir / key
        meta = self._read_meta(folder, listing_digest)
        if meta is None:
            log.info("CNNQuestions: preprocessing %s into %s (once)", self.questions_dir, folder)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            _build_cache(
                self.questions_dir,
                listing,
                self.settings,
                folder,
                {"listing_digest": listing_digest, "settings": settings},
            )
            meta = self._read_meta(folder, listing_digest)
            if meta is None:
                raise RuntimeError(f"CNNQuestions: the cache {folder} was written but cannot be read back")
        self.meta = meta
        self.cache_path = folder
        skipped = {s: meta["splits"][s]["skipped_malformed"] for s in SPLITS}
        if any(skipped.values()):
            examples = [n for s in SPLITS for n in meta["splits"][s]["skipped_malformed_names"]][:5]
            log.warning(
                "CNNQuestions: skipped %d malformed question files (train/valid/test: %s), e.g. %s",
                sum(skipped.values()),
                "/".join(str(v) for v in skipped.values()),
                ", ".join(examples),
            )
        return folder

    @staticmethod
    def _read_meta(folder: Path, listing_digest: str) -> dict[str, Any] | None:
        path = folder / "meta.json"
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("CNNQuestions: unreadable cache %s (%s); rebuilding it", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        if meta.get("listing_digest") != listing_digest or meta.get("settings", {}).get("version") != CACHE_VERSION:
            return None
        return meta

    @property
    def cache_stats(self) -> dict[str, dict[str, Any]]:
        """Per split: questions, files, skipped_malformed (+ names), skipped_long, truncated, answer_outside_context,
        max_context, max_query, mean_context."""
        self._ensure_cache()
        return self.meta["splits"]

    @property
    def words(self) -> list[str]:
        """The word vocabulary; word ``i`` has token id ``ENTITY_OFFSET + num_entities + i``."""
        if self._words is None:
            folder = self._ensure_cache()
            self._words = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        return self._words

    def names(self, split: str) -> list[str]:
        """The file names of a split's examples, in example order."""
        folder = self._ensure_cache()
        return json.loads((folder / f"{split}.names.json").read_text(encoding="utf-8"))

    def decode(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Token ids -> tokens (``<pad>``, ``<unk>``, ``@placeholder``, ``@entityN`` or the word)."""
        words, k = self.words, self.num_entities
        out = []
        for i in torch.as_tensor(ids).reshape(-1).tolist():
            if i == PAD:
                out.append("<pad>")
            elif i == UNK:
                out.append("<unk>")
            elif i == PLACEHOLDER:
                out.append(PLACEHOLDER_TOKEN)
            elif i < ENTITY_OFFSET + k:
                out.append(f"@entity{i - ENTITY_OFFSET}")
            else:
                out.append(words[i - ENTITY_OFFSET - k])
        return out

    # ---- sizes ----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids: 3 special, ``num_entities`` entity markers, the words."""
        self._ensure_cache()
        return int(self.meta["vocab_size"])

    @property
    def num_entities(self) -> int:
        """K: entity ids 0..K-1 (one more than the largest ``@entityN`` of the corpus)."""
        self._ensure_cache()
        return int(self.meta["num_entities"])

    @property
    def input_size(self) -> int:
        return self.vocab_size

    @property
    def output_size(self) -> int:
        return self.num_entities

    @property
    def max_steps(self) -> int:
        """The longest training document (tokens, after sentence selection and truncation)."""
        return int(self.cache_stats["train"]["max_context"])

    @property
    def max_query_steps(self) -> int:
        """The longest training question (tokens)."""
        return int(self.cache_stats["train"]["max_query"])

    # ---- Lightning hooks ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download when asked and build the cache (once per node, before ``setup``)."""
        self._ensure_cache()

    def setup(self, stage: str | None = None) -> None:
        folder = self._ensure_cache()
        if not self._checked and self.completeness != "off":
            report = self.check_complete(raise_error=self.completeness == "error")
            if not report.complete:
                log.warning("CNNQuestions: %s", report.describe(self.questions_dir / SPLIT_FOLDERS["test"]))
            self._checked = True
        if not self.datasets:
            k = self.num_entities
            self.datasets = {
                split: CNNQuestionDataset(folder, split, k, self.shuffle_entities and split == "train", self.seed)
                for split in SPLITS
            }

    def state_dict(self) -> dict[str, Any]:
        self._ensure_cache()
        return {**super().state_dict(), "vocabulary": self._vocabulary_state()}

    def _vocabulary_state(self) -> dict[str, Any]:
        self._ensure_cache()
        return {
            "digest": self.meta["vocab_digest"],
            "vocab_size": self.vocab_size,
            "num_entities": self.num_entities,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that a checkpoint was trained with this vocabulary (ids would mean other words otherwise)."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("vocabulary")
        if not isinstance(saved, dict):
            raise ValueError(
                f"CNNQuestions.load_state_dict: no 'vocabulary' in the state (keys: {sorted(state_dict)}); the "
                "checkpoint was not written by CNNQuestions"
            )
        ours = self._vocabulary_state()
        if saved != ours:
            raise ValueError(
                f"the checkpoint was trained with another vocabulary ({saved}) than CNNQuestions has now ({ours}): "
                "token and entity ids would mean other things. Use the same corpus and preprocessing settings "
                "(max_vocab_words, min_count, relevant_sentences, ...)."
            )

    # ---- loaders --------------------------------------------------------------------------------------------------
    def _dataset(self, split: str, stage: str) -> CNNQuestionDataset:
        if split not in self.datasets:
            raise RuntimeError(f"CNNQuestions: data not loaded; call setup({stage!r}) first")
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", "fit")
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} questions, fewer than one batch of {self.batch_size} "
                "(data.init_args.batch_size)"
            )
        sampler = BucketSampler(dataset.context_lengths, self.batch_size, self.bucket_batches, self.seed)
        self.prepare_train_sampler(sampler, self.batch_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=QACollate(self.num_entities),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=loader_generator(self.seed),
        )

    def _evaluation(self, split: str, stage: str) -> DataLoader:
        dataset = self._dataset(split, stage)
        order = np.argsort(-dataset.context_lengths, kind="stable").tolist()  # longest first: memory fails early
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=_FixedOrder(order),
            collate_fn=QACollate(self.num_entities),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=loader_generator(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._evaluation("valid", "fit")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation("test", "test")


# ------------------------------------------------------------------------------------------------ synthetic corpus

_FILLER = tuple(
    "the a new report says on after before officials city people year time week government group team country "  # noqa: SIM905
    "home state police world show day told added school family life film game water market plan".split()
)
_CUES = tuple(
    "visited praised joined signed met warned hired blamed thanked sued backed named called beat left chose sold "  # noqa: SIM905
    "found".split()
)


def synthetic_corpus(
    root: str | os.PathLike[str],
    num_train: int,
    num_valid: int,
    num_test: int,
    seed: int = 0,
    min_entities: int = 3,
    max_entities: int = 6,
    max_filler: int = 6,
) -> dict[str, list[str]]:
    """Write a learnable corpus of ``.question`` files under ``root/questions/<split>/``; return the file names.

    The rule: each document has n entities (``min_entities``..``max_entities``) and n distinct cue words (from a
    fixed list of 18 verbs); for every entity there is one sentence ``<filler> <cue> @entityX <filler> .`` and one
    more sentence mentioning it after filler words only, the sentences in random order. The question is
    ``<filler> <cue> @placeholder <filler>`` for one of the cues; **the answer is the entity written immediately
    after that cue in the document**. Every entity occurs exactly twice and the answer is drawn uniformly among
    them, so frequency and position carry no information: choosing among the candidates by anything but reading the
    cue gives 1/n (about 24% for 3..6 entities), while a reader that matches the cue gets every question right.
    Entity indices are sparse (drawn from 0..4n-1, like the real corpus), documents are 20-150 tokens long and every
    file is named by the SHA-1 of its content. Read it with ``CNNQuestions(data_dir=root, completeness="off")``
    (its test split is not the official one). ``max_filler`` bounds the filler runs (the default 6 gives the lengths
    above; 1 gives sentences of 3-4 tokens and questions of 3, quick to learn in tests).
    """
    if not 1 <= min_entities <= max_entities <= len(_CUES):
        raise ValueError(f"need 1 <= min_entities <= max_entities <= {len(_CUES)}")
    if max_filler < 1:
        raise ValueError(f"need max_filler >= 1, got {max_filler}")
    f = max_filler
    rng = random.Random(seed)
    names: dict[str, list[str]] = {}
    for split, count in zip(SPLITS, (num_train, num_valid, num_test), strict=True):
        folder = Path(root) / "questions" / SPLIT_FOLDERS[split]
        folder.mkdir(parents=True, exist_ok=True)
        names[split] = []
        for i in range(count):
            n = rng.randint(min_entities, max_entities)
            entities = [f"@entity{e}" for e in rng.sample(range(4 * n), n)]
            cues = rng.sample(_CUES, n)

            def filler(low: int, high: int) -> list[str]:
                return [rng.choice(_FILLER) for _ in range(rng.randint(low, high))]

            sentences = [
                filler(1, f) + [cue, entity] + filler(0, f - 1) + ["."]
                for cue, entity in zip(cues, entities, strict=True)
            ]
            sentences += [filler(1, max(1, f - 1)) + [entity] + filler(0, max(0, f - 2)) + ["."] for entity in entities]
            rng.shuffle(sentences)
            j = rng.randrange(n)
            question = Question(
                name="",
                url=f"http://synthetic.invalid/{split}/{i}",
                context=tuple(token for sentence in sentences for token in sentence),
                query=tuple(filler(1, max(1, f - 2)) + [cues[j], PLACEHOLDER_TOKEN] + filler(0, max(0, f - 3))),
                answer=entities[j],
                entities={entity: f"Entity {entity[7:]}" for entity in entities},
            )
            names[split].append(write_question(question, folder).name)
    return names
