"""The machinery every character-level corpus shares (paper Sec. 5.2-5.3): vocabulary, batches, samplers, loaders.

A corpus is a stream of symbols, one byte each, kept as a uint8 tensor (100 MB for the full text8, never a Python
list of characters). :class:`CharCorpus` is the DataModule base: it owns the vocabulary, the two ways of cutting the
stream into training batches and the paper's test protocols. Subclasses only say where the data comes from and how
it splits (:meth:`CharCorpus.read_splits`, :meth:`CharCorpus.download_corpus`): :class:`~bnlstm_lit.data.ptb.PTBChar`,
:class:`~bnlstm_lit.data.text8.Text8`, and :class:`~bnlstm_lit.data.textfiles.TextFiles` for any plain-text corpus.

Training batches (``mode``):

* ``"paper"`` -- non-overlapping examples of ``seq_length`` characters, cut at a fresh random offset every epoch and
  shuffled; every example starts from the learned initial state. Each epoch covers its cropped corpus exactly once.
* ``"stateful"`` -- the split as ``batch_size`` contiguous streams (per DDP rank: each rank keeps its own); batch k+1
  row i continues batch k row i, and the task carries the hidden state, detached, between batches (truncated BPTT).

Test protocols (``test_protocol``), logged under distinct names by :class:`~bnlstm_lit.tasks.CharLanguageModel`:

* ``"examples"`` -- the test split cut like the validation split (``test/bpc``);
* ``"full"`` -- the whole test split as one sequence, batch 1, read in chunks of ``full_chunk_length`` with the state
  and the time index carried across chunks, so memory stays bounded (``test/bpc_full``; the paper's Table 2);
* ``"sweep"`` -- non-overlapping test subsequences of each length in ``sweep_lengths`` (``test/bpc_L{length}_{stats}``,
  population and batch statistics; paper Fig. 3b).

Every batch is a :class:`TextBatch`: int64 inputs and targets (B, T) -- the targets are the inputs shifted by one --
plus whether it continues the previous batch's state, the time index of its first step and its :class:`Protocol`
(what it is evaluated for: the split's plain metric, the full test sequence, or one length of the sweep).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from bnlstm_lit.data.base import SequenceDataModule, check_int, loader_generator

__all__ = [
    "SPLIT_PROTOCOL",
    "CharCorpus",
    "CharVocabulary",
    "ExampleCollate",
    "ExampleDataset",
    "ExampleStarts",
    "Mode",
    "SampleRequest",
    "Protocol",
    "ProtocolKind",
    "TestProtocol",
    "TextBatch",
    "TokenStream",
    "read_bytes",
]

log = logging.getLogger(__name__)

# Lightning warns about every IterableDataset with __len__ that its length may be wrong with several workers. Ours
# (TokenStream) refuses several workers, so the length is exact: the warning would only be noise on every run.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)

Mode = Literal["paper", "stateful"]
TestProtocol = Literal["examples", "full", "sweep"]
ProtocolKind = Literal["split", "full", "length"]
SPLITS = ("train", "valid", "test")


# -------------------------------------------------------------------------------------------------------- vocabulary


class CharVocabulary:
    """An ordered set of single-byte symbols; symbol ``symbols[k]`` has id k.

    Encoding goes through a 256-entry lookup table, so a 100 MB corpus is encoded in one vectorized pass.
    """

    def __init__(self, symbols: str | Sequence[str]) -> None:
        symbols = tuple(symbols)
        if not symbols:
            raise ValueError("a vocabulary needs at least one symbol")
        for s in symbols:
            if len(s) != 1 or ord(s) > 255:
                raise ValueError(f"vocabulary symbols must be single characters with a code below 256, got {s!r}")
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"vocabulary symbols must be distinct, got {''.join(symbols)!r}")
        self.symbols: tuple[str, ...] = symbols
        table = np.full(256, -1, dtype=np.int16)
        table[[ord(s) for s in symbols]] = np.arange(len(symbols), dtype=np.int16)
        self._table = table

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocabulary) and other.symbols == self.symbols

    def __hash__(self) -> int:
        return hash(self.symbols)

    def __repr__(self) -> str:
        return f"CharVocabulary({''.join(self.symbols)!r})"

    def encode_bytes(self, raw: np.ndarray, where: str) -> Tensor:
        """Symbol bytes uint8 (N,) -> ids uint8 (N,); an unknown byte raises a ValueError naming ``where``, line."""
        ids = self._table[raw]  # (N,) int16, -1 for unknown bytes
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            position = int(bad[0])
            line = int(np.count_nonzero(raw[:position] == ord("\n"))) + 1
            char = chr(int(raw[position]))
            raise ValueError(
                f"{where}: character {char!r} (byte 0x{int(raw[position]):02x}) at offset {position} (line {line}) is "
                f"not in the vocabulary of {len(self)} symbols {''.join(self.symbols)!r} "
                f"({bad.size} unknown characters in all)"
            )
        return torch.from_numpy(ids.astype(np.uint8))

    def encode(self, text: str, where: str = "text") -> Tensor:
        """A string -> ids int64 (len(text),)."""
        try:
            raw = np.frombuffer(text.encode("latin-1"), dtype=np.uint8)
        except UnicodeEncodeError as err:
            bad = text[err.start]
            raise ValueError(
                f"{where}: character {bad!r} at offset {err.start} is not in the vocabulary of {len(self)} symbols "
                f"{''.join(self.symbols)!r}"
            ) from None
        return self.encode_bytes(raw, where).long()

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """ids (N,) -> the string they spell."""
        return "".join(self.symbols[int(i)] for i in torch.as_tensor(ids).reshape(-1).tolist())


def read_bytes(path: Path, what: str) -> np.ndarray:
    """A corpus file as bytes uint8 (N,); a missing or empty file raises an error naming ``what`` and the path."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0:
        raise ValueError(f"{what}: {path} is empty")
    return raw


