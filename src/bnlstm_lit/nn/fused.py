"""Fast paths of the BN-LSTM layer; :class:`~bnlstm_lit.nn.BNLSTM` falls back to the readable reference loop elsewhere.

* :func:`fused_recurrence` -- the training-mode time loop of one BN-LSTM layer as one autograd Function with a
  hand-written backward. Autograd through the reference loop records some forty small nodes per step and, in
  backward, runs one small weight-gradient matmul per step. Here the forward saves only what the backward needs (the
  input term, W_h h_{t-1}, c_t and the per-step statistics; the gates are recomputed), each step's work after the
  recurrent matmul is one function forward and one backward (optionally compiled into a few fused kernels with
  ``torch.compile``), and the weight gradient of W_h for all steps is one large matmul after the loop -- the way the
  fused cuDNN/oneDNN LSTM kernels batch their weight-gradient work.
* :func:`plain_lstm` -- the LSTM baseline (``normalize=False``) through torch's own fused LSTM kernel.

Both compute exactly what the reference path computes (tested against it: outputs, every gradient, statistics).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["fused_recurrence", "plain_lstm"]


_bn_backward = torch.ops.aten.native_batch_norm_backward.default  # autograd's own kernel for native_batch_norm


def _gates(pre: Tensor, H: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """σ(i), σ(f), tanh(g), σ(o) of the pre-activations (B, 4H), gate order i, f, g, o."""
    return (
        torch.sigmoid(pre[:, :H]),
        torch.sigmoid(pre[:, H : 2 * H]),
        torch.tanh(pre[:, 2 * H : 3 * H]),
        torch.sigmoid(pre[:, 3 * H :]),
    )


def _forward_step(
    wh: Tensor, x_t: Tensor, c_prev: Tensor, gamma_h: Tensor, gamma_c: Tensor, beta_c: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step after the recurrent matmul: wh = W_h h_{t-1} (B, 4H), x_t (B, 4H), c_{t-1} (B, H).

    Returns h_t, c_t (B, H) and the batch means and inverse standard deviations (biased variance) of the recurrent
    term (4H,) and of the cell (H,).
    """
    bn_h, mean_h, invstd_h = torch.native_batch_norm(wh, gamma_h, None, None, None, True, 0.0, eps)
    i, f, g, o = _gates(bn_h + x_t, c_prev.shape[1])  # eq. 6
    c = f * c_prev + i * g  # eq. 7
    bn_c, mean_c, invstd_c = torch.native_batch_norm(c, gamma_c, beta_c, None, None, True, 0.0, eps)
    h = o * torch.tanh(bn_c)  # eq. 8
    return h, c, mean_h, invstd_h, mean_c, invstd_c


