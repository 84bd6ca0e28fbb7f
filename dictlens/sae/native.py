"""The compiled CPU kernels of ``native.c``: built on first use, loaded through ctypes.

The C source ships with the package; the first call compiles it with the system's C compiler
(``cc -O3 -march=native``: the machine's own vector units, AVX-512 where it has them) into a
cache directory, keyed by the source, the flags and the machine, written atomically (a temp
file renamed, so ranks compiling at once do not see a half-written library). Each wrapper
here checks its tensors (CPU, contiguous, the dtype) and returns None when the library cannot
be used, so that every caller keeps its eager PyTorch path: where there is no compiler, or with
``DICTLENS_NATIVE=0``, dictlens runs on eager PyTorch alone, only slower. ``status()`` says which
(bench/step.py prints it).

ctypes drops the GIL for the duration of each call; the kernels split their rows over
``torch.get_num_threads()`` POSIX threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why: str | None = None  # why the library is not in use; None until first tried
_off = 0  # > 0 inside disabled()


def cache_dir() -> Path:
    """Where built libraries are kept: $DICTLENS_CACHE/native, else ~/.cache/dictlens/native."""
    if os.environ.get("DICTLENS_CACHE"):
        return Path(os.environ["DICTLENS_CACHE"]) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dictlens" / "native"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(src + repr((FLAGS, version, platform.machine(), _cpu_flags())).encode()).hexdigest()[:16]
    out = cache_dir() / f"native-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".native-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        errors = ""
        # the machine's own vector units (512-bit ones where x86 has them) and OpenMP (torch's
        # libgomp, already loaded, is the one the library binds to); a compiler that knows none
        # of these flags still builds
        for arch in (["-fopenmp", "-march=native", "-mprefer-vector-width=512"], ["-fopenmp", "-march=native"],
                     ["-march=native"], []):
            done = subprocess.run([cc, *FLAGS, *arch, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, out)
                return out
            errors = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise OSError(f"{cc} could not build {SOURCE.name}: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_flags() -> str:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return platform.processor()
    for line in info.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return line.split(":", 1)[1].strip()
    return ""


_i64, _f, _int, _p = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "dl_topk_rows": (_int, [_p, _int, _i64, _i64, _i64, _i64, _i64, _p, _p, _int]),
    "dl_sddmm": (None, [_i64, _i64, _p, _p, _p, _p, _p, _p, _int]),
    "dl_spmm": (None, [_i64, _i64, _p, _p, _p, _p, _p, _int, _p, _p, _p, _int]),
    "dl_decode_backward": (None, [_i64, _i64, _p, _p, _p, _p, _p, _int, _p, _p, _p, _int]),
    "dl_transpose": (_int, [_i64, _i64, _p, _p, _p, _p, _p, _int]),
    "dl_project_rows": (None, [_i64, _i64, _p, _p, _int]),
    "dl_normalize_rows": (None, [_i64, _i64, _p, _f, _int]),
    "dl_sfadam": (None, [_i64, _p, _p, _p, _p, _f, _f, _f, _f, _f, _f, _f, _i64, _int]),
}


@contextmanager
def disabled() -> Iterator[None]:
    """Eager PyTorch only, inside the block (what tests and bench/step.py compare against)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def library() -> ctypes.CDLL | None:
    """The loaded library, building it the first time; None where it cannot be used."""
    global _lib, _why
    if _off:
        return None
    if _lib is not None or _why is not None:
        return _lib
    with _lock:
        if _lib is not None or _why is not None:
            return _lib
        if os.environ.get("DICTLENS_NATIVE", "1") == "0":
            _why = "off (DICTLENS_NATIVE=0)"
            return None
        cc = _compiler()
        if cc is None:
            _why = "no C compiler found (install gcc, or set CC)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                for name, (res, args) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = res, args
                _lib = lib
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                _why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _lib is None:
            warnings.warn(f"dictlens: compiled CPU kernels unavailable ({_why}); using eager PyTorch, which is slower",
                          RuntimeWarning, stacklevel=3)
        return _lib