# ------------------------------------------------------------------------------------------------------ batches


class _ProtocolFields(NamedTuple):
    kind: ProtocolKind
    length: int | None


class Protocol(_ProtocolFields):
    """What a batch is evaluated for -- a typed field of every :class:`TextBatch`, read by the task to name its metrics.

    * ``Protocol.split()`` (kind ``"split"``): the split's plain metric -- training, validation and the ``"examples"``
      test protocol (``{split}/bpc``);
    * ``Protocol.full()`` (kind ``"full"``): the whole test split as one sequence (``test/bpc_full``);
    * ``Protocol.sweep(n)`` (kind ``"length"``, ``length=n``): the length sweep's examples of ``n`` symbols
      (``test/bpc_L{n}_population`` and ``test/bpc_L{n}_batch``).

    A NamedTuple, so it is immutable and survives Lightning's device transfer and ``pin_memory`` as it is (a frozen
    dataclass inside a batch is refused by Lightning's ``apply_to_collection``). ``length`` is set for ``"length"``
    and only there.
    """

    __slots__ = ()

    def __new__(cls, kind: ProtocolKind = "split", length: int | None = None) -> Protocol:
        if kind not in ("split", "full", "length"):
            raise ValueError(f"a protocol's kind is 'split', 'full' or 'length', got {kind!r}")
        if kind == "length":
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise ValueError(f"a 'length' protocol needs the sweep length, an integer >= 1, got {length!r}")
        elif length is not None:
            raise ValueError(f"only a 'length' protocol has a length, got kind {kind!r} with length {length!r}")
        return super().__new__(cls, kind, length)

    @classmethod
    def split(cls) -> Protocol:
        """The split's plain metric (training, validation, the ``"examples"`` test)."""
        return cls("split")

    @classmethod
    def full(cls) -> Protocol:
        """The whole test split as one sequence."""
        return cls("full")

    @classmethod
    def sweep(cls, length: int) -> Protocol:
        """The length sweep's examples of ``length`` symbols."""
        return cls("length", length)


#: The protocol of plain batches (training, validation, the "examples" test).
SPLIT_PROTOCOL = Protocol.split()


