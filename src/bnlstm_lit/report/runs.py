"""Read finished runs back: the scalars a run logged (TensorBoard event files or Lightning's CSV ``metrics.csv``),
the configuration LightningCLI saved beside them (``config.yaml``) and its checkpoints.

A *run* is one or more log directories under one label (a ``fit`` and a later ``test`` of the same model log to
separate version folders; give both). Nothing here imports matplotlib.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bnlstm_lit.report.paper import PAPER

EVENTS_GLOB = "events.out.tfevents.*"


@dataclass
class Scalar:
    """One logged value: the global step, the value and (TensorBoard only) the wall time in seconds."""

    step: int
    value: float
    wall_time: float | None = None


@dataclass
class Run:
    """The logs of one labelled run.

    Attributes:
        label: the name in figures and tables.
        dirs: its log directories.
        scalars: metric name -> values in step order, one per step (from every directory, TensorBoard and CSV alike).
        config: the saved LightningCLI configuration (the last ``config.yaml`` found), or {}.
        checkpoints: ``*.ckpt`` files under the directories, newest last.
        duration_s: the run's logged time, summed over its log files (a fit and a later test add up; the time
            between them does not count): per TensorBoard event file the span of its wall times, per CSV
            ``metrics.csv`` the span from the ``config.yaml`` beside it to the file's last write (an approximation);
            None if neither is known.
    """

    label: str
    dirs: list[Path]
    scalars: dict[str, list[Scalar]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)
    duration_s: float | None = None

    def last(self, metric: str) -> float | None:
        """The last logged value of ``metric`` (None if the run never logged it)."""
        values = self.scalars.get(metric)
        return values[-1].value if values else None

    def curve(self, metric: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``metric``; raises a KeyError naming the metrics the run has."""
        if metric not in self.scalars:
            raise KeyError(
                f"run {self.label!r} ({_dirs(self.dirs)}) has no metric {metric!r}; it logged: {self.metric_names()}"
            )
        values = self.scalars[metric]
        return [v.step for v in values], [v.value for v in values]

    def metric_names(self) -> list[str]:
        return sorted(self.scalars)

    @property
    def experiment(self) -> str | None:
        """The paper experiment this run belongs to (a key of :data:`~bnlstm_lit.report.paper.PAPER`), or None."""
        return experiment_of(self.config)

    @property
    def variant(self) -> str:
        """ "LSTM", "BN-LSTM", "RNN" or "BN-RNN", from the saved model arguments (BN-LSTM when unknown)."""
        return variant_of(self.config)

    @property
    def last_step(self) -> int | None:
        """The last step any metric was logged at (None without metrics)."""
        steps = [v.step for values in self.scalars.values() for v in values]
        return max(steps) if steps else None

    @property
    def step_time_s(self) -> float | None:
        """Seconds per training step: the median over consecutive logged training losses (TensorBoard wall times) of
        the time between them over the steps between them. The median leaves out the intervals that hold a
        validation or a population-statistics pass. None without wall times (CSV logs)."""
        for name in ("train/loss_step", "train/loss"):
            timed = [v for v in self.scalars.get(name, []) if v.wall_time is not None]
            rates = sorted(
                (b.wall_time - a.wall_time) / (b.step - a.step)  # type: ignore[operator]
                for a, b in zip(timed, timed[1:], strict=False)
                if b.step > a.step
            )
            if rates:
                middle = len(rates) // 2
                return rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2
        return None

    @property
    def training_steps(self) -> int | None:
        """Training steps the run logged: one more than the last step of a ``train/`` metric (None without any)."""
        steps = [v.step for name, values in self.scalars.items() if name.startswith("train/") for v in values]
        return max(steps) + 1 if steps else None


def _dirs(dirs: Sequence[Path]) -> str:
    return ", ".join(str(d) for d in dirs)


def parse_run_argument(text: str) -> tuple[str | None, Path]:
    """``LABEL=DIR`` or ``DIR`` (the label is then derived from the run's config)."""
    label, sep, path = text.partition("=")
    if sep and label and not Path(text).exists():
        return label, Path(path)
    return None, Path(text)


