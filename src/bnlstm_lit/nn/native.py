"""The BN-LSTM recurrence through the native kernel, as torch custom ops (float32 CPU).

A leaf implementation of :mod:`bnlstm_lit.nn.dispatch`: it never calls back into the layer or another path. Loading
the C library is :mod:`bnlstm_lit.nn.native_build`'s business.

On CPU at small shapes the eager fused path (:mod:`bnlstm_lit.nn.eager`) spends most of a step dispatching ~14 small
torch ops forward and ~25 backward. Here a step is the recurrent matmul in torch (oneDNN, the weight reordered once
per sequence into its blocked layout: :func:`~bnlstm_lit.nn.matmul.step_matmul`) and *one* call into the kernel,
forward and backward, writing directly into rows of preallocated buffers. The whole recurrence of one layer is one
call of a custom op (``bnlstm_lit::recurrence`` forward, ``bnlstm_lit::recurrence_backward`` its gradient,
``bnlstm_lit::population`` evaluation with population statistics), registered with ``torch.library`` together with
fake (meta) implementations and the autograd formula, so ``torch.compile`` traces a training step through it
without a graph break and ``torch.library.opcheck`` checks it.

* :func:`recurrence` -- training statistics (batch mean and biased variance of each step), optionally with the input
  term's per-step batch norm inside the steps (``gamma_x``, ``bias``) and W_x x_t computed one chunk of ``CHUNK``
  steps at a time (``weight_ih``): then neither the (T, B, 4H) input term nor its gradient ever exists. Without
  gradients (the population-statistics estimation pass, evaluation with batch statistics) nothing is saved.
* :func:`population` -- evaluation with population statistics (each BN site a per-step scale and shift), no gradient.

Saved results for the backward (W_h h_{t-1}, the gate activations, c_t, tanh(BN(c_t)), W_x x_t where not
recomputed) live in buffers of ``CHUNK`` steps, not (T, B, ·) tensors: buffers of a few MiB are recycled by the
allocator from one training step to the next, whereas fresh (T, B, 4H) buffers are new pages from the OS every time
(measured here: filling a fresh 125 MB tensor took 28 ms against 1.7 ms for a reused one).

Each step's columns (a cell and its four gate columns) are independent, so a step of at least ``PARALLEL_MIN``
elements splits into blocks of columns run on torch's intra-op threads; the results do not depend on the number of
threads (no sum crosses blocks; tested bit for bit). Numerics: batch sums in double, in row order (deterministic, as
torch's CPU batch norm); exp, sigmoid and tanh through branch-free float approximations accurate to about one unit in
the last place (no -ffast-math); the results agree with the eager path and the reference loop to float rounding.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bnlstm_lit.nn import native_build
from bnlstm_lit.nn.matmul import linear, step_matmul
from bnlstm_lit.nn.native_build import _BackwardArgs, _ForwardArgs, _PopulationArgs

__all__ = ["CHUNK", "population", "recurrence", "usable"]

#: Steps per buffer of saved results.
CHUNK = 8
#: Steps with fewer elements (B * 4H) run on one thread: below this, waking threads costs more than it saves.
PARALLEL_MIN = 32768
#: With the input projection inside the recurrence (``weight_ih`` given), W_x x_t is recomputed in the backward
#: instead of saved when I <= RECOMPUTE_MAX_RATIO * H: one (K B, I) x (I, 4H) matmul per chunk, cheap next to the
#: chunk's K recurrent (B, H) x (H, 4H) matmuls, for 4H floats per row and step less memory held for the backward.
#: Measured (2 cores): memory saved for backward 0.90x -> 0.66x nn.LSTM's at the sequential-MNIST shape, 0.95x ->
#: 0.71x at PTB, and a training step no slower.
RECOMPUTE_MAX_RATIO = 0.25


def usable(*tensors: Tensor) -> bool:
    """The kernel applies: float32 CPU tensors, and the library is available (built on first call)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return native_build.available()


def _threads(elements: int) -> int:
    """Threads for a step of that many elements: torch's intra-op threads, or one for small steps."""
    return torch.get_num_threads() if elements >= PARALLEL_MIN else 1


def _library() -> Any:
    lib = native_build.library()
    if lib is None:
        raise RuntimeError("bnlstm_lit: the native kernel is not available (see bnlstm_lit.nn.native_build)")
    return lib