class TextBatch(NamedTuple):
    """One batch of a character corpus.

    Attributes:
        inputs: int64 (B, T) symbol ids.
        targets: int64 (B, T), the next symbol of every input position (the inputs shifted by one).
        carry: True if row i continues row i of the previous batch of this loader (stateful streams): the task then
            starts from the previous batch's final state, detached.
        start_step: time index of the first step (selects the per-step BN statistics; steps beyond the trained
            length reuse the last statistics).
        protocol: what the batch is evaluated for (:class:`Protocol`), which names the logged metrics.
    """

    inputs: Tensor
    targets: Tensor
    carry: bool = False
    start_step: int = 0
    protocol: Protocol = SPLIT_PROTOCOL


def _as_is(text: str) -> str:
    return text


class SampleRequest(NamedTuple):
    """What ``predict`` gets from a character corpus: only data -- its alphabet and how free text maps onto it.

    The sampling settings (the priming text, how many symbols and samples, the temperature, top-k) belong to the task
    (:class:`~bnlstm_lit.tasks.CharLanguageModel`), which encodes its prime with :meth:`encode`.

    ``vocabulary`` encodes and decodes the ids; ``default_prime`` is the corpus's prime when the task names none;
    ``writable`` writes free text in the corpus's symbols and ``readable`` reads decoded symbols back as free text
    (PTB: space <-> ``_``).
    """

    vocabulary: CharVocabulary
    default_prime: str = "\n"
    writable: Callable[[str], str] = _as_is
    readable: Callable[[str], str] = _as_is

    def encode(self, text: str | None, where: str = "prime") -> Tensor:
        """Free text (None: ``default_prime``) -> ids int64 (P,). An empty text, or characters outside the alphabet
        (all of them named), raise a ValueError naming ``where`` (the flag the text came from)."""
        written = self.writable(self.default_prime if text is None else text)
        if not written:
            raise ValueError(f"{where} must hold at least one character to start sampling from")
        symbols = self.vocabulary.symbols
        unknown = list(dict.fromkeys(c for c in written if c not in symbols))  # in order of first appearance
        if unknown:
            raise ValueError(
                f"{where} has {len(unknown)} character{'s' if len(unknown) > 1 else ''} outside the corpus's "
                f"vocabulary: {', '.join(map(repr, unknown))} (the vocabulary's {len(symbols)} symbols: "
                f"{''.join(symbols)!r})"
            )
        return self.vocabulary.encode(written, where)


class ExampleDataset(Dataset[Tensor]):
    """Windows of ``length + 1`` symbols of a uint8 (N,) corpus, indexed by start position (:class:`ExampleStarts`)."""

    def __init__(self, tokens: Tensor, length: int) -> None:
        self.tokens = tokens
        self.length = length
        self._window = torch.arange(length + 1)

    def __len__(self) -> int:
        return len(self.tokens) - self.length  # number of valid start positions

    def __getitem__(self, start: int) -> Tensor:
        return self.tokens[start : start + self.length + 1]

    def __getitems__(self, starts: list[int]) -> Tensor:
        index = torch.as_tensor(starts, dtype=torch.long)[:, None] + self._window  # (B, L+1)
        return self.tokens[index]


class ExampleCollate:
    """Windows uint8 (B, L+1) -> a :class:`TextBatch` with inputs ``w[:, :-1]`` and targets ``w[:, 1:]``."""

    def __init__(self, protocol: Protocol = SPLIT_PROTOCOL) -> None:
        self.protocol = protocol

    def __call__(self, batch: Tensor | list[Tensor]) -> TextBatch:
        windows = torch.stack(batch) if isinstance(batch, list) else batch  # (B, L+1)
        windows = windows.long()
        return TextBatch(windows[:, :-1], windows[:, 1:], protocol=self.protocol)


