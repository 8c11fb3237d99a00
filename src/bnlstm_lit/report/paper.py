"""The paper's numbers (Cooijmans et al. 2017: Tables 1-3, Fig. 1-3, App. A), the reference data of every report."""

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

#: Penn Treebank training steps per epoch at the paper's settings: 5.0M training characters in non-overlapping
#: length-100 examples, batch 64 (the paper's PTB curves are drawn per epoch; ours are logged per step).
PTB_STEPS_PER_EPOCH = 783


@dataclass(frozen=True)
class PaperCurve:
    """Points of one validation curve of the paper's convergence figures (Fig. 2: MNIST validation accuracy against
    training iterations; Fig. 3a: PTB validation bits/char against epochs), read off the figures.

    Attributes:
        metric: our logged metric the points compare with (in our unit: accuracy in [0, 1], bits/char).
        points: (training step, value) pairs; PTB epochs are converted at :data:`PTB_STEPS_PER_EPOCH` steps each.
        first_above: for accuracy curves, the first training step at which the paper's curve reaches 90%.
        where: how the points were read ("epochs 1/2/3/5/10", "iterations").
    """

    metric: str
    points: tuple[tuple[int, float], ...]
    first_above: int | None = None
    where: str = ""


def _epochs(values: dict[int, float]) -> tuple[tuple[int, float], ...]:
    return tuple((epoch * PTB_STEPS_PER_EPOCH, value) for epoch, value in sorted(values.items()))


#: Fig. 2 and Fig. 3a: the paper's validation curves at the points its figures give, per experiment and model
#: ("LSTM", "BN-LSTM"); the reference data of ``bnlstm-lit report``'s curve figures and tables.
PAPER_CURVES: dict[str, dict[str, PaperCurve]] = {
    "smnist": {
        "LSTM": PaperCurve("val/acc", ((5_000, 0.293), (10_000, 0.146), (20_000, 0.429)), 40_000, "iterations"),
        "BN-LSTM": PaperCurve("val/acc", ((5_000, 0.914), (10_000, 0.957), (20_000, 0.979)), 3_500, "iterations"),
    },
    "pmnist": {
        "LSTM": PaperCurve("val/acc", ((5_000, 0.654), (10_000, 0.776), (20_000, 0.868)), 35_500, "iterations"),
        "BN-LSTM": PaperCurve("val/acc", ((5_000, 0.847), (10_000, 0.894), (20_000, 0.921)), 11_000, "iterations"),
    },
    "ptb": {
        "LSTM": PaperCurve("val/bpc", _epochs({1: 2.223, 2: 1.816, 3: 1.679, 5: 1.567, 10: 1.489}), None, "epochs"),
        "BN-LSTM": PaperCurve("val/bpc", _epochs({1: 1.674, 2: 1.569, 3: 1.527, 5: 1.489, 10: 1.470}), None, "epochs"),
    },
}

#: Fig. 2 / 3a: where the convergence curves stand, in words.
PAPER_CONVERGENCE = {
    "smnist": "BN-LSTM reaches 90% validation accuracy after ~3.5k iterations, the LSTM after ~40k",
    "pmnist": "BN-LSTM reaches 90% validation accuracy after ~11k iterations, the LSTM after ~35.5k",
    "ptb": "validation bits/char after epoch 1: BN-LSTM 1.674, LSTM 2.223",
}

#: Fig. 1 and App. A, in words.
PAPER_GRADIENT_FLOW = "gradient norm nearly constant over 784 steps for γ ≤ 0.4, vanishing below 1e-26 for γ ≥ 0.7"
PAPER_STATIONARITY = "population statistics converge within ~10 time steps"
