"""A model's single-sequence decode step with fixed shapes: torch.compile, and on a GPU a replayed CUDA graph."""

from __future__ import annotations

import types
import warnings
import weakref

import torch

from .cache import KVCache


def compile_options(device: torch.device) -> dict:
    """Inductor options for the decode step on `device`."""
    options = {}
    if device.type == "cpu":
        # The graph's glue runs as C++ too, calling lmgen's native ops without Python (~20% faster); and it
        # skips re-checking the size, strides and alignment of its ~430 inputs each call (~0.4 ms a token):
        # the weights never change after loading, and the cache's shape is guarded.
        options = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
    # No guards on the model's ~400 weights (~0.9 ms a step on the CPU): they never change after loading,
    # and with its own code object this model never meets another model's graphs. Guards on the cache
    # stay, so a new cache size still compiles a new graph.
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # torch >= 2.8
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return options


def _private(fn):
    """fn on a private copy of its code: torch.compile keeps graphs and guards per code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledDecode:
    """decode(tokens, positions, cache, slot) -> logits [1, V] for one sequence's newest token.

    tokens and positions are [1, 1] on the CPU. The step reads the whole cache behind a mask, so its shapes
    never change and it compiles once per cache shape (on a small CPU, minutes the first time; torch caches
    it on disk). On a GPU each (cache, slot) step is also captured as a CUDA graph: a step is then two small
    copies and one launch, where the compiled step alone launches every kernel from Python. If compiling
    fails, decoding goes on eagerly; if capturing fails, with the compiled step; each with a warning.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device

        def step(tokens, positions, cache, slot):  # slot: a tensor [1], so one graph serves every slot
            return model(tokens, cache.single_step(slot, positions), cache)

        self.compiled = torch.compile(_private(step), dynamic=False, options=compile_options(self.device))
        self.failed: str | None = None
        self.use_graphs = self.device.type == "cuda"
        self.graphs: weakref.WeakKeyDictionary[KVCache, CapturedStep] = weakref.WeakKeyDictionary()

    @torch.inference_mode()  # as generation runs: tensors made while capturing are inference tensors
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        cache.check_positions(positions)
        slot = torch.tensor([slot])
        if self.failed is None:
            try:
                if self.use_graphs:
                    return self._graph_step(tokens, positions, cache, slot)
                return self._compiled_step(tokens, positions, cache, slot)
            except Exception as e:  # no C++ compiler, unsupported op...: eager gives the same answer, slower
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"torch.compile failed, decoding without it ({self.failed[:200]})", stacklevel=3)
        positions = positions.to(self.device)
        return self.model(tokens.to(self.device), cache.single_step(slot.to(self.device), positions), cache)

    def _graph_step(self, tokens, positions, cache, slot):
        captured = self.graphs.get(cache)
        if captured is not None and captured.length == cache.length:
            return captured.replay(tokens, positions, slot)
        try:
            captured = self.graphs[cache] = CapturedStep(self.compiled, tokens, positions, cache, slot)
        except Exception as e:  # capture refused by an op, or a mismatch: the compiled step alone is still right
            self.use_graphs = False
            warnings.warn(f"CUDA graph capture failed, decoding with the compiled step alone "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})", stacklevel=4)
            return self._compiled_step(tokens, positions, cache, slot)
        return captured.out.clone()  # capturing ran this step already

    def _compiled_step(self, tokens, positions, cache, slot):
        # fresh tensors, made here in inference mode: the graph's guards hold whoever made the inputs
        return self.compiled(tokens.to(self.device, copy=True), positions.to(self.device, copy=True), cache,
                             slot.to(self.device, copy=True))


class CapturedStep:
    """One decode step captured as a CUDA graph, with its input and output buffers; capturing runs the step."""

    def __init__(self, step, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, slot: torch.Tensor):
        device = cache.k.device
        self.length = cache.length  # a grown cache is new tensors: captured anew
        self.tokens = tokens.to(device, copy=True)
        self.positions = positions.to(device, copy=True)
        self.slot = slot.to(device, copy=True)
        # Warm up outside the capture (compiling, autotuning, library workspaces), on a side stream as
        # torch.cuda.graphs asks. Each run writes this step's keys and values again: the same ones.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                expected = step(self.tokens, self.positions, cache, self.slot)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(self.tokens, self.positions, cache, self.slot)
        self.graph.replay()
        # The same kernels on the same inputs: more than rounding apart means the capture is wrong.
        error = float((self.out.float() - expected.float()).abs().max())
        if not error <= 1e-2 * max(float(expected.float().abs().max()), 1.0):
            raise RuntimeError(f"the captured step's logits differ from the compiled step's by {error}")

    def replay(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Run the step for new inputs; a copy of its logits (the graph rewrites its output buffer)."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.slot.copy_(slot)
        self.graph.replay()
        return self.out.clone()
