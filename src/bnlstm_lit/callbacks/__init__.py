"""Lightning callbacks of bnlstm_lit."""

from bnlstm_lit.callbacks.population import PopulationStatistics

__all__ = ["PopulationStatistics"]
