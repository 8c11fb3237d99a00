"""BNLSTM / BNLSTMCell: parity with torch.nn.LSTM, golden test against the paper's equations, init, masks, errors."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnlstm_lit.nn import BNLSTM, BNLSTMCell, set_eval_statistics

SRC = Path(__file__).resolve().parents[2] / "src"
TOL = {"rtol": 1e-9, "atol": 1e-10}


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _perturb(model: BNLSTM, seed: int = 0) -> BNLSTM:
    """Non-trivial γ, β, b, h0, c0 so that every parameter matters in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bn_x.weight", "bn_h.weight", "bn_c.weight")):
                p.copy_(0.3 + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith(("bias", "h0", "c0")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _set_random_population(model: BNLSTM, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g, dtype=buf.dtype))
            elif name.endswith("running_var"):
                buf.copy_(0.3 + torch.rand(buf.shape, generator=g, dtype=buf.dtype))


def _reference(model: BNLSTM, x, state=None, lengths=None, mode: str = "train"):
    """The paper's equations (Cooijmans et al. 2017, eqs. 6-8) written out step by step, independently of the
    implementation (reads only parameters and buffers).

    x: (T, B, I). mode "train": per-step biased batch statistics over the real sequences (population statistics of
    that step where fewer than 2 are real); mode "population": running statistics, row min(t, max_steps - 1).
    Returns output (T, B, H), (h_n, c_n), and the batch statistics used: {(layer, site, t): (mean, var)}.
    """
    T, B, _ = x.shape
    lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths)
    mask = torch.arange(T)[:, None] < lengths[None]  # (T, B)
    stats = {}

    def bn(v, site, name, layer, t, m):
        if site is None:
            return v
        row = min(t, site.max_steps - 1)
        if mode == "train" and int(m.sum()) >= 2:
            real = v[m]
            mu = real.mean(0)
            var = ((real - mu) ** 2).mean(0)  # biased, no shift
            stats[(layer, name, t)] = (mu.detach(), var.detach())
        else:
            mu, var = site.running_mean[row], site.running_var[row]
        y = (v - mu) / torch.sqrt(var + site.eps) * site.weight
        return y if site.bias is None else y + site.bias

    if state is None:
        h0 = model.h0[:, None].expand(-1, B, -1)
        c0 = model.c0[:, None].expand(-1, B, -1)
    else:
        h0, c0 = state
    inp = x
    h_n, c_n = [], []
    for layer, cell in enumerate(model.cells):
        H = cell.hidden_size
        h, c = h0[layer], c0[layer]
        outs = []
        for t in range(T):
            m = mask[t]
            pre = (
                bn(h @ cell.weight_hh.T, cell.bn_h, "h", layer, t, m)
                + bn(inp[t] @ cell.weight_ih.T, cell.bn_x, "x", layer, t, m)
                + cell.bias
            )
            i, f, g, o = pre[:, :H], pre[:, H : 2 * H], pre[:, 2 * H : 3 * H], pre[:, 3 * H :]
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(bn(c_new, cell.bn_c, "c", layer, t, m))
            h = torch.where(m[:, None], h_new, h)
            c = torch.where(m[:, None], c_new, c)  # the raw c is carried
            outs.append(h * m[:, None])
        inp = torch.stack(outs)
        h_n.append(h)
        c_n.append(c)
    return inp, (torch.stack(h_n), torch.stack(c_n)), stats


def _grads(loss, named):
    names = [n for n, _ in named]
    gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return dict(zip(names, gs, strict=True))


def _loss(out, h_n, c_n, seed=123):
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_h = torch.randn(h_n.shape, generator=g, dtype=out.dtype)
    w_c = torch.randn(c_n.shape, generator=g, dtype=out.dtype)
    return (out * w_out).sum() + (h_n * w_h).sum() + (c_n * w_c).sum()


# ---------------------------------------------------------------------------------------------------------------------
# normalize=False equals torch.nn.LSTM


