"""Reports and figures of the paper from finished runs: ``bnlstm-lit report ...`` (:mod:`bnlstm_lit.report.cli`)."""
