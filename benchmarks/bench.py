"""Benchmark lmgen against transformers and llama.cpp on the same model.

llama.cpp runs through llama-cpp-python when it is installed, else as the `llama-server` binary that
benchmarks/build_llama_server.sh builds (its own timings of prompt and generation, no HTTP overhead).
"lmgen-default" is `lmgen.load()` with no arguments in a fresh process: what a user gets; its first-token
time counts from the process start (imports, load, kernels, prompt).

Each engine runs in its own process so load time and peak RSS are its own; each timing is the median of
three runs. Prints one table and, with --write, saves it with the machine's description to BENCHMARKS.md.

    .venv/bin/python benchmarks/bench.py [--models embedded,gemma-3-270m] [--engines lmgen-float32,llama.cpp]
        [--tokens 64] [--write]

Models: "embedded" (SmolLM2-135M-Instruct, Q4_1) and "gemma-3-270m" (Gemma 3 270M base, Q4_K_M, from the
`lmgen[gemma]` extra); one table each. The int4-compiled row is the embedded model's only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The quick brown fox jumped over"
ENGINES = ["lmgen-default", "lmgen-float32", "lmgen-int4-compiled", "transformers", "llama.cpp"]
MODELS = {"embedded": ("SmolLM2-135M-Instruct (embedded GGUF, Q4_1)", ENGINES),
          "gemma-3-270m": ("Gemma 3 270M base (GGUF Q4_K_M: Q8_0, Q5_0, Q4_K, Q6_K)",
                           [e for e in ENGINES if e != "lmgen-int4-compiled"])}
START = time.perf_counter()
NOTES_MARKER = "<!-- notes: bench.py --write keeps everything below this line -->"
AGREEMENT_TOKENS = 128  # greedy tokens on the seed prompt compared with lmgen-float32
REPEATS = 3  # each timing is the median of this many runs: a shared machine's noise is about 10%


MODEL = "embedded"  # the worker's model (--model)


def gguf_path() -> Path:
    from lmgen.loading import default_model_path, resolve

    return default_model_path() if MODEL == "embedded" else resolve(MODEL)


def file_type() -> str:
    """The file's quantization as its weights column says it, e.g. "Q4_1" or "Q4_K_M"."""
    return "Q4_1" if MODEL == "embedded" else "Q4_K_M"


def timed(fn) -> float:
    """The median wall time of REPEATS calls of fn, in seconds."""
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def long_prompt(n: int) -> str:
    return " ".join(["The quick brown fox jumped over the lazy dog."] * (n // 10 + 1))


def run_lmgen(variant: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    import lmgen

    quantize = "int4" if variant.startswith("int4") else None
    if variant == "default":
        lm = lmgen.load(None if MODEL == "embedded" else MODEL)
        next(iter(lm.stream(PROMPT, max_new_tokens=1)))
        first_token_s = time.perf_counter() - START
    else:
        lm = lmgen.load(gguf_path(), dtype=None if quantize else variant, quantize=quantize)
    weights = lm.weights.split(" (")[0]
    if variant.endswith("-compiled"):  # load time includes compiling the decode step (torch's disk cache may be warm)
        lm.compile()
        lm.generate(PROMPT, max_new_tokens=2)
        weights += ", torch.compile"
    lm.next_token_logits(PROMPT)  # first token ready
    out = {"load_s": time.perf_counter() - t0, "weights": weights}
    if variant == "default":
        out["first_token_s"] = first_token_s
    lm.generate(PROMPT, max_new_tokens=4)  # warm-up
    out["b1_tok_s"] = tokens / timed(lambda: lm.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True))
    prompts = [f"{PROMPT} {i}" for i in range(16)]
    out["b16_tok_s"] = 16 * tokens / timed(
        lambda: lm.generate(prompts, max_new_tokens=tokens, do_sample=True, seed=0, ignore_eos=True))
    ids = lm.encode(long_prompt(512))[:512]
    fresh = iter(range(100, 200))  # a new first token each run: a prompt sent again would reuse its cached prefix
    out["ttft512_s"] = timed(lambda: lm.generate([next(fresh)] + ids[1:], max_new_tokens=1))
    g = lm.generate(PROMPT, max_new_tokens=AGREEMENT_TOKENS, min_new_tokens=AGREEMENT_TOKENS)[0]
    out["prompt_ids"], out["greedy_ids"] = g.prompt_token_ids, g.token_ids
    return out


def run_transformers(tokens: int) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers

    path = gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        model(**tok(PROMPT, return_tensors="pt"))
    out = {"load_s": time.perf_counter() - t0, "weights": f"GGUF {file_type()} -> float32"}
    kw = dict(min_new_tokens=tokens, max_new_tokens=tokens, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        enc = tok(PROMPT, return_tensors="pt")
        model.generate(**enc, max_new_tokens=4, pad_token_id=tok.eos_token_id)
        out["b1_tok_s"] = tokens / timed(lambda: model.generate(**enc, do_sample=False, **kw))
        tok.padding_side = "left"
        batch = tok([f"{PROMPT} {i}" for i in range(16)], return_tensors="pt", padding=True)
        torch.manual_seed(0)
        out["b16_tok_s"] = 16 * tokens / timed(lambda: model.generate(**batch, do_sample=True, **kw))
        ids = tok(long_prompt(512), return_tensors="pt").input_ids[:, :512]
        out["ttft512_s"] = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                                        pad_token_id=tok.eos_token_id))
        ids = tok(PROMPT, return_tensors="pt").input_ids
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=AGREEMENT_TOKENS,
                           min_new_tokens=AGREEMENT_TOKENS, pad_token_id=tok.eos_token_id)
        out["prompt_ids"], out["greedy_ids"] = ids[0].tolist(), g[0, ids.shape[1]:].tolist()
    return out


