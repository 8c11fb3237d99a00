"""The fast paths of BNLSTM (``bnlstm_lit.nn.dispatch``) equal the reference loop: outputs, every gradient, statistics.

``implementation="auto"`` (the default) runs the BN-LSTM recurrence through a fused path (the native kernel on float32
CPU, the eager autograd Function elsewhere) and the plain LSTM through torch's fused kernel;
``implementation="reference"`` always runs the readable reference loop (itself tested against a transcription of the
paper's equations in test_bnlstm.py). Each test builds one model, deep-copies it, switches the copy to
``implementation="reference"`` and compares the two.
"""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import torch

from bnlstm_lit.nn import BNLSTM, batchnorm_sites, set_eval_statistics
from bnlstm_lit.nn.matmul import linear as _linear

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64: the two paths differ only in the order of rounding
TOL32 = {"rtol": 1e-5, "atol": 1e-6}

#: (input_size, hidden_size, batch, T, num_layers, start_step, state): every value of each axis appears at least once;
#: H not a multiple of anything; "learned" uses the module's h0/c0 (expanded, stride 0 over the batch), "explicit"
#: passes a random per-sequence state that requires grad.
CASES = [
    (5, 1, 2, 9, 2, 0, "learned"),
    (1, 3, 3, 1, 1, 2, "learned"),
    (5, 7, 6, 2, 2, 2, "explicit"),
    (1, 13, 2, 9, 1, 0, "explicit"),
    (5, 13, 3, 9, 2, 2, "learned"),
    (1, 7, 6, 9, 1, 2, "learned"),
    (5, 3, 2, 2, 1, 0, "explicit"),
    (1, 1, 6, 1, 2, 0, "learned"),
]
#: float32: batches of at least 3 (with B=2 the normalized values are ±1 and the float32 result of either path is
#: far more sensitive to rounding; covered in float64 above)
CASES32 = [
    (5, 7, 6, 2, 2, 2, "explicit"),
    (5, 13, 3, 9, 2, 2, "learned"),
    (1, 7, 6, 9, 1, 2, "learned"),
    (1, 3, 3, 1, 1, 0, "learned"),
    (5, 1, 3, 9, 2, 0, "explicit"),
    (1, 13, 3, 9, 1, 0, "explicit"),
]


def _case_id(c) -> str:
    return f"I{c[0]}-H{c[1]}-B{c[2]}-T{c[3]}-L{c[4]}-s{c[5]}-{c[6]}"


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _model(I, H, L, max_steps, dtype=torch.float64, momentum=0.1, seed=0, **kw) -> BNLSTM:
    """A BNLSTM with every parameter (h0, c0, γ, β, b, weights) moved away from its init and random running
    statistics with random batch counts per step (so momentum 0.1 and None accumulate differently)."""
    torch.manual_seed(seed)
    model = BNLSTM(I, H, num_layers=L, max_steps=max_steps, momentum=momentum, **kw).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g, dtype=dtype))
            elif name.endswith("running_var"):
                buf.copy_(0.3 + torch.rand(buf.shape, generator=g, dtype=dtype))
            elif name.endswith("num_batches_tracked"):
                buf.copy_(torch.randint(0, 30, buf.shape, generator=g))
    return model


def _reference_copy(model: BNLSTM) -> BNLSTM:
    ref = copy.deepcopy(model)
    ref.implementation = "reference"
    return ref


def _data(case, dtype, seed):
    """Input (T, B, I), optional explicit state, and the loss weights for outputs and h_n."""
    I, H, B, T, L, _, state_kind = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=dtype) * 1.5 + 0.3
    state = None
    if state_kind == "explicit":
        state = (torch.randn(L, B, H, generator=g, dtype=dtype), torch.randn(L, B, H, generator=g, dtype=dtype))
    w_out = torch.randn(T, B, H, generator=g, dtype=dtype)
    w_h = torch.randn(L, B, H, generator=g, dtype=dtype)
    return x, state, (w_out, w_h)


