"""Diagnostic callbacks (off by default; add them to ``trainer.callbacks`` in any run).

* :class:`GradientFlow` -- the batch mean of ||dloss/dh_t|| for every step t at chosen training steps (the paper's
  Fig. 1 quantity, during training);
* :class:`StatisticsStationarity` -- per-step population means and variances of the BN sites for a sample of units
  (the paper's App. A).

Both write what they measure to ``<log_dir>/diagnostics/`` (a JSON file per measurement, and a PNG when matplotlib is
installed), log scalars to every logger, and add the figure to TensorBoard when a TensorBoardLogger is in use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from bnlstm_lit.nn import BNLSTM
from bnlstm_lit.report import analysis, figures


def _layers(module: L.LightningModule) -> list[tuple[str, BNLSTM]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, BNLSTM)]


def _output_dir(trainer: L.Trainer, dirpath: str | None) -> Path:
    if dirpath is not None:
        return Path(dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "diagnostics"


def _loss_factor(trainer: L.Trainer, module: L.LightningModule) -> float:
    """What the backpropagated loss must be multiplied by to be the training step's loss: Lightning's automatic
    optimization divides it by ``accumulate_grad_batches``; a mixed-precision GradScaler multiplies it by its scale."""
    factor = float(trainer.accumulate_grad_batches) if module.automatic_optimization else 1.0
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        factor /= float(scaler.get_scale())
    return factor


class _FigureLogging:
    """Shared: a figure to TensorBoard and a PNG, or a one-time warning when matplotlib is missing."""

    _warned = False

    def _draw(self, draw: Any, *args: Any) -> Any | None:
        try:
            return draw(*args)
        except ImportError as error:
            if not self._warned:
                rank_zero_warn(f"{type(self).__name__}: no figures ({error}); the JSON data and scalars are written")
                self._warned = True
            return None

    @staticmethod
    def _log_figure(trainer: L.Trainer, tag: str, figure: Any, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=figures.DPI)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
        figures.pyplot().close(figure)


class GradientFlow(Callback, _FigureLogging):
    """Gradient flow through time: at chosen training steps, the batch mean of ||dloss/dh_t||_2 for every t.

    At a chosen step the (BN-)LSTM layers run their reference loop with a zero probe added to every h_t
    (:class:`~bnlstm_lit.nn.BNLSTM`'s ``probe_hidden_grad``), so the probe's gradient is the total dloss/dh_t, through
    the output at t and through every later step. Other steps run the fast paths untouched.

    Logged per layer (``<module>.<layer>``, e.g. ``net.rnn.0``): scalars ``diagnostics/grad_h/<layer>/t<t>`` at the
    steps ``times`` (default: first, quarter, half, three quarters and last step), a TensorBoard figure
    ``diagnostics/grad_h`` of the whole curves, and ``gradient_flow_step<N>.json`` / ``.png`` in ``dirpath``
    (default ``<log_dir>/diagnostics``). The JSON holds ``{"step": N, "norms": {layer: [...]}}``.

    The values are those of the loss the training step returns: Lightning's division by ``accumulate_grad_batches``
    and a mixed-precision loss scale are undone.

    Args:
        steps: global training steps to measure at (0 is at initialization, before the first update).
        every_n_steps: also measure every n steps (None: only ``steps``).
        times: time steps logged as scalars (negative counts from the end); None for the default five.
        dirpath: where the JSON/PNG files go.
    """

    def __init__(
        self,
        steps: Sequence[int] = (0,),
        every_n_steps: int | None = None,
        times: Sequence[int] | None = None,
        dirpath: str | None = None,
    ) -> None:
        if any(s < 0 for s in steps):
            raise ValueError(f"GradientFlow: steps must be non-negative, got {list(steps)}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"GradientFlow: every_n_steps must be positive or null, got {every_n_steps}")
        self.steps = set(int(s) for s in steps)
        self.every_n_steps = every_n_steps
        self.times = None if times is None else [int(t) for t in times]
        self.dirpath = dirpath
        self.measured: list[dict[str, Any]] = []  # every measurement of this run, also in the JSON files
        self._armed = False
        self._last_measured: int | None = None

    def due(self, step: int) -> bool:
        return step in self.steps or (self.every_n_steps is not None and step % self.every_n_steps == 0)

    def _arm(self, module: L.LightningModule, armed: bool) -> None:
        self._armed = armed
        for _, rnn in _layers(module):
            rnn.probe_hidden_grad = armed
            if not armed:
                rnn.hidden_probes = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _layers(pl_module):
            rank_zero_warn("GradientFlow: the model has no BNLSTM layer; nothing will be measured")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._arm(pl_module, self.due(step) and step != self._last_measured)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._armed:
            return
        norms: dict[str, list[float]] = {}
        factor = _loss_factor(trainer, pl_module)
        for name, rnn in _layers(pl_module):
            if rnn.hidden_probes and all(p.grad is not None for p in rnn.hidden_probes):
                for layer, curve in enumerate(rnn.hidden_grad_norms()):
                    norms[f"{name}.{layer}" if name else str(layer)] = (curve.double() * factor).tolist()
        self._arm(pl_module, False)  # once per chosen step (the first micro-batch under gradient accumulation)
        self._last_measured = trainer.global_step
        if norms:
            self._record(trainer, norms)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._armed:  # no backward ran (e.g. a skipped step): leave the fast paths on
            self._arm(pl_module, False)

    def _record(self, trainer: L.Trainer, norms: dict[str, list[float]]) -> None:
        step = trainer.global_step
        record = {"step": step, "norms": norms}
        self.measured.append(record)
        scalars = {}
        for layer, curve in norms.items():
            T = len(curve)
            times = self.times if self.times is not None else sorted({0, T // 4, T // 2, (3 * T) // 4, T - 1})
            for t in times:
                index = t if t >= 0 else T + t
                if 0 <= index < T:
                    scalars[f"diagnostics/grad_h/{layer}/t{index}"] = curve[index]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        self._write(trainer, record)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        directory = _output_dir(trainer, self.dirpath)
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"gradient_flow_step{record['step']}"
        (directory / f"{stem}.json").write_text(json.dumps(record) + "\n")
        figure = self._draw(figures.draw_gradient_flow, record["norms"], f"dloss/dh_t at step {record['step']}", "{}")
        if figure is not None:
            self._log_figure(trainer, "diagnostics/grad_h", figure, directory / f"{stem}.png")


class StatisticsStationarity(Callback, _FigureLogging):
    """Population-statistics stationarity (the paper's App. A): the per-step population mean and variance of every
    BN site (input term, recurrent term, cell) for a sample of ``units`` channels.

    Measured after each validation run of ``fit`` (the sanity check excluded) and after ``test``, from the
    statistics evaluation used (the running averages, or the estimates of
    :class:`~bnlstm_lit.callbacks.PopulationStatistics` when that callback ran before). Logged: scalars
    ``diagnostics/settle_step/<site>`` (the step after which the statistics stay within 10% of their late-sequence
    values, :func:`~bnlstm_lit.report.analysis.settle_step`), a TensorBoard figure ``diagnostics/statistics``, and
    ``statistics_<stage>_step<N>.json`` / ``.png`` in ``dirpath`` (default ``<log_dir>/diagnostics``; stage
    ``validation`` or ``test``, so a test right after fit does not overwrite the last validation's record).

    Args:
        units: channels sampled per site.
        seed: the sample's seed.
        dirpath: where the JSON/PNG files go.
    """

    def __init__(self, units: int = 8, seed: int = 0, dirpath: str | None = None) -> None:
        if units < 1:
            raise ValueError(f"StatisticsStationarity: units must be positive, got {units}")
        self.units = units
        self.seed = seed
        self.dirpath = dirpath
        self.measured: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.measure(trainer, pl_module, "validation")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(trainer, pl_module, "test")

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str = "validation") -> dict[str, Any]:
        statistics = analysis.population_statistics(pl_module.state_dict(), self.units, self.seed)
        record = {"step": trainer.global_step, "stage": stage, "statistics": statistics}
        self.measured.append(record)
        if statistics:
            scalars = {f"diagnostics/settle_step/{site}": float(s["settle_step"]) for site, s in statistics.items()}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
            self._write(trainer, record)
        return record

    @rank_zero_only
    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        directory = _output_dir(trainer, self.dirpath)
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"statistics_{record['stage']}_step{record['step']}"
        (directory / f"{stem}.json").write_text(json.dumps(record) + "\n")
        figure = self._draw(
            figures.draw_statistics, record["statistics"], f"population statistics at step {record['step']}"
        )
        if figure is not None:
            self._log_figure(trainer, "diagnostics/statistics", figure, directory / f"{stem}.png")
