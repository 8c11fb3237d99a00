"""``NonFiniteGuard`` in real, tiny training runs: a non-finite loss or gradient is injected at a chosen batch.

Every run trains a narrow BN-LSTM (``SequenceRegression``) on a fixed list of adding-problem batches (no download, CPU,
deterministic), so a run with a faulty batch can be compared exactly with a clean run that stops before it (action
"stop") or never sees it (action "skip").
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.utils.data import DataLoader

from bnlstm_lit.callbacks.failsafe import NonFiniteError, NonFiniteGuard, NonFiniteWarning
from bnlstm_lit.data import AddingProblem
from bnlstm_lit.nn import BNLSTMSettings
from bnlstm_lit.tasks import SequenceRegression

T = 6  # sequence length (and max_steps of the BN statistics)
H = 4  # hidden units
B = 4  # batch size
N_BATCHES = 8

Batch = tuple[Tensor, Tensor]

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


class Faulty(SequenceRegression):
    """SequenceRegression with faults injected at chosen training batches (``faults``: batch_idx -> kind).

    * "nan_loss": the loss is multiplied by nan (finite forward, so finite BN statistics; nan gradients);
    * "inf_loss": the loss is multiplied by inf (inf loss, nan/inf gradients);
    * "const_inf": ``-inf`` that does not depend on the parameters is added: the loss is -inf, the gradients finite;
    * "nan_input": one input value is nan (nan BN batch statistics, running statistics and gradients);
    * "nan_grad": ``sqrt(sum((w - w.detach())**2))`` of the readout weight w is added: 0 in the forward pass, a nan
      gradient (inf * 0) for that weight only, finite loss and other gradients.

    ``fault_rank``: inject on this process only (None: on every process).
    """

    faults: dict[int, str] = {}
    fault_rank: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        kind = self.faults.get(batch_idx) if self.fault_rank in (None, self.global_rank) else None
        if kind == "nan_input":
            inputs = batch[0].clone()
            inputs[0, 0, 0] = float("nan")
            batch = (inputs, *batch[1:])
        loss = super().training_step(batch, batch_idx)
        if kind == "nan_loss":
            loss = loss * float("nan")
        elif kind == "inf_loss":
            loss = loss * float("inf")
        elif kind == "const_inf":
            loss = loss + torch.log(torch.zeros(()))
        elif kind == "nan_grad":
            weight = self.net.readout.weight
            loss = loss + (weight - weight.detach()).pow(2).sum().sqrt()
        return loss


@pytest.fixture(scope="module")
def batches() -> list[Batch]:
    data = AddingProblem(seq_len=T, train_size=B * N_BATCHES, val_size=1, test_size=1, batch_size=B, seed=3)
    data.setup("fit")
    out = [(x, y) for x, y in data.train_dataloader()]
    assert len(out) == N_BATCHES
    return out


def make_model(faults: dict[int, str] | None = None, optimizer: Callable[..., Any] | None = None) -> Faulty:
    torch.manual_seed(0)
    optimizer = optimizer or functools.partial(torch.optim.Adam, lr=0.05)
    model = Faulty(2, 1, T, rnn=BNLSTMSettings(hidden_size=H), optimizer=optimizer)
    model.faults = dict(faults or {})
    return model


def fit(
    root: Path,
    batches: Sequence[Batch],
    faults: dict[int, str] | None = None,
    callbacks: Sequence[Callback] = (),
    optimizer: Callable[..., Any] | None = None,
    **trainer_options: Any,
) -> tuple[L.Trainer, Faulty]:
    """One epoch over ``batches`` (in order); returns the trainer and the model, also when fit raised."""
    model = make_model(faults, optimizer)
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "log_every_n_steps": 1,
        "default_root_dir": root,
        "callbacks": list(callbacks),
    }
    options.update(trainer_options)
    trainer = L.Trainer(**options)
    trainer.fit(model, DataLoader(list(batches), batch_size=None))
    return trainer, model


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), name


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for index in sa:
        assert_same_tensors(sa[index], sb[index])


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


class GradientSpy(Callback):
    """Records, per optimizer step, whether every gradient was finite (place it before the guard)."""

    def __init__(self) -> None:
        self.finite: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.finite[trainer.global_step] = all(bool(torch.isfinite(g).all()) for g in grads)


# ------------------------------------------------------------------------------------------------------- tests


def test_stop_keeps_the_last_good_state_and_names_the_step(tmp_path: Path, batches: list[Batch]) -> None:
    """A nan loss at batch 3: NonFiniteError out of fit naming step 3, the update not applied, a kept checkpoint equal
    to a clean 3-step run, and the ModelCheckpoint's earlier files and the CSV log still there."""
    k = 3
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1, save_last=True)
    logger = CSVLogger(tmp_path, name="logs")
    with pytest.raises(NonFiniteError) as raised:
        fit(
            tmp_path,
            batches,
            {k: "nan_loss"},
            [checkpoints, NonFiniteGuard()],
            logger=logger,
            enable_checkpointing=True,
        )
    error = raised.value
    kept = tmp_path / "ckpts" / f"nonfinite-step{k}.ckpt"
    message = str(error)
    assert f"global step {k} (epoch 0, batch {k})" in message
    assert "non-finite training loss (nan)" in message and "non-finite gradients in" in message
    assert str(kept) in message and "action: skip" in message
    assert (error.step, error.batch_idx, error.loss_finite, error.checkpoint) == (k, k, False, str(kept))
    assert error.parameters and all(name.startswith("net.") for name in error.parameters)

    clean_trainer, clean = fit(tmp_path / "clean", batches[:k])
    assert clean_trainer.global_step == k
    saved = load(kept)
    assert saved["global_step"] == k
    assert_same_tensors(saved["state_dict"], clean.state_dict())  # parameters and buffers after step k-1
    restored = SequenceRegression.load_from_checkpoint(kept)  # a loadable model checkpoint
    assert_same_tensors(restored.state_dict(), clean.state_dict())
    # nothing already written is lost: the per-step checkpoints, last.ckpt (= the same good state), the CSV log
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert [n for n in names if n.startswith("epoch=0-step=")] == [f"epoch=0-step={s}.ckpt" for s in range(1, k + 1)]
    assert_same_tensors(load(tmp_path / "ckpts" / "last.ckpt")["state_dict"], clean.state_dict())
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "train/loss_step" in metrics and len(metrics.splitlines()) >= k + 1


