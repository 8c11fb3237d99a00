"""Lightning callbacks of bnlstm_lit."""

from bnlstm_lit.callbacks.population import PopulationStatistics
from bnlstm_lit.callbacks.predictions import PredictionWriter

__all__ = ["PopulationStatistics", "PredictionWriter"]
