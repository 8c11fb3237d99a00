"""A native kernel for the per-step work of the BN-LSTM recurrence on float32 CPU tensors.

On CPU at small shapes the eager fused path (:mod:`bnlstm_lit.nn.fused`) spends most of a step dispatching ~14 small
torch ops forward and ~25 backward. Here a step is the recurrent matmul in torch (oneDNN, with the weight reordered
once per sequence into its blocked layout) and *one* call into ``bnlstm_kernel.c`` (plain C on raw float32 pointers,
no torch headers), forward and backward, writing directly into rows of preallocated buffers:

* :func:`kernel_recurrence` -- the training recurrence of :func:`~bnlstm_lit.nn.fused.fused_recurrence` (given the
  input term BN_t(W_x x_t) + b);
* :func:`kernel_recurrence_input_norm` -- the same with the input term's per-step batch norm inside the steps too
  (given W_x x_t, or x and W_x: then W_x x_t is computed one chunk of steps at a time, and so are its gradients): the
  layer's default in training, so neither the (T, B, 4H) input term nor its gradient ever exists;
* :func:`population_kernel_recurrence` -- evaluation with population statistics, without gradients.

The C source ships with the package and is compiled on first use with the system C compiler (``$CC``, else ``cc``)
into a per-user cache, ``$BNLSTM_LIT_CACHE_DIR`` or ``$XDG_CACHE_HOME/bnlstm_lit`` or ``~/.cache/bnlstm_lit``, under a
name keyed by a hash of the source, the compiler, the flags and the platform; written to a temporary file and renamed
into place, so concurrent processes (DDP) are safe and later processes load it without compiling (about a second
the first time). ``BNLSTM_LIT_KERNEL=0`` (or ``false``/``off``/``no``) turns the kernel off: nothing is built and the
eager fused path runs. Without a working compiler the eager path runs too, with one warning per process.

Each step's columns (a cell and its four gate columns) are independent, so a step of at least ``PARALLEL_MIN``
elements splits into blocks of columns run on torch's intra-op threads (``torch.get_num_threads()``): the library
is built with OpenMP where the compiler has it and its ``libgomp.so.1`` resolves to the copy torch has loaded, so
torch's matmuls and the kernel share one thread pool. The results do not depend on the number of threads (no sum
crosses blocks; tested bit for bit). On x86-64 Linux the loops are compiled for AVX-512, AVX2 and the baseline,
chosen at load time, again with bit-identical results (tested: each variant built alone).

Numerics: batch sums in double, in row order (deterministic, as torch's CPU batch norm); exp, sigmoid and tanh
through branch-free float approximations accurate to about one unit in the last place (as torch's vectorized CPU
kernels; no -ffast-math); the results agree with the eager path and the reference loop to float rounding (tested).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "enabled",
    "kernel_recurrence",
    "kernel_recurrence_input_norm",
    "library",
    "population_kernel_recurrence",
    "usable",
]

SOURCE = Path(__file__).with_name("bnlstm_kernel.c")
#: Portable flags: no -march (the cache may be shared by machines), no -ffast-math (the results must match torch's).
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
#: Tried first: the step's column blocks on torch's OpenMP threads (the library then needs ``libgomp.so.1``, which
#: resolves to the copy torch has loaded, so the kernel and torch's matmuls share one thread pool). Where the compiler
#: has no OpenMP, or the library does not load, the kernel is built without it (one thread).
OPENMP_FLAGS = ["-fopenmp"]
#: Steps with fewer elements (B * 4H) run on one thread: below this, waking threads costs more than it saves.
PARALLEL_MIN = 32768
ENV_SWITCH = "BNLSTM_LIT_KERNEL"
ENV_CACHE = "BNLSTM_LIT_CACHE_DIR"
_OFF = {"0", "false", "off", "no"}

_state: dict[str, Any] = {}  # "lib": the loaded library or None after a failure; "warned": a warning was given

_p = ctypes.c_void_p

#: Steps per buffer of saved results (as bnlstm_lit.nn.fused.CHUNK).
CHUNK = 8

#: With the input projection inside the recurrence (``weight_ih`` given), W_x x_t is recomputed in the backward
#: instead of saved when I <= RECOMPUTE_MAX_RATIO * H: one (K B, I) x (I, 4H) matmul per chunk, cheap next to the
#: chunk's K recurrent (B, H) x (H, 4H) matmuls, for 4H floats per row and step less memory held for the backward.
#: Measured (2 cores): memory saved for backward 0.90x -> 0.66x nn.LSTM's at the sequential-MNIST shape, 0.95x ->
#: 0.71x at PTB, and a training step no slower (194 against 222 ms at MNIST, 527 against 541 ms at PTB).
RECOMPUTE_MAX_RATIO = 0.25


def _pointers(names: str) -> list[tuple[str, Any]]:
    return [(name, _p) for name in names.split()]


_SIZES: list[tuple[str, Any]] = [("B", ctypes.c_int64), ("H", ctypes.c_int64), ("threads", ctypes.c_int64)]


class _ForwardArgs(ctypes.Structure):
    """bnlstm_forward_args of bnlstm_kernel.c (checked against its size on load)."""

    _fields_ = [*_SIZES, ("keep", ctypes.c_int64), ("input_bn", ctypes.c_int64)]
    _fields_ += [("eps", ctypes.c_double), ("eps_x", ctypes.c_double)]
    _fields_ += _pointers("x gamma_x bias mean_x invstd_x c_before gamma_h gamma_c beta_c h c wh act tc")
    _fields_ += _pointers("mean_h invstd_h mean_c invstd_c work fwork")


class _BackwardArgs(ctypes.Structure):
    """bnlstm_backward_args of bnlstm_kernel.c."""

    _fields_ = [*_SIZES, ("input_bn", ctypes.c_int64), ("eps", ctypes.c_double)]
    _fields_ += _pointers("x mean_x invstd_x gamma_x dgamma_x dbias dh_out act tc wh c c_before mean_h invstd_h")
    _fields_ += _pointers("mean_c invstd_c gamma_h gamma_c dc dpre dwh dgamma_h dgamma_c dbeta_c work fwork scratch")


class _PopulationArgs(ctypes.Structure):
    """bnlstm_population_args of bnlstm_kernel.c."""

    _fields_ = [*_SIZES, *_pointers("x scale_x shift_x scale_h scale_c shift_c h c")]


# ---------------------------------------------------------------------------------------------------------------------
# building and loading


def enabled() -> bool:
    """False when ``BNLSTM_LIT_KERNEL`` turns the kernel off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF


