"""Checks that need a CUDA device (marked ``gpu``; skipped without one, run on a GPU machine with ``pytest -m gpu``,
which ``benchmarks/gpu_check.sh`` does).

* the BN-LSTM on CUDA (the Triton steps where triton is installed, else the eager recurrence) against the float64
  reference loop on CPU: training (outputs, every gradient, running statistics), with lengths and bidirectional,
  evaluation with population and with batch statistics;
* the LSTM baseline through cuDNN with the learned (expanded) initial state, against ``torch.nn.LSTM``;
* short ``bf16-mixed`` and ``16-mixed`` fits of the adding-problem config on the GPU.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from bnlstm_lit.cli import BNLSTMCLI
from bnlstm_lit.nn import BNLSTM, batchnorm_sites, set_eval_statistics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine: -m gpu)"),
]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CUDA = torch.device("cuda")


def _train(model: BNLSTM, x: torch.Tensor, lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    out, (h, c) = model(x, lengths=lengths)
    (out.square().sum() + h.sum() + c.square().sum()).backward()
    results = {"out": out, "h_n": h, "c_n": c, "grad x": x.grad}
    results.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    for i, site in enumerate(batchnorm_sites(model)):
        results.update({f"buffer {i} {n}": b for n, b in site.named_buffers()})
    return {k: v.detach().double().cpu() for k, v in results.items() if v is not None}


@pytest.mark.parametrize(
    "kwargs, lengths",
    [({"num_layers": 2}, None), ({"bidirectional": True}, [40, 17, 33, 40, 2, 25, 31, 9])],
)
def test_bnlstm_on_cuda_equals_the_reference_loop(kwargs, lengths):
    torch.manual_seed(0)
    model = BNLSTM(16, 64, max_steps=40, **kwargs)
    ref = copy.deepcopy(model).double()
    ref.implementation = "reference"
    x = torch.randn(40, 8, 16)
    lengths_t = None if lengths is None else torch.tensor(lengths)
    got = _train(model.to(CUDA), x.to(CUDA), lengths_t)
    want = _train(ref, x.double(), lengths_t)
    for key in want:
        scale = max(float(want[key].abs().max()), 1.0)
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4 * scale, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("statistics", ["population", "batch"])
def test_evaluation_on_cuda_equals_the_reference_loop(statistics):
    torch.manual_seed(1)
    model = BNLSTM(16, 64, 2, max_steps=20)
    model(torch.randn(20, 8, 16))  # running statistics from one training batch
    model.eval()
    set_eval_statistics(model, statistics)
    ref = copy.deepcopy(model).double()
    ref.implementation = "reference"
    x = torch.randn(30, 8, 16)  # beyond max_steps
    with torch.no_grad():
        got = model.to(CUDA)(x.to(CUDA))[0].double().cpu()
        want = ref(x.double())[0]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_plain_lstm_through_cudnn_with_the_learned_state():
    """normalize=False with the learned h_0/c_0 (expanded over the batch: cuDNN needs contiguous states) equals
    torch.nn.LSTM with the same weights and that state, forward and backward."""
    torch.manual_seed(2)
    lstm = nn.LSTM(16, 64, 2).to(CUDA)
    model = BNLSTM.from_lstm(lstm)
    with torch.no_grad():
        model.h0.normal_()
        model.c0.normal_()
    x = torch.randn(30, 8, 16, device=CUDA, requires_grad=True)
    out, (h, c) = model(x)
    state = (model.h0[:, None].expand(-1, 8, -1).contiguous(), model.c0[:, None].expand(-1, 8, -1).contiguous())
    want, (h_w, c_w) = lstm(x, state)
    for a, b in ((out, want), (h, h_w), (c, c_w)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    (out.sum() + c.sum()).backward()
    assert model.h0.grad is not None and torch.isfinite(model.h0.grad).all()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fit_on_gpu(precision, tmp_path):
    argv = sys.argv
    sys.argv = ["bnlstm-lit"]
    try:
        cli = BNLSTMCLI(
            args=["--config", str(CONFIGS / "adding_bnlstm.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                  f"--trainer.default_root_dir={tmp_path}", "--seed_everything=7"],
            run=False,
        )  # fmt: skip
    finally:
        sys.argv = argv
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_epochs=1, limit_train_batches=5, limit_val_batches=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(cli.model, cli.datamodule)
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    for name, value in cli.model.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, name


def test_char_lm_forward_on_cuda_never_reads_a_value_on_the_host():
    """The char LM's symbol-range check is asserted on the device (no host read of min/max per forward), and the
    unmasked BN-LSTM recurrence has none either: a training forward + backward runs without a host read."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bnlstm_lit.models import CharRNN

    class Syncs(TorchDispatchMode):
        seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ in {"_local_scalar_dense", "item", "equal", "is_nonzero"}:
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = CharRNN(50, 50, 20).to(CUDA)
    tokens = torch.randint(0, 50, (8, 20), device=CUDA)
    model(tokens)  # warm-up: kernels compiled outside the mode
    with Syncs() as mode:
        logits, _ = model(tokens)
        logits.sum().backward()
    assert mode.seen == [], mode.seen
