"""CharLanguageModel: stateful carrying, the full-test and sweep protocols by hand, training, sampling, errors."""

from __future__ import annotations

import copy
import math
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device

from bnlstm_lit.data.charlm import Protocol, SampleRequest, TextBatch
from bnlstm_lit.data.textfiles import TextFiles
from bnlstm_lit.models.language import CHAR_RNN_SETTINGS
from bnlstm_lit.nn import batchnorm_sites, set_eval_statistics
from bnlstm_lit.tasks import CharLanguageModel
from bnlstm_lit.tasks.language import SAMPLING_FLAGS, Sampling, protocol_metric_name
from quiet import quiet_trainer

pytestmark = [
    pytest.mark.usefixtures("in_tmp_path"),
    # TokenStream (full protocol, stateful mode) is an IterableDataset with __len__; it refuses > 1 worker itself
    pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined"),
]

TINY = CHAR_RNN_SETTINGS.replace(hidden_size=8)  # the task's defaults (momentum 0.05), a tiny network
ALPHABET = "\n abcd"  # sorted: the vocabulary TextFiles derives from a training file using all six symbols
TOL = {"rtol": 1e-5, "atol": 1e-6}


def tiny(seed: int = 0, **kwargs) -> CharLanguageModel:
    """A tiny model with non-trivial parameters and distinct random population statistics at every step."""
    torch.manual_seed(seed)
    args = {"input_size": 5, "output_size": 5, "max_steps": 6, "rnn": TINY}
    args.update(kwargs)
    model = CharLanguageModel(**args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("h0", "c0")) or ".bn_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.startswith("net.readout"):
                p.mul_(6.0)  # peaked predictions: the statistics used show in the bpc
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.3 + torch.rand(buf.shape, generator=g))
    return model


def tokens(n: int, vocab: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def write_corpus(folder: Path, sizes: tuple[int, int, int] = (2000, 400, 310), seed: int = 0) -> Path:
    """train/valid/test.txt of random characters from ALPHABET (each split uses all of them)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in zip(("train", "valid", "test"), sizes, strict=True):
        ids = torch.randint(0, len(ALPHABET), (n,), generator=g)
        ids[: len(ALPHABET)] = torch.arange(len(ALPHABET))
        (folder / f"{name}.txt").write_bytes("".join(ALPHABET[i] for i in ids.tolist()).encode())
    return folder


def corpus(tmp: Path, **kwargs) -> TextFiles:
    args = {"seq_length": 6, "batch_size": 4}
    args.update(kwargs)
    return TextFiles(str(write_corpus(tmp / "corpus")), **args)


def bpc_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum of the cross-entropy (nats) / count / ln 2, in float64."""
    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="sum")
    return (nats / targets.numel() / math.log(2)).float()


# ---------------------------------------------------------------------------------------------------------------------
# stateful carrying


def test_carried_batches_continue_the_previous_state() -> None:
    """Batch 0 (carry False) then batch 1 (carry True, start_step T1) give the logits of one pass over both.

    Population statistics (eval) make BN deterministic; fails if the state were not carried or not per stream.
    """
    model = tiny().eval()
    seq = tokens(3 * 9).reshape(3, 9)  # (B=3, 9)
    first = TextBatch(seq[:, :4], seq[:, 1:5])
    second = TextBatch(seq[:, 4:8], seq[:, 5:9], carry=True, start_step=4)
    logits0 = model._run(first, "train")
    model._run(TextBatch(seq[:2, :3], seq[:2, 1:4]), "val")  # another stream in between: must not interfere
    logits1 = model._run(second, "train")
    whole, (h, c) = model(seq[:, :8])
    torch.testing.assert_close(torch.cat([logits0, logits1], dim=1), whole, **TOL)
    stored_h, stored_c = model._states["train"]
    torch.testing.assert_close(stored_h, h, **TOL)
    torch.testing.assert_close(stored_c, c, **TOL)
    # stored detached: the next batch's graph does not reach back into this one
    assert whole.requires_grad and not stored_h.requires_grad and not stored_c.requires_grad
    assert stored_h.grad_fn is None and stored_c.grad_fn is None


