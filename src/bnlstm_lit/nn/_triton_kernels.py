"""The Triton kernels of one BN-LSTM training step, forward and backward. Imports triton: load it only through
:mod:`bnlstm_lit.nn.triton_steps` (which imports this module lazily, so that the package imports without triton).

**Layout and launch grid.** Both kernels run on a 1-D grid of ``cdiv(H, BLOCK_H)`` programs. Program ``p`` owns the
hidden units ``j`` in ``[p * BLOCK_H, (p + 1) * BLOCK_H)`` -- the four gate columns ``j, H + j, 2H + j, 3H + j`` of the
(B, 4H) tensors and column ``j`` of the (B, H) tensors -- over *all* B rows, held as (BLOCK_B, BLOCK_H) tiles with
``BLOCK_B`` a power of two >= B (rows >= B and columns >= H masked). Batch normalization's statistics are per column
over the batch, and each of a step's columns depends only on the same unit's columns, so one program holds every value
its statistics and their gradients need: no reduction crosses programs, no atomics, no second pass, and the per-step
sums are deterministic. The price is that B is bounded by what fits in one program's registers
(:data:`bnlstm_lit.nn.triton_steps.MAX_BATCH`).

**Tensors.** Every tensor argument is contiguous with the shapes named below; the caller passes row ``t`` of its
preallocated (T, ...) buffers as views (a view's storage offset is part of its pointer). The kernels are generic in
the floating dtype of their arguments (float32 in use; float64 for tests): statistics and arithmetic run in the dtype
of the loaded values, with no narrowing.

**Functions.** sigmoid and tanh are written with ``exp`` of a non-positive argument (no overflow; the same code runs
under the Triton interpreter, whose libdevice ``tanh`` fails): absolute error of a few float32 ulps of 1.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["backward_step_kernel", "forward_step_kernel"]


@triton.jit
def _sigmoid(x):
    z = tl.exp(-tl.abs(x))  # in (0, 1]
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _tanh(x):
    z = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]
    t = (1.0 - z) / (1.0 + z)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _bn_h_forward(wh_ptr, x_ptr, gamma_ptr, mean_ptr, invstd_ptr, off, cols, col_ok, mask, B, eps):
    """One gate's pre-activation gamma_h * BN(wh) + x over one column block; stores the block's batch mean and
    1/sqrt(biased variance + eps)."""
    wh = tl.load(wh_ptr + off, mask=mask, other=0.0)
    mean = tl.sum(wh, axis=0) / B
    centred = tl.where(mask, wh - mean[None, :], 0.0)
    var = tl.sum(centred * centred, axis=0) / B  # biased, two-pass (the column is in registers)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(invstd_ptr + cols, invstd, mask=col_ok)
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0)
    x = tl.load(x_ptr + off, mask=mask, other=0.0)
    return centred * (gamma * invstd)[None, :] + x


@triton.jit
def _bn_h_backward(dpre, wh_ptr, gamma_ptr, mean_ptr, invstd_ptr, dwh_ptr, dgamma_ptr, off, cols, col_ok, mask, B):
    """Batch-norm backward with batch statistics for one gate's column block (beta-less site): stores
    d wh = gamma invstd (dy - mean(dy) - xhat mean(dy xhat)) and the step's d gamma = sum(dy xhat)."""
    wh = tl.load(wh_ptr + off, mask=mask, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0)
    xhat = tl.where(mask, (wh - mean[None, :]) * invstd[None, :], 0.0)
    sum_dy = tl.sum(dpre, axis=0)
    dgamma = tl.sum(dpre * xhat, axis=0)
    dwh = (gamma * invstd)[None, :] * (dpre - (sum_dy / B)[None, :] - xhat * (dgamma / B)[None, :])
    tl.store(dwh_ptr + off, dwh, mask=mask)
    tl.store(dgamma_ptr + cols, dgamma, mask=col_ok)


