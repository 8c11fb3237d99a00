"""estimate_population_statistics: the paper's protocol (plain average of per-step batch statistics,
Cooijmans et al. 2017 §4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnlstm_lit.nn import BNLSTM, SequenceBatchNorm, batchnorm_sites, estimate_population_statistics

SITES = ("x", "h", "c")


def _model(num_layers=1, max_steps=8, seed=0, **kw) -> BNLSTM:
    torch.manual_seed(seed)
    model = BNLSTM(3, 4, num_layers=num_layers, max_steps=max_steps, momentum=0.1, **kw).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ".bn_" in name:
                p.copy_(0.3 + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith(("bias", "h0", "c0")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buf in model.named_buffers():  # stale statistics that the estimation must discard
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g, dtype=buf.dtype))
            elif name.endswith("running_var"):
                buf.copy_(2.0 + torch.rand(buf.shape, generator=g, dtype=buf.dtype))
            else:
                buf.fill_(7)
    return model


def _batch_statistics(model: BNLSTM, x: torch.Tensor) -> dict:
    """Per-step batch mean and biased variance of every BN site's pre-activation, with the paper's recurrence run
    in training mode (batch statistics; no padding). Returns {(layer, site, t): (mean, var)}."""
    stats = {}

    def bn(v, site, name, layer, t):
        mu = v.mean(0)
        var = ((v - mu) ** 2).mean(0)
        stats[(layer, name, t)] = (mu, var)
        y = (v - mu) / torch.sqrt(var + site.eps) * site.weight
        return y if site.bias is None else y + site.bias

    T, B, _ = x.shape
    inp = x
    with torch.no_grad():
        for layer, cell in enumerate(model.cells):
            H = cell.hidden_size
            h = model.h0[layer].expand(B, -1)
            c = model.c0[layer].expand(B, -1)
            outs = []
            for t in range(T):
                pre = (
                    bn(h @ cell.weight_hh.T, cell.bn_h, "h", layer, t)
                    + bn(inp[t] @ cell.weight_ih.T, cell.bn_x, "x", layer, t)
                    + cell.bias
                )
                i, f, g, o = pre.split(H, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(bn(c, cell.bn_c, "c", layer, t))
                outs.append(h)
            inp = torch.stack(outs)
    return stats


def _site(model, layer, name) -> SequenceBatchNorm:
    return getattr(model.cells[layer], f"bn_{name}")


class _Head(nn.Module):
    """A task-like wrapper: the BNLSTM, then dropout on its output."""

    def __init__(self, rnn: BNLSTM) -> None:
        super().__init__()
        self.rnn = rnn
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.rnn(x)[0])


def _stat_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
def test_single_batch_makes_eval_equal_train(num_layers):
    model = _model(num_layers)
    x = torch.randn(8, 5, 3, dtype=torch.float64) * 2 + 0.5
    y_train, (h_train, c_train) = copy.deepcopy(model).train()(x)
    assert estimate_population_statistics(model, [x]) == 1
    model.eval()
    y_eval, (h_eval, c_eval) = model(x)
    torch.testing.assert_close(y_eval, y_train, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h_eval, h_train, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(c_eval, c_train, rtol=1e-12, atol=1e-13)
    for bn in batchnorm_sites(model):
        assert bn.num_batches_tracked.tolist() == [1] * 8


def test_single_masked_batch_makes_eval_equal_train_at_real_positions():
    model = _model(2, max_steps=5, seed=1)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 5, 4, 3])  # every step has >= 2 real sequences
    y_train, (h_train, _) = copy.deepcopy(model).train()(x, lengths=lengths)
    n = estimate_population_statistics(model, [(x, lengths)], forward=lambda m, b: m(b[0], lengths=b[1]))
    assert n == 1
    model.eval()
    y_eval, (h_eval, _) = model(x, lengths=lengths)
    torch.testing.assert_close(y_eval, y_train, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h_eval, h_train, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_two_batches_give_plain_average_of_per_step_statistics(num_layers):
    model = _model(num_layers, max_steps=6, seed=2)
    xs = [torch.randn(6, 4, 3, dtype=torch.float64), torch.randn(6, 5, 3, dtype=torch.float64) * 3 - 1]
    s1, s2 = (_batch_statistics(model, x) for x in xs)
    assert estimate_population_statistics(model, xs) == 2
    for layer in range(num_layers):
        for name in SITES:
            bn = _site(model, layer, name)
            exp_mean = torch.stack([(s1[(layer, name, t)][0] + s2[(layer, name, t)][0]) / 2 for t in range(6)])
            exp_var = torch.stack([(s1[(layer, name, t)][1] + s2[(layer, name, t)][1]) / 2 for t in range(6)])
            torch.testing.assert_close(bn.running_mean, exp_mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(bn.running_var, exp_var, rtol=1e-10, atol=1e-12)
            assert bn.num_batches_tracked.tolist() == [2] * 6
            # not a running average with the site's momentum, nor the second batch alone
            last_only = torch.stack([s2[(layer, name, t)][1] for t in range(6)])
            assert not torch.allclose(bn.running_var, last_only)


def test_no_parameter_change_and_no_gradient():
    model = _model(2, seed=3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)

    def forward(m, b):
        out, _ = m(b)
        assert not out.requires_grad  # no graph is built
        return out

    with torch.enable_grad():
        estimate_population_statistics(model, [x, x * 2], forward=forward)
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), params[k]), k
        assert v.grad is None, k
        assert v.requires_grad, k
    assert x.grad is None


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_modes_and_momentum_restored(start):
    container = _Head(_model(2, seed=4))
    model = container.rnn
    if start == "train":
        container.train()
    elif start == "eval":
        container.eval()
    else:
        container.train()
        model.cells[0].bn_h.eval()
        container.drop.eval()
        model.cells[1].training = False  # not recursive: its BN sites stay in training
    _site(model, 0, "x").momentum = 0.05
    _site(model, 1, "c").momentum = None
    modes = {name: m.training for name, m in container.named_modules()}
    momenta = {name: m.momentum for name, m in container.named_modules() if isinstance(m, SequenceBatchNorm)}
    assert (
        momenta["rnn.cells.0.bn_x"] == 0.05
        and momenta["rnn.cells.1.bn_c"] is None
        and momenta["rnn.cells.0.bn_h"] == 0.1
    )

    estimate_population_statistics(container, [torch.randn(4, 3, 3, dtype=torch.float64)])
    assert {name: m.training for name, m in container.named_modules()} == modes
    assert {n: m.momentum for n, m in container.named_modules() if isinstance(m, SequenceBatchNorm)} == momenta

    # also when the forward fails half-way
    def failing(m, b):
        if b == "boom":
            raise RuntimeError("boom")
        return m(b)

    with pytest.raises(RuntimeError, match="boom"):
        estimate_population_statistics(container, [torch.randn(4, 3, 3, dtype=torch.float64), "boom"], failing)
    assert {name: m.training for name, m in container.named_modules()} == modes
    assert {n: m.momentum for n, m in container.named_modules() if isinstance(m, SequenceBatchNorm)} == momenta
    # and when there is no batch at all
    with pytest.raises(ValueError, match="no batches"):
        estimate_population_statistics(container, [])
    assert {name: m.training for name, m in container.named_modules()} == modes
    assert {n: m.momentum for n, m in container.named_modules() if isinstance(m, SequenceBatchNorm)} == momenta


def test_running_average_after_estimation_uses_restored_momentum():
    model = _model(1, seed=5)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    estimate_population_statistics(model, [x])
    before = _site(model, 0, "x").running_mean.clone()
    model.train()
    x2 = torch.randn(4, 3, 3, dtype=torch.float64) * 2 + 1
    model(x2)
    batch = _batch_statistics(model, x2)
    # one estimation batch, then this one: n = 2, rate max(0.1, 1/2) = 0.5 (the plain average of the two)
    assert _site(model, 0, "x").num_batches_tracked[:4].tolist() == [2] * 4
    exp = torch.stack([0.5 * before[t] + 0.5 * batch[(0, "x", t)][0] for t in range(4)])
    torch.testing.assert_close(_site(model, 0, "x").running_mean[:4], exp, rtol=1e-12, atol=1e-12)


def test_unreached_steps_get_last_reached_statistics():
    model = _model(2, max_steps=10, seed=6)
    xs = [torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(3, 3, 3, dtype=torch.float64)]
    estimate_population_statistics(model, xs)
    s1, s2 = (_batch_statistics(model, x) for x in xs)
    for layer in range(2):
        for name in SITES:
            bn = _site(model, layer, name)
            # step 3 was reached by the first batch only: its statistics are that batch's, not a half-weighted mix
            torch.testing.assert_close(bn.running_mean[3], s1[(layer, name, 3)][0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(bn.running_var[3], s1[(layer, name, 3)][1], rtol=1e-10, atol=1e-12)
            for t in range(4, 10):
                assert torch.equal(bn.running_mean[t], bn.running_mean[3]), (layer, name, t)
                assert torch.equal(bn.running_var[t], bn.running_var[3]), (layer, name, t)
            mean_0 = (s1[(layer, name, 0)][0] + s2[(layer, name, 0)][0]) / 2
            torch.testing.assert_close(bn.running_mean[0], mean_0, rtol=1e-10, atol=1e-12)
    # eval on a longer sequence therefore equals eval with a table cut at the last reached step
    model.eval()
    x = torch.randn(12, 2, 3, dtype=torch.float64)
    short = BNLSTM(3, 4, num_layers=2, max_steps=4).double()
    state = model.state_dict()
    short.load_state_dict({k: (v[:4] if "running" in k or "num_batches" in k else v) for k, v in state.items()})
    short.eval()
    torch.testing.assert_close(short(x)[0], model(x)[0], rtol=1e-13, atol=1e-14)


def test_forward_argument_is_used():
    model = _model(1, seed=7)
    xs = [torch.randn(5, 3, 3, dtype=torch.float64) for _ in range(2)]
    ref = copy.deepcopy(model)
    estimate_population_statistics(ref, xs)
    calls = []

    def forward(m, batch):
        inputs, targets = batch
        calls.append(targets)
        return m(inputs)

    n = estimate_population_statistics(model, [(x, k) for k, x in enumerate(xs)], forward=forward)
    assert n == 2 and calls == [0, 1]
    assert _stat_state(model).keys() == _stat_state(ref).keys()
    for k, v in _stat_state(model).items():
        assert torch.equal(v, _stat_state(ref)[k]), k
    # without `forward`, a tuple batch is passed as is to module(batch): BNLSTM rejects it with a clear error
    with pytest.raises(TypeError, match="tensor"):
        estimate_population_statistics(model, [(xs[0], 0)])


def test_max_batches_is_honoured():
    model = _model(1, seed=8)
    xs = [torch.randn(5, 3, 3, dtype=torch.float64) * (k + 1) for k in range(4)]
    ref = copy.deepcopy(model)
    estimate_population_statistics(ref, xs[:2])
    assert estimate_population_statistics(model, iter(xs), max_batches=2) == 2
    for k, v in _stat_state(model).items():
        assert torch.equal(v, _stat_state(ref)[k]), k
    assert estimate_population_statistics(model, xs, max_batches=10) == 4
    assert all(bn.num_batches_tracked[:5].tolist() == [4] * 5 for bn in batchnorm_sites(model))
    with pytest.raises(ValueError, match="max_batches"):
        estimate_population_statistics(model, xs, max_batches=0)


def test_empty_batches_raise():
    model = _model(1, seed=9)
    with pytest.raises(ValueError, match="no batches"):
        estimate_population_statistics(model, [])
    with pytest.raises(ValueError, match="no batches"):
        estimate_population_statistics(model, iter(()))


def test_module_without_batchnorm_raises():
    with pytest.raises(ValueError, match="no SequenceBatchNorm"):
        estimate_population_statistics(BNLSTM(3, 4, normalize=False), [torch.randn(3, 2, 3)])


def test_h0_noise_and_dropout_not_applied_during_estimation():
    noisy = _model(2, seed=10, h0_noise_std=0.5, dropout=0.5)
    plain = copy.deepcopy(noisy)
    plain.h0_noise_std = 0.0
    plain.dropout = 0.0
    xs = [torch.randn(6, 4, 3, dtype=torch.float64) for _ in range(2)]
    a, b = copy.deepcopy(noisy), copy.deepcopy(noisy)
    torch.manual_seed(1)
    estimate_population_statistics(a, xs)
    torch.manual_seed(2)
    estimate_population_statistics(b, xs)
    estimate_population_statistics(plain, xs)
    for k, v in _stat_state(a).items():
        assert torch.equal(v, _stat_state(b)[k]), k
        assert torch.equal(v, _stat_state(plain)[k]), k
    # the noise is real in training (the test is sensitive)
    noisy.train()
    torch.manual_seed(1)
    y1, _ = copy.deepcopy(noisy)(xs[0])
    torch.manual_seed(2)
    y2, _ = copy.deepcopy(noisy)(xs[0])
    assert not torch.allclose(y1, y2)


def test_works_on_a_bare_sequence_batchnorm():
    bn = SequenceBatchNorm(3, 5, momentum=0.2).double()
    xs = [torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64) + 1]
    assert estimate_population_statistics(bn, xs) == 2
    torch.testing.assert_close(bn.running_mean[:2], (xs[0][:2].mean(1) + xs[1].mean(1)) / 2)
    torch.testing.assert_close(
        bn.running_var[:2], (xs[0][:2].var(1, unbiased=False) + xs[1].var(1, unbiased=False)) / 2
    )
    torch.testing.assert_close(bn.running_mean[2], xs[0][2].mean(0))
    assert torch.equal(bn.running_mean[3], bn.running_mean[2]) and torch.equal(bn.running_mean[4], bn.running_mean[2])
    assert bn.momentum == 0.2 and bn.training


def test_longer_than_max_steps_raises_during_estimation():
    model = _model(1, max_steps=4, seed=11)
    with pytest.raises(ValueError, match="max_steps"):
        estimate_population_statistics(model, [torch.randn(5, 3, 3, dtype=torch.float64)])
    assert model.training and all(bn.momentum == 0.1 for bn in batchnorm_sites(model))


def test_failed_estimation_keeps_previous_statistics():
    model = _model(1, seed=12)
    before = _stat_state(model)
    with pytest.raises(ValueError, match="no batches"):
        estimate_population_statistics(model, [])
    for k, v in _stat_state(model).items():
        assert torch.equal(v, before[k]), k


def test_max_batches_consumes_only_max_batches_items():
    model = _model(1, seed=13)
    pulled = []

    def batches():
        for k in range(4):
            pulled.append(k)
            yield torch.randn(5, 3, 3, dtype=torch.float64)

    assert estimate_population_statistics(model, batches(), max_batches=2) == 2
    assert pulled == [0, 1]
