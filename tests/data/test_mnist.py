"""Sequential and permuted MNIST DataModules, on the real files in the offline data folder's mnist/ (read-only;
see tests/offline_data.py)."""

from __future__ import annotations

import gzip
import struct
from functools import cache
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader

from bnlstm_lit.data.download import file_md5
from bnlstm_lit.data.mnist import (
    MNIST_FILES,
    PermutedMNIST,
    PixelSequenceCollate,
    SequentialMNIST,
    load_idx_pair,
    mnist_permutation,
    read_idx_images,
    read_idx_labels,
)
from offline_data import data_root

MNIST_DIR = data_root() / "mnist"
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = MNIST_FILES


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    missing = [name for name in MNIST_FILES if not (MNIST_DIR / name).is_file()]
    if missing:
        pytest.skip(f"MNIST files not found in {MNIST_DIR}: {missing}")
    return MNIST_DIR


@pytest.fixture(scope="module")
def seq_dm(mnist_dir: Path) -> SequentialMNIST:
    """Full sequential MNIST, loaded once for the module (about 0.2 s)."""
    dm = SequentialMNIST(data_dir=str(mnist_dir))
    dm.setup("fit")
    dm.setup("test")
    return dm


@cache
def raw_idx(name: str) -> bytes:
    """Decompressed bytes of one shared MNIST file, header included, read without the code under test."""
    with gzip.open(MNIST_DIR / name, "rb") as f:
        return f.read()


def first_batch(loader: DataLoader) -> tuple[Tensor, Tensor]:
    return next(iter(loader))


def data_dir_with(tmp_path: Path, names: list[str] | tuple[str, ...]) -> Path:
    """A data_dir holding symlinks to the named shared files only."""
    folder = tmp_path / "mnist"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).symlink_to(MNIST_DIR / name)
    return folder


# ----------------------------------------------------------------------------------------------------- the contract


def test_sizes_are_known_before_setup(tmp_path: Path) -> None:
    for dm in (SequentialMNIST(data_dir=str(tmp_path / "nowhere")), PermutedMNIST(data_dir=str(tmp_path))):
        assert (dm.input_size, dm.output_size, dm.max_steps) == (1, 10, 784)


def test_loaders_before_setup_say_what_to_call(tmp_path: Path) -> None:
    dm = SequentialMNIST(data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match=r"setup\('test'\)"):
        dm.test_dataloader()


def test_batch_shapes_dtypes_and_range(seq_dm: SequentialMNIST) -> None:
    for loader in (seq_dm.train_dataloader(), seq_dm.val_dataloader(), seq_dm.test_dataloader()):
        inputs, targets = first_batch(loader)
        assert inputs.shape == (100, 784, 1) and inputs.dtype == torch.float32
        assert targets.shape == (100,) and targets.dtype == torch.int64
        assert 0.0 <= inputs.min() and inputs.max() <= 1.0
        assert inputs.max() == 1.0  # scaled by 255, not by the batch max or by 256
        assert torch.equal(inputs * 255, (inputs * 255).round())  # x / 255 of uint8 values
        assert 0 <= targets.min() and targets.max() <= 9


def test_split_sizes(seq_dm: SequentialMNIST) -> None:
    assert seq_dm.train_set is not None and seq_dm.val_set is not None and seq_dm.test_set is not None
    assert (len(seq_dm.train_set), len(seq_dm.val_set), len(seq_dm.test_set)) == (50_000, 10_000, 10_000)
    assert len(seq_dm.train_dataloader()) == 500
    assert len(seq_dm.val_dataloader()) == len(seq_dm.test_dataloader()) == len(seq_dm.predict_dataloader()) == 100


def test_known_labels(seq_dm: SequentialMNIST) -> None:
    assert seq_dm.train_set is not None and seq_dm.val_set is not None and seq_dm.test_set is not None
    assert int(seq_dm.train_set[0][1]) == 5  # the famous first training digit
    assert int(seq_dm.test_set[0][1]) == 7
    assert int(seq_dm.val_set[0][1]) == raw_idx(TRAIN_LABELS)[8 + 50_000]  # val starts at training image 50,000


def test_pixels_match_the_raw_bytes(seq_dm: SequentialMNIST) -> None:
    def expected(name: str, index: int) -> Tensor:
        start = 16 + index * 784  # 16-byte header, then 784 bytes per image, row-major
        return torch.tensor(list(raw_idx(name)[start : start + 784]), dtype=torch.float32).div(255).view(784, 1)

    test_inputs, test_targets = first_batch(seq_dm.test_dataloader())
    assert torch.equal(test_inputs[3], expected(TEST_IMAGES, 3))
    assert test_targets[3] == raw_idx(TEST_LABELS)[8 + 3]
    val_inputs, _ = first_batch(seq_dm.val_dataloader())
    assert torch.equal(val_inputs[0], expected(TRAIN_IMAGES, 50_000))
    predict_inputs, _ = first_batch(seq_dm.predict_dataloader())
    assert torch.equal(predict_inputs, test_inputs)


