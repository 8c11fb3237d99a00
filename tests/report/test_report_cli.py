"""``bnlstm-lit report ...`` end to end, from tiny real runs made here through the training CLI.

Sequential MNIST (LSTM and BN-LSTM) and PTB characters (BN-LSTM) are fitted with the debug overlay on the shared
offline data; every figure's PNG is checked for its size and its JSON against the values read independently from
the runs' event files / metrics.csv (and against the trainer's own metrics).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from bnlstm_lit.cli import BNLSTMCLI, main
from bnlstm_lit.data.mnist import MNIST_FILES
from bnlstm_lit.report import analysis
from bnlstm_lit.report.cli import mnist_batch
from bnlstm_lit.report.figures import png_size

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DEBUG = CONFIGS / "debug.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SIZE = (800, 500)
# a test from a checkpoint in another root cannot reload the ModelCheckpoint's bookkeeping, and says so
RELOAD_WARNING = "ignore:The dirpath has changed:UserWarning"

pytestmark = pytest.mark.filterwarnings(RELOAD_WARNING)


# ------------------------------------------------------------------------------------------------------------ helpers


def call_main(args: list[str]) -> BNLSTMCLI | None:
    """``bnlstm_lit.cli.main(args)`` with one intra-op thread and a neutral ``sys.argv``."""
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    sys.argv = ["bnlstm-lit"]  # LightningCLI warns when args= and a foreign command line (pytest's) are both given
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv


def train(subcommand: str, config: str, root: Path, data_dir: Path, *extra: str) -> BNLSTMCLI:
    """``bnlstm-lit <subcommand> --config configs/<config> --config configs/debug.yaml ...`` in-process."""
    cli = call_main(
        [
            subcommand,
            f"--config={CONFIGS / config}",
            f"--config={DEBUG}",
            f"--trainer.default_root_dir={root}",
            f"--data.init_args.data_dir={data_dir}",
            *QUIET,
            *extra,
        ]
    )
    assert cli is not None
    return cli


def report(*args: str) -> None:
    """``bnlstm-lit report ...`` through the package's entry point (``bnlstm_lit.cli.main``)."""
    assert call_main(["report", *args]) is None


def report_fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``bnlstm-lit report ...`` that must exit with status 2; returns its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        call_main(["report", *args])
    assert exc.value.code == 2
    return capsys.readouterr().err


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``folder``, read straight from the records (not via the report)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number = value.simple_value
                elif kind == "tensor":
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.size != 1 or array.dtype.kind not in "fi":
                        continue
                    number = array.item()
                else:
                    continue
                out.setdefault(value.tag, []).append((int(event.step), float(number)))
    return {tag: sorted(points) for tag, points in out.items()}


def csv_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every value of the ``metrics.csv`` files under ``folder``, read with the csv module."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for name, text in row.items():
                    if name not in ("step", "epoch") and text:
                        out.setdefault(name, []).append((int(row["step"]), float(text)))
    return out


def read_json(png: Path) -> dict[str, Any]:
    return json.loads(png.with_suffix(".json").read_text())


def log_dir(cli: BNLSTMCLI) -> Path:
    assert cli.trainer.log_dir is not None
    return Path(cli.trainer.log_dir)


def metric(cli: BNLSTMCLI, name: str) -> float:
    return float(cli.trainer.callback_metrics[name])


# ----------------------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def mnist_dir(shared_data: Path) -> Path:
    path = shared_data / "mnist"
    if not all((path / name).is_file() for name in MNIST_FILES):
        pytest.skip(f"shared MNIST files not found in {path}")
    return path


