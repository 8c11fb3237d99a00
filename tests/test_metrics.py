"""BitsPerCharacter: the value by hand, token weighting across updates, shape checks, and DDP (gloo, 2 processes)."""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnlstm_lit.metrics import BitsPerCharacter

# ---------------------------------------------------------------------------------------------------------------------
# the value by hand


def test_uniform_logits_give_log2_of_the_vocabulary() -> None:
    """Equal logits over 4 classes: every symbol costs exactly log2(4) = 2 bits, whatever the targets."""
    metric = BitsPerCharacter()
    logits = torch.full((2, 3, 4), 0.7)  # (B, T, V)
    targets = torch.tensor([[0, 1, 2], [3, 3, 0]])
    metric.update(logits, targets)
    torch.testing.assert_close(metric.compute(), torch.tensor(2.0), rtol=1e-7, atol=0.0)
    assert metric.compute().dtype == torch.float32


def test_two_class_case_by_hand() -> None:
    """Logits [0, ln 3] give p = (1/4, 3/4): target 0 costs log2 4 = 2 bits, target 1 costs log2(4/3) bits."""
    metric = BitsPerCharacter()
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3, dtype=torch.float64)  # (3, 2)
    targets = torch.tensor([0, 1, 1])
    metric.update(logits, targets)
    expected = (2.0 + 2 * math.log2(4.0 / 3.0)) / 3
    torch.testing.assert_close(metric.compute(), torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0.0)
    # the state: nats in float64 (summed), symbols counted
    assert metric.nats.dtype == torch.float64
    torch.testing.assert_close(metric.nats, torch.tensor(expected * 3 * math.log(2.0), dtype=torch.float64))
    assert int(metric.count) == 3


def test_updates_are_token_weighted_not_batch_weighted() -> None:
    """1 token at 2 bits, then 3 tokens at log2(4/3) bits: the mean over the 4 tokens, not of the 2 batch means."""
    metric = BitsPerCharacter()
    logits = torch.tensor([0.0, math.log(3.0)])
    metric.update(logits[None], torch.tensor([0]))  # one token, 2 bits
    metric.update(logits.expand(3, 2), torch.tensor([1, 1, 1]))  # three tokens, log2(4/3) bits each
    low = math.log2(4.0 / 3.0)
    token_mean = (2.0 + 3 * low) / 4
    batch_mean = (2.0 + low) / 2
    value = float(metric.compute())
    assert value == pytest.approx(token_mean, rel=1e-6)
    assert value != pytest.approx(batch_mean, rel=1e-2)
    assert int(metric.count) == 4