def load_runs(arguments: Iterable[str]) -> list[Run]:
    """Runs from ``LABEL=DIR`` / ``DIR`` arguments; repeated labels merge their directories into one run."""
    grouped: dict[str, list[Path]] = {}
    order: list[str] = []
    for argument in arguments:
        label, path = parse_run_argument(argument)
        if not path.is_dir():
            raise FileNotFoundError(f"--run {argument!r}: {path} is not a directory")
        if label is None:
            label = default_label(path)
        if label not in grouped:
            grouped[label] = []
            order.append(label)
        grouped[label].append(path)
    return [read_run(grouped[label], label) for label in order]


def default_label(path: Path) -> str:
    """ "<experiment> <variant>" from the config in ``path`` if there is one, else the folder's name."""
    config = _read_config([path])
    experiment = experiment_of(config)
    if experiment is None:
        return path.name
    return f"{experiment} {variant_of(config)}"


def read_run(dirs: Sequence[str | Path], label: str | None = None) -> Run:
    """Everything a run logged under ``dirs`` (searched recursively); raises if there is no log at all."""
    paths = [Path(d) for d in dirs]
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {path} does not exist")
    events = sorted(f for p in paths for f in p.rglob(EVENTS_GLOB))
    csvs = sorted(f for p in paths for f in p.rglob("metrics.csv"))
    if not events and not csvs:
        raise FileNotFoundError(
            f"no logs under {_dirs(paths)}: expected TensorBoard event files ({EVENTS_GLOB}) or a Lightning CSV "
            "metrics.csv (run with a TensorBoardLogger or CSVLogger)"
        )
    scalars: dict[str, list[Scalar]] = {}
    spans: list[float] = []  # the logged time of each source (a fit and a later test add, the gap between does not)
    for source in events:
        times = []
        for name, values in read_tensorboard_scalars(source).items():
            scalars.setdefault(name, []).extend(values)
            times += [v.wall_time for v in values if v.wall_time is not None]
        if len(times) >= 2:
            spans.append(max(times) - min(times))
    event_dirs = {f.parent for f in events}
    for source in csvs:
        for name, values in read_csv_scalars(source).items():
            scalars.setdefault(name, []).extend(values)
        config = source.parent / "config.yaml"
        if source.parent not in event_dirs and config.is_file():  # CSV: from the saved config to the last write
            spans.append(max(source.stat().st_mtime - config.stat().st_mtime, 0.0))
    for name, values in scalars.items():
        scalars[name] = _one_per_step(values)
    run = Run(label or paths[0].name, paths, scalars, _read_config(paths))
    run.checkpoints = sorted((f for p in paths for f in p.rglob("*.ckpt")), key=lambda f: f.stat().st_mtime)
    run.duration_s = sum(spans) if spans else None
    return run


def _one_per_step(values: list[Scalar]) -> list[Scalar]:
    """Step order, one value per step: a metric logged twice at a step (by a TensorBoard and a CSV logger of the same
    run, or a folder given twice) keeps the latest value (by wall time where known, else the last one read)."""
    by_step: dict[int, Scalar] = {}
    for value in sorted(values, key=lambda v: (v.step, v.wall_time if v.wall_time is not None else float("-inf"))):
        by_step[value.step] = value
    return [by_step[step] for step in sorted(by_step)]