@pytest.fixture(scope="module")
def ptb_dir(shared_data: Path) -> Path:
    path = shared_data / "ptb"
    if not (path / "ptb.char.train.txt").is_file():
        pytest.skip(f"shared PTB characters not found in {path}")
    return path


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> dict[str, Any]:
    """Tiny sequential-MNIST fits (LSTM, BN-LSTM: batch 8, hidden 16, 4 steps, validation every 2) and a test of
    the BN-LSTM from its best checkpoint (4 test batches), each logging with the CLI's default logger."""
    root = tmp_path_factory.mktemp("mnist")
    fit_args = ["--trainer.limit_train_batches=4", "--trainer.val_check_interval=2"]
    lstm = train("fit", "smnist_lstm.yaml", root / "lstm", mnist_dir, *fit_args)
    flow = '--trainer.callbacks+={"class_path": "bnlstm_lit.callbacks.GradientFlow", "init_args": {"steps": [0, 3]}}'
    bn = train("fit", "smnist_bnlstm.yaml", root / "bnlstm", mnist_dir, *fit_args, flow)
    for cli in (lstm, bn):
        assert isinstance(cli.trainer.logger, TensorBoardLogger)  # the CLI's default logger
        assert cli.trainer.global_step == 4
    assert bn.trainer.checkpoint_callback is not None
    bn_ckpt = Path(bn.trainer.checkpoint_callback.best_model_path)
    assert lstm.trainer.checkpoint_callback is not None
    lstm_ckpt = Path(lstm.trainer.checkpoint_callback.best_model_path)
    bn_test = train(
        "test",
        "smnist_bnlstm.yaml",
        root / "bnlstm_test",
        mnist_dir,
        f"--ckpt_path={bn_ckpt}",
        "--trainer.limit_train_batches=4",  # population statistics from 4 training batches
        "--trainer.limit_test_batches=4",
    )
    return {
        "lstm": lstm,
        "bn": bn,
        "bn_test": bn_test,
        "lstm_dir": log_dir(lstm),
        "bn_dir": log_dir(bn),
        "bn_test_dir": log_dir(bn_test),
        "bn_ckpt": bn_ckpt,
        "lstm_ckpt": lstm_ckpt,
    }


@pytest.fixture(scope="module")
def ptb_runs(tmp_path_factory: pytest.TempPathFactory, ptb_dir: Path) -> dict[str, Any]:
    """A tiny PTB character BN-LSTM fit (TensorBoard), then from its checkpoint the length sweep (L = 20, 40; a CSV
    logger) and the full-test protocol (TensorBoard), each in its own folder."""
    root = tmp_path_factory.mktemp("ptb")
    fit = train("fit", "ptb_bnlstm.yaml", root / "fit", ptb_dir)
    assert isinstance(fit.trainer.logger, TensorBoardLogger)
    assert fit.trainer.checkpoint_callback is not None
    ckpt = Path(fit.trainer.checkpoint_callback.best_model_path)
    sweep = train(
        "test",
        "ptb_bnlstm.yaml",
        root / "sweep",
        ptb_dir,
        f"--ckpt_path={ckpt}",
        "--data.init_args.test_protocol=sweep",
        "--data.init_args.sweep_lengths=[20,40]",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={root / 'sweep'}",
    )
    assert isinstance(sweep.trainer.logger, CSVLogger)
    full = train(
        "test",
        "ptb_bnlstm.yaml",
        root / "full",
        ptb_dir,
        f"--ckpt_path={ckpt}",
        "--data.init_args.full_chunk_length=50",
    )
    return {
        "fit": fit,
        "sweep": sweep,
        "full": full,
        "fit_dir": log_dir(fit),
        "sweep_dir": log_dir(sweep),
        "full_dir": log_dir(full),
        "ckpt": ckpt,
    }


@pytest.fixture
def out(tmp_path: Path, in_tmp_path: Path) -> Iterator[Path]:
    """An output folder; the report commands run inside tmp_path."""
    yield tmp_path / "report"


# ----------------------------------------------------------------------------------------------------------- Fig. 2


def test_curves_of_two_mnist_runs(mnist_runs: dict[str, Any], out: Path) -> None:
    png = out / "fig2.png"
    report(
        "curves",
        "--run", f"LSTM={mnist_runs['lstm_dir']}",
        "--run", f"BN-LSTM={mnist_runs['bn_dir']}",
        "--metric", "val/acc",
        "--out", str(png),
        "--title", "Sequential MNIST",
    )  # fmt: skip
    assert png.is_file() and png_size(png) == SIZE
    data = read_json(png)
    assert data["metric"] == "val/acc"
    assert set(data["curves"]) == {"LSTM", "BN-LSTM"}  # (the JSON sorts its keys)
    for label, key in (("LSTM", "lstm"), ("BN-LSTM", "bn")):
        logged = tensorboard_scalars(mnist_runs[f"{key}_dir"])["val/acc"]
        assert len(logged) == 2  # validated twice: after training steps 2 and 4
        curve = data["curves"][label]
        assert list(zip(curve["steps"], curve["values"], strict=True)) == logged
        assert curve["steps"] == [1, 3]
        assert curve["values"][-1] == metric(mnist_runs[key], "val/acc")  # the trainer's last validation