def _recomputes(x_in: Tensor, weight_hh: Tensor, weight_ih: Tensor | None) -> bool:
    """W_x x_t is recomputed in the backward instead of saved (see ``RECOMPUTE_MAX_RATIO``)."""
    return weight_ih is not None and x_in.shape[-1] <= RECOMPUTE_MAX_RATIO * (weight_hh.shape[0] // 4)


def _chunks(T: int) -> list[int]:
    return [min(CHUNK, T - start) for start in range(0, T, CHUNK)]


def _project(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, weight_ih: Tensor, start: int, steps: int) -> Tensor:
    """W_x x_t for the steps start ... start + steps - 1 of x (T, B, I): one matmul, (steps * B, 4H)."""
    return fn(x[start : start + steps].reshape(steps * x.shape[1], -1), weight_ih)


def _run_steps(
    args: ctypes.Structure, per_step: dict[str, Tensor], start: int, steps: int, step: Any, matmul: Any, h: Tensor,
    h_all: Tensor,
) -> Tensor:  # fmt: skip
    """One chunk of a forward recurrence: point ``args`` at row ``start`` of every per-step buffer, then for each of
    its steps the recurrent matmul W_h h_{t-1} (torch) and one kernel call ``step`` (which writes h_t into h_all).
    Returns the chunk's last h."""
    for name, buf in per_step.items():
        setattr(args, name, buf[start].data_ptr())
    ref = ctypes.addressof(args)
    for k in range(steps):
        wh = matmul(h).contiguous()  # W_h h_{t-1} (B, 4H), alive during the call
        step(ref, k, wh.data_ptr())
        h = h_all[start + k]
    return h


# ---------------------------------------------------------------------------------------------------------------------
# training statistics: forward


@torch.library.custom_op("bnlstm_lit::recurrence", mutates_args=())
def _recurrence_op(
    x_in: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    gamma_x: Tensor | None,
    bias: Tensor | None,
    weight_ih: Tensor | None,
    eps: float,
    eps_x: float,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """The recurrence with batch statistics. ``x_in``: the input term (T, B, 4H); with ``gamma_x`` and ``bias``, W_x
    x_t (T, B, 4H), normalized per step inside; with ``weight_ih`` too, the layer's input x (T, B, I).

    Returns h_t of every step (T, B, H), c_T (B, H), the per-step means and inverse standard deviations of the
    recurrent term (T, 4H), (T, 4H), of the cell (T, H), (T, H), of the input term (T, 4H) each (empty without
    ``gamma_x``), and with ``save`` the per-chunk buffers the backward reads: c, W_h h, the gate activations,
    tanh(BN(c)) (one tensor per chunk each) and W_x x_t where saved (not recomputed)."""
    lib = _library()
    T, B, _ = x_in.shape
    G = weight_hh.shape[0]
    H = G // 4
    input_bn = gamma_x is not None
    project = weight_ih is not None  # x_in is the layer's input x (T, B, I): W_x x_t computed chunk by chunk
    recompute = _recomputes(x_in, weight_hh, weight_ih)
    x_in, c0 = x_in.contiguous(), c0.contiguous()
    gamma_h, gamma_c, beta_c = gamma_h.contiguous(), gamma_c.contiguous(), beta_c.contiguous()
    new = x_in.new_empty
    h_all = new(T, B, H)  # the output
    mean_h, invstd_h, mean_c, invstd_c = new(T, G), new(T, G), new(T, H), new(T, H)
    mean_x, invstd_x = (new(T, G), new(T, G)) if input_bn else (new(0), new(0))
    work, fwork = x_in.new_empty(2 * G, dtype=torch.float64), new(5 * G)
    # without a backward, act and tc are one step's scratch and wh is not written
    act, tc = (None, None) if save else (new(1, B, G), new(1, B, H))
    args = _ForwardArgs(B, H, _threads(B * G), int(save), int(input_bn), float(eps), float(eps_x))
    fixed = {"gamma_h": gamma_h, "gamma_c": gamma_c, "beta_c": beta_c, "work": work, "fwork": fwork}
    if input_bn:
        assert gamma_x is not None and bias is not None
        gamma_x, bias = gamma_x.contiguous(), bias.contiguous()
        fixed.update(gamma_x=gamma_x, bias=bias)
    for name, t in fixed.items():
        setattr(args, name, t.data_ptr())
    per_step = {"h": h_all, "mean_h": mean_h, "invstd_h": invstd_h, "mean_c": mean_c, "invstd_c": invstd_c}
    if input_bn:
        per_step.update(mean_x=mean_x, invstd_x=invstd_x)
    if not project:
        per_step["x"] = x_in
    step, matmul = lib.bnlstm_forward_step, step_matmul(weight_hh, B, T)
    cs, whs, acts, tcs, wxs = [], [], [], [], []
    h, c_before = h0.contiguous(), c0
    for start in range(0, T, CHUNK):
        K = min(CHUNK, T - start)
        if project:  # the chunk's W_x x_t (K, B, 4H): one matmul, a buffer the allocator recycles
            assert weight_ih is not None
            wx_k = _project(linear, x_in, weight_ih, start, K).view(K, B, G)
            args.x = wx_k.data_ptr()
            if save and not recompute:
                wxs.append(wx_k)
        c_k = new(K, B, H)
        cs.append(c_k)
        args.c, args.c_before = c_k.data_ptr(), c_before.data_ptr()
        if save:
            wh_k, act, tc = new(K, B, G), new(K, B, G), new(K, B, H)
            whs.append(wh_k)
            acts.append(act)
            tcs.append(tc)
            args.wh = wh_k.data_ptr()
        assert act is not None and tc is not None
        args.act, args.tc = act.data_ptr(), tc.data_ptr()
        h = _run_steps(args, per_step, start, K, step, matmul, h, h_all)
        c_before = c_k[-1]
    saved = [*cs, *whs, *acts, *tcs, *wxs] if save else []
    return h_all, c_before.clone(), mean_h, invstd_h, mean_c, invstd_c, mean_x, invstd_x, saved


@_recurrence_op.register_fake
def _(x_in, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, gamma_x, bias, weight_ih, eps, eps_x, save):  # type: ignore[no-untyped-def]
    T, B, _ = x_in.shape
    G = weight_hh.shape[0]
    H = G // 4
    new = x_in.new_empty
    stats_x = (new(T, G), new(T, G)) if gamma_x is not None else (new(0), new(0))
    saved: list[Tensor] = []
    if save:
        sizes = _chunks(T)
        saved = [new(K, B, H) for K in sizes] + [new(K, B, G) for K in sizes] + [new(K, B, G) for K in sizes]
        saved += [new(K, B, H) for K in sizes]
        if weight_ih is not None and not _recomputes(x_in, weight_hh, weight_ih):
            saved += [new(K, B, G) for K in sizes]
    h_all = new(T, B, H)
    return h_all, new(B, H), new(T, G), new(T, G), new(T, H), new(T, H), *stats_x, saved


# ---------------------------------------------------------------------------------------------------------------------
# training statistics: backward


@torch.library.custom_op("bnlstm_lit::recurrence_backward", mutates_args=())
def _recurrence_backward_op(
    grad_h_all: Tensor,
    grad_c_last: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    h_all: Tensor,
    mean_h: Tensor,
    invstd_h: Tensor,
    mean_c: Tensor,
    invstd_c: Tensor,
    x_in: Tensor,
    mean_x: Tensor,
    invstd_x: Tensor,
    gamma_x: Tensor | None,
    weight_ih: Tensor | None,
    saved: list[Tensor],
    eps: float,
    need_x: bool,
    need_weight_hh: bool,
    need_weight_ih: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`_recurrence_op`: of x_in, h0, c0, weight_hh, γ_h, γ_c, β_c, γ_x, bias, weight_ih
    (empty tensors for those not asked for: ``need_*``, and γ_x / bias / weight_ih where not inputs)."""
    lib = _library()
    T, B, H = h_all.shape
    G = 4 * H
    n = len(_chunks(T))
    cs, whs, acts, tcs = (saved[j * n : (j + 1) * n] for j in range(4))
    wxs = saved[4 * n :]  # W_x x_t per chunk, where saved (not recomputed)
    input_bn = gamma_x is not None
    project = weight_ih is not None
    # the op's inputs as the forward saw them after its own .contiguous() (the saved ones are the callers' tensors,
    # e.g. the learned initial state expanded over the batch)
    x_in, h0, c0 = x_in.contiguous(), h0.contiguous(), c0.contiguous()
    gamma_h, gamma_c = gamma_h.contiguous(), gamma_c.contiguous()
    if gamma_x is not None:
        gamma_x = gamma_x.contiguous()
    new = h_all.new_empty
    dh_out = grad_h_all.contiguous()
    dc = grad_c_last.contiguous().clone()  # updated in place
    # the gradient of x_in: with project, of x (T, B, I) and of W_x, from each chunk's d(W_x x_t) (a chunk buffer);
    # else of x_in itself (T, B, 4H)
    dpre = None if project else new(T, B, G)
    dgamma_h, dgamma_x, dbias = (h_all.new_zeros(G, dtype=torch.float64) for _ in range(3))
    dgamma_c, dbeta_c = h_all.new_zeros(H, dtype=torch.float64), h_all.new_zeros(H, dtype=torch.float64)
    work, fwork, scratch = h_all.new_empty(4 * G, dtype=torch.float64), new(6 * G), new(B, H)
    args = _BackwardArgs(B, H, _threads(B * G), int(input_bn), float(eps))
    fixed = {"gamma_h": gamma_h, "gamma_c": gamma_c, "dc": dc, "dgamma_h": dgamma_h, "dgamma_c": dgamma_c}
    fixed.update(dbeta_c=dbeta_c, work=work, fwork=fwork, scratch=scratch)
    per_step = {"dh_out": dh_out, "mean_h": mean_h, "invstd_h": invstd_h, "mean_c": mean_c, "invstd_c": invstd_c}
    dx = dweight_ih = weight_ih_t = None
    if input_bn:
        assert gamma_x is not None
        fixed.update(gamma_x=gamma_x, dgamma_x=dgamma_x, dbias=dbias)
        per_step.update(mean_x=mean_x, invstd_x=invstd_x)
    if project:
        assert weight_ih is not None
        dx = new(x_in.shape) if need_x else None
        dweight_ih = torch.zeros_like(weight_ih) if need_weight_ih else None
        weight_ih_t = weight_ih.t().contiguous() if need_x else None
    else:
        assert dpre is not None
        per_step.update(dpre=dpre)
        if input_bn:
            per_step.update(x=x_in)
    for name, t in fixed.items():
        setattr(args, name, t.data_ptr())
    step, ref = lib.bnlstm_backward_step, ctypes.addressof(args)
    matmul = step_matmul(weight_hh.t().contiguous(), B, T)  # dh = dwh @ W_h
    dweight = torch.zeros_like(weight_hh) if need_weight_hh else None
    dh = torch.zeros_like(c0)
    for chunk in range(n - 1, -1, -1):
        start = chunk * CHUNK
        K = cs[chunk].shape[0]
        dwh = new(K, B, G)
        args.c, args.wh, args.act, args.tc = (t.data_ptr() for t in (cs[chunk], whs[chunk], acts[chunk], tcs[chunk]))
        args.c_before = (cs[chunk - 1][-1] if chunk > 0 else c0).data_ptr()
        args.dwh = dwh.data_ptr()
        if project:
            assert weight_ih is not None
            dwx = new(K, B, G)  # d(W_x x_t) of the chunk's steps
            # the forward's matmul again (same op and operands), where not saved
            wx_k = wxs[chunk] if wxs else _project(linear, x_in, weight_ih, start, K)
            args.x, args.dpre = wx_k.data_ptr(), dwx.data_ptr()
        for name, buf in per_step.items():
            setattr(args, name, buf[start].data_ptr())
        for k in range(K - 1, -1, -1):
            step(ref, k, dh.data_ptr())
            dh = matmul(dwh[k]).contiguous()  # dL/dh_{t-1} through step t
        if project:  # the chunk's part of the gradients of x and W_x
            dwx_2d = dwx.view(K * B, G)
            if dx is not None:
                assert weight_ih_t is not None
                dx[start : start + K].view(K * B, -1).copy_(linear(dwx_2d, weight_ih_t))
            if dweight_ih is not None:
                dweight_ih.addmm_(dwx_2d.t(), x_in[start : start + K].reshape(K * B, -1))
        if dweight is not None:  # the chunk's sum_t dwh_t^T h_{t-1} as one matmul (two for the first chunk)
            if start == 0:
                dweight += linear(dwh[0].t(), h0.t())
                if K > 1:
                    dweight += linear(dwh[1:].reshape((K - 1) * B, G).t(), h_all[: K - 1].reshape(-1, H).t())
            else:
                h_prev = h_all[start - 1 : start + K - 1].reshape(K * B, H)
                dweight += linear(dwh.reshape(K * B, G).t(), h_prev.t())
    d_in = (dx if project else dpre) if need_x else None
    return (
        new(0) if d_in is None else d_in,
        dh,
        dc,
        new(0) if dweight is None else dweight,
        dgamma_h.float(),
        dgamma_c.float(),
        dbeta_c.float(),
        dgamma_x.float() if input_bn else new(0),
        dbias.float() if input_bn else new(0),
        new(0) if dweight_ih is None else dweight_ih,
    )


@_recurrence_backward_op.register_fake
def _(  # type: ignore[no-untyped-def]
    grad_h_all, grad_c_last, h0, c0, weight_hh, gamma_h, gamma_c, h_all, mean_h, invstd_h, mean_c, invstd_c, x_in,
    mean_x, invstd_x, gamma_x, weight_ih, saved, eps, need_x, need_weight_hh, need_weight_ih,
):  # fmt: skip
    T, B, H = h_all.shape
    G = 4 * H
    new = h_all.new_empty
    input_bn = gamma_x is not None
    d_in = new(x_in.shape) if weight_ih is not None else new(T, B, G)
    return (
        d_in if need_x else new(0),
        new(B, H),
        new(B, H),
        new(G, H) if need_weight_hh else new(0),
        new(G),
        new(H),
        new(H),
        new(G) if input_bn else new(0),
        new(G) if input_bn else new(0),
        new(weight_ih.shape) if weight_ih is not None and need_weight_ih else new(0),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    x_in, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, gamma_x, bias, weight_ih, eps, eps_x, save = inputs
    h_all, _, mean_h, invstd_h, mean_c, invstd_c, mean_x, invstd_x, saved = output
    ctx.eps = eps
    ctx.input_bn = gamma_x is not None
    ctx.project = weight_ih is not None
    optional = [t for t in (gamma_x, weight_ih) if t is not None]
    ctx.save_for_backward(
        x_in, h0, c0, weight_hh, gamma_h, gamma_c, h_all, mean_h, invstd_h, mean_c, invstd_c, mean_x, invstd_x,
        *optional, *saved,
    )  # fmt: skip
    ctx.mark_non_differentiable(mean_h, invstd_h, mean_c, invstd_c, mean_x, invstd_x)
    # the statistics and the saved buffers get no gradient: without this autograd would fill a zero tensor for each
    # of them (every saved buffer: some hundred MB per training step at the paper's shapes) before the backward
    ctx.set_materialize_grads(False)


def refuse_double_backward() -> None:
    """The hand-written backwards are not differentiable themselves."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused BN-LSTM recurrence cannot be differentiated twice (create_graph=True: gradient penalties, "
            "Hessian-vector products); use BNLSTM(implementation='reference') for that"
        )


def _backward(ctx: Any, grad_h_all: Tensor | None, grad_c_last: Tensor | None, *unused: Any) -> tuple[Any, ...]:
    refuse_double_backward()
    saved_tensors = ctx.saved_tensors
    x_in, h0, c0, weight_hh, gamma_h, gamma_c, h_all, mean_h, invstd_h, mean_c, invstd_c, mean_x, invstd_x = (
        saved_tensors[:13]
    )
    rest = list(saved_tensors[13:])
    gamma_x = rest.pop(0) if ctx.input_bn else None
    weight_ih = rest.pop(0) if ctx.project else None
    needs = ctx.needs_input_grad
    grad_h_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all
    grad_c_last = torch.zeros_like(h_all[0]) if grad_c_last is None else grad_c_last
    grads = _recurrence_backward_op(
        grad_h_all, grad_c_last, h0, c0, weight_hh, gamma_h, gamma_c, h_all, mean_h, invstd_h, mean_c, invstd_c,
        x_in, mean_x, invstd_x, gamma_x, weight_ih, rest, ctx.eps, needs[0], needs[3], needs[9],
    )  # fmt: skip
    dx, dh0, dc0, dweight_hh, dgamma_h, dgamma_c, dbeta_c, dgamma_x, dbias, dweight_ih = grads
    return (
        dx if needs[0] else None,
        dh0 if needs[1] else None,
        dc0 if needs[2] else None,
        dweight_hh if needs[3] else None,
        dgamma_h if needs[4] else None,
        dgamma_c if needs[5] else None,
        dbeta_c if needs[6] else None,
        dgamma_x if needs[7] else None,
        dbias if needs[8] else None,
        dweight_ih if needs[9] else None,
        None,
        None,
        None,
    )


_recurrence_op.register_autograd(_backward, setup_context=_setup_context)


def recurrence(
    x_in: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    eps: float,
    gamma_x: Tensor | None = None,
    bias: Tensor | None = None,
    eps_x: float = 0.0,
    weight_ih: Tensor | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """The training-statistics recurrence of one layer (float32 CPU; check :func:`usable` first).

    Args:
        x_in: the input term BN_t(W_x x_t) + b (T, B, 4H); with ``gamma_x`` and ``bias``, W_x x_t (T, B, 4H), whose
            per-step BN (γ_x, ε_x) plus b the kernel computes; with ``weight_ih`` W_x (4H, I) too, the layer's input
            x (T, B, I) (W_x x_t computed chunk by chunk, forward and backward).
        h0, c0: (B, H). weight_hh: (4H, H). gamma_h: (4H,). gamma_c, beta_c: (H,). eps: ε of the recurrent term and
            the cell.

    Returns:
        h_t of every step (T, B, H), c_T (B, H), and the per-step batch means and biased variances (detached):
        (mean_h, var_h) (T, 4H), (mean_c, var_c) (T, H), and with ``gamma_x`` (mean_x, var_x) (T, 4H).
    """
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x_in, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, gamma_x, bias, weight_ih)
    )
    out = _recurrence_op(x_in, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, gamma_x, bias, weight_ih, eps, eps_x, save)
    h_all, c_last, mean_h, invstd_h, mean_c, invstd_c, mean_x, invstd_x, _ = out
    with torch.no_grad():
        stats = [mean_h, _variance(invstd_h, eps), mean_c, _variance(invstd_c, eps)]
        if gamma_x is not None:
            stats += [mean_x, _variance(invstd_x, eps_x)]
    return h_all, c_last, tuple(stats)


def _variance(invstd: Tensor, eps: float) -> Tensor:
    """The biased batch variance from the inverse standard deviation 1 / sqrt(var + ε)."""
    return (invstd.pow(-2) - eps).clamp_(min=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# population statistics


@torch.library.custom_op("bnlstm_lit::population", mutates_args=())
def _population_op(
    x_in: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    scale_x: Tensor,
    shift_x: Tensor,
    scale_h: Tensor,
    scale_c: Tensor,
    shift_c: Tensor,
    weight_ih: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Evaluation with population statistics: step t's input term is shift_x[t] + wx_t * scale_x[t] (wx = W_x x_t,
    the shift including b and the recurrent term's shift), the recurrent term W_h h * scale_h[t], the cell
    c * scale_c[t] + shift_c[t]. ``x_in``: W_x x (T, B, 4H), or with ``weight_ih`` the layer's input x (T, B, I).
    Returns h_t of every step (T, B, H) and c_T (B, H)."""
    lib = _library()
    T, B, _ = x_in.shape
    G = weight_hh.shape[0]
    H = G // 4
    project = weight_ih is not None
    x_in, scale_x, shift_x, scale_h, scale_c, shift_c = (
        t.contiguous() for t in (x_in, scale_x, shift_x, scale_h, scale_c, shift_c)
    )
    h_all = x_in.new_empty(T, B, H)
    c = c0.contiguous().clone()  # carried in place
    args = _PopulationArgs(B, H, _threads(B * G))
    args.c = c.data_ptr()
    per_step = {"scale_x": scale_x, "shift_x": shift_x, "scale_h": scale_h, "scale_c": scale_c, "shift_c": shift_c}
    per_step["h"] = h_all
    if not project:
        per_step["x"] = x_in
    step, matmul = lib.bnlstm_population_step, step_matmul(weight_hh, B, T)
    h = h0.contiguous()
    for start in range(0, T, CHUNK):
        K = min(CHUNK, T - start)
        if project:
            assert weight_ih is not None
            wx_k = _project(linear, x_in, weight_ih, start, K)  # alive during the chunk
            args.x = wx_k.data_ptr()
        h = _run_steps(args, per_step, start, K, step, matmul, h, h_all)
    return h_all, c


@_population_op.register_fake
def _(x_in, h0, c0, weight_hh, scale_x, shift_x, scale_h, scale_c, shift_c, weight_ih):  # type: ignore[no-untyped-def]
    T, B, _ = x_in.shape
    H = weight_hh.shape[0] // 4
    return x_in.new_empty(T, B, H), x_in.new_empty(B, H)


def population(
    x_in: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    scale_x: Tensor,
    shift_x: Tensor,
    scale_h: Tensor,
    scale_c: Tensor,
    shift_c: Tensor,
    weight_ih: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The recurrence with population statistics, without gradients (float32 CPU; check :func:`usable`): see
    :func:`_population_op` for the arguments (scales and shifts (T, 4H) / (T, H)). Returns outputs (T, B, H) and
    (h_T, c_T)."""
    h_all, c = _population_op(x_in, h0, c0, weight_hh, scale_x, shift_x, scale_h, scale_c, shift_c, weight_ih)
    return h_all, (h_all[-1], c)
