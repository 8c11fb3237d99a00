"""Character corpora (PTB characters, text8, plain text files): vocabulary, paper and stateful batches, test
protocols, checks and downloads. Real data from the offline data folder (read-only); downloads go through
file:// URLs."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from bnlstm_lit.data.charlm import CharVocabulary, ExampleStarts, Protocol, SampleRequest, TextBatch, TokenStream
from bnlstm_lit.data.download import file_md5
from bnlstm_lit.data.ptb import (
    PTB_CHAR_FILES,
    PTB_SYMBOLS,
    PTB_WORD_FILES,
    PTBChar,
    read_ptb_char_file,
    read_ptb_word_file,
)
from bnlstm_lit.data.text8 import TEXT8_SYMBOLS, Text8
from bnlstm_lit.data.textfiles import TextFiles

PTB_FILES = {**PTB_CHAR_FILES, **PTB_WORD_FILES}  # the six Mikolov files -> md5
PTB_SIZES = {"train": 5_017_482, "valid": 393_042, "test": 442_423}
TEXT8_PREFIX = "text8_prefix.zip"
TEXT8_SIZES = {"train": 6_190_042, "valid": 343_891, "test": 343_892}
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def ptb_dir(shared_data: Path) -> Path:
    folder = shared_data / "ptb"
    missing = [name for name in PTB_FILES if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"shared PTB files not found in {folder}: {missing}")
    return folder


@pytest.fixture(scope="module")
def ptb_dm(ptb_dir: Path) -> PTBChar:
    """PTB characters from the char files, paper defaults (L=100, batch 64), loaded once (about 0.4 s)."""
    dm = PTBChar(data_dir=str(ptb_dir))
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def text8_dir(shared_data: Path) -> Path:
    folder = shared_data / "text8"
    if not (folder / TEXT8_PREFIX).is_file():
        pytest.skip(f"shared text8 prefix not found in {folder}")
    return folder


def random_text(n: int, seed: int, alphabet: str = "abcdefghij _\n") -> str:
    """n characters drawn uniformly from ``alphabet`` (seeded), so windows at different offsets differ."""
    rng = np.random.default_rng(seed)
    return "".join(np.array(list(alphabet))[rng.integers(len(alphabet), size=n)])


def write_corpus(folder: Path, train: str, valid: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in zip(("train.txt", "valid.txt", "test.txt"), (train, valid, test), strict=True):
        (folder / name).write_bytes(text.encode("latin-1"))
    return folder


def text_dm(tmp_path: Path, sizes: tuple[int, int, int] = (415, 203, 1001), **kwargs: Any) -> TextFiles:
    """A TextFiles DataModule over generated train/valid/test files of the given lengths, set up."""
    texts = [random_text(n, seed) for seed, n in enumerate(sizes)]
    dm = TextFiles(data_dir=str(write_corpus(tmp_path / "corpus", *texts)), **kwargs)
    dm.setup("fit")
    return dm


def symlinks(folder: Path, source: Path, names: list[str] | tuple[str, ...]) -> Path:
    """A folder holding symlinks to the named files of ``source`` only."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(source / name)
    return folder


def rows_of(batches: list[TextBatch], field: str = "inputs") -> Tensor:
    """Concatenate the batches of a stream along time: (B, sum of chunk lengths)."""
    return torch.cat([getattr(batch, field) for batch in batches], dim=1)


