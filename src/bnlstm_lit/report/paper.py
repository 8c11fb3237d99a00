"""The paper's numbers (Cooijmans et al. 2017, as collected in SPEC §2), the reference column of every report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperResult:
    """One experiment of the paper's result tables.

    Attributes:
        title: name in the report.
        metrics: logged metric names that hold our test number, in order of preference (the first one a run has).
        unit: how the number reads ("accuracy %", "bits/char", "error %").
        scale: multiplies our logged value into the paper's unit (accuracy in [0, 1] -> %).
        higher_is_better: direction of the metric.
        lstm, bnlstm: the paper's test numbers for the baseline and the batch-normalized model.
        curve_metric: the validation metric of the convergence figures (Fig. 2 / 3a).
    """

    title: str
    metrics: tuple[str, ...]
    unit: str
    scale: float
    higher_is_better: bool
    lstm: float
    bnlstm: float
    curve_metric: str


PAPER: dict[str, PaperResult] = {
    "smnist": PaperResult("Sequential MNIST", ("test/acc",), "accuracy %", 100.0, True, 98.9, 99.0, "val/acc"),
    "pmnist": PaperResult("Permuted MNIST", ("test/acc",), "accuracy %", 100.0, True, 90.2, 95.4, "val/acc"),
    "ptb": PaperResult(
        "Penn Treebank characters", ("test/bpc_full", "test/bpc"), "bits/char", 1.0, False, 1.38, 1.32, "val/bpc"
    ),
    "text8": PaperResult("text8", ("test/bpc_full", "test/bpc"), "bits/char", 1.0, False, 1.43, 1.36, "val/bpc"),
    # the CNN numbers are the test errors of the LSTM and of the best variant (BN-e**)
    "cnn": PaperResult("CNN reading comprehension", ("test/error",), "error %", 100.0, False, 45.0, 36.3, "val/error"),
}

#: Fig. 3b at L = 1000 (PTB, trained on length 100): LSTM, BN-LSTM with population and with batch statistics.
PAPER_SWEEP_L1000 = {"LSTM": 1.391, "BN-LSTM population": 1.333, "BN-LSTM batch": 1.362}

#: Fig. 2 / 3a: where the convergence curves stand (SPEC §2).
PAPER_CONVERGENCE = {
    "smnist": "BN-LSTM reaches 90% validation accuracy after ~3.5k iterations, the LSTM after ~40k",
    "ptb": "validation bits/char after epoch 1: BN-LSTM 1.674, LSTM 2.223",
}

#: Fig. 1 and App. A, in words.
PAPER_GRADIENT_FLOW = "gradient norm nearly constant over 784 steps for γ ≤ 0.4, vanishing below 1e-26 for γ ≥ 0.7"
PAPER_STATIONARITY = "population statistics converge within ~10 time steps"