def _lstm_pair(I, H, L, batch_first, seed=0):
    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, num_layers=L, batch_first=batch_first).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    model = BNLSTM(I, H, num_layers=L, batch_first=batch_first, normalize=False, max_steps=4).double()
    with torch.no_grad():
        for layer, cell in enumerate(model.cells):
            cell.weight_ih.copy_(getattr(ref, f"weight_ih_l{layer}"))
            cell.weight_hh.copy_(getattr(ref, f"weight_hh_l{layer}"))
            cell.bias.copy_(getattr(ref, f"bias_ih_l{layer}") + getattr(ref, f"bias_hh_l{layer}"))
    return model, ref


def _compare_param_grads(model, ref, mg, rg):
    for layer in range(model.num_layers):
        torch.testing.assert_close(mg[f"cells.{layer}.weight_ih"], rg[f"weight_ih_l{layer}"], **TOL)
        torch.testing.assert_close(mg[f"cells.{layer}.weight_hh"], rg[f"weight_hh_l{layer}"], **TOL)
        torch.testing.assert_close(mg[f"cells.{layer}.bias"], rg[f"bias_ih_l{layer}"], **TOL)
        torch.testing.assert_close(mg[f"cells.{layer}.bias"], rg[f"bias_hh_l{layer}"], **TOL)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("explicit_state", [False, True])
def test_plain_lstm_equals_torch_lstm(num_layers, batch_first, explicit_state):
    I, H, T, B = 3, 4, 7, 3
    model, ref = _lstm_pair(I, H, num_layers, batch_first)
    assert model.cells[0].bn_x is None and not any("bn_" in n for n, _ in model.named_parameters())
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, dtype=torch.float64)
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    if explicit_state:
        s = (torch.randn(num_layers, B, H, dtype=torch.float64), torch.randn(num_layers, B, H, dtype=torch.float64))
        sm = tuple(v.clone().requires_grad_() for v in s)
        sr = tuple(v.clone().requires_grad_() for v in s)
        out_m, (hm, cm) = model(xm, sm)
        out_r, (hr, cr) = ref(xr, sr)
    else:
        out_m, (hm, cm) = model(xm)
        out_r, (hr, cr) = ref(xr)
    assert out_m.shape == ((B, T, H) if batch_first else (T, B, H))
    assert hm.shape == cm.shape == (num_layers, B, H)
    torch.testing.assert_close(out_m, out_r, **TOL)
    torch.testing.assert_close(hm, hr, **TOL)
    torch.testing.assert_close(cm, cr, **TOL)
    named_m = [("x", xm), *model.named_parameters()]
    named_r = [("x", xr), *ref.named_parameters()]
    if explicit_state:
        named_m += [("h0s", sm[0]), ("c0s", sm[1])]
        named_r += [("h0s", sr[0]), ("c0s", sr[1])]
    mg = _grads(_loss(out_m, hm, cm), named_m)
    rg = _grads(_loss(out_r, hr, cr), named_r)
    torch.testing.assert_close(mg["x"], rg["x"], **TOL)
    _compare_param_grads(model, ref, mg, rg)
    if explicit_state:
        torch.testing.assert_close(mg["h0s"], rg["h0s"], **TOL)
        torch.testing.assert_close(mg["c0s"], rg["c0s"], **TOL)
    else:  # the learned initial state is torch's zero state, and it gets the gradient of the zero state
        h0r = torch.zeros(num_layers, B, H, dtype=torch.float64, requires_grad=True)
        c0r = torch.zeros(num_layers, B, H, dtype=torch.float64, requires_grad=True)
        out2, (h2, c2) = ref(x, (h0r, c0r))
        gh, gc = torch.autograd.grad(_loss(out2, h2, c2), [h0r, c0r])
        torch.testing.assert_close(mg["h0"], gh.sum(1), **TOL)
        torch.testing.assert_close(mg["c0"], gc.sum(1), **TOL)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
