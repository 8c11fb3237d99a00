"""Population statistics of a channel that is constant over the batch in training (batchnorm.CONSTANT_VARIANCE).

Where every sequence has the same value in a channel at a step -- the recurrent term W_h h_0 at t = 0 (the learned
h_0 is shared), an input position that always holds the same token, and the terms computed from those -- training
normalizes the channel to exactly β. The running variance is then ≈ 0 and the running mean lags the weights, so
(x - running mean) / sqrt(running var + ε) blew that lag up by 1 / sqrt(ε). Such a channel is now normalized to β
in evaluation too, on every implementation; a channel with an ordinary variance is normalized exactly as before.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlstm_lit.nn import BNLSTM, SequenceBatchNorm, batchnorm, estimate_population_statistics, native

IMPLEMENTATIONS = ["reference", "eager"] + (["native"] if native.usable(torch.zeros(1)) else [])
MARKER = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.5])  # the token every sequence starts with
T, I, H, K = 6, 5, 8, 3


def _questions(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, n, I) inputs and (n,) labels: the marker token at t = 0 (zero batch variance there, and in everything
    computed from it and from h_0 at t = 0 and 1), the answer one-hot at t = 2, small noise elsewhere."""
    y = torch.randint(0, K, (n,), generator=g)
    x = 0.1 * torch.randn(T, n, I, generator=g)
    x[0] = MARKER
    x[2] = 0.0
    x[2, torch.arange(n), y] = 1.0
    return x, y


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = BNLSTM(I, H, max_steps=T, momentum=0.3)
        self.head = nn.Linear(H, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][-1])


