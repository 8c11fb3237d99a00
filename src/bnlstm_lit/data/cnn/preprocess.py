"""The CNN preprocessing and its on-disk cache: sentence selection, vocabulary, token ids, written once.

:func:`open_cache` lists the question files, hashes their names, sizes and modification times with every setting
that changes the preprocessing (:class:`CacheSettings`) into a key, and returns the cache folder of that key with its
``meta.json`` -- building it first (:func:`build_cache`: parse every file once, select sentences, truncate, count the
training words, write int32 token arrays) when there is none. A cache is written into a temporary sibling folder and
renamed into place, so concurrent runs never see half a cache; caches of other keys are left in place.

Token ids: ``0`` padding, ``1`` unknown word, ``2`` ``@placeholder``, ``3 .. 3+K-1`` the entity markers
``@entity0 .. @entity{K-1}`` (``K = num_entities``), then the words of the training vocabulary, most frequent first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from bnlstm_lit.data.cnn.questions import (
    ENTITY_OFFSET,
    ENTITY_RE,
    PLACEHOLDER,
    PLACEHOLDER_TOKEN,
    QUESTION_SUFFIX,
    SPLIT_FOLDERS,
    SPLITS,
    UNK,
    QuestionFormatError,
    parse_question,
)

__all__ = [
    "CACHE_VERSION",
    "CacheSettings",
    "Listing",
    "build_cache",
    "list_questions",
    "open_cache",
    "read_cache_meta",
    "select_sentences",
    "split_sentences",
]

log = logging.getLogger(__name__)

#: Bump when the cache layout or the preprocessing changes: old caches are then rebuilt, never misread.
CACHE_VERSION = 1


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
class CacheSettings:
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


def list_questions(questions_dir: Path) -> Listing:
    """The question files of every split with their sizes and modification times (what the cache key hashes).

    Raises:
        FileNotFoundError: a split folder is missing or holds no ``.question`` file.
    """
    listing: Listing = {}
    for split, folder_name in SPLIT_FOLDERS.items():
        folder = questions_dir / folder_name
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


def read_cache_meta(folder: Path, listing_digest: str) -> dict[str, Any] | None:
    """The ``meta.json`` of a cache folder when it is a complete cache of these files in this version, else None
    (an unreadable one is removed)."""
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


def open_cache(questions_dir: Path, cache_dir: Path, settings: CacheSettings) -> tuple[Path, dict[str, Any]]:
    """The cache folder of these question files and settings, and its meta (sizes, vocabulary digest, per-split
    statistics); built first when there is none. A run with the same files and settings opens no question file."""
    listing = list_questions(questions_dir)
    listing_digest = hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
    key_settings = settings.as_dict()
    key = hashlib.sha256(json.dumps([listing_digest, key_settings], sort_keys=True).encode("utf-8")).hexdigest()[:20]
    folder = cache_dir / key
    meta = read_cache_meta(folder, listing_digest)
    if meta is None:
        log.info("CNNQuestions: preprocessing %s into %s (once)", questions_dir, folder)
        cache_dir.mkdir(parents=True, exist_ok=True)
        build_cache(
            questions_dir,
            listing,
            settings,
            folder,
            {"listing_digest": listing_digest, "settings": key_settings},
        )
        meta = read_cache_meta(folder, listing_digest)
        if meta is None:
            raise RuntimeError(f"CNNQuestions: the cache {folder} was written but cannot be read back")
    return folder, meta


def build_cache(root: Path, listing: Listing, settings: CacheSettings, folder: Path, key_info: dict[str, Any]) -> None:
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


def _write_cache(root: Path, listing: Listing, settings: CacheSettings, out: Path) -> dict[str, Any]:
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
