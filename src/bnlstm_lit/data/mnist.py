"""Sequential and permuted MNIST (paper Sec. 5.1): each 28x28 image is read one pixel per time step, 784 steps.

Read straight from the four original IDX gzip files (no torchvision). Every file's md5 is checked before use and the IDX
headers are checked while parsing, so a corrupt or truncated copy fails loudly, naming the file, instead of training on
garbage. Split as in the paper: train = first 50,000 training images, valid = last 10,000, test = the official 10,000.

Pixels stay in memory as uint8 (47 MB for the training file instead of 188 MB as float32) and are converted per batch,
together with the pixel permutation of :class:`PermutedMNIST`, by :class:`PixelSequenceCollate`.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from bnlstm_lit.data.base import EpochShuffle, SequenceDataModule, check_int, loader_generator
from bnlstm_lit.data.download import check_file, download_url, file_md5

__all__ = [
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "PermutedMNIST",
    "PixelSequenceCollate",
    "PixelSequenceDataset",
    "SequentialMNIST",
    "load_idx_pair",
    "mnist_permutation",
    "read_idx_images",
    "read_idx_labels",
]

log = logging.getLogger(__name__)

# File name -> md5 of the original LeCun files (yann.lecun.com/exdb/mnist), checked after every download.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# Tried in order. The S3 copy (PyTorch's CI mirror) and Google's are reliable; yann.lecun.com is the canonical home but
# often refuses or times out, so it comes last.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_IMAGES_MAGIC = 0x00000803  # IDX: 0x08 = unsigned byte data, 3 dimensions (count, rows, cols)
_LABELS_MAGIC = 0x00000801  # IDX: 0x08 = unsigned byte data, 1 dimension (count)
_SIDE = 28
_NUM_PIXELS = _SIDE * _SIDE  # 784 time steps
_NUM_CLASSES = 10
_NUM_TRAIN_FILE = 60_000  # images in the official training file, split into train + valid


# ----------------------------------------------------------------------------------------------------------- IDX files


def _read_idx(path: Path, magic: int, dims: tuple[int, ...]) -> Tensor:
    """Payload of a gzip IDX file of unsigned bytes whose header is ``magic, count, *dims``; (count, *dims) uint8."""
    header_size = 4 * (2 + len(dims))
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()  # the whole decompressed file; its length is what the header is checked against
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: not a complete gzip file ({err}); the file is corrupt or truncated") from err
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header_size} bytes)")
    found_magic, count, *found_dims = struct.unpack(f">{2 + len(dims)}I", raw[:header_size])  # big-endian uint32s
    if found_magic != magic:
        raise ValueError(f"{path}: IDX magic number is 0x{found_magic:08x}, expected 0x{magic:08x}")
    if tuple(found_dims) != dims:
        raise ValueError(f"{path}: IDX item shape is {tuple(found_dims)}, expected {dims}")
    expected = count * int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header_size
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX payload {what}: header says {count} items = {expected} bytes, found {found}")
    # One copy into a writable buffer (torch warns on read-only bytes); the tensor keeps the bytearray alive.
    payload = torch.frombuffer(bytearray(memoryview(raw)[header_size:]), dtype=torch.uint8)
    return payload.view(count, *dims)


def read_idx_images(path: str | Path) -> Tensor:
    """MNIST images of a ``*-images-idx3-ubyte.gz`` file as pixel sequences: uint8 (N, 784), row-major scanline order.

    Raises:
        ValueError: not gzip, wrong magic (0x00000803 expected), images not 28x28, or payload length != N*784.
    """
    images = _read_idx(Path(path), _IMAGES_MAGIC, (_SIDE, _SIDE))  # (N, 28, 28)
    return images.view(-1, _NUM_PIXELS)  # (N, 784): pixel t is row t // 28, column t % 28


def read_idx_labels(path: str | Path) -> Tensor:
    """MNIST labels of a ``*-labels-idx1-ubyte.gz`` file: int64 (N,), values 0-9.

    Raises:
        ValueError: not gzip, wrong magic (0x00000801 expected), payload length != N, or a label outside 0-9.
    """
    path = Path(path)
    labels = _read_idx(path, _LABELS_MAGIC, ())  # (N,)
    if labels.numel() and int(labels.max()) >= _NUM_CLASSES:
        raise ValueError(f"{path}: label {int(labels.max())} is outside 0-{_NUM_CLASSES - 1}")
    return labels.long()


def load_idx_pair(images_path: str | Path, labels_path: str | Path) -> tuple[Tensor, Tensor]:
    """Images uint8 (N, 784) and labels int64 (N,) of one MNIST split; raises ValueError if the counts differ."""
    pixels, labels = read_idx_images(images_path), read_idx_labels(labels_path)
    if len(pixels) != len(labels):
        raise ValueError(f"{images_path} holds {len(pixels)} images but {labels_path} holds {len(labels)} labels")
    return pixels, labels


def mnist_permutation(kind: Literal["randperm", "paper_randint"], seed: int = 0) -> Tensor:
    """Pixel order of permuted MNIST: int64 (784,), the input at step t is pixel ``order[t]`` of the scanline.

    ``"randperm"``: a true permutation drawn from ``torch.Generator().manual_seed(seed)``.
    ``"paper_randint"``: the authors' Theano code's vector ``numpy.random.RandomState(1).randint(0, 784, 784)``, drawn
    *with replacement*: only 501 distinct pixels are ever shown. Ignores ``seed``. Use it only to compare with the
    paper's numbers.
    """
    if kind == "randperm":
        return torch.randperm(_NUM_PIXELS, generator=torch.Generator().manual_seed(seed))
    if kind == "paper_randint":
        return torch.from_numpy(np.random.RandomState(1).randint(0, _NUM_PIXELS, _NUM_PIXELS).astype(np.int64))
    raise ValueError(f"permutation must be 'randperm' or 'paper_randint', got {kind!r}")


# ------------------------------------------------------------------------------------------------- dataset and batches


class PixelSequenceDataset(Dataset[tuple[Tensor, Tensor]]):
    """MNIST images kept as uint8 pixel sequences.

    Args:
        pixels: uint8 (N, 784), scanline order.
        labels: int64 (N,).

    An item is ``(pixels (784,) uint8, label () int64)``. DataLoaders fetch a whole batch with one gather through
    ``__getitems__`` (uint8 (B, 784), int64 (B,)); :class:`PixelSequenceCollate` turns that into model inputs.
    """

    def __init__(self, pixels: Tensor, labels: Tensor) -> None:
        if pixels.dtype != torch.uint8 or pixels.dim() != 2 or labels.shape != pixels.shape[:1]:
            raise ValueError(
                f"expected uint8 pixels (N, T) and labels (N,), got {pixels.dtype} {tuple(pixels.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.pixels = pixels
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.pixels[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.pixels[index], self.labels[index]  # (B, 784) uint8, (B,) int64


class PixelSequenceCollate:
    """Batch of uint8 pixel rows -> ``(inputs, targets)``: float32 (B, 784, 1) in [0, 1] (x / 255), int64 (B,).

    With ``permutation`` (int64 (784,)), input step t is pixel ``permutation[t]``. The tensor is read at every call,
    not copied, so an in-place update (``PermutedMNIST.load_state_dict``) reaches loaders that already exist.
    """

    def __init__(self, permutation: Tensor | None = None) -> None:
        self.permutation = permutation

    def __call__(self, batch: tuple[Tensor, Tensor] | list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if isinstance(batch, list):  # items fetched one by one: a wrapper dataset without __getitems__
            pixels, labels = torch.stack([item[0] for item in batch]), torch.stack([item[1] for item in batch])
        else:
            pixels, labels = batch  # (B, 784) uint8, (B,) int64
        if self.permutation is not None:
            pixels = pixels[:, self.permutation]  # (B, 784), still uint8: permute before the 4x larger float copy
        inputs = pixels.to(torch.float32).div_(255.0).unsqueeze_(-1)  # (B, 784, 1)
        return inputs, labels


# ------------------------------------------------------------------------------------------------------- DataModules


class SequentialMNIST(SequenceDataModule):
    """Sequential MNIST: each image is a sequence of 784 pixels in scanline order, one feature per step.

    Batches are ``(inputs, targets)``: float32 (B, 784, 1) in [0, 1], int64 (B,). Splits: train = the first
    ``60000 - val_size`` training images, val = the last ``val_size``, test (and predict) = the official 10,000.

    Args:
        data_dir: folder holding the four original IDX gzip files (``MNIST_FILES``); every file's md5 is checked.
        download: in ``prepare_data``, download files that are missing or fail the md5 check from ``mirrors``.
        batch_size: examples per batch (the paper uses 100).
        num_workers: DataLoader worker processes.
        val_size: images held out from the end of the training file for validation (paper: 10,000).
        limit_train: keep only the first N training examples (quick debug runs); None keeps all, and so does a
            limit above the split size.
        limit_val: keep only the first N validation examples.
        limit_test: keep only the first N test examples (test and predict).
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        seed: seeds the training-set shuffle; each ``train_dataloader()`` call starts from this seed.
    """

    mirrors: tuple[str, ...] = MNIST_MIRRORS  # a subclass may point elsewhere (the tests use a file:// mirror)

    def __init__(
        self,
        data_dir: str = "data/mnist",
        download: bool = False,
        batch_size: int = 100,
        num_workers: int = 0,
        val_size: int = 10_000,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("val_size", val_size, 1)
        if val_size >= _NUM_TRAIN_FILE:
            raise ValueError(f"val_size (data.init_args.val_size) must be < {_NUM_TRAIN_FILE}, got {val_size}")
        for name, limit in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            check_int(name, limit, 1, optional=True)
        check_int("seed", seed, 0)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.limit_train, self.limit_val, self.limit_test = limit_train, limit_val, limit_test
        self.pin_memory = pin_memory
        self.seed = seed
        self.train_set: PixelSequenceDataset | None = None
        self.val_set: PixelSequenceDataset | None = None
        self.test_set: PixelSequenceDataset | None = None
        self._files_verified = False

    @property
    def input_size(self) -> int:
        return 1

    @property
    def output_size(self) -> int:
        return _NUM_CLASSES

    @property
    def max_steps(self) -> int:
        return _NUM_PIXELS

    def prepare_data(self) -> None:
        """With ``download=True``: fetch each file that is missing or fails its md5 check (Lightning: rank 0 only)."""
        if not self.download:
            return
        for name, md5 in MNIST_FILES.items():
            path = self.data_dir / name
            if check_file(path, md5):
                continue
            if path.exists():
                log.warning("%s does not have the expected md5 %s; downloading it again", path, md5)
            download_url([mirror.rstrip("/") + "/" + name for mirror in self.mirrors], path, md5)

    def setup(self, stage: str | None = None) -> None:
        """Verify all four files (first call), then load the splits ``stage`` needs; later calls reuse them."""
        if not self._files_verified:
            # All four at once, also before a fit: a corrupt test file should not surface only after training.
            self._verify_files()
            self._files_verified = True
        if stage in (None, "fit", "validate") and self.train_set is None:
            pixels, labels = load_idx_pair(*(self.data_dir / name for name in _TRAIN_FILES))  # (60000, 784), (60000,)
            n_train = len(labels) - self.val_size
            self.train_set = PixelSequenceDataset(
                pixels[:n_train][: self.limit_train], labels[:n_train][: self.limit_train]
            )
            self.val_set = PixelSequenceDataset(pixels[n_train:][: self.limit_val], labels[n_train:][: self.limit_val])
        if stage in (None, "test", "predict") and self.test_set is None:
            pixels, labels = load_idx_pair(*(self.data_dir / name for name in _TEST_FILES))  # (10000, 784), (10000,)
            self.test_set = PixelSequenceDataset(pixels[: self.limit_test], labels[: self.limit_test])

    def _verify_files(self) -> None:
        missing = [name for name in MNIST_FILES if not (self.data_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(missing)} of the {len(MNIST_FILES)} MNIST files are missing in "
                f"{self.data_dir.resolve()}: {', '.join(missing)}. Put the original IDX gzip files there, or set "
                "data.init_args.download=true (download=True) to download them."
            )
        for name, expected in MNIST_FILES.items():
            path = self.data_dir / name
            actual = file_md5(path)
            if actual != expected:
                raise RuntimeError(
                    f"{path} is corrupt or incomplete: its md5 is {actual}, expected {expected}. Delete it and put "
                    "the original file there, or set data.init_args.download=true (download=True) to download it "
                    "again (the bad copy is replaced)."
                )

    def _pixel_order(self) -> Tensor | None:
        """Order of the pixels fed to the model (int64 (784,)), or None for the plain scanline; see PermutedMNIST."""
        return None

    def _loader(self, dataset: PixelSequenceDataset | None, stage: str, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: data not loaded; call setup({stage!r}) first")
        sampler = None
        if shuffle:  # training: the order of epoch e from (seed, e), resumable mid-epoch
            sampler = EpochShuffle(len(dataset), self.seed)
            self.prepare_train_sampler(sampler, self.batch_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=shuffle,  # training: no small tail batch (batch statistics need >= 2 sequences, and get noisy)
            generator=loader_generator(self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=PixelSequenceCollate(self._pixel_order()),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "fit", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "fit")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "predict")


class PermutedMNIST(SequentialMNIST):
    """Permuted MNIST: sequential MNIST with the pixels of every image fed in one fixed order (``self.permutation``).

    Args:
        permutation: ``"randperm"`` (default) draws a true permutation of the 784 pixels from ``permutation_seed``.
            ``"paper_randint"`` uses the index vector of the authors' Theano code,
            ``numpy.random.RandomState(1).randint(0, 784, 784)``, which is drawn *with replacement*: only 501 distinct
            pixels are ever shown and 283 never are. It ignores ``permutation_seed`` (which must stay 0). Use it only
            for number parity with the paper.
        permutation_seed: seed of the ``"randperm"`` permutation.
        **kwargs: the arguments of :class:`SequentialMNIST`.

    The permutation is part of the DataModule's ``state_dict`` and so of every Lightning checkpoint; on resume or test
    from a checkpoint the saved one replaces the one built from the arguments. It is applied per batch, by the collate
    function, so restoring it after ``setup`` (as Lightning does) takes effect.
    """

    def __init__(
        self,
        *,
        permutation: Literal["randperm", "paper_randint"] = "randperm",
        permutation_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if permutation not in ("randperm", "paper_randint"):
            raise ValueError(
                f"permutation (data.init_args.permutation) must be 'randperm' or 'paper_randint', got {permutation!r}"
            )
        check_int("permutation_seed", permutation_seed, 0)
        if permutation == "paper_randint" and permutation_seed != 0:
            raise ValueError(
                "permutation_seed (data.init_args.permutation_seed) has no effect with permutation='paper_randint' "
                f"(a fixed index vector from RandomState(1)); got {permutation_seed}. Leave it at 0, or use "
                "permutation='randperm'."
            )
        super().__init__(**kwargs)
        self.permutation_kind = permutation
        self.permutation_seed = permutation_seed
        self._permutation = mnist_permutation(permutation, permutation_seed)  # (784,) int64

    @property
    def permutation(self) -> Tensor:
        """int64 (784,): input step t is pixel ``permutation[t]`` of the scanline."""
        return self._permutation

    def _pixel_order(self) -> Tensor:
        return self._permutation

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "permutation": self._permutation.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the permutation saved with a run (validated: int tensor of 784 indices in 0-783)."""
        super().load_state_dict(state_dict)
        restored = state_dict.get("permutation")
        if not isinstance(restored, Tensor):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: no 'permutation' tensor in the state (keys: "
                f"{sorted(state_dict)}); the checkpoint was not written by a {type(self).__name__} DataModule"
            )
        if restored.dtype.is_floating_point or restored.dtype.is_complex or restored.dtype == torch.bool:
            raise ValueError(f"restored permutation must hold integer indices, got dtype {restored.dtype}")
        if restored.shape != (_NUM_PIXELS,):
            raise ValueError(f"restored permutation must have shape ({_NUM_PIXELS},), got {tuple(restored.shape)}")
        low, high = int(restored.min()), int(restored.max())
        if low < 0 or high >= _NUM_PIXELS:
            raise ValueError(f"restored permutation has indices in [{low}, {high}], outside [0, {_NUM_PIXELS - 1}]")
        if not torch.equal(restored.cpu().long(), self._permutation):
            rank_zero_warn(
                f"{type(self).__name__}: using the pixel permutation saved in the checkpoint; it differs from the one "
                f"permutation={self.permutation_kind!r}, permutation_seed={self.permutation_seed} would give."
            )
        # In place, not rebinding: collate functions of loaders created before this call hold this very tensor.
        self._permutation.copy_(restored)