@pytest.fixture(scope="module")
def trained():
    """40 Adam steps (the weights move while the running averages follow them), the validation set, and a copy
    of the model with statistics estimated from the final weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = _Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        x, y = _questions(32, g)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_val, y_val = _questions(512, g)
    estimated = copy.deepcopy(model)
    estimate_population_statistics(estimated, [_questions(32, g)[0] for _ in range(20)])
    with torch.no_grad():  # training mode on the validation batch itself, statistics restored afterwards
        saved = copy.deepcopy(model.state_dict())
        train_mode = model(x_val)
        model.load_state_dict(saved)
    return model.eval(), estimated.eval(), x_val, y_val, train_mode


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_validation_on_running_averages(trained, implementation, monkeypatch):
    model, estimated, x_val, y_val, train_mode = trained
    model.rnn.implementation = estimated.rnn.implementation = implementation
    assert _accuracy(train_mode, y_val) == 1.0
    with torch.no_grad():
        running, from_estimate = model(x_val), estimated(x_val)
        monkeypatch.setattr(batchnorm, "CONSTANT_VARIANCE", 0.0)  # the old rule: every channel by the formula
        running_before = model(x_val)
    # the pathology: a third of the answers (chance) on the running averages
    assert _accuracy(running_before, y_val) < 0.5
    assert _accuracy(from_estimate, y_val) == 1.0
    assert _accuracy(running, y_val) >= 0.99
    assert (running.argmax(1) == train_mode.argmax(1)).double().mean() >= 0.99
    assert (running - from_estimate).abs().max() < 0.5 * (running_before - from_estimate).abs().max()


def test_implementations_agree(trained):
    model, _, x_val, _, _ = trained
    outputs = {}
    with torch.no_grad():
        for implementation in IMPLEMENTATIONS:
            model.rnn.implementation = implementation
            outputs[implementation] = model(x_val)
    for implementation in IMPLEMENTATIONS:
        torch.testing.assert_close(outputs[implementation], outputs["reference"], rtol=1e-4, atol=1e-5)


def test_constant_channels_of_the_trained_layer(trained):
    """The sites that were constant at t = 0 are found, and evaluation gives their β (0: no β on the terms)."""
    model, _, x_val, _, _ = trained
    cell = model.rnn.cells[0]
    for site in (cell.bn_x, cell.bn_h, cell.bn_c):
        assert (site.running_var[0] < batchnorm.CONSTANT_VARIANCE * site.eps).all()
        scale, shift = site.affine(0, 1)
        assert (scale[0] == 0).all()
        assert torch.equal(shift[0], torch.zeros_like(shift[0]) if site.bias is None else site.bias.detach())
    wx = x_val[:1] @ cell.weight_ih.t()  # (1, B, 4H): the marker's input term
    with torch.no_grad():
        assert (cell.bn_x(wx, 0) == 0).all()


def _site_with_a_constant_channel(**kw) -> tuple[SequenceBatchNorm, torch.Tensor]:
    """A site trained on batches whose channel 0 is the same for every row but drifts from batch to batch (as a
    term does while the weights move), channels 1-2 ordinary; and an evaluation batch (3, 16, 3)."""
    g = torch.Generator().manual_seed(1)
    bn = SequenceBatchNorm(3, 3, momentum=0.1, **kw)
    assert bn.weight is not None and bn.bias is not None
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
        bn.bias.copy_(torch.tensor([-0.3, 0.1, 0.4]))
    for k in range(30):
        x = torch.randn(3, 16, 3, generator=g)
        x[:, :, 0] = 1.0 + 0.01 * k
        bn(x)
    x = torch.randn(3, 16, 3, generator=g)
    x[:, :, 0] = 1.3
    return bn.eval(), x


def test_a_constant_channel_is_beta_and_the_others_are_untouched():
    bn, x = _site_with_a_constant_channel()
    beta = bn.bias.detach()
    assert (bn.running_var[:, 0] < batchnorm.CONSTANT_VARIANCE * bn.eps).all()
    assert (bn.running_var[:, 1:] > 0.1).all()
    with torch.no_grad():
        whole = bn(x)  # (T, B, C): normalize_with
        steps = torch.stack([bn(x[t], t) for t in range(3)])  # (B, C) steps: F.batch_norm
        scale, shift = bn.affine(0, 3)
        folded = x * scale[:, None] + shift[:, None]
        # the old computation, straight from the buffers
        old_whole = (x - bn.running_mean[:, None]) * torch.rsqrt(bn.running_var[:, None] + bn.eps) * bn.weight + beta
        old_steps = torch.stack(
            [
                F.batch_norm(x[t], bn.running_mean[t], bn.running_var[t], bn.weight, bn.bias, False, 0.0, bn.eps)
                for t in range(3)
            ]
        )
        old_scale = torch.rsqrt(bn.running_var + bn.eps) * bn.weight
        old_shift = -bn.running_mean * old_scale + beta
    for y in (whole, steps, folded):
        assert (y[:, :, 0] == beta[0]).all()
    assert (old_whole[:, :, 0] - beta[0]).abs().max() > 10  # what it was: the drift over sqrt(ε)
    assert torch.equal(whole[:, :, 1:], old_whole[:, :, 1:])
    assert torch.equal(steps[:, :, 1:], old_steps[:, :, 1:])
    assert torch.equal(scale[:, 1:], old_scale[:, 1:]) and torch.equal(shift[:, 1:], old_shift[:, 1:])
    assert (scale[:, 0] == 0).all() and torch.equal(shift[:, 0], beta[0].expand(3))
    # steps past max_steps reuse the last one, constant channel included
    mean, var = bn.population(5, 2)
    assert torch.isinf(var[:, 0]).all() and torch.equal(var[:, 1:], bn.running_var[2:, 1:].expand(2, -1))


def test_statistics_shared_over_time():
    bn, x = _site_with_a_constant_channel(shared_over_time=True)
    with torch.no_grad():
        y = bn(x)
    assert (y[:, :, 0] == bn.bias[0]).all()
    assert torch.isfinite(y).all()


def test_a_step_with_one_real_sequence_in_training_keeps_the_buffers_finite():
    """The masked fallback normalizes a step with < 2 real sequences with the population statistics (so the constant
    channel gives β there too) and leaves that step's buffers exactly as they were."""
    bn, x = _site_with_a_constant_channel()
    bn.train()
    before = {name: buf.clone() for name, buf in bn.named_buffers()}
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[2, 1:] = False  # step 2: one real sequence
    y = bn(x, 0, mask)
    assert (y[2, 0, 0] == bn.bias[0]).all()
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert torch.equal(bn.running_mean[2], before["running_mean"][2])
    assert torch.equal(bn.running_var[2], before["running_var"][2])
    assert torch.equal(bn.num_batches_tracked[2], before["num_batches_tracked"][2])


def test_checkpoints_keep_their_layout():
    bn, _ = _site_with_a_constant_channel()
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert torch.isfinite(bn.running_var).all()  # the rule is applied when the statistics are used, not stored
    SequenceBatchNorm(3, 3).load_state_dict(bn.state_dict())
