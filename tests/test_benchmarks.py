"""benchmarks/: the naive reference BN-LSTM equals BNLSTM, and the harness writes well-formed results (no speed is
asserted: numbers are machine-dependent and live in the results files)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from bnlstm_lit.nn import BNLSTM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TOL = {"rtol": 1e-9, "atol": 1e-10}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run = _load("bnlstm_benchmarks_run", BENCHMARKS / "run.py")
naive = sys.modules["naive"]  # imported by run.py from the same folder


def _pair(I: int, H: int, T: int, seed: int = 0):
    """A BNLSTM with non-trivial γ, β, b, h0, c0 and the naive model with its weights, both float64."""
    torch.manual_seed(seed)
    model = BNLSTM(I, H, max_steps=T).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bn_x.weight", "bn_h.weight", "bn_c.weight")):
                p.copy_(0.3 + 0.5 * torch.rand_like(p))
            elif name.endswith(("bias", "h0", "c0")):
                p.add_(0.3 * torch.randn_like(p))
    ref = naive.copy_from(model, naive.NaiveBNLSTM(I, H, T).double())
    return model, ref


# ---------------------------------------------------------------------------------------------------------------------
# the naive reference


def test_naive_equals_bnlstm_in_training():
    I, H, T, B = 3, 5, 6, 4
    model, ref = _pair(I, H, T)
    x = torch.randn(T, B, I, dtype=torch.float64)
    xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_m, (hm, cm) = model(xm)
    state = tuple(s.detach().clone().contiguous() for s in model.initial_state(B))
    out_r, (hr, cr) = ref(xr, state)
    assert out_r.shape == (T, B, H) and hr.shape == cr.shape == (1, B, H)
    torch.testing.assert_close(out_m, out_r, **TOL)
    torch.testing.assert_close(hm, hr, **TOL)
    torch.testing.assert_close(cm, cr, **TOL)

    g = torch.Generator().manual_seed(1)
    w = [torch.randn(v.shape, generator=g, dtype=v.dtype) for v in (out_m, hm, cm)]

    def loss(out, h, c):
        return (out * w[0]).sum() + (h * w[1]).sum() + (c * w[2]).sum()

    cell = model.cells[0]
    pairs = {
        "x": (xm, xr),
        "W_x": (cell.weight_ih, ref.W_x.weight),
        "W_h": (cell.weight_hh, ref.W_h.weight),
        "b": (cell.bias, ref.bias),
        "gamma_x": (cell.bn_x.weight, ref.gamma_x),
        "gamma_h": (cell.bn_h.weight, ref.gamma_h),
        "gamma_c": (cell.bn_c.weight, ref.gamma_c),
        "beta_c": (cell.bn_c.bias, ref.beta_c),
    }
    gm = torch.autograd.grad(loss(out_m, hm, cm), [m for m, _ in pairs.values()])
    gr = torch.autograd.grad(loss(out_r, hr, cr), [r for _, r in pairs.values()])
    for name, a, b in zip(pairs, gm, gr, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_naive_equals_bnlstm_at_init_in_both_modes():
    """The benchmark's models: default init, zero initial state; eval first (population statistics still at their
    init, mean 0 / variance 1, in both; a training pass then updates them by different rules), then training."""
    I, H, T, B = 2, 4, 5, 3
    torch.manual_seed(0)
    model = BNLSTM(I, H, max_steps=T)
    ref = naive.copy_from(model, naive.NaiveBNLSTM(I, H, T))
    x = torch.randn(T, B, I)
    for training in (False, True):
        model.train(training)
        ref.train(training)
        out_m, (hm, cm) = model(x)
        out_r, (hr, cr) = ref(x)
        torch.testing.assert_close(out_m, out_r)
        torch.testing.assert_close(hm, hr)
        torch.testing.assert_close(cm, cr)


def test_naive_factory_builds_the_same_model_as_bnlstm():
    torch.manual_seed(0)
    model = run.IMPLEMENTATIONS["bnlstm"](3, 4, 5)
    torch.manual_seed(0)
    ref = run.IMPLEMENTATIONS["naive"](3, 4, 5)
    torch.testing.assert_close(ref.W_h.weight, model.cells[0].weight_hh, rtol=0, atol=0)
    x = torch.randn(5, 3, 3)
    torch.testing.assert_close(ref(x)[0], model(x)[0])


def test_copy_from_rejects_a_mismatched_model():
    with pytest.raises(ValueError, match="single-layer"):
        naive.copy_from(BNLSTM(3, 4, num_layers=2, max_steps=5), naive.NaiveBNLSTM(3, 4, 5))
    with pytest.raises(ValueError, match="single-layer"):
        naive.copy_from(BNLSTM(3, 4, max_steps=5, normalize=False), naive.NaiveBNLSTM(3, 4, 5))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        naive.copy_from(BNLSTM(3, 4, max_steps=5), naive.NaiveBNLSTM(3, 6, 5))


# ---------------------------------------------------------------------------------------------------------------------
# the harness


#: every implementation but the torch.compile one (its first compilation takes ~15 s and needs a C++ compiler)
UNCOMPILED = [name for name in run.IMPLEMENTATIONS if name != "bnlstm_compiled"]


def test_harness_writes_results(tmp_path, capsys):
    results = run.main(["--shape", "tiny", "--reps", "2", "--out", str(tmp_path), "--impl", *UNCOMPILED])
    printed = capsys.readouterr().out
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()
    assert json.loads((tmp_path / "results.json").read_text()) == results

    machine = results["machine"]
    for key in ("platform", "python", "torch", "device_name", "cpu_count", "threads", "date"):
        assert machine[key] not in (None, ""), key
    assert machine["torch"] == torch.__version__
    config = results["config"]
    assert config["reps"] == 2 and config["device"] == "cpu" and config["dtype"] == "fp32"
    assert list(config["shapes"]) == ["tiny"]

    rows = results["rows"]
    impls = UNCOMPILED
    assert {"lstm", "naive", "bnlstm", "bnlstm_plain", "bnlstm_reference"} <= set(impls)
    assert "bnlstm_compiled" in run.IMPLEMENTATIONS
    assert sorted((r["mode"], r["impl"]) for r in rows) == sorted((m, i) for m in ("train", "eval") for i in impls)
    for r in rows:
        assert r["error"] is None, r
        assert (r["shape"], r["device"], r["dtype"]) == ("tiny", "cpu", "fp32")
        assert (r["batch"], r["steps"], r["hidden"]) == (4, 5, 8)
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["median_s"] == statistics.median(r["times_s"])
        assert r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(4 * 5 / r["median_s"])
        assert r["ratio_to_lstm"] > 0
        assert r["peak_bytes"] is None  # CPU
        if r["mode"] == "train":
            assert r["saved_bytes"] > 0 and r["memory_bytes"] == r["saved_bytes"]
            assert r["memory_ratio_to_lstm"] > 0
        else:
            assert r["saved_bytes"] is None and r["memory_ratio_to_lstm"] is None
        if r["impl"] == "lstm":
            assert r["ratio_to_lstm"] == 1.0
            if r["mode"] == "train":
                assert r["memory_ratio_to_lstm"] == 1.0
        else:
            base = next(b for b in rows if b["impl"] == "lstm" and b["mode"] == r["mode"])
            assert r["ratio_to_lstm"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])

    md = (tmp_path / "results.md").read_text()
    assert printed == md
    header = "| shape | mode | impl | ms/step | tokens/s | × nn.LSTM | memory (MiB) | memory × nn.LSTM |"
    assert header in md
    table = md[md.index(header) :].splitlines()
    body = table[2:]
    assert len(body) == len(rows)
    for line, r in zip(body, rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [r["shape"], r["mode"], r["impl"]]
    assert md.startswith("Machine: ")


def test_harness_impl_subset_keeps_the_baseline(tmp_path, capsys):
    results = run.main(["--shape", "tiny", "--reps", "1", "--impl", "bnlstm_plain", "--out", str(tmp_path)])
    assert {r["impl"] for r in results["rows"]} == {"lstm", "bnlstm_plain"}


def test_harness_records_a_failing_implementation(tmp_path, capsys, monkeypatch):
    def broken(input_size, hidden_size, max_steps):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setitem(run.IMPLEMENTATIONS, "broken", broken)
    results = run.main(["--shape", "tiny", "--reps", "1", "--impl", "broken", "--out", str(tmp_path)])
    failed = [r for r in results["rows"] if r["impl"] == "broken"]
    assert len(failed) == 2 and all("out of memory (simulated)" in r["error"] for r in failed)
    assert all(r["median_s"] is None and r["ratio_to_lstm"] is None for r in failed)
    assert all(r["error"] is None for r in results["rows"] if r["impl"] == "lstm")
    assert "error: RuntimeError: out of memory (simulated)" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(("flag", "name"), [("--shape", "imagenet"), ("--impl", "cudnn_magic")])
def test_unknown_names_are_clear_errors(flag, name, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run.main([flag, name, "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert name in err and "invalid choice" in err
    assert not (tmp_path / "results.json").exists()


def test_lm_step_timer_runs_on_a_tiny_model(capsys):
    """benchmarks/lm_step.py times both models and prints one line each (the value is not asserted: it is a speed)."""
    spec = importlib.util.spec_from_file_location("lm_step", BENCHMARKS / "lm_step.py")
    assert spec is not None and spec.loader is not None
    lm_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm_step)
    medians = lm_step.main(["--hidden", "8", "--batch", "3", "--length", "4", "--vocab", "5", "--reps", "1"])
    assert set(medians) == {"lstm", "bnlstm"} and all(v > 0 for v in medians.values())
    out = capsys.readouterr().out
    assert "lstm:" in out and "bnlstm:" in out


@pytest.mark.parametrize("shape", ["tiny", "mnist"])
def test_train_loop_timer_runs_one_model(shape, capsys, monkeypatch):
    """benchmarks/train_loop.py runs a plain training loop of one model and reports every step's times and faulted
    memory (values not asserted: speeds); the mnist branch (cross-entropy on the last step) runs on a shrunken
    preset; a bad --steps or --threads is an error naming it."""
    train_loop = _load("bnlstm_benchmarks_train_loop", BENCHMARKS / "train_loop.py")
    if shape == "mnist":
        monkeypatch.setitem(train_loop.SHAPES, "mnist", train_loop.SHAPES["tiny"])
    rows = train_loop.main(["--shape", shape, "--impl", "bnlstm", "--steps", "2"])  # (--threads would outlive it)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["forward_s"] > 0 and r["backward_step_s"] > 0 for r in rows)
    if sys.platform.startswith("linux"):
        assert all(isinstance(r["forward_faulted_bytes"], int) and r["forward_faulted_bytes"] >= 0 for r in rows)
    out = capsys.readouterr().out
    assert out.count("  step ") == 2 and f"at the {shape} shape" in out
    for flag in ("--steps", "--threads"):
        with pytest.raises(SystemExit) as info:
            train_loop.main(["--shape", "tiny", flag, "0"])
        assert info.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err


def test_gpu_check_script_parses_and_selects_the_gpu_tests():
    """benchmarks/gpu_check.sh (run on a GPU machine) is valid bash, names implementations and shapes run.py has,
    and its ``pytest -m gpu`` selects the gpu-marked tests (which skip here, without CUDA)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(root / "benchmarks" / script)], check=True)
    text = (root / "benchmarks" / "gpu_check.sh").read_text()
    for impl in ("lstm", "bnlstm", "bnlstm_eager", "bnlstm_plain"):
        assert impl in run.IMPLEMENTATIONS
    for shape in ("mnist", "ptb", "text8"):
        assert shape in run.SHAPES and shape in text
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--collect-only", str(root / "tests")],
        capture_output=True, text=True, cwd=root,
    ).stdout  # fmt: skip
    selected = [line for line in collected.splitlines() if "::" in line]
    assert selected and all(line.startswith("tests/test_gpu.py::") for line in selected), collected[-2000:]
