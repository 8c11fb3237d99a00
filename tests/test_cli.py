"""The command line end to end: every shipped config runs, checkpoints are reused, custom classes plug in, errors.

Every run combines its config with ``configs/debug.yaml`` (a few small batches, a narrow network) and writes into a
temporary folder. MNIST configs read the real files in the offline data folder (tests/offline_data.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import custom_task  # importable because tests/ has no __init__.py: pytest puts tests/ on sys.path
from bnlstm_lit.callbacks import PopulationStatistics, PredictionWriter
from bnlstm_lit.cli import BNLSTMCLI, main
from bnlstm_lit.data import PermutedMNIST
from bnlstm_lit.data.mnist import MNIST_FILES, mnist_permutation
from bnlstm_lit.nn import BNLSTMSettings, batchnorm_sites
from bnlstm_lit.tasks import CharLanguageModel, ReadingComprehension, SequenceClassification

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEBUG = CONFIGS / "debug.yaml"
EXPERIMENTS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "debug.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
DEBUG_TRAINER = yaml.safe_load(DEBUG.read_text())["trainer"]
DEBUG_BATCH = yaml.safe_load(DEBUG.read_text())["data"]["init_args"]["batch_size"]


def test_there_are_configs_to_test() -> None:
    names = {p.name for p in EXPERIMENTS}
    assert {"adding_bnlstm.yaml", "adding_lstm.yaml", "smnist_bnlstm.yaml", "pmnist_bnlstm.yaml"} <= names
    assert {"ptb_bnlstm.yaml", "ptb_lstm.yaml", "text8_bnlstm.yaml", "text8_lstm.yaml"} <= names


#: data_dir of a shipped config (its last part) -> the shared offline copy and any extra arguments it needs
SHARED_DATA: dict[str, tuple[str, list[str]]] = {
    "mnist": ("mnist", []),
    "ptb": ("ptb", []),
    # only the first 6.9M characters of text8 are available offline: not the canonical archive
    "text8": ("text8", ["--data.init_args.archive=text8_prefix.zip", "--data.init_args.check_canonical=false"]),
}


def data_args(config: Path, request: pytest.FixtureRequest | None) -> list[str]:
    """``--data.init_args.data_dir`` pointing at the shared copy (MNIST, PTB, text8) for configs that read files.

    The ``shared_data`` fixture is requested only here, so the adding configs run where the shared copy is absent.
    """
    init_args = yaml.safe_load(config.read_text())["data"].get("init_args", {})
    if "data_dir" not in init_args:
        return []
    corpus = Path(str(init_args["data_dir"])).name
    assert request is not None, f"{config.name} reads {corpus}: pass request"
    if corpus == "cnn":  # no real corpus offline: a generated one in the exact format
        return [
            f"--data.init_args.data_dir={request.getfixturevalue('cnn_corpus')}",
            "--data.init_args.completeness=off",
        ]
    assert corpus in SHARED_DATA, f"{config.name}: unknown data_dir {init_args['data_dir']}"
    folder, extra = SHARED_DATA[corpus]
    path = request.getfixturevalue("shared_data") / folder
    if corpus == "mnist" and not all((path / name).is_file() for name in MNIST_FILES):
        pytest.skip(f"shared MNIST files not found in {path}")
    if not path.is_dir():
        pytest.skip(f"shared {corpus} data not found in {path}")
    return [f"--data.init_args.data_dir={path}", *extra]


def call_main(args: list[str]) -> BNLSTMCLI:
    """``bnlstm_lit.cli.main(args)`` with one intra-op thread and a neutral ``sys.argv``."""
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    sys.argv = ["bnlstm-lit"]  # LightningCLI warns when args= and a foreign command line (pytest's) are both given
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv


def run(
    subcommand: str, config: Path, root: Path, *extra: str, request: pytest.FixtureRequest | None = None
) -> BNLSTMCLI:
    """``bnlstm-lit <subcommand> --config <config> --config configs/debug.yaml ...`` in-process."""
    return call_main(
        [
            subcommand,
            f"--config={config}",
            f"--config={DEBUG}",
            f"--trainer.default_root_dir={root}",
            *QUIET,
            *data_args(config, request),
            *extra,
        ]
    )


def finite(value: Any) -> bool:
    return math.isfinite(float(value))


@pytest.fixture(scope="module")
def fitted(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Callable[[Path], tuple[BNLSTMCLI, Path]]:
    """``fit`` of a config with the debug overlay, run once per module; returns (cli, checkpoint path)."""
    cache: dict[str, tuple[BNLSTMCLI, Path]] = {}

    def fit(config: Path) -> tuple[BNLSTMCLI, Path]:
        if config.name not in cache:
            root = tmp_path_factory.mktemp(config.stem)
            cli = run("fit", config, root, request=request)
            assert cli.trainer.checkpoint_callback is not None
            cache[config.name] = (cli, Path(cli.trainer.checkpoint_callback.best_model_path))
        return cache[config.name]

    return fit


# ------------------------------------------------------------------------------------------------- every config fits


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_config_fits_with_the_debug_overlay(config: Path, fitted: Callable, in_tmp_path: Path) -> None:
    cli, ckpt = fitted(config)
    trainer = cli.trainer
    # the overlay took effect, and the run happened where we said (not in runs/ of the config)
    assert trainer.max_epochs == 1 and trainer.global_step == DEBUG_TRAINER["limit_train_batches"]
    assert cli.datamodule.hparams["batch_size"] == DEBUG_BATCH
    debug_rnn = yaml.safe_load(DEBUG.read_text())["model"]["init_args"]["rnn"]
    assert cli.model.hparams["rnn"]["hidden_size"] == debug_rnn["hidden_size"]
    assert ckpt.is_file() and ckpt.suffix == ".ckpt"
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()
    assert Path(trainer.default_root_dir) in log_dir.parents and ckpt.is_relative_to(trainer.default_root_dir)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == yaml.safe_load(config.read_text())["model"]["class_path"]
    # sizes came from the DataModule, not from the YAML
    for name in ("input_size", "output_size", "max_steps"):
        assert cli.model.hparams[name] == getattr(cli.datamodule, name)
    metrics = trainer.callback_metrics
    assert "val/loss" in metrics and finite(metrics["val/loss"]) and finite(metrics["train/loss"])
    if isinstance(cli.model, CharLanguageModel):
        metric = "val/bpc"
    elif isinstance(cli.model, ReadingComprehension):
        metric = "val/error"
    else:
        metric = "val/acc" if isinstance(cli.model, SequenceClassification) else "val/mse"
    assert metric in metrics and finite(metrics[metric])
    # the checkpoint is loadable and holds the BN statistics when the model has BN sites
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    has_bn = bool(batchnorm_sites(cli.model))
    normalized = (
        cli.model.hparams["variant"] != "lstm"
        if "variant" in cli.model.hparams
        else cli.model.hparams["rnn"]["normalize"]
    )
    assert has_bn == normalized
    assert has_bn == any(key.endswith("running_mean") for key in state)
    assert not list(in_tmp_path.iterdir()), "the run wrote into the working directory"


# ------------------------------------------------------------------------------------- validate / test / predict


# a run from a checkpoint in another root cannot reload the ModelCheckpoint's bookkeeping, and says so: expected here
RELOAD_WARNING = "ignore:The dirpath has changed:UserWarning"


@pytest.mark.filterwarnings(RELOAD_WARNING)
@pytest.mark.parametrize("config_name", ["smnist_bnlstm.yaml", "adding_bnlstm.yaml"])
def test_validate_test_predict_from_a_checkpoint(
    config_name: str, fitted: Callable, request: pytest.FixtureRequest, tmp_path: Path, in_tmp_path: Path
) -> None:
    config = CONFIGS / config_name
    fit_cli, ckpt = fitted(config)
    classification = isinstance(fit_cli.model, SequenceClassification)
    metric = "acc" if classification else "mse"

    val = run("validate", config, tmp_path / "validate", f"--ckpt_path={ckpt}", request=request)
    assert finite(val.trainer.callback_metrics["val/loss"]) and f"val/{metric}" in val.trainer.callback_metrics
    # validate restored the trained weights, not a fresh initialization
    fit_state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in val.model.state_dict().items():
        if key in fit_state:
            assert torch.equal(value.cpu(), fit_state[key]), key

    test = run("test", config, tmp_path / "test", f"--ckpt_path={ckpt}", request=request)
    metrics = test.trainer.callback_metrics
    assert f"test/{metric}" in metrics and finite(metrics[f"test/{metric}"]) and finite(metrics["test/loss"])
    if classification:
        assert 0.0 <= float(metrics["test/acc"]) <= 1.0
    # the shipped BN configs estimate population statistics before test, over the debug overlay's training batches
    sites = batchnorm_sites(test.model)
    assert sites and any(isinstance(cb, PopulationStatistics) for cb in test.trainer.callbacks)
    tracked = sites[0].num_batches_tracked  # (max_steps,): batches averaged into each step's statistics
    max_batches = next(cb.max_batches for cb in test.trainer.callbacks if isinstance(cb, PopulationStatistics))
    if max_batches is None:  # one training epoch as the trainer defines it: limit_train_batches of the overlay
        assert torch.all(tracked == DEBUG_TRAINER["limit_train_batches"]), tracked.unique()
    else:  # (whether limit_train_batches also bounds an explicit max_batches: see test_callbacks.py)
        assert torch.all(tracked == tracked[0]) and 0 < int(tracked[0]) <= max_batches, tracked.unique()

    pred = run("predict", config, tmp_path / "predict", f"--ckpt_path={ckpt}", request=request)
    path = Path(pred.trainer.log_dir) / "predictions.pt"
    assert path.is_file()
    writer = next(cb for cb in pred.trainer.callbacks if isinstance(cb, PredictionWriter))
    assert writer.last_path == path
    assert not list(path.parent.glob("*.part"))
    rows = DEBUG_TRAINER["limit_predict_batches"] * DEBUG_BATCH
    predictions = torch.load(path, weights_only=True)
    if classification:
        assert set(predictions) == {"prediction", "probabilities"}
        assert predictions["prediction"].shape == (rows,)
        assert predictions["probabilities"].shape == (rows, pred.datamodule.output_size)
        torch.testing.assert_close(predictions["probabilities"].sum(-1), torch.ones(rows))
        assert torch.equal(predictions["prediction"], predictions["probabilities"].argmax(-1))
    else:
        assert isinstance(predictions, torch.Tensor) and predictions.shape == (rows, 1)
        assert torch.isfinite(predictions).all()


# ------------------------------------------------------------------------------------- character language models


@pytest.mark.filterwarnings(RELOAD_WARNING)
@pytest.mark.parametrize("config_name", ["ptb_bnlstm.yaml", "text8_lstm.yaml"])
def test_language_model_test_protocols_and_sampling_from_a_checkpoint(
    config_name: str, fitted: Callable, request: pytest.FixtureRequest, tmp_path: Path, in_tmp_path: Path
) -> None:
    """The paper's test protocols and sampling, each through the CLI from a fitted checkpoint on the real corpus."""
    config = CONFIGS / config_name
    fit_cli, ckpt = fitted(config)
    has_bn = bool(batchnorm_sites(fit_cli.model))

    # 1. the whole test split as one sequence (bounded here by limit_test_batches: 2 chunks of 50 steps, batch 1)
    full = run(
        "test",
        config,
        tmp_path / "full",
        f"--ckpt_path={ckpt}",
        "--data.init_args.full_chunk_length=50",
        request=request,
    )
    metrics = full.trainer.callback_metrics
    assert set(metrics) == {"test/bpc_full"}
    assert 0.0 < float(metrics["test/bpc_full"]) < 8.0
    assert full.trainer.num_test_batches == [DEBUG_TRAINER["limit_test_batches"]]

    # 2. the length sweep: one loader per length, each with population and batch statistics
    sweep = run(
        "test",
        config,
        tmp_path / "sweep",
        f"--ckpt_path={ckpt}",
        "--data.init_args.test_protocol=sweep",
        "--data.init_args.sweep_lengths=[20,45]",
        request=request,
    )
    metrics = sweep.trainer.callback_metrics
    names = {f"test/bpc_L{n}_{s}" for n in (20, 45) for s in ("population", "batch")}
    assert set(metrics) == names and all(finite(metrics[name]) for name in names)
    assert (metrics["test/bpc_L20_population"] != metrics["test/bpc_L20_batch"]) == has_bn

    # 3. sampling: text after a priming string, at a temperature, saved by PredictionWriter
    pred = run(
        "predict",
        config,
        tmp_path / "predict",
        f"--ckpt_path={ckpt}",
        "--model.init_args.prime=the ",
        "--model.init_args.sample_length=30",
        "--model.init_args.num_samples=2",
        "--model.init_args.temperature=0.5",
        request=request,
    )
    samples = torch.load(Path(pred.trainer.log_dir) / "predictions.pt", weights_only=True)
    assert samples["ids"].shape == (2, 30) and samples["ids"].dtype == torch.long
    vocabulary, readable = pred.datamodule.vocabulary, pred.datamodule.corpus_to_text
    assert samples["text"] == [readable(vocabulary.decode(row)) for row in samples["ids"]]


