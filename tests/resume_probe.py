"""A callback for the exact-resume tests: the process dies abruptly (``os._exit``, no cleanup, like SIGKILL) at the
end of a chosen training step, before that step's checkpoint is written. Importable as ``resume_probe`` when
``tests/`` is on ``PYTHONPATH``."""

from __future__ import annotations

import os
from typing import Any

import lightning as L


class KillAfter(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os._exit(75)
