"""Lightning callbacks of bnlstm_lit."""

from bnlstm_lit.callbacks.diagnostics import GradientFlow, StatisticsStationarity
from bnlstm_lit.callbacks.population import PopulationStatistics
from bnlstm_lit.callbacks.predictions import PredictionWriter

__all__ = ["GradientFlow", "PopulationStatistics", "PredictionWriter", "StatisticsStationarity"]
