"""A checkpoint stays with its run: resuming continues the run folder, evaluating logs into it with its config.

Real in-process ``bnlstm-lit`` runs of the adding problem on tiny settings (2 training batches an epoch, one
validation batch, a 16-unit BN-LSTM), written into ``tmp_path``:

* ``fit`` to 2 steps, then ``fit --ckpt_path last`` (or the file) to 4 steps: the same ``version_0`` folder, one
  curve over steps 0..3 (CSV and TensorBoard), ModelCheckpoint's folder, best score and top-k restored (no "dirpath
  has changed" warning), the run's ``config.yaml`` kept; best checkpoints named with the monitored value.
* ``test --ckpt_path FILE`` with no config: logs into that run folder and runs with the run's callbacks
  (PopulationStatistics) and data settings; a ``--config`` given as well wins for what it sets.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from bnlstm_lit.callbacks import PopulationStatistics
from bnlstm_lit.cli import BNLSTMCLI
from bnlstm_lit.runs import run_folder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

#: the run's own config: the shipped adding config, shrunk (debug overlay) to 2 train batches an epoch
TINY = [
    f"--config={CONFIGS / 'adding_bnlstm.yaml'}",
    f"--config={CONFIGS / 'debug.yaml'}",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=16",
    "--data.init_args.test_size=16",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.max_epochs=-1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
# the run's callbacks: the statistics protocol, and a ModelCheckpoint that keeps every validation (restoring its
# top-k after the resume shows as two entries, not one)
CALLBACKS = [
    {"class_path": "bnlstm_lit.callbacks.PopulationStatistics", "init_args": {"before_validation": True}},
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/mse", "save_top_k": -1, "save_last": True},
    },
]
KEEP_ALL = [f"--trainer.callbacks={json.dumps(CALLBACKS)}"]
CSV = ["--trainer.logger=CSVLogger", "--trainer.logger.save_dir={root}"]


def cli(*args: str) -> BNLSTMCLI:
    argv = sys.argv
    sys.argv = ["bnlstm-lit"]  # LightningCLI warns when args= and a foreign command line (pytest's) are both given
    try:
        return BNLSTMCLI(args=list(args))
    finally:
        sys.argv = argv


def fit(root: Path, steps: int, *extra: str) -> tuple[BNLSTMCLI, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = cli("fit", *TINY, f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}", *KEEP_ALL, *extra)
    return run, caught


def log_dir(run: BNLSTMCLI) -> Path:
    assert run.trainer.log_dir is not None
    return Path(run.trainer.log_dir)


def csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def assert_one_curve(steps: list[int]) -> None:
    """The training loss of steps 0, 1 (first fit) and of the 2 resumed steps, each once, in order. (Lightning
    logs the resumed steps one later, at 3 and 4, after a checkpoint written at the end of an epoch: its loop adds
    one to the logging step on restart. Its doing, with or without a run folder.)"""
    assert steps[:2] == [0, 1] and len(steps) == 4 and steps == sorted(set(steps)) and steps[2] in (2, 3), steps


@pytest.mark.parametrize("how", ["last", "file"])
def test_a_resumed_fit_continues_the_same_run(how: str, tmp_path: Path) -> None:
    csv_logger = [arg.format(root=tmp_path) for arg in CSV]
    first, _ = fit(tmp_path, 2, *csv_logger)
    version = log_dir(first)
    assert version == tmp_path / "lightning_logs" / "version_0"
    original_config = (version / "config.yaml").read_text()
    checkpoints = version / "checkpoints"
    first_best = first.trainer.checkpoint_callback.best_model_score  # type: ignore[union-attr]
    ckpt = "last" if how == "last" else str(checkpoints / "last.ckpt")

    resumed, caught = fit(tmp_path, 4, *csv_logger, f"--ckpt_path={ckpt}")

    assert resumed.trainer.global_step == 4
    assert log_dir(resumed) == version  # the same run folder
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert not [w for w in caught if "dirpath" in str(w.message)], [str(w.message) for w in caught]
    assert not [w for w in caught if "no last checkpoint" in str(w.message)]
    # ModelCheckpoint's bookkeeping came back: both validations are in the top-k, the best over both runs
    kept = resumed.trainer.checkpoint_callback
    assert isinstance(kept, ModelCheckpoint) and kept.dirpath == str(checkpoints)
    assert len(kept.best_k_models) == 2 and all(Path(p).parent == checkpoints for p in kept.best_k_models)
    assert kept.best_model_score == min(kept.best_k_models.values()) <= first_best
    # one curve: every training step once, in the run's metrics.csv (appended to, not deleted)
    rows = csv_rows(version)
    assert_one_curve([int(r["step"]) for r in rows if r["train/loss_step"]])
    assert len([r for r in rows if r["val/mse"]]) == 2
    # the run's config is the one that started it; the resume's own sits next to it
    assert (version / "config.yaml").read_text() == original_config
    assert yaml.safe_load((version / "config.fit.yaml").read_text())["ckpt_path"] == str(checkpoints / "last.ckpt")
    # the best checkpoints' names carry the monitored value, with no sub-folder for the '/' of val/mse
    names = sorted(p.name for p in checkpoints.iterdir())
    assert "last.ckpt" in names and all(p.is_file() for p in checkpoints.iterdir())
    assert any(n.startswith("epoch=1-step=4-val_mse=") and n.endswith(".ckpt") for n in names), names


def test_tensorboard_curves_continue_and_a_killed_runs_later_steps_are_superseded(tmp_path: Path) -> None:
    """The default logger (TensorBoard): the resumed fit writes a new event file in the same folder; what the first
    fit logged after the checkpoint it is resumed from (steps 2, 3) is purged, so each step appears once."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    first, _ = fit(tmp_path, 4)
    version = log_dir(first)
    midway = sorted((version / "checkpoints").glob("epoch=0-step=2-*.ckpt"))
    assert len(midway) == 1 and torch.load(midway[0], weights_only=True)["global_step"] == 2
    resumed, caught = fit(tmp_path, 4, f"--ckpt_path={midway[0]}")
    assert log_dir(resumed) == version
    assert not [w for w in caught if "dirpath" in str(w.message)]
    assert len(list(version.glob("events.out.tfevents.*"))) == 2
    events = EventMultiplexer({"run": str(version)}).Reload()
    assert_one_curve([event.step for event in events.Scalars("run", "train/loss_step")])


