"""What users of Lightning research tools expect from a fit: the learning rate logged when a scheduler changes it,
a meaningful TensorBoard ``hp_metric`` (no ``-1`` placeholder), and several loggers at once from a YAML list.

Every fit here is the adding problem at a few steps on the CPU, logging into ``tmp_path``."""

from __future__ import annotations

import csv
import math
import shlex
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnlstm_lit.cli import main
from bnlstm_lit.data import AddingProblem
from bnlstm_lit.nn import BNLSTMSettings
from bnlstm_lit.tasks import SequenceRegression
from bnlstm_lit.tasks.base import HP_METRIC, LR

ROOT = Path(__file__).resolve().parents[1]
LR0 = 0.01
TINY_DATA = ["--data=AddingProblem", "--data.seq_len=5", "--data.train_size=32", "--data.val_size=16",
             "--data.batch_size=8"]  # fmt: skip
TINY_FIT = [*TINY_DATA, "--model=SequenceRegression", "--model.rnn.hidden_size=8", "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip


def tiny_fit(tmp_path: Path, scheduler: bool, **trainer: Any) -> tuple[L.Trainer, SequenceRegression]:
    data = AddingProblem(seq_len=5, train_size=32, val_size=16, batch_size=8)
    model = SequenceRegression(
        data.input_size,
        data.output_size,
        data.max_steps,
        rnn=BNLSTMSettings(hidden_size=8),
        optimizer=partial(torch.optim.SGD, lr=LR0),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5) if scheduler else None,
    )
    options: dict[str, Any] = {"max_epochs": 3, "accelerator": "cpu", "devices": 1, "default_root_dir": tmp_path,
                               "enable_progress_bar": False, "enable_model_summary": False}  # fmt: skip
    options.update(trainer)
    fit = L.Trainer(**options)
    fit.fit(model, datamodule=data)
    return fit, model


def csv_column(log_dir: str | Path, name: str) -> list[float]:
    with open(Path(log_dir) / "metrics.csv", newline="") as file:
        return [float(row[name]) for row in csv.DictReader(file) if row.get(name)]


def scalars(log_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(event.step, event.value) for event in events.Scalars(tag)]


# ------------------------------------------------------------------------------------------------- learning rate


def test_a_scheduled_learning_rate_is_logged_as_train_lr(tmp_path: Path) -> None:
    trainer, _ = tiny_fit(tmp_path, scheduler=True, logger=CSVLogger(tmp_path))
    assert sum(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks) == 1  # type: ignore[attr-defined]
    assert csv_column(trainer.log_dir or "", LR) == pytest.approx([LR0, LR0 / 2, LR0 / 4])  # StepLR, once per epoch


def test_without_a_scheduler_no_monitor_is_added(tmp_path: Path) -> None:
    trainer, _ = tiny_fit(tmp_path, scheduler=False, max_epochs=1, logger=CSVLogger(tmp_path))
    assert not any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks)  # type: ignore[attr-defined]
    header = (Path(trainer.log_dir or "") / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/mse" in header and not any(name.startswith("lr") or "/lr" in name for name in header)


def test_without_a_logger_no_monitor_is_added(tmp_path: Path) -> None:
    trainer, _ = tiny_fit(tmp_path, scheduler=True, max_epochs=1, logger=False, enable_checkpointing=False)
    assert not any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks)  # type: ignore[attr-defined]


def test_a_configured_monitor_is_kept(tmp_path: Path) -> None:
    mine = LearningRateMonitor(logging_interval="step")
    trainer, _ = tiny_fit(
        tmp_path, scheduler=True, max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[mine], log_every_n_steps=1
    )
    monitors = [cb for cb in trainer.callbacks if isinstance(cb, LearningRateMonitor)]  # type: ignore[attr-defined]
    assert monitors == [mine]
    assert csv_column(trainer.log_dir or "", LR) == [LR0] * 4  # every step (4 batches)