def run_llama_server(tokens: int, binary: Path) -> dict:
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(binary), "-m", str(gguf_path()), "--port", str(port), "--host", "127.0.0.1",
                             "-t", str(os.cpu_count()), "-np", "1", "-c", "2048"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError("llama-server did not start") from None
            time.sleep(0.1)

        def complete(prompt, n, **kw):
            body = dict(prompt=prompt, n_predict=n, temperature=0, cache_prompt=False, **kw)
            return httpx.post(url + "/completion", json=body, timeout=300).json()

        complete(PROMPT, 1)
        out = {"load_s": time.perf_counter() - t0, "weights": f"GGUF {file_type()} (native, llama-server)"}
        runs = [complete(PROMPT, tokens, ignore_eos=True)["timings"] for _ in range(REPEATS)]
        out["b1_tok_s"] = sorted(r["predicted_per_second"] for r in runs)[REPEATS // 2]
        ids = httpx.post(url + "/tokenize", json={"content": long_prompt(512)}).json()["tokens"][:512]
        runs = [complete(ids, 1)["timings"] for _ in range(REPEATS)]
        out["ttft512_s"] = sorted(r["prompt_ms"] for r in runs)[REPEATS // 2] / 1000
        out["prompt_ids"] = httpx.post(url + "/tokenize", json={"content": PROMPT}).json()["tokens"]
        out["greedy_ids"] = complete(out["prompt_ids"], AGREEMENT_TOKENS, ignore_eos=True,
                                     return_tokens=True)["tokens"]
        with open(f"/proc/{proc.pid}/status") as f:
            out["peak_rss_mb"] = next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def run_llama_cpp(tokens: int) -> dict:
    binary = Path(__file__).resolve().parent.parent / ".venv/llama.cpp/build/bin/llama-server"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if binary.exists():
            return run_llama_server(tokens, binary)
        raise
    t0 = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(str(gguf_path()), n_threads=os.cpu_count(), n_ctx=1024, verbose=False)
    llm.create_completion(PROMPT, max_tokens=1)
    out = {"load_s": time.perf_counter() - t0, "weights": f"GGUF {file_type()} (native)"}
    eos_bias = {llm.token_eos(): -100.0}

    def fresh_completion(prompt, **kw):  # reset: llama-cpp-python would reuse the last run's prompt cache
        llm.reset()
        return llm.create_completion(prompt, **kw)

    out["b1_tok_s"] = tokens / timed(lambda: fresh_completion(PROMPT, max_tokens=tokens, temperature=0,
                                                              logit_bias=eos_bias))
    prompt = llm.detokenize(llm.tokenize(long_prompt(512).encode())[:512]).decode(errors="ignore")
    out["ttft512_s"] = timed(lambda: fresh_completion(prompt, max_tokens=1))
    llm.reset()
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    greedy = []
    eos = llm.token_eos()

    def no_eos(_, scores):  # as min_new_tokens does in the other engines
        scores[eos] = -float("inf")
        return scores

    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True, logits_processor=[no_eos]):
        greedy.append(token)
        if len(greedy) == AGREEMENT_TOKENS:
            break
    out["prompt_ids"], out["greedy_ids"] = ids, greedy
    return out


def worker(engine: str, tokens: int) -> None:
    if engine.startswith("lmgen-"):
        out = run_lmgen(engine.split("-", 1)[1], tokens)
    elif engine == "transformers":
        out = run_transformers(tokens)
    else:
        out = run_llama_cpp(tokens)
    out["rss_mb"] = out.pop("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))


def divergence(reference: list[int], other: list[int]) -> tuple[int | None, float]:
    """(index of the first differing token or None, share of positions with the same token)."""
    first = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), None)
    if first is None and len(reference) != len(other):
        first = min(len(reference), len(other))
    same = sum(a == b for a, b in zip(reference, other))
    return first, same / max(len(reference), 1)