def test_carried_batch_with_restarted_time_uses_its_own_start_step() -> None:
    """Stateful training restarts the time index every batch (start_step 0): state carried, statistics of rows 0…"""
    model = tiny().eval()
    seq = tokens(2 * 9).reshape(2, 9)
    model._run(TextBatch(seq[:, :4], seq[:, 1:5]), "train")
    state = model._states["train"]
    logits = model._run(TextBatch(seq[:, 4:8], seq[:, 5:9], carry=True, start_step=0), "train")
    expected, _ = model(seq[:, 4:8], state, 0)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    # and it differs from the continued time index (the statistics differ per step)
    continued, _ = model(seq[:, 4:8], state, 4)
    assert not torch.allclose(logits, continued)


def test_carry_without_stored_state_warns_and_starts_fresh() -> None:
    """A carry=True batch of a stream with no state (or a state of another batch size) warns and starts afresh."""
    model = tiny().eval()
    seq = tokens(2 * 6).reshape(2, 6)
    batch = TextBatch(seq[:, :5], seq[:, 1:6], carry=True, start_step=2)
    with pytest.warns(UserWarning, match=r"a train batch continues a stream whose state is unknown"):
        logits = model._run(batch, "train")
    expected, _ = model(seq[:, :5], None, 2)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    # a stored state for another number of streams cannot be continued either
    model._run(TextBatch(seq[:1, :5], seq[:1, 1:6]), "val")
    with pytest.warns(UserWarning, match=r"a val batch continues a stream whose state is unknown"):
        logits = model._run(TextBatch(seq[:, :5], seq[:, 1:6], carry=True), "val")
    torch.testing.assert_close(logits, model(seq[:, :5])[0], rtol=0, atol=0)


def test_training_step_carries_a_detached_state_and_backpropagates() -> None:
    """Two stateful training steps: the second's loss backpropagates (the carried state is a leaf, no old graph)."""
    model = tiny().train()
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer here
    seq = tokens(4 * 13).reshape(4, 13)
    model.training_step(TextBatch(seq[:, :6], seq[:, 1:7]), 0).backward()
    assert model.net.rnn.h0.grad is not None and model.net.rnn.h0.grad.abs().sum() > 0  # a fresh batch uses h0
    h, _ = model._states["train"]
    model.zero_grad(set_to_none=True)
    loss = model.training_step(TextBatch(seq[:, 6:12], seq[:, 7:13], carry=True), 1)
    loss.backward()  # a second backward through the first batch's graph would raise
    assert not h.requires_grad
    assert torch.isfinite(loss)
    assert int(model.train_bpc.count) == 2 * 4 * 6
    # the continued batch does not depend on the learned initial state: its gradient is exactly zero (not None,
    # so DDP sees every parameter used)
    rnn = model.net.rnn
    assert rnn.h0.grad is not None and rnn.c0.grad is not None
    assert torch.equal(rnn.h0.grad, torch.zeros_like(rnn.h0)) and torch.equal(rnn.c0.grad, torch.zeros_like(rnn.c0))
    assert model.net.readout.weight.grad is not None and model.net.readout.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# full-test protocol


@pytest.mark.parametrize("chunk", [7, 3, 1000])
def test_full_protocol_equals_one_pass_over_the_test_split(in_tmp_path: Path, chunk: int) -> None:
    """test/bpc_full equals the bpc of ONE forward over the whole test split (batch 1, population statistics).

    Chunks carry the state and the time index, so the chunk length must not change the value.
    """
    dm = corpus(in_tmp_path, test_protocol="full", full_chunk_length=chunk)
    model = tiny(input_size=dm.input_size, output_size=dm.output_size, max_steps=dm.max_steps)
    reference = copy.deepcopy(model).eval()
    trainer = quiet_trainer()
    trainer.test(model, datamodule=dm, verbose=False)
    assert set(trainer.callback_metrics) == {"test/bpc_full"}
    test = dm.splits["test"].long()
    with torch.no_grad():
        logits, _ = reference(test[None, :-1])
    expected = bpc_by_hand(logits, test[None, 1:])
    torch.testing.assert_close(trainer.callback_metrics["test/bpc_full"], expected, **TOL)
    # every symbol but the first was predicted once, and the metric was reset at the end of the epoch
    assert int(model.protocol_metrics["test_bpc_full"].count) == 0