def test_train_shuffle_is_seeded(seq_dm: SequentialMNIST, mnist_dir: Path) -> None:
    inputs, targets = first_batch(seq_dm.train_dataloader())
    again, again_targets = first_batch(seq_dm.train_dataloader())
    assert torch.equal(inputs, again) and torch.equal(targets, again_targets)
    assert seq_dm.train_set is not None
    assert not torch.equal(targets, seq_dm.train_set.labels[:100])  # shuffled, not file order
    other = SequentialMNIST(data_dir=str(mnist_dir), seed=1)
    other.setup("fit")
    assert not torch.equal(first_batch(other.train_dataloader())[1], targets)


def test_setup_is_idempotent(seq_dm: SequentialMNIST) -> None:
    train_set, test_set = seq_dm.train_set, seq_dm.test_set
    seq_dm.setup("fit")
    seq_dm.setup("test")
    seq_dm.setup(None)
    assert seq_dm.train_set is train_set and seq_dm.test_set is test_set


def test_limits_take_the_first_examples(seq_dm: SequentialMNIST, mnist_dir: Path) -> None:
    dm = SequentialMNIST(data_dir=str(mnist_dir), limit_train=250, limit_val=30, limit_test=20_000, val_size=5_000)
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert seq_dm.train_set is not None and seq_dm.test_set is not None
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (250, 30, 10_000)  # a limit above the size
    assert torch.equal(dm.train_set.pixels, seq_dm.train_set.pixels[:250])
    assert int(dm.val_set.labels[0]) == raw_idx(TRAIN_LABELS)[8 + 55_000]  # val_size=5000: val starts at 55,000
    assert (len(dm.train_dataloader()), len(dm.val_dataloader())) == (2, 1)  # training drops the 50-example tail


def test_setup_loads_only_what_the_stage_needs(mnist_dir: Path) -> None:
    dm = SequentialMNIST(data_dir=str(mnist_dir))
    dm.setup("test")
    assert dm.test_set is not None and dm.train_set is None and dm.val_set is None


def test_collate_accepts_items_fetched_one_by_one(seq_dm: SequentialMNIST) -> None:
    assert seq_dm.test_set is not None
    wrapped = ConcatDataset([seq_dm.test_set])  # no __getitems__: the loader hands the collate a list of items
    inputs, targets = first_batch(DataLoader(wrapped, batch_size=8, collate_fn=PixelSequenceCollate()))
    expected_inputs, expected_targets = first_batch(seq_dm.test_dataloader())
    assert torch.equal(inputs, expected_inputs[:8]) and torch.equal(targets, expected_targets[:8])


# ------------------------------------------------------------------------------------------------------ permutation


def test_randperm_is_a_true_seeded_permutation() -> None:
    perm = PermutedMNIST(permutation_seed=0).permutation
    assert perm.shape == (784,) and perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(784))
    assert not torch.equal(perm, torch.arange(784))
    assert torch.equal(perm, PermutedMNIST(permutation_seed=0).permutation)
    assert not torch.equal(perm, PermutedMNIST(permutation_seed=1).permutation)


def test_paper_randint_is_the_original_vector_with_501_distinct_pixels() -> None:
    perm = PermutedMNIST(permutation="paper_randint").permutation
    assert torch.equal(perm, torch.from_numpy(np.random.RandomState(1).randint(0, 784, 784)).long())
    assert perm.unique().numel() == 501


@pytest.mark.parametrize("kind", ["randperm", "paper_randint"])
def test_permuted_batch_is_the_sequential_batch_reordered(seq_dm: SequentialMNIST, mnist_dir: Path, kind: Any) -> None:
    dm = PermutedMNIST(data_dir=str(mnist_dir), permutation=kind)
    dm.setup("test")
    inputs, targets = first_batch(dm.test_dataloader())
    seq_inputs, seq_targets = first_batch(seq_dm.test_dataloader())
    assert torch.equal(inputs, seq_inputs[:, dm.permutation])
    assert torch.equal(targets, seq_targets)
    assert not torch.equal(inputs, seq_inputs)


def test_permutation_is_applied_in_worker_processes(seq_dm: SequentialMNIST, mnist_dir: Path) -> None:
    dm = PermutedMNIST(data_dir=str(mnist_dir), num_workers=1, limit_test=200)
    dm.setup("test")
    inputs, _ = first_batch(dm.test_dataloader())
    assert torch.equal(inputs, first_batch(seq_dm.test_dataloader())[0][:, dm.permutation])


