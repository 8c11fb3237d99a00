"""``bnlstm-lit report <figure> ...`` (also ``python -m bnlstm_lit report``): the paper's figures and a markdown
reproduction report from finished runs.

Subcommands (``--help`` on each):

* ``gamma``   Fig. 1: dloss/dh_t vs t at initialization on sequential MNIST for several γ, and E[tanh'(x)] vs std.
* ``curves``  Fig. 2 / 3a: a validation metric of two or more runs against training steps.
* ``sweep``   Fig. 3b: test bits/char vs test length, population vs batch statistics (vs the LSTM).
* ``stats``   App. A: per-step population statistics of a checkpoint's BN sites.
* ``build``   all of the above that the given runs support, and ``report.md``: each task, our number, the
  paper's, the difference, settings and run time.

A run is given as ``--run LABEL=DIR`` (or ``--run DIR``, labelled from its config); DIR is a log directory
(TensorBoard events or a CSV ``metrics.csv``, with LightningCLI's ``config.yaml``). Repeat a label to merge
directories (a ``fit`` and a later ``test`` of the same model).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bnlstm_lit.checkpoint import load_checkpoint
from bnlstm_lit.report import analysis, figures
from bnlstm_lit.report.paper import (
    PAPER,
    PAPER_CONVERGENCE,
    PAPER_CURVES,
    PAPER_GRADIENT_FLOW,
    PAPER_STATIONARITY,
    PAPER_SWEEP_L1000,
)
from bnlstm_lit.report.runs import Run, load_runs, settings_of, sweep_of, test_number

DEFAULT_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# ---- Fig. 1 ---------------------------------------------------------------------------------------------------------
def mnist_batch(
    data_dir: str | Path, batch_size: int, steps: int, permute: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch_size`` MNIST training images as (steps, B, 1) pixel sequences in [0, 1] and (B,) labels."""
    from bnlstm_lit.data.mnist import load_idx_pair, mnist_permutation

    directory = Path(data_dir)
    images = directory / "train-images-idx3-ubyte.gz"
    labels = directory / "train-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.is_file():
            raise FileNotFoundError(f"--mnist {data_dir}: {path.name} not found (the original MNIST IDX gzip files)")
    pixels, targets = load_idx_pair(images, labels)  # uint8 (N, 784), int64 (N,)
    if not 1 <= steps <= pixels.shape[1]:
        raise ValueError(f"--steps must be in [1, {pixels.shape[1]}], got {steps}")
    if not 2 <= batch_size <= pixels.shape[0]:
        raise ValueError(f"--batch-size must be in [2, {pixels.shape[0]}], got {batch_size}")
    pixels, targets = pixels[:batch_size], targets[:batch_size]
    if permute:
        pixels = pixels[:, mnist_permutation("randperm", seed)]
    inputs = (pixels[:, :steps].float() / 255.0).t()[:, :, None]  # (T, B, 1)
    return inputs.contiguous(), targets.long()


