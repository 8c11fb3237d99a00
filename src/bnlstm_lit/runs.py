"""Run folders: a checkpoint is resumed, and evaluated, in the run that wrote it.

A run is the logger's version folder, ``<save_dir>/<name>/<version>/`` (``runs/adding_bnlstm/lightning_logs/
version_0/``): its ``config.yaml`` (written by LightningCLI when the run started), the logs (TensorBoard event files
or ``metrics.csv``), and ``checkpoints/``, where ModelCheckpoint writes when it is given no ``dirpath``. Lightning
itself starts a new version for every command, so a resumed fit used to log into a new folder, with a new
checkpoint folder (the best score and top-k were not reloaded: "The dirpath has changed"), and ``ckpt_path="last"``
looked only in that new, empty folder. Here:

* :func:`run_folder` -- the run a checkpoint ``.../<version>/checkpoints/x.ckpt`` belongs to;
* :func:`resolve_last_checkpoint` -- ``ckpt_path="last"`` as the newest ``last*.ckpt`` of all the runs under the
  logger's root (and of any ModelCheckpoint ``dirpath``), not only of the new version;
* :func:`continue_run` -- the Trainer's logger continues that run's version (same folder, same curves; the
  checkpoint folder is unchanged, so ModelCheckpoint restores its bookkeeping), the run's own ``config.yaml`` is kept;
* :func:`name_checkpoints_by_metric` -- best-checkpoint file names that carry the monitored value.

Only Lightning's version-folder loggers (TensorBoardLogger, CSVLogger) whose version was not set by the user, and
whose ``<save_dir>/<name>`` is the checkpoint's, are continued: a checkpoint evaluated or resumed under another root
gets a new version there, as before.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = [
    "CONFIG_NAME",
    "continue_run",
    "name_checkpoints_by_metric",
    "resolve_last_checkpoint",
    "run_config",
    "run_folder",
]

#: The config LightningCLI saves in a run folder (SaveConfigCallback's default name).
CONFIG_NAME = "config.yaml"

#: Lightning's loggers whose runs are version folders ``<save_dir>/<name>/<version>``.
VERSIONED_LOGGERS = (TensorBoardLogger, CSVLogger)


def run_folder(ckpt_path: _PATH | None) -> Path | None:
    """``<save_dir>/<name>/<version>`` for a local checkpoint file ``<save_dir>/<name>/<version>/checkpoints/x.ckpt``
    (where ModelCheckpoint writes when it has no ``dirpath``), else None."""
    if not ckpt_path or not _is_local_file_protocol(ckpt_path):
        return None
    path = Path(ckpt_path)
    if not path.is_file() or path.parent.name != "checkpoints":
        return None
    return path.parent.parent.resolve()


def run_config(ckpt_path: _PATH | None) -> Path | None:
    """The ``config.yaml`` of the run a checkpoint belongs to (see :func:`run_folder`), if there is one."""
    folder = run_folder(ckpt_path)
    if folder is None or not (folder / CONFIG_NAME).is_file():
        return None
    return folder / CONFIG_NAME


def _version_of(folder: Path) -> int | str:
    """The logger ``version`` whose folder is ``folder``: ``version_3`` -> 3, any other name as it is."""
    match = re.fullmatch(r"version_(\d+)", folder.name)
    return int(match.group(1)) if match else folder.name


def _unset_version_loggers(trainer: L.Trainer) -> list[TensorBoardLogger | CSVLogger]:
    """The trainer's TensorBoard/CSV loggers that will pick a new version (none given, not started yet)."""
    return [
        logger
        for logger in trainer.loggers
        if isinstance(logger, VERSIONED_LOGGERS) and logger._version is None and logger._experiment is None
    ]


def _last_files(directory: _PATH) -> Iterable[Path]:
    pattern = re.compile(rf"^{re.escape(ModelCheckpoint.CHECKPOINT_NAME_LAST)}(-(\d+))?$")
    folder = Path(directory)
    if folder.is_dir():
        yield from (p for p in folder.iterdir() if p.suffix == ModelCheckpoint.FILE_EXTENSION and pattern.match(p.stem))