def test_value_does_not_depend_on_the_batching() -> None:
    """The same symbols fed as one (B, T, V) batch or as a (B*T, V) split into pieces give the same bpc."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g)
    targets = torch.randint(0, 7, (4, 5), generator=g)
    whole = BitsPerCharacter()
    whole.update(logits, targets)
    pieces = BitsPerCharacter()
    flat_logits, flat_targets = logits.reshape(20, 7), targets.reshape(20)
    for lo, hi in ((0, 1), (1, 9), (9, 20)):
        pieces.update(flat_logits[lo:hi], flat_targets[lo:hi])
    expected = torch.nn.functional.cross_entropy(flat_logits.double(), flat_targets, reduction="mean") / math.log(2)
    torch.testing.assert_close(whole.compute(), expected.float(), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(pieces.compute(), whole.compute(), rtol=1e-6, atol=0.0)


def test_reset_forgets_previous_updates() -> None:
    """After reset() the value is that of the new updates alone (a split's metric must not leak into the next)."""
    metric = BitsPerCharacter()
    metric.update(torch.tensor([[0.0, 5.0]]), torch.tensor([0]))
    metric.reset()
    metric.update(torch.zeros(2, 4), torch.tensor([1, 2]))
    torch.testing.assert_close(metric.compute(), torch.tensor(2.0), rtol=1e-7, atol=0.0)
    assert int(metric.count) == 2


@pytest.mark.parametrize(
    ("logits_shape", "targets_shape"),
    [((2, 3, 4), (2, 4)), ((2, 3, 4), (3, 2)), ((6, 4), (2, 3)), ((2, 3, 4), (2, 3, 4))],
)
def test_shape_mismatch_raises(logits_shape: tuple[int, ...], targets_shape: tuple[int, ...]) -> None:
    """Leading shapes of logits (..., V) and targets (...) must agree; a mismatch names both shapes."""
    metric = BitsPerCharacter()
    with pytest.raises(ValueError, match=r"must share their leading shape, got \(.*\) and \(.*\)"):
        metric.update(torch.zeros(logits_shape), torch.zeros(targets_shape, dtype=torch.long))
    assert int(metric.count) == 0  # nothing was accumulated


# ---------------------------------------------------------------------------------------------------------------------
# DDP: two real processes (gloo on CPU)

WORLD_SIZE = 2
#: Batches (B, T) of a fixed dataset; rank 0 reads the first three, rank 1 the last two (uneven shares and sizes).
BATCH_SHAPES = [(3, 5), (1, 7), (2, 2), (4, 3), (1, 1)]
RANK_BATCHES = {0: [0, 1, 2], 1: [3, 4]}
VOCAB = 6


def _dataset() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed dataset: (logits (B, T, V), targets (B, T)) per batch, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    return [
        (3 * torch.randn(*shape, VOCAB, generator=g), torch.randint(0, VOCAB, shape, generator=g))
        for shape in BATCH_SHAPES
    ]


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One DDP process (module level so that spawned children import it): update with its share, compute, save."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    try:
        data = _dataset()
        metric = BitsPerCharacter()
        for k in RANK_BATCHES[rank]:
            metric.update(*data[k])
        local_count = int(metric.count)
        value = metric.compute()  # synced over both processes
        result = {
            "value": value,
            "world_size": dist.get_world_size(),
            "local_count": local_count,
            "count_after": int(metric.count),  # compute() restores the local state after syncing
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_bpc_is_the_same_with_one_and_two_ddp_processes(tmp_path: Path) -> None:
    """Each of 2 gloo processes updates with an uneven share; compute() on each equals one process over all batches.

    Fails if the state were a per-process mean (batch- or rank-weighted) or not reduced across processes.
    """
    data = _dataset()
    single = BitsPerCharacter()
    for logits, targets in data:
        single.update(logits, targets)
    expected = single.compute()
    total = sum(b * t for b, t in BATCH_SHAPES)
    assert int(single.count) == total
    # the shares really differ: an unsynced value (a rank's own) or a rank-weighted mean would not match
    rank_means = []
    for ks in RANK_BATCHES.values():
        share = BitsPerCharacter()
        for k in ks:
            share.update(*data[k])
        rank_means.append(float(share.compute()))
    for value in (*rank_means, sum(rank_means) / 2):
        assert value != pytest.approx(float(expected), rel=1e-3)

    init_file = tmp_path / "ddp_init"
    ctx = mp.get_context("spawn")
    env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    old_env = {k: os.environ.get(k) for k in env}
    processes = [
        ctx.Process(target=_ddp_worker, args=(rank, str(init_file), str(tmp_path)), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    os.environ.update(env)  # inherited by the children
    try:
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=120)
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert [p.exitcode for p in processes] == [0] * WORLD_SIZE, "a DDP worker failed or timed out"

    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["world_size"] == WORLD_SIZE
        local = sum(BATCH_SHAPES[k][0] * BATCH_SHAPES[k][1] for k in RANK_BATCHES[rank])
        assert result["local_count"] == local
        assert result["count_after"] == local
        torch.testing.assert_close(result["value"], expected, rtol=1e-6, atol=0.0)


def test_weighted_mean_weights_by_count_and_keeps_nan() -> None:
    """Per-batch losses weighted by batch size: the mean over examples (torchmetrics' MeanMetric with
    nan_strategy="disable" gave the unweighted 2.0 here), and a NaN loss shows in the value."""
    from bnlstm_lit.metrics import WeightedMean

    mean = WeightedMean()
    mean.update(torch.tensor(1.0), 32)
    mean.update(torch.tensor(3.0), torch.tensor(20))
    assert mean.compute().item() == pytest.approx((32 * 1.0 + 20 * 3.0) / 52)
    assert not WeightedMean().state_dict()  # nothing in checkpoints
    mean.update(torch.tensor(float("nan")), 4)
    assert math.isnan(mean.compute().item())
