"""The BN-LSTM training recurrence with one Triton kernel per step, forward and backward (CUDA).

A leaf implementation of the recurrence :mod:`bnlstm_lit.nn.eager` computes, with the same :func:`recurrence`
signature and results. Per time step of one layer:

* forward: ``torch.mm`` for W_h h_{t-1} (written into the saved buffer), then :func:`forward_step` -- one kernel for
  BN_h with the step's batch statistics, the gates, the cell, BN_c and h_t;
* backward: :func:`backward_step` -- one kernel for both batch norms' backward (through their batch statistics), the
  gates and the cell -- then one ``torch.addmm`` for dL/dh_{t-1} = dL/dh_{t-1}|output + d(W_h h_{t-1}) @ W_h;

so four launches per step in all, against some 14 forward and 25 backward in the eager path. dW_h is one matmul over
all steps at the end (sum_t dwh_t^T h_{t-1}, all T*B rows at once), and the per-step dγ/dβ rows are summed over T at
the end (deterministic: no atomics anywhere).

The kernels are in :mod:`bnlstm_lit.nn._triton_kernels`; their docstring has the layout: one program owns all B rows
of a block of ``BLOCK_H`` hidden units, so a step's batch statistics need no synchronisation between programs. B is
bounded by one program's registers (:data:`MAX_BATCH`).

Registers per thread at :func:`block_config`'s sizes, float32, compiled ahead of time by triton 3.7.1's ptxas
(:func:`compile_ahead`, :func:`resource_usage`; no GPU); no spills (local memory 0) at any of them:

=====  ========================  ==============  ==============
B      BLOCK_B x BLOCK_H, warps  sm_90 fwd/bwd   sm_80 fwd/bwd
=====  ========================  ==============  ==============
1      1 x 16, 1                 38 / 48         28 / 36
8      8 x 16, 1                 72 / 120        72 / 118
32     32 x 16, 2                128 / 211       127 / 197
64     64 x 16, 4                128 / 210       127 / 199
128    128 x 8, 4                126 / 213       125 / 199
256    256 x 4, 4                117 / 209       121 / 203
1024   1024 x 1, 4               116 / 152       110 / 153
4096   4096 x 1, 16              122 / 128       128 / 128
=====  ========================  ==============  ==============

Not yet run on a GPU: correctness is tested under the Triton interpreter, and the block sizes are chosen for
registers, not timed (at small B and H = 1024 the grid is 64 programs, fewer than an H100/H200 has SMs).

triton is imported lazily: this module imports without it, and :func:`available` says whether the path can run
(triton importable and CUDA available, or the Triton interpreter on: ``TRITON_INTERPRET=1`` set before triton is
first imported, which runs the kernels on CPU tensors, in numpy -- for tests).
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from bnlstm_lit.nn.eager import refuse_double_backward

__all__ = [
    "MAX_BATCH",
    "BlockConfig",
    "ResourceUsage",
    "available",
    "backward_step",
    "block_config",
    "compile_ahead",
    "forward_step",
    "interpreting",
    "recurrence",
    "resource_usage",
]

#: The largest batch one program holds (all rows of a column block in registers): BLOCK_B = 4096 at BLOCK_H = 1.
MAX_BATCH = 4096
#: Elements of one (BLOCK_B, BLOCK_H) tile: BLOCK_H shrinks as the batch grows so a program's tiles fit in registers.
_TILE = 1024
#: Widest column block: narrower blocks give more programs (one per block) at the small H of the paper's models.
_MAX_BLOCK_H = 16


@dataclass(frozen=True)
class BlockConfig:
    """Compile-time sizes of a launch: ``BLOCK_B`` (power of two >= B), ``BLOCK_H`` and the warps per program."""

    block_b: int
    block_h: int
    num_warps: int


@dataclass(frozen=True)
class ResourceUsage:
    """What ``cuobjdump --dump-resource-usage`` reports for a compiled kernel: registers per thread, local memory
    (spill) bytes per thread, static shared memory bytes."""

    registers: int
    local_bytes: int
    shared_bytes: int


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_config(batch: int, hidden: int) -> BlockConfig:
    """The launch sizes for a (batch, hidden) step: a tile of about ``_TILE`` elements (at most ``_MAX_BLOCK_H``
    columns, no wider than H needs) and 1-16 warps so that a thread holds at most 8 elements of a tile."""
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(
            f"the Triton step holds all rows of a batch in one program: 1 <= B <= {MAX_BATCH}, got {batch}"
        )
    block_b = _next_power_of_two(batch)
    block_h = max(1, min(_MAX_BLOCK_H, _TILE // block_b, _next_power_of_two(hidden)))
    num_warps = max(1, min(16, block_b * block_h // 256))
    return BlockConfig(block_b, block_h, num_warps)


@functools.cache
def _triton() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except Exception:  # not installed, or a broken install: the path is unavailable, not an error of this package
        return None


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (``TRITON_INTERPRET`` set when triton was imported)."""
    triton = _triton()
    return triton is not None and bool(triton.knobs.runtime.interpret)


