"""A KV cache of slots, one sequence per slot, written by position; the attention metadata of a step; prefix reuse."""

from __future__ import annotations

import functools
import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import kernels

BLOCK = 16  # tokens per prefix-cache block: a prompt reuses cached keys a whole block at a time
MIN_LENGTH = 128  # positions a GPU cache starts with; it doubles as sequences grow
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what lmgen's decode kernel reads keys and values as


@dataclass
class Span:
    """A run of one sequence's tokens in a step: rows [start, start + count) at positions first.. of `slot`."""

    start: int
    count: int
    slot: int | None
    first: int


@dataclass
class Step:
    """What one forward over flat tokens [1, N] needs to know about where they sit: the one attention metadata.

    positions [1, N] is each token's position; spans say which sequence each run of tokens belongs to. Lone tokens
    (decoding) attend together: through lmgen's kernel when `kernel`, which writes their keys and values itself and
    reads only the positions in use; else a gather behind a mask. Longer spans (prompt chunks) attend causally
    over their slot. Without a cache (slot None) a span attends to itself alone.
    """

    positions: torch.Tensor
    spans: list[Span]
    lone: torch.Tensor | None = None  # rows of the lone tokens
    lone_slots: torch.Tensor | None = None
    lone_positions: torch.Tensor | None = None
    lone_mask: torch.Tensor | None = None  # [B, 1, 1, S] without the kernel
    write_index: torch.Tensor | None = None  # rows of the flattened cache layer that this step writes
    kv_len: int = 0
    kernel: bool = False

    @property
    def all_lone(self) -> bool:
        """Whether every token is a sequence's lone new token (a pure decoding step)."""
        return self.lone is not None and len(self.spans) == self.lone.numel()


def causal_step(n: int, device) -> Step:
    """The Step for a forward over n tokens of one sequence without a cache."""
    return Step(torch.arange(n, device=device)[None], [Span(0, n, None, 0)])