def _backward_step(
    dh: Tensor,
    dc_next: Tensor,
    x_t: Tensor,
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

    The gates and tanh(BN(c_t)) are recomputed from the saved inputs (cheaper than storing them). Returns d pre_t
    (B, 4H) (= dL/dx_term_t), d(W_h h_{t-1}) (B, 4H), dL/dc_{t-1} through the cell (B, H), and the step's
    contributions to dγ_h (4H,), dγ_c (H,), dβ_c (H,).
    """
    H = c.shape[1]
    n_h = (wh - mean_h[None]) * invstd_h[None]
    i, f, g, o = _gates(n_h * gamma_h + x_t, H)
    tc = torch.tanh((c - mean_c[None]) * (invstd_c * gamma_c)[None] + beta_c)
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


_compiled: dict[str, Any] = {}

# oneDNN's matmul, the one torch's fused CPU LSTM uses: on some CPUs (AMD, where MKL's sgemm takes a slow path) about
# twice as fast as torch.mm at these shapes. A private op of x86 builds, so used only where it exists, on float32 CPU.
_onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T for 2-D tensors (strided views allowed)."""
    if _onednn_linear is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
        try:
            return _onednn_linear(x, weight, None, "none", [], "")
        except RuntimeError:  # an op of another build that does not take these inputs: fall back for good
            globals()["_onednn_linear"] = None
    return torch.mm(x, weight.t())


def _steps(compile_steps: bool) -> tuple[Any, Any]:
    """The step functions, eager or compiled with torch.compile (each step's pointwise work and reductions fused)."""
    if not compile_steps:
        return _forward_step, _backward_step
    if not _compiled:
        _compiled["forward"] = torch.compile(_forward_step, dynamic=False, fullgraph=True)
        _compiled["backward"] = torch.compile(_backward_step, dynamic=False, fullgraph=True)
    return _compiled["forward"], _compiled["backward"]


class _BNLSTMRecurrence(torch.autograd.Function):
    """Training-mode recurrence of one BN-LSTM layer over a whole sequence (unmasked, batch statistics).

    Inputs: x_terms (T, B, 4H) = BN_t(W_x x_t) + b, computed outside (one matmul and one vectorized normalization for
    all steps); h0, c0 (B, H); weight_hh (4H, H); gamma_h (4H,); gamma_c, beta_c (H,); eps; compile_steps.
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
        compile_steps: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        T, B, G = x_terms.shape
        H = G // 4
        step, _ = _steps(compile_steps)
        new = x_terms.new_empty
        wh_all = new(T, B, G)  # W_h h_{t-1}, the recurrent BN's input (the gates are recomputed from it in backward)
        c_all = new(T, B, H)  # c_t (un-normalized, carried)
        h_all = new(T, B, H)  # outputs
        stats: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        h, c = h0, c0
        for t in range(T):
            wh = wh_all[t].copy_(_linear(h, weight_hh))  # (B, 4H)
            h_new, c_new, *step_stats = step(wh, x_terms[t], c, gamma_h, gamma_c, beta_c, eps)
            h = h_all[t].copy_(h_new)
            c = c_all[t].copy_(c_new)
            stats.append(tuple(step_stats))  # type: ignore[arg-type]
        mean_h, invstd_h, mean_c, invstd_c = (torch.stack(s) for s in zip(*stats, strict=True))
        ctx.eps = eps
        ctx.compile_steps = compile_steps
        ctx.consumed = False
        ctx.save_for_backward(
            x_terms, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, wh_all, c_all, h_all, mean_h, invstd_h, mean_c,
            invstd_c,
        )  # fmt: skip
        ctx.mark_non_differentiable(mean_h, invstd_h, mean_c, invstd_c)
        return h_all, c_all[-1].clone(), mean_h, invstd_h, mean_c, invstd_c

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_h_all: Tensor | None, grad_c_last: Tensor | None, *unused: Any
    ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused BN-LSTM recurrence cannot be differentiated twice (create_graph=True: gradient penalties, "
                "Hessian-vector products); use BNLSTM(fused=False) for that"
            )
        if ctx.consumed:
            raise RuntimeError(
                "the fused BN-LSTM recurrence reuses its saved buffers in backward, so its graph can be backpropagated "
                "through only once (retain_graph=True is not supported); use BNLSTM(fused=False) for that"
            )
        ctx.consumed = True
        (x_terms, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, wh_all, c_all, h_all, mean_h, invstd_h, mean_c,
         invstd_c) = ctx.saved_tensors  # fmt: skip
        _, step = _steps(ctx.compile_steps)
        eps = ctx.eps
        T, B, G = wh_all.shape
        H = G // 4
        grad_h_all = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all
        dpre_all = torch.empty_like(x_terms)  # gradient of x_terms, (T, B, 4H)
        dwh_all = wh_all  # overwritten step by step with d(W_h h_{t-1}) (wh_t is read just before)
        dgamma_h = torch.zeros_like(gamma_h)
        dgamma_c = torch.zeros_like(gamma_c)
        dbeta_c = torch.zeros_like(beta_c)
        dh_next = torch.zeros_like(h0)
        dc_next = torch.zeros_like(c0) if grad_c_last is None else grad_c_last
        weight_t = weight_hh.t().contiguous()  # (H, 4H): dh = dwh @ W_h
        for t in range(T - 1, -1, -1):
            c_prev = c_all[t - 1] if t > 0 else c0
            dpre, dwh, dc_next, dgh, dgc, dbc = step(
                grad_h_all[t] + dh_next, dc_next, x_terms[t], wh_all[t], c_all[t], c_prev, mean_h[t], invstd_h[t],
                mean_c[t], invstd_c[t], gamma_h, gamma_c, beta_c, eps,
            )  # fmt: skip
            dpre_all[t].copy_(dpre)
            dwh_all[t].copy_(dwh)
            dgamma_h += dgh
            dgamma_c += dgc
            dbeta_c += dbc
            dh_next = _linear(dwh, weight_t)  # (B, H)
        # the weight gradient of all steps as one matmul: sum_t dwh_t^T h_{t-1}
        h_prev = torch.cat([h0[None], h_all[:-1]])  # (T, B, H)
        dweight = _linear(dwh_all.reshape(T * B, G).t(), h_prev.reshape(T * B, H).t())  # (4H, H)
        needs = ctx.needs_input_grad
        return (
            dpre_all if needs[0] else None,
            dh_next if needs[1] else None,
            dc_next if needs[2] else None,
            dweight if needs[3] else None,
            dgamma_h if needs[4] else None,
            dgamma_c if needs[5] else None,
            dbeta_c if needs[6] else None,
            None,
            None,
        )


def fused_recurrence(
    x_terms: Tensor,
    state: tuple[Tensor, Tensor],
    weight_hh: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    eps: float,
    compile_steps: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Training-mode BN-LSTM recurrence over a whole (unmasked) sequence.

    Args:
        x_terms: (T, B, 4H), BN_t(W_x x_t) + b for every step.
        state: (h_0, c_0), each (B, H).
        weight_hh: (4H, H); gamma_h: (4H,) γ of the recurrent term; gamma_c, beta_c: (H,) γ and β of the cell.
        eps: BN ε (the same for both sites).
        compile_steps: run each step's pointwise work and reductions as kernels generated by ``torch.compile`` (one
            forward and one backward function, compiled once per shape; about 4x less time per step on CPU, after a
            compilation of some seconds on first use). False runs the same functions eagerly.

    Returns:
        outputs (T, B, H), (h_T, c_T), and the per-step batch statistics (mean_h, var_h (T, 4H), mean_c, var_c
        (T, H)), detached, for the running averages. Under autocast the recurrence runs in float32 (statistics and
        the carried cell in full precision).
    """
    h0, c0 = state
    device_type = x_terms.device.type
    if torch.is_autocast_enabled(device_type) or x_terms.dtype not in (torch.float32, torch.float64):
        with torch.autocast(device_type, enabled=False):
            state32 = (h0.float(), c0.float())
            params32 = (weight_hh.float(), gamma_h.float(), gamma_c.float(), beta_c.float())
            return fused_recurrence(x_terms.float(), state32, *params32, eps, compile_steps)
    outputs, c_last, mean_h, invstd_h, mean_c, invstd_c = _BNLSTMRecurrence.apply(
        x_terms, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, eps, compile_steps
    )
    with torch.no_grad():
        var_h = (invstd_h.pow(-2) - eps).clamp_(min=0.0)  # the biased batch variance
        var_c = (invstd_c.pow(-2) - eps).clamp_(min=0.0)
    return outputs, (outputs[-1], c_last), (mean_h, var_h, mean_c, var_c)


def plain_lstm(
    x: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor, weight_hh: Tensor, bias: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One plain LSTM layer (gate order i, f, g, o; one bias) through torch's fused kernel.

    x (T, B, I), state (h_0, c_0) each (B, H) -> outputs (T, B, H), (h_T, c_T).
    """
    h0, c0 = state
    params = [weight_ih, weight_hh, bias, torch.zeros_like(bias)]  # torch's LSTM has two biases; ours is b_ih + 0
    outputs, h_n, c_n = torch.lstm(x, (h0[None], c0[None]), params, True, 1, 0.0, torch.is_grad_enabled(), False, False)
    return outputs, (h_n[0], c_n[0])
