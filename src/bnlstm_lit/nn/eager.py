"""The eager fused BN-LSTM recurrence: one autograd Function of torch ops with a hand-written backward, for every
device and dtype (CUDA, float64, autocast); and the population-statistics recurrence in plain torch ops.

A leaf implementation of :mod:`bnlstm_lit.nn.dispatch`. Autograd through the reference loop records some forty small
nodes per step and, in backward, runs one small weight-gradient matmul per step. Here the loop runs in chunks of
``CHUNK`` steps whose results are stacked once per chunk and saved as they are (W_h h_{t-1}, the gate activations,
c_t, tanh(BN(c_t)), the per-step statistics), each step's batch norms run as torch's native batch-norm kernels
forward and backward, and the weight gradient of W_h is one large matmul per chunk -- the way the fused cuDNN/oneDNN
LSTM kernels batch their weight-gradient work. The forward step is the equations of :mod:`bnlstm_lit.nn.cell`.

All compute what the reference loop computes, to float rounding (tested: outputs, every gradient, statistics).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnlstm_lit.nn.cell import cell_update, gates, hidden
from bnlstm_lit.nn.matmul import linear

__all__ = ["CHUNK", "population", "recurrence"]

_bn_backward = torch.ops.aten.native_batch_norm_backward.default  # autograd's own kernel for native_batch_norm

#: Steps per chunk: the recurrence runs chunk by chunk, each chunk's results stacked once (small per-step copies cost
#: more than the arithmetic at small shapes).
CHUNK = 8


def _forward_step(
    wh: Tensor, x_t: Tensor, c_prev: Tensor, gamma_h: Tensor, gamma_c: Tensor, beta_c: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step after the recurrent matmul: wh = W_h h_{t-1} (B, 4H), x_t (B, 4H), c_{t-1} (B, H).

    Returns h_t, c_t (B, H), the gate activations σ(i), σ(f), tanh(g), σ(o) (B, 4H), tanh(BN(c_t)) (B, H) and the
    batch means and inverse standard deviations (biased variance) of the recurrent term (4H,) and of the cell (H,).
    """
    bn_h, mean_h, invstd_h = torch.native_batch_norm(wh, gamma_h, None, None, None, True, 0.0, eps)
    i, f, g, o = gates(bn_h + x_t)  # eq. 6
    c = cell_update(i, f, g, c_prev)  # eq. 7
    bn_c, mean_c, invstd_c = torch.native_batch_norm(c, gamma_c, beta_c, None, None, True, 0.0, eps)
    tc = torch.tanh(bn_c)  # kept for the backward
    h = o * tc  # eq. 8, cell.hidden(o, bn_c) with its tanh kept
    return h, c, torch.cat([i, f, g, o], dim=1), tc, mean_h, invstd_h, mean_c, invstd_c


