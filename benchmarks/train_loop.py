"""Time a plain training loop of ONE model per process: the allocator state of a real run, not of a benchmark that
alternates several models in one process.

    python benchmarks/train_loop.py --shape mnist --impl bnlstm
    python benchmarks/train_loop.py --shape mnist --impl lstm      # run each in its own process and compare

Each step: a new random batch (T, B, I), the recurrent layer, a linear head, a loss (cross-entropy on the last step
for ``mnist``, the mean square of the head's outputs at every step for the other shapes), ``zero_grad``, backward and
an Adam step. Prints, per step, the forward time, the backward + optimizer time and the memory page-faulted in each
(minor faults × page size: fresh pages the OS had to hand out; Unix only), and returns them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # run.py lives next to this file
    sys.path.insert(0, str(_HERE))

from run import IMPLEMENTATIONS, SHAPES  # noqa: E402

try:
    import resource
except ImportError:  # not on Unix: no fault counts
    resource = None  # type: ignore[assignment]


def _faulted_bytes() -> int | None:
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize()


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="mnist")
    parser.add_argument("--impl", choices=list(IMPLEMENTATIONS), default="bnlstm")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's setting)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    T, B, I, H = shape.steps, shape.batch, shape.input_size, shape.hidden_size
    torch.manual_seed(args.seed)
    model = IMPLEMENTATIONS[args.impl](I, H, T)
    head = nn.Linear(H, 10)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], 1e-3)
    rows = []
    print(f"{args.impl} at the {args.shape} shape (T {T}, B {B}, I {I}, H {H}), {torch.get_num_threads()} threads:")
    for step in range(args.steps):
        x, y = torch.randn(T, B, I), torch.randint(0, 10, (B,))
        f0, t0 = _faulted_bytes(), time.perf_counter()
        out, _ = model(x)
        loss = F.cross_entropy(head(out[-1]), y) if args.shape == "mnist" else head(out).square().mean()
        f1, t1 = _faulted_bytes(), time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        f2, t2 = _faulted_bytes(), time.perf_counter()
        row = {"step": step, "forward_s": t1 - t0, "backward_step_s": t2 - t1}
        row.update(forward_faulted_bytes=_delta(f1, f0), backward_faulted_bytes=_delta(f2, f1))
        rows.append(row)
        faulted = (row["forward_faulted_bytes"], row["backward_faulted_bytes"])
        mb = ["?" if b is None else f"{b / 2**20:.0f}" for b in faulted]
        print(
            f"  step {step}: forward {1e3 * row['forward_s']:.0f} ms ({mb[0]} MB faulted), "
            f"backward + Adam {1e3 * row['backward_step_s']:.0f} ms ({mb[1]} MB)"
        )
    return rows


if __name__ == "__main__":
    main()