class ExampleStarts(Sampler[int]):
    """Start positions of non-overlapping examples of ``length`` symbols (each with its next-symbol target).

    ``random_offset=True`` (paper-mode training): each epoch the corpus is cropped at an offset drawn uniformly from
    [0, length) and cut into ``(num_tokens - length) // length`` examples -- the same number for every offset -- in a
    shuffled order; the generator is seeded with ``(seed, epoch)`` (Lightning calls :meth:`set_epoch`), so runs
    repeat. Otherwise (evaluation): offset 0, ``(num_tokens - 1) // length`` examples in order, less a last example
    that batches of ``lone_tail_of`` would leave alone in its batch (batch statistics need two sequences). The
    evaluation order is the same in every process; under DDP each reads its own whole batches of it
    (:class:`~bnlstm_lit.data.samplers.EvaluationShard`), so every kept example is scored exactly once.
    """

    def __init__(
        self, num_tokens: int, length: int, random_offset: bool, seed: int = 0, lone_tail_of: int | None = None
    ) -> None:
        self.length = length
        self.random_offset = random_offset
        self.seed = seed
        self.epoch = 0
        self._skip = 0
        self.num_examples = (num_tokens - length) // length if random_offset else (num_tokens - 1) // length
        if lone_tail_of is not None and self.num_examples > 1 and self.num_examples % lone_tail_of == 1:
            self.num_examples -= 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        """Start the next iteration ``count`` examples into the epoch's order (a run resumed mid-epoch)."""
        self._skip = count

    def __len__(self) -> int:
        return self.num_examples

    def offset(self) -> int:
        """This epoch's crop offset (0 in evaluation)."""
        if not self.random_offset:
            return 0
        return int(torch.randint(self.length, (), generator=self._generator()))

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.random_offset:
            yield from range(0, self.num_examples * self.length, self.length)
            return
        generator = self._generator()
        offset = int(torch.randint(self.length, (), generator=generator))
        order = torch.randperm(self.num_examples, generator=generator)
        start, self._skip = self._skip, 0
        yield from (offset + order[start:] * self.length).tolist()


class TokenStream(IterableDataset[TextBatch]):
    """A split read as ``batch_size`` contiguous streams, ``chunk_length`` symbols per batch.

    The symbols are cut into ``batch_size * world_size`` equal rows; rank r reads rows ``r*B … r*B+B-1``, so every
    rank keeps contiguous streams of its own under DDP. Batch k holds columns ``k*L … k*L+L-1`` of those rows (targets
    one further) and has ``carry = k > 0``. Each symbol but the first of a row is predicted exactly once.

    Args:
        tokens: uint8 (N,) symbol ids.
        batch_size: streams per rank (B).
        chunk_length: steps per batch (L).
        rank, world_size: this process and the number of processes.
        continue_time: number the steps of batch k from k*L (one long sequence: the full-test protocol); False
            restarts the time index at 0 every batch (stateful training, whose statistics cover L steps).
        drop_last: drop a final chunk shorter than L (training); False keeps it (evaluation reads every symbol).
        protocol: the :class:`Protocol` of the batches.
    """

    def __init__(
        self,
        tokens: Tensor,
        batch_size: int,
        chunk_length: int,
        rank: int = 0,
        world_size: int = 1,
        continue_time: bool = False,
        drop_last: bool = True,
        protocol: Protocol = SPLIT_PROTOCOL,
    ) -> None:
        rows = batch_size * world_size
        self.row_length = (len(tokens) - 1) // rows  # inputs per row; the row's targets reach one symbol further
        if self.row_length < (chunk_length if drop_last else 1):
            raise ValueError(
                f"a split of {len(tokens)} symbols cut into {rows} streams ({batch_size} per rank x {world_size} "
                f"ranks) gives streams of {self.row_length} steps, shorter than one chunk of {chunk_length}; use a "
                "smaller batch size or sequence length"
            )
        # (rows, row_length + 1): row j is tokens[j*R : (j+1)*R + 1]; neighbouring rows share one symbol
        matrix = tokens.as_strided((rows, self.row_length + 1), (self.row_length, 1))
        self.rows = matrix[rank * batch_size : (rank + 1) * batch_size]
        self.chunk_length = chunk_length
        self.continue_time = continue_time
        self.drop_last = drop_last
        self.protocol = protocol

    def __len__(self) -> int:
        full, rest = divmod(self.row_length, self.chunk_length)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[TextBatch]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                f"a stateful stream must be read by one process, but the DataLoader has {info.num_workers} workers; "
                "set data.init_args.num_workers to 0 or 1"
            )
        L = self.chunk_length
        for k in range(len(self)):
            start = k * L
            stop = min(start + L, self.row_length)
            inputs = self.rows[:, start:stop].long()  # (B, L)
            targets = self.rows[:, start + 1 : stop + 1].long()
            yield TextBatch(
                inputs, targets, carry=k > 0, start_step=start if self.continue_time else 0, protocol=self.protocol
            )


