"""The native step kernel (``bnlstm_lit.nn.native``) computes what the eager fused path and the reference loop compute,
and falls back to the eager path where it cannot be built.

The kernel runs on float32 CPU tensors only. Each comparison builds one float32 model, deep-copies it twice
(``implementation="eager"``: the eager fused steps; ``implementation="reference"``: the reference loop) and once more
in float64 (the truth the float32 results are measured against).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch

from bnlstm_lit.nn import BNLSTM, eager, native
from bnlstm_lit.nn import native_build as kernel_module

pytestmark = pytest.mark.skipif(kernel_module.library() is None, reason="the native kernel cannot be built here")

#: (input_size, hidden_size, batch, T, num_layers, start_step, state): odd hidden sizes, batches of 2 and 3, T=1,
#: T not a multiple of the chunk (8), T spanning three chunks, one and two layers, learned and explicit states.
CASES = [
    (5, 7, 3, 9, 2, 2, "explicit"),
    (1, 13, 2, 9, 1, 0, "explicit"),
    (3, 13, 3, 1, 2, 0, "learned"),
    (4, 7, 8, 17, 1, 1, "learned"),
    (2, 5, 6, 8, 2, 0, "explicit"),
]


def _case_id(c) -> str:
    return f"I{c[0]}-H{c[1]}-B{c[2]}-T{c[3]}-L{c[4]}-s{c[5]}-{c[6]}"


@pytest.fixture
def fresh_kernel_state():
    """Forget the loaded library before and after the test (a test that changes the environment must not leave a
    failed load, or its warning flag, behind)."""
    kernel_module.reset()
    yield
    kernel_module.reset()


def _model(I, H, L, max_steps, seed=0, **kw) -> BNLSTM:
    """A float32 BNLSTM with every parameter moved away from its init and random running statistics."""
    torch.manual_seed(seed)
    model = BNLSTM(I, H, num_layers=L, max_steps=max_steps, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.3 + torch.rand(buf.shape, generator=g))
    return model


def _variants(model: BNLSTM) -> dict[str, BNLSTM]:
    eager = copy.deepcopy(model)
    eager.implementation = "eager"
    reference = copy.deepcopy(model)
    reference.implementation = "reference"
    truth = copy.deepcopy(reference).double()
    return {"kernel": model, "eager": eager, "reference": reference, "truth": truth}


def _data(case, seed):
    I, H, B, T, L, _, state_kind = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64) * 1.5 + 0.3
    state = None
    if state_kind == "explicit":
        state = tuple(torch.randn(L, B, H, generator=g, dtype=torch.float64) for _ in range(2))
    weights = (torch.randn(T, B, H, generator=g, dtype=torch.float64), torch.randn(L, B, H, generator=g))
    return x, state, weights


def _train_step(model: BNLSTM, x, state, weights, start) -> dict[str, torch.Tensor | None]:
    dtype = next(model.parameters()).dtype
    x = x.to(dtype).requires_grad_()
    state = None if state is None else tuple(s.to(dtype).requires_grad_() for s in state)
    out, (h_n, c_n) = model(x, state, start_step=start)
    loss = (out * weights[0].to(dtype)).sum() + (h_n * weights[1].to(dtype)).sum() + (c_n**2).sum()
    loss.backward()
    res: dict[str, torch.Tensor | None] = {"out": out.detach(), "h_n": h_n.detach(), "c_n": c_n.detach()}
    res["grad x"] = x.grad
    if state is not None:
        res["grad state h"], res["grad state c"] = state[0].grad, state[1].grad
    for name, p in model.named_parameters():
        res[f"grad {name}"] = None if p.grad is None else p.grad.clone()
    for name, buf in model.named_buffers():
        res[name] = buf.clone()
    model.zero_grad(set_to_none=True)
    return res


def _assert_as_accurate(key, got, ref, truth, floor):
    """got approximates truth about as well as ref does: max|got - truth| <= 4 max|ref - truth| + floor * scale."""
    got, ref, truth = got.double(), ref.double(), truth.double()
    err, err_ref = (got - truth).abs().max().item(), (ref - truth).abs().max().item()
    scale = max(truth.abs().max().item(), 1.0)
    assert err <= 4 * err_ref + floor * scale, f"{key}: error {err:.3g}, reference error {err_ref:.3g}"


# ---------------------------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_training_equals_eager_and_reference(case, count_kernel_calls):
    """Outputs, h_n, c_n, the gradient of the input, of the explicit state and of every parameter, and the running
    statistics, over two training steps with a parameter update between: the kernel path is as accurate (against
    float64) as the eager fused path and the reference loop (both float32), whose float32 errors on these shapes are
    1e-7 … 1e-4 (batches of 2 and 3 are badly conditioned). Fails on a wrong gate order, a missing term of a batch-norm
    backward, a wrong chunk boundary (T = 9, 17), a stale pointer, or statistics of the wrong rows."""
    I, H, B, T, L, start, state_kind = case
    models = _variants(_model(I, H, L, start + T + 2, seed=CASES.index(case)))
    floor = 1e-3 if state_kind == "learned" else 2e-5  # see test_fused.test_fused_training_equals_reference_float32
    for step in range(2):
        x, state, weights = _data(case, seed=40 + step)
        res = {name: _train_step(m, x, state, weights, start) for name, m in models.items()}
        for key, truth in res["truth"].items():
            if truth is None:
                assert all(res[n][key] is None for n in ("kernel", "eager", "reference")), key
            elif key == "grad h0" and state_kind == "learned":  # exactly 0 (BN_h removes W_h h0): rounding noise
                assert res["kernel"][key].abs().max() <= 1e-2 * max(res["truth"]["grad c0"].abs().max().item(), 1.0)
            elif key.endswith("num_batches_tracked"):
                assert torch.equal(res["kernel"][key], truth), key
            else:
                for other in ("eager", "reference"):
                    _assert_as_accurate(f"{key} vs {other}", res["kernel"][key], res[other][key], truth, floor)
        with torch.no_grad():  # the same parameter update for all
            for name, p in models["truth"].named_parameters():
                grad = res["truth"][f"grad {name}"]
                for m in models.values():
                    m.get_parameter(name).copy_(p if grad is None else p - 0.05 * grad)
    assert count_kernel_calls["train"] == count_kernel_calls["input_norm"] == 2 * L


@pytest.mark.parametrize("input_statistics", ["per_step", "sequence"])
def test_kernel_training_well_conditioned_equals_eager_elementwise(input_statistics, count_kernel_calls):
    """A batch of 16 with a per-sequence state, 2 layers, T = 11: the kernel and the eager fused path agree
    elementwise, rtol 1e-5 and atol 1e-5 of max(1, the tensor's scale), statistics included; with per-step input
    statistics the kernel normalizes the input term too, with sequence-wise ones (BN-e*) it takes the input term as
    computed by the cell."""
    case = (4, 9, 16, 11, 2, 1, "explicit")
    models = _variants(_model(4, 9, 2, 14, seed=50, input_statistics=input_statistics))
    x, state, weights = _data(case, seed=50)
    res_k = _train_step(models["kernel"], x, state, weights, 1)
    res_e = _train_step(models["eager"], x, state, weights, 1)
    assert res_k.keys() == res_e.keys()
    for key in res_k:
        if res_e[key] is None:
            assert res_k[key] is None, key
            continue
        scale = max(res_e[key].abs().max().item(), 1.0)
        torch.testing.assert_close(
            res_k[key], res_e[key], rtol=1e-5, atol=1e-5 * scale, msg=lambda m, k=key: f"{k}: {m}"
        )
    assert count_kernel_calls["train"] == 2
    assert count_kernel_calls["input_norm"] == (2 if input_statistics == "per_step" else 0)


def test_kernel_training_without_grad_updates_statistics_like_eager(count_kernel_calls):
    """Training mode under no_grad (the kernel keeps no saved results): same outputs and statistics."""
    models = _variants(_model(3, 6, 1, 12, seed=51))
    x = torch.randn(10, 5, 3, generator=torch.Generator().manual_seed(51))
    with torch.no_grad():
        out_k, (h_k, c_k) = models["kernel"](x)
        out_e, (h_e, c_e) = models["eager"](x)
    for got, want in ((out_k, out_e), (h_k, h_e), (c_k, c_e)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(models["kernel"].named_buffers(), models["eager"].buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert count_kernel_calls["train"] == 1


def test_kernel_is_not_used_for_float64_or_when_switched_off(count_kernel_calls):
    """float64 and ``implementation="eager"`` run the eager steps (the tests of test_fused.py cover those)."""
    x = torch.randn(4, 3, 2)
    _model(2, 5, 1, 4).double()(x.double())
    _model(2, 5, 1, 4, implementation="eager")(x)
    assert count_kernel_calls["train"] == 0
    _model(2, 5, 1, 4)(x)
    assert count_kernel_calls["train"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# evaluation with population statistics


@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_population_eval_equals_eager_and_reference(batch, count_kernel_calls):
    """Inference (no grad) with population statistics, T beyond max_steps (the last row reused) and a start step,
    two layers, H = 7: the kernel equals the eager folded loop and the reference to float rounding; with gradients
    enabled the eager (differentiable) loop runs."""
    models = _variants(_model(4, 7, 2, 5, seed=52))
    for m in models.values():
        m.eval()
    x = torch.randn(9, batch, 4, generator=torch.Generator().manual_seed(52))
    results = {}
    with torch.no_grad():
        for name, m in models.items():
            out, (h, c) = m(x.to(next(m.parameters()).dtype), start_step=2)
            results[name] = (out, h, c)
    assert count_kernel_calls["eval"] == 2
    for got, by_eager, ref, truth in zip(*(results[n] for n in ("kernel", "eager", "reference", "truth")), strict=True):
        torch.testing.assert_close(got, by_eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-6)
    models["kernel"](x.requires_grad_())
    assert count_kernel_calls["eval"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# building, caching, fallback


def test_second_load_does_not_recompile(tmp_path, monkeypatch, fresh_kernel_state):
    """A fresh cache: the first load compiles once (atomically: no temporary file left), a later process (here: a
    reset) loads the cached library without compiling and without touching it."""
    monkeypatch.setenv(kernel_module.ENV_CACHE, str(tmp_path / "cache"))
    builds = []
    compile_ = kernel_module._compile

    def counted(target: Path, flags: list[str]) -> None:
        builds.append(target)
        compile_(target, flags)

    monkeypatch.setattr(kernel_module, "_compile", counted)
    assert kernel_module.library() is not None
    assert len(builds) == 1 and builds[0].parent == tmp_path / "cache" and builds[0].exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [builds[0].name]
    mtime = os.stat(builds[0]).st_mtime_ns
    kernel_module.reset()
    assert kernel_module.library() is not None
    assert len(builds) == 1 and os.stat(builds[0]).st_mtime_ns == mtime
    # another source or flags give another file (the key covers them)
    monkeypatch.setattr(kernel_module, "FLAGS", [*kernel_module.FLAGS, "-DBNLSTM_TEST_KEY=1"])
    assert kernel_module.library_path() != builds[0]


def test_without_a_compiler_the_eager_path_runs_with_one_warning(tmp_path, monkeypatch, fresh_kernel_state):
    """CC names no program and the cache is empty: the layer trains and evaluates with the eager steps, same
    numbers as implementation="eager", and warns once per process (not once per call)."""
    monkeypatch.setenv(kernel_module.ENV_CACHE, str(tmp_path / "empty"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    model = _model(3, 5, 2, 6, seed=53)
    eager = copy.deepcopy(model)
    eager.implementation = "eager"
    x = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(53))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = model(x)
        out.sum().backward()
        model(x)
        with torch.no_grad():
            model.eval()(x)
    messages = [str(w.message) for w in caught if "native BN-LSTM kernel" in str(w.message)]
    assert len(messages) == 1, messages
    assert "no-such-compiler" in messages[0]
    assert kernel_module.library() is None
    out_e, _ = eager(x)
    out_e.sum().backward()
    torch.testing.assert_close(out, out_e, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_switched_off_by_environment_nothing_is_built(tmp_path, monkeypatch, fresh_kernel_state):
    """BNLSTM_LIT_KERNEL=0: no compile is attempted, no warning, the eager path runs."""
    monkeypatch.setenv(kernel_module.ENV_SWITCH, "0")
    monkeypatch.setenv(kernel_module.ENV_CACHE, str(tmp_path / "cache"))

    def refuse(target: Path, flags: list[str]) -> None:
        raise AssertionError("compiled although switched off")

    monkeypatch.setattr(kernel_module, "_compile", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = _model(3, 5, 1, 6)(torch.randn(6, 4, 3))
    assert out.shape == (6, 4, 5)
    assert kernel_module.library() is None and not kernel_module.enabled()
    assert not (tmp_path / "cache").exists()


def test_native_recurrence_equals_eager_on_a_given_input_term():
    """The two training recurrences of the dispatcher, given the same input term: outputs and statistics agree."""
    g = torch.Generator().manual_seed(54)
    T, B, H = 10, 6, 5
    args = (
        torch.randn(T, B, 4 * H, generator=g),
        torch.randn(B, H, generator=g),
        torch.randn(B, H, generator=g),
        torch.randn(4 * H, H, generator=g) * 0.3,
        torch.rand(4 * H, generator=g) + 0.1,
        torch.rand(H, generator=g) + 0.1,
        torch.randn(H, generator=g),
        1e-5,
    )
    with_kernel = native.recurrence(*args)
    without = eager.recurrence(*args)
    torch.testing.assert_close(with_kernel[0], without[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_kernel[1], without[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(with_kernel[2], without[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_native_population_equals_eager_on_a_given_input_term():
    """The population recurrence on a given input term (scale 1, shift 0 for it): the kernel equals the eager loop."""
    g = torch.Generator().manual_seed(55)
    T, B, H = 7, 3, 6
    x_terms = torch.randn(T, B, 4 * H, generator=g)
    state = (torch.randn(B, H, generator=g), torch.randn(B, H, generator=g))
    weight = torch.randn(4 * H, H, generator=g) * 0.3
    scales = (
        torch.rand(T, 4 * H, generator=g) + 0.5,
        torch.rand(T, H, generator=g) + 0.5,
        torch.randn(T, H, generator=g),
    )
    ones, zeros = torch.ones(T, 4 * H), torch.zeros(T, 4 * H)
    with torch.no_grad():
        out_k, (h_k, c_k) = native.population(x_terms, *state, weight, ones, zeros, *scales)
        out_e, (h_e, c_e) = eager.population(x_terms, state, weight, *scales)
    for got, want in ((out_k, out_e), (h_k, h_e), (c_k, c_e)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("H", "threads"), [(40, 2), (72, 3)])
def test_kernel_column_blocks_on_several_threads_give_identical_results(H, threads, monkeypatch):
    """The kernel splits each step into blocks of columns (uneven ones here: H=40 in 2, H=72 in 3), on OpenMP threads
    where built with them: training (outputs, every gradient, statistics) and evaluation give exactly the results of
    one block on one thread. Fails if a block reads or writes another block's columns (statistics, scratch)."""
    torch.manual_seed(56)
    model = _model(3, H, 2, 6, seed=56)
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(56))
    results = []
    for n in (1, threads):
        monkeypatch.setattr(native, "_threads", lambda elements, n=n: n)
        m = copy.deepcopy(model)
        out, (h, c) = m(x)
        (out.sum() + (c**2).sum()).backward()
        with torch.no_grad():
            evaluated = m.eval()(x, start_step=1)[0]
        results.append([out, h, c, evaluated, *(p.grad for p in m.parameters()), *m.buffers()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# the input projection W_x x_t computed chunk by chunk inside the kernel's recurrence


def _kernel_args(I, H, B, seed):
    g = torch.Generator().manual_seed(seed)
    G = 4 * H
    h0, c0 = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    weight_hh, weight_ih = torch.randn(G, H, generator=g) / H**0.5, torch.randn(G, I, generator=g)
    gammas = [0.1 + 0.5 * torch.rand(n, generator=g) for n in (G, H)]
    beta_c, gamma_x, bias = torch.randn(H, generator=g), 0.1 + 0.5 * torch.rand(G, generator=g), torch.randn(G)
    return h0, c0, weight_hh, gammas[0], gammas[1], beta_c, gamma_x, bias, weight_ih


@pytest.mark.parametrize(("T", "x_grad"), [(17, True), (8, False), (1, True)])
def test_kernel_projection_equals_the_projected_input(T, x_grad):
    """kernel_recurrence_input_norm(x, ..., weight_ih=W_x) -- W_x x_t one matmul per chunk of steps, the gradients of
    x and W_x accumulated chunk by chunk -- equals the same recurrence given W_x x for the whole sequence, with the
    gradients of x and W_x through autograd's matmul: outputs, statistics and every gradient (T = 17: a partial last
    chunk; x without gradient: the first layer)."""
    I, H, B = 3, 7, 5
    h0, c0, weight_hh, gamma_h, gamma_c, beta_c, gamma_x, bias, weight_ih = _kernel_args(I, H, B, seed=T)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1)) * 2
    w = torch.randn(T, B, H, generator=torch.Generator().manual_seed(2))
    results = []
    for project in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight_ih, weight_hh, gamma_x, bias, gamma_c)]
        xl, wih, whh, gx, b, gc = leaves
        xl.requires_grad_(x_grad)
        first = xl if project else xl @ wih.t()
        out = native.recurrence(
            first,
            h0,
            c0,
            whh,
            gamma_h,
            gc,
            beta_c,
            1e-5,
            gamma_x=gx,
            bias=b,
            eps_x=1e-4,
            weight_ih=wih if project else None,
        )
        ((out[0] * w).sum() + out[1].square().sum()).backward()
        results.append((out, [leaf.grad for leaf in leaves]))
    (out_p, grads_p), (out_f, grads_f) = results
    for got, want in zip(out_p, out_f, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (grads_p[0] is None) == (not x_grad)
    for got, want in zip(grads_p, grads_f, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_kernel_paths_never_hold_a_sequence_of_projected_inputs(count_kernel_calls):
    """No tensor of T x B x 4H elements (W_x x for the whole sequence, or its gradient) is created by a training step
    (forward and backward) or a population-statistics evaluation through the kernel: W_x x_t exists one chunk of
    steps at a time (at the paper's shapes a (T, B, 4H) tensor is 100-125 MB of fresh pages on every step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    T, B, I, H = 40, 6, 4, 9  # 5 chunks of 8 steps
    limit = T * B * 4 * H

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    model = _model(I, H, 2, T)
    x = torch.randn(T, B, I)
    with LargestOutput():
        out, _ = model(x)
        out.square().sum().backward()
        model.eval()
        with torch.no_grad():
            model(x)
    assert count_kernel_calls == {"train": 2, "input_norm": 2, "eval": 2}
    assert 0 < LargestOutput.largest < limit, LargestOutput.largest


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


@pytest.mark.skipif(
    not (os.uname().sysname == "Linux" and os.uname().machine == "x86_64"), reason="x86-64 Linux ISA variants"
)
def test_kernel_isa_variants_give_identical_results(tmp_path, fresh_kernel_state):
    """The kernel's loops are compiled for AVX-512, AVX2 and the baseline and picked at load time; each variant built
    alone (-DBNLSTM_KERNEL_NO_CLONES with -mavx512f, -mavx2, nothing) gives bit for bit what the shipped library gives:
    training outputs, every gradient and the statistics, and evaluation (H = 37: partial vectors at every width).
    Fails if a variant reorders a float sum or contracts a multiply-add."""
    variants = {"baseline": []}
    flags = _cpu_flags()
    if "avx2" in flags:
        variants["avx2"] = ["-mavx2"]
    if "avx512f" in flags:
        variants["avx512f"] = ["-mavx512f"]
    model = _model(3, 37, 2, 10, seed=71)
    x = torch.randn(10, 6, 3, generator=torch.Generator().manual_seed(71))

    def run() -> list[torch.Tensor]:
        m = copy.deepcopy(model)
        out, (h, c) = m(x)
        (out.sum() + (c**2).sum()).backward()
        with torch.no_grad():
            evaluated = m.eval()(x, start_step=1)[0]
        return [out, h, c, evaluated, *(p.grad for p in m.parameters()), *m.buffers()]

    shipped = kernel_module.library()
    assert shipped is not None
    expected = run()
    for name, isa in variants.items():
        path = tmp_path / f"{name}.so"
        kernel_module._compile(path, [*kernel_module.FLAGS, "-DBNLSTM_KERNEL_NO_CLONES", *isa])
        kernel_module._state["lib"] = kernel_module._load(path)
        got = run()
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert torch.equal(a, b), f"{name}: result {i} differs"


def test_kernel_recomputes_the_projection_instead_of_saving_it(monkeypatch):
    """With I small against H (RECOMPUTE_MAX_RATIO), the backward recomputes each chunk's W_x x_t instead of holding
    it: the same outputs and every gradient bit for bit as when it is saved, and T x B x 4H floats less saved for the
    backward (counted through saved_tensors_hooks, each storage once)."""
    T, B, I, H = 17, 5, 2, 9  # I <= H / 4; T: a partial last chunk

    def step(ratio: float) -> tuple[list[torch.Tensor], int]:
        monkeypatch.setattr(native, "RECOMPUTE_MAX_RATIO", ratio)
        model = _model(I, H, 1, T, seed=73)
        x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(73), requires_grad=True)
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, (h, c) = model(x)
        (out.square().sum() + c.sum()).backward()
        return [out, h, c, x.grad, *(p.grad for p in model.parameters()), *model.buffers()], sum(storages.values())

    recomputed, saved_bytes_recomputed = step(0.25)
    kept, saved_bytes_kept = step(0.0)
    for a, b in zip(recomputed, kept, strict=True):
        assert torch.equal(a, b)
    assert saved_bytes_kept - saved_bytes_recomputed == T * B * 4 * H * 4


def test_cache_folder_follows_the_documented_order(tmp_path, monkeypatch):
    """$BNLSTM_LIT_CACHE_DIR, else $XDG_CACHE_HOME/bnlstm_lit, else ~/.cache/bnlstm_lit (the test session itself
    builds into a folder of its own: tests/conftest.py)."""
    monkeypatch.setenv(kernel_module.ENV_CACHE, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_module.cache_dir() == tmp_path / "explicit"
    assert kernel_module.library_path().parent == tmp_path / "explicit"
    monkeypatch.delenv(kernel_module.ENV_CACHE)
    assert kernel_module.cache_dir() == tmp_path / "xdg" / "bnlstm_lit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kernel_module.cache_dir() == tmp_path / "home" / ".cache" / "bnlstm_lit"
