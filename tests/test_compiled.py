"""Compiled decoding: torch.compile's fixed-shape step against eager, the step it builds, and CUDA graphs."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import lmgen
from lmgen.cache import KVCache, Span
from lmgen.compiled import compile_options
from lmgen.models.layers import grouped_attention

from .conftest import SEED_PROMPT


# both in one process: each model compiles its own graphs (int4: the native kernels as opaque ops in the graph)
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_compiled_single_sequence_decoding_matches_eager(tiny_llama_dir, quantize):
    eager = lmgen.load(tiny_llama_dir, quantize=quantize)
    compiled = lmgen.load(tiny_llama_dir, quantize=quantize).compile()
    want = eager.generate(SEED_PROMPT, max_new_tokens=12, ignore_eos=True)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed compile warns and decodes eagerly: not here
        got = compiled.generate(SEED_PROMPT, max_new_tokens=12, ignore_eos=True)[0]
    assert got.token_ids == want.token_ids
    assert compiled._core.cache.length == compiled.context_length  # the compiled step has one fixed cache shape
    # batches still decode eagerly, and agree with the single-sequence results
    graphs = counters["stats"]["unique_graphs"]
    both = compiled.generate([SEED_PROMPT, SEED_PROMPT + " again"], max_new_tokens=12, ignore_eos=True)
    assert both[0].token_ids == want.token_ids
    # a batch keeps its own cache: the single-sequence step after it needs no new graph
    assert compiled.generate(SEED_PROMPT, max_new_tokens=12, ignore_eos=True)[0].token_ids == want.token_ids
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_failed_compile_falls_back_to_eager_with_a_warning(tiny_llama_dir, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    lm = lmgen.load(tiny_llama_dir).compile()
    want = lmgen.load(tiny_llama_dir).generate(SEED_PROMPT, max_new_tokens=6, ignore_eos=True)[0].token_ids
    with pytest.warns(UserWarning, match="torch.compile failed, decoding without it.*no C\\+\\+ compiler"):
        got = lm.generate(SEED_PROMPT, max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert got == want


def test_the_compiled_step_called_from_outside_generation_reuses_its_graph(tiny_llama_dir):
    lm = lmgen.load(tiny_llama_dir).compile()
    lm.generate(SEED_PROMPT, max_new_tokens=3, ignore_eos=True)  # compiles, inside inference mode
    graphs = counters["stats"]["unique_graphs"]
    cache = lm._core.cache
    slot = cache.allocate()
    out = lm._compiled(torch.tensor([[5]]), torch.tensor([[9]]), cache, slot)  # tensors made outside it
    assert counters["stats"]["unique_graphs"] == graphs
    with torch.inference_mode():
        want = lm.model(torch.tensor([[5]]), cache.plan([Span(0, 1, slot, 9)]), cache)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match=f"position {cache.length} is beyond the cache length {cache.length}"):
        lm._compiled(torch.tensor([[5]]), torch.tensor([[cache.length]]), cache, slot)


def test_grouped_attention_equals_attention_over_repeated_key_heads():
    torch.manual_seed(0)
    for t, s in [(1, 16), (5, 12)]:
        q, k, v = torch.randn(2, 6, t, 8), torch.randn(2, 2, s, 8), torch.randn(2, 2, s, 8)
        positions = torch.arange(s - t, s).expand(2, t) - torch.tensor([[0], [2]])  # row 1 two tokens shorter
        mask = torch.arange(s)[None, None, None, :] <= positions[:, None, :, None]
        for m in (mask, None):
            # query head h reads key head h // 3, as Hugging Face's repeat_kv lays them out
            want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=m)
            torch.testing.assert_close(grouped_attention(q, k, v, m), want)


def test_a_single_step_reads_and_writes_what_a_general_step_does(tiny_llama_dir):
    model = lmgen.load(tiny_llama_dir).model
    prompt = torch.tensor([[464, 2068, 7586, 21831]])
    caches, logits = [], []
    for single in (False, True):
        cache = KVCache.for_model(model, n_slots=3, max_len=32)
        model(prompt, cache.plan([Span(0, 4, 2, 0)]), cache)
        token, position = torch.tensor([[11687]]), torch.tensor([[4]])
        if single:  # what a compiled step runs: the whole cache behind a mask
            logits.append(model(token, cache.single_step(2, position), cache))
        else:
            logits.append(model(token, cache.plan([Span(0, 1, 2, 4)]), cache))
        caches.append(cache)
    torch.testing.assert_close(logits[1], logits[0])
    torch.testing.assert_close(caches[1].k[:, 2, :, :5], caches[0].k[:, 2, :, :5])
    assert caches[1].k[:, :2].abs().sum() == 0  # no other slot written


def test_the_gpu_step_is_captured_by_lmgen_not_by_inductors_graph_trees():
    assert compile_options(torch.device("cpu"))["cpp_wrapper"]  # the CPU graph's glue runs as C++
    cuda = compile_options(torch.device("cuda"))
    assert not cuda.get("triton.cudagraphs") and not cuda.get("cpp_wrapper")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (CI has none)")
def test_cuda_graph_decoding_matches_eager(tiny_llama_dir):
    eager = lmgen.load(tiny_llama_dir, device="cuda", dtype="float32")
    graphed = lmgen.load(tiny_llama_dir, device="cuda", dtype="float32").compile()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed capture warns and decodes without graphs: not here
        for prompt in (SEED_PROMPT, SEED_PROMPT + " and over again"):  # the second replays the first's graph
            want = eager.generate(prompt, max_new_tokens=12, ignore_eos=True)[0].token_ids
            assert graphed.generate(prompt, max_new_tokens=12, ignore_eos=True)[0].token_ids == want
    assert graphed._compiled.use_graphs and len(graphed._compiled.graphs) == 1


class FakeCUDA:
    """Stand-ins for torch.cuda's streams and graphs on the CPU: "capturing" records the step's call, and a
    replay runs it again on the recorded (static) inputs, writing into the recorded output as a graph would."""

    def __init__(self, model, wrong_replay: bool = False):
        self.model, self.wrong_replay = model, wrong_replay
        self.capturing, self.recorded, self.replays = False, None, 0
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                tokens, positions, cache, slot, out = self.call
                logits = fake.model(tokens, cache.single_step(slot, positions), cache)
                out.copy_(logits + 1 if fake.wrong_replay else logits)

        class Stream:
            def __init__(self, *args):
                pass

            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def graph(g):
            self.capturing = True
            yield
            self.capturing = False
            g.call = self.recorded

        self.patches = {"CUDAGraph": Graph, "Stream": Stream, "current_stream": lambda *a: Stream(),
                        "stream": lambda s: contextlib.nullcontext(), "graph": graph}

    def step(self, tokens, positions, cache, slot):
        out = self.model(tokens, cache.single_step(slot, positions), cache)
        if self.capturing:
            self.recorded = (tokens, positions, cache, slot, out)
        return out


def graphed(lm, monkeypatch, **kw) -> FakeCUDA:
    """lm.compile() as on a GPU, with FakeCUDA's graphs in place of CUDA's and the eager step in place of inductor's."""
    fake = FakeCUDA(lm.model, **kw)
    for name, value in fake.patches.items():
        monkeypatch.setattr(torch.cuda, name, value)
    lm.compile()
    lm._compiled.compiled, lm._compiled.use_graphs = fake.step, True
    return fake


