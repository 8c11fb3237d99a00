"""Unit level: reading runs back (CSV and TensorBoard logs, configs), and the numbers behind the diagnostic figures.

Logs are made here with Lightning's own loggers at known steps, so every value read back is known exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from bnlstm_lit.nn import BNLSTM
from bnlstm_lit.report import analysis
from bnlstm_lit.report.runs import (
    Run,
    Scalar,
    default_label,
    experiment_of,
    load_runs,
    parse_run_argument,
    read_run,
    read_tensorboard_scalars,
    settings_of,
    sweep_of,
    variant_of,
)
from bnlstm_lit.report.runs import test_number as our_test_number  # not collected as a test


def config(data: str, normalize: bool = True, cell: str | None = None, flat: bool = False, **rnn: object) -> dict:
    """A LightningCLI-style saved config with a DataModule class path and the network's settings (``init_args.rnn``;
    ``flat``: directly in ``init_args``, as configs written before the settings were one group)."""
    settings: dict = {"normalize": normalize, **rnn}
    if cell is not None:
        settings["cell"] = cell
    args = settings if flat else {"rnn": settings}
    return {
        "model": {"class_path": "bnlstm_lit.tasks.SequenceClassification", "init_args": args},
        "data": {"class_path": data, "init_args": {"batch_size": 8}},
    }


def csv_log(root: Path, name: str, rows: list[tuple[int, dict[str, float]]]) -> Path:
    """A Lightning CSVLogger folder with ``rows`` logged at their steps; returns the logger's version folder."""
    logger = CSVLogger(str(root), name=name)
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)
    logger.save()
    return Path(logger.log_dir)


def tb_log(root: Path, name: str, rows: list[tuple[int, dict[str, float]]]) -> Path:
    """A Lightning TensorBoardLogger folder with ``rows`` logged at their steps; returns the version folder."""
    logger = TensorBoardLogger(str(root), name=name, default_hp_metric=False)
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")
    return Path(logger.log_dir)


def points(run: Run, metric: str) -> list[tuple[int, float]]:
    steps, values = run.curve(metric)
    return list(zip(steps, values, strict=True))


# ---------------------------------------------------------------------------------------------------- reading logs


def test_read_run_csv_logger_gives_exact_values_and_steps(tmp_path: Path) -> None:
    # 0.1 and 0.3 are not float32 numbers: the CSV round trip keeps the full double
    folder = csv_log(tmp_path, "csv", [(0, {"val/acc": 0.1}), (10, {"val/acc": 0.3, "train/loss": 2.5})])
    assert (folder / "metrics.csv").is_file()
    run = read_run([tmp_path / "csv"], "mine")
    assert run.label == "mine" and run.dirs == [tmp_path / "csv"]
    assert points(run, "val/acc") == [(0, 0.1), (10, 0.3)]
    assert points(run, "train/loss") == [(10, 2.5)]
    assert run.metric_names() == ["train/loss", "val/acc"]  # no "step" / "epoch" column
    assert run.last("val/acc") == 0.3 and run.last("nothing") is None
    assert run.last_step == 10
    assert all(v.wall_time is None for values in run.scalars.values() for v in values)
    assert run.config == {} and run.checkpoints == []


def test_read_run_tensorboard_logger_gives_exact_values_and_steps(tmp_path: Path) -> None:
    # float32-exact values: TensorBoard stores float32
    folder = tb_log(tmp_path, "tb", [(3, {"val/acc": 0.5}), (7, {"val/acc": 0.25, "val/loss": 1.5}), (9, {"x": -2.0})])
    assert list(folder.glob("events.out.tfevents.*"))
    run = read_run([folder])
    assert run.label == folder.name  # no label: the folder's name
    assert points(run, "val/acc") == [(3, 0.5), (7, 0.25)]
    assert points(run, "val/loss") == [(7, 1.5)]
    assert points(run, "x") == [(9, -2.0)]
    assert all(v.wall_time is not None and v.wall_time > 0 for values in run.scalars.values() for v in values)
    assert run.duration_s is not None and run.duration_s >= 0.0
    assert run.last_step == 9


