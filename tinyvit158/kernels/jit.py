"""What every kernel module shares: the JIT flavours, the job split, the output checks."""

from __future__ import annotations

import numba
import numpy as np

from tinyvit158.errors import TinyViTError

# error_model="numpy": a float division by zero gives inf instead of raising, which removes
# the check that keeps LLVM from vectorizing every loop holding a division (GELU ran 3.2x
# faster). No fastmath anywhere: every result is the IEEE one, in a documented order.
jit = numba.njit(cache=True, error_model="numpy")
pjit = numba.njit(cache=True, error_model="numpy", parallel=True)
ijit = numba.njit(cache=True, error_model="numpy", inline="always")  # small helpers in hot loops (and qattn's)
# Under NUMBA_DISABLE_JIT=1 the vector intrinsics cannot run as Python: each helper that
# uses them takes a plain NumPy branch instead (in compiled code the branch is dead).
PYTHON = bool(numba.config.DISABLE_JIT)


def job_count(units: int) -> int:
    """Parallel jobs for ``units`` rows (or other units of work): one per thread, each
    kernel giving job p the units ``[p U / P, (p + 1) U / P)``. Numba schedules a prange
    statically, so equal shares keep both cores busy: at batch 1 (65 rows), fixed 16-row
    jobs gave one core 48 rows and the other 17. (Passed in: a jitted call of
    ``numba.get_num_threads`` would keep the kernel out of Numba's cache.)"""
    return max(1, min(units, numba.get_num_threads()))


def check_f32_rows(x: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise TinyViTError(
            f"{what} expects float32 of shape (tokens, features), found "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    return np.ascontiguousarray(x)


def check_out(out: np.ndarray | None, shape: tuple[int, ...], dtype, what: str) -> np.ndarray:
    """``out`` when it is a C-contiguous array of ``shape`` and ``dtype``; a new one when None.

    The kernels' ``out=`` arguments let a caller (the engine) reuse its buffers: fresh
    multi-megabyte arrays cost a page fault per 4 KiB on first touch.
    """
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != shape or not out.flags.c_contiguous:
        raise TinyViTError(
            f"{what} must be a C-contiguous {np.dtype(dtype).name} array of shape {shape}, found "
            f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
        )
    return out


def codes_out(shape: tuple[int, int], out) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) arrays for ``shape`` (T, K) rows: ``out`` checked, or new ones."""
    q, s = out if out is not None else (None, None)
    return check_out(q, shape, np.int8, "codes"), check_out(s, shape[:1], np.float32, "scales")