def test_the_cli_logs_a_scheduled_learning_rate(in_tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            *TINY_FIT,
            "--model.optimizer=torch.optim.SGD",
            f"--model.optimizer.lr={LR0}",
            "--model.lr_scheduler=torch.optim.lr_scheduler.StepLR",
            "--model.lr_scheduler.step_size=1",
            "--trainer.logger=CSVLogger",
            "--trainer.logger.save_dir=runs",
        ]
    )
    assert cli is not None
    assert csv_column(cli.trainer.log_dir or "", LR) == pytest.approx([LR0, LR0 * 0.1])


# ---------------------------------------------------------------------------------------------------- hp_metric


def test_hp_metric_is_the_best_headline_value_so_far_and_never_minus_one(tmp_path: Path) -> None:
    trainer, _ = tiny_fit(tmp_path, scheduler=False, logger=TensorBoardLogger(tmp_path))
    log_dir = trainer.log_dir or ""
    val = scalars(log_dir, "val/mse")
    hp = scalars(log_dir, HP_METRIC)
    assert len(val) == 3 and [step for step, _ in hp] == [step for step, _ in val]  # after each validation
    best = [min(value for _, value in val[: i + 1]) for i in range(len(val))]
    assert [value for _, value in hp] == pytest.approx(best)
    # the HPARAMS tab's entry: the hyper-parameters, with hp_metric as the run's metric
    events = EventAccumulator(log_dir)
    events.Reload()
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))


def test_hp_metric_follows_the_checkpointed_metric_and_its_mode(tmp_path: Path) -> None:
    # a ModelCheckpoint that keeps the *highest* loss: hp_metric is then the highest val/loss so far
    checkpoint = ModelCheckpoint(monitor="val/loss", mode="max")
    trainer, model = tiny_fit(tmp_path, scheduler=False, logger=TensorBoardLogger(tmp_path), callbacks=[checkpoint])
    assert model.headline_metric() == ("val/loss", "max")
    val = [value for _, value in scalars(trainer.log_dir or "", "val/loss")]
    hp = [value for _, value in scalars(trainer.log_dir or "", HP_METRIC)]
    assert hp == pytest.approx([max(val[: i + 1]) for i in range(len(val))])
    assert math.isclose(hp[-1], float(checkpoint.best_model_score or 0), rel_tol=1e-6)


def test_the_headline_metric_without_a_checkpoint_callback(tmp_path: Path) -> None:
    _, model = tiny_fit(tmp_path, scheduler=False, max_epochs=1, logger=False, enable_checkpointing=False)
    assert model.headline_metric() == ("val/mse", "min")  # MeanSquaredError: lower is better


def test_the_best_value_travels_with_the_checkpoint() -> None:
    def task() -> SequenceRegression:
        return SequenceRegression(2, 1, 5, rnn=BNLSTMSettings(hidden_size=4))

    saved, checkpoint = task(), dict[str, Any]()
    saved._hp_best = 0.25
    saved.on_save_checkpoint(checkpoint)
    resumed = task()
    resumed.on_load_checkpoint(checkpoint)
    assert resumed._hp_best == 0.25  # a resumed fit's hp_metric is never worse than before the interruption


def test_a_cli_fit_then_test_writes_no_placeholder(in_tmp_path: Path) -> None:
    fit = main(["fit", *TINY_FIT, "--trainer.default_root_dir=runs"])
    assert fit is not None and isinstance(fit.trainer.logger, TensorBoardLogger)
    run = Path(fit.trainer.log_dir or "")
    ckpt = next((run / "checkpoints").glob("*.ckpt"))  # Lightning's default ModelCheckpoint: the last epoch's
    tested = main(["test", f"--ckpt_path={ckpt}", "--trainer.enable_progress_bar=false"])
    assert tested is not None and Path(tested.trainer.log_dir or "").resolve() == run.resolve()  # the fitted run
    hp = scalars(run, HP_METRIC)
    assert [step for step, _ in hp] == [step for step, _ in scalars(run, "val/mse")]  # one per epoch, nothing else
    assert len(hp) == 2 and -1.0 not in [value for _, value in hp]