def test_read_run_finds_config_and_checkpoints_recursively(tmp_path: Path) -> None:
    # steps= counts training steps (train/ metrics), not the later steps of other metrics
    folder = csv_log(tmp_path, "run", [(4, {"train/loss": 1.5}), (7, {"val/acc": 0.75})])
    saved = config("bnlstm_lit.data.PTBChar", normalize=False, hidden_size=16)
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    (folder / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, folder / "checkpoints" / "last.ckpt")
    run = read_run([tmp_path])  # searched below the given folder
    assert run.config == saved
    assert run.checkpoints == [folder / "checkpoints" / "last.ckpt"]
    assert run.experiment == "ptb" and run.variant == "LSTM"
    assert run.duration_s is not None and run.duration_s >= 0.0  # config -> metrics.csv span
    assert "hidden=16" in settings_of(run) and "batch=8" in settings_of(run) and "steps=5" in settings_of(run)
    assert "γ=" not in settings_of(run)  # an LSTM has no γ


def test_two_dirs_under_one_label_merge_in_step_order(tmp_path: Path) -> None:
    csv_dir = csv_log(tmp_path / "one", "csv", [(0, {"val/acc": 0.1}), (10, {"val/acc": 0.3})])
    tb_dir = tb_log(tmp_path / "two", "tb", [(5, {"val/acc": 0.5, "test/acc": 0.75})])
    other = csv_log(tmp_path / "three", "csv", [(1, {"val/acc": 0.9})])
    runs = load_runs([f"A={csv_dir}", f"B={other}", f"A={tb_dir}"])
    assert [r.label for r in runs] == ["A", "B"]
    merged = runs[0]
    assert merged.dirs == [csv_dir, tb_dir]
    assert points(merged, "val/acc") == [(0, 0.1), (5, 0.5), (10, 0.3)]
    assert merged.last("test/acc") == 0.75
    assert points(runs[1], "val/acc") == [(1, 0.9)]


def test_parse_run_argument(tmp_path: Path, in_tmp_path: Path) -> None:
    assert parse_run_argument("LSTM=runs/a") == ("LSTM", Path("runs/a"))
    assert parse_run_argument("BN-LSTM=x=y") == ("BN-LSTM", Path("x=y"))  # the first "=" separates
    assert parse_run_argument("runs/a") == (None, Path("runs/a"))
    assert parse_run_argument("=runs/a") == (None, Path("=runs/a"))  # no label
    (in_tmp_path / "lr=0.1").mkdir()  # an existing folder whose name has "=" is a folder, not LABEL=DIR
    assert parse_run_argument("lr=0.1") == (None, Path("lr=0.1"))


def test_load_runs_labels_from_the_config_or_the_folder(tmp_path: Path) -> None:
    labelled = csv_log(tmp_path / "a", "x", [(0, {"val/acc": 0.5})])
    (labelled / "config.yaml").write_text(yaml.safe_dump(config("bnlstm_lit.data.SequentialMNIST")))
    plain = csv_log(tmp_path / "b", "y", [(0, {"val/acc": 0.5})])
    assert default_label(labelled) == "smnist BN-LSTM"
    assert default_label(plain) == plain.name
    assert [r.label for r in load_runs([str(labelled), str(plain)])] == ["smnist BN-LSTM", plain.name]


def test_missing_or_empty_run_dir_is_a_file_not_found_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="no_such_run") as exc:
        read_run([missing])
    assert str(missing) in str(exc.value)
    with pytest.raises(FileNotFoundError) as exc:
        load_runs([f"A={missing}"])
    assert str(missing) in str(exc.value)

    empty = tmp_path / "empty_run"
    (empty / "version_0").mkdir(parents=True)
    (empty / "version_0" / "hparams.yaml").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="metrics.csv") as exc:
        read_run([empty])
    assert str(empty) in str(exc.value)
    with pytest.raises(FileNotFoundError) as exc:
        load_runs([str(empty)])
    assert str(empty) in str(exc.value)


def test_a_csv_without_step_column_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text("epoch,val/acc\n0,0.5\n")
    with pytest.raises(ValueError, match="step"):
        read_run([tmp_path])


def test_curve_of_an_unknown_metric_lists_the_logged_ones(tmp_path: Path) -> None:
    folder = csv_log(tmp_path, "csv", [(0, {"val/acc": 0.5, "val/loss": 1.0})])
    run = read_run([folder], "R")
    with pytest.raises(KeyError) as exc:
        run.curve("val/bpc")
    message = exc.value.args[0]
    assert "val/bpc" in message and "'R'" in message
    assert "['val/acc', 'val/loss']" in message


