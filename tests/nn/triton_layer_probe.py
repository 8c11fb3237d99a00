"""Runs whole BNLSTM layers with ``implementation="triton"`` under the Triton interpreter on CPU (the dispatcher's
triton leaf, its packed runs with lengths, 2 layers, bidirectional, evaluation with batch statistics and the
estimation pass) and the same layers on the reference loop, and prints, as one JSON object on the last line of
stdout, the largest absolute difference of each result (outputs, h_n, c_n, every gradient, every running statistic)
from the reference loop's, for the triton path and, as the yardstick of float32 rounding, for the eager path.
``tests/nn/test_triton_steps.py`` runs this in a subprocess with ``TRITON_INTERPRET=1`` and judges the numbers."""

from __future__ import annotations

import copy
import json

import torch

from bnlstm_lit.nn import BNLSTM, batchnorm_sites, estimate_population_statistics, set_eval_statistics

#: name -> (constructor keywords, T, B, lengths or None, mode): mode "train" (forward + backward), "batch"
#: (evaluation with batch statistics, forward + backward), "estimate" (the estimation pass)
CASES = {
    "train_T1": ({}, 1, 3, None, "train"),
    "train_2_layers_start": ({"num_layers": 2}, 5, 5, None, "train"),
    "train_bidirectional_lengths": ({"bidirectional": True}, 6, 5, [6, 2, 4, 1, 5], "train"),
    "train_2_layers_lengths": ({"num_layers": 2}, 6, 4, [3, 6, 6, 2], "train"),
    "batch_eval": ({"num_layers": 2}, 5, 3, None, "batch"),
    "estimate": ({}, 4, 3, None, "estimate"),
}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _run(model: BNLSTM, x: torch.Tensor, lengths, mode: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    if mode == "estimate":
        estimate_population_statistics(model, [x, x * 0.5])
        return {f"buffer {i} {name}": buf.clone() for i, s in enumerate(batchnorm_sites(model)) for name, buf in
                s.named_buffers()}  # fmt: skip
    if mode == "batch":
        model.eval()
        set_eval_statistics(model, "batch")
    x = x.clone().requires_grad_()
    out, (h, c) = model(x, lengths=lengths)
    (out.square().sum() + h.sum() + c.square().sum()).backward()
    results = {"out": out.detach(), "h_n": h.detach(), "c_n": c.detach(), "grad x": x.grad}
    results.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    for i, site in enumerate(batchnorm_sites(model)):
        results.update({f"buffer {i} {n}": b.clone() for n, b in site.named_buffers()})
    return results


def main() -> None:
    report: dict[str, dict] = {}
    for name, (kwargs, T, B, lengths, mode) in CASES.items():
        torch.manual_seed(0)
        model = BNLSTM(3, 6, max_steps=8, implementation="triton", **kwargs)
        with torch.no_grad():  # away from the init: γ, β and the bias random
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ref, eager = copy.deepcopy(model), copy.deepcopy(model)
        ref.implementation, eager.implementation = "reference", "eager"
        ref.double()  # the truth in float64
        x = torch.randn(T, B, 3, generator=torch.Generator().manual_seed(1))
        lengths_t = None if lengths is None else torch.tensor(lengths)
        got, want = _run(model, x, lengths_t, mode), _run(ref, x.double(), lengths_t, mode)
        yardstick = _run(eager, x, lengths_t, mode)
        assert got.keys() == want.keys() == yardstick.keys(), (name, sorted(set(got) ^ set(want)))
        report[name] = {
            key: {"triton": _diff(got[key], want[key]), "eager": _diff(yardstick[key], want[key])} for key in got
        }
        report[name]["scale"] = max(float(v.double().abs().max()) for v in want.values() if v.numel())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
