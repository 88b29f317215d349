"""Decoding attention in lmgen's kernel: it writes the new keys and values into the cache, and gives the same
result as attention over the slot's positions up to the new token (the last `window` of them for a sliding-window
layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmgen
from lmgen.cache import KVCache

from .conftest import SEED_PROMPT


def reference(q, k, v, slots, positions, scale, window=0):
    """Each row's attention over the first position + 1 keys of its slot (the last `window` of them), by torch's
    SDPA."""
    rows = []
    for b in range(q.shape[0]):
        n = int(positions[b]) + 1
        first = max(0, n - window) if window else 0
        keys, values = k[slots[b], :, first:n][None], v[slots[b], :, first:n][None]
        rows.append(F.scaled_dot_product_attention(q[b:b + 1], keys, values, scale=scale, enable_gqa=True))
    return torch.cat(rows)


def call(ops, q, k_new, v_new, k, v, slots, positions, scale, layer=1, window=0):
    """The op on layer `layer` of a 3-layer cache (of k's dtype) whose layer `layer` is k, v [slots, Hkv, S, D]."""
    k_cache, v_cache = torch.randn(3, *k.shape).to(k.dtype), torch.randn(3, *v.shape).to(v.dtype)
    k_cache[layer], v_cache[layer] = k, v
    out = ops.decode_attention(q, k_new, v_new, k_cache, v_cache, layer, slots, positions, scale, window)
    return out, k_cache, v_cache


# head sizes 64, 128 and 256 take the vectorized path, 40 the general one; 9 query heads over 3 key heads is GQA
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 40), (8, 2, 128), (4, 1, 256)])
@pytest.mark.parametrize("lengths", [[1], [37, 8, 100], [300, 299]])  # odd lengths: not a multiple of 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # 16 bits: the native layers' cache
@pytest.mark.parametrize("window", [0, 37])  # 37: cuts 100, 300 and 299; exactly 37 and 8, 1 not at all
def test_decode_attention_writes_the_token_and_attends_up_to_it(ops, heads, kv_heads, dim, lengths, dtype, window):
    torch.manual_seed(len(lengths) + dim)
    k, v = torch.randn(2, 4, kv_heads, 320, dim).to(dtype).unbind(0)  # 4 slots of 320 positions
    q, k_new, v_new = torch.randn(len(lengths), heads, 1, dim), *torch.randn(2, len(lengths), kv_heads, 1, dim)
    slots = torch.tensor([3, 0, 2][:len(lengths)])
    positions = torch.tensor(lengths)[:, None] - 1
    got, k_cache, v_cache = call(ops, q, k_new, v_new, k, v, slots, positions, 0.3, window=window)
    for b, (slot, pos) in enumerate(zip(slots, positions[:, 0])):
        k[slot, :, pos], v[slot, :, pos] = k_new[b, :, 0], v_new[b, :, 0]  # rounded to the cache's dtype
    assert torch.equal(k_cache[1], k) and torch.equal(v_cache[1], v)  # only the new tokens changed
    assert got.dtype == torch.float32  # float32 arithmetic over the stored values
    want = reference(q, k.float(), v.float(), slots, positions, 0.3, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if window and max(lengths) > window:  # the window did cut: not what attending over every position gives
        assert not torch.allclose(got, reference(q, k.float(), v.float(), slots, positions, 0.3), atol=1e-3)


def test_decode_attention_reads_only_positions_up_to_the_token(ops):
    torch.manual_seed(0)
    k, v, q, k_new, v_new = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64), *torch.randn(3, 1, 2, 1, 64)
    at = (q, k_new, v_new, k, v, torch.tensor([0]), torch.tensor([[9]]), 0.125)
    before = call(ops, *at)[0]
    k[:, :, 10:], v[:, :, 10:] = float("nan"), float("nan")  # later positions: another sequence's leftovers
    assert torch.equal(call(ops, *at)[0], before)


def test_decode_attention_with_a_window_reads_only_the_window(ops):
    torch.manual_seed(0)
    k, v, q, k_new, v_new = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64), *torch.randn(3, 1, 2, 1, 64)
    at = (q, k_new, v_new, k, v, torch.tensor([0]), torch.tensor([[40]]), 0.125)
    before = call(ops, *at, window=8)[0]
    k[0, :, 40], v[0, :, 40] = k_new[0, :, 0], v_new[0, :, 0]  # what the op writes
    torch.testing.assert_close(before, reference(q, k, v, [0], [40], 0.125, 8), atol=1e-5, rtol=1e-5)  # 33..40
    k[:, :, :33], v[:, :, :33] = float("nan"), float("nan")  # before the window: never read
    k[:, :, 41:], v[:, :, 41:] = float("nan"), float("nan")
    assert torch.equal(call(ops, *at, window=8)[0], before)


def test_decode_attention_names_bad_operands():
    assert lmgen.kernels.native()
    cache, q, new = torch.zeros(2, 2, 3, 16, 64), torch.zeros(1, 9, 1, 64), torch.zeros(1, 3, 1, 64)

    def op(q=q, new=new, layer=0, slots=(0,), positions=((0,),)):
        return torch.ops.lmgen.decode_attention(q, new, new, cache, cache.clone(), layer, torch.tensor(slots),
                                                torch.tensor(positions), 1.0)

    with pytest.raises(RuntimeError, match="decode_attention: row 0 reads slot 0 at position 16, outside the cache"):
        op(positions=((16,),))
    with pytest.raises(RuntimeError, match="decode_attention: row 0 reads slot 2 at position 0"):
        op(slots=(2,))
    with pytest.raises(RuntimeError, match="decode_attention: layer 2 is outside the cache's 2 layers"):
        op(layer=2)
    with pytest.raises(RuntimeError, match=r"q must be float32 \[B, Hq, 1, D\]"):
        op(q=q.double())
    with pytest.raises(RuntimeError, match="Hkv dividing 8"):
        op(q=torch.zeros(1, 8, 1, 64))
    with pytest.raises(RuntimeError, match=r"the new k and v must be float32 \[1, 3, 1, 64\]"):
        op(new=torch.zeros(1, 3, 2, 64))
    with pytest.raises(RuntimeError, match="slots and positions must be int64 with 1 entries"):
        op(slots=(0, 1))
    with pytest.raises(RuntimeError, match="decode_attention: window must be 0 .none. or a number of positions"):
        torch.ops.lmgen.decode_attention(q, new, new, cache, cache.clone(), 0, torch.tensor([0]), torch.tensor([[0]]),
                                         1.0, -1)
    with pytest.raises(RuntimeError, match="the caches must be contiguous float32, float16 or bfloat16 .* got Double"):
        torch.ops.lmgen.decode_attention(q, new, new, cache.double(), cache.double(), 0, torch.tensor([0]),
                                         torch.tensor([[0]]), 1.0)


# gemma3: its sliding layers' window (8 positions) is outgrown by every sequence here, in the kernel and in the mask
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_models_decode_the_same_with_and_without_the_kernel(arch, request, monkeypatch):
    lm = lmgen.load(request.getfixturevalue(f"tiny_{arch}_dir"))
    prompts = [SEED_PROMPT, "Hello", SEED_PROMPT + " the lazy dog and then"]  # a batch of different lengths
    runs = {}
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(KVCache, "__init__", _without_kernel(KVCache.__init__))
            lm._core = None
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