def resolve_last_checkpoint(trainer: L.Trainer) -> str | None:
    """What ``ckpt_path="last"`` should mean for ``trainer``: the newest (by modification time) ``last*.ckpt`` in the
    ``checkpoints/`` folder of every run under the first logger's ``<save_dir>/<name>`` (for a ModelCheckpoint without
    ``dirpath``) and in every ModelCheckpoint ``dirpath``; None when there is none (or nothing to add to Lightning's
    own search: no ModelCheckpoint writes into a version folder that is still to be chosen).
    """
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    loggers = _unset_version_loggers(trainer)
    if not loggers or trainer.loggers[0] is not loggers[0] or all(cb.dirpath is not None for cb in callbacks):
        return None
    candidates: set[Path] = set()
    for callback in callbacks:
        if callback.dirpath is not None:
            if _is_local_file_protocol(callback.dirpath):
                candidates.update(_last_files(callback.dirpath))
            continue
        root = Path(str(loggers[0].root_dir))
        if root.is_dir():
            for run in root.iterdir():
                candidates.update(_last_files(run / "checkpoints"))
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def _global_step(ckpt_path: _PATH) -> int | None:
    """The checkpoint's ``global_step``, read weights-only (memory-mapped: the tensors are not read)."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint, unreadable: Lightning reports it when it loads the file
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return step if isinstance(step, int) else None


class ContinuedCSVWriter(ExperimentWriter):
    """CSVLogger's writer for a run folder that already holds a ``metrics.csv``: the file is kept and appended to
    (Lightning's writer deletes it when the folder is not empty), less the rows at or after ``purge_step`` -- what a
    killed run logged after the checkpoint it is resumed from, which the resumed run logs again."""

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.purge_step = purge_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            self.metrics_keys = list(reader.fieldnames or [])
        kept = [row for row in rows if self.purge_step is None or not _logged_at_or_after(row, self.purge_step)]
        if len(kept) != len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


def _logged_at_or_after(row: dict[str, Any], step: int) -> bool:
    try:
        return int(float(row.get("step") or "")) >= step
    except ValueError:
        return False


def continue_run(trainer: L.Trainer, ckpt_path: _PATH | None, subcommand: str | None) -> Path | None:
    """Make ``trainer`` log into the run folder of ``ckpt_path``; returns that folder, or None when it does not.

    For each TensorBoard/CSV logger without a version whose ``<save_dir>/<name>`` holds the checkpoint's run: the
    logger takes the run's version, so the logs continue in the same folder and a ModelCheckpoint without
    ``dirpath`` keeps writing to (and restores its best score and top-k from) the run's ``checkpoints/``. When
    fitting, what the run logged at or after the checkpoint's step is superseded: TensorBoard's ``purge_step``, the
    matching rows of ``metrics.csv``. A CSV log is appended to, never deleted. The run's ``config.yaml`` is kept; this
    command's config is saved as ``config.<subcommand>.yaml`` next to it.

    Call it after the Trainer is built and before it runs (the loggers must not have started).
    """
    folder = run_folder(ckpt_path)
    if folder is None:
        return None
    loggers = [lg for lg in _unset_version_loggers(trainer) if Path(str(lg.root_dir)).resolve() == folder.parent]
    if not loggers:
        return None
    purge_step = _global_step(ckpt_path) if subcommand == "fit" else None  # type: ignore[arg-type]
    for logger in loggers:
        # Lightning's loggers take their version only in __init__; none is chosen before the first use of .version
        logger._version = _version_of(folder)
        if isinstance(logger, TensorBoardLogger) and purge_step is not None:
            logger._kwargs.setdefault("purge_step", purge_step)
        if isinstance(logger, CSVLogger) and trainer.global_rank == 0:
            os.makedirs(logger.root_dir, exist_ok=True)
            logger._experiment = ContinuedCSVWriter(logger.log_dir, purge_step)
    if (folder / CONFIG_NAME).is_file():
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, SaveConfigCallback) and callback.config_filename == CONFIG_NAME:
                callback.config_filename = f"config.{subcommand or 'run'}.yaml"
    return folder


def name_checkpoints_by_metric(trainer: L.Trainer) -> None:
    """ModelCheckpoints that monitor a metric and were given no ``filename`` name their files
    ``epoch=3-step=2000-val_bpc=1.512.ckpt`` (the value to 4 significant digits; a ``/`` in the metric's name
    becomes ``_``, where Lightning's ``auto_insert_metric_name`` would make it a sub-folder)."""
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or callback.filename is not None or not callback.monitor:
            continue
        if not callback.auto_insert_metric_name or "}" in callback.monitor or "{" in callback.monitor:
            continue
        safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", callback.monitor)
        callback.filename = f"epoch={{epoch}}-step={{step}}-{safe}={{{callback.monitor}:.4g}}"
        callback.auto_insert_metric_name = False