def cache_dir() -> Path:
    """Where built libraries live: ``$BNLSTM_LIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/bnlstm_lit``, else
    ``~/.cache/bnlstm_lit``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bnlstm_lit"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _variants() -> list[list[str]]:
    """The flag sets to try, in order."""
    return [FLAGS + OPENMP_FLAGS, FLAGS]


def library_path(flags: list[str] | None = None) -> Path:
    """The cached library for the current source, compiler, flags (default: the first variant) and platform."""
    flags = _variants()[0] if flags is None else flags
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler().encode(), " ".join(flags).encode()):
        key.update(part)
        key.update(b"\0")
    key.update(f"{platform.system()}-{platform.machine()}".encode())
    return cache_dir() / f"bnlstm_kernel-{key.hexdigest()[:16]}.so"


def _compile(target: Path, flags: list[str]) -> None:
    """Compile SOURCE into target atomically (a temporary file in the same folder, renamed into place)."""
    compiler = shutil.which(_compiler())
    if compiler is None:
        raise RuntimeError(f"no C compiler {_compiler()!r} found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({result.returncode}): {result.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.bnlstm_kernel_abi.argtypes = [ctypes.c_int]
    lib.bnlstm_kernel_abi.restype = ctypes.c_int64
    for which, struct in enumerate((_ForwardArgs, _BackwardArgs, _PopulationArgs)):
        if lib.bnlstm_kernel_abi(which) != ctypes.sizeof(struct):
            raise RuntimeError(f"{path}: argument layout {which} does not match its declaration")
    for name in ("bnlstm_forward_step", "bnlstm_backward_step", "bnlstm_population_step"):
        fn = getattr(lib, name)
        fn.argtypes = [_p, ctypes.c_int64, _p]
        fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when turned off (``BNLSTM_LIT_KERNEL=0``) or when it
    cannot be built or loaded (one warning per process; the callers then run the eager path)."""
    if not enabled():
        return None
    if "lib" in _state:
        return _state["lib"]
    lib = None
    errors = []
    for flags in _variants():
        try:
            path = library_path(flags)
            if not path.exists():
                _compile(path, flags)
            lib = _load(path)
            break
        except Exception as error:  # no compiler, a failed build, an unwritable cache: try the next, then eager
            errors.append(error)
    if lib is None and errors:
        last = errors[-1]
        if not _state.get("warned"):
            _state["warned"] = True
            warnings.warn(
                f"bnlstm_lit: the native BN-LSTM kernel could not be built or loaded ({type(last).__name__}: "
                f"{str(last)[:300]}); running the eager fused path (set {ENV_SWITCH}=0 to silence this)",
                stacklevel=3,
            )
    _state["lib"] = lib
    return lib


