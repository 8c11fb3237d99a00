"""The paper's test protocol as a callback: population statistics estimated over the training set before evaluating."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import IterableDataset

from bnlstm_lit.console import info
from bnlstm_lit.nn import batchnorm_sites, estimate_population_statistics


class PopulationStatistics(Callback):
    """Before validation / test / predict, set every BN site's population statistics to the plain average of the
    per-step batch statistics over one pass of the training set (Cooijmans et al. 2017, §4), with no gradient and no
    parameter update (:func:`~bnlstm_lit.nn.estimate_population_statistics`).

    Without this callback, evaluation uses the running averages kept during training (the paper uses those only
    for monitoring). The LightningModule may define ``statistics_forward(batch)`` to say how a training batch runs
    through the network; by default ``batch[0]`` is passed to the module.

    Under DDP each process runs its share of the training batches (batch i goes to rank i mod world size; an
    IterableDataset, which shards itself by rank as Lightning expects, is read as it comes) and the per-process
    averages are combined into the average over all batches read, identical on every process.

    SIGTERM (preemption) stops the pass before its next batch, as Lightning's own loops stop after their current
    one: the statistics are left as they were and Lightning's SIGTERM exception ends the run.

    Args:
        before_validation: estimate before every validation run (the sanity check excluded). Costs a pass over the
            training set each time; by default validation during training monitors with the running averages.
        before_test: estimate before test (the published numbers use this).
        before_predict: estimate before predict.
        max_batches: use at most this many training batches. None: one training epoch -- the whole training set
            (the paper). ``trainer.limit_train_batches`` bounds the pass in either case.
        validation_max_batches: a separate, usually smaller, bound for the passes before validation during fit
            (checkpoint selection needs sound statistics, not the full protocol every epoch); None: max_batches.
    """

    def __init__(
        self,
        before_validation: bool = False,
        before_test: bool = True,
        before_predict: bool = True,
        max_batches: int | None = None,
        validation_max_batches: int | None = None,
    ) -> None:
        for name, value in (("max_batches", max_batches), ("validation_max_batches", validation_max_batches)):
            if value is not None and value < 1:
                raise ValueError(f"PopulationStatistics: {name} must be positive or null, got {value}")
        self.before_validation = before_validation
        self.before_test = before_test
        self.before_predict = before_predict
        self.max_batches = max_batches
        self.validation_max_batches = validation_max_batches

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before_validation and not trainer.sanity_checking:
            if getattr(pl_module, "eval_statistics", "population") == "batch" and batchnorm_sites(pl_module):
                # model.init_args.eval_statistics=batch: validation would not read the estimate. (Test and predict
                # still estimate: their batch-1 protocols fall back to population statistics.)
                info("[bnlstm_lit] validation uses batch statistics: population statistics not estimated")
                return
            bound = self.validation_max_batches if trainer.state.fn == "fit" else None
            self.estimate(trainer, pl_module, bound or self.max_batches)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before_test:
            self.estimate(trainer, pl_module, self.max_batches)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before_predict:
            self.estimate(trainer, pl_module, self.max_batches)

    def estimate(self, trainer: L.Trainer, pl_module: L.LightningModule, max_batches: int | None = None) -> int:
        """Run the estimation now over at most ``max_batches`` training batches; returns the number used."""
        if not batchnorm_sites(pl_module):
            return 0  # the LSTM baseline has nothing to estimate
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError(
                "PopulationStatistics needs the training data: run with a LightningDataModule (the CLI's data:) "
                "so that its train_dataloader() can be read"
            )
        datamodule.setup("fit")  # our DataModules' setup is idempotent; test/predict runs may not have loaded train
        loader = datamodule.train_dataloader()
        statistics_forward = getattr(pl_module, "statistics_forward", None)

        def forward(module: Any, batch: Any) -> None:
            batch = trainer.strategy.batch_to_device(batch)  # runs the transfer hooks like the training loop does
            if statistics_forward is not None:
                statistics_forward(batch)
            else:
                module(batch[0])

        limit = trainer.limit_train_batches  # an epoch as the trainer defines it also bounds the pass
        if isinstance(limit, int):
            max_batches = limit if max_batches is None else min(max_batches, limit)
        elif limit is not None and limit < 1.0:
            limited = int(limit * len(loader))
            max_batches = limited if max_batches is None else min(max_batches, limited)
        if max_batches is not None and max_batches < 1:
            raise ValueError(
                f"PopulationStatistics would estimate over {max_batches} training batches: "
                f"trainer.limit_train_batches={limit} leaves none. Raise trainer.limit_train_batches, or drop the "
                "PopulationStatistics callback to evaluate with the running averages"
            )
        start = time.perf_counter()
        world, rank = trainer.world_size, trainer.global_rank
        batches: Iterable[Any] = loader
        if world > 1 and not isinstance(loader.dataset, IterableDataset):
            batches = itertools.islice(loader, rank, max_batches, world)  # this rank's share of the first max_batches
            max_batches = None
        batches = _until_sigterm(trainer, batches)
        used = estimate_population_statistics(
            pl_module, batches, forward=forward, max_batches=max_batches, distributed=world > 1
        )
        where = f" on rank {rank} of {world} (combined over all ranks)" if world > 1 else ""
        info(
            f"[bnlstm_lit] population statistics estimated over {used} training batches{where} "
            f"in {time.perf_counter() - start:.1f}s"
        )
        return used


def _until_sigterm(trainer: L.Trainer, batches: Iterable[Any]) -> Iterator[Any]:
    """``batches`` until Lightning's SIGTERM handler has set ``trainer.received_sigterm``; then Lightning's
    SIGTERMException, which the estimation passes on after restoring the statistics it had reset."""
    for batch in batches:
        if trainer.received_sigterm:
            raise SIGTERMException
        yield batch
