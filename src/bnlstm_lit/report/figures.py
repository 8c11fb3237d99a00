"""The paper's figures as PNG files, each with the data behind it in a JSON file of the same name.

matplotlib is an optional extra (``pip install bnlstm-lit[plots]``); it is imported when a figure is drawn, and its
absence is a clear error. Every figure is ``FIGSIZE`` inches at ``DPI`` (800 x 500 pixels), drawn with the
non-interactive Agg backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FIGSIZE = (8.0, 5.0)
DPI = 100


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "bnlstm_lit's figures need matplotlib, an optional extra: pip install 'bnlstm-lit[plots]' "
            "(or pip install matplotlib)"
        ) from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, data: Mapping[str, Any]) -> Path:
    """Write the PNG (".png" is appended to a path without it) and the JSON beside it; returns the PNG's path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZE * DPI
    pyplot().close(figure)
    path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return path


def draw_gradient_flow(norms: Mapping[Any, Sequence[float]], title: str = "", legend: str = "γ = {}") -> Any:
    """A figure of one batch-mean ||dloss/dh_t|| curve per key (γ, or a layer name), against t, log scale."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGSIZE)
    colors = plt.cm.viridis([i / max(len(norms) - 1, 1) for i in range(len(norms))])
    for color, (key, curve) in zip(colors, norms.items(), strict=True):
        axis.plot(range(len(curve)), [max(v, 1e-300) for v in curve], color=color, label=legend.format(key))
    axis.set_yscale("log")
    axis.set_xlabel("time step t")
    axis.set_ylabel("batch mean of ||dloss/dh_t||")
    if title:
        axis.set_title(title)
    axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure


def gradient_flow_figure(
    norms: Mapping[float, Sequence[float]], path: Path, title: str = "dloss/dh_t at initialization"
) -> Path:
    """Fig. 1b: one curve per γ of the batch-mean ||dloss/dh_t|| against t, log scale."""
    ordered = dict(sorted(norms.items()))
    figure = draw_gradient_flow({f"{g:g}": c for g, c in ordered.items()}, title)
    return save_figure(figure, path, {"gradient_norms": {f"{g:g}": list(c) for g, c in ordered.items()}})


def tanh_derivative_figure(data: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Fig. 1a: E[tanh'(x)] (with the 10-90% band) against the standard deviation of x."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGSIZE)
    axis.fill_between(data["std"], data["q10"], data["q90"], alpha=0.3, label="10%-90% of tanh'(x)")
    axis.plot(data["std"], data["mean"], label="E[tanh'(x)]")
    axis.set_xlabel("standard deviation of x ~ N(0, σ²)")
    axis.set_ylabel("tanh'(x)")
    axis.set_ylim(0, 1.02)
    axis.legend()
    figure.tight_layout()
    return save_figure(figure, path, {key: list(values) for key, values in data.items()})


def curves_figure(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    metric: str,
    path: Path,
    title: str = "",
    references: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
) -> Path:
    """Fig. 2 / 3a: validation curves of several runs on the same axes, training steps on x; ``references`` (e.g.
    the paper's points, :data:`~bnlstm_lit.report.paper.PAPER_CURVES`) are drawn as black markers on dotted lines."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGSIZE)
    for label, (steps, values) in curves.items():
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
    for (label, (steps, values)), marker in zip((references or {}).items(), "sD^v<>", strict=False):
        axis.plot(steps, values, color="black", linestyle=":", marker=marker, markerfacecolor="none", label=label)
    axis.set_xlabel("training step")
    axis.set_ylabel(metric)
    if title:
        axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    data = {
        "metric": metric,
        "curves": {label: {"steps": list(s), "values": list(v)} for label, (s, v) in curves.items()},
        "references": {label: {"steps": list(s), "values": list(v)} for label, (s, v) in (references or {}).items()},
    }
    return save_figure(figure, path, data)


def sweep_figure(sweeps: Mapping[str, Mapping[int, float]], path: Path) -> Path:
    """Fig. 3b: test bits/char against the test subsequence length, one line per run and statistics kind."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=FIGSIZE)
    for label, points in sweeps.items():
        lengths = sorted(points)
        axis.plot(lengths, [points[n] for n in lengths], marker="o", label=label)
    axis.set_xlabel("test subsequence length L")
    axis.set_ylabel("test bits/char")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    data = {"sweeps": {label: {str(n): v for n, v in sorted(points.items())} for label, points in sweeps.items()}}
    return save_figure(figure, path, data)


def statistics_figure(statistics: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """App. A: per-step population mean (left) and variance (right) of a sample of units, one row per BN site."""
    return save_figure(draw_statistics(statistics, title), path, {"statistics": dict(statistics)})


def draw_statistics(statistics: Mapping[str, Mapping[str, Any]], title: str = "") -> Any:
    """The figure of :func:`statistics_figure` (from :func:`~bnlstm_lit.report.analysis.population_statistics`)."""
    plt = pyplot()
    sites = list(statistics)
    if not sites:
        raise ValueError("statistics_figure: no BN site to plot (the model has no per-step statistics)")
    figure, axes = plt.subplots(len(sites), 2, figsize=FIGSIZE, squeeze=False, sharex=True)
    for row, site in enumerate(sites):
        entry = statistics[site]
        for column, key in enumerate(("mean", "var")):
            axis = axes[row][column]
            axis.plot(entry[key], linewidth=0.8)
            axis.set_ylabel(f"{key}", fontsize="small")
            axis.set_title(f"{site} ({len(entry['units'])} units)", fontsize="x-small")
            axis.tick_params(labelsize="x-small")
    for axis in axes[-1]:
        axis.set_xlabel("time step t", fontsize="small")
    if title:
        figure.suptitle(title, fontsize="small")
    figure.tight_layout()
    return figure


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's header (no imaging library needed)."""
    with open(path, "rb") as f:
        header = f.read(24)
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