def test_plain_lstm_lengths_equal_packed_sequence(num_layers, batch_first):
    I, H, T, B = 3, 4, 6, 4
    model, ref = _lstm_pair(I, H, num_layers, batch_first, seed=1)
    lengths = torch.tensor([4, 6, 1, 3])
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, dtype=torch.float64)
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_m, (hm, cm) = model(xm, lengths=lengths)
    packed = pack_padded_sequence(xr, lengths, batch_first=batch_first, enforce_sorted=False)
    out_p, (hr, cr) = ref(packed)
    out_r, _ = pad_packed_sequence(out_p, batch_first=batch_first, total_length=T)
    torch.testing.assert_close(out_m, out_r, **TOL)
    torch.testing.assert_close(hm, hr, **TOL)
    torch.testing.assert_close(cm, cr, **TOL)
    tb = out_m if not batch_first else out_m.transpose(0, 1)
    pad = torch.arange(T)[:, None] >= lengths[None]
    assert torch.equal(tb[pad], torch.zeros_like(tb[pad]))
    assert (tb[~pad].abs() > 0).all()
    # h_n is the output at each sequence's last real step
    torch.testing.assert_close(hm[-1], tb[lengths - 1, torch.arange(B)], **TOL)
    mg = _grads(_loss(out_m, hm, cm), [("x", xm), *model.named_parameters()])
    rg = _grads(_loss(out_r, hr, cr), [("x", xr), *ref.named_parameters()])
    torch.testing.assert_close(mg["x"], rg["x"], **TOL)
    _compare_param_grads(model, ref, mg, rg)
    # lengths as a plain list work the same
    out_l, _ = model(x, lengths=lengths.tolist())
    torch.testing.assert_close(out_l, out_m.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# the BN-LSTM equals a direct transcription of the paper's equations


def _bn_model(num_layers=1, I=3, H=4, max_steps=8, seed=0, **kw):
    torch.manual_seed(seed)
    return _perturb(BNLSTM(I, H, num_layers=num_layers, max_steps=max_steps, **kw).double(), seed)


def _compare_with_reference(model, x, mode, state=None, lengths=None):
    ref_model = copy.deepcopy(model)
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_m, (hm, cm) = model(xm, state, lengths)
    out_r, (hr, cr), stats = _reference(ref_model, xr, state, lengths, mode)
    torch.testing.assert_close(out_m, out_r, **TOL)
    torch.testing.assert_close(hm, hr, **TOL)
    torch.testing.assert_close(cm, cr, **TOL)
    mg = _grads(_loss(out_m, hm, cm), [("x", xm), *model.named_parameters()])
    rg = _grads(_loss(out_r, hr, cr), [("x", xr), *ref_model.named_parameters()])
    assert mg.keys() == rg.keys()
    for name in mg:
        if state is not None and name in ("h0", "c0"):  # the learned initial state is not used
            assert mg[name] is None and rg[name] is None, name
            continue
        assert mg[name] is not None and rg[name] is not None, name
        torch.testing.assert_close(mg[name], rg[name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    return ref_model, stats


@pytest.mark.parametrize("num_layers", [1, 2])
def test_bnlstm_train_matches_spec_transcription(num_layers):
    model = _bn_model(num_layers)
    x = torch.randn(6, 5, 3, dtype=torch.float64) * 1.5 + 0.5
    ref_model, stats = _compare_with_reference(model, x, "train")
    # running statistics: (1 - r) * initial + r * the per-step batch statistics of every site, with
    # r = max(momentum, 1/n) = 1 for the first batch after a reset
    for layer in range(num_layers):
        for site in ("x", "h", "c"):
            bn, bn0 = getattr(model.cells[layer], f"bn_{site}"), getattr(ref_model.cells[layer], f"bn_{site}")
            for t in range(6):
                mu, var = stats[(layer, site, t)]
                r = max(0.1, 1.0 / int(bn.num_batches_tracked[t]))
                torch.testing.assert_close(
                    bn.running_mean[t], (1 - r) * bn0.running_mean[t] + r * mu, rtol=1e-12, atol=1e-12
                )
                torch.testing.assert_close(
                    bn.running_var[t], (1 - r) * bn0.running_var[t] + r * var, rtol=1e-12, atol=1e-12
                )
            assert torch.equal(bn.running_mean[6:], bn0.running_mean[6:])
            assert bn.num_batches_tracked.tolist() == [1] * 6 + [0] * 2


def test_bnlstm_train_matches_spec_with_explicit_state():
    model = _bn_model(1, seed=1)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    state = (torch.randn(1, 4, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64))
    _compare_with_reference(model, x, "train", state=state)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_bnlstm_eval_matches_spec_transcription_with_population_statistics(num_layers):
    model = _bn_model(num_layers, max_steps=5, seed=2)
    _set_random_population(model, seed=2)
    model.eval()
    x = torch.randn(10, 3, 3, dtype=torch.float64)  # longer than max_steps: rows >= 5 reuse row 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compare_with_reference(model, x, "population")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bnlstm_train_with_lengths_matches_spec_transcription():
    # steps 3..5 have one real sequence: they use (and do not update) the population statistics
    model = _bn_model(2, seed=3)
    _set_random_population(model, seed=3)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([3, 6, 2, 3])
    ref_model, stats = _compare_with_reference(model, x, "train", lengths=lengths)
    assert {t for (_, _, t) in stats} == {0, 1, 2}
    for bn, bn0 in zip(_sites(model), _sites(ref_model), strict=True):
        assert bn.num_batches_tracked.tolist() == [1, 1, 1] + [0] * 5
        assert torch.equal(bn.running_mean[3:], bn0.running_mean[3:])
        assert torch.equal(bn.running_var[3:], bn0.running_var[3:])
        assert not torch.equal(bn.running_mean[:3], bn0.running_mean[:3])


def test_bnlstm_eval_with_lengths_matches_spec_transcription():
    model = _bn_model(2, max_steps=4, seed=4)
    _set_random_population(model, seed=4)
    model.eval()
    x = torch.randn(7, 3, 3, dtype=torch.float64)
    _compare_with_reference(model, x, "population", lengths=torch.tensor([7, 2, 5]))


def _sites(model):
    return [getattr(cell, f"bn_{s}") for cell in model.cells for s in ("x", "h", "c")]


# ---------------------------------------------------------------------------------------------------------------------
# initialization


def _assert_orthogonal(block):
    r, c = block.shape
    gram = block.T @ block if r >= c else block @ block.T
    torch.testing.assert_close(gram, torch.eye(min(r, c), dtype=block.dtype), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("I", "H"), [(3, 5), (7, 4)])
def test_init(I, H):
    torch.manual_seed(0)
    model = BNLSTM(I, H, num_layers=2, max_steps=9)
    assert model.h0.shape == model.c0.shape == (2, H)
    assert torch.equal(model.h0.detach(), torch.zeros(2, H)) and torch.equal(model.c0.detach(), torch.zeros(2, H))
    names = {n for n, _ in model.named_parameters()}
    for layer, cell in enumerate(model.cells):
        assert f"cells.{layer}.bn_x.bias" not in names and f"cells.{layer}.bn_h.bias" not in names
        assert cell.bn_x.bias is None and cell.bn_h.bias is None
        for bn, C in ((cell.bn_x, 4 * H), (cell.bn_h, 4 * H), (cell.bn_c, H)):
            assert torch.equal(bn.weight.detach(), torch.full((C,), 0.1))
            assert bn.max_steps == 9 and bn.running_mean.shape == (9, C)
        assert torch.equal(cell.bn_c.bias.detach(), torch.zeros(H))
        expected_b = torch.zeros(4 * H)
        expected_b[H : 2 * H] = 1.0
        assert torch.equal(cell.bias.detach(), expected_b)
        in_features = I if layer == 0 else H
        assert cell.weight_ih.shape == (4 * H, in_features) and cell.weight_hh.shape == (4 * H, H)
        for k in range(4):
            _assert_orthogonal(cell.weight_ih.detach()[k * H : (k + 1) * H])
            _assert_orthogonal(cell.weight_hh.detach()[k * H : (k + 1) * H])
        assert not torch.allclose(cell.weight_hh[2 * H : 3 * H], torch.eye(H))
    # every parameter is used (an unused one breaks DDP)
    out, (h, c) = model(torch.randn(5, 3, I))
    grads = torch.autograd.grad(out.sum() + h.sum() + c.sum(), list(model.parameters()), allow_unused=True)
    assert all(g is not None for g in grads)


def test_init_identity_g_and_options():
    torch.manual_seed(0)
    H = 4
    model = BNLSTM(2, H, num_layers=2, recurrent_init="identity_g", gamma_init=0.25, forget_bias=2.0, max_steps=3)
    for cell in model.cells:
        assert torch.equal(cell.weight_hh.detach()[2 * H : 3 * H], torch.eye(H))
        for k in (0, 1, 3):
            block = cell.weight_hh.detach()[k * H : (k + 1) * H]
            _assert_orthogonal(block)
            assert not torch.allclose(block, torch.eye(H))
        for k in range(4):
            _assert_orthogonal(cell.weight_ih.detach()[k * H : (k + 1) * H])
        for bn in (cell.bn_x, cell.bn_h, cell.bn_c):
            assert torch.equal(bn.weight.detach(), torch.full_like(bn.weight, 0.25))
        assert torch.equal(cell.bias.detach()[H : 2 * H], torch.full((H,), 2.0))
        assert torch.equal(cell.bias.detach()[:H], torch.zeros(H))
        assert torch.equal(cell.bias.detach()[2 * H :], torch.zeros(2 * H))
    # reset_parameters() restores the init after training-like changes
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            b.add_(1)
    model.reset_parameters()
    for cell in model.cells:
        assert torch.equal(cell.weight_hh.detach()[2 * H : 3 * H], torch.eye(H))
        assert torch.equal(cell.bias.detach()[H : 2 * H], torch.full((H,), 2.0))
        assert torch.equal(cell.bn_c.bias.detach(), torch.zeros(H))
        assert torch.equal(cell.bn_x.running_var, torch.ones(3, 4 * H))
        assert cell.bn_h.num_batches_tracked.sum() == 0
    assert torch.equal(model.h0.detach(), torch.zeros(2, H))


def test_cell_step_contract():
    torch.manual_seed(0)
    cell = BNLSTMCell(3, 4, max_steps=5).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    terms = cell.input_term(x)
    assert terms.shape == (2, 6, 16)
    h = c = torch.zeros(6, 4, dtype=torch.float64)
    h1, c1 = cell(terms[0], (h, c), 0)
    assert h1.shape == c1.shape == (6, 4)
    # the carried c is the raw cell, not its normalization: it has no zero mean over the batch
    assert not torch.allclose(c1.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# per-step statistics, population statistics, max_steps


def test_changing_last_input_step_changes_only_last_rows_of_statistics():
    T = 5
    a = _bn_model(1, max_steps=T, seed=5)
    b = copy.deepcopy(a)
    x = torch.randn(T, 4, 3, dtype=torch.float64)
    x2 = x.clone()
    x2[-1] = torch.randn(4, 3, dtype=torch.float64) * 3
    a(x)
    b(x2)
    ca, cb = a.cells[0], b.cells[0]
    for name in ("running_mean", "running_var"):
        diff_x = [t for t in range(T) if not torch.equal(getattr(ca.bn_x, name)[t], getattr(cb.bn_x, name)[t])]
        assert diff_x == [T - 1], name
        # h_{T-1} does not depend on x_{T-1}: the recurrent site is unchanged; the cell changes at the last step
        assert torch.equal(getattr(ca.bn_h, name), getattr(cb.bn_h, name))
        diff_c = [t for t in range(T) if not torch.equal(getattr(ca.bn_c, name)[t], getattr(cb.bn_c, name)[t])]
        assert diff_c == [T - 1], name


def test_eval_output_independent_of_batch_and_follows_running_stats():
    model = _bn_model(2, max_steps=6, seed=6)
    _set_random_population(model, seed=6)
    model.eval()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    y, (h, _) = model(x)
    other = x.clone()
    other[:, 1:] = torch.randn(6, 3, 3, dtype=torch.float64) * 5
    y2, (h2, _) = model(other)
    torch.testing.assert_close(y2[:, 0], y[:, 0], rtol=0, atol=0)
    y1, (h1, _) = model(x[:, :1])  # batch of 1 in eval is fine
    torch.testing.assert_close(y1[:, 0], y[:, 0], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(h1[:, 0], h[:, 0], rtol=1e-13, atol=1e-14)
    for site in ("bn_x", "bn_h", "bn_c"):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            getattr(changed.cells[0], site).running_mean[3] += 0.5
        y3, _ = changed(x)
        assert torch.equal(y3[:3], y[:3]), site
        assert not torch.allclose(y3[3], y[3]), site


def test_eval_beyond_max_steps_reuses_last_row():
    M = 4
    model = _bn_model(1, max_steps=M, seed=7)
    _set_random_population(model, seed=7)
    model.eval()
    x = torch.randn(M + 5, 3, 3, dtype=torch.float64)
    y, _ = model(x)
    # a model with a longer table whose extra rows are copies of row M-1 gives the same result
    long = BNLSTM(3, 4, max_steps=M + 5).double()
    state = model.state_dict()
    for k, v in list(state.items()):
        if k.endswith(("running_mean", "running_var")):
            state[k] = torch.cat([v, v[-1:].expand(5, -1)])
        elif k.endswith("num_batches_tracked"):
            state[k] = torch.cat([v, v[-1:].expand(5)])
    long.load_state_dict(state)
    long.eval()
    torch.testing.assert_close(long(x)[0], y, rtol=1e-13, atol=1e-14)
    # and it is sensitive: different extra rows give a different result after step M-1 only
    with torch.no_grad():
        long.cells[0].bn_c.running_var[M:] += 1.0
    y_diff = long(x)[0]
    torch.testing.assert_close(y_diff[:M], y[:M], rtol=1e-13, atol=1e-14)
    assert not torch.allclose(y_diff[M:], y[M:])


def test_training_longer_than_max_steps_raises():
    model = BNLSTM(3, 4, max_steps=5)
    with pytest.raises(ValueError, match="max_steps=5"):
        model(torch.randn(6, 3, 3))
    model(torch.randn(5, 3, 3))


def test_set_eval_statistics_batch_equals_train_output():
    model = _bn_model(2, seed=8)
    _set_random_population(model, seed=8)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 5, 4])
    y_train, (h_train, c_train) = copy.deepcopy(model).train()(x, lengths=lengths)
    model.eval()
    y_pop, _ = model(x, lengths=lengths)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_eval_statistics(model, "batch")
    y_batch, (h_batch, c_batch) = model(x, lengths=lengths)
    torch.testing.assert_close(y_batch, y_train, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h_batch, h_train, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(c_batch, c_train, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(y_pop, y_batch)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    set_eval_statistics(model, "population")
    torch.testing.assert_close(model(x, lengths=lengths)[0], y_pop, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# masks / variable lengths


@pytest.mark.parametrize("training", [True, False])
def test_lengths_padding_amount_and_values_do_not_matter(training):
    model = _bn_model(2, max_steps=12, seed=9)
    _set_random_population(model, seed=9)
    model.train(training)
    lengths = torch.tensor([5, 3, 4, 5])
    T = 5
    x = torch.randn(T, 4, 3, dtype=torch.float64)
    pad = torch.arange(T)[:, None] >= lengths[None]
    x = torch.where(pad[:, :, None], torch.zeros_like(x), x)
    x_long = torch.cat([x, torch.zeros(7, 4, 3, dtype=torch.float64)])
    x_garbage = torch.where(
        (torch.arange(12)[:, None] >= lengths[None])[:, :, None], torch.full_like(x_long, 1e6), x_long
    )
    m_short, m_long, m_garbage = model, copy.deepcopy(model), copy.deepcopy(model)
    y, (h, c) = m_short(x, lengths=lengths)
    for other, inp in ((m_long, x_long), (m_garbage, x_garbage)):
        y2, (h2, c2) = other(inp, lengths=lengths)
        torch.testing.assert_close(y2[:T], y, rtol=1e-12, atol=1e-13)
        assert torch.equal(y2[T:], torch.zeros_like(y2[T:]))
        torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(c2, c, rtol=1e-12, atol=1e-13)
        assert torch.isfinite(y2).all()
        for a, b in zip(_sites(m_short), _sites(other), strict=True):
            torch.testing.assert_close(b.running_mean, a.running_mean, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-12, atol=1e-13)
            assert torch.equal(b.num_batches_tracked, a.num_batches_tracked)
    # without lengths, the zero padding would enter the statistics (the test is sensitive)
    if training:
        y_nomask, _ = copy.deepcopy(model)(x)
        assert not torch.allclose(y_nomask[~pad], y[~pad])


def test_lengths_gradients_do_not_reach_padding():
    model = _bn_model(1, seed=10)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])
    y, (h, c) = model(x, lengths=lengths)
    (gx,) = torch.autograd.grad(_loss(y, h, c), [x])
    pad = torch.arange(5)[:, None] >= lengths[None]
    assert torch.equal(gx[pad], torch.zeros_like(gx[pad]))
    assert (gx[~pad].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# h0 noise and dropout


def test_h0_noise_only_in_training():
    model = _bn_model(1, seed=11, h0_noise_std=0.1)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    torch.manual_seed(1)
    y1, _ = copy.deepcopy(model)(x)
    torch.manual_seed(2)
    y2, _ = copy.deepcopy(model)(x)
    torch.manual_seed(1)
    y1b, _ = copy.deepcopy(model)(x)
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y1, y1b, rtol=0, atol=0)
    model.eval()
    torch.manual_seed(1)
    e1, _ = model(x)
    torch.manual_seed(2)
    e2, _ = model(x)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    noiseless = copy.deepcopy(model)
    noiseless.h0_noise_std = 0.0
    torch.testing.assert_close(noiseless(x)[0], e1, rtol=0, atol=0)
    # in training the noise differs between batch members
    h0, _ = model.train().initial_state(64)
    assert h0.shape == (1, 64, 4)
    assert h0.detach().std(1).mean().item() == pytest.approx(0.1, rel=0.3)


def test_dropout_between_layers_only_in_training():
    model = _bn_model(2, seed=12, dropout=0.5)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    torch.manual_seed(1)
    y1, _ = copy.deepcopy(model)(x)
    torch.manual_seed(2)
    y2, _ = copy.deepcopy(model)(x)
    assert not torch.allclose(y1, y2)
    model.eval()
    torch.manual_seed(1)
    e1, _ = model(x)
    torch.manual_seed(2)
    torch.testing.assert_close(model(x)[0], e1, rtol=0, atol=0)
    # a single layer has nothing to drop
    single = _bn_model(1, seed=12, dropout=0.5)
    torch.manual_seed(1)
    s1, _ = copy.deepcopy(single)(x)
    torch.manual_seed(2)
    torch.testing.assert_close(copy.deepcopy(single)(x)[0], s1, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_batch_size_one_in_training_raises():
    model = BNLSTM(3, 4, max_steps=5)
    with pytest.raises(ValueError, match=r"at least 2 sequences.*batch of size 1"):
        model(torch.randn(4, 1, 3))
    model.eval()
    assert model(torch.randn(4, 1, 3))[0].shape == (4, 1, 4)


@pytest.mark.parametrize("batch_first", [False, True])
def test_bad_input_raises(batch_first):
    model = BNLSTM(3, 4, max_steps=5, batch_first=batch_first)
    with pytest.raises(ValueError, match="3-D"):
        model(torch.randn(4, 3))
    with pytest.raises(ValueError, match="3-D"):
        model(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="input_size=3"):
        model(torch.randn(4, 2, 5))
    with pytest.raises(TypeError, match="floating"):
        model(torch.ones(4, 2, 3, dtype=torch.long))


def test_bad_lengths_raise():
    model = BNLSTM(3, 4, max_steps=5)
    x = torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match=r"\[1, T=4\]"):
        model(x, lengths=torch.tensor([4, 5, 2]))
    with pytest.raises(ValueError, match=r"\[1, T=4\]"):
        model(x, lengths=torch.tensor([4, 0, 2]))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(3,\)"):
        model(x, lengths=torch.tensor([4, 2]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        model(x, lengths=torch.tensor([[4, 2, 1]]))
    with pytest.raises(TypeError, match="integers"):
        model(x, lengths=torch.tensor([4.0, 2.0, 1.0]))


def test_bad_state_raises():
    model = BNLSTM(3, 4, num_layers=2, max_steps=5)
    x = torch.randn(4, 3, 3)
    good = torch.zeros(2, 3, 4)
    for bad in (torch.zeros(1, 3, 4), torch.zeros(2, 2, 4), torch.zeros(2, 3, 5), torch.zeros(3, 4)):
        with pytest.raises(ValueError, match=r"\(num_layers, B, H\) = \(2, 3, 4\)"):
            model(x, (bad, good))
        with pytest.raises(ValueError, match=r"\(num_layers, B, H\)"):
            model(x, (good, bad))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_layers": 0}, ValueError, "num_layers"),
        ({"recurrent_init": "identity"}, ValueError, "recurrent_init"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"momentum": 0.0}, ValueError, "momentum"),
        ({"max_steps": 0}, ValueError, "max_steps"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"h0_noise_std": -0.1}, ValueError, "h0_noise_std"),
        ({"hidden_size": 0}, ValueError, "hidden_size"),
        ({"input_size": 0}, ValueError, "input_size"),
    ],
)
def test_bad_constructor_args_raise(kwargs, exc, match):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(exc, match=match):
        BNLSTM(**args)


# ---------------------------------------------------------------------------------------------------------------------
# packaging and precision


def test_nn_does_not_import_lightning():
    code = (
        "import bnlstm_lit.nn, sys; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bf16_autocast_runs_and_statistics_stay_float32():
    torch.manual_seed(0)
    model = BNLSTM(3, 8, num_layers=2, max_steps=6)
    x = torch.randn(6, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = model(x, lengths=torch.tensor([6, 5, 6, 3]))
        y2, _ = model(x)
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(c).all()
    assert torch.isfinite(y2).all()
    (y.float().sum() + y2.float().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert buf.dtype == torch.float32, name
            assert torch.isfinite(buf).all(), name
    assert all(bn.num_batches_tracked[:6].tolist() == [2] * 6 for bn in _sites(model))
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ye, _ = model(torch.randn(9, 1, 3))
    assert torch.isfinite(ye).all()
    # the float32 model in eval gives nearly the same output (bf16 only rounds the matmuls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb, _ = model(x)
    yf, _ = model(x)
    torch.testing.assert_close(yb.float(), yf, rtol=0.05, atol=0.05)
