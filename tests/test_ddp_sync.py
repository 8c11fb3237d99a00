"""Synchronized recurrent statistics under DDP (real processes, CPU ``gloo``).

* ``sync_statistics``: a 2-process run with batch B/2 per process gives the losses and parameters of a 1-process
  run with batch B (and without it, it does not); population statistics estimated with each process reading its
  share of the batches equal the one-process estimate, on every process.
* the masked, all-reduced statistics equal the statistics of the concatenated batch, in value and gradient.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnlstm_lit.nn import SequenceBatchNorm, set_sync_statistics

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "sync_probe.py"


def probe(out: Path, devices: int, sync: bool, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    cmd = [sys.executable, str(PROBE), str(out), str(devices), "1" if sync else "0", str(batch)]
    done = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("sync")
    return {
        "one": probe(root / "one.pt", 1, False, 8),
        "synced": probe(root / "synced.pt", 2, True, 4),
        "local": probe(root / "local.pt", 2, False, 4),
        "synced_rank1": torch.load(root / "synced.pt.rank1", weights_only=True),
        "synced_rank0": torch.load(root / "synced.pt.rank0", weights_only=True),
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_processes_with_synced_statistics_equal_one_process_with_the_whole_batch(runs: dict) -> None:
    one, synced = runs["one"], runs["synced"]
    assert len(one["losses"]) == len(synced["losses"]) == 3
    torch.testing.assert_close(torch.tensor(synced["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    # parameters and running statistics after 3 SGD steps
    assert max_difference(synced["state_dict"], one["state_dict"]) < 1e-5


def test_without_sync_each_process_normalizes_its_own_batch(runs: dict) -> None:
    """The control: per-process statistics give other numbers (so the test above can fail)."""
    one, local = runs["one"], runs["local"]
    assert abs(local["losses"][0] - one["losses"][0]) > 1e-4  # the very first forward already differs
    assert max_difference(local["state_dict"], one["state_dict"]) > 1e-2


def test_synced_running_statistics_are_global_on_every_process(runs: dict) -> None:
    rank0, rank1 = runs["synced_rank0"]["state_dict"], runs["synced_rank1"]["state_dict"]
    assert max_difference(rank0, rank1) == 0.0
    running = {k: v for k, v in runs["one"]["state_dict"].items() if "running" in k}
    assert max_difference({k: rank1[k] for k in running}, running) < 1e-5


def test_population_estimate_over_shards_is_the_global_average_on_every_process(runs: dict) -> None:
    """Each rank estimated over 3 of 6 fixed batches; combined, both hold the 1-process estimate over all 6."""
    rank0, rank1 = runs["synced_rank0"], runs["synced_rank1"]
    assert rank0["used"] == rank1["used"] == 3
    assert max_difference(rank0["estimates"], rank1["estimates"]) == 0.0  # estimation runs outside DDP
    assert max_difference(rank0["estimates"], runs["one"]["estimates"]) < 1e-5
    counts = [v for k, v in rank0["estimates"].items() if k.endswith("num_batches_tracked")]
    assert counts and all(bool((c == 6).all()) for c in counts)  # 6 batches in all, not 3


# ---- the all-reduced statistics themselves, with padding, in two gloo processes ----------------------------------
T, B, C = 5, 3, 4


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch (T, 2B, C), its mask (lengths), and an upstream gradient."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(T, 2 * B, C, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 2, 5, 1])  # step 3+: few real sequences; step 4: two, both on rank 0
    mask = torch.arange(T)[:, None] < lengths[None, :]
    upstream = torch.randn(T, 2 * B, C, generator=generator, dtype=torch.float64)
    return x, mask, upstream


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, mask, upstream = _inputs()
        rows = slice(rank * B, (rank + 1) * B)
        bn = SequenceBatchNorm(C, T, momentum=None).double()
        set_sync_statistics(bn, True)
        xr = x[:, rows].clone().requires_grad_(True)
        y = bn(xr, 0, mask[:, rows])
        (y * upstream[:, rows]).sum().backward()
        torch.save(
            {"y": y.detach(), "grad": xr.grad, "state": bn.state_dict(), "syncing": bn.syncing()}, f"{out}{rank}"
        )
        dist.barrier()  # both ranks done
    finally:
        dist.destroy_process_group()
    # torch 2.13 + gloo: a finished process now and then aborts in C++ teardown at interpreter exit ("terminate
    # called without an active exception"); everything is saved by now, so leave without running the destructors
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_masked_synced_statistics_equal_the_concatenated_batch(tmp_path: Path) -> None:
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    parts = [torch.load(f"{out}{r}", weights_only=True) for r in range(2)]
    assert all(p["syncing"] for p in parts)

    x, mask, upstream = _inputs()
    reference = SequenceBatchNorm(C, T, momentum=None).double()  # one process, the whole batch
    assert not reference.syncing()
    xg = x.clone().requires_grad_(True)
    y = reference(xg, 0, mask)
    (y * upstream).sum().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts], dim=1), y.detach())
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts], dim=1), xg.grad)
    for p in parts:  # running statistics (and the < 2 real sequences rule) are the global ones on both ranks
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(p["state"][name], value)