# ---------------------------------------------------------------------------------------------- configs and results


@pytest.mark.parametrize(
    ("data", "experiment"),
    [
        ("bnlstm_lit.data.SequentialMNIST", "smnist"),
        ("bnlstm_lit.data.PermutedMNIST", "pmnist"),
        ("bnlstm_lit.data.PTBChar", "ptb"),
        ("bnlstm_lit.data.Text8", "text8"),
        ("bnlstm_lit.data.AddingProblem", None),
        ("custom_task.ToyParity", None),
    ],
)
def test_experiment_of(data: str, experiment: str | None) -> None:
    assert experiment_of(config(data)) == experiment


def test_experiment_of_without_a_data_section() -> None:
    assert experiment_of({}) is None
    assert experiment_of({"data": "not a section"}) is None


@pytest.mark.parametrize(
    ("normalize", "cell", "variant"),
    [(True, None, "BN-LSTM"), (False, None, "LSTM"), (True, "lstm", "BN-LSTM"), (True, "tanh", "BN-RNN"),
     (False, "tanh", "RNN")],
)  # fmt: skip
def test_variant_of(normalize: bool, cell: str | None, variant: str) -> None:
    assert variant_of(config("bnlstm_lit.data.SequentialMNIST", normalize, cell)) == variant
    assert variant_of(config("bnlstm_lit.data.SequentialMNIST", normalize, cell, flat=True)) == variant  # older runs


def test_variant_of_defaults_to_bn_lstm() -> None:
    assert variant_of({}) == "BN-LSTM"


def make_run(cfg: dict, scalars: dict[str, list[tuple[int, float]]]) -> Run:
    return Run("R", [], {k: [Scalar(s, v) for s, v in pts] for k, pts in scalars.items()}, cfg)


def test_sweep_of_collects_population_and_batch_lengths() -> None:
    run = make_run(
        config("bnlstm_lit.data.PTBChar"),
        {
            "test/bpc_L200_population": [(0, 1.6)],
            "test/bpc_L100_population": [(0, 1.5)],
            "test/bpc_L100_batch": [(0, 1.7), (3, 1.75)],  # the last value counts
            "test/bpc_full": [(0, 1.4)],
            "test/bpc_Lx_batch": [(0, 9.0)],
            "val/bpc": [(1, 2.0)],
        },
    )
    sweep = sweep_of(run)
    assert sweep == {"batch": {100: 1.75}, "population": {100: 1.5, 200: 1.6}}
    assert list(sweep["population"]) == [100, 200]
    assert sweep_of(make_run({}, {"val/bpc": [(0, 2.0)]})) == {}


def test_test_number_is_in_the_papers_unit() -> None:
    smnist = make_run(config("bnlstm_lit.data.SequentialMNIST"), {"test/acc": [(0, 0.9912)]})
    metric, value = our_test_number(smnist)
    assert metric == "test/acc" and value == pytest.approx(99.12)
    # bits/char is not scaled, and the full-test number is preferred over the example one
    ptb = make_run(config("bnlstm_lit.data.PTBChar"), {"test/bpc": [(0, 1.5)], "test/bpc_full": [(0, 1.45)]})
    assert our_test_number(ptb) == ("test/bpc_full", 1.45)
    ptb_examples = make_run(config("bnlstm_lit.data.PTBChar"), {"test/bpc": [(0, 1.5)]})
    assert our_test_number(ptb_examples) == ("test/bpc", 1.5)
    assert our_test_number(make_run(config("bnlstm_lit.data.SequentialMNIST"), {"val/acc": [(0, 0.5)]})) is None
    assert our_test_number(make_run(config("bnlstm_lit.data.AddingProblem"), {"test/mse": [(0, 0.1)]})) is None


# ------------------------------------------------------------------------------------------------------- analysis


def test_settle_step_of_constant_statistics_is_zero() -> None:
    mean = torch.full((30, 4), 0.3, dtype=torch.float64)
    var = torch.full((30, 4), 2.0, dtype=torch.float64)
    assert analysis.settle_step(mean, var) == 0