def test_state_dict_round_trip_into_a_differently_seeded_datamodule() -> None:
    saved = PermutedMNIST(permutation_seed=0)
    state = saved.state_dict()
    fresh = PermutedMNIST(permutation_seed=1)
    assert not torch.equal(fresh.permutation, saved.permutation)
    with pytest.warns(UserWarning, match="saved in the checkpoint"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.permutation, saved.permutation)
    state["permutation"].zero_()  # the state is a copy, not a view of the live permutation
    assert torch.equal(fresh.permutation, saved.permutation)
    assert SequentialMNIST().state_dict() == {}


def test_restored_permutation_reaches_existing_loaders(seq_dm: SequentialMNIST, mnist_dir: Path) -> None:
    """Lightning restores DataModule state after setup; loaders made before load_state_dict must follow it too."""
    dm = PermutedMNIST(data_dir=str(mnist_dir), permutation_seed=1)
    dm.setup("test")
    loader = dm.test_dataloader()
    wanted = mnist_permutation("randperm", 7)
    with pytest.warns(UserWarning):
        dm.load_state_dict({"permutation": wanted})
    assert torch.equal(first_batch(loader)[0], first_batch(seq_dm.test_dataloader())[0][:, wanted])
    assert torch.equal(first_batch(dm.test_dataloader())[0], first_batch(loader)[0])


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({}, "no 'permutation' tensor"),
        ({"permutation": list(range(784))}, "no 'permutation' tensor"),
        ({"permutation": torch.arange(784.0)}, "integer indices"),
        ({"permutation": torch.arange(783)}, r"shape \(784,\)"),
        ({"permutation": torch.arange(784).view(28, 28)}, r"shape \(784,\)"),
        ({"permutation": torch.arange(1, 785)}, "outside"),
        ({"permutation": torch.arange(784) - 1}, "outside"),
    ],
)
def test_load_state_dict_rejects_bad_permutations(state: dict[str, Any], message: str) -> None:
    dm = PermutedMNIST()
    before = dm.permutation.clone()
    with pytest.raises(ValueError, match=message):
        dm.load_state_dict(state)
    assert torch.equal(dm.permutation, before)  # nothing half-applied


class _LinearProbe(L.LightningModule):
    """Linear classifier on the flattened sequence; records what the test loop feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(784, 10)
        self.test_inputs: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(self.linear(inputs.flatten(1)), targets)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_inputs.append(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_checkpoint_carries_the_permutation(seq_dm: SequentialMNIST, mnist_dir: Path, tmp_path: Path) -> None:
    trainer_args: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    limits = dict(data_dir=str(mnist_dir), limit_train=100, limit_val=100, limit_test=100)
    trained = PermutedMNIST(permutation_seed=5, **limits)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, **trainer_args)
    trainer.fit(_LinearProbe(), datamodule=trained)
    checkpoint = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint)
    stored = torch.load(checkpoint, weights_only=True)["PermutedMNIST"]["permutation"]
    assert torch.equal(stored, trained.permutation)

    probe = _LinearProbe()
    tested = PermutedMNIST(permutation_seed=6, **limits)
    with pytest.warns(UserWarning, match="saved in the checkpoint"):
        L.Trainer(**trainer_args).test(probe, datamodule=tested, ckpt_path=checkpoint, verbose=False)
    assert torch.equal(tested.permutation, trained.permutation)
    assert torch.equal(probe.test_inputs[0], first_batch(seq_dm.test_dataloader())[0][:, trained.permutation])


# --------------------------------------------------------------------------------------------- files: bad or missing


@pytest.mark.parametrize(("name", "damage"), [(TRAIN_LABELS, "flip"), (TEST_IMAGES, "truncate")])
def test_corrupt_file_is_named_with_both_md5s(mnist_dir: Path, tmp_path: Path, name: str, damage: str) -> None:
    folder = data_dir_with(tmp_path, [other for other in MNIST_FILES if other != name])
    data = bytearray((mnist_dir / name).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    (folder / name).write_bytes(data)
    dm = SequentialMNIST(data_dir=str(folder))
    with pytest.raises(RuntimeError, match="corrupt") as info:
        dm.setup("fit")  # a bad test file is caught before training, too
    message = str(info.value)
    assert str(folder / name) in message
    assert MNIST_FILES[name] in message and file_md5(folder / name) in message
    assert "download=true" in message


def test_missing_files_are_listed(tmp_path: Path, mnist_dir: Path) -> None:
    folder = data_dir_with(tmp_path, [TRAIN_IMAGES, TEST_LABELS])
    dm = SequentialMNIST(data_dir=str(folder), download=False)
    dm.prepare_data()  # download=False: does nothing
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("test")
    message = str(info.value)
    assert TRAIN_LABELS in message and TEST_IMAGES in message
    assert TRAIN_IMAGES not in message and TEST_LABELS not in message
    assert str(folder) in message and "download=true" in message


class _LocalMirrorMNIST(SequentialMNIST):
    """Downloads from the shared folder through a file:// URL, so prepare_data runs without a network."""

    mirrors = (MNIST_DIR.as_uri(),)