def test_full_protocol_value_does_not_depend_on_the_number_of_processes(in_tmp_path: Path) -> None:
    """The loaders each rank of a 2-process run would read, run and summed as DDP sums the metric states, must give
    the single-process value (the metric is DDP-exact; the protocol must be too)."""
    dm = corpus(in_tmp_path, test_protocol="full", full_chunk_length=7)
    dm.setup("test")
    model = tiny(input_size=dm.input_size, output_size=dm.output_size, max_steps=dm.max_steps).eval()
    test = dm.splits["test"].long()
    with torch.no_grad():
        expected = bpc_by_hand(model(test[None, :-1])[0], test[None, 1:])
        nats, count = torch.zeros((), dtype=torch.float64), 0
        for rank in range(2):
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # what _rank_world reads under DDP
            for batch in dm.test_dataloader():
                assert batch.protocol == Protocol.full()
                logits = model._run(batch, f"test_full_rank{rank}")
                nats += F.cross_entropy(logits.flatten(0, 1).double(), batch.targets.flatten(), reduction="sum")
                count += batch.targets.numel()
    dm.trainer = None
    torch.testing.assert_close((nats / count / math.log(2)).float(), expected, **TOL)
    assert count == 2 * (len(test) - 1)  # one sequence is not shared out: each rank predicts every symbol but the first


def test_full_protocol_uses_population_statistics_even_when_evaluation_uses_batch() -> None:
    """Batch 1 has no batch statistics: the full protocol runs with population statistics whatever eval_statistics."""
    model = tiny(eval_statistics="batch").eval()
    set_eval_statistics(model, "batch")
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    seq = tokens(11)[None]
    model._evaluate(TextBatch(seq[:, :10], seq[:, 1:11], protocol=Protocol.full()), "test")
    metric = model.protocol_metrics["test_bpc_full"]
    set_eval_statistics(model, "population")
    expected = bpc_by_hand(model(seq[:, :10])[0], seq[:, 1:])
    torch.testing.assert_close(metric.compute(), expected.detach(), **TOL)
    # the task's own statistics are back afterwards
    assert {site.eval_statistics for site in batchnorm_sites(model)} == {"population"}  # set just above
    model._evaluate(TextBatch(seq[:, :10], seq[:, 1:11], protocol=Protocol.full()), "test")
    assert {site.eval_statistics for site in batchnorm_sites(model)} == {"batch"}


# ---------------------------------------------------------------------------------------------------------------------
# length sweep


def _sweep_by_hand(
    model: CharLanguageModel, test: torch.Tensor, L: int, batch_size: int, statistics: str, examples: int | None = None
):
    """bpc over the non-overlapping examples of length L (starts 0, L, 2L, …; the first ``examples`` of them, default
    all (N-1)//L), batched as the loader batches them."""
    n = (len(test) - 1) // L if examples is None else examples
    windows = torch.stack([test[s : s + L + 1] for s in range(0, n * L, L)])  # (n, L+1)
    set_eval_statistics(model, statistics)
    logits = torch.cat([model(w[:, :-1])[0] for w in windows.split(batch_size)])
    set_eval_statistics(model, "population")
    return bpc_by_hand(logits, windows[:, 1:]), n


def test_sweep_protocol_logs_population_and_batch_values(in_tmp_path: Path) -> None:
    """Names test/bpc_L{n}_{population,batch}, values by hand; the BN sites are back on population afterwards."""
    batch_size = 8
    dm = corpus(in_tmp_path, test_protocol="sweep", sweep_lengths=[4, 9], eval_batch_size=batch_size)
    model = tiny(input_size=dm.input_size, output_size=dm.output_size, max_steps=dm.max_steps)
    reference = copy.deepcopy(model).eval()
    trainer = quiet_trainer()
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    assert set(metrics) == {f"test/bpc_L{L}_{s}" for L in (4, 9) for s in ("population", "batch")}
    test = dm.splits["test"].long()
    with torch.no_grad():
        for L in (4, 9):
            population, n = _sweep_by_hand(reference, test, L, batch_size, "population")
            batch, _ = _sweep_by_hand(reference, test, L, batch_size, "batch")
            assert n % batch_size != 1  # no batch of one sequence (batch statistics need two)
            torch.testing.assert_close(metrics[f"test/bpc_L{L}_population"], population, **TOL)
            torch.testing.assert_close(metrics[f"test/bpc_L{L}_batch"], batch, **TOL)
            assert float(metrics[f"test/bpc_L{L}_population"]) != pytest.approx(float(batch), rel=1e-3)
    assert {site.eval_statistics for site in batchnorm_sites(model)} == {"population"}


