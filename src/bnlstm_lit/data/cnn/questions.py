"""The ``.question`` file format of the DeepMind CNN corpus (Hermann et al. 2015), strictly validated.

One cloze question per file, five fields separated by blank lines -- URL, context, question (one ``@placeholder``),
answer (``@entityN``) and the entity map (``@entityN:surface form`` lines, no newline after the last). The file name
is the SHA-1 of the whole content (rc-data's ``generate_questions.py`` hashes the string it writes), so every file
checks itself: :func:`parse_question` verifies it by default. A bad file raises :class:`QuestionFormatError` naming
the file and the problem.

Also the corpus layout (``questions/{training,validation,test}/``, :data:`SPLIT_FOLDERS`) and the fixed part of the
token ids (:data:`PAD`, :data:`UNK`, :data:`PLACEHOLDER`, :data:`ENTITY_OFFSET`) every other CNN module shares.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ENTITY_OFFSET",
    "ENTITY_RE",
    "MAX_ENTITY_INDEX",
    "PAD",
    "PLACEHOLDER",
    "PLACEHOLDER_TOKEN",
    "QUESTION_SUFFIX",
    "SHA1_RE",
    "SPLITS",
    "SPLIT_FOLDERS",
    "UNK",
    "Question",
    "QuestionFormatError",
    "format_question",
    "parse_question",
    "write_question",
]

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
_FIELDS = ("URL", "context", "question", "answer", "entity mapping")


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