def _only_item(items: list[SampleRequest]) -> SampleRequest:
    return items[0]


#: Sampling settings that were :class:`CharCorpus` arguments before they moved to the task, with their flags now.
MOVED_SAMPLING_SETTINGS = {
    "prime": "model.init_args.prime",
    "sample_length": "model.init_args.sample_length",
    "num_samples": "model.init_args.num_samples",
    "temperature": "model.init_args.temperature",
}


def _warn_moved_sampling_settings(given: dict[str, Any]) -> None:
    """One warning naming every moved sampling setting given to the DataModule (old checkpoints store them all)."""
    named = [f"data.init_args.{name}={value!r}" for name, value in given.items() if value is not None]
    if named:
        flags = ", ".join(MOVED_SAMPLING_SETTINGS[name] for name, value in given.items() if value is not None)
        warnings.warn(
            f"{', '.join(named)}: sampling settings are no longer the data's and are ignored (a checkpoint saved "
            f"before they moved carries them); set them on the task instead: {flags}",
            FutureWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------------ DataModules


class CharCorpus(SequenceDataModule):
    """Base DataModule of character-level language modelling.

    Subclasses say where the data comes from: :meth:`read_splits` returns the three splits as symbol bytes, and
    :meth:`download_corpus` fetches and verifies the files (``download=True``). A fixed alphabet is declared in the
    class attribute ``symbols``; without one the vocabulary is the sorted set of the training split's characters.
    Sizes for the model: ``input_size = output_size = len(vocabulary)`` (one-hot inputs, softmax outputs) and
    ``max_steps = seq_length``.

    Args:
        data_dir: folder holding the corpus files.
        download: in ``prepare_data``, download and verify the corpus if it is missing or fails its checks.
        seq_length: training sequence length L (100 for PTB, 180 for text8 in the paper).
        batch_size: training batch (streams per rank in stateful mode).
        eval_batch_size: validation / test batch (examples or streams); None: ``batch_size``.
        mode: ``"paper"`` or ``"stateful"`` (see the module docstring).
        test_protocol: ``"examples"``, ``"full"`` or ``"sweep"`` (see the module docstring).
        full_chunk_length: steps per batch of the full-test protocol (memory, not the result, depends on it).
        sweep_lengths: test subsequence lengths of the sweep protocol.
        num_workers: DataLoader workers (at most 1 for stateful streams).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        seed: seeds the per-epoch offsets and shuffles of paper mode.
        prime, sample_length, num_samples, temperature: no longer the data's -- sampling is set on the task
            (``model.init_args.<name>``); accepted so that checkpoints saved when they were still here load for
            ``predict --ckpt_path``, and ignored with a warning naming them.
    """

    symbols: ClassVar[str | None] = None
    default_prime: ClassVar[str] = "\n"  # what predict starts from when the task names no prime

    def __init__(
        self,
        data_dir: str,
        download: bool = False,
        seq_length: int = 100,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        mode: Mode = "paper",
        test_protocol: TestProtocol = "examples",
        full_chunk_length: int = 1000,
        sweep_lengths: Sequence[int] = (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000),
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        prime: str | None = None,
        sample_length: int | None = None,
        num_samples: int | None = None,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        _warn_moved_sampling_settings(
            {"prime": prime, "sample_length": sample_length, "num_samples": num_samples, "temperature": temperature}
        )
        for name, value in (
            ("seq_length", seq_length),
            ("batch_size", batch_size),
            ("full_chunk_length", full_chunk_length),
        ):
            check_int(name, value, 1)
        if eval_batch_size is not None:
            check_int("eval_batch_size", eval_batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        if mode not in ("paper", "stateful"):
            raise ValueError(f"mode (data.init_args.mode) must be 'paper' or 'stateful', got {mode!r}")
        if test_protocol not in ("examples", "full", "sweep"):
            raise ValueError(
                f"test_protocol (data.init_args.test_protocol) must be 'examples', 'full' or 'sweep', got "
                f"{test_protocol!r}"
            )
        sweep_lengths = list(sweep_lengths)
        if not sweep_lengths:
            raise ValueError("sweep_lengths (data.init_args.sweep_lengths) must name at least one length")
        for value in sweep_lengths:
            check_int("sweep_lengths", value, 1)
        if mode == "stateful" and num_workers > 1:
            raise ValueError(
                f"num_workers (data.init_args.num_workers) must be 0 or 1 with mode='stateful' (each stream is read "
                f"in order by one process), got {num_workers}"
            )
        self.save_hyperparameters(ignore=list(MOVED_SAMPLING_SETTINGS))
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.mode = mode
        self.test_protocol = test_protocol
        self.full_chunk_length = full_chunk_length
        self.sweep_lengths = sweep_lengths
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.splits: dict[str, Tensor] = {}  # split -> uint8 (N,) symbol ids
        self._vocabulary: CharVocabulary | None = None

    # ---- what a subclass says ------------------------------------------------------------------------------------
    def read_splits(self) -> dict[str, np.ndarray]:
        """The corpus as symbol bytes: ``{"train": uint8 (N,), "valid": ..., "test": ...}``, checked.

        Raises FileNotFoundError / ValueError / RuntimeError naming the file when data is missing or corrupt.
        """
        raise NotImplementedError(f"{type(self).__name__} must define read_splits()")

    def corpus_ready(self) -> bool:
        """Cheap check run by ``prepare_data``: are the files present (and verified where that is cheap)?"""
        return True

    def download_corpus(self) -> None:
        """Fetch and verify the corpus into ``data_dir`` (``download=True``, rank 0 only)."""
        raise NotImplementedError(f"{type(self).__name__} has no download source; put the files in {self.data_dir}")

    def source_of(self, split: str) -> str:
        """Where a split comes from, for error messages (a file name where there is one)."""
        return f"{type(self).__name__} {split} split"

    def text_to_corpus(self, text: str) -> str:
        """How free text (the sampling prime) is written in this corpus's alphabet (identity by default)."""
        return text

    def corpus_to_text(self, text: str) -> str:
        """How sampled symbols read as free text (identity by default)."""
        return text

    # ---- sizes ---------------------------------------------------------------------------------------------------
    @property
    def vocabulary(self) -> CharVocabulary:
        if self._vocabulary is None:
            if self.symbols is not None:
                self._vocabulary = CharVocabulary(self.symbols)
            else:  # derived from the data: the training split must be readable now (the CLI asks at instantiation)
                train = self.read_splits()["train"]
                self._vocabulary = CharVocabulary([chr(b) for b in np.flatnonzero(np.bincount(train, minlength=256))])
        return self._vocabulary

    @property
    def input_size(self) -> int:
        return len(self.vocabulary)

    @property
    def output_size(self) -> int:
        return len(self.vocabulary)

    @property
    def max_steps(self) -> int:
        return self.seq_length

    # ---- Lightning hooks -----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download and not self.corpus_ready():
            self.download_corpus()

    def setup(self, stage: str | None = None) -> None:
        """Read, check and encode the three splits (first call; later calls reuse them)."""
        if self.splits:
            return
        raw = self.read_splits()
        missing = [s for s in SPLITS if s not in raw]
        if missing:
            raise RuntimeError(f"{type(self).__name__}.read_splits() returned no {', '.join(missing)} split")
        vocabulary = self.vocabulary
        splits = {name: vocabulary.encode_bytes(raw[name], self.source_of(name)) for name in SPLITS}
        for name, tokens in splits.items():
            if len(tokens) < self.seq_length + 1:
                raise ValueError(
                    f"the {name} split of {type(self).__name__} has {len(tokens)} symbols, too few for one example of "
                    f"seq_length={self.seq_length} (data.init_args.seq_length) plus its target; use a shorter "
                    "seq_length or a larger corpus"
                )
        self.splits = splits
        log.info(
            "%s: %s symbols (train/valid/test), vocabulary of %d",
            type(self).__name__,
            "/".join(str(len(splits[s])) for s in SPLITS),
            len(vocabulary),
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "vocabulary": "".join(self.vocabulary.symbols)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that a checkpoint was trained with this DataModule's vocabulary (ids would mean other characters)."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("vocabulary")
        if saved is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: no 'vocabulary' in the state (keys: {sorted(state_dict)}); "
                f"the checkpoint was not written by a character-corpus DataModule"
            )
        if saved != "".join(self.vocabulary.symbols):
            raise ValueError(
                f"the checkpoint was trained with the vocabulary {saved!r} ({len(saved)} symbols), but "
                f"{type(self).__name__} has {''.join(self.vocabulary.symbols)!r} ({len(self.vocabulary)}); symbol ids "
                "would mean other characters"
            )

    # ---- loaders -------------------------------------------------------------------------------------------------
    def _split(self, name: str, stage: str) -> Tensor:
        if name not in self.splits:
            raise RuntimeError(f"{type(self).__name__}: data not loaded; call setup({stage!r}) first")
        return self.splits[name]

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _examples(
        self, tokens: Tensor, length: int, batch_size: int, train: bool, protocol: Protocol = SPLIT_PROTOCOL
    ) -> DataLoader:
        # evaluation leaves out a lone last example (batch statistics need >= 2) in the order itself, not by a
        # per-process drop_last: under DDP the order is shared out in whole batches, and a process must not drop its
        # own last example
        lone_tail_of = None if train else batch_size
        sampler = ExampleStarts(len(tokens), length, random_offset=train, seed=self.seed, lone_tail_of=lone_tail_of)
        if train:
            self.prepare_train_sampler(sampler, batch_size)
        if len(sampler) < (batch_size if train else 1):
            raise ValueError(
                f"a split of {len(tokens)} symbols gives {len(sampler)} examples of length {length}, fewer than one "
                f"batch of {batch_size}; use a smaller batch_size or seq_length"
            )
        return DataLoader(
            ExampleDataset(tokens, length),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train,  # training: no small tail batch
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=ExampleCollate(protocol),
            generator=loader_generator(self.seed),
        )

    def _stream(
        self,
        tokens: Tensor,
        batch_size: int,
        length: int,
        train: bool,
        continue_time: bool = False,
        protocol: Protocol = SPLIT_PROTOCOL,
    ) -> DataLoader:
        rank, world = self._rank_world()
        return self._stream_loader(
            TokenStream(tokens, batch_size, length, rank, world, continue_time, drop_last=train, protocol=protocol)
        )

    def _stream_loader(self, stream: TokenStream) -> DataLoader:
        """A stream's batches as they come (the stream batches itself)."""
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=loader_generator(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        tokens = self._split("train", "fit")
        if self.mode == "stateful":
            return self._stream(tokens, self.batch_size, self.seq_length, train=True)
        return self._examples(tokens, self.seq_length, self.batch_size, train=True)

    def _evaluation(self, split: str, stage: str) -> DataLoader:
        tokens = self._split(split, stage)
        if self.mode == "stateful":
            return self._stream(tokens, self.eval_batch_size, self.seq_length, train=False)
        return self._examples(tokens, self.seq_length, self.eval_batch_size, train=False)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation("valid", "fit")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.test_protocol == "full":
            # One sequence cannot be shared out: under DDP every rank reads all of it (same value, no speed-up),
            # rather than each rank a piece started afresh from the initial state, which would change the number.
            return self._stream_loader(
                TokenStream(
                    self._split("test", "test"), 1, self.full_chunk_length, continue_time=True, drop_last=False,
                    protocol=Protocol.full(),
                )
            )  # fmt: skip
        if self.test_protocol == "sweep":
            tokens = self._split("test", "test")
            return [
                self._examples(tokens, L, self.eval_batch_size, train=False, protocol=Protocol.sweep(L))
                for L in self.sweep_lengths
            ]
        return self._evaluation("test", "test")

    def sample_request(self) -> SampleRequest:
        """What ``predict`` samples from: the alphabet and how free text maps onto it (:class:`SampleRequest`)."""
        return SampleRequest(self.vocabulary, self.default_prime, self.text_to_corpus, self.corpus_to_text)

    def predict_dataloader(self) -> DataLoader:
        """One batch: a :class:`SampleRequest` (the alphabet; what to sample is the task's settings)."""
        # one batch: the request itself (batch_size 1 and an unwrapping collate, so Lightning sees a batch sampler)
        return DataLoader(
            cast(Dataset[SampleRequest], [self.sample_request()]),
            batch_size=1,
            collate_fn=_only_item,
            generator=loader_generator(self.seed),
        )