def test_sweep_protocol_restores_the_tasks_own_statistics(in_tmp_path: Path) -> None:
    """A task evaluating with batch statistics gets them back after the sweep switched to population and batch."""
    dm = corpus(in_tmp_path, test_protocol="sweep", sweep_lengths=[4], eval_batch_size=8)
    model = tiny(input_size=dm.input_size, output_size=dm.output_size, max_steps=6, eval_statistics="batch")
    trainer = quiet_trainer()
    trainer.test(model, datamodule=dm, verbose=False)
    assert set(trainer.callback_metrics) == {"test/bpc_L4_population", "test/bpc_L4_batch"}
    assert {site.eval_statistics for site in batchnorm_sites(model)} == {"batch"}


def test_sweep_protocol_for_the_lstm_gives_equal_values(in_tmp_path: Path) -> None:
    """Without BN both names exist and are equal (one pass serves both), and equal the value by hand."""
    dm = corpus(in_tmp_path, test_protocol="sweep", sweep_lengths=[4, 9], eval_batch_size=8)
    model = tiny(input_size=dm.input_size, output_size=dm.output_size, max_steps=6, rnn=TINY.replace(normalize=False))
    assert not batchnorm_sites(model)
    reference = copy.deepcopy(model).eval()
    trainer = quiet_trainer()
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    assert set(metrics) == {f"test/bpc_L{L}_{s}" for L in (4, 9) for s in ("population", "batch")}
    test = dm.splits["test"].long()
    for L in (4, 9):
        assert torch.equal(metrics[f"test/bpc_L{L}_population"], metrics[f"test/bpc_L{L}_batch"])
        with torch.no_grad():
            expected, _ = _sweep_by_hand(reference, test, L, 8, "population")
        torch.testing.assert_close(metrics[f"test/bpc_L{L}_population"], expected, **TOL)


def test_sweep_protocol_drops_a_lone_last_example(in_tmp_path: Path) -> None:
    """A test split of 300 symbols gives 33 examples of length 9: batches of 8, 8, 8, 8 and a lone one.

    Batch statistics need two sequences, so the lone last example is left out (of both values alike); the test run
    must not abort. The values are those of the first 32 examples.
    """
    folder = write_corpus(in_tmp_path / "corpus", sizes=(2000, 400, 300))
    dm = TextFiles(str(folder), seq_length=6, batch_size=4, eval_batch_size=8, test_protocol="sweep", sweep_lengths=[9])
    model = tiny(input_size=dm.input_size, output_size=dm.output_size, max_steps=dm.max_steps)
    reference = copy.deepcopy(model).eval()
    trainer = quiet_trainer()
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    assert set(metrics) == {"test/bpc_L9_population", "test/bpc_L9_batch"}
    test = dm.splits["test"].long()
    assert (len(test) - 1) // 9 == 33
    with torch.no_grad():
        for statistics in ("population", "batch"):
            expected, _ = _sweep_by_hand(reference, test, 9, 8, statistics, examples=32)
            torch.testing.assert_close(metrics[f"test/bpc_L9_{statistics}"], expected, **TOL)
        all_33, _ = _sweep_by_hand(reference, test, 9, 8, "population")  # population statistics could read all 33
    assert float(metrics["test/bpc_L9_population"]) != pytest.approx(float(all_33), rel=1e-4)


def test_sweep_statistics_choose_the_logged_names(in_tmp_path: Path) -> None:
    """sweep_statistics=["batch"] logs only the batch-statistics values."""
    dm = corpus(in_tmp_path, test_protocol="sweep", sweep_lengths=[5], eval_batch_size=8)
    model = tiny(input_size=dm.input_size, output_size=dm.output_size, max_steps=6, sweep_statistics=["batch"])
    trainer = quiet_trainer()
    trainer.test(model, datamodule=dm, verbose=False)
    assert set(trainer.callback_metrics) == {"test/bpc_L5_batch"}


