"""Fixtures of the nn tests."""

from __future__ import annotations

import pytest

from bnlstm_lit.nn import kernel as kernel_module


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """How often the training recurrence (of which with the input term's batch norm inside) and the evaluation loop
    went through the kernel."""
    calls = {"train": 0, "input_norm": 0, "eval": 0}
    train, evaluate = kernel_module.kernel_recurrence, kernel_module.population_kernel_recurrence
    input_norm = kernel_module.kernel_recurrence_input_norm

    def counted_train(*args):
        calls["train"] += 1
        return train(*args)

    def counted_input_norm(*args):
        calls["train"] += 1
        calls["input_norm"] += 1
        return input_norm(*args)

    def counted_eval(*args):
        calls["eval"] += 1
        return evaluate(*args)

    monkeypatch.setattr(kernel_module, "kernel_recurrence", counted_train)
    monkeypatch.setattr(kernel_module, "kernel_recurrence_input_norm", counted_input_norm)
    monkeypatch.setattr(kernel_module, "population_kernel_recurrence", counted_eval)
    return calls
