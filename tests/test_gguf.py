"""GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them load into models whose logits
equal the original Hugging Face model's: exactly for F32, and for quantized files those of the HF model with
its weights replaced by the exact dequantized values.

Every GGUF here carries the real GPT-2 vocabulary (50257 tokens, 50000 merges), and gguf-py's reader takes
~3 s to parse that metadata, on each load, in lmgen and in transformers alike. So each file is loaded once
per module, and the quantized types share one file per architecture whose 2-D tensors cycle through them
(as llama.cpp's mixed presets vary the type per tensor) rather than one file per type.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file

import lmgen
from lmgen.models.quant import Int4Linear
from lmgen.weights.gguf import GGUFFile

from .conftest import (
    SEED_IDS,
    SEED_PROMPT,
    make_tiny_gemma3,
    make_tiny_llama,
    make_tiny_mistral,
    make_tiny_qwen2,
    make_tiny_qwen3,
)

transformers = pytest.importorskip("transformers")

QUANTIZED = (Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
# The per-tensor types of the mixed files, cycled over the 2-D tensors in file order. Llama's includes F32, so
# transformers checks both kinds in one read, and its order puts each quantized type on one of the permuted
# q/k matrices (2-D tensors 2, 3, 9 and 10); test_mixed_gguf_holds_every_type checks that.
MIXED = {"llama": (Q.Q4_1, Q.F32, Q.F16, Q.Q8_0, Q.Q4_0), "gpt2": QUANTIZED, "qwen2": (Q.Q8_0, Q.Q4_0, Q.F16, Q.Q4_1),
         "qwen3": (Q.Q4_0, Q.Q8_0, Q.Q4_1, Q.F16)}
ARCHS = ("llama", "gpt2", "qwen2", "qwen3")
GGUF_ARCH = {"mistral": "llama"}  # llama.cpp converts Mistral with its LlamaModel: a "llama" GGUF
GGUF_ARCH["gemma3_text"] = "gemma3"  # transformers' text-only Gemma 3 is llama.cpp's gemma3
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
ENDOFTEXT = 50256


# --- writing GGUF files like convert_hf_to_gguf.py -------------------------------------------------------------


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: interleave the rotary halves of each head's q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_tensors(state: dict, cfg: dict) -> list[tuple[str, str, np.ndarray]]:
    """(GGUF name, HF name, array in GGUF layout), popping each HF tensor it converts. Llama's and Mistral's q and
    k rows are permuted (LlamaModel.permute); Qwen2's and Qwen3's are not (their converters are plain TextModels).
    Qwen2's q, k and v have biases; Qwen3's layers have q and k norms."""
    llama = cfg["model_type"] in ("llama", "mistral")
    n_head, n_kv = (cfg["num_attention_heads"], cfg["num_key_value_heads"]) if llama else (None, None)

    def take(hf: str, gg: str, n_perm: int | None = None):
        w = state.pop(hf)
        return gg, hf, permute(w, n_perm) if n_perm else w

    out = [take("model.embed_tokens.weight", "token_embd.weight"), take("model.norm.weight", "output_norm.weight")]
    if "lm_head.weight" in state:  # absent when tie_word_embeddings: then llama.cpp writes no output.weight
        out.append(take("lm_head.weight", "output.weight"))
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out += [
            take(p + "input_layernorm.weight", b + "attn_norm.weight"),
            take(p + "post_attention_layernorm.weight", b + "ffn_norm.weight"),
            take(p + "self_attn.q_proj.weight", b + "attn_q.weight", n_head),
            take(p + "self_attn.k_proj.weight", b + "attn_k.weight", n_kv),  # k permutes with n_head_kv
            take(p + "self_attn.v_proj.weight", b + "attn_v.weight"),
            take(p + "self_attn.o_proj.weight", b + "attn_output.weight"),
            take(p + "mlp.gate_proj.weight", b + "ffn_gate.weight"),
            take(p + "mlp.up_proj.weight", b + "ffn_up.weight"),
            take(p + "mlp.down_proj.weight", b + "ffn_down.weight"),
        ]
        out += [take(p + f"self_attn.{x}_proj.bias", b + f"attn_{x}.bias") for x in "qkv"
                if p + f"self_attn.{x}_proj.bias" in state]
        out += [take(p + f"self_attn.{x}_norm.weight", b + f"attn_{x}_norm.weight") for x in "qk"
                if p + f"self_attn.{x}_norm.weight" in state]
    return out


def _rope_freqs(cfg: dict) -> list[tuple[str, str, np.ndarray]]:
    """convert_hf_to_gguf's LlamaModel.generate_extra_tensors: llama3 rope scaling as each frequency's divisor."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type") != "llama3":
        return []
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta") or rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", "(rope_scaling)", np.array(factors, dtype=np.float32))]