# ---------------------------------------------------------------------------------------------------------------------
# the typed protocol of a batch names the metrics


def test_protocols_of_the_loaders_give_the_metric_names_of_before(in_tmp_path: Path) -> None:
    """Each test protocol's batches carry a typed Protocol; the names it gives are exactly the names logged before
    the protocol was typed (when batches carried the strings "", "full" and "L{n}")."""
    before = {
        "examples": {"test/bpc"},
        "full": {"test/bpc_full"},
        "sweep": {f"test/bpc_L{n}_{s}" for n in (4, 9, 30) for s in ("population", "batch")},
    }
    for test_protocol, expected in before.items():
        dm = corpus(in_tmp_path, test_protocol=test_protocol, sweep_lengths=[4, 9, 30], eval_batch_size=8)
        dm.setup("test")
        loaders = dm.test_dataloader()
        protocols = {
            batch.protocol for loader in (loaders if isinstance(loaders, list) else [loaders]) for batch in loader
        }
        names = set()
        for protocol in protocols:
            assert isinstance(protocol, Protocol)
            if protocol.kind == "length":
                names |= {protocol_metric_name("test", protocol, s) for s in ("population", "batch")}
            else:
                names.add(protocol_metric_name("test", protocol))
        assert names == expected, test_protocol
    for split in ("train", "val", "test"):
        assert protocol_metric_name(split, Protocol.split()) == f"{split}/bpc"
    assert protocol_metric_name("test", Protocol.sweep(100), "batch") == "test/bpc_L100_batch"
    with pytest.raises(ValueError, match="statistics"):
        protocol_metric_name("test", Protocol.sweep(100))


def test_protocol_is_checked_and_survives_the_device_transfer() -> None:
    assert Protocol() == Protocol.split() == ("split", None) and Protocol.full() == ("full", None)
    assert Protocol.sweep(7) == Protocol("length", 7) and Protocol.sweep(7).length == 7
    for kwargs, match in [
        ({"kind": "L100"}, "'split', 'full' or 'length'"),
        ({"kind": "length"}, "sweep length"),
        ({"kind": "length", "length": 0}, "sweep length"),
        ({"kind": "length", "length": True}, "sweep length"),
        ({"kind": "full", "length": 100}, "only a 'length' protocol"),
    ]:
        with pytest.raises(ValueError, match=match):
            Protocol(**kwargs)
    seq = tokens(11)[None]
    batch = TextBatch(seq[:, :10], seq[:, 1:], protocol=Protocol.sweep(10))
    moved = move_data_to_device(batch, torch.device("cpu"))  # what Lightning does to every batch
    assert isinstance(moved, TextBatch) and moved.protocol == Protocol.sweep(10)
    assert type(moved.protocol) is Protocol
    assert pickle.loads(pickle.dumps(batch)).protocol == Protocol.sweep(10)  # worker processes


# ---------------------------------------------------------------------------------------------------------------------
# training end to end


