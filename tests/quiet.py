"""Helpers shared by the test modules (importable because tests/ holds the suite's conftest.py)."""

from __future__ import annotations

from typing import Any

import lightning as L


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A one-epoch CPU trainer that writes nothing (no logger, no checkpoint, no progress bar) unless asked."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "max_epochs": 1,
    }
    options.update(kwargs)
    return L.Trainer(**options)
