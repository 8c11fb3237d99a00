"""Benchmark of BN-LSTM implementations against ``torch.nn.LSTM`` (speed and memory of a training step and of eval).

Run ``python benchmarks/run.py --help``; see ``benchmarks/README.md``. Importable: ``main(argv) -> dict``.

Every implementation is a factory ``(input_size, hidden_size, max_steps) -> nn.Module`` whose module maps an input
``(T, B, I)`` to ``(output (T, B, H), (h_n, c_n))``, registered in :data:`IMPLEMENTATIONS` (see :func:`register`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # naive.py lives next to this file
    sys.path.insert(0, str(_HERE))
try:
    import bnlstm_lit  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/
    sys.path.insert(0, str(_HERE.parent / "src"))

from naive import NaiveBNLSTM, copy_from  # noqa: E402

from bnlstm_lit.nn import BNLSTM  # noqa: E402

Factory = Callable[[int, int, int], nn.Module]


class Shape(NamedTuple):
    input_size: int
    hidden_size: int
    batch: int
    steps: int


#: Presets: the paper's sequential MNIST, PTB characters and text8 shapes, and a tiny one for tests.
SHAPES: dict[str, Shape] = {
    "mnist": Shape(input_size=1, hidden_size=100, batch=100, steps=784),
    "ptb": Shape(input_size=50, hidden_size=1000, batch=64, steps=100),
    "text8": Shape(input_size=27, hidden_size=2000, batch=128, steps=180),
    "tiny": Shape(input_size=3, hidden_size=8, batch=4, steps=5),
}
QUICK_SHAPES = ["mnist", "ptb"]
FULL_SHAPES = ["mnist", "ptb", "text8"]
QUICK_REPS = 3
FULL_REPS = 7
MODES = ("train", "eval")
BASELINE = "lstm"

#: name -> factory(input_size, hidden_size, max_steps). The first entry is the baseline every ratio is against.
IMPLEMENTATIONS: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator adding an implementation to :data:`IMPLEMENTATIONS` (rows come out in registration order)."""

    def deco(factory: Factory) -> Factory:
        if name in IMPLEMENTATIONS:
            raise ValueError(f"benchmark implementation {name!r} is already registered")
        IMPLEMENTATIONS[name] = factory
        return factory

    return deco


@register("lstm")
def _lstm(input_size: int, hidden_size: int, max_steps: int) -> nn.Module:
    return nn.LSTM(input_size, hidden_size)


@register("naive")
def _naive(input_size: int, hidden_size: int, max_steps: int) -> nn.Module:
    # the same model as "bnlstm" (same init and, the harness seeding every factory alike, the same weights)
    return copy_from(
        BNLSTM(input_size, hidden_size, max_steps=max_steps), NaiveBNLSTM(input_size, hidden_size, max_steps)
    )


@register("bnlstm")
def _bnlstm(input_size: int, hidden_size: int, max_steps: int) -> nn.Module:
    # the default: the fused recurrence, each step's pointwise and batch-norm work one call into the native kernel
    # (eager steps where it cannot be built)
    return BNLSTM(input_size, hidden_size, max_steps=max_steps)


@register("bnlstm_eager")
def _bnlstm_eager(input_size: int, hidden_size: int, max_steps: int) -> nn.Module:
    # the fused recurrence with its steps as eager torch ops (the default before the native kernel)
    return BNLSTM(input_size, hidden_size, max_steps=max_steps, implementation="eager")


@register("bnlstm_compiled")
def _bnlstm_compiled(input_size: int, hidden_size: int, max_steps: int) -> nn.Module:
    # the whole layer through torch.compile: the native recurrence is a custom op, so the graph has no break
    # (compiled during the warm-up rep, not timed)
    return torch.compile(BNLSTM(input_size, hidden_size, max_steps=max_steps), fullgraph=True)  # type: ignore[return-value]


@register("bnlstm_reference")
def _bnlstm_reference(input_size: int, hidden_size: int, max_steps: int) -> nn.Module:
    return BNLSTM(input_size, hidden_size, max_steps=max_steps, implementation="reference")  # the readable loop


@register("bnlstm_plain")
def _bnlstm_plain(input_size: int, hidden_size: int, max_steps: int) -> nn.Module:
    return BNLSTM(input_size, hidden_size, max_steps=max_steps, normalize=False)