@pytest.mark.parametrize("k", [1, 3, 9])
def test_settle_step_after_a_transient_in_the_first_k_steps(k: int) -> None:
    T, C = 30, 5
    generator = torch.Generator().manual_seed(k)
    mean = 0.01 * torch.randn(T, C, generator=generator, dtype=torch.float64)
    var = 1.0 + 0.01 * torch.rand(T, C, generator=generator, dtype=torch.float64)
    mean_transient, var_transient = mean.clone(), var.clone()
    mean_transient[:k] += 3.0  # 3 standard deviations away
    assert analysis.settle_step(mean_transient, var) == k
    var_transient[:k] *= 4.0  # the variance alone
    assert analysis.settle_step(mean, var_transient) == k
    assert analysis.settle_step(mean, var) == 0


def test_settle_step_is_T_when_the_last_step_is_off() -> None:
    mean = torch.zeros(10, 2, dtype=torch.float64)
    var = torch.ones(10, 2, dtype=torch.float64)
    mean[-1] = 5.0
    assert analysis.settle_step(mean, var) == 10


def test_tanh_derivative_vs_std() -> None:
    stds = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    data = analysis.tanh_derivative_vs_std(stds, samples=10_000)
    assert set(data) == {"std", "mean", "q10", "q90"}
    assert data["std"] == stds and all(len(data[k]) == len(stds) for k in data)
    assert data["mean"][0] == 1.0 and data["q10"][0] == 1.0 and data["q90"][0] == 1.0  # tanh'(0) = 1 exactly
    assert all(a > b for a, b in zip(data["mean"], data["mean"][1:], strict=False))  # decreasing in std
    # E[1 - tanh(z)^2] for z ~ N(0, 1) is 0.6057
    assert data["mean"][stds.index(1.0)] == pytest.approx(0.6057, abs=0.01)
    assert all(lo <= m <= hi for lo, m, hi in zip(data["q10"], data["mean"], data["q90"], strict=True))
    assert data == analysis.tanh_derivative_vs_std(stds, samples=10_000)  # seeded


def trained_state(cell: str = "lstm", num_layers: int = 1, T: int = 12, H: int = 6) -> dict[str, torch.Tensor]:
    """A BNLSTM's state dict after a few training batches (non-trivial running statistics)."""
    torch.manual_seed(0)
    rnn = BNLSTM(2, H, num_layers=num_layers, max_steps=T, cell=cell, momentum=0.5)
    rnn.train()
    with torch.no_grad():
        for _ in range(3):
            rnn(torch.randn(T, 5, 2) * 3.0 + 1.0)
    return rnn.state_dict()


def test_population_statistics_of_a_bnlstm_state_dict() -> None:
    state = trained_state(num_layers=2)
    stats = analysis.population_statistics(state, units=4, seed=3)
    expected_sites = [f"cells.{layer}.bn_{s}" for layer in (0, 1) for s in ("x", "h", "c")]
    assert list(stats) == expected_sites
    for site, entry in stats.items():
        mean, var = state[f"{site}.running_mean"], state[f"{site}.running_var"]
        assert mean.shape[0] == 12
        units = entry["units"]
        assert len(units) == 4 and units == sorted(set(units)) and 0 <= units[0] and units[-1] < mean.shape[1]
        assert torch.equal(torch.tensor(entry["mean"], dtype=torch.float64), mean[:, units].double())
        assert torch.equal(torch.tensor(entry["var"], dtype=torch.float64), var[:, units].double())
        assert entry["settle_step"] == analysis.settle_step(mean.double(), var.double())
        assert 0 <= entry["settle_step"] <= 12
    assert not torch.equal(state["cells.0.bn_x.running_mean"], torch.zeros(12, 24))  # statistics were tracked
    # the same draw for the same seed, another for another seed
    assert analysis.population_statistics(state, units=4, seed=3) == stats
    other = analysis.population_statistics(state, units=4, seed=4)
    assert any(other[s]["units"] != stats[s]["units"] for s in stats)


def test_population_statistics_keeps_every_unit_when_asked_for_more() -> None:
    state = trained_state(cell="tanh", H=3)
    stats = analysis.population_statistics(state, units=50)
    assert list(stats) == ["cells.0.bn_x", "cells.0.bn_h"]  # the tanh RNN has no cell BN
    assert all(entry["units"] == [0, 1, 2] for entry in stats.values())


