"""Building and loading the native BN-LSTM kernel (``bnlstm_kernel.c``): compiler, cache, ABI check.

The numerical code that calls it is :mod:`bnlstm_lit.nn.native`; this module knows nothing of the recurrence.

The C source ships with the package and is compiled on first use with the system C compiler (``$CC``, else ``cc``)
into a per-user cache, ``$BNLSTM_LIT_CACHE_DIR`` or ``$XDG_CACHE_HOME/bnlstm_lit`` or ``~/.cache/bnlstm_lit``, under a
name keyed by a hash of the source, the compiler, the flags and the platform; written to a temporary file and renamed
into place, so concurrent processes (DDP) are safe and later processes load it without compiling (about a second
the first time). ``BNLSTM_LIT_KERNEL=0`` (or ``false``/``off``/``no``) turns the kernel off: nothing is built and the
eager fused path runs. Without a working compiler the eager path runs too, with one warning per process.

The library is built with OpenMP where the compiler has it and its ``libgomp.so.1`` resolves to the copy torch has
loaded, so torch's matmuls and the kernel share one thread pool. On x86-64 Linux the loops are compiled for AVX-512,
AVX2 and the baseline, chosen at load time, with bit-identical results (tested: each variant built alone).

The argument structures below mirror the C declarations; :func:`_load` checks their sizes against the library's.
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

__all__ = ["available", "cache_dir", "enabled", "library", "library_path", "reset"]

SOURCE = Path(__file__).with_name("bnlstm_kernel.c")
#: Portable flags: no -march (the cache may be shared by machines), no -ffast-math (the results must match torch's).
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
#: Tried first: the step's column blocks on torch's OpenMP threads (the library then needs ``libgomp.so.1``, which
#: resolves to the copy torch has loaded, so the kernel and torch's matmuls share one thread pool). Where the compiler
#: has no OpenMP, or the library does not load, the kernel is built without it (one thread).
OPENMP_FLAGS = ["-fopenmp"]
ENV_SWITCH = "BNLSTM_LIT_KERNEL"
ENV_CACHE = "BNLSTM_LIT_CACHE_DIR"
_OFF = {"0", "false", "off", "no"}

_state: dict[str, Any] = {}  # "lib": the loaded library or None after a failure; "warned": a warning was given

_p = ctypes.c_void_p


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
    cannot be built or loaded (one warning per process; the dispatcher then runs the eager path)."""
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


def available() -> bool:
    """The library is available (built and loaded on first call). A constant for ``torch.compile``: the dispatcher
    asks it while tracing, and a compiled graph is not traced again when it changes."""
    return library() is not None


# What torch.compiler.assume_constant_result does (it sets this one attribute), without importing torch._dynamo at
# import time: the public decorator imports it eagerly, about 2 s of start-up for every CLI call.
available._dynamo_marked_constant = True  # type: ignore[attr-defined]