def make_gamma_figures(
    mnist: str | Path,
    out: Path,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    steps: int = 784,
    batch_size: int = 100,
    hidden_size: int = 100,
    cell: str = "tanh",
    permute: bool = False,
    h0_noise_std: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Fig. 1a and 1b into ``out`` (gradient_flow.png/.json, tanh_derivative.png/.json); returns their data."""
    inputs, targets = mnist_batch(mnist, batch_size, steps, permute, seed)
    norms = analysis.gradient_flow_vs_gamma(inputs, targets, gammas, hidden_size, cell, h0_noise_std, seed)  # type: ignore[arg-type]
    kind = "permuted" if permute else "sequential"
    figures.gradient_flow_figure(
        norms, out / "gradient_flow.png", f"BN-{cell} RNN at initialization, {kind} MNIST, T={steps}, B={batch_size}"
    )
    derivative = analysis.tanh_derivative_vs_std([i / 50 for i in range(51)], seed=seed)
    figures.tanh_derivative_figure(derivative, out / "tanh_derivative.png")
    return {"gradient_norms": norms, "tanh_derivative": derivative}


# ---- Fig. 2 / 3a, 3b, App. A -----------------------------------------------------------------------------------
def make_curves_figure(runs: Sequence[Run], metric: str, path: Path, title: str = "", paper: bool = True) -> Path:
    """The runs' ``metric`` against steps; with ``paper``, the paper's points of the same experiment, metric and
    models (:data:`~bnlstm_lit.report.paper.PAPER_CURVES`) up to the runs' last step are drawn on the same axes."""
    curves = {run.label: run.curve(metric) for run in runs}
    return figures.curves_figure(curves, metric, path, title, paper_references(runs, metric) if paper else None)


def paper_references(runs: Sequence[Run], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """The paper's curve points for the experiments and models of ``runs`` that log ``metric``, cut at the last step
    the runs reached (a 5k-step run is drawn against the paper's first 5k steps, not squeezed by its 20k)."""
    last = max((run.curve(metric)[0][-1] for run in runs if run.scalars.get(metric)), default=0)
    references: dict[str, tuple[list[int], list[float]]] = {}
    for run in runs:
        curve = PAPER_CURVES.get(run.experiment or "", {}).get(run.variant)
        label = f"paper {run.variant}"
        if curve is None or curve.metric != metric or label in references:
            continue
        points = [(step, value) for step, value in curve.points if step <= last * 1.05]
        if points:
            references[label] = ([step for step, _ in points], [value for _, value in points])
    return references


def _value_at(run: Run, metric: str, step: int) -> tuple[int, float] | None:
    """The run's ``metric`` logged at ``step`` (or within 1% of it: Lightning logs validation at the global step, which
    an epoch's last partial batch or a resumed run can move by a few steps), as (logged step, value)."""
    values = run.scalars.get(metric, [])
    near = [v for v in values if abs(v.step - step) <= max(2, step // 100)]
    if not near:
        return None
    best = min(near, key=lambda v: abs(v.step - step))
    return best.step, best.value


def paper_points_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Ours at step N against the paper at step N: one row per paper point of each run's experiment and model
    that the run reached, and (accuracy curves) the first step at which each reached 90%."""
    rows = []
    for run in runs:
        curve = PAPER_CURVES.get(run.experiment or "", {}).get(run.variant)
        if curve is None or curve.metric not in run.scalars:
            continue
        for step, paper in curve.points:
            ours = _value_at(run, curve.metric, step)
            if ours is not None:
                rows.append({"run": run.label, "metric": curve.metric, "step": step, "logged_step": ours[0],
                             "ours": ours[1], "paper": paper, "difference": ours[1] - paper})  # fmt: skip
        if curve.first_above is not None:
            steps, values = run.curve(curve.metric)
            reached = next((s for s, v in zip(steps, values, strict=True) if v >= 0.9), None)
            rows.append({"run": run.label, "metric": f"first step with {curve.metric} ≥ 0.90", "step": None,
                         "logged_step": steps[-1], "ours": reached, "paper": curve.first_above,
                         "difference": None})  # fmt: skip
    return rows


def sweep_lines(runs: Sequence[Run]) -> dict[str, dict[int, float]]:
    """One line per run and statistics kind (the LSTM has no statistics: one line)."""
    lines: dict[str, dict[int, float]] = {}
    for run in runs:
        sweep = sweep_of(run)
        if run.variant.startswith("BN"):
            for kind, points in sweep.items():
                lines[f"{run.label} ({kind} statistics)"] = points
        elif sweep:
            lines[run.label] = next(iter(sweep.values()))
    return lines


def make_sweep_figure(runs: Sequence[Run], path: Path) -> Path:
    lines = sweep_lines(runs)
    if not lines:
        labels = ", ".join(run.label for run in runs)
        raise ValueError(
            f"no length sweep in the runs {labels}: test with data.init_args.test_protocol=sweep, which logs "
            "test/bpc_L<n>_population and test/bpc_L<n>_batch"
        )
    return figures.sweep_figure(lines, path)


def load_state_dict(checkpoint: str | Path) -> dict[str, Any]:
    """The ``state_dict`` of a Lightning checkpoint (or a directory: its newest ``*.ckpt``), loaded weights-only."""
    path = Path(checkpoint)
    if path.is_dir():
        found = sorted(path.rglob("*.ckpt"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no *.ckpt file under this directory")
        path = found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    try:
        loaded = load_checkpoint(path)  # the project's weights-only loader: no pickled code runs
    except Exception as error:  # a refused type, or a pickle / zip error: not a checkpoint this loader accepts
        raise ValueError(
            f"{path} is not a checkpoint that loads weights-only ({type(error).__name__}: {error})"
        ) from error
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state_dict")
    return state


def make_stats_figure(checkpoint: str | Path, path: Path, units: int = 8, seed: int = 0) -> dict[str, Any]:
    statistics = analysis.population_statistics(load_state_dict(checkpoint), units, seed)
    if not statistics:
        raise ValueError(f"{checkpoint}: no per-step BN statistics in this checkpoint (an LSTM baseline has none)")
    figures.statistics_figure(statistics, path, f"population statistics of {Path(checkpoint).name}")
    return statistics


# ---- the markdown report ------------------------------------------------------------------------------------------
def _format(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _seconds(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.2f} s"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def results_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run that belongs to a paper experiment: our test number beside the paper's."""
    rows = []
    for run in runs:
        experiment = run.experiment
        if experiment is None:
            continue
        paper = PAPER[experiment]
        ours = test_number(run)
        reference = paper.bnlstm if run.variant.startswith("BN") else paper.lstm
        rows.append(
            {
                "run": run.label,
                "task": paper.title,
                "model": run.variant,
                "unit": paper.unit,
                "metric": None if ours is None else ours[0],
                "ours": None if ours is None else ours[1],
                "paper": reference,
                "difference": None if ours is None else ours[1] - reference,
                "settings": settings_of(run),
                "duration_s": run.duration_s,
                "step_time_s": run.step_time_s,
            }
        )
    return rows


def build_report(
    runs: Sequence[Run],
    out: Path,
    mnist: str | Path | None = None,
    gamma_steps: int = 784,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
) -> Path:
    """Every figure the runs support and ``report.md`` in ``out``; returns the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Recurrent Batch Normalization: reproduction report", ""]
    rows = results_table(runs)
    lines += [
        "## Results",
        "",
        "| Run | Task | Model | Metric | Ours | Paper | Difference | Settings | Run time | Step time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['task']} | {row['model']} | {row['metric'] or '–'} ({row['unit']}) | "
            f"{_format(row['ours'], 2)} | {row['paper']:.2f} | {_format(row['difference'], 2)} | {row['settings']} | "
            f"{_duration(row['duration_s'])} | {_seconds(row['step_time_s'])} |"
        )
    if not rows:
        lines.append("| (no run of a paper experiment) | | | | | | | | | |")
    lines.append("")
    summary: dict[str, Any] = {"results": rows}

    # Fig. 2 / 3a: one curve figure per experiment with at least one run logging its validation metric
    by_experiment: dict[str, list[Run]] = {}
    for run in runs:
        if run.experiment is not None and PAPER[run.experiment].curve_metric in run.scalars:
            by_experiment.setdefault(run.experiment, []).append(run)
    if by_experiment:
        lines += ["## Convergence (Fig. 2 / 3a)", ""]
    for experiment, group in by_experiment.items():
        metric = PAPER[experiment].curve_metric
        name = f"curves_{experiment}.png"
        make_curves_figure(group, metric, out / name, PAPER[experiment].title)
        lines.append(f"![{metric}]({name})")
        lines.append("")
        for run in group:
            steps, values = run.curve(metric)
            first, last = f"{values[0]:.4f} at step {steps[0]}", f"{values[-1]:.4f} at step {steps[-1]}"
            lines.append(f"- {run.label}: {metric} {last} (first logged {first})")
        if experiment in PAPER_CONVERGENCE:
            lines.append(f"- Paper: {PAPER_CONVERGENCE[experiment]}.")
        lines.append("")
    paper_rows = paper_points_table(runs)
    if paper_rows:
        lines += [
            "## Ours against the paper's curves, point by point",
            "",
            "| Run | Metric | Step | Ours | Paper | Difference |",
            "|---|---|---|---|---|---|",
        ]
        for row in paper_rows:
            if row["step"] is None:  # first step reaching 90%: "not by step N" where the run stopped before
                ours = row["ours"] if row["ours"] is not None else f"not by step {row['logged_step']}"
                lines.append(f"| {row['run']} | {row['metric']} | – | {ours} | {row['paper']} | – |")
                continue
            step = row["step"] if row["logged_step"] == row["step"] else f"{row['step']} (logged {row['logged_step']})"
            lines.append(
                f"| {row['run']} | {row['metric']} | {step} | {row['ours']:.3f} | {row['paper']:.3f} | "
                f"{row['difference']:+.3f} |"
            )
        lines.append("")
        summary["paper_points"] = paper_rows

    # Fig. 3b
    sweep = sweep_lines(runs)
    if sweep:
        make_sweep_figure(runs, out / "sweep.png")
        lines += [
            "## Longer test sequences (Fig. 3b)",
            "",
            "![sweep](sweep.png)",
            "",
            "| Line | " + " | ".join(f"L={n}" for n in sorted({n for p in sweep.values() for n in p})) + " |",
        ]
        lengths = sorted({n for p in sweep.values() for n in p})
        lines.append("|---|" + "---|" * len(lengths))
        for label, points in sweep.items():
            lines.append(f"| {label} | " + " | ".join(_format(points.get(n)) for n in lengths) + " |")
        paper = ", ".join(f"{k} {v}" for k, v in PAPER_SWEEP_L1000.items())
        lines += ["", f"Paper at L=1000: {paper}.", ""]
        summary["sweep"] = {label: {str(n): v for n, v in points.items()} for label, points in sweep.items()}

    # App. A: the statistics of every BN run's newest checkpoint
    stats_lines = []
    for run in runs:
        if not run.variant.startswith("BN") or not run.checkpoints:
            continue
        name = f"statistics_{_slug(run.label)}.png"
        statistics = make_stats_figure(run.checkpoints[-1], out / name)
        settle = ", ".join(f"{site} {s['settle_step']}" for site, s in statistics.items())
        stats_lines += [
            f"![statistics of {run.label}]({name})",
            "",
            f"- {run.label} ({run.checkpoints[-1].name}): statistics settle after steps: {settle}.",
            "",
        ]
        summary.setdefault("settle_steps", {})[run.label] = {site: s["settle_step"] for site, s in statistics.items()}
    if stats_lines:
        lines += ["## Population statistics (App. A)", "", *stats_lines, f"Paper: {PAPER_STATIONARITY}.", ""]

    # the GradientFlow callback's measurements during training, one figure per run
    flow_lines = []
    for run in runs:
        records = gradient_flow_records(run)
        if not records:
            continue
        name = f"gradient_flow_{_slug(run.label)}.png"
        curves = {f"step {r['step']}, {layer}": curve for r in records for layer, curve in r["norms"].items()}
        figures.save_figure(figures.draw_gradient_flow(curves, f"{run.label}: dloss/dh_t during training", "{}"),
                            out / name, {"gradient_norms": curves})  # fmt: skip
        flow_lines += [f"![gradient flow of {run.label}]({name})", ""]
        for label, curve in curves.items():
            flow_lines.append(f"- {run.label}, {label}: ||dloss/dh_t|| t=0 {curve[0]:.3g}, t=T-1 {curve[-1]:.3g}")
        flow_lines.append("")
    if flow_lines:
        lines += ["## Gradient flow during training (GradientFlow callback)", "", *flow_lines]

    # Fig. 1
    if mnist is not None:
        data = make_gamma_figures(mnist, out, gammas, steps=gamma_steps)
        lines += [
            "## Gradient flow vs γ (Fig. 1)",
            "",
            "![gradient flow](gradient_flow.png)",
            "",
            "![tanh derivative](tanh_derivative.png)",
            "",
            "| γ | norm at t=0 | norm at t=T/2 | norm at t=T-1 |",
            "|---|---|---|---|",
        ]
        for gamma, curve in sorted(data["gradient_norms"].items()):
            lines.append(f"| {gamma:g} | {curve[0]:.3g} | {curve[len(curve) // 2]:.3g} | {curve[-1]:.3g} |")
        lines += ["", f"Paper: {PAPER_GRADIENT_FLOW}.", ""]
        summary["gradient_norms_t0"] = {f"{g:g}": c[0] for g, c in data["gradient_norms"].items()}

    (out / "report.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def gradient_flow_records(run: Run) -> list[dict[str, Any]]:
    """The JSON records the :class:`~bnlstm_lit.callbacks.GradientFlow` callback wrote under a run's folders."""
    paths = sorted({p for d in run.dirs for p in d.rglob("gradient_flow_step*.json")})
    records = [json.loads(p.read_text()) for p in paths]
    return sorted((r for r in records if isinstance(r, dict) and "norms" in r), key=lambda r: r["step"])


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_") or "run"


# ---- argument parsing ---------------------------------------------------------------------------------------------
def _gammas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--gammas must be comma-separated numbers, got {text!r}") from error
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--gammas must be positive numbers, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnlstm-lit report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="figure", required=True)

    gamma = sub.add_parser("gamma", help="Fig. 1: gradient flow vs γ at initialization, and E[tanh'(x)] vs std")
    gamma.add_argument("--mnist", required=True, help="folder with the MNIST IDX gzip files")
    gamma.add_argument("--out", required=True, type=Path, help="output folder")
    gamma.add_argument("--gammas", type=_gammas, default=list(DEFAULT_GAMMAS), help="comma-separated γ values")
    gamma.add_argument("--steps", type=int, default=784, help="sequence length T (784: whole images)")
    gamma.add_argument("--batch-size", type=int, default=100)
    gamma.add_argument("--hidden-size", type=int, default=100)
    gamma.add_argument("--cell", choices=("tanh", "lstm"), default="tanh")
    gamma.add_argument("--permute", action="store_true", help="permuted instead of sequential MNIST")
    gamma.add_argument("--h0-noise-std", type=float, default=0.1)
    gamma.add_argument("--seed", type=int, default=0)

    curves = sub.add_parser("curves", help="Fig. 2 / 3a: a validation metric of several runs against steps")
    curves.add_argument("--run", action="append", required=True, help="LABEL=DIR or DIR (repeatable)")
    curves.add_argument("--metric", default="val/loss", help="logged metric name, e.g. val/acc or val/bpc")
    curves.add_argument("--out", required=True, type=Path, help="PNG file")
    curves.add_argument("--title", default="")
    curves.add_argument(
        "--no-paper", action="store_true", help="do not draw the paper's points of the runs' experiment and models"
    )

    sweep = sub.add_parser("sweep", help="Fig. 3b: test bits/char vs test length")
    sweep.add_argument("--run", action="append", required=True, help="LABEL=DIR or DIR (repeatable)")
    sweep.add_argument("--out", required=True, type=Path, help="PNG file")

    stats = sub.add_parser("stats", help="App. A: per-step population statistics of a checkpoint")
    stats.add_argument("--checkpoint", required=True, help="a .ckpt file or a folder (its newest .ckpt)")
    stats.add_argument("--out", required=True, type=Path, help="PNG file")
    stats.add_argument("--units", type=int, default=8)
    stats.add_argument("--seed", type=int, default=0)

    build = sub.add_parser("build", help="all figures the runs support and report.md")
    build.add_argument("--run", action="append", default=[], help="LABEL=DIR or DIR (repeatable)")
    build.add_argument("--out", required=True, type=Path, help="output folder")
    build.add_argument("--mnist", default=None, help="MNIST folder: also make Fig. 1")
    build.add_argument("--gamma-steps", type=int, default=784)
    return p


def main(args: Sequence[str] | None = None) -> int:
    options = parser().parse_args(args)
    try:
        if options.figure == "gamma":
            options.out.mkdir(parents=True, exist_ok=True)
            data = make_gamma_figures(
                options.mnist,
                options.out,
                options.gammas,
                options.steps,
                options.batch_size,
                options.hidden_size,
                options.cell,
                options.permute,
                options.h0_noise_std,
                options.seed,
            )
            for gamma, curve in sorted(data["gradient_norms"].items()):
                middle = curve[len(curve) // 2]
                print(f"γ={gamma:g}: ||dloss/dh_t|| t=0 {curve[0]:.3e}, t=T/2 {middle:.3e}, t=T-1 {curve[-1]:.3e}")
            print(f"wrote {options.out / 'gradient_flow.png'} and {options.out / 'tanh_derivative.png'}")
        elif options.figure == "curves":
            runs = load_runs(options.run)
            path = make_curves_figure(runs, options.metric, options.out, options.title, not options.no_paper)
            print(f"wrote {path}")
        elif options.figure == "sweep":
            print(f"wrote {make_sweep_figure(load_runs(options.run), options.out)}")
        elif options.figure == "stats":
            statistics = make_stats_figure(options.checkpoint, options.out, options.units, options.seed)
            for site, s in statistics.items():
                print(f"{site}: settles after step {s['settle_step']}")
            print(f"wrote {options.out}")
        else:
            path = build_report(load_runs(options.run), options.out, options.mnist, options.gamma_steps)
            print(f"wrote {path}")
    except (FileNotFoundError, KeyError, ValueError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"bnlstm-lit report {options.figure}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
