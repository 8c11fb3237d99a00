"""bnlstm_lit: Recurrent Batch Normalization (Cooijmans et al., ICLR 2017) for PyTorch Lightning.

The layer API (``BNLSTM``, ``BNLSTMCell``, ...) is re-exported from :mod:`bnlstm_lit.nn` on first access, so that
importing the package (``bnlstm-lit --help``, ``--version``) does not import torch.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnlstm_lit.nn import (
        BNLSTM,
        BNLSTMCell,
        BNRNNCell,
        SequenceBatchNorm,
        batchnorm_sites,
        estimate_population_statistics,
        set_eval_statistics,
    )

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BNRNNCell",
    "SequenceBatchNorm",
    "__version__",
    "batchnorm_sites",
    "estimate_population_statistics",
    "set_eval_statistics",
]

#: what ``__version__`` is when the distribution is not installed (a bare source tree on ``PYTHONPATH``)
UNKNOWN_VERSION = "0+unknown"


def installed_version(distribution: str = "bnlstm-lit") -> str:
    """The version of the installed distribution (its metadata), or :data:`UNKNOWN_VERSION` when not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


__version__ = installed_version()

_NN_NAMES = frozenset(name for name in __all__ if name != "__version__")


def __getattr__(name: str) -> Any:
    if name in _NN_NAMES:
        from bnlstm_lit import nn

        value = getattr(nn, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_NN_NAMES})