def reset() -> None:
    """Forget the loaded library and the warning (tests: a changed environment is looked at again)."""
    _state.clear()


def usable(*tensors: Tensor) -> bool:
    """The kernel applies: float32 CPU tensors, and the library is available (built on first call)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return library() is not None


def refuse_double_backward() -> None:
    """The hand-written backwards (here and in :mod:`bnlstm_lit.nn.fused`) are not differentiable themselves."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused BN-LSTM recurrence cannot be differentiated twice (create_graph=True: gradient penalties, "
            "Hessian-vector products); use BNLSTM(fused=False) for that"
        )


def _threads(elements: int) -> int:
    """Threads for a step of that many elements: torch's intra-op threads, or one for small steps."""
    return torch.get_num_threads() if elements >= PARALLEL_MIN else 1


# ---------------------------------------------------------------------------------------------------------------------
# the recurrences


def _linear_fn() -> Any:
    """bnlstm_lit.nn.fused._linear: x @ weight.T through oneDNN's matmul where the build has it (imported here:
    fused imports this module)."""
    from bnlstm_lit.nn.fused import _linear

    return _linear


#: Sequences of fewer steps keep the weight in the plain layout: the reorder costs about as much as some tens of small
#: step matmuls (measured ~100 us at B=32, H=64), more than its gain over a few steps (the runs of a masked batch).
PACK_MIN_STEPS = 16


def _step_matmul(weight: Tensor, batch: int, steps: int) -> Any:
    """x -> x @ weight.T for the (batch, ·) x of every step: oneDNN's matmul with the weight reordered once into its
    blocked layout for this batch size (measured: 15-20% faster per step at the PTB shape than the plain layout,
    bit-identical), where the build has the private ops and there are at least ``PACK_MIN_STEPS`` steps; else
    bnlstm_lit.nn.fused._linear."""
    linear = _linear_fn()
    ops = getattr(torch.ops, "mkldnn", None)
    op = getattr(ops, "_linear_pointwise", None)
    reorder = getattr(ops, "_reorder_linear_weight", None)
    if op is None or reorder is None or _state.get("no_packing") or steps < PACK_MIN_STEPS:
        return lambda x: linear(x, weight)
    try:
        packed = reorder(weight.detach(), batch)
        op(weight.new_zeros(batch, weight.shape[1]), packed, None, "none", [], "")  # the packed weight works here
    except Exception:  # another build's ops: the plain layout from now on
        _state["no_packing"] = True
        return lambda x: linear(x, weight)
    return lambda x: op(x, packed, None, "none", [], "")


def _project(linear: Any, x: Tensor, weight_ih: Tensor, start: int, steps: int) -> Tensor:
    """W_x x_t for the steps start ... start + steps - 1 of x (T, B, I): one matmul (``linear``, from
    :func:`_linear_fn`), (steps * B, 4H)."""
    return linear(x[start : start + steps].reshape(steps * x.shape[1], -1), weight_ih)


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