@triton.jit
def forward_step_kernel(
    wh_ptr,  # (B, 4H) in: W_h h_{t-1}
    x_ptr,  # (B, 4H) in: the input term BN(W_x x_t) + b
    c_prev_ptr,  # (B, H) in: c_{t-1}
    gamma_h_ptr,  # (4H,) in
    gamma_c_ptr,  # (H,) in
    beta_c_ptr,  # (H,) in
    h_ptr,  # (B, H) out: h_t
    c_ptr,  # (B, H) out: c_t
    act_ptr,  # (B, 4H) out: sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
    tc_ptr,  # (B, H) out: tanh(BN_c(c_t))
    mean_h_ptr,  # (4H,) out: batch mean of wh
    invstd_h_ptr,  # (4H,) out: 1 / sqrt(biased batch variance of wh + eps)
    mean_c_ptr,  # (H,) out
    invstd_c_ptr,  # (H,) out
    B,
    H,
    eps,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One forward step after the recurrent matmul, for the hidden units of program ``program_id(0)``:

    pre = gamma_h * BN(wh) + x; i, f, o = sigmoid, g = tanh of pre's gates; c = f c_{t-1} + i g;
    h = o * tanh(gamma_c * BN(c) + beta_c); BN with the batch statistics of the step, computed here.
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    cols = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    mask = (rows < B)[:, None] & col_ok[None, :]
    off4 = rows[:, None] * (4 * H) + cols[None, :]  # gate 0's columns of a (B, 4H) tensor
    off1 = rows[:, None] * H + cols[None, :]

    pre_i = _bn_h_forward(wh_ptr, x_ptr, gamma_h_ptr, mean_h_ptr, invstd_h_ptr, off4, cols, col_ok, mask, B, eps)
    i = _sigmoid(pre_i)
    tl.store(act_ptr + off4, i, mask=mask)
    pre_g = _bn_h_forward(
        wh_ptr, x_ptr, gamma_h_ptr, mean_h_ptr, invstd_h_ptr, off4 + 2 * H, cols + 2 * H, col_ok, mask, B, eps
    )
    g = _tanh(pre_g)
    tl.store(act_ptr + off4 + 2 * H, g, mask=mask)
    ig = i * g
    pre_f = _bn_h_forward(
        wh_ptr, x_ptr, gamma_h_ptr, mean_h_ptr, invstd_h_ptr, off4 + H, cols + H, col_ok, mask, B, eps
    )
    f = _sigmoid(pre_f)
    tl.store(act_ptr + off4 + H, f, mask=mask)
    c_prev = tl.load(c_prev_ptr + off1, mask=mask, other=0.0)
    c = f * c_prev + ig
    tl.store(c_ptr + off1, c, mask=mask)

    mean_c = tl.sum(c, axis=0) / B  # masked rows of c are 0
    centred = tl.where(mask, c - mean_c[None, :], 0.0)
    var_c = tl.sum(centred * centred, axis=0) / B
    invstd_c = 1.0 / tl.sqrt(var_c + eps)
    tl.store(mean_c_ptr + cols, mean_c, mask=col_ok)
    tl.store(invstd_c_ptr + cols, invstd_c, mask=col_ok)
    gamma_c = tl.load(gamma_c_ptr + cols, mask=col_ok, other=0.0)
    beta_c = tl.load(beta_c_ptr + cols, mask=col_ok, other=0.0)
    tc = _tanh(centred * (gamma_c * invstd_c)[None, :] + beta_c[None, :])
    tl.store(tc_ptr + off1, tc, mask=mask)

    pre_o = _bn_h_forward(
        wh_ptr, x_ptr, gamma_h_ptr, mean_h_ptr, invstd_h_ptr, off4 + 3 * H, cols + 3 * H, col_ok, mask, B, eps
    )
    o = _sigmoid(pre_o)
    tl.store(act_ptr + off4 + 3 * H, o, mask=mask)
    tl.store(h_ptr + off1, o * tc, mask=mask)


@triton.jit
def backward_step_kernel(
    dh_ptr,  # (B, H) in: dL/dh_t, from the output and from step t+1
    dc_next_ptr,  # (B, H) in: dL/dc_t from step t+1
    act_ptr,  # (B, 4H) in: the step's gate activations
    tc_ptr,  # (B, H) in: tanh(BN_c(c_t))
    wh_ptr,  # (B, 4H) in: W_h h_{t-1}
    c_ptr,  # (B, H) in: c_t
    c_prev_ptr,  # (B, H) in: c_{t-1}
    mean_h_ptr,  # (4H,) in
    invstd_h_ptr,  # (4H,) in
    mean_c_ptr,  # (H,) in
    invstd_c_ptr,  # (H,) in
    gamma_h_ptr,  # (4H,) in
    gamma_c_ptr,  # (H,) in
    dpre_ptr,  # (B, 4H) out: dL/d pre_t = dL/d(input term)
    dwh_ptr,  # (B, 4H) out: dL/d(W_h h_{t-1}), through BN_h's statistics
    dc_prev_ptr,  # (B, H) out: dL/dc_{t-1} through the cell, dc * f (a buffer other than dc_next's)
    dgamma_h_ptr,  # (4H,) out: the step's dL/d gamma_h
    dgamma_c_ptr,  # (H,) out: the step's dL/d gamma_c
    dbeta_c_ptr,  # (H,) out: the step's dL/d beta_c
    B,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The gradients of one step for the hidden units of program ``program_id(0)``, given dL/dh_t and dL/dc_t from
    step t+1 -- eager's ``_backward_step``; both batch norms' backward run with batch statistics (the gradient flows
    through the mean and the variance), their column sums over the batch done in this program.
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    cols = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    mask = (rows < B)[:, None] & col_ok[None, :]
    off4 = rows[:, None] * (4 * H) + cols[None, :]
    off1 = rows[:, None] * H + cols[None, :]

    # h = o tanh(bn_c): the output gate, and dL/d bn_c
    dh = tl.load(dh_ptr + off1, mask=mask, other=0.0)
    tc = tl.load(tc_ptr + off1, mask=mask, other=0.0)
    o = tl.load(act_ptr + off4 + 3 * H, mask=mask, other=0.0)
    do = dh * tc * o * (1.0 - o)  # 0 on masked rows (dh is)
    dbn_c = dh * o * (1.0 - tc * tc)
    tl.store(dpre_ptr + off4 + 3 * H, do, mask=mask)
    _bn_h_backward(
        do, wh_ptr, gamma_h_ptr, mean_h_ptr, invstd_h_ptr, dwh_ptr, dgamma_h_ptr, off4 + 3 * H, cols + 3 * H, col_ok,
        mask, B,
    )  # fmt: skip

    # bn_c = gamma_c BN(c) + beta_c, batch statistics
    c = tl.load(c_ptr + off1, mask=mask, other=0.0)
    mean_c = tl.load(mean_c_ptr + cols, mask=col_ok, other=0.0)
    invstd_c = tl.load(invstd_c_ptr + cols, mask=col_ok, other=0.0)
    gamma_c = tl.load(gamma_c_ptr + cols, mask=col_ok, other=0.0)
    xhat_c = tl.where(mask, (c - mean_c[None, :]) * invstd_c[None, :], 0.0)
    dbeta_c = tl.sum(dbn_c, axis=0)
    dgamma_c = tl.sum(dbn_c * xhat_c, axis=0)
    tl.store(dbeta_c_ptr + cols, dbeta_c, mask=col_ok)
    tl.store(dgamma_c_ptr + cols, dgamma_c, mask=col_ok)
    dc_next = tl.load(dc_next_ptr + off1, mask=mask, other=0.0)
    dc = (gamma_c * invstd_c)[None, :] * (dbn_c - (dbeta_c / B)[None, :] - xhat_c * (dgamma_c / B)[None, :])
    dc = tl.where(mask, dc + dc_next, 0.0)

    # c = f c_{t-1} + i g
    i = tl.load(act_ptr + off4, mask=mask, other=0.0)
    g = tl.load(act_ptr + off4 + 2 * H, mask=mask, other=0.0)
    di = dc * g * i * (1.0 - i)
    tl.store(dpre_ptr + off4, di, mask=mask)
    _bn_h_backward(
        di, wh_ptr, gamma_h_ptr, mean_h_ptr, invstd_h_ptr, dwh_ptr, dgamma_h_ptr, off4, cols, col_ok, mask, B
    )
    dg = dc * i * (1.0 - g * g)
    tl.store(dpre_ptr + off4 + 2 * H, dg, mask=mask)
    _bn_h_backward(
        dg, wh_ptr, gamma_h_ptr, mean_h_ptr, invstd_h_ptr, dwh_ptr, dgamma_h_ptr, off4 + 2 * H, cols + 2 * H, col_ok,
        mask, B,
    )  # fmt: skip
    f = tl.load(act_ptr + off4 + H, mask=mask, other=0.0)
    c_prev = tl.load(c_prev_ptr + off1, mask=mask, other=0.0)
    df = dc * c_prev * f * (1.0 - f)
    tl.store(dpre_ptr + off4 + H, df, mask=mask)
    _bn_h_backward(
        df, wh_ptr, gamma_h_ptr, mean_h_ptr, invstd_h_ptr, dwh_ptr, dgamma_h_ptr, off4 + H, cols + H, col_ok, mask, B
    )
    tl.store(dc_prev_ptr + off1, dc * f, mask=mask)