# the second test below runs without the run's ModelCheckpoint, on purpose, and Lightning says so
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_evaluating_a_checkpoint_logs_into_its_run_with_its_config(
    tmp_path: Path, in_tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fitted, _ = fit(tmp_path / "runs", 2)
    version = log_dir(fitted)
    original_config = (version / "config.yaml").read_text()
    ckpt = version / "checkpoints" / "last.ckpt"
    assert run_folder(ckpt) == version

    with caplog.at_level(logging.INFO):
        tested = cli("test", f"--ckpt_path={ckpt}", "--trainer.enable_progress_bar=false")
    assert log_dir(tested) == version  # not ./lightning_logs
    assert not (in_tmp_path / "lightning_logs").exists()
    assert any(isinstance(cb, PopulationStatistics) for cb in tested.trainer.callbacks)  # type: ignore[attr-defined]
    assert "population statistics estimated" in caplog.text  # the run's protocol ran before the test
    assert f"run folder {version}" in caplog.text and f"settings from {version / 'config.yaml'}" in caplog.text
    assert tested.datamodule.hparams["train_size"] == 64  # the run's data settings
    assert tested.trainer.limit_test_batches == 2  # and its trainer settings (debug overlay)
    assert torch.isfinite(tested.trainer.callback_metrics["test/mse"])
    assert (version / "config.yaml").read_text() == original_config
    assert (version / "config.test.yaml").is_file()

    # a config given as well wins for what it sets: here, callbacks without the statistics protocol
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "bnlstm_lit.callbacks.NonFiniteGuard"}]}}))
    mine = cli("test", f"--ckpt_path={ckpt}", f"--config={own}", "--trainer.enable_progress_bar=false")
    assert not any(isinstance(cb, PopulationStatistics) for cb in mine.trainer.callbacks)  # type: ignore[attr-defined]
    assert log_dir(mine) == version
