"""Configuration checks made before any download or training, the trainer presets, and DDP-readiness of every
shipped config (every parameter receives a gradient: DDP without find_unused_parameters fails otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from bnlstm_lit.cli import BNLSTMCLI, check_monitors
from bnlstm_lit.nn import BNLSTMSettings
from offline_data import data_root

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEBUG = CONFIGS / "debug.yaml"
EXPERIMENTS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "debug.yaml")
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SHARED = data_root()  # the offline data copies (tests/offline_data.py)
DATA_ARGS = {  # for the configs that read files
    "mnist": [f"--data.init_args.data_dir={SHARED / 'mnist'}"],
    "ptb": [f"--data.init_args.data_dir={SHARED / 'ptb'}"],
    "text8": [f"--data.init_args.data_dir={SHARED / 'text8'}", "--data.init_args.archive=text8_prefix.zip",
              "--data.init_args.check_canonical=false"],
}  # fmt: skip


def data_args(config: Path, request: pytest.FixtureRequest | None = None) -> list[str]:
    init_args = yaml.safe_load(config.read_text())["data"].get("init_args", {})
    if "data_dir" not in init_args:
        return []
    corpus = Path(str(init_args["data_dir"])).name
    if corpus == "cnn":  # no real corpus offline: a generated one in the exact format
        assert request is not None
        return [
            f"--data.init_args.data_dir={request.getfixturevalue('cnn_corpus')}",
            "--data.init_args.completeness=off",
        ]
    if not (SHARED / corpus).is_dir():
        pytest.skip(f"{corpus} data not found in {SHARED / corpus}")
    return DATA_ARGS[corpus]


def cli(args: list[str], run: bool = True) -> BNLSTMCLI:
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    sys.argv = ["bnlstm-lit"]
    try:
        return BNLSTMCLI(args=args, run=run)
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv


# ---- monitors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_shipped_config_monitors_metrics_its_task_logs(
    config: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    made = cli(["--config", str(config), "--config", str(DEBUG), f"--trainer.default_root_dir={tmp_path}",
                *data_args(config, request)], run=False)  # fmt: skip
    known = made.model.monitorable_metrics()
    monitors = [cb.monitor for cb in made.trainer.callbacks if getattr(cb, "monitor", None)]
    assert monitors, f"{config.name}: expected a monitored checkpoint"
    assert set(monitors) <= known
    check_monitors(made.model, made.trainer)  # does not raise


def test_a_monitor_typo_is_an_error_before_any_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PTB with download on into an empty folder: the monitor is checked first, so nothing is fetched."""
    from bnlstm_lit.data import PTBChar

    monkeypatch.setattr(PTBChar, "mirrors", (f"file://{tmp_path}/nonexistent/simple-examples.tgz",))  # never online
    data_dir = tmp_path / "ptb"
    with pytest.raises(ValueError, match=r"trainer\.callbacks\[\d\] \(EarlyStopping\)\.monitor is 'val/bcp'.*val/bpc"):
        cli(["fit", "--config", str(CONFIGS / "ptb_bnlstm.yaml"), "--config", str(DEBUG), *QUIET,
             f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.data_dir={data_dir}",
             "--data.init_args.download=true",
             "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/bcp"])  # fmt: skip
    assert not data_dir.exists() or not any(data_dir.iterdir())


def test_a_scheduler_monitor_typo_names_the_model_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.init_args\.monitor is 'val/accuracy'.*val/acc"):
        cli(["fit", "--config", str(CONFIGS / "smnist_bnlstm.yaml"), "--config", str(DEBUG), *QUIET,
             f"--trainer.default_root_dir={tmp_path}", *data_args(CONFIGS / "smnist_bnlstm.yaml"),
             "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
             "--model.init_args.monitor=val/accuracy"])  # fmt: skip


def test_tasks_without_a_metric_list_are_not_checked() -> None:
    check_monitors(L.LightningModule(), L.Trainer(logger=False, callbacks=[L.pytorch.callbacks.EarlyStopping("x")]))


