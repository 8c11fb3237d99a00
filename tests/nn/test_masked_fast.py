"""The BN-LSTM's fast paths with ``lengths`` (the batch sorted by length, runs of steps on their real rows:
``bnlstm_lit.nn.layer._PackedSteps``) compute what the masked reference loop computes.

float64 (the eager fused recurrence) is compared with the float64 reference loop elementwise; float32 (the native
kernel, where it builds) against the float64 reference, as accurate as the float32 reference loop.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bnlstm_lit.nn import BNLSTM, eager, native, reference
from bnlstm_lit.nn import native_build as kernel_module
from bnlstm_lit.nn import plain as plain_lstm

#: (lengths, T): a length-1 sequence and one longest sequence (the last steps have one real sequence: the rule for
#: fewer than two applies), all equal, T beyond the longest (steps without a real sequence), two equal longest.
LENGTHS = [
    ([9, 1, 4, 6, 3, 2, 7], 9),
    ([5, 5, 5, 5], 5),
    ([6, 1, 3, 2, 6], 8),
]


@pytest.fixture
def calls(monkeypatch):
    """How often the masked fast paths ran (runs of steps with batch statistics: the input term up front or normalized
    in the kernel, with population statistics in training, population evaluation runs) and how often the reference
    loop did."""
    counts = {"fused": 0, "input_norm": 0, "few": 0, "population": 0, "reference": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    def recurrence(name, fn):  # the native recurrence with the input term's BN inside counts as "input_norm"
        def call(*args, **kwargs):
            counts["input_norm" if kwargs.get("gamma_x") is not None else name] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(eager, "recurrence", counted("fused", eager.recurrence))
    monkeypatch.setattr(native, "recurrence", recurrence("fused", native.recurrence))
    monkeypatch.setattr(reference, "population_steps", counted("few", reference.population_steps))
    monkeypatch.setattr(eager, "population", counted("population", eager.population))
    monkeypatch.setattr(native, "population", counted("population", native.population))
    monkeypatch.setattr(reference, "run", counted("reference", reference.run))
    return counts


def _model(H, layers, seed, **kw) -> BNLSTM:
    """A float64 bidirectional BNLSTM with parameters moved away from their init and random running statistics."""
    torch.manual_seed(seed)
    model = BNLSTM(3, H, num_layers=layers, max_steps=10, bidirectional=True, **kw).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.3 + torch.rand(buf.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                buf.copy_(torch.randint(0, 5, buf.shape, generator=g))
    return model


def _step(model: BNLSTM, x, lengths, weights, train: bool) -> dict[str, torch.Tensor | None]:
    """One forward (and in training a backward) pass: outputs, states, every gradient, every buffer."""
    dtype = next(model.parameters()).dtype
    x = x.to(dtype).requires_grad_(train)
    model.train(train)
    with torch.set_grad_enabled(train):
        out, (h_n, c_n) = model(x, lengths=lengths)
    res: dict[str, torch.Tensor | None] = {"out": out.detach(), "h_n": h_n.detach(), "c_n": c_n.detach()}
    if train:
        loss = (out * weights[0].to(dtype)).sum() + (h_n * weights[1].to(dtype)).sum() + (c_n**2).sum()
        loss.backward()
        res["grad x"] = x.grad
        for name, p in model.named_parameters():
            res[f"grad {name}"] = None if p.grad is None else p.grad.clone()
        model.zero_grad(set_to_none=True)
    for name, buf in model.named_buffers():
        res[name] = buf.clone()
    return res


def _data(T, B, layers, H, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 3, generator=g, dtype=torch.float64) * 1.5 + 0.3
    weights = (torch.randn(T, B, 2 * H, generator=g, dtype=torch.float64), torch.randn(2 * layers, B, H, generator=g))
    return x, weights


@pytest.mark.parametrize("reversal", ["unpadded", "padded"])
@pytest.mark.parametrize("input_statistics", ["per_step", "sequence"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("case", range(len(LENGTHS)))
def test_masked_fast_path_equals_reference_float64(reversal, input_statistics, layers, case, calls):
    """Training (two steps: outputs, h_n, c_n, the input's and every parameter's gradient, the running statistics
    and their counts) and then evaluation with population statistics, T = 9 beyond max_steps in one case: the fast
    path equals the reference loop to float64 rounding, and it is the fast path that ran."""
    lengths, T = LENGTHS[case]
    H = 5 if layers == 1 else 7
    kw = {"input_statistics": input_statistics, "backward_reversal": reversal}
    fast = _model(H, layers, seed=10 * case + layers, **kw)
    fast.max_steps = 10
    reference = copy.deepcopy(fast)
    reference.implementation = "reference"
    B = len(lengths)
    for step in range(2):
        x, weights = _data(T, B, layers, H, seed=step + 7 * case)
        got = _step(fast, x, torch.tensor(lengths), weights, train=True)
        calls_before = dict(calls)
        want = _step(reference, x, torch.tensor(lengths), weights, train=True)
        assert calls["reference"] > calls_before["reference"]
        assert got.keys() == want.keys()
        for key, value in want.items():
            if value is None:
                assert got[key] is None, key
            elif not value.is_floating_point():
                assert torch.equal(got[key], value), key
            else:
                scale = max(value.abs().max().item(), 1.0)
                torch.testing.assert_close(
                    got[key], value, rtol=1e-9, atol=1e-9 * scale, msg=lambda m, k=key: f"{k}: {m}"
                )
    runs = calls["fused"]
    assert runs >= 2 * layers  # at least one run per direction and layer
    one_longest = sorted(lengths)[-1] != sorted(lengths)[-2]
    assert (calls["few"] > 0) == one_longest  # the rule for fewer than two real sequences in training
    # evaluation with population statistics, on a longer padded batch (T + 3 > max_steps = 10 for T = 9)
    x, weights = _data(T + 3, B, layers, H, seed=99)
    reference_calls = calls["reference"]
    got = _step(fast, x, torch.tensor(lengths), weights, train=False)
    assert calls["reference"] == reference_calls and calls["population"] >= 2 * layers
    want = _step(reference, x, torch.tensor(lengths), weights, train=False)
    for key, value in want.items():
        assert value is not None
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")


def test_running_statistics_skip_steps_with_one_real_sequence(calls):
    """The last steps, where one sequence is real, keep their population statistics and counts (batchnorm.py's
    rule); the steps before are updated."""
    model = _model(5, 1, seed=3)
    before = {name: buf.clone() for name, buf in model.named_buffers()}
    x, weights = _data(6, 3, 1, 5, seed=3)
    _step(model, x, torch.tensor([6, 2, 3]), weights, train=True)
    assert calls["few"] == 2 and calls["reference"] == 0
    for name, buf in model.named_buffers():
        if "bn_x" in name:  # the input term normalizes all steps at once, with the same rule
            continue
        assert torch.equal(buf[3:6], before[name][3:6]), name  # one real sequence at steps 3..5
        assert not torch.equal(buf[:3], before[name][:3]), name


@pytest.mark.skipif(kernel_module.library() is None, reason="the native kernel cannot be built here")
@pytest.mark.parametrize("reversal", ["unpadded", "padded"])
@pytest.mark.parametrize("input_statistics", ["per_step", "sequence"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("case", range(len(LENGTHS)))
def test_masked_kernel_float32_as_accurate_as_reference(
    reversal, input_statistics, layers, case, calls, count_kernel_calls
):
    """float32 through the native kernel (counted) against the float64 reference, no less accurate than the float32
    reference loop (x4, plus 2e-5 of the tensor's scale), over two training steps (outputs, h_n, c_n, every gradient,
    running statistics, counts exactly). Per-step input statistics normalize each run's input term inside the kernel
    (the rule for one real sequence included), "sequence" keeps the input term up front."""
    lengths, T = LENGTHS[case]
    H = 9 if layers == 2 else 6
    kw = {"backward_reversal": reversal, "input_statistics": input_statistics}
    truth_model = _model(H, layers, seed=5 + case, **kw)
    fast, reference = copy.deepcopy(truth_model).float(), copy.deepcopy(truth_model).float()
    reference.implementation = "reference"
    truth_model.implementation = "reference"
    for step in range(2):
        x, weights = _data(T, len(lengths), layers, H, seed=5 + 11 * step + case)
        res = {n: _step(m, x, torch.tensor(lengths), weights, True) for n, m in [("fast", fast), ("ref", reference)]}
        truth = _step(truth_model, x, torch.tensor(lengths), weights, True)
        for key, value in truth.items():
            assert value is not None
            if not value.is_floating_point():
                assert torch.equal(res["fast"][key], value), key
                continue
            got, ref = res["fast"][key], res["ref"][key]
            assert got is not None and ref is not None
            err, err_ref = (got.double() - value).abs().max().item(), (ref.double() - value).abs().max().item()
            scale = max(value.abs().max().item(), 1.0)
            assert err <= 4 * err_ref + 2e-5 * scale, f"{key}: error {err:.3g}, reference error {err_ref:.3g}"
    plain = count_kernel_calls["train"] - count_kernel_calls["input_norm"]  # kernel recurrences without the input BN
    one_longest = sorted(lengths)[-1] != sorted(lengths)[-2]
    assert (calls["few"] > 0) == one_longest
    if input_statistics == "per_step":  # every run with batch statistics normalized its input term in the kernel
        assert count_kernel_calls["input_norm"] == calls["input_norm"] >= 2 * 2 * layers
        assert plain == calls["fused"] == 0
    else:
        assert count_kernel_calls["input_norm"] == calls["input_norm"] == 0
        assert plain == calls["fused"] >= 2 * 2 * layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padding_invariance_on_the_fast_path(dtype, calls):
    """Real positions give the same outputs, states and statistics when the batch is padded to a longer T."""
    lengths = torch.tensor([5, 2, 4, 1])
    outputs = []
    for T in (5, 8):
        model = _model(6, 2, seed=4).to(dtype)
        g = torch.Generator().manual_seed(4)
        x = torch.randn(5, 4, 3, generator=g, dtype=dtype)
        x = torch.cat([x, torch.full((T - 5, 4, 3), 7.0, dtype=dtype)])  # padding that would show if it leaked
        out, (h, c) = model(x, lengths=lengths)
        outputs.append((out[:5], h, c, *(b.clone() for b in model.buffers())))
        if T > 5:
            assert out[5:].abs().max().item() == 0.0
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert calls["reference"] == 0 and calls["fused"] + calls["input_norm"] > 0


def test_double_backward_is_refused_on_the_fast_path(calls):
    """The fast path with lengths refuses a differentiable backward (the reference loop supports it)."""
    model = _model(5, 1, seed=6)
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    out, _ = model(x, lengths=torch.tensor([4, 2, 3]))
    assert calls["reference"] == 0
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_bf16_autocast_with_lengths_tracks_float32(calls):
    """Under CPU bf16 autocast a masked training step takes the fast path too (the input term up front in bf16, the
    recurrence in float32): its outputs and running statistics are within 2% of the float32 step's, and every
    gradient is about as close to float32's as the reference loop's under the same autocast (bf16 gradients are
    noisy: measured up to ~25% of the largest entry for both); the statistics stay float32."""
    model = _model(6, 2, seed=8).float()
    # at least 3 real sequences wherever batch statistics apply (with 2, BN's input gradient is ~0 and all rounding),
    # one real sequence at the last step (population statistics)
    lengths = torch.tensor([8, 7, 5, 1, 7])
    x, weights = _data(8, 5, 2, 6, seed=8)
    reference = copy.deepcopy(model)
    reference.implementation = "reference"
    fp32 = _step(copy.deepcopy(model), x.float(), lengths, weights, train=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _step(reference, x.float(), lengths, weights, train=True)
        counted = dict(calls)
        fast = _step(model, x.float(), lengths, weights, train=True)
    assert calls["reference"] == counted["reference"] and calls["fused"] > counted["fused"]  # the fast path ran
    for key, want in fp32.items():
        got = fast[key]
        if want is None:
            assert got is None, key
            continue
        assert got.dtype == want.dtype, key
        if key.endswith("num_batches_tracked"):
            assert torch.equal(got, want), key
            continue
        scale = max(want.abs().max().item(), 1.0)
        err = (got.float() - want).abs().max().item() / scale
        if key.startswith("grad"):
            assert err <= 2 * (ref[key].float() - want).abs().max().item() / scale + 0.02, key
        else:
            assert err <= 0.02, key


@pytest.mark.parametrize("reversal", ["unpadded", "padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plain_lstm_with_lengths_runs_torch_kernel_per_run(reversal, dtype, monkeypatch, calls):
    """The LSTM baseline (normalize=False) with lengths runs torch's fused LSTM once per run of steps on the sorted
    batch, not the reference loop, and equals the reference loop (implementation="reference"): outputs (zero at
    padding), h_n, c_n and every gradient, bidirectional, two layers, both reversals, a length-1 sequence and a step
    with none."""
    plain_calls = []
    plain_run = plain_lstm.run
    monkeypatch.setattr(plain_lstm, "run", lambda *a: plain_calls.append(a[0].shape) or plain_run(*a))
    torch.manual_seed(12)
    model = BNLSTM(3, 5, num_layers=2, bidirectional=True, normalize=False, backward_reversal=reversal).to(dtype)
    reference = copy.deepcopy(model)
    reference.implementation = "reference"
    lengths, T = [6, 1, 4, 6, 3], 7
    x, weights = _data(T, 5, 2, 5, seed=12)
    fast = _step(model, x, torch.tensor(lengths), weights, train=True)
    assert calls["reference"] == 0 and plain_calls
    # one call per run of steps with real sequences: lengths 6, 6, 4, 3, 1 give runs of 5, 4, 3 (twice), 2 rows
    assert all(shape[1] in (5, 4, 3, 2) for shape in plain_calls), plain_calls
    ref = _step(reference, x, torch.tensor(lengths), weights, train=True)
    assert calls["reference"] > 0
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for key, want in ref.items():
        got = fast[key]
        assert (got is None) == (want is None), key
        if want is not None:
            torch.testing.assert_close(got, want, **tol, msg=key)
    pad = torch.arange(T)[:, None] >= torch.tensor(lengths)[None]
    assert fast["out"][pad].abs().max().item() == 0.0
