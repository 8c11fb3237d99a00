"""Fixtures of the nn tests."""

from __future__ import annotations

import pytest

from bnlstm_lit.nn import native


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """How often the training recurrence (of which with the input term's batch norm inside) and the evaluation loop
    went through the native kernel (the dispatcher calls ``native.recurrence`` / ``native.population``)."""
    calls = {"train": 0, "input_norm": 0, "eval": 0}
    train, evaluate = native.recurrence, native.population

    def counted_train(*args, **kwargs):
        calls["train"] += 1
        calls["input_norm"] += kwargs.get("gamma_x") is not None
        return train(*args, **kwargs)

    def counted_eval(*args, **kwargs):
        calls["eval"] += 1
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(native, "recurrence", counted_train)
    monkeypatch.setattr(native, "population", counted_eval)
    return calls