def status() -> str:
    """'compiled kernels (PATH)' or why not."""
    lib = library()
    if lib is not None:
        return f"compiled kernels ({lib._name})"
    return "eager PyTorch (disabled)" if _off else f"eager PyTorch: {_why}"


def _ok(*ts: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    return all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in ts)


def _ptr(t: torch.Tensor) -> int:
    return int(t.data_ptr())


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _run(lib: ctypes.CDLL, name: str, *args: object) -> object:
    """``lib.name(*args)``, named in torch's profiler ("dictlens::name"), where ctypes calls are
    otherwise invisible (bench/step.py's table of where the step's time goes)."""
    with torch.profiler.record_function(f"dictlens::{name}"):
        return getattr(lib, name)(*args)


def usable() -> bool:
    """Whether the library is built (and not disabled)."""
    return library() is not None


def _lib_for(floats: tuple[torch.Tensor | None, ...] = (),
             longs: tuple[torch.Tensor | None, ...] = (), rows: torch.Tensor | None = None) -> ctypes.CDLL | None:
    """The library, if it is usable and the given tensors (None: absent) are CPU and contiguous,
    ``floats`` float32, ``longs`` int64 and ``rows`` float32 or bfloat16; else None, and the
    caller takes its eager path."""
    lib = library()
    ok = _ok(*(t for t in floats if t is not None)) and _ok(*(t for t in longs if t is not None), dtype=torch.long)
    if rows is not None:
        ok = ok and _ok(rows, dtype=rows.dtype) and rows.dtype in (torch.float32, torch.bfloat16)
    return lib if ok else None


def topk_rows(block: torch.Tensor, k: int, idx: torch.Tensor, vals: torch.Tensor | None = None,
              groups: int = 0) -> bool:
    """Each row's k largest values of ``block`` [n, F] (float32 or bfloat16, rows contiguous):
    columns into ``idx`` [n, k] (int64, contiguous), values into ``vals`` [n, k] float32 if given.
    Exact; ties at the k-th place go to the highest columns (NaN ranked first, like torch.topk, where its sign
    bit is clear).
    ``groups``: the column groups of the bound (0: chosen for k and F; any count is exact).
    False where the library cannot be used (or ran out of memory): rank with torch instead."""
    lib = _lib_for((vals,), (idx,))
    n, f = block.shape
    if (lib is None or block.device.type != "cpu" or block.dtype not in (torch.float32, torch.bfloat16)
            or block.stride(1) != 1 or not 0 < k <= f < 2 ** 31):
        return False
    failed = _run(lib, "dl_topk_rows", _ptr(block), int(block.dtype == torch.bfloat16), n, f, block.stride(0), k,
                  groups, _ptr(idx), _ptr(vals) if vals is not None else None, _threads())
    return not failed