def available() -> bool:
    """Whether the Triton path can run: triton importable and, unless interpreting, CUDA available."""
    return _triton() is not None and (interpreting() or torch.cuda.is_available())


@functools.cache
def _kernels() -> ModuleType:
    if _triton() is None:
        raise RuntimeError("the Triton BN-LSTM steps need triton (pip install triton)")
    return importlib.import_module("bnlstm_lit.nn._triton_kernels")


def forward_step(
    wh: Tensor,
    x_t: Tensor,
    c_prev: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    eps: float,
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
) -> None:
    """One forward step after the recurrent matmul, one kernel launch.

    Args:
        wh: W_h h_{t-1} (B, 4H); x_t: the input term (B, 4H); c_prev: c_{t-1} (B, H).
        gamma_h: (4H,); gamma_c, beta_c: (H,); eps: BN ε.
        out: written: h_t, c_t (B, H), the gate activations σ(i), σ(f), tanh(g), σ(o) (B, 4H), tanh(BN_c(c_t))
            (B, H), mean_h, invstd_h (4H,), mean_c, invstd_c (H,) -- invstd = 1 / sqrt(biased batch variance + ε).

    All contiguous, one floating dtype, on one device (rows of (T, ...) buffers as views). Grid: ``cdiv(H, BLOCK_H)``
    programs, each all B rows of BLOCK_H hidden units (:func:`block_config`).
    """
    B, H = c_prev.shape
    cfg = block_config(B, H)
    grid = (-(-H // cfg.block_h),)
    _kernels().forward_step_kernel[grid](
        wh, x_t, c_prev, gamma_h, gamma_c, beta_c, *out, B, H, eps,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps,
    )  # fmt: skip


def backward_step(
    dh: Tensor,
    dc_next: Tensor,
    saved: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
    gamma_h: Tensor,
    gamma_c: Tensor,
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
) -> None:
    """The gradients of one step, one kernel launch (eager's ``_backward_step``).

    Args:
        dh: dL/dh_t from the output and step t+1 (B, H); dc_next: dL/dc_t from step t+1 (B, H).
        saved: the step's act (B, 4H), tc (B, H), wh (B, 4H), c_t (B, H), c_{t-1} (B, H), mean_h, invstd_h (4H,),
            mean_c, invstd_c (H,).
        gamma_h: (4H,); gamma_c: (H,).
        out: written: d pre (B, 4H) (= dL/d input term), d wh (B, 4H) (= dL/d(W_h h_{t-1}), through BN_h's batch
            statistics), dL/dc_{t-1} (B, H) (a buffer other than ``dc_next``), and the step's dγ_h (4H,), dγ_c, dβ_c
            (H,).

    Grid as :func:`forward_step`'s.
    """
    B, H = dh.shape
    cfg = block_config(B, H)
    grid = (-(-H // cfg.block_h),)
    _kernels().backward_step_kernel[grid](
        dh, dc_next, *saved, gamma_h, gamma_c, *out, B, H,
        BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps,
    )  # fmt: skip


class _TritonRecurrence(torch.autograd.Function):
    """eager's ``_BNLSTMRecurrence`` with a Triton kernel per step: the same inputs and outputs (module docstring).

    The forward writes every step's results into (T, ...) buffers saved as they are: W_h h_{t-1} and the gate
    activations (T, B, 4H), h_t, c_t, tanh(BN(c_t)) (T, B, H), the statistics (T, 4H), (T, H).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_terms: Tensor,
        h0: Tensor,
        c0: Tensor,
        weight_hh: Tensor,
        gamma_h: Tensor,
        gamma_c: Tensor,
        beta_c: Tensor,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        T, B, H4 = x_terms.shape
        H = H4 // 4
        new = x_terms.new_empty
        hs, cs, tcs = new(T, B, H), new(T, B, H), new(T, B, H)
        whs, acts = new(T, B, H4), new(T, B, H4)
        mean_h, invstd_h, mean_c, invstd_c = new(T, H4), new(T, H4), new(T, H), new(T, H)
        weight_t = weight_hh.t()
        h, c = h0, c0
        for t in range(T):
            torch.mm(h, weight_t, out=whs[t])
            forward_step(
                whs[t], x_terms[t], c, gamma_h, gamma_c, beta_c, eps,
                (hs[t], cs[t], acts[t], tcs[t], mean_h[t], invstd_h[t], mean_c[t], invstd_c[t]),
            )  # fmt: skip
            h, c = hs[t], cs[t]
        ctx.eps = eps
        ctx.save_for_backward(
            h0, c0, weight_hh, gamma_h, gamma_c, hs, cs, whs, acts, tcs, mean_h, invstd_h, mean_c, invstd_c
        )
        ctx.mark_non_differentiable(mean_h, invstd_h, mean_c, invstd_c)
        return hs, cs[-1].clone(), mean_h, invstd_h, mean_c, invstd_c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_h_all: Tensor | None, grad_c_last: Tensor | None, *unused: Any
    ) -> tuple[Tensor | None, ...]:
        refuse_double_backward()
        h0, c0, weight_hh, gamma_h, gamma_c, hs, cs, whs, acts, tcs, mean_h, invstd_h, mean_c, invstd_c = (
            ctx.saved_tensors
        )
        T, B, H = hs.shape
        grad_h = torch.zeros_like(hs) if grad_h_all is None else grad_h_all.contiguous()
        dc_in = torch.zeros_like(c0) if grad_c_last is None else grad_c_last.contiguous().clone()
        dc_out = torch.empty_like(c0)
        new = hs.new_empty
        dpres, dwhs = new(T, B, 4 * H), new(T, B, 4 * H)
        dgamma_h, dgamma_c, dbeta_c = new(T, 4 * H), new(T, H), new(T, H)
        dh = grad_h[T - 1]
        for t in range(T - 1, -1, -1):
            saved = (
                acts[t], tcs[t], whs[t], cs[t], cs[t - 1] if t > 0 else c0, mean_h[t], invstd_h[t], mean_c[t],
                invstd_c[t],
            )  # fmt: skip
            backward_step(
                dh, dc_in, saved, gamma_h, gamma_c, (dpres[t], dwhs[t], dc_out, dgamma_h[t], dgamma_c[t], dbeta_c[t])
            )
            dc_in, dc_out = dc_out, dc_in  # dL/dc_{t-1} is the next step's dc_next
            # dL/dh_{t-1}: from the output plus through W_h h_{t-1}
            dh = torch.addmm(grad_h[t - 1], dwhs[t], weight_hh) if t > 0 else torch.mm(dwhs[0], weight_hh)
        needs = ctx.needs_input_grad
        dweight = None
        if needs[3]:  # sum_t dwh_t^T h_{t-1}: one matmul over all T * B rows
            h_prev = torch.cat([h0[None], hs[:-1]]).reshape(T * B, H)
            dweight = torch.mm(dwhs.reshape(T * B, 4 * H).t(), h_prev)
        return (
            dpres if needs[0] else None,
            dh if needs[1] else None,
            dc_in if needs[2] else None,
            dweight,
            dgamma_h.sum(0) if needs[4] else None,
            dgamma_c.sum(0) if needs[5] else None,
            dbeta_c.sum(0) if needs[6] else None,
            None,
        )


def recurrence(
    x_terms: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The training-statistics recurrence of one layer over a whole (unmasked) sequence, a Triton kernel per step;
    the signature and results of :func:`bnlstm_lit.nn.eager.recurrence`.

    Args:
        x_terms: (T, B, 4H), BN_t(W_x x_t) + b for every step; T >= 1, 1 <= B <= :data:`MAX_BATCH`.
        h0, c0: (B, H).
        weight_hh: (4H, H); gamma_h: (4H,) γ of the recurrent term; gamma_c, beta_c: (H,) γ and β of the cell.
        eps: BN ε (the same for both sites).

    Returns:
        outputs (T, B, H), c_T (B, H), and the per-step batch statistics (mean_h, var_h (T, 4H), mean_c, var_c
        (T, H)), detached. Under autocast, or for half-precision inputs, the recurrence runs in float32 (statistics
        and the carried cell in full precision). float64 runs in float64.
    """
    device_type = x_terms.device.type
    if torch.is_autocast_enabled(device_type) or x_terms.dtype not in (torch.float32, torch.float64):
        with torch.autocast(device_type, enabled=False):
            params32 = (weight_hh.float(), gamma_h.float(), gamma_c.float(), beta_c.float())
            return recurrence(x_terms.float(), h0.float(), c0.float(), *params32, eps)
    if x_terms.dim() != 3 or x_terms.shape[0] == 0:
        raise ValueError(f"x_terms must be (T, B, 4H) with T >= 1, got {tuple(x_terms.shape)}")
    block_config(x_terms.shape[1], h0.shape[1])  # raises for a batch one program cannot hold
    tensors = (x_terms, h0, c0, weight_hh, gamma_h, gamma_c, beta_c)
    x_terms, h0, c0, weight_hh, gamma_h, gamma_c, beta_c = (t.to(x_terms.dtype).contiguous() for t in tensors)
    outputs, c_last, mean_h, invstd_h, mean_c, invstd_c = _TritonRecurrence.apply(
        x_terms, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, eps
    )
    with torch.no_grad():
        var_h = (invstd_h.pow(-2) - eps).clamp_(min=0.0)  # the biased batch variance
        var_c = (invstd_c.pow(-2) - eps).clamp_(min=0.0)
    return outputs, c_last, (mean_h, var_h, mean_c, var_c)


# --- ahead-of-time compilation (no GPU needed): what the kernels cost in registers on a given architecture ---

_POINTERS = {
    "forward_step_kernel": 14,  # wh .. invstd_c
    "backward_step_kernel": 19,  # dh .. dbeta_c
}


def compile_ahead(kernel: str, capability: int, config: BlockConfig, dtype: str = "fp32") -> Any:
    """Compile ``kernel`` (``"forward_step_kernel"`` or ``"backward_step_kernel"``) for CUDA compute capability
    ``capability`` (e.g. 90, 80) with ``config``'s sizes, without a GPU (``triton.compile`` of the kernel's AST:
    ptxas runs, nothing is loaded). Pointer arguments are marked 16-byte aligned, as triton's JIT marks the base
    pointers of freshly allocated buffers. Returns triton's compiled kernel (``.asm["cubin"]``, ``.asm["ptx"]``)."""
    triton = _triton()
    if triton is None:
        raise RuntimeError("compile_ahead needs triton")
    from triton.backends.compiler import GPUTarget

    fn = getattr(_kernels(), kernel)
    pointers = _POINTERS[kernel]
    scalars = {"B": "i32", "H": "i32", "eps": "fp32"}
    signature = {
        name: f"*{dtype}" if k < pointers else scalars.get(name, "constexpr") for k, name in enumerate(fn.arg_names)
    }
    constexprs = {"BLOCK_B": config.block_b, "BLOCK_H": config.block_h}
    attrs = {(k,): [["tt.divisibility", 16]] for k in range(pointers)}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={"num_warps": config.num_warps})


def resource_usage(compiled: Any) -> ResourceUsage:
    """Registers, spill (local memory) bytes and shared memory per thread of an ahead-of-time compiled kernel, read
    from its cubin with ``cuobjdump --dump-resource-usage`` (``n_regs``/``n_spills`` of triton's compiled kernel are
    filled only when the kernel is loaded onto a GPU)."""
    triton = _triton()
    tool = triton.knobs.nvidia.cuobjdump.path if triton is not None else None
    tool = tool or shutil.which("cuobjdump")
    if not tool:
        raise RuntimeError("cuobjdump not found (it comes with triton's NVIDIA backend)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    fields = dict(
        part.split(":", 1) for line in text.splitlines() if "REG:" in line for part in line.split() if ":" in part
    )
    return ResourceUsage(int(fields["REG"]), int(fields["LOCAL"]), int(fields["SHARED"]))