def test_population_statistics_of_an_lstm_is_empty() -> None:
    assert analysis.population_statistics(BNLSTM(2, 4, max_steps=5, normalize=False).state_dict()) == {}


def test_gradient_flow_vs_gamma_small() -> None:
    torch.manual_seed(1)
    inputs = torch.rand(15, 6, 1)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    norms = analysis.gradient_flow_vs_gamma(inputs, targets, [0.5, 0.1], hidden_size=8)
    assert list(norms) == [0.5, 0.1]
    assert all(len(curve) == 15 and all(math.isfinite(v) and v > 0 for v in curve) for curve in norms.values())
    assert norms[0.5] != norms[0.1]  # γ changes the flow ...
    assert analysis.gradient_flow_vs_gamma(inputs, targets, [0.1], hidden_size=8)[0.1] == norms[0.1]  # ... seeded


def test_gradient_flow_vs_gamma_refuses_bad_input() -> None:
    inputs, targets = torch.rand(5, 3, 1), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="positive"):
        analysis.gradient_flow_vs_gamma(inputs, targets, [0.1, 0.0], hidden_size=4)
    with pytest.raises(ValueError, match=r"\(T, B, I\)"):
        analysis.gradient_flow_vs_gamma(inputs[..., 0], targets, [0.1], hidden_size=4)
    with pytest.raises(ValueError, match=r"targets must be \(B,\)"):
        analysis.gradient_flow_vs_gamma(inputs, targets[:2], [0.1], hidden_size=4)


def test_run_time_sums_the_logged_spans_of_a_fit_and_a_later_test(tmp_path: Path) -> None:
    """A fit (CSV, 100 s from its config to its last write) and a test made an hour later (CSV, 30 s): 130 s, the hour
    between them does not count."""
    fit = csv_log(tmp_path, "fit", [(3, {"train/loss": 1.0})])
    test = csv_log(tmp_path, "test", [(0, {"test/acc": 0.5})])
    for folder, start, end in ((fit, 1_000_000.0, 1_000_100.0), (test, 1_003_600.0, 1_003_630.0)):
        (folder / "config.yaml").write_text(yaml.safe_dump(config("bnlstm_lit.data.PermutedMNIST")))
        os.utime(folder / "config.yaml", (start, start))
        os.utime(folder / "metrics.csv", (end, end))
    assert read_run([fit, test]).duration_s == pytest.approx(130.0)
    assert read_run([fit]).duration_s == pytest.approx(100.0)


def test_run_time_of_tensorboard_logs_is_the_span_of_each_event_file(tmp_path: Path) -> None:
    folder = tb_log(tmp_path, "tb", [(0, {"train/loss": 1.0}), (5, {"train/loss": 0.5})])
    (events,) = folder.glob("events.out.tfevents.*")
    times = [v.wall_time for v in read_tensorboard_scalars(events)["train/loss"]]
    assert read_run([folder]).duration_s == pytest.approx(max(times) - min(times))


def test_settle_step_tolerates_late_noise_but_not_an_early_transient() -> None:
    """Estimated statistics wobble up to 30% from step to step (beyond the 10% tolerance): that is noise, not a trend;
    a transient of 10 steps far outside the noise still counts."""
    generator = torch.Generator().manual_seed(0)
    T, C, k = 200, 16, 10
    mean = torch.zeros(T, C, dtype=torch.float64)
    var = 1.0 + 0.3 * (2 * torch.rand(T, C, generator=generator, dtype=torch.float64) - 1)
    assert analysis.settle_step(mean, var, noise_factor=1.0) > T // 2  # noise alone: "never settles" at factor 1
    assert analysis.settle_step(mean, var) == 0
    var[:k] = 10.0
    assert analysis.settle_step(mean, var) == k


def test_step_time_is_the_median_rate_between_logged_training_losses() -> None:
    """Steps 0, 50, 100, 150 logged 10 s apart, then 60 s for the next 50 (a validation in between): 0.2 s/step."""
    times = [(0, 0.0), (50, 10.0), (100, 20.0), (150, 30.0), (200, 90.0)]
    run = Run("r", [], {"train/loss_step": [Scalar(step, 1.0, wall) for step, wall in times]})
    assert run.step_time_s == pytest.approx(0.2)
    assert Run("csv", [], {"train/loss": [Scalar(0, 1.0), Scalar(50, 0.5)]}).step_time_s is None
