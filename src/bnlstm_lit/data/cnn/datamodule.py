"""The CNN questions as a LightningDataModule: :class:`CNNQuestions`, its dataset, collate and samplers.

The DataModule finds (or downloads and extracts) the corpus, checks the test split against the official list, opens
the preprocessing cache (:mod:`bnlstm_lit.data.cnn.preprocess`) and serves :class:`QABatch` batches: training
batches bucketed by length (:class:`BucketSampler`) with the paper's entity-id shuffling
(:func:`entity_permutation`), validation and test read longest first.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from bnlstm_lit.data.base import EpochPosition, SequenceDataModule, check_int, loader_generator
from bnlstm_lit.data.cnn.archive import (
    _EXTRACTED,
    _EXTRACTING,
    CNN_ARCHIVE,
    CNN_MIRRORS,
    CompletenessReport,
    TestList,
    check_cnn_archive,
    compare_test_names,
    extract_questions,
)
from bnlstm_lit.data.cnn.preprocess import CacheSettings, open_cache
from bnlstm_lit.data.cnn.questions import (
    ENTITY_OFFSET,
    PAD,
    PLACEHOLDER,
    PLACEHOLDER_TOKEN,
    QUESTION_SUFFIX,
    SPLIT_FOLDERS,
    SPLITS,
    UNK,
)
from bnlstm_lit.data.download import check_file, download_url

__all__ = [
    "BucketSampler",
    "CNNQuestionDataset",
    "CNNQuestions",
    "Completeness",
    "LongContexts",
    "QABatch",
    "QACollate",
    "QuestionExample",
    "entity_permutation",
]

log = logging.getLogger(__name__)

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
        self.settings = CacheSettings(
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
        folder, meta = open_cache(self.questions_dir, self.cache_dir, self.settings)
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