def _backward_step(
    dh: Tensor,
    dc_next: Tensor,
    act: Tensor,
    tc: Tensor,
    wh: Tensor,
    c: Tensor,
    c_prev: Tensor,
    mean_h: Tensor,
    invstd_h: Tensor,
    mean_c: Tensor,
    invstd_c: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of one step, given dL/dh_t (all paths) and dL/dc_t from step t+1.

    act and tc are the step's saved gate activations and tanh(BN(c_t)). Returns d pre_t
    (B, 4H) (= dL/dx_term_t), d(W_h h_{t-1}) (B, 4H), dL/dc_{t-1} through the cell (B, H), and the step's
    contributions to dγ_h (4H,), dγ_c (H,), dβ_c (H,).
    """
    H = c.shape[1]
    i, f, g, o = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    do = dh * tc * o * (1 - o)
    dco = dh * o * (1 - tc * tc)
    # batch-norm backward with batch statistics: the gradient flows through the mean and the variance too
    dc, dgamma_c, dbeta_c = _bn_backward(dco, c, gamma_c, None, None, mean_c, invstd_c, True, eps, [True, True, True])
    dc = dc + dc_next
    di = dc * g * i * (1 - i)
    df = dc * c_prev * f * (1 - f)
    dg = dc * i * (1 - g * g)
    dpre = torch.cat([di, df, dg, do], dim=1)
    dwh, dgamma_h, _ = _bn_backward(dpre, wh, gamma_h, None, None, mean_h, invstd_h, True, eps, [True, True, False])
    return dpre, dwh, dc * f, dgamma_h, dgamma_c, dbeta_c


def _forward_chunk(
    h: Tensor,
    c: Tensor,
    x_terms: Tensor,
    weight_hh: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    eps: float,
) -> tuple[Tensor, ...]:
    """K steps of the recurrence from (h, c) (B, H) over x_terms (K, B, 4H).

    Returns the stacked h_t, c_t (K, B, H), W_h h_{t-1} (K, B, 4H), gate activations (K, B, 4H), tanh(BN(c_t))
    (K, B, H) and the per-step statistics (K, 4H) / (K, H).
    """
    hs, cs, whs, acts, tcs, stats = [], [], [], [], [], []
    for k in range(x_terms.shape[0]):
        wh = linear(h, weight_hh)  # (B, 4H)
        h, c, act, tc, *step_stats = _forward_step(wh, x_terms[k], c, gamma_h, gamma_c, beta_c, eps)
        hs.append(h)
        cs.append(c)
        whs.append(wh)
        acts.append(act)
        tcs.append(tc)
        stats.append(step_stats)
    mean_h, invstd_h, mean_c, invstd_c = (torch.stack(s) for s in zip(*stats, strict=True))
    stacked = (torch.stack(hs), torch.stack(cs), torch.stack(whs), torch.stack(acts), torch.stack(tcs))
    return *stacked, mean_h, invstd_h, mean_c, invstd_c


def _backward_chunk(
    dh_out: Tensor,
    dh_next: Tensor,
    dc_next: Tensor,
    acts: Tensor,
    tcs: Tensor,
    whs: Tensor,
    cs: Tensor,
    c_before: Tensor,
    mean_h: Tensor,
    invstd_h: Tensor,
    mean_c: Tensor,
    invstd_c: Tensor,
    weight_t: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of K steps, last step first; dh_out (K, B, H) is dL/dh_t from the outputs, dh_next / dc_next
    what flows back from the step after the chunk, c_before the cell before the chunk, weight_t = W_h^T (H, 4H).

    Returns d pre (K, B, 4H), d(W_h h_{t-1}) (K, B, 4H), dL/dh and dL/dc before the chunk, and the chunk's dγ_h, dγ_c,
    dβ_c.
    """
    K = acts.shape[0]
    dpres: list[Tensor] = []
    dwhs: list[Tensor] = []
    grads: list[tuple[Tensor, Tensor, Tensor]] = []  # per step: dγ_h, dγ_c, dβ_c
    for k in range(K - 1, -1, -1):
        c_prev = cs[k - 1] if k > 0 else c_before
        dpre, dwh, dc_next, gh, gc, bc = _backward_step(
            dh_out[k] + dh_next, dc_next, acts[k], tcs[k], whs[k], cs[k], c_prev, mean_h[k], invstd_h[k], mean_c[k],
            invstd_c[k], gamma_h, gamma_c, beta_c, eps,
        )  # fmt: skip
        dh_next = linear(dwh, weight_t)  # dwh @ W_h, (B, H)
        dpres.append(dpre)
        dwhs.append(dwh)
        grads.append((gh, gc, bc))
    dgh, dgc, dbc = (torch.stack(g).sum(0) for g in zip(*grads, strict=True))
    return torch.stack(dpres[::-1]), torch.stack(dwhs[::-1]), dh_next, dc_next, dgh, dgc, dbc


class _BNLSTMRecurrence(torch.autograd.Function):
    """Training-mode recurrence of one BN-LSTM layer over a whole sequence (unmasked, batch statistics).

    Inputs: x_terms (T, B, 4H) = BN_t(W_x x_t) + b, computed outside (one matmul and one vectorized normalization for
    all steps); h0, c0 (B, H); weight_hh (4H, H); gamma_h (4H,); gamma_c, beta_c (H,); eps.
    Outputs: h_t for every step (T, B, H), c_T (B, H), and -- not differentiable -- the per-step batch means and
    inverse standard deviations of the recurrent term (T, 4H) and of the cell (T, H).
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
        T = x_terms.shape[0]
        h, c = h0, c0
        hs, cs, whs, acts, tcs, stats = [], [], [], [], [], []
        for start in range(0, T, CHUNK):
            h_k, c_k, wh_k, act_k, tc_k, *stats_k = _forward_chunk(
                h, c, x_terms[start : start + CHUNK], weight_hh, gamma_h, gamma_c, beta_c, eps
            )
            h, c = h_k[-1], c_k[-1]
            hs.append(h_k)
            cs.append(c_k)  # kept per chunk: saved as they are, no copy into one buffer
            whs.append(wh_k)
            acts.append(act_k)
            tcs.append(tc_k)
            stats.append(stats_k)
        h_all = hs[0] if len(hs) == 1 else torch.cat(hs)  # (T, B, H): the output
        mean_h, invstd_h, mean_c, invstd_c = (torch.cat(s) for s in zip(*stats, strict=True))
        ctx.eps = eps
        ctx.chunks = len(cs)
        ctx.save_for_backward(
            h0, c0, weight_hh, gamma_h, gamma_c, beta_c, h_all, mean_h, invstd_h, mean_c, invstd_c, *cs, *whs, *acts,
            *tcs,
        )  # fmt: skip
        ctx.mark_non_differentiable(mean_h, invstd_h, mean_c, invstd_c)
        return h_all, c.clone(), mean_h, invstd_h, mean_c, invstd_c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_h_all: Tensor | None, grad_c_last: Tensor | None, *unused: Any
    ) -> tuple[Tensor | None, ...]:
        refuse_double_backward()
        saved = ctx.saved_tensors
        h0, c0, weight_hh, gamma_h, gamma_c, beta_c, h_all, mean_h, invstd_h, mean_c, invstd_c = saved[:11]
        n = ctx.chunks
        cs, whs, acts, tcs = (saved[11 + k * n : 11 + (k + 1) * n] for k in range(4))
        T, B, H = h_all.shape
        grad_h_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all
        weight_t = weight_hh.t().contiguous()  # (H, 4H): dh = dwh @ W_h
        dh = torch.zeros_like(h0)
        dc = torch.zeros_like(c0) if grad_c_last is None else grad_c_last
        dweight = torch.zeros_like(weight_hh)
        dgamma_h, dgamma_c, dbeta_c = torch.zeros_like(gamma_h), torch.zeros_like(gamma_c), torch.zeros_like(beta_c)
        dpres = []
        for chunk in range(ctx.chunks - 1, -1, -1):
            start = chunk * CHUNK
            stop = start + cs[chunk].shape[0]
            rows = slice(start, stop)
            c_before = cs[chunk - 1][-1] if chunk > 0 else c0
            dpre, dwh, dh, dc, dgh, dgc, dbc = _backward_chunk(
                grad_h_all[rows], dh, dc, acts[chunk], tcs[chunk], whs[chunk], cs[chunk], c_before, mean_h[rows],
                invstd_h[rows], mean_c[rows], invstd_c[rows], weight_t, gamma_h, gamma_c, beta_c, ctx.eps,
            )  # fmt: skip
            dpres.append(dpre)
            dgamma_h += dgh
            dgamma_c += dgc
            dbeta_c += dbc
            # the weight gradient of the chunk's steps as one matmul: sum_t dwh_t^T h_{t-1}
            h_prev = h_all[start - 1 : stop - 1] if start > 0 else torch.cat([h0[None], h_all[: stop - 1]])
            K = stop - start
            dweight += linear(dwh.reshape(K * B, 4 * H).t(), h_prev.reshape(K * B, H).t())  # (4H, H)
        dx_terms = dpres[0] if len(dpres) == 1 else torch.cat(dpres[::-1])
        needs = ctx.needs_input_grad
        return (
            dx_terms if needs[0] else None,
            dh if needs[1] else None,
            dc if needs[2] else None,
            dweight if needs[3] else None,
            dgamma_h if needs[4] else None,
            dgamma_c if needs[5] else None,
            dbeta_c if needs[6] else None,
            None,
        )


def refuse_double_backward() -> None:
    """The hand-written backward is not differentiable itself."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused BN-LSTM recurrence cannot be differentiated twice (create_graph=True: gradient penalties, "
            "Hessian-vector products); use BNLSTM(implementation='reference') for that"
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
    """The training-statistics recurrence of one layer over a whole (unmasked) sequence.

    Args:
        x_terms: (T, B, 4H), BN_t(W_x x_t) + b for every step.
        h0, c0: (B, H).
        weight_hh: (4H, H); gamma_h: (4H,) γ of the recurrent term; gamma_c, beta_c: (H,) γ and β of the cell.
        eps: BN ε (the same for both sites).

    Returns:
        outputs (T, B, H), c_T (B, H), and the per-step batch statistics (mean_h, var_h (T, 4H), mean_c, var_c
        (T, H)), detached. Under autocast, or for half-precision inputs, the recurrence runs in float32 (statistics
        and the carried cell in full precision).
    """
    device_type = x_terms.device.type
    if torch.is_autocast_enabled(device_type) or x_terms.dtype not in (torch.float32, torch.float64):
        with torch.autocast(device_type, enabled=False):
            params32 = (weight_hh.float(), gamma_h.float(), gamma_c.float(), beta_c.float())
            return recurrence(x_terms.float(), h0.float(), c0.float(), *params32, eps)
    outputs, c_last, mean_h, invstd_h, mean_c, invstd_c = _BNLSTMRecurrence.apply(
        x_terms, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, eps
    )
    with torch.no_grad():
        var_h = (invstd_h.pow(-2) - eps).clamp_(min=0.0)  # the biased batch variance
        var_c = (invstd_c.pow(-2) - eps).clamp_(min=0.0)
    return outputs, c_last, (mean_h, var_h, mean_c, var_c)


def population(
    x_terms: Tensor,
    state: tuple[Tensor, Tensor],
    weight_hh: Tensor,
    scale_h: Tensor,
    scale_c: Tensor,
    shift_c: Tensor,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The recurrence with population statistics: BN_t(v) = v * scale_t + shift_t at every site.

    Args:
        x_terms: (T, B, 4H), BN_t(W_x x_t) + b + the recurrent term's shift, with population statistics.
        state: (h_0, c_0), each (B, H).
        weight_hh: (4H, H).
        scale_h: (T, 4H), γ_h / sqrt(var_t + ε) of the recurrent term (its shift is in x_terms).
        scale_c, shift_c: (T, H), the same for the cell (the shift includes β_c).

    Returns outputs (T, B, H) and (h_T, c_T); differentiable (plain torch ops).
    """
    h, c = state
    tensors = (x_terms, h, c, weight_hh, scale_h, scale_c, shift_c)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outputs = []
    for t in range(x_terms.shape[0]):
        wh = torch.mm(h, weight_hh.t()) if grad else linear(h, weight_hh)  # the oneDNN op has no autograd
        i, f, g, o = gates(torch.addcmul(x_terms[t], wh, scale_h[t]))  # eq. 6
        c = cell_update(i, f, g, c)  # eq. 7
        h = hidden(o, torch.addcmul(shift_c[t], c, scale_c[t]))  # eq. 8
        outputs.append(h)
    return torch.stack(outputs), (h, c)