class _KernelRecurrence(torch.autograd.Function):
    """The training-mode recurrence of :class:`bnlstm_lit.nn.fused._BNLSTMRecurrence`, each step's pointwise and
    batch-norm work one kernel call. Same inputs and outputs (float32 CPU), and optionally the input term's batch norm
    too: with ``gamma_x`` and ``bias`` given, the first input is W_x x_t (T, B, 4H) and the kernel computes
    BN_t(W_x x_t; γ_x) + b per step (its statistics are two more outputs), so the input term never exists as a
    separate (T, B, 4H) tensor and its normalization costs no extra passes over memory. With ``weight_ih`` W_x given
    as well, the first input is x (T, B, I) and W_x x_t is one matmul per chunk, into a chunk buffer (saved for the
    backward, or recomputed there where I <= ``RECOMPUTE_MAX_RATIO`` H); backward, the chunk's d(W_x x_t) goes into
    the gradients of x and W_x right away. This avoids two (T, B, 4H) tensors (W_x x and its gradient, 100-125 MB
    each at the paper's sequential-MNIST and PTB shapes), fresh pages from the OS on every training step: measured
    here, filling a fresh 125 MB tensor took 28 ms against 1.7 ms for a reused one.

    As in the eager path, the saved per-step results (W_h h_{t-1}, the gate activations, c_t, tanh(BN(c_t))) live in
    buffers of ``CHUNK`` steps, not in (T, B, ·) tensors: buffers of a few MiB are recycled by the allocator from one
    training step to the next, whereas fresh (T, B, 4H) buffers are new pages from the OS every time (at the
    sequential-MNIST shape their page faults cost more than the kernel's arithmetic). The kernel writes into the
    chunk's buffers directly, through pointers moved once per chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
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
    ) -> tuple[Tensor, ...]:
        lib = library()
        assert lib is not None
        T, B, _ = x_in.shape
        G = weight_hh.shape[0]
        H = G // 4
        input_bn = gamma_x is not None
        project = weight_ih is not None  # x_in is the layer's input x (T, B, I): W_x x_t computed chunk by chunk
        assert input_bn or not project
        recompute = project and x_in.shape[-1] <= RECOMPUTE_MAX_RATIO * H  # W_x x_t again in the backward
        x_in, c0 = x_in.contiguous(), c0.contiguous()
        gamma_h, gamma_c, beta_c = gamma_h.contiguous(), gamma_c.contiguous(), beta_c.contiguous()
        save = any(ctx.needs_input_grad)
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
        step, matmul, linear = lib.bnlstm_forward_step, _step_matmul(weight_hh, B, T), _linear_fn()
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
        ctx.eps = eps
        ctx.chunks = len(cs)
        ctx.input_bn = input_bn
        ctx.project = project
        ctx.recompute = recompute
        if save:
            inputs: tuple[Tensor | None, ...] = (x_in, mean_x, invstd_x, gamma_x) if input_bn else ()
            if project:
                inputs += (weight_ih,)
            ctx.save_for_backward(
                h0, c0, weight_hh, gamma_h, gamma_c, h_all, mean_h, invstd_h, mean_c, invstd_c, *inputs, *cs, *whs,
                *acts, *tcs, *wxs,
            )  # fmt: skip
        ctx.mark_non_differentiable(mean_h, invstd_h, mean_c, invstd_c, mean_x, invstd_x)
        return h_all, c_before.clone(), mean_h, invstd_h, mean_c, invstd_c, mean_x, invstd_x

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_h_all: Tensor | None, grad_c_last: Tensor | None, *unused: Any
    ) -> tuple[Tensor | None, ...]:
        refuse_double_backward()
        lib = library()
        assert lib is not None
        saved = ctx.saved_tensors
        h0, c0, weight_hh, gamma_h, gamma_c, h_all, mean_h, invstd_h, mean_c, invstd_c = saved[:10]
        project = ctx.project
        first = 10 + 4 * ctx.input_bn + project
        n = ctx.chunks
        cs, whs, acts, tcs = (saved[first + j * n : first + (j + 1) * n] for j in range(4))
        wxs = saved[first + 4 * n :]  # W_x x_t per chunk, where saved (not recomputed)
        T, B, H = h_all.shape
        G = 4 * H
        new = h_all.new_empty
        needs = ctx.needs_input_grad
        dh_out = torch.zeros_like(h_all) if grad_h_all is None else grad_h_all.contiguous()
        dc = torch.zeros_like(c0) if grad_c_last is None else grad_c_last.contiguous().clone()  # updated in place
        # the gradient of x_in: with project, of x (T, B, I) and of W_x, from each chunk's d(W_x x_t) (a chunk buffer);
        # else of x_in itself (T, B, 4H)
        dpre = None if project else new(T, B, G)
        dgamma_h, dgamma_x, dbias = (h_all.new_zeros(G, dtype=torch.float64) for _ in range(3))
        dgamma_c, dbeta_c = h_all.new_zeros(H, dtype=torch.float64), h_all.new_zeros(H, dtype=torch.float64)
        work, fwork, scratch = h_all.new_empty(4 * G, dtype=torch.float64), new(6 * G), new(B, H)
        args = _BackwardArgs(B, H, _threads(B * G), int(ctx.input_bn), float(ctx.eps))
        fixed = {"gamma_h": gamma_h, "gamma_c": gamma_c, "dc": dc, "dgamma_h": dgamma_h, "dgamma_c": dgamma_c}
        fixed.update(dbeta_c=dbeta_c, work=work, fwork=fwork, scratch=scratch)
        per_step = {"dh_out": dh_out, "mean_h": mean_h, "invstd_h": invstd_h, "mean_c": mean_c, "invstd_c": invstd_c}
        x_in = weight_ih = dx = dweight_ih = weight_ih_t = None
        if ctx.input_bn:
            x_in, mean_x, invstd_x, gamma_x = saved[10:14]
            fixed.update(gamma_x=gamma_x, dgamma_x=dgamma_x, dbias=dbias)
            per_step.update(mean_x=mean_x, invstd_x=invstd_x)
        if project:
            assert x_in is not None
            weight_ih = saved[14]
            dx = new(x_in.shape) if needs[0] else None
            dweight_ih = torch.zeros_like(weight_ih) if needs[9] else None
            weight_ih_t = weight_ih.t().contiguous() if needs[0] else None
        else:
            per_step.update(dpre=dpre)
            if ctx.input_bn:
                per_step.update(x=x_in)
        for name, t in fixed.items():
            setattr(args, name, t.data_ptr())
        step, ref, linear = lib.bnlstm_backward_step, ctypes.addressof(args), _linear_fn()
        matmul = _step_matmul(weight_hh.t().contiguous(), B, T)  # dh = dwh @ W_h
        dweight = torch.zeros_like(weight_hh) if needs[3] else None
        dh = torch.zeros_like(c0)
        for chunk in range(n - 1, -1, -1):
            start = chunk * CHUNK
            K = cs[chunk].shape[0]
            dwh = new(K, B, G)
            args.c, args.wh, args.act, args.tc = (
                t.data_ptr() for t in (cs[chunk], whs[chunk], acts[chunk], tcs[chunk])
            )
            args.c_before = (cs[chunk - 1][-1] if chunk > 0 else c0).data_ptr()
            args.dwh = dwh.data_ptr()
            if project:
                assert x_in is not None and weight_ih is not None
                dwx = new(K, B, G)  # d(W_x x_t) of the chunk's steps
                if ctx.recompute:  # the forward's matmul again (same op and operands)
                    wx_k = _project(linear, x_in, weight_ih, start, K)
                else:
                    wx_k = wxs[chunk]
                args.x, args.dpre = wx_k.data_ptr(), dwx.data_ptr()
            for name, buf in per_step.items():
                setattr(args, name, buf[start].data_ptr())
            for k in range(K - 1, -1, -1):
                step(ref, k, dh.data_ptr())
                dh = matmul(dwh[k]).contiguous()  # dL/dh_{t-1} through step t
            if project:  # the chunk's part of the gradients of x and W_x
                assert x_in is not None
                dwx_2d = dwx.view(K * B, G)
                if dx is not None:
                    assert weight_ih_t is not None
                    dx[start : start + K].view(K * B, -1).copy_(linear(dwx_2d, weight_ih_t))
                if dweight_ih is not None:
                    dweight_ih.addmm_(dwx_2d.t(), x_in[start : start + K].reshape(K * B, -1))
            if dweight is not None:  # the chunk's sum_t dwh_t^T h_{t-1} as one matmul (two for the first chunk)
                if start == 0:
                    dweight += linear(dwh[0].t(), h0.contiguous().t())
                    if K > 1:
                        dweight += linear(dwh[1:].reshape((K - 1) * B, G).t(), h_all[: K - 1].reshape(-1, H).t())
                else:
                    h_prev = h_all[start - 1 : start + K - 1].reshape(K * B, H)
                    dweight += linear(dwh.reshape(K * B, G).t(), h_prev.t())
        return (
            (dx if project else dpre) if needs[0] else None,
            dh if needs[1] else None,
            dc if needs[2] else None,
            dweight,
            dgamma_h.float() if needs[4] else None,
            dgamma_c.float() if needs[5] else None,
            dbeta_c.float() if needs[6] else None,
            dgamma_x.float() if needs[7] else None,
            dbias.float() if needs[8] else None,
            dweight_ih,
            None,
            None,
        )


def kernel_recurrence(
    x_terms: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As ``_BNLSTMRecurrence.apply`` (float32 CPU; check :func:`usable` first): h_t for every step (T, B, H),
    c_T (B, H), the per-step batch means and inverse standard deviations (T, 4H), (T, 4H), (T, H) and (T, H)."""
    out = _KernelRecurrence.apply(x_terms, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, None, None, None, eps, 0.0)
    return out[:6]