@pytest.mark.parametrize("mode", ["paper", "stateful"])
def test_training_end_to_end(in_tmp_path: Path, mode: str) -> None:
    """A few steps: finite losses; an untrained model predicts close to uniform (val/bpc ~ log2 V); train/bpc logged.

    bpc and loss come from the same logits: train/bpc = train/loss_epoch / ln 2 and val/bpc = val/loss / ln 2
    (equal-sized training batches; validation loss weighted by symbols).
    """
    dm = corpus(in_tmp_path, mode=mode, eval_batch_size=5)
    model = CharLanguageModel(dm.input_size, dm.output_size, dm.max_steps, rnn=TINY)
    trainer = quiet_trainer(limit_train_batches=4, limit_val_batches=3, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    m = trainer.callback_metrics
    assert {"train/loss_step", "train/loss_epoch", "train/bpc", "val/loss", "val/bpc"} <= set(m)
    for name in ("train/loss_epoch", "train/bpc", "val/loss", "val/bpc"):
        assert torch.isfinite(m[name]), name
    assert abs(float(m["val/bpc"]) - math.log2(dm.input_size)) < 0.3
    torch.testing.assert_close(m["train/bpc"], m["train/loss_epoch"] / math.log(2), **TOL)
    torch.testing.assert_close(m["val/bpc"], m["val/loss"] / math.log(2), **TOL)
    if mode == "stateful":
        assert model._states["train"][0].shape == (1, 4, 8)  # batch_size streams carried


# ---------------------------------------------------------------------------------------------------------------------
# sampling


def _greedy(model: CharLanguageModel, prime: torch.Tensor, length: int) -> torch.Tensor:
    """One step at a time from the prime's final state, time index continued, always the most likely symbol."""
    logits, state = model(prime)
    step, drawn = prime.shape[1], []
    for _ in range(length):
        symbol = logits[:, -1].argmax(dim=-1, keepdim=True)
        drawn.append(symbol)
        logits, state = model(symbol, state, step)
        step += 1
    return torch.cat(drawn, dim=1)


def test_sample_shape_range_and_seed() -> None:
    """int64 (N, length) ids within the vocabulary; the same seed draws the same sample, another seed another."""
    model = tiny().eval()
    prime = tokens(6).reshape(2, 3)
    torch.manual_seed(3)
    a = model.sample(prime, 12, temperature=1.0)
    torch.manual_seed(3)
    b = model.sample(prime, 12, temperature=1.0)
    torch.manual_seed(4)
    c = model.sample(prime, 12, temperature=1.0)
    assert a.dtype == torch.int64 and a.shape == (2, 12)
    assert int(a.min()) >= 0 and int(a.max()) < 5
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_low_temperature_gives_the_greedy_continuation() -> None:
    """temperature 1e-4 puts all mass on the argmax: the greedy loop (state carried, start_step continued)."""
    model = tiny().eval()
    prime = tokens(16 * 4, seed=5).reshape(16, 4)
    with torch.no_grad():
        expected = _greedy(model, prime, 9)  # steps 4 … 12 pass max_steps=6
        sampled = model.sample(prime, 9, temperature=1e-4)
    assert torch.equal(sampled, expected)


def test_sample_draws_from_the_tempered_softmax_step_by_step() -> None:
    """Same seed, same draws: a reference loop (multinomial of softmax(logits / T), state carried, time continued).

    Fails if the state, the time index or the temperature were not applied at every step.
    """
    model = tiny().eval()
    prime = tokens(8 * 3, seed=6).reshape(8, 3)
    temperature = 0.7
    with torch.no_grad():
        torch.manual_seed(11)
        sampled = model.sample(prime, 10, temperature)
        torch.manual_seed(11)
        logits, state = model(prime)
        drawn = []
        for step in range(3, 13):
            symbol = torch.multinomial(torch.softmax(logits[:, -1] / temperature, dim=-1), 1)
            drawn.append(symbol)
            logits, state = model(symbol, state, step)
    assert torch.equal(sampled, torch.cat(drawn, dim=1))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_raises(temperature: float) -> None:
    with pytest.raises(ValueError, match=r"temperature must be positive"):
        tiny().eval().sample(tokens(2)[None], 3, temperature)


def test_predict_samples_text(in_tmp_path: Path) -> None:
    """predict returns {"ids": (3, 5), "text": 3 strings of 5 vocabulary symbols spelling the ids}."""
    dm = corpus(in_tmp_path)
    model = tiny(
        input_size=dm.input_size, output_size=dm.output_size, max_steps=dm.max_steps, prime="ab", sample_length=5,
        num_samples=3,
    )  # fmt: skip
    (out,) = quiet_trainer().predict(model, datamodule=dm)
    ids, texts = out["ids"], out["text"]
    assert ids.dtype == torch.int64 and ids.shape == (3, 5)
    assert int(ids.min()) >= 0 and int(ids.max()) < dm.input_size
    assert len(texts) == 3
    for row, text in zip(ids, texts, strict=True):
        assert len(text) == 5 and set(text) <= set(ALPHABET)
        assert text == "".join(ALPHABET[i] for i in row.tolist())


def test_predict_rejects_other_batches() -> None:
    model = tiny().eval()
    seq = tokens(4)[None]
    with pytest.raises(TypeError, match=r"expects SampleRequest batches, got TextBatch"):
        model.predict_step(TextBatch(seq[:, :3], seq[:, 1:]), 0)
    assert SampleRequest._fields == ("vocabulary", "default_prime", "writable", "readable")


def test_sampling_settings_are_the_tasks_and_a_fixed_seed_repeats_the_samples(in_tmp_path: Path) -> None:
    """prime, sample_length, num_samples and temperature are the task's (a typed Sampling, not saved in the
    checkpoint's hparams, so predict from a checkpoint takes them from the command line); the same seed gives the
    same samples through predict, another seed others; the prime starts every sample."""
    dm = corpus(in_tmp_path)
    args = {"input_size": dm.input_size, "output_size": dm.output_size, "max_steps": dm.max_steps}
    model = tiny(**args, prime="ab", sample_length=12, num_samples=4, temperature=0.8)
    assert model.sampling == Sampling(prime="ab", sample_length=12, num_samples=4, temperature=0.8)
    assert not set(SAMPLING_FLAGS) & set(model.hparams)
    assert tiny(**args).sampling == Sampling()  # defaults: the corpus's prime, 200 symbols, 1 sample, temperature 1

    def predict(seed: int) -> dict:
        torch.manual_seed(seed)
        (out,) = quiet_trainer().predict(model, datamodule=dm)
        return out

    first, again, other = predict(7), predict(7), predict(8)
    assert first["ids"].shape == (4, 12)
    assert torch.equal(first["ids"], again["ids"]) and first["text"] == again["text"]
    assert not torch.equal(first["ids"], other["ids"])
    # the same draws as sample() from the prime the task encoded, at the task's temperature
    torch.manual_seed(7)
    prime = dm.vocabulary.encode("ab").expand(4, -1)
    with torch.no_grad():
        assert torch.equal(model.eval().sample(prime, 12, temperature=0.8), first["ids"])


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"sample_length": 0}, "sample_length"),
        ({"sample_length": 2.5}, "sample_length"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": True}, "num_samples"),
        ({"prime": ""}, "prime"),
    ],
)
def test_bad_sampling_settings_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=rf"^{flag} \(model\.init_args\.{flag}\) must"):
        tiny(**kwargs)


