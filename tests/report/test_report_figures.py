"""Every figure is an 800 x 500 PNG with a JSON of the data beside it; matplotlib is optional and says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bnlstm_lit.nn import BNLSTM
from bnlstm_lit.report import analysis, figures
from bnlstm_lit.report.cli import main as report_main

SIZE = (800, 500)


def read_json(png: Path) -> dict:
    return json.loads(png.with_suffix(".json").read_text())


def test_figure_size_constants() -> None:
    assert (round(figures.FIGSIZE[0] * figures.DPI), round(figures.FIGSIZE[1] * figures.DPI)) == SIZE


def test_gradient_flow_figure(tmp_path: Path) -> None:
    norms = {1.0: [3e4, 20.0, 5e-3], 0.1: [2e-3, 3e-3, 5e-3], 0.25: [0.0, 1e-30, 1.0]}  # a zero is drawn too
    path = figures.gradient_flow_figure(norms, tmp_path / "sub" / "gradient_flow.png")
    assert path == tmp_path / "sub" / "gradient_flow.png" and path.is_file()
    assert figures.png_size(path) == SIZE
    data = read_json(path)
    assert data == {"gradient_norms": {"0.1": norms[0.1], "0.25": norms[0.25], "1": norms[1.0]}}
    assert {float(k): v for k, v in data["gradient_norms"].items()} == norms


def test_tanh_derivative_figure(tmp_path: Path) -> None:
    data = analysis.tanh_derivative_vs_std([0.0, 0.5, 1.0, 2.0], samples=1000)
    path = figures.tanh_derivative_figure(data, tmp_path / "tanh_derivative.png")
    assert figures.png_size(path) == SIZE
    assert read_json(path) == data


def test_curves_figure(tmp_path: Path) -> None:
    curves = {"LSTM": ([1, 3, 5], [0.125, 0.25, 0.5]), "BN-LSTM": ([1, 3], [0.5, 0.875])}
    path = figures.curves_figure(curves, "val/acc", tmp_path / "curves.png", title="Sequential MNIST")
    assert figures.png_size(path) == SIZE
    assert read_json(path) == {
        "metric": "val/acc",
        "curves": {
            "LSTM": {"steps": [1, 3, 5], "values": [0.125, 0.25, 0.5]},
            "BN-LSTM": {"steps": [1, 3], "values": [0.5, 0.875]},
        },
        "references": {},
    }
    references = {"paper LSTM": ([2, 4], [0.25, 0.75])}
    path = figures.curves_figure(curves, "val/acc", tmp_path / "with_paper.png", references=references)
    assert read_json(path)["references"] == {"paper LSTM": {"steps": [2, 4], "values": [0.25, 0.75]}}


def test_curves_figure_with_many_points(tmp_path: Path) -> None:
    steps = list(range(0, 400, 10))  # 40 points: drawn without markers
    values = [1.0 / (1 + s) for s in steps]
    path = figures.curves_figure({"run": (steps, values)}, "val/loss", tmp_path / "many.png")
    assert figures.png_size(path) == SIZE
    assert read_json(path)["curves"]["run"] == {"steps": steps, "values": values}


def test_sweep_figure(tmp_path: Path) -> None:
    sweeps = {
        "BN-LSTM (population statistics)": {100: 1.4, 1000: 1.333, 200: 1.38},
        "BN-LSTM (batch statistics)": {100: 1.41, 200: 1.37, 1000: 1.362},
        "LSTM": {100: 1.45, 1000: 1.391},
    }
    path = figures.sweep_figure(sweeps, tmp_path / "sweep.png")
    assert figures.png_size(path) == SIZE
    data = read_json(path)
    assert set(data) == {"sweeps"}
    assert {label: {int(n): v for n, v in points.items()} for label, points in data["sweeps"].items()} == sweeps


def test_statistics_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rnn = BNLSTM(1, 5, max_steps=9)
    with torch.no_grad():
        rnn(torch.randn(9, 4, 1))
    statistics = analysis.population_statistics(rnn.state_dict(), units=3)
    assert len(statistics) == 3
    path = figures.statistics_figure(statistics, tmp_path / "statistics.png", title="a title")
    assert figures.png_size(path) == SIZE
    assert read_json(path) == {"statistics": statistics}
    # one site alone is a figure too
    one = {"cells.0.bn_c": statistics["cells.0.bn_c"]}
    single = figures.statistics_figure(one, tmp_path / "one.png")
    assert figures.png_size(single) == SIZE
    assert read_json(single) == {"statistics": one}


def test_statistics_figure_without_sites_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no BN site"):
        figures.statistics_figure({}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "none.json").exists()


def test_figure_path_without_suffix_returns_the_written_file(tmp_path: Path) -> None:
    path = figures.curves_figure({"a": ([0, 1], [0.5, 0.25])}, "val/acc", tmp_path / "curves")
    assert (tmp_path / "curves.json").is_file()
    assert path == tmp_path / "curves.png" and path.is_file()


def test_png_size_reads_the_header(tmp_path: Path) -> None:
    # a hand-made PNG header: signature, IHDR length and type, width 3, height 7
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (3).to_bytes(4, "big") + (7).to_bytes(4, "big")
    (tmp_path / "tiny.png").write_bytes(header + b"\x08\x02\x00\x00\x00")
    assert figures.png_size(tmp_path / "tiny.png") == (3, 7)


@pytest.mark.parametrize("content", [b"GIF89a" + b"\x00" * 30, b"", b"\x89PNG"])
def test_png_size_rejects_a_non_png(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not_a.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a PNG") as exc:
        figures.png_size(path)
    assert str(path) in str(exc.value)


def test_without_matplotlib_the_error_names_the_plots_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now raises ImportError
    with pytest.raises(ImportError, match=r"bnlstm-lit\[plots\]"):
        figures.pyplot()
    with pytest.raises(ImportError, match=r"bnlstm-lit\[plots\]"):
        figures.curves_figure({"a": ([0], [1.0])}, "val/acc", tmp_path / "c.png")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_without_matplotlib_the_cli_exits_2_with_the_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="run")
    logger.log_metrics({"val/acc": 0.5}, step=1)
    logger.save()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "c.png"
    code = report_main(["curves", "--run", f"A={tmp_path / 'run'}", "--metric", "val/acc", "--out", str(png)])
    assert code == 2
    err = capsys.readouterr().err
    assert "bnlstm-lit report curves: error:" in err and "bnlstm-lit[plots]" in err
    assert not png.exists()


def test_pyplot_uses_the_agg_backend() -> None:
    plt = figures.pyplot()
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    assert hasattr(plt, "subplots")