def kernel_recurrence_input_norm(
    wx: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    gamma_h: Tensor,
    gamma_c: Tensor,
    beta_c: Tensor,
    gamma_x: Tensor,
    bias: Tensor,
    eps: float,
    eps_x: float,
    weight_ih: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """:func:`kernel_recurrence` with the input term's batch norm inside: wx = W_x x_t (T, B, 4H), and each step's
    input term is BN_t(wx_t; γ_x, ε_x) + bias with batch statistics. Returns the outputs of :func:`kernel_recurrence`
    and the input term's per-step batch means and inverse standard deviations (T, 4H) each.

    With ``weight_ih`` W_x (4H, I), ``wx`` is the layer's input x (T, B, I) instead, and W_x x_t is computed chunk
    by chunk (``CHUNK`` steps, one matmul each), forward and backward: no (T, B, 4H) tensor exists, neither W_x x nor
    its gradient (at the paper's shapes each is 100-125 MB, fresh pages from the OS on every training step).
    Gradients flow to x and W_x."""
    args = (gamma_x, bias, weight_ih, eps, eps_x)
    return _KernelRecurrence.apply(wx, h0, c0, weight_hh, gamma_h, gamma_c, beta_c, *args)


def population_kernel_recurrence(
    wx: Tensor,
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
    """:func:`bnlstm_lit.nn.fused.population_recurrence` without gradients (float32 CPU; check :func:`usable`), the
    input term folded in too: step t's input term is shift_x[t] + wx[t] * scale_x[t] (wx = W_x x_t (T, B, 4H);
    scale_x, shift_x (T, 4H), the shift including b and the recurrent term's shift).

    With ``weight_ih`` W_x (4H, I), ``wx`` is the layer's input x (T, B, I) and W_x x_t is computed ``CHUNK`` steps
    at a time (no (T, B, 4H) tensor)."""
    lib = library()
    assert lib is not None
    T, B, _ = wx.shape
    G = weight_hh.shape[0]
    H = G // 4
    project = weight_ih is not None
    wx, scale_x, shift_x, scale_h, scale_c, shift_c = (
        t.contiguous() for t in (wx, scale_x, shift_x, scale_h, scale_c, shift_c)
    )
    h_all = wx.new_empty(T, B, H)
    c = c0.contiguous().clone()  # carried in place
    args = _PopulationArgs(B, H, _threads(B * G))
    args.c = c.data_ptr()
    per_step = {"scale_x": scale_x, "shift_x": shift_x, "scale_h": scale_h, "scale_c": scale_c, "shift_c": shift_c}
    per_step["h"] = h_all
    if not project:
        per_step["x"] = wx
    step, matmul, linear = lib.bnlstm_population_step, _step_matmul(weight_hh, B, T), _linear_fn()
    h = h0.contiguous()
    for start in range(0, T, CHUNK):
        K = min(CHUNK, T - start)
        if project:
            assert weight_ih is not None
            wx_k = _project(linear, wx, weight_ih, start, K)  # alive during the chunk
            args.x = wx_k.data_ptr()
        h = _run_steps(args, per_step, start, K, step, matmul, h, h_all)
    return h_all, (h, c)
