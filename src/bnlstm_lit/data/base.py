"""The contract every bnlstm_lit DataModule follows.

A DataModule exposes, as properties available right after ``__init__`` (before ``setup``), the sizes the model needs:

* ``input_size``  -- features per time step (C of the (B, T, C) inputs);
* ``output_size`` -- number of classes (classification) or of regression targets;
* ``max_steps``   -- the longest training sequence, i.e. how many per-time-step statistics the BN-LSTM keeps.

The CLI links them into the model (``link_arguments(..., apply_on="instantiate")``), so no YAML repeats them.
Batches are tuples ``(inputs, targets)`` with ``inputs`` float (B, T, C), batch first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import lightning as L


class SequenceDataModule(L.LightningDataModule, ABC):
    """Base class of the sequence DataModules; subclasses say where the data comes from and how it splits."""

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Features per time step."""

    @property
    @abstractmethod
    def output_size(self) -> int:
        """Number of classes or regression targets."""

    @property
    @abstractmethod
    def max_steps(self) -> int:
        """Length of the longest training sequence (number of per-step statistics the BN-LSTM keeps)."""


def check_int(name: str, value: int | None, minimum: int, optional: bool = False) -> None:
    """Raise a ValueError naming ``data.init_args.<name>`` unless ``value`` is an integer >= ``minimum`` (or None when
    ``optional``); bools are refused."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} (data.init_args.{name}) must be {expected}, got {value!r}")
