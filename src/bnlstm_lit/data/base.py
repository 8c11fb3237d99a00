"""The contract every bnlstm_lit DataModule follows.

A DataModule exposes, as properties available right after ``__init__`` (before ``setup``), the sizes the model needs:

* ``input_size``  -- features per time step (C of the (B, T, C) inputs);
* ``output_size`` -- number of classes (classification) or of regression targets;
* ``max_steps``   -- the longest training sequence, i.e. how many per-time-step statistics the BN-LSTM keeps.

The CLI links them into the model (``link_arguments(..., apply_on="instantiate")``), so no YAML repeats them.
Batches are tuples ``(inputs, targets)`` with ``inputs`` float (B, T, C), batch first.

Exact resume: the training order of epoch e is a function of (seed, e) alone (:class:`EpochShuffle`), and the
DataModule's ``state_dict`` records how many batches of the current epoch the run had consumed, so a run resumed
from a mid-epoch checkpoint reads the rest of that epoch in the same order (one process; see
:meth:`SequenceDataModule.prepare_train_sampler`). Loaders get their own generator, so creating their iterators never
draws from the global random state the model's noise comes from.

Evaluation under DDP: the validation and test loaders a subclass returns are shared out over the processes without
repeats (:meth:`SequenceDataModule.shard_evaluation`), so every example is evaluated exactly once and the metrics equal
a one-process run's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from functools import wraps
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, Sampler

from bnlstm_lit.console import info
from bnlstm_lit.data.samplers import EvaluationShard

#: the loader hooks whose loaders :meth:`SequenceDataModule.shard_evaluation` shares out under DDP
EVALUATION_HOOKS = ("val_dataloader", "test_dataloader")


class ResumableSampler(Protocol):
    """A training sampler whose order depends only on (seed, epoch) and that can start part-way into an epoch."""

    def set_epoch(self, epoch: int) -> None: ...

    def skip(self, count: int) -> None: ...


class EpochPosition:
    """The bookkeeping of a :class:`ResumableSampler`: the epoch (from ``set_epoch``), the generator of the epoch's
    order, seeded with (seed, epoch), and a one-time start offset (from ``skip``) for a run resumed mid-epoch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        self._skip = count

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The generator every random choice of ``epoch``'s order is drawn from."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def take_start(self) -> int:
        """Where this iteration starts in the epoch's order (the skip applies once)."""
        start, self._skip = self._skip, 0
        return start


class EpochShuffle(EpochPosition, Sampler[int]):
    """A fresh random order of ``range(size)`` every epoch, drawn from a generator seeded with (seed, epoch).

    :meth:`skip` makes the next iteration start ``count`` indices into the epoch's order (once), for a run resumed
    mid-epoch; ``len`` stays the epoch's length, as Lightning expects of a resumed loader.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=self.epoch_generator(self.epoch))
        yield from order[self.take_start() :].tolist()


def loader_generator(seed: int) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from (not the global random state)."""
    return torch.Generator().manual_seed(seed)


