"""No host synchronisation inside the recurrence, and the LSTM baseline hands torch's fused kernel contiguous states.

On a GPU a read of a tensor's value from the host (``.item()``, ``bool(t)``, ``torch.equal``) stalls the stream and
forbids CUDA-graph capture. The ops that do it are visible on CPU too: a TorchDispatchMode sees every aten op of a
training forward + backward, those inside the custom ops' implementations included.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bnlstm_lit.nn import BNLSTM, native_build

SYNCING = {"_local_scalar_dense", "item", "equal", "is_nonzero"}


class _Syncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "implementation, dtype",
    [
        pytest.param("auto", torch.float32, marks=pytest.mark.skipif(not native_build.available(), reason="no kernel")),
        ("eager", torch.float32),
        ("auto", torch.float64),
    ],
)
@pytest.mark.parametrize("normalize", [True, False])
def test_training_step_of_the_unmasked_layer_never_reads_a_value_on_the_host(implementation, dtype, normalize):
    torch.manual_seed(0)
    layer = BNLSTM(3, 8, 2, max_steps=12, normalize=normalize, implementation=implementation, dtype=dtype)
    x = torch.randn(12, 4, 3, dtype=dtype, requires_grad=True)
    layer(x)  # the first call builds the kernel (outside the mode: building is not a step)
    with _Syncs() as mode:
        out, (h, c) = layer(x, start_step=0)
        (out.square().mean() + c.sum()).backward()
    assert mode.seen == [], mode.seen


def test_plain_lstm_gets_contiguous_states(monkeypatch):
    """The learned initial state is expanded over the batch (stride 0); cuDNN's LSTM requires contiguous ones, so the
    baseline must hand torch.lstm contiguous h_0 and c_0."""
    seen = []
    lstm = torch.lstm

    def spy(x, hx, *args):  # type: ignore[no-untyped-def]
        seen.append([t.is_contiguous() for t in hx])
        return lstm(x, hx, *args)

    monkeypatch.setattr(torch, "lstm", spy)
    layer = BNLSTM(3, 8, 2, max_steps=6, normalize=False)
    layer(torch.randn(6, 4, 3))
    assert seen == [[True, True], [True, True]]
