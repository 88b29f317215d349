"""GPU benchmark: lmgen against transformers on one CUDA device, on random-weight models of real shapes.

No weights can be shipped to or fetched on a machine without internet, so both engines load the same random
bfloat16 weights, saved as a Hugging Face folder: SmolLM2-135M's shape (the embedded model) and
Llama-3.2-1B's. Prints one table: decode tokens/s at batch 1 (greedy) and batch 16 (sampled, all tokens),
time to first token for a 512-token prompt, lmgen against transformers, and at batch 1 the weight and cache
bytes read per second, against the device's copy bandwidth measured in the same run.

    python benchmarks/gpu.py [--tokens 128] [--shapes SmolLM2-135M,Llama-3.2-1B] [--device cuda] [--out DIR]

`--shapes tiny --device cpu` checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import bench  # benchmarks/bench.py beside this file: its timing and token agreement
import torch

SHAPES = {  # Hugging Face LlamaConfig fields
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=True),
}
EOS = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """bench.timed for device work: each run ends when the device is done."""
    return bench.timed(lambda: (fn(), sync(device)))


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / sorted(times)[len(times) // 2]


def make_model(shape: str, folder: Path, device: torch.device):
    """A random transformers Llama of the shape in bfloat16 on `device`, also saved (with a tokenizer) to `folder`."""
    import tokenizers
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # wider than the default init, so logits are peaked and greedy tokens mean something
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    return model


def prompts(vocab: int) -> tuple[list[int], list[list[int]], list[int]]:
    """A short prompt, 16 short prompts and a 512-token prompt, as random token ids (0, the EOS, excluded)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (17 * 8 + 512,), generator=g).tolist()
    return ids[:8], [ids[8 * i:8 * i + 8] for i in range(1, 17)], ids[-512:]


def bench_transformers(model, tokens: int, device: torch.device) -> dict:
    short, batch, long = prompts(model.config.vocab_size)
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=EOS)
    one = torch.tensor([short], device=device)
    many = torch.tensor(batch, device=device)
    out = {}
    with torch.no_grad():
        model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=4, pad_token_id=EOS)  # warm-up
        out["b1_tok_s"] = tokens / timed(lambda: model.generate(one, attention_mask=torch.ones_like(one),
                                                                do_sample=False, **kw), device)
        out["b16_tok_s"] = 16 * tokens / timed(lambda: model.generate(many, attention_mask=torch.ones_like(many),
                                                                      do_sample=True, **kw), device)
        ids = torch.tensor([long], device=device)
        out["ttft512_s"] = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                                        pad_token_id=EOS), device)
        g = model.generate(one, attention_mask=torch.ones_like(one), do_sample=False, **kw)
        out["greedy_ids"] = g[0, len(short):].tolist()
        out["logits"] = model(one).logits[0, -1].float().cpu()
    return out


def bytes_per_token(lm, context: int) -> int:
    """Bytes one decode step must read: every weight (the embedding table only where it is also the
    output layer), and the keys and values of `context` positions."""
    model = lm.model
    tensors = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}  # tied weights once
    total = sum(tensors.values())
    embed = model.model.embed_tokens.weight
    if embed.data_ptr() != model.lm_head.weight.data_ptr():
        total -= embed.numel() * embed.element_size()
    layers, kv_heads, head_dim = model.cache_shape()
    return total + 2 * layers * kv_heads * head_dim * context * embed.element_size()


def step_time(lm, device: torch.device, steps: int = 100) -> float:
    """Seconds per compiled decode step alone (no sampling or Python around it), at position 64."""
    cache = lm._caches["main"]
    tokens, positions = torch.tensor([[5]]), torch.tensor([[64]])
    slot = cache.allocate()
    try:
        for _ in range(3):
            lm._compiled(tokens, positions, cache, slot)
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            lm._compiled(tokens, positions, cache, slot)
        sync(device)
        return (time.perf_counter() - t) / steps
    finally:
        cache.release(slot)


