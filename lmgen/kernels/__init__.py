"""Native CPU kernels as torch operators, built from source at first use and cached on disk.

matmul.c holds the 4-bit and 8-bit weight matmuls behind quantize="int4", kquant.c those on a GGUF's Q5_0 and
K-quant blocks as the file has them, attention.c the attention of a decoding step over the cached positions
(plain C, with AVX2 paths), block.c a Llama layer's norm, rotary and SiLU steps; ops.cpp registers them as
torch.ops.lmgen.q4_matmul, q8_matmul, kq_matmul and decode_attention, and chained into whole layers as
layer_in, layer_out and decode_layers (models/fused.py). Building needs a C and a C++ compiler (torch's headers
ship with torch); without them lmgen runs on torch alone: the same weights and results, slower. `native()` says
which.
"""

from __future__ import annotations

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

from ..store import cache_root

HERE = Path(__file__).parent
C_SOURCES = (HERE / "matmul.c", HERE / "kquant.c", HERE / "attention.c", HERE / "block.c")
SOURCES = (*C_SOURCES, HERE / "ops.cpp")
HEADERS = (HERE / "simd.h", HERE / "half.h")  # included by the C sources: part of a build's key
WITHOUT = "int4 layers and decoding attention run through torch (slower)"  # what a failed build costs
# tried in order: the host's own vector units first, then portable C; OpenMP threads when the compiler has them
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])


def cache_dir() -> Path:
    """Where built kernels live: $LMGEN_CACHE, else ~/.cache/lmgen."""
    return cache_root() / "kernels"


@cache
def cpu_flags() -> str:
    """The CPU's feature flags line from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cpu_id() -> str:
    # a -march=native build is specific to this CPU: key it by the CPU's feature flags
    return platform.machine() + cpu_flags()


def _compilers() -> tuple[str, str] | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return (cc, cxx) if cc and cxx else None


def _commands(cc: str, cxx: str, flags: list[str], namespace: str, tmp: Path, out: Path) -> list[list[str]]:
    torch_dir = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    openmp = [f for f in flags if f == "-fopenmp"]
    # -Bsymbolic: ops.o calls this library's own matmul.c even when another build (another namespace) is loaded
    objects = [str(tmp / f"{c.stem}.o") for c in C_SOURCES]
    return [
        *([cc, *flags, "-ffp-contract=off", "-fPIC", "-c", str(c), "-o", o] for c, o in zip(C_SOURCES, objects)),
        [cxx, "-O2", "-std=c++20", "-fPIC", abi, f"-DLMGEN_OPS={namespace}", "-w", "-I", str(torch_dir / "include"),
         "-c", str(SOURCES[-1]), "-o", str(tmp / "ops.o")],
        [cxx, "-shared", "-Wl,-Bsymbolic", str(tmp / "ops.o"), *objects, *openmp,
         "-L", str(torch_dir / "lib"), "-Wl,-rpath," + str(torch_dir / "lib"), "-ltorch_cpu", "-lc10", "-lm",
         "-o", str(out)],
    ]


def build(namespace: str = "lmgen", flag_sets=FLAG_SETS) -> Path | None:
    """The operator library registering torch.ops.<namespace>, compiled now unless cached; None if it can't be."""
    tools = _compilers()
    if tools is None:
        warnings.warn(f"no C and C++ compiler found: {WITHOUT}", stacklevel=2)
        return None
    source = b"".join(s.read_bytes() for s in (*SOURCES, *HEADERS))
    builds = []  # (flags, library path) in order of preference
    for flags in flag_sets:
        commands = _commands(*tools, flags, namespace, Path("tmp"), Path("out"))  # every flag, torch's paths
        key = repr((commands, torch.__version__, _cpu_id())).encode()
        builds.append((flags, cache_dir() / f"{namespace}-{hashlib.sha256(source + key).hexdigest()[:16]}.so"))
    cached = next((out for _, out in builds if out.is_file()), None)
    if cached is not None:  # also a fallback build: a failing first choice isn't retried on every start
        return cached
    errors = []
    for flags, out in builds:
        try:
            return _compile(tools, flags, namespace, out)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:  # includes an unwritable cache folder
            errors.append(str(e))
    warnings.warn(f"could not build lmgen's native kernels ({' / '.join(tools)}): {errors[-1]}; "
                  + WITHOUT, stacklevel=2)
    return None


def _compile(tools: tuple[str, str], flags: list[str], namespace: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for cmd in _commands(*tools, flags, namespace, Path(tmp), Path(tmp) / out.name):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise RuntimeError(done.stderr.strip()[-300:] or f"{cmd[0]} exited {done.returncode}")
        os.replace(Path(tmp) / out.name, out)  # atomic: a concurrent process sees the whole file or none
    return out


def load(namespace: str = "lmgen", flag_sets=FLAG_SETS) -> bool:
    """Build (or reuse) and load the operator library for torch.ops.<namespace>; whether that worked."""
    path = build(namespace, flag_sets)
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:  # e.g. a cached build that this process cannot link
        warnings.warn(f"could not load {path}: {e}; {WITHOUT}", stacklevel=2)
        return False
    return True


@cache
def native() -> bool:
    """Whether torch.ops.lmgen's native kernels are loaded (built on first use); $LMGEN_NO_NATIVE turns them off."""
    return not os.environ.get("LMGEN_NO_NATIVE") and load()
