"""Measure constrained-decoding libraries (llguidance, xgrammar, outlines-core) on lmgen's own tokenizers.

For SmolLM2's tokenizer (the embedded GGUF's) and GPT-2's: tokenizer set-up, compile time of a nested JSON
schema, a date regex and "any JSON object", token-mask + commit time stepping through valid JSON at batch 1
and 16, applying a bitmask to (16, 49152) float32 logits, and a probe of features and error messages.
A library that is not installed is skipped. Run it in a venv holding torch and the libraries:

    /tmp/libvenv/bin/python benchmarks/mask_libraries.py
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lmgen
from lmgen.loading import DEFAULT_MODEL_FILE, load_tokenizer  # noqa: E402
from lmgen.tokenizer import gpt2_tokenizer  # noqa: E402

THREADS = os.cpu_count() or 1
DATE, OBJECT = r"\d{4}-\d{2}-\d{2}", '{"type": "object"}'


class Address(BaseModel):
    street: str
    city: str
    zip: str


class Friend(BaseModel):
    name: str
    years: int


class Person(BaseModel):
    name: str
    age: int
    email: Optional[str] = None
    role: Literal["admin", "user", "guest"]
    address: Address
    tags: list[str]
    friends: list[Friend]


SCHEMA = json.dumps(Person.model_json_schema())


def instance(k: int) -> str:
    """The k-th valid instance of SCHEMA, compact JSON as model_dump_json writes it."""
    names = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Édouard Lucas", "Kurt Gödel", "Emmy Noether"]
    return Person(name=names[k % 6], age=20 + 3 * k, email=None if k % 3 == 0 else f"user{k}@example.org",
                  role=["admin", "user", "guest"][k % 3], tags=["math", "engines", "logic"][:k % 4],
                  address=Address(street=f"{k + 1} High Street", city=["London", "Zürich", "Paris"][k % 3],
                                  zip=str(10000 + 37 * k)),
                  friends=[Friend(name=f"Friend {j}", years=j) for j in range(k % 3)]).model_dump_json()


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def allowed(row: np.ndarray, token: int) -> bool:
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)


def new_bitmask(rows: int, vocab: int) -> torch.Tensor:
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


class Lib:
    fill_par = consume_par = None  # the library's batch API, where it has one

    def fill_rows(self, ms_, bitmask): [self.fill(m, bitmask, i) for i, m in enumerate(ms_)]
    def consume_rows(self, ms_, tokens): return all([self.consume(m, t) for m, t in zip(ms_, tokens)])


class LLGuidance(Lib):  # the LLMatcher is the compiled form: its lexer and masks are built lazily, step by step
    name, modules = "llguidance", ["llguidance", "llguidance.torch"]

    def __init__(self, tok):
        import llguidance
        import llguidance.torch
        self.llg, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                          eos_token=list(tok.eos_token_ids))
        self.executor = llguidance.LLExecutor(num_threads=THREADS)

    def compile(self, kind, text):  # grammar_from(): json_schema | regex | choice | lark | gbnf
        m = self.llg.LLMatcher(self.tok, self.llg.grammar_from(kind, text))  # never raises for a bad grammar
        if m.is_error():
            raise ValueError(f"LLMatcher.get_error(): {m.get_error()}")
        return m

    def new_matcher(self, compiled): return compiled.deep_copy()
    def fill(self, m, bitmask, row): self.llt.fill_next_token_bitmask(m, bitmask, row)
    def consume(self, m, token): return m.consume_token(token)
    def rollback(self, m, n): return m.rollback(n)
    def forced(self, m): return f"bytes {m.compute_ff_bytes()!r} tokens {m.compute_ff_tokens()}"
    def consume_par(self, ms_, tokens): return all(self.executor.consume_token_par(list(zip(ms_, tokens))))

    def fill_par(self, ms_, bitmask):
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms_)], bitmask)


class XGrammar(Lib):
    name, modules = "xgrammar", ["xgrammar", "transformers"]

    def __init__(self, tok):
        import transformers
        import xgrammar
        self.xgr = xgrammar
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size,
                                                       stop_token_ids=list(tok.eos_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=THREADS)  # caches what it compiles
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=THREADS)

    def compile(self, kind, text):
        c = self.compiler
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in json.loads(text)))
        return {"json_schema": c.compile_json_schema, "regex": c.compile_regex, "lark": c.compile_lark,
                "gbnf": c.compile_grammar}[kind](text)  # compile_grammar: xgrammar's EBNF, GBNF-like

    def new_matcher(self, compiled): return self.xgr.GrammarMatcher(compiled)
    def fill(self, m, bitmask, row): m.fill_next_token_bitmask(bitmask, row)
    def consume(self, m, token): return m.accept_token(token)
    def rollback(self, m, n): return m.rollback(n) or True
    def forced(self, m): return f"string {m.find_jump_forward_string()!r} tokens {m.find_jump_forward_tokens()}"
    def fill_par(self, ms_, bitmask): self.batch.batch_fill_next_token_bitmask(ms_, bitmask)
    def consume_par(self, ms_, tokens): return all(self.batch.batch_accept_token(ms_, tokens))


class OutlinesCore(Lib):  # regexes only: a JSON schema becomes one regex, compiled to a token-level DFA (Index)
    name, modules = "outlines-core", ["outlines_core"]  # no batch API

    def __init__(self, tok):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        self.oc, self.schema_regex = outlines_core, build_regex_from_schema
        assert json.loads(tok.backend.to_str())["decoder"]["type"] == "ByteLevel", "byte-level BPE only here"
        bs = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode, inverted
        chars = bs + [256 + n for n in range(256 - len(bs))]
        byte_of = {chr(c): b for b, c in zip(bs + [b for b in range(256) if b not in bs], chars)}
        special, vocab = set(tok.backend.get_added_tokens_decoder()), {}
        for piece, i in tok.backend.get_vocab(with_added_tokens=False).items():
            if i not in special:
                vocab.setdefault(bytes(byte_of[c] for c in piece), []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_token_ids[0], vocab)  # {token bytes: [ids]}, EOS apart

    def compile(self, kind, text):
        if kind not in ("json_schema", "regex", "choice"):
            raise NotImplementedError("no grammars: regexes and JSON schemas (as a regex) only")
        text = {"json_schema": self.schema_regex, "regex": str,
                "choice": lambda t: "(" + "|".join(map(re.escape, json.loads(t))) + ")"}[kind](text)
        return self.oc.Index(text, self.vocab)

    def new_matcher(self, compiled): return self.oc.Guide(compiled)  # keeps the last 32 states to roll back
    def fill(self, m, bitmask, row): m.write_mask_into(bitmask[row].data_ptr(), bitmask.shape[1], 4)
    def consume(self, m, token): return m.advance(token, return_tokens=False) or True
    def rollback(self, m, n): return m.rollback_state(n) or True
    def forced(self, m): return "no API (a state with one allowed token is forced text)"


LIBS = {lib.name: lib for lib in (LLGuidance, XGrammar, OutlinesCore)}


def step(lib, compiled, seqs, eos, vocab, parallel=False):
    """Step one matcher per token list. Returns ms per step (mask fill + commit, timed while every row is
    live), the mean count of allowed tokens, and whether every token and each final EOS were allowed."""
    matchers, bitmask = [lib.new_matcher(compiled) for _ in seqs], new_bitmask(len(seqs), vocab)
    rows, times, counts, ok, n = bitmask.numpy(), [], [], True, min(map(len, seqs))
    for k in range(n):
        t0 = time.perf_counter()
        (lib.fill_par if parallel else lib.fill_rows)(matchers, bitmask)
        t_fill = ms(t0)
        ok &= all(allowed(rows[i], s[k]) for i, s in enumerate(seqs))
        counts.append(int(np.bitwise_count(rows[0].view(np.uint32)).sum()))
        tokens = [s[k] for s in seqs]
        t0 = time.perf_counter()
        ok &= (lib.consume_par if parallel else lib.consume_rows)(matchers, tokens)
        times.append(t_fill + ms(t0))
    for i, (m, s) in enumerate(zip(matchers, seqs)):  # untimed: finish each row; then EOS must be allowed
        for t in [*s[n:], eos]:
            lib.fill(m, bitmask, i)
            ok &= allowed(rows[i], t) and (t == eos or lib.consume(m, t))
    return times, np.mean(counts), ok


def bench(lib_cls, tok):
    """One table row: set-up, compiles, batch 1 and batch 16 stepping."""
    for module in lib_cls.modules:  # imports are timed apart, in main()
        importlib.import_module(module)
    t0 = time.perf_counter()
    lib = lib_cls(tok)
    c = {"setup": ms(t0)}
    for kind, text, key in [("regex", DATE, "regex"), ("json_schema", SCHEMA, "cold"),
                            ("json_schema", SCHEMA, "warm"), ("json_schema", OBJECT, "object")]:
        t0 = time.perf_counter()
        compiled = lib.compile(kind, text)
        c[key] = ms(t0)
        if key == "cold":
            schema, t0 = compiled, time.perf_counter()
            lib.fill(lib.new_matcher(schema), new_bitmask(1, tok.vocab_size), 0)
            c["first"] = ms(t0)
    eos, seqs = tok.eos_token_ids[0], [tok.encode(instance(k), add_special_tokens=False) for k in range(16)]
    b1 = [step(lib, schema, seqs[:1], eos, tok.vocab_size) for _ in range(5)]  # 5 passes for a steadier p99
    us = np.array([t for times, _, _ in b1 for t in times]) * 1e3
    b16, _, ok16 = step(lib, schema, seqs, eos, tok.vocab_size)
    b16p, _, okp = step(lib, schema, seqs, eos, tok.vocab_size, parallel=True) if lib.fill_par else ([], 0, True)
    valid = all(ok for _, _, ok in b1) and ok16 and okp
    return lib, [f"{c['setup']:.0f}", f"{c['cold']:.1f}", f"{c['warm']:.2f}", f"{c['first']:.2f}",
                 f"{c['regex']:.1f}", f"{c['object']:.1f}", str(len(seqs[0])), f"{b1[0][1]:.0f}", f"{us.mean():.0f}",
                 f"{np.percentile(us, 99):.0f}", f"{np.mean(b16):.2f}", f"{np.mean(b16p):.2f}" if b16p else "-",
                 "yes" if valid else "NO"]


def table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    print()


def apply_bench(present):
    """Masking (16, 49152) float32 logits with a random int32 bitmask: first call and steady ms, checked."""
    gen, shifts = torch.Generator().manual_seed(0), torch.arange(32, dtype=torch.int32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (16, 49152 // 32), dtype=torch.int32, generator=gen)

    def plain(logits, bm):
        bits = ((bm.unsqueeze(-1) >> shifts) & 1).view(bm.shape[0], -1)[:, :logits.shape[1]]
        logits.masked_fill_(bits == 0, float("-inf"))

    def numpy_unpack(logits, bm):
        bits = np.unpackbits(bm.numpy().view(np.uint8), axis=1, bitorder="little")[:, :logits.shape[1]]
        logits.masked_fill_(torch.from_numpy(bits) == 0, float("-inf"))

    methods = {"plain torch: (bm.unsqueeze(-1) >> arange(32)) & 1, masked_fill_": plain,
               "numpy: np.unpackbits(bitorder='little'), masked_fill_": numpy_unpack}
    for lib, module, how in [("xgrammar", "xgrammar", "C++ CPU kernel"),
                             ("llguidance", "llguidance.torch", "torch.compile"),
                             ("outlines-core", "outlines_core.kernels.torch", "torch.compile")]:
        if lib in present:
            methods[f"{module}.apply_token_bitmask_inplace ({how})"] = \
                importlib.import_module(module).apply_token_bitmask_inplace
    base = torch.randn(16, 49152, generator=gen)
    want, rows = base.clone(), []
    plain(want, bitmask)
    for name, fn in methods.items():
        logits, times, t0 = base.clone(), [], time.perf_counter()
        fn(logits, bitmask)
        first = ms(t0)
        for _ in range(50):
            x, t0 = base.clone(), time.perf_counter()
            fn(x, bitmask)
            times.append(ms(t0))
        rows.append([name, f"{first:.1f}", f"{np.median(times):.3f}", "yes" if torch.equal(logits, want) else "NO"])
    table(["apply a bitmask to (16, 49152) float32 logits", "first call ms", "median ms", "correct"], rows)


def probe(lib, tok):
    """Which grammar kinds work, rollback, forced text, and the errors for bad input (SmolLM2's tokenizer)."""
    results = []
    for kind, text, sample in [("json_schema", SCHEMA, instance(1)), ("regex", DATE, "2024-01-31"),
                               ("choice", '["yes", "no"]', "no"), ("lark", 'start: "yes" | "no"', "no"),
                               ("gbnf", 'root ::= "yes" | "no"', "no")]:
        try:
            _, _, ok = step(lib, lib.compile(kind, text), [tok.encode(sample, add_special_tokens=False)],
                            tok.eos_token_ids[0], tok.vocab_size)
            results.append(f"{kind} {'ok' if ok else 'WRONG'}")
        except Exception as e:
            results.append(f"{kind} no ({type(e).__name__})")
    print(f"{lib.name}: " + ", ".join(results))
    m, ids = lib.new_matcher(lib.compile("json_schema", SCHEMA)), tok.encode(instance(0), add_special_tokens=False)
    ok = all(lib.consume(m, t) for t in ids[:10]) and lib.rollback(m, 3) and all(lib.consume(m, t) for t in ids[7:10])
    print(f"  consume 10 tokens, roll back 3, consume them again: {'ok' if ok else 'FAILED'}")
    forced = lib.forced(lib.new_matcher(lib.compile("regex", "Answer: (yes|no)")))
    print(f"  forced at the start of regex 'Answer: (yes|no)': {forced}")
    for kind, bad in [("json_schema", '{"type": "nonsense"}'), ("regex", "("), ("gbnf", 'root ::= ( "yes"')]:
        try:
            lib.compile(kind, bad)
            print(f"  bad {kind} {bad!r}: accepted, no error")
        except Exception as e:
            msg = " | ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
            print(f"  bad {kind} {bad!r}: {type(e).__name__}: {msg[:200]}")


def main():
    present = [name for name, lib in LIBS.items() if importlib.util.find_spec(lib.modules[0])]
    for name in LIBS.keys() - set(present):
        print(f"{name}: not installed, skipped")
    gguf = Path(sys.prefix, "share/lmgen", DEFAULT_MODEL_FILE)  # else lmgen's own venv's copy
    gguf = gguf if gguf.exists() else Path(__file__).resolve().parents[1] / ".venv/share/lmgen" / DEFAULT_MODEL_FILE
    tokenizers = {"SmolLM2": load_tokenizer(gguf), "GPT-2": gpt2_tokenizer()}
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in present)
    print(f"torch {torch.__version__}, {THREADS} CPUs; {versions}")
    for name in present:  # import cost on top of torch's, in a fresh process
        module = LIBS[name].modules[0]
        code = f"import time, torch; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        print(f"import {module}: {float(out) * 1e3:.0f} ms on top of torch")
    print()
    rows, libs = [], {}
    for name in present:
        for tok_name, tok in tokenizers.items():
            libs[name, tok_name], row = bench(LIBS[name], tok)
            rows.append([name, tok_name, *row])
    table(["library", "tokenizer", "tok setup ms", "schema cold ms", "warm ms", "1st mask ms", "regex ms",
           "json_object ms", "tokens", "allowed/step", "b1 mean us", "b1 p99 us", "b16 seq ms/step",
           "b16 par ms/step", "valid"], rows)
    print("compile: grammar to a matcher-ready object (warm: xgrammar's compiler cache; llguidance and\n"
          "outlines-core cache nothing, so a second build); 1st mask: a fresh matcher's first mask; allowed/step:\n"
          "mean tokens allowed at batch 1; b1: mask + commit per token, 5 passes; b16: 16 matchers on 16 instances,\n"
          "steps while all are live; valid: every token and the final EOS were allowed\n")
    apply_bench(present)
    for name in present:
        probe(libs[name, "SmolLM2"], tokenizers["SmolLM2"])


if __name__ == "__main__":
    main()
