"""GGUF files: metadata to a Hugging Face config dict, tensors to Hugging Face names, dequantized."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from gguf.constants import GGMLQuantizationType

from ..errors import CorruptFileError, UnsupportedModelError
from ..models.quant import Q4Blocks, Q8Blocks
from .gguf_format import GGUFParseError, UnsupportedGGUFVersion, read_gguf
from .hf import REQUIRED, config_value
from .quants import BLOCK_TYPES, dequantize, q4_codes, q8_codes

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
        return dict(common, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
                    num_hidden_layers=get("block_count"), num_attention_heads=heads,
                    num_key_value_heads=get("attention.head_count_kv", int, heads),
                    head_dim=get("attention.key_length", int, None),  # None: from_hf's hidden // heads
                    max_position_embeddings=get("context_length", int, 2048),
                    rms_norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-6),
                    rope_theta=get("rope.freq_base", float, 10000.0), rope_scaling=scaling,
                    tie_word_embeddings="output.weight" not in names)

    def _rope_factors(self) -> list[float]:
        t = next(t for t in self.tensor_infos if t.name == "rope_freqs.weight")
        try:
            return dequantize(t.data, t.tensor_type, t.shape).flatten().tolist()
        except (UnsupportedModelError, CorruptFileError) as e:
            raise type(e)(f"{self.path}: tensor {t.name}: {e}") from None

    def block_type(self) -> str | None:
        """The quantization of the decoder layers' matrices when every one is Q4_0, Q4_1 or Q8_0 (the native
        kernels' blocks), as "Q4_1" or, mixed, "Q4_0/Q8_0"; else None."""
        types = {t.tensor_type for t in self.tensor_infos if t.name.startswith("blk.") and len(t.shape) == 2}
        if not types or not types <= set(BLOCK_TYPES):
            return None
        return "/".join(sorted(GGMLQuantizationType(t).name for t in types))

    def tensors(self, dtype: torch.dtype = torch.float32,
                keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | Q4Blocks | Q8Blocks]]:
        """Yield (Hugging Face name, dequantized tensor) one at a time; with keep_blocks, Q4_0/Q4_1 matrices
        come as their 4-bit blocks and Q8_0 ones as their 8-bit blocks instead ([out, in] for every
        architecture)."""
        table = _name_table(TENSOR_NAMES[self.arch])
        cfg = self.config()
        for t in self.tensor_infos:
            if t.name == "rope_freqs.weight":  # read into the config's rope_scaling, not a weight
                continue
            hf = _hf_name(table, t.name)
            if hf is None:
                raise UnsupportedModelError(f"{self.path}: unexpected tensor {t.name!r} for {self.arch}")
            blocks = keep_blocks and t.tensor_type in BLOCK_TYPES and len(t.shape) == 2
            try:
                if blocks and t.tensor_type == GGMLQuantizationType.Q8_0:
                    w = Q8Blocks(*q8_codes(t.data, t.shape))
                elif blocks:
                    w = Q4Blocks(*q4_codes(t.data, t.tensor_type, t.shape))
                else:
                    w = dequantize(t.data, t.tensor_type, t.shape, dtype=dtype)
            except (UnsupportedModelError, CorruptFileError) as e:
                raise type(e)(f"{self.path}: tensor {t.name}: {e}") from None
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