def _gpt2_tensors(state: dict, cfg: dict, *, output: bool) -> list[tuple[str, str, np.ndarray]]:
    for k in [k for k in state if k.endswith((".attn.bias", ".attn.masked_bias"))]:
        del state[k]  # causal-mask buffers, which convert_hf_to_gguf drops too
    state.pop("lm_head.weight", None)  # tied to wte
    wte = state.pop("transformer.wte.weight")
    out = [("token_embd.weight", "transformer.wte.weight", wte),
           ("position_embd.weight", "transformer.wpe.weight", state.pop("transformer.wpe.weight")),
           ("output_norm.weight", "transformer.ln_f.weight", state.pop("transformer.ln_f.weight")),
           ("output_norm.bias", "transformer.ln_f.bias", state.pop("transformer.ln_f.bias"))]
    if output:  # convert_hf_to_gguf duplicates the tied wte as output.weight for GPT-2
        out.append(("output.weight", "transformer.wte.weight", wte))
    for i in range(cfg["n_layer"]):
        for g, h in [("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
                     ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")]:
            for p in ("weight", "bias"):
                hf = f"transformer.h.{i}.{h}.{p}"
                w = state.pop(hf)
                # Conv1D stores [in, out]; GGUF stores every matrix as [out, in]
                out.append((f"blk.{i}.{g}.{p}", hf, w.T.copy() if hf.endswith(GPT2_CONV1D) else w))
    return out


def _text_model_parameters(writer: gguf.GGUFWriter, cfg: dict) -> None:
    """convert_hf_to_gguf's TextModel.set_gguf_parameters for a Llama-shaped config (the rope base is each
    model's own): sizes, heads, the norms' epsilon, and key and value lengths where head_dim is given (Qwen3's and
    Gemma's are not hidden / heads)."""
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim"):
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])


def _gemma3_gguf(writer: gguf.GGUFWriter, state: dict, cfg: dict) -> list[tuple[str, str, np.ndarray]]:
    """convert_hf_to_gguf's Gemma3Model: TextModel's parameters (the full layers' rope base, the sliding ones' as
    freq_base_swa), key and value lengths and the sliding window, but no layer types (llama.cpp makes every 6th
    layer global); q and k unpermuted, every norm stored as 1 + w (norm_shift); tied, so no output.weight."""
    rope = cfg["rope_parameters"]
    _text_model_parameters(writer, cfg)
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    writer.add_sliding_window(cfg["sliding_window"])

    def take(hf: str, gg: str):
        w = state.pop(hf)
        return gg, hf, w + 1 if hf.endswith("norm.weight") else w

    out = [take("model.embed_tokens.weight", "token_embd.weight"), take("model.norm.weight", "output_norm.weight")]
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out += [take(p + h, b + g) for h, g in [
            ("input_layernorm.weight", "attn_norm.weight"), ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"), ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"), ("self_attn.q_norm.weight", "attn_q_norm.weight"),
            ("self_attn.k_norm.weight", "attn_k_norm.weight"),
            ("post_attention_layernorm.weight", "post_attention_norm.weight"),
            ("pre_feedforward_layernorm.weight", "ffn_norm.weight"), ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"), ("mlp.down_proj.weight", "ffn_down.weight"),
            ("post_feedforward_layernorm.weight", "post_ffw_norm.weight")]]
    return out


