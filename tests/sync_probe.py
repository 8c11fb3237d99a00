"""A multi-process probe for synchronized recurrent statistics (``sync_statistics``), run as a script:

    python tests/sync_probe.py OUT DEVICES SYNC PER_RANK_BATCH [STEPS]

Fits a small BN-LSTM regression on a fixed adding-problem sample, in order: rank r reads the examples r, r + W, ...
(``RankStrided``; Lightning's DistributedSampler shuffles the training set), so the ranks' batches together are
exactly the one-process batch of W times the size. Lightning's DDP launcher re-runs this script for the other
ranks. Then estimates population statistics over a fixed list of batches, each rank over its share, combined.
Rank 0 saves the per-step global losses, its final state dict and the estimates to OUT; every rank saves its own
state dict and estimates to OUT.rank<r>.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, TensorDataset

from bnlstm_lit.data.adding import adding_problem
from bnlstm_lit.nn import BNLSTMSettings, estimate_population_statistics
from bnlstm_lit.tasks import SequenceRegression

T, H, N = 12, 6, 64


class RankStrided(Sampler[int]):
    """Examples r, r + W, r + 2W, ... for rank r of W, in order (rank and W read when iterated, after DDP setup)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _rank_world(self) -> tuple[int, int]:
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self) -> Any:
        rank, world = self._rank_world()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        return self.size // self._rank_world()[1]


class LossRecorder(L.Callback):
    """The loss of every step, averaged over ranks (each rank's loss is the mean over its equal share)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"].detach() if isinstance(outputs, dict) else outputs.detach()
        self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))


def main(out: str, devices: int, sync: bool, batch_size: int, steps: int) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    inputs, targets = adding_problem(N, T, torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, sampler=RankStrided(N))
    model = SequenceRegression(
        2, 1, T, rnn=BNLSTMSettings(hidden_size=H, sync_statistics=sync, momentum=None),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )  # fmt: skip
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder], num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model, loader)
    rank, world = trainer.global_rank, trainer.world_size
    # the estimation protocol: 6 fixed batches of 4, rank r reads batches r, r + W, ...
    batches = [inputs[i : i + 4] for i in range(0, 24, 4)]
    used = estimate_population_statistics(model, batches[rank::world], distributed=world > 1)
    estimates = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    torch.save({"state_dict": model.state_dict(), "estimates": estimates, "used": used}, f"{out}.rank{rank}")
    if rank == 0:
        torch.save({"losses": recorder.losses, "state_dict": model.state_dict(), "estimates": estimates}, out)
    if dist.is_initialized():
        dist.barrier()  # both ranks done
    # torch 2.13 + gloo: a finished process now and then aborts in C++ teardown at interpreter exit ("terminate
    # called without an active exception"); everything is saved by now, so leave without running the destructors
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out, devices, sync, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    main(out, devices, sync, batch, int(sys.argv[5]) if len(sys.argv) > 5 else 3)