def _train_step(model: BNLSTM, x, state, weights, start_step=0) -> dict[str, torch.Tensor | None]:
    """Forward + backward of a loss that uses the outputs, h_n and c_n; returns the results and every gradient
    (``.grad`` of the parameters is left in place for an optimizer step)."""
    x = x.clone().requires_grad_()
    state = None if state is None else tuple(s.clone().requires_grad_() for s in state)
    out, (h_n, c_n) = model(x, state, start_step=start_step)
    loss = (out * weights[0]).sum() + (h_n * weights[1]).sum() + (c_n**2).sum()
    loss.backward()
    res: dict[str, torch.Tensor | None] = {"out": out.detach(), "h_n": h_n.detach(), "c_n": c_n.detach()}
    res["grad x"] = x.grad
    if state is not None:
        res["grad state h"], res["grad state c"] = state[0].grad, state[1].grad
    for name, p in model.named_parameters():
        res[f"grad {name}"] = p.grad
    return res


def _buffers(model: BNLSTM) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in model.named_buffers()}


def _sgd_step_from(ref: BNLSTM, *others: BNLSTM, lr: float = 0.05) -> None:
    """Update ref's parameters with its own gradients and copy them into the others (parameters stay identical),
    in place as an optimizer does; gradients are cleared."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
            for other in others:
                other.get_parameter(name).copy_(p)
    for m in (ref, *others):
        m.zero_grad(set_to_none=True)


def _assert_results_equal(a: dict, b: dict, tol: dict, learned_h0: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "grad h0" and learned_h0:
            # the learned h0 is shared by all sequences, so W_h h0 is constant over the batch and BN_h at step 0
            # removes it: the exact gradient is 0 and both paths give rounding noise (~1e-12); compare to 0
            assert a[key] is not None and b[key] is not None
            torch.testing.assert_close(a[key], torch.zeros_like(a[key]), rtol=0, atol=1e-9)
            torch.testing.assert_close(b[key], torch.zeros_like(b[key]), rtol=0, atol=1e-9)
            continue
        if a[key] is None or b[key] is None:  # only the unused learned state with an explicit state
            assert key in ("grad h0", "grad c0") and a[key] is None and b[key] is None, key
            continue
        torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


def _assert_buffers_equal(a: dict, b: dict, tol: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# 1. training mode: the fused recurrence equals the reference loop (float64)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fused_training_equals_reference_float64(case, momentum):
    """Outputs, h_n, c_n, the gradient of the input, of the explicit state and of every parameter, and every
    SequenceBatchNorm's running statistics, over two training steps with an in-place parameter update between.

    Fails if the hand-written backward misses a term (the gradient through the batch mean/variance of BN_h or BN_c,
    the carried cell, h_n/c_n as extra outputs), mixes up the gate order, returns the gradient of the wrong state,
    uses statistics of the wrong rows (start_step), or updates the running averages differently (rate, count, rows).
    """
    I, H, B, T, L, start, state_kind = case
    max_steps = start + T + 3  # rows beyond start + T must stay untouched
    fused = _model(I, H, L, max_steps, momentum=momentum, seed=CASES.index(case))
    ref = _reference_copy(fused)
    assert fused.implementation == "auto" and ref.implementation == "reference"
    before = _buffers(fused)
    for step in range(2):
        x, state, weights = _data(case, torch.float64, seed=10 + step)
        res_f = _train_step(fused, x, state, weights, start)
        res_r = _train_step(ref, x, state, weights, start)
        _assert_results_equal(res_f, res_r, TOL, learned_h0=state_kind == "learned")
        _assert_buffers_equal(_buffers(fused), _buffers(ref), TOL)
        _sgd_step_from(ref, fused)
    # sanity: the statistics of exactly the rows start … start+T-1 moved, twice
    after = _buffers(fused)
    rows = torch.zeros(max_steps, dtype=torch.bool)
    rows[start : start + T] = True
    for site in batchnorm_sites(fused):
        prefix = next(n for n, m in fused.named_modules() if m is site)
        count = after[f"{prefix}.num_batches_tracked"] - before[f"{prefix}.num_batches_tracked"]
        assert count.tolist() == [2 if r else 0 for r in rows.tolist()], prefix
        mean_before, mean_after = before[f"{prefix}.running_mean"], after[f"{prefix}.running_mean"]
        assert torch.equal(mean_after[~rows], mean_before[~rows]), prefix
        assert not torch.isclose(mean_after[rows], mean_before[rows]).all(), prefix


@pytest.mark.parametrize("loss_uses", ["outputs", "h_n", "c_n"])
def test_fused_gradients_when_the_loss_uses_only_one_result(loss_uses):
    """The backward gets no (zero) gradient for the unused results of the Function.

    Fails if a missing gradient of the outputs or of c_T is mishandled (None treated as a tensor, or garbage).
    """
    fused = _model(3, 5, 2, 6, seed=3)
    ref = _reference_copy(fused)
    x = torch.randn(4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, model in (("fused", fused), ("ref", ref)):
        xg = x.clone().requires_grad_()
        out, (h_n, c_n) = model(xg)
        result = {"outputs": out, "h_n": h_n, "c_n": c_n}[loss_uses]
        params = [xg, *model.parameters()]
        weight = torch.linspace(-1, 2, result.numel(), dtype=result.dtype).view_as(result)
        grads[name] = torch.autograd.grad((result * weight).sum(), params, allow_unused=True)
    names = ["x", *(n for n, _ in fused.named_parameters())]
    for name, gf, gr in zip(names, grads["fused"], grads["ref"], strict=True):
        if name == "h0":  # exactly zero (see _assert_results_equal), rounding noise in both
            assert gf is not None and gr is not None and gf.abs().max() < 1e-9 and gr.abs().max() < 1e-9
            continue
        if gr is None:  # a parameter the chosen result does not depend on: unused in both
            assert gf is None, name
            continue
        torch.testing.assert_close(gf, gr, **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_fused_training_without_grad_equals_reference():
    """Training mode under torch.no_grad() (no graph): same outputs and the same statistics updates."""
    fused = _model(2, 6, 2, 8, seed=4)
    ref = _reference_copy(fused)
    x = torch.randn(5, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out_f, (h_f, c_f) = fused(x, start_step=1)
        out_r, (h_r, c_r) = ref(x, start_step=1)
    torch.testing.assert_close(out_f, out_r, **TOL)
    torch.testing.assert_close(h_f, h_r, **TOL)
    torch.testing.assert_close(c_f, c_r, **TOL)
    _assert_buffers_equal(_buffers(fused), _buffers(ref), TOL)


# ---------------------------------------------------------------------------------------------------------------------
# 2. float32: the oneDNN matmul branch of _linear


def test_linear_onednn_branch_equals_mm_for_the_layouts_used():
    """_linear on float32 CPU (oneDNN's matmul where the build has it) computes x @ W.T for every layout the
    recurrence passes: contiguous, a batch-constant (stride-0, expanded) learned state, transposed views of both
    arguments (the weight gradient), a transposed-then-contiguous weight (dh = dwh W_h); and it reads the weight's
    current values after an in-place update (no stale cached copy)."""
    g = torch.Generator().manual_seed(15)
    w = torch.randn(20, 5, generator=g)
    cases = {
        "contiguous": (torch.randn(3, 5, generator=g), w),
        "expanded rows": (torch.randn(1, 5, generator=g).expand(3, 5), w),
        "transposed both": (torch.randn(27, 20, generator=g).t(), torch.randn(27, 5, generator=g).t()),
        "transposed weight made contiguous": (torch.randn(3, 20, generator=g), w.t().contiguous()),
    }
    for name, (x, weight) in cases.items():
        got = _linear(x, weight)
        assert got.dtype == torch.float32 and got.shape == (x.shape[0], weight.shape[0]), name
        exact = x.double() @ weight.double().t()
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    x = cases["contiguous"][0]
    w2 = w.clone()
    _linear(x, w2)
    w2.mul_(-2.0).add_(1.0)
    torch.testing.assert_close(_linear(x, w2).double(), x.double() @ w2.double().t(), rtol=1e-5, atol=1e-5)
    # float64 goes through torch.mm (bit-identical)
    x64, w64 = x.double(), w.double()
    assert torch.equal(_linear(x64, w64), torch.mm(x64, w64.t()))


def _assert_as_accurate(key, fused, ref, truth, floor):
    """Both float32 results approximate the float64 ``truth`` (the same model and data in float64); the fast path
    must be about as accurate as the reference: max|fused - truth| <= 4 max|ref - truth| + floor max(1, max|truth|).
    (The ratio of the two errors is a matter of rounding luck: up to ~2.5 over 60 seeds and shapes.)
    """
    fused, ref, truth = fused.double(), ref.double(), truth.double()
    err_f = (fused - truth).abs().max().item()
    err_r = (ref - truth).abs().max().item()
    scale = max(truth.abs().max().item(), 1.0)
    assert err_f <= 4 * err_r + floor * scale, (
        f"{key}: fused float32 error {err_f:.3g}, reference float32 error {err_r:.3g}, scale {scale:.3g}"
    )


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", CASES32, ids=_case_id)
def test_fused_training_equals_reference_float32(case, momentum):
    """The float32 path (oneDNN's matmul for W_h h, dh = dwh W_h and the strided weight-gradient matmul) is as
    accurate as the reference loop, against the float64 result, over two steps with an in-place parameter update
    between (a stale cached weight in the oneDNN call would show in the second step), statistics included.

    Why not elementwise rtol 1e-5 / atol 1e-6 between the two float32 paths: with the learned state, W_h h0 is the
    same for every sequence, its batch variance at step 0 is 0 and BN_h multiplies rounding by 1/sqrt(eps) ~ 316, so
    either float32 path is up to ~5e-4 (relative to the tensor's scale) away from float64, depending on the rounding
    of one matmul; there the floor is 1e-3 of the scale (a wrong transposition or a stale weight gives errors of
    1e-2 … 1). With a per-sequence state the floor is 2e-5 of the scale (a matmul rounded to half precision fails).
    """
    I, H, B, T, L, start, state_kind = case
    floor = 1e-3 if state_kind == "learned" else 2e-5
    max_steps = start + T + 3
    fused = _model(I, H, L, max_steps, dtype=torch.float32, momentum=momentum, seed=20 + CASES32.index(case))
    ref = _reference_copy(fused)
    truth = _reference_copy(fused).double()
    for step in range(2):
        x, state, weights = _data(case, torch.float32, seed=30 + step)
        state64 = None if state is None else tuple(s.double() for s in state)
        res_f = _train_step(fused, x, state, weights, start)
        res_r = _train_step(ref, x, state, weights, start)
        res_t = _train_step(truth, x.double(), state64, tuple(w.double() for w in weights), start)
        assert res_f.keys() == res_r.keys() == res_t.keys()
        for key in res_f:
            if res_t[key] is None:
                assert res_f[key] is None and res_r[key] is None, key
            elif key == "grad h0":  # exactly 0 (see _assert_results_equal): rounding noise, amplified by BN_h
                scale = res_t["grad c0"].abs().max()
                assert res_f[key].abs().max() <= 1e-2 * scale and res_r[key].abs().max() <= 1e-2 * scale
            else:
                _assert_as_accurate(key, res_f[key], res_r[key], res_t[key], floor)
        buf_f, buf_r, buf_t = _buffers(fused), _buffers(ref), _buffers(truth)
        for key in buf_f:
            if key.endswith("num_batches_tracked"):
                assert torch.equal(buf_f[key], buf_r[key]) and torch.equal(buf_f[key], buf_t[key]), key
            else:
                _assert_as_accurate(key, buf_f[key], buf_r[key], buf_t[key], floor)
        _sgd_step_from(ref, fused, truth)


@pytest.mark.parametrize("state_kind", ["explicit", "learned with h0 noise"])
def test_fused_float32_well_conditioned_equals_reference_elementwise(state_kind):
    """Where float32 is well conditioned (a batch of 8, a per-sequence state: given, or the learned one with the
    same h0 noise in both), the two float32 paths agree elementwise: rtol 1e-5, atol 1e-5 of max(1, the tensor's
    scale). (atol 1e-6 of the scale holds for some seeds only: the gradients go through 3 BN backward passes per step
    and reductions over the batch, and the two paths round in different orders.)"""
    noise = 0.5 if state_kind != "explicit" else 0.0
    fused = _model(4, 6, 2, 5, dtype=torch.float32, seed=5, h0_noise_std=noise)
    ref = _reference_copy(fused)
    case = (4, 6, 8, 5, 2, 0, "explicit" if state_kind == "explicit" else "learned")
    x, state, weights = _data(case, torch.float32, seed=5)
    torch.manual_seed(16)  # the same h0 noise in both
    res_f = _train_step(fused, x, state, weights)
    torch.manual_seed(16)
    res_r = _train_step(ref, x, state, weights)
    for key in res_f:
        if res_r[key] is None:
            assert res_f[key] is None, key
            continue
        scale = max(res_r[key].abs().max().item(), 1.0)
        torch.testing.assert_close(
            res_f[key], res_r[key], rtol=1e-5, atol=1e-5 * scale, msg=lambda m, k=key: f"{k}: {m}"
        )
    _assert_buffers_equal(_buffers(fused), _buffers(ref), TOL32)


# ---------------------------------------------------------------------------------------------------------------------
# 3. batch_first with an explicit state


def test_fused_batch_first_explicit_state_gradients():
    """batch_first input (a transposed, non-contiguous (T, B, I) view inside) and a given (h0, c0) requiring grad:
    the gradients w.r.t. the given state (the last values the hand-written backward returns) match the reference.

    Fails if the state's gradient were that of the wrong step, of the wrong layer, or dropped.
    """
    fused = _model(3, 5, 2, 8, seed=6, batch_first=True)
    ref = _reference_copy(fused)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)  # (B, T, I)
    state = (
        torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
    )
    weights = (
        torch.randn(4, 6, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
    )
    res_f = _train_step(fused, x, state, weights)
    res_r = _train_step(ref, x, state, weights)
    assert res_f["out"].shape == (4, 6, 5)
    _assert_results_equal(res_f, res_r, TOL, learned_h0=False)
    for key in ("grad state h", "grad state c"):
        assert res_f[key].shape == (2, 4, 5)
        assert (res_f[key].abs() > 0).all(), key  # every layer's state matters (the test is sensitive)
    _assert_buffers_equal(_buffers(fused), _buffers(ref), TOL)


# ---------------------------------------------------------------------------------------------------------------------
# 4. fallbacks: evaluation, lengths, the plain LSTM


@pytest.mark.parametrize("eval_statistics", ["population", "batch"])
@pytest.mark.parametrize("start_step", [0, 2])
def test_eval_matches_reference(eval_statistics, start_step):
    """Evaluation on the fused layer equals the reference loop to float64 rounding: with population statistics (T
    beyond max_steps reusing the last row) through the folded per-step scale and shift; with batch statistics through
    the fused batch-statistics recurrence (nothing recorded). Gradients too, and no statistics change."""
    fused = _model(3, 5, 2, 4, seed=7).eval()
    set_eval_statistics(fused, eval_statistics)
    ref = _reference_copy(fused)
    before = _buffers(fused)
    case = (3, 5, 3, 7, 2, start_step, "learned")  # T=7 > max_steps=4
    x, state, weights = _data(case, torch.float64, seed=7)
    res_f = _train_step(fused, x, state, weights, start_step)
    res_r = _train_step(ref, x, state, weights, start_step)
    assert res_f.keys() == res_r.keys()
    for key in res_f:
        torch.testing.assert_close(res_f[key], res_r[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    for key, buf in _buffers(fused).items():
        assert torch.equal(buf, before[key]), key
    # population statistics: the result really depends on the per-step rows (the fallback uses them)
    if eval_statistics == "population":
        with torch.no_grad():
            fused.cells[0].bn_c.running_var[-1] += 1.0
            changed, _ = fused(x, start_step=start_step)
        assert torch.equal(changed[: 3 - start_step], res_f["out"][: 3 - start_step])
        assert not torch.allclose(changed[3 - start_step :], res_f["out"][3 - start_step :])


@pytest.mark.parametrize("num_layers", [1, 2])
def test_training_with_lengths_equals_reference(num_layers):
    """A mask (lengths) in training runs the packed fast path (tests/nn/test_masked_fast.py): the reference result to
    float64 rounding, statistics included."""
    fused = _model(3, 4, num_layers, 6, seed=8)
    ref = _reference_copy(fused)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 6])
    outs = {}
    for name, model in (("fused", fused), ("ref", ref)):
        xg = x.clone().requires_grad_()
        out, (h, c) = model(xg, lengths=lengths)
        (out.sum() + (h * 2).sum() + (c**2).sum()).backward()
        outs[name] = [out, h, c, xg.grad, *(p.grad for p in model.parameters())]
    for a, b in zip(outs["fused"], outs["ref"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for (key, a), b in zip(_buffers(fused).items(), _buffers(ref).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("explicit_state", [False, True])
def test_plain_lstm_fused_equals_reference_float32(training, explicit_state):
    """normalize=False through torch's fused LSTM kernel equals the plain reference loop (float32), outputs and
    every gradient, in training and evaluation, with the learned or a given state; and with lengths (the kernel once
    per run of steps on the batch sorted by length) too."""
    I, H, L, T, B = 3, 6, 2, 5, 3
    fused = _model(I, H, L, 4, dtype=torch.float32, seed=9, normalize=False).train(training)
    ref = _reference_copy(fused)
    case = (I, H, B, T, L, 0, "explicit" if explicit_state else "learned")
    x, state, weights = _data(case, torch.float32, seed=9)
    res_f = _train_step(fused, x, state, weights)
    res_r = _train_step(ref, x, state, weights)
    assert res_f.keys() == res_r.keys()
    for key in res_f:
        if res_r[key] is None:
            assert res_f[key] is None and key in ("grad h0", "grad c0"), key
            continue
        torch.testing.assert_close(res_f[key], res_r[key], **TOL32, msg=lambda m, k=key: f"{k}: {m}")
    with torch.no_grad():  # torch.lstm's train flag follows grad mode: the no-grad kernel gives the same
        torch.testing.assert_close(fused(x, state)[0], res_r["out"], **TOL32)
        lengths = torch.tensor([5, 2, 4])
        torch.testing.assert_close(fused(x, state, lengths)[0], ref(x, state, lengths)[0], **TOL32)


# ---------------------------------------------------------------------------------------------------------------------
# 5./6. errors on the fast path


@pytest.mark.parametrize(("start_step", "T"), [(0, 6), (3, 3), (5, 1)])
def test_fused_training_beyond_max_steps_raises_the_reference_error(start_step, T):
    """start_step + T > max_steps in training: the same clear ValueError as the reference, no statistic touched."""
    messages = []
    for fused in (True, False):
        model = _model(3, 4, 2, 5, seed=10, implementation=("auto" if fused else "reference"))
        before = _buffers(model)
        with pytest.raises(ValueError, match=r"max_steps=5") as info:
            model(torch.randn(T, 3, 3, dtype=torch.float64), start_step=start_step)
        messages.append(str(info.value))
        for key, buf in _buffers(model).items():
            assert torch.equal(buf, before[key]), key
    assert messages[0] == messages[1]
    assert f"({start_step + T})" in messages[0]


def test_fused_training_batch_of_one_raises_the_reference_error():
    """A batch of 1 in training: the same ValueError naming the 2-sequence minimum, no statistic touched; in
    evaluation a batch of 1 is fine."""
    messages = []
    for fused in (True, False):
        model = _model(3, 4, 1, 5, seed=11, implementation=("auto" if fused else "reference"))
        before = _buffers(model)
        with pytest.raises(ValueError, match=r"at least 2 sequences.*batch of size 1") as info:
            model(torch.randn(4, 1, 3, dtype=torch.float64))
        messages.append(str(info.value))
        for key, buf in _buffers(model).items():
            assert torch.equal(buf, before[key]), key
        assert model.eval()(torch.randn(4, 1, 3, dtype=torch.float64))[0].shape == (4, 1, 4)
    assert messages[0] == messages[1]


def test_fused_backward_twice_with_retain_graph_accumulates_like_the_reference():
    """The fused Function keeps its saved tensors intact in backward: a second backward through the same graph
    (retain_graph=True) accumulates exactly the gradients of the first, as the reference path does."""
    model = _model(3, 4, 1, 12, seed=12)
    ref = _reference_copy(model)
    x = torch.randn(12, 3, 3, dtype=torch.float64)  # more than one chunk of steps
    grads = []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        out, (h, c) = m(x)
        loss = out.sum() + c.sum()
        loss.backward(retain_graph=True)
        once = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        loss.backward()
        for n, p in m.named_parameters():
            if n in once:
                torch.testing.assert_close(p.grad, 2 * once[n], **TOL)
        grads.append(once)
    for n in grads[1]:
        if not n.endswith("h0"):  # h0's exact gradient is 0 (see above): both paths give rounding noise
            torch.testing.assert_close(grads[0][n], grads[1][n], **TOL)


@pytest.mark.parametrize("T", [1, 3])
def test_fused_double_backward_matches_reference_or_refuses_clearly(T):
    """create_graph=True through the fused Function (a gradient penalty, a Hessian-vector product): either the
    reference's second-order gradients or a RuntimeError that says the graph cannot be differentiated twice --
    never silently different values."""
    fused = _model(3, 4, 1, 6, seed=17)
    ref = _reference_copy(fused)
    x = torch.randn(T, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(17))

    def second_order(model: BNLSTM) -> list[torch.Tensor]:
        xg = x.clone().requires_grad_()
        out, _ = model(xg)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (gx,) = torch.autograd.grad((out * weight).sum(), [xg], create_graph=True)
        inputs = [xg, *model.parameters()]
        grads = torch.autograd.grad((gx**2).sum(), inputs, allow_unused=True)
        return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads, strict=True)]

    expected = second_order(ref)
    try:
        got = second_order(fused)
    except RuntimeError as error:
        assert re.search(r"differentiate twice|create_graph|double backward", str(error)), str(error)
        return
    names = ["x", *(n for n, _ in fused.named_parameters())]
    for name, g, e in zip(names, got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# 7. autocast


def test_fused_bf16_autocast_trains_and_statistics_stay_float32():
    """Under CPU bf16 autocast the fused recurrence runs in float32: forward and backward run, outputs, gradients and
    running statistics are finite, the statistics stay float32, and the result is close to float32 training."""
    model = _model(3, 8, 2, 6, dtype=torch.float32, seed=13)
    plain = copy.deepcopy(model)
    ref = _reference_copy(model)
    x = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = model(x)
        with torch.no_grad():
            y_ref, _ = ref(x)
    assert y.dtype == h.dtype == c.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(c).all()
    (y.float().sum() + c.float().square().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert buf.dtype == torch.float32, name
            assert torch.isfinite(buf).all(), name
    for site, site0 in zip(batchnorm_sites(model), batchnorm_sites(plain), strict=True):
        assert torch.equal(site.num_batches_tracked, site0.num_batches_tracked + 1)
    y32, _ = plain(x)  # bf16 only rounds the input matmul (and, in the reference, the recurrent one)
    torch.testing.assert_close(y, y32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(y, y_ref.float(), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# 8. torch.compile: the native recurrence is a custom op, so a training step traces as one graph


def _loss(model: BNLSTM, x: torch.Tensor) -> torch.Tensor:
    out, (h, c) = model(x, start_step=1)
    return out.square().mean() + c.sum()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_training_step_has_no_graph_break_and_equals_eager():
    """torch.compile(fullgraph=True) of a BNLSTM training step (2 layers, float32: the native kernel's custom ops):
    dynamo finds one graph and no break, and the compiled forward + backward give the eager loss, every gradient
    and the same running statistics."""
    model = _model(3, 5, 2, 6, dtype=torch.float32, seed=14)
    compiled_model = copy.deepcopy(model)
    x = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(14))
    explanation = torch._dynamo.explain(_loss)(copy.deepcopy(model), x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(_loss, fullgraph=True)
    loss_c = compiled(compiled_model, x)
    loss_c.backward()
    loss_e = _loss(model, x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, p_c), p_e in zip(compiled_model.named_parameters(), model.parameters(), strict=True):
        assert p_c.grad is not None and p_e.grad is not None, name
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-6, msg=lambda m, k=name: f"{k}: {m}")
    _assert_buffers_equal(_buffers(compiled_model), _buffers(model), {"rtol": 1e-5, "atol": 1e-6})


@pytest.mark.parametrize("batch", [1, 5])
def test_population_eval_in_float32_without_grad_matches_reference(batch):
    """Inference (no grad, float32: the oneDNN matmul branch) with population statistics, batch 1 included (the
    full-test protocol), steps beyond max_steps and a start_step: the folded scale/shift path equals the reference."""
    fused = _model(4, 6, 2, 5, dtype=torch.float32, seed=21).eval()
    ref = _reference_copy(fused)
    x = torch.randn(9, batch, 4, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        out_f, (h_f, c_f) = fused(x, start_step=2)
        out_r, (h_r, c_r) = ref(x, start_step=2)
    for got, want in ((out_f, out_r), (h_f, h_r), (c_f, c_r)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