def test_curves_label_comes_from_the_config_when_not_given(mnist_runs: dict[str, Any], out: Path) -> None:
    png = out / "unlabelled.png"
    report("curves", "--run", str(mnist_runs["bn_dir"]), "--run", str(mnist_runs["lstm_dir"]), "--metric", "val/loss",
           "--out", str(png))  # fmt: skip
    data = read_json(png)
    assert set(data["curves"]) == {"smnist BN-LSTM", "smnist LSTM"}
    logged = tensorboard_scalars(mnist_runs["lstm_dir"])["val/loss"]
    assert data["curves"]["smnist LSTM"] == {"steps": [s for s, _ in logged], "values": [v for _, v in logged]}


# ---------------------------------------------------------------------------------------------------------- Fig. 3b


def test_sweep_of_a_ptb_run(ptb_runs: dict[str, Any], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = out / "sweep.png"
    report("sweep", "--run", f"BN-LSTM={ptb_runs['fit_dir']}", "--run", f"BN-LSTM={ptb_runs['sweep_dir']}",
           "--out", str(png))  # fmt: skip
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.is_file() and png_size(png) == SIZE
    sweeps = read_json(png)["sweeps"]
    assert set(sweeps) == {"BN-LSTM (population statistics)", "BN-LSTM (batch statistics)"}
    logged = csv_scalars(ptb_runs["sweep_dir"])
    for kind in ("population", "batch"):
        line = sweeps[f"BN-LSTM ({kind} statistics)"]
        assert set(line) == {"20", "40"}
        for length in (20, 40):
            name = f"test/bpc_L{length}_{kind}"
            assert [v for _, v in logged[name]] == [line[str(length)]]
            assert line[str(length)] == metric(ptb_runs["sweep"], name)
            assert 0.0 < line[str(length)] < 8.0


# ----------------------------------------------------------------------------------------------------------- App. A


def test_stats_of_a_bn_checkpoint(mnist_runs: dict[str, Any], out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = mnist_runs["bn_ckpt"]
    png = out / "stats.png"
    report("stats", "--checkpoint", str(ckpt), "--out", str(png), "--units", "5")
    printed = capsys.readouterr().out
    assert png.is_file() and png_size(png) == SIZE
    statistics = read_json(png)["statistics"]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    sites = {key[: -len(".running_mean")] for key, value in state.items() if key.endswith(".running_mean")}
    assert sites == {f"net.rnn.cells.0.bn_{s}" for s in "xhc"}
    assert set(statistics) == sites
    for site, entry in statistics.items():
        mean, var = state[f"{site}.running_mean"], state[f"{site}.running_var"]
        assert mean.shape[0] == 784  # one row per pixel step
        units = entry["units"]
        assert len(units) == 5 and units == sorted(set(units)) and units[-1] < mean.shape[1]
        assert torch.equal(torch.tensor(entry["mean"], dtype=torch.float64), mean[:, units].double())
        assert torch.equal(torch.tensor(entry["var"], dtype=torch.float64), var[:, units].double())
        assert entry["settle_step"] == analysis.settle_step(mean.double(), var.double())
        assert f"{site}: settles after step {entry['settle_step']}" in printed
    # a folder stands for its newest checkpoint (last.ckpt, saved after the best one of step 2)
    folder_png = out / "stats_folder.png"
    report("stats", "--checkpoint", str(ckpt.parent), "--out", str(folder_png))
    last = torch.load(ckpt.parent / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for site, entry in read_json(folder_png)["statistics"].items():
        expected = last[f"{site}.running_mean"][:, entry["units"]].double()
        assert torch.equal(torch.tensor(entry["mean"], dtype=torch.float64), expected)


def test_stats_of_an_lstm_checkpoint_is_refused(
    mnist_runs: dict[str, Any], out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = mnist_runs["lstm_ckpt"]
    err = report_fails(capsys, "stats", "--checkpoint", str(ckpt), "--out", str(out / "stats.png"))
    assert str(ckpt) in err and "no per-step BN statistics" in err
    assert not (out / "stats.png").exists()
    missing = out / "missing.ckpt"
    err = report_fails(capsys, "stats", "--checkpoint", str(missing), "--out", str(out / "stats.png"))
    assert str(missing) in err


def test_stats_of_a_file_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint\n")
    err = report_fails(capsys, "stats", "--checkpoint", str(bogus), "--out", str(tmp_path / "stats.png"))
    assert str(bogus) in err


# ----------------------------------------------------------------------------------------------------------- Fig. 1


def test_gamma_figures(mnist_dir: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps, batch, hidden = 200, 32, 32
    report("gamma", "--mnist", str(mnist_dir), "--out", str(out), "--steps", str(steps), "--batch-size", str(batch),
           "--hidden-size", str(hidden), "--gammas", "0.1,1.0")  # fmt: skip
    printed = capsys.readouterr().out
    for name in ("gradient_flow.png", "tanh_derivative.png"):
        assert (out / name).is_file() and png_size(out / name) == SIZE
    norms = read_json(out / "gradient_flow.png")["gradient_norms"]
    assert set(norms) == {"0.1", "1"}
    small, large = norms["0.1"], norms["1"]
    assert len(small) == len(large) == steps and all(v > 0 and math.isfinite(v) for v in small + large)
    # γ = 0.1: nearly constant over time (measured: max/min 12 here; the γ = 1 curve spans ~1e7)
    assert max(small) / min(small) < 50
    # γ = 1: the gradient explodes backwards in time at initialization (measured t=0 1.5e5 vs t=T-1 1.8e-2)
    assert large[0] / large[-1] > 1e4
    assert abs(math.log10(large[0] / small[0])) >= 4  # measured: 7.4 orders of magnitude at t=0
    assert max(large) / min(large) > 1e3 * max(small) / min(small)
    # the last step is next to the readout: the same gradient for both γ
    assert large[-1] == pytest.approx(small[-1], rel=0.1)
    # the figure holds what the analysis computes for the same batch and seed
    inputs, targets = mnist_batch(mnist_dir, batch, steps, permute=False, seed=0)
    assert inputs.shape == (steps, batch, 1)
    expected = analysis.gradient_flow_vs_gamma(inputs, targets, [0.1, 1.0], hidden_size=hidden)
    assert small == pytest.approx(expected[0.1], rel=1e-5) and large == pytest.approx(expected[1.0], rel=1e-5)
    assert f"γ=0.1: ||dloss/dh_t|| t=0 {small[0]:.3e}" in printed and f"t=T-1 {large[-1]:.3e}" in printed

    tanh = read_json(out / "tanh_derivative.png")
    assert tanh == analysis.tanh_derivative_vs_std([i / 50 for i in range(51)])
    assert tanh["std"][0] == 0.0 and tanh["std"][-1] == 1.0 and tanh["mean"][0] == 1.0
    assert tanh["mean"][-1] == pytest.approx(0.6057, abs=0.01)


# ---------------------------------------------------------------------------------------------------- report build


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The results table of report.md: run label -> its cells."""
    section = markdown.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Run ")]
    return {cells[0]: cells for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}


def test_build_report(
    mnist_runs: dict[str, Any], ptb_runs: dict[str, Any], mnist_dir: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report(
        "build",
        "--run", f"LSTM={mnist_runs['lstm_dir']}",  # fitted, never tested
        "--run", f"BN-LSTM={mnist_runs['bn_dir']}",
        "--run", f"BN-LSTM={mnist_runs['bn_test_dir']}",
        "--run", f"PTB BN-LSTM={ptb_runs['fit_dir']}",
        "--run", f"PTB BN-LSTM={ptb_runs['sweep_dir']}",
        "--run", f"PTB BN-LSTM={ptb_runs['full_dir']}",
        "--out", str(out),
        "--mnist", str(mnist_dir),
        "--gamma-steps", "100",
    )  # fmt: skip
    markdown_path = out / "report.md"
    assert f"wrote {markdown_path}" in capsys.readouterr().out
    markdown = markdown_path.read_text()
    for name in ("curves_smnist.png", "curves_ptb.png", "sweep.png", "statistics_BN_LSTM.png",
                 "statistics_PTB_BN_LSTM.png", "gradient_flow.png", "tanh_derivative.png"):  # fmt: skip
        assert png_size(out / name) == SIZE, name
        assert f"({name})" in markdown, name

    # the results table: the paper's number beside ours, read back from the test runs' logs
    test_acc = tensorboard_scalars(mnist_runs["bn_test_dir"])["test/acc"][-1][1]
    assert test_acc == metric(mnist_runs["bn_test"], "test/acc")
    bpc_full = tensorboard_scalars(ptb_runs["full_dir"])["test/bpc_full"][-1][1]
    assert bpc_full == metric(ptb_runs["full"], "test/bpc_full")
    rows = table_rows(markdown)
    assert list(rows) == ["LSTM", "BN-LSTM", "PTB BN-LSTM"]
    lstm, bn, ptb = rows["LSTM"], rows["BN-LSTM"], rows["PTB BN-LSTM"]
    # | Run | Task | Model | Metric | Ours | Paper | Difference | Settings | Run time | Step time |
    assert lstm[1:7] == ["Sequential MNIST", "LSTM", "– (accuracy %)", "–", "98.90", "–"]
    assert bn[1:7] == ["Sequential MNIST", "BN-LSTM", "test/acc (accuracy %)", f"{test_acc * 100:.2f}", "99.00",
                       f"{test_acc * 100 - 99.0:.2f}"]  # fmt: skip
    assert ptb[1:7] == ["Penn Treebank characters", "BN-LSTM", "test/bpc_full (bits/char)", f"{bpc_full:.2f}", "1.32",
                        f"{bpc_full - 1.32:.2f}"]  # fmt: skip
    for cells in (lstm, bn):
        assert "hidden=16" in cells[7] and "batch=8" in cells[7] and "steps=4" in cells[7]
    assert "γ=0.1" in bn[7] and "γ" not in lstm[7]
    assert all(":" in cells[8] for cells in (lstm, bn, ptb))  # a run time m:ss
    for cells in (lstm, bn):  # TensorBoard wall times: the median time of a training step
        assert cells[9].endswith(" s") and float(cells[9][:-2]) > 0, cells[9]

    # report.json agrees with the logs
    summary = json.loads((out / "report.json").read_text())
    results = {row["run"]: row for row in summary["results"]}
    assert results["LSTM"]["ours"] is None and results["LSTM"]["paper"] == 98.9
    assert results["BN-LSTM"]["metric"] == "test/acc" and results["BN-LSTM"]["paper"] == 99.0
    assert results["BN-LSTM"]["ours"] == pytest.approx(test_acc * 100, rel=1e-12)
    assert results["BN-LSTM"]["difference"] == pytest.approx(test_acc * 100 - 99.0, rel=1e-12)
    assert results["PTB BN-LSTM"]["metric"] == "test/bpc_full" and results["PTB BN-LSTM"]["paper"] == 1.32
    assert results["PTB BN-LSTM"]["ours"] == bpc_full
    logged = csv_scalars(ptb_runs["sweep_dir"])
    assert summary["sweep"] == {
        f"PTB BN-LSTM ({kind} statistics)": {str(n): logged[f"test/bpc_L{n}_{kind}"][-1][1] for n in (20, 40)}
        for kind in ("population", "batch")
    }
    assert set(summary["settle_steps"]) == {"BN-LSTM", "PTB BN-LSTM"}
    assert set(summary["gradient_norms_t0"]) == {f"{g / 10:g}" for g in range(1, 11)}
    gradient = read_json(out / "gradient_flow.png")["gradient_norms"]
    assert all(len(curve) == 100 for curve in gradient.values())
    assert summary["gradient_norms_t0"] == {g: curve[0] for g, curve in gradient.items()}

    # the GradientFlow callback's records of the BN fit (steps 0 and 3) in their own figure and section
    assert "## Gradient flow during training" in markdown
    flow = read_json(out / "gradient_flow_BN_LSTM.png")["gradient_norms"]
    written = sorted((mnist_runs["bn_dir"] / "diagnostics").glob("gradient_flow_step*.json"))
    assert [p.name for p in written] == ["gradient_flow_step0.json", "gradient_flow_step3.json"]
    expected = {}
    for path in written:
        record = json.loads(path.read_text())
        expected.update({f"step {record['step']}, {layer}": curve for layer, curve in record["norms"].items()})
    assert flow == expected and all(len(curve) == 784 for curve in flow.values())
    assert png_size(out / "gradient_flow_BN_LSTM.png") == SIZE

    # the convergence figures hold the validation curves of the logs (the test folders add none)
    curves = read_json(out / "curves_smnist.png")
    assert curves["metric"] == "val/acc" and set(curves["curves"]) == {"LSTM", "BN-LSTM"}
    logged_bn = tensorboard_scalars(mnist_runs["bn_dir"])["val/acc"]
    assert curves["curves"]["BN-LSTM"] == {"steps": [s for s, _ in logged_bn], "values": [v for _, v in logged_bn]}
    ptb_curve = read_json(out / "curves_ptb.png")["curves"]["PTB BN-LSTM"]
    assert ptb_curve["values"] == [v for _, v in tensorboard_scalars(ptb_runs["fit_dir"])["val/bpc"]]
    # the sweep table lists both statistics kinds at both lengths
    for kind in ("population", "batch"):
        values = " | ".join(f"{logged[f'test/bpc_L{n}_{kind}'][-1][1]:.3f}" for n in (20, 40))
        assert f"| PTB BN-LSTM ({kind} statistics) | {values} |" in markdown
    assert "98.9" in markdown and "1.32" in markdown


# ------------------------------------------------------------------------------------------------------------ errors


def test_curves_of_a_missing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent_dir"
    err = report_fails(capsys, "curves", "--run", str(missing), "--metric", "val/acc", "--out", str(tmp_path / "c.png"))
    assert str(missing) in err and "bnlstm-lit report curves: error" in err
    assert not (tmp_path / "c.png").exists()


def test_curves_of_an_unknown_metric_lists_the_logged_ones(
    mnist_runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = report_fails(capsys, "curves", "--run", f"LSTM={mnist_runs['lstm_dir']}", "--metric", "val/nope",
                       "--out", str(tmp_path / "c.png"))  # fmt: skip
    assert "val/nope" in err and "'val/acc'" in err and "'val/loss'" in err


def test_sweep_of_a_run_without_sweep(
    mnist_runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = report_fails(capsys, "sweep", "--run", f"LSTM={mnist_runs['lstm_dir']}", "--out", str(tmp_path / "s.png"))
    assert "no length sweep" in err and "LSTM" in err and "test_protocol=sweep" in err


def test_gamma_without_mnist_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    err = report_fails(capsys, "gamma", "--mnist", str(empty), "--out", str(tmp_path / "out"))
    assert "train-images-idx3-ubyte.gz" in err and str(empty) in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_gamma_with_bad_steps(mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = report_fails(capsys, "gamma", "--mnist", str(mnist_dir), "--out", str(tmp_path), "--steps", "785")
    assert "--steps must be in [1, 784]" in err


@pytest.mark.parametrize("gammas", ["0,-1", "0.1,abc", ","])
def test_bad_gammas_are_an_argparse_error(gammas: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        call_main(["report", "gamma", "--mnist", str(tmp_path), "--out", str(tmp_path), f"--gammas={gammas}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--gammas" in err and repr(gammas) in err


def test_report_without_subcommand_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        call_main(["report"])
    assert exc.value.code == 2
    assert "gamma" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------- subprocess


def test_python_m_report_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bnlstm_lit", "report", "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "bnlstm-lit report" in done.stdout
    for subcommand in ("gamma", "curves", "sweep", "stats", "build"):
        assert subcommand in done.stdout