def tiny_task_and_data(task: str, tmp_path: Path) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Each task of the package on data small enough for a two-batch fit, with a tiny network."""
    from bnlstm_lit.data import AddingProblem, CNNQuestions, synthetic_corpus
    from bnlstm_lit.data.base import SequenceDataModule
    from bnlstm_lit.data.textfiles import TextFiles
    from bnlstm_lit.tasks import (
        CharLanguageModel,
        ReadingComprehension,
        SequenceClassification,
        SequenceRegression,
    )

    rnn = BNLSTMSettings(hidden_size=4)
    if task == "SequenceRegression":
        return SequenceRegression(2, 1, 6, rnn), AddingProblem(seq_len=6, train_size=16, val_size=8, batch_size=8)
    if task == "SequenceClassification":
        inputs, targets = torch.randn(16, 5, 3), torch.arange(16) % 4

        class Random(SequenceDataModule):
            input_size, output_size, max_steps = 3, 4, 5

            def train_dataloader(self) -> DataLoader:
                return DataLoader(TensorDataset(inputs, targets), batch_size=8)

            val_dataloader = train_dataloader

        return SequenceClassification(3, 4, 5, rnn), Random()
    if task == "CharLanguageModel":
        for split in ("train", "valid", "test"):
            (tmp_path / f"{split}.txt").write_text("the cat sat on the mat. " * 20)
        data = TextFiles(str(tmp_path), seq_length=6, batch_size=4)
        data.prepare_data()
        data.setup("fit")
        return CharLanguageModel(data.input_size, data.output_size, data.max_steps, rnn), data
    synthetic_corpus(tmp_path, 16, 8, 8, seed=0)
    cnn = CNNQuestions(str(tmp_path), completeness="off", batch_size=4)
    cnn.prepare_data()
    cnn.setup("fit")
    return ReadingComprehension(cnn.input_size, cnn.output_size, cnn.max_steps, rnn), cnn


@pytest.mark.parametrize(
    "task", ["SequenceRegression", "SequenceClassification", "CharLanguageModel", "ReadingComprehension"]
)
def test_a_task_logs_exactly_the_metrics_it_declares_monitorable(task: str, tmp_path: Path) -> None:
    """The names the CLI lets a callback monitor (derived from the task's metric objects) are the names a fit logs:
    a metric logged but not declared, or declared but never logged, fails here."""
    torch.manual_seed(0)
    model, data = tiny_task_and_data(task, tmp_path)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, data)
    assert set(trainer.callback_metrics) == model.monitorable_metrics()


# ---- trainer presets -------------------------------------------------------------------------------------------------
EXPECTED_PRESETS = {
    "single_device.yaml": (1, "auto"),
    "ddp.yaml": (1, "DDPStrategy"),
    "multinode.yaml": (2, "DDPStrategy"),
}


def test_trainer_presets_parse_with_an_experiment(tmp_path: Path) -> None:
    assert {p.name for p in PRESETS} == set(EXPECTED_PRESETS)
    for preset in PRESETS:
        done = subprocess.run(
            [sys.executable, "-m", "bnlstm_lit", "fit", f"--config={CONFIGS / 'ptb_bnlstm.yaml'}", f"--config={preset}",
             "--print_config"],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        trainer = yaml.safe_load(done.stdout)["trainer"]
        nodes, strategy = EXPECTED_PRESETS[preset.name]
        assert trainer["num_nodes"] == nodes
        named = trainer["strategy"] if isinstance(trainer["strategy"], str) else trainer["strategy"]["class_path"]
        assert named.endswith(strategy)
        if strategy == "DDPStrategy":
            assert trainer["strategy"]["init_args"]["find_unused_parameters"] is False


# ---- every parameter is used (DDP with find_unused_parameters=False) -------------------------------------------------
class UnusedParameters(L.Callback):
    """Names of parameters without a gradient after each backward."""

    def __init__(self) -> None:
        self.unused: list[list[str]] = []

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.unused.append([n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None])


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_parameter_of_every_shipped_config_gets_a_gradient(
    config: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    made = cli(["--config", str(config), "--config", str(DEBUG), f"--trainer.default_root_dir={tmp_path}",
                *data_args(config, request), "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
                "--trainer.logger=false", *QUIET], run=False)  # fmt: skip
    probe = UnusedParameters()
    made.trainer.callbacks.append(probe)
    made.trainer.fit(made.model, made.datamodule)
    assert len(probe.unused) == 2
    assert probe.unused == [[], []], f"{config.name}: parameters without a gradient: {probe.unused}"


def test_console_script_exits_zero_after_a_successful_fit(tmp_path: Path) -> None:
    """The console script pip generates runs ``sys.exit(main())``: main must return None, not the CLI object."""
    code = (
        "import sys; from bnlstm_lit.cli import main; "
        f"sys.argv = ['bnlstm-lit', 'fit', '--config={CONFIGS / 'adding_bnlstm.yaml'}', '--config={DEBUG}', "
        f"'--trainer.default_root_dir={tmp_path}', '--trainer.enable_progress_bar=false', "
        "'--trainer.limit_train_batches=2', '--trainer.limit_val_batches=1']; sys.exit(main())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    assert "BNLSTMCLI object" not in done.stdout + done.stderr
