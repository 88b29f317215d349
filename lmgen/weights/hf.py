"""Hugging Face model folders: config.json and weights (safetensors, sharded or not, or pytorch_model.bin)."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError, CorruptFileError, ModelNotFoundError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
REQUIRED = object()  # config_value's default for keys a model cannot do without
# What each kind accepts (floats take ints: configs write 10000 for 10000.0) and how its error names it.
_KINDS = {int: ((int,), "an integer"), float: ((int, float), "a number"), bool: ((bool,), "true or false"),
          str: ((str,), "a string"), dict: ((dict,), "an object")}


def read_json(path: Path):
    """Parse a JSON file, naming it in the error when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON: {e}", path) from None


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    config = read_json(path)
    if not isinstance(config, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, found {type(config).__name__}", path)
    return config


def config_value(d: dict, key: str, kind: type, default=REQUIRED, *, path: object = None):
    """d[key] checked to be a `kind` (int, float, bool, str or dict); `default` when missing or null."""
    value = d.get(key)
    if value is None:
        if default is REQUIRED:
            raise ConfigError(path, key, "is missing")
        return default
    accepted, name = _KINDS[kind]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):  # JSON true is no int
        raise ConfigError(path, key, f"must be {name}, got {value!r:.60}")
    return float(value) if kind is float else value


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: safetensors (by the shard index when there is one) or pytorch_model.bin."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    for found in (sorted(folder.glob("*.safetensors")), sorted(folder.glob("pytorch_model*.bin"))):
        if found:
            return found
    raise ModelNotFoundError(
        f"{folder}: no weights found (looked for model.safetensors, sharded *.safetensors "
        "with model.safetensors.index.json, and pytorch_model.bin)")


def read_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every weight in the folder, one file at a time."""
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            yield from _read_safetensors(path)
        else:
            yield from _read_torch_bin(path)


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CorruptFileError(f"{path}: not a valid safetensors file ({e})", path) from None


def _read_torch_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    # mmap needs the zip format (torch >= 1.6); a legacy pickle is read whole. weights_only either way: never
    # unpickle arbitrary objects from a checkpoint.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types for bad pickles and zips
        raise CorruptFileError(f"{path}: not a readable PyTorch weights file ({_torch_reason(e)})", path) from None
    if not isinstance(state, dict):
        raise CorruptFileError(f"{path}: expected a dict of tensors, found {type(state).__name__}", path)
    yield from state.items()


def _torch_reason(e: Exception) -> str:
    # torch's weights_only refusal is a page of advice (worded differently by case and version), down to turning
    # the check off: keep only the name of the object it refused, when it gives one.
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return "it holds Python objects other than tensors, which lmgen does not unpickle" + (
            f": {found[1]}" if found else "")
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def hub_snapshot(repo_id: str) -> Path:
    """A Hub model's folder: from the local Hugging Face cache, else downloaded when online."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=WEIGHT_PATTERNS, local_files_only=True))
        if _has_weights(path):
            return path
    except Exception:
        pass  # not cached, or only partly: try the network below
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            path = Path(snapshot_download(repo_id, allow_patterns=WEIGHT_PATTERNS))
            if not _has_weights(path):  # an older repo with only pytorch_model.bin
                path = Path(snapshot_download(repo_id, allow_patterns=WEIGHT_PATTERNS + ["pytorch_model*.bin"]))
            return path
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise ModelNotFoundError(
        f"model {repo_id!r} is not a local path and is not in the Hugging Face cache, and could not be "
        f"downloaded ({reason}). On a machine with internet run `huggingface-cli download {repo_id}` "
        "(or copy its folder here), then pass that folder or the Hub id again; or pass a .gguf file.")


def _has_weights(folder: Path) -> bool:
    try:
        return bool(weight_files(folder))
    except ModelNotFoundError:
        return False
