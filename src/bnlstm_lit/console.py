"""What a run prints: info lines that leave a progress bar intact, and a progress bar that keeps off stdout.

Lightning's :class:`~lightning.pytorch.callbacks.TQDMProgressBar` redraws its line with ``\\r`` on stdout and never
ends it until the bar closes; an info record written meanwhile (``rank_zero_info`` logs to stderr, the same terminal)
lands glued after the bar's ``...it/s`` fragment. :func:`info` clears every live TQDM bar, emits the record and draws
the bars again (``tqdm.external_write_mode``, what ``tqdm.write`` is built on), so the line stands on its own line;
the message stays an ordinary log record of the ``lightning.pytorch`` logger, so log files and non-terminal streams
get it unchanged. Every info line the package prints during a run goes through it.

:class:`StderrProgressBar` is Lightning's TQDM bar drawn on stderr, for runs whose stdout carries results (the
sampled text of ``predict``; see :func:`progress_bar_off_stdout`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TypeVar

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

__all__ = ["StderrProgressBar", "info", "progress_bar_off_stdout", "write_stdout"]

T = TypeVar("T")


@rank_zero_only
def info(message: str) -> None:
    """Log ``message`` as an info record on rank zero, with every live TQDM progress bar cleared around it."""
    with tqdm.external_write_mode(file=sys.stderr):
        rank_zero_info(message)


@rank_zero_only
def write_stdout(text: str) -> None:
    """Write ``text`` to stdout on rank zero (results, not log records), with every live TQDM bar cleared around it."""
    with tqdm.external_write_mode(file=sys.stdout):
        sys.stdout.write(text)
        sys.stdout.flush()


def _on_stderr(make: Callable[[], T]) -> T:
    # Lightning's init_*_tqdm pass file=sys.stdout, read when called: the bar made here keeps stderr as its file
    with contextlib.redirect_stdout(sys.stderr):
        return make()


class StderrProgressBar(TQDMProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.TQDMProgressBar`, every bar drawn on stderr."""

    def init_sanity_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_validation_tqdm)

    def init_test_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_test_tqdm)

    def init_predict_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_predict_tqdm)


def progress_bar_off_stdout(trainer: L.Trainer | None) -> list[StderrProgressBar]:
    """``[StderrProgressBar(...)]`` with the settings of ``trainer``'s progress bar when that is Lightning's plain
    TQDM bar (which draws on stdout), else ``[]`` -- no bar, or one chosen on purpose. A LightningModule whose
    ``predict`` prints results to stdout returns it from ``configure_callbacks``: Lightning then replaces the bar."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if type(bar) is not TQDMProgressBar:
        return []
    return [StderrProgressBar(refresh_rate=bar.refresh_rate, process_position=bar.process_position, leave=bar._leave)]