class SequenceDataModule(L.LightningDataModule, ABC):
    """Base class of the sequence DataModules; subclasses say where the data comes from and how it splits.

    ``state_dict`` holds the training position (epoch, batches consumed in it); subclasses that keep state of their
    own extend ``state_dict`` / ``load_state_dict`` and call the base's.

    The ``val_dataloader`` and ``test_dataloader`` a subclass defines return their loaders as for one process; the
    base passes what they return through :meth:`shard_evaluation` (it wraps the two hooks of every subclass).
    """

    _resume_position: dict[str, int] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in EVALUATION_HOOKS:
            hook = cls.__dict__.get(name)
            if callable(hook):
                setattr(cls, name, _sharding(hook))

    # ---- evaluation under DDP ------------------------------------------------------------------------------------
    def shard_evaluation(self, loaders: Any) -> Any:
        """Evaluation loaders (one, or a list / tuple / dict of them) as this process's unpadded share under DDP.

        Lightning would give each process a DistributedSampler that pads the shares to equal length by repeating
        examples; instead a DataLoader gets an :class:`~bnlstm_lit.data.samplers.EvaluationShard` of its sampler's
        order (whole one-process batches, each example on exactly one process), which Lightning keeps. Left as they
        are: one process; ``trainer.use_distributed_sampler=false`` (the loaders are then the user's business);
        iterable datasets (they shard themselves, like the stateful streams); loaders that already have a
        DistributedSampler or a batch sampler of their own; DataLoader subclasses (with a warning: Lightning pads).
        """
        if isinstance(loaders, DataLoader):
            return self._shard_loader(loaders)
        if isinstance(loaders, (list, tuple)):
            return type(loaders)(self.shard_evaluation(loader) for loader in loaders)
        if isinstance(loaders, Mapping):
            return {key: self.shard_evaluation(loader) for key, loader in loaders.items()}
        return loaders

    def _shard_loader(self, loader: DataLoader) -> DataLoader:
        trainer = self.trainer
        if trainer is None or trainer.world_size < 2:
            return loader
        if isinstance(loader.dataset, IterableDataset) or isinstance(loader.sampler, DistributedSampler):
            return loader  # shards itself (the stateful streams, the full-sequence protocol) or is sharded already
        settings = getattr(trainer, "distributed_sampler_kwargs", None)
        # Lightning 2.6 keeps the Trainer's use_distributed_sampler on its accelerator connector only
        connector = getattr(trainer, "_accelerator_connector", None)
        if settings is None or not getattr(connector, "use_distributed_sampler", True):
            return loader
        if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
            return loader
        if type(loader) is not DataLoader:
            rank_zero_warn(
                f"{type(self).__name__}: an evaluation loader of type {type(loader).__name__} is not shared out "
                "without repeats; under DDP Lightning's DistributedSampler may evaluate some examples twice"
            )
            return loader
        shard = EvaluationShard(loader.sampler, loader.batch_size, settings["num_replicas"], settings["rank"])
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=shard,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
            pin_memory_device=loader.pin_memory_device,
            in_order=loader.in_order,
        )

    # ---- exact resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        position = self._train_position()
        return {} if position is None else {"train_position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("train_position")
        self._resume_position = dict(position) if isinstance(position, dict) else None

    def _train_position(self) -> dict[str, int] | None:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return None
        epoch_batches = trainer.num_training_batches
        return {
            "epoch": int(trainer.current_epoch),
            "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),  # fetched and run
            "epoch_batches": int(epoch_batches) if epoch_batches != float("inf") else -1,
        }

    def prepare_train_sampler(self, sampler: ResumableSampler, batch_size: int) -> None:
        """Set a training sampler to the trainer's epoch, and after a restore from a mid-epoch checkpoint, skip the
        examples the run had already consumed in that epoch (``fit`` in one process; under DDP Lightning shards the
        sampler's order itself and the epoch restarts, with Lightning's warning)."""
        trainer = self.trainer
        fitting = trainer is not None and trainer.state.fn == "fit"
        sampler.set_epoch(int(trainer.current_epoch) if fitting and trainer is not None else 0)
        if not fitting or trainer is None:
            return
        position, self._resume_position = self._resume_position, None
        if not position or position.get("epoch") != trainer.current_epoch:
            return
        batches, epoch_batches = int(position.get("batches", 0)), int(position.get("epoch_batches", -1))
        if batches <= 0 or (epoch_batches >= 0 and batches >= epoch_batches):
            return
        if trainer.world_size > 1:
            rank_zero_warn(f"resuming mid-epoch under DDP: epoch {trainer.current_epoch} restarts from its beginning")
            return
        sampler.skip(batches * batch_size)
        info(
            f"[bnlstm_lit] resuming epoch {trainer.current_epoch} after its first {batches} training batches, in the "
            "same order"
        )

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Features per time step."""

    @property
    @abstractmethod
    def output_size(self) -> int:
        """Number of classes or regression targets."""

    @property
    @abstractmethod
    def max_steps(self) -> int:
        """Length of the longest training sequence (number of per-step statistics the BN-LSTM keeps)."""


def _sharding(hook: Callable[[SequenceDataModule], Any]) -> Callable[[SequenceDataModule], Any]:
    """A subclass's evaluation loader hook, its loaders passed through :meth:`SequenceDataModule.shard_evaluation`
    (``functools.wraps`` keeps Lightning's ``is_overridden`` reading the subclass's own hook)."""

    @wraps(hook)
    def sharded(self: SequenceDataModule) -> Any:
        return self.shard_evaluation(hook(self))

    return sharded


def check_int(name: str, value: int | None, minimum: int, optional: bool = False) -> None:
    """Raise a ValueError naming ``data.init_args.<name>`` unless ``value`` is an integer >= ``minimum`` (or None when
    ``optional``); bools are refused."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} (data.init_args.{name}) must be {expected}, got {value!r}")