def test_download_fetches_missing_and_corrupt_files(mnist_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    (folder / TEST_LABELS).write_bytes(b"corrupt")
    dm = _LocalMirrorMNIST(data_dir=str(folder), download=True)
    dm.prepare_data()
    for name, md5 in MNIST_FILES.items():
        assert file_md5(folder / name) == md5
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_FILES)  # no temporary files
    dm.setup("test")
    assert dm.test_set is not None and int(dm.test_set[0][1]) == 7


# ------------------------------------------------------------------------------------------------------ IDX parsing


def write_idx(path: Path, magic: int, header: tuple[int, ...], payload: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">{1 + len(header)}I", magic, *header) + payload)
    return path


def test_read_idx_images_and_labels(tmp_path: Path) -> None:
    pixels = bytes(range(256)) * 6 + bytes(32)  # 2 images of 784 bytes
    images = read_idx_images(write_idx(tmp_path / "img.gz", 0x803, (2, 28, 28), pixels))
    assert images.shape == (2, 784) and images.dtype == torch.uint8
    assert images.flatten().tolist() == list(pixels)
    labels = read_idx_labels(write_idx(tmp_path / "lab.gz", 0x801, (3,), bytes([0, 9, 4])))
    assert labels.tolist() == [0, 9, 4] and labels.dtype == torch.int64


@pytest.mark.parametrize(
    ("magic", "header", "payload", "message"),
    [
        (0x801, (1, 28, 28), bytes(784), "magic number is 0x00000801, expected 0x00000803"),
        (0x803, (2, 28, 28), bytes(784), "truncated"),
        (0x803, (1, 28, 28), bytes(785), "trailing bytes"),
        (0x803, (1, 27, 28), bytes(756), r"shape is \(27, 28\)"),
        (0x803, (1,), b"", "truncated IDX header"),
    ],
)
def test_bad_idx_images_name_the_file(
    tmp_path: Path, magic: int, header: tuple[int, ...], payload: bytes, message: str
) -> None:
    path = write_idx(tmp_path / "images.gz", magic, header, payload)
    with pytest.raises(ValueError, match=message) as info:
        read_idx_images(path)
    assert str(path) in str(info.value)


def test_bad_gzip_and_bad_labels_name_the_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.gz"
    plain.write_bytes(struct.pack(">II", 0x801, 1) + b"\x01")  # not compressed at all
    with pytest.raises(ValueError, match="plain.gz.*gzip"):
        read_idx_labels(plain)
    whole = write_idx(tmp_path / "whole.gz", 0x801, (1000,), bytes(1000)).read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(whole[: len(whole) // 2])  # gzip stream ends early
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx_labels(cut)
    with pytest.raises(ValueError, match="label 10"):
        read_idx_labels(write_idx(tmp_path / "ten.gz", 0x801, (2,), bytes([3, 10])))


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "img.gz", 0x803, (2, 28, 28), bytes(2 * 784))
    labels = write_idx(tmp_path / "lab.gz", 0x801, (3,), bytes(3))
    with pytest.raises(ValueError, match="2 images.*3 labels") as info:
        load_idx_pair(images, labels)
    assert "img.gz" in str(info.value) and "lab.gz" in str(info.value)


# ----------------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (SequentialMNIST, {"batch_size": 0}, "batch_size"),
        (SequentialMNIST, {"batch_size": -3}, "batch_size"),
        (SequentialMNIST, {"num_workers": -1}, "num_workers"),
        (SequentialMNIST, {"val_size": 0}, "val_size"),
        (SequentialMNIST, {"val_size": 60_000}, "val_size"),
        (SequentialMNIST, {"limit_train": 0}, "limit_train"),
        (SequentialMNIST, {"limit_val": -1}, "limit_val"),
        (SequentialMNIST, {"limit_test": 0}, "limit_test"),
        (SequentialMNIST, {"seed": -1}, "seed"),
        (PermutedMNIST, {"batch_size": 0}, "batch_size"),
        (PermutedMNIST, {"permutation": "shuffle"}, "permutation"),
        (PermutedMNIST, {"permutation_seed": -1}, "permutation_seed"),
        (PermutedMNIST, {"permutation": "paper_randint", "permutation_seed": 3}, "permutation_seed"),
    ],
)
def test_bad_arguments_are_named(cls: type[SequentialMNIST], kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b \(data\.init_args\.{name}\)"):
        cls(**kwargs)
