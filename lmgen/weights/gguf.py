"""GGUF files: metadata to a Hugging Face config dict, tensors to Hugging Face names, dequantized."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from gguf.constants import GGMLQuantizationType

from ..errors import ConfigError, CorruptFileError, UnsupportedModelError
from ..models.kquant import KBlocks
from ..models.quant import Q4Blocks, Q8Blocks
from .gguf_format import GGUFParseError, UnsupportedGGUFVersion, read_gguf
from .hf import REQUIRED, config_value
from .quants import BLOCK_TYPES, K_TYPES, block_rows, dequantize, q4_codes, q8_codes

# GGUF tensor names (llama.cpp's) -> Hugging Face names, per architecture; {i} is the block.
TENSOR_NAMES = {
    "llama": {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
        "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
        "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
        "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
        "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    },
    "gpt2": {
        "token_embd.weight": "transformer.wte.weight",
        "position_embd.weight": "transformer.wpe.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output_norm.bias": "transformer.ln_f.bias",
        "output.weight": "lm_head.weight",
        **{f"blk.{{i}}.{g}.{p}": f"transformer.h.{{i}}.{h}.{p}" for g, h in [
            ("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
            ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")]
           for p in ("weight", "bias")},
    },
}
TENSOR_NAMES["qwen2"] = TENSOR_NAMES["llama"]  # the same names; llama.cpp does not permute Qwen2's q and k rows
# Qwen3: Qwen2's, plus each layer's q/k norms (llama.cpp's Qwen3Model, a Qwen2Model: no permutation either).
TENSOR_NAMES["qwen3"] = dict(TENSOR_NAMES["llama"], **{
    f"blk.{{i}}.attn_{x}_norm.weight": f"model.layers.{{i}}.self_attn.{x}_norm.weight" for x in "qk"})
# Gemma 3: Llama's (no permutation: llama.cpp's Gemma3Model is a plain TextModel), with q/k norms and its four norms
# a layer; llama.cpp's ffn_norm is the pre-feedforward norm.
TENSOR_NAMES["gemma3"] = dict(TENSOR_NAMES["qwen3"], **{
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight"})
# GPT-2's Conv1D layers store [in, out]; GGUF stores every matrix as [out, in].
_TRANSPOSED = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


class GGUFFile:
    """An open GGUF file: its metadata as plain Python values, and its tensors on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise CorruptFileError(f"{self.path}: cannot be read ({e.strerror})", self.path) from None
        if magic != b"GGUF":
            raise CorruptFileError(f"{self.path}: not a GGUF file (it does not start with b'GGUF')", self.path)
        try:
            self.metadata, self.tensor_infos = read_gguf(self.path)
        except UnsupportedGGUFVersion as e:
            raise UnsupportedModelError(f"{self.path}: {e}", self.path) from None
        except (GGUFParseError, OSError, ValueError) as e:
            raise CorruptFileError(f"{self.path}: truncated or corrupt GGUF file ({e})", self.path) from None
        self.arch = self.metadata.get("general.architecture")

    def config(self) -> dict:
        """A Hugging Face style config.json dict built from the metadata."""
        m, a = self.metadata, self.arch
        if a not in TENSOR_NAMES:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {a!r} is not supported; supported: {', '.join(TENSOR_NAMES)}")

        def get(key, kind=int, default=REQUIRED):  # checked here, so an error names the GGUF's own key
            return config_value(m, f"{a}.{key}", kind, default, path=self.path)

        names = {t.name for t in self.tensor_infos}
        vocab = get("vocab_size", int, None) or len(m.get("tokenizer.ggml.tokens", ()))
        common = dict(model_type=a, vocab_size=vocab, bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
                      eos_token_id=m.get("tokenizer.ggml.eos_token_id"))
        if a == "gpt2":
            return dict(common, n_embd=get("embedding_length"), n_layer=get("block_count"),
                        n_head=get("attention.head_count"), n_positions=get("context_length", int, None),
                        n_inner=get("feed_forward_length", int, None),
                        layer_norm_epsilon=get("attention.layer_norm_epsilon", float, 1e-5))
        heads = get("attention.head_count")
        hidden = get("embedding_length")
        scaling = None
        if get("rope.scaling.type", str, None) == "linear":
            scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor", float)}
        if "rope_freqs.weight" in names:  # Llama 3.1/3.2: llama3 scaling, written as each frequency's divisor
            scaling = {"rope_type": "freqs", "factors": self._rope_factors()}
        config = dict(common, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
                    num_hidden_layers=get("block_count"), num_attention_heads=heads,
                    num_key_value_heads=get("attention.head_count_kv", int, heads),
                    head_dim=get("attention.key_length", int, hidden // heads),  # llama.cpp's default
                    max_position_embeddings=get("context_length", int, 2048),
                    rms_norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-6),
                    rope_theta=get("rope.freq_base", float, 10000.0), rope_scaling=scaling,
                    tie_word_embeddings="output.weight" not in names)
        return self._gemma3(config, get) if a == "gemma3" else config

    def _gemma3(self, config: dict, get) -> dict:
        """Gemma 3's hyperparameters as llama.cpp reads them (src/models/gemma3.cpp), in transformers' names: every
        6th layer global unless attention.sliding_window_pattern says otherwise, local rope base 10000 unless
        rope.freq_base_swa does, and scores scaled by 1/sqrt(head_dim) (the 27B's 62 layers: by hidden / heads)."""
        layers, heads, hidden = config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"]
        window = get("attention.sliding_window", int, 0)
        pattern = self.metadata.get(f"{self.arch}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list) and len(pattern) == layers:  # whether each layer slides
            sliding = [bool(p) for p in pattern]
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
            sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
        else:
            raise ConfigError(self.path, f"{self.arch}.attention.sliding_window_pattern",
                              f"must be a count or {layers} booleans")
        sliding = [s and window > 0 for s in sliding]
        cap = get("final_logit_softcapping", float, None)
        return dict(config, model_type="gemma3_text", sliding_window=window or None,
                    layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
                    rope_local_base_freq=get("rope.freq_base_swa", float, 10000.0),
                    query_pre_attn_scalar=hidden // heads if layers == 62 else config["head_dim"],
                    final_logit_softcapping=cap or None, hidden_activation="gelu_pytorch_tanh")

    def _rope_factors(self) -> list[float]:
        t = next(t for t in self.tensor_infos if t.name == "rope_freqs.weight")
        try:
            return dequantize(t.data, t.tensor_type, t.shape).flatten().tolist()
        except (UnsupportedModelError, CorruptFileError) as e:
            raise type(e)(f"{self.path}: tensor {t.name}: {e}") from None

    def block_type(self) -> str | None:
        """The quantization of the decoder layers' matrices when every one is of a type the native kernels run as it
        is (Q4_0, Q4_1, Q8_0, Q5_0, Q4_K, Q5_K, Q6_K), as "Q4_1" or, mixed, "Q4_K/Q5_0/Q6_K/Q8_0"; else None."""
        types = {t.tensor_type for t in self.tensor_infos if t.name.startswith("blk.") and len(t.shape) == 2}
        if not types or not types <= set(BLOCK_TYPES):
            return None
        return "/".join(sorted(GGMLQuantizationType(t).name for t in types))

    def tensors(self, dtype: torch.dtype = torch.float32,
                keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | Q4Blocks | Q8Blocks | KBlocks]]:
        """Yield (Hugging Face name, dequantized tensor) one at a time; with keep_blocks, Q4_0/Q4_1 matrices
        come as their 4-bit blocks, Q8_0 ones as their 8-bit blocks and Q5_0/Q4_K/Q5_K/Q6_K ones as their bytes
        instead ([out, in] for every architecture)."""
        table = _name_table(TENSOR_NAMES[self.arch])
        cfg = self.config()
        for t in self.tensor_infos:
            if t.name == "rope_freqs.weight":  # read into the config's rope_scaling, not a weight
                continue
            hf = _hf_name(table, t.name)
            if hf is None:
                raise UnsupportedModelError(f"{self.path}: unexpected tensor {t.name!r} for {self.arch}")
            blocks = keep_blocks and t.tensor_type in BLOCK_TYPES and len(t.shape) == 2
            # llama.cpp stores Gemma's norms as 1 + w (convert_hf_to_gguf's norm_shift); the model adds the 1
            shifted = self.arch == "gemma3" and hf.endswith("norm.weight")
            try:
                if blocks and t.tensor_type == GGMLQuantizationType.Q8_0:
                    w = Q8Blocks(*q8_codes(t.data, t.shape))
                elif blocks and t.tensor_type in K_TYPES:
                    w = KBlocks(int(t.tensor_type), block_rows(t.data, t.tensor_type, t.shape), int(t.shape[1]))
                elif blocks:
                    w = Q4Blocks(*q4_codes(t.data, t.tensor_type, t.shape))
                else:
                    w = dequantize(t.data, t.tensor_type, t.shape, dtype=torch.float32 if shifted else dtype)
            except (UnsupportedModelError, CorruptFileError) as e:
                raise type(e)(f"{self.path}: tensor {t.name}: {e}") from None
            if shifted:  # in float32, where 1 + (s - 1) gives back s exactly
                w = (w - 1).to(dtype)
            heads = None
            if self.arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
                heads = cfg["num_attention_heads"]
            elif self.arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
                heads = cfg["num_key_value_heads"]
            if heads is not None:
                w = w.map_rows(lambda x: _unpermute(x, heads)) if blocks else _unpermute(w, heads)
            elif _TRANSPOSED.fullmatch(hf) and not blocks:
                w = w.t().contiguous()
            t.release()  # w holds its own copy now
            yield hf, w



def _name_table(names: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)")), h) for g, h in names.items()]


def _hf_name(table, name: str) -> str | None:
    for pattern, hf in table:
        m = pattern.fullmatch(name)
        if m:
            return hf.format(**m.groupdict())
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of the rotary halves in q and k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