# ------------------------------------------------------------------------------------------------ several loggers


def loggers_section() -> str:
    text = (ROOT / "docs" / "guide" / "cli.md").read_text()
    return text.split("## Loggers\n", 1)[1].split("\n## ", 1)[0]


def test_wandb_and_mlflow_are_optional_extras() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["wandb"] == ["wandb>=0.16"] and extras["mlflow"] == ["mlflow>=2.10"]
    assert not any(dep.startswith(("wandb", "mlflow")) for dep in project["dependencies"])


def test_the_documented_logger_commands_parse(capsys: pytest.CaptureFixture[str]) -> None:
    """Each command line of the docs' Loggers section, with --print_config (WandbLogger and MLFlowLogger parse
    without their packages; only training needs them)."""
    commands = [line.split("#")[0] for line in loggers_section().splitlines() if "--trainer.logger=" in line]
    assert len(commands) == 3
    for command in commands:
        args = shlex.split(command)
        args = args[args.index("bnlstm-lit") + 1 :]
        with pytest.raises(SystemExit) as done:
            main([*args, "--print_config"])
        assert done.value.code in (0, None)
        logger = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
        assert logger["class_path"] == next(arg.split("=", 1)[1] for arg in args if arg.startswith("--trainer.logger="))


def test_the_documented_yaml_list_of_loggers_parses_and_every_logger_writes(in_tmp_path: Path) -> None:
    block = loggers_section().split("```yaml\n", 1)[1].split("```", 1)[0]
    (in_tmp_path / "loggers.yaml").write_text(block)
    cli = main(["fit", *TINY_FIT, "--config=loggers.yaml"])
    assert cli is not None
    tensorboard, csv_logger = cli.trainer.loggers
    assert isinstance(tensorboard, TensorBoardLogger) and isinstance(csv_logger, CSVLogger)
    root = in_tmp_path / "runs" / "ptb_bnlstm"
    run = root / "lightning_logs" / "version_0"  # the run folder is the first logger's
    assert Path(cli.trainer.log_dir or "").resolve() == run.resolve() and (run / "config.yaml").is_file()
    assert any((run / "checkpoints").glob("*.ckpt"))
    assert len(scalars(run, "val/mse")) == 2
    assert len(csv_column(root / "csv" / "version_0", "val/mse")) == 2
    assert not (root / "lightning_logs" / "version_1").exists()


def test_the_language_model_also_gets_the_monitor_beside_its_sample_writer(tmp_path: Path) -> None:
    """CharLanguageModel adds callbacks of its own (SampleWriter): it extends the base task's list, not replaces it."""
    from bnlstm_lit.callbacks import SampleWriter
    from bnlstm_lit.data.textfiles import TextFiles
    from bnlstm_lit.models.language import CHAR_RNN_SETTINGS
    from bnlstm_lit.tasks import CharLanguageModel

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("train", "valid", "test"):
        (corpus / f"{name}.txt").write_text("abcd efgh\n" * 20)
    data = TextFiles(str(corpus), seq_length=6, batch_size=4)
    model = CharLanguageModel(
        data.input_size, data.output_size, data.max_steps, rnn=CHAR_RNN_SETTINGS.replace(hidden_size=8),
        optimizer=partial(torch.optim.SGD, lr=LR0),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )  # fmt: skip
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                        logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert sum(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks) == 1  # type: ignore[attr-defined]
    assert any(isinstance(cb, SampleWriter) for cb in trainer.callbacks)  # type: ignore[attr-defined]
    assert csv_column(trainer.log_dir or "", LR) == pytest.approx([LR0, LR0 / 2])