def read_tensorboard_scalars(path: Path) -> dict[str, list[Scalar]]:
    """Every scalar of one TensorBoard event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every value
    accumulator.Reload()
    return {
        tag: [Scalar(int(e.step), float(e.value), float(e.wall_time)) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def read_csv_scalars(path: Path) -> dict[str, list[Scalar]]:
    """Every value of a Lightning CSVLogger ``metrics.csv`` (one column per metric, empty where not logged)."""
    scalars: dict[str, list[Scalar]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path} is not a Lightning CSVLogger metrics file (no 'step' column)")
        for row in reader:
            step = int(float(row["step"]))
            for name, text in row.items():
                if name in ("step", "epoch") or text in (None, ""):
                    continue
                scalars.setdefault(name, []).append(Scalar(step, float(text)))
    return scalars


def _read_config(paths: Sequence[Path]) -> dict[str, Any]:
    configs = sorted((f for p in paths for f in p.rglob("config.yaml")), key=lambda f: f.stat().st_mtime)
    for candidate in reversed(configs):
        with open(candidate) as f:
            loaded = yaml.safe_load(f)
        if isinstance(loaded, dict):
            return loaded
    return {}


def _class_name(section: Any) -> str:
    if isinstance(section, dict):
        return str(section.get("class_path", "")).rsplit(".", 1)[-1]
    return ""


def _init_args(section: Any) -> dict[str, Any]:
    if isinstance(section, dict) and isinstance(section.get("init_args"), dict):
        return section["init_args"]
    return {}


def _model_args(config: dict[str, Any]) -> dict[str, Any]:
    """The saved model arguments with the network's settings (``init_args.rnn``) among them, as configs written
    before the settings were one group had them."""
    args = _init_args(config.get("model"))
    rnn = args.get("rnn")
    return {**args, **rnn} if isinstance(rnn, dict) else args


def experiment_of(config: dict[str, Any]) -> str | None:
    """The paper experiment of a saved config, from its DataModule class: permuted/sequential MNIST, PTB, text8,
    CNN; None for anything else (a custom corpus, the adding problem)."""
    data = _class_name(config.get("data"))
    if "Permuted" in data:
        return "pmnist"
    if "MNIST" in data:
        return "smnist"
    if "PTB" in data:
        return "ptb"
    if "Text8" in data:
        return "text8"
    if "CNN" in data:
        return "cnn"
    return None


def variant_of(config: dict[str, Any]) -> str:
    """ "LSTM" / "BN-LSTM" (or "RNN" / "BN-RNN" for the tanh cell) from the saved model arguments."""
    args = _model_args(config)
    normalize = args.get("normalize", True)
    base = "RNN" if args.get("cell", "lstm") == "tanh" else "LSTM"
    return f"BN-{base}" if normalize else base


SETTINGS = (
    ("hidden", ("model", "hidden_size")),
    ("batch", ("data", "batch_size")),
    ("length", ("data", "seq_length")),
    ("γ", ("model", "gamma_init")),
)


def settings_of(run: Run) -> str:
    """A short "hidden=…, batch=…, steps=…" description of a run from its config and logs."""
    parts = []
    for name, (section, key) in SETTINGS:
        if name == "γ" and not run.variant.startswith("BN"):
            continue  # no BN site: γ does not exist
        value = (_model_args(run.config) if section == "model" else _init_args(run.config.get(section))).get(key)
        if value is not None:
            parts.append(f"{name}={value}")
    optimizer = _init_args(run.config.get("model")).get("optimizer")
    lr = _init_args(optimizer).get("lr") if isinstance(optimizer, dict) else None
    if lr is not None:
        parts.append(f"{_class_name(optimizer)} lr={lr}")
    if run.training_steps is not None:
        parts.append(f"steps={run.training_steps}")
    return ", ".join(parts)


_SWEEP = re.compile(r"^test/bpc_L(\d+)_(population|batch)$")


def sweep_of(run: Run) -> dict[str, dict[int, float]]:
    """The length sweep a run logged: {"population": {L: bpc}, "batch": {L: bpc}} (empty if none)."""
    out: dict[str, dict[int, float]] = {}
    for name, values in run.scalars.items():
        match = _SWEEP.match(name)
        if match and values:
            out.setdefault(match.group(2), {})[int(match.group(1))] = values[-1].value
    return {kind: dict(sorted(points.items())) for kind, points in sorted(out.items())}


def test_number(run: Run) -> tuple[str, float] | None:
    """(metric, value in the paper's unit) of the run's test result, or None if it logged none."""
    experiment = run.experiment
    if experiment is None:
        return None
    paper = PAPER[experiment]
    for metric in paper.metrics:
        value = run.last(metric)
        if value is not None:
            return metric, value * paper.scale
    return None
