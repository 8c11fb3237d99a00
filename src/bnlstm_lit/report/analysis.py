"""The numbers behind the paper's diagnostic figures, in plain PyTorch (no plotting here).

* Fig. 1b: :func:`gradient_flow_vs_gamma`, the batch-mean norm of dloss/dh_t at initialization for several γ.
* Fig. 1a: :func:`tanh_derivative_vs_std`, E[tanh'(x)] for x ~ N(0, σ²).
* App. A: :func:`population_statistics`, per-step means and variances of the BN sites (recurrent term, cell) for a
  sample of units, and :func:`settle_step`, the step after which they stay near their late-sequence value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlstm_lit.nn import BNLSTM, DEFAULTS
from bnlstm_lit.nn.settings import CellType


def gradient_flow_vs_gamma(
    inputs: Tensor,
    targets: Tensor,
    gammas: Sequence[float],
    hidden_size: int = DEFAULTS.hidden_size,
    cell: CellType = "tanh",
    h0_noise_std: float = 0.1,
    seed: int = 0,
) -> dict[float, list[float]]:
    """Batch mean of ||dloss/dh_t|| for every step t, at initialization, for each initial γ.

    The model is the paper's MNIST classifier (one :class:`~bnlstm_lit.nn.BNLSTM` layer, a linear readout of the
    last h, cross-entropy), in training mode (batch statistics), with the same seed for every γ so that only γ
    differs. Each γ is one forward and backward pass; no parameter is updated.

    Args:
        inputs: (T, B, I) float sequences (e.g. sequential MNIST pixels in [0, 1]).
        targets: (B,) int64 class labels.
        gammas: initial γ of every BN site, one model each.
        hidden_size: H; the other settings of the layer are :data:`~bnlstm_lit.nn.DEFAULTS`.
        cell: "tanh" (the BN tanh RNN of the paper's Fig. 1) or "lstm".
        h0_noise_std: Gaussian noise on h_0 (the unpermuted sequences start with constant black pixels; without
            noise every example has the same state there, the batch variance is zero and BN's 1/sqrt(var + eps)
            dominates the gradient).
        seed: parameter and noise seed.

    Returns:
        {γ: [norm at t = 0, ..., T-1]}, plain floats.
    """
    if inputs.dim() != 3:
        raise ValueError(f"gradient_flow_vs_gamma: inputs must be (T, B, I), got shape {tuple(inputs.shape)}")
    if targets.shape != inputs.shape[1:2]:
        raise ValueError(
            f"gradient_flow_vs_gamma: targets must be (B,) = ({inputs.shape[1]},), got {tuple(targets.shape)}"
        )
    num_classes = int(targets.max()) + 1
    settings = DEFAULTS.replace(hidden_size=hidden_size, cell=cell, h0_noise_std=h0_noise_std)
    out: dict[float, list[float]] = {}
    for gamma in gammas:
        if gamma <= 0:
            raise ValueError(f"gradient_flow_vs_gamma: every γ must be positive, got {gamma}")
        torch.manual_seed(seed)
        rnn = BNLSTM.from_settings(
            inputs.shape[-1], settings.replace(gamma_init=float(gamma)), max_steps=inputs.shape[0]
        )
        readout = nn.Linear(hidden_size, num_classes)
        rnn.probe_hidden_grad = True
        _, (h_n, _) = rnn(inputs)
        loss = nn.functional.cross_entropy(readout(h_n[-1]), targets)
        loss.backward()
        out[float(gamma)] = rnn.hidden_grad_norms()[0].tolist()
    return out


def tanh_derivative_vs_std(stds: Sequence[float], samples: int = 10_000, seed: int = 0) -> dict[str, list[float]]:
    """E[tanh'(x)] and its 10% / 90% quantiles for x ~ N(0, σ²), from ``samples`` draws per σ (Fig. 1a).

    Returns {"std": [...], "mean": [...], "q10": [...], "q90": [...]}.
    """
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, generator=generator, dtype=torch.float64)
    mean, q10, q90 = [], [], []
    for std in stds:
        derivative = 1.0 - torch.tanh(float(std) * z) ** 2  # tanh'(x) = 1 - tanh(x)^2
        mean.append(float(derivative.mean()))
        q10.append(float(derivative.quantile(0.1)))
        q90.append(float(derivative.quantile(0.9)))
    return {"std": [float(s) for s in stds], "mean": mean, "q10": q10, "q90": q90}


def population_statistics(state_dict: Mapping[str, Any], units: int = 8, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per-step population statistics of every BN site in a model's (or checkpoint's) state dict (App. A).

    A BN site is a pair of 2-D buffers ``<site>.running_mean`` / ``<site>.running_var`` of shape (T_max, C)
    (:class:`~bnlstm_lit.nn.SequenceBatchNorm`). For each, ``units`` channels drawn with ``seed`` (the same draw
    for mean and variance) are kept.

    Returns:
        {site: {"units": [c, ...], "mean": [[... per unit] per step], "var": [[...]], "settle_step": int}},
        sites in state-dict order.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, mean in state_dict.items():
        if not key.endswith(".running_mean") or not isinstance(mean, Tensor) or mean.dim() != 2:
            continue
        site = key[: -len(".running_mean")]
        var = state_dict.get(f"{site}.running_var")
        if not isinstance(var, Tensor) or var.shape != mean.shape:
            continue
        channels = mean.shape[1]
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(channels, generator=generator)[: min(units, channels)].sort().values
        out[site] = {
            "units": chosen.tolist(),
            "mean": mean[:, chosen].double().tolist(),
            "var": var[:, chosen].double().tolist(),
            "settle_step": settle_step(mean.double(), var.double()),
        }
    return out


def settle_step(mean: Tensor, var: Tensor, tolerance: float = 0.1, noise_factor: float = 3.0) -> int:
    """The first step after which the per-step statistics stay near their late-sequence values.

    The reference is the average over the second half of the steps. Step t's distances are, averaged over the
    channels, |mean_t - mean_ref| / sqrt(var_ref) and |var_t - var_ref| / var_ref. A step is "near" when each
    distance is at most ``tolerance`` or ``noise_factor`` times that distance's median over the second half,
    whichever is larger (statistics estimated from a few batches fluctuate from step to step; the fluctuation is not
    a trend). Returns the first t from which every later step is near (T if none).

    Shapes: mean, var (T, C).
    """
    T = mean.shape[0]
    if T < 2:
        return 0
    late = slice(T // 2, None)
    ref_mean = mean[late].mean(0)
    ref_var = var[late].mean(0).clamp_min(1e-12)
    near = torch.ones(T, dtype=torch.bool)
    for distance in (((mean - ref_mean).abs() / ref_var.sqrt()).mean(1), ((var - ref_var).abs() / ref_var).mean(1)):
        threshold = max(tolerance, noise_factor * float(distance[late].median()))
        near &= distance <= threshold  # (T,)
    far = (~near).nonzero().flatten()
    return 0 if far.numel() == 0 else int(far[-1]) + 1