def make_tgz(path: Path, members: dict[str, Path | bytes]) -> Path:
    """A gzipped tar with the given member names, each from a file or from bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, content in members.items():
            if isinstance(content, Path):
                tar.add(content, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def with_mirrors(cls: type, *archives: Path) -> type:
    """A subclass of ``cls`` that downloads from local files (file:// URLs): no network."""
    return type(f"Local{cls.__name__}", (cls,), {"mirrors": tuple(a.as_uri() for a in archives)})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -------------------------------------------------------------------------------------------------------- vocabulary


def test_vocabulary_encodes_by_position_and_round_trips() -> None:
    vocab = CharVocabulary("ab\nc")
    ids = vocab.encode("cab\nba")
    assert ids.dtype == torch.int64 and ids.tolist() == [3, 0, 1, 2, 1, 0]
    assert vocab.decode(ids) == "cab\nba"
    assert vocab.decode([2, 3]) == "\nc"
    assert len(vocab) == 4 and vocab == CharVocabulary(["a", "b", "\n", "c"]) and vocab != CharVocabulary("abc\n")
    text = random_text(500, seed=3)
    assert CharVocabulary(sorted(set(text))).decode(CharVocabulary(sorted(set(text))).encode(text)) == text


@pytest.mark.parametrize(
    ("symbols", "message"),
    [("abca", "distinct"), (["ab", "c"], "single characters"), (["a", ""], "single characters"), ("a€", "below 256")],
)
def test_vocabulary_refuses_bad_symbols(symbols: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CharVocabulary(symbols)


def test_vocabulary_needs_a_symbol() -> None:
    with pytest.raises(ValueError, match="at least one symbol"):
        CharVocabulary("")


def test_unknown_character_names_where_the_character_and_the_line() -> None:
    vocab = CharVocabulary("ab\n")
    with pytest.raises(ValueError, match=r"notes\.txt: character 'X' .*offset 7 \(line 3\)"):
        vocab.encode("ab\nba\naXb", "notes.txt")
    with pytest.raises(ValueError, match="prime: character '€'"):
        vocab.encode("a€", "prime")  # beyond latin-1: refused, not mangled


# -------------------------------------------------------------------------------------------------------------- PTB


def test_ptb_vocabulary_and_split_sizes(ptb_dm: PTBChar) -> None:
    assert ptb_dm.vocabulary == CharVocabulary(PTB_SYMBOLS) and len(PTB_SYMBOLS) == 50
    assert (ptb_dm.input_size, ptb_dm.output_size, ptb_dm.max_steps) == (50, 50, 100)
    assert {split: len(tokens) for split, tokens in ptb_dm.splits.items()} == PTB_SIZES
    assert all(tokens.dtype == torch.uint8 for tokens in ptb_dm.splits.values())
    assert ptb_dm.vocabulary.decode(ptb_dm.splits["train"][:20]) == "aer_banknote_berlitz"
    train_used = set(ptb_dm.splits["train"].unique().tolist())
    test_used = set(ptb_dm.splits["test"].unique().tolist())
    assert train_used == set(range(50))
    assert len(test_used) == 48 and PTB_SYMBOLS.index("\n") in test_used
    assert ptb_dm.vocabulary.decode(ptb_dm.splits["test"][-1:]) == "\n"  # every sentence ends with end of line


@pytest.mark.parametrize("split", SPLITS)
def test_word_files_give_the_char_files_exactly(ptb_dir: Path, split: str) -> None:
    words = read_ptb_word_file(ptb_dir / f"ptb.{split}.txt")
    chars = read_ptb_char_file(ptb_dir / f"ptb.char.{split}.txt")
    assert words.dtype == np.uint8 and len(chars) == PTB_SIZES[split]
    assert np.array_equal(words, chars)


def test_ptb_derives_the_splits_from_word_files(ptb_dm: PTBChar, ptb_dir: Path, tmp_path: Path) -> None:
    folder = symlinks(tmp_path / "ptb", ptb_dir, list(PTB_WORD_FILES))
    dm = PTBChar(data_dir=str(folder))
    assert dm.corpus_ready()
    dm.setup("fit")
    for split in SPLITS:
        assert torch.equal(dm.splits[split], ptb_dm.splits[split]), split
    assert "ptb.test.txt" in dm.source_of("test")


def test_ptb_mixes_char_and_word_files(ptb_dm: PTBChar, ptb_dir: Path, tmp_path: Path) -> None:
    folder = symlinks(tmp_path / "ptb", ptb_dir, ["ptb.char.train.txt", "ptb.valid.txt", "ptb.char.test.txt"])
    dm = PTBChar(data_dir=str(folder))
    dm.setup("fit")
    assert {split: len(tokens) for split, tokens in dm.splits.items()} == PTB_SIZES
    assert torch.equal(dm.splits["valid"], ptb_dm.splits["valid"])


@pytest.mark.parametrize(
    ("name", "damage"),
    [("ptb.char.valid.txt", "change"), ("ptb.char.test.txt", "truncate"), ("ptb.test.txt", "change")],
)
def test_ptb_corrupt_file_is_named_with_its_md5(ptb_dir: Path, tmp_path: Path, name: str, damage: str) -> None:
    """A changed or truncated file that still parses must be caught by its md5, not read silently."""
    split = name.split(".")[-2]
    others = [n for n in PTB_CHAR_FILES if split not in n]
    folder = symlinks(tmp_path / "ptb", ptb_dir, others)
    data = bytearray((ptb_dir / name).read_bytes())
    if damage == "change":
        position = data.index(b"a", len(data) // 2)
        data[position] = ord("b")  # still a valid PTB file, just not the Mikolov one
    else:
        del data[data.index(b"\n", len(data) // 2) + 1 :]  # cut at a line end: parses fine
    (folder / name).write_bytes(data)
    dm = PTBChar(data_dir=str(folder))
    assert not dm.corpus_ready()
    with pytest.raises(RuntimeError, match="md5") as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(folder / name) in message
    assert PTB_FILES[name] in message and file_md5(folder / name) in message
    assert "download=true" in message


def test_ptb_missing_split_names_both_files_and_download(ptb_dir: Path, tmp_path: Path) -> None:
    folder = symlinks(tmp_path / "ptb", ptb_dir, ["ptb.char.train.txt", "ptb.char.test.txt"])
    dm = PTBChar(data_dir=str(folder))
    assert not dm.corpus_ready()
    with pytest.raises(FileNotFoundError, match="download") as info:
        dm.setup("fit")
    message = str(info.value)
    assert "ptb.char.valid.txt" in message and "ptb.valid.txt" in message and str(folder) in message


def test_read_ptb_char_file_refuses_a_word_file(ptb_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"not a character-level PTB file: line 1 .*'ae'"):
        read_ptb_char_file(ptb_dir / "ptb.train.txt")


def test_ptb_word_file_format(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_bytes(b" the cat sat \n\n a  b \n")  # leading/trailing/double spaces, an empty sentence
    assert read_ptb_word_file(path).tobytes() == b"the_cat_sat\n\na_b\n"
    path.write_bytes(b" no final newline")
    assert read_ptb_word_file(path).tobytes() == b"no_final_newline\n"


def test_ptb_prime_is_free_text(tmp_path: Path) -> None:
    """predict's batch brings the alphabet only (the sampling settings are the task's); primes are free text."""
    dm = PTBChar(data_dir=str(tmp_path))
    (request,) = list(dm.predict_dataloader())  # no data needed: the alphabet is fixed
    assert isinstance(request, SampleRequest) and request.vocabulary == dm.vocabulary
    prime = request.encode("the cat")
    assert prime.shape == (7,) and prime.dtype == torch.int64
    assert dm.vocabulary.decode(prime) == "the_cat"
    assert request.default_prime == "\n" and dm.vocabulary.decode(request.encode(None)) == "\n"
    assert dm.corpus_to_text("the_cat\n") == request.readable("the_cat\n") == "the cat\n"


@pytest.mark.parametrize("prime", ["The cat", ""])
def test_bad_prime_is_named(tmp_path: Path, prime: str) -> None:
    (request,) = list(PTBChar(data_dir=str(tmp_path)).predict_dataloader())
    with pytest.raises(ValueError, match=r"prime \(model.init_args.prime\)"):
        request.encode(prime, "prime (model.init_args.prime)")


@pytest.mark.parametrize("name", ["prime", "sample_length", "num_samples", "temperature"])
def test_sampling_settings_are_not_the_datamodules(tmp_path: Path, name: str) -> None:
    """They moved to the task (CharLanguageModel): the DataModule still takes them, so that checkpoints saved before
    load for predict, but ignores them with a warning naming the old and the new flag, and does not save them."""
    with pytest.warns(FutureWarning, match=rf"data\.init_args\.{name}=1: .*ignored.*model\.init_args\.{name}"):
        dm = TextFiles(data_dir=str(tmp_path), **{name: 1})
    assert name not in dm.hparams and not hasattr(dm, name)


# ------------------------------------------------------------------------------------------------------ paper mode


@pytest.mark.parametrize("num_tokens", [1003, 1010, 1019])
def test_example_starts_cover_each_cropped_epoch_once(num_tokens: int) -> None:
    L = 10
    n = (num_tokens - L) // L
    sampler = ExampleStarts(num_tokens, L, random_offset=True, seed=4)
    assert len(sampler) == n
    offsets = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        starts = list(sampler)
        offset = sampler.offset()
        offsets.append(offset)
        assert 0 <= offset < L
        assert sorted((s - offset) // L for s in starts) == list(range(n))
        assert all((s - offset) % L == 0 and s + L + 1 <= num_tokens for s in starts)
        covered = sorted(p for s in starts for p in range(s, s + L))
        assert covered == list(range(offset, offset + n * L))  # every position once, nothing outside
        assert list(sampler) == starts  # iterating again repeats the epoch
    assert set(offsets) == set(range(L))  # every offset occurs, the last one (L - 1) included
    sampler.set_epoch(0)
    assert list(sampler) != sorted(sampler)  # shuffled


def test_example_starts_are_seeded_per_epoch() -> None:
    def epoch_starts(seed: int, epoch: int) -> list[int]:
        sampler = ExampleStarts(2000, 10, random_offset=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    epochs = [epoch_starts(0, epoch) for epoch in range(10)]
    assert len({starts[0] % 10 for starts in epochs}) > 1  # offsets change over epochs
    assert len({tuple(starts) for starts in epochs}) == 10  # so do the orders
    assert epochs[3] == epoch_starts(0, 3)  # same seed and epoch: same epoch
    assert epoch_starts(1, 3) != epochs[3]


def test_evaluation_starts_are_in_order() -> None:
    sampler = ExampleStarts(1001, 10, random_offset=False)
    assert list(sampler) == list(range(0, 1000, 10)) and len(sampler) == 100 and sampler.offset() == 0
    sampler.set_epoch(5)
    assert list(sampler) == list(range(0, 1000, 10))
    assert list(ExampleStarts(1000, 10, random_offset=False)) == list(range(0, 990, 10))  # 99: the last needs a target


def test_paper_batches_are_windows_of_the_split(ptb_dm: PTBChar) -> None:
    loader = ptb_dm.train_dataloader()
    tokens = ptb_dm.splits["train"]
    assert len(loader) == ((5_017_482 - 100) // 100) // 64
    starts = list(loader.sampler)[:64]
    batch = next(iter(loader))
    assert isinstance(batch, TextBatch)
    assert batch.inputs.shape == batch.targets.shape == (64, 100)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64
    assert (batch.carry, batch.start_step, batch.protocol) == (False, 0, Protocol.split())
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    for row, start in enumerate(starts):
        assert torch.equal(batch.inputs[row], tokens[start : start + 100].long())
        assert torch.equal(batch.targets[row], tokens[start + 1 : start + 101].long())
    loader.sampler.set_epoch(1)  # what Lightning does each epoch
    assert not torch.equal(next(iter(loader)).inputs, batch.inputs)


def test_paper_loader_covers_the_cropped_corpus_once(tmp_path: Path) -> None:
    """415 symbols, L=10: 40 examples an epoch, 10 full batches of 4, so the loader drops nothing."""
    dm = text_dm(tmp_path, seq_length=10, batch_size=4)
    tokens = dm.splits["train"].long()
    loader = dm.train_dataloader()
    assert len(loader) == 10
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        offset = loader.sampler.offset()
        batches = list(loader)
        assert len(batches) == 10 and all(b.inputs.shape == (4, 10) for b in batches)
        rows = sorted(tuple(row) for b in batches for row in torch.cat([b.inputs, b.targets[:, -1:]], 1).tolist())
        expected = sorted(tuple(tokens[offset + k * 10 : offset + k * 10 + 11].tolist()) for k in range(40))
        assert rows == expected


def test_paper_training_drops_the_partial_batch(tmp_path: Path) -> None:
    dm = text_dm(tmp_path, seq_length=10, batch_size=6)  # 40 examples: 6 full batches, 4 left over
    assert len(dm.train_dataloader()) == 6
    assert sum(len(b.inputs) for b in dm.train_dataloader()) == 36
    val = list(dm.val_dataloader())  # evaluation keeps everything: (203 - 1) // 10 = 20 examples
    assert [len(b.inputs) for b in val] == [6, 6, 6, 2]


# --------------------------------------------------------------------------------------------------- stateful mode


def test_token_stream_rows_continue_across_batches() -> None:
    tokens = (torch.arange(1003) % 251).to(torch.uint8)
    stream = TokenStream(tokens, batch_size=3, chunk_length=7)
    batches = list(stream)
    assert stream.row_length == 334 and len(stream) == len(batches) == 47
    assert [b.carry for b in batches] == [False] + [True] * 46
    assert all(b.start_step == 0 and b.inputs.shape == (3, 7) and b.inputs.dtype == torch.int64 for b in batches)
    for k in range(46):
        assert torch.equal(batches[k + 1].inputs[:, 0], batches[k].targets[:, -1])
    inputs, targets = rows_of(batches), rows_of(batches, "targets")
    for i in range(3):
        assert torch.equal(inputs[i], tokens[i * 334 : i * 334 + 329].long())
        assert torch.equal(targets[i], tokens[i * 334 + 1 : i * 334 + 330].long())
    timed = list(TokenStream(tokens, 3, 7, continue_time=True))
    assert [b.start_step for b in timed] == [7 * k for k in range(47)]
    view = list(TokenStream(tokens[5:], 1, 4))  # a view starting inside its storage
    assert view[0].inputs.tolist() == [[5, 6, 7, 8]]


def test_token_stream_keeps_the_short_tail_for_evaluation() -> None:
    tokens = (torch.arange(1003) % 251).to(torch.uint8)
    batches = list(TokenStream(tokens, 3, 7, drop_last=False))
    assert len(batches) == 48 and batches[-1].inputs.shape == (3, 334 - 47 * 7)
    for i, row in enumerate(rows_of(batches, "targets")):
        assert torch.equal(row, tokens[i * 334 + 1 : (i + 1) * 334 + 1].long())  # every symbol but the first


def test_token_stream_ranks_tile_the_split() -> None:
    tokens = torch.from_numpy(np.random.default_rng(0).integers(50, size=1003).astype(np.uint8))
    parts = [list(TokenStream(tokens, 2, 9, rank=r, world_size=2, drop_last=False)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 28  # row length (1003 - 1) // 4 = 250
    rows = torch.cat([rows_of(parts[0]), rows_of(parts[1])])  # (4, 250): rank 0's rows, then rank 1's
    assert torch.equal(rows.flatten(), tokens[:1000].long())


def test_token_stream_too_short_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than one chunk of 5"):
        TokenStream(torch.zeros(20, dtype=torch.uint8), batch_size=4, chunk_length=5)


def test_stateful_datamodule_carries_state(tmp_path: Path) -> None:
    dm = text_dm(tmp_path, mode="stateful", seq_length=8, batch_size=4, eval_batch_size=2)
    tokens = dm.splits["train"].long()
    batches = list(dm.train_dataloader())
    assert all(isinstance(b, TextBatch) and b.inputs.shape == (4, 8) for b in batches)
    assert len(batches) == (414 // 4) // 8 == 12
    assert [b.carry for b in batches] == [False] + [True] * 11
    inputs = rows_of(batches)
    for i in range(4):
        assert torch.equal(inputs[i], tokens[i * 103 : i * 103 + 96])
    val = list(dm.val_dataloader())  # 2 streams of 101 steps, the 5-step tail kept
    assert [b.inputs.shape for b in val] == [(2, 8)] * 12 + [(2, 5)]
    assert torch.equal(rows_of(val, "targets").flatten(), dm.splits["valid"][1:].long())


def test_stateful_stream_with_one_worker_matches(tmp_path: Path) -> None:
    """The worker process must yield the same batches, in the same order, as the main process."""
    in_main = list(text_dm(tmp_path / "main", mode="stateful", seq_length=8, batch_size=4).train_dataloader())
    in_worker = list(
        text_dm(tmp_path / "worker", mode="stateful", seq_length=8, batch_size=4, num_workers=1).train_dataloader()
    )
    assert len(in_worker) == len(in_main) == 12
    for ours, theirs in zip(in_worker, in_main, strict=True):
        assert torch.equal(ours.inputs, theirs.inputs) and torch.equal(ours.targets, theirs.targets)
        assert ours.carry == theirs.carry


def test_stateful_refuses_several_workers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"num_workers \(data.init_args.num_workers\).*stateful.*got 2"):
        TextFiles(data_dir=str(tmp_path), mode="stateful", num_workers=2)
    TextFiles(data_dir=str(tmp_path), mode="paper", num_workers=2)  # fine in paper mode


# --------------------------------------------------------------------------------------------------- test protocols


def test_full_protocol_reads_the_test_split_once(ptb_dir: Path, ptb_dm: PTBChar) -> None:
    dm = PTBChar(data_dir=str(ptb_dir), test_protocol="full", full_chunk_length=1000)
    dm.splits = ptb_dm.splits  # same files: skip reading them again
    batches = list(dm.test_dataloader())
    assert len(batches) == 443  # 442,422 steps: 442 chunks of 1000 and one of 422
    assert all(b.inputs.shape[0] == 1 and b.protocol == Protocol.full() for b in batches)
    assert [b.inputs.shape[1] for b in batches] == [1000] * 442 + [422]
    assert [b.start_step for b in batches] == [1000 * k for k in range(443)]
    assert [b.carry for b in batches] == [False] + [True] * 442
    tokens = ptb_dm.splits["test"].long()
    assert torch.equal(rows_of(batches, "targets")[0], tokens[1:])
    assert torch.equal(rows_of(batches)[0], tokens[:-1])


def test_evaluation_drops_only_a_lone_last_example(tmp_path: Path) -> None:
    """Batch statistics need two sequences: an evaluation loader never ends on a batch of one, and drops no more."""
    # valid: (21 - 1) // 4 = 5 examples in batches of 2 -> 2 + 2 + a lone 1, dropped; test: 7 examples in 3s -> 3+3+1
    dm = text_dm(tmp_path, sizes=(415, 21, 29), seq_length=4, batch_size=2, eval_batch_size=2)
    assert [len(b.inputs) for b in dm.val_dataloader()] == [2, 2]
    dm.eval_batch_size = 3
    assert [len(b.inputs) for b in dm.test_dataloader()] == [3, 3]
    dm.eval_batch_size = 4  # 7 examples in 4s: 4 + 3, nothing to drop
    assert [len(b.inputs) for b in dm.test_dataloader()] == [4, 3]


def test_sweep_protocol_gives_one_loader_per_length(tmp_path: Path) -> None:
    dm = text_dm(tmp_path, seq_length=10, eval_batch_size=4, test_protocol="sweep", sweep_lengths=[100, 300])
    tokens = dm.splits["test"].long()  # 1001 symbols
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    for loader, L, count in zip(loaders, (100, 300), (10, 3), strict=True):
        rows = [
            (b.protocol, inputs, targets) for b in loader for inputs, targets in zip(b.inputs, b.targets, strict=True)
        ]
        assert len(rows) == count
        for k, (protocol, inputs, targets) in enumerate(rows):
            assert protocol == Protocol("length", L) and protocol.length == L and inputs.shape == (L,)
            assert torch.equal(inputs, tokens[k * L : k * L + L])
            assert torch.equal(targets, tokens[k * L + 1 : k * L + L + 1])


def test_examples_protocol_cuts_the_test_split_like_validation(tmp_path: Path) -> None:
    dm = text_dm(tmp_path, seq_length=10, batch_size=8, eval_batch_size=5)
    tokens = dm.splits["test"].long()
    loader = dm.test_dataloader()
    assert isinstance(loader, DataLoader) and len(loader) == 20  # 100 examples of 10
    first = next(iter(loader))
    assert first.protocol.kind == "split" and first.inputs.shape == (5, 10)
    assert torch.equal(first.inputs.flatten(), tokens[:50])  # offset 0, in order
    assert torch.equal(next(iter(dm.val_dataloader())).inputs.flatten(), dm.splits["valid"][:50].long())


def test_loaders_before_setup_say_what_to_call(tmp_path: Path) -> None:
    dm = TextFiles(data_dir=str(tmp_path), alphabet="ab")
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match=r"setup\('test'\)"):
        dm.test_dataloader()


# ------------------------------------------------------------------------------------------------------- bad input


def test_unknown_test_character_names_file_character_and_line(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus", "abc\n" * 50, "cab\n" * 20, "abc\nab\nbzc\n" * 3)
    dm = TextFiles(data_dir=str(folder), seq_length=5)
    with pytest.raises(ValueError, match=r"character 'z' .*\(line 3\)") as info:
        dm.setup("fit")
    assert str(folder / "test.txt") in str(info.value)


def test_fixed_alphabet_checks_the_training_file_too(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus", "abc\n" * 50, "ab\n" * 20, "ab\n" * 20)
    dm = TextFiles(data_dir=str(folder), alphabet="ab\n", seq_length=5)
    assert dm.vocabulary.symbols == ("a", "b", "\n")
    with pytest.raises(ValueError, match=r"character 'c' .*\(line 1\)") as info:
        dm.setup("fit")
    assert str(folder / "train.txt") in str(info.value)


def test_seq_length_longer_than_a_split_is_named(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus", "ab\n" * 100, "ab\n" * 10, "ab\n" * 100)
    with pytest.raises(ValueError, match=r"valid split .*30 symbols.*seq_length=30 \(data.init_args.seq_length\)"):
        TextFiles(data_dir=str(folder), seq_length=30).setup("fit")


def test_too_few_examples_for_a_batch_is_named(tmp_path: Path) -> None:
    dm = text_dm(tmp_path, seq_length=10, batch_size=41)  # 40 training examples
    with pytest.raises(ValueError, match="fewer than one batch of 41.*batch_size"):
        dm.train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "tbptt"}, "mode"),
        ({"test_protocol": "all"}, "test_protocol"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"seq_length": 2.5}, "seq_length"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"full_chunk_length": -1}, "full_chunk_length"),
        ({"sweep_lengths": []}, "sweep_lengths"),
        ({"sweep_lengths": [100, 0]}, "sweep_lengths"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path: Path, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"data\.init_args\.{name}\b"):
        TextFiles(data_dir=str(tmp_path), **kwargs)


def test_empty_and_missing_text_files_are_named(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus", "ab\n" * 50, "", "ab\n" * 50)
    with pytest.raises(ValueError, match="empty") as info:
        TextFiles(data_dir=str(folder), seq_length=5).setup("fit")
    assert str(folder / "valid.txt") in str(info.value)
    (folder / "valid.txt").write_bytes(b"ab\n" * 50)
    (folder / "test.txt").unlink()
    dm = TextFiles(data_dir=str(folder), alphabet="ab\n")
    assert not dm.corpus_ready()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "test.txt"))):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------- vocabulary in the state


def test_vocabulary_is_derived_sorted_from_the_training_file(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus", "cab d\n" * 10, "ab\n" * 10, "dc\n" * 10)
    dm = TextFiles(data_dir=str(folder), seq_length=5)
    assert dm.vocabulary.symbols == tuple("\n abcd") and dm.input_size == 6  # known before setup
    dm.setup("fit")
    assert dm.vocabulary.decode(dm.splits["train"]) == "cab d\n" * 10
    assert dm.vocabulary.decode(dm.splits["test"]) == "dc\n" * 10


def test_state_dict_holds_the_vocabulary(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus", "cab\n" * 10, "ab\n" * 10, "ab\n" * 10)
    state = TextFiles(data_dir=str(folder)).state_dict()
    assert state == {"vocabulary": "\nabc"}
    TextFiles(data_dir=str(folder)).load_state_dict(state)  # same corpus: accepted
    TextFiles(data_dir=str(tmp_path), alphabet="\nabc").load_state_dict(state)
    with pytest.raises(ValueError, match=re.escape("vocabulary '\\nabc'")) as info:
        TextFiles(data_dir=str(tmp_path), alphabet="abc\n").load_state_dict(state)  # same symbols, other ids
    assert "vocabulary" in str(info.value)
    with pytest.raises(ValueError, match="no 'vocabulary'"):
        TextFiles(data_dir=str(folder)).load_state_dict({})
    assert PTBChar(data_dir=str(tmp_path)).state_dict() == {"vocabulary": PTB_SYMBOLS}


# ------------------------------------------------------------------------------------------------------------ text8


def test_text8_prefix_splits(text8_dir: Path) -> None:
    dm = Text8(data_dir=str(text8_dir), archive=TEXT8_PREFIX, check_canonical=False, seq_length=180)
    assert dm.corpus_ready()
    dm.setup("fit")
    assert dm.vocabulary == CharVocabulary(TEXT8_SYMBOLS) and (dm.input_size, dm.max_steps) == (27, 180)
    assert {split: len(tokens) for split, tokens in dm.splits.items()} == TEXT8_SIZES
    assert dm.vocabulary.decode(dm.splits["train"][:40]) == " anarchism originated as a term of abuse"
    with zipfile.ZipFile(text8_dir / TEXT8_PREFIX) as zf:
        tail = zf.read("text8_prefix")[-100:].decode()
    assert dm.vocabulary.decode(dm.splits["test"][-100:]) == tail  # the splits end where the corpus ends


def test_text8_canonical_check_on_the_prefix(text8_dir: Path) -> None:
    dm = Text8(data_dir=str(text8_dir), archive=TEXT8_PREFIX)
    assert not dm.corpus_ready()
    with pytest.raises(ValueError, match="check_canonical") as info:
        dm.setup("fit")
    assert "0x7d6be66f" in str(info.value) and "6877825 bytes" in str(info.value)


def test_text8_missing_archive_says_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="text8.zip.*download"):
        Text8(data_dir=str(tmp_path)).setup("fit")


def corrupted_prefix(text8_dir: Path, tmp_path: Path, position: int) -> Path:
    """A copy of the prefix zip with 16 bytes of its compressed data inverted from ``position``."""
    data = bytearray((text8_dir / TEXT8_PREFIX).read_bytes())
    for k in range(position, position + 16):
        data[k] ^= 0xFF
    path = tmp_path / "corrupt.zip"
    path.write_bytes(data)
    return path


def test_text8_corrupt_zip_is_named(text8_dir: Path, tmp_path: Path) -> None:
    path = corrupted_prefix(text8_dir, tmp_path, (text8_dir / TEXT8_PREFIX).stat().st_size // 2)
    dm = Text8(data_dir=str(tmp_path), archive=path.name, check_canonical=False)
    with pytest.raises(ValueError, match="corrupt") as info:
        dm.setup("fit")
    assert str(path) in str(info.value)


def test_text8_corrupt_deflate_stream_is_named(text8_dir: Path, tmp_path: Path) -> None:
    path = corrupted_prefix(text8_dir, tmp_path, 1000)  # early in the stream: an invalid back-reference
    dm = Text8(data_dir=str(tmp_path), archive=path.name, check_canonical=False)
    with pytest.raises(ValueError, match="corrupt") as info:
        dm.setup("fit")
    assert str(path) in str(info.value)


def test_text8_zip_must_hold_one_member(tmp_path: Path) -> None:
    path = tmp_path / "two.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("text8", " abc" * 100)
        zf.writestr("extra", " abc" * 100)
    with pytest.raises(ValueError, match="exactly one member.*found 2") as info:
        Text8(data_dir=str(tmp_path), archive="two.zip", check_canonical=False).setup("fit")
    assert str(path) in str(info.value)
    (tmp_path / "plain.zip").write_bytes(b" abc" * 100)
    with pytest.raises(ValueError, match="not a readable zip"):
        Text8(data_dir=str(tmp_path), archive="plain.zip", check_canonical=False).setup("fit")


def test_text8_fractions_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        Text8(data_dir=str(tmp_path), train_fraction=0.96, valid_fraction=0.05)


# -------------------------------------------------------------------------------------------- downloads (file://)


def test_ptb_download_extracts_the_six_files_only(ptb_dir: Path, tmp_path: Path) -> None:
    members: dict[str, Path | bytes] = {f"./simple-examples/data/{name}": ptb_dir / name for name in PTB_FILES}
    members["./simple-examples/data/README"] = b"not wanted"
    members["../evil.txt"] = b"path traversal"
    members["simple-examples/../../evil.txt"] = b"path traversal"
    archive = make_tgz(tmp_path / "mirror" / "simple-examples.tgz", members)
    folder = tmp_path / "work" / "data" / "ptb"
    dm = with_mirrors(PTBChar, tmp_path / "absent.tgz", archive)(data_dir=str(folder), download=True)
    dm.prepare_data()
    assert leftovers(folder) == sorted([*PTB_FILES, "simple-examples.tgz"])  # no README, no *.part
    for name, md5 in PTB_FILES.items():
        assert file_md5(folder / name) == md5
    assert not list(tmp_path.parent.rglob("evil.txt"))
    archive.unlink()
    dm.prepare_data()  # verified files: nothing to download
    dm.setup("fit")
    assert len(dm.splits["valid"]) == PTB_SIZES["valid"]


def test_ptb_download_of_an_incomplete_archive_leaves_nothing(tmp_path: Path) -> None:
    members: dict[str, Path | bytes] = {f"simple-examples/data/{name}": b"x" for name in PTB_FILES}
    del members["simple-examples/data/ptb.test.txt"]
    archive = make_tgz(tmp_path / "mirror" / "simple-examples.tgz", members)
    folder = tmp_path / "ptb"
    dm = with_mirrors(PTBChar, archive)(data_dir=str(folder), download=True)
    with pytest.raises(RuntimeError, match="lacks ptb.test.txt") as info:
        dm.prepare_data()
    assert archive.as_uri() in str(info.value)
    assert leftovers(folder) == []


def test_ptb_download_with_a_wrong_member_leaves_no_partial_file(tmp_path: Path) -> None:
    archive = make_tgz(
        tmp_path / "mirror" / "simple-examples.tgz", {f"simple-examples/data/{name}": b"x" for name in PTB_FILES}
    )
    folder = tmp_path / "ptb"
    dm = with_mirrors(PTBChar, archive)(data_dir=str(folder), download=True)
    with pytest.raises(RuntimeError, match="member simple-examples/data/ptb.char.train.txt has md5"):
        dm.prepare_data()
    assert leftovers(folder) == ["simple-examples.tgz"]  # the archive, but no extracted or partial file


def test_text8_download_checks_the_archive(text8_dir: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror" / "text8.zip"
    mirror.parent.mkdir()
    shutil.copyfile(text8_dir / TEXT8_PREFIX, mirror)
    local = with_mirrors(Text8, mirror)
    folder = tmp_path / "text8"
    with pytest.raises(RuntimeError, match="failed its check.*check_canonical") as info:
        local(data_dir=str(folder), download=True).prepare_data()
    assert mirror.as_uri() in str(info.value)
    assert leftovers(folder) == []
    dm = local(data_dir=str(folder), download=True, check_canonical=False)
    dm.prepare_data()
    assert leftovers(folder) == ["text8.zip"] and file_md5(folder / "text8.zip") == file_md5(mirror)
    dm.setup("fit")
    assert {split: len(tokens) for split, tokens in dm.splits.items()} == TEXT8_SIZES