def test_stop_does_not_update_parameters_in_memory(tmp_path: Path, batches: list[Batch]) -> None:
    """The failing run's model in memory holds the state after step k-1 (and its optimizer the clean run's state)."""
    k = 2
    model = make_model({k: "inf_loss"})
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[NonFiniteGuard()],
    )
    with pytest.raises(NonFiniteError, match=f"global step {k} "):
        trainer.fit(model, DataLoader(list(batches), batch_size=None))
    assert (tmp_path / "checkpoints" / f"nonfinite-step{k}.ckpt").is_file()  # no logger, no ModelCheckpoint
    clean_trainer, clean = fit(tmp_path / "clean", batches[:k])
    assert_same_tensors(model.state_dict(), clean.state_dict())
    assert_same_optimizer_state(trainer.optimizers[0], clean_trainer.optimizers[0])


@pytest.mark.parametrize(
    "optimizer",
    [
        functools.partial(torch.optim.Adam, lr=0.05),
        functools.partial(torch.optim.RMSprop, lr=0.01, momentum=0.9),
    ],
    ids=["adam", "rmsprop"],
)
def test_skip_equals_a_run_without_the_bad_batch(
    tmp_path: Path, batches: list[Batch], optimizer: Callable[..., Any]
) -> None:
    """action="skip": the run completes, skipped == [k], and the parameters, buffers and optimizer state (moments,
    step counters) equal those of a run on the same batches with batch k removed."""
    k = 3
    guard = NonFiniteGuard(action="skip")
    with pytest.warns(NonFiniteWarning, match=f"global step {k} "):
        trainer, model = fit(tmp_path, batches, {k: "nan_loss"}, [guard], optimizer=optimizer)
    assert guard.skipped == [k]
    assert trainer.global_step == N_BATCHES  # the skipped step still counts as a step
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())

    clean_trainer, clean = fit(tmp_path / "clean", batches[:k] + batches[k + 1 :], optimizer=optimizer)
    assert_same_tensors(model.state_dict(), clean.state_dict())
    assert_same_optimizer_state(trainer.optimizers[0], clean_trainer.optimizers[0])
    assert not torch.equal(make_model().net.readout.weight, model.net.readout.weight)  # it did train


