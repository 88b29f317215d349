"""The CLI's subcommands, each a function of the parsed arguments returning an exit code."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .params import GenerationConfig
from .tokenizer import VISIBLE


def _read(text: str | None) -> str:
    if text == "-":
        return sys.stdin.read()
    if text is None or text == "":
        raise ValueError("the prompt is empty: give some text, or '-' to read it from stdin")
    return text


def _config(args, **extra) -> GenerationConfig:
    names = ["max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "seed", "stop", "num_return_sequences", "num_beams", "logprobs", "regex", "choice"]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "json_schema", None):
        text = _file(args.json_schema, "--json-schema")
        try:
            given["json_schema"] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema: {args.json_schema} is not JSON: {e}") from None
    if getattr(args, "grammar", None):
        given["grammar"] = _file(args.grammar, "--grammar")
    return GenerationConfig.from_params(**given, **extra)  # bad values fail here, before loading


def _file(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from None


def _load(args, model=None):
    from .loading import load

    source = model if model is not None else args.model
    options = {k: getattr(args, k, None) for k in ("dtype", "device", "quantize")}
    if args.quiet or not sys.stderr.isatty():
        lm = load(source, **options, progress=False)
    else:
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr()) as bar:
            task = bar.add_task("loading model", total=None)
            lm = load(source, **options, progress=lambda done, total: bar.update(task, completed=done, total=total))
    return lm.compile() if getattr(args, "compile", False) else lm


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def _out(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _generation_json(g) -> dict:
    d = asdict(g)
    d.pop("prompt_logprobs", None)
    return d


def generate(args) -> int:
    """lmgen generate: stream continuations of a prompt (or print JSON)."""
    prompt = _read(args.prompt)
    config = _config(args)
    if args.stream and not args.json:
        raise ValueError("--stream goes with --json (plain output always streams)")
    lm = _load(args)
    lm.check_constraint(config)  # a bad schema or grammar fails before any output
    started, produced = time.perf_counter(), 0
    if args.json and not args.stream:
        gens = lm.generate(prompt, config)
        produced = sum(len(g.token_ids) for g in gens)
        _out({"model": lm.name, "prompt": prompt, "prompt_token_ids": lm.encode(prompt),
              "generations": [_generation_json(g) for g in gens]})
    elif config.num_beams > 1:
        for i, g in enumerate(lm.generate(prompt, config)):
            _label(i, config.num_return_sequences)
            sys.stdout.write(prompt + g.text + "\n")
            produced += len(g.token_ids)
    else:
        for i in range(config.num_return_sequences):
            # Sequence i is seeded seed + i, exactly as generate(num_return_sequences=n) seeds it.
            seed = None if config.seed is None else config.seed + i
            one = GenerationConfig.from_params(config, num_return_sequences=1, seed=seed)
            produced += _stream_one(lm, prompt, one, i, args)
    if args.verbose:
        elapsed = time.perf_counter() - started
        sys.stderr.write(f"{produced} tokens in {elapsed:.2f} s: {produced / max(elapsed, 1e-9):.1f} tokens/s\n")
    return 0


def _label(i: int, n: int) -> None:
    if n > 1:
        sys.stdout.write(f"--- sequence {i + 1} of {n} ---\n")


def _stream_one(lm, prompt, config, index, args) -> int:
    count = 0
    if args.json:
        for e in lm.stream_events(prompt, config):
            count += e.token_id is not None
            line = {"index": index, "token_id": e.token_id, "text": e.text}
            if e.logprob is not None:
                line["logprob"] = asdict(e.logprob)
            if e.generation is not None:
                line["generation"] = _generation_json(e.generation)
            _out(line)
        return count
    _label(index, args.num_return_sequences or 1)
    sys.stdout.write(prompt)
    try:
        for e in lm.stream_events(prompt, config):
            count += e.token_id is not None
            sys.stdout.write(e.text)
            sys.stdout.flush()
    finally:
        sys.stdout.write("\n")  # Ctrl-C keeps what was printed, on its own line
        sys.stdout.flush()
    return count


def probs(args) -> int:
    """lmgen probs: the next-token distribution as a table, JSON or bar chart."""
    prompt = _read(args.prompt)
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    lm = _load(args)
    rows = lm.top_tokens(prompt, k=args.top)
    if args.json:
        _out({"prompt": prompt, "prompt_token_ids": lm.encode(prompt),
              "tokens": [{"rank": i + 1, "id": r.token_id, "token": r.token_text, "probability": r.probability}
                         for i, r in enumerate(rows)]})
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"next token after {prompt!r}")
        for col, justify in [("rank", "right"), ("id", "right"), ("token", "left"), ("probability", "right"),
                             ("", "left")]:
            table.add_column(col, justify=justify)
        top = rows[0].probability
        for i, r in enumerate(rows):
            bar = "█" * max(1, round(30 * r.probability / top))
            table.add_row(str(i + 1), str(r.token_id), repr(r.token_text.translate(VISIBLE))[1:-1],
                          f"{r.probability:.4f}", bar)
        Console(width=100).print(table)
    if args.plot:
        _plot(rows, prompt, Path(args.plot))
    return 0


def _plot(rows, prompt: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    labels = [r.token_text.translate(VISIBLE) for r in rows][::-1]
    ax.barh(range(len(rows)), [r.probability for r in rows][::-1], color="#3b7dd8")
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("probability")
    ax.set_title(f"next token after {prompt[-60:]!r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    sys.stderr.write(f"wrote {path}\n")


def score(args) -> int:
    """lmgen score: each token's log-probability, rank and step entropy, and the text's perplexity."""
    if args.file and args.text:
        raise ValueError("give the text or --file, not both")
    text = Path(args.file).read_text(encoding="utf-8") if args.file else _read(args.text)
    lm = _load(args)
    s = lm.score(text)
    tokens = [lm.tokenizer.token_text(i) for i in s.token_ids]
    entries = [None] + s.tokens
    if args.json:
        _out({"token_ids": s.token_ids, "tokens": tokens, "logprobs": [None] + s.logprobs,
              "ranks": [e and e.rank for e in entries], "entropies": [e and e.entropy for e in entries],
              "total_logprob": s.total_logprob, "perplexity": s.perplexity})
        return 0
    sys.stdout.write(f"{'token':>20}  {'logprob':>9}  {'rank':>6}  {'entropy':>7}\n")
    for tok, e in zip(tokens, entries):
        shown = repr(tok.translate(VISIBLE))[1:-1]
        numbers = "" if e is None else f"{e.logprob:9.4f}  {e.rank:6d}  {e.entropy:7.3f}"
        sys.stdout.write(f"{shown:>20}  {numbers}\n")
    sys.stdout.write(f"total log-probability {s.total_logprob:.4f} over {len(s.logprobs)} tokens; "
                     f"perplexity {s.perplexity:.4f}\n")
    return 0


def chat(args) -> int:
    """lmgen chat: talk with an instruct model through its chat template."""
    config = _config(args)
    lm = _load(args)
    if not lm.tokenizer.chat_template:
        raise ValueError(f"{lm.name} has no chat template, so it cannot chat; use `lmgen generate`")
    lm.check_constraint(config)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)

    def reply(message: str) -> None:
        history.append({"role": "user", "content": message})
        ids = lm.chat_ids(history)
        text = ""
        try:
            for piece in lm.stream(ids, config):
                text += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": text})

    if args.message is not None:
        reply(_read(args.message))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        message = line.strip()
        if message in ("/quit", "/exit"):
            return 0
        if message == "/reset":
            history[:] = system
            sys.stdout.write("(history cleared)\n")
        elif message:
            try:
                reply(message)
            except KeyboardInterrupt:
                sys.stdout.write("(stopped)\n")


def serve(args) -> int:
    """lmgen serve: an OpenAI-compatible HTTP server until SIGINT/SIGTERM."""
    import os

    _at_least(args, ("max_concurrent", "max_waiting", "max_model_len", "max_n", "prefill_chunk"), zero=("port",))
    from .server import serve as run
    from .server.gate import check_api_key

    api_key = args.api_key if args.api_key is not None else os.environ.get("LMGEN_API_KEY") or None
    check_api_key(api_key)  # before the model loads
    lm = _load(args)
    run(lm, host=args.host, port=args.port, max_concurrent=args.max_concurrent, max_waiting=args.max_waiting,
        max_model_len=args.max_model_len, api_key=api_key, max_n=args.max_n, allowed_hosts=args.allowed_hosts,
        prefill_chunk=args.prefill_chunk, prefix_caching=not args.no_prefix_caching)
    return 0


def _at_least(args, names: tuple[str, ...], zero: tuple[str, ...] = ()) -> None:
    """ValueError naming the flag unless each of `names` is >= 1 and each of `zero` >= 0 (None: unset)."""
    for name in zero + names:
        value, low = getattr(args, name), 0 if name in zero else 1
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def batch(args) -> int:
    """lmgen batch: every row of a file through the engine (or a Ray cluster), committed in parts, resumable."""
    from . import batch as job

    _at_least(args, ("max_concurrent", "threads", "workers", "cpus_per_worker", "chunk_rows"), zero=("max_tokens",))
    raw = job.read_rows(Path(args.input))  # an unreadable input fails before the model loads
    parts = job.Parts(Path(args.output))
    threads = args.threads or (args.cpus_per_worker if args.ray is not None else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    lm = _load(args)
    rows, errors = job.prepare(lm, raw, args.seed, args.max_tokens)
    done = parts.done()
    todo = [r for r in rows if r.id not in done]
    sys.stderr.write(f"lmgen: {len(raw)} rows: {len(todo)} to generate, {len(rows) - len(todo)} already done, "
                     f"{len(errors)} that cannot run (see {parts.errors.name})\n")
    started = time.perf_counter()
    with _batch_progress(len(todo), args.quiet) as progress:
        if args.ray is not None:
            from . import batch_ray

            load = {"source": args.model, "dtype": args.dtype, "device": args.device, "quantize": args.quantize}
            batch_ray.run(args.ray or None, raw, todo, parts, load=load, workers=args.workers,
                          cpus_per_worker=args.cpus_per_worker, seed=args.seed, max_tokens=args.max_tokens,
                          slots=args.max_concurrent, chunk_rows=args.chunk_rows, progress=progress)
        else:
            job.run_local(lm, todo, parts, args.max_concurrent, progress, args.chunk_rows)
    good, bad = parts.finish({r.id: r.index for r in rows}, errors)
    seconds, tokens = time.perf_counter() - started, progress.tokens[0]
    sys.stderr.write(f"lmgen: wrote {good} rows to {args.output} and {bad} to {parts.errors}; generated {tokens} "
                     f"tokens for {len(todo)} rows in {seconds:.1f} s ({len(todo) / seconds:.2f} rows/s, "
                     f"{tokens / seconds:.0f} tokens/s)\n")
    return 0


@contextlib.contextmanager
def _batch_progress(total: int, quiet: bool):
    """A callback per finished row that moves a progress bar: rows/s, tokens/s and the time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started, tokens = time.perf_counter(), [0]
    bar = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn(), console=_stderr(), disable=quiet or not sys.stderr.isatty())
    task = bar.add_task("batch", total=total, rate="")

    def progress(record: dict) -> None:
        tokens[0] += record.get("completion_tokens", 0)
        elapsed = max(time.perf_counter() - started, 1e-9)
        done = bar.tasks[0].completed + 1
        bar.update(task, advance=1, rate=f"{done / elapsed:.1f} rows/s, {tokens[0] / elapsed:.0f} tokens/s")

    progress.tokens = tokens
    with bar:
        yield progress


