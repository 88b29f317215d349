"""Native CPU kernels, built from C source at first use with the system's C compiler and cached on disk.

matmul.c: the 4-bit and 8-bit weight matmuls behind quantize="int4". Without a C compiler the int4 layers
fall back to torch (dequantized weights, or torch's int8 kernel): the same weights, slower. `native()` says which.
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
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("matmul.c")
# tried in order: the host's own vector units first, then portable C; OpenMP threads when the compiler has them
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])


def cache_dir() -> Path:
    """Where built kernels live: $LMGEN_CACHE, else ~/.cache/lmgen."""
    root = os.environ.get("LMGEN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lmgen")
    return Path(root).expanduser() / "kernels"


def _cpu_id() -> str:
    # the build is specific to this CPU (-march=native): key it by the CPU's feature flags
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(source: Path = SOURCE, flag_sets=FLAG_SETS) -> Path | None:
    """The shared library for `source`, compiled now unless cached; None when no compiler can build it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    text = source.read_bytes()
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(text + repr((compiler, flags, _cpu_id())).encode()).hexdigest()[:16]
        out = cache_dir() / f"{source.stem}-{key}.so"
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            cmd = [compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(tmp_out), "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
                continue
            if done.returncode == 0:
                os.replace(tmp_out, out)  # atomic: a concurrent process sees the whole file or none
                return out
            errors.append(done.stderr.strip()[-300:])
    warnings.warn(f"could not build {source.name} with {compiler}: {errors[-1] if errors else ''}", stacklevel=2)
    return None


class Kernels:
    """The loaded matmul.c library: y = x @ W.T for 4-bit blocks or int8 rows, and whether it runs vectorized."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
        self.lib.q4_matmul.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3
        self.lib.q8_matmul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
        self.simd = bool(self.lib.simd())

    def q4_matmul(self, x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] float32 times the 4-bit weight (qs [N, K/2], d and m [N, K/32] float16), plus bias."""
        x, y = _operands(x, d.shape[0])
        bias_ptr = None if bias is None else bias.data_ptr()
        rc = self.lib.q4_matmul(x.data_ptr(), qs.data_ptr(), d.data_ptr(), m.data_ptr(), bias_ptr, y.data_ptr(),
                                x.shape[0], y.shape[1], x.shape[1])
        return _checked(rc, y)

    def q8_matmul(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 times int8 rows q [N, K] with float32 scales [N]."""
        x, y = _operands(x, q.shape[0])
        rc = self.lib.q8_matmul(x.data_ptr(), q.data_ptr(), scales.data_ptr(), y.data_ptr(), x.shape[0], y.shape[1],
                                x.shape[1])
        return _checked(rc, y)


def _operands(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.contiguous(), torch.empty(x.shape[0], n, dtype=torch.float32)


def _checked(rc: int, y: torch.Tensor) -> torch.Tensor:
    if rc:
        raise MemoryError(f"no memory for the quantized activations of a {tuple(y.shape)} matmul")
    return y


# as torch ops, so that torch.compile can call them (opaque calls in its graph)
@torch.library.custom_op("lmgen::q4_matmul", mutates_args=())
def q4_matmul(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """Kernels.q4_matmul as a torch op."""
    return native().q4_matmul(x, qs, d, m, bias)


@torch.library.custom_op("lmgen::q8_matmul", mutates_args=())
def q8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Kernels.q8_matmul as a torch op."""
    return native().q8_matmul(x, q, scales)


@q4_matmul.register_fake
def _(x, qs, d, m, bias):
    return x.new_empty(x.shape[0], d.shape[0])


@q8_matmul.register_fake
def _(x, q, scales):
    return x.new_empty(x.shape[0], q.shape[0])


@cache
def native() -> Kernels | None:
    """The native kernels, built on first use; None where they cannot be built (no C compiler)."""
    if os.environ.get("LMGEN_NO_NATIVE"):
        return None
    path = build()
    return Kernels(path) if path else None