def test_a_prime_outside_the_alphabet_is_named_at_predict(in_tmp_path: Path) -> None:
    dm = corpus(in_tmp_path)
    model = tiny(input_size=dm.input_size, output_size=dm.output_size, max_steps=dm.max_steps, prime="abz")
    with pytest.raises(ValueError, match=r"prime \(model\.init_args\.prime\) has 1 character outside .*: 'z'"):
        quiet_trainer().predict(model, datamodule=dm)


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_training_step_with_a_tuple_raises() -> None:
    """A (inputs, targets) tuple from a non-text DataModule is named as not a TextBatch."""
    model = tiny().train()
    seq = tokens(2 * 5).reshape(2, 5)
    with pytest.raises(TypeError, match=r"CharLanguageModel expects TextBatch batches .*got tuple"):
        model.training_step((seq[:, :4], seq[:, 1:]), 0)


@pytest.mark.parametrize("value", [["foo"], [], ["population", "bar"]])
def test_bad_sweep_statistics_raise(value: list[str]) -> None:
    with pytest.raises(ValueError, match=r"model\.init_args\.sweep_statistics must list"):
        tiny(sweep_statistics=value)


@pytest.mark.parametrize("name", ["input_size", "output_size", "max_steps", "rnn.hidden_size"])
def test_non_positive_sizes_raise(name: str) -> None:
    args = {"rnn": TINY.replace(hidden_size=0)} if name == "rnn.hidden_size" else {name: 0}
    with pytest.raises(ValueError, match=rf"model\.init_args\.{re.escape(name)} must be positive, got 0"):
        tiny(**args)


def test_bad_eval_statistics_raises() -> None:
    with pytest.raises(ValueError, match=r"model\.init_args\.eval_statistics must be"):
        tiny(eval_statistics="running")


def test_symbol_ids_outside_the_vocabulary_raise() -> None:
    """Data with a larger vocabulary than the model's input_size is an error, not a wrong one-hot."""
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"symbol ids must be in \[0, 5\), got ids from 0 to 5"):
        model(torch.tensor([[0, 5, 1]]))
    with pytest.raises(ValueError, match=r"CharRNN expects int64 symbol ids \(B, T\)"):
        model(torch.zeros(1, 3))
