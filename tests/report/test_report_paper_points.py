"""The paper's curve points as reference data: drawn on the curves figure and compared point by point in the report.

Runs are logged here with Lightning's CSVLogger at known steps, so every comparison is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

from bnlstm_lit.report.cli import build_report, make_curves_figure, paper_points_table, paper_references
from bnlstm_lit.report.paper import PAPER_CURVES, PTB_STEPS_PER_EPOCH
from bnlstm_lit.report.runs import load_runs

pytest.importorskip("matplotlib")


def logged_run(root: Path, name: str, data: str, normalize: bool, rows: list[tuple[int, dict[str, float]]]) -> Path:
    logger = CSVLogger(str(root), name=name)
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)
    logger.save()
    folder = Path(logger.log_dir)
    model = {"rnn": {"normalize": normalize}}
    config = {
        "model": {"class_path": "bnlstm_lit.tasks.SequenceClassification", "init_args": model},
        "data": {"class_path": data, "init_args": {"batch_size": 100}},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_the_papers_points_are_the_figures_values() -> None:
    """Golden values read off Fig. 2 and Fig. 3a; PTB epochs at 783 steps (batch 64, length 100, 5.0M characters)."""
    assert PTB_STEPS_PER_EPOCH == 783
    assert PAPER_CURVES["ptb"]["BN-LSTM"].points[:3] == ((783, 1.674), (1566, 1.569), (2349, 1.527))
    assert PAPER_CURVES["ptb"]["LSTM"].points[:3] == ((783, 2.223), (1566, 1.816), (2349, 1.679))
    assert PAPER_CURVES["smnist"]["BN-LSTM"].points[0] == (5000, 0.914)
    assert PAPER_CURVES["smnist"]["LSTM"].first_above == 40_000
    assert PAPER_CURVES["pmnist"]["BN-LSTM"].first_above == 11_000
    for experiment in PAPER_CURVES.values():
        for curve in experiment.values():
            steps = [step for step, _ in curve.points]
            assert steps == sorted(steps) and len(set(steps)) == len(steps)


def test_points_table_and_figure_for_mnist_runs(tmp_path: Path) -> None:
    bn_values = {500 * k: min(0.1 * k, 0.95) for k in range(1, 11)}  # 0.1 ... 0.9 at 4,500, 0.95 at 5,000
    bn = logged_run(tmp_path, "bn", "bnlstm_lit.data.SequentialMNIST", True,
                    [(step, {"val/acc": value}) for step, value in bn_values.items()])  # fmt: skip
    lstm = logged_run(tmp_path, "lstm", "bnlstm_lit.data.SequentialMNIST", False,
                      [(step, {"val/acc": 0.2}) for step in range(500, 5001, 500)])  # fmt: skip
    runs = load_runs([f"ours BN={bn}", f"ours LSTM={lstm}"])
    rows = paper_points_table(runs)
    assert rows == [
        {"run": "ours BN", "metric": "val/acc", "step": 5000, "logged_step": 5000, "ours": 0.95, "paper": 0.914,
         "difference": pytest.approx(0.95 - 0.914)},
        {"run": "ours BN", "metric": "first step with val/acc ≥ 0.90", "step": None, "logged_step": 5000,
         "ours": 4500, "paper": 3500, "difference": None},
        {"run": "ours LSTM", "metric": "val/acc", "step": 5000, "logged_step": 5000, "ours": 0.2, "paper": 0.293,
         "difference": pytest.approx(0.2 - 0.293)},
        {"run": "ours LSTM", "metric": "first step with val/acc ≥ 0.90", "step": None, "logged_step": 5000,
         "ours": None, "paper": 40_000, "difference": None},
    ]  # fmt: skip
    # the figure draws the paper's points up to the runs' last step only (10k and 20k would squeeze 5k steps)
    png = make_curves_figure(runs, "val/acc", tmp_path / "curves.png")
    data = json.loads(png.with_suffix(".json").read_text())
    assert data["references"] == {"paper BN-LSTM": {"steps": [5000], "values": [0.914]},
                                  "paper LSTM": {"steps": [5000], "values": [0.293]}}  # fmt: skip
    assert make_curves_figure(runs, "val/acc", tmp_path / "bare.png", paper=False)
    assert json.loads((tmp_path / "bare.json").read_text())["references"] == {}
    # another metric has no paper points
    assert paper_references(runs, "val/loss") == {}


def test_ptb_points_match_the_epoch_ends_within_one_percent(tmp_path: Path) -> None:
    """Validation after epoch e is logged at the global step of its end (783 e, or a step more or less); a value
    far from any paper point is not compared."""
    rows = [(782, {"val/bpc": 1.70}), (1566, {"val/bpc": 1.58}), (2000, {"val/bpc": 1.55})]
    run = logged_run(tmp_path, "ptb", "bnlstm_lit.data.PTBChar", True, rows)
    table = paper_points_table(load_runs([f"BN={run}"]))
    assert [(r["step"], r["logged_step"], r["ours"], r["paper"]) for r in table] == [
        (783, 782, 1.70, 1.674),
        (1566, 1566, 1.58, 1.569),
    ]
    report = build_report(load_runs([f"BN={run}"]), tmp_path / "report").read_text()
    assert "| BN | val/bpc | 783 (logged 782) | 1.700 | 1.674 | +0.026 |" in report
    assert "| BN | val/bpc | 1566 | 1.580 | 1.569 | +0.011 |" in report
