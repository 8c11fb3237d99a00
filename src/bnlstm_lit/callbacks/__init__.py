"""Lightning callbacks of bnlstm_lit."""

from bnlstm_lit.callbacks.diagnostics import GradientFlow, StatisticsStationarity
from bnlstm_lit.callbacks.failsafe import NonFiniteError, NonFiniteGuard, NonFiniteWarning
from bnlstm_lit.callbacks.population import PopulationStatistics
from bnlstm_lit.callbacks.predictions import PredictionWriter, SampleWriter

__all__ = [
    "GradientFlow",
    "NonFiniteError",
    "NonFiniteGuard",
    "NonFiniteWarning",
    "PopulationStatistics",
    "PredictionWriter",
    "SampleWriter",
    "StatisticsStationarity",
]