def _write_tokenizer(writer: gguf.GGUFWriter, folder: Path) -> None:
    """A byte-level BPE vocabulary, as convert_hf_to_gguf's _set_vocab_gpt2 writes it."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [m for n, m in enumerate(lines) if m and not (n == 0 and m.startswith("#"))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ENDOFTEXT)
    writer.add_eos_token_id(ENDOFTEXT)


def write_gguf(hf_folder: Path, out_path: Path, qtype: Q | Sequence[Q] = Q.F32, *,
               gpt2_output: bool = True) -> dict[str, tuple[str, Q]]:
    """Convert a tiny HF Llama, Mistral, Qwen2, Qwen3 or GPT-2 folder to GGUF as convert_hf_to_gguf.py does.

    2-D weights are stored as `qtype` (a sequence is cycled over them in file order), 1-D ones as F32.
    Returns {GGUF name: (HF name, stored type)} for every tensor written.
    """
    cfg = json.loads((hf_folder / "config.json").read_text())
    arch = cfg["model_type"]
    state = {k: v.float().numpy() for k, v in load_file(hf_folder / "model.safetensors").items()}
    writer = gguf.GGUFWriter(out_path, GGUF_ARCH.get(arch, arch))
    if arch in ("llama", "qwen2", "qwen3", "mistral"):
        _text_model_parameters(writer, cfg)
        writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
        writer.add_vocab_size(cfg["vocab_size"])
        tensors = _llama_tensors(state, cfg) + _rope_freqs(cfg)
    elif arch == "gpt2":
        writer.add_context_length(cfg["n_positions"])
        writer.add_embedding_length(cfg["n_embd"])
        writer.add_block_count(cfg["n_layer"])
        writer.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
        writer.add_head_count(cfg["n_head"])
        writer.add_layer_norm_eps(cfg["layer_norm_epsilon"])
        tensors = _gpt2_tensors(state, cfg, output=gpt2_output)
    elif arch == "gemma3_text":
        tensors = _gemma3_gguf(writer, state, cfg)
    else:
        raise ValueError(f"no converter for {arch}")
    assert not state, f"tensors left unconverted: {sorted(state)}"
    _write_tokenizer(writer, hf_folder)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    cycle = itertools.cycle([qtype] if isinstance(qtype, Q) else qtype)
    for name, _, w in tensors:
        qt = next(cycle) if w.ndim == 2 else Q.F32
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qt), raw_dtype=qt)
    written = {name: (hf, Q(writer.tensors[0][name].dtype)) for name, hf, _ in tensors}
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def hf_types(written: dict[str, tuple[str, Q]]) -> dict[str, Q]:
    """{HF name: stored type} from write_gguf's result (GPT-2's wte may be written twice: same type both times)."""
    types: dict[str, Q] = {}
    for hf, qt in written.values():
        assert types.setdefault(hf, qt) == qt, f"{hf} written twice with different types"
    return types


def roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """The exact values a `qtype` tensor holds after quantizing w (blocks run along the last axis)."""
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype)


def write_dequantized_folder(hf_folder: Path, out: Path, types: dict[str, Q]) -> Path:
    """A copy of the HF folder whose weights hold exactly what a GGUF storing them as `types` holds.

    Quantization blocks run along each GGUF row, and the Llama q/k permutation only reorders whole rows, so
    quantizing the un-permuted rows gives the same values; GPT-2's Conv1D weights are quantized as [out, in].
    """
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in load_file(hf_folder / "model.safetensors").items():
        w = t.float().numpy()
        if name in types:
            w = roundtrip(w.T, types[name]).T if name.endswith(GPT2_CONV1D) else roundtrip(w, types[name])
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(hf_folder / "config.json", out / "config.json")
    return out


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir,
            "qwen2": make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2")),
            "qwen3": make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))}


@pytest.fixture(scope="module")
def hf_lms(hf_dirs) -> dict[str, lmgen.LM]:
    return {arch: lmgen.load(folder) for arch, folder in hf_dirs.items()}


@pytest.fixture(scope="module")
def f32(hf_dirs, tmp_path_factory) -> dict[str, tuple[Path, lmgen.LM]]:
    """Per architecture: an F32 GGUF of the HF folder (with output.weight, as the converter writes) and its LM."""
    root, out = tmp_path_factory.mktemp("gguf-f32"), {}
    for arch, folder in hf_dirs.items():
        path = root / f"{arch}-F32.gguf"
        write_gguf(folder, path, Q.F32)
        out[arch] = path, lmgen.load(path)
    return out


@pytest.fixture(scope="module")
def mixed(hf_dirs, tmp_path_factory):
    """mixed(arch) -> (path, write_gguf's result, LM) of a GGUF whose 2-D tensors cycle through MIXED[arch],
    written and loaded once per module.

    The GPT-2 one is written without output.weight, which llama.cpp also accepts (lm_head = token_embd).
    """
    root, made = tmp_path_factory.mktemp("gguf-mixed"), {}

    def get(arch: str):
        if arch not in made:
            path = root / f"{arch}-mixed.gguf"
            written = write_gguf(hf_dirs[arch], path, MIXED[arch], gpt2_output=False)
            made[arch] = path, written, lmgen.load(path)
        return made[arch]

    return get


def prompt_ids(n: int = 20, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n,), generator=g).tolist()


def transformers_logits(folder: Path, ids: list[int], **kwargs) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# --- 1. F32: same weights, same logits --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_logits_and_greedy_tokens_match_hf_folder(arch, f32, hf_lms, hf_dirs):
    lm, ref = f32[arch][1], hf_lms[arch]
    ids = prompt_ids()
    assert_logits_close(lm.logits(ids), ref.logits(ids))
    assert_logits_close(lm.logits(ids), transformers_logits(hf_dirs[arch], ids))
    gguf_tokens = lm.generate(ids, max_new_tokens=16)[0].token_ids
    assert len(gguf_tokens) == 16 and gguf_tokens == ref.generate(ids, max_new_tokens=16)[0].token_ids
    assert lm.eos_token_ids == (ENDOFTEXT,)


def test_llama_3_2_style_gguf_with_rope_freqs_matches_transformers(tmp_path):
    """A Llama 3.2-style model (llama3 rope scaling, tied embeddings) converted as llama.cpp converts it: the
    scaling becomes the rope_freqs tensor, and the GGUF's logits equal transformers' on the folder."""
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # short, so every band of the scaling is in play
    folder = make_tiny_llama(tmp_path / "hf", rope_scaling=rope, tie_word_embeddings=True,
                             max_position_embeddings=256)
    written = write_gguf(folder, tmp_path / "llama32.gguf")
    assert "rope_freqs.weight" in written
    lm, ref = lmgen.load(tmp_path / "llama32.gguf"), lmgen.load(folder)
    factors = lm.config.rope_scaling["factors"]
    assert lm.config.rope_scaling["rope_type"] == "freqs" and len(factors) == 8 and len(set(factors)) > 2
    ids = prompt_ids(40)
    assert_logits_close(lm.logits(ids), transformers_logits(folder, ids))
    assert lm.generate(ids, max_new_tokens=16)[0].token_ids == ref.generate(ids, max_new_tokens=16)[0].token_ids


def test_rope_freqs_of_the_wrong_size_name_the_key(tmp_path):
    folder = make_tiny_llama(tmp_path / "hf", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64})
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)  # (transformers 5's name for it)
    cfg["rope_scaling"] = {"rope_type": "freqs", "factors": [1.0, 2.0]}
    with pytest.raises(lmgen.errors.ConfigError, match="rope_scaling.factors.* 8 positive numbers"):
        lmgen.models.llama.Config.from_hf(cfg)


def test_f32_llama_config(f32):
    c = f32["llama"][1].config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 4, 2, 16)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.max_position_embeddings) == (50257, 64, 128, 256)
    assert c.rms_norm_eps == pytest.approx(1e-5) and c.rope_theta == 10000.0 and c.rope_scaling is None
    assert not c.tie_word_embeddings


def test_f32_gpt2_config(f32):
    c = f32["gpt2"][1].config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_inner, c.vocab_size, c.n_positions) == (2, 4, 64, 256, 50257, 256)
    assert c.layer_norm_epsilon == pytest.approx(1e-5) and c.activation_function == "gelu_new"


def test_f32_qwen3_config(f32):
    c = f32["qwen3"][1].config
    assert type(c) is lmgen.models.qwen3.Config and c.qk_norm and c.sliding_window is None
    # head_dim from qwen3.attention.key_length: 32, not hidden / heads = 16
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size) == (4, 2, 32, 64)
    assert c.rope_theta == 1000000.0 and c.tie_word_embeddings and not c.attention_bias


# --- 2. quantized: logits of the exact dequantized weights ------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_gguf_holds_every_type(arch, mixed):
    # (from the writer's tensor table: gguf-py's reader takes seconds to parse the vocabulary again)
    _, written, _ = mixed(arch)
    stored = {name: qt for name, (_, qt) in written.items()}
    assert {stored[n] for n in stored if n.startswith("blk.")} >= set(MIXED[arch])  # in the blocks, not just embd
    if arch == "llama":  # each type on a permuted q or k matrix
        assert {stored[f"blk.{i}.attn_{x}.weight"] for i in range(2) for x in "qk"} == set(MIXED[arch]) - {Q.F32}
    assert all(t == Q.F32 for n, t in stored.items() if n.endswith(("norm.weight", ".bias")))
    assert "output.weight" in stored if arch == "llama" else "output.weight" not in stored  # (qwen's are tied)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_gguf_matches_hf_model_with_dequantized_weights(arch, mixed, hf_dirs, hf_lms, tmp_path):
    _, written, lm = mixed(arch)
    reference = write_dequantized_folder(hf_dirs[arch], tmp_path / "dequantized", hf_types(written))
    ids = prompt_ids(seed=3)
    logits = lm.logits(ids)
    assert_logits_close(logits, transformers_logits(reference, ids))
    # not trivially: quantization did move the logits away from the original model's
    assert (logits - hf_lms[arch].logits(ids)).abs().max() > 1e-2
    if arch == "gpt2":  # no output.weight: lm_head is token_embd itself
        assert lm.model.lm_head.weight.data_ptr() == lm.model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_gguf_matches_transformers_reading_the_same_file(arch, mixed, hf_dirs):
    # transformers maps GGUF names, un-permutes q/k and dequantizes (with gguf-py) on its own: it checks that
    # these files are what real converters write. (Llama, and Qwen3 for its q/k norms and head_dim, only: each read
    # costs seconds of metadata parsing.)
    path, _, lm = mixed(arch)
    ids = prompt_ids(seed=4)
    # The config comes from the HF folder (transformers builds its own from GGUF metadata, and for GPT-2
    # leaves n_positions at 1024); weights, names and q/k order come from the GGUF file.
    config = transformers.AutoConfig.from_pretrained(hf_dirs[arch])
    assert_logits_close(lm.logits(ids), transformers_logits(path.parent, ids, gguf_file=path.name, config=config))


# --- 3. tied embeddings -----------------------------------------------------------------------------------------


def test_tied_llama_without_output_weight_ties_lm_head(tmp_path):
    folder = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True, seed=1)
    path = tmp_path / "tied.gguf"
    assert "output.weight" not in write_gguf(folder, path, Q.F32)
    lm = lmgen.load(path)
    assert lm.config.tie_word_embeddings
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    ids = prompt_ids(seed=5)
    assert_logits_close(lm.logits(ids), transformers_logits(folder, ids))


# --- 4. Mistral, converted as a Llama ---------------------------------------------------------------------------


def test_mistral_gguf_is_a_llama_without_its_window(tmp_path):
    """llama.cpp converts Mistral with its LlamaModel (GGUF architecture "llama", q/k rows permuted) and writes no
    sliding window: the GGUF loads as a Llama attending over the whole context, as llama.cpp runs it."""
    folder = make_tiny_mistral(tmp_path / "hf", sliding_window=6)
    path = tmp_path / "mistral.gguf"
    write_gguf(folder, path)
    lm = lmgen.load(path)
    assert GGUFFile(path).arch == "llama" and type(lm.config) is lmgen.models.llama.Config
    assert lm.config.sliding_window is None
    ids = prompt_ids()
    logits = lm.logits(ids)
    assert_logits_close(logits, transformers_logits(folder, ids, sliding_window=None))
    # the folder keeps its window: the same logits within it, others past it
    windowed = lmgen.load(folder).logits(ids)
    assert_logits_close(logits[:6], windowed[:6])
    assert (logits[6:] - windowed[6:]).abs().amax(-1).min() > 1e-2


# --- 5. Qwen3 on the int4 kernels -------------------------------------------------------------------------------


def test_qwen3_q4_0_gguf_runs_the_int4_kernels_layer_by_layer(hf_dirs, tmp_path):
    """The default path on a Q4_0 Qwen3: the file's blocks through the int4 kernels, module by module (the native
    fused layers have no q/k norms, so they refuse it), agreeing with float32 on the same file's weights."""
    path = tmp_path / "qwen3-q4_0.gguf"
    write_gguf(hf_dirs["qwen3"], path, Q.Q4_0)
    fast, ref = lmgen.load(path), lmgen.load(path, dtype="float32")
    assert fast.weights.startswith("int4 kernels on the file's own Q4_0 blocks")
    assert fast.model.fused is None and isinstance(fast.model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    ids = prompt_ids(seed=6)
    got, want = fast.logits(ids), ref.logits(ids)
    # only the activations' rounding to 8 bits differs (as test_quant.py's int4 tests measure)
    torch.testing.assert_close(got, want, atol=0.1 * float(want.abs().max()), rtol=0.05)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    # decoding from the cache gives the tokens the whole sequence's logits pick
    new = fast.generate(ids, max_new_tokens=8, ignore_eos=True)[0].token_ids
    assert fast.logits(ids + new)[len(ids) - 1:-1].argmax(-1).tolist() == new


# --- 6. tokenizer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_rebuilt_from_gguf(arch, f32, hf_lms):
    lm = f32[arch][1]
    tok = lm.tokenizer
    assert tok.encode(SEED_PROMPT) == SEED_IDS == [464, 2068, 7586, 21831, 11687, 625]
    assert tok.decode(SEED_IDS) == SEED_PROMPT
    assert lm.encode(SEED_PROMPT) == SEED_IDS
    text = "Hello world! It's 2024:  naïve café,\n\ttabs   and <|endoftext|> done"
    assert tok.encode(text) == hf_lms[arch].tokenizer.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") == [ENDOFTEXT]
    assert tok.bos_token_id == ENDOFTEXT and tok.eos_token_ids == (ENDOFTEXT,)


# --- 7. unsupported architecture --------------------------------------------------------------------------------


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(lmgen.UnsupportedModelError) as e:
        lmgen.load(path)
    msg = str(e.value)
    assert "'bert'" in msg and str(path) in msg
    supported = re.search(r"supported: ([\w, -]+)", msg)
    assert supported and {"llama", "gpt2"} <= {a.strip() for a in supported.group(1).split(",")}, msg


# --- Gemma 3 ----------------------------------------------------------------------------------------------------

GEMMA3_MIXED = (Q.Q5_0, Q.Q8_0, Q.F16, Q.Q4_0, Q.Q4_1)


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> Path:
    """A 6-layer Gemma 3 as llama.cpp can hold it: its layer types are transformers' default (every 6th global, the
    pattern llama.cpp assumes: a GGUF carries no layer types) and its scores are scaled by 1/sqrt(head_dim), as
    llama.cpp scales them (query_pre_attn_scalar = head_dim, as in every Gemma 3 but the 27B)."""
    return make_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3-6"), num_hidden_layers=6, layer_types=None,
                            query_pre_attn_scalar=32)