def test_language_model_stateful_mode_fits(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Truncated BPTT from the CLI: contiguous streams, the state carried between training batches."""
    config = CONFIGS / "ptb_bnlstm.yaml"
    cli = run(
        "fit", config, tmp_path, "--data.init_args.mode=stateful", "--data.init_args.seq_length=20", request=request
    )
    assert cli.trainer.global_step == DEBUG_TRAINER["limit_train_batches"]
    assert finite(cli.trainer.callback_metrics["val/bpc"])
    h, c = cli.model._states["train"]  # the state carried out of the last training batch: detached, batch rows
    assert not h.requires_grad and h.shape == (1, DEBUG_BATCH, cli.model.hparams["rnn"]["hidden_size"])


def test_language_model_rejects_an_unknown_prime_character(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    config = CONFIGS / "text8_lstm.yaml"
    with pytest.raises(ValueError, match=r"prime \(model.init_args.prime\).*'!'"):
        run("predict", config, tmp_path, "--model.init_args.prime=hello!", request=request)


# --------------------------------------------------------------------------------------------------- permuted MNIST


# Not "=1": Trainer's limit_*_batches are typed Union[float, int], so the CLI parses "1" as 1.0 = the whole split.
FAST = ["--trainer.limit_train_batches=2", "--trainer.num_sanity_val_steps=0"]


@pytest.mark.filterwarnings(RELOAD_WARNING)
def test_permutation_is_restored_from_the_checkpoint(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    config = CONFIGS / "pmnist_bnlstm.yaml"
    fit = run("fit", config, tmp_path / "fit", *FAST, "--data.init_args.permutation_seed=3", request=request)
    seed3 = mnist_permutation("randperm", 3)
    assert isinstance(fit.datamodule, PermutedMNIST) and torch.equal(fit.datamodule.permutation, seed3)
    assert fit.trainer.checkpoint_callback is not None
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    assert torch.equal(torch.load(ckpt, weights_only=False)["PermutedMNIST"]["permutation"], seed3)

    with pytest.warns(UserWarning, match="permutation saved in the checkpoint"):
        test = run(
            "test",
            config,
            tmp_path / "test",
            *FAST,
            "--data.init_args.permutation_seed=5",
            f"--ckpt_path={ckpt}",
            request=request,
        )
    assert test.datamodule.permutation_seed == 5  # the argument was taken ...
    assert torch.equal(test.datamodule.permutation, seed3)  # ... but the saved permutation wins
    assert not torch.equal(seed3, mnist_permutation("randperm", 5))
    # and the loaders feed pixels in the restored order
    test_set = test.datamodule.test_set
    inputs, _ = next(iter(test.datamodule.test_dataloader()))
    expected = test_set.pixels[: inputs.shape[0]][:, seed3].float().div(255).unsqueeze(-1)
    assert torch.equal(inputs, expected)
    assert "test/acc" in test.trainer.callback_metrics


def test_paper_randint_permutation_runs(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    cli = run(
        "fit",
        CONFIGS / "pmnist_bnlstm.yaml",
        tmp_path,
        *FAST,
        "--data.init_args.permutation=paper_randint",
        request=request,
    )
    permutation = cli.datamodule.permutation
    assert torch.equal(permutation, mnist_permutation("paper_randint"))
    assert permutation.unique().numel() == 501  # drawn with replacement (the original code's index vector)
    assert finite(cli.trainer.callback_metrics["val/loss"])


# ------------------------------------------------------------------------------------- classes from outside the package


def test_custom_module_is_importable_from_tests() -> None:
    assert Path(custom_task.__file__).resolve().parent == Path(__file__).resolve().parent


@pytest.mark.parametrize("via", ["flags", "yaml"])
def test_custom_task_and_datamodule_by_class_path(via: str, in_tmp_path: Path) -> None:
    tmp_path = in_tmp_path
    if via == "flags":
        args = [
            "--model=custom_task.ParityTask",
            "--data=custom_task.ToyParity",
            "--data.init_args.seq_len=7",
            "--model.init_args.rnn.hidden_size=8",
            "--model.init_args.label_smoothing=0.2",
        ]
    else:
        config = {
            "seed_everything": 0,
            "model": {
                "class_path": "custom_task.ParityTask",
                "init_args": {
                    "rnn": {"hidden_size": 8},
                    "label_smoothing": 0.2,
                    "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
                },
            },
            "data": {"class_path": "custom_task.ToyParity", "init_args": {"seq_len": 7}},
        }
        (tmp_path / "parity.yaml").write_text(yaml.safe_dump(config))
        args = [f"--config={tmp_path / 'parity.yaml'}"]
    cli = call_main(
        [
            "fit",
            *args,
            "--trainer.max_epochs=2",
            "--trainer.log_every_n_steps=4",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            *QUIET,
        ]
    )
    assert type(cli.model) is custom_task.ParityTask and type(cli.datamodule) is custom_task.ToyParity
    assert cli.model.label_smoothing == 0.2
    # linked from the DataModule's properties (3 features, 2 classes, 7 steps); none of these is a default
    assert (cli.model.hparams["input_size"], cli.model.hparams["output_size"], cli.model.hparams["max_steps"]) == (
        3,
        2,
        7,
    )
    assert cli.model.net.readout.out_features == 2 and cli.model.net.rnn.input_size == 3
    assert all(site.max_steps == 7 for site in batchnorm_sites(cli.model))
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.current_epoch == 2
    assert {"train/loss", "val/loss", "val/acc", "val/ece"} <= set(metrics)
    assert finite(metrics["val/loss"]) and 0.0 <= float(metrics["val/ece"]) <= 1.0
    # the overridden loss is the one trained: label smoothing 0.2 on the logits of a validation batch
    batch = next(iter(cli.datamodule.val_dataloader()))
    cli.model.eval()
    with torch.no_grad():
        logits = cli.model(batch[0])
    expected = torch.nn.functional.cross_entropy(logits, batch[1], label_smoothing=0.2)
    assert torch.allclose(cli.model.loss(logits, batch[1]), expected)
    assert not torch.allclose(cli.model.loss(logits, batch[1]), torch.nn.functional.cross_entropy(logits, batch[1]))


# ------------------------------------------------------------------------------------------------------ subprocess


def python_m(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bnlstm_lit", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_python_m_print_config() -> None:
    result = python_m("fit", "--config", "configs/adding_bnlstm.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "class_path: bnlstm_lit.tasks.SequenceRegression" in result.stdout
    assert "class_path: bnlstm_lit.data.AddingProblem" in result.stdout
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["init_args"]["rnn"]["hidden_size"] == 64
    # linked sizes are not repeated in the printed config: they are derived from the data
    assert "input_size" not in printed["model"]["init_args"]


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_print_config_lists_every_network_setting(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The schema is typed down to the layer: ``model.init_args.rnn`` shows every BNLSTMSettings field, with the
    config's value where it sets one and the task's default (its default settings instance) elsewhere."""
    with pytest.raises(SystemExit) as done:
        main(["fit", f"--config={config}", "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    rnn = printed["init_args"]["rnn"]
    assert list(rnn) == [field.name for field in dataclasses.fields(BNLSTMSettings)]
    module, _, name = printed["class_path"].rpartition(".")
    task = getattr(importlib.import_module(module), name)
    default = inspect.signature(task).parameters["rnn"].default
    given = yaml.safe_load(config.read_text())["model"]["init_args"].get("rnn", {})
    assert rnn == {**dataclasses.asdict(default), **given}


def test_python_m_help() -> None:
    result = python_m("--help")
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


# -------------------------------------------------------------------------------------------------------- bad input


def test_unknown_config_key_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run("fit", CONFIGS / "adding_bnlstm.yaml", tmp_path, "--trainer.no_such_key=1")
    assert exc.value.code not in (0, None)
    assert "no_such_key" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    hiden_size: 8\n")  # a typo in a YAML
    with pytest.raises(SystemExit) as exc:
        run("fit", CONFIGS / "adding_bnlstm.yaml", tmp_path, f"--config={bad}")
    assert exc.value.code not in (0, None)
    assert "hiden_size" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()


def test_mnist_without_files_names_the_missing_ones(shared_data: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    present = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    for name in present:
        if not (shared_data / "mnist" / name).is_file():
            pytest.skip(f"MNIST files not found in {shared_data / 'mnist'}")
        (data_dir / name).symlink_to(shared_data / "mnist" / name)
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz, t10k-labels-idx1-ubyte\.gz") as exc:
        call_main(["fit", f"--config={CONFIGS / 'smnist_bnlstm.yaml'}", f"--config={DEBUG}", *QUIET,
              f"--trainer.default_root_dir={tmp_path / 'runs'}", f"--data.init_args.data_dir={data_dir}"])  # fmt: skip
    assert "train-images" not in str(exc.value)
    assert str(data_dir) in str(exc.value) and "download" in str(exc.value)


def test_batch_size_one_with_batch_norm_is_refused(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # the adding problem refuses it when the DataModule is built ...
    with pytest.raises(ValueError, match=r"batch_size must be at least 2, got 1"):
        run("fit", CONFIGS / "adding_bnlstm.yaml", tmp_path / "adding", "--data.init_args.batch_size=1")
    # ... MNIST accepts it (the LSTM can use it), and the BN-LSTM refuses it at the first training step
    with pytest.raises(ValueError, match=r"at least 2 sequences per batch.*batch of size 1 in training"):
        run(
            "fit",
            CONFIGS / "smnist_bnlstm.yaml",
            tmp_path / "mnist",
            "--data.init_args.batch_size=1",
            "--trainer.num_sanity_val_steps=0",
            request=request,
        )


CNN_VARIANTS = ("lstm", "bnlstm", "bn_everywhere", "bn_e_star", "bn_e_star_star")
#: overlay -> (the configs it is written for, the max_steps and hidden_size the combination must have)
OVERLAYS: dict[str, tuple[tuple[str, ...], int, int]] = {
    "ptb_short_cpu.yaml": (("ptb_lstm.yaml", "ptb_bnlstm.yaml"), 1000, 256),
    "mnist_short_cpu.yaml": (("pmnist_lstm.yaml", "pmnist_bnlstm.yaml", "smnist_bnlstm.yaml"), 400, 100),
    "cnn_synthetic_cpu.yaml": (tuple(f"cnn_{v}.yaml" for v in CNN_VARIANTS), 1500, 32),
}


@pytest.mark.slow  # ~2 min: instantiates every overlay x config; tests/test_overlays.py checks the same parse fast
def test_overlays_parse_with_the_configs_they_name(tmp_path: Path) -> None:
    """configs/overlays/*.yaml combine with the experiment configs they are written for (checked by --print_config)."""
    overlays = sorted((CONFIGS / "overlays").glob("*.yaml"))
    assert {overlay.name for overlay in overlays} == set(OVERLAYS), "add every overlay to OVERLAYS"
    for overlay in overlays:
        configs, max_steps, hidden_size = OVERLAYS[overlay.name]
        for config in configs:
            done = subprocess.run(
                [sys.executable, "-m", "bnlstm_lit", "fit", f"--config={CONFIGS / config}", f"--config={overlay}",
                 "--print_config"],
                capture_output=True, text=True, cwd=tmp_path, timeout=120,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
            printed = yaml.safe_load(done.stdout)
            assert printed["trainer"]["max_steps"] == max_steps
            assert printed["model"]["init_args"]["rnn"]["hidden_size"] == hidden_size