def profile_step(lm, device: torch.device, path: Path) -> None:
    """Write the GPU time of each kernel over 20 compiled decode steps to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_time(lm, device, steps=20)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))


def bench_lmgen(folder: Path, tokens: int, device: torch.device, compiled: bool,
                profile_to: Path | None = None) -> dict:
    import lmgen

    t0 = time.perf_counter()
    lm = lmgen.load(folder, device=device, dtype="bfloat16")
    short, batch, long = prompts(lm.vocab_size)
    if compiled:
        lm.compile()
    lm.generate(short, max_new_tokens=tokens, ignore_eos=True)  # warm-up; compiled: compile and record the graph
    out = {"load_s": time.perf_counter() - t0}
    out["b1_tok_s"] = tokens / timed(lambda: lm.generate(short, max_new_tokens=tokens, ignore_eos=True), device)
    if compiled:
        out["step_s"] = step_time(lm, device)
        out["cuda_graphs"] = lm._compiled.use_graphs  # False: capture failed and the step ran without graphs
        if profile_to is not None and device.type == "cuda":
            profile_step(lm, device, profile_to)
    out["bytes_per_token"] = bytes_per_token(lm, len(short) + tokens // 2)
    out["b16_tok_s"] = 16 * tokens / timed(
        lambda: lm.generate(batch, max_new_tokens=tokens, do_sample=True, seed=0, ignore_eos=True), device)
    out["ttft512_s"] = timed(lambda: lm.generate(long, max_new_tokens=1), device)
    out["greedy_ids"] = lm.generate(short, max_new_tokens=tokens, ignore_eos=True)[0].token_ids
    out["logits"] = lm.next_token_logits(short)
    return out


def float32_parity(folder: Path, tokens: int, device: torch.device) -> str:
    """lmgen against transformers, both float32 on the device: greedy tokens and last logits."""
    import transformers

    import lmgen

    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    lm = lmgen.load(folder, device=device, dtype="float32")
    short = prompts(lm.vocab_size)[0]
    ids = torch.tensor([short], device=device)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                            min_new_tokens=tokens, pad_token_id=EOS)[0, len(short):].tolist()
        want_logits = ref(ids).logits[0, -1].float().cpu()
    got = lm.generate(short, max_new_tokens=tokens, ignore_eos=True)[0].token_ids
    diff, scale = float((lm.next_token_logits(short) - want_logits).abs().max()), float(want_logits.abs().max())
    return (f"float32 on the device, lmgen against transformers: greedy {tokens} tokens "
            f"{bench.agreement(want, got)}; last logits differ by at most {diff:.2e} (of {scale:.1f})")


def table(rows: list[tuple[str, str, dict]], bandwidth: float, tokens: int) -> str:
    lines = [f"{tokens} new tokens; batch 1 greedy, batch 16 sampled (all tokens/s); bfloat16 random weights; "
             f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); "
             f"timings are medians of {bench.REPEATS}.",
             "", "| model | engine | b1 tok/s | vs transformers | b1 GB/s (share of copy bw) | graph step (ms) "
             "| b16 tok/s | vs transformers | TTFT 512 (s) | vs transformers | load (s) | greedy vs transformers "
             "| last-logit max diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    refs = {shape: r for shape, engine, r in rows if engine == "transformers"}
    for shape, engine, r in rows:
        if "error" in r:
            lines.append(f"| {shape} | {engine} | error: {r['error']} |||||||||||")
            continue
        ref = refs.get(shape, {})

        def ratio(key, inverse=False):
            if not (r.get(key) and ref.get(key)) or engine == "transformers":
                return "-"
            return f"{(ref[key] / r[key]) if inverse else (r[key] / ref[key]):.1f}x"

        gbs = "-"
        if r.get("bytes_per_token"):
            rate = r["bytes_per_token"] * r["b1_tok_s"]
            gbs = f"{rate / 1e9:.0f} ({rate / bandwidth:.0%})"
            if r.get("step_s"):
                step_rate = r["bytes_per_token"] / r["step_s"]
                gbs += f"; step alone {step_rate / 1e9:.0f} ({step_rate / bandwidth:.0%})"
        step = f"{r['step_s'] * 1e3:.3f}" if r.get("step_s") else "-"
        same = bench.agreement(ref["greedy_ids"], r["greedy_ids"]) if engine != "transformers" and ref else "-"
        diff = "-"
        if engine != "transformers" and ref:
            diff = f"{float((r['logits'] - ref['logits']).abs().max()):.3f} of {float(ref['logits'].abs().max()):.1f}"
        load = f"{r['load_s']:.1f}" if r.get("load_s") else "-"
        lines.append(f"| {shape} | {engine} | {r['b1_tok_s']:.1f} | {ratio('b1_tok_s')} | {gbs} | {step} | "
                     f"{r['b16_tok_s']:.1f} | {ratio('b16_tok_s')} | {r['ttft512_s']:.3f} | "
                     f"{ratio('ttft512_s', inverse=True)} | {load} | {same} | {diff} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--shapes", default="SmolLM2-135M,Llama-3.2-1B")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="also write the table (gpu.md) and raw numbers (gpu.json) here")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bandwidth = copy_bandwidth(device)
    header = f"Device: {name}, torch {torch.__version__}"
    print(header, flush=True)
    rows, parity = [], []
    shapes = args.shapes.split(",")
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            runs = [("transformers", None), ("lmgen eager", False), ("lmgen compiled", True)]
            for engine, compiled in runs:
                t = time.perf_counter()
                try:
                    if engine == "transformers":
                        model = make_model(shape, folder, device)
                        r = bench_transformers(model, args.tokens, device)
                        del model
                    else:
                        profile = args.out / f"profile-{shape}.txt" if args.out and compiled else None
                        r = bench_lmgen(folder, args.tokens, device, compiled, profile)
                except Exception as e:  # one engine failing must not lose the others' numbers
                    traceback.print_exc()
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append((shape, engine, r))
                shown = {k: v for k, v in r.items() if k not in ("greedy_ids", "logits")}
                print(f"{shape} {engine} ({time.perf_counter() - t:.0f} s): {shown}", flush=True)
            if shape == shapes[0]:
                try:
                    parity.append(f"{shape}: {float32_parity(folder, args.tokens, device)}")
                except Exception as e:
                    traceback.print_exc()
                    parity.append(f"{shape}: float32 parity not run: {type(e).__name__}: {str(e)[:150]}")
                print(parity[-1], flush=True)
    text = f"{header}\n\n{table(rows, bandwidth, args.tokens)}\n\n" + "\n".join(parity)
    print(text)
    if args.out:
        (args.out / "gpu.md").write_text(text + "\n")
        raw = [(s, e, {k: v for k, v in r.items() if k != "logits"}) for s, e, r in rows]
        (args.out / "gpu.json").write_text(json.dumps({"device": name, "copy_bytes_s": bandwidth, "rows": raw,
                                                       "parity": parity}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