def test_gemma3_f32_gguf_matches_the_folder(gemma3_dir, tmp_path):
    path = tmp_path / "gemma3-F32.gguf"
    written = write_gguf(gemma3_dir, path)
    assert "output.weight" not in written and GGUFFile(path).arch == "gemma3"
    lm, folder = lmgen.load(path), lmgen.load(gemma3_dir)
    c, want = lm.config, folder.config
    assert c.layer_types == want.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (c.sliding_window, c.head_dim, c.query_pre_attn_scalar) == (want.sliding_window, 32, 32)
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling) == (want.rope_theta, want.rope_local_theta, None)
    # the file's norms are 1 + w; the model holds w again
    torch.testing.assert_close(lm.model.model.layers[0].pre_feedforward_layernorm.weight,
                               folder.model.model.layers[0].pre_feedforward_layernorm.weight, atol=1e-7, rtol=0)
    ids = prompt_ids(24)  # three times the window
    assert_logits_close(lm.logits(ids), transformers_logits(gemma3_dir, ids))
    tokens = lm.generate(ids, max_new_tokens=16)[0].token_ids
    assert len(tokens) == 16 and tokens == folder.generate(ids, max_new_tokens=16)[0].token_ids


def test_gemma3_mixed_gguf_matches_its_dequantized_weights_and_transformers_reading_it(gemma3_dir, tmp_path):
    path = tmp_path / "gemma3-mixed.gguf"
    written = write_gguf(gemma3_dir, path, GEMMA3_MIXED)
    assert {qt for name, (_, qt) in written.items() if name.startswith("blk.")} >= set(GEMMA3_MIXED)
    lm = lmgen.load(path)
    reference = write_dequantized_folder(gemma3_dir, tmp_path / "dequantized", hf_types(written))
    ids = prompt_ids(seed=3)
    logits = lm.logits(ids)
    assert_logits_close(logits, transformers_logits(reference, ids))
    assert (logits - lmgen.load(gemma3_dir).logits(ids)).abs().max() > 1e-2  # quantization did move them
    # transformers undoes the norm shift and maps the names on its own (the config is the folder's: transformers
    # builds Gemma 3's from GGUF metadata with its own defaults)
    config = transformers.AutoConfig.from_pretrained(gemma3_dir)
    assert_logits_close(logits, transformers_logits(path.parent, ids, gguf_file=path.name, config=config))


