"""SequenceBatchNorm: per-time-step statistics, momentum, masks, eval statistics, errors (Cooijmans et al.
2017, eqs. 6-8)."""

from __future__ import annotations

import copy

import pytest
import torch

from bnlstm_lit.nn import SequenceBatchNorm, set_eval_statistics

EPS = 1e-5
# running statistics of float64 modules are exact up to float64 rounding (test_running_stat_update_is_exact_in_float64)
STAT_TOL = {"rtol": 1e-12, "atol": 1e-12}


def _bn(C: int = 3, max_steps: int = 6, **kw) -> SequenceBatchNorm:
    bn = SequenceBatchNorm(C, max_steps, **kw).double()
    with torch.no_grad():  # non-trivial γ/β so that a wrong affine shows
        bn.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=torch.float64))
        if bn.bias is not None:
            bn.bias.copy_(torch.linspace(-0.3, 0.4, C, dtype=torch.float64))
    return bn


def _ref_stats(x: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-step mean and biased variance of (T, B, C), padding excluded. Returns (T, C), (T, C)."""
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
    means, vars_ = [], []
    for t in range(x.shape[0]):
        xt = x[t][mask[t]]
        mu = xt.mean(0)
        means.append(mu)
        vars_.append(((xt - mu) ** 2).mean(0))
    return torch.stack(means), torch.stack(vars_)


def _ref_norm(x, mean, var, weight, bias):
    y = (x - mean) / torch.sqrt(var + EPS) * weight
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------------------------------
# construction


def test_init_buffers_and_parameters():
    bn = SequenceBatchNorm(4, 7)
    assert bn.running_mean.shape == (7, 4) and bn.running_var.shape == (7, 4)
    assert bn.num_batches_tracked.shape == (7,)
    assert torch.equal(bn.running_mean, torch.zeros(7, 4))
    assert torch.equal(bn.running_var, torch.ones(7, 4))
    assert torch.equal(bn.weight.detach(), torch.full((4,), 0.1))
    assert torch.equal(bn.bias.detach(), torch.zeros(4))
    assert bn.eval_statistics == "population"
    nobias = SequenceBatchNorm(4, 7, bias=False, gamma_init=0.3)
    assert nobias.bias is None
    assert [n for n, _ in nobias.named_parameters()] == ["weight"]
    assert torch.equal(nobias.weight.detach(), torch.full((4,), 0.3))
    # buffers are in the state dict (saved with checkpoints)
    assert {"running_mean", "running_var", "num_batches_tracked"} <= set(bn.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0, "max_steps": 3}, "num_features"),
        ({"num_features": -2, "max_steps": 3}, "num_features"),
        ({"num_features": 3, "max_steps": 0}, "max_steps"),
        ({"num_features": 3, "max_steps": 3, "momentum": 0.0}, "momentum"),
        ({"num_features": 3, "max_steps": 3, "momentum": 1.5}, "momentum"),
        ({"num_features": 3, "max_steps": 3, "momentum": -0.1}, "momentum"),
        ({"num_features": 3, "max_steps": 3, "eps": 0.0}, "eps"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequenceBatchNorm(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# training: per-step batch statistics


def test_train_sequence_matches_reference_and_updates_running_stats():
    torch.manual_seed(0)
    bn = _bn(momentum=0.1)
    x = (torch.randn(4, 5, 3, dtype=torch.float64) * torch.arange(1, 5)[:, None, None] + 2.0).requires_grad_()
    y = bn(x)
    mean, var = _ref_stats(x)
    ref = _ref_norm(x, mean[:, None], var[:, None], bn.weight, bn.bias)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # gradients flow through the statistics
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, bn.weight, bn.bias], g)
    exp = torch.autograd.grad(ref, [x, bn.weight, bn.bias], g)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # running stats: the first batch after a reset has rate max(0.1, 1/1) = 1: rows 0..3 = batch; rows 4, 5 untouched
    torch.testing.assert_close(bn.running_mean[:4], mean.detach(), **STAT_TOL)
    torch.testing.assert_close(bn.running_var[:4], var.detach(), **STAT_TOL)
    assert torch.equal(bn.running_mean[4:], torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(bn.running_var[4:], torch.ones(2, 3, dtype=torch.float64))
    assert bn.num_batches_tracked.tolist() == [1, 1, 1, 1, 0, 0]


def test_statistics_are_biased_variance():
    bn = _bn(C=1, momentum=1.0)
    x = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)  # one step, two samples: mean 2, biased var 1
    bn(x)
    assert bn.running_mean[0].item() == pytest.approx(2.0, abs=1e-12)
    assert bn.running_var[0].item() == pytest.approx(1.0, abs=1e-9)  # unbiased would be 2


def test_sequence_start_offset_uses_and_updates_rows_from_t():
    torch.manual_seed(1)
    bn = _bn(momentum=1.0)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    bn(x, t=3)
    mean, var = _ref_stats(x)
    torch.testing.assert_close(bn.running_mean[3:5], mean)
    torch.testing.assert_close(bn.running_var[3:5], var)
    assert bn.num_batches_tracked.tolist() == [0, 0, 0, 1, 1, 0]


def test_change_at_one_step_changes_only_that_row_of_running_stats():
    torch.manual_seed(2)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    x2 = x.clone()
    x2[2] = torch.randn(4, 3, dtype=torch.float64) * 3 + 1
    a, b = _bn(), _bn()
    ya, yb = a(x), b(x2)
    changed = [t for t in range(6) if not torch.equal(a.running_mean[t], b.running_mean[t])]
    changed_v = [t for t in range(6) if not torch.equal(a.running_var[t], b.running_var[t])]
    assert changed == [2] and changed_v == [2]
    # and the outputs at the other steps are identical (statistics are not shared over time)
    keep = [0, 1, 3, 4]
    assert torch.equal(ya[keep], yb[keep])


def test_vectorized_sequence_equals_separate_steps():
    torch.manual_seed(3)
    seq, step = _bn(momentum=0.3), _bn(momentum=0.3)
    rm, rv = torch.randn(6, 3), torch.rand(6, 3) + 0.5
    with torch.no_grad():
        for bn in (seq, step):
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
    x = torch.randn(5, 4, 3, dtype=torch.float64) * 2 + 1
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya = seq(xa, t=1)
    yb = torch.stack([step(xb[k], t=1 + k) for k in range(5)])
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa, seq.weight, seq.bias], g)
    gb = torch.autograd.grad(yb, [xb, step.weight, step.bias], g)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(seq.running_mean, step.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seq.running_var, step.running_var, rtol=1e-12, atol=1e-12)
    assert torch.equal(seq.num_batches_tracked, step.num_batches_tracked)
    # eval mode too, including steps >= max_steps
    seq.eval()
    step.eval()
    x = torch.randn(9, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(seq(x, t=0), torch.stack([step(x[k], t=k) for k in range(9)]))


def test_vectorized_masked_sequence_equals_separate_steps():
    torch.manual_seed(4)
    seq, step = _bn(), _bn()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 4, 2, 1])
    mask = torch.arange(5)[:, None] < lengths[None]
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya = seq(xa, 0, mask)
    yb = torch.stack([step(xb[k], k, mask[k]) for k in range(5)])
    torch.testing.assert_close(ya[mask], yb[mask], rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ya) * mask[:, :, None]
    ga = torch.autograd.grad(ya, [xa, seq.weight, seq.bias], g)
    gb = torch.autograd.grad(yb, [xb, step.weight, step.bias], g)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(seq.running_mean, step.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seq.running_var, step.running_var, rtol=1e-12, atol=1e-12)
    assert torch.equal(seq.num_batches_tracked, step.num_batches_tracked)


def test_training_beyond_max_steps_raises():
    bn = _bn(max_steps=4)
    with pytest.raises(ValueError, match="max_steps"):
        bn(torch.randn(5, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_steps"):
        bn(torch.randn(3, 3, dtype=torch.float64), t=4)
    with pytest.raises(ValueError, match="max_steps"):
        bn(torch.randn(2, 3, 3, dtype=torch.float64), t=3)
    bn(torch.randn(4, 3, 3, dtype=torch.float64))  # exactly max_steps is fine


def test_batch_size_one_in_training_raises():
    bn = _bn()
    with pytest.raises(ValueError, match=r"at least 2 .*batch of size 1"):
        bn(torch.randn(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batch of size 1"):
        bn(torch.randn(3, 1, 3, dtype=torch.float64))
    assert bn.num_batches_tracked.sum() == 0
    bn.eval()  # population statistics: batch size 1 is fine
    assert bn(torch.randn(1, 3, dtype=torch.float64)).shape == (1, 3)


def test_bad_input_shapes_raise():
    bn = _bn()
    with pytest.raises(ValueError, match=r"\(B, C\).*\(T, B, C\)"):
        bn(torch.randn(2, 3, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, C\).*\(T, B, C\)"):
        bn(torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 3 features, got 5"):
        bn(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        bn(torch.randn(3, 4, 3, dtype=torch.float64), 0, torch.ones(3, 5, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# momentum


def test_momentum_running_average_per_step():
    torch.manual_seed(5)
    bn = _bn(momentum=0.3)
    init_m = torch.randn(6, 3, dtype=torch.float64)
    init_v = torch.rand(6, 3, dtype=torch.float64) + 0.5
    with torch.no_grad():
        bn.running_mean.copy_(init_m)
        bn.running_var.copy_(init_v)
        bn.num_batches_tracked.fill_(100)  # past the warm-up (n > 1/momentum): the plain exponential average
    exp_m, exp_v = init_m.clone(), init_v.clone()
    for _ in range(3):
        x = torch.randn(4, 5, 3, dtype=torch.float64) * 2 - 1
        bn(x)
        m, v = _ref_stats(x)
        exp_m[:4] = 0.7 * exp_m[:4] + 0.3 * m
        exp_v[:4] = 0.7 * exp_v[:4] + 0.3 * v
    torch.testing.assert_close(bn.running_mean, exp_m, **STAT_TOL)
    torch.testing.assert_close(bn.running_var, exp_v, **STAT_TOL)
    assert bn.num_batches_tracked.tolist() == [103, 103, 103, 103, 100, 100]


def test_momentum_warm_up_starts_as_the_plain_average():
    # rate max(momentum, 1/n): batches 1..3 at momentum 0.4 get rates 1, 1/2, 0.4 (not 1/3)
    torch.manual_seed(7)
    bn = _bn(momentum=0.4)
    exp_m = torch.zeros(4, 3, dtype=torch.float64)
    exp_v = torch.ones(4, 3, dtype=torch.float64)
    for rate in (1.0, 0.5, 0.4):
        x = torch.randn(4, 5, 3, dtype=torch.float64) * 3 + 1
        bn(x)
        m, v = _ref_stats(x)
        exp_m = (1 - rate) * exp_m + rate * m
        exp_v = (1 - rate) * exp_v + rate * v
    torch.testing.assert_close(bn.running_mean[:4], exp_m, **STAT_TOL)
    torch.testing.assert_close(bn.running_var[:4], exp_v, **STAT_TOL)


def test_momentum_none_is_cumulative_average():
    torch.manual_seed(6)
    bn = _bn(momentum=None)
    with torch.no_grad():  # a reset must make the old values irrelevant
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(7.0)
    bn.reset_running_stats()
    ms, vs = [], []
    for k in range(3):
        x = torch.randn(4, 5, 3, dtype=torch.float64) * (k + 1) + k
        bn(x)
        m, v = _ref_stats(x)
        ms.append(m)
        vs.append(v)
    torch.testing.assert_close(bn.running_mean[:4], torch.stack(ms).mean(0), **STAT_TOL)
    torch.testing.assert_close(bn.running_var[:4], torch.stack(vs).mean(0), **STAT_TOL)
    assert bn.num_batches_tracked.tolist() == [3, 3, 3, 3, 0, 0]


def test_running_stat_update_is_exact_in_float64():
    bn = SequenceBatchNorm(1, 2, momentum=0.1).double()
    bn.num_batches_tracked.fill_(100)  # past the warm-up: rate 0.1
    bn(torch.ones(1, 2, 1, dtype=torch.float64))  # batch mean 1 at step 0
    assert bn.running_mean[0].item() == pytest.approx(0.1, rel=1e-14)
    cum = SequenceBatchNorm(1, 2, momentum=None).double()
    for k in range(3):  # batch means 0, 1, 2: plain average 1
        cum(torch.full((1, 2, 1), float(k), dtype=torch.float64))
    assert cum.running_mean[0].item() == pytest.approx(1.0, rel=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation: population statistics


def test_eval_uses_population_statistics_per_step():
    torch.manual_seed(7)
    bn = _bn(max_steps=4)
    rm = torch.randn(4, 3, dtype=torch.float64)
    rv = torch.rand(4, 3, dtype=torch.float64) + 0.5
    with torch.no_grad():
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
    bn.eval()
    x = torch.randn(9, 3, 3, dtype=torch.float64)  # longer than max_steps
    y = bn(x)
    idx = torch.arange(9).clamp(max=3)
    ref = _ref_norm(x, rm[idx][:, None], rv[idx][:, None], bn.weight, bn.bias)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # steps >= max_steps: numerically the statistics of step max_steps - 1
    xt = torch.randn(3, 3, dtype=torch.float64)
    y3 = bn(xt, t=3)
    for t in (4, 5, 50):
        assert torch.equal(bn(xt, t=t), y3)
    assert not torch.allclose(bn(xt, t=2), y3)
    # single steps agree with the sequence call
    for t in range(9):
        torch.testing.assert_close(bn(x[t], t=t), y[t], rtol=1e-12, atol=1e-12)
    # eval leaves running statistics alone
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)
    assert bn.num_batches_tracked.sum() == 0


def test_eval_output_independent_of_other_batch_members():
    torch.manual_seed(8)
    bn = _bn()
    bn(torch.randn(4, 6, 3, dtype=torch.float64) * 2 + 1)  # some non-trivial statistics
    bn.eval()
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    other = x.clone()
    other[:, 1:] = torch.randn(4, 2, 3, dtype=torch.float64) * 10
    torch.testing.assert_close(bn(x)[:, 0], bn(other)[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(bn(x[:, :1])[:, 0], bn(x)[:, 0], rtol=1e-14, atol=1e-14)
    # and changing the running statistics changes the eval output
    before = bn(x)
    with torch.no_grad():
        bn.running_mean[2] += 1.0
    after = bn(x)
    assert torch.equal(before[[0, 1, 3]], after[[0, 1, 3]])
    assert not torch.allclose(before[2], after[2])
    with torch.no_grad():
        bn.running_var[1] *= 4.0
    assert not torch.allclose(bn(x)[1], after[1])


def test_train_mode_does_not_use_population_statistics():
    torch.manual_seed(9)
    a, b = _bn(), _bn()
    with torch.no_grad():
        b.running_mean.copy_(torch.randn(6, 3))
        b.running_var.copy_(torch.rand(6, 3) + 3)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_set_eval_statistics_batch_equals_train_output_without_updating():
    torch.manual_seed(10)
    bn = _bn()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, 3))
        bn.running_var.copy_(torch.rand(6, 3) + 0.5)
    train_copy = copy.deepcopy(bn)
    fresh = copy.deepcopy(bn)
    x = torch.randn(4, 5, 3, dtype=torch.float64) * 3
    y_train = train_copy(x)
    wrapper = torch.nn.Sequential(bn)
    wrapper.eval()
    y_pop = bn(x)
    set_eval_statistics(wrapper, "batch")
    assert bn.eval_statistics == "batch"
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    y_batch = bn(x)
    torch.testing.assert_close(y_batch, y_train, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y_pop, y_train)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # masked batch-statistics evaluation is the masked training output too
    mask = torch.arange(4)[:, None] < torch.tensor([4, 3, 2, 2, 1])[None]
    torch.testing.assert_close(bn(x, 0, mask)[mask], fresh(x, 0, mask)[mask], rtol=1e-12, atol=1e-12)
    # and back
    set_eval_statistics(wrapper, "population")
    torch.testing.assert_close(bn(x), y_pop, rtol=0, atol=0)
    with pytest.raises(ValueError, match="population.*batch"):
        set_eval_statistics(wrapper, "running")


# ---------------------------------------------------------------------------------------------------------------------
# masks


def test_masked_statistics_ignore_padding():
    torch.manual_seed(11)
    lengths = torch.tensor([5, 5, 3, 2, 4])
    mask = torch.arange(5)[:, None] < lengths[None]  # (T, B)
    x = torch.randn(5, 5, 3, dtype=torch.float64) + 1.5
    x_garbage = torch.where(mask[:, :, None], x, torch.full_like(x, 1e6))
    x_zero = torch.where(mask[:, :, None], x, torch.zeros_like(x))
    a, b, c = _bn(), _bn(), _bn()
    ya, yb, yc = a(x_garbage, 0, mask), b(x_zero, 0, mask), c(x, 0, mask)
    mean, var = _ref_stats(x, mask)
    ref = _ref_norm(x, mean[:, None], var[:, None], a.weight, a.bias)
    for y in (ya, yb, yc):
        torch.testing.assert_close(y[mask], ref[mask], rtol=1e-10, atol=1e-10)
    for bn in (a, b, c):  # first batch after a reset: rate 1
        torch.testing.assert_close(bn.running_mean[:5], mean, **STAT_TOL)
        torch.testing.assert_close(bn.running_var[:5], var, **STAT_TOL)
    # and zero padding without a mask would have biased them (the test is sensitive)
    d = _bn()
    d(x_zero)
    assert not torch.allclose(d.running_mean[:5], a.running_mean[:5])
    # no gradient reaches padded positions through the statistics
    xg = x_garbage.clone().requires_grad_()
    y = _bn()(xg, 0, mask)
    (gx,) = torch.autograd.grad((y * mask[:, :, None]).square().sum(), [xg])
    assert torch.equal(gx[~mask], torch.zeros_like(gx[~mask]))
    assert gx[mask].abs().sum() > 0


def test_step_with_fewer_than_two_real_uses_population_and_does_not_update():
    torch.manual_seed(12)
    bn = _bn(momentum=0.5)
    rm = torch.randn(6, 3, dtype=torch.float64)
    rv = torch.rand(6, 3, dtype=torch.float64) + 0.5
    with torch.no_grad():
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        bn.num_batches_tracked.fill_(10)  # past the warm-up: rate 0.5
    lengths = torch.tensor([4, 2, 1])
    mask = torch.arange(4)[:, None] < lengths[None]  # steps 0,1: >= 2 real; steps 2,3: one real
    x = torch.randn(4, 3, 3, dtype=torch.float64) * 2
    x = torch.where(mask[:, :, None], x, torch.full_like(x, 1e6))
    y = bn(x, 0, mask)
    mean, var = _ref_stats(x[:2], mask[:2])
    ref_batch = _ref_norm(x[:2], mean[:, None], var[:, None], bn.weight, bn.bias)
    ref_pop = _ref_norm(x[2:], rm[2:4, None], rv[2:4, None], bn.weight, bn.bias)
    torch.testing.assert_close(y[:2][mask[:2]], ref_batch[mask[:2]], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[2:, 0], ref_pop[:, 0], rtol=1e-12, atol=1e-12)
    assert bn.num_batches_tracked.tolist() == [11, 11, 10, 10, 10, 10]
    assert torch.equal(bn.running_mean[2:], rm[2:]) and torch.equal(bn.running_var[2:], rv[2:])
    torch.testing.assert_close(bn.running_mean[:2], 0.5 * rm[:2] + 0.5 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var[:2], 0.5 * rv[:2] + 0.5 * var, rtol=1e-12, atol=1e-12)
    # a single step with one real sample, and with momentum=None
    cum = _bn(momentum=None)
    step_mask = torch.tensor([False, True, False])
    out = cum(x[0], 1, step_mask)
    torch.testing.assert_close(
        out[1],
        _ref_norm(x[0, 1], cum.running_mean[1], cum.running_var[1], cum.weight, cum.bias),
        rtol=1e-12,
        atol=1e-12,
    )
    assert cum.num_batches_tracked.sum() == 0
    assert torch.equal(cum.running_mean, torch.zeros(6, 3, dtype=torch.float64))
    assert torch.equal(cum.running_var, torch.ones(6, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------------
# mixed precision


def test_bf16_autocast_keeps_float32_statistics():
    torch.manual_seed(13)
    bn = SequenceBatchNorm(8, 5)
    x = torch.randn(4, 6, 8) * 3 + 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = (x @ torch.eye(8)).requires_grad_()  # a bf16 tensor as produced by an autocast matmul
        assert xb.dtype == torch.bfloat16
        y = bn(xb)
        y.float().sum().backward()
    assert torch.isfinite(y).all()
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    mean, var = _ref_stats(xb.detach().double())
    torch.testing.assert_close(bn.running_mean[:4], mean.float(), rtol=1e-4, atol=1e-4)  # first batch: rate 1
    torch.testing.assert_close(bn.running_var[:4], var.float(), rtol=1e-3, atol=1e-3)
    assert xb.grad is not None and torch.isfinite(xb.grad).all()


def test_nan_and_inf_in_padding_do_not_reach_real_positions():
    torch.manual_seed(0)
    bn = SequenceBatchNorm(3, 4).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2:, 3:] = False  # the last two sequences end after step 1
    clean = bn(x.masked_fill(~mask[..., None], 0.0), 0, mask)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    bn.reset_running_stats()
    dirty = x.clone()
    dirty[2:, 3] = float("nan")
    dirty[2:, 4] = float("inf")
    out = bn(dirty, 0, mask)
    torch.testing.assert_close(out[mask], clean[mask])
    torch.testing.assert_close((bn.running_mean, bn.running_var), stats)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_deferred_updates_equal_immediate_updates(momentum):
    from bnlstm_lit.nn.batchnorm import deferred_statistics_updates

    torch.manual_seed(14)
    immediate, deferred = _bn(momentum=momentum), _bn(momentum=momentum)
    steps = [torch.randn(5, 3, dtype=torch.float64) * (t + 1) for t in range(4)]
    masks = [
        None,
        torch.tensor([True, True, False, True, False]),
        torch.tensor([True, False, False, False, False]),
        None,
    ]
    calls = [(0, steps[0], masks[0]), (1, steps[1], masks[1]), (2, steps[2], masks[2]), (3, steps[3], masks[3])]
    calls += [(1, steps[2], None), (5, steps[0], None)]  # a repeated step and a jump: not one consecutive run
    outs_immediate = [immediate(x, t, m) for t, x, m in calls]
    with deferred_statistics_updates(deferred):
        with deferred_statistics_updates(deferred):  # nested: the outer context collects
            outs_deferred = [deferred(x, t, m) for t, x, m in calls]
        assert deferred.num_batches_tracked.sum() == 0  # nothing written before the outermost exit
    for a, b in zip(outs_immediate, outs_deferred, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(deferred.running_mean, immediate.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(deferred.running_var, immediate.running_var, rtol=1e-12, atol=1e-12)
    assert torch.equal(deferred.num_batches_tracked, immediate.num_batches_tracked)
    assert deferred.num_batches_tracked.tolist() == [1, 2, 0, 1, 0, 1]  # step 2 had one real sequence only