def test_skip_restores_buffers_poisoned_by_a_nan_batch_with_accumulation_and_clipping(
    tmp_path: Path, batches: list[Batch]
) -> None:
    """accumulate_grad_batches=2, gradient clipping, a nan input in the 2nd micro-batch of the 2nd window: that window
    (global step 1) is skipped as a whole, the BN running statistics are restored, and the run equals one without
    the window's two batches."""
    guard = NonFiniteGuard(action="skip")
    options = {"accumulate_grad_batches": 2, "gradient_clip_val": 1.0}
    with pytest.warns(NonFiniteWarning, match=r"\(nan in micro-batch 2 of 2\).* at global step 1 \(epoch 0, batch 3\)"):
        trainer, model = fit(tmp_path, batches, {3: "nan_input"}, [guard], **options)
    assert guard.skipped == [1]
    assert all(torch.isfinite(b).all() for b in model.buffers())
    clean_trainer, clean = fit(tmp_path / "clean", batches[:2] + batches[4:], **options)
    assert_same_tensors(model.state_dict(), clean.state_dict())
    assert_same_optimizer_state(trainer.optimizers[0], clean_trainer.optimizers[0])


def test_buffers_are_left_alone_with_restore_buffers_false(tmp_path: Path, batches: list[Batch]) -> None:
    """restore_buffers=False: the step is still skipped (finite parameters) but the nan batch's BN running statistics
    stay -- what restore_buffers=True (the default, tested above) prevents."""
    guard = NonFiniteGuard(action="skip", restore_buffers=False)
    with pytest.warns(NonFiniteWarning, match=r"non-finite training loss \(nan\) and non-finite gradients"):
        _, model = fit(tmp_path, batches, {2: "nan_input"}, [guard])
    assert guard.skipped == [2]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.isfinite(model.net.rnn.cells[0].bn_x.running_mean).all()


def test_inf_loss_with_finite_gradients_is_caught(tmp_path: Path, batches: list[Batch]) -> None:
    """A loss of -inf whose gradients are finite (a non-finite term independent of the parameters) stops the run:
    the gradient check alone would have let this step through."""
    k = 2
    spy = GradientSpy()
    with pytest.raises(NonFiniteError) as raised:
        fit(tmp_path, batches, {k: "const_inf"}, [spy, NonFiniteGuard()])
    assert spy.finite == {0: True, 1: True, 2: True}  # the gradients of step k were finite
    message = str(raised.value)
    assert f"non-finite training loss (-inf) at global step {k} " in message
    assert "non-finite gradients" not in message and raised.value.parameters == ()


def test_nan_gradient_with_finite_loss_names_the_parameter(tmp_path: Path, batches: list[Batch]) -> None:
    """A finite loss with a nan gradient in one parameter: the error names exactly that parameter, not the loss."""
    k = 1
    spy = GradientSpy()
    with pytest.raises(NonFiniteError) as raised:
        fit(tmp_path, batches, {k: "nan_grad"}, [spy, NonFiniteGuard()])
    assert spy.finite == {0: True, 1: False}
    assert raised.value.parameters == ("net.readout.weight",) and raised.value.loss_finite is True
    message = str(raised.value)
    assert f"non-finite gradients in 1 parameter(s) (net.readout.weight) at global step {k} " in message
    assert "training loss" not in message