def _gemma3_metadata_only(path: Path, n_layers: int = 8, **keys) -> dict:
    """GGUFFile.config() of a file holding only Gemma 3 hyperparameters (`keys`: gemma3.<key> values)."""
    writer = gguf.GGUFWriter(path, "gemma3")
    for key, value in dict({"block_count": n_layers, "embedding_length": 64, "feed_forward_length": 128,
                            "attention.head_count": 4, "attention.key_length": 32, "vocab_size": 16}, **keys).items():
        if isinstance(value, bool) or (isinstance(value, list) and isinstance(value[0], bool)):
            writer.add_key_value(f"gemma3.{key}", value, gguf.GGUFValueType.ARRAY if isinstance(value, list)
                                 else gguf.GGUFValueType.BOOL, sub_type=gguf.GGUFValueType.BOOL)
        elif isinstance(value, int):
            writer.add_uint32(f"gemma3.{key}", value)
        else:
            writer.add_float32(f"gemma3.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path).config()


S, F = "sliding_attention", "full_attention"


@pytest.mark.parametrize("keys,types", [
    ({"attention.sliding_window": 16}, [S] * 5 + [F, S, S]),  # llama.cpp's default: every 6th layer global
    ({"attention.sliding_window": 16, "attention.sliding_window_pattern": 4}, [S, S, S, F] * 2),
    ({"attention.sliding_window": 16, "attention.sliding_window_pattern": [True, False] * 4}, [S, F] * 4),
    ({}, [F] * 8),  # no window: every layer global
])
def test_gemma3_gguf_layer_types_as_llama_cpp_reads_them(keys, types, tmp_path):
    cfg = _gemma3_metadata_only(tmp_path / "gemma3.gguf", **keys)
    assert cfg["layer_types"] == types and cfg["model_type"] == "gemma3_text"
    assert cfg["sliding_window"] == keys.get("attention.sliding_window")
    assert cfg["rope_local_base_freq"] == 10000.0 and cfg["query_pre_attn_scalar"] == 32  # llama.cpp's defaults
    c = lmgen.models.gemma3.Config.from_hf(cfg)
    assert c.layer_types == tuple(types) and c.sliding_window == keys.get("attention.sliding_window")


def test_gemma3_27b_gguf_scales_scores_by_hidden_over_heads(tmp_path):
    # llama.cpp's f_attention_scale: the 27B (62 layers) scales by 1/sqrt(hidden / heads), as its config does
    cfg = _gemma3_metadata_only(tmp_path / "gemma3.gguf", n_layers=62, **{"embedding_length": 5376,
                                                                         "attention.head_count": 32})
    assert cfg["query_pre_attn_scalar"] == 168