# ---------------------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Speed and memory of BN-LSTM implementations against torch.nn.LSTM.",
    )
    p.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, {QUICK_REPS} reps")
    p.add_argument(
        "--shape",
        nargs="+",
        action="extend",
        choices=list(SHAPES),
        metavar="NAME",
        help=f"shape presets, any of {list(SHAPES)} (default: {FULL_SHAPES}, or {QUICK_SHAPES} with --quick)",
    )
    p.add_argument(
        "--impl",
        nargs="+",
        action="extend",
        choices=list(IMPLEMENTATIONS),
        metavar="NAME",
        help=f"implementations, any of {list(IMPLEMENTATIONS)} (default: all; {BASELINE!r} is always included)",
    )
    p.add_argument("--reps", type=int, help=f"timed repetitions (default {FULL_REPS}, {QUICK_REPS} with --quick)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: run under torch.autocast")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's setting)")
    p.add_argument("--out", type=Path, default=_HERE / "results", help="folder for results.json and results.md")
    p.add_argument("--seed", type=int, default=0)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = QUICK_REPS if args.quick else FULL_REPS
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    shapes = args.shape or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.shapes = list(dict.fromkeys(shapes))
    impls = list(dict.fromkeys(args.impl or IMPLEMENTATIONS))
    args.impls = [BASELINE] + [name for name in impls if name != BASELINE]
    return args


# ---------------------------------------------------------------------------------------------------------------------
# machine


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device_name"] = info["cpu"]
    return info


# ---------------------------------------------------------------------------------------------------------------------
# measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step(model: nn.Module, x: Tensor, grad: Tensor, mode: str, device: torch.device, dtype: str) -> None:
    """One training step's forward + backward (``mode="train"``) or one no-grad eval forward."""
    if mode == "train":
        with _autocast(device, dtype):
            out, _ = model(x)
        out.backward(grad.to(out.dtype))
    else:
        with torch.no_grad(), _autocast(device, dtype):
            model(x)


def _timed_step(model: nn.Module, x: Tensor, grad: Tensor, mode: str, device: torch.device, dtype: str) -> float:
    if mode == "train":
        model.zero_grad(set_to_none=True)  # between reps, not timed
    _sync(device)
    t0 = time.perf_counter()
    _step(model, x, grad, mode, device, dtype)
    _sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _count_saved(storages: dict[int, int]) -> Iterator[None]:
    """Record every storage saved for backward inside the block: data_ptr -> nbytes (each storage once)."""

    def pack(t: Tensor) -> Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _memory(
    model: nn.Module, x: Tensor, grad: Tensor, mode: str, device: torch.device, dtype: str
) -> tuple[int | None, int | None]:
    """(saved_bytes, peak_bytes) of one step: bytes saved for backward by the training forward (None in eval), and
    on CUDA the growth of the peak allocated memory over the step (None on CPU)."""
    model.zero_grad(set_to_none=True)
    peak = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    saved: int | None = None
    if mode == "train":
        storages: dict[int, int] = {}
        with _autocast(device, dtype), _count_saved(storages):
            out, _ = model(x)
        saved = sum(storages.values())
        out.backward(grad.to(out.dtype))
        del out
    else:
        with torch.no_grad(), _autocast(device, dtype):
            model(x)
    if device.type == "cuda":
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    model.zero_grad(set_to_none=True)
    return saved, peak


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_shape(
    name: str, impls: list[str], modes: tuple[str, ...], reps: int, device: torch.device, dtype: str, seed: int
) -> list[dict[str, Any]]:
    """Rows for one shape: every mode × implementation, timed interleaved (rep loop outside, impl loop inside)."""
    shape = SHAPES[name]
    T, B, I, H = shape.steps, shape.batch, shape.input_size, shape.hidden_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=gen).to(device)
    grad = torch.randn(T, B, H, generator=gen).to(device)
    models: dict[str, nn.Module] = {}
    errors: dict[tuple[str, str], str] = {}
    for impl in impls:
        torch.manual_seed(seed)
        try:
            models[impl] = IMPLEMENTATIONS[impl](I, H, T).to(device)
        except Exception as exc:  # recorded in the row, the run goes on
            for mode in modes:
                errors[(mode, impl)] = _error(exc)
            _free(device)
    rows = []
    for mode in modes:
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        memory: dict[str, tuple[int | None, int | None]] = {}
        live = [impl for impl in impls if (mode, impl) not in errors]
        for impl in list(live):
            model = models[impl].train(mode == "train")
            try:
                _timed_step(model, x, grad, mode, device, dtype)  # warm-up
                memory[impl] = _memory(model, x, grad, mode, device, dtype)
            except Exception as exc:  # recorded in the row, the run goes on
                errors[(mode, impl)] = _error(exc)
                live.remove(impl)
                model.zero_grad(set_to_none=True)
                _free(device)
        for _ in range(reps):
            for impl in list(live):
                try:
                    times[impl].append(_timed_step(models[impl], x, grad, mode, device, dtype))
                except Exception as exc:  # recorded in the row, the run goes on
                    errors[(mode, impl)] = _error(exc)
                    live.remove(impl)
                    models[impl].zero_grad(set_to_none=True)
                    _free(device)
        for model in models.values():
            model.zero_grad(set_to_none=True)
        for impl in impls:
            saved, peak = memory.get(impl, (None, None))
            row: dict[str, Any] = {
                "shape": name,
                "mode": mode,
                "impl": impl,
                "device": device.type,
                "dtype": dtype,
                "batch": B,
                "steps": T,
                "hidden": H,
                "input": I,
                "reps": len(times[impl]),
                "times_s": times[impl],
                "median_s": None,
                "tokens_per_s": None,
                "ratio_to_lstm": None,
                "saved_bytes": saved,
                "peak_bytes": peak,
                "memory_metric": "peak_bytes" if device.type == "cuda" else "saved_bytes",
                "memory_bytes": peak if device.type == "cuda" else saved,
                "memory_ratio_to_lstm": None,
                "error": errors.get((mode, impl)),
            }
            if row["error"] is None and times[impl]:
                row["median_s"] = statistics.median(times[impl])
                row["tokens_per_s"] = B * T / row["median_s"] if row["median_s"] > 0 else float("inf")
            rows.append(row)
        _ratios([r for r in rows if r["mode"] == mode])
    del models
    _free(device)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_to_lstm and memory_ratio_to_lstm of rows of one shape and mode, against the baseline's row."""
    base = next((r for r in rows if r["impl"] == BASELINE), None)
    if base is None:
        return
    for r in rows:
        if r["tokens_per_s"] is not None and base["tokens_per_s"]:
            r["ratio_to_lstm"] = 1.0 if r is base else r["tokens_per_s"] / base["tokens_per_s"]
        if r["memory_bytes"] is not None and base["memory_bytes"]:
            r["memory_ratio_to_lstm"] = 1.0 if r is base else r["memory_bytes"] / base["memory_bytes"]


