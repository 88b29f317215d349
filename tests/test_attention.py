"""Decoding attention in lmgen's kernel: the same result as attention over a slot's cached positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmgen
from lmgen.cache import KVCache

from .conftest import SEED_PROMPT


def reference(q, k, v, slots, positions, scale):
    """Each row's attention over the first position + 1 keys of its slot, by torch's SDPA."""
    rows = []
    for b in range(q.shape[0]):
        n = int(positions[b]) + 1
        keys, values = k[slots[b], :, :n][None], v[slots[b], :, :n][None]
        rows.append(F.scaled_dot_product_attention(q[b:b + 1], keys, values, scale=scale, enable_gqa=True))
    return torch.cat(rows)


# head sizes 64 and 128 take the vectorized path, 40 the general one; 9 query heads over 3 key heads is GQA
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 40), (8, 2, 128)])
@pytest.mark.parametrize("lengths", [[1], [37, 8, 100], [300, 299]])  # odd lengths: not a multiple of 8
def test_decode_attention_equals_attention_over_the_cached_positions(ops, heads, kv_heads, dim, lengths):
    torch.manual_seed(len(lengths) + dim)
    k, v = torch.randn(2, 4, kv_heads, 320, dim).unbind(0)  # 4 slots of 320 positions
    q = torch.randn(len(lengths), heads, 1, dim)
    slots = torch.tensor([3, 0, 2][:len(lengths)])
    positions = torch.tensor(lengths)[:, None] - 1
    got = ops.decode_attention(q, k, v, slots, positions, 0.3)
    torch.testing.assert_close(got, reference(q, k, v, slots, positions, 0.3), atol=1e-5, rtol=1e-5)


def test_decode_attention_reads_only_positions_up_to_the_token(ops):
    torch.manual_seed(0)
    k, v, q = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64), torch.randn(1, 2, 1, 64)
    at = (q, k, v, torch.tensor([0]), torch.tensor([[9]]), 0.125)
    before = ops.decode_attention(*at)
    k[:, :, 10:], v[:, :, 10:] = float("nan"), float("nan")  # later positions: another sequence's leftovers
    assert torch.equal(ops.decode_attention(*at), before)


def test_decode_attention_names_bad_operands():
    assert lmgen.kernels.native()
    k = torch.zeros(2, 3, 16, 64)
    q = torch.zeros(1, 9, 1, 64)
    with pytest.raises(RuntimeError, match="decode_attention: row 0 reads slot 0 at position 16, outside the cache"):
        torch.ops.lmgen.decode_attention(q, k, k, torch.tensor([0]), torch.tensor([[16]]), 1.0)
    with pytest.raises(RuntimeError, match="decode_attention: row 0 reads slot 2 at position 0"):
        torch.ops.lmgen.decode_attention(q, k, k, torch.tensor([2]), torch.tensor([[0]]), 1.0)
    with pytest.raises(RuntimeError, match=r"q must be float32 \[B, Hq, 1, D\]"):
        torch.ops.lmgen.decode_attention(q.double(), k, k, torch.tensor([0]), torch.tensor([[0]]), 1.0)
    with pytest.raises(RuntimeError, match="Hkv dividing 8"):
        torch.ops.lmgen.decode_attention(torch.zeros(1, 8, 1, 64), k, k, torch.tensor([0]), torch.tensor([[0]]), 1.0)
    with pytest.raises(RuntimeError, match="slots and positions must be int64 with 1 entries"):
        torch.ops.lmgen.decode_attention(q, k, k, torch.tensor([0, 1]), torch.tensor([[0]]), 1.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_models_decode_the_same_with_and_without_the_kernel(arch, tiny_llama_dir, tiny_gpt2_dir, monkeypatch):
    folder = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[arch]
    lm = lmgen.load(folder)
    prompts = [SEED_PROMPT, "Hello", SEED_PROMPT + " the lazy dog and then"]  # a batch of different lengths
    runs = {}
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(KVCache, "__init__", _without_kernel(KVCache.__init__))
            lm._caches.clear()
        gens = lm.generate(prompts, max_new_tokens=12, ignore_eos=True, logprobs=0)
        runs[kernel] = ([g.token_ids for g in gens], [[t.logprob for t in g.logprobs] for g in gens])
    assert runs[True][0] == runs[False][0]
    for with_kernel, without in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(torch.tensor(with_kernel), torch.tensor(without), atol=1e-4, rtol=1e-4)


def _without_kernel(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.decode_kernel = False

    return wrapped
