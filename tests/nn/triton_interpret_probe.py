"""Runs the Triton BN-LSTM steps under the Triton interpreter on CPU and prints, as one JSON object on the last line
of stdout, how far they are from the eager recurrence; ``tests/nn/test_triton_steps.py`` runs this in a subprocess
(``TRITON_INTERPRET=1`` must be set before triton is first imported) and judges the numbers.

For each case (T, B, H, widest column block): the same float64 inputs run through ``eager.recurrence`` in float64
(the truth), ``eager.recurrence`` in float32, ``triton_steps.recurrence`` in float32 and in float64. For every result
(outputs, c_T, the four statistics, the gradients of all seven inputs) it reports the largest magnitude of the truth
and the largest absolute errors: triton32 and eager32 against the truth, triton32 against eager32, triton64 against
eager64. It also reports the dtypes under bfloat16 inputs and autocast, one-sided gradients, the double-backward
refusal, and the kernel launches and torch ops of T=2 and T=5 steps.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from bnlstm_lit.nn import eager
from bnlstm_lit.nn import triton_steps as ts

#: (T, B, H, widest column block or None for the default): T=1; B not a power of two (3, 5) and B=1; H=7 in two
#: blocks of 4 (the second masked), H=13 in one masked block of 16, H=8 in two full blocks; T=9.
CASES = [(1, 3, 7, 4), (9, 5, 7, 4), (3, 3, 13, None), (4, 8, 8, 4), (2, 1, 5, None)]
RESULTS = ["out", "c_T", "mean_h", "var_h", "mean_c", "var_c"]
GRADS = ["x_terms", "h0", "c0", "weight_hh", "gamma_h", "gamma_c", "beta_c"]
EPS = 1e-5


def _inputs(T: int, B: int, H: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0, positive: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return (t.abs() if positive else t) + shift

    args = [
        rand(T, B, 4 * H),
        rand(B, H),
        rand(B, H),
        rand(4 * H, H, scale=0.5),
        rand(4 * H, scale=0.3, shift=0.1, positive=True),
        rand(H, scale=0.3, shift=0.5, positive=True),
        rand(H, scale=0.1),
    ]
    return args, rand(T, B, H), rand(B, H)  # inputs, dL/d outputs, dL/d c_T


def _run(fn, args, grad_out, grad_c, dtype) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    leaves = [a.to(dtype).clone().requires_grad_() for a in args]
    out, c_last, stats = fn(*leaves, EPS)
    torch.autograd.backward([out, c_last], [grad_out.to(dtype), grad_c.to(dtype)])
    return [t.detach().double() for t in (out, c_last, *stats)] + [leaf.grad.double() for leaf in leaves]


def _case(T: int, B: int, H: int, block_h: int | None) -> dict[str, dict[str, float]]:
    ts._MAX_BLOCK_H = block_h or 16
    args, grad_out, grad_c = _inputs(T, B, H)
    truth = _run(eager.recurrence, args, grad_out, grad_c, torch.float64)
    eager32 = _run(eager.recurrence, args, grad_out, grad_c, torch.float32)
    triton32 = _run(ts.recurrence, args, grad_out, grad_c, torch.float32)
    triton64 = _run(ts.recurrence, args, grad_out, grad_c, torch.float64)
    report = {}
    for k, name in enumerate(RESULTS + [f"d_{n}" for n in GRADS]):
        report[name] = {
            "scale": truth[k].abs().max().item(),
            "triton32": (triton32[k] - truth[k]).abs().max().item(),
            "eager32": (eager32[k] - truth[k]).abs().max().item(),
            "triton32_vs_eager32": (triton32[k] - eager32[k]).abs().max().item(),
            "triton64_vs_eager64": (triton64[k] - truth[k]).abs().max().item(),
        }
    return report


def _extras() -> dict[str, object]:
    """Half-precision inputs and autocast run in float32; one-sided gradients; double backward refused."""
    ts._MAX_BLOCK_H = 16
    args, grad_out, grad_c = _inputs(3, 3, 5, seed=1)
    out32, c32, _ = ts.recurrence(*[a.float() for a in args], EPS)
    half = [a.bfloat16() for a in args]
    out_bf, c_bf, stats_bf = ts.recurrence(*half, EPS)
    out_up, _, _ = ts.recurrence(*[a.float() for a in half], EPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, _, _ = ts.recurrence(*[a.float() for a in args], EPS)
    extras: dict[str, object] = {
        "bf16_dtypes": [str(out_bf.dtype), str(c_bf.dtype), str(stats_bf[0].dtype)],
        "bf16_vs_upcast": (out_bf - out_up).abs().max().item(),
        "autocast_dtype": str(out_ac.dtype),
        "autocast_vs_float32": (out_ac - out32).abs().max().item(),
    }
    # only c_T used (no gradient for the outputs), and only the outputs used (none for c_T), against eager
    for name, pick in (("only_c", lambda out, c: c.sum()), ("only_out", lambda out, c: (out * grad_out).sum())):
        grads = []
        for fn in (eager.recurrence, ts.recurrence):
            leaves = [a.clone().requires_grad_() for a in args]
            out, c_last, _ = fn(*leaves, EPS)
            pick(out, c_last).backward()
            grads.append([leaf.grad for leaf in leaves])
        extras[name] = max((a - b).abs().max().item() for a, b in zip(*grads, strict=True))
    leaves = [a.clone().requires_grad_() for a in args]
    out, _, _ = ts.recurrence(*leaves, EPS)
    try:
        torch.autograd.grad(out.sum(), leaves, create_graph=True)
        extras["double_backward"] = "allowed"
    except RuntimeError as error:
        extras["double_backward"] = str(error)
    return extras


def _launches(T: int) -> dict[str, int]:
    """Kernel launches and non-view torch ops of a forward and backward of T steps (B=3, H=5); the interpreter's
    own tensor traffic inside a launch is not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = {}
    inside = [False]  # within a kernel launch

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if not func.is_view and not inside[0]:
                counts[func.__name__] = counts.get(func.__name__, 0) + 1
            return func(*args, **(kwargs or {}))

    def counted(name, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            counts[name] = counts.get(name, 0) + 1
            inside[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] = False

        return wrapper

    args, grad_out, grad_c = _inputs(T, 3, 5, seed=2)
    leaves = [a.float().requires_grad_() for a in args]
    steps = ts.forward_step, ts.backward_step
    ts.forward_step, ts.backward_step = counted("forward_kernel", steps[0]), counted("backward_kernel", steps[1])
    try:
        with Count():
            out, c_last, _ = ts.recurrence(*leaves, EPS)
            torch.autograd.backward([out, c_last], [grad_out.float(), grad_c.float()])
    finally:
        ts.forward_step, ts.backward_step = steps
    return counts


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or not ts.interpreting():
        raise SystemExit("run with TRITON_INTERPRET=1 in the environment")
    cases = CASES if len(sys.argv) == 1 else [CASES[int(k)] for k in sys.argv[1:]]
    result = {
        "available": ts.available(),
        "cases": {f"T{T}-B{B}-H{H}-bh{bh}": _case(T, B, H, bh) for T, B, H, bh in cases},
        "extras": _extras(),
        "launches": {str(T): _launches(T) for T in (2, 5)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