def sddmm(crow: torch.Tensor, cols: torch.Tensor, a_BD: torch.Tensor, b_FD: torch.Tensor,
          bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """[nnz]: a[row]·b[col] (+ bias[col]) for every pair of the CSR pattern; None if unusable."""
    lib = _lib_for((a_BD, b_FD, bias), (crow, cols))
    if lib is None:
        return None
    out = torch.empty(cols.numel(), dtype=torch.float32)
    _run(lib, "dl_sddmm", a_BD.shape[0], a_BD.shape[1], _ptr(crow), _ptr(cols), _ptr(a_BD), _ptr(b_FD),
         _ptr(bias) if bias is not None else None, _ptr(out), _threads())
    return out


def spmm(crow: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, dense: torch.Tensor, n_rows: int,
         perm: torch.Tensor | None = None, sums: bool = False,
         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """[n_rows, D]: row r = (bias, if given) + Σ over its pairs n of w[perm[n] or n] · dense[cols[n]];
    with ``sums`` also each row's Σ of those weights [n_rows]. ``dense`` float32 or bfloat16 (its
    rows widened exactly; the sums are float32). None if unusable."""
    lib = _lib_for((w, bias), (crow, cols, perm), rows=dense)
    if lib is None or bias is not None and bias.shape != (dense.shape[1],):
        return None
    out = torch.empty(n_rows, dense.shape[1], dtype=torch.float32)
    total = torch.empty(n_rows, dtype=torch.float32) if sums else None
    _run(lib, "dl_spmm", n_rows, dense.shape[1], _ptr(crow), _ptr(cols), _ptr(perm) if perm is not None else None,
         _ptr(w), _ptr(dense), int(dense.dtype == torch.bfloat16), _ptr(bias) if bias is not None else None,
         _ptr(out), _ptr(total) if total is not None else None, _threads())
    return out, total


def decode_backward(crow_t: torch.Tensor, rows_t: torch.Tensor, perm: torch.Tensor, vals: torch.Tensor,
                    g_BD: torch.Tensor, W_FD: torch.Tensor,
                    need_gv: bool = True) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """The decoder's two gradients in one sweep over the transposed pattern: gv [nnz] =
    g[row]·W[col] per pair and gW [F, D] = Σ vals · g[row] per feature (``g_BD`` float32 or
    bfloat16). None if unusable."""
    lib = _lib_for((vals, W_FD), (crow_t, rows_t, perm), rows=g_BD)
    if lib is None:
        return None
    gv = torch.empty(vals.numel(), dtype=torch.float32) if need_gv else None
    gW = torch.empty_like(W_FD)
    _run(lib, "dl_decode_backward", W_FD.shape[0], W_FD.shape[1], _ptr(crow_t), _ptr(rows_t), _ptr(perm), _ptr(vals),
         _ptr(g_BD), int(g_BD.dtype == torch.bfloat16), _ptr(W_FD), _ptr(gv) if gv is not None else None, _ptr(gW),
         _threads())
    return gv, gW


def transpose(crow: torch.Tensor, cols: torch.Tensor,
              n_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The pattern by feature: (perm, crow_t, rows_t), pairs of a feature in row order; None if unusable."""
    lib = _lib_for(longs=(crow, cols))
    if lib is None:
        return None
    nnz = cols.numel()
    crow_t = torch.empty(n_features + 1, dtype=torch.long)
    perm, rows_t = torch.empty(nnz, dtype=torch.long), torch.empty(nnz, dtype=torch.long)
    if _run(lib, "dl_transpose", crow.numel() - 1, n_features, _ptr(crow), _ptr(cols), _ptr(crow_t), _ptr(perm),
            _ptr(rows_t), _threads()):
        return None  # out of memory: the caller sorts with torch
    return perm, crow_t, rows_t


def project_rows(W: torch.Tensor, g: torch.Tensor) -> bool:
    """g[f] −= (g[f]·W[f]) W[f] for every row, in place (W's rows of unit norm); False if unusable."""
    lib = _lib_for((W, g))
    if lib is None or W.shape != g.shape or W.ndim != 2:
        return False
    _run(lib, "dl_project_rows", W.shape[0], W.shape[1], _ptr(W), _ptr(g), _threads())
    return True


def normalize_rows(W: torch.Tensor, least: float = 1e-12) -> bool:
    """W[f] /= max(‖W[f]‖, least) for every row, in place, in one pass; False if unusable."""
    lib = _lib_for((W,))
    if lib is None or W.ndim != 2 or W.requires_grad and torch.is_grad_enabled():
        return False
    _run(lib, "dl_normalize_rows", W.shape[0], W.shape[1], _ptr(W), least, _threads())
    return True


def sfadam_step(p: torch.Tensor, z: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, beta2: float, eps_bc: float,
                wd: float, c: float, a: float, b: float, unit_rows: bool = False) -> bool:
    """One schedule-free AdamW update of p, z, v in place from g (see ScheduleFreeAdam.step);
    with ``unit_rows`` (p [rows, D], rows of unit norm) g is first projected off p's rows (in
    place, as project_rows) and p's rows renormalised after (as normalize_rows), in the same
    pass. False (nothing changed) if unusable."""
    lib = _lib_for((p, z, v, g))
    if lib is None or p.requires_grad and torch.is_grad_enabled() or unit_rows and p.ndim != 2:
        return False
    _run(lib, "dl_sfadam", p.numel(), _ptr(p), _ptr(z), _ptr(v), _ptr(g), beta2, 1 - beta2, eps_bc, wd, c, a, b,
         p.shape[1] if unit_rows else 0, _threads())
    return True