class KVCache:
    """Keys and values for up to `n_slots` sequences of up to `max_len` tokens each.

    The cache lives outside the model. Each slot holds one sequence; a token at position p writes its keys at index
    p, so sequences of different lengths decode in one batch. Memory follows the tokens in use, not slots times the
    maximum length: on the CPU the cache is zeroed pages the OS maps as positions are first written; elsewhere its
    length grows (doubling, from MIN_LENGTH) to the longest sequence in use.
    """

    def __init__(self, n_layers: int, n_slots: int, max_len: int, n_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32, device="cpu", float32_queries: bool = False):
        self.n_slots, self.max_len = n_slots, max_len
        self._shape = (n_layers, n_slots, n_kv_heads, head_dim)
        self.k = self.v = torch.empty(0)
        self.length = 0
        self._dtype, self._device = dtype, torch.device(device)
        self.ensure(min(max_len, MIN_LENGTH))
        # lone new tokens can go through lmgen's decode kernel (Step.kernel)
        # (its queries are float32: a 16-bit cache goes with float32 activations, as the native layers' does)
        self.decode_kernel = (self.k.device.type == "cpu" and kernels.native()
                              and (dtype == torch.float32 or float32_queries and dtype in KERNEL_DTYPES))
        self._free = list(range(n_slots))  # least recently used first
        self.prefix = PrefixIndex(n_slots)

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_slots: int, max_len: int, dtype=None) -> "KVCache":
        """A cache shaped for `model` (which exposes `cache_shape()`), on its device: 16 bits for a model on the
        native layers (native_cache_dtype(); half the memory), else the model's dtype."""
        n_layers, n_kv_heads, head_dim = model.cache_shape()
        p = next(model.parameters())
        fused = getattr(model, "fused", None) is not None
        dtype = dtype or (native_cache_dtype() if fused else p.dtype)
        return cls(n_layers, n_slots, max_len, n_kv_heads, head_dim, dtype=dtype, device=p.device,
                   float32_queries=fused)

    def ensure(self, length: int) -> None:
        """Grow every slot to hold at least `length` positions (a power of two, at most max_len)."""
        if length <= self.length:
            return
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is beyond the cache length {self.max_len}")
        if self._device.type == "cpu":  # the whole length at once: its pages are only taken as tokens use them
            new = self.max_len
        else:
            new = min(self.max_len, max(MIN_LENGTH, 1 << (length - 1).bit_length()))
        n_layers, n_slots, heads, dim = self._shape
        k, v = (_zeros((n_layers, n_slots, heads, new, dim), self._dtype, self._device) for _ in range(2))
        if self.length:
            k[:, :, :, :self.length] = self.k
            v[:, :, :, :self.length] = self.v
        self.k, self.v, self.length = k, v, new

    def nbytes(self) -> int:
        """Bytes reserved for the keys and values (on the CPU the OS provides them as positions are first written)."""
        return self.k.numel() * self.k.element_size() * 2

    @property
    def free_slots(self) -> int:
        """How many slots are free."""
        return len(self._free)

    def allocate(self) -> int:
        """Take the least recently used free slot; RuntimeError when all are in use."""
        return self.allocate_prefix(())[0]

    def allocate_prefix(self, prompt: Sequence[int]) -> tuple[int, int]:
        """Take a free slot for a sequence starting with `prompt`; return it and how many of the prompt's
        positions it already holds (reused from a cached prefix). RuntimeError when all slots are in use.

        A free slot whose cached tokens start the prompt is taken as it is; else the least recently used one,
        into which a prefix held by a busy slot is copied.
        """
        if not self._free:
            raise RuntimeError(f"all {self.n_slots} KV cache slots are in use")
        sources, hit = self.prefix.lookup(prompt)
        idle = [s for s in self._free if s in sources]
        slot = idle[0] if idle else self._free[0]
        source = slot if idle else min(sources, default=None)
        self._free.remove(slot)
        if slot != source:
            self.prefix.forget(slot)
            if hit:
                self.copy_prefix(source, slot, hit)
                self.prefix.record(slot, prompt[:hit])
        self.prefix.truncate(slot, hit)
        return slot, hit

    def release(self, slot: int, keep: bool = True) -> None:
        """Give a slot back; with `keep` its cached tokens stay reusable until the slot is taken again."""
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not allocated")
        if not keep:
            self.prefix.forget(slot)
        self._free.append(slot)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (shared prompts)."""
        self.reorder([dst], [src], length)

    def reorder(self, slots: list[int], sources: list[int], length: int) -> None:
        """Set slots[i] to a copy of sources[i] for the first `length` positions (beam search)."""
        src = torch.tensor(sources, device=self.k.device)
        dst = torch.tensor(slots, device=self.k.device)
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def plan(self, spans: list[Span]) -> Step:
        """The Step for a forward over these spans (rows in order), growing the cache to hold them."""
        ends = [s.first + s.count for s in spans]
        self.ensure(max(ends))
        device = self.k.device
        positions = torch.cat([torch.arange(s.first, e) for s, e in zip(spans, ends)])
        lone = [s for s in spans if s.count == 1]
        kernel = self.decode_kernel and bool(lone)
        step = Step(positions.to(device)[None], spans, kv_len=max(ends), kernel=kernel)
        if lone:
            step.lone = torch.tensor([s.start for s in lone], device=device)
            step.lone_slots = torch.tensor([s.slot for s in lone], device=device)
            host_positions = torch.tensor([s.first for s in lone])
            step.lone_positions = host_positions.to(device)
            if not kernel:
                lone_len = int(host_positions.max()) + 1
                mask = torch.arange(lone_len)[None, None, None, :] <= host_positions[:, None, None, None]
                step.lone_mask = mask.to(device)
        if not (kernel and len(lone) == len(spans)):  # the kernel writes lone tokens' keys itself
            slots = torch.cat([torch.full((s.count,), s.slot) for s in spans])
            step.write_index = self._write_index(slots, positions).to(device)
        return step

    def single_step(self, slot: "int | torch.Tensor", positions: torch.Tensor) -> Step:
        """The Step for one new token of the sequence in `slot` at positions [1, 1] (on the cache's device),
        with fixed shapes and no read back to the host: a compiled or captured decode step builds this itself.

        Without the kernel it attends over the whole cache behind a mask. The caller checks the position.
        """
        slot_t = slot if isinstance(slot, torch.Tensor) else torch.full((1,), slot, device=positions.device)
        lone = torch.zeros(1, dtype=torch.long, device=positions.device)
        step = Step(positions, [Span(0, 1, None, -1)], lone, slot_t, positions[0], kv_len=self.length,
                    kernel=self.decode_kernel)
        if not self.decode_kernel:
            step.lone_mask = torch.arange(self.length, device=positions.device)[None, None, None, :] <= positions[0][
                :, None, None, None]
            step.write_index = self._write_index(slot_t, positions[0])
        return step

    def check_positions(self, positions: torch.Tensor) -> int:
        """The furthest of `positions` (on the CPU); ValueError if it is beyond the cache."""
        last = int(positions.max())
        if last >= self.length:
            raise ValueError(f"position {last} is beyond the cache length {self.length}")
        return last

    def _write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Row (slot, head, position) of a layer viewed as [slots * heads * length, head_dim], in the order of
        # k.transpose(0, 1).reshape(-1, head_dim) for k [H, N, D] with one slot and position per token.
        heads = torch.arange(self.k.shape[2], device=positions.device)
        return ((slots[None, :] * self.k.shape[2] + heads[:, None]) * self.length + positions[None, :]).flatten()

    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [1, H, N, D] at the step's slots and positions."""
        d = k.shape[-1]
        # rows of the whole cache viewed as [rows, head_dim]: writing into the base tensor, not a view of it,
        # lets torch.compile update it in place instead of copying the layer
        rows = step.write_index + layer * (self.k[0].numel() // d)
        self.k.view(-1, d).index_copy_(0, rows, k.reshape(-1, d).to(self.k.dtype))
        self.v.view(-1, d).index_copy_(0, rows, v.reshape(-1, d).to(self.v.dtype))


@functools.cache
def native_cache_dtype() -> torch.dtype:
    """The native layers' cache type: bfloat16 where the CPU computes in it (AVX-512 BF16), so a prompt piece's
    attention reads the cache as it is (about twice float32's speed); else float16, llama.cpp's default."""
    flags = kernels.cpu_flags().split()
    return torch.bfloat16 if "avx512_bf16" in flags or "amx_bf16" in flags else torch.float16


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on the CPU an anonymous mapping, whose pages the OS provides (zeroed) on first write, so a cache sized
    for every slot's longest sequence takes memory only for the positions written. Huge pages are turned off for
    it: one 2 MB page per layer, slot and head would take the memory back."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if size < 1 << 20:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(region, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class PrefixIndex:
    """Which tokens each slot's cached positions hold, found by chained hashes of BLOCK-token blocks."""

    def __init__(self, n_slots: int):
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]  # the whole blocks each slot holds
        self.slots_by_hash: dict[int, set[int]] = {}
        self.queries = self.hits = self.hit_tokens = 0
        self.enabled = True

    @staticmethod
    def hashes(tokens: Sequence[int]) -> list[int]:
        """One hash per whole block, each covering every token up to the block's end."""
        out, h = [], 0
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            h = hash((h, *tokens[start:start + BLOCK]))
            out.append(h)
        return out

    def lookup(self, prompt: Sequence[int]) -> tuple[set[int], int]:
        """The slots holding the longest whole-block prefix of prompt, and its length (short of the last token)."""
        if not prompt or not self.enabled:
            return set(), 0
        self.queries += 1
        found: set[int] = set()
        length = 0
        usable = (len(prompt) - 1) // BLOCK  # the last prompt token is always computed: it gives the logits
        for i, h in enumerate(self.hashes(prompt[:usable * BLOCK])):
            lo, hi = i * BLOCK, (i + 1) * BLOCK
            block = list(prompt[lo:hi])
            now = {s for s in self.slots_by_hash.get(h, ()) if (not i or s in found) and self.tokens[s][lo:hi] == block}
            if not now:
                break
            found, length = now, hi
        self.hits += length > 0
        self.hit_tokens += length
        return found, length

    def record(self, slot: int, tokens: Sequence[int]) -> None:
        """Note that `slot` holds keys for `tokens` (its positions from 0); whole blocks only."""
        have = len(self.tokens[slot])
        if not self.enabled:
            return
        whole = len(tokens) // BLOCK * BLOCK
        if whole <= have:
            return
        held = self.tokens[slot] = list(tokens[:whole])
        for i, h in enumerate(self.hashes(held)):
            if i >= have // BLOCK:
                self.slots_by_hash.setdefault(h, set()).add(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the first `length` cached tokens of `slot` (the rest will be overwritten)."""
        held = self.tokens[slot]
        if len(held) <= length:
            return
        self.forget(slot)
        self.record(slot, held[:length])

    def forget(self, slot: int) -> None:
        """The slot's cached tokens are no longer valid."""
        for h in self.hashes(self.tokens[slot]):
            users = self.slots_by_hash.get(h)
            if users is not None:
                users.discard(slot)
                if not users:
                    del self.slots_by_hash[h]
        self.tokens[slot] = []
