"""lmgen's cache folder ($LMGEN_CACHE, else ~/.cache/lmgen) and atomic writes into it."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np


def cache_root() -> Path:
    """lmgen's cache folder: $LMGEN_CACHE, else $XDG_CACHE_HOME/lmgen, else ~/.cache/lmgen."""
    root = os.environ.get("LMGEN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lmgen")
    return Path(root).expanduser()


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(temp) on a temporary file beside path, then rename it to path: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer (not mkstemp's: its 0600 mode would stick to the file).
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def cached_array(kind: str, key: bytes, build: Callable[[], np.ndarray],
                 valid: Callable[[np.ndarray], bool]) -> np.ndarray:
    """build() once per key, kept as <cache>/<kind>/<sha256 of key>.npy; a file that fails valid() is rebuilt."""
    # Only a speed-up: an unreadable or unwritable folder means building every time.
    path = cache_root() / kind / f"{hashlib.sha256(key).hexdigest()[:32]}.npy"
    try:
        array = np.load(path, allow_pickle=False)
        if valid(array):
            return array
    except (OSError, ValueError, EOFError):  # absent, truncated or not an .npy file
        pass
    array = build()

    def save(temp: Path) -> None:
        with temp.open("wb") as f:
            np.save(f, array, allow_pickle=False)

    try:
        write_atomic(path, save)
    except OSError:
        pass
    return array
