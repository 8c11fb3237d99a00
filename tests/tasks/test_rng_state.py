"""The random state a checkpoint carries restores on a machine with another number of visible CUDA devices.

No GPU here: torch.cuda's generator functions are replaced by spies (the host-side logic is what is tested)."""

from __future__ import annotations

import pytest
import torch

from bnlstm_lit.tasks.base import BNLSTMTask


class _Task(BNLSTMTask):
    def __init__(self) -> None:
        super().__init__(torch.optim.SGD, None, "population", "val/loss")


@pytest.fixture
def fake_cuda(monkeypatch):
    """One visible device (index 0) whose generator state is a recorded tensor."""
    calls: dict[str, list] = {"set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7, 7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls["set"].append(state))

    def all_devices(*args, **kwargs):
        raise AssertionError("the states of every visible device are neither saved nor restored")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", all_devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", all_devices)
    return calls


def test_the_current_devices_state_is_saved_and_restored(fake_cuda):
    task = _Task()
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)
    assert torch.equal(checkpoint["bnlstm_rng"]["cuda"], torch.tensor([7, 7], dtype=torch.uint8))
    task.on_load_checkpoint(checkpoint)
    task.on_train_batch_start(None, 0)
    assert len(fake_cuda["set"]) == 1 and torch.equal(fake_cuda["set"][0], checkpoint["bnlstm_rng"]["cuda"])


def test_a_checkpoint_from_more_devices_restores_on_one(fake_cuda):
    """An older checkpoint holding one state per device of a 2-GPU machine, resumed where one device is visible:
    the current device's state is restored (before: set_rng_state_all indexed a second device, IndexError)."""
    task = _Task()
    states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    checkpoint = {"bnlstm_rng": {"torch": torch.get_rng_state(), "python": None, "cuda": states}}
    task.on_load_checkpoint(checkpoint)
    task.on_train_batch_start(None, 0)
    assert len(fake_cuda["set"]) == 1 and torch.equal(fake_cuda["set"][0], states[0])