# ---------------------------------------------------------------------------------------------------------------------
# report

COLUMNS = ["shape", "mode", "impl", "ms/step", "tokens/s", "× nn.LSTM", "memory (MiB)", "memory × nn.LSTM"]


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    metric = (
        "peak allocated memory growth over one step (torch.cuda.max_memory_allocated)"
        if cfg["device"] == "cuda"
        else "bytes of the tensors saved for backward by the training forward (each storage once)"
    )
    lines = [
        f"Machine: {m['device_name']} ({cfg['device']}, {m['cpu_count']} CPUs, {m['threads']} threads), "
        f"{m['platform']}, Python {m['python']}, torch {m['torch']}; {m['date']}; dtype {cfg['dtype']}, "
        f"median of {cfg['reps']} interleaved reps.",
        "",
        f"Memory: {metric}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(COLUMNS) - 3)) + "|",
    ]
    for r in results["rows"]:
        mem = None if r["memory_bytes"] is None else r["memory_bytes"] / 2**20
        if r["error"] is not None:
            err = r["error"].replace("|", "\\|").replace("\n", " ")
            cells = [r["shape"], r["mode"], r["impl"], f"error: {err}", "—", "—", "—", "—"]
        else:
            ms = None if r["median_s"] is None else 1e3 * r["median_s"]
            cells = [
                r["shape"],
                r["mode"],
                r["impl"],
                _fmt(ms, ".2f"),
                _fmt(r["tokens_per_s"], ",.0f"),
                _fmt(r["ratio_to_lstm"], ".2f"),
                _fmt(mem, ".2f"),
                _fmt(r["memory_ratio_to_lstm"], ".2f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write ``results.json`` and ``results.md`` into ``--out``, print the table, return the
    results (``{"machine": ..., "config": ..., "rows": [...]}``)."""
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = {
        "shapes": {name: SHAPES[name]._asdict() for name in args.shapes},
        "impls": args.impls,
        "modes": list(MODES),
        "reps": args.reps,
        "warmup": 1,
        "device": device.type,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "quick": args.quick,
        "baseline": BASELINE,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    results: dict[str, Any] = {"machine": machine_info(device), "config": config, "rows": []}
    for name in args.shapes:
        results["rows"] += bench_shape(name, args.impls, MODES, args.reps, device, args.dtype, args.seed)
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(table)
    print(table, end="")
    return results


if __name__ == "__main__":
    main()