def agreement(reference: list[int], other: list[int]) -> str:
    """"identical", or where `other` first differs from `reference` and the share of matching tokens."""
    first, share = divergence(reference, other)
    return "identical" if first is None else f"token {first}, {share:.0%} match"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, Python "
            f"{platform.python_version()}")


def table(results: dict[str, dict], tokens: int, model: str) -> str:
    ref = results.get("transformers", {})
    cpp = results.get("llama.cpp", {})

    def ratio(r, base, key):
        return f"{r[key] / base[key]:.2f}x" if r.get(key) and base.get(key) else "-"

    def num(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    fp32 = results.get("lmgen-float32", {})

    def against_fp32(r):
        if not (r.get("greedy_ids") and fp32.get("greedy_ids")):
            return "-"
        if r["prompt_ids"] != fp32["prompt_ids"]:
            return "other prompt ids"
        return agreement(fp32["greedy_ids"], r["greedy_ids"])

    lines = [f"Model: {MODELS[model][0]}, {tokens} new tokens, greedy at batch 1, "
             "sampled at batch 16 (aggregate tokens/s); each timing the median of three runs.", "",
             "| engine | weights | b1 tok/s | vs transformers | vs llama.cpp | b16 tok/s | vs transformers "
             f"| TTFT 512 (s) | peak RSS (MB) | load (s) | first token, fresh process (s) "
             f"| greedy {AGREEMENT_TOKENS} vs lmgen-float32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |||||||||||")
            continue
        lines.append(f"| {name} | {r['weights']} | {num(r, 'b1_tok_s', '.1f')} | {ratio(r, ref, 'b1_tok_s')} | "
                     f"{ratio(r, cpp, 'b1_tok_s')} | {num(r, 'b16_tok_s', '.1f')} | {ratio(r, ref, 'b16_tok_s')} | "
                     f"{num(r, 'ttft512_s', '.2f')} | {num(r, 'rss_mb', '.0f')} | {num(r, 'load_s', '.1f')} | "
                     f"{num(r, 'first_token_s', '.1f')} | {against_fp32(r)} |")
    return "\n".join(lines)


def run_engines(model: str, engines: list[str], tokens: int) -> dict[str, dict]:
    """Each engine's results on `model`, each in a fresh process, one after another."""
    results = {}
    for engine in engines:
        proc = subprocess.run([sys.executable, __file__, "--worker", engine, "--model", model,
                               "--tokens", str(tokens)], capture_output=True, text=True)
        if proc.returncode == 0:
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            results[engine] = {"error": "not run: " + last[:120]}
        shown = {k: v for k, v in results[engine].items() if not k.endswith("_ids")}
        print(f"{model} {engine}: {shown}", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--engines", default=None, help="default: every engine the model has")
    parser.add_argument("--model", default="embedded", help=argparse.SUPPRESS)  # the worker's
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--write", action="store_true", help="save the table to BENCHMARKS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        global MODEL
        MODEL = args.model
        worker(args.worker, args.tokens)
        return 0
    tables = []
    for model in args.models.split(","):
        engines = args.engines.split(",") if args.engines else MODELS[model][1]
        tables.append(table(run_engines(model, engines, args.tokens), args.tokens, model))
        print(tables[-1])
    text = "\n\n".join(tables)
    if args.write:  # the table is replaced; the written notes after NOTES_MARKER stay
        path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        old = path.read_text() if path.exists() else ""
        notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else NOTES_MARKER + "\n"
        path.write_text(f"# Benchmarks\n\nMachine: {machine()}\n\nCommand: `python benchmarks/bench.py --write`\n\n"
                        f"{text}\n\n{notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
