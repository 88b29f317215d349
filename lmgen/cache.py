"""A fixed-capacity KV cache of slots, one sequence per slot, written by position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


@dataclass
class Step:
    """What one forward pass needs to know about where its tokens sit.

    positions: [B, T] position of each token; slots: [B] cache row of each batch row
    (None without a cache); mask: [B, 1, T, S] True where a query may attend a key. With `kernel`, lone new
    tokens go through lmgen's decode kernel, which writes their keys and values and reads only the positions
    in use itself: there is no mask or write index to build.
    """

    positions: torch.Tensor
    slots: torch.Tensor | None
    mask: torch.Tensor | None
    kv_len: int
    slot_start: int | None  # first slot when the slots are a contiguous range, so reads are views
    write_index: torch.Tensor | None = None  # rows of the flattened cache layer that this step writes
    kernel: bool = False


def make_step(positions: torch.Tensor, cache: "KVCache | None", slots: list[int] | None) -> Step:
    """The Step for a forward over `positions` [B, T]: through the cache's `slots`, or causal alone."""
    if cache is not None:
        if slots is None:
            raise ValueError("a forward through a KV cache needs the slots of its rows")
        return cache.step(slots, positions)
    mask = positions[:, None, :, None] >= positions[:, None, None, :]
    return Step(positions, None, mask, positions.shape[1], None)


class KVCache:
    """Keys and values for up to `n_slots` sequences of up to `max_len` tokens each.

    The cache lives outside the model. Each slot holds one sequence; a token at
    position p writes its keys at index p, so sequences of different lengths
    decode in one batch, and a freed slot is simply overwritten by its next user.
    """

    def __init__(self, n_layers: int, n_slots: int, max_len: int, n_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32, device="cpu"):
        shape = (n_layers, n_slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots, self.max_len = n_slots, max_len
        # lone new tokens can go through lmgen's decode kernel (Step.kernel)
        self.decode_kernel = self.k.device.type == "cpu" and dtype == torch.float32 and kernels.native()
        self._free = list(range(n_slots - 1, -1, -1))

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_slots: int, max_len: int, dtype=None) -> "KVCache":
        """A cache shaped for `model` (which exposes `cache_shape()`), on its device."""
        n_layers, n_kv_heads, head_dim = model.cache_shape()
        p = next(model.parameters())
        return cls(n_layers, n_slots, max_len, n_kv_heads, head_dim,
                   dtype=dtype or p.dtype, device=p.device)

    @property
    def free_slots(self) -> int:
        """How many slots are free."""
        return len(self._free)

    def allocate(self) -> int:
        """Take a free slot; raises RuntimeError when all are in use."""
        if not self._free:
            raise RuntimeError(f"all {self.n_slots} KV cache slots are in use")
        slot = min(self._free)  # lowest first: a batch then takes a contiguous run, read as a view, not a gather
        self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back so another sequence can use it."""
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (shared prompts)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def reorder(self, slots: list[int], sources: list[int], length: int) -> None:
        """Set slots[i] to a copy of sources[i] for the first `length` positions (beam search)."""
        src = torch.tensor(sources, device=self.k.device)
        dst = torch.tensor(slots, device=self.k.device)
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def step(self, slots: list[int], positions: torch.Tensor) -> Step:
        """Describe a forward over `positions` [B, T] for the sequences in `slots`, reading keys up to the
        furthest position.

        The indices are worked out on the CPU and moved once: on a GPU that is a copy or two, not a
        dozen tiny kernels and a wait; positions given on the CPU cost no wait at all.
        """
        host = positions.cpu()
        kv_len = self.check_positions(host) + 1
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        device = self.k.device
        if self.decode_kernel and host.shape[1] == 1:
            return Step(positions.to(device), torch.tensor(slots, device=device), None, kv_len,
                        slots[0] if contiguous else None, kernel=True)
        mask = None  # one new token sees all of its slot: no mask (faster attention)
        if host.shape != (1, 1):
            # A key is visible when it sits at or before the query's position: everything
            # there was written by this sequence, earlier or in this same step.
            mask = torch.arange(kv_len)[None, None, None, :] <= host[:, None, :, None]
        slot_t = torch.tensor(slots)
        return Step(positions.to(device), slot_t.to(device), None if mask is None else mask.to(device), kv_len,
                    slots[0] if contiguous else None, self._write_index(slot_t, host).to(device))

    def check_positions(self, positions: torch.Tensor) -> int:
        """The furthest of `positions` (on the CPU); ValueError if it is beyond the cache."""
        last = int(positions.max())
        if last >= self.max_len:
            raise ValueError(f"position {last} is beyond the cache length {self.max_len}")
        return last

    def single_step(self, slot: int, positions: torch.Tensor) -> Step:
        """The Step for one new token of the sequence in `slot` at positions [1, 1] (on the cache's device),
        attending over the whole cache behind a mask, or through the decode kernel.

        Every step has the same shapes, and nothing is read back to the host: a compiled or captured
        decode step builds this itself. The caller checks the position (check_positions).
        """
        slot_t = torch.full((1,), slot, device=positions.device)
        if self.decode_kernel:
            return Step(positions, slot_t, None, self.max_len, slot, kernel=True)
        mask = torch.arange(self.max_len, device=positions.device)[None, None, None, :] <= positions[:, None, :, None]
        return Step(positions, slot_t, mask, self.max_len, slot, self._write_index(slot_t, positions))

    def _write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Row (slot, head, position) of a layer viewed as [slots * heads * max_len, head_dim], in the
        # order of k.reshape(-1, head_dim) for k [B, H, T, D]: one index_copy_ per layer writes them all.
        heads = torch.arange(self.k.shape[2], device=positions.device)
        return ((slots[:, None, None] * self.k.shape[2] + heads[None, :, None]) * self.max_len
                + positions[:, None, :]).flatten()

    def update(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, T, D] at the step's positions; return this batch's keys and values."""
        d = k.shape[-1]
        # rows of the whole cache viewed as [rows, head_dim]: writing into the base tensor, not a view of it,
        # lets torch.compile update it in place instead of copying the layer
        rows = step.write_index + layer * (self.k[0].numel() // d)
        self.k.view(-1, d).index_copy_(0, rows, k.reshape(-1, d).to(self.k.dtype))
        self.v.view(-1, d).index_copy_(0, rows, v.reshape(-1, d).to(self.v.dtype))
        k_layer, v_layer = self.k[layer], self.v[layer]
        if step.slot_start is not None:
            rows = slice(step.slot_start, step.slot_start + k.shape[0])
            return k_layer[rows, :, :step.kv_len], v_layer[rows, :, :step.kv_len]
        return k_layer[step.slots, :, :step.kv_len], v_layer[step.slots, :, :step.kv_len]
