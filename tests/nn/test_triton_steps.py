"""The Triton BN-LSTM steps (``bnlstm_lit.nn.triton_steps``), checked without a GPU.

* Numerics under the Triton interpreter, which runs the kernels on CPU tensors: ``TRITON_INTERPRET=1`` must be in the
  environment before triton is first imported, so ``triton_interpret_probe.py`` runs in a subprocess and reports the
  errors against the eager recurrence computed in float64; here they are judged: outputs, c_T, the statistics and
  the gradients of all seven inputs, at T=1 and T=9, B=1, 3, 5, 8, H split into masked and full column blocks.
* Ahead-of-time compilation of both kernels for sm_90 and sm_80 (ptxas runs, nothing is loaded): the shipped block
  sizes compile without register spills.
* The module imports, and says it is unavailable, without triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnlstm_lit.nn import triton_steps

HERE = Path(__file__).parent
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (it is in the dev extra: pip install -e '.[dev]')",
)

RESULTS = ["out", "c_T", "mean_h", "var_h", "mean_c", "var_c"]
GRADS = ["d_x_terms", "d_h0", "d_c0", "d_weight_hh", "d_gamma_h", "d_gamma_c", "d_beta_c"]


def _python(code_or_script: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, *code_or_script], env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_imports_without_triton():
    """With triton unimportable the package and the module import, and the path is unavailable, not an error."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton raises ImportError, as on a machine without it\n"
        "from bnlstm_lit.nn import triton_steps as ts\n"
        "assert not ts.available() and not ts.interpreting()\n"
        "try:\n"
        "    ts.compile_ahead('forward_step_kernel', 90, ts.block_config(8, 8))\n"
        "except RuntimeError as error:\n"
        "    print('refused:', error)\n"
    )
    assert "refused:" in _python(["-c", code])


def test_block_config():
    """BLOCK_B is the next power of two >= B; tiles of at most 1024 elements, at most 8 per thread."""
    for batch in (1, 3, 5, 8, 32, 33, 100, 256, 1000, 4096):
        for hidden in (1, 7, 100, 1024):
            cfg = triton_steps.block_config(batch, hidden)
            assert cfg.block_b >= batch and cfg.block_b & (cfg.block_b - 1) == 0
            assert cfg.block_b < 2 * batch or batch == 1
            assert cfg.block_h & (cfg.block_h - 1) == 0 and cfg.block_h <= 16
            assert cfg.block_b * cfg.block_h <= 4096
            assert cfg.block_b * cfg.block_h <= 8 * 32 * cfg.num_warps
    with pytest.raises(ValueError, match="B <= 4096"):
        triton_steps.block_config(triton_steps.MAX_BATCH + 1, 8)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The probe's report: every case, interpreted (about half a minute on two busy cores)."""
    out = _python([str(HERE / "triton_interpret_probe.py")], env={"TRITON_INTERPRET": "1"})
    return json.loads(out.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("name", RESULTS + GRADS)
def test_interpreted_parity(interpreted, name):
    """Against the float64 truth, triton in float32 is about as close as eager in float32 (within 10x, or 1e-6
    relative to the result's scale) and within 1e-5 of eager float32; triton in float64 agrees with eager float64 to
    1e-12 relative."""
    assert interpreted["available"]
    assert len(interpreted["cases"]) == 5
    for case, report in interpreted["cases"].items():
        errors = report[name]
        scale = max(errors["scale"], 1.0)
        assert errors["triton32"] <= 10 * errors["eager32"] + 1e-6 * scale, (case, errors)
        assert errors["triton32_vs_eager32"] <= 1e-5 * scale, (case, errors)
        assert errors["triton64_vs_eager64"] <= 1e-12 * scale, (case, errors)


@needs_triton
def test_interpreted_extras(interpreted):
    """bfloat16 inputs and autocast run in float32; gradients with only c_T or only the outputs used match eager's;
    double backward is refused with eager's message."""
    extras = interpreted["extras"]
    assert extras["bf16_dtypes"] == ["torch.float32"] * 3
    assert extras["bf16_vs_upcast"] == 0.0
    assert extras["autocast_dtype"] == "torch.float32"
    assert extras["autocast_vs_float32"] == 0.0
    assert extras["only_c"] <= 1e-12 and extras["only_out"] <= 1e-12
    assert "cannot be differentiated twice" in extras["double_backward"]


@needs_triton
def test_four_launches_per_step(interpreted):
    """Per step, forward and backward: torch.mm into the saved W_h h_{t-1}, the forward kernel, the backward kernel,
    one addmm for dL/dh_{t-1} -- and nothing else that grows with T (the rest is per sequence: allocations, dW_h's
    one matmul, the sums of the per-step dγ/dβ rows, the variances)."""
    short, long = interpreted["launches"]["2"], interpreted["launches"]["5"]
    per_step = {op: (long.get(op, 0) - short.get(op, 0)) / 3 for op in set(short) | set(long)}
    per_step = {op: n for op, n in per_step.items() if n}
    assert per_step == {"mm.out": 1, "forward_kernel": 1, "backward_kernel": 1, "addmm.default": 1}, per_step


#: The launch sizes of a batch of 32 (32 x 16 tiles, 2 warps) and of 256 (256 x 4, 4 warps), at H = 1024.
AHEAD_BATCHES = (32, 256)


@needs_triton
@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize("kernel", ["forward_step_kernel", "backward_step_kernel"])
def test_compiles_ahead_without_spills(capability, kernel):
    """Both kernels compile for sm_90 and sm_80 without a GPU, with no local memory (spills) at the shipped sizes."""
    for batch in AHEAD_BATCHES:
        cfg = triton_steps.block_config(batch, 1024)
        compiled = triton_steps.compile_ahead(kernel, capability, cfg)
        usage = triton_steps.resource_usage(compiled)
        print(f"sm_{capability} {kernel} {cfg}: {usage}")
        assert compiled.metadata.num_warps == cfg.num_warps
        assert f"sm_{capability}" in compiled.asm["ptx"]
        assert usage.local_bytes == 0, usage
        assert 0 < usage.registers <= 255, usage


@pytest.fixture(scope="module")
def interpreted_layers() -> dict:
    """``triton_layer_probe.py``'s report: whole layers through the dispatcher's triton leaf, interpreted."""
    out = _python([str(HERE / "triton_layer_probe.py")], env={"TRITON_INTERPRET": "1"})
    return json.loads(out.strip().splitlines()[-1])


@needs_triton
def test_layers_through_the_dispatcher_equal_the_reference_loop(interpreted_layers):
    """BNLSTM(implementation="triton") under the interpreter against the float64 reference loop: T=1, 2 layers,
    bidirectional with lengths (the packed runs, a step with one real sequence), 2 layers with lengths, evaluation
    with batch statistics, the estimation pass. Every output, gradient and running statistic is as close to the
    truth as the eager path in float32 is (within 10x, or 1e-5 of the case's scale)."""
    assert set(interpreted_layers) == {
        "train_T1", "train_2_layers_start", "train_bidirectional_lengths", "train_2_layers_lengths", "batch_eval",
        "estimate",
    }  # fmt: skip
    for case, report in interpreted_layers.items():
        scale = max(report.pop("scale"), 1.0)
        assert report, case
        for key, errors in report.items():
            assert errors["triton"] <= 10 * errors["eager"] + 1e-5 * scale, (case, key, errors)