def test_graph_replays_see_each_steps_new_inputs(tiny_llama_dir, monkeypatch):
    want = lmgen.load(tiny_llama_dir).generate(SEED_PROMPT, max_new_tokens=10, ignore_eos=True)[0].token_ids
    lm = lmgen.load(tiny_llama_dir)
    fake = graphed(lm, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert lm.generate(SEED_PROMPT, max_new_tokens=10, ignore_eos=True)[0].token_ids == want
        assert lm.generate(SEED_PROMPT, max_new_tokens=10, ignore_eos=True)[0].token_ids == want  # same graph
    assert list(lm._compiled.graphs) == [lm._core.cache]  # one graph for this cache, whichever slot
    assert fake.replays == 1 + 8 + 9  # the capture's check, then every later step of both runs


def test_a_graph_that_replays_wrong_is_dropped_with_a_warning(tiny_llama_dir, monkeypatch):
    want = lmgen.load(tiny_llama_dir).generate(SEED_PROMPT, max_new_tokens=6, ignore_eos=True)[0].token_ids
    lm = lmgen.load(tiny_llama_dir)
    graphed(lm, monkeypatch, wrong_replay=True)
    with pytest.warns(UserWarning, match="CUDA graph capture failed.*differ from the compiled step's"):
        assert lm.generate(SEED_PROMPT, max_new_tokens=6, ignore_eos=True)[0].token_ids == want
    assert not lm._compiled.use_graphs