def models(args) -> int:
    """lmgen models: the embedded default, the packaged models (installed or not) and the Hugging Face cache's."""
    from .errors import ModelNotFoundError
    from .loading import default_model_path
    from .packaged import PACKAGED, assembled_path, installed

    rows = []
    try:
        rows.append({"model": "(default)", "source": "embedded", "path": str(default_model_path())})
    except ModelNotFoundError:
        pass
    for m in PACKAGED.values():
        ok = installed(m)
        path = assembled_path(m) if ok else None
        rows.append({"model": m.name, "source": "package", "path": str(path) if path else None,
                     "installed": ok, "description": m.description, "install": m.install})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                rows.append({"model": repo.repo_id, "source": "hf-cache", "path": str(repo.repo_path)})
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        pass
    if args.json:
        _out(rows)
    else:
        for r in rows:
            sys.stdout.write(f"{r['model']:40} {r['source']:9} {r['path'] or _not_assembled(r)}\n")
    return 0


def _not_assembled(row: dict) -> str:
    if row["installed"]:
        return f"installed; assembled into lmgen's cache on first use ({row['description']})"
    return f"not installed: {row['install']} ({row['description']})"


def count_parameters(model) -> int:
    """Weights in a model, counted once when tied, quantized layers by their logical shape."""
    from .models import quant

    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    for m in model.modules():
        if isinstance(m, quant.Int4Linear):
            unique[m.qs.data_ptr()] = m.in_features * m.out_features
        elif isinstance(m, quant.Int8Rows):
            unique[m.qweight.data_ptr()] = m.qweight.numel()
        elif isinstance(m, quant.KRows):
            unique[m.raw.data_ptr()] = m.out_features * m.in_features
    return sum(unique.values())


