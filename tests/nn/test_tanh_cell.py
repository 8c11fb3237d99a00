"""BNRNNCell (the BN tanh RNN of the paper's Fig. 1) run by BNLSTM(cell="tanh"), and BNLSTM's gradient probe.

Golden test against the equation written out here, parity with torch.nn.RNN, init, the carried c, population
statistics, the (unused) fast paths, errors; then ``probe_hidden_grad`` / ``hidden_probes`` / ``hidden_grad_norms``
for both cells against an independent step-by-step run of the cells.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnlstm_lit.nn import BNLSTM, BNLSTMCell, BNRNNCell

TOL = {"rtol": 1e-9, "atol": 1e-10}
EPS = 1e-5
I, H = 3, 5  # input and hidden sizes: not multiples of each other nor of anything else


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _perturb(model: BNLSTM, seed: int = 0, h0: bool = False) -> BNLSTM:
    """Non-trivial γ and b (and h0 if asked) so that every parameter matters in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bn_x.weight", "bn_h.weight", "bn_c.weight")):
                p.copy_(0.3 + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("bias") or (h0 and name in ("h0", "c0")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _tanh_model(num_layers: int = 1, max_steps: int = 8, seed: int = 0, h0: bool = False, **kw) -> BNLSTM:
    torch.manual_seed(seed)
    model = BNLSTM(I, H, num_layers=num_layers, max_steps=max_steps, cell="tanh", **kw).double()
    return _perturb(model, seed, h0)


def _set_random_population(model: BNLSTM, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g, dtype=buf.dtype))
            elif name.endswith("running_var"):
                buf.copy_(0.3 + torch.rand(buf.shape, generator=g, dtype=buf.dtype))


def _tanh_reference(model: BNLSTM, x, state=None, mode: str = "train"):
    """The paper's Fig. 1 equation written out, reading only the model's parameters and buffers.

        h_t = tanh(BN_t(W_h h_{t-1}; γ_h) + BN_t(W_x x_t; γ_x) + b),   BN without shift, ε = 1e-5

    x: (T, B, I). mode "train": per-step batch mean and biased variance over the batch axis; mode "population": the
    running statistics of row min(t, max_steps - 1). Returns output (T, B, H), (h_n, c_n) and the batch statistics
    used, {(layer, site, t): (mean, var)}.
    """
    T, B, _ = x.shape
    stats = {}

    def bn(v, site, name, layer, t):
        if site is None:
            return v
        if mode == "train":
            mu = v.mean(0)
            var = ((v - mu) ** 2).mean(0)
            stats[(layer, name, t)] = (mu.detach(), var.detach())
        else:
            row = min(t, site.max_steps - 1)
            mu, var = site.running_mean[row], site.running_var[row]
        return (v - mu) / torch.sqrt(var + EPS) * site.weight

    if state is None:
        h0, c0 = model.h0[:, None].expand(-1, B, -1), model.c0[:, None].expand(-1, B, -1)
    else:
        h0, c0 = state
    inp, h_n, c_n = x, [], []
    for layer, cell in enumerate(model.cells):
        h = h0[layer]
        outs = []
        for t in range(T):
            pre = (
                bn(h @ cell.weight_hh.T, cell.bn_h, "h", layer, t)
                + bn(inp[t] @ cell.weight_ih.T, cell.bn_x, "x", layer, t)
                + cell.bias
            )
            h = torch.tanh(pre)
            outs.append(h)
        inp = torch.stack(outs)
        h_n.append(h)
        c_n.append(c0[layer])  # no memory cell: c is carried unchanged
    return inp, (torch.stack(h_n), torch.stack(c_n)), stats


def _grads(loss, named):
    names = [n for n, _ in named]
    gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return dict(zip(names, gs, strict=True))


def _loss_weights(out, h_n, c_n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(v.shape, generator=g, dtype=out.dtype) for v in (out, h_n, c_n))


def _loss(out, h_n, c_n, seed=123):
    """A nonlinear loss of everything the layer returns (linear in h_n: dloss/dh_n is the weight ``w_h``)."""
    w_out, w_h, w_c = _loss_weights(out, h_n, c_n, seed)
    return (out.square() * w_out).sum() + (h_n * w_h).sum() + (c_n.sin() * w_c).sum()


def _assert_orthogonal(block):
    r, c = block.shape
    gram = block.T @ block if r >= c else block @ block.T
    torch.testing.assert_close(gram, torch.eye(min(r, c), dtype=block.dtype), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# golden test: BNLSTM(cell="tanh") equals the Fig. 1 equation


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
def test_tanh_train_matches_equation(num_layers, batch_first):
    T, B = 6, 5
    model = _tanh_model(num_layers, max_steps=T, seed=1, batch_first=batch_first)
    assert torch.equal(model.h0.detach(), torch.zeros(num_layers, H, dtype=torch.float64))
    ref_model = copy.deepcopy(model)
    x = torch.randn(T, B, I, dtype=torch.float64) * 1.5 + 0.5
    xm = (x.transpose(0, 1) if batch_first else x).clone().requires_grad_()
    xr = x.clone().requires_grad_()
    out_m, (hm, cm) = model(xm)
    out_r, (hr, cr), stats = _tanh_reference(ref_model, xr)
    if batch_first:
        assert out_m.shape == (B, T, H)
        out_m_tb = out_m.transpose(0, 1)
    else:
        out_m_tb = out_m
    assert out_m_tb.shape == (T, B, H) and hm.shape == cm.shape == (num_layers, B, H)
    torch.testing.assert_close(out_m_tb, out_r, **TOL)
    torch.testing.assert_close(hm, hr, **TOL)
    torch.testing.assert_close(hm[-1], out_m_tb[-1], rtol=0, atol=0)
    assert torch.equal(cm, torch.zeros(num_layers, B, H, dtype=torch.float64))
    # gradients of the input and of every parameter
    named_m = [("x", xm), *model.named_parameters()]
    named_r = [("x", xr), *ref_model.named_parameters()]
    mg = _grads(_loss(out_m, hm, cm), named_m)
    rg = _grads(_loss(out_r.transpose(0, 1) if batch_first else out_r, hr, cr), named_r)
    assert mg.keys() == rg.keys()
    expected = {"x", "h0"} | {
        f"cells.{layer}.{p}" for layer in range(num_layers) for p in ("weight_ih", "weight_hh", "bias")
    }
    expected |= {f"cells.{layer}.bn_{s}.weight" for layer in range(num_layers) for s in ("x", "h")}
    assert set(mg) == expected
    rg["x"] = rg["x"].transpose(0, 1) if batch_first else rg["x"]
    for name in mg:
        assert mg[name] is not None and rg[name] is not None, name
        torch.testing.assert_close(mg[name], rg[name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
        if name != "h0":  # (the batch-constant h0 only reaches a batch norm: its gradient is ~0, see below)
            assert mg[name].abs().max() > 1e-6, name
    # running statistics after the first batch (rate 1): exactly the per-step batch statistics
    for layer in range(num_layers):
        for site in ("x", "h"):
            bn = getattr(model.cells[layer], f"bn_{site}")
            assert torch.equal(bn.num_batches_tracked, torch.ones(T, dtype=torch.long))
            for t in range(T):
                mu, var = stats[(layer, site, t)]
                torch.testing.assert_close(bn.running_mean[t], mu, **TOL)
                torch.testing.assert_close(bn.running_var[t], var, **TOL)


def test_tanh_train_with_explicit_state_matches_equation():
    T, B, L = 5, 4, 2
    model = _tanh_model(L, max_steps=T, seed=2)
    ref_model = copy.deepcopy(model)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(L, B, H, dtype=torch.float64)
    c0 = torch.randn(L, B, H, dtype=torch.float64)
    hm0, hr0 = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    out_m, (hm, cm) = model(x, (hm0, c0))
    out_r, (hr, _), _ = _tanh_reference(ref_model, x, (hr0, c0))
    torch.testing.assert_close(out_m, out_r, **TOL)
    torch.testing.assert_close(hm, hr, **TOL)
    assert torch.equal(cm, c0)
    (gm,) = torch.autograd.grad((out_m.square()).sum() + hm.sum(), [hm0])
    (gr,) = torch.autograd.grad((out_r.square()).sum() + hr.sum(), [hr0])
    torch.testing.assert_close(gm, gr, **TOL)
    assert gm.abs().max() > 1e-6  # a per-sequence h0 matters, unlike the batch-constant learned one


def test_learned_h0_gets_zero_gradient_in_training_with_normalization():
    """Property of the model (not a bug): in training, the batch-constant learned h0 only reaches BN_0(W_h h0),
    which is 0 whatever h0 is; its gradient exists (DDP) but is ~0. Without normalization it is not."""
    x = torch.randn(4, 3, I, dtype=torch.float64)
    for normalize, zero in ((True, True), (False, False)):
        model = _tanh_model(1, max_steps=4, seed=3, h0=True, normalize=normalize)
        out, _ = model(x)
        out.sum().backward()
        assert model.h0.grad is not None
        assert (model.h0.grad.abs().max() < 1e-12) == zero, normalize


# ---------------------------------------------------------------------------------------------------------------------
# normalize=False equals torch.nn.RNN(nonlinearity="tanh")


def _rnn_pair(L: int, fused: bool, seed: int = 0, batch_first: bool = False):
    torch.manual_seed(seed)
    model = BNLSTM(
        I,
        H,
        num_layers=L,
        normalize=False,
        cell="tanh",
        max_steps=4,
        implementation=("auto" if fused else "reference"),
        batch_first=batch_first,
    ).double()
    ref = nn.RNN(I, H, num_layers=L, nonlinearity="tanh", batch_first=batch_first).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        model.h0.zero_()
        for layer, cell in enumerate(model.cells):
            assert cell.bn_x is None and cell.bn_h is None and cell.bn_c is None
            getattr(ref, f"weight_ih_l{layer}").copy_(cell.weight_ih)
            getattr(ref, f"weight_hh_l{layer}").copy_(cell.weight_hh)
            getattr(ref, f"bias_ih_l{layer}").copy_(cell.bias)
            getattr(ref, f"bias_hh_l{layer}").zero_()
    return model, ref


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("explicit_state", [False, True])
def test_plain_tanh_equals_torch_rnn(num_layers, fused, explicit_state):
    T, B = 7, 3
    model, ref = _rnn_pair(num_layers, fused, seed=num_layers)
    assert not any("bn_" in n for n, _ in model.named_parameters())
    x = torch.randn(T, B, I, dtype=torch.float64)
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    if explicit_state:
        h0 = torch.randn(num_layers, B, H, dtype=torch.float64)
        c0 = torch.randn(num_layers, B, H, dtype=torch.float64)
        out_m, (hm, cm) = model(xm, (h0, c0))
        out_r, hr = ref(xr, h0)
        assert torch.equal(cm, c0)
    else:
        out_m, (hm, cm) = model(xm)
        out_r, hr = ref(xr)
        assert torch.equal(cm, torch.zeros(num_layers, B, H, dtype=torch.float64))
    torch.testing.assert_close(out_m, out_r, **TOL)
    torch.testing.assert_close(hm, hr, **TOL)
    g = torch.randn(T, B, H, dtype=torch.float64)
    mg = _grads((out_m * g).sum() + hm.square().sum(), [("x", xm), *model.named_parameters()])
    rg = _grads((out_r * g).sum() + hr.square().sum(), [("x", xr), *ref.named_parameters()])
    torch.testing.assert_close(mg["x"], rg["x"], **TOL)
    for layer in range(num_layers):
        torch.testing.assert_close(mg[f"cells.{layer}.weight_ih"], rg[f"weight_ih_l{layer}"], **TOL)
        torch.testing.assert_close(mg[f"cells.{layer}.weight_hh"], rg[f"weight_hh_l{layer}"], **TOL)
        torch.testing.assert_close(mg[f"cells.{layer}.bias"], rg[f"bias_ih_l{layer}"], **TOL)
        torch.testing.assert_close(mg[f"cells.{layer}.bias"], rg[f"bias_hh_l{layer}"], **TOL)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
def test_plain_tanh_lengths_equal_packed_sequence(num_layers, batch_first):
    T, B = 6, 5
    model, ref = _rnn_pair(num_layers, fused=True, seed=3, batch_first=batch_first)
    lengths = torch.tensor([4, 6, 1, 3, 5])
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    out_m, (hm, cm) = model(x, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out_p, hr = ref(packed)
    out_r, _ = pad_packed_sequence(out_p, batch_first=batch_first, total_length=T)
    tb_m = out_m.transpose(0, 1) if batch_first else out_m
    tb_r = out_r.transpose(0, 1) if batch_first else out_r
    real = torch.arange(T)[:, None] < lengths[None]  # (T, B)
    torch.testing.assert_close(tb_m[real], tb_r[real], **TOL)
    assert torch.equal(tb_m[~real], torch.zeros_like(tb_m[~real]))
    assert (tb_m[real].abs() > 0).all()
    torch.testing.assert_close(hm, hr, **TOL)
    torch.testing.assert_close(hm[-1], tb_m[lengths - 1, torch.arange(B)], rtol=0, atol=0)
    assert torch.equal(cm, torch.zeros_like(cm))


# ---------------------------------------------------------------------------------------------------------------------
# initialization and parameters


@pytest.mark.parametrize(("in_size", "hid"), [(3, 5), (7, 3)])
def test_init(in_size, hid):
    torch.manual_seed(0)
    model = BNLSTM(in_size, hid, num_layers=2, max_steps=9, cell="tanh", gamma_init=0.3, forget_bias=2.0)
    assert model.cell == "tanh"
    names = dict(model.named_parameters())
    expected = {"h0"}
    for layer, cell in enumerate(model.cells):
        assert isinstance(cell, BNRNNCell) and not isinstance(cell, BNLSTMCell)
        in_features = in_size if layer == 0 else hid
        assert cell.weight_ih.shape == (hid, in_features)
        assert cell.weight_hh.shape == (hid, hid)
        assert cell.bias.shape == (hid,)
        assert torch.equal(cell.bias.detach(), torch.zeros(hid))  # forget_bias is ignored (no gates)
        w_hh = cell.weight_hh.detach()
        torch.testing.assert_close(w_hh @ w_hh.T, torch.eye(hid), rtol=0, atol=1e-5)  # W W^T = I
        assert not torch.allclose(w_hh, torch.eye(hid))
        _assert_orthogonal(cell.weight_ih.detach())
        assert cell.bn_c is None
        for bn in (cell.bn_x, cell.bn_h):
            assert bn.weight.shape == (hid,) and bn.bias is None
            assert torch.equal(bn.weight.detach(), torch.full((hid,), 0.3))
            assert bn.running_mean.shape == bn.running_var.shape == (9, hid)
        prefix = f"cells.{layer}."
        expected |= {prefix + p for p in ("weight_ih", "weight_hh", "bias", "bn_x.weight", "bn_h.weight")}
    assert set(names) == expected
    assert model.h0.shape == (2, hid)


def test_init_identity_g_and_reset():
    torch.manual_seed(0)
    model = BNLSTM(I, H, num_layers=2, max_steps=4, cell="tanh", recurrent_init="identity_g")
    for cell in model.cells:
        assert torch.equal(cell.weight_hh.detach(), torch.eye(H))
        _assert_orthogonal(cell.weight_ih.detach())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            b.add_(1)
    model.reset_parameters()
    assert torch.equal(model.h0.detach(), torch.zeros(2, H)) and torch.equal(model.c0, torch.zeros(2, H))
    for cell in model.cells:
        assert torch.equal(cell.weight_hh.detach(), torch.eye(H))
        assert torch.equal(cell.bias.detach(), torch.zeros(H))
        assert torch.equal(cell.bn_x.weight.detach(), torch.full((H,), 0.1))
        assert torch.equal(cell.bn_h.running_var, torch.ones(4, H))
        assert cell.bn_x.num_batches_tracked.sum() == 0


def test_cell_direct_contract():
    torch.manual_seed(0)
    cell = BNRNNCell(I, H, max_steps=4).double()
    assert not BNRNNCell.fast_paths and BNLSTMCell.fast_paths
    x = torch.randn(3, 6, I, dtype=torch.float64)
    terms = cell.input_term(x)
    assert terms.shape == (3, 6, H)
    # the input term is BN_t(W_x x_t) + b with per-step statistics: zero batch mean per step (b = 0)
    torch.testing.assert_close(terms.mean(1), torch.zeros(3, H, dtype=torch.float64), rtol=0, atol=1e-12)
    h = torch.randn(6, H, dtype=torch.float64)
    c = torch.randn(6, H, dtype=torch.float64)
    h1, c1 = cell(terms[1], (h, c), 1)
    assert h1.shape == (6, H)
    assert c1 is c  # passed through untouched
    wh = h @ cell.weight_hh.T
    gamma_h = cell.bn_h.weight
    torch.testing.assert_close(gamma_h.detach(), torch.full((H,), 0.1, dtype=torch.float64), rtol=0, atol=1e-8)
    expected = torch.tanh((wh - wh.mean(0)) / torch.sqrt(wh.var(0, unbiased=False) + EPS) * gamma_h + terms[1])
    torch.testing.assert_close(h1, expected, **TOL)


def test_c0_is_a_buffer_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    for normalize in (True, False):
        model = BNLSTM(I, H, num_layers=2, max_steps=6, cell="tanh", normalize=normalize)
        assert "c0" not in dict(model.named_parameters())
        assert "c0" in dict(model.named_buffers()) and "c0" in model.state_dict()
        assert not model.c0.requires_grad
        out, (h_n, c_n) = model(torch.randn(6, 4, I))
        assert torch.equal(c_n, torch.zeros(2, 4, H))
        out.sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, (normalize, name)
            if name != "h0" or not normalize:
                assert p.grad.abs().max() > 0, (normalize, name)
        assert model.c0.grad is None
    # the LSTM's c0 stays a parameter
    assert "c0" in dict(BNLSTM(I, H, max_steps=3).named_parameters())


def test_c_is_carried_unchanged_with_lengths_and_state_dict_roundtrip():
    model = _tanh_model(2, max_steps=6, seed=4)
    x = torch.randn(6, 4, I, dtype=torch.float64)
    c0 = torch.randn(2, 4, H, dtype=torch.float64)
    h0 = torch.randn(2, 4, H, dtype=torch.float64)
    _, (_, c_n) = model(x, (h0, c0), lengths=torch.tensor([6, 2, 5, 3]))
    assert torch.equal(c_n, c0)
    other = BNLSTM(I, H, num_layers=2, max_steps=6, cell="tanh").double()
    other.load_state_dict(model.state_dict())
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------------------------------------------------------
# population statistics in evaluation


def test_running_statistics_are_the_plain_average_and_eval_uses_them():
    """momentum=None: after two training batches the running statistics are the plain average of the per-step
    batch statistics, and eval computes the equation with those statistics (not with batch statistics)."""
    T = 5
    model = _tanh_model(2, max_steps=T, seed=5, h0=True, momentum=None)
    x1 = torch.randn(T, 5, I, dtype=torch.float64)
    x2 = torch.randn(T, 4, I, dtype=torch.float64) * 2 - 0.5
    _, _, s1 = _tanh_reference(model, x1)
    _, _, s2 = _tanh_reference(model, x2)
    model(x1)
    model(x2)
    for layer, cell in enumerate(model.cells):
        for site in ("x", "h"):
            bn = getattr(cell, f"bn_{site}")
            assert torch.equal(bn.num_batches_tracked, torch.full((T,), 2))
            for t in range(T):
                (m1, v1), (m2, v2) = s1[(layer, site, t)], s2[(layer, site, t)]
                torch.testing.assert_close(bn.running_mean[t], (m1 + m2) / 2, **TOL)
                torch.testing.assert_close(bn.running_var[t], (v1 + v2) / 2, **TOL)
    model.eval()
    x = torch.randn(T, 3, I, dtype=torch.float64)
    y, (h, c) = model(x)
    y_ref, (h_ref, _), _ = _tanh_reference(model, x, mode="population")
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    y_batch, _, _ = _tanh_reference(model, x, mode="train")
    assert not torch.allclose(y, y_batch, atol=1e-3)
    # eval does not touch the statistics
    assert all(bn.num_batches_tracked.eq(2).all() for cell in model.cells for bn in (cell.bn_x, cell.bn_h))


def test_eval_after_one_batch_reproduces_the_training_output():
    T = 6
    model = _tanh_model(1, max_steps=T, seed=6, momentum=None)
    x = torch.randn(T, 4, I, dtype=torch.float64)
    y_train, (h_train, _) = model(x)
    model.eval()
    y_eval, (h_eval, _) = model(x)
    torch.testing.assert_close(y_eval, y_train, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(h_eval, h_train, rtol=1e-10, atol=1e-11)


def test_eval_output_is_independent_of_the_batch():
    model = _tanh_model(2, max_steps=7, seed=7, h0=True)
    _set_random_population(model, seed=7)
    model.eval()
    x = torch.randn(7, 4, I, dtype=torch.float64)
    y, (h, _) = model(x)
    other = x.clone()
    other[:, 1:] = torch.randn(7, 3, I, dtype=torch.float64) * 5
    y2, _ = model(other)
    assert torch.equal(y2[:, 0], y[:, 0])
    y1, (h1, _) = model(x[:, :1])  # a single sequence in eval
    torch.testing.assert_close(y1[:, 0], y[:, 0], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(h1[:, 0], h[:, 0], rtol=1e-13, atol=1e-14)
    # in training, the same single sequence inside another batch gives another output (batch statistics)
    model.train()
    assert not torch.allclose(copy.deepcopy(model)(other)[0][:, 0], copy.deepcopy(model)(x)[0][:, 0])
    model.eval()
    # each step reads its own row of the running statistics
    for site in ("bn_x", "bn_h"):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            getattr(changed.cells[0], site).running_mean[3] += 0.5
        y3, _ = changed(x)
        assert torch.equal(y3[:3], y[:3]), site
        assert not torch.allclose(y3[3], y[3]), site


def test_eval_beyond_max_steps_reuses_the_last_row():
    M, T = 4, 9
    model = _tanh_model(2, max_steps=M, seed=8, h0=True)
    _set_random_population(model, seed=8)
    model.eval()
    x = torch.randn(T, 3, I, dtype=torch.float64)
    y, (h, _) = model(x)
    assert y.shape == (T, 3, H)
    y_ref, (h_ref, _), _ = _tanh_reference(model, x, mode="population")
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    torch.testing.assert_close(model(x[:, 1:2])[0][:, 0], y[:, 1], rtol=1e-13, atol=1e-14)
    # sensitive: the last row drives every step from M-1 on, and only those
    with torch.no_grad():
        model.cells[0].bn_h.running_var[M - 1] += 1.0
    y2, _ = model(x)
    assert torch.equal(y2[: M - 1], y[: M - 1])
    for t in range(M - 1, T):
        assert not torch.allclose(y2[t], y[t]), t


def test_training_longer_than_max_steps_raises():
    model = BNLSTM(I, H, max_steps=4, cell="tanh")
    with pytest.raises(ValueError, match="max_steps=4"):
        model(torch.randn(5, 3, I))


# ---------------------------------------------------------------------------------------------------------------------
# the fused fast paths are not used for the tanh cell


@pytest.mark.parametrize("normalize", [True, False])
def test_fused_flag_has_no_effect_on_tanh(normalize):
    model_a = _tanh_model(2, max_steps=6, seed=9, h0=True, normalize=normalize, implementation="auto")
    model_b = _tanh_model(2, max_steps=6, seed=9, h0=True, normalize=normalize, implementation="reference")
    model_b.load_state_dict(model_a.state_dict())
    x = torch.randn(6, 4, I, dtype=torch.float64)
    for training in (True, False):
        model_a.train(training)
        model_b.train(training)
        ya, (ha, ca) = model_a(x)
        yb, (hb, cb) = model_b(x)
        assert torch.equal(ya, yb) and torch.equal(ha, hb) and torch.equal(ca, cb), training
        ga = torch.autograd.grad(_loss(ya, ha, ca), list(model_a.parameters()))
        gb = torch.autograd.grad(_loss(yb, hb, cb), list(model_b.parameters()))
        for a, b in zip(ga, gb, strict=True):
            assert torch.equal(a, b), training
    for (n, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------------------------------------------------------
# errors and the task


def test_unknown_cell_raises():
    with pytest.raises(ValueError, match=r"cell must be one of \['lstm', 'tanh'\].*'gru'"):
        BNLSTM(I, H, cell="gru")


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((I, 0, 5), {}, "hidden_size"),
        ((0, H, 5), {}, "input_size"),
        ((I, H, 5), {"recurrent_init": "identity"}, "recurrent_init"),
        ((I, H, 0), {}, "max_steps"),
    ],
)
def test_bad_cell_args_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BNRNNCell(*args, **kwargs)


def test_sequence_classification_builds_a_tanh_layer():
    from bnlstm_lit.nn import BNLSTMSettings
    from bnlstm_lit.tasks import SequenceClassification

    task = SequenceClassification(
        input_size=2, output_size=4, max_steps=5, rnn=BNLSTMSettings(hidden_size=H, cell="tanh")
    )
    assert task.net.rnn.cell == "tanh"
    assert all(isinstance(c, BNRNNCell) for c in task.net.rnn.cells)
    assert task.hparams["rnn"]["cell"] == "tanh"
    logits = task(torch.randn(3, 5, 2))
    assert logits.shape == (3, 4)
    default = SequenceClassification(input_size=2, output_size=4, max_steps=5, rnn=BNLSTMSettings(hidden_size=H))
    assert default.net.rnn.cell == "lstm" and isinstance(default.net.rnn.cells[0], BNLSTMCell)


# ---------------------------------------------------------------------------------------------------------------------
# the gradient probe (both cells)


def _probe_model(cell: str, num_layers: int, seed: int = 0, fused: bool = False, max_steps: int = 8, **kw) -> BNLSTM:
    torch.manual_seed(seed)
    model = BNLSTM(
        I,
        H,
        num_layers=num_layers,
        max_steps=max_steps,
        cell=cell,
        implementation=("auto" if fused else "reference"),
        **kw,
    ).double()
    return _perturb(model, seed, h0=True)


def _stepwise(model: BNLSTM, x, lengths=None):
    """Run the model's cells one step at a time (``input_term`` + ``cell(x_t, (h, c), t)``), keeping every h_t with
    ``retain_grad``; padded steps keep the previous state and give zero outputs. x: (T, B, I)."""
    T, B, _ = x.shape
    mask = None if lengths is None else torch.arange(T)[:, None] < torch.as_tensor(lengths)[None]
    inp, hs, h_n, c_n = x, [], [], []
    for layer, cell in enumerate(model.cells):
        h = model.h0[layer].expand(B, -1)
        c = model.c0[layer].expand(B, -1)
        terms = cell.input_term(inp, mask)
        layer_hs = []
        for t in range(T):
            m = None if mask is None else mask[t]
            h_new, c_new = cell(terms[t], (h, c), t, m)
            if m is None:
                h, c = h_new, c_new
            else:
                h = torch.where(m[:, None], h_new, h)
                c = torch.where(m[:, None], c_new, c)
            h.retain_grad()
            layer_hs.append(h)
        out = torch.stack(layer_hs)
        inp = out if mask is None else out * mask[:, :, None]
        hs.append(layer_hs)
        h_n.append(h)
        c_n.append(c)
    return inp, (torch.stack(h_n), torch.stack(c_n)), hs


@pytest.mark.parametrize("cell", ["lstm", "tanh"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_probe_does_not_change_outputs(cell, num_layers):
    x = torch.randn(7, 4, I, dtype=torch.float64)
    for fused in (False, True):
        plain = _probe_model(cell, num_layers, seed=10, fused=fused)
        probed = copy.deepcopy(plain)
        probed.probe_hidden_grad = True
        for training in (True, False):
            plain.train(training)
            probed.train(training)
            y0, (h0, c0) = plain(x)
            y1, (h1, c1) = probed(x)
            assert len(probed.hidden_probes) == num_layers and plain.hidden_probes == []
            if fused:  # the LSTM's fast paths against the probed reference loop: equal to rounding
                torch.testing.assert_close(y1, y0, **TOL)
                torch.testing.assert_close(h1, h0, **TOL)
                torch.testing.assert_close(c1, c0, **TOL)
            else:
                assert torch.equal(y1, y0) and torch.equal(h1, h0) and torch.equal(c1, c0), training
        for (n, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("cell", ["lstm", "tanh"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_probe_gradient_is_total_dloss_dh(cell, num_layers):
    T, B = 7, 4
    model = _probe_model(cell, num_layers, seed=11, fused=True)
    ref = copy.deepcopy(model)
    model.probe_hidden_grad = True
    x = torch.randn(T, B, I, dtype=torch.float64)
    y, (h_n, c_n) = model(x)
    probes = model.hidden_probes
    assert len(probes) == num_layers
    for p in probes:
        assert p.shape == (T, B, H) and p.dtype == torch.float64 and p.requires_grad
        assert torch.equal(p, torch.zeros_like(p))
    _loss(y, h_n, c_n).backward()
    y_r, (h_r, c_r), hs = _stepwise(ref, x)
    torch.testing.assert_close(y, y_r, **TOL)
    torch.testing.assert_close(h_n, h_r, **TOL)
    _loss(y_r, h_r, c_r).backward()
    for layer in range(num_layers):
        expected = torch.stack([h.grad for h in hs[layer]])
        torch.testing.assert_close(probes[layer].grad, expected, **TOL)
        assert (expected.norm(dim=-1) > 1e-8).all()  # every step gets a gradient (the comparison is not vacuous)
    # the probe gradient is the *total* one: at t < T-1 it is not only the gradient through the output at t
    w_out, _, _ = _loss_weights(y, h_n, c_n)
    through_output_only = 2 * y.detach() * w_out
    assert not torch.allclose(probes[-1].grad[: T - 1], through_output_only[: T - 1])
    # the probe changes no parameter gradient
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, n=n: f"grad of {n}: {m}")
    # hidden_grad_norms: per layer, the batch mean of the per-step norms
    norms = model.hidden_grad_norms()
    assert len(norms) == num_layers
    for layer, n in enumerate(norms):
        assert n.shape == (T,)
        torch.testing.assert_close(n, probes[layer].grad.norm(dim=-1).mean(dim=1), rtol=0, atol=0)
        assert not n.requires_grad


def test_probe_with_batch_first_gives_time_major_probes():
    model = _probe_model("tanh", 2, seed=12, batch_first=True)
    ref = copy.deepcopy(model)
    model.probe_hidden_grad = True
    x = torch.randn(4, 6, I, dtype=torch.float64)  # (B, T, I)
    y, (h_n, c_n) = model(x)
    _loss(y, h_n, c_n).backward()
    y_r, (h_r, c_r), hs = _stepwise(ref, x.transpose(0, 1))
    _loss(y_r.transpose(0, 1), h_r, c_r).backward()
    for layer in range(2):
        assert model.hidden_probes[layer].shape == (6, 4, H)
        torch.testing.assert_close(model.hidden_probes[layer].grad, torch.stack([h.grad for h in hs[layer]]), **TOL)
    assert model.hidden_grad_norms()[0].shape == (6,)


@pytest.mark.parametrize("cell", ["lstm", "tanh"])
def test_probe_with_lengths(cell):
    T, B, L = 6, 5, 2
    lengths = torch.tensor([6, 2, 4, 6, 3])
    model = _probe_model(cell, L, seed=13, fused=True)
    plain, ref = copy.deepcopy(model), copy.deepcopy(model)
    model.probe_hidden_grad = True
    x = torch.randn(T, B, I, dtype=torch.float64)
    y, (h_n, c_n) = model(x, lengths=lengths)
    y0, (h0, c0) = plain(x, lengths=lengths)  # the BN-LSTM without probes: the packed fast path
    for a, b in ((y, y0), (h_n, h0), (c_n, c0)):
        torch.testing.assert_close(a, b, **TOL)
    pad = torch.arange(T)[:, None] >= lengths[None]  # (T, B)
    assert torch.equal(y[pad], torch.zeros_like(y[pad]))
    assert (y[~pad].abs() > 0).all()
    _loss(y, h_n, c_n).backward()
    y_r, (h_r, c_r), hs = _stepwise(ref, x, lengths)
    torch.testing.assert_close(y, y_r, **TOL)
    _loss(y_r, h_r, c_r).backward()
    _, w_h, _ = _loss_weights(y, h_n, c_n)  # dloss/dh_n
    for layer in range(L):
        grad = model.hidden_probes[layer].grad
        torch.testing.assert_close(grad, torch.stack([h.grad for h in hs[layer]]), **TOL)
        # after a sequence ends its state is only carried to h_n: the gradient there is dloss/dh_n
        for b in range(B):
            for t in range(int(lengths[b]), T):
                torch.testing.assert_close(grad[t, b], w_h[layer, b], **TOL)
        assert (grad[~pad].norm(dim=-1) > 1e-8).all()
    norms = model.hidden_grad_norms()
    assert [n.shape for n in norms] == [(T,)] * L


def test_hidden_grad_norms_errors_and_when_probes_exist():
    model = _probe_model("tanh", 2, seed=14)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="probe_hidden_grad = True.*backward"):
        model.hidden_grad_norms()  # no forward at all
    # flag off: no probes
    y, _ = model(x)
    assert model.hidden_probes == []
    y.sum().backward()
    with pytest.raises(RuntimeError, match="no gradient recorded"):
        model.hidden_grad_norms()
    # flag on, forward but no backward yet
    model.probe_hidden_grad = True
    y, _ = model(x)
    assert len(model.hidden_probes) == 2 and all(p.grad is None for p in model.hidden_probes)
    with pytest.raises(RuntimeError, match="backward"):
        model.hidden_grad_norms()
    y.square().sum().backward()
    assert [n.shape for n in model.hidden_grad_norms()] == [(5,), (5,)]
    # under no_grad: no probes (and the old ones are dropped), even with the flag on
    with torch.no_grad():
        y_ng, _ = model(x)
    assert model.hidden_probes == []
    with pytest.raises(RuntimeError, match="no gradient recorded"):
        model.hidden_grad_norms()
    assert torch.equal(y_ng, y.detach())