def test_stop_runs_before_gradient_clipping(tmp_path: Path, batches: list[Batch]) -> None:
    """With gradient_clip_val=1.0 a nan batch still raises (clipping would have spread nan to every parameter); the
    model in memory and the kept checkpoint are finite, BN running statistics included."""
    k = 2
    spy = GradientSpy()
    with pytest.raises(NonFiniteError, match=f"global step {k} ") as raised:
        trainer, _ = fit(tmp_path, batches, {k: "nan_input"}, [NonFiniteGuard(), spy], gradient_clip_val=1.0)
    assert k not in spy.finite  # the guard ran first and nothing after it
    assert "non-finite training loss (nan)" in str(raised.value)
    assert raised.value.checkpoint is not None
    state = load(Path(raised.value.checkpoint))["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any("running_mean" in name for name in state)


def test_max_skips_stops_with_the_same_error(tmp_path: Path, batches: list[Batch]) -> None:
    """max_skips=1: the first bad step (2) is skipped, the second (5) stops the run and keeps its checkpoint."""
    guard = NonFiniteGuard(action="skip", max_skips=1, dirpath=str(tmp_path / "kept"))
    with pytest.warns(NonFiniteWarning, match="global step 2 "), pytest.raises(NonFiniteError) as raised:
        fit(tmp_path, batches, {2: "nan_loss", 5: "inf_loss"}, [guard])
    assert guard.skipped == [2]
    message = str(raised.value)
    assert "max_skips=1" in message and "global step 5 (epoch 0, batch 5)" in message
    assert (tmp_path / "kept" / "nonfinite-step5.ckpt").is_file()
    assert raised.value.checkpoint == str(tmp_path / "kept" / "nonfinite-step5.ckpt")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"action": "ignore"}, "action"),
        ({"action": "Skip"}, "action"),
        ({"max_skips": 0}, "max_skips"),
        ({"max_skips": -2}, "max_skips"),
        ({"max_skips": 1.5}, "max_skips"),
        ({"max_skips": True}, "max_skips"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"NonFiniteGuard: {argument} must"):
        NonFiniteGuard(**kwargs)


def test_skipped_steps_are_kept_in_the_callback_state() -> None:
    guard = NonFiniteGuard(action="skip", max_skips=3)
    guard.skipped = [4, 9]
    other = NonFiniteGuard(action="skip", max_skips=3)
    other.load_state_dict(copy.deepcopy(guard.state_dict()))
    assert other.skipped == [4, 9]


# ------------------------------------------------------------------------------------------------------- DDP

DDP_FAULTS = {1: "const_inf", 3: "const_inf"}


def _ddp_run(out_dir: Path) -> None:
    """Run in each of 2 CPU DDP processes (``python test_failsafe.py OUT``): a -inf loss with finite gradients on
    rank 1 only, at batches 1 and 3, with action="skip" and max_skips=1; each rank saves what it saw to
    ``OUT/rank<r>.pt``."""
    data = AddingProblem(seq_len=T, train_size=B * N_BATCHES, val_size=1, test_size=1, batch_size=B, seed=3)
    data.setup("fit")
    model = make_model(DDP_FAULTS)
    model.fault_rank = 1
    guard = NonFiniteGuard(action="skip", max_skips=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=30)),  # ranks that disagree fail fast instead of hanging
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=[guard],
    )
    record: dict[str, Any] = {"error": None}
    try:
        trainer.fit(model, data.train_dataloader())
    except NonFiniteError as error:
        record["error"] = {"step": error.step, "message": str(error), "checkpoint": error.checkpoint}
    record.update(skipped=guard.skipped, parameters={n: p.detach() for n, p in model.named_parameters()})
    torch.save(record, out_dir / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_decide_together(tmp_path: Path) -> None:
    """Under DDP (2 CPU processes) a loss that is non-finite on rank 1 only (its gradients finite, so the all-reduced
    gradients are finite everywhere) is skipped on both ranks at step 1, which stay in sync, and stops both at step 3
    (max_skips=1), keeping one checkpoint (a collective save: no rank hangs)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: both ranks can be killed together
    )
    try:
        _, stderr = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the DDP run hung (the ranks did not take the same decision?)")
    assert process.returncode == 0, stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [[1], [1]]
    assert [r["error"]["step"] for r in ranks] == [3, 3]
    assert_same_tensors(ranks[0]["parameters"], ranks[1]["parameters"])  # still in sync
    assert "non-finite training loss (-inf)" in ranks[1]["error"]["message"]
    assert "another process" in ranks[0]["error"]["message"]  # rank 0 saw nothing itself
    assert Path(ranks[0]["error"]["checkpoint"]).is_file()


if __name__ == "__main__":  # the DDP run of test_ddp_ranks_decide_together (Lightning re-runs this per rank)
    torch.set_num_threads(1)
    _ddp_run(Path(sys.argv[1]))