def describe_attention(model) -> str:
    """Which layers attend within a sliding window, and what that means for prefix caching, in words."""
    windows = [getattr(getattr(b, "self_attn", None), "window", None) for b in model.blocks]
    cut = sorted({w for w in windows if w})
    if not cut:
        return "full on every layer"
    return (f"sliding window {'/'.join(map(str, cut))} on {sum(bool(w) for w in windows)} of {len(windows)} layers "
            "(masked: every position stays cached, so prefix caching holds)")


def info(args) -> int:
    """lmgen info: architecture, size, context, dtype, vocabulary and chat template of a model."""
    args.dtype = args.device = None
    args.verbose = False
    lm = _load(args, args.model)
    facts = {"model": lm.name, "architecture": type(lm.model.config).__module__.rsplit(".", 1)[-1],
             "parameters": count_parameters(lm.model), "weights": lm.weights, "context_length": lm.context_length,
             "dtype": str(lm.dtype),
             "device": str(lm.device), "vocab_size": lm.vocab_size, "eos_token_ids": list(lm.eos_token_ids),
             "chat_template": bool(lm.tokenizer.chat_template), "attention": describe_attention(lm.model),
             "constraints": lm.constraints.describe()}
    if args.json:
        _out(facts)
    else:
        for k, v in facts.items():
            sys.stdout.write(f"{k:15} {v}\n")
    return 0
